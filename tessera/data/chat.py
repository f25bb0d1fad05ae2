"""The chat template: a conversation -> ids of the unified vocabulary, with the loss-mask flags of every id.
The same template serves ``tessera data pretokenize`` and generation (``format_chat``).

A conversation becomes one document (docs/finetuning.md)::

    <bos> TURN system\\n CONTENT END  TURN user\\n CONTENT END  TURN assistant\\n CONTENT END ... <eos>

``TURN`` / ``END`` are the turn markers; the role name and a newline after ``TURN`` are text; CONTENT is the
message's text and images (``<boi>`` codes ``<eoi>``) in order, nothing between them. ``format_chat(...,
add_generation_prompt=True)`` ends with ``TURN assistant\\n`` (no ``<eos>``): the model writes the reply and
its ``END`` (``ChatTemplate.stop_ids``: where generation stops).

The markers, in order of preference:

- the vocabulary's reserved specials ``<reserved1>`` (TURN) and ``<reserved2>`` (END) (Tessera's own
  vocabularies reserve three; ``<reserved0>`` stays free because the native transformers export names it
  ``<image>``, transformers' image placeholder);
- an imported Chameleon vocabulary has no reserved specials (its five specials are pad / bos / eos / boi /
  eoi; its unused ``<reservedNNNNN>`` ids are text): END is the token ``<reserved08706>``, which Meta's
  inference code names ``end_turn`` and transformers' conversion makes the ``sep_token``, when the
  tokenizer has it; Chameleon names no start-of-turn token, so TURN is text;
- otherwise text: ``<|turn|>`` and ``<|end|>``, encoded by the text tokenizer on their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tessera.data.document import Message
from tessera.data.formats import ROLES
from tessera.tokenizers.vocab import TURN_END_TOKEN, TURN_START_TOKEN, ImageSegment, Vocabulary

TURN_START_TEXT = "<|turn|>"
TURN_END_TEXT = "<|end|>"
CHAMELEON_END_OF_TURN = "<reserved08706>"
IMAGE_TEXT = "<image>"  # how an image reads in the template's text form

# Per-token flags (uint8): what the --loss-on choices select.
ASSISTANT = 1  # an assistant turn's content, and its END marker
TEXT = 2  # a text piece of content (not a marker, not a role header)
IMAGE = 4  # an image code (not <boi> / <eoi>)

LOSS_ON = ("assistant", "all", "image", "text")


class ChatError(ValueError):
    pass


@dataclass(frozen=True)
class Piece:
    """One run of a rendered document: ``ids`` (fixed ids: markers, headers, bos/eos), ``text`` (content,
    encoded by the text tokenizer) or ``image`` (content: an image, encoded by the VQ tokenizer)."""

    kind: str
    value: Any
    flags: int = 0  # ASSISTANT or 0; TEXT / IMAGE are added per token when assembled


@dataclass(frozen=True)
class ChatTemplate:
    """The turn markers of one vocabulary (ids) and how they read as text."""

    bos_id: int
    eos_id: int
    turn_start: tuple[int, ...]
    turn_end: tuple[int, ...]
    headers: Mapping[str, tuple[int, ...]] = field(hash=False)  # role -> ids of "role\n"
    turn_start_text: str = TURN_START_TEXT
    turn_end_text: str = TURN_END_TEXT

    @classmethod
    def for_vocabulary(cls, vocab: Vocabulary, text_tokenizer: Any) -> ChatTemplate:
        """The template for ``vocab`` and its text tokenizer (``encode_batch(list[str]) -> pieces``)."""

        def encode(text: str) -> tuple[int, ...]:
            return tuple(vocab.text_piece_to_id(text_tokenizer.encode_batch([text])[0]))

        def marker(special: str, named: str | None, text: str) -> tuple[tuple[int, ...], str]:
            sid = vocab.optional_special_id(special)
            if sid is not None:
                return (sid,), special
            tid = named_text_token(text_tokenizer, vocab, named) if named else None
            if tid is not None:
                return (tid,), named
            return encode(text), text

        start, start_text = marker(TURN_START_TOKEN, None, TURN_START_TEXT)
        end, end_text = marker(TURN_END_TOKEN, CHAMELEON_END_OF_TURN, TURN_END_TEXT)
        return cls(vocab.bos_id, vocab.eos_id, start, end, {r: encode(f"{r}\n") for r in ROLES}, start_text, end_text)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The END marker's ids: generation of a reply stops once they are written."""
        return self.turn_end

    def to_dict(self) -> dict:
        return {"turn_start": self.turn_start_text, "turn_end": self.turn_end_text,
                "turn_start_ids": list(self.turn_start), "turn_end_ids": list(self.turn_end)}

    # ---- rendering ----------------------------------------------------------------------------
    def pieces(self, messages: Sequence[Mapping | Message], add_generation_prompt: bool = False,
               add_eos: bool | None = None) -> list[Piece]:
        """The document as pieces. ``add_eos`` defaults to ``not add_generation_prompt`` (a training
        document ends with ``<eos>``, a prompt with the open assistant header)."""
        add_eos = (not add_generation_prompt) if add_eos is None else add_eos
        out = [Piece("ids", (self.bos_id,))]
        for m in normalise_messages(messages):
            flag = ASSISTANT if m.role == "assistant" else 0
            out += [Piece("ids", self.turn_start), Piece("ids", self.headers[m.role])]
            out += [Piece("text" if isinstance(c, str) else "image", c, flag) for c in m.content]
            out.append(Piece("ids", self.turn_end, flag))
        if add_generation_prompt:
            out += [Piece("ids", self.turn_start), Piece("ids", self.headers["assistant"])]
        if add_eos:
            out.append(Piece("ids", (self.eos_id,)))
        return out

    def text(self, messages: Sequence[Mapping | Message], add_generation_prompt: bool = False,
             add_eos: bool | None = None, bos: str = "<bos>", eos: str = "<eos>") -> str:
        """The template's text form: markers by name, images as ``<image>`` (what ``decode_text`` gives
        back from the ids)."""
        add_eos = (not add_generation_prompt) if add_eos is None else add_eos
        out = [bos]
        for m in normalise_messages(messages):
            out.append(f"{self.turn_start_text}{m.role}\n")
            out += [c if isinstance(c, str) else IMAGE_TEXT for c in m.content]
            out.append(self.turn_end_text)
        if add_generation_prompt:
            out.append(f"{self.turn_start_text}assistant\n")
        if add_eos:
            out.append(eos)
        return "".join(out)


