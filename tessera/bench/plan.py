"""Scaling arithmetic for a model under a TP x PP x DP layout (``tessera bench plan``).

Everything here is closed-form and exact for the model's shape, so it runs for a 34B model on a laptop:

* parameters: per component, equal to the model's exact count (tested against ``count_parameters``);
* FLOPs per token: ``tessera.model.flops.flops_per_token`` (model FLOPs of one training step, the
  numerator of MFU; the trainer uses the same function);
* memory per GPU, under the run's ``ParallelLayout`` (the object the trainer runs under): weights in the
  parameter dtype, fp32 gradients (megatron's main_grad buffer), the optimizer's fp32 state (bf16: master
  weights + Adam moments, 12 B/param; fp32: the moments, 8 B/param), sharded over DP by the distributed
  optimizer; activations saved for the backward, term by term for the kernels the GPU runs
  (``activation_terms``), checked against measured bytes by ``tessera bench memory``
  (tessera/bench/memory.py, docs/scaling.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from tessera.bench.machine import GPU_MEMORY_GB, GPU_PEAK_BF16_TFLOPS
from tessera.config import ConfigError
from tessera.model.flops import flops_per_token, matmul_parameters  # noqa: F401 - re-exported for bench users
from tessera.pretrain.layout import RECOMPUTE_MODES, ParallelLayout

Layout = ParallelLayout  # the trainer's layout object (tessera.pretrain.layout)
# the linears LoRA adapts by default (tessera.model.lora)
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
Recompute = Literal["none", "selective", "full"]

# Chameleon pre-training budget. arXiv:2405.09818 (Chameleon Team, 2024): Table 1 lists 4.4T tokens per
# epoch for both 7B and 34B and 2.1 epochs; section 2.3 says 34B saw 9.2T tokens in total; Table 2 gives
# the A100-80GB GPU-hours (7B: 856,481 on 1024 GPUs; 34B: 4,282,407 on 3072 GPUs).
CHAMELEON_TOKENS_PER_EPOCH = 4.4e12
CHAMELEON_EPOCHS = 2.1
CHAMELEON_A100_GPU_HOURS = {"chameleon-7b": 856_481, "chameleon-34b": 4_282_407}
CHAMELEON_CONCURRENT_GPUS = {"chameleon-7b": 1024, "chameleon-34b": 3072}
GPUS_PER_NODE = 8


class PlanError(ConfigError):
    pass


@dataclass(frozen=True)
class ModelShape:
    """The numbers the arithmetic needs, read from a ``tessera.model`` ``ModelConfig``."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    seq_length: int
    qk_norm: bool = True
    gated_mlp: bool = True  # SwiGLU: fc1 produces gate and up
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    swin_norm: bool = False  # norms on the branch outputs (34B): the same activation count
    rope: bool = True  # rotary embeddings (False: Korthikanti et al.'s GPT, for the reduction test)

    @staticmethod
    def from_config(cfg: Any) -> ModelShape:
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "kv_channels", None) or cfg.hidden_size // heads
        return ModelShape(
            num_layers=cfg.num_layers,
            hidden_size=cfg.hidden_size,
            ffn_hidden_size=cfg.ffn_hidden_size,
            num_attention_heads=heads,
            num_query_groups=cfg.num_query_groups or heads,
            head_dim=head_dim,
            vocab_size=cfg.vocab_size,
            seq_length=cfg.seq_length,
            qk_norm=bool(getattr(cfg, "qk_norm", True)),
            hidden_dropout=float(getattr(cfg, "hidden_dropout", 0.0) or 0.0),
            attention_dropout=float(getattr(cfg, "attention_dropout", 0.0) or 0.0),
            swin_norm=bool(getattr(cfg, "swin_norm", False)),
        )

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_query_groups * self.head_dim


def shape_for_preset(preset: str) -> ModelShape:
    from tessera.model.config import get_preset

    return ModelShape.from_config(get_preset(preset))


# ---- parameters -----------------------------------------------------------------------------------
def layer_parameters(m: ModelShape) -> dict[str, int]:
    """One decoder layer, by component; ``tp_split`` marks what tensor parallelism divides."""
    h, f = m.hidden_size, m.ffn_hidden_size
    return {
        "linear_qkv": h * (m.q_width + 2 * m.kv_width),
        "linear_proj": m.q_width * h,
        "linear_fc1": h * f * (2 if m.gated_mlp else 1),
        "linear_fc2": f * h,
        # per-head LayerNorm weight + bias on q and k, split with the heads
        "qk_norm": (2 * m.q_width + 2 * m.kv_width) if m.qk_norm else 0,
        "norms": 2 * h,  # the two RMSNorm weights, replicated across TP
    }


