"""``tessera demo``: the whole system end to end on the built-in synthetic corpus.

synth corpus -> text tokenizer -> VQ image tokenizer -> pretokenize -> pretrain (``tessera train``,
same code path, in a subprocess) -> generate from held-out prompts and score them -> fine-tune it on
question answering, full and LoRA (tessera.demo.finetune) -> report.html.

Each stage lives in ``OUT/<stage>/`` and is skipped on re-run once its ``stage.json`` marker exists
(``tessera.demo.stages``). The stage functions only call the other packages' public APIs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tessera.config import save_config, to_dict
from tessera.demo.config import DemoConfig
from tessera.demo.stages import Stage, StageRunner, write_json_atomic
from tessera.utils import atomic_path

STAGES = ("synth", "text_tokenizer", "image_tokenizer", "pretokenize", "train", "evaluate", "finetune", "report")


class DemoError(RuntimeError):
    pass


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def resolve_path(p: str | Path) -> Path:
    """A path as given (relative to the working directory) or, failing that, relative to the repo root,
    so ``tessera demo`` finds configs/demo.yaml from any directory."""
    p = Path(p)
    if p.is_absolute() or p.exists():
        return p.resolve()
    alt = repo_root() / p
    if alt.exists():
        return alt
    raise DemoError(f"{p}: not found (looked in {Path.cwd()} and {repo_root()})")


@dataclasses.dataclass
class Paths:
    out: Path

    def stage(self, name: str) -> Path:
        return self.out / name

    @property
    def synth(self) -> Path:
        return self.stage("synth")

    @property
    def text_model(self) -> Path:
        return self.stage("text_tokenizer") / "text.model"

    @property
    def image_tokenizer(self) -> Path:
        return self.stage("image_tokenizer")

    @property
    def pretok_train(self) -> Path:
        return self.stage("pretokenize") / "train"

    @property
    def pretok_heldout(self) -> Path:
        return self.stage("pretokenize") / "heldout"

    @property
    def run_dir(self) -> Path:
        return self.stage("train") / "run"

    def shards(self, split: str) -> list[str]:
        manifest = json.loads((self.synth / "synth.json").read_text())
        return [str(self.synth / name) for name in manifest[f"{split}_shards"]]


# ---- stages ---------------------------------------------------------------------------------------
def stage_synth(cfg: DemoConfig, paths: Paths, d: Path) -> dict:
    from tessera.data.synth import write_synth

    m = write_synth(d, docs=cfg.train_docs, image_size=cfg.image_size, seed=cfg.seed, shard_size=cfg.shard_size,
                    heldout_docs=cfg.heldout_docs, mix=cfg.doc_mix or None)
    return {"train_docs": m["docs"], "heldout_docs": m["heldout_docs"], "image_size": m["image_size"], "mix": m["mix"],
            "train_shards": len(m["train_shards"]), "heldout_shards": len(m["heldout_shards"])}


def stage_text_tokenizer(cfg: DemoConfig, paths: Paths, d: Path) -> dict:
    from tessera.tokenizers.text_train import train_text_tokenizer

    tok = train_text_tokenizer(paths.shards("train"), d / "text", vocab_size=cfg.text_vocab_size, seed=cfg.seed)
    return {"model": str(paths.text_model), "vocab_size": tok.vocab_size}


def stage_image_tokenizer(cfg: DemoConfig, paths: Paths, d: Path) -> dict:
    from tessera.tokenizers.image_train import load_train_config, train_image_tokenizer

    overrides = {"vq.image_size": str(cfg.image_size), "train.seed": str(cfg.seed), **cfg.vq_overrides}
    tcfg = load_train_config(preset=cfg.vq_preset, overrides=overrides)
    tcfg.data = paths.shards("train")
    tcfg.out = str(d)
    save_config(tcfg, d / "train_config.yaml")
    r = train_image_tokenizer(tcfg)
    facts = {"steps": r.steps, "train_seconds": r.seconds, "psnr": r.psnr, "codebook_usage": r.codebook_usage,
             "tokens_per_image": tcfg.vq.tokens_per_image, "codebook_size": tcfg.vq.codebook_size}
    # the ceiling right away (the evaluate stage measures it again beside the model's scores): a tokenizer
    # that loses the shapes shows here, before minutes of pretraining
    from tessera.data.synth import caption_image_pairs
    from tessera.demo.evaluate import ceiling_scores, code_entropy, reconstruction_rows
    from tessera.tokenizers.image import ImageTokenizer

    pairs = caption_image_pairs(paths.shards("heldout"), limit=2 * cfg.eval_prompts)
    tok = ImageTokenizer.load(d)
    ceiling = ceiling_scores(reconstruction_rows(tok, pairs))
    facts["heldout_ceiling"] = {k: ceiling[k] for k in ("n", "colour", "shape", "colour_shape", "size", "psnr")}
    # and how predictable its codes are: what the language model must learn beyond the caption
    facts["code_entropy_nats"] = code_entropy(tok, cfg.image_size, seed=cfg.seed)
    return facts


def stage_pretokenize(cfg: DemoConfig, paths: Paths, d: Path) -> dict:
    from tessera.data.pretokenize import PretokenizeOptions, pretokenize

    out = {}
    options = PretokenizeOptions(make_vocab_size_divisible_by=cfg.make_vocab_size_divisible_by)
    for split, target in (("train", paths.pretok_train), ("heldout", paths.pretok_heldout)):
        stats = pretokenize(paths.shards(split), target, str(paths.text_model), str(paths.image_tokenizer),
                            workers=cfg.pretokenize_workers, options=options, overwrite=True)
        out[split] = {k: stats.get(k) for k in ("documents", "text_tokens", "image_tokens", "special_tokens", "skipped")}
    return out


def train_command(cfg: DemoConfig, paths: Paths) -> list[str]:
    """``tessera train`` exactly as a user would run it, plus the demo's paths and sizes as overrides."""
    config = resolve_path(cfg.train_config)
    overrides = {
        "data.path": str(paths.pretok_train),
        "data.eval_path": str(paths.pretok_heldout),  # held-out loss / perplexity during training
        "train.run_dir": str(paths.run_dir),
        # the demo's seed is the training seed too (initialisation, data order): --seeds varies all of them
        "train.seed": str(cfg.seed),
        "data.seed": str(cfg.seed),
        **cfg.train_overrides,
    }
    argv = [sys.executable, "-m", "tessera", "train", "--config", str(config)]
    for k, v in overrides.items():
        argv += [f"--{k}", str(v)]
    return argv