def named_text_token(text_tokenizer: Any, vocab: Vocabulary, name: str) -> int | None:
    """The vocabulary id of the token ``name`` of an imported Chameleon's text tokenizer (``HFTextTokenizer``:
    a ``tokenizers`` tokenizer + the import's id map), or None where there is no such token."""
    tok, idmap = getattr(text_tokenizer, "tokenizer", None), getattr(text_tokenizer, "idmap", None)
    if tok is None or idmap is None or not hasattr(tok, "token_to_id"):
        return None
    hf = tok.token_to_id(name)
    if hf is None or not 0 <= hf < idmap.hf_vocab_size:
        return None
    tid = int(idmap.hf_to_tessera()[hf])
    return tid if vocab.text_offset <= tid < vocab.image_offset else None


def document_pieces(segments: Sequence[Any], vocab: Vocabulary) -> list[Piece]:
    """A plain (non-conversation) document: ``<bos>`` + its segments + ``<eos>``."""
    return [Piece("ids", (vocab.bos_id,))] + [Piece("text" if isinstance(s, str) else "image", s) for s in segments] \
        + [Piece("ids", (vocab.eos_id,))]


def assemble(pieces: Sequence[Piece], text_ids: Callable[[], Sequence[int]], image_ids: Callable[[], Sequence[int]],
             vocab: Vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64, flags uint8) of ``pieces``. ``text_ids()`` / ``image_ids()`` return the vocabulary ids of the
    next text / image piece in order (text pieces shifted by ``text_offset``; an image's codes as ids, without
    ``<boi>`` / ``<eoi>``)."""
    ids: list[np.ndarray] = []
    flags: list[np.ndarray] = []

    def add(values, flag: int) -> None:
        a = np.asarray(values, dtype=np.int64).reshape(-1)
        ids.append(a)
        flags.append(np.full(a.size, flag, dtype=np.uint8))

    for p in pieces:
        if p.kind == "ids":
            add(p.value, p.flags)
        elif p.kind == "text":
            add(text_ids(), p.flags | TEXT)
        elif p.kind == "image":
            add([vocab.boi_id], p.flags)
            add(image_ids(), p.flags | IMAGE)
            add([vocab.eoi_id], p.flags)
        else:
            raise ChatError(f"unknown piece kind {p.kind!r}")
    return np.concatenate(ids), np.concatenate(flags)


def loss_mask(flags: np.ndarray, loss_on: str) -> np.ndarray:
    """uint8 [n]: 1 where the token is a training target under ``--loss-on``."""
    if loss_on == "all":
        return np.ones_like(flags)
    bit = {"assistant": ASSISTANT, "text": TEXT, "image": IMAGE}.get(loss_on)
    if bit is None:
        raise ChatError(f"--loss-on {loss_on!r}: expected one of {', '.join(LOSS_ON)}")
    return ((flags & bit) != 0).astype(np.uint8)


# ---- generation-time API ------------------------------------------------------------------------
def normalise_messages(messages: Sequence[Mapping | Message]) -> list[Message]:
    """transformers-style message dicts (or ``Message``s) -> ``Message``s with content lists. Content: a
    string, or parts ``{"type": "text", "text": str}`` / ``{"type": "image", "image": PIL image |
    ImageSegment}``; roles system / user / assistant."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            role, content = m.role, m.content
        elif isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        else:
            raise ChatError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(m).__name__}")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        parts = [] if content is None else [content] if isinstance(content, str) else list(content)
        items: list = []
        for j, p in enumerate(parts):
            if isinstance(p, Mapping):
                if p.get("type") == "text" and isinstance(p.get("text"), str):
                    p = p["text"]
                elif p.get("type") == "image" and p.get("image") is not None:
                    p = p["image"]
                else:
                    raise ChatError(f"messages[{i}].content[{j}]: expected a text part or an image part with 'image'")
            if not (isinstance(p, str) and not p):
                items.append(p)
        out.append(Message(role, items))
    return out