def parameter_breakdown(m: ModelShape) -> dict[str, int]:
    layer = sum(layer_parameters(m).values())
    return {
        "embedding": m.vocab_size * m.hidden_size,
        "layers": m.num_layers * layer,
        "final_norm": m.hidden_size,
        "output_layer": m.vocab_size * m.hidden_size,  # untied
    }


def count_parameters(m: ModelShape) -> int:
    return sum(parameter_breakdown(m).values())


def stage_parameters(m: ModelShape, tp: int, pp: int) -> list[int]:
    """Parameters held by ONE GPU of each pipeline stage (TP shards of that stage)."""
    if m.num_layers % pp:
        raise PlanError(f"num_layers {m.num_layers} is not divisible by pp={pp}")
    lp = layer_parameters(m)
    per_layer_gpu = sum(v for k, v in lp.items() if k != "norms") / tp + lp["norms"]
    layers = m.num_layers // pp
    stages = []
    for i in range(pp):
        n = layers * per_layer_gpu
        if i == 0:
            n += m.vocab_size * m.hidden_size / tp
        if i == pp - 1:
            n += m.vocab_size * m.hidden_size / tp + m.hidden_size
        stages.append(int(round(n)))
    return stages


# FLOPs per token: tessera.model.flops (the trainer's MFU uses the same functions)


# ---- activations ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Kernels:
    """What the training kernels save for the backward, where implementations differ. The defaults are the
    GPU path the shipped configs run (Transformer Engine, or the local spec on CUDA):

    * ``norm``: ``fused`` (TE's LayerNormLinear / TENorm, torch's CUDA RMSNorm) saves the input and an fp32
      1/rms per token; ``composite`` (torch's RMSNorm on the CPU) saves an fp32 copy of the input and the
      fp32 normalised tensor instead (8 B per element in any dtype);
    * ``dropout_mask_bytes``: CUDA's dropout keeps a bool mask (1 B); torch's CPU dropout a scaled mask in
      the activation dtype (None: that dtype's size);
    * ``stats_bytes``: the QK-norm LayerNorm's mean and 1/std per (token, head): fp32 on CUDA, the
      activation dtype on the CPU (None);
    * ``attention``: ``flash`` (TE / cuDNN fused attention, FlashAttention through SDPA, and the CPU's
      cpu_attention.c keep q, k, v, the output and an fp32 log-sum-exp per (token, head)) or ``unfused``
      (megatron's DotProductAttention: the s x s softmax, Korthikanti et al.'s 2as^2b, 5as^2b with
      attention dropout);
    * ``v_copy``: Transformer Engine's attention checks the q / k / v memory layout and copies V, a strided
      view into the QKV output, to a contiguous tensor that it keeps (``d x kv``); SDPA and cpu_attention.c
      read the view. Under selective recomputation the copy is made inside the recomputed region.
    """

    norm: Literal["fused", "composite"] = "fused"
    dropout_mask_bytes: int | None = 1
    stats_bytes: int | None = 4
    attention: Literal["flash", "unfused"] = "flash"
    v_copy: bool = True


GPU_KERNELS = Kernels()  # Transformer Engine on CUDA, the shipped configs' path
CPU_KERNELS = Kernels(norm="composite", dropout_mask_bytes=None, stats_bytes=None, v_copy=False)  # measured on the CPU


