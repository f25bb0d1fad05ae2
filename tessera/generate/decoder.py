"""KV-cached incremental decoding over a megatron-core ``GPTModel`` (single process, TP=1, PP=1).

Megatron's full forward recomputes the whole prefix every call, so generation runs through this lean
path instead. It reuses the GPTModel's own parameters and norm modules, never a second copy of the
architecture's maths written from a paper:

* token embedding ``embedding.word_embeddings.weight``,
* per layer: ``input_layernorm``, ``self_attention.linear_qkv`` (megatron's grouped
  ``[q_g..., k_g, v_g]`` layout), ``q_layernorm`` / ``k_layernorm`` (whatever module the layer spec
  plugged in: Chameleon's per-head LayerNorm, megatron's shared one, or none), RoPE with the
  model's own ``rotary_pos_emb`` frequencies, ``linear_proj``, ``pre_mlp_layernorm``, ``mlp``
  (SwiGLU: ``linear_fc1`` = [gate; up]), and the Swin-style norm placement when the model uses it,
* ``decoder.final_layernorm`` and ``output_layer``.

With Transformer Engine layers (the GPU spec) the pre-attention / pre-MLP norms are fused into
``linear_qkv`` / ``linear_fc1`` (``layer_norm_weight``, ``layer_norm_bias``, ``normalization``, ``eps``,
``zero_centered_gamma``) and ``input_layernorm`` / ``pre_mlp_layernorm`` are IdentityOp: the decoder
reads the fused tables then (``norms.fused_norm``), and TE's standalone ``TENorm`` from its tables too.

The cache is one preallocated tensor ``[layers, 2, batch, kv_heads, capacity, head_dim]`` (the requested
length rounded up to whole attention windows). Prompts are LEFT-padded so every row writes the same
cache column at every step; each row has its own rotary position (``column - pad``) and padded keys
are masked out of attention.

The prefill runs once per prompt batch with the prompt's shapes. A one-token step
(``_graph_step``) is one function of buffers made by ``allocate``: the column it writes is a device
tensor and it attends over a whole window of ``kv_window`` columns, masking the unfilled ones, so its
shapes are fixed per (rows, capacity, window). On CUDA it is captured once per window and replayed
(cuda_graph.py); everywhere else, and where capture fails, the same function runs eagerly.

LoRA adapters left unmerged on the linears (``tessera.model.load(..., adapters="unmerged")``) are applied as
their low-rank term beside each weight matmul, ``x W^T + (x A^T)(scale B)^T``; the fused C step has no such
term, so such a model decodes through PyTorch ops. Merged adapters are plain weights.

Numerics: with ``dtype=float32`` the logits equal the GPTModel full forward to fp32 rounding (tested).
``bfloat16`` is the fast path on CPUs with AMX/AVX512-bf16 and on GPUs; norms and softmax still run in
float32 inside torch's kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tessera.generate.cuda_graph import DecodeGraphs, graphs_unavailable
from tessera.generate.norms import DecoderError, cast_module, fused_norm, is_identity, norm_callable

# Above this many rows a step is a real matmul, where oneDNN's blocked GEMM (the PyTorch path) catches up
# with the fused C step's GEMV loops (the crossover is measured in docs/generation.md). CFG doubles or
# triples the rows.
FUSED_STEP_MAX_BATCH = 32

# A decode step attends to the first columns of the cache in whole windows of this many columns
# (masked past the filled ones), so its shapes change once per window, not once per token: one
# CUDA graph per window. Within a window the extra columns cost a little attention, not weights.
# Off CUDA no graph is captured: a window of one column, i.e. exactly the filled columns, and a cache
# of exactly the length asked for.
KV_WINDOW_CUDA = 256
KV_WINDOW = 1


@dataclass
class _Layer:
    ln_attn: Callable | None  # applied to the branch input (pre-norm)
    post_attn: Callable | None  # applied to the branch output (Swin-style norm, Chameleon-34B)
    qkv: torch.Tensor  # [ng * (np/ng + 2) * hd, hidden]
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    proj: torch.Tensor  # [hidden, np * hd]
    ln_mlp: Callable | None
    post_mlp: Callable | None
    fc1: torch.Tensor  # [2 * ffn, hidden] ([gate; up]) or [ffn, hidden]
    fc2: torch.Tensor  # [hidden, ffn]
    # q_norm and k_norm as one LayerNorm over [q heads of a group..., k] with these affine tables
    # [groups, q_per_group + 1, head_dim] (q rows pre-scaled by the softmax scale), or None.
    qk_w: torch.Tensor | None = None
    qk_b: torch.Tensor | None = None
    qk_eps: float = 0.0
    # unmerged LoRA adapters of the four linears: (A, scale * B), or None
    qkv_lora: tuple[torch.Tensor, torch.Tensor] | None = None
    proj_lora: tuple[torch.Tensor, torch.Tensor] | None = None
    fc1_lora: tuple[torch.Tensor, torch.Tensor] | None = None
    fc2_lora: tuple[torch.Tensor, torch.Tensor] | None = None


def _layer_norm_affine(module: nn.Module | None, heads: int, head_dim: int) -> tuple | None:
    """(weight [heads, hd], bias [heads, hd], eps) of a LayerNorm over the head dimension: Chameleon's
    ``PerHeadLayerNorm`` or a torch ``LayerNorm((hd,))`` shared by the heads (megatron's qk_layernorm);
    None for anything else (RMSNorm, Transformer Engine norms), which then runs as a module."""
    if module is None:
        return None
    if type(module).__name__ == "PerHeadLayerNorm" and tuple(module.weight.shape) == (heads, head_dim):
        return module.weight.detach(), module.bias.detach(), float(module.eps)
    if type(module) is nn.LayerNorm and tuple(module.normalized_shape) == (head_dim,) and module.elementwise_affine:
        w = module.weight.detach()
        b = module.bias.detach() if module.bias is not None else torch.zeros_like(w)
        return w.expand(heads, head_dim), b.expand(heads, head_dim), float(module.eps)
    return None


def _mkldnn_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _can_prepack(dtype: torch.dtype, device: torch.device) -> bool:
    """oneDNN's prepacked linear (what inductor's CPU freezing uses): for bf16/fp16 on the CPU, F.linear
    re-lays the weight out on every call, which dominates small decode matmuls (docs/generation.md;
    bit-identical results). fp32 keeps MKL's F.linear (exact-equivalence tests)."""
    return (
        device.type == "cpu"
        and dtype in (torch.bfloat16, torch.float16)
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def _prepack(w: torch.Tensor) -> torch.Tensor | None:
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(w, 1)
        probe = torch.randn(2, w.shape[1], dtype=w.dtype)
        if not torch.equal(_mkldnn_linear(probe, packed), F.linear(probe, w)):
            return None
        return packed
    except (RuntimeError, AttributeError):
        return None


def _weight(linear: nn.Module, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    w = getattr(linear, "weight", None)
    if w is None:
        raise DecoderError(f"{name}: expected a linear layer with .weight, got {type(linear).__name__}")
    if getattr(linear, "bias", None) is not None and linear.bias.numel():
        raise DecoderError(f"{name}: linear biases are not supported (Chameleon uses none)")
    # Shares storage with the model when dtype/device already match (no copy in fp32).
    return w.detach().to(device=device, dtype=dtype)


def _low_rank(linear: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An unmerged LoRA adapter's (A, scale * B) in the decoding dtype (tessera.model.lora), or None."""
    a = getattr(linear, "lora_a", None)
    if a is None:
        return None
    b = linear.lora_b.detach().to(device=device, dtype=torch.float32) * float(linear.lora_scale)
    return a.detach().to(device=device, dtype=dtype), b.to(dtype)


def _plus_low_rank(y: torch.Tensor, x: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if lora is None:
        return y
    return y + F.linear(F.linear(x, lora[0]), lora[1])


class KVCacheDecoder:
    """Prefill once, then one token per step, for a batch of left-padded sequences.

    Each branch is ``x + post(f(pre(x)))`` with whichever of the layer's norms exist: pre-norm layers
    have ``input_layernorm`` / ``pre_mlp_layernorm``; Swin-norm layers (Chameleon-34B,
    ``h = x + norm(attn(x)); out = h + norm(mlp(h))``) have ``post_self_attn_layernorm`` /
    ``post_mlp_layernorm``, or, with ``swin_norm=True``, the usual two norms moved to the outputs.
    """

    def __init__(
        self,
        module: nn.Module,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        swin_norm: bool | None = None,
        fused_cpu_step: bool | None = None,
        cuda_graphs: bool | None = None,
    ) -> None:
        """``fused_cpu_step``: None uses the fused C step on the CPU when it supports the model, True
        requires it (DecoderError otherwise), False keeps every step in PyTorch ops.
        ``cuda_graphs``: None replays the decode step as CUDA graphs on a CUDA device (unless
        ``TESSERA_CUDA_GRAPHS=0``), True requires a CUDA device, False runs every step eagerly."""
        gpt = getattr(module, "module", module)  # accept a DDP/Float16 wrapper too
        for attr in ("embedding", "decoder", "output_layer", "rotary_pos_emb"):
            if getattr(gpt, attr, None) is None:
                raise DecoderError(
                    f"model has no .{attr}: KV-cached decoding needs a single-stage GPTModel with RoPE "
                    "(pre_process and post_process both on, position_embedding_type='rope')"
                )
        cfg = gpt.config
        if getattr(cfg, "tensor_model_parallel_size", 1) != 1 or getattr(cfg, "pipeline_model_parallel_size", 1) != 1:
            raise DecoderError("KV-cached decoding runs with TP=1 and PP=1; load the checkpoint in one process")
        if getattr(gpt, "share_embeddings_and_output_weights", False):
            out_w = gpt.shared_embedding_or_output_weight()
        else:
            out_w = gpt.output_layer.weight
        first = gpt.embedding.word_embeddings.weight
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        dt, dev = self.dtype, self.device

        self.config = cfg
        self.num_layers = len(gpt.decoder.layers)
        self.hidden = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_groups = cfg.num_query_groups or cfg.num_attention_heads
        self.head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
        self.swin_norm = bool(swin_norm if swin_norm is not None else getattr(cfg, "swin_norm", False))
        self.gated = bool(cfg.gated_linear_unit)
        self.activation = cfg.activation_func
        self.vocab_size = out_w.shape[0]
        # Everything but the weight matmuls (residual stream, norms, QK-norm, RoPE, the cache,
        # attention) runs in fp32 on the CPU: batched bf16 matmuls there go through oneDNN, slower than
        # MKL's fp32 ones at one query (docs/generation.md), bf16 norms upcast internally anyway, and these
        # tensors are tiny next to the weights. On a GPU it all stays in the decoding dtype.
        self.attn_dtype = torch.float32 if dev.type == "cpu" else dt
        wt = self.attn_dtype

        self.embedding = first.detach().to(device=dev, dtype=wt)  # gathered, never multiplied
        self.output = out_w.detach().to(device=dev, dtype=dt)
        self.final_norm = norm_callable(gpt.decoder.final_layernorm, wt, dev)
        self.layers: list[_Layer] = []
        for i, layer in enumerate(gpt.decoder.layers):
            attn = layer.self_attention
            pre_attn, pre_mlp = layer.input_layernorm, layer.pre_mlp_layernorm
            post_attn = getattr(layer, "post_self_attn_layernorm", None)
            post_mlp = getattr(layer, "post_mlp_layernorm", None)
            if self.swin_norm and is_identity(post_attn):
                # Swin ordering expressed with the usual names: the two norms move to the branch outputs.
                pre_attn, pre_mlp, post_attn, post_mlp = None, None, pre_attn, pre_mlp
            # Transformer Engine's spec fuses the pre-norms into linear_qkv / linear_fc1 and leaves
            # input_layernorm / pre_mlp_layernorm as IdentityOp: read the fused tables then.
            ln_attn = fused_norm(attn.linear_qkv, wt, dev, f"layer {i} linear_qkv")
            ln_mlp = fused_norm(layer.mlp.linear_fc1, wt, dev, f"layer {i} linear_fc1")
            for fused, sep, name in ((ln_attn, pre_attn, "input_layernorm"), (ln_mlp, pre_mlp, "pre_mlp_layernorm")):
                if fused is not None and not is_identity(sep):
                    raise DecoderError(f"layer {i}: both a fused layer_norm_weight and a separate {name}; "
                                       "the model would normalise twice, which no Tessera spec builds")
            self.layers.append(
                _Layer(
                    ln_attn=ln_attn if ln_attn is not None else norm_callable(pre_attn, wt, dev),
                    post_attn=norm_callable(post_attn, wt, dev),
                    qkv=_weight(attn.linear_qkv, f"layer {i} linear_qkv", dt, dev),
                    q_norm=cast_module(getattr(attn, "q_layernorm", None), self.attn_dtype, dev),
                    k_norm=cast_module(getattr(attn, "k_layernorm", None), self.attn_dtype, dev),
                    proj=_weight(attn.linear_proj, f"layer {i} linear_proj", dt, dev),
                    ln_mlp=ln_mlp if ln_mlp is not None else norm_callable(pre_mlp, wt, dev),
                    post_mlp=norm_callable(post_mlp, wt, dev),
                    fc1=_weight(layer.mlp.linear_fc1, f"layer {i} linear_fc1", dt, dev),
                    fc2=_weight(layer.mlp.linear_fc2, f"layer {i} linear_fc2", dt, dev),
                    qkv_lora=_low_rank(attn.linear_qkv, dt, dev),
                    proj_lora=_low_rank(attn.linear_proj, dt, dev),
                    fc1_lora=_low_rank(layer.mlp.linear_fc1, dt, dev),
                    fc2_lora=_low_rank(layer.mlp.linear_fc2, dt, dev),
                )
            )
        self.output_lora = None if getattr(gpt, "share_embeddings_and_output_weights", False) else \
            _low_rank(gpt.output_layer, dt, dev)
        self.adapters = sum(x is not None for lw in self.layers
                            for x in (lw.qkv_lora, lw.proj_lora, lw.fc1_lora, lw.fc2_lora)) + (self.output_lora is not None)
        self.softmax_scale = _softmax_scale(layer.self_attention)
        for lw in self.layers:
            self._fuse_qk_norm(lw)
        self._lin = F.linear
        # The CPU decode step as one C call when the model fits it (cpu_step.py); prefill stays here.
        self._fused = None
        self._eager_backend = "PyTorch ops"
        if fused_cpu_step is not False and dev.type == "cpu":
            if self.adapters:
                self._eager_backend = (f"PyTorch ops ({self.adapters} unmerged LoRA adapters: the fused C step has no "
                                       "low-rank term; merge them for it)")
            else:
                from tessera.generate.cpu_step import FusedCPUStep

                self._fused, self._eager_backend = FusedCPUStep.create(self)
            if fused_cpu_step and self._fused is None:
                raise DecoderError(f"fused_cpu_step=True but {self._eager_backend}")
        # On a GPU the step is replayed as CUDA graphs (cuda_graph.py); eager where they cannot run.
        self._graphs: DecodeGraphs | None = None
        self._graphs_off = "disabled (cuda_graphs=False)" if cuda_graphs is False else graphs_unavailable(dev)
        if cuda_graphs and self._graphs_off is not None:
            raise DecoderError(f"cuda_graphs=True but CUDA graphs cannot run: {self._graphs_off}")
        if self._graphs_off is None:
            self._graphs = DecodeGraphs(self._graph_step, dev)
        # The fused step holds the plain weights (its own references); the PyTorch path, which still runs
        # the prefill and batches above FUSED_STEP_MAX_BATCH, gets oneDNN-prepacked copies in bf16.
        if _can_prepack(dt, dev):
            packed = [_prepack(w) for lw in self.layers for w in (lw.qkv, lw.proj, lw.fc1, lw.fc2)]
            out_packed = _prepack(self.output)
            if all(p is not None for p in packed) and out_packed is not None:
                it = iter(packed)
                for lw in self.layers:  # the packed copies replace the plain ones (no second copy kept)
                    lw.qkv, lw.proj, lw.fc1, lw.fc2 = next(it), next(it), next(it), next(it)
                self.output = out_packed
                self._lin = _mkldnn_linear
        self.prepacked = self._lin is _mkldnn_linear
        rope = gpt.rotary_pos_emb
        if getattr(rope, "rotary_interleaved", False):
            raise DecoderError("interleaved RoPE is not supported by the KV-cached decoder")
        self._rope = rope
        self._rope_len = 0
        self.cache: torch.Tensor | None = None
        self.length = 0  # columns of the cache filled so far (same for every row)
        self.kv_window = KV_WINDOW_CUDA if dev.type == "cuda" else KV_WINDOW

    @property
    def step_backend(self) -> str:
        """How ``step`` runs, and why (the fused C step, CUDA graphs, or PyTorch ops and the reason)."""
        if self._fused is not None:
            return self._eager_backend
        if self._graphs is not None and self._graphs.failed is None:
            return (f"CUDA graphs (the step captured per batch shape and {self.kv_window}-column attention "
                    f"window after {self._graphs.warmup_steps} eager step(s); prefill eager)")
        if self._graphs is not None:
            return f"PyTorch ops (CUDA graphs off: {self._graphs.failed})"
        if self.device.type == "cuda":
            return f"PyTorch ops (CUDA graphs off: {self._graphs_off})"
        return self._eager_backend

    def graph_stats(self) -> dict | None:
        """Captures, replays, eager steps and the failure reason of the CUDA graphs (None: not in use)."""
        return self._graphs.stats() if self._graphs is not None else None

    def _fuse_qk_norm(self, lw: _Layer) -> None:
        """Per-head LayerNorm of q and of k as ONE layer_norm + one addcmul over the [q..., k] slots of
        each group (6 small ops -> 2 per layer), with the softmax scale folded into the q affine
        (RoPE is linear, so the rotated q comes out scaled)."""
        ng, qpg, hd = self.num_groups, self.num_heads // self.num_groups, self.head_dim
        q = _layer_norm_affine(lw.q_norm, self.num_heads, hd)
        k = _layer_norm_affine(lw.k_norm, ng, hd)
        if q is None or k is None or q[2] != k[2]:
            return
        dt = self.attn_dtype
        lw.qk_w = torch.cat((q[0].reshape(ng, qpg, hd) * self.softmax_scale, k[0].reshape(ng, 1, hd)), 1).to(
            device=self.device, dtype=dt)
        lw.qk_b = torch.cat((q[1].reshape(ng, qpg, hd) * self.softmax_scale, k[1].reshape(ng, 1, hd)), 1).to(
            device=self.device, dtype=dt)
        lw.qk_eps = q[2]

    # ---- rotary ----------------------------------------------------------------------------
    def _rope_tables(self, max_len: int) -> bool:
        """Grow the cos / signed-sin tables to ``max_len`` positions; True when they were rebuilt."""
        if max_len <= self._rope_len:
            return False
        freqs = self._rope.get_freqs_non_repeated(max_len).to(self.device).float()  # [max_len, rot/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        # rotate_half(t) * sin == swap_halves(t) * [-sin, sin]: the sign lives in the table (_apply_rope).
        sin = emb.sin()
        half = sin.shape[-1] // 2
        self._cos = emb.cos().to(self.attn_dtype)
        self._sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(self.attn_dtype)
        self._rope_len = max_len
        return True

    def _rope_for(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos / signed sin for rotary positions pos [b, s] -> [b, s, 1, 1, rot] each (once per forward),
        to broadcast over q/k laid out [b, s, groups, heads of the group, hd]."""
        return self._cos[pos][:, :, None, None], self._sin_signed[pos][:, :, None, None]

    @staticmethod
    def _apply_rope(t: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """t [b, s, groups, heads, hd] rotated like megatron's (non-interleaved) ``apply_rotary_pos_emb``."""
        cos, sin = rope
        rot = cos.shape[-1]
        half = rot // 2
        if rot == t.shape[-1]:
            # roll(t, rot/2) as one cat of the two halves: aten's roll costs far more than a cat at these
            # sizes (docs/generation.md); bit-identical to the roll (data movement only)
            swapped = torch.cat((t[..., half:], t[..., :half]), dim=-1)
            return t * cos + swapped * sin  # megatron's expression (no fused multiply-add): its rounding
        t_rot, t_pass = t[..., :rot], t[..., rot:]
        swapped = torch.cat((t_rot[..., half:], t_rot[..., :half]), dim=-1)
        return torch.cat((t_rot * cos + swapped * sin, t_pass), dim=-1)

    # ---- cache -----------------------------------------------------------------------------
    def allocate(self, batch: int, max_len: int) -> None:
        """Preallocate the cache for ``batch`` rows of at most ``max_len`` tokens, and the step's other
        buffers (pad lengths, key mask, token ids, column, logits). ``max_len`` is rounded up to whole
        attention windows (``capacity``): every step attends over whole windows (the same shapes whether it is
        replayed as a CUDA graph or not), and calls of similar lengths reuse the captured graphs."""
        capacity = -(-max_len // self.kv_window) * self.kv_window
        shape = (self.num_layers, 2, batch, self.num_groups, capacity, self.head_dim)
        fresh = self.cache is None or self.cache.shape != shape
        if fresh:
            dev = self.device
            self.cache = self._kv = None  # free the old cache before the new one exists
            # zeros, not empty: a step attends over masked columns too, with weight 0, and 0 * NaN is NaN
            self.cache = torch.zeros(shape, dtype=self.attn_dtype, device=dev)
            # per-layer [b, ng, capacity, hd] views: narrow() on them is cheaper than multi-axis indexing
            self._kv = [(self.cache[li, 0], self.cache[li, 1]) for li in range(self.num_layers)]
            # The step's inputs and outputs live in these tensors for as long as the cache does (what a
            # captured graph points at): prefill and step write into them, never rebind them.
            self.pad = torch.zeros(batch, dtype=torch.long, device=dev)
            self._key_valid = torch.zeros(batch, capacity, dtype=torch.bool, device=dev)
            self._tokens = torch.zeros(batch, dtype=torch.long, device=dev)
            self._column = torch.zeros(1, dtype=torch.long, device=dev)
            self._logits = torch.zeros(batch, self.vocab_size, dtype=self.dtype, device=dev)
        rope_grew = self._rope_tables(capacity)
        if self._graphs is not None and (fresh or rope_grew):
            self._graphs.reset()
        self.length = 0
        self._padded = False
        # max_len: what the caller asked for (steps beyond it are refused); capacity: the cache's columns
        self.batch, self.max_len, self.capacity = batch, max_len, capacity
        if self._fused is not None:
            self._fused.bind()

    # ---- forward ---------------------------------------------------------------------------
    def _check_room(self, s: int) -> None:
        if self.length + s > self.max_len:
            raise DecoderError(f"cache full: {self.length} + {s} tokens > max_len {self.max_len}")

    def _attention_block(
        self, li: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None,
        causal: bool, column: torch.Tensor | None = None, window: int = 0,
    ) -> torch.Tensor:
        """x [b, s, h] in the weights' dtype (already normed for pre-norm); writes k/v of the s new columns;
        returns [b, s, h]. Prefill (``column`` None): the columns follow the host-side ``length`` and the
        keys are the filled columns. Step: ``column`` (a device tensor [1]) is the one column written and
        the keys are the first ``window`` columns, ``mask`` [b, window] (or None) says which are filled."""
        lw = self.layers[li]
        b, s, _ = x.shape
        ng, hd = self.num_groups, self.head_dim
        qpg = self.num_heads // ng
        # megatron's grouped QKV rows: per group [its q heads..., k, v].
        mixed = _plus_low_rank(self._lin(x, lw.qkv), x, lw.qkv_lora).view(b, s, ng, qpg + 2, hd).to(self.attn_dtype)
        if lw.qk_w is not None:
            qk = F.layer_norm(mixed.narrow(3, 0, qpg + 1), (hd,), None, None, lw.qk_eps)
            qk = self._apply_rope(torch.addcmul(lw.qk_b, qk, lw.qk_w), rope)  # q already scaled
            q, k = qk.narrow(3, 0, qpg), qk.select(3, qpg)
        else:  # norms as modules (they take [..., heads, hd]), then RoPE and the scale
            q, k = mixed.narrow(3, 0, qpg), mixed.select(3, qpg)
            if lw.q_norm is not None:
                q = lw.q_norm(q.reshape(b, s, self.num_heads, hd)).view(b, s, ng, qpg, hd)
            if lw.k_norm is not None:
                k = lw.k_norm(k)
            q = self._apply_rope(q, rope) * self.softmax_scale
            k = self._apply_rope(k.unsqueeze(3), rope).squeeze(3)
        v = mixed.select(3, qpg + 1)  # [b, s, ng, hd]
        kc, vc = self._kv[li]
        if column is None:
            start, end = self.length, self.length + s
            kc.narrow(2, start, s).copy_(k.transpose(1, 2))
            vc.narrow(2, start, s).copy_(v.transpose(1, 2))
        else:
            kc.index_copy_(2, column, k.transpose(1, 2))
            vc.index_copy_(2, column, v.transpose(1, 2))
            end = window
        keys = kc.narrow(2, 0, end)  # [b, ng, end, hd]
        values = vc.narrow(2, 0, end)
        if s == 1:
            # One query per row: two small batched matmuls beat SDPA's flash kernel here, and the query
            # heads of a group share their K/V without repeating them. Softmax in fp32, like SDPA's.
            scores = torch.matmul(q.squeeze(1), keys.transpose(-1, -2)).float()  # [b, ng, qpg, end]
            if mask is not None:
                scores = scores.masked_fill(~mask.reshape(b, 1, 1, end), float("-inf"))
            ctx = torch.matmul(scores.softmax(-1).to(values.dtype), values)  # [b, ng, qpg, hd]
            ctx = ctx.reshape(b, 1, self.num_heads * hd)
        else:
            ctx = F.scaled_dot_product_attention(
                q.reshape(b, s, self.num_heads, hd).transpose(1, 2), keys, values, attn_mask=mask, is_causal=causal,
                scale=1.0, enable_gqa=ng != self.num_heads,
            )
            ctx = ctx.transpose(1, 2).reshape(b, s, self.num_heads * hd)
        ctx = ctx.to(self.dtype)
        return _plus_low_rank(self._lin(ctx, lw.proj), ctx, lw.proj_lora)

    def _mlp(self, li: int, x: torch.Tensor) -> torch.Tensor:
        lw = self.layers[li]
        h = _plus_low_rank(self._lin(x, lw.fc1), x, lw.fc1_lora)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.activation(gate).mul_(up)
        else:
            h = self.activation(h)
        return _plus_low_rank(self._lin(h, lw.fc2), h, lw.fc2_lora)

    def _layers_forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, causal: bool,
        column: torch.Tensor | None = None, window: int = 0,
    ) -> torch.Tensor:
        for li, lw in enumerate(self.layers):
            a = lw.ln_attn(x) if lw.ln_attn is not None else x
            h = self._attention_block(li, a.to(self.dtype), rope, mask, causal, column, window)
            # x is this forward's own tensor (from F.embedding): residual adds in place, no new buffers
            x.add_(lw.post_attn(h.to(x.dtype)) if lw.post_attn is not None else h)
            a = lw.ln_mlp(x) if lw.ln_mlp is not None else x
            h = self._mlp(li, a.to(self.dtype))
            x.add_(lw.post_mlp(h.to(x.dtype)) if lw.post_mlp is not None else h)
        return x

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_norm is not None:
            x = self.final_norm(x)
        x = x.to(self.dtype)
        return _plus_low_rank(self._lin(x, self.output), x, self.output_lora)

    def _forward(
        self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None, last_only: bool, causal: bool = False
    ) -> torch.Tensor:
        """The prefill: ``ids`` [b, s] into the next s columns (host-side ``length``)."""
        if self.cache is None:
            raise DecoderError("call allocate(batch, max_len) before decoding")
        s = ids.shape[1]
        self._check_room(s)
        x = F.embedding(ids, self.embedding)
        x = self._layers_forward(x, self._rope_for(pos), mask, causal)
        self.length += s
        return self._output(x[:, -1] if last_only else x)

    def _graph_step(self, window: int) -> None:
        """One decoding step as a CUDA graph captures it (cuda_graph.py): ``_step_logits`` into the
        ``_logits`` buffer."""
        self._logits.copy_(self._step_logits(window))

    def _step_logits(self, window: int, masked: bool = True) -> torch.Tensor:
        """One decoding step, written to be captured and run as is everywhere else: reads the token ids
        ``_tokens`` [b] and the cache column ``_column`` [1], writes that column of the cache and of
        ``_key_valid``; attends over the first ``window`` columns, the unfilled ones masked (``masked``
        False: every column of the window is known to be filled, no mask). Only buffers made by
        ``allocate`` cross its boundary (their addresses are what a graph replays), it makes no host sync,
        has no Python branch on tensor values and never reads the host-side ``length``."""
        column = self._column
        self._key_valid.index_fill_(1, column, True)
        pos = (column - self.pad).clamp(min=0)[:, None]  # [b, 1]: each row's rotary position
        x = F.embedding(self._tokens[:, None], self.embedding)
        mask = self._key_valid[:, :window] if masked else None
        x = self._layers_forward(x, self._rope_for(pos), mask, False, column, window)
        return self._output(x[:, -1])

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, pad: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """ids [b, L] left-padded (``pad[i]`` leading pad tokens in row i). Fills the first L cache
        columns and returns the logits of the last position [b, V] (or of every position [b, L, V])."""
        b, L = ids.shape
        if self.cache is None:
            raise DecoderError("call allocate(batch, max_len) before decoding")
        if b != self.batch:
            raise DecoderError(f"prefill batch {b} != allocated batch {self.batch}")
        self.length = 0
        self._check_room(L)
        padded = bool((pad > 0).any())  # the engine's pad is a host tensor: no device sync
        pad = pad.to(device=self.device, dtype=torch.long)
        self.pad.copy_(pad)
        col = torch.arange(L, device=self.device)
        pos = (col[None, :] - pad[:, None]).clamp(min=0)
        valid = col[None, :] >= pad[:, None]  # [b, L] key is a real token
        causal = col[None, :] <= col[:, None]  # [q, k]
        # A padded query attends only to itself (its output is never used) so softmax never sees an
        # all-masked row.
        mask = (causal[None] & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=self.device)[None]
        self._key_valid.zero_()
        self._key_valid[:, :L] = valid
        self._padded = padded
        if not padded:  # no padding: plain causal attention (SDPA's fast path), no mask tensors
            return self._forward(ids.to(self.device), pos, None, last_only=not all_logits, causal=True)
        return self._forward(ids.to(self.device), pos, mask[:, None], last_only=not all_logits)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, reuse_output: bool = False) -> torch.Tensor:
        """Append one token per row ([b]) and return the next-token logits [b, V]: a tensor of the caller's
        own, or with ``reuse_output`` the decoder's logits buffer where the step has one (it is
        overwritten by the next step; the engine reads it before that)."""
        col = self.length
        self._check_room(1)
        if tokens.numel() != self.batch:
            raise DecoderError(f"step got {tokens.numel()} tokens for a batch of {self.batch}")
        if self._fused is not None and self.batch <= FUSED_STEP_MAX_BATCH:
            logits = self._fused.step(tokens, self.pad, self._key_valid, col)
            self.length += 1
            return logits
        self._tokens.copy_(tokens.reshape(-1))
        self._column.fill_(col)
        window = (col // self.kv_window + 1) * self.kv_window  # the capacity is whole windows
        if self._graphs is not None:
            self._graphs.run(window)
            self.length += 1
            return self._logits if reuse_output else self._logits.clone()
        # Eager: the same function; without padding a one-column window holds only filled columns (the
        # CPU's case), so the all-true mask is skipped (masking it would change no value).
        logits = self._step_logits(window, masked=self._padded or self.kv_window > 1)
        self.length += 1
        return logits


def _softmax_scale(attention) -> float:
    """The attention's score scale. megatron's local DotProductAttention keeps it as ``softmax_scale``;
    Transformer Engine's hands it to its backends instead, so derive it as megatron does:
    ``config.softmax_scale`` or 1 / sqrt(head_dim)."""
    scale = getattr(attention.core_attention, "softmax_scale", None)
    if scale is None:
        scale = attention.config.softmax_scale or attention.config.kv_channels ** -0.5
    return float(scale)
