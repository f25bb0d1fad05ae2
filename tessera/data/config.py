"""``DataConfig``: everything that defines the training batch stream, loadable from YAML.

Example (configs/ or a ``data:`` section of a training config)::

    sources: {web: out/tok_web, synth: out/tok_synth}   # name -> pretokenized directory
    weave:
      ramp: cosine
      knots:
        - {step: 0,    weights: {web: 1.0}}
        - {step: 2000, weights: {web: 0.2, synth: 0.8}}
    seq_length: 2048
    global_batch: 64
    micro_batch: 8
    seed: 0
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tessera.config import ConfigError, load_config
from tessera.data.batches import PackedSource, PackingConfig, WovenBatchIterator, open_sources
from tessera.data.weave import WeaveError, WeaveKnot, WeaveSchedule


@dataclass
class WeaveConfig:
    knots: list[WeaveKnot] = field(default_factory=list)  # empty: equal weights, constant
    ramp: str = "cosine"


@dataclass
class DataConfig:
    sources: dict[str, str] = field(default_factory=dict)
    weave: WeaveConfig = field(default_factory=WeaveConfig)
    seq_length: int = 2048
    global_batch: int = 64
    micro_batch: int = 8
    seed: int = 0
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    create_attention_mask: bool = False
    document_mask: bool = False  # attention stops at document boundaries; positions restart (docs/finetuning.md)
    shuffle_seed: int = 1234
    cache_dir: str | None = None
    train_steps: int | None = None  # when set, each source indexes enough samples for this many steps

    def packing(self) -> PackingConfig:
        return PackingConfig(
            seq_length=self.seq_length,
            reset_position_ids=self.reset_position_ids,
            reset_attention_mask=self.reset_attention_mask,
            eod_mask_loss=self.eod_mask_loss,
            create_attention_mask=self.create_attention_mask,
            document_mask=self.document_mask,
            shuffle_seed=self.shuffle_seed,
            cache_dir=self.cache_dir,
        )

    def schedule(self) -> WeaveSchedule:
        if not self.sources:
            raise ConfigError("data.sources: no sources (name: pretokenized directory)")
        knots = self.weave.knots or [WeaveKnot(0, {n: 1.0 for n in self.sources})]
        try:
            return WeaveSchedule(list(self.sources), knots, self.weave.ramp)  # type: ignore[arg-type]
        except WeaveError as exc:
            raise ConfigError(f"data.{exc}") from exc

    def open_sources(self) -> dict[str, PackedSource]:
        for n, p in self.sources.items():
            if not Path(p).is_dir():
                raise ConfigError(f"data.sources.{n}: {p} is not a directory")
        # upper bound of what a source can be asked for: every slot of every step
        need = None if self.train_steps is None else {n: self.train_steps * self.global_batch for n in self.sources}
        return open_sources(self.sources, self.packing(), need)

    def iterator(self, dp_rank: int = 0, dp_size: int = 1, start_step: int = 0) -> WovenBatchIterator:
        return WovenBatchIterator(
            self.open_sources(), self.schedule(), self.global_batch, self.micro_batch, dp_rank, dp_size, self.seed, start_step
        )


def load_data_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DataConfig:
    return load_config(DataConfig, path, overrides)
