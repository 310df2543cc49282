"""The shipped demo assets: Fashion-MNIST shards, demo VAE, demo classifier, demo representation encoder (offline, ~30 s)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faults.common import pinned_threads

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "latent_patch" / "assets"
DATA = ASSETS / "fashion_mnist"
VAE_DIR = ASSETS / "demo_vae"
CLASSIFIER = ASSETS / "demo_classifier.safetensors"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MB = 1_000_000


def _tools():
    spec = importlib.util.spec_from_file_location("build_demo_data", ROOT / "tools" / "build_demo_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture(scope="module")
def test_split():
    """All held-out images as uint8 (N, 3, 64, 64) + labels, decoded once for the module; its
    tests run at 2 torch threads (they compare to tolerances only), the count before restored
    after the module (it used to stay at 2 for every later module of the session)."""
    with pinned_threads(2):
        yield _tools().load_split(DATA, "test")


# ----------------------------------------------------------------------------- data

def test_data_shards_counts_members_and_size():
    assert (DATA / "classes.txt").read_text().splitlines() == CLASS_NAMES
    lic = (DATA / "LICENSE.txt").read_text()
    assert "Zalando SE" in lic and "MIT" in lic
    info = json.loads((DATA / "dataset.json").read_text())
    for split, min_per_class in (("train", 1000), ("test", 100)):
        shards = sorted(DATA.glob(f"{split}-*.tar.gz"))
        assert [s.name for s in shards] == [s["name"] for s in info["splits"][split]["shards"]]
        counts, keys = Counter(), set()
        for path, meta in zip(shards, info["splits"][split]["shards"]):
            assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["sha256"]
            with tarfile.open(path, "r:gz") as tar:
                members = tar.getmembers()
                assert all(m.isfile() and m.mtime == 0 for m in members)
                exts = Counter(m.name.split(".", 1)[1] for m in members)
                assert set(exts) == {"png", "cls"} and exts["png"] == exts["cls"] == meta["num_samples"]
                for m in members:
                    if m.name.endswith(".cls"):
                        counts[int(tar.extractfile(m).read().decode("ascii"))] += 1
                        keys.add(m.name.split(".")[0])
                png = next(m for m in members if m.name.endswith(".png"))
                im = Image.open(io.BytesIO(tar.extractfile(png).read()))
                assert im.mode == "L" and im.size == (28, 28)
        assert len(keys) == sum(counts.values())  # keys unique within the split
        assert sorted(counts) == list(range(10))
        assert min(counts.values()) >= min_per_class and len(set(counts.values())) == 1  # balanced
    assert _dir_bytes(DATA) <= 10 * MB


def test_preprocessing_matches_encoder():
    """The tools' 28 -> 64 px RGB preprocessing is the encoder's ADM crop of the same PNG."""
    from latent_patch import images
    tools = _tools()
    with tarfile.open(sorted(DATA.glob("test-*.tar.gz"))[0], "r:gz") as tar:
        pngs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")][:20]
    for data in pngs:
        ours = tools.to_model_pixels(Image.open(io.BytesIO(data)))
        theirs = images.load_image(data, 64)  # uint8 (64, 64, 3)
        np.testing.assert_array_equal(ours, theirs.transpose(2, 0, 1))


# ----------------------------------------------------------------------------- VAE

def test_demo_vae_shape_and_reconstruction(test_split):
    from diffusers import AutoencoderKL

    weights = VAE_DIR / "diffusion_pytorch_model.safetensors"
    assert weights.is_file() and weights.stat().st_size <= 5 * MB
    vae = AutoencoderKL.from_pretrained(VAE_DIR).eval()
    cfg = vae.config
    assert cfg.latent_channels == 4 and 2 ** (len(cfg.block_out_channels) - 1) == 4
    assert cfg.shift_factor is None and cfg.scaling_factor > 0

    pixels = test_split[0][:500]
    x = pixels.float() / 127.5 - 1
    with torch.no_grad():
        means, outs = [], []
        for i in range(0, len(x), 100):
            post = vae.encode(x[i:i + 100]).latent_dist
            means.append(post.mean)
            outs.append(vae.decode(post.mode()).sample)
    mean, out = torch.cat(means), torch.cat(outs)
    assert mean.shape == (500, 4, 16, 16)
    scaled_std = (mean * cfg.scaling_factor).std().item()
    assert 0.5 <= scaled_std <= 1.5, scaled_std

    decoded = ((out.clamp(-1, 1) + 1) * 127.5).round()
    mse = ((decoded - pixels.float()) ** 2).mean().item()
    psnr = 10 * np.log10(255.0 ** 2 / mse)
    assert psnr >= 30.0, f"held-out PSNR {psnr:.2f} dB"


# ----------------------------------------------------------------------------- classifier

def test_demo_classifier_accuracy_and_features(test_split):
    from latent_patch.classifier import load_demo_classifier

    assert CLASSIFIER.stat().st_size <= 2 * MB
    model = load_demo_classifier("cpu")
    assert not model.training
    pixels, labels = test_split
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), 500):
            correct += (model(pixels[i:i + 500].float() / 127.5 - 1).argmax(1) == labels[i:i + 500]).sum().item()
        feats = model.features(pixels[:8].float() / 127.5 - 1)
    accuracy = correct / len(labels)
    assert len(labels) >= 1000 and accuracy >= 0.90, f"held-out accuracy {accuracy:.4f}"
    assert feats.shape == (8, model.feature_dim) and 64 <= model.feature_dim <= 128
    assert feats.dtype == torch.float32 and torch.isfinite(feats).all()


def test_demo_rerun_with_other_settings_moves_stale_outputs_aside(tmp_path):
    """A re-run never resumes an old model under a changed config; old outputs are kept, not deleted."""
    from latent_patch import demo

    out = tmp_path / "demo_out"
    out.mkdir()
    settings = {"encode": {"vae": "demo"}, "train": {"lr": 1e-3}, "sample": {"cfg_scale": 3.0}}
    for name in ("shards", "run", "samples"):
        (out / name).mkdir()
        (out / name / "x").write_text(name)
    (out / "ref_test_demo.npz").write_bytes(b"ref")
    first = demo.retire_changed(out, settings)  # outputs of unknown provenance: all three stages
    assert first is not None and sorted(p.name for p in first.iterdir()) == ["run", "samples", "shards"]
    assert (out / "ref_test_demo.npz").is_file()  # depends on no setting

    for name in ("shards", "run", "samples"):
        (out / name).mkdir()
    assert demo.retire_changed(out, settings) is None  # same settings: everything resumes
    assert all((out / n).is_dir() for n in ("shards", "run", "samples"))

    changed = {**settings, "train": {"lr": 2e-3}}
    moved_to = demo.retire_changed(out, changed)  # training changed: run and samples redone, shards kept
    assert sorted(p.name for p in moved_to.iterdir()) == ["run", "samples"] and (out / "shards").is_dir()
    assert json.loads((out / demo.SETTINGS_FILE).read_text()) == changed


@pytest.mark.slow
def test_demo_runs_end_to_end_and_reruns(tmp_path, one_thread_per_module, capsys):
    """README command one, shrunk (tiny U-Net, seconds of training, 20 samples): every stage runs
    and writes its report; a re-run resumes; other sampler settings redo only the samples."""
    from latent_patch import demo

    small = ["--num-samples", "20", "--steps", "2", "run.total_patches=640", "run.log_every_patches=128",
             "model.channels=32", "model.channel_mult=[1,2]", "model.num_blocks=1", "model.attn_resolutions=[]"]
    out = tmp_path / "demo_out"
    path = demo.main(["--out", str(out), *small])
    m = json.loads(path.read_text())
    last = capsys.readouterr().out.strip().splitlines()[-1]  # one summary line: figures, report, rates
    assert re.fullmatch(rf"demo done: FD {m['fd']:.2f}, class accuracy {100 * m['class_accuracy']:.1f}% on 20 samples "
                        rf"after {m['patches_seen']:,} patches; report {re.escape(str(path))} \(grid grid_per_class.png, "
                        rf"curve training_curve.png\); [\d.]+ min in all \(training \d+ patches/s, sampling and "
                        rf"scoring 20 images in \d+ s \([\d.]+ images/s\)\)", last), last
    assert m["num_samples"] == 20 and m["model"].startswith("adm-tiny (") and m["model_params"] > 0
    assert 640 <= m["patches_seen"] < 640 + 4 * 64  # the budget is patches: the first step at or past it stops
    # FD and accuracy recomputed here from samples.npz, the classifier and the reference npz
    from scipy import linalg

    from latent_patch.fid import build_extractor

    with np.load(m["samples_npz"], allow_pickle=False) as f:
        images, labels = f["arr_0"], f["labels"]
    feats, preds = build_extractor("demo").features_and_predictions(images)
    assert m["class_accuracy"] == pytest.approx(float(np.mean(preds == labels)))
    with np.load(out / "ref_test_demo.npz", allow_pickle=False) as f:
        mu_r, sigma_r = f["mu"], f["sigma"]
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    fd = float(np.sum((mu - mu_r) ** 2) + np.trace(sigma) + np.trace(sigma_r) - 2 * np.trace(linalg.sqrtm(sigma @ sigma_r).real))
    assert m["fd"] == pytest.approx(fd, rel=1e-4)
    grid = Image.open(m["grid_per_class"]).convert("L")
    assert grid.size[1] == 10 * 64 and grid.size[0] > 10 * 64  # a labelled row per class
    margin = np.asarray(grid)[:, : grid.size[0] - 10 * 64]
    assert all((margin[r * 64:(r + 1) * 64] < 128).any() for r in range(10))  # each row's label is drawn
    assert m["grid_rows"] == (demo.DATA / "classes.txt").read_text().splitlines()
    curve = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(curve) >= 5 and Path(m["training_curve"]).is_file()  # a curve, not two points
    run_cfg = (out / "run" / "config.yaml").read_text()
    assert "cfg_scale: 3.0" in run_cfg and m["sampler"]["cfg_scale"] == 3.0  # the run carries its sampler
    trained = (out / "run" / "demo_trained.json").read_text()
    demo.main(["--out", str(out), *small])  # same settings: nothing retrained, nothing moved
    assert (out / "run" / "demo_trained.json").read_text() == trained and not list(out.glob("superseded-*"))
    assert "training" not in capsys.readouterr().out.strip().splitlines()[-1].split("min in all")[1]  # no rate
    demo.main(["--out", str(out), *small, "--cfg-scale", "2"])
    (moved,) = out.glob("superseded-*")
    assert sorted(p.name for p in moved.iterdir()) == ["grid_per_class.png", "metrics.json", "samples",
                                                       "training_curve.png"]
    assert (out / "run" / "demo_trained.json").read_text() == trained  # the model was kept

    def used() -> dict:
        return json.loads((out / "samples" / "sampling.json").read_text())["identity"]["sampler"]

    assert used()["cfg_scale"] == 2.0
    # any other sampler key changed by an override: re-sampled with it, though the run's config says heun
    demo.main(["--out", str(out), *small, "--cfg-scale", "2", "sampler.method=euler", "sampler.rho=5"])
    assert {k: used()[k] for k in ("method", "rho", "cfg_scale", "steps")} == {
        "method": "euler", "rho": 5.0, "cfg_scale": 2.0, "steps": 2}
    assert json.loads(path.read_text())["sampler"]["method"] == "euler"
    assert (out / "run" / "demo_trained.json").read_text() == trained  # still not retrained


# ----------------------------------------------------------------------------- representation encoder

REPR_DIR = ASSETS / "demo_repr"
KNN_MARGIN = 0.20  # as shipped: 74.8 % vs 44.4 % at random init (1,000-image fit, 500 held-out)


def _repr_tool():
    spec = importlib.util.spec_from_file_location("train_demo_repr", ROOT / "tools" / "train_demo_repr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_repr_loads_and_encodes_fp16_grids(test_split):
    """The shipped encoder, loaded by name as the encoding job does: an 8 x 8 grid of 128-d tokens
    (the demo DiT-S/2's token grid), small, and finite fp16 on demo pixels."""
    from latent_patch.represent import ReprEncoder

    assert _dir_bytes(REPR_DIR) <= 4 * MB
    enc = ReprEncoder.load("demo", device="cpu")
    assert enc.grid == (8, 8) and enc.dim == 128 and enc.source == "tools/train_demo_repr.py"
    assert sum(p.numel() for p in enc.model.parameters()) < 2_000_000
    grids = enc.encode(test_split[0][:16].float() / 127.5 - 1)
    assert grids.shape == (16, 8, 8, 128) and grids.dtype == torch.float16 and torch.isfinite(grids).all()
    report = json.loads((REPR_DIR / "training.json").read_text())
    trained, rand = report["evaluation"]["trained"], report["evaluation"]["random_init"]
    assert report["evaluation"]["heldout_images"] == 5000 and report["train_images"] == 10000
    assert trained["knn_accuracy"] >= rand["knn_accuracy"] + KNN_MARGIN and trained["token_cosine_mean"] < 0.9


def test_demo_repr_beats_random_init_on_heldout_knn(test_split):
    """Would fail with random weights: a cosine kNN on mean-pooled tokens (fitted on 1,000 training
    images, scored on 500 held-out ones) is clearly better than the same architecture at random
    init, and an image's tokens differ from each other (spatial content, not one vector)."""
    from latent_patch.represent import ReprEncoder

    tool = _repr_tool()
    train = _tools().load_split(DATA, "train", limit=1000)
    test = (test_split[0][:500], test_split[1][:500])
    with pinned_threads(2):
        enc = ReprEncoder.load("demo", device="cpu")
        trained = tool.quality(enc, train, test)
        rand = tool.quality(tool.random_encoder(enc, seed=1000), train, test)
    assert trained["knn_accuracy"] >= rand["knn_accuracy"] + KNN_MARGIN, (trained, rand)
    assert trained["token_cosine_mean"] < 0.9, trained


def test_train_demo_repr_tiny_run_loads_and_is_reproducible(tmp_path):
    """The tool end to end on 64 images, 1 epoch: a folder ReprEncoder.load accepts, the same bits
    twice for one seed; and its training views use encode's preprocessing (an identity crop is
    what ReprEncoder.preprocess gives)."""
    from safetensors.torch import load_file

    from latent_patch.represent import ReprEncoder

    tool = _repr_tool()
    small = ["--limit", "64", "--epochs", "1", "--batch", "32", "--eval-limit", "0", "--threads", "1"]
    with pinned_threads(1):
        first = tool.main([*small, "--out", str(tmp_path / "a")])
        second = tool.main([*small, "--out", str(tmp_path / "b")])
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()
    assert (first / "config.json").read_text() == (second / "config.json").read_text()
    enc = ReprEncoder.load(str(first), device="cpu")
    assert enc.grid == (8, 8) and enc.dim == 128
    assert json.loads((first / "training.json").read_text())["train_images"] == 64
    before = tool.build_encoder(0).state_dict()
    assert any(not torch.equal(before[k], v) for k, v in load_file(str(first / "model.safetensors")).items())

    pixels = _tools().load_split(DATA, "train", limit=8)[0]
    view = tool.render(pixels, tool.identity_crops(8), torch.tensor(enc.mean), torch.tensor(enc.std), enc.image_size)
    torch.testing.assert_close(view, enc.preprocess(pixels.float() / 127.5 - 1), atol=1e-5, rtol=0)
