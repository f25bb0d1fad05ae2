"""Fine-tuning end to end: a small random transformers Chameleon -> ``convert from-hf`` -> conversations
pretokenized with its tokenizers (``--loss-on assistant``) -> ``tessera train`` with LoRA from the import
-> ``convert to-hf`` with the adapters merged -> transformers' logits equal Tessera's merged model.

Also on the trainer: an adapter checkpoint holds only the adapters and names its base (path, SHA-256,
step); a LoRA run SIGKILLed after a checkpoint resumes to the uninterrupted run's metrics exactly; one host
read per step; a base whose files changed is refused. Slow: the same LoRA fine-tune under TP=2 equals the
one-process run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ENV = dict(os.environ, OMP_NUM_THREADS="1")
TARGETS = "linear_qkv,linear_proj,linear_fc1,linear_fc2,output_layer"
COMPARED = ("loss", "grad_norm", "lr", "ce", "ce_text", "ce_image", "z")

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(root, import checkpoint, pretokenized conversations) for a tiny random HF Chameleon."""
    from test_data_chat import write_chat_jsonl

    from tessera.convert.hf import from_hf
    from tessera.data.pretokenize import PretokenizeOptions, pretokenize
    from tessera.testing.checkpoints import make_hf_chameleon

    root = tmp_path_factory.mktemp("ft_e2e")
    make_hf_chameleon(root / "hf", num_kv_heads=2, seed=3)
    from_hf(root / "hf", root / "import")
    chat, _ = write_chat_jsonl(root, 12, seed=1)
    st = pretokenize(str(chat), root / "data", str(root / "import" / "tokenizers" / "text"),
                     str(root / "import" / "tokenizers" / "image"), options=PretokenizeOptions(loss_on="assistant"),
                     progress=False)
    assert st["loss_mask"] and 0 < st["target_tokens"]
    return root


def _train(root: Path, run: Path, *extra: str, nproc: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
                if nproc > 1 else [sys.executable])
    cmd = [*launcher, "-m", "tessera.pretrain.trainer", str(root / "import" / "config.yaml"),
           "--train.init_from", str(root / "import"), "--data.path", str(root / "data"), "--data.seq_length", "64",
           "--parallel.global_batch_size", "4", "--parallel.micro_batch_size", "2", "--train.steps", "4",
           "--optim.warmup", "0", "--optim.lr", "1e-2", "--train.eval_interval", "0", "--precision", "fp32",
           "--train.save_interval", "2", "--finetune.lora.rank", "4", "--finetune.lora.targets", TARGETS,
           "--finetune.lora.dropout", "0.1", "--train.run_dir", str(run), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=dict(ENV, **(env or {})),
                          start_new_session=True)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _compared(recs: list[dict]) -> list[dict]:
    return [{k: r[k] for k in ("step", *COMPARED) if k in r} for r in recs]


