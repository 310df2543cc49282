"""Build the embedded Fashion-MNIST demo data set (latent_patch/assets/fashion_mnist/).

Reads the original idx .gz files (Debian: `apt-get install dataset-fashion-mnist`), keeps the
first N images of every class from the training file and the first M of every class from the
t10k file (file order, so the choice is deterministic), and writes them as webdataset shards:
gzip-compressed tars of `{key}.png` (28x28 grey) + `{key}.cls` (ASCII class index). Tars carry
mtime 0, uid/gid 0 and sorted, fixed member order, and the gzip header has no name and mtime 0,
so a rebuild with the same Pillow / zlib gives the same bytes (`dataset.json` lists the sha256s).

    python tools/build_demo_data.py --src /usr/share/datasets/fashion-mnist \
        --out latent_patch/assets/fashion_mnist --per-class 1000 --test-per-class 500

Also the one place that says how the demo turns a 28x28 grey image into model pixels
(`to_model_pixels`), and a small reader (`load_split`) the two training tools and the tests use.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
RESOLUTION = 64  # demo resolution: the encoder ADM-crops 28 -> 64 (bicubic) and converts to RGB
SOURCE_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
LICENSE_TEXT = """\
Fashion-MNIST (https://github.com/zalandoresearch/fashion-mnist)

The MIT License (MIT)

Copyright (c) 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""

DEFAULT_ASSETS = Path(__file__).resolve().parents[1] / "latent_patch" / "assets" / "fashion_mnist"


# --------------------------------------------------------------------------- preprocessing

def to_model_pixels(img: Image.Image, resolution: int = RESOLUTION) -> np.ndarray:
    """28x28 grey PIL image -> uint8 (3, R, R): convert("RGB"), bicubic resize to R x R.

    This is what the encoder's ADM center crop does to a square image; the model sees
    `pixels / 127.5 - 1` (see `to_float`).
    """
    rgb = img.convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy()


def to_float(pixels):
    """uint8 pixels (numpy or torch) -> float in [-1, 1]."""
    return pixels.float() / 127.5 - 1 if hasattr(pixels, "float") else pixels.astype(np.float32) / 127.5 - 1


# --------------------------------------------------------------------------- reading

def read_idx(images_gz: Path, labels_gz: Path) -> tuple[np.ndarray, np.ndarray]:
    """Original Fashion-MNIST idx files -> (uint8 (N, 28, 28), uint8 (N,))."""
    with gzip.open(images_gz, "rb") as f:
        raw = f.read()
    magic, n, rows, cols = np.frombuffer(raw[:16], dtype=">u4")
    if magic != 2051:
        raise ValueError(f"{images_gz}: not an idx3 image file (magic {magic})")
    images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    with gzip.open(labels_gz, "rb") as f:
        raw = f.read()
    magic, m = np.frombuffer(raw[:8], dtype=">u4")
    if magic != 2049 or m != n:
        raise ValueError(f"{labels_gz}: not an idx1 label file for {n} images")
    labels = np.frombuffer(raw, dtype=np.uint8, offset=8)
    return images, labels


def shard_paths(root: str | os.PathLike, split: str) -> list[Path]:
    paths = sorted(Path(root).glob(f"{split}-*.tar.gz"))
    if not paths:
        raise FileNotFoundError(f"no {split}-*.tar.gz shards in {root}")
    return paths


def iter_split(root: str | os.PathLike, split: str):
    """Yield (key, PIL grey image, class index) from the shipped shards, in shard order."""
    for path in shard_paths(root, split):
        with tarfile.open(path, "r:gz") as tar:
            pending: dict[str, dict[str, bytes]] = {}
            for member in tar:
                key, ext = member.name.split(".", 1)
                pending.setdefault(key, {})[ext] = tar.extractfile(member).read()
                if len(pending[key]) == 2:
                    sample = pending.pop(key)
                    img = Image.open(io.BytesIO(sample["png"]))
                    img.load()
                    yield key, img, int(sample["cls"].decode("ascii"))
            if pending:
                raise ValueError(f"{path}: incomplete samples {sorted(pending)[:3]}")


def seeded_splits(root: str | os.PathLike, seed: int, threads: int):
    """Common start of the demo trainings: thread count, seeds, both splits loaded and reported.

    Returns (generator, (train_x, train_y), (test_x, test_y)).
    """
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train, test = load_split(root, "train"), load_split(root, "test")
    print(f"train {tuple(train[0].shape)}, test {tuple(test[0].shape)}", flush=True)
    return gen, train, test


def load_split(root: str | os.PathLike = DEFAULT_ASSETS, split: str = "train",
               resolution: int = RESOLUTION, limit: int | None = None):
    """The shipped images of a split as model pixels: (uint8 (N, 3, R, R), int64 (N,)) torch tensors."""
    import torch

    pixels, labels = [], []
    for _, img, cls in iter_split(root, split):
        pixels.append(to_model_pixels(img, resolution))
        labels.append(cls)
        if limit is not None and len(labels) >= limit:
            break
    return torch.from_numpy(np.stack(pixels)), torch.tensor(labels, dtype=torch.int64)


# --------------------------------------------------------------------------- writing

def select_first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices (in file order) of the first `per_class` images of every class."""
    chosen = []
    for c in range(len(CLASS_NAMES)):
        idx = np.flatnonzero(labels == c)[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} images, {per_class} requested")
        chosen.append(idx)
    return np.sort(np.concatenate(chosen))


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_shard(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    """Write one gzip-compressed tar atomically (temp file + rename), byte-reproducibly."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                                               compresslevel=9) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, png, cls in samples:
                _add(tar, f"{key}.cls", str(cls).encode("ascii"))
                _add(tar, f"{key}.png", png)
    os.replace(tmp, path)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_split(src: Path, out: Path, split: str, per_class: int, shard_size: int) -> dict:
    images, labels = read_idx(*(src / name for name in SOURCE_FILES[split]))
    chosen = select_first_per_class(labels, per_class)
    for old in out.glob(f"{split}-*.tar.gz"):
        old.unlink()
    shards = []
    for s, start in enumerate(range(0, len(chosen), shard_size)):
        part = chosen[start:start + shard_size]
        samples = [(f"{split}_{i:05d}", png_bytes(images[i]), int(labels[i])) for i in part]
        path = out / f"{split}-{s:06d}.tar.gz"
        write_shard(path, samples)
        shards.append({"name": path.name, "num_samples": len(part), "sha256": sha256(path)})
        print(f"  {path.name}: {len(part)} images, {path.stat().st_size / 1e6:.2f} MB", flush=True)
    return {
        "source_images": SOURCE_FILES[split][0],
        "source_sha256": {n: sha256(src / n) for n in SOURCE_FILES[split]},
        "selection": f"first {per_class} images of each class in file order",
        "per_class": per_class,
        "num_images": int(len(chosen)),
        "shards": shards,
    }


README_TEXT = """\
# Embedded Fashion-MNIST subset (demo data)

A class-balanced subset of Fashion-MNIST (Zalando SE, MIT licence, see LICENSE.txt), shipped so the
demo runs offline.

- `train-*.tar.gz`: the first {train_pc} images of each class of `train-images-idx3-ubyte`
  ({train_n} images).
- `test-*.tar.gz`: the first {test_pc} images of each class of `t10k-images-idx3-ubyte`
  ({test_n} images, held out: reference statistics, reconstruction PSNR, classifier accuracy).
- Shards are webdataset tars, gzip-compressed (an uncompressed tar spends 512-byte blocks on every
  header and member: about 30 MB instead of 7.4 MB). Each sample is `{{key}}.png` (28x28 8-bit grey
  PNG) + `{{key}}.cls` (class index, ASCII digits); `key` is `{{split}}_{{index:05d}}` with `index`
  the image's position in the original idx file.
- `classes.txt`: the 10 class names, one per line, in class-index order.
- `dataset.json`: counts, source-file and shard sha256s.

The demo uses these images at 64 px RGB: grey 28x28 -> `convert("RGB")` -> bicubic resize to
64x64 -> `x / 127.5 - 1` (what the ADM center crop does to a square image).

Rebuild (byte-identical with the same Pillow / zlib):

    apt-get install -y dataset-fashion-mnist
    python tools/build_demo_data.py --src /usr/share/datasets/fashion-mnist \\
        --out latent_patch/assets/fashion_mnist --per-class {train_pc} --test-per-class {test_pc}
"""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                   help="folder with the original *-ubyte.gz files")
    p.add_argument("--out", type=Path, default=DEFAULT_ASSETS)
    p.add_argument("--per-class", type=int, default=1000, help="training images per class")
    p.add_argument("--test-per-class", type=int, default=500, help="held-out images per class")
    p.add_argument("--shard-size", type=int, default=2500, help="images per tar")
    args = p.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    info = {"name": "fashion-mnist-subset", "license": "MIT, Copyright (c) 2017 Zalando SE",
            "classes": CLASS_NAMES, "resolution_source": 28, "splits": {}}
    for split, pc in (("train", args.per_class), ("test", args.test_per_class)):
        print(f"{split}: {pc} per class", flush=True)
        info["splits"][split] = build_split(args.src, args.out, split, pc, args.shard_size)
    (args.out / "classes.txt").write_text("".join(n + "\n" for n in CLASS_NAMES))
    (args.out / "LICENSE.txt").write_text(LICENSE_TEXT)
    (args.out / "README.md").write_text(README_TEXT.format(
        train_pc=args.per_class, test_pc=args.test_per_class,
        train_n=info["splits"]["train"]["num_images"], test_n=info["splits"]["test"]["num_images"]))
    (args.out / "dataset.json").write_text(json.dumps(info, indent=2) + "\n")
    total = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"wrote {args.out}: {total / 1e6:.2f} MB in total", flush=True)


if __name__ == "__main__":
    main()
