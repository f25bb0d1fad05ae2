"""Pure-performance paths are bit-identical to megatron's: the RoPE patch (tessera.model.cpu) and SwiGLUMLP's activation."""

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rot_dim", [32, 16])  # full rotary (patched path) and partial (megatron's own)
def test_rope_patch_bit_identical(dtype, rot_dim):
    from megatron.core.models.common.embeddings import rope_utils

    from tessera.model.cpu import enable_cpu_compat

    if not enable_cpu_compat():
        pytest.skip("the patch is installed by the CPU compat layer only")
    patched = rope_utils._apply_rotary_pos_emb_bshd
    original = patched.__wrapped__
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_function_bit_identical_to_megatron_glu(dtype):
    import torch.nn.functional as F

    from tessera.model.layers import _SwiGLU

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 2 * 48, dtype=dtype, generator=g)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    x1, x2 = torch.chunk(a, 2, dim=-1)
    ya = F.silu(x1) * (x2 + 0.0)  # megatron's MLP glu() with glu_linear_offset 0.0
    yb = _SwiGLU.apply(b)
    grad = torch.randn(ya.shape, dtype=dtype, generator=g)
    ya.backward(grad)
    yb.backward(grad)
    assert torch.equal(ya, yb) and torch.equal(a.grad, b.grad)


def test_local_spec_uses_swiglu_mlp():
    from tessera.model.config import ModelConfig
    from tessera.model.layers import SwiGLUMLP
    from tessera.model.spec import chameleon_layer_spec

    for swin in (False, True):
        spec = chameleon_layer_spec(ModelConfig(swin_norm=swin), use_te=False)
        assert spec.submodules.mlp.module is SwiGLUMLP
