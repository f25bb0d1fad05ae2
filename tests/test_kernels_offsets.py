"""Row offsets beyond 2**31 elements (tokens x vocab > 2**31 in training; a [B, S, V] logits view in
decoding): the Triton kernels' index math is 64-bit. Run through the interpreter, which wraps 32-bit
integer arithmetic as the GPU does, over a sparse 8 GiB file mapped into memory: only the rows the
kernels touch are ever written, and the data sits 2**31 elements into the mapping so that a wrapped
(negative) offset reads zeros instead of crashing the test process."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest
import torch

from tessera.kernels import cross_entropy_z, sample_step, use_triton_interpreter
from tessera.kernels.cross_entropy import _backward_triton
from tessera.kernels.sampling import DecodeState, ModalitySampling, SamplingParams, TokenRules

FRONT = 1 << 31  # elements before the data: where a 32-bit wrap of a row offset lands
V = 256
STRIDE = (1 << 30) + 64  # i32, divisible by 16; row 2 starts 2**31 + 128 elements in


@pytest.fixture(scope="module")
def sparse_bf16(tmp_path_factory):
    """bf16 [FRONT + 2 * STRIDE + V] over a sparse file (no memory or disk used until written)."""
    use_triton_interpreter()
    path = tmp_path_factory.mktemp("sparse") / "logits.bin"
    n = FRONT + 2 * STRIDE + V
    big = torch.from_file(str(path), shared=True, size=n, dtype=torch.bfloat16)
    yield big
    del big
    path.unlink()


def _rows(big: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Three rows STRIDE apart, holding ``values`` (the last row beyond 2**31 elements)."""
    x = big[FRONT:].as_strided((3, V), (STRIDE, 1))
    x.copy_(values)
    return x


def test_cross_entropy_rows_beyond_2_31_elements(sparse_bf16):
    g = torch.Generator().manual_seed(0)
    values = (3 * torch.randn(3, V, generator=g)).to(torch.bfloat16)
    x = _rows(sparse_bf16, values)
    labels = torch.tensor([5, 17, 200])
    zw = 1e-4
    ref = cross_entropy_z(values.clone().requires_grad_(), labels, zw, backend="reference")
    ref.loss.sum().backward()
    xt = x.detach().requires_grad_()  # a strided view: the kernels read rows at row * STRIDE
    out = cross_entropy_z(xt, labels, zw, backend="triton")
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-5)
    out.loss.sum().backward()
    # the gradient is a fresh [3, V] tensor; its values come from rows read at offsets beyond 2**31
    torch.testing.assert_close(xt.grad.float(), ref_grad(values, labels, zw), rtol=1e-2, atol=1e-3)
    # written at offsets beyond 2**31 too: in place over the strided logits, as inplace_backward does
    lse = out.lse.detach()
    coef = (1 + 2 * zw * lse).contiguous()
    _backward_triton(x, labels, lse, coef, torch.ones(3), 0, x, None)
    torch.testing.assert_close(x.float(), ref_grad(values, labels, zw), rtol=1e-2, atol=1e-3)


def ref_grad(values, labels, zw):
    z = values.float()
    lse = torch.logsumexp(z, -1, keepdim=True)
    p = torch.exp(z - lse)
    return p * (1 + 2 * zw * lse) - torch.nn.functional.one_hot(labels, V).float()


def test_sampling_rows_beyond_2_31_elements(sparse_bf16):
    """A [3, V] view with row stride 2**30 + 64 (an i32 stride: row * stride needs 64 bits)."""
    g = torch.Generator().manual_seed(1)
    values = (3 * torch.randn(3, V, generator=g)).to(torch.bfloat16)
    values[torch.arange(3), 40 + torch.arange(3)] = 40.0  # a clear winner per row, at a different id each
    x = _rows(sparse_bf16, values)
    table = torch.zeros(V, dtype=torch.int8)
    table[:8] = 2
    rules = TokenRules(table, boi_id=2, eoi_id=3, eos_id=1, pad_id=0, image_tokens_per_image=4, max_seq_len=64)
    params = SamplingParams(text=ModalitySampling(temperature=1.0, top_k=5, top_p=0.9))
    want = sample_step(values.clone(), DecodeState.start([3, 3, 3]), rules, params, 7, 0, backend="reference")
    got = sample_step(x, DecodeState.start([3, 3, 3]), rules, params, 7, 0, backend="triton")
    assert want.tolist() == [40, 41, 42] and torch.equal(got, want)
