"""``train.deterministic``: bitwise-repeatable training, as megatron-LM's ``--deterministic-mode`` sets it up.

``auto`` is on for the CPU (the test bench: exact resume and layout comparisons rely on it, and it costs
little there) and off on CUDA (it costs speed). On means:

* everywhere: ``torch.use_deterministic_algorithms(True)`` (an op without a deterministic kernel raises
  instead of silently varying);
* on CUDA also, before NCCL and cuBLAS start: ``NCCL_ALGO=Ring`` unless set (megatron-LM requires one of
  Tree, Ring, CollnetDirect, CollnetChain, ^NVLS: NVLS reductions are not repeatable),
  ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS is deterministic only with a fixed workspace),
  ``NVTE_ALLOW_NONDETERMINISTIC_ALGO=0`` (Transformer Engine's attention backward), and megatron's
  ``TransformerConfig.deterministic_mode`` (its embedding backward avoids ``F.embedding``'s atomics).
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

import torch

from tessera.config import ConfigError

# megatron-LM's arguments.py accepts these NCCL_ALGO values in deterministic mode
DETERMINISTIC_NCCL_ALGOS = ("Tree", "Ring", "CollnetDirect", "CollnetChain", "^NVLS")
CUDA_ENV = {"NCCL_ALGO": "Ring", "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}


def resolve_deterministic(setting: bool | str, cuda: bool) -> bool:
    """``train.deterministic`` (auto / true / false) -> on or off for this device."""
    if setting == "auto":
        return not cuda
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"train.deterministic: expected auto, true or false, got {setting!r}")


def apply_determinism(on: bool, cuda: bool, environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Switch the process to (non-)deterministic execution; call before ``init_distributed`` and any CUDA
    work. Returns the environment variables it set (values already set by the user are kept, unless
    NCCL_ALGO names an algorithm that is not deterministic)."""
    env = os.environ if environ is None else environ
    set_now: dict[str, str] = {}
    if on and cuda:
        algo = env.get("NCCL_ALGO")
        if algo is not None and algo not in DETERMINISTIC_NCCL_ALGOS:
            raise ConfigError(f"train.deterministic: NCCL_ALGO={algo} is not deterministic; unset it or use one of "
                              f"{', '.join(DETERMINISTIC_NCCL_ALGOS)}")
        for k, v in CUDA_ENV.items():
            if k not in env:
                env[k] = set_now[k] = v
    torch.use_deterministic_algorithms(on)
    return set_now