def activation_terms(m: ModelShape, layout: Layout, recompute: Recompute | None = None,
                     kernels: Kernels = GPU_KERNELS) -> dict[str, float]:
    """Bytes one transformer layer saves for the backward, for one micro-batch on one GPU, term by term.

    Korthikanti et al. 2022 (arXiv:2205.05198, section 4) generalised term by term to this model and its
    kernels; ``x = s * b`` tokens, ``d`` bytes per activation (2 bf16, 4 fp32), ``t`` = TP; terms marked
    "/r" are divided by TP only under sequence parallelism, the others always:

    * norms /r: 2 x (the saved input, ``d x h``, or ``8 x h`` for the composite CPU norm, + fp32 1/rms ``4x``);
    * linear inputs /r: the QKV and fc1 inputs, ``2 d x h`` (megatron's linears save their local shard
      under sequence parallelism and all-gather it again in the backward);
    * dropout masks /r: ``2 x h`` mask bytes, when hidden dropout > 0;
    * qkv /t: the whole QKV output ``d x (hq + 2 kv)``: V (and with QK-norm K's norm input) are views
      of it, so it stays alive as one block;
    * query copy /t: with QK-norm, GQA and more than one KV group per TP rank, megatron's reshape of the
      query out of the grouped QKV layout copies it (``d x hq``); the norm keeps the copy;
    * qk_norm /t: the per-head LayerNorm outputs (kept by the weight multiply) ``d x (hq + kv)`` and their
      mean and 1/std per (token, head);
    * rope: the rotated q and k ``d x (hq + kv) / t`` and megatron's cos / sin tables, made per call
      ([s, 1, 1, head_dim] for q and for k, ``4 d s head_dim``, any TP);
    * attention output /t ``d x hq`` (the projection's input);
    * core attention /t, none only (selective recomputes it): flash: the fp32 log-sum-exp ``4 x a`` (+ TE's
      copy of V, ``d x kv``); unfused: ``d a s x`` (+ ``(1 + d) a s x`` with attention dropout);
    * mlp /t: SwiGLU keeps [gate; up] ``2 d x f`` (GeLU: its input ``d x f``), fc2 its input ``d x f``.

    ``full`` keeps only the layer's input (``d x h`` /r), per checkpointed layer (``stage_layer_bytes``
    applies megatron's method and group size). Swin norm placement moves the norms onto the branch
    outputs and the linears onto the un-normed inputs: the same count.
    """
    r = layout.recompute if recompute is None else recompute
    if r not in RECOMPUTE_MODES:
        raise PlanError(f"recompute must be one of {RECOMPUTE_MODES}, got {r!r}")
    s, b, t, d = layout.seq(m), layout.micro_batch, layout.tp, layout.param_bytes
    x = s * b
    rep = t if layout.sequence_parallel and t > 1 else 1
    h, hq, kv, f = m.hidden_size, m.q_width, m.kv_width, m.ffn_hidden_size
    a, g = m.num_attention_heads, m.num_query_groups
    if r == "full":
        return {"layer_input": d * x * h / rep}
    mask = kernels.dropout_mask_bytes or d
    stats = kernels.stats_bytes or d
    norm = (8 * x * h if kernels.norm == "composite" else d * x * h) + 4 * x
    terms = {"norms": 2 * norm / rep, "linear_inputs": 2 * d * x * h / rep}
    if m.hidden_dropout > 0:
        terms["dropout_masks"] = 2 * mask * x * h / rep
    terms["qkv"] = d * x * (hq + 2 * kv) / t
    if m.qk_norm:
        if g < a and g // t > 1:
            terms["query_copy"] = d * x * hq / t
        terms["qk_norm"] = (d * x * (hq + kv) + 2 * stats * x * (a + g)) / t
    if m.rope:
        terms["rope"] = d * x * (hq + kv) / t + 4 * d * s * m.head_dim
    terms["attention_output"] = d * x * hq / t
    if r == "none":
        if kernels.attention == "flash":
            terms["core_attention"] = (4 * x * a + (d * x * kv if kernels.v_copy else 0)) / t
        else:
            terms["core_attention"] = (d + (1 + d if m.attention_dropout > 0 else 0)) * a * s * x / t
    terms["mlp"] = ((2 if m.gated_mlp else 1) + 1) * d * x * f / t
    return terms


def activation_bytes_per_layer(m: ModelShape, layout: Layout, recompute: Recompute | None = None,
                               kernels: Kernels = GPU_KERNELS) -> float:
    return sum(activation_terms(m, layout, recompute, kernels).values())


