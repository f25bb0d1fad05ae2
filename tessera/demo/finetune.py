"""The demo's fine-tuning stage: visual question answering on the synthetic corpus, a format pretraining
never saw.

* Data: scenes drawn by the corpus' own generator (``tessera.data.synth.random_scene`` / ``render_scene``)
  with seeds of their own, so neither split repeats a pretraining or held-out draw. Each image gets up to
  questions whose answers the scene itself fixes (``qa_pairs``): ``How many shapes are there?`` ->
  ``one`` / ``two``; ``What colour is the <shape>?`` (asked only when one object has that shape) -> the
  colour; ``What shape is the <colour> one?`` (only when one object has that colour) -> the shape. They are
  written as conversations, one question each (``OUT/finetune/qa/{train,eval}.jsonl`` + PNGs,
  docs/finetuning.md), and the training split is pretokenized with ``--loss-on assistant`` by
  ``tessera.data.pretokenize``: only the one-word answer and its END are targets.
* Training: the pretrained checkpoint fine-tuned twice by ``tessera train`` (the pretraining run's saved
  config, ``train.init_from`` = that run, document-masked packing): all parameters, and LoRA.
  Budgets are in steps (``FinetuneSettings``).
* Evaluation: held-out images, every question scored by likelihood ranking of its candidate answers
  (``tessera.demo.protocol.rank_continuations``): the prompt is the user turn through the chat template
  up to the open assistant header (``format_chat(..., add_generation_prompt=True)``), a candidate is the
  answer and END exactly as training documents hold them. Accuracy = the true answer ranked strictly
  first; chance = 1 / candidates (1/2 for counts, 1/6 for colours and shapes); each with its binomial
  standard error. The pretrained model is prompted the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.data.synth import COLOURS, SHAPES, Scene, random_scene, render_scene
from tessera.demo.protocol import rank_continuations, stderr
from tessera.demo.stages import write_json_atomic, write_text_atomic

COUNT_WORDS = ("one", "two")
KINDS = ("count", "colour", "shape")
CANDIDATES: dict[str, tuple[str, ...]] = {"count": COUNT_WORDS, "colour": tuple(COLOURS), "shape": SHAPES}
# scene seeds of their own: seed * 1_000_003 + offset + index never meets the corpus' document draws
# (tessera.data.synth.document_rng: seed * 1_000_000_007 + index, held-out seed + 7919)
TRAIN_OFFSET, EVAL_OFFSET = 104_729, 1_299_709
MODELS = ("pretrained", "full", "lora")


@dataclass(frozen=True)
class QA:
    kind: str  # count | colour | shape
    question: str
    answer: str

    @property
    def candidates(self) -> tuple[str, ...]:
        return CANDIDATES[self.kind]


@dataclass
class FinetuneSettings:
    """Sizes and budgets (in optimizer steps) of the stage, per demo preset."""

    train_images: int = 1500  # one conversation per question, up to 3 an image
    eval_images: int = 100  # ~270 questions: standard errors of about 3 points
    steps: int = 110  # per fine-tune (full and LoRA); rows of the model's sequence length
    global_batch_size: int = 8
    # two micro-batches of 4 rows: the same update as one of 8, in less time per step at 512 tokens a row
    # (docs/benchmarks.md, "The demo: fine-tuning")
    micro_batch_size: int = 4
    # a fine-tune starts from a model that never saw the chat markers (answer CE ~14 at step 1); at 2e-3
    # it overwrote what the base reads from images: colour stayed near chance, where 3e-4 learns it
    # (docs/benchmarks.md, "The demo: fine-tuning")
    full_lr: float = 3e-4
    # Adam moves every element of A and B by about lr, and B A sums rank such terms times alpha / rank: at
    # this model's weight scale (~0.02) 3e-3 and more overwrite the base and stall. Rank 64 (a quarter of
    # the hidden size) learns in this budget what rank 16 and 32 do not
    lora_lr: float = 1e-3
    lora_rank: int = 64
    lora_alpha: float = 128.0
    lora_targets: tuple[str, ...] = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", "output_layer")
    warmup: int = 4


SETTINGS: dict[str, FinetuneSettings] = {
    "full": FinetuneSettings(),
    "fast": FinetuneSettings(train_images=24, eval_images=8, steps=3, global_batch_size=4, micro_batch_size=2,
                             warmup=1, lora_rank=8, lora_alpha=16.0),  # the tiny model: hidden size 64
}


def settings_for(preset: str) -> FinetuneSettings:
    return dataclasses.replace(SETTINGS.get(preset, SETTINGS["full"]))


# ---- questions -----------------------------------------------------------------------------------
def qa_pairs(scene: Scene) -> list[QA]:
    """Every question of the three kinds the scene answers unambiguously, with its answer."""
    objs = scene.objects
    out = [QA("count", "How many shapes are there?", COUNT_WORDS[len(objs) - 1])]
    for o in objs:
        if sum(p.shape == o.shape for p in objs) == 1:
            out.append(QA("colour", f"What colour is the {o.shape}?", o.colour))
    for o in objs:
        if sum(p.colour == o.colour for p in objs) == 1:
            out.append(QA("shape", f"What shape is the {o.colour} one?", o.shape))
    return out


def scenes(seed: int, offset: int, n: int) -> list[Scene]:
    return [random_scene(random.Random(seed * 1_000_003 + offset + i)) for i in range(n)]


def pick_questions(scene: Scene, rng: random.Random) -> list[QA]:
    """One question of each kind the scene answers (a two-object scene has two colour questions: one is
    drawn), so every image weighs the same."""
    by_kind: dict[str, list[QA]] = {}
    for q in qa_pairs(scene):
        by_kind.setdefault(q.kind, []).append(q)
    return [rng.choice(by_kind[k]) for k in KINDS if k in by_kind]


def conversation(image_ref: Any, qa: QA, key: str) -> dict:
    """A record of the conversations format: user = image + question, assistant = the one-word answer."""
    return {"id": key, "source": f"qa/{qa.kind}", "messages": [
        {"role": "user", "content": [{"type": "image", "image": image_ref}, {"type": "text", "text": qa.question}]},
        {"role": "assistant", "content": [{"type": "text", "text": qa.answer}]}]}


def write_qa_split(d: Path, name: str, scene_list: Sequence[Scene], image_size: int, seed: int) -> tuple[Path, list[dict]]:
    """``d/NAME.jsonl`` (conversations, images as ``NAME/IIIIII.png`` beside it) and the rows
    ``{image, kind, question, answer}`` it holds: one conversation per question, one question of each kind
    an image answers. Never several questions about one image in one conversation: the questions name the
    attributes the others ask for (``What colour is the square?`` answers ``What shape is the red one?``)."""
    rng = random.Random(seed)
    (d / name).mkdir(parents=True, exist_ok=True)
    lines, rows = [], []
    for i, scene in enumerate(scene_list):
        rel = f"{name}/{i:06d}.png"
        render_scene(scene, image_size).save(d / rel)
        for qa in pick_questions(scene, rng):
            lines.append(json.dumps(conversation(rel, qa, f"{name}-{i:06d}-{qa.kind}")) + "\n")
            rows.append({"image": rel, "kind": qa.kind, "question": qa.question, "answer": qa.answer})
    path = d / f"{name}.jsonl"
    write_text_atomic(path, "".join(lines))
    return path, rows


# ---- fine-tuning ---------------------------------------------------------------------------------
def finetune_command(cfg, paths, s: FinetuneSettings, data: Path, run_dir: Path, lora: bool) -> list[str]:
    """``tessera train`` as a user would fine-tune: the pretraining run's saved config (the same model,
    precision and sequence length), from its weights (``train.init_from``), on the QA data."""
    from tessera.model.checkpoint import read_model_config, resolve_checkpoint

    lr = s.lora_lr if lora else s.full_lr
    # rows as long as the model allows: packing cuts a conversation at a row's end (its rest trains without
    # the image), so the fewer rows, the fewer cut conversations
    seq = read_model_config(resolve_checkpoint(paths.run_dir)).seq_length
    overrides = {
        "train.init_from": str(paths.run_dir),
        "data.path": str(data),
        "data.seq_length": str(seq),
        "data.eval_path": "",
        "data.document_mask": "true",  # a conversation never attends to the one packed before it
        "train.run_dir": str(run_dir),
        "train.steps": str(s.steps),
        "train.save_interval": str(s.steps),
        "train.eval_interval": "0",
        "parallel.global_batch_size": str(s.global_batch_size),
        "parallel.micro_batch_size": str(s.micro_batch_size),
        "optim.lr": str(lr),
        "optim.min_lr": str(lr / 10),
        "optim.warmup": str(s.warmup),
    }
    if lora:
        overrides.update({"finetune.lora.rank": str(s.lora_rank), "finetune.lora.alpha": str(s.lora_alpha),
                          "finetune.lora.targets": ",".join(s.lora_targets)})
    argv = [sys.executable, "-m", "tessera", "train", "--config", str(paths.run_dir / "config.yaml")]
    for k, v in overrides.items():
        argv += [f"--{k}", str(v)]
    return argv


class FinetuneError(RuntimeError):
    """A fine-tune failed (``tessera demo`` reports it as its one-line DemoError)."""


def run_finetune(argv: list[str], log: Path) -> None:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    repo = Path(__file__).resolve().parents[2]  # where `tessera demo` runs `tessera train` from too
    with log.open("w") as f:
        proc = subprocess.run(argv, env=env, cwd=str(repo), stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-2000:]
        raise FinetuneError(f"fine-tuning failed with exit code {proc.returncode} (log {log}): {' '.join(argv)}\n{tail}")


# ---- evaluation ----------------------------------------------------------------------------------
def answer_ranking_inputs(rows: Sequence[dict], codes: dict[str, Any], vocab, text_tok) -> dict[str, tuple]:
    """Per kind: (prefixes, candidate lists, true indices). A prefix is the user turn through the chat
    template up to the open assistant header; a candidate is what a training document holds after it
    (the answer and END)."""
    from tessera.data.chat import ChatTemplate, format_chat

    template = ChatTemplate.for_vocabulary(vocab, text_tok)
    out: dict[str, tuple[list, list, list]] = {k: ([], [], []) for k in KINDS}
    for r in rows:
        user = {"role": "user", "content": [{"type": "image", "image": codes[r["image"]]},
                                            {"type": "text", "text": r["question"]}]}
        prefix = format_chat([user], vocab, text_tok, add_generation_prompt=True, template=template)
        cands = []
        for a in CANDIDATES[r["kind"]]:
            full = format_chat([user, {"role": "assistant", "content": a}], vocab, text_tok,
                               add_generation_prompt=False, template=template)
            assert full[: len(prefix)] == prefix and full[-1] == vocab.eos_id
            cands.append(full[len(prefix) : -1])  # the answer + END, without <eos>
        p, c, t = out[r["kind"]]
        p.append(prefix)
        c.append(cands)
        t.append(CANDIDATES[r["kind"]].index(r["answer"]))
    return out


def score_model(logits_fn, vocab, inputs: dict[str, tuple]) -> dict[str, Any]:
    """Accuracy (true answer ranked strictly first), its standard error and chance, per kind and over all
    questions."""
    out: dict[str, Any] = {}
    hits = n = 0.0
    chance = 0.0
    for k in KINDS:
        prefixes, cands, truth = inputs[k]
        if not prefixes:
            continue
        r = rank_continuations(logits_fn, prefixes, cands, truth, vocab.pad_id, vocab.size)
        out[k] = {"accuracy": r["recall_at_1"], "stderr": r["recall_at_1_stderr"], "chance": r["chance"],
                  "n": r["n"], "mean_rank": r["mean_rank"]}
        hits += r["recall_at_1"] * r["n"]
        chance += r["chance"] * r["n"]
        n += r["n"]
    acc = hits / n if n else float("nan")
    out["all"] = {"accuracy": acc, "stderr": stderr(acc, int(n)), "chance": chance / n if n else float("nan"),
                  "n": int(n)}
    return out


def _evaluate(checkpoint: Path, vocab_dir: Path, rows: list[dict], codes: dict, text_tok) -> tuple[dict, int]:
    """(scores, the model's parameter count) of one checkpoint."""
    import tessera.model as tmodel
    from tessera.tokenizers.vocab import Vocabulary

    model = tmodel.load(checkpoint)  # an adapter checkpoint: its base (SHA-checked) + adapters, merged
    vocab = model.vocab or Vocabulary.load(vocab_dir)
    result = score_model(model.logits, vocab, answer_ranking_inputs(rows, codes, vocab, text_tok))
    return result, sum(p.numel() for p in model.module.parameters())


# ---- the stage -----------------------------------------------------------------------------------
def stage_finetune(cfg, paths, d: Path) -> dict:
    """The ``finetune`` stage of ``tessera demo``: QA data, two fine-tunes, the table."""
    import time

    import torch
    from PIL import Image

    from tessera.data.pretokenize import PretokenizeOptions, pretokenize
    from tessera.tokenizers.image import ImageTokenizer
    from tessera.tokenizers.text import TextTokenizer
    from tessera.tokenizers.vocab import ImageSegment, Vocabulary

    s = settings_for(cfg.preset)
    qa_dir = d / "qa"
    train_jsonl, train_rows = write_qa_split(qa_dir, "train", scenes(cfg.seed, TRAIN_OFFSET, s.train_images),
                                             cfg.image_size, cfg.seed)
    _, eval_rows = write_qa_split(qa_dir, "eval", scenes(cfg.seed, EVAL_OFFSET, s.eval_images), cfg.image_size,
                                  cfg.seed + 1)
    data = d / "data"
    # the QA data in the pretrained model's ids: the same vocabulary, padding included
    base_vocab = Vocabulary.load(paths.pretok_train)
    options = PretokenizeOptions(loss_on="assistant", make_vocab_size_divisible_by=base_vocab.pad_to_multiple_of)
    stats = pretokenize(str(train_jsonl), data, str(paths.text_model), str(paths.image_tokenizer),
                        options=options, overwrite=True, progress=False)

    runs: dict[str, Path] = {"pretrained": paths.run_dir}
    seconds: dict[str, float] = {}
    for name, lora in (("full", False), ("lora", True)):
        runs[name] = d / name
        argv = finetune_command(cfg, paths, s, data, runs[name], lora)
        (d / f"{name}_command.txt").write_text(" ".join(argv) + "\n")
        t0 = time.perf_counter()
        run_finetune(argv, d / f"{name}.log")
        seconds[name] = round(time.perf_counter() - t0, 2)

    text_tok = TextTokenizer.load(paths.text_model)
    image_tok = ImageTokenizer.load(paths.image_tokenizer)
    images = sorted({r["image"] for r in eval_rows})
    enc = image_tok.encode([Image.open(qa_dir / p).convert("RGB") for p in images]) if images else torch.empty(0)
    codes = {p: ImageSegment.from_tensor(enc[i]) for i, p in enumerate(images)}
    torch.manual_seed(cfg.seed)
    scores, params = {}, 0
    for name in MODELS:
        scores[name], params = _evaluate(runs[name], paths.pretok_train, eval_rows, codes, text_tok)
    result = {
        "scores": scores,
        # full fine-tuning trains every parameter of the model; LoRA: the trainer's own count of its adapters
        "trainable_parameters": {"full": params, "lora": _trainable(d / "lora.log")},
        "train_seconds": seconds,
        "settings": dataclasses.asdict(s),
        "data": {"train_conversations": len(train_rows), "train_images": s.train_images,
                 "eval_questions": len(eval_rows), "eval_images": s.eval_images,
                 "target_tokens": stats.get("target_tokens"), "documents": stats.get("documents")},
        "protocol": "likelihood ranking of the candidate answers after the chat template's open assistant turn; "
                    "accuracy = true answer ranked strictly first",
    }
    write_json_atomic(d / "scores.json", result)
    write_text_atomic(d / "table.md", markdown_table(result))
    return {"accuracy": {m: scores[m]["all"]["accuracy"] for m in MODELS},
            "chance": scores["pretrained"]["all"]["chance"], "eval_questions": len(eval_rows),
            "train_conversations": len(train_rows), "train_seconds": seconds}


def _trainable(log: Path) -> int | None:
    """The trainer's own count from its log line ``fine-tuning: ...; trainable parameters N of M (p%)``."""
    for line in log.read_text().splitlines() if log.is_file() else []:
        if "trainable parameters" in line:
            return int(line.split("trainable parameters", 1)[1].split()[0].replace(",", ""))
    return None


# ---- the table -----------------------------------------------------------------------------------
LABELS = {"pretrained": "pretrained (no fine-tuning)", "full": "full fine-tuning", "lora": "LoRA"}


def _cell(x: dict | None) -> str:
    if not x or x.get("accuracy") != x.get("accuracy"):
        return "-"
    return f"{100 * x['accuracy']:.1f}% +- {100 * x['stderr']:.1f}"


def markdown_table(result: dict) -> str:
    sc = result["scores"]
    first = sc["pretrained"]
    lines = ["| model | " + " | ".join(KINDS) + " | all |", "|---|" + "---|" * (len(KINDS) + 1)]
    for m in MODELS:
        lines.append(f"| {LABELS[m]} | " + " | ".join(_cell(sc[m].get(k)) for k in (*KINDS, "all")) + " |")
    lines.append("| chance | " + " | ".join(f"{100 * first[k]['chance']:.1f}%" if k in first else "-"
                                          for k in (*KINDS, "all")) + " |")
    lines.append("| questions | " + " | ".join(str(first[k]["n"]) if k in first else "0" for k in (*KINDS, "all"))
                 + " |")
    return "\n".join(lines) + "\n"


def report_section(out: Path) -> str:
    """The report's fine-tuning table (empty when the stage has not run)."""
    path = Path(out) / "finetune" / "scores.json"
    if not path.is_file():
        return ""
    result = json.loads(path.read_text())
    sc = result["scores"]
    h = ["<h2>Fine-tuning: questions about held-out images</h2>",
         "<p>The pretrained model fine-tuned on question-answer conversations (user: image + question; assistant: "
         "a one-word answer) through the chat template, loss on the answers only: all parameters, and LoRA. "
         "Scored on held-out images by ranking the candidate answers by likelihood; &plusmn; is the binomial "
         "standard error.</p>",
         "<table><tr><th>model</th>" + "".join(f"<th>{k}</th>" for k in (*KINDS, "all"))
         + "<th>trainable parameters</th></tr>"]
    trainable = result.get("trainable_parameters", {})
    for m in MODELS:
        cells = "".join(f"<td class='num'>{_cell(sc[m].get(k)).replace('+-', '&plusmn;')}</td>" for k in (*KINDS, "all"))
        n = trainable.get(m)
        h.append(f"<tr><td>{LABELS[m]}</td>{cells}<td class='num'>{f'{n:,}' if isinstance(n, int) else '-'}</td></tr>")
    first = sc["pretrained"]
    h.append("<tr><td>chance</td>" + "".join(
        f"<td class='num'>{100 * first[k]['chance']:.1f}%</td>" if k in first else "<td>-</td>"
        for k in (*KINDS, "all")) + "<td></td></tr>")
    d = result.get("data", {})
    h.append(f"</table><p class='muted'>{d.get('train_conversations')} training conversations (one question each) on "
             f"{d.get('train_images')} images, {d.get('eval_questions')} questions on {d.get('eval_images')} held-out "
             f"images; {result['settings']['steps']} steps per fine-tune; questions: "
             "<code>How many shapes are there?</code>, <code>What colour is the SHAPE?</code>, "
             "<code>What shape is the COLOUR one?</code>.</p>")
    return "\n".join(h)