def format_chat(messages: Sequence[Mapping | Message], vocab: Vocabulary, text_tokenizer: Any,
                image_tokenizer: Any | None = None, add_generation_prompt: bool = True,
                template: ChatTemplate | None = None) -> list[int]:
    """The ids of ``messages`` under the chat template, as ``tessera data pretokenize`` writes them; with
    ``add_generation_prompt`` they end with the open assistant turn (a prompt for ``tessera generate``).
    Images: ``ImageSegment`` codes, or PIL images (then ``image_tokenizer`` encodes them)."""
    from tessera.tokenizers.preprocess import fit_image

    msgs = normalise_messages(messages)
    template = template or ChatTemplate.for_vocabulary(vocab, text_tokenizer)
    pieces = template.pieces(msgs, add_generation_prompt)
    texts = iter([vocab.text_piece_to_id(t) for t in text_tokenizer.encode_batch([p.value for p in pieces
                                                                                    if p.kind == "text"])])
    images = [p.value for p in pieces if p.kind == "image"]
    pil = [k for k, im in enumerate(images) if not isinstance(im, ImageSegment)]
    codes = {k: im.codes for k, im in enumerate(images) if isinstance(im, ImageSegment)}
    if pil:
        if image_tokenizer is None:
            raise ChatError("the messages hold images but no image tokenizer was given")
        enc = image_tokenizer.encode([fit_image(images[k], image_tokenizer.image_size) for k in pil])
        codes.update({k: tuple(int(c) for c in enc[j].tolist()) for j, k in enumerate(pil)})
    for k, c in codes.items():
        if len(c) != vocab.image_tokens_per_image:
            raise ChatError(f"image {k} has {len(c)} codes; the vocabulary expects {vocab.image_tokens_per_image}")
    image_ids = iter([np.asarray(codes[k], dtype=np.int64) + vocab.image_offset for k in range(len(images))])
    ids, _ = assemble(pieces, lambda: next(texts), lambda: next(image_ids), vocab)
    return ids.tolist()


def decode_text(ids: Sequence[int], vocab: Vocabulary, text_tokenizer: Any) -> str:
    """ids -> the template's text form: specials by their vocabulary names, text pieces decoded (runs at
    once), each image (``<boi>`` .. ``<eoi>``) as ``<image>``. The inverse of ``ChatTemplate.text`` for
    ``format_chat``'s ids."""
    out: list[str] = []
    run: list[int] = []
    in_image = False

    def flush() -> None:
        if run:
            out.append(text_tokenizer.decode(vocab.id_to_text_piece(run)))
            run.clear()

    for i in ids:
        i = int(i)
        if in_image:
            in_image = i != vocab.eoi_id
            continue
        if vocab.text_offset <= i < vocab.image_offset:
            run.append(i)
            continue
        flush()
        if i == vocab.boi_id:
            out.append(IMAGE_TEXT)
            in_image = True
        elif i < vocab.text_offset:
            out.append(vocab.special_tokens[i])
        else:
            raise ChatError(f"id {i} outside an image is not text or a special")
    flush()
    return "".join(out)
