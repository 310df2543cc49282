"""FID / FD: the Frechet distance itself, reference statistics from every accepted source, scoring.

Offline and fast: cheap custom feature extractors stand in for Inception (whose weights this
machine does not have); the demo classifier is built with random weights where needed.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from latent_patch import fid, sampling


def toy_features(images: np.ndarray) -> np.ndarray:
    """Per-channel means and a few fixed pixels: 8 features per image."""
    x = images.astype(np.float64)
    return np.concatenate([x.mean(axis=(1, 2)), x.reshape(len(x), -1)[:, ::53][:, :5]], axis=1)


def pixel_features(name: str = "toy") -> fid.CallableFeatures:
    """A cheap deterministic extractor (:func:`toy_features`) that counts its calls."""
    calls = []

    def fn(images: np.ndarray) -> np.ndarray:
        calls.append(len(images))
        return toy_features(images)

    ext = fid.CallableFeatures(fn, name, dim=8)
    ext.calls = calls  # type: ignore[attr-defined]
    return ext


def random_images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def write_pngs(folder: Path, images: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:04d}.png")


# --------------------------------------------------------------------------- the distance

def test_frechet_distance_matches_direct_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 16))
    b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    mu1, s1 = fid.stats_of(a)
    mu2, s2 = fid.stats_of(b)
    assert np.allclose(mu1, a.mean(0)) and np.allclose(s1, np.cov(a, rowvar=False))
    covmean = linalg.sqrtm(s1 @ s2).real
    direct = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-6)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- reference statistics

def test_stats_npz_roundtrip_and_checks(tmp_path):
    ext = pixel_features()
    feats = ext.features(random_images(30))
    stats = fid.Stats(*fid.stats_of(feats), num=30, extractor="toy", source="x")
    stats.save(tmp_path / "ref.npz")
    with np.load(tmp_path / "ref.npz", allow_pickle=False) as f:  # clean-fid / ADM readable keys
        assert f["mu"].shape == (8,) and f["sigma"].shape == (8, 8)
    loaded = fid.load_reference(tmp_path / "ref.npz", ext)
    assert np.array_equal(loaded.mu, stats.mu) and loaded.num == 30 and loaded.extractor == "toy"
    with pytest.raises(ValueError, match="computed with 'toy'"):
        fid.load_reference(tmp_path / "ref.npz", pixel_features("other"))
    # a bare clean-fid style file (mu/sigma only) is accepted for any extractor of that width
    np.savez(tmp_path / "bare.npz", mu=stats.mu, sigma=stats.sigma)
    assert np.array_equal(fid.load_reference(tmp_path / "bare.npz", pixel_features("other")).sigma, stats.sigma)


def test_adm_reference_batch_uses_images_when_stats_do_not_fit(tmp_path):
    ext = pixel_features()
    imgs = random_images(20, seed=1)
    # VIRTUAL_imagenet256_labeled.npz style: arr_0 images + 2048-d Inception mu/sigma
    np.savez(tmp_path / "adm.npz", arr_0=imgs, mu=np.zeros(2048), sigma=np.eye(2048))
    stats = fid.load_reference(tmp_path / "adm.npz", ext)
    mu, sigma = fid.stats_of(ext.features(imgs))
    assert np.allclose(stats.mu, mu) and np.allclose(stats.sigma, sigma) and stats.num == 20
    np.savez(tmp_path / "nostats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="no arr_0"):
        fid.load_reference(tmp_path / "nostats.npz", ext)


def test_folder_reference_is_cached_and_refreshed(tmp_path):
    imgs = random_images(12, size=20)
    write_pngs(tmp_path / "real", imgs)
    ext = pixel_features()
    stats = fid.load_reference(tmp_path / "real", ext, resolution=20)
    mu, sigma = fid.stats_of(ext.features(imgs))
    assert np.allclose(stats.mu, mu) and np.allclose(stats.sigma, sigma) and stats.num == 12
    caches = list(tmp_path.glob("real.toy-r20.stats.npz"))
    assert len(caches) == 1
    before = sum(ext.calls)
    fid.load_reference(tmp_path / "real", ext, resolution=20)
    assert sum(ext.calls) == before  # served from the cache
    write_pngs(tmp_path / "real", random_images(13, size=20, seed=5))  # folder changed: recompute
    assert fid.load_reference(tmp_path / "real", ext, resolution=20).num == 13
    # another resolution ADM-crops first (20 -> 8 px) and has its own cache
    small = fid.load_reference(tmp_path / "real", ext, resolution=8)
    assert small.resolution == 8 and (tmp_path / "real.toy-r8.stats.npz").is_file()


def _tar_gz(path: Path, images: np.ndarray, labels: list[int]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for i, (img, cls) in enumerate(zip(images, labels)):
            for name, data in ((f"s_{i:05d}.cls", str(cls).encode()), (f"s_{i:05d}.png", _png(img))):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_tar_shards_and_fid_ref_command(tmp_path, monkeypatch, capsys):
    grey = np.random.default_rng(2).integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    (tmp_path / "shards").mkdir()
    _tar_gz(tmp_path / "shards" / "test-000000.tar.gz", rgb[:6], list(range(6)))
    _tar_gz(tmp_path / "shards" / "test-000001.tar.gz", rgb[6:], list(range(4)))
    items = list(fid.iter_images(tmp_path / "shards", resolution=64))
    assert len(items) == 10 and items[0][0].shape == (64, 64, 3) and [c for _, c in items][:7] == [0, 1, 2, 3, 4, 5, 0]
    # 28 -> 64 is one bicubic resize, as the demo's to_model_pixels does
    expect = np.asarray(Image.fromarray(rgb[3]).resize((64, 64), Image.BICUBIC))
    assert np.array_equal(items[3][0], expect)
    ext = pixel_features()
    monkeypatch.setattr(fid, "build_extractor", lambda *a, **k: ext)
    sampling.main_ref(["--source", str(tmp_path / "shards"), "--out", str(tmp_path / "ref.npz"), "--resolution", "64",
                  "--features", "demo"])
    line = capsys.readouterr().out.strip().splitlines()[-1]  # one summary line: what, where, rate
    assert re.fullmatch(rf"fid-ref done: statistics of 10 images of {re.escape(str(tmp_path / 'shards'))} \(\S+ "
                        rf"features, 8-d, 64 px\) in {re.escape(str(tmp_path / 'ref.npz'))}; [\d.]+ s \([\d.]+ images/s\)",
                        line), line
    stats = fid.Stats.load(tmp_path / "ref.npz")
    assert stats.num == 10 and stats.resolution == 64


# --------------------------------------------------------------------------- scoring

def test_classifier_features_give_fd_and_accuracy(tmp_path):
    from latent_patch.classifier import DemoClassifier

    torch.manual_seed(0)
    model = DemoClassifier(widths=(8, 8, 8)).eval()
    ext = fid.ClassifierFeatures(model, name="demo")
    imgs = random_images(24, size=64)
    preds = ext.predict(imgs)
    ref = fid.Stats(*fid.stats_of(ext.features(imgs)), num=24, extractor="demo")
    m = fid.score_batches([(imgs[:10], preds[:10]), (imgs[10:], preds[10:])], ext, ref, "ref", progress=False)
    assert m["fd"] == pytest.approx(0.0, abs=1e-6) and m["class_accuracy"] == 1.0 and m["num_samples"] == 24
    m = fid.score_batches([(imgs, (preds + 1) % 10)], ext, ref, progress=False)
    assert m["class_accuracy"] == 0.0 and "fid" not in m


def direct_fd(a: np.ndarray, b: np.ndarray) -> float:
    """FD of two feature sets with numpy + scipy alone (no fid.py code)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_samples_npz_scoring_writes_metrics(tmp_path, monkeypatch, capsys):
    imgs = random_images(16, size=16, seed=3)
    real = random_images(16, size=16, seed=4)
    np.savez(tmp_path / "samples.npz", arr_0=imgs, labels=np.arange(16) % 4)
    write_pngs(tmp_path / "real", real)
    ext = pixel_features()
    monkeypatch.setattr(fid, "build_extractor", lambda *a, **k: ext)
    m = sampling.main_fid(["--samples", str(tmp_path / "samples.npz"), "--fid-ref", str(tmp_path / "real"),
                           "--features", "demo", "--batch-size", "5"])
    # the expected FD from the arrays written above: 16 px PNGs are read back at 16 px unchanged
    expect = direct_fd(toy_features(imgs), toy_features(real))
    assert expect > 1.0  # two different image sets: a zero would not tell anything
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert m["fd"] == pytest.approx(expect, rel=1e-6) and saved["fd"] == pytest.approx(expect, rel=1e-6)
    assert saved["num_samples"] == 16 and saved["ref_num"] == 16 and saved["features"] == "toy"


