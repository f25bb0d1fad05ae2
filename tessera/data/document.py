"""The core document type and Tessera's own shard layout (``KEY.json`` segments + image files).

Every reader in ``tessera.data.raw`` yields ``Document``s; ``document_to_tar_members`` /
``write_tar`` write them back in the segments layout (the synthetic corpus, ``tessera data curate``).
A conversation is a ``Document`` whose ``messages`` keep the turns (``Message(role, content)``);
``conversation_to_tar_members`` writes it back as ``KEY.json {"messages": [...]}`` + image files.
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from tessera.utils import atomic_path


@dataclass
class Message:
    """One turn of a conversation: ``role`` (system / user / assistant) and its content in reading order
    (str text, images)."""

    role: str
    content: list


@dataclass
class Document:
    """An interleaved document: text segments (str) and images (PIL, RGB) in reading order.

    A conversation also has ``messages``; its ``segments`` are then every message's content in order (what
    text-only readers and filters see), the same image objects as in the messages."""

    key: str
    segments: list[str | Image.Image]
    source: str = ""
    messages: list[Message] | None = None

    @property
    def images(self) -> list[Image.Image]:
        return [s for s in self.segments if isinstance(s, Image.Image)]


def document_to_tar_members(doc: Document, image_bytes: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]]:
    """The segments layout: KEY.json plus one KEY.<i>.<ext> per image (docs/data.md).

    Images are written as PNG, unless ``image_bytes`` gives each image's (extension, encoded bytes),
    which are then stored as they are (no re-encoding: curation keeps the source's JPEGs)."""
    if image_bytes is None:
        image_bytes = []
        for seg in doc.images:
            buf = io.BytesIO()
            seg.save(buf, format="PNG")
            image_bytes.append(("png", buf.getvalue()))
    return segments_to_tar_members(doc.key, doc.segments, doc.source, image_bytes)


def segments_to_tar_members(key: str, segments: list, source: str, image_bytes: list[tuple[str, bytes]],
                            extra: dict | None = None) -> list[tuple[str, bytes]]:
    """KEY.json + image members for ``segments`` (str = text, anything else = the next of ``image_bytes``);
    ``extra`` adds fields to KEY.json (readers ignore them)."""
    members: list[tuple[str, bytes]] = []
    segs: list[dict] = []
    n = 0
    for seg in segments:
        if isinstance(seg, str):
            segs.append({"text": seg})
            continue
        ext, data = image_bytes[n]
        name = f"{key}.{n}.{ext}"
        members.append((name, data))
        segs.append({"image": name})
        n += 1
    if n != len(image_bytes):
        raise ValueError(f"{key}: {n} image segments but {len(image_bytes)} encoded images")
    meta = json.dumps({"segments": segs, "source": source, **(extra or {})}, ensure_ascii=False).encode("utf-8")
    return [(f"{key}.json", meta), *members]


def conversation_to_tar_members(key: str, messages: list[Message], source: str, image_bytes: list[tuple[str, bytes]],
                                extra: dict | None = None) -> list[tuple[str, bytes]]:
    """A conversation in the ``conversations`` webdataset layout: ``KEY.json {"messages": [{"role", "content":
    [{"type": "text", "text"}, {"type": "image", "image": "KEY.<i>.<ext>"}]}], "source"}`` + one member per
    image (the next of ``image_bytes`` for every non-str content item)."""
    members: list[tuple[str, bytes]] = []
    out: list[dict] = []
    n = 0
    for m in messages:
        parts: list[dict] = []
        for item in m.content:
            if isinstance(item, str):
                parts.append({"type": "text", "text": item})
                continue
            ext, data = image_bytes[n]
            name = f"{key}.{n}.{ext}"
            members.append((name, data))
            parts.append({"type": "image", "image": name})
            n += 1
        out.append({"role": m.role, "content": parts})
    if n != len(image_bytes):
        raise ValueError(f"{key}: {n} images in the messages but {len(image_bytes)} encoded images")
    meta = json.dumps({"messages": out, "source": source, **(extra or {})}, ensure_ascii=False).encode("utf-8")
    return [(f"{key}.json", meta), *members]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Byte-deterministic tar (fixed mtime/owner), written to a temp name and renamed."""
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
