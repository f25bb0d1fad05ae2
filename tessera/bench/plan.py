"""Scaling arithmetic for a model preset under a TP x PP x DP layout (``tessera bench plan``).

Everything here is closed-form and exact for the model's shape, so it runs for a 34B model on a laptop:

* parameters: per component, equal to the model's exact count (tested against ``count_parameters``);
* FLOPs per token: ``tessera.model.flops.flops_per_token`` (model FLOPs of one training step, the
  numerator of MFU; the trainer uses the same function);
* memory per GPU: bf16 weights, fp32 gradients (megatron's main_grad), fp32 master weights + Adam
  moments, sharded over DP by the distributed optimizer (megatron's 18 vs 6 + 12/DP bytes/parameter);
* activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models" (arXiv:2205.05198), section 4, generalised from their GeLU MLP with ffn = 4h and multi-head
  attention to SwiGLU, GQA and QK-norm; with ``gated_mlp=False``, ``kv = h`` and no QK-norm it reduces
  exactly to their sbh(34 + 5as/h) (tested).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from tessera.bench.machine import GPU_MEMORY_GB, GPU_PEAK_BF16_TFLOPS
from tessera.model.flops import flops_per_token, matmul_parameters  # noqa: F401 - re-exported for bench users

Recompute = Literal["none", "selective", "full"]
RECOMPUTE_MODES: tuple[Recompute, ...] = ("none", "selective", "full")

# Chameleon pre-training budget. arXiv:2405.09818 (Chameleon Team, 2024): Table 1 lists 4.4T tokens per
# epoch for both 7B and 34B and 2.1 epochs; section 2.3 says 34B saw 9.2T tokens in total; Table 2 gives
# the A100-80GB GPU-hours (7B: 856,481 on 1024 GPUs; 34B: 4,282,407 on 3072 GPUs).
CHAMELEON_TOKENS_PER_EPOCH = 4.4e12
CHAMELEON_EPOCHS = 2.1
CHAMELEON_A100_GPU_HOURS = {"chameleon-7b": 856_481, "chameleon-34b": 4_282_407}
CHAMELEON_CONCURRENT_GPUS = {"chameleon-7b": 1024, "chameleon-34b": 3072}


class PlanError(ValueError):
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


# ---- activations (Korthikanti et al.) -------------------------------------------------------------
def activation_bytes_per_layer(
    m: ModelShape, seq: int, micro_batch: int, tp: int = 1, sequence_parallel: bool = True, recompute: Recompute = "none"
) -> float:
    """Bytes one transformer layer keeps for backward for one micro-batch (bf16 activations, 1-byte masks).

    Korthikanti et al. (section 4.1) count, per layer: attention 11sbh + 5as^2b, MLP 19sbh, norms 4sbh.
    Generalised term by term (kv = query_groups * head_dim, f = ffn):
      replicated unless sequence-parallel: two norm inputs 4sbh, QKV-linear input 2sbh, fc1 input 2sbh,
        two dropout masks 2sbh (only when hidden dropout > 0);
      split by TP: Q 2sbh, K and V 4sb*kv, QK-norm inputs 2sbh + 2sb*kv, attention output 2sbh,
        MLP: SwiGLU keeps gate+up 4sbf and their product 2sbf (GeLU: its input and output, 4sbf);
      core attention (split by TP): softmax output 2as^2b, plus dropout mask as^2b and dropout output
        2as^2b when attention dropout > 0. Selective recomputation (and FlashAttention) keeps none of it.
    Full recomputation keeps only the layer input, 2sbh (/t under sequence parallelism).
    """
    s, b, h, a = seq, micro_batch, m.hidden_size, m.num_attention_heads
    sp = sequence_parallel and tp > 1
    if recompute == "full":
        return 2 * s * b * h / (tp if sp else 1)
    hq, kv, f = m.q_width, m.kv_width, m.ffn_hidden_size
    masks = 2 * s * b * h if m.hidden_dropout > 0 else 0
    replicated = 4 * s * b * h + 2 * s * b * h + 2 * s * b * h + masks
    split = 2 * s * b * hq + 4 * s * b * kv + 2 * s * b * hq
    if m.qk_norm:
        split += 2 * s * b * hq + 2 * s * b * kv
    split += (6 if m.gated_mlp else 4) * s * b * f
    if recompute == "none":
        split += (5 if m.attention_dropout > 0 else 2) * a * s * s * b
    elif recompute != "selective":
        raise PlanError(f"recompute must be one of {RECOMPUTE_MODES}, got {recompute!r}")
    return replicated / (tp if sp else 1) + split / tp


@dataclass(frozen=True)
class Layout:
    gpus: int
    tp: int = 1
    pp: int = 1
    vp: int = 1  # virtual pipeline stages per GPU (interleaved 1F1B)
    micro_batch: int = 1
    global_batch: int | None = None  # sequences; default: micro_batch * dp * pp (enough to fill the pipeline)
    seq_length: int | None = None
    sequence_parallel: bool = True

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    def validate(self, m: ModelShape) -> None:
        if self.gpus % (self.tp * self.pp):
            raise PlanError(f"--gpus {self.gpus} is not divisible by tp*pp = {self.tp * self.pp}")
        if m.num_attention_heads % self.tp or m.num_query_groups % self.tp:
            raise PlanError(
                f"heads {m.num_attention_heads} / query groups {m.num_query_groups} not divisible by tp={self.tp}"
            )
        if m.num_layers % (self.pp * self.vp):
            raise PlanError(f"num_layers {m.num_layers} is not divisible by pp*vp = {self.pp * self.vp}")
        if self.vp > 1 and self.pp == 1:
            raise PlanError("virtual pipeline stages need pp > 1")
        gb = self.resolved_global_batch()
        if gb % (self.micro_batch * self.dp):
            raise PlanError(f"global batch {gb} is not divisible by micro_batch*dp = {self.micro_batch * self.dp}")

    def resolved_global_batch(self) -> int:
        return self.global_batch or self.micro_batch * self.dp * self.pp

    def microbatches(self) -> int:
        return self.resolved_global_batch() // (self.micro_batch * self.dp)


def stage_activation_bytes(m: ModelShape, layout: Layout, recompute: Recompute) -> list[float]:
    """Activation bytes on one GPU of each stage under 1F1B: stage i holds min(m, p - i) micro-batches
    of its L/p layers (so stage 0 holds L layers' worth, Korthikanti's observation); interleaving multiplies
    stage 0 by (1 + (p-1)/(p*v)) (their eq. for the interleaved schedule; used as a bound for every stage).
    Extras: the embedding's dropout mask on stage 0 (sbh/t per micro-batch in flight, with dropout) and the
    fp32 logits of the cross-entropy on the last stage (4sbV/t)."""
    s = layout.seq_length or m.seq_length
    b, p, t = layout.micro_batch, layout.pp, layout.tp
    per_layer = activation_bytes_per_layer(m, s, b, t, layout.sequence_parallel, recompute)
    layers = m.num_layers // p
    n_micro = layout.microbatches()
    out = []
    for i in range(p):
        in_flight = min(n_micro, p - i)
        act = layers * in_flight * per_layer
        if layout.vp > 1:
            act = layers * min(n_micro, p) * per_layer * (1 + (p - 1) / (p * layout.vp))
        if i == 0 and m.hidden_dropout > 0:
            act += in_flight * s * b * m.hidden_size / t
        if i == p - 1:
            act += 4 * s * b * m.vocab_size / t
        out.append(act)
    return out


# ---- the plan -------------------------------------------------------------------------------------
GiB = 2**30


def memory_per_gpu(m: ModelShape, layout: Layout) -> dict:
    """Bytes per GPU on the busiest pipeline stage, each term separately (see module docstring)."""
    layout.validate(m)
    params = stage_parameters(m, layout.tp, layout.pp)
    out: dict = {"params_per_gpu_by_stage": params}
    worst = max(range(layout.pp), key=lambda i: params[i])
    n = params[worst]
    out["params_per_gpu"] = n
    out["weights_bf16"] = 2 * n
    out["grads_fp32"] = 4 * n
    out["optimizer_fp32"] = 12 * n  # master weights + Adam m + v
    out["optimizer_fp32_distributed"] = 12 * n / layout.dp
    acts = {r: stage_activation_bytes(m, layout, r) for r in RECOMPUTE_MODES}
    out["activations"] = {r: max(v) for r, v in acts.items()}
    out["activations_by_stage"] = acts
    static = out["weights_bf16"] + out["grads_fp32"]
    out["total"] = {
        f"{opt}_{r}": static + out[f"optimizer_fp32{suffix}"] + out["activations"][r]
        for opt, suffix in (("adam", ""), ("distopt", "_distributed"))
        for r in RECOMPUTE_MODES
    }
    return out


def plan(
    m: ModelShape,
    layout: Layout,
    mfu: float = 0.4,
    gpu: str = "h100",
    token_budgets: dict[str, float] | None = None,
    name: str = "",
) -> dict:
    """Everything ``tessera bench plan`` prints, as one JSON-able dict."""
    if gpu not in GPU_PEAK_BF16_TFLOPS:
        raise PlanError(f"unknown --gpu {gpu!r}; known: {sorted(GPU_PEAK_BF16_TFLOPS)}")
    if not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be in (0, 1], got {mfu}")
    layout.validate(m)
    s = layout.seq_length or m.seq_length
    fpt = flops_per_token(m, s)
    peak = GPU_PEAK_BF16_TFLOPS[gpu] * 1e12
    tokens_per_s = mfu * peak * layout.gpus / fpt
    budgets = token_budgets or {
        "4.4T (one epoch, Chameleon Table 1)": CHAMELEON_TOKENS_PER_EPOCH,
        "9.2T (2.1 epochs, as trained)": CHAMELEON_TOKENS_PER_EPOCH * CHAMELEON_EPOCHS,
    }
    mem = memory_per_gpu(m, layout)
    return {
        "model": name,
        "shape": asdict(m),
        "layout": {**asdict(layout), "dp": layout.dp, "global_batch": layout.resolved_global_batch(),
                   "microbatches": layout.microbatches(), "seq_length": s},
        "parameters": count_parameters(m),
        "parameter_breakdown": parameter_breakdown(m),
        "flops_per_token": fpt,
        "gpu": gpu,
        "gpu_memory_gb": GPU_MEMORY_GB[gpu],
        "gpu_peak_bf16_tflops": GPU_PEAK_BF16_TFLOPS[gpu],
        "mfu": mfu,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / layout.gpus,
        "step_time_s": layout.resolved_global_batch() * s / tokens_per_s,
        "memory": mem,
        "budgets": {
            k: {"tokens": v, "days": v / tokens_per_s / 86400, "gpu_days": v / tokens_per_s / 86400 * layout.gpus}
            for k, v in budgets.items()
        },
    }


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
    rows = [
        ("model", p["model"]),
        ("parameters", f"{p['parameters']:,}"),
        ("layout", f"{lay['gpus']} GPUs = TP {lay['tp']} x PP {lay['pp']} (VP {lay['vp']}) x DP {lay['dp']}"),
        ("batch", f"micro {lay['micro_batch']} x {lay['microbatches']} micro-batches x DP {lay['dp']} = "
                  f"{lay['global_batch']} sequences of {lay['seq_length']} = {lay['global_batch'] * lay['seq_length']:,} tokens"),
        ("FLOPs / token (train, model)", f"{p['flops_per_token']:.4g}"),
        ("params / GPU (busiest stage)", f"{mem['params_per_gpu']:,}"),
        ("weights bf16", _gib(mem["weights_bf16"])),
        ("grads fp32", _gib(mem["grads_fp32"])),
        ("optimizer fp32 (master+m+v)", _gib(mem["optimizer_fp32"])),
        ("  with distributed optimizer", _gib(mem["optimizer_fp32_distributed"])),
    ]
    for r in RECOMPUTE_MODES:
        rows.append((f"activations, recompute={r}", _gib(mem["activations"][r])))
    for k, v in mem["total"].items():
        opt, r = k.split("_")
        rows.append((f"total ({'dist. optimizer' if opt == 'distopt' else 'Adam'}, recompute={r})",
                     _gib(v) + ("" if v <= p["gpu_memory_gb"] * 1e9 else "  > GPU memory")))
    rows.append((f"tokens/s at MFU {p['mfu']:.0%} on {p['gpu']} ({p['gpu_peak_bf16_tflops']:.0f} TFLOP/s bf16)",
                 f"{p['tokens_per_s']:,.0f} ({p['tokens_per_s_per_gpu']:,.0f} per GPU), step {p['step_time_s']:.2f} s"))
    for k, v in p["budgets"].items():
        rows.append((f"budget {k}", f"{v['days']:.1f} days on {lay['gpus']} GPUs = {v['gpu_days']:,.0f} GPU-days"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _gib(x: float) -> str:
    return f"{x / GiB:,.2f} GiB"


# ---- LoRA fine-tuning (tessera.model.lora) --------------------------------------------------------
LORA_TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


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
    layout.validate(m)
    base = memory_per_gpu(m, layout)
    per_target = lora_adapter_parameters(m, rank, targets, layout.tp)
    # the busiest stage: its share of the layers' adapters, plus the output layer's on the last stage
    n_ad = sum(v for t, v in per_target.items() if t != "output_layer") / layout.pp + per_target.get("output_layer", 0)
    s, b = layout.seq_length or m.seq_length, layout.micro_batch
    per_layer_targets = sum(t != "output_layer" for t in targets)
    extra_act = 2 * s * b * rank * per_layer_targets * (m.num_layers // layout.pp) * min(layout.microbatches(), layout.pp)
    out = {
        "rank": rank, "targets": list(targets), "dp": layout.dp,
        "adapter_parameters_total": int(round(sum(lora_adapter_parameters(m, rank, targets, 1).values()))),
        "adapter_parameters_per_gpu": int(round(n_ad)),
        "base_weights_bf16": base["weights_bf16"],
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