def stage_layer_bytes(m: ModelShape, layout: Layout, recompute: Recompute | None = None,
                      kernels: Kernels = GPU_KERNELS) -> float:
    """Bytes the layers of one GPU's pipeline stage (all its virtual chunks) save for one micro-batch.
    Full recomputation, as megatron runs it: ``uniform`` checkpoints groups of n layers (one saved input
    per group), ``block`` the first n layers of each chunk and keeps every activation of the others."""
    r = layout.recompute if recompute is None else recompute
    per_chunk = layout.layers_per_stage(m)
    chunks = layout.virtual_stages
    if r != "full":
        return chunks * per_chunk * activation_bytes_per_layer(m, layout, r, kernels)
    n = layout.recompute_group(m)
    checkpoint = activation_bytes_per_layer(m, layout, "full", kernels)
    if layout.recompute_method == "uniform":
        return chunks * math.ceil(per_chunk / n) * checkpoint
    return chunks * (n * checkpoint + (per_chunk - n) * activation_bytes_per_layer(m, layout, "none", kernels))


def recompute_working_bytes(m: ModelShape, layout: Layout, recompute: Recompute | None = None,
                            kernels: Kernels = GPU_KERNELS) -> float:
    """What a recomputation holds while its backward runs (not saved in the forward, so not in the saved
    terms): full: one checkpointed group's activations (uniform: n layers; block: one layer); selective:
    one layer's core attention (flash: its output and log-sum-exp)."""
    r = layout.recompute if recompute is None else recompute
    if r == "none":
        return 0.0
    if r == "selective":
        core = activation_terms(m, layout, "none", kernels)
        return core["core_attention"] + core["attention_output"]
    group = layout.recompute_group(m) if layout.recompute_method == "uniform" else 1
    return group * activation_bytes_per_layer(m, layout, "none", kernels)


def first_stage_extra_bytes(m: ModelShape, layout: Layout) -> float:
    """Outside the layers, first stage: the embedding keeps its token ids (int64; with TP > 1 megatron's
    vocab-parallel embedding keeps its shifted ids and out-of-range mask instead). Its dropout is off."""
    x = layout.seq(m) * layout.micro_batch
    return 8 * x + (x if layout.tp > 1 else 0)


def last_stage_extra_bytes(m: ModelShape, layout: Layout, kernels: Kernels = GPU_KERNELS) -> float:
    """Outside the layers, last stage: the final norm (as a layer's norm), the output layer's input
    (``d x h`` /r), the logits the fused cross-entropy keeps in the activation dtype (``d x V / t``: no
    fp32 copy, its backward overwrites them with their gradient) and its per-token vectors (labels int64,
    fp32 log-sum-exp, loss-mask products: ~32 B per token)."""
    s, b, t, d = layout.seq(m), layout.micro_batch, layout.tp, layout.param_bytes
    x = s * b
    rep = t if layout.sequence_parallel and t > 1 else 1
    h = m.hidden_size
    norm = (8 * x * h if kernels.norm == "composite" else d * x * h) + 4 * x
    return (norm + d * x * h) / rep + d * x * m.vocab_size / t + 32 * x


def chunks_in_flight(layout: Layout, stage: int) -> tuple[int, bool]:
    """(model-chunk forwards whose activations one GPU of ``stage`` holds at once, whether every forward of the
    step runs before the first backward), as megatron's schedules order them (``get_pp_rank_microbatches``):
    1F1B runs p - i - 1 warm-up forwards, the interleaved schedule (p - i - 1) x 2 + (v - 1) x p chunk
    forwards; then one more forward before each backward. Fewer micro-batches than that: all forwards first."""
    p, v, m = layout.pp, layout.virtual_stages, layout.microbatches
    total = m * v
    warmup = (p - stage - 1) * 2 + (v - 1) * p if v > 1 else p - stage - 1
    if warmup >= total:
        return total, True
    return warmup + 1, False


def stage_activation_bytes(m: ModelShape, layout: Layout, recompute: Recompute | None = None,
                           kernels: Kernels = GPU_KERNELS) -> list[dict[str, float]]:
    """Activation bytes on one GPU of each pipeline stage at the peak of a step, by part.

    Each model-chunk forward in flight (``chunks_in_flight``: 1F1B's stage 0 holds p micro-batches of its
    L/p layers, L layers' worth, Korthikanti's observation) holds its layers' saved bytes; the first stage's
    chunk-0 forwards hold the embedding's extras and the last stage's final-chunk forwards the loss's
    (``first_stage_extra_bytes``, ``last_stage_extra_bytes``: one at a time in 1F1B's steady state, where
    each such forward is followed by its backward). The peak is the larger of the end of the forwards and
    a recomputation's working set on top of the layers in flight, when the backward has already freed the
    current micro-batch's loss tensors."""
    p, v = layout.pp, layout.virtual_stages
    chunk = stage_layer_bytes(m, layout, recompute, kernels) / v
    working = recompute_working_bytes(m, layout, recompute, kernels)
    out = []
    for i in range(p):
        chunks, all_forwards_first = chunks_in_flight(layout, i)
        n_first = min(layout.microbatches, chunks) if i == 0 else 0
        n_last = (layout.microbatches if all_forwards_first else 1) if i == p - 1 else 0
        last = last_stage_extra_bytes(m, layout, kernels)
        saved = chunks * chunk + n_first * first_stage_extra_bytes(m, layout) + n_last * last
        in_backward = saved - (last if n_last else 0.0) + working
        out.append({"saved": saved, "recompute_working": working, "total": max(saved, in_backward),
                    "chunks_in_flight": chunks})
    return out


