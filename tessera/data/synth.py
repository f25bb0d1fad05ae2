"""The built-in synthetic corpus: coloured shapes with captions that describe them exactly.

Everything here is deterministic given a seed and small enough for a tiny model to learn at
32-128 px: flat colours, big shapes, a closed-vocabulary caption grammar (docs/data.md)::

    caption    := object placement [background]
    placement  := " in the center" | " on the left" | " on the right" | " at the top" | " at the bottom"
                | relation object
    object     := "a " size " " colour " " shape
    relation   := " to the left of " | " to the right of " | " above " | " below "
    background := " on a " ("black" | "gray") " background"     (white is the default and unsaid)

``parse_caption`` inverts ``caption`` exactly; the demo scores generated captions with it and
``tessera.data.detect`` reads the same attributes back from pixels.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from tessera.data.document import Document, document_to_tar_members, write_tar
from tessera.data.raw import iter_documents
from tessera.progress import Progress
from tessera.utils import atomic_write_json

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
SIZES: dict[str, float] = {"small": 0.24, "large": 0.38}  # side of the object's box / image side
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
}
POSITION_PHRASES: dict[str, str] = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# relation -> (subject centre, object centre); the two boxes never touch (gap >= 8% of the side).
RELATIONS: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "left of": ((0.25, 0.5), (0.75, 0.5)),
    "right of": ((0.75, 0.5), (0.25, 0.5)),
    "above": ((0.5, 0.25), (0.5, 0.75)),
    "below": ((0.5, 0.75), (0.5, 0.25)),
}
RELATION_PHRASES: dict[str, str] = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
JITTER = 0.02  # max centre offset, fraction of the side: variety without breaking the layout rules
KINDS: tuple[str, ...] = ("caption_image", "image_caption", "multi_image", "text_only")
DOC_KINDS: dict[str, float] = {"caption_image": 0.4, "image_caption": 0.3, "multi_image": 0.2, "text_only": 0.1}
SUPERSAMPLE = 4


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]  # one or two; objects[0] is the caption's subject
    position: str | None = None  # single object only
    relation: str | None = None  # two objects only
    background: str = "white"
    jitter: tuple[float, ...] = field(default=(0.0, 0.0, 0.0, 0.0), compare=False)  # dx, dy per object


def random_scene(rng: random.Random, two_objects_p: float = 0.5, background_p: float = 0.3) -> Scene:
    def obj() -> SceneObject:
        return SceneObject(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)))

    jitter = tuple(rng.uniform(-JITTER, JITTER) for _ in range(4))
    background = rng.choice(["black", "gray"]) if rng.random() < background_p else "white"
    if rng.random() < two_objects_p:
        a = obj()
        b = obj()
        while (b.colour, b.shape) == (a.colour, a.shape):  # keep the two objects tellable apart
            b = obj()
        return Scene((a, b), relation=rng.choice(list(RELATIONS)), background=background, jitter=jitter)
    return Scene((obj(),), position=rng.choice(list(POSITIONS)), background=background, jitter=jitter)


def caption(scene: Scene) -> str:
    def phrase(o: SceneObject) -> str:
        return f"a {o.size} {o.colour} {o.shape}"

    if len(scene.objects) == 1:
        text = f"{phrase(scene.objects[0])} {POSITION_PHRASES[scene.position or 'center']}"
    else:
        text = f"{phrase(scene.objects[0])} {RELATION_PHRASES[scene.relation or 'left of']} {phrase(scene.objects[1])}"
    if scene.background != "white":
        text += f" on a {scene.background} background"
    return text


_OBJ = rf"a ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_BG = rf"(?: on a ({'|'.join(b for b in BACKGROUNDS if b != 'white')}) background)?"
_SINGLE_RE = re.compile(rf"^{_OBJ} ({'|'.join(POSITION_PHRASES.values())}){_BG}$")
_PAIR_RE = re.compile(rf"^{_OBJ} ({'|'.join(RELATION_PHRASES.values())}) {_OBJ}{_BG}$")


def parse_caption(text: str) -> Scene | None:
    """The scene a caption describes, or None if ``text`` is not a sentence of the grammar.
    Tolerates surrounding whitespace, case and one trailing period (model output)."""
    t = " ".join(text.strip().lower().split()).rstrip(".").strip()
    m = _SINGLE_RE.match(t)
    if m:
        size, colour, shape, where, bg = m.groups()
        position = {v: k for k, v in POSITION_PHRASES.items()}[where]
        return Scene((SceneObject(shape, colour, size),), position=position, background=bg or "white")
    m = _PAIR_RE.match(t)
    if m:
        s1, c1, h1, rel, s2, c2, h2, bg = m.groups()
        relation = {v: k for k, v in RELATION_PHRASES.items()}[rel]
        return Scene(
            (SceneObject(h1, c1, s1), SceneObject(h2, c2, s2)), relation=relation, background=bg or "white"
        )
    return None


def shape_polygon(shape: str, cx: float, cy: float, half: float) -> list[tuple[float, float]] | None:
    """Vertices of ``shape`` inscribed in the square box of half-side ``half`` (None for the circle)."""
    import math

    if shape == "circle":
        return None
    if shape == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif shape == "triangle":
        pts = [(0, -1), (1, 1), (-1, 1)]
    elif shape == "diamond":
        pts = [(0, -1), (1, 0), (0, 1), (-1, 0)]
    elif shape == "cross":
        w = 0.36
        pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    elif shape == "star":
        pts = []
        for k in range(10):
            r = 1.0 if k % 2 == 0 else 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a)))
        # stretch to fill the box vertically (a star is 1.81 tall, 1.90 wide before this)
        ys = [p[1] for p in pts]
        lo, hi = min(ys), max(ys)
        xs = [p[0] for p in pts]
        xl, xh = min(xs), max(xs)
        pts = [(-1 + 2 * (x - xl) / (xh - xl), -1 + 2 * (y - lo) / (hi - lo)) for x, y in pts]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return [(cx + half * x, cy + half * y) for x, y in pts]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, half: float, fill) -> None:
    poly = shape_polygon(shape, cx, cy, half)
    if poly is None:
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def object_boxes(scene: Scene) -> list[tuple[float, float, float]]:
    """(cx, cy, half) of every object in fractions of the image side."""
    centres = [POSITIONS[scene.position or "center"]] if len(scene.objects) == 1 else list(RELATIONS[scene.relation or "left of"])
    out = []
    for i, (o, (cx, cy)) in enumerate(zip(scene.objects, centres, strict=True)):
        jx, jy = scene.jitter[2 * i : 2 * i + 2] if len(scene.jitter) >= 2 * i + 2 else (0.0, 0.0)
        out.append((cx + jx, cy + jy, SIZES[o.size] / 2))
    return out


def render_scene(scene: Scene, size: int) -> Image.Image:
    """RGB image of side ``size``; drawn 4x larger and box-filtered so edges are anti-aliased."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o, (cx, cy, half) in zip(scene.objects, object_boxes(scene), strict=True):
        draw_shape(draw, o.shape, cx * big, cy * big, half * big, COLOURS[o.colour])
    return img.resize((size, size), Image.BOX)


