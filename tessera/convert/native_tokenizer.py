"""A transformers ``tokenizer.json`` for a checkpoint trained in Tessera (sentencepiece BPE text).

Ids follow the Tessera vocabulary exactly (specials, ``text_offset + piece id``, image codes), so
the exported embedding needs no permutation. The BPE merges are recovered from the sentencepiece
pieces (a piece's merge rank is its id, as sentencepiece BPE assigns ids in merge order); byte
fallback, no dummy prefix and identity normalisation mirror Tessera's TextTokenizer settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tessera.convert.errors import ConvertError
from tessera.convert.hf_vocab import native_vocabulary_map

META = "\u2581"


def sentencepiece_pieces(sp_model: Path) -> list[str]:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(sp_model))
    except (OSError, RuntimeError) as exc:
        raise ConvertError(f"{sp_model}: not a sentencepiece model: {exc}") from exc
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


def _merges(pieces: list[str]) -> list[tuple[str, str]]:
    ids = {p: i for i, p in enumerate(pieces)}
    ranked = []
    for p, pid in ids.items():
        if p.startswith("<0x") or (p.startswith("<") and p.endswith(">")):
            continue  # byte-fallback and control pieces are not merge products
        for cut in range(1, len(p)):
            left, right = p[:cut], p[cut:]
            if left in ids and right in ids:
                ranked.append((pid, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def write_native_tokenizer(sp_model: Path, vocab: Any, padded_size: int, out_dir: Path) -> list[str]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    pieces = sentencepiece_pieces(sp_model)
    if len(pieces) != vocab.num_text_tokens:
        raise ConvertError(
            f"{sp_model}: {len(pieces)} pieces, but the checkpoint's vocabulary has {vocab.num_text_tokens} text tokens"
        )
    vmap = native_vocabulary_map(vocab, pieces, padded_size)
    text_vocab = {p: vocab.text_offset + i for i, p in enumerate(pieces)}
    full = dict(vmap)
    full.update(text_vocab)
    unk = pieces[0] if pieces and pieces[0] == "<unk>" else None
    bpe = models.BPE(vocab=full, merges=_merges(pieces), unk_token=unk, byte_fallback=True, fuse_unk=True)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.Replace(" ", META)
    tok.decoder = decoders.Sequence([decoders.Replace(META, " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [name for name, i in vmap.items() if i < vocab.text_offset or name == "<image>"]
    tok.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    inv = {i: n for n, i in vmap.items()}
    sep = next((inv[i] for i in range(vocab.text_offset) if inv.get(i, "").startswith("<reserved")), None)
    tc = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": inv[vocab.bos_id],
        "eos_token": inv[vocab.eos_id],
        "pad_token": inv[vocab.pad_id],
        "model_max_length": 1 << 20,
    }
    if unk:
        tc["unk_token"] = unk
    if sep:
        tc["sep_token"] = sep
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tc, indent=1))
    return pieces
