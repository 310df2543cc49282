"""Images in and out: image sources and safe decoding (a dataset on disk -> ADM-cropped RGB
pixels), and PNG grids of generated images (previews, sample grids, the demo's class grid).

A source is listed once, deterministically (sorted, hidden files ignored), into a :class:`Listing`:
one entry per input with a stable index, a source id, a label and where its bytes live. The index
is what makes the encoding reproducible and splittable: shard ``j`` is a fixed block of indices
whatever the number of processes. Decoding never raises for a bad input; it raises
:class:`BadImage` with a human-readable reason, which the encoder records and moves on.

Source kinds (auto-detected by :func:`list_source`):
  - ``class_tree``: ``root/<class>/<file>``; label = index of the class folder in the sorted list
    (the ImageNet train layout is this with wnid folders).
  - ``flat``: ``root/<file>`` plus a label file (ImageNet ``LOC_val_solution.csv`` or
    ``filename label`` lines).
  - ``tars``: webdataset tar shards (local paths, ``{000..009}`` brace patterns, globs, or a folder
    of tars), one input per sample, label from its ``.cls`` member.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import math
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .fsutil import atomic_write_bytes

# PIL's own hard limit (it raises DecompressionBombError above this); our default matches it, and
# a higher --max-pixels still meets PIL's guard (reported as a skip reason all the same).
DEFAULT_MAX_PIXELS = 2 * 89478485
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif", "jpe")
_TAR_LABEL_EXTS = ("cls", "class", "label")
_CLASS_NAME_FILES = ("classes.txt", "class_names.txt", "class_names.json", "class_names")
_CSV_HEADERS = {"imageid", "image_id", "filename", "file", "image", "path", "id", "name"}


class BadImage(Exception):
    """An input that cannot become a training image; ``str(err)`` is the reason recorded."""


@dataclass
class Listing:
    """Every input of a source in its deterministic order (index = position in the lists).

    ``locations`` is only set for tar sources: ``(tar path, byte offset, size)`` of the image
    member (``None`` when the sample has no image); folder inputs live at ``base/source``.
    ``problems`` holds inputs known bad at listing time (index -> reason) and ``warnings`` the
    listing-level notes (empty class folders, label file entries without a file).
    """

    kind: str
    path: str
    base: str
    sources: list[str]
    labels: list[int]
    class_names: list[str]
    locations: list[tuple[str, int, int] | None] | None = None
    problems: dict[int, str] = field(default_factory=dict)
    warnings: list[dict[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.sources)

    def read_bytes(self, i: int) -> bytes:
        """Raw bytes of input ``i`` (raises :class:`BadImage` when known bad or unreadable)."""
        if i in self.problems:
            raise BadImage(self.problems[i])
        try:
            if self.locations is None:
                return Path(self.base, self.sources[i]).read_bytes()
            loc = self.locations[i]
            assert loc is not None  # inputs without an image member are in problems
            with open(loc[0], "rb") as f:
                f.seek(loc[1])
                return f.read(loc[2])
        except OSError as err:
            raise BadImage(f"cannot read: {err.strerror or err}") from None

    def sha256(self) -> str:
        """Fingerprint of (label, source id) for every input: detects a changed source on resume."""
        h = hashlib.sha256()
        for label, src in zip(self.labels, self.sources):
            h.update(f"{label}\t{src}\n".encode())
        return h.hexdigest()


# ----------------------------------------------------------------------------- listing


def _visible(names: list[str]) -> list[str]:
    return sorted(n for n in names if not n.startswith("."))


def _looks_like_tars(spec: str) -> bool:
    return "{" in spec or any(c in spec for c in "*?[") or spec.endswith((".tar", ".tar.gz", ".tgz"))


def list_source(spec: str | Path, labels: str | Path | None = None) -> Listing:
    """List a source, detecting its kind: tars, class tree, or flat folder + ``labels`` file."""
    spec = str(spec)
    if _looks_like_tars(spec) and not os.path.isdir(spec):
        if labels is not None:
            raise ValueError(f"--labels {labels}: only for a flat folder; tar samples carry .cls")
        return list_tars(spec)
    root = Path(spec)
    if not root.exists():
        raise FileNotFoundError(f"--source {spec}: no such file or folder")
    if not root.is_dir():
        raise ValueError(f"--source {spec}: not a folder and not a .tar / brace pattern")
    entries = _visible(os.listdir(root))
    subdirs = [e for e in entries if (root / e).is_dir()]
    if labels is not None:
        return list_flat(root, labels)
    if subdirs:
        return list_class_tree(root)
    if entries and all(e.endswith((".tar", ".tar.gz", ".tgz")) for e in entries):
        return list_tars(str(root / "*.t*"))
    raise ValueError(
        f"--source {spec}: a folder of files without class subfolders needs --labels FILE "
        "(e.g. LOC_val_solution.csv or 'filename label' lines)"
    )


def _regular_files(folder: Path, prefix: str, notes: list[dict[str, str]]) -> list[str]:
    """Visible regular files of ``folder``; every other visible entry is noted, never dropped silently.

    A FIFO is never opened (it could block the job), a dangling symlink cannot be read, and a
    sub-folder is not searched: each goes into the manifest's ``skipped`` with its reason.
    """
    files = []
    for f in _visible(os.listdir(folder)):
        p = folder / f
        if p.is_file():
            files.append(f)
        elif p.is_symlink() and not p.exists():
            notes.append({"source": f"{prefix}{f}", "reason": "dangling symlink (target missing)"})
        elif p.is_dir():
            notes.append({"source": f"{prefix}{f}/", "reason": "a folder inside an image folder (not searched)"})
        else:
            notes.append({"source": f"{prefix}{f}", "reason": "not a regular file (FIFO, socket or device)"})
    return files


def list_class_tree(root: str | Path) -> Listing:
    """``root/<class>/<file>``: label = index of the class folder among the sorted folders.

    An empty class folder still takes its index (so labels stay the standard ones) and is noted.
    """
    root = Path(root)
    classes = [e for e in _visible(os.listdir(root)) if (root / e).is_dir()]
    if not classes:
        raise ValueError(f"{root}: no class folders found")
    sources: list[str] = []
    labels: list[int] = []
    notes: list[dict[str, str]] = []
    for label, name in enumerate(classes):
        files = _regular_files(root / name, f"{name}/", notes)
        if not files:
            notes.append({"source": f"{name}/",
                          "reason": "empty class folder (class kept, no images)"})
        sources += [f"{name}/{f}" for f in files]
        labels += [label] * len(files)
    return Listing("class_tree", str(root.resolve()), str(root.resolve()), sources, labels, classes,
                   warnings=notes)


def read_label_file(path: str | Path) -> dict[str, str]:
    """File name or stem -> label text, from a CSV (ImageNet val solution) or `name label` lines."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--labels {p}: no such file")
    text = p.read_text()
    first = text.split("\n", 1)[0]
    out: dict[str, str] = {}
    if p.suffix.lower() == ".csv" or "," in first:
        rows = list(csv.reader(io.StringIO(text)))
        if rows and rows[0] and rows[0][0].strip().lower() in _CSV_HEADERS:
            rows = rows[1:]
        for n, row in enumerate(rows, 1):
            if not row or not row[0].strip():
                continue
            if len(row) < 2 or not row[1].split():
                raise ValueError(f"{p}: row {n} has no label: {row!r}")
            out[row[0].strip()] = row[1].split()[0]  # val solution: first wnid of the box list
    else:
        for n, line in enumerate(text.splitlines(), 1):
            parts = line.split()
            if not parts or line.lstrip().startswith("#"):
                continue
            if len(parts) < 2:
                raise ValueError(f"{p}: line {n} is not 'filename label': {line!r}")
            out[parts[0]] = parts[1]
    if not out:
        raise ValueError(f"{p}: no labels found")
    return out


