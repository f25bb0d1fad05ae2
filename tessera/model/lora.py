"""LoRA (Hu et al. 2021, arXiv:2106.09685) on megatron-core's tensor-parallel linears.

An adapted linear computes ``y = x W^T + (alpha / r) * B A dropout(x)`` with ``A`` [r, in] and ``B``
[out, r] (PEFT's ``lora_A`` / ``lora_B`` shapes), ``B`` zero at the start so the adapted model starts as
the base model. The factors split as the layer they adapt, so LoRA runs under any TP x PP layout:

* column-parallel (``linear_qkv``, ``linear_fc1``, ``output_layer``): ``B`` is split on its output rows like
  ``W``; ``A`` is replicated. The rank-r activation ``A x`` is identical on every TP rank; its gradient is
  partial per rank, so it passes through megatron's ``copy_to_tensor_model_parallel_region`` (backward:
  all-reduce of an r-wide tensor, not of the h-wide input). With sequence parallelism the input is split
  along the sequence: ``A x`` is computed on the local tokens and all-gathered (backward: reduce-scatter),
  and ``A``'s gradient, partial over the sequence shards, is summed over TP by ``finalize_model_grads``
  (the ``sequence_parallel`` attribute, as megatron's norms).
* row-parallel (``linear_proj``, ``linear_fc2``): ``A`` is split on its input columns like ``W``; ``B`` is
  replicated. ``A x`` is a partial sum per rank, all-reduced (sequence parallel: reduce-scattered along the
  sequence, ``B``'s gradient then summed over TP) before ``B``.
* SwiGLU's ``linear_fc1`` holds ``[gate_r; up_r]`` per rank; ``B`` is split the same way, and checkpoints
  store it as ``[gate; up]`` through megatron's ``apply_swiglu_sharded_factory``, so adapters reshard
  across TP like the weight.

An adapted module keeps its class's behaviour and parameter names (its class becomes a subclass,
``LoRA<Base>``, that adds the low-rank term to the output and ``lora_a`` / ``lora_b`` to its sharded state
dict with the right TP axes). Transformer Engine's ``TELayerNormColumnParallelLinear`` normalises its
input inside the layer: it is asked for its norm output (``return_layernorm_output``), which is what the
adapter reads. Merging (``merge_lora``) adds ``scale * B A`` to each rank's own ``W`` slice (exact per
rank: ``B_r A`` for column, ``B A_r`` for row) and turns the modules back into their base class.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel import mappings

from tessera.model.linear import row_major

# the linears LoRA may adapt, by their name in megatron's GPTModel
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")
DEFAULT_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
ADAPTER_PARAMS = ("lora_a", "lora_b")


class LoRAError(ValueError):
    pass


@dataclass(frozen=True)
class LoRASpec:
    """What to adapt and how: rank ``r``, ``alpha`` (the low-rank term is scaled by ``alpha / r``), dropout
    on the adapter's input, and the target linears (``TARGETS``)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise LoRAError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise LoRAError(f"LoRA targets {list(self.targets)}: expected a non-empty subset of {list(TARGETS)}"
                            + (f" (unknown: {unknown})" if unknown else ""))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> LoRASpec:
        return cls(int(d["rank"]), float(d["alpha"]), float(d.get("dropout", 0.0)), tuple(d["targets"]))


def parallel_mode(linear: torch.nn.Module) -> str:
    """"column" or "row": how a megatron (local or Transformer Engine) linear splits its weight over TP."""
    if isinstance(linear, tensor_parallel.ColumnParallelLinear):
        return "column"
    if isinstance(linear, tensor_parallel.RowParallelLinear):
        return "row"
    mode = getattr(linear, "parallel_mode", None)  # Transformer Engine's linears (megatron's TE wrappers)
    if mode in ("column", "row"):
        return mode
    raise LoRAError(f"{type(linear).__name__}: not a column- or row-parallel linear (parallel_mode {mode!r})")


def _tp_group(linear: torch.nn.Module):
    group = getattr(linear, "tp_group", None) or getattr(linear, "_tp_group", None)
    return group if group is not None else parallel_state.get_tensor_model_parallel_group()