def check_mix(mix: dict[str, float]) -> dict[str, float]:
    """A document mix (kind -> weight) with known kinds, non-negative weights and a positive sum."""
    bad = [k for k in mix if k not in KINDS]
    if bad:
        raise ValueError(f"unknown document kind(s) {bad}; known: {list(KINDS)}")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"document mix weights must be >= 0 with a positive sum, got {mix}")
    return {k: float(w) for k, w in mix.items() if w > 0}


def make_document(rng: random.Random, image_size: int = 64, kind: str | None = None, key: str = "doc",
                  mix: dict[str, float] | None = None) -> Document:
    """One document of ``kind`` (drawn with the ``mix`` weights, default DOC_KINDS, when None)."""
    if kind is None:
        weights = mix or DOC_KINDS
        kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    if kind == "caption_image":
        s = random_scene(rng)
        segments: list[str | Image.Image] = [caption(s), render_scene(s, image_size)]
    elif kind == "image_caption":
        s = random_scene(rng)
        segments = [render_scene(s, image_size), caption(s)]
    elif kind == "multi_image":
        segments = []
        for _ in range(rng.randint(2, 3)):
            s = random_scene(rng)
            segments += [caption(s), render_scene(s, image_size)]
    elif kind == "text_only":
        segments = [". ".join(caption(random_scene(rng)) for _ in range(rng.randint(2, 4))) + "."]
    else:
        raise ValueError(f"unknown document kind {kind!r}; known: {list(KINDS)}")
    return Document(key=key, segments=segments, source=f"synth/{kind}")


