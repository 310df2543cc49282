"""FID against an ADM reference batch, through sample.py's entry points (main, `fid`, `fid-ref`).

An ADM reference npz (as guided-diffusion's evaluator writes, e.g. VIRTUAL_imagenet256_labeled.npz)
holds ``arr_0`` (uint8 N x H x W x 3 real images) and 2048-d Inception ``mu``/``sigma`` (plus
``mu_s``/``sigma_s``). With a 2048-d extractor the stored statistics are used; ``--ref-from-images``
featurises ``arr_0`` instead, ADM-cropped to the generated resolution.

The Inception network is replaced by a toy 2048-d extractor named "inception" (monkeypatched into
``fid.build_extractor``): a few informative features, zero elsewhere. The expected distances are
computed here independently of latent_patch (own ADM crop, numpy statistics, scipy). One 2048-d
matrix square root (in the product's scoring) costs ~8 s on a small CPU, so each test does one.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import linalg

import sample as sample_cli
from latent_patch import fid
from tests.test_sampling import _tiny_vae, _write_checkpoint, load_npz

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, GEN = 2048, 16  # Inception's feature width; the tiny VAE's image side


def informative(images: np.ndarray) -> np.ndarray:
    """7 position-dependent features (so a crop changes them): channel means, channel stds, and the
    mean of the top-left quarter."""
    x = images.astype(np.float64) / 255
    h, w = x.shape[1] // 2, x.shape[2] // 2
    return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)), x[:, :h, :w].mean(axis=(1, 2, 3))[:, None]], 1)


K = 7


def toy_inception(seen_sizes: list) -> fid.CallableFeatures:
    def fn(images: np.ndarray) -> np.ndarray:
        seen_sizes.append(images.shape[1:3])
        out = np.zeros((len(images), DIM))
        out[:, :K] = informative(images)
        return out

    return fid.CallableFeatures(fn, "inception", dim=DIM)


def adm_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr, as its image_datasets.py has it."""
    pil = Image.fromarray(arr)
    while min(*pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    a = np.array(pil)
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y:y + size, x:x + size]


def expected_fd(feats: np.ndarray, mu_ref: np.ndarray, sigma_ref: np.ndarray) -> float:
    """FD of samples whose features vary only in the first K dims against any reference: the
    sample covariance S is zero outside the K x K block, so S @ sigma_ref's nonzero eigenvalues are
    those of S_KK @ sigma_ref_KK when sigma_ref has no coupling from the block to the rest."""
    assert np.all(feats[:, K:] == 0)
    mu, S = feats.mean(0), np.cov(feats, rowvar=False)
    assert np.all(sigma_ref[:K, K:] == 0)
    ev = np.linalg.eigvals(S[:K, :K] @ sigma_ref[:K, :K]).real
    return float(((mu - mu_ref) ** 2).sum() + np.trace(S) + np.trace(sigma_ref) - 2 * np.sqrt(ev.clip(0)).sum())


