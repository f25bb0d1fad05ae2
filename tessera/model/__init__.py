"""tessera.model: the Chameleon model on megatron-core (config, layer spec, CPU path, loss, checkpoints).

Heavy imports (megatron) are deferred until an attribute is used, so ``import tessera.model`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelConfig": "tessera.model.config",
    "PRESETS": "tessera.model.config",
    "get_preset": "tessera.model.config",
    "enable_cpu_compat": "tessera.model.cpu",
    "initialize_parallel": "tessera.model.parallel",
    "destroy_parallel": "tessera.model.parallel",
    "ensure_single_process": "tessera.model.parallel",
    "build_model": "tessera.model.chameleon",
    "transformer_config": "tessera.model.chameleon",
    "chameleon_layer_spec": "tessera.model.spec",
    "language_model_loss": "tessera.model.loss",
    "LossOutput": "tessera.model.loss",
    "count_parameters": "tessera.model.params",
    "save_model_checkpoint": "tessera.model.checkpoint",
    "resolve_checkpoint": "tessera.model.checkpoint",
    "CheckpointError": "tessera.model.checkpoint",
    "load": "tessera.model.api",
    "TesseraModel": "tessera.model.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tessera.model' has no attribute {name!r}")
