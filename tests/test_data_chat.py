"""Conversations: reading (every format, bad records counted and skipped), the chat template (round trip,
markers per vocabulary) and the loss masks pretokenize writes for every --loss-on value (exact)."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_standins import ByteTokenizer, PatchColourTokenizer

from tessera.data.chat import ChatError, ChatTemplate, decode_text, format_chat, normalise_messages
from tessera.data.document import Message, write_tar
from tessera.data.pretokenize import PretokenizeError, PretokenizeOptions, pretokenize
from tessera.data.raw import ReaderOptions, SkipStats, iter_documents, resolve_format
from tessera.data.synth import random_scene, render_scene
from tessera.tokenizers.vocab import ImageSegment, Vocabulary

VOCAB = Vocabulary(256, 512, 16)  # what the stand-in tokenizers give
CODES = 16


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def chat_records(n: int, seed: int = 0, image_dir: str = "img") -> tuple[list[dict], dict[str, Image.Image]]:
    """``n`` conversations about synthetic scenes (question answering, drawing, multi-turn with a system
    prompt), with images named ``image_dir/c<i>.png``; returns (JSONL records, {relative path: image})."""
    rng = random.Random(seed)
    records, images = [], {}
    for i in range(n):
        scene = random_scene(rng)
        name = f"{image_dir}/c{i}.png"
        images[name] = render_scene(scene, 32)
        obj = scene.objects[0]
        kind = i % 3
        if kind == 0:
            msgs = [{"role": "user", "content": [{"type": "image", "image": name},
                                                 {"type": "text", "text": "What colour is the shape?"}]},
                    {"role": "assistant", "content": obj.colour}]
        elif kind == 1:
            msgs = [{"role": "user", "content": f"Draw a {obj.size} {obj.colour} {obj.shape}."},
                    {"role": "assistant", "content": [{"type": "image", "image": name}]}]
        else:
            msgs = [{"role": "system", "content": "Answer in one word."},
                    {"role": "user", "content": [{"type": "image", "image": name}, {"type": "text", "text": "Colour?"}]},
                    {"role": "assistant", "content": obj.colour},
                    {"role": "user", "content": "Shape?"},
                    {"role": "assistant", "content": [{"type": "text", "text": obj.shape}]}]
        records.append({"id": f"c{i}", "messages": msgs})
    return records, images


def write_chat_jsonl(directory: Path, n: int, seed: int = 0, name: str = "chat.jsonl") -> tuple[Path, list[dict]]:
    records, images = chat_records(n, seed)
    for rel, im in images.items():
        (directory / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(directory / rel)
    path = directory / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, records


def _byte_ids(text: str) -> list[int]:
    return [b + VOCAB.text_offset for b in text.encode()]


def _codes(img: Image.Image) -> list[int]:
    return (PatchColourTokenizer().encode([img])[0] + VOCAB.image_offset).tolist()


# ---- reading -----------------------------------------------------------------------------------
def test_conversations_are_detected_and_read_in_every_container(tmp_path):
    path, records = write_chat_jsonl(tmp_path, 6)
    assert resolve_format(str(path), ReaderOptions()) == "conversations"
    docs = list(iter_documents([str(path)]))
    assert [d.key for d in docs] == [r["id"] for r in records]
    first = docs[0]
    assert [m.role for m in first.messages] == ["user", "assistant"]
    assert isinstance(first.messages[0].content[0], Image.Image) and first.messages[0].content[1:] == [
        "What colour is the shape?"]
    assert first.segments == [*first.messages[0].content, *first.messages[1].content]  # same objects, in order
    assert np.array_equal(np.asarray(first.messages[0].content[0]), np.asarray(Image.open(tmp_path / "img/c0.png")))

    # webdataset: KEY.json {"messages"} + the images as members of the sample
    images = {rel: Image.open(tmp_path / rel) for rel in (f"img/c{i}.png" for i in range(6))}
    members = []
    for r in records:
        rec = json.loads(json.dumps(r).replace("img/", f"{r['id']}."))
        members.append((f"{r['id']}.json", json.dumps(rec).encode()))
        members += [(f"{r['id']}.c{r['id'][1:]}.png", _png(images[f"img/{r['id']}.png"]))]
    write_tar(tmp_path / "chat.tar", members)
    assert resolve_format(str(tmp_path / "chat.tar"), ReaderOptions()) == "conversations"
    tar_docs = list(iter_documents([str(tmp_path / "chat.tar")]))
    assert [[(m.role, [c if isinstance(c, str) else np.asarray(c).tobytes() for c in m.content]) for m in d.messages]
            for d in tar_docs] == \
           [[(m.role, [c if isinstance(c, str) else np.asarray(c).tobytes() for c in m.content]) for m in d.messages]
            for d in docs]

    # parquet as TRL stores vision chats: image placeholders + an "images" column of HF Image structs
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"messages": [{"role": "user", "content": [{"type": "image", "text": None},
                                                       {"type": "text", "text": "Colour?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
             "images": [{"bytes": _png(images["img/c0.png"]), "path": None}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chat.parquet")
    assert resolve_format(str(tmp_path / "chat.parquet"), ReaderOptions()) == "conversations"
    (pdoc,) = iter_documents([str(tmp_path / "chat.parquet")])
    assert [m.role for m in pdoc.messages] == ["user", "assistant"] and pdoc.messages[1].content == ["red"]
    assert np.array_equal(np.asarray(pdoc.messages[0].content[0]), np.asarray(docs[0].messages[0].content[0]))


def test_bad_conversations_counted_and_skipped(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "ok.png")
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = [
        ("bad_role", {"messages": [{"role": "bot", "content": "x"}]}),
        ("empty_conversation", {"messages": []}),
        ("empty_conversation", {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": []}]}),
        ("missing_image", {"messages": [{"role": "user", "content": [{"type": "image", "image": "nope.png"}]}]}),
        ("missing_image", {"messages": [{"role": "user", "content": [{"type": "image", "url": "https://x.org/a.png"}]}]}),
        ("bad_schema", {"messages": [{"role": "user", "content": 7}]}),
        ("bad_schema", {"messages": {"role": "user"}}),
        ("bad_schema", {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]}]}),
        ("bad_schema", {"messages": [{"role": "user", "content": [{"type": "image"}]}]}),  # placeholder, no images
        ("bad_schema", {"messages": [{"role": "user", "content": "x"}], "images": ["ok.png"]}),  # unused image
        ("bad_schema", {"messages": [{"content": "x"}]}),
    ]
    lines = [json.dumps(good)]
    for i, (_, rec) in enumerate(bad):
        lines += [json.dumps(rec), json.dumps({**good, "id": f"g{i}"})]
    lines.insert(3, "{not json")
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    stats = SkipStats()
    docs = list(iter_documents([str(tmp_path / "c.jsonl")], stats))
    expected = {"invalid_json": 1}
    for reason, _ in bad:
        expected[reason] = expected.get(reason, 0) + 1
    assert {k: v for k, v in stats.as_dict().items() if v} == expected
    assert len(docs) == 1 + len(bad) and all([m.content for m in d.messages] == [["hi"], ["yo"]] for d in docs)


# ---- the template ------------------------------------------------------------------------------
def test_chat_template_layout_and_round_trip():
    text, image = ByteTokenizer(), PatchColourTokenizer()
    tpl = ChatTemplate.for_vocabulary(VOCAB, text)
    start, end = VOCAB.special_id("<reserved1>"), VOCAB.special_id("<reserved2>")
    assert (tpl.turn_start, tpl.turn_end, tpl.stop_ids) == ((start,), (end,), (end,))
    img = render_scene(random_scene(random.Random(3)), 32)
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "Colour? é"}]},
            {"role": "assistant", "content": "red"}]
    ids = format_chat(msgs, VOCAB, text, image, add_generation_prompt=False)
    want = ([VOCAB.bos_id, start] + _byte_ids("system\n") + _byte_ids("Be brief.") + [end]
            + [start] + _byte_ids("user\n") + [VOCAB.boi_id] + _codes(img) + [VOCAB.eoi_id] + _byte_ids("Colour? é")
            + [end, start] + _byte_ids("assistant\n") + _byte_ids("red") + [end, VOCAB.eos_id])
    assert ids == want
    as_text = "<bos><reserved1>system\nBe brief.<reserved2><reserved1>user\n<image>Colour? é<reserved2>" \
              "<reserved1>assistant\nred<reserved2><eos>"
    assert tpl.text(normalise_messages(msgs)) == as_text == decode_text(ids, VOCAB, text)

    # the generation prompt: the open assistant header, no <eos>; image codes may be given as segments
    codes = ImageSegment(tuple(c - VOCAB.image_offset for c in _codes(img)))
    prompt = format_chat([msgs[1] | {"content": [{"type": "image", "image": codes}, {"type": "text", "text": "Colour? é"}]}],
                         VOCAB, text, add_generation_prompt=True)
    assert prompt == [VOCAB.bos_id] + want[want.index(end) + 1: want.index(end, want.index(VOCAB.eoi_id)) + 1] \
        + [start] + _byte_ids("assistant\n")
    assert decode_text(prompt, VOCAB, text) == tpl.text(normalise_messages(msgs[1:2]), add_generation_prompt=True)
    with pytest.raises(ChatError, match="role 'bot'"):
        format_chat([{"role": "bot", "content": "x"}], VOCAB, text)
    with pytest.raises(ChatError, match="no image tokenizer"):
        format_chat([msgs[1]], VOCAB, text)


def test_markers_of_an_imported_chameleon_and_the_text_fallback(tmp_path):
    from tessera.convert.hf_tokenizer import HFTextTokenizer
    from tessera.convert.hf_vocab import vocab_from_chameleon
    from tessera.testing.checkpoints import make_chameleon_tokenizer

    hf_vocab = make_chameleon_tokenizer(tmp_path, num_image_codes=16)
    vocab, idmap = vocab_from_chameleon(hf_vocab, len(hf_vocab), 4)
    tok = HFTextTokenizer(tmp_path / "tokenizer.json", idmap, vocab)
    tpl = ChatTemplate.for_vocabulary(vocab, tok)
    # Chameleon's end of turn is its reserved token <reserved08706> (a text id after import); no start token
    assert tpl.turn_end == (int(idmap.hf_to_tessera()[hf_vocab["<reserved08706>"]]),)
    assert tpl.turn_end_text == "<reserved08706>" and tpl.turn_start_text == "<|turn|>"
    assert tpl.turn_start == tuple(vocab.text_piece_to_id(tok.encode("<|turn|>")))
    msgs = [{"role": "user", "content": "A red circle?"}, {"role": "assistant", "content": "Two green triangles."}]
    ids = format_chat(msgs, vocab, tok, add_generation_prompt=False)
    assert decode_text(ids, vocab, tok) == tpl.text(normalise_messages(msgs))
    # a vocabulary without reserved specials and a tokenizer without named tokens: both markers are text
    bare = Vocabulary(256, 512, 16, special_tokens=("<pad>", "<bos>", "<eos>", "<boi>", "<eoi>"))
    tpl = ChatTemplate.for_vocabulary(bare, ByteTokenizer())
    assert tpl.turn_start == tuple(_b - VOCAB.text_offset + bare.text_offset for _b in _byte_ids("<|turn|>"))
    assert tpl.turn_end_text == "<|end|>"
    ids = format_chat(msgs, bare, ByteTokenizer(), add_generation_prompt=False)
    assert decode_text(ids, bare, ByteTokenizer()) == tpl.text(normalise_messages(msgs))


# ---- loss masks --------------------------------------------------------------------------------
def _read(out: Path, prefix: str) -> list[np.ndarray]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(out / prefix))
    return [np.asarray(ds[i]).astype(np.int64) for i in range(len(ds))]


def _expected(records: list[dict], images: dict[str, Image.Image]) -> list[tuple[list[int], dict[str, list[int]]]]:
    """Ids and the mask of each --loss-on value, written out by hand from the template's definition."""
    start, end = VOCAB.special_id("<reserved1>"), VOCAB.special_id("<reserved2>")
    out = []
    for r in records:
        ids: list[int] = []
        masks: dict[str, list[int]] = {"assistant": [], "text": [], "image": []}

        def put(values, assistant=0, text=0, image=0, ids=ids, masks=masks):
            ids.extend(values)
            for k, v in (("assistant", assistant), ("text", text), ("image", image)):
                masks[k].extend([v] * len(values))

        put([VOCAB.bos_id])
        for m in r["messages"]:
            a = int(m["role"] == "assistant")
            put([start] + _byte_ids(m["role"] + "\n"))
            parts = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
            for p in parts:
                if p["type"] == "text":
                    put(_byte_ids(p["text"]), assistant=a, text=1)
                else:
                    put([VOCAB.boi_id], assistant=a)
                    put(_codes(images[p["image"]]), assistant=a, image=1)
                    put([VOCAB.eoi_id], assistant=a)
            put([end], assistant=a)
        put([VOCAB.eos_id])
        out.append((ids, masks))
    return out