def document_rng(seed: int, index: int) -> random.Random:
    """Document ``index`` depends only on (seed, index): shards of any size hold the same documents."""
    return random.Random(seed * 1_000_000_007 + index)


def write_corpus(
    out: str | Path,
    docs: int,
    image_size: int = 64,
    seed: int = 0,
    shard_size: int = 1000,
    prefix: str = "train",
    progress: bool = True,
    mix: dict[str, float] | None = None,
) -> list[Path]:
    """Write ``docs`` documents as ``OUT/PREFIX-000000.tar ...``; returns the shard paths."""
    if docs <= 0 or shard_size <= 0 or image_size < 16:
        raise ValueError(f"need docs > 0, shard_size > 0, image_size >= 16 (got {docs}, {shard_size}, {image_size})")
    mix = check_mix(mix or DOC_KINDS)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with Progress(f"synth {prefix}", total=docs, unit="docs", enabled=progress) as prog:
        for shard, start in enumerate(range(0, docs, shard_size)):
            members: list[tuple[str, bytes]] = []
            for i in range(start, min(docs, start + shard_size)):
                doc = make_document(document_rng(seed, i), image_size, key=f"{prefix}-{i:08d}", mix=mix)
                members += document_to_tar_members(doc)
                prog.update(1)
            path = out / f"{prefix}-{shard:06d}.tar"
            write_tar(path, members)
            paths.append(path)
    return paths


def caption_image_pairs(urls, limit: int | None = None) -> list[tuple[str, Image.Image]]:
    """(caption, image) for every caption directly before or after its image in the shards ``urls``
    (a brace pattern or list), e.g. the held-out split's evaluation prompts and references."""
    pairs: list[tuple[str, Image.Image]] = []
    for doc in iter_documents(urls):
        segs = doc.segments
        for i, seg in enumerate(segs):
            if not isinstance(seg, Image.Image):
                continue
            for j in (i - 1, i + 1):  # caption_image / multi_image: before; image_caption: after
                if 0 <= j < len(segs) and isinstance(segs[j], str) and parse_caption(segs[j]) is not None:
                    pairs.append((segs[j], seg))
                    break
            if limit is not None and len(pairs) >= limit:
                return pairs
    return pairs


HELDOUT_SEED_OFFSET = 7919  # the held-out split uses seed + this, so it never repeats training documents' draws


def write_synth(
    out: str | Path,
    docs: int,
    image_size: int = 64,
    seed: int = 0,
    shard_size: int = 1000,
    heldout_docs: int | None = None,
    progress: bool = True,
    mix: dict[str, float] | None = None,
) -> dict:
    """The ``tessera data synth`` command: train shards, held-out shards and a manifest ``synth.json``.
    ``mix``: document kind -> weight (default DOC_KINDS), the same for both splits."""
    out = Path(out)
    mix = check_mix(mix or DOC_KINDS)
    heldout_docs = max(1, docs // 10) if heldout_docs is None else heldout_docs
    train = write_corpus(out, docs, image_size, seed, shard_size, "train", progress, mix)
    heldout = (
        write_corpus(out, heldout_docs, image_size, seed + HELDOUT_SEED_OFFSET, shard_size, "heldout", progress, mix)
        if heldout_docs > 0
        else []
    )
    manifest = {
        "docs": docs,
        "heldout_docs": heldout_docs,
        "image_size": image_size,
        "seed": seed,
        "mix": mix,
        "heldout_seed": seed + HELDOUT_SEED_OFFSET,
        "shard_size": shard_size,
        "train_shards": [p.name for p in train],
        "heldout_shards": [p.name for p in heldout],
        "train_pattern": _brace_pattern(out, "train", len(train)),
        "heldout_pattern": _brace_pattern(out, "heldout", len(heldout)) if heldout else None,
    }
    atomic_write_json(out / "synth.json", manifest)
    return manifest


def _brace_pattern(out: Path, prefix: str, n: int) -> str:
    if n == 1:
        return str(out / f"{prefix}-000000.tar")
    return str(out / f"{prefix}-{{000000..{n - 1:06d}}}.tar")
