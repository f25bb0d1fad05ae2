"""A stand-in ``transformer_engine`` package for CPU tests of the Transformer Engine layer spec.

Transformer Engine needs CUDA. With this package in ``sys.modules`` BEFORE megatron is imported,
megatron-core's own TE wrappers (``TELayerNormColumnParallelLinear``, ``TERowParallelLinear``,
``TEColumnParallelLinear``, ``TEDotProductAttention``, ``TENorm``: constructors, ``sharded_state_dict``,
forward) and its TE spec functions run for real on top of these few base classes, which copy what TE's
own modules expose to a checkpoint (TransformerEngine 2.x, transformer_engine/pytorch/module/*.py and
ops/basic/rmsnorm.py):

- every TE module is a ``TransformerEngineBaseModule`` with an ``_extra_state`` entry: an empty uint8
  tensor unless fp8 is on (``get_extra_state``), and ``set_extra_state`` ignores None / empty ones;
- ``Linear``: ``weight`` [out / TP, in] (column) or [out, in / TP] (row); with ``bias=False`` the bias
  is a plain tensor attribute, not in the state dict;
- ``LayerNormLinear``: ``layer_norm_weight`` [in] first, ``layer_norm_bias`` only for LayerNorm, then
  ``weight``; attributes ``eps``, ``normalization``, ``zero_centered_gamma``, and ``return_layernorm_output``,
  read in the forward, which then returns (output, norm output);
- ``DotProductAttention``: no parameters (vanilla softmax), an ``_extra_state`` that a load may lack (TE's
  post-hook drops it from the missing keys), and no ``softmax_scale`` attribute (TE passes the scale, by
  default 1 / sqrt(kv_channels), to its backends);
- ``RMSNorm`` (an op-based module in TE 2.x): ``weight`` and an ``_extra_state``.

Forwards compute the same maths on one TP rank (norms, ``x W^T``, SDPA over megatron's [s, b, h, d]; packed
documents in TE's ``thd`` format with ``cu_seqlens``, one causal call per document).
Any other TE name megatron imports resolves to a placeholder class that is never called on these paths.
Use it only in a fresh process (``install()`` before the first megatron import).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import math
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

VERSION = "2.8.0"


class _AnyMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return Placeholder


class Placeholder(metaclass=_AnyMeta):
    """Any TE name the tested paths never call (annotations, bases of unused wrappers, version-gated imports)."""

    def __init__(self, *args, **kwargs):
        pass


class TransformerEngineBaseModule(nn.Module):
    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is not None and not (isinstance(state, torch.Tensor) and state.numel() == 0):
            raise AssertionError("the fake Transformer Engine holds no fp8 state")


def _norm(x, weight, bias, eps, normalization, zero_centered_gamma):
    w = weight + 1 if zero_centered_gamma else weight
    if normalization == "RMSNorm":
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return F.layer_norm(x, (x.shape[-1],), w, bias, eps)


class Linear(TransformerEngineBaseModule):
    def __init__(self, in_features, out_features, **kwargs):
        super().__init__()
        self._linear_params(in_features, out_features, **kwargs)

    def _linear_params(self, in_features, out_features, *, bias=True, parallel_mode=None, tp_size=1,
                       params_dtype=torch.float32, device="cpu", init_method=None, **_):
        self.in_features, self.out_features, self.use_bias = in_features, out_features, bias
        self.parallel_mode, self.tp_size = parallel_mode, tp_size
        out = out_features // tp_size if parallel_mode == "column" else out_features
        inp = in_features // tp_size if parallel_mode == "row" else in_features
        self.weight = nn.Parameter(torch.empty(out, inp, dtype=params_dtype, device=device))
        if init_method is not None:
            init_method(self.weight)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out, dtype=params_dtype, device=device))
        else:
            self.bias = torch.Tensor().to(dtype=params_dtype, device=device)

    def _linear(self, x):
        if self.tp_size != 1:
            raise NotImplementedError("the fake Transformer Engine runs one TP rank")
        return F.linear(x, self.weight, self.bias if self.use_bias else None)

    def forward(self, x, is_first_microbatch=None):
        return self._linear(x)


class LayerNormLinear(Linear):
    def __init__(self, in_features, out_features, *, eps=1e-5, normalization="LayerNorm", zero_centered_gamma=False,
                 params_dtype=torch.float32, device="cpu", return_layernorm_output=False,
                 return_layernorm_output_gathered=False, **kwargs):
        TransformerEngineBaseModule.__init__(self)
        self.eps, self.normalization, self.zero_centered_gamma = eps, normalization, zero_centered_gamma
        # read at forward time, as TE does: (output, norm output) instead of the output
        self.return_layernorm_output = return_layernorm_output
        self.return_layernorm_output_gathered = return_layernorm_output_gathered
        self.layer_norm_weight = nn.Parameter(
            torch.full((in_features,), float(not zero_centered_gamma), dtype=params_dtype, device=device))
        if normalization != "RMSNorm":
            self.layer_norm_bias = nn.Parameter(torch.zeros(in_features, dtype=params_dtype, device=device))
        else:
            self.layer_norm_bias = None
        self._linear_params(in_features, out_features, params_dtype=params_dtype, device=device, **kwargs)

    def forward(self, x, is_first_microbatch=None):
        ln_out = _norm(x, self.layer_norm_weight, self.layer_norm_bias, self.eps, self.normalization,
                       self.zero_centered_gamma)
        out = self._linear(ln_out)
        return (out, ln_out) if self.return_layernorm_output else out


def _tolerate_missing_core_attention_extra_state(module, incompatible_keys) -> None:
    # TE's DotProductAttention registers this post-hook (``remove_extra_states_check``): megatron's
    # TEDotProductAttention.sharded_state_dict leaves the entry out, so a loaded state dict lacks it
    for key in list(incompatible_keys.missing_keys):
        if "core_attention._extra_state" in key:
            incompatible_keys.missing_keys.remove(key)


class DotProductAttention(TransformerEngineBaseModule):
    def __init__(self, num_attention_heads, kv_channels, *, softmax_scale=None, **_):
        super().__init__()
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(kv_channels if isinstance(kv_channels, int) else kv_channels[0])
        self._scale = softmax_scale  # TE hands it to its flash / fused / unfused backends: no attribute of its own
        self.register_load_state_dict_post_hook(_tolerate_missing_core_attention_extra_state)

    calls: list[dict] = []  # THD calls: what megatron's wrapper passed (tests read it)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type="causal", **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("the fake Transformer Engine attention takes no explicit mask")
        if kwargs.get("qkv_format") == "thd":  # packed documents: [t, heads, d], TE's cu_seqlens arguments
            return self._thd(query, key, value, attn_mask_type, kwargs)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # sbhd -> bhsd
        out = F.scaled_dot_product_attention(q, k, v, is_causal=attn_mask_type == "causal" and q.shape[2] > 1,
                                             scale=self._scale, enable_gqa=k.shape[1] != q.shape[1])
        s, b = out.shape[2], out.shape[0]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _thd(self, query, key, value, attn_mask_type, kwargs):
        # TE's thd kernels take padding masks only: megatron must turn "causal" into "padding_causal"
        if attn_mask_type != "padding_causal":
            raise NotImplementedError(f"thd with attn_mask_type {attn_mask_type!r}")
        DotProductAttention.calls.append({k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
        cu = kwargs["cu_seqlens_q"].tolist()
        outs = []
        for a, b in zip(cu, cu[1:], strict=False):
            q, k, v = (t[a:b].permute(1, 0, 2)[None] for t in (query, key, value))
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self._scale,
                                               enable_gqa=k.shape[1] != q.shape[1])
            outs.append(o[0].permute(1, 0, 2).reshape(b - a, -1))
        return torch.cat(outs)


class RMSNorm(TransformerEngineBaseModule):
    def __init__(self, hidden_size, eps=1e-5, zero_centered_gamma=False, params_dtype=torch.float32, device="cpu", **_):
        super().__init__()
        self.eps, self.zero_centered_gamma = eps, zero_centered_gamma
        self.weight = nn.Parameter(
            torch.full((hidden_size,), float(not zero_centered_gamma), dtype=params_dtype, device=device))

    def forward(self, x):
        return _norm(x, self.weight, None, self.eps, "RMSNorm", self.zero_centered_gamma)


# how tessera.generate.decoder recognises TE's standalone norms
RMSNorm.__module__ = "transformer_engine.pytorch.module.rmsnorm"


class FP8GlobalStateManager:
    @staticmethod
    def is_fp8_enabled() -> bool:
        return False


def fp8_autocast(*args, **kwargs):
    return contextlib.nullcontext()


class _SplitAlongDim:
    @staticmethod
    def apply(tensor, dim, split_sizes):
        return torch.split(tensor, split_sizes, dim=dim)


def _module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    module.__path__ = []

    def __getattr__(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return Placeholder

    module.__getattr__ = __getattr__
    return module


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Any other ``transformer_engine.*`` module megatron imports: empty, its names placeholders."""

    def find_spec(self, fullname, path, target=None):
        if fullname.startswith("transformer_engine.") and fullname not in sys.modules:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _module(spec.name)

    def exec_module(self, module):
        pass


def install() -> None:
    if any(name.startswith("megatron") for name in sys.modules):
        raise RuntimeError("install the fake Transformer Engine before megatron is imported")
    modules = {
        "transformer_engine": dict(__version__=VERSION),
        "transformer_engine.pytorch": dict(Linear=Linear, LayerNormLinear=LayerNormLinear,
                                           DotProductAttention=DotProductAttention, RMSNorm=RMSNorm),
        "transformer_engine.pytorch.fp8": dict(FP8GlobalStateManager=FP8GlobalStateManager, fp8_autocast=fp8_autocast),
        "transformer_engine.pytorch.attention": dict(_SplitAlongDim=_SplitAlongDim),
        "transformer_engine.pytorch.distributed": dict(
            activation_recompute_forward=lambda *a, **k: contextlib.nullcontext()),
        "transformer_engine.pytorch.cpu_offload": dict(
            get_cpu_offload_context=lambda *a, **k: (contextlib.nullcontext(), None)),
    }
    for name, attrs in modules.items():
        sys.modules[name] = _module(name, **attrs)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(sys.modules[parent], child, sys.modules[name])
    sys.meta_path.insert(0, _Finder())
