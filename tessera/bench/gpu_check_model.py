"""The model parts of ``tessera bench gpu-check`` (tessera/bench/gpu_check.py runs them):

3. ``te_vs_local``: a small model (QK-norm, swin and non-swin) with the Transformer Engine spec gives
   the local spec's logits and gradients on the same weights (bf16 tolerance), when TE is present.
4. ``cpu_checkpoint``: a checkpoint saved by the CPU path (a subprocess that sees no GPU) loads on the
   GPU with the same fp32 logits.
5. ``train``: ``tessera train`` in bf16 for a few steps (subprocesses): loss finite and falling; peak
   memory, tokens/s, MFU, host syncs per step; then resume, and SIGTERM writes a checkpoint.
6. ``generate``: per-token latency at batch 1 and 8 with classifier-free guidance against the
   memory-bandwidth floor (weights read once per step / measured copy bandwidth).

Everything heavy is imported inside the parts: megatron-core, Transformer Engine and the state-dict
name map (``tessera.model.layer_names``) may be absent, and a part then says why it skipped.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from tessera.bench.gpu_check_harness import Part, Skip, rel_err

# The trainer's logging interval in the training part: steps between logged steps are the ones that
# must make at most one blocking device-to-host transfer (logged steps also fetch the metrics).
TRAIN_LOG_INTERVAL = 4


# ---- helpers -------------------------------------------------------------------------------------
def _model_config(fields: dict, **extra):
    from tessera.model.config import ModelConfig

    return ModelConfig(**{**fields, "hidden_dropout": 0.0, "attention_dropout": 0.0, **extra})


def _subprocess_env(p: Part, **extra: str) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    if p.ctx.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _tail(path: Path, n: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip().replace("\n", " | ")
    except OSError:
        return ""


# ---- part 3: Transformer Engine spec vs local spec -------------------------------------------------
def part_te_vs_local(p: Part) -> None:
    import torch

    from tessera.model.chameleon import build_model
    from tessera.model.parallel import ensure_single_process
    from tessera.model.spec import te_status

    dry = p.ctx.dry_run
    te = te_status()
    if not dry and not te.available:
        raise Skip(f"the Transformer Engine spec cannot run here: {te.reason}")
    try:
        names = importlib.import_module("tessera.model.layer_names")
    except ModuleNotFoundError as exc:
        if not dry:
            raise Skip(f"tessera.model.layer_names (the local <-> TE name map) is missing: {exc}") from None
        names = None
    if dry:
        p.note(dry_run="Transformer Engine absent: the local spec on both sides with the identity name map "
                       "(exercises this part's code, compares nothing new)")
    use_te = not dry
    to_te = names.to_te_names if use_te else dict
    to_local = names.to_local_names if use_te else dict
    ensure_single_process()
    b, s = p.ctx.sizes.layer_tokens
    for swin in (False, True):
        p.need(15, f"the swin={swin} comparison")
        cfg = _model_config(p.ctx.sizes.layer_model, swin_norm=swin, params_dtype="bfloat16")
        local = build_model(cfg, pre_process=True, post_process=True, init_seed=11, use_te=False).to(p.ctx.device)
        other = build_model(cfg, pre_process=True, post_process=True, use_te=use_te).to(p.ctx.device)
        tag = f"swin_norm={swin}"
        try:  # every TE parameter gets a local weight; TE's _extra_state entries keep their own values
            names.load_weights(other, to_te(local.state_dict())) if names is not None else \
                other.load_state_dict(local.state_dict())
            mapped, why = True, ""
        except ValueError as exc:
            mapped, why = False, str(exc)
        p.check(f"{tag}: local weights map onto every TE parameter", mapped, **({"error": why[:300]} if why else {}))
        g = torch.Generator(device="cpu").manual_seed(5)
        ids = torch.randint(0, cfg.vocab_size, (b, s + 1), generator=g).to(p.ctx.device)
        out = {}
        for name, model in (("local", local), ("te", other)):
            model.train()
            pos = torch.arange(s, device=p.ctx.device).expand(b, s)
            logits = model(ids[:, :-1], pos, None)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
            loss.backward()
            grads = {k: v.grad.float() for k, v in model.named_parameters() if v.grad is not None}
            out[name] = (logits.detach().float(), grads)
        (l_logits, l_grads), (t_logits, t_grads) = out["local"], out["te"]
        t_grads = to_local(t_grads)
        common = sorted(set(l_grads) & set(t_grads))
        worst = max((rel_err(t_grads[k], l_grads[k]), k) for k in common) if common else (float("inf"), "")
        p.check(f"{tag}: logits equal (bf16)", rel_err(t_logits, l_logits) < 2e-2,
                logits_rel_err=rel_err(t_logits, l_logits), limit=2e-2)
        p.check(f"{tag}: gradients equal (bf16)", len(common) == len(l_grads) and worst[0] < 5e-2,
                grads_compared=len(common), grads_local=len(l_grads), worst_rel_err=worst[0], worst_param=worst[1],
                limit=5e-2)
        del local, other, out


# ---- part 4: a CPU-saved checkpoint on the GPU ----------------------------------------------------------
def save_cpu_reference(work: str, fields_json: str) -> None:
    """Run in a subprocess that sees no GPU: build a model through the CPU path, save it with
    save_model_checkpoint, and write its fp32 logits on fixed tokens (WORK/reference.pt)."""
    import torch

    from tessera.model.chameleon import build_model
    from tessera.model.checkpoint import save_model_checkpoint
    from tessera.model.cpu import is_cpu_compat_enabled
    from tessera.model.parallel import ensure_single_process

    if torch.cuda.is_available():
        raise SystemExit("save_cpu_reference must run without a GPU (CUDA_VISIBLE_DEVICES='')")
    ensure_single_process()
    cfg = _model_config(json.loads(fields_json), params_dtype="float32")
    model = build_model(cfg, pre_process=True, post_process=True, init_seed=7).eval()
    save_model_checkpoint(model, cfg, Path(work) / "ckpt", step=0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, min(64, cfg.seq_length)), generator=g)
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1]).expand_as(ids), None).float()
    torch.save({"ids": ids, "logits": logits, "cpu_compat": is_cpu_compat_enabled()}, Path(work) / "reference.pt")


def part_cpu_checkpoint(p: Part) -> None:
    import torch

    from tessera.model.api import load

    work = p.ctx.out / "cpu_checkpoint"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    code = ("from tessera.bench.gpu_check_model import save_cpu_reference; "
            f"save_cpu_reference({str(work)!r}, {json.dumps(json.dumps(p.ctx.sizes.ckpt_model))})")
    log = work / "save.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-c", code], env=_subprocess_env(p, CUDA_VISIBLE_DEVICES=""),
                              stdout=f, stderr=subprocess.STDOUT, timeout=max(30.0, p.time_left() - 15))
    if proc.returncode != 0:
        raise RuntimeError(f"the CPU save exited {proc.returncode}: {_tail(log)}")
    ref = torch.load(work / "reference.pt")
    p.check("the saving process ran the CPU path", bool(ref["cpu_compat"]), cpu_compat=ref["cpu_compat"])
    model = load(work / "ckpt", device=p.ctx.device)
    p.check(f"the model loads onto {p.ctx.device}",
            all(t.device.type == p.ctx.device for t in model.module.parameters()))
    got = model.logits(ref["ids"]).float().cpu()
    err = rel_err(got, ref["logits"])
    p.check("same fp32 logits as the CPU that saved it", err < 1e-4, logits_rel_err=err, limit=1e-4,
            max_abs_diff=float((got - ref["logits"]).abs().max()))
    del model


# ---- part 5: tessera train --------------------------------------------------------------------------
def _train_config(p: Part, run: Path) -> Path:
    import yaml

    s = p.ctx.sizes
    micro, global_ = s.train_batch
    cfg = {
        "model": {**s.train_model, "hidden_dropout": 0.0, "attention_dropout": 0.0},
        "parallel": {"tp": 1, "pp": 1, "micro_batch_size": micro, "global_batch_size": global_},
        "data": {"path": "", "seq_length": s.train_model["seq_length"], "seed": 1234},
        "optim": {"lr": 1.0e-3, "min_lr": 1.0e-4, "warmup": 2, "decay_style": "cosine"},
        "train": {"steps": s.train_steps, "log_interval": TRAIN_LOG_INTERVAL, "eval_interval": 0, "eval_steps": 1,
                  "save_interval": 100000, "keep_last_n": 1, "run_dir": str(run)},
        "precision": "fp32" if p.ctx.dry_run else "bf16",
    }
    path = p.ctx.out / "train_config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            rows.append(json.loads(line))
    return rows


def _train(p: Part, cmd: list[str], log: Path, timeout: float) -> int:
    with open(log, "w") as f:
        try:
            return subprocess.run(cmd, env=_subprocess_env(p, TESSERA_COUNT_SYNCS="1"), stdout=f,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return -999


def part_train(p: Part) -> None:
    run = p.ctx.out / "train_run"
    shutil.rmtree(run, ignore_errors=True)
    config = _train_config(p, run)
    n = p.ctx.sizes.train_steps
    base = [sys.executable, "-m", "tessera.pretrain", "--config", str(config)]
    p.note(model=p.ctx.sizes.train_model, micro_global_batch=p.ctx.sizes.train_batch, run_dir=str(run))

    # A: n steps from scratch
    log = p.ctx.out / "train_a.log"
    rc = _train(p, base, log, timeout=max(30.0, p.time_left() - 70))  # leave time for the resume and SIGTERM runs
    rows = _metrics(run)
    if not p.check(f"{n} steps run ({'fp32 on the CPU' if p.ctx.dry_run else 'bf16'})", rc == 0 and len(rows) == n,
                   exit=rc, rows=len(rows),
                   log_tail=_tail(log) if rc else ""):
        return
    _train_numbers(p, rows)

    # B: resume from the step-n checkpoint to n + 3
    p.need(30, "the resume run")
    rc = _train(p, base + ["--train.steps", str(n + 3)], p.ctx.out / "train_b.log", timeout=max(30.0, p.time_left() - 35))
    rows = _metrics(run)
    steps = [r["step"] for r in rows]
    p.check("resumes from the checkpoint: steps 1..n then n+1..n+3", rc == 0 and steps == list(range(1, n + 4)),
            exit=rc, steps_logged=len(steps), last_step=steps[-1] if steps else None,
            checkpoint=(run / "checkpoints" / f"step_{n + 3:07d}").is_dir())

    # C: SIGTERM mid-run writes a checkpoint and exits 0
    p.need(30, "the SIGTERM run")
    _sigterm(p, base + ["--train.steps", str(n + 100000)], run, after_step=n + 5)


def _train_numbers(p: Part, rows: list[dict]) -> None:
    losses = [r.get("loss") for r in rows]
    finite = all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses)
    k = max(1, len(losses) // 4)
    first, last = (statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])) if finite else (None, None)
    p.check("loss finite at every step", finite, first_loss=losses[0], last_loss=losses[-1])
    p.check("loss falling (mean of the first quarter > mean of the last)", finite and last < first,
            first_quarter=first, last_quarter=last)
    timed = rows[2:] or rows  # the first steps include compilation and allocator warm-up
    for key in ("tokens_per_s", "mfu", "step_seconds"):
        vals = [r[key] for r in timed if isinstance(r.get(key), (int, float))]
        p.note(**{f"{key}_median": statistics.median(vals) if vals else "not reported"})
    peaks = [r["peak_mem_gib"] for r in rows if isinstance(r.get("peak_mem_gib"), (int, float))]
    p.note(peak_mem_gib=max(peaks) if peaks else "not reported")
    syncs = [(r["step"], r["host_syncs"]) for r in rows if isinstance(r.get("host_syncs"), (int, float))]
    if not syncs:
        p.note(host_syncs_per_step="not reported (TESSERA_COUNT_SYNCS=1 set; this trainer does not count)")
        return
    quiet = [v for step, v in syncs if step % TRAIN_LOG_INTERVAL and step > 1]
    logged = [v for step, v in syncs if not step % TRAIN_LOG_INTERVAL or step == 1]
    p.note(host_syncs_logged_steps_max=max(logged) if logged else None)
    p.check("at most one blocking device-to-host transfer per step between logged steps",
            bool(quiet) and max(quiet) <= 1, host_syncs_max=max(quiet) if quiet else None,
            host_syncs_median=statistics.median(quiet) if quiet else None)


def _sigterm(p: Part, cmd: list[str], run: Path, after_step: int) -> None:
    log = p.ctx.out / "train_c.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=_subprocess_env(p, TESSERA_COUNT_SYNCS="1"), stdout=f, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + max(20.0, p.time_left() - 30)
            while time.monotonic() < deadline and proc.poll() is None:
                if any(r.get("step", 0) >= after_step for r in _metrics(run)):
                    break
                time.sleep(0.5)
            if proc.poll() is not None:
                p.check("SIGTERM run reached its step", False, exit=proc.returncode, log_tail=_tail(log))
                return
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=max(20.0, p.time_left() - 5))
            except subprocess.TimeoutExpired:
                rc = None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text(errors="replace")
    latest = (run / "checkpoints" / "latest")
    name = latest.read_text().strip() if latest.exists() else ""
    saved = name and (run / "checkpoints" / name / "tessera.json").is_file()
    step = int(name.split("_")[-1]) if name.startswith("step_") else None
    p.check("SIGTERM: checkpoint written, exit 0", rc == 0 and "SIGTERM: saved" in text and bool(saved)
            and step is not None and step >= after_step, exit=rc, latest=name, log_tail="" if rc == 0 else _tail(log))


# ---- part 6: generation latency -------------------------------------------------------------------------
def _vocabulary(vocab_size: int, per_image: int):
    from tessera.tokenizers.vocab import SPECIAL_TOKENS, Vocabulary

    codes = min(8192, vocab_size // 4)
    return Vocabulary(num_text_tokens=vocab_size - len(SPECIAL_TOKENS) - codes, num_image_codes=codes,
                      image_tokens_per_image=per_image, pad_to_multiple_of=128)


def part_generate(p: Part) -> None:
    import torch

    from tessera.bench.machine import measure_copy_gbps
    from tessera.generate.config import GenerationConfig, SamplingParams
    from tessera.generate.engine import GenerationEngine
    from tessera.model.chameleon import build_model
    from tessera.model.parallel import ensure_single_process

    s = p.ctx.sizes
    ensure_single_process()
    cfg = _model_config(s.gen_model, params_dtype="bfloat16")
    model = build_model(cfg, pre_process=True, post_process=True, init_seed=3).to(p.ctx.device).eval()
    # image mode decodes one whole image: <boi> forced, s.gen_tokens guided codes (conditional +
    # unconditional streams), then <eoi>
    vocab = _vocabulary(cfg.vocab_size, per_image=s.gen_tokens)
    engine = GenerationEngine(model, vocab, cfg.seq_length, dtype="bfloat16")
    gen = GenerationConfig(mode="image", max_new_tokens=s.gen_tokens + 1, cfg_scale=3.0, seed=0,
                           image=SamplingParams(temperature=1.0, top_k=100, top_p=0.9))
    g = torch.Generator().manual_seed(0)
    weight_bytes = sum(t.numel() * t.element_size() for name, t in model.named_parameters() if "embedding" not in name)
    gbps = measure_copy_gbps(device=p.ctx.device, seconds=0.3)
    floor_ms = weight_bytes / (gbps * 1e9) * 1e3
    p.note(params_m=sum(t.numel() for t in model.parameters()) / 1e6, weight_bytes_per_step=weight_bytes,
           copy_gbps=gbps, floor_ms_per_step=floor_ms)

    def run(batch: int):
        prompts = [[vocab.bos_id] + torch.randint(vocab.text_offset, vocab.image_offset, (31,), generator=g).tolist()
                   for _ in range(batch)]
        res, stats = engine.generate(prompts, gen)
        # decode steps after the first token (the engine times them on the host, after each step's tokens
        # reached it)
        first = stats.time_to_first_token_s - stats.prefill_s
        return (stats.decode_s - first) / max(1, stats.steps - 1) * 1e3, stats.time_to_first_token_s * 1e3, res

    for batch in s.gen_batches:
        p.need(15, f"generation at batch {batch}")
        run(batch)  # warm-up: allocations, kernel compiles
        per_token, ttft, res = min((run(batch) for _ in range(2)), key=lambda r: r[0])
        codes = [r.new_ids[:-1] for r in res]
        p.check(f"batch {batch} with CFG: an image of {s.gen_tokens} codes per prompt, then <eoi>",
                all(r.finish_reason == "image" and r.new_ids[-1] == vocab.eoi_id for r in res)
                and all(len(c) == s.gen_tokens and all(vocab.image_offset <= t < vocab.size for t in c) for c in codes),
                per_token_ms=per_token, ratio_to_floor=per_token / floor_ms, time_to_first_token_ms=ttft)
