"""The one image preprocessing (Chameleon's): decode, RGB, shortest side to ``size`` with LANCZOS, centre crop.

Every path that turns a picture into VQ codes goes through ``fit_image``: ``tessera data pretokenize``
(through ``tessera.data.raw``'s decoded documents), VQ training's loader, ``tessera tokenizer encode``
and generation's image prompts (both through ``ImageTokenizer.encode``). So the codes a model trains on
are the codes its tokenizer was trained on and is used with, and what an imported Chameleon saw.
This module needs only PIL and numpy, so data readers import it without torch.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


def open_image(src: bytes | str | Path) -> Image.Image:
    """Encoded bytes or a file -> a fully decoded PIL image with its EXIF orientation applied.

    Raises PIL's / the OS's own exceptions on bad input (callers count or name them); ``load()`` here
    so that a truncated file fails now, not later inside a batch."""
    with Image.open(io.BytesIO(src) if isinstance(src, bytes | bytearray) else src) as im:
        im.load()
        out = ImageOps.exif_transpose(im)
        return out if out is not None and out is not im else im.copy()


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is alpha-blended onto white (as Chameleon does)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P" or (img.mode in ("L", "RGB") and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
        elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0  # 16-bit range onto 8 bits
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBa", "La"):  # premultiplied alpha: blending onto white is colour + white * (1 - a)
        arr = np.asarray(img, dtype=np.float32)
        col = arr[..., :-1] if img.mode == "RGBa" else np.repeat(arr[..., :1], 3, axis=-1)
        rgb = col + 255.0 * (1.0 - arr[..., -1:] / 255.0)
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if img.mode == "1":
        img = img.convert("L")
    return img.convert("RGB")


def fit_image(img: Image.Image, size: int) -> Image.Image:
    """RGB, shortest side resized to ``size`` (LANCZOS, rounded as Meta's reference), centre crop to
    ``size`` x ``size``. Idempotent: an RGB image already ``size`` x ``size`` comes back unchanged."""
    img = to_rgb(img)
    w, h = img.size
    if w == 0 or h == 0:
        raise ValueError("image has zero size")
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    if (nw, nh) == (size, size):
        return img
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pixels(img: Image.Image) -> np.ndarray:
    """uint8 [3, H, W] of an RGB image (what the VQ encoder's input is scaled from: x / 127.5 - 1)."""
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()
