"""A deterministic detector for the synthetic corpus: reads the caption's attributes back from pixels.

Steps: background = the palette background nearest the median border pixel; foreground = pixels far
from it; objects = the (at most two) largest 8-connected foreground components; colour = the
palette colour nearest the mean of each component's core pixels; shape = the template (rendered
at the component's own bounding box) closest to the component's soft coverage; size from the box
side; position / relation from the box centres. Used to score text->image and image->text.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from tessera.data.synth import (
    BACKGROUNDS,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    SUPERSAMPLE,
    Scene,
    SceneObject,
    draw_shape,
    parse_caption,
)

_PAL = np.array(list(COLOURS.values()), dtype=np.float32)
_PAL_NAMES = list(COLOURS)
_BG = np.array(list(BACKGROUNDS.values()), dtype=np.float32)
_BG_NAMES = list(BACKGROUNDS)
# Foreground threshold: well under the smallest palette-to-background distance (~98), well over blur/noise.
_FG_DIST = 45.0

# Chance levels for uniformly random guesses (the corpus draws attributes uniformly).
CHANCE = {
    "colour": 1 / len(COLOURS),
    "shape": 1 / len(SHAPES),
    "colour_shape": 1 / (len(COLOURS) * len(SHAPES)),
    "size": 1 / len(SIZES),
}


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), pixels
    area: int

    @property
    def centre(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as arrays of (y, x); largest first."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        q = deque([(y0, x0)])
        pts = []
        while q:
            y, x = q.popleft()
            pts.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    yy, xx = y + dy, x + dx
                    if 0 <= yy < h and 0 <= xx < w and mask[yy, xx] and not seen[yy, xx]:
                        seen[yy, xx] = True
                        q.append((yy, xx))
        comps.append(np.array(pts))
    comps.sort(key=len, reverse=True)
    return comps


@lru_cache(maxsize=64)
def _unit_offset(shape: str) -> tuple[float, float]:
    """Centroid of ``shape``'s area relative to its box centre, in units of the half-side."""
    n = 256
    img = Image.new("L", (n, n), 0)
    draw_shape(ImageDraw.Draw(img), shape, n / 2, n / 2, n / 2, 255)
    a = np.asarray(img, dtype=np.float64)
    ys, xs = np.mgrid[0:n, 0:n] + 0.5
    return (float((a * xs).sum() / a.sum()) / (n / 2) - 1.0, float((a * ys).sum() / a.sum()) / (n / 2) - 1.0)


def _render_coverage(shape: str, cx: float, cy: float, half: float, h: int, w: int, oy: int, ox: int) -> np.ndarray:
    """Coverage of the shape over the pixel window [oy:oy+h, ox:ox+w], rendered like ``render_scene``."""
    s = SUPERSAMPLE
    img = Image.new("L", (w * s, h * s), 0)
    draw_shape(ImageDraw.Draw(img), shape, (cx - ox) * s, (cy - oy) * s, half * s, 255)
    return np.asarray(img.resize((w, h), Image.BOX), dtype=np.float32) / 255.0


def _smooth(a: np.ndarray) -> np.ndarray:
    """3x3 binomial blur: makes the fit tolerant to blur and sub-pixel misplacement."""
    p = np.pad(a, 1, mode="edge")
    p = (p[:-2] + 2 * p[1:-1] + p[2:]) / 4
    return (p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]) / 4


def _fit_shape(alpha: np.ndarray, side: int) -> tuple[str, str]:
    """(shape, size) whose exact rendering best explains the soft coverage ``alpha`` of one object.

    For each hypothesis the box centre follows from the coverage centroid minus the shape's own
    centroid offset, so the template sits where the renderer would have put it."""
    H, W = alpha.shape
    ys, xs = np.nonzero(alpha > 0.05)
    pad = 2
    oy, ox = max(0, int(ys.min()) - pad), max(0, int(xs.min()) - pad)
    ey, ex = min(H, int(ys.max()) + 1 + pad), min(W, int(xs.max()) + 1 + pad)
    crop = alpha[oy:ey, ox:ex]
    mass = float(crop.sum())
    gy, gx = np.mgrid[oy:ey, ox:ex] + 0.5
    my, mx = float((crop * gy).sum() / mass), float((crop * gx).sum() / mass)
    target = _smooth(crop)
    best, best_err = (SHAPES[0], "small"), float("inf")
    for size, frac in SIZES.items():
        half = frac * side / 2
        for shape in SHAPES:
            dx, dy = _unit_offset(shape)
            t = _render_coverage(shape, mx - dx * half, my - dy * half, half, ey - oy, ex - ox, oy, ox)
            err = float(np.abs(_smooth(t) - target).sum())
            if err < best_err:
                best, best_err = (shape, size), err
    return best