def adm_reference(path: Path, n: int = 24, side: int = 40, seed: int = 0) -> dict:
    """An ADM reference batch: real images bigger than the generated ones, 2048-d stats."""
    rng = np.random.default_rng(seed)
    arr_0 = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    arr_0[:, : side // 2, : side // 2] //= 2  # a darker corner: where the crop cuts matters
    mu = rng.normal(size=DIM) * 0.1
    A = rng.normal(size=(K, K)) * 0.1
    sigma = np.diag(rng.uniform(0.01, 0.02, DIM))
    sigma[:K, :K] = A @ A.T + 0.01 * np.eye(K)
    ref = {"arr_0": arr_0, "mu": mu, "sigma": sigma, "mu_s": np.zeros(7), "sigma_s": np.eye(7)}
    np.savez(path, **ref)
    return ref


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("adm")
    _tiny_vae(root / "vae")
    _write_checkpoint(root / "run", root / "vae")
    return root / "run"


@pytest.mark.slow  # ~8-15 s: a 2048 x 2048 matrix square root
def test_sampling_scores_against_the_stored_2048d_stats(run, tmp_path, monkeypatch, capsys):
    seen: list = []
    monkeypatch.setattr(fid, "build_extractor", lambda *a, **k: toy_inception(seen))
    ref = adm_reference(tmp_path / "VIRTUAL_ref.npz")
    out = tmp_path / "out"
    sample_cli.main(["--checkpoint", str(run), "--out", str(out), "--num-samples", "12", "--batch-size", "12",
                     "--steps", "2", "--save", "npz", "--grid", "0", "--no-progress",
                     "--fid-ref", str(tmp_path / "VIRTUAL_ref.npz")])
    printed = capsys.readouterr().out.strip().splitlines()[-1]  # the job's last line: the score's summary
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed.startswith(f"scoring done: FID {metrics['fid']:.3f} (inception features) of 12 samples in {out} "
                              f"against {tmp_path / 'VIRTUAL_ref.npz'}") and f"metrics in {out / 'metrics.json'}" in printed
    assert printed.endswith(" images/s)"), printed
    arr, _ = load_npz(out)
    assert arr.shape == (12, GEN, GEN, 3)
    assert set(seen) == {(GEN, GEN)}  # only the samples were featurised: arr_0 was not touched
    want = expected_fd(np.pad(informative(arr), ((0, 0), (0, DIM - K))), ref["mu"], ref["sigma"])
    assert metrics["features"] == "inception" and "fd" not in metrics and metrics["num_samples"] == 12
    assert metrics["fid"] == pytest.approx(want, rel=1e-6)
    assert metrics["ref_num"] == 0  # the ADM file does not say how many images made its stats


@pytest.mark.slow  # ~8-15 s: a 2048 x 2048 matrix square root
def test_fid_command_ref_from_images_crops_arr_0_to_the_generated_size(tmp_path, monkeypatch, capsys):
    seen: list = []
    monkeypatch.setattr(fid, "build_extractor", lambda *a, **k: toy_inception(seen))
    ref = adm_reference(tmp_path / "ref.npz", side=40)
    samples = np.random.default_rng(3).integers(0, 256, size=(10, GEN, GEN, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples, labels=np.arange(10))
    sample_cli.main(["fid", "--samples", str(tmp_path / "samples.npz"), "--fid-ref", str(tmp_path / "ref.npz"),
                     "--ref-from-images", "--batch-size", "4"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(seen) == {(GEN, GEN)}  # arr_0 (40 px) was cropped to 16 before the extractor saw it
    cropped = np.stack([adm_crop(a, GEN) for a in ref["arr_0"]])
    ref_feats = informative(cropped)
    mu_r, sigma_r = np.zeros(DIM), np.zeros((DIM, DIM))
    mu_r[:K], sigma_r[:K, :K] = ref_feats.mean(0), np.cov(ref_feats, rowvar=False)
    want = expected_fd(np.pad(informative(samples), ((0, 0), (0, DIM - K))), mu_r, sigma_r)
    assert metrics["fid"] == pytest.approx(want, rel=1e-6) and metrics["num_samples"] == 10
    # the crop matters here: the uncropped images and a plain centre cut give other features
    assert not np.allclose(informative(ref["arr_0"]), ref_feats)
    assert not np.allclose(informative(ref["arr_0"][:, 12:28, 12:28]), ref_feats)


def _small_toy(seen: list | None = None) -> fid.CallableFeatures:
    def fn(images):
        if seen is not None:
            seen.append(images.shape[1:3])
        return informative(images)

    return fid.CallableFeatures(fn, "toy", dim=K)


def test_fid_ref_command_and_ref_from_images_on_sampling(run, tmp_path, monkeypatch, capsys):
    """`sample.py fid-ref` over an image folder (ADM-cropped to --resolution), `sample.py fid`
    against it, and sample.py's own --fid-ref with --ref-from-images on an ADM-layout file."""
    seen: list = []
    monkeypatch.setattr(fid, "build_extractor", lambda *a, **k: _small_toy(seen))
    rng = np.random.default_rng(4)
    (tmp_path / "real").mkdir()
    real = [rng.integers(0, 256, size=(24 + i % 3 * 4, 20 + i % 2 * 13, 3), dtype=np.uint8) for i in range(12)]
    for i, img in enumerate(real):
        Image.fromarray(img).save(tmp_path / "real" / f"{i:03d}.png")
    sample_cli.main(["fid-ref", "--source", str(tmp_path / "real"), "--out", str(tmp_path / "ref.npz"),
                     "--resolution", str(GEN), "--features", "demo"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"fid-ref done: statistics of 12 images of {tmp_path / 'real'} (toy features, {K}-d, "
                           f"{GEN} px) in {tmp_path / 'ref.npz'}; ") and line.endswith(" images/s)"), line
    feats = informative(np.stack([adm_crop(im, GEN) for im in real]))
    with np.load(tmp_path / "ref.npz") as f:
        np.testing.assert_allclose(f["mu"], feats.mean(0), rtol=1e-12)
        np.testing.assert_allclose(f["sigma"], np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-15)
    # sample.py fid against it: FD by scipy's sqrtm, computed here
    samples = rng.integers(0, 256, size=(9, GEN, GEN, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    sample_cli.main(["fid", "--samples", str(tmp_path / "samples.npz"), "--fid-ref", str(tmp_path / "ref.npz")])
    m = json.loads((tmp_path / "metrics.json").read_text())
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"scoring done: FD {m['fd']:.3f} (toy features) of 9 samples in {tmp_path / 'samples.npz'} "
                           f"against {tmp_path / 'ref.npz'} (12 images); metrics in {tmp_path / 'metrics.json'}"), line
    s, r = informative(samples), feats
    mu1, s1, mu2, s2 = s.mean(0), np.cov(s, rowvar=False), r.mean(0), np.cov(r, rowvar=False)
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert m["fd"] == pytest.approx(want, rel=1e-6) and m["ref_num"] == 12
    # sampling with --fid-ref ADM-layout npz (stats that fit) and --ref-from-images: arr_0 is used
    arr_0 = rng.integers(0, 256, size=(15, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "adm.npz", arr_0=arr_0, mu=np.zeros(K), sigma=np.eye(K))
    base = ["--checkpoint", str(run), "--num-samples", "8", "--batch-size", "8", "--steps", "2", "--save", "npz",
            "--grid", "0", "--no-progress", "--fid-ref", str(tmp_path / "adm.npz")]
    sample_cli.main([*base, "--out", str(tmp_path / "stored")])
    sample_cli.main([*base, "--out", str(tmp_path / "images"), "--ref-from-images"])
    gen, _ = load_npz(tmp_path / "images")
    g = informative(gen)
    stored = json.loads((tmp_path / "stored" / "metrics.json").read_text())["fd"]
    from_images = json.loads((tmp_path / "images" / "metrics.json").read_text())["fd"]
    a = informative(np.stack([adm_crop(im, GEN) for im in arr_0]))
    for ref_mu, ref_sigma, got in ((np.zeros(K), np.eye(K), stored), (a.mean(0), np.cov(a, rowvar=False), from_images)):
        mu1, s1 = g.mean(0), np.cov(g, rowvar=False)
        want = ((mu1 - ref_mu) ** 2).sum() + np.trace(s1) + np.trace(ref_sigma) \
            - 2 * np.trace(linalg.sqrtm(s1 @ ref_sigma).real)
        assert got == pytest.approx(want, rel=1e-6)
    assert (32, 32) not in seen  # arr_0 reached the extractor only after cropping
