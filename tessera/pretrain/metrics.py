"""What a training run reports, and where: ``RUN/metrics.jsonl``, TensorBoard (``RUN/tensorboard``), console.

Rank 0 writes; every rank takes part in the step's one all-reduce (``tessera.pretrain.step.reduce_step``).

* ``step_stats`` turns one micro-batch's ``LossOutput`` (plus, on monitor steps, its logits) into SUMS and
  token counts, so the step's figures are exact token-weighted means over every micro-batch of every
  DP replica (and the last pipeline stage's numbers reach rank 0 whatever the pipeline layout).
* With a blend of several sources, ``step_stats`` also sums each source's CE, target tokens and rows
  (``SOURCE_SUM_KEYS``, from each row's ``source``), reduced with the rest; ``source_record`` turns them into
  ``tokens/NAME`` (input tokens), ``target_tokens/NAME``, ``ce/NAME`` and ``weight/NAME`` (the blend's weight
  at that step).
* ``TrainLogger`` times the steps and derives tokens/s and MFU, writes one JSON line per step (keys
  ``step, loss, ce, ce_text, ce_image, ce_special, z, lr, grad_norm, bad_steps`` (consecutive skips),
  ``bad_steps_total`` (skips so far), ``step_seconds, tokens_per_s`` and ``mfu`` (when a peak is known)
  every step; the per-source keys above with a blend; ``logit_norm, max_attn_logit`` on monitor steps;
  ``eval_*`` on evaluation steps (``eval_loss/NAME``, ... per held-out set when there are several);
  ``host_syncs`` with TESSERA_COUNT_SYNCS=1, ``peak_mem_gib`` on CUDA logged steps), the same scalars to
  TensorBoard, and a progress line every ``train.log_interval`` steps.

tokens/s is the average over the last ``TOKENS_WINDOW`` steps (total tokens / total wall time), not one
step's. MFU = tokens/s x FLOPs/token / (devices x peak FLOP/s per device), with FLOPs/token from
``tessera.model.flops.flops_per_token`` (6 x matmul parameters + 12 x layers x seq x heads x head_dim;
the function ``tessera bench train`` and ``tessera bench plan`` use) and the peak from
``peak_flops_per_device`` (``train.peak_flops``, else a GPU's datasheet dense peak for the run's
precision; none on the CPU).
"""

from __future__ import annotations

import collections
import json
import sys
import time
from pathlib import Path
from typing import TextIO

import torch

from tessera.model.config import ModelConfig
from tessera.model.loss import MODALITY_NAMES, LossOutput
from tessera.pretrain.config import TrainConfig
from tessera.pretrain.device import training_device
from tessera.pretrain.monitors import logit_norm_sums
from tessera.progress import format_seconds

MODALITIES = list(MODALITY_NAMES.values())  # text, image, special
# token-weighted CE sums and their token counts, overall and per label modality (training and evaluation)
CE_KEYS = ["ce", "n"] + [f"{p}_{m}" for m in MODALITIES for p in ("ce", "n")]
# the order every rank packs the step sums in (one all-reduce); loss and z are per-micro-batch means
STEP_SUM_KEYS = ["loss", "z", "n_micro", *CE_KEYS, "logit_norm", "n_logit"]
# per source of a blend, each a [num_sources] vector: CE sum, target (loss-mask) tokens, rows
SOURCE_SUM_KEYS = ["src_ce", "src_n", "src_rows"]

TOKENS_WINDOW = 20  # steps in the tokens/s (and MFU) average: one step's time is too noisy to report