def test_missing_inception_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        fid.resolve_inception(tmp_path / "nowhere.pt")
    with pytest.raises(FileNotFoundError, match="--inception"):
        fid.resolve_inception(tmp_path)


class _FakeLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, 2048, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.nn.functional.adaptive_avg_pool2d(x, 4)).mean(dim=(2, 3), keepdim=True)


class _FakeInception(torch.nn.Module):
    """Same TorchScript interface as inception-2015-12-05.pt (``layers``, ``return_features``)."""

    def __init__(self):
        super().__init__()
        self.layers = _FakeLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x).flatten(1)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit: what clean-fid itself uses
def test_inception_path_with_a_local_torchscript_file(tmp_path):
    """The clean-fid glue (local file, clean 299 px resize, 2048-d rows) with stand-in weights."""
    torch.manual_seed(0)
    torch.jit.script(_FakeInception()).save(str(tmp_path / fid.INCEPTION_FILE))
    ext = fid.InceptionFeatures(tmp_path / fid.INCEPTION_FILE, device="cpu")
    imgs = random_images(3, size=16)
    feats = ext.features(imgs)
    assert feats.shape == (3, 2048) and feats.dtype == np.float64
    from cleanfid.resize import build_resizer

    x = torch.from_numpy(build_resizer("clean")(imgs[1])).permute(2, 0, 1)[None]
    with torch.no_grad():
        expect = ext.model.base.layers((x - 128) / 128).flatten(1).double().numpy()
    assert np.allclose(feats[1], expect[0], atol=1e-5)


def test_npz_streamed_batches_equal_np_load(tmp_path, monkeypatch):
    """sample.py fid reads samples.npz once, batch by batch (issue 13: it was loaded twice, whole)."""
    def whole_array_read(self, key):
        raise AssertionError(f"the whole {key} was loaded")

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", whole_array_read)
    rng = np.random.default_rng(0)
    imgs, labels = rng.integers(0, 256, (23, 8, 8, 3), dtype=np.uint8), np.arange(23, dtype=np.int64) % 5
    np.savez(tmp_path / "s.npz", arr_0=imgs, labels=labels)
    got = list(fid.iter_npz_batches(tmp_path / "s.npz", batch_size=10))
    assert [len(b) for b, _ in got] == [10, 10, 3]
    assert np.array_equal(np.concatenate([b for b, _ in got]), imgs)
    assert np.array_equal(np.concatenate([lab for _, lab in got]), labels)
    np.savez(tmp_path / "nolabels.npz", arr_0=imgs)
    assert (np.concatenate([lab for _, lab in fid.iter_npz_batches(tmp_path / "nolabels.npz")]) == -1).all()