class LoRALinear(torch.nn.Module):
    """Mixed into the class of an adapted linear (``apply_lora``); never instantiated on its own."""

    lora_a: torch.nn.Parameter
    lora_b: torch.nn.Parameter
    lora_mode: str  # column | row
    lora_scale: float
    lora_dropout: float
    lora_sequence_parallel: bool
    lora_swiglu: bool  # linear_fc1 of a gated MLP: [gate; up] rows
    lora_base_class: type
    lora_layernorm_output: bool  # Transformer Engine's LayerNormLinear: the adapter reads its norm output

    def forward(self, input_, *args, **kwargs):
        out = super().forward(input_, *args, **kwargs)
        y, rest = out[0], tuple(out[1:])
        x = input_
        if self.lora_layernorm_output:  # TE returns (y, normalised input) in place of y
            y, x = y
        return (y + self.lora_delta(x).to(y.dtype), *rest)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``scale * B A dropout(x)`` for this rank's part of the output, with the TP collectives of the mode."""
        if self.training and self.lora_dropout > 0:
            x = self._lora_dropout(x)
        group = _tp_group(self)
        h = F.linear(row_major(x), self.lora_a)
        if self.lora_mode == "column":
            if self.lora_sequence_parallel:
                h = mappings.gather_from_sequence_parallel_region(h, group=group)
            else:
                h = mappings.copy_to_tensor_model_parallel_region(h, group=group)
        elif self.lora_sequence_parallel:
            h = mappings.reduce_scatter_to_sequence_parallel_region(h, group=group)
        else:
            h = mappings.reduce_from_tensor_model_parallel_region(h, group=group)
        return F.linear(h * self.lora_scale, self.lora_b)

    def _lora_dropout(self, x: torch.Tensor) -> torch.Tensor:
        # a replicated input (column, no sequence parallelism) draws the same mask on every TP rank from the
        # default generator, which megatron seeds alike across TP; a split input draws per rank from
        # megatron's model-parallel RNG tracker, as megatron's own dropouts on split activations do
        if self.lora_mode == "column" and not self.lora_sequence_parallel:
            return F.dropout(x, self.lora_dropout, True)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return F.dropout(x, self.lora_dropout, True)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None):
        """The base layer's entries, plus ``lora_a`` / ``lora_b`` split along the TP axis of their mode (the
        base class would call them replicated)."""
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        for name in ADAPTER_PARAMS:
            sd.pop(f"{prefix}{name}", None)
        axis = {"lora_b": 0} if self.lora_mode == "column" else {"lora_a": 1}
        lora = make_sharded_tensors_for_checkpoint({"lora_a": self.lora_a, "lora_b": self.lora_b}, prefix, axis,
                                                   sharded_offsets)
        if self.lora_swiglu:
            key = f"{prefix}lora_b"
            lora[key] = apply_swiglu_sharded_factory(lora[key], sharded_offsets,
                                                     (metadata or {}).get("singleton_local_shards", False))
        sd.update(lora)
        return sd


_CLASSES: dict[type, type] = {}


def _lora_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"LoRA{base.__name__}", (LoRALinear, base), {"__module__": __name__})
    return _CLASSES[base]


def lora_linears(model: torch.nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) of every adapted linear in ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def has_lora(model) -> bool:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return any(True for c in chunks for _ in lora_linears(c))


def is_adapter_key(key: str) -> bool:
    """A state-dict key of an adapter factor (``...linear_qkv.lora_a``)."""
    return key.rsplit(".", 1)[-1] in ADAPTER_PARAMS


def _init_a(full_shape: tuple[int, int], seed: int, name: str, device: torch.device) -> torch.Tensor:
    """``A`` drawn whole (fp32, torch.nn.Linear's / PEFT's kaiming-uniform) from a generator seeded by
    (seed, global parameter name): every TP x PP layout gets the 1-process values."""
    from tessera.model.chameleon import _param_seed

    full = torch.empty(full_shape, dtype=torch.float32, device=device)
    gen = torch.Generator(device=device).manual_seed(_param_seed(seed, name))
    bound = 1.0 / math.sqrt(full_shape[1])  # kaiming_uniform_(a=sqrt(5)) on a [r, in] weight
    return full.uniform_(-bound, bound, generator=gen)


