"""FID / FD of generated images against reference statistics, with clean-fid's Inception or any
other feature extractor (the demo classifier offline).

Everything here works on uint8 NHWC RGB batches, the format the sampling job produces, so the
same code scores a sample folder, an ADM-style ``samples.npz`` or images straight out of the
sampler during training (``sampling.evaluate_model``), without a round trip through PNG files.

Inception features follow clean-fid's "clean" mode exactly (its PIL float bicubic resize to 299
and its TorchScript Inception), but the weights come from a local file: nothing is downloaded,
and a missing file is an error that says where to put it. Reference statistics are plain npz
files with ``mu`` and ``sigma`` (what clean-fid and the ADM evaluator both read), plus a few
fields that say which extractor and which images made them, so a stale or mismatched cache is
never used silently.
"""

from __future__ import annotations

import glob
import hashlib
import io
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import fsutil
from .images import adm_center_crop

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
DEFAULT_INCEPTION = Path("/tmp") / INCEPTION_FILE  # where clean-fid itself looks for it
IMAGE_EXTS = {"png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "tif", "tiff"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
STATS_FORMAT = "latent-patch-fid-stats/1"


# --------------------------------------------------------------------------- feature extractors

class FeatureExtractor:
    """uint8 NHWC RGB images -> float64 feature rows (and, for classifiers, class predictions).

    One interface for Inception and the demo classifier so the statistics, caching and the
    metrics file never need to know which network made the features.
    """

    name: str = "custom"
    dim: int | None = None  # feature width when known up front (used to vet reference files)

    def features(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, images: np.ndarray) -> np.ndarray | None:
        """Predicted class per image, or None when the extractor is not a classifier."""
        return None

    def features_and_predictions(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Both at once; classifiers override this to run the network once."""
        return self.features(images), self.predict(images)


class CallableFeatures(FeatureExtractor):
    """Wrap a plain function ``uint8 NHWC -> (B, D)`` (tests, user-supplied networks)."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], name: str = "custom",
                 dim: int | None = None):
        self.fn, self.name, self.dim = fn, name, dim

    def features(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.fn(images), dtype=np.float64)


def resolve_inception(path: str | Path | None = None) -> Path:
    """The local Inception TorchScript file, or an error telling the user where to place it.

    clean-fid would download it silently; on an offline machine that fails deep inside a run, so
    we check first and name both accepted places.
    """
    p = Path(path) if path is not None else DEFAULT_INCEPTION
    if p.is_dir():
        p = p / INCEPTION_FILE
    if not p.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {p}. This machine downloads nothing: fetch {INCEPTION_URL} "
            f"elsewhere and place it at {DEFAULT_INCEPTION} or at the path given by --inception; "
            f"or use --features demo (the offline demo classifier).")
    if p.name != INCEPTION_FILE:
        raise FileNotFoundError(f"{p}: clean-fid loads the Inception file by its name; rename it to {INCEPTION_FILE}")
    return p


class InceptionFeatures(FeatureExtractor):
    """clean-fid's Inception-V3 pool features (2048-d), its "clean" resize, weights from a local file."""

    name = "inception"
    dim = 2048

    def __init__(self, path: str | Path | None = None, device: torch.device | str | None = None,
                 batch_size: int = 64):
        from cleanfid.inception_torchscript import InceptionV3W
        from cleanfid.resize import build_resizer

        weights = resolve_inception(path)
        self.device = torch.device(device) if device is not None else _default_device()
        # TorchScript archive: loaded by torch.jit (not torch.load); the only published format.
        self.model = InceptionV3W(str(weights.parent), download=False, resize_inside=False).to(self.device).eval()
        self.resize = build_resizer("clean")
        self.batch_size = batch_size

    @torch.no_grad()
    def features(self, images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = images[start:start + self.batch_size]
            resized = np.stack([self.resize(img) for img in chunk])  # float32 (B, 299, 299, 3) in 0..255
            x = torch.from_numpy(resized).permute(0, 3, 1, 2).to(self.device)
            out.append(self.model(x).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim))


