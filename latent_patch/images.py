"""Images in and out: safe decoding (bytes -> ADM-cropped RGB pixels), and PNG grids of generated
images (previews, sample grids, the demo's class grid). What the inputs are (listing a source) is
:mod:`latent_patch.sources`.

Decoding never raises for a bad input; it raises :class:`BadImage` with a human-readable reason,
which the encoder records and moves on.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .fsutil import atomic_write_bytes

# PIL's own hard limit (it raises DecompressionBombError above this); our default matches it, and
# a higher --max-pixels still meets PIL's guard (reported as a skip reason all the same).
DEFAULT_MAX_PIXELS = 2 * 89478485


class BadImage(Exception):
    """An input that cannot become a training image; ``str(err)`` is the reason recorded."""


# ----------------------------------------------------------------------------- decoding


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha over white, 16-bit/int/float scaled, CMYK/palette too."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I") or im.mode == "F":
        return Image.fromarray(_wide_to_uint8(np.asarray(im)), "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _wide_to_uint8(a: np.ndarray) -> np.ndarray:
    """16-bit (or 32-bit int) greys to 0..255; float images in [0, 1] or [0, 255] likewise."""
    was_float = np.issubdtype(a.dtype, np.floating)
    a = np.nan_to_num(a.astype(np.float64))
    if was_float and a.size and a.max() <= 1.0:
        a = a * 255.0
    elif a.size and a.max() > 255:
        a = np.clip(a, 0, 65535) / 257.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def adm_center_crop(im: Image.Image, res: int) -> Image.Image:
    """ADM center crop: BOX-halve while short side >= 2*res, BICUBIC to short side res, crop."""
    while min(im.size) >= 2 * res:
        im = im.resize(tuple(x // 2 for x in im.size), resample=Image.Resampling.BOX)
    scale = res / min(im.size)
    im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.Resampling.BICUBIC)
    w, h = im.size
    top, left = (h - res) // 2, (w - res) // 2
    return im.crop((left, top, left + res, top + res))


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode, turning every failure into a :class:`BadImage` reason."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise BadImage(f"too large: {w}x{h} = {w * h} pixels > limit {max_pixels}")
            if w < 1 or h < 1:
                raise BadImage(f"degenerate size {w}x{h}")
            im.load()
    except UnidentifiedImageError:
        raise BadImage("not an image (PIL cannot identify the format)") from None
    except Image.DecompressionBombError as err:
        raise BadImage(f"too large (decompression bomb guard): {err}") from None
    except BadImage:
        raise
    except Exception as err:  # truncated/corrupt streams: OSError, SyntaxError, ValueError...
        raise BadImage(f"corrupt or truncated: {type(err).__name__}: {err}") from None
    return im


def load_image(data: bytes, res: int, max_pixels: int = DEFAULT_MAX_PIXELS,
               flip: bool = False) -> np.ndarray:
    """Bytes -> ADM-cropped uint8 RGB (res, res, 3); raises :class:`BadImage` with a reason."""
    im = _open_checked(data, max_pixels)
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block should not cost the image itself
        pass
    try:
        im = adm_center_crop(_to_rgb(im), res)
    except Exception as err:  # an exotic mode PIL cannot convert: skip it, keep the job going
        raise BadImage(f"cannot convert {im.mode} image to RGB: {type(err).__name__}: {err}")
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im, dtype=np.uint8)


def to_model_pixels(batch: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1] (x / 127.5 - 1), the VAE's input convention."""
    return batch.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def safe_stem(source: str) -> str:
    """File stem with every character outside [A-Za-z0-9_-] replaced by '_' (keys hold no dot)."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", Path(source).stem)


def save_grid(images: np.ndarray, path: str | Path, per_row: int | None = None,
              row_labels: Sequence[str] | None = None) -> Path:
    """uint8 NHWC images -> one PNG, ``per_row`` per row (default: as square as possible), atomically.

    ``row_labels`` writes one label per row in a white margin on the left (a per-class grid says
    which class each row is, so nobody has to look up classes.txt).
    """
    n, h, w, c = images.shape
    cols = per_row or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[k]
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if row_labels is not None:
        picture = _label_rows(picture.convert("RGB"), list(row_labels)[:rows], h)
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _label_rows(grid: Image.Image, labels: list[str], row_height: int) -> Image.Image:
    """``grid`` with a white margin on its left holding ``labels[r]`` level with row ``r``."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    draw = ImageDraw.Draw(grid)
    margin = 8 + max((int(draw.textlength(t, font=font)) for t in labels), default=0)
    out = Image.new("RGB", (grid.width + margin, grid.height), "white")
    out.paste(grid, (margin, 0))
    draw = ImageDraw.Draw(out)
    for r, text in enumerate(labels):
        top, bottom = draw.textbbox((0, 0), text, font=font)[1::2]
        draw.text((4, r * row_height + (row_height - (bottom - top)) // 2 - top), text, fill="black", font=font)
    return out