def peak_flops_per_device(configured: float | None, precision: str, device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s of ONE device for MFU, where it comes from): ``train.peak_flops`` when set; on a GPU its
    datasheet dense peak for the run's precision (``tessera.model.flops``: bf16; TF32 for fp32 when
    PyTorch lets fp32 matmuls use TF32, plain FP32 otherwise); on the CPU, or a GPU not in the table,
    None: no MFU is reported (a CPU's measured matmul peak is no bound for a training step)."""
    if configured:
        return configured, f"train.peak_flops ({configured:g} FLOP/s)"
    if device.type == "cuda":
        from tessera.model.flops import gpu_peak_flops

        name = torch.cuda.get_device_name(device)
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        got = gpu_peak_flops(name, precision, tf32)
        if got is not None:
            return got
        return None, f"{name} has no {precision} entry in tessera.model.flops.GPU_PEAKS; set train.peak_flops"
    return None, "none on the CPU (set train.peak_flops to divide by a peak of your choice)"


def model_flops_per_token(model: ModelConfig, seq_length: int) -> float:
    from tessera.model.flops import flops_per_token

    return flops_per_token(model, seq_length)


def step_stats(lo: LossOutput, logits: torch.Tensor | None = None, loss_mask: torch.Tensor | None = None,
               source: torch.Tensor | None = None, n_sources: int = 0) -> dict:
    """One micro-batch's sums for ``step_sums`` (and ``CE_KEYS`` for evaluation), on the loss's device;
    pass ``logits`` / ``loss_mask`` on monitor steps to add the output-logit norm (a TP collective: every TP
    rank of the last stage calls this). The trainer adds the micro-batch's ``loss``. ``source`` ([b], each
    row's index into a blend of ``n_sources``; ``lo`` computed with ``per_row=True``) adds the
    ``SOURCE_SUM_KEYS`` vectors."""
    dev = lo.ce.device
    n = lo.num_tokens if lo.num_tokens is not None else torch.full((), float(lo.ce.numel()), device=dev)
    stats = {"z": lo.z.detach().clone(), "n_micro": torch.ones((), device=dev), "ce": (lo.ce * n).detach(), "n": n}
    for k, v in lo.per_modality.items():
        stats[f"ce_{k}"] = (v * lo.per_modality_tokens[k]).detach()
        stats[f"n_{k}"] = lo.per_modality_tokens[k]
    if logits is not None:
        stats["logit_norm"], stats["n_logit"] = logit_norm_sums(logits.detach(), loss_mask)
    if source is not None and n_sources:
        src = source.to(dev)
        for key, v in zip(SOURCE_SUM_KEYS, (lo.row_ce, lo.row_tokens, torch.ones(src.shape, device=dev)), strict=True):
            stats[key] = torch.zeros(n_sources, dtype=torch.float64, device=dev).index_add_(0, src, v.to(torch.float64))
    return stats


def sum_stats(out: list[dict], keys: list[str], device: torch.device | None = None) -> torch.Tensor:
    """float64 [len(keys)] sums of ``keys`` over the stats dicts, on ``device`` (default the training
    device), with no host sync (the step reads them once, after the all-reduce)."""
    dev = device if device is not None else training_device()
    sums = torch.zeros(len(keys), dtype=torch.float64, device=dev)
    zero = torch.zeros((), dtype=torch.float64, device=dev)
    for o in out:
        sums += torch.stack([o[k].to(dev, torch.float64).reshape(()) if k in o else zero for k in keys])
    return sums


def step_sums(out: list[dict] | None, device: torch.device | None = None) -> torch.Tensor:
    """This rank's contribution to the step's statistics (``STEP_SUM_KEYS`` order, float64, on the device):
    ``out`` is what the schedule returned here (the last pipeline stage's ``step_stats`` dicts, empty
    elsewhere); only TP rank 0 contributes, since the values are replicated over TP. Summed over the
    world (one all-reduce), every micro-batch of every DP replica counts once."""
    from megatron.core import parallel_state as ps

    return sum_stats(out if out and ps.get_tensor_model_parallel_rank() == 0 else [], STEP_SUM_KEYS, device)


def source_sums(out: list[dict] | None, n_sources: int, device: torch.device | None = None) -> torch.Tensor:
    """This rank's per-source sums (``SOURCE_SUM_KEYS`` x ``n_sources``, float64, on the device), under the
    same rule as ``step_sums`` (the last stage's micro-batches, TP rank 0 only)."""
    from megatron.core import parallel_state as ps

    dev = device if device is not None else training_device()
    sums = torch.zeros(len(SOURCE_SUM_KEYS), n_sources, dtype=torch.float64, device=dev)
    if out and ps.get_tensor_model_parallel_rank() == 0:
        for o in out:
            sums += torch.stack([o[k].to(dev, torch.float64) for k in SOURCE_SUM_KEYS])
    return sums.reshape(-1)


def source_record(names: list[str], sums: list[float], seq_length: int,
                  weights: dict[str, float] | None = None) -> dict[str, float]:
    """The world-summed ``source_sums`` -> ``tokens/NAME`` (input tokens of the rows it gave), ``target_tokens/
    NAME``, ``ce/NAME`` (token-mean CE of its targets; absent without any) and ``weight/NAME``."""
    k = len(names)
    ce, n, rows = sums[:k], sums[k : 2 * k], sums[2 * k : 3 * k]
    rec: dict[str, float] = {}
    for i, name in enumerate(names):
        rec[f"tokens/{name}"] = int(round(rows[i])) * seq_length
        rec[f"target_tokens/{name}"] = int(round(n[i]))
        if n[i] > 0:
            rec[f"ce/{name}"] = ce[i] / n[i]
        if weights is not None:
            rec[f"weight/{name}"] = weights[name]
    return rec


def step_means(tot: dict[str, float]) -> dict[str, float]:
    """The world-summed ``STEP_SUM_KEYS`` -> token-weighted means over the step (``loss`` and ``z``: the mean
    over micro-batches, each already a token mean); keys without tokens are left out."""
    res: dict[str, float] = {}
    if tot["n_micro"] > 0:
        res["loss"] = tot["loss"] / tot["n_micro"]
        res["z"] = tot["z"] / tot["n_micro"]
    if tot["n"] > 0:
        res["ce"] = tot["ce"] / tot["n"]
    for m in MODALITIES:
        if tot[f"n_{m}"] > 0:
            res[f"ce_{m}"] = tot[f"ce_{m}"] / tot[f"n_{m}"]
    if tot["n_logit"] > 0:
        res["logit_norm"] = tot["logit_norm"] / tot["n_logit"]
    return res


# TensorBoard tag of each record key (eval_* keys go to eval/*)
_TAGS = {"loss": "train/loss", "ce": "train/ce", "ce_text": "train/ce_text", "ce_image": "train/ce_image",
         "ce_special": "train/ce_special", "z": "train/z_loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
         "bad_steps": "train/bad_steps", "bad_steps_total": "train/bad_steps_total",
         "logit_norm": "monitors/logit_norm", "max_attn_logit": "monitors/max_attn_logit",
         "tokens_per_s": "perf/tokens_per_s", "mfu": "perf/mfu", "step_seconds": "perf/step_seconds"}


def _tag(key: str) -> str | None:
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]  # eval_loss/NAME -> eval/loss/NAME
    if "/" in key:
        return "sources/" + key  # ce/NAME -> sources/ce/NAME
    return _TAGS.get(key)