@pytest.fixture(scope="module")
def lora_run(imported):
    run = imported / "lora"
    r = _train(imported, run, env={"TESSERA_COUNT_SYNCS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fine-tuning: LoRA rank 4" in r.stdout
    return run


def _hf_order_logits(loaded, idmap, ids_hf: torch.Tensor) -> torch.Tensor:
    out = loaded.logits(idmap.hf_to_tessera()[ids_hf])
    return idmap.rows_to_hf(out.movedim(-1, 0)).movedim(0, -1)


def test_lora_finetune_of_an_import_exports_merged_to_transformers(imported, lora_run):
    from torch.distributed.checkpoint import FileSystemReader
    from transformers import ChameleonForConditionalGeneration

    import tessera.model as tm
    from tessera.convert.hf import to_hf
    from tessera.convert.hf_vocab import IdMap
    from tessera.model.checkpoint import checkpoint_sha256, read_checkpoint_meta, resolve_checkpoint

    recs = _metrics(lora_run)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[-1]["loss"] < recs[0]["loss"]
    assert all(r["host_syncs"] == 1 for r in recs)  # the per-token division and LoRA add no host read
    # the adapter checkpoint: only adapters (model and optimizer state), and its base
    ckpt = resolve_checkpoint(lora_run)
    meta = read_checkpoint_meta(ckpt)
    assert meta["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.1, "targets": TARGETS.split(",")}
    assert meta["base"] == {"path": str((imported / "import").resolve()), "sha256": checkpoint_sha256(imported / "import"),
                            "step": 0}
    keys = set(FileSystemReader(str(ckpt / "dist")).read_metadata().state_dict_metadata)
    weights = {k for k in keys if not k.startswith(("optimizer", "rng_state", "scheduler", "train_state"))
               and not k.endswith("_extra_state")}
    assert weights and all(k.endswith((".lora_a", ".lora_b")) for k in weights), sorted(weights)[:5]
    assert len(weights) == 2 * 5  # layers are stacked in one tensor per name (megatron), plus the output layer
    # export with the adapters merged; transformers computes what Tessera's merged model computes
    to_hf(lora_run, imported / "export")
    hf = ChameleonForConditionalGeneration.from_pretrained(imported / "export").eval()
    idmap = IdMap.load(imported / "import")
    ids = torch.randint(0, idmap.hf_vocab_size - 3, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = tm.load(lora_run, device="cpu", dtype=torch.float32)
    ours = _hf_order_logits(merged, idmap, ids)
    with torch.no_grad():
        theirs = hf.lm_head(hf.model(input_ids=ids).last_hidden_state)
    assert (theirs - ours).abs().max().item() < 1e-4
    unmerged = tm.load(lora_run, device="cpu", dtype=torch.float32, adapters="unmerged")
    assert (_hf_order_logits(unmerged, idmap, ids) - ours).abs().max().item() < 1e-4
    base = tm.load(imported / "import", device="cpu", dtype=torch.float32)
    assert (_hf_order_logits(base, idmap, ids) - ours).abs().max().item() > 1e-3  # the adapters changed the model


def test_lora_run_resumes_exactly_and_refuses_a_changed_base(imported, lora_run, tmp_path):
    from tessera.model.checkpoint import CheckpointError

    run = tmp_path / "killed"
    r = _train(imported, run, env={"TESSERA_DEBUG_KILL_AT": "step:3"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    r = _train(imported, run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "(step 2)" in r.stdout
    assert _compared(_metrics(run)) == _compared(_metrics(lora_run))  # adapter dropout RNG, data, Adam: exact
    # a base whose files changed is refused, by the trainer and by tessera.model.load
    changed = tmp_path / "base_copy"
    import shutil

    shutil.copytree(imported / "import", changed)
    cfg = changed / "config.yaml"
    cfg.write_text(cfg.read_text() + "\n# edited\n")
    r = _train(imported, run, "--train.steps", "6", "--train.init_from", str(changed))
    assert r.returncode != 0 and "its adapters were trained on base" in r.stderr
    import tessera.model as tm

    with pytest.raises(CheckpointError, match="not the same base checkpoint"):
        tm.load(run, device="cpu", base=changed)


@pytest.mark.slow  # a 2-process run and its reference, ~60 s
def test_lora_finetune_under_tp2_matches_one_process(imported, tmp_path):
    # no adapter dropout: a row-parallel adapter's input is split over TP, its masks cannot match one process's
    runs = {}
    for name, extra, n in (("ref", (), 1), ("tp2", ("--parallel.tp", "2", "--parallel.sequence_parallel", "true"), 2)):
        runs[name] = tmp_path / name
        r = _train(imported, runs[name], "--finetune.lora.dropout", "0", *extra, nproc=n)
        assert r.returncode == 0, r.stderr[-3000:]
    got, ref = _metrics(runs["tp2"]), _metrics(runs["ref"])
    assert [x["step"] for x in got] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        assert [x[key] for x in got] == pytest.approx([x[key] for x in ref], rel=1e-5, abs=1e-7), key


def test_generate_chat_with_adapters_merged_or_not(imported, lora_run, tmp_path):
    """``tessera generate --chat`` on the adapter checkpoint (tokenizers found in its base, the import): the
    greedy reply is the same with the adapters merged and unmerged."""
    from tessera.cli import main

    conv = tmp_path / "conv.json"
    (tmp_path / "img").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32), (220, 40, 40)).save(tmp_path / "img" / "q.png")
    conv.write_text(json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image", "image": "img/q.png"}, {"type": "text", "text": "What colour is the shape?"}]}]}))
    docs = {}
    for mode in ("merge", "unmerged"):
        out = tmp_path / mode
        rc = main(["generate", "--checkpoint", str(lora_run), "--chat", str(conv), "--adapters", mode, "--mode", "text",
                   "--max-new-tokens", "6", "--temperature", "0", "--dtype", "float32", "--device", "cpu",
                   "--out", str(out)])
        assert rc == 0
        docs[mode] = json.loads((out / "document.json").read_text())
    assert docs["merge"]["new_tokens"] > 0
    assert docs["merge"]["segments"] == docs["unmerged"]["segments"]
    assert docs["merge"]["finish_reason"] == docs["unmerged"]["finish_reason"]