# ---- the plan -------------------------------------------------------------------------------------
GiB = 2**30


def state_bytes_per_param(layout: Layout, distributed: bool | None = None) -> dict[str, float]:
    """Bytes per parameter on one GPU: weights in the parameter dtype, fp32 gradients (megatron's main_grad
    buffer: the trainer reduces gradients in fp32), and the optimizer's state: bf16 keeps fp32 master
    weights + Adam m + v (12 B), fp32 only m + v (8 B: the master weights are the model's), both divided
    by DP under the distributed optimizer (megatron's 18 vs 6 + 12/DP for bf16)."""
    dist = layout.distributed_optimizer if distributed is None else distributed
    opt = 12 if layout.precision == "bf16" else 8
    return {"weights": layout.param_bytes, "grads": 4, "optimizer": opt / (layout.dp if dist else 1)}


def memory_per_gpu(m: ModelShape, layout: Layout, kernels: Kernels = GPU_KERNELS) -> dict:
    """Bytes per GPU, each term separately and per pipeline stage; ``config_total`` is the busiest stage's
    total under exactly the layout's settings (optimizer, recomputation, precision)."""
    _validate(m, layout)
    params = stage_parameters(m, layout.tp, layout.pp)
    out: dict = {"params_per_gpu_by_stage": params}
    per = state_bytes_per_param(layout)
    acts = {r: stage_activation_bytes(m, layout, r, kernels) for r in RECOMPUTE_MODES}
    out["activations_per_layer"] = {r: activation_bytes_per_layer(m, layout, r, kernels) for r in RECOMPUTE_MODES}
    out["activation_terms_per_layer"] = {r: activation_terms(m, layout, r, kernels) for r in RECOMPUTE_MODES}
    out["activations_by_stage"] = {r: [a["total"] for a in v] for r, v in acts.items()}
    out["activations"] = {r: max(v) for r, v in out["activations_by_stage"].items()}
    stages = []
    for i, n in enumerate(params):
        st = {"params": n, "weights": per["weights"] * n, "grads": per["grads"] * n, "optimizer": per["optimizer"] * n,
              "activations": acts[layout.recompute][i]["total"]}
        st["total"] = st["weights"] + st["grads"] + st["optimizer"] + st["activations"]
        stages.append(st)
    busiest = max(range(layout.pp), key=lambda i: stages[i]["total"])
    n = params[busiest]
    out["stages"] = stages
    out["busiest_stage"] = busiest
    out["params_per_gpu"] = n
    out["weights"], out["grads"] = per["weights"] * n, per["grads"] * n
    out["optimizer_adam"] = state_bytes_per_param(layout, distributed=False)["optimizer"] * n
    out["optimizer_distributed"] = state_bytes_per_param(layout, distributed=True)["optimizer"] * n
    out["optimizer"] = per["optimizer"] * n
    out["total"] = {}
    for opt, dist in (("adam", False), ("distopt", True)):
        opt_per = state_bytes_per_param(layout, distributed=dist)
        for r in RECOMPUTE_MODES:
            out["total"][f"{opt}_{r}"] = max(
                (opt_per["weights"] + opt_per["grads"] + opt_per["optimizer"]) * params[i] + out["activations_by_stage"][r][i]
                for i in range(layout.pp))
    out["config_total"] = stages[busiest]["total"]
    out["config_total_gib"] = out["config_total"] / GiB
    return out


def _validate(m: ModelShape, layout: Layout) -> None:
    try:
        layout.validate(m)
    except ConfigError as exc:
        raise PlanError(str(exc)) from None