def detect(image: Image.Image, max_objects: int = 2) -> tuple[str, list[DetectedObject]]:
    """(background name, objects largest first) of a rendered (possibly blurred / noisy) scene."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    H, W, _ = rgb.shape
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    med = np.median(border, axis=0)
    bg_i = int(np.argmin(((_BG - med) ** 2).sum(1)))
    bg = _BG[bg_i]
    dist = np.sqrt(((rgb - bg) ** 2).sum(-1))
    comps = _components(dist > _FG_DIST)
    if not comps:
        return _BG_NAMES[bg_i], []
    min_area = max(3, int(0.05 * len(comps[0])))
    objects = []
    for pts in comps[:max_objects]:
        if len(pts) < min_area:
            break
        ys, xs = pts[:, 0], pts[:, 1]
        d = dist[ys, xs]
        core = d >= 0.7 * d.max()
        mean = rgb[ys[core], xs[core]].mean(0)
        ci = int(np.argmin(((_PAL - mean) ** 2).sum(1)))
        # soft coverage of this object's colour over the background, for template matching
        c = _PAL[ci]
        v = c - bg
        alpha = np.clip(((rgb - bg) @ v) / float(v @ v), 0.0, 1.0)
        region = np.zeros((H, W), dtype=bool)
        region[ys, xs] = True
        # keep the anti-aliased rim next to the component, drop the other object
        grown = region.copy()
        grown[1:] |= region[:-1]
        grown[:-1] |= region[1:]
        grown[:, 1:] |= grown[:, :-1]
        grown[:, :-1] |= grown[:, 1:]
        alpha = np.where(grown, alpha, 0.0)
        if not (alpha > 0.05).any():
            # a blob that differs from the background but not towards any palette colour (e.g. a light
            # smudge on gray in a generated image): no shape to fit, so it is not an object
            continue
        sel = alpha >= 0.5
        yy, xx = np.nonzero(sel) if sel.any() else (ys, xs)
        box = (int(xx.min()), int(yy.min()), int(xx.max()) + 1, int(yy.max()) + 1)
        shape, size = _fit_shape(alpha, max(H, W))
        objects.append(DetectedObject(_PAL_NAMES[ci], shape, size, box, int(len(pts))))
    return _BG_NAMES[bg_i], objects


def detect_scene(image: Image.Image) -> Scene | None:
    """The Scene (objects ordered subject first by a canonical rule) an image shows, or None if empty.

    With two objects the subject is the left (or upper) one and the relation is 'left of' / 'above',
    so compare scenes with ``same_scene`` which accepts either phrasing of the same layout."""
    bg, objs = detect(image)
    if not objs:
        return None
    W, H = image.size
    to_obj = [SceneObject(o.shape, o.colour, o.size) for o in objs]
    if len(objs) == 1:
        cx, cy = objs[0].centre
        pos = min(POSITIONS, key=lambda p: (POSITIONS[p][0] * W - cx) ** 2 + (POSITIONS[p][1] * H - cy) ** 2)
        return Scene((to_obj[0],), position=pos, background=bg)
    (ax, ay), (bx, by) = objs[0].centre, objs[1].centre
    if abs(ax - bx) >= abs(ay - by):
        order = (0, 1) if ax < bx else (1, 0)
        rel = "left of"
    else:
        order = (0, 1) if ay < by else (1, 0)
        rel = "above"
    return Scene((to_obj[order[0]], to_obj[order[1]]), relation=rel, background=bg)


_FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _canonical(scene: Scene) -> Scene:
    if scene.relation in ("right of", "below"):
        return Scene((scene.objects[1], scene.objects[0]), relation=_FLIP[scene.relation], background=scene.background)
    return scene


def compare_scenes(described: Scene, seen: Scene | None) -> dict:
    """Per-attribute agreement between a described scene and a detected one (1.0 / 0.0 each).

    ``colour``/``shape``/``colour_shape``/``size`` are over objects matched by layout; ``layout`` is
    the position (one object) or relation (two); ``exact`` needs everything including background."""
    res = {"colour": 0.0, "shape": 0.0, "colour_shape": 0.0, "size": 0.0, "count": 0.0, "layout": 0.0,
           "background": 0.0, "exact": 0.0}
    if seen is None:
        return res
    d, s = _canonical(described), _canonical(seen)
    res["background"] = float(d.background == s.background)
    res["count"] = float(len(d.objects) == len(s.objects))
    if len(d.objects) == len(s.objects):
        pairs = list(zip(d.objects, s.objects, strict=True))
        res["layout"] = float(d.position == s.position and d.relation == s.relation)
    else:
        # score the described subject against the most similar detected object
        pairs = [(d.objects[0], max(s.objects, key=lambda o: (o.colour == d.objects[0].colour) + (o.shape == d.objects[0].shape)))]
    n = len(pairs)
    res["colour"] = sum(a.colour == b.colour for a, b in pairs) / n
    res["shape"] = sum(a.shape == b.shape for a, b in pairs) / n
    res["colour_shape"] = sum(a.colour == b.colour and a.shape == b.shape for a, b in pairs) / n
    res["size"] = sum(a.size == b.size for a, b in pairs) / n
    res["exact"] = float(d == s)
    return res


def score_text_to_image(caption_text: str, image: Image.Image) -> dict:
    """Does a generated image show what the caption says? Keys of ``compare_scenes`` plus
    ``parsed`` (the caption is in the grammar) and ``chance`` (uniform-guess levels)."""
    described = parse_caption(caption_text)
    if described is None:
        raise ValueError(f"caption is not in the synthetic grammar: {caption_text!r}")
    res = compare_scenes(described, detect_scene(image))
    res["parsed"] = 1.0
    res["chance"] = dict(CHANCE)
    return res


def score_image_to_text(image: Image.Image, text: str) -> dict:
    """Does generated text describe the (real) image? Unparseable text scores 0 everywhere."""
    described = parse_caption(text)
    if described is None:
        res = compare_scenes(Scene((SceneObject("", "", ""),)), None)
        res["parsed"] = 0.0
    else:
        res = compare_scenes(described, detect_scene(image))
        res["parsed"] = 1.0
    res["chance"] = dict(CHANCE)
    return res