class ClassifierFeatures(FeatureExtractor):
    """A classifier with ``features(x in [-1, 1]) -> (B, D)`` and logits: penultimate-layer FD plus
    class accuracy of generated samples (the demo's offline stand-in for Inception)."""

    def __init__(self, model: torch.nn.Module, name: str = "demo", resolution: int = 64,
                 device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.name, self.resolution = name, resolution
        self.dim = getattr(model, "feature_dim", None)

    def _to_input(self, images: np.ndarray) -> torch.Tensor:
        if images.shape[1:3] != (self.resolution, self.resolution):
            images = np.stack([np.asarray(Image.fromarray(im).resize(
                (self.resolution, self.resolution), Image.BICUBIC)) for im in images])
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        return x.permute(0, 3, 1, 2).float() / 127.5 - 1

    @torch.no_grad()
    def features_and_predictions(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self._to_input(images)
        feats = self.model.features(x)
        logits = self.model.head(feats) if hasattr(self.model, "head") else self.model(x)
        return feats.double().cpu().numpy(), logits.argmax(dim=1).cpu().numpy()

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.features_and_predictions(images)[0]

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.features_and_predictions(images)[1]


def build_extractor(name: str, device: torch.device | str | None = None,
                    inception: str | Path | None = None) -> FeatureExtractor:
    """``"inception"`` (clean-fid, local weights) or ``"demo"`` (the shipped demo classifier)."""
    if name == "inception":
        return InceptionFeatures(inception, device)
    if name == "demo":
        from .classifier import load_demo_classifier

        return ClassifierFeatures(load_demo_classifier(device or _default_device()), name="demo")
    raise ValueError(f"unknown feature extractor {name!r}; expected 'inception' or 'demo'")


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


# --------------------------------------------------------------------------- statistics

@dataclass
class Stats:
    """Gaussian statistics of a feature set, and what they were computed from."""

    mu: np.ndarray
    sigma: np.ndarray
    num: int = 0
    extractor: str = ""
    source: str = ""
    resolution: int = 0
    fingerprint: str = ""  # of the source listing, so a cache of a changed folder is not reused

    def save(self, path: str | Path) -> None:
        """npz with mu/sigma (clean-fid / ADM readable) plus provenance; written atomically."""
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, num=np.int64(self.num), extractor=np.str_(self.extractor),
                 source=np.str_(self.source), resolution=np.int64(self.resolution),
                 fingerprint=np.str_(self.fingerprint), format=np.str_(STATS_FORMAT))
        fsutil.atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "Stats":
        with np.load(path, allow_pickle=False) as f:
            if "mu" not in f or "sigma" not in f:
                raise ValueError(f"{path}: no 'mu'/'sigma' arrays (keys: {sorted(f.files)})")
            get = lambda k, d: f[k].item() if k in f else d  # noqa: E731
            return cls(mu=f["mu"].astype(np.float64), sigma=f["sigma"].astype(np.float64),
                       num=int(get("num", 0)), extractor=str(get("extractor", "")),
                       source=str(get("source", str(path))), resolution=int(get("resolution", 0)),
                       fingerprint=str(get("fingerprint", "")))


def stats_of(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (N-1)-normalised covariance, as clean-fid and the ADM evaluator compute them."""
    feats = np.asarray(features, dtype=np.float64)
    if len(feats) < 2:
        raise ValueError(f"need at least 2 feature rows for a covariance, got {len(feats)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance of two Gaussians, by clean-fid's implementation (the reference number)."""
    import warnings

    from cleanfid.fid import frechet_distance as _fd

    with warnings.catch_warnings():  # clean-fid passes scipy's deprecated `disp`; harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(_fd(mu1, sigma1, mu2, sigma2))


class FeatureCollector:
    """Features (and predictions) of images arriving batch by batch, e.g. from the sampler."""

    def __init__(self, extractor: FeatureExtractor):
        self.extractor = extractor
        self.feats: list[np.ndarray] = []
        self.preds: list[np.ndarray] = []
        self.labels: list[np.ndarray] = []

    def add(self, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        feats, preds = self.extractor.features_and_predictions(images)
        self.feats.append(np.asarray(feats, dtype=np.float64))
        if preds is not None and labels is not None and (np.asarray(labels) >= 0).all():
            self.preds.append(np.asarray(preds))
            self.labels.append(np.asarray(labels))

    @property
    def num(self) -> int:
        return sum(len(f) for f in self.feats)

    def features(self) -> np.ndarray:
        return np.concatenate(self.feats) if self.feats else np.zeros((0, 0))

    def stats(self, source: str = "", resolution: int = 0, fingerprint: str = "") -> Stats:
        mu, sigma = stats_of(self.features())
        return Stats(mu, sigma, self.num, self.extractor.name, source, resolution, fingerprint)

    def accuracy(self) -> float | None:
        """Share of images the classifier assigns to their intended class (None: no classifier)."""
        if not self.preds:
            return None
        return float(np.mean(np.concatenate(self.preds) == np.concatenate(self.labels)))


# --------------------------------------------------------------------------- reading real images

def _decode_image(data: bytes | Path, resolution: int | None) -> np.ndarray:
    """RGB uint8; ADM-cropped to ``resolution`` when given, like the training images were, or FID
    would measure the difference in resizing rather than the model."""
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    img = img.convert("RGB")
    if resolution and img.size != (resolution, resolution):
        img = adm_center_crop(img, resolution)
    return np.asarray(img, dtype=np.uint8)


def _is_tar(p: Path) -> bool:
    return p.name.endswith(TAR_SUFFIXES)


def list_source(source: str | Path) -> tuple[str, list[Path]]:
    """("tars" | "images", sorted files) of a folder of images, a folder of tar shards, one tar, or
    a glob of tars (``'assets/fashion_mnist/test-*.tar.gz'``)."""
    if any(c in str(source) for c in "*?["):
        tars = sorted(Path(p) for p in glob.glob(str(source)) if _is_tar(Path(p)))
        if not tars:
            raise FileNotFoundError(f"{source}: the pattern matches no .tar / .tar.gz / .tgz file")
        return "tars", tars
    p = Path(source)
    if p.is_file():
        if _is_tar(p):
            return "tars", [p]
        raise ValueError(f"{p}: expected an image folder, a folder of tar shards or a .tar/.tar.gz file")
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such folder or file")
    tars = sorted(q for q in p.iterdir() if q.is_file() and _is_tar(q))
    if tars:
        return "tars", tars
    images = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower().lstrip(".") in IMAGE_EXTS)
    if not images:
        raise FileNotFoundError(f"{p}: no images ({', '.join(sorted(IMAGE_EXTS))}) and no tar shards")
    return "images", images


def fingerprint(files: Sequence[Path], root: Path) -> str:
    """sha256 of the relative names and sizes: cheap, and changes when the set of images does."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(root) if f.is_relative_to(root) else f.name}\t{f.stat().st_size}\n".encode())
    return h.hexdigest()


def _iter_tar(path: Path) -> Iterator[tuple[bytes, int]]:
    """(image bytes, class or -1) per webdataset sample, streamed: a sample's members are
    consecutive and share the key (the name up to the first dot of its base name)."""

    def emit(sample: dict[str, bytes]) -> Iterator[tuple[bytes, int]]:
        img = next((sample[e] for e in sample if e in IMAGE_EXTS), None)
        if img is not None:
            yield img, int(sample["cls"].decode("ascii").strip()) if "cls" in sample else -1

    with tarfile.open(path, "r:*") as tar:
        key, sample = None, {}
        for member in tar:
            if not member.isfile():
                continue
            parent, _, base = member.name.rpartition("/")
            stem, _, ext = base.partition(".")
            if f"{parent}/{stem}" != key:
                yield from emit(sample)
                key, sample = f"{parent}/{stem}", {}
            sample[ext.lower()] = tar.extractfile(member).read()
        yield from emit(sample)


def iter_images(source: str | Path, resolution: int | None = None,
                limit: int | None = None) -> Iterator[tuple[np.ndarray, int]]:
    """(uint8 HWC RGB, class or -1) for every real image of a folder or of tar shards, in order."""
    kind, files = list_source(source)
    raw: Iterable[tuple[bytes | Path, int]]
    if kind == "tars":
        raw = (s for t in files for s in _iter_tar(t))
    else:
        raw = ((f, -1) for f in files)
    for n, (data, cls) in enumerate(raw):
        if limit is not None and n >= limit:
            return
        yield _decode_image(data, resolution), cls


def batched(items: Iterable[tuple[np.ndarray, int]], batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stack (image, label) pairs into (uint8 NHWC, int64) batches; a size mismatch is an error."""
    imgs: list[np.ndarray] = []
    labels: list[int] = []
    for img, cls in items:
        if imgs and img.shape != imgs[0].shape:
            raise ValueError(f"images of different sizes ({imgs[0].shape} vs {img.shape}): pass a resolution")
        imgs.append(img)
        labels.append(cls)
        if len(imgs) == batch_size:
            yield np.stack(imgs), np.asarray(labels, dtype=np.int64)
            imgs, labels = [], []
    if imgs:
        yield np.stack(imgs), np.asarray(labels, dtype=np.int64)


def compute_stats(source: str | Path, extractor: FeatureExtractor, resolution: int | None = None,
                  batch_size: int = 100, limit: int | None = None, progress: bool = True) -> Stats:
    """Reference statistics of the real images of a folder or of image tar shards."""
    kind, files = list_source(source)
    root = Path(source) if Path(source).is_dir() else files[0].parent
    collector = FeatureCollector(extractor)
    bar = tqdm(desc=f"ref features ({extractor.name})", unit="img", disable=not progress)
    for images, _ in batched(iter_images(source, resolution, limit), batch_size):
        collector.add(images)
        bar.update(len(images))
    bar.close()
    fp = fingerprint(files, root) + (f"/limit={limit}" if limit is not None else "")
    return collector.stats(str(source), resolution or 0, fp)


# --------------------------------------------------------------------------- reference resolution

def _cache_path(source: Path, extractor: str, resolution: int | None, where: Path) -> Path:
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", source.name.split(".")[0]) or "ref"
    return where / f"{stem}.{extractor}-r{resolution or 0}.stats.npz"


def _check_stats(stats: Stats, extractor: FeatureExtractor, where: str) -> None:
    if extractor.dim is not None and stats.mu.shape != (extractor.dim,):
        raise ValueError(f"{where}: statistics have {stats.mu.shape[0]} features but the "
                         f"{extractor.name!r} extractor gives {extractor.dim}")
    if stats.extractor and stats.extractor != extractor.name:
        raise ValueError(f"{where}: statistics were computed with {stats.extractor!r}, not {extractor.name!r}")


def _stats_from_npz(path: Path, extractor: FeatureExtractor, resolution: int | None,
                    recompute: bool, batch_size: int) -> Stats:
    """mu/sigma of the file when they fit the extractor; else statistics of its ``arr_0`` images
    (an ADM reference batch carries both: its mu/sigma are TF-Inception, its arr_0 the images)."""
    with np.load(path, allow_pickle=False) as f:
        keys = set(f.files)
        has_stats = {"mu", "sigma"} <= keys
        fits = has_stats and (extractor.dim is None or f["mu"].shape == (extractor.dim,))
        if fits and not recompute:
            stats = Stats.load(path)
            _check_stats(stats, extractor, str(path))
            return stats
        if "arr_0" not in keys:
            why = "recomputing was asked for" if fits else f"its statistics do not fit the {extractor.name!r} extractor"
            raise ValueError(f"{path}: {why} and it holds no arr_0 images to compute them from "
                             f"(keys: {sorted(keys)})")
        images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: arr_0 must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")
    collector = FeatureCollector(extractor)
    for start in tqdm(range(0, len(images), batch_size), desc=f"ref features ({extractor.name})", unit="batch"):
        chunk = images[start:start + batch_size]
        if resolution and chunk.shape[1:3] != (resolution, resolution):
            chunk = np.stack([np.asarray(adm_center_crop(Image.fromarray(im), resolution)) for im in chunk])
        collector.add(chunk)
    return collector.stats(str(path), resolution or images.shape[1])


def load_reference(ref: str | Path | Stats, extractor: FeatureExtractor, resolution: int | None = None,
                   cache_dir: str | Path | None = None, recompute: bool = False,
                   batch_size: int = 100) -> Stats:
    """Reference statistics from a stats npz, an ADM reference batch, an image folder or tar shards.

    Image sources are ADM-cropped to ``resolution`` (the generated images' size), featurised
    once, and cached next to the source (or in ``cache_dir`` when that is not writable); a
    cache is reused only when extractor, resolution and the source listing all match.
    """
    if isinstance(ref, Stats):
        _check_stats(ref, extractor, "reference")
        return ref
    path = Path(ref)
    if path.is_file() and path.suffix == ".npz":
        return _stats_from_npz(path, extractor, resolution, recompute, batch_size)
    kind, files = list_source(path)
    root = path if path.is_dir() else files[0].parent
    fp = fingerprint(files, root)
    candidates = [_cache_path(path, extractor.name, resolution, path.parent)]
    if cache_dir is not None:
        candidates.append(_cache_path(path, extractor.name, resolution, Path(cache_dir)))
    for cache in candidates:
        if cache.is_file() and not recompute:
            stats = Stats.load(cache)
            if stats.fingerprint == fp and stats.extractor == extractor.name:
                return stats
    stats = compute_stats(path, extractor, resolution, batch_size)
    for cache in candidates:
        try:
            stats.save(cache)
            break
        except OSError:
            continue
    return stats


# --------------------------------------------------------------------------- scoring

def score(collector: FeatureCollector, ref: Stats, ref_name: str = "") -> dict:
    """metrics.json content: FID for Inception, FD (+ class accuracy) for other extractors."""
    mu, sigma = stats_of(collector.features())
    value = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    name = collector.extractor.name
    metrics = {"fid" if name == "inception" else "fd": value, "features": name,
               "num_samples": collector.num, "ref": ref_name or ref.source, "ref_num": ref.num}
    acc = collector.accuracy()
    if acc is not None:
        metrics["class_accuracy"] = acc
    return metrics


def score_batches(batches: Iterable[tuple[np.ndarray, np.ndarray]], extractor: FeatureExtractor,
                  ref: Stats, ref_name: str = "", progress: bool = True) -> dict:
    """Score (uint8 NHWC, intended labels) batches against reference statistics."""
    collector = FeatureCollector(extractor)
    t0 = time.perf_counter()
    bar = tqdm(desc=f"features ({extractor.name})", unit="img", disable=not progress)
    for images, labels in batches:
        collector.add(images, labels)
        bar.update(len(images))
    bar.close()
    metrics = score(collector, ref, ref_name)
    metrics["seconds"] = round(time.perf_counter() - t0, 3)
    return metrics


def iter_npz_batches(path: str | Path, batch_size: int = 100) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of an ADM-style samples npz (arr_0 uint8 NHWC, optional labels), streamed from the
    archive: 50k x 256 px is 9.8 GB, read once, batch by batch, never whole into memory."""
    import zipfile

    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{path}: not a samples .npz (not a zip archive)") from None
    with zf:
        names = set(zf.namelist())
        if "arr_0.npy" not in names:
            raise ValueError(f"{path}: no arr_0 (the images) in this .npz; it holds {sorted(names)}")
        if "labels.npy" in names:
            with zf.open("labels.npy") as f:
                labels = np.load(f, allow_pickle=False)
        with zf.open("arr_0.npy") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            if fortran or dtype.hasobject:
                raise ValueError(f"{path}: arr_0 must be a C-order plain array, got {dtype} fortran={fortran}")
            if "labels.npy" not in names:
                labels = np.full(shape[0], -1, dtype=np.int64)
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise ValueError(f"{path}: arr_0 ends after {start} of {shape[0]} images (truncated file)")
                yield np.frombuffer(data, dtype).reshape(n, *shape[1:]), labels[start:start + n]


def write_metrics(out_dir: str | Path, metrics: dict) -> Path:
    path = Path(out_dir) / "metrics.json"
    fsutil.atomic_write_json(path, metrics)
    return path


def score_line(metrics: dict, samples: str | Path, path: str | Path) -> str:
    """The scoring job's one summary line: the figure, what was scored against what, where the
    metrics went, and the feature rate over the whole pass (``metrics["seconds"]``)."""
    figure = (f"FID {metrics['fid']:.3f}" if "fid" in metrics else f"FD {metrics['fd']:.3f}")
    if metrics.get("class_accuracy") is not None:
        figure += f", class accuracy {100 * metrics['class_accuracy']:.1f}%"
    n, secs = metrics["num_samples"], metrics.get("seconds", 0.0)
    rate = f"{n / secs:.1f} images/s" if secs > 0 else "no time measured"
    return (f"scoring done: {figure} ({metrics['features']} features) of {n} samples in {samples} against "
            f"{metrics['ref']} ({metrics['ref_num']} images); metrics in {path}; features in {secs:.1f} s ({rate})")