def layout_summary(layout: Layout, m: ModelShape) -> dict:
    return {**asdict(layout), "gpus": layout.world_size, "dp": layout.dp, "global_batch": layout.resolved_global_batch,
            "microbatches": layout.microbatches, "seq_length": layout.seq(m)}


def plan(
    m: ModelShape,
    layout: Layout,
    mfu: float = 0.4,
    gpu: str = "h100",
    token_budgets: dict[str, float] | None = None,
    name: str = "",
    lora_rank: int | None = None,
    lora_targets: tuple[str, ...] = LORA_TARGETS,
) -> dict:
    """Everything ``tessera bench plan`` prints, as one JSON-able dict (``lora``: the LoRA fine-tuning case
    of rank ``lora_rank``, when given)."""
    if lora_rank is not None and lora_rank < 1:
        raise PlanError(f"--lora-rank must be >= 1, got {lora_rank}")
    if gpu not in GPU_PEAK_BF16_TFLOPS:
        raise PlanError(f"unknown --gpu {gpu!r}; known: {sorted(GPU_PEAK_BF16_TFLOPS)}")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    _validate(m, layout)
    s = layout.seq(m)
    fpt = flops_per_token(m, s)
    peak = GPU_PEAK_BF16_TFLOPS[gpu] * 1e12
    tokens_per_s = mfu * peak * layout.world_size / fpt
    budgets = token_budgets or {
        "4.4T (one epoch, Chameleon Table 1)": CHAMELEON_TOKENS_PER_EPOCH,
        "9.2T (2.1 epochs, as trained)": CHAMELEON_TOKENS_PER_EPOCH * CHAMELEON_EPOCHS,
    }
    mem = memory_per_gpu(m, layout)
    out = {
        "model": name,
        "shape": asdict(m),
        "layout": layout_summary(layout, m),
        "parameters": count_parameters(m),
        "parameter_breakdown": parameter_breakdown(m),
        "flops_per_token": fpt,
        "gpu": gpu,
        "gpu_memory_gb": GPU_MEMORY_GB[gpu],
        "gpu_peak_bf16_tflops": GPU_PEAK_BF16_TFLOPS[gpu],
        "mfu": mfu,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / layout.world_size,
        "step_time_s": layout.resolved_global_batch * s / tokens_per_s,
        "memory": mem,
        "budgets": {
            k: {"tokens": v, "days": v / tokens_per_s / 86400, "gpu_days": v / tokens_per_s / 86400 * layout.world_size}
            for k, v in budgets.items()
        },
    }
    if lora_rank is not None:
        out["lora"] = lora_memory_per_gpu(m, layout, lora_rank, lora_targets)
    return out


def default_gpus(tp: int, pp: int, cp: int = 1) -> int:
    """The smallest job of whole 8-GPU nodes that a TP x PP (x CP) layout fills: the plan's GPU count when
    none is given (the distributed optimizer's share only shrinks with more GPUs)."""
    mp = tp * pp * cp
    return math.lcm(GPUS_PER_NODE, mp)


def plan_for_train_config(path: str, overrides: list[str] | None = None, gpus: int | None = None, **kw: Any) -> dict:
    """``plan`` for a ``tessera train`` config as the trainer reads it (``load_train_config``, the same checks,
    the same ``ParallelLayout``) on ``gpus`` GPUs (default ``default_gpus``); precision ``auto`` is a GPU run
    (bf16)."""
    from tessera.pretrain.config import load_train_config

    cfg = load_train_config(path, overrides)
    p = cfg.parallel
    world = gpus or default_gpus(p.tp, p.pp, p.context_parallel)
    layout = ParallelLayout.from_train_config(cfg, world)
    name = next((k for k, v in _presets().items() if _same_shape(v, cfg.model)), str(path))
    return plan(ModelShape.from_config(cfg.model), layout, name=name, **kw)


def _presets() -> dict:
    from tessera.model.config import PRESETS

    return PRESETS


def _same_shape(a: Any, b: Any) -> bool:
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size")
    return all(getattr(a, k) == getattr(b, k) for k in keys)