@pytest.fixture(scope="module")
def chat_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("chat")
    path, records = write_chat_jsonl(d, 6)
    _, images = chat_records(6)
    return path, records, images


@pytest.mark.parametrize("loss_on", ["auto", "assistant", "all", "image", "text"])
def test_loss_masks_for_every_loss_on_value(chat_corpus, tmp_path, loss_on):
    path, records, images = chat_corpus
    st = pretokenize([str(path)], tmp_path / "tok", ByteTokenizer(), PatchColourTokenizer(),
                     options=PretokenizeOptions(loss_on=loss_on), progress=False)
    expected = _expected(records, images)
    # --loss-on image: the conversations without an image are skipped (nothing to learn from them)
    keep = [i for i, (_, m) in enumerate(expected) if loss_on != "image" or any(m["image"])]
    assert st["skipped"]["no_targets"] == len(expected) - len(keep)
    assert [a.tolist() for a in _read(tmp_path / "tok", "data")] == [expected[i][0] for i in keep]
    assert st["conversations"] == st["documents"] == len(keep) and st["loss_on"] == loss_on
    if loss_on == "all":  # every token is a target: no mask dataset, readers take that as all ones
        assert not (tmp_path / "tok" / "loss_mask.idx").exists() and st["loss_mask"] is False
        assert st["target_tokens"] == st["tokens"]
        return
    mode = "assistant" if loss_on == "auto" else loss_on
    masks = [m.tolist() for m in _read(tmp_path / "tok", "loss_mask")]
    assert masks == [expected[i][1][mode] for i in keep]
    assert st["loss_mask"] is True and st["target_tokens"] == sum(map(sum, masks))


