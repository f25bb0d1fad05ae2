"""Data in an imported Chameleon's own id space, end to end: a random transformers Chameleon is imported
(`convert from-hf`), a corpus is pretokenized with IMPORT/tokenizers/{text,image} (ids checked against
transformers' tokenizer and VQ + image processor), `tessera train --train.init_from IMPORT` trains 3 steps
on it, `convert to-hf` exports the run, and transformers loads the export with Tessera's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.convert.hf import from_hf, to_hf
from tessera.convert.hf_vocab import IdMap
from tessera.data.raw import iter_documents
from tessera.data.synth import write_synth
from tessera.testing.checkpoints import make_hf_chameleon
from tessera.tokenizers.vocab import Vocabulary


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from tessera.cli import main

    root = tmp_path_factory.mktemp("chameleon")
    model = make_hf_chameleon(root / "hf", seed=3)  # 32 px images -> 8 x 8 codes from a 32-code VQ
    from_hf(root / "hf", root / "import")
    m = write_synth(root / "raw", 16, image_size=32, seed=5, shard_size=8, heldout_docs=0, progress=False)
    rc = main(["data", "pretokenize", "--input", m["train_pattern"], "--out", str(root / "prepared"),
               "--text-tokenizer", str(root / "import" / "tokenizers" / "text"),
               "--image-tokenizer", str(root / "import" / "tokenizers" / "image")])
    assert rc == 0
    return model, root, m


def _sequences(path: Path) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(path / "data"))
    return [np.array(ds[i], dtype=np.int64) for i in range(len(ds))]


def test_prepared_ids_are_the_imports_and_match_transformers(chain):
    from transformers import PreTrainedTokenizerFast
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil

    model, root, m = chain
    vocab = Vocabulary.load(root / "prepared")
    assert vocab == Vocabulary.load(root / "import")  # the checkpoint's ids: same specials, order, padding
    hf_to_t = IdMap.load(root / "import").hf_to_tessera()
    hf_tok = PreTrainedTokenizerFast.from_pretrained(root / "hf")
    proc = ChameleonImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                      rescale_factor=1 / 127.5)  # Tessera's (and Meta's) x / 127.5 - 1
    docs = list(iter_documents(m["train_pattern"]))
    seqs = _sequences(root / "prepared")
    assert len(seqs) == len(docs) == 16
    n_images = 0
    for ids, doc in zip(seqs, docs, strict=True):
        want = [vocab.bos_id]
        for seg in doc.segments:
            if isinstance(seg, str):
                want += hf_to_t[torch.tensor(hf_tok(seg, add_special_tokens=False).input_ids)].tolist()
            else:
                pixels = torch.as_tensor(np.array(proc(images=[seg], return_tensors="np")["pixel_values"]))
                with torch.no_grad():
                    codes = model.model.get_image_tokens(pixels)[0]  # Chameleon's image-token ids
                want += [vocab.boi_id, *hf_to_t[codes.long()].tolist(), vocab.eoi_id]
                n_images += 1
        want.append(vocab.eos_id)
        assert ids.tolist() == want
    assert n_images > 8


def test_train_from_the_import_and_export_to_transformers(chain, tmp_path):
    from transformers import ChameleonForConditionalGeneration

    import tessera.model as tm
    from tessera.pretrain.checkpointing import latest_checkpoint

    _, root, _ = chain
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tessera", "train", "--config", str(root / "import" / "config.yaml"),
           "--train.init_from", str(root / "import"), "--data.path", str(root / "prepared"),
           "--train.run_dir", str(run), "--train.steps", "3", "--train.save_interval", "3", "--train.eval_interval",
           "0", "--data.seq_length", "64", "--parallel.global_batch_size", "2", "--optim.warmup", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"initialised weights from {root / 'import'}" in r.stdout
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))

    to_hf(run, tmp_path / "export", from_import=root / "import")
    hf = ChameleonForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    ids = torch.as_tensor(_sequences(root / "prepared")[0][:48])[None]  # a prepared document, Tessera ids
    idmap = IdMap.load(root / "import")
    with torch.no_grad():
        ref = hf.lm_head(hf.model(input_ids=idmap.tessera_index()[ids]).last_hidden_state)
    got = tm.load(latest_checkpoint(run), device="cpu", dtype=torch.float32).logits(ids)
    got_hf = idmap.rows_to_hf(got.movedim(-1, 0)).movedim(0, -1)
    assert (got_hf - ref).abs().max().item() < 1e-4
    orig = ChameleonForConditionalGeneration.from_pretrained(root / "hf")
    assert not torch.equal(orig.lm_head.weight, hf.lm_head.weight)  # the export holds the trained weights