def _label_indices(raw: dict[str, str]) -> tuple[dict[str, int], list[str]]:
    """Integer labels are used as they are; names map to their index among the sorted names."""
    values = set(raw.values())
    if all(v.isdigit() for v in values):
        top = max(int(v) for v in values)
        return {k: int(v) for k, v in raw.items()}, [str(i) for i in range(top + 1)]
    names = sorted(values)
    index = {n: i for i, n in enumerate(names)}
    return {k: index[v] for k, v in raw.items()}, names


def list_flat(root: str | Path, labels_file: str | Path) -> Listing:
    """A flat folder of images labelled by a file keyed by file name or by stem (ImageId)."""
    root = Path(root)
    by_key, names = _label_indices(read_label_file(labels_file))
    notes: list[dict[str, str]] = []
    files = _regular_files(root, "", notes)
    labels: list[int] = []
    problems: dict[int, str] = {}
    used: set[str] = set()
    for i, f in enumerate(files):
        key = f if f in by_key else Path(f).stem
        if key in by_key:
            labels.append(by_key[key])
            used.add(key)
        else:
            labels.append(-1)
            problems[i] = f"no label in {Path(labels_file).name}"
    if len(problems) == len(files):
        raise ValueError(f"{root}: no file matches an entry of --labels {labels_file}")
    notes += [{"source": k, "reason": f"in {Path(labels_file).name} but no such file"}
              for k in sorted(set(by_key) - used)]
    return Listing("flat", str(root.resolve()), str(root.resolve()), files, labels, names,
                   problems=problems, warnings=notes)


def expand_tar_spec(spec: str) -> list[str]:
    """Brace patterns (``a-{000..009}.tar``) and globs to a sorted list of existing tar paths."""
    import braceexpand  # a webdataset dependency

    paths: list[str] = []
    for part in braceexpand.braceexpand(spec):
        if any(c in part for c in "*?["):
            found = sorted(glob.glob(part))
            if not found:
                raise FileNotFoundError(f"--source {spec}: pattern {part} matches no file")
            paths += found
        elif not os.path.isfile(part):
            raise FileNotFoundError(f"--source {spec}: tar shard {part} not found")
        else:
            paths.append(part)
    return [os.path.abspath(p) for p in paths]