def test_mixed_corpus_masks_plain_documents_whole_and_assistant_needs_conversations(chat_corpus, tmp_path):
    from tessera.data.synth import write_synth

    path, records, images = chat_corpus
    m = write_synth(tmp_path / "raw", 4, image_size=32, seed=2, shard_size=4, progress=False)
    plain = m["train_pattern"]
    st = pretokenize([plain, str(path)], tmp_path / "mixed", ByteTokenizer(), PatchColourTokenizer(), progress=False)
    ids, masks = _read(tmp_path / "mixed", "data"), _read(tmp_path / "mixed", "loss_mask")
    assert st["documents"] == 4 + len(records) and st["conversations"] == len(records)
    assert [len(x) for x in masks] == [len(x) for x in ids]
    assert all(mk.min() == 1 for mk in masks[:4])  # plain documents: every token (auto = all)
    assert [mk.tolist() for mk in masks[4:]] == [e[1]["assistant"] for e in _expected(records, images)]
    with pytest.raises(PretokenizeError, match="--loss-on assistant: .* is not a conversation"):
        pretokenize([plain], tmp_path / "bad", ByteTokenizer(), PatchColourTokenizer(),
                    options=PretokenizeOptions(loss_on="assistant"), progress=False)
    with pytest.raises(PretokenizeError, match="--loss-on 'everything'"):
        PretokenizeOptions(loss_on="everything")


def test_curate_keeps_conversations(chat_corpus, tmp_path):
    from tessera.data.curate import CurateConfig, curate

    path, records, _ = chat_corpus
    curate([str(path)], tmp_path / "cur", CurateConfig(dedup_text=False, dedup_images=False, near_dup_hamming=-1), progress=False)
    before = list(iter_documents([str(path)]))
    after = list(iter_documents([str(p) for p in sorted((tmp_path / "cur").glob("*.tar"))]))

    def flat(d):
        return [(m.role, [c if isinstance(c, str) else np.asarray(c).tobytes() for c in m.content]) for m in d.messages]

    assert [flat(d) for d in after] == [flat(d) for d in before]
    assert isinstance(after[0].messages[0], Message)
