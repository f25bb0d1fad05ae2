"""The core document type and Tessera's own shard layout (``KEY.json`` segments + image files).

Every reader in ``tessera.data.raw`` yields ``Document``s; ``document_to_tar_members`` /
``write_tar`` write them back in the segments layout (the synthetic corpus, ``tessera data curate``).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass
class Document:
    """An interleaved document: text segments (str) and images (PIL, RGB) in reading order."""

    key: str
    segments: list[str | Image.Image]
    source: str = ""

    @property
    def images(self) -> list[Image.Image]:
        return [s for s in self.segments if isinstance(s, Image.Image)]


def document_to_tar_members(doc: Document, image_bytes: list[tuple[str, bytes]] | None = None) -> list[tuple[str, bytes]]:
    """The segments layout: KEY.json plus one KEY.<i>.<ext> per image (docs/data.md).

    Images are written as PNG, unless ``image_bytes`` gives each image's (extension, encoded bytes),
    which are then stored as they are (no re-encoding: curation keeps the source's JPEGs)."""
    members: list[tuple[str, bytes]] = []
    segs: list[dict] = []
    n = 0
    for seg in doc.segments:
        if isinstance(seg, str):
            segs.append({"text": seg})
            continue
        if image_bytes is not None:
            ext, data = image_bytes[n]
        else:
            buf = io.BytesIO()
            seg.save(buf, format="PNG")
            ext, data = "png", buf.getvalue()
        name = f"{doc.key}.{n}.{ext}"
        members.append((name, data))
        segs.append({"image": name})
        n += 1
    meta = json.dumps({"segments": segs, "source": doc.source}, ensure_ascii=False).encode("utf-8")
    return [(f"{doc.key}.json", meta), *members]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Byte-deterministic tar (fixed mtime/owner), written to a temp name and renamed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)
