"""``KVCacheDecoder.step`` on the CPU as one call into the fused C step (tessera/kernels/cpu_decode.c).

``FusedCPUStep.create(decoder)`` reads the decoder's own tensors (weights, norm tables, the fused QK-norm
tables, the RoPE tables and the cache) and hands their data pointers to C; nothing is copied except the
few norm vectors it needs in fp32. It returns None, with the reason in ``decoder.step_backend``,
for anything the C step does not implement, and the decoder then keeps its PyTorch path:

* a GPU, or weights that are neither fp32 nor bf16;
* a norm other than RMSNorm / LayerNorm over the hidden size, an MLP other than SwiGLU,
  QK-norms that the decoder could not fold into one per-head LayerNorm table;
* no C compiler (``tessera.kernels.cpu_decode.load``), or ``TESSERA_CPU_DECODE=0``.

Prefill stays in PyTorch (SDPA over the whole prompt) and writes the same cache the C step reads; so
do steps of more than ``decoder.FUSED_STEP_MAX_BATCH`` rows, where oneDNN's blocked GEMM wins. In bf16
the decoder then keeps oneDNN-prepacked copies of the weights for that path next to the plain ones
this step reads.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tessera.generate.norms import AffineNormCall, RMSNormCall
from tessera.kernels import cpu_decode as C

if TYPE_CHECKING:
    from tessera.generate.decoder import KVCacheDecoder


class _Unsupported(Exception):
    pass


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


class FusedCPUStep:
    def __init__(self, decoder: KVCacheDecoder, lib: ctypes.CDLL) -> None:
        self._lib, self._d = lib, decoder
        self._keep: list[torch.Tensor] = []  # every tensor whose pointer C holds
        d = decoder
        h = d.hidden

        def ptr(t: torch.Tensor | None) -> int | None:
            if t is None:
                return None
            if not t.is_contiguous():
                raise _Unsupported("a weight is not contiguous")
            self._keep.append(t)
            return t.data_ptr()

        def norm(n: object, where: str) -> C.Norm:
            if n is None:
                return C.Norm(C.NORM_NONE, 0.0, None, None)
            if isinstance(n, RMSNormCall):
                kind, w, b, eps = "RMSNorm", n.weight, None, n.eps
            elif isinstance(n, AffineNormCall):
                kind, w, b, eps = n.kind, n.weight, n.bias, n.eps
            elif type(n) is nn.LayerNorm:
                kind, w, b, eps = "LayerNorm", n.weight, n.bias, n.eps
            else:
                raise _Unsupported(f"{where}: {type(n).__name__} is not an RMSNorm or LayerNorm")
            shape = tuple(getattr(n, "shape", None) or getattr(n, "normalized_shape", ()))
            if shape != (h,):
                raise _Unsupported(f"{where}: normalizes {shape}, not the hidden size ({h},)")
            if eps is None:  # torch's RMSNorm default
                eps = torch.finfo(torch.float32).eps
            return C.Norm(C.NORM_RMS if kind == "RMSNorm" else C.NORM_LAYER, float(eps), ptr(_f32(w)), ptr(_f32(b)))

        if d.dtype not in (torch.float32, torch.bfloat16):
            raise _Unsupported(f"weights in {d.dtype} (fp32 or bf16 only)")
        if not d.gated or d.activation is not F.silu:
            raise _Unsupported("the MLP is not SwiGLU")
        for w in [d.output] + [t for lw in d.layers for t in (lw.qkv, lw.proj, lw.fc1, lw.fc2)]:
            if w.dtype != d.dtype or w.layout != torch.strided:
                raise _Unsupported("weights are prepacked or in another dtype")
        first = d.layers[0]
        if any(lw.fc1.shape != first.fc1.shape or (lw.qk_w is None) != (first.qk_w is None) for lw in d.layers):
            raise _Unsupported("layers of different shapes")
        if first.fc1.shape[0] % 2:
            raise _Unsupported("linear_fc1 has an odd number of rows")
        layers = (C.Layer * d.num_layers)()
        for i, lw in enumerate(d.layers):
            if (lw.q_norm is not None or lw.k_norm is not None) and lw.qk_w is None:
                raise _Unsupported(f"layer {i}: QK-norms that are not per-head LayerNorms")
            layers[i] = C.Layer(
                norm(lw.ln_attn, f"layer {i} attention norm"), norm(lw.post_attn, f"layer {i} post-attention norm"),
                norm(lw.ln_mlp, f"layer {i} MLP norm"), norm(lw.post_mlp, f"layer {i} post-MLP norm"),
                ptr(lw.qkv), ptr(lw.proj), ptr(lw.fc1), ptr(lw.fc2),
                ptr(_f32(lw.qk_w)), ptr(_f32(lw.qk_b)), float(lw.qk_eps), None, None,
            )
        self._layers = layers
        embedding = _f32(d.embedding)  # the CPU decoder's table is fp32 already: no copy
        self._model = C.Model(
            layers=d.num_layers, hidden=h, heads=d.num_heads, groups=d.num_groups, head_dim=d.head_dim,
            ffn=first.fc1.shape[0] // 2, vocab=d.vocab_size, rot=0, batch=0, max_len=0, threads=1,
            bf16=int(d.dtype == torch.bfloat16),
            q_scale=1.0 if first.qk_w is not None else float(d.softmax_scale),
            embedding=ptr(embedding), embedding_rows=embedding.shape[0], final_norm=norm(d.final_norm, "final norm"),
            output=ptr(d.output), cos=None, sin_signed=None, layer=layers,
        )
        self._scratch: torch.Tensor | None = None

    @classmethod
    def create(cls, decoder: KVCacheDecoder) -> tuple[FusedCPUStep | None, str]:
        """(the fused step, "fused C step") or (None, why not)."""
        if decoder.device.type != "cpu":
            return None, f"PyTorch ops (device {decoder.device})"
        lib = C.load()
        if lib is None:
            return None, f"PyTorch ops (fused C step unavailable: {C.unavailable_reason()})"
        try:
            return cls(decoder, lib), "fused C step (tessera/kernels/cpu_decode.c)"
        except _Unsupported as exc:
            return None, f"PyTorch ops (fused C step does not support this model: {exc})"

    def bind(self) -> None:
        """Point C at the decoder's current cache, RoPE tables and batch (after ``allocate``)."""
        d, m = self._d, self._model
        if d.cache.dtype != torch.float32 or d._cos.dtype != torch.float32:
            raise RuntimeError("the fused CPU step needs the fp32 cache and RoPE tables the CPU decoder allocates")
        for i, (kc, vc) in enumerate(d._kv):
            self._layers[i].k_cache, self._layers[i].v_cache = kc.data_ptr(), vc.data_ptr()
        self._cos, self._sin = d._cos.contiguous(), d._sin_signed.contiguous()
        m.cos, m.sin_signed, m.rot = self._cos.data_ptr(), self._sin.data_ptr(), self._cos.shape[-1]
        if self._cos.shape[0] < d.capacity:
            raise RuntimeError("RoPE tables shorter than the cache")
        m.batch, m.max_len = d.batch, d.capacity
        n = self._lib.tessera_decode_scratch_floats(ctypes.byref(m))
        if self._scratch is None or self._scratch.numel() < n:
            self._scratch = torch.empty(n, dtype=torch.float32)

    def step(self, tokens: torch.Tensor, pad: torch.Tensor, key_valid: torch.Tensor, col: int) -> torch.Tensor:
        """Logits [b, V] in the decoder's dtype; writes cache column ``col`` and sets ``key_valid[:, col]``."""
        d = self._d
        tokens = tokens.reshape(-1).to(torch.int64).contiguous()
        if tokens.numel() != d.batch:
            raise ValueError(f"step got {tokens.numel()} tokens for a batch of {d.batch}")
        logits = torch.empty(d.batch, d.vocab_size, dtype=d.dtype)
        self._model.threads = torch.get_num_threads()  # the same OpenMP runtime as torch (libgomp.so.1)
        rc = self._lib.tessera_decode_step(ctypes.byref(self._model), tokens.data_ptr(), pad.data_ptr(),
                                           key_valid.data_ptr(), col, self._scratch.data_ptr(), logits.data_ptr())
        if rc == -3:
            raise ValueError(f"token ids outside the embedding [0, {d.embedding.shape[0]}): {tokens.tolist()}")
        if rc != 0:
            raise RuntimeError(f"fused CPU decode step failed (code {rc}: cache column {col} of {d.capacity}, "
                               f"rotary dims {self._model.rot})")
        return logits