def _split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is everything up to the first dot of the base name."""
    d, b = os.path.split(name)
    stem, _, ext = b.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _tar_samples(path: str) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Group the members of one tar into (key, {ext: member}) in file order."""
    samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    try:
        with tarfile.open(path) as tf:
            members = [m for m in tf.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError) as err:
        raise ValueError(f"{path}: not a readable tar file ({err})") from None
    for m in members:
        key, ext = _split_key(m.name)
        if not samples or samples[-1][0] != key:
            samples.append((key, {}))
        samples[-1][1][ext] = m
    return samples


def _read_member(path: str, m: tarfile.TarInfo) -> bytes:
    with open(path, "rb") as f:
        f.seek(m.offset_data)
        return f.read(m.size)


def _tar_class_names(first_tar: str, top: int) -> list[str]:
    """Names from a classes.txt / class_names(.json) beside the tars, else str(index)."""
    here = Path(first_tar).parent
    for fname in _CLASS_NAME_FILES:
        p = here / fname
        if p.is_file():
            text = p.read_text()
            names = json.loads(text) if fname.endswith(".json") else [
                ln.strip() for ln in text.splitlines() if ln.strip()]
            if len(names) <= top:
                raise ValueError(f"{p}: {len(names)} class names but labels go up to {top}")
            return [str(n) for n in names]
    return [str(i) for i in range(top + 1)]


_UNPACKED: dict[str, str] = {}


def _seekable_tar(path: str) -> str:
    """An uncompressed copy of a compressed tar (.tar.gz, .tgz, ...), made once per process.

    Inputs are read later by byte offset, which only an uncompressed tar allows; the copy lives
    in the system temp folder (as large as the unpacked tar) and is removed at exit. Plain tars
    are used in place.
    """
    with open(path, "rb") as f:
        magic = f.read(6)
    if not (magic[:2] == b"\x1f\x8b" or magic[:3] == b"BZh" or magic == b"\xfd7zXZ\x00"):
        return path
    if path not in _UNPACKED:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="latent_patch_tar_")
        atexit.register(shutil.rmtree, folder, True)
        out = os.path.join(folder, "unpacked.tar")
        try:
            with tarfile.open(path) as src, tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dst:
                for m in src:
                    dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        except (tarfile.TarError, OSError, EOFError) as err:
            raise ValueError(f"{path}: not a readable compressed tar file ({err})") from None
        _UNPACKED[path] = out
    return _UNPACKED[path]


def list_tars(spec: str) -> Listing:
    """One input per webdataset sample; its image member is read by offset (no re-scan)."""
    paths = expand_tar_spec(spec)
    sources: list[str] = []
    labels: list[int] = []
    locs: list[tuple[str, int, int] | None] = []
    problems: dict[int, str] = {}
    for original in paths:
        path = _seekable_tar(original)
        for key, members in _tar_samples(path):
            i = len(sources)
            img_ext = _pick(members, IMAGE_EXTS)
            sources.append(f"{Path(original).name}/{key}.{img_ext or 'noimage'}")
            m = members.get(img_ext) if img_ext else None
            locs.append((path, m.offset_data, m.size) if m else None)
            label = _tar_label(path, members)
            labels.append(label if label is not None else -1)
            if m is None:
                problems[i] = "no image member in this sample"
            elif label is None:
                problems[i] = "no valid .cls member in this sample"
    if not sources:
        raise ValueError(f"--source {spec}: the tar shards hold no samples")
    top = max(labels, default=-1)
    names = _tar_class_names(paths[0], top) if top >= 0 else []
    base = str(Path(paths[0]).parent)
    return Listing("tars", os.path.abspath(spec), base, sources, labels, names, locations=locs,
                   problems=problems)


def _pick(members: dict[str, tarfile.TarInfo], wanted: tuple[str, ...]) -> str | None:
    """The member extension whose last part ("1.jpg" -> "jpg") comes first in ``wanted``."""
    ranked = [(wanted.index(e.rsplit(".", 1)[-1]), e) for e in members
              if e.rsplit(".", 1)[-1] in wanted]
    return min(ranked)[1] if ranked else None


def _tar_label(path: str, members: dict[str, tarfile.TarInfo]) -> int | None:
    ext = _pick(members, _TAR_LABEL_EXTS)
    if ext is None:
        return None
    text = _read_member(path, members[ext]).decode("ascii", "replace").strip()
    return int(text) if text.isdigit() else None


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


def save_grid(images: np.ndarray, path: str | Path, per_row: int | None = None) -> Path:
    """uint8 NHWC images -> one PNG, ``per_row`` per row (default: as square as possible), atomically."""
    n, h, w, c = images.shape
    cols = per_row or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = images[k]
    buf = io.BytesIO()
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
