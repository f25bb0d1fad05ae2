"""Generated coloured-shape images: training data for the demo/test VQ tokenizers (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = [(220, 40, 40), (40, 160, 60), (40, 80, 220), (240, 200, 30), (150, 60, 190), (20, 20, 20), (250, 130, 20)]
BACKGROUNDS = [(255, 255, 255), (235, 235, 225), (200, 225, 245), (40, 40, 60)]


def shape_image(rng: random.Random, size: int = 64, max_shapes: int = 3) -> Image.Image:
    """One RGB image with 1..max_shapes filled circles, rectangles or triangles on a plain background."""
    img = Image.new("RGB", (size, size), rng.choice(BACKGROUNDS))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(1, max_shapes)):
        colour = rng.choice(COLOURS)
        r = rng.uniform(0.15, 0.35) * size
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        kind = rng.choice(("circle", "rect", "triangle"))
        if kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
        elif kind == "rect":
            draw.rectangle((cx - r, cy - 0.7 * r, cx + r, cy + 0.7 * r), fill=colour)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return img


def shape_images(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    rng = random.Random(seed)
    return [shape_image(rng, size) for _ in range(n)]


def write_shape_folder(directory: str | Path, n: int, size: int = 64, seed: int = 0) -> list[Path]:
    """Write ``n`` PNGs (shape_00000.png, ...) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(shape_images(n, size, seed)):
        p = directory / f"shape_{i:05d}.png"
        img.save(p)
        paths.append(p)
    return paths