def paper_implied_mfu(m: ModelShape, name: str, gpu_peak_tflops: float = 312.0) -> float | None:
    """MFU implied by the paper's A100 GPU-hours for 2.1 epochs of 4.4T tokens at 4k context."""
    hours = CHAMELEON_A100_GPU_HOURS.get(name)
    if hours is None:
        return None
    total = flops_per_token(m, 4096) * CHAMELEON_TOKENS_PER_EPOCH * CHAMELEON_EPOCHS
    return total / (hours * 3600 * gpu_peak_tflops * 1e12)


def format_plan(p: dict) -> str:
    """The human-readable table printed by ``tessera bench plan``."""
    lay, mem = p["layout"], p["memory"]
    prec = lay["precision"]
    opt_what = "fp32 master + m + v" if prec == "bf16" else "m + v"
    settings = (f"{'distributed optimizer' if lay['distributed_optimizer'] else 'Adam (not distributed)'}, "
                f"sequence parallel {'on' if lay['sequence_parallel'] else 'off'}, recompute={lay['recompute']}, {prec}")
    rows = [
        ("model", p["model"]),
        ("parameters", f"{p['parameters']:,}"),
        ("layout", f"{lay['gpus']} GPUs = TP {lay['tp']} x PP {lay['pp']} (VP {lay['vp'] or 1}) x DP {lay['dp']}"),
        ("batch", f"micro {lay['micro_batch']} x {lay['microbatches']} micro-batches x DP {lay['dp']} = "
                  f"{lay['global_batch']} sequences of {lay['seq_length']} = {lay['global_batch'] * lay['seq_length']:,} tokens"),
        ("settings", settings),
        ("FLOPs / token (train, model)", f"{p['flops_per_token']:.4g}"),
        ("params / GPU (busiest stage)", f"{mem['params_per_gpu']:,}"),
        (f"weights {prec}", _gib(mem["weights"])),
        ("grads fp32 (main_grad)", _gib(mem["grads"])),
        (f"optimizer ({opt_what})", _gib(mem["optimizer_adam"])),
        ("  with distributed optimizer", _gib(mem["optimizer_distributed"])),
    ]
    for r in RECOMPUTE_MODES:
        rows.append((f"activations, recompute={r}", _gib(mem["activations"][r])))
    for k, v in mem["total"].items():
        opt, r = k.split("_")
        rows.append((f"total ({'dist. optimizer' if opt == 'distopt' else 'Adam'}, recompute={r})",
                     _gib(v) + ("" if v <= p["gpu_memory_gb"] * 1e9 else "  > GPU memory")))
    total = mem["config_total"]
    rows.append(("TOTAL under these settings", f"{_gib(total)} = {total / 1e9:.1f} GB of {p['gpu_memory_gb']:.0f} GB "
                 f"(stage {mem['busiest_stage']}; + CUDA context, NCCL, allocator: docs/scaling.md)"))
    rows.append((f"tokens/s at MFU {p['mfu']:.0%} on {p['gpu']} ({p['gpu_peak_bf16_tflops']:.0f} TFLOP/s bf16)",
                 f"{p['tokens_per_s']:,.0f} ({p['tokens_per_s_per_gpu']:,.0f} per GPU), step {p['step_time_s']:.2f} s"))
    for k, v in p["budgets"].items():
        rows.append((f"budget {k}", f"{v['days']:.1f} days on {lay['gpus']} GPUs = {v['gpu_days']:,.0f} GPU-days"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _gib(x: float) -> str:
    return f"{x / GiB:,.2f} GiB"


# ---- LoRA fine-tuning (tessera.model.lora) --------------------------------------------------------


def lora_adapter_parameters(m: ModelShape, rank: int, targets: tuple[str, ...] = LORA_TARGETS,
                            tp: int = 1) -> dict[str, float]:
    """Adapter parameters (A [r, in] + B [out, r]) held by ONE GPU of a TP group, per target over the whole
    model. Column-parallel targets (qkv, fc1, output layer) split B over TP and replicate A; row-parallel
    ones (proj, fc2) split A and replicate B (tessera.model.lora)."""
    h, f, r = m.hidden_size, m.ffn_hidden_size, rank
    # (in, out, column-parallel?, how many)
    shapes = {"linear_qkv": (h, m.q_width + 2 * m.kv_width, True, m.num_layers),
              "linear_proj": (m.q_width, h, False, m.num_layers),
              "linear_fc1": (h, f * (2 if m.gated_mlp else 1), True, m.num_layers),
              "linear_fc2": (f, h, False, m.num_layers),
              "output_layer": (h, m.vocab_size, True, 1)}
    unknown = sorted(set(targets) - set(shapes))
    if unknown:
        raise PlanError(f"unknown LoRA targets {unknown}; known: {sorted(shapes)}")
    out = {}
    for t in targets:
        i, o, column, n = shapes[t]
        out[t] = n * (r * i + o * r / tp if column else r * i / tp + o * r)
    return out


def lora_memory_per_gpu(m: ModelShape, layout: Layout, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> dict:
    """Bytes per GPU (busiest stage) for LoRA fine-tuning in bf16: the frozen base in bf16 with no gradient
    and no optimizer state (megatron's DDP and optimizer skip parameters that do not require grad), the
    adapters as trained parameters (bf16 weight, fp32 gradient, fp32 main copy + Adam moments, sharded over
    DP by the distributed optimizer). Activations are full fine-tuning's (``stage_activation_bytes``): every
    adapted linear's input is still kept for the backward (the adapter's own gradient needs it), and the
    frozen layers still pass gradients to their inputs; the adapters add their rank-r intermediates."""
    _validate(m, layout)
    base = memory_per_gpu(m, layout)
    per_target = lora_adapter_parameters(m, rank, targets, layout.tp)
    # the busiest stage: its share of the layers' adapters, plus the output layer's on the last stage
    n_ad = sum(v for t, v in per_target.items() if t != "output_layer") / layout.pp + per_target.get("output_layer", 0)
    s, b = layout.seq_length or m.seq_length, layout.micro_batch
    per_layer_targets = sum(t != "output_layer" for t in targets)
    extra_act = 2 * s * b * rank * per_layer_targets * (m.num_layers // layout.pp) * min(layout.microbatches, layout.pp)
    out = {
        "rank": rank, "targets": list(targets), "dp": layout.dp,
        "adapter_parameters_total": int(round(sum(lora_adapter_parameters(m, rank, targets, 1).values()))),
        "adapter_parameters_per_gpu": int(round(n_ad)),
        "base_weights_bf16": 2 * base["params_per_gpu"],
        "adapter_weights_bf16": 2 * n_ad,
        "grads_fp32": 4 * n_ad,
        "optimizer_fp32": 12 * n_ad,
        "optimizer_fp32_distributed": 12 * n_ad / layout.dp,
        "activations": {r: v + extra_act for r, v in base["activations"].items()},
    }
    static = out["base_weights_bf16"] + out["adapter_weights_bf16"] + out["grads_fp32"]
    out["total"] = {f"{opt}_{r}": static + out[f"optimizer_fp32{suffix}"] + out["activations"][r]
                    for opt, suffix in (("adam", ""), ("distopt", "_distributed")) for r in RECOMPUTE_MODES}
    out["full_finetune_total"] = base["total"]
    return out


# the GPU memory sizes the LoRA table answers for: a 48 GB card (L40S, RTX 6000 Ada, A6000) and an 80 GB one
LORA_CARDS_GB = (48.0, 80.0)


def format_lora(mem: dict, cards_gb: tuple[float, ...] = LORA_CARDS_GB) -> str:
    """The LoRA rows ``tessera bench plan --lora-rank R`` prints, with which cards each total fits (GB = 1e9 B)."""
    rows = [("LoRA", f"rank {mem['rank']} on {', '.join(mem['targets'])}: {mem['adapter_parameters_total']:,} "
                     f"adapter parameters ({mem['adapter_parameters_per_gpu']:,} per GPU)"),
            ("frozen base weights bf16", _gib(mem["base_weights_bf16"])),
            ("adapters bf16 + fp32 grads", _gib(mem["adapter_weights_bf16"] + mem["grads_fp32"])),
            ("adapter optimizer fp32", _gib(mem["optimizer_fp32"]))]
    for k, v in mem["total"].items():
        opt, r = k.split("_")
        if opt == "distopt" and mem["dp"] == 1:
            continue  # no data parallelism: the same as Adam's
        fits = ", ".join(f"{g:g} GB {'yes' if v <= g * 1e9 else 'no'}" for g in cards_gb)
        full = mem["full_finetune_total"][k]
        what = f"{'dist. optimizer, ' if opt == 'distopt' else ''}recompute={r}"
        rows.append((f"LoRA total ({what})", f"{_gib(v)}  fits {fits}  (full fine-tuning: {_gib(full)})"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
