"""End to end with the real tokenizers and the CLI: synth -> pretokenize -> report -> blended batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tessera.cli import main
from tessera.data.batches import BlendedBatchIterator
from tessera.data.config import load_data_config
from tessera.data.raw import iter_documents
from tessera.data.synth import parse_caption
from tessera.tokenizers.vocab import ImageSegment, TextSegment, Vocabulary

text_mod = pytest.importorskip("tessera.tokenizers.text_train")
image_mod = pytest.importorskip("tessera.tokenizers.image")


def test_synth_pretokenize_report_batches_with_real_tokenizers(tmp_path, capsys):
    raw = tmp_path / "raw"
    assert main(["data", "synth", "--out", str(raw), "--docs", "40", "--image-size", "32", "--shard-size", "20",
                 "--seed", "3"]) == 0
    manifest = json.loads((raw / "synth.json").read_text())
    shards = [str(raw / s) for s in manifest["train_shards"]]
    text_tok = text_mod.train_text_tokenizer(shards, tmp_path / "text", 320)
    torch.manual_seed(0)
    image_tok = image_mod.ImageTokenizer.from_config(image_mod.VQConfig.preset("tiny"))  # untrained is fine here
    # but its k-means codebook initialises on the first batch it sees: do that once, before saving
    image_tok.encode([im for d in iter_documents(manifest["heldout_pattern"]) for im in d.images])
    image_tok.save(tmp_path / "vq")

    out = tmp_path / "tok"
    assert main(["data", "pretokenize", "--input", manifest["train_pattern"], "--text-tokenizer",
                 str(tmp_path / "text.model"), "--image-tokenizer", str(tmp_path / "vq"), "--out", str(out),
                 "--device", "cpu"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    vocab = Vocabulary.load(out)
    assert vocab.num_text_tokens == text_tok.vocab_size and vocab.num_image_codes == image_tok.num_codes
    assert vocab.image_tokens_per_image == image_tok.tokens_per_image == 64

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(out / "data"))
    docs = list(iter_documents(manifest["train_pattern"]))
    assert len(ds) == stats["documents"] == len(docs) == 40
    assert sum(len(ds[i]) for i in range(len(ds))) == stats["tokens"]
    loaded_vq = image_mod.ImageTokenizer.load(tmp_path / "vq")
    for i, doc in enumerate(docs):
        segs = vocab.decode_document(np.asarray(ds[i]).tolist(), text_tok.decode)
        want = [TextSegment(s) if isinstance(s, str) else ImageSegment.from_tensor(loaded_vq.encode([s])[0])
                for s in doc.segments]
        assert segs == want  # text exact through BPE, image codes equal to a direct encode
        for s in segs:
            if isinstance(s, TextSegment) and doc.source != "synth/text_only":
                assert parse_caption(s.text) is not None

    capsys.readouterr()
    assert main(["data", "report", f"synth={out}"]) == 0
    assert "synth" in capsys.readouterr().out

    cfg_path = tmp_path / "data.yaml"
    cfg_path.write_text(
        f"sources: [{{name: a, path: {out}}}, {{name: b, path: {out}}}]\n"
        "blend: {ramp: linear, knots: [{step: 0, weights: {a: 1}}, {step: 4, weights: {b: 1}}]}\n"
        "seq_length: 128\nseed: 9\nreset_position_ids: true\n"
    )
    cfg = load_data_config(cfg_path)
    it = cfg.iterator(8, 2, dp_rank=1, dp_size=2)
    assert isinstance(it, BlendedBatchIterator)
    batches = [b for _ in range(6) for b in it.next_step()]
    assert all(b["tokens"].shape == (2, 128) for b in batches)
    assert (batches[0]["source"] == 0).all() and (batches[-1]["source"] == 1).all()
    assert main(["data", "report", "--config", str(cfg_path), "--steps", "3", "--global-batch", "8",
                 "--micro-batch", "2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["blend"]["blend"]["tokens"] == 3 * 8 * 128