def adapt_linear(linear: torch.nn.Module, spec: LoRASpec, *, global_name: str, seed: int,
                 swiglu: bool = False) -> LoRALinear:
    """Turn ``linear`` (in place) into its LoRA subclass with fresh factors (``B`` = 0)."""
    if isinstance(linear, LoRALinear):
        raise LoRAError(f"{global_name}: already adapted")
    mode = parallel_mode(linear)
    if mode == "column" and getattr(linear, "gather_output", False):
        raise LoRAError(f"{global_name}: a column-parallel linear that gathers its output is not supported")
    if mode == "row" and not getattr(linear, "input_is_parallel", True):
        raise LoRAError(f"{global_name}: a row-parallel linear with a replicated input is not supported")
    weight = linear.weight
    if weight is None:
        raise LoRAError(f"{global_name}: the linear has no weight of its own (tied or externally given)")
    group = _tp_group(linear)
    tp, rank = group.size(), group.rank()
    out_local, in_local = weight.shape
    r = spec.rank
    if mode == "column":
        a = _init_a((r, in_local), seed, f"{global_name}.lora_a", weight.device)
        b = torch.zeros(out_local, r, dtype=torch.float32, device=weight.device)
    else:
        a = _init_a((r, in_local * tp), seed, f"{global_name}.lora_a", weight.device).chunk(tp, dim=1)[rank]
        b = torch.zeros(out_local, r, dtype=torch.float32, device=weight.device)
    sp = tp > 1 and bool(getattr(linear, "sequence_parallel", getattr(getattr(linear, "config", None),
                                                                      "sequence_parallel", False)))
    linear.lora_a = torch.nn.Parameter(a.to(weight.dtype).contiguous())
    linear.lora_b = torch.nn.Parameter(b.to(weight.dtype))
    split, replicated = (linear.lora_b, linear.lora_a) if mode == "column" else (linear.lora_a, linear.lora_b)
    tensor_parallel.set_tensor_model_parallel_attributes(split, True, 0 if mode == "column" else 1,
                                                         2 if swiglu else 1)
    tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(replicated)
    if sp:  # partial over the sequence shards: finalize_model_grads sums it over TP
        replicated.sequence_parallel = True
    linear.lora_base_class = type(linear)
    linear.lora_mode, linear.lora_scale, linear.lora_dropout = mode, spec.scale, spec.dropout
    linear.lora_sequence_parallel, linear.lora_swiglu = sp, swiglu
    linear.lora_layernorm_output = hasattr(linear, "return_layernorm_output") and hasattr(linear, "layer_norm_weight")
    if linear.lora_layernorm_output:
        # TE's LayerNormLinear returns (output, its norm output) with this flag; the local (not gathered)
        # norm output is what the adapter reads under sequence parallelism too
        linear.return_layernorm_output = True
        linear.return_layernorm_output_gathered = False
    linear.__class__ = _lora_class(type(linear))
    return linear


def apply_lora(model: torch.nn.Module, spec: LoRASpec, seed: int) -> list[str]:
    """Freeze every parameter of ``model`` (one GPTModel chunk) and adapt its ``spec.targets`` linears
    (fresh adapters: ``A`` seeded per global name, ``B`` = 0). Returns the adapted modules' global names."""
    from tessera.model.chameleon import global_param_name

    for p in model.parameters():
        p.requires_grad_(False)
    gated = bool(getattr(getattr(model, "config", None), "gated_linear_unit", False))
    names = []
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in spec.targets or module is None or isinstance(module, LoRALinear):
            continue
        if not hasattr(module, "weight"):
            continue  # e.g. an IdentityOp
        gname = global_param_name(model, name)
        adapt_linear(module, spec, global_name=gname, seed=seed, swiglu=gated and leaf == "linear_fc1")
        names.append(gname)
    model.tessera_lora = spec
    return names


def lora_spec_of(model) -> LoRASpec | None:
    """The spec the adapters of ``model`` (a chunk or a list of chunks) were made with, None without any."""
    chunks = model if isinstance(model, (list, tuple)) else [model]
    for c in chunks:
        if any(True for _ in lora_linears(c)):
            return getattr(c, "tessera_lora", None)
    return None


@torch.no_grad()
def merge_lora(model: torch.nn.Module) -> int:
    """Fold every adapter into its weight (``W += scale * B A`` on this rank's slice, computed in fp32),
    drop the factors and restore the base classes. Returns the number of merged linears."""
    n = 0
    for _, m in list(lora_linears(model)):
        delta = (m.lora_b.float() @ m.lora_a.float()) * m.lora_scale
        m.weight.copy_((m.weight.float() + delta).to(m.weight.dtype))
        remove_lora(m)
        n += 1
    if hasattr(model, "tessera_lora"):
        del model.tessera_lora
    return n


def remove_lora(m: LoRALinear) -> None:
    """Drop the factors of one adapted linear and give it back its base class (its weight is kept as is)."""
    base = m.lora_base_class
    if m.lora_layernorm_output:
        m.return_layernorm_output = False
    for name in ADAPTER_PARAMS:
        del m._parameters[name]
    for attr in ("lora_base_class", "lora_mode", "lora_scale", "lora_dropout", "lora_sequence_parallel",
                 "lora_swiglu", "lora_layernorm_output"):
        m.__dict__.pop(attr, None)
    m.__class__ = base


def trainable_parameters(model) -> int:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)


__all__ = [
    "ADAPTER_PARAMS", "DEFAULT_TARGETS", "LoRAError", "LoRALinear", "LoRASpec", "TARGETS", "adapt_linear",
    "apply_lora", "has_lora", "is_adapter_key", "lora_linears", "lora_spec_of", "merge_lora", "remove_lora",
    "trainable_parameters",
]
