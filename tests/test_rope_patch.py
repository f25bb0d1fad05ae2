"""tessera.model.rope's patch (no neg / cat copies, no torch.cat with an empty pass-through) is bit-identical
to megatron's unfused RoPE."""

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [32, 16])  # full rotary (patched path) and partial (megatron's own)
def test_rope_patch_bit_identical(dtype, rot_dim):
    from megatron.core.models.common.embeddings import rope_utils

    from tessera.model.rope import patch_rope_without_copies

    patch_rope_without_copies()
    patch_rope_without_copies()  # idempotent: wraps megatron's function once
    patched = rope_utils._apply_rotary_pos_emb_bshd
    original = patched.__wrapped__
    assert not hasattr(original, "__wrapped__")
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(16, 2, 4, 96, dtype=dtype, generator=g)
    freqs = torch.randn(16, 1, 1, rot_dim, generator=g)
    a = qkv[..., :32].detach().clone().requires_grad_()
    b = a.detach().clone().requires_grad_()
    ya, yb = original(a, freqs), patched(b, freqs)
    grad = torch.randn(ya.shape, dtype=dtype, generator=g)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)