def install_tokenizers(paths: Paths) -> Path:
    """Copy the tokenizers into ``RUN/tokenizers/`` where ``tessera generate`` looks for them
    (docs/generation.md), so ``tessera generate --checkpoint OUT/train/run`` works as it is."""
    from tessera.tokenizers.image import CONFIG_FILE, WEIGHTS_FILE

    dst = paths.run_dir / "tokenizers"
    (dst / "image").mkdir(parents=True, exist_ok=True)
    for src, to in ((paths.text_model, dst / "text.model"),
                    (paths.image_tokenizer / CONFIG_FILE, dst / "image" / CONFIG_FILE),
                    (paths.image_tokenizer / WEIGHTS_FILE, dst / "image" / WEIGHTS_FILE)):
        with atomic_path(to) as tmp:
            shutil.copyfile(src, tmp)
    return dst


def stage_train(cfg: DemoConfig, paths: Paths, d: Path) -> dict:
    import importlib.util

    if importlib.util.find_spec("tessera.pretrain.cli") is None:
        raise DemoError("`tessera train` (tessera/pretrain/cli.py) is not installed in this tree yet: "
                        "the demo stops before pretraining; stages done so far are kept")
    install_tokenizers(paths)
    argv = train_command(cfg, paths)
    (d / "command.txt").write_text(" ".join(argv) + "\n")
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    # resumable: a killed demo re-runs this command and `tessera train` continues from its latest checkpoint
    proc = subprocess.run(argv, env=env, cwd=str(repo_root()))
    if proc.returncode != 0:
        raise DemoError(f"tessera train failed with exit code {proc.returncode}: {' '.join(argv)}")
    return {"command": argv, "run_dir": str(paths.run_dir)}


def stage_evaluate(cfg: DemoConfig, paths: Paths, d: Path) -> dict:
    from tessera.demo.evaluate import evaluate

    return evaluate(cfg, paths, d)


def stage_finetune(cfg: DemoConfig, paths: Paths, d: Path) -> dict:
    from tessera.demo.finetune import FinetuneError
    from tessera.demo.finetune import stage_finetune as run

    try:
        return run(cfg, paths, d)
    except FinetuneError as exc:
        raise DemoError(str(exc)) from exc


def stage_report(cfg: DemoConfig, paths: Paths, d: Path) -> dict:
    from tessera.demo.report import write_report

    return write_report(cfg, paths, d)


STAGE_FUNCS = {
    "synth": (stage_synth, False, "synthetic interleaved corpus (train + held-out shards)"),
    "text_tokenizer": (stage_text_tokenizer, False, "sentencepiece BPE on the training text"),
    "image_tokenizer": (stage_image_tokenizer, True, "VQ image tokenizer (resumes from its checkpoints)"),
    "pretokenize": (stage_pretokenize, False, "documents -> unified-vocabulary indexed datasets"),
    "train": (stage_train, True, "pretraining with `tessera train` (resumes from its latest checkpoint)"),
    "evaluate": (stage_evaluate, False, "generate from held-out prompts and score text->image / image->text"),
    "finetune": (stage_finetune, False, "question answering: full and LoRA fine-tuning of the pretrained model"),
    "report": (stage_report, False, "report.html"),
}


def run_demo(cfg: DemoConfig, out: str | Path, stop_after: str | None = None) -> dict:
    """Run (or finish) the demo into ``out``; ``stop_after`` ends it after that stage (experiments)."""
    if stop_after is not None and stop_after not in STAGES:
        raise DemoError(f"--stop-after {stop_after!r}: not a stage; stages: {', '.join(STAGES)}")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    saved = out / "demo_config.yaml"
    if saved.is_file():
        import yaml

        old = yaml.safe_load(saved.read_text()) or {}
        diff = sorted(k for k, v in to_dict(cfg).items() if old.get(k) != v and k != "budget_s")
        if diff:
            raise DemoError(f"{out} was made with a different demo config (differs in {diff}); "
                            f"use another --out or delete {out}")
    save_config(cfg, saved)
    paths = Paths(out)
    runner = StageRunner(out, budget_s=cfg.budget_s)
    for i, name in enumerate(STAGES, 1):
        fn, resumable, desc = STAGE_FUNCS[name]
        runner.run(Stage(name, lambda d, fn=fn: fn(cfg, paths, d), resumable, desc), i, len(STAGES))
        if name == stop_after:
            break
    summary = {"out": str(out), "stages": runner.results}
    write_json_atomic(out / "demo_summary.json", summary)
    return summary