class TrainLogger:
    """``logger.start_step()`` at the top of a step, ``logger.end_step()`` once its update is done
    (returns step_seconds / tokens_per_s / mfu for the record), ``logger.log(rec)`` with the full record
    (after evaluation), ``logger.close()`` at the end. Writes only where ``enabled`` (rank 0)."""

    def __init__(self, cfg: TrainConfig, run_dir: str | Path, world_size: int, enabled: bool,
                 stream: TextIO | None = None, first_step: int = 0, model: ModelConfig | None = None,
                 peak_flops: float | None = None) -> None:
        self.enabled = enabled
        self.run = Path(run_dir)
        self.total = cfg.train.steps
        self.first_step = first_step  # steps already done before this process (resume): not in the ETA rate
        self.log_interval = max(1, cfg.train.log_interval)
        self.monitor_interval = cfg.train.monitor_interval
        self.tokens_per_step = cfg.parallel.global_batch_size * cfg.data.seq_length
        # model: the model the run built (vocabulary sized from the data); peak: None = no MFU
        self.flops_per_token = model_flops_per_token(model or cfg.model, cfg.data.seq_length)
        self.peak_flops = peak_flops or cfg.train.peak_flops
        self.devices = world_size
        self.stream = stream or sys.stdout
        self.writer = None
        if enabled:
            self.run.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is a dependency of tessera; say so if it went missing
                raise RuntimeError(f"TensorBoard logging to {self.run / 'tensorboard'} needs the tensorboard "
                                   f"package (pip install tensorboard): {e}") from e
            # resumed: TensorBoard hides what an earlier process logged past the checkpoint (as metrics.jsonl is trimmed)
            self.writer = SummaryWriter(str(self.run / "tensorboard"), purge_step=first_step + 1 if first_step else None)
        self.bad_total = self._bad_rows_so_far() if enabled and first_step else 0
        self.start = time.perf_counter()
        self._t0: float | None = None
        self._window: collections.deque[float] = collections.deque(maxlen=TOKENS_WINDOW)  # step seconds

    def _bad_rows_so_far(self) -> int:
        """Skipped steps an earlier process of this run logged (metrics.jsonl is already trimmed to the checkpoint)."""
        path = self.run / "metrics.jsonl"
        if not path.exists():
            return 0
        n = 0
        for line in path.read_text().splitlines():
            try:
                n += int(json.loads(line).get("bad_steps", 0) > 0)
            except (json.JSONDecodeError, AttributeError, TypeError):
                continue  # a torn line
        return n

    def is_log_step(self, step: int) -> bool:
        """Steps that print a progress line (first, every log_interval, last)."""
        return step == 1 or step == self.total or step % self.log_interval == 0

    def is_monitor_step(self, step: int) -> bool:
        """Steps that measure the logit monitors (first, every monitor_interval, last; <= 0: first and last)."""
        return step == 1 or step == self.total or (self.monitor_interval > 0 and step % self.monitor_interval == 0)

    def mfu(self, tokens_per_s: float) -> float | None:
        if not self.peak_flops:
            return None
        return tokens_per_s * self.flops_per_token / (self.devices * self.peak_flops)

    def tokens_per_s(self) -> float:
        """Tokens per second over the last ``TOKENS_WINDOW`` steps (total tokens / total time)."""
        seconds = sum(self._window)
        return len(self._window) * self.tokens_per_step / seconds if seconds > 0 else 0.0

    def start_step(self) -> None:
        self._t0 = time.perf_counter()

    def end_step(self) -> dict[str, float]:
        """``step_seconds`` of this step; ``tokens_per_s`` and ``mfu`` (when a peak is known) over the window."""
        dt = time.perf_counter() - (self._t0 if self._t0 is not None else self.start)
        self._window.append(dt)
        tps = self.tokens_per_s()
        rec = {"step_seconds": dt, "tokens_per_s": tps}
        mfu = self.mfu(tps)
        if mfu is not None:
            rec["mfu"] = mfu
        return rec

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        step = int(rec["step"])
        self.bad_total += int(rec.get("bad_steps", 0) > 0)  # bad_steps counts CONSECUTIVE skips: > 0 = this one
        rec = {**rec, "bad_steps_total": self.bad_total}
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        for k, v in rec.items():
            tag = _tag(k)
            if tag is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(tag, v, step)
        self.writer.flush()  # a run that dies (max_bad_steps) keeps every scalar it logged
        if self.is_log_step(step):
            self.stream.write(self.progress_line(rec) + "\n")
        if any(k.startswith("eval_") for k in rec):
            self.stream.write(self.eval_line(rec) + "\n")
        self.stream.flush()

    def progress_line(self, rec: dict) -> str:
        """``step 10/200 (5%) loss 5.5 ce text 4.1 image 6.2 lr 3e-04 grad 0.89 | 1.2e+03 tok/s MFU 41.0% |
        elapsed 00:12 eta 03:48``; tokens/s and MFU as in the record (the last ``TOKENS_WINDOW`` steps;
        no MFU without a peak)."""
        step = int(rec["step"])
        parts = [f"step {step}/{self.total} ({100.0 * step / self.total:.0f}%)", f"loss {rec['loss']:.4f}"]
        ce = [f"{m} {rec[f'ce_{m}']:.4f}" for m in ("text", "image") if f"ce_{m}" in rec]
        if ce:
            parts.append("ce " + " ".join(ce))
        parts.append(f"lr {rec['lr']:.3g} grad {rec['grad_norm']:.3f}")
        if rec.get("bad_steps_total"):
            parts.append(f"skipped {rec['bad_steps_total']}")
        if "logit_norm" in rec:
            parts.append(f"logit_norm {rec['logit_norm']:.3g}")
        if "max_attn_logit" in rec:
            parts.append(f"attn_max {rec['max_attn_logit']:.3g}")
        tps = rec.get("tokens_per_s", 0.0)
        mfu = f" MFU {100 * rec['mfu']:.2f}%" if "mfu" in rec else ""
        elapsed = time.perf_counter() - self.start
        done = step - self.first_step
        eta = (self.total - step) * elapsed / done if done > 0 else 0.0  # evaluation and saving included
        line = " ".join(parts)
        return (f"{line} | {tps:.4g} tok/s{mfu} | "
                f"elapsed {format_seconds(elapsed)} eta {format_seconds(eta)}")

    @staticmethod
    def eval_line(rec: dict) -> str:
        parts = [f"eval step {rec['step']}:"]
        if "eval_loss" in rec:
            parts.append(f"loss {rec['eval_loss']:.4f} (ppl {rec['eval_ppl']:.4g})")
        for m in ("text", "image"):
            if f"eval_ce_{m}" in rec:
                parts.append(f"{m} {rec[f'eval_ce_{m}']:.4f} (ppl {rec[f'eval_ppl_{m}']:.4g})")
        per = [f"{k.split('/', 1)[1]} {v:.4f}" for k, v in rec.items() if k.startswith("eval_loss/")]
        if per:
            parts.append("| " + " ".join(per))
        return " ".join(parts)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
