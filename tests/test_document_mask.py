"""tessera.model.document_mask: per-document attention against a block-diagonal causal mask, the
PackedSeqParams it builds (and refuses), and the model entry point with megatron's plain PackedSeqParams."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tessera.model import document_mask


def test_per_document_attention_is_block_diagonal_causal_attention():
    g = torch.Generator().manual_seed(0)
    bounds = [0, 3, 10, 11, 24]
    t, heads, groups, d = bounds[-1], 4, 2, 8
    q = torch.randn(t, heads, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(t, groups, d, generator=g, dtype=torch.float64) for _ in range(2))

    def attend(q_, k_, v_):
        return F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, enable_gqa=True)

    out = document_mask.per_document(attend, q, k, v, bounds)
    doc = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff())
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.repeat_interleave(2, 1).transpose(0, 1)[None],
                                         v.repeat_interleave(2, 1).transpose(0, 1)[None], attn_mask=allowed)
    torch.testing.assert_close(out, ref[0].permute(1, 0, 2).reshape(t, heads * d), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="cu_seqlens end at 20 but the packed row has 24 tokens"):
        document_mask.per_document(attend, q, k, v, [0, 20])


def test_packed_seq_params_are_thd_and_checked():
    p = document_mask.packed_seq_params(torch.tensor([0, 5, 16, 32], dtype=torch.int32), torch.tensor(16))
    assert (p.qkv_format, p.max_seqlen_q, p.max_seqlen_kv, p.cu_seqlens_host) == ("thd", 16, 16, (0, 5, 16, 32))
    assert p.cu_seqlens_q is p.cu_seqlens_kv and p.cu_seqlens_q.dtype == torch.int32
    assert document_mask.host_boundaries(p) == (0, 5, 16, 32)
    # a max_seqlen of the whole row would make megatron's THD RoPE run positions on across documents
    with pytest.raises(ValueError, match="max_seqlen 32 != the longest document 16"):
        document_mask.packed_seq_params(torch.tensor([0, 5, 16, 32]), 32)
    with pytest.raises(ValueError, match="start at 0 and strictly increase"):
        document_mask.packed_seq_params(torch.tensor([0, 5, 5, 32]), 27)


def test_megatrons_own_packed_seq_params_give_the_same_logits(megatron_1proc):
    from megatron.core.packed_seq_params import PackedSeqParams

    from tessera.model import build_model
    from tessera.model.config import get_preset

    model = build_model(get_preset("tiny"), init_seed=2)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 7, 16, 20, 32], dtype=torch.int32)
    batch = {"tokens": tokens, "position_ids": torch.zeros(2, 16, dtype=torch.long), "cu_seqlens": cu,
             "max_seqlen": torch.tensor(12)}
    with torch.no_grad():
        ours = document_mask.forward(model, batch)
        plain = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=12, max_seqlen_kv=12)
        theirs = model(tokens.view(1, 32), torch.zeros(1, 32, dtype=torch.long), None, packed_seq_params=plain)
    assert torch.equal(ours, theirs.view(2, 16, -1))
    with pytest.raises(ValueError, match="cu_seqlens cover 20 tokens, the micro-batch 2 x 16"):
        document_mask.forward(model, {**batch, "cu_seqlens": cu[:4], "max_seqlen": 9})


def _te_thd_check(out_path: str) -> None:
    """Runs in a subprocess with tests/fake_transformer_engine.py installed: the TE spec on a packed batch."""
    import json

    import tests.fake_transformer_engine as fake
    from tessera.model import build_model, ensure_single_process
    from tessera.model.config import get_preset

    ensure_single_process()
    cfg = get_preset("tiny")
    te, local = (build_model(cfg, use_te=flag, init_seed=4) for flag in (True, False))
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    batch = {"tokens": tokens, "position_ids": torch.zeros(2, 16, dtype=torch.long),
             "cu_seqlens": torch.tensor([0, 7, 16, 20, 32], dtype=torch.int32), "max_seqlen": torch.tensor(12)}
    with torch.no_grad():
        diff = float((document_mask.forward(te, batch) - document_mask.forward(local, batch)).abs().max())
    Path(out_path).write_text(json.dumps({"diff": diff, "calls": fake.DotProductAttention.calls}))


def test_transformer_engine_spec_gets_thd_arguments(tmp_path):
    """megatron's TEDotProductAttention hands TE the packed layout (qkv_format thd, cu_seqlens, max_seqlen,
    padding_causal), and the TE spec on the fake TE gives the local spec's logits."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "te.json"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import tests.fake_transformer_engine as fake; fake.install(); "
            "from tests.test_document_mask import _te_thd_check; _te_thd_check(sys.argv[2])")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, "-c", code, str(root), str(out)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["diff"] < 1e-5
    assert len(res["calls"]) == 2  # one per layer
    for call in res["calls"]:
        assert call["qkv_format"] == "thd" and call["cu_seqlens_q"] == call["cu_seqlens_kv"] == [0, 7, 16, 20, 32]
        assert call["max_seqlen_q"] == call["max_seqlen_kv"] == 12
        assert "cu_seqlens_host" not in call  # TE gets PackedSeqParams' own fields only
