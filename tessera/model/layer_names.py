"""GPTModel state-dict names across layer implementations: megatron's local layers <-> Transformer Engine.

Transformer Engine fuses each pre-norm into the linear after it (``TELayerNormColumnParallelLinear``), so
the local ``decoder.layers.N.input_layernorm.weight`` is TE's ``...self_attention.linear_qkv.layer_norm_weight``
and ``pre_mlp_layernorm.weight`` is ``mlp.linear_fc1.layer_norm_weight`` (``.bias`` -> ``layer_norm_bias``
for LayerNorm). Every other weight has the same name and shape in both, the Swin-norm layers included
(their norms are separate modules in both). The ``_extra_state`` entries (TE's fp8 metadata, ``None`` in
megatron's local linears) hold no weights: the functions here pass them through untouched, and
``load_weights`` leaves each module its own.

dist_checkpointing needs none of this: the local spec saves its pre-norms under the TE names already
(``sharded_state_dict_keys_map``, as megatron's ``get_gpt_layer_local_spec`` sets it), and
``tessera.model.checkpoint`` keeps the ``_extra_state`` entries out of checkpoints.
"""

from __future__ import annotations

import re
from typing import Any

# local module prefix -> TE parameter prefix, within one decoder layer; the local spec's
# sharded_state_dict_keys_map (megatron's get_gpt_layer_local_spec sets the same map)
TE_FUSED_NORMS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}
EXTRA_STATE = "_extra_state"

_LAYER = r"((?:^|.*\.)layers\.\d+\.)"
_TO_TE = [(re.compile(_LAYER + re.escape(local) + r"(weight|bias)$"), te) for local, te in TE_FUSED_NORMS.items()]
_TO_LOCAL = [(re.compile(_LAYER + re.escape(te) + r"(weight|bias)$"), local) for local, te in TE_FUSED_NORMS.items()]


def _rename(state_dict: dict, rules) -> dict:
    out: dict = {}
    for key, value in state_dict.items():
        for pattern, prefix in rules:
            m = pattern.match(key)
            if m:
                key = m.group(1) + prefix + m.group(2)
                break
        if key in out:
            raise ValueError(f"state dict holds {key!r} under both the local and the Transformer Engine name")
        out[key] = value
    return out


def to_te_names(state_dict: dict) -> dict:
    """A GPTModel state dict with Transformer Engine's names for the fused pre-norms (same values; keys
    already in TE's names, and every other key, unchanged)."""
    return _rename(state_dict, _TO_TE)


def to_local_names(state_dict: dict) -> dict:
    """A GPTModel state dict with megatron's local names for the pre-norms (inverse of ``to_te_names``)."""
    return _rename(state_dict, _TO_LOCAL)


def uses_te_names(keys) -> bool:
    """Whether a model with these state-dict keys fuses its pre-norms into its linears (TE's layout)."""
    return any(pattern.match(key) for key in keys for pattern, _ in _TO_LOCAL)


def match_names(state_dict: dict, model_keys) -> dict:
    """``state_dict`` in the names of the model whose state-dict keys are ``model_keys``."""
    return to_te_names(state_dict) if uses_te_names(model_keys) else to_local_names(state_dict)


def load_weights(model: Any, state_dict: dict) -> None:
    """Load a full GPTModel state dict in either layout's names into ``model`` (either layout).

    Raises ValueError naming the first missing and unexpected weights; ``_extra_state`` entries are
    neither required nor applied (each module keeps its own)."""
    own = model.state_dict()
    state = {k: v for k, v in match_names(state_dict, own.keys()).items() if not k.endswith(EXTRA_STATE)}
    missing = sorted(k for k in own if k not in state and not k.endswith(EXTRA_STATE))
    unexpected = sorted(k for k in state if k not in own)
    if missing or unexpected:
        raise ValueError(f"state dict does not fit the model: missing {missing[:4]}, unexpected {unexpected[:4]}")
    model.load_state_dict(state, strict=False)
