"""Read the model and the parallel layout out of a ``tessera train`` config for ``tessera bench plan``.

Reads the YAML directly (model: preset name plus field overrides, or every ModelConfig field;
parallel: tp / pp / vp / micro_batch_size / global_batch_size; data.seq_length), so the plan works
for any config file without building the trainer.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from tessera.bench.plan import PlanError
from tessera.config import yaml_error_line


def layout_from_train_config(path: str | Path) -> tuple[str, object, dict]:
    """-> (name, ModelConfig, layout defaults {tp, pp, vp, micro_batch, global_batch, seq_length, dp?})."""
    from tessera.config import ConfigError, from_dict
    from tessera.model.config import ModelConfig, get_preset

    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PlanError(f"{path}: invalid YAML: {yaml_error_line(exc)}") from exc
    model = dict(data.get("model") or {})
    preset = model.pop("preset", None)
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    known = {k: v for k, v in model.items() if k in fields}
    try:
        base = dataclasses.asdict(get_preset(preset)) if preset else {}
        cfg = from_dict(ModelConfig, {**base, **known}, str(path))
    except ConfigError as exc:
        raise PlanError(f"{path}: model section: {exc}") from exc
    par = data.get("parallel") or {}
    seq = (data.get("data") or {}).get("seq_length") or cfg.seq_length
    layout = {
        "tp": int(par.get("tp", par.get("tensor_model_parallel_size", 1)) or 1),
        "pp": int(par.get("pp", par.get("pipeline_model_parallel_size", 1)) or 1),
        "vp": int(par.get("vp") or 1),
        "micro_batch": int(par.get("micro_batch_size", par.get("micro_batch", 1)) or 1),
        "seq_length": int(seq),
    }
    if par.get("global_batch_size"):
        layout["global_batch"] = int(par["global_batch_size"])
    if par.get("dp"):
        layout["dp"] = int(par["dp"])
    return preset or path.stem, cfg, layout
