"""encode_latents.py --repr: a frozen encoder's feature grid per sample and flip, beside the latent.

Tiny random-weight timm ViTs saved as folders (represent.save_folder: the real loading path for a
folder, offline), the tiny VAE, and small class trees with bad files. Every run whose shard bytes
are compared runs at faults.THREADS torch threads (cfg_for pins it)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from faults.common import THREADS, child_env
from latent_patch import encode_repr, shards
from latent_patch import represent as rep
from latent_patch.encode import run_encode
from latent_patch.images import load_image, to_model_pixels
from latent_patch.represent import ReprEncoder
from latent_patch.sources import list_source
from tests.test_encode import ROOT, _cli, _cli_module, cfg_for, shard_bytes

RES = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRID, DIM = (4, 4), 32  # the tiny ViT: 32 px input, patch 8, width 32
PCA = dict(repr_dims=5, repr_pca_images=9, repr_pca_tokens=100)  # + repr=<the vit>


def save_vit(folder: Path, seed: int = 0, **extra) -> Path:
    """A random-weight timm ViT as a folder ReprEncoder.load reads."""
    args = {"img_size": 32, "patch_size": 8, "embed_dim": DIM, "depth": 2, "num_heads": 2, **extra}
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **args)
    return rep.save_folder(model, folder, args, args["img_size"], MEAN, STD, source="test")


def read_members(out: Path, ext: str) -> dict[str, np.ndarray]:
    """key -> the ``ext`` member of every sample, read with tarfile + numpy only."""
    got: dict[str, np.ndarray] = {}
    for t in sorted(out.glob("shard-*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, e = m.name.split(".", 1)
                if e == ext:
                    got[key] = np.load(io.BytesIO(tf.extractfile(m).read()), allow_pickle=False)
    return got


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def timeless(man: dict) -> dict:
    """The manifest without the encoder's measured seconds (the only fields a rerun changes)."""
    man = json.loads(json.dumps(man))
    man["repr"].pop("seconds")
    if man["repr"]["pca"]:
        man["repr"]["pca"].pop("seconds")
    return man


def direct_grids(vit: Path, lst, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ReprEncoder.encode of input i's ADM crop and of its flipped crop, one image per call."""
    enc = ReprEncoder.load(str(vit), device="cpu")
    out = []
    for flip in (False, True):
        px = torch.from_numpy(load_image(lst.read_bytes(i), RES, flip=flip).copy())[None]
        out.append(enc.encode(to_model_pixels(px))[0])
    return out[0], out[1]


@pytest.fixture(scope="module")
def tree(tmp_path_factory, class_tree) -> Path:
    root = tmp_path_factory.mktemp("src")
    class_tree(root, per_class=11, classes=2)
    return root


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    return save_vit(tmp_path_factory.mktemp("vit") / "enc")


@pytest.fixture(scope="module")
def full(tree, vit, tiny_vae_dir, tmp_path_factory) -> Path:
    """All D dims, flips both."""
    out = tmp_path_factory.mktemp("full") / "out"
    run_encode(cfg_for(tree, out, tiny_vae_dir, shard_size=10, repr=str(vit)))
    return out


@pytest.fixture(scope="module")
def reduced(tree, vit, tiny_vae_dir, tmp_path_factory) -> Path:
    """A PCA to 5 dims, fitted on 100 of the tokens of 9 of the images (the seed picks which)."""
    out = tmp_path_factory.mktemp("pca") / "out"
    run_encode(cfg_for(tree, out, tiny_vae_dir, shard_size=10, repr=str(vit), **PCA))
    return out


# ----------------------------------------------------------------------------- what is stored


def test_each_sample_and_flip_stores_its_own_images_grid(full, tree, vit) -> None:
    feats, lats = read_members(full, "repr.npy"), read_members(full, "latent.npy")
    assert set(feats) == set(lats) and len(feats) == 44  # 22 good images x 2, the 3 bad ones skipped
    lst = list_source(tree)
    checked = 0
    for i in (0, 1, 2, 3, 4, 15):  # every image mode (RGB, L, RGBA, P, CMYK) and the other class
        key = shards.sample_key(i, lst.sources[i])
        if key not in feats:
            continue
        want, want_flip = direct_grids(vit, lst, i)
        got, got_flip = feats[key], feats[key + "_flip"]
        assert got.dtype == np.float16 and got.shape == (*GRID, DIM)
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(torch.from_numpy(got_flip), want_flip, rtol=2e-3, atol=2e-3)
        # the flipped sample holds the flipped IMAGE's grid, not the original grid mirrored
        assert not np.allclose(got_flip, got[:, ::-1], atol=1e-2)
        checked += 1
    assert checked >= 5


def test_repr_member_is_np_save_of_the_float16_grid(full) -> None:
    with tarfile.open(sorted(full.glob("shard-*.tar"))[0]) as tf:
        m = next(m for m in tf.getmembers() if m.name.endswith(".repr.npy"))
        data = tf.extractfile(m).read()
    buf = io.BytesIO()
    np.save(buf, np.load(io.BytesIO(data), allow_pickle=False))
    assert buf.getvalue() == data


def test_manifest_describes_the_grids_and_their_cost(full, vit) -> None:
    man = manifest(full)
    r = man["repr"]
    enc = ReprEncoder.load(str(vit), device="cpu")
    assert r["member"] == "repr.npy" and r["spec"] == str(vit.resolve())
    assert r["architecture"] == "vit_tiny_patch16_224" and r["image_size"] == 32
    assert r["grid"] == list(GRID) and r["dim"] == DIM and r["dims"] == DIM and r["dtype"] == "float16"
    assert r["pca"] is None and r["mean"] == list(MEAN) and r["std"] == list(STD)
    assert r["flops_per_image"] == enc.forward_flops_per_image() > 0
    assert r["flops"] == r["flops_per_image"] * man["num_samples"] == r["flops_per_image"] * 44
    sides = [json.loads(p.read_text()) for p in sorted(full.glob("shard-*.json"))]
    assert all(s["repr_shape"] == [*GRID, DIM] for s in sides)
    assert r["seconds"] == pytest.approx(sum(s["repr_seconds"] for s in sides), abs=2e-3) and r["seconds"] > 0
    # bad images are skipped and listed as without --repr
    assert {s["source"] for s in man["skipped"]} >= {"c0/zero.JPEG", "c0/text.JPEG", "c0/truncated.JPEG"}
    assert json.loads((full / "job.json").read_text())["repr"] == {
        "encoder": enc.describe(), "dims": DIM, "pca": None}
    assert shards.verify_shards(full) == []


def test_without_repr_nothing_changes(tree, tiny_vae_dir, tmp_path) -> None:
    run_encode(cfg_for(tree, tmp_path / "o", tiny_vae_dir, shard_size=10, flips="none"))
    assert "repr" not in manifest(tmp_path / "o") and "repr" not in json.loads((tmp_path / "o" / "job.json").read_text())
    assert not read_members(tmp_path / "o", "repr.npy")
    assert all(json.loads(p.read_text())["repr_seconds"] is None for p in (tmp_path / "o").glob("shard-*.json"))


# ----------------------------------------------------------------------------- the PCA


def test_pca_is_fitted_once_on_training_images_and_applied(reduced, tree, vit) -> None:
    man = manifest(reduced)
    r = man["repr"]
    assert r["dims"] == 5 and r["dim"] == DIM
    p = r["pca"]
    assert (p["images"], p["tokens"], p["seed"]) == (9 - _bad_among(tree, 9), 100, 0)
    assert 0 < p["explained_variance"] < 1
    assert p["explained_variance"] == pytest.approx(sum(p["explained_variance_ratio"]), abs=1e-6)
    assert p["flops"] == p["images"] * r["flops_per_image"]
    pca = rep.pca_from_json(p)
    assert pca["components"].shape == (5, DIM)
    published = json.loads((reduced / encode_repr.PCA_FILE).read_text())
    assert published["pca"] == rep.pca_to_json(pca)  # the manifest carries the one published fit
    job = json.loads((reduced / "job.json").read_text())["repr"]
    assert job["pca"] == {"images": 9, "tokens": 100, "seed": 0, "sha256": encode_repr.pca_digest(pca)}
    feats = read_members(reduced, "repr.npy")
    assert {f.shape for f in feats.values()} == {(*GRID, 5)}
    lst = list_source(tree)
    key = shards.sample_key(0, lst.sources[0])
    for grid, got in zip(direct_grids(vit, lst, 0), (feats[key], feats[key + "_flip"])):
        want = rep.apply_pca(grid[None], pca)[0]
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=3e-3, atol=3e-3)
    # on the fit's own images the K stored dims keep the share of variance the fit reported
    fit_keys = [shards.sample_key(i, lst.sources[i]) for i in encode_repr.pca_inputs(len(lst), 9, 0)]
    fit_keys = [k for k in fit_keys if k in feats]
    full = torch.stack([direct_grids(vit, lst, int(k.split("_")[0]))[0] for k in fit_keys])
    full = full.reshape(-1, DIM).double().numpy()
    proj = np.stack([feats[k] for k in fit_keys]).reshape(-1, 5).astype(np.float64)
    centred = full - pca["mean"]
    residual = ((centred - proj @ pca["components"]) ** 2).sum() / (centred ** 2).sum()
    assert 1 - residual == pytest.approx(p["explained_variance"], abs=0.05)  # fitted on 100 of these tokens


def _bad_among(tree: Path, n: int) -> int:
    """How many of the PCA's first n inputs are bad files (those are left out of the fit)."""
    lst = list_source(tree)
    idx = encode_repr.pca_inputs(len(lst), n, 0)
    bad = {"c0/zero.JPEG", "c0/text.JPEG", "c0/truncated.JPEG"}
    return sum(lst.sources[i] in bad for i in idx)


def test_pca_sample_is_a_seeded_subset_of_the_listing() -> None:
    a = encode_repr.pca_inputs(1000, 50, 0)
    assert a == encode_repr.pca_inputs(1000, 50, 0) and len(set(a)) == 50
    assert a != encode_repr.pca_inputs(1000, 50, 1) and a != list(range(50))
    assert encode_repr.pca_inputs(1000, 60, 0)[:50] == a  # more images: the same first ones
    assert sorted(encode_repr.pca_inputs(7, 50, 0)) == list(range(7))


def test_two_jobs_fit_once_and_write_the_same_bytes(reduced, tree, vit, tiny_vae_dir, tmp_path,
                                                    monkeypatch) -> None:
    fits = []
    real = encode_repr.fit_pca
    monkeypatch.setattr(encode_repr, "fit_pca", lambda *a, **k: fits.append(1) or real(*a, **k))
    out = tmp_path / "jobs"
    for i in (1, 0):
        run_encode(cfg_for(tree, out, tiny_vae_dir, shard_size=10, repr=str(vit), **PCA,
                           num_jobs=2, job_index=i))
    assert len(fits) == 1  # the second job read OUT/repr_pca.json
    assert shard_bytes(out) == shard_bytes(reduced)
    assert timeless(manifest(out)) == timeless(manifest(reduced))


def test_a_killed_run_resumes_to_the_same_bytes(reduced, tree, vit, tiny_vae_dir, tmp_path) -> None:
    """The states a kill -9 leaves: a shard committed but its tar not renamed, half-written temps,
    no manifest; and, in a second folder, a kill during the PCA fit (its lock's owner is dead)."""
    out = tmp_path / "resume"
    shutil.copytree(reduced, out)
    (out / "manifest.json").unlink()
    (out / "shard-000001.tar").unlink()
    (out / shards.sidecar_name(3)).unlink()
    (out / shards.shard_name(3)).unlink()
    (out / f".{shards.shard_name(3)}.99999.tmp").write_bytes(b"half")
    kept = (out / "shard-000000.tar").stat().st_mtime_ns
    run_encode(cfg_for(tree, out, tiny_vae_dir, shard_size=10, repr=str(vit), **PCA))
    assert shard_bytes(out) == shard_bytes(reduced) and (out / "shard-000000.tar").stat().st_mtime_ns == kept
    assert timeless(manifest(out)) == timeless(manifest(reduced))

    fresh = tmp_path / "killed_fitting"
    fresh.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (fresh / encode_repr.PCA_LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "token": "x"}))
    run_encode(cfg_for(tree, fresh, tiny_vae_dir, shard_size=10, repr=str(vit), **PCA))
    assert shard_bytes(fresh) == shard_bytes(reduced) and not (fresh / encode_repr.PCA_LOCK).exists()


@pytest.mark.slow
def test_kill_9_then_rerun_and_torchrun_match_one_process(reduced, tree, vit, tiny_vae_dir, tmp_path) -> None:
    args = ["--source", str(tree), "--vae", str(tiny_vae_dir), "--resolution", str(RES), "--flips", "both",
            "--shard-size", "10", "--batch-size", "8", "--no-progress", "--device", "cpu",
            "--threads", str(THREADS), "--repr", str(vit), "--repr-dims", "5", "--repr-pca-images", "9",
            "--repr-pca-tokens", "100"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*args, "--out", str(killed)), env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and not list(killed.glob("shard-*.tar")):
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists()
    r = subprocess.run(_cli(*args, "--out", str(killed)), env=child_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shard_bytes(killed) == shard_bytes(reduced)

    two = tmp_path / "two"
    torchrun = Path(sys.executable).with_name("torchrun")
    r = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(ROOT / "encode_latents.py"), *args,
                        "--out", str(two)], env=child_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("fitted the representation PCA") == 1, r.stdout
    assert shard_bytes(two) == shard_bytes(reduced)
    assert timeless(manifest(two)) == timeless(manifest(reduced))


# ----------------------------------------------------------------------------- refusals


def test_a_resume_with_another_encoder_or_pca_is_refused_naming_it(reduced, tree, vit, tiny_vae_dir,
                                                                  tmp_path, monkeypatch) -> None:
    out = tmp_path / "other"
    shutil.copytree(reduced, out)
    (out / "manifest.json").unlink()
    (out / shards.shard_name(2)).unlink()  # work left, so a run would write
    before = shard_bytes(out)
    fits = []
    monkeypatch.setattr(encode_repr, "fit_pca", lambda *a, **k: fits.append(1))
    base = dict(shard_size=10, repr=str(vit), **PCA)
    other_vit = save_vit(tmp_path / "other_vit", seed=1, depth=1)
    for change, match in (({"repr_dims": 4}, r"repr\.dims: 5 -> 4.*\(--repr-dims\)"),
                          ({"repr_pca_seed": 3}, r"repr\.pca\.seed: 0 -> 3.*--repr-pca-seed"),
                          ({"repr_pca_images": 10}, r"repr\.pca\.images: 9 -> 10.*--repr-pca-images"),
                          ({"repr": str(other_vit)}, r"repr\.encoder\.spec: .*other_vit.*--repr"),
                          ({"repr_dims": None}, r"repr\.dims: 5 -> 32.*--repr-dims"),
                          ({"repr": None, "repr_dims": None}, r"repr: .* -> \(absent\).*--repr")):
        with pytest.raises(ValueError, match=match):
            run_encode(cfg_for(tree, out, tiny_vae_dir, **{**base, **change}))
    assert not fits and shard_bytes(out) == before  # refused before fitting or writing anything
    # a fit of the same settings but other bits (refitted at another thread count, say) is refused too
    published = json.loads((out / encode_repr.PCA_FILE).read_text())
    published["pca"]["mean"][0] += 1e-3
    (out / encode_repr.PCA_FILE).write_text(json.dumps(published))
    with pytest.raises(ValueError, match=r"repr\.pca\.sha256: "):
        run_encode(cfg_for(tree, out, tiny_vae_dir, **base))
    assert shard_bytes(out) == before
    plain = tmp_path / "plain"  # an encode without --repr is not resumed with it
    run_encode(cfg_for(tree, plain, tiny_vae_dir, shard_size=10))
    with pytest.raises(ValueError, match=r"repr: \(absent\) -> .*\(--repr\)"):
        run_encode(cfg_for(tree, plain, tiny_vae_dir, **base))
    assert not fits


def test_an_unfetchable_hub_id_fails_in_one_line_before_any_shard(tree, tiny_vae_dir, tmp_path) -> None:
    out = tmp_path / "hub"
    spec = "vit_tiny_patch16_224.augreg_in21k"  # a real timm id; no hub here (and offline mode for speed)
    r = subprocess.run(_cli("--source", str(tree), "--out", str(out), "--vae", str(tiny_vae_dir),
                            "--resolution", str(RES), "--repr", spec, "--no-progress"),
                       env={**child_env(), "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"encode_latents.py: error: --repr {spec}: cannot fetch"), r.stderr
    assert "Traceback" not in r.stderr and "local folder" in errors[0]
    assert not list(out.glob("shard-*")) and not (out / "job.json").exists()


def _bad_config(folder: Path) -> str:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["image_size"] = "large"
    (folder / "config.json").write_text(json.dumps(cfg))
    return "config.json: field 'image_size' must be a positive integer"


def _no_weights(folder: Path) -> str:
    (folder / "model.safetensors").unlink()
    return "model.safetensors: missing"


@pytest.mark.parametrize("breakage", [_bad_config, _no_weights])
def test_a_corrupt_encoder_folder_is_named(tree, tiny_vae_dir, tmp_path, capsys, breakage) -> None:
    folder = save_vit(tmp_path / "enc")
    what = breakage(folder)
    out = tmp_path / "o"
    cli = _cli_module()
    assert cli.main(["--source", str(tree), "--out", str(out), "--vae", str(tiny_vae_dir), "--resolution",
                     str(RES), "--repr", str(folder), "--no-progress", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"encode_latents.py: error: --repr {folder}: ") and what in err[0], err
    assert not list(out.glob("shard-*")) and not (out / "job.json").exists()


def test_dims_beyond_the_encoder_or_the_tokens_are_refused(tree, vit, tiny_vae_dir, tmp_path, monkeypatch) -> None:
    real = encode_repr.sample_for_pca

    def refused_first(*args, **kwargs):
        raise AssertionError("images encoded for a fit that the settings rule out")

    monkeypatch.setattr(encode_repr, "sample_for_pca", refused_first)
    with pytest.raises(ValueError, match=r"--repr-dims 33 is more than the encoder's token dimension 32"):
        run_encode(cfg_for(tree, tmp_path / "a", tiny_vae_dir, repr=str(vit), repr_dims=33))
    with pytest.raises(ValueError, match=r"--repr-dims 8 is more than the 6 tokens.*--repr-pca-tokens 6"):
        run_encode(cfg_for(tree, tmp_path / "b", tiny_vae_dir, repr=str(vit), repr_dims=8, repr_pca_tokens=6))
    with pytest.raises(ValueError, match=r"--repr-dims 20 is more than the 16 tokens.*1 images of --repr-pca-images 1"):
        run_encode(cfg_for(tree, tmp_path / "c", tiny_vae_dir, repr=str(vit), repr_dims=20, repr_pca_images=1))
    # bad images among the PCA's: fewer tokens than asked for, found once they are encoded
    monkeypatch.setattr(encode_repr, "sample_for_pca", real)
    lst = list_source(tree)
    first_bad = lst.sources.index("c0/zero.JPEG")
    monkeypatch.setattr(encode_repr, "pca_inputs", lambda n, count, seed: [first_bad, 0][:count])
    with pytest.raises(ValueError, match=r"--repr-dims 32 is more than the 16 tokens.*\(1 images of --repr-pca-images 2"):
        run_encode(cfg_for(tree, tmp_path / "d", tiny_vae_dir, repr=str(vit), repr_dims=32, repr_pca_images=2))
    for d in "abcd":
        assert not (tmp_path / d / "job.json").exists() and not list((tmp_path / d).glob("shard-*"))


def test_cli_refuses_repr_flags_without_what_they_refine(tmp_path, capsys) -> None:
    cli = _cli_module()
    for bad, said in ((["--repr-dims", "4"], "--repr ENCODER, which is missing"),
                      (["--repr", "demo", "--repr-pca-images", "10"], "--repr-dims K, which is missing"),
                      (["--repr", "demo", "--repr-dims", "0"], "--repr-dims"),
                      (["--repr", "demo", "--repr-size", "x"], "--repr-size")):
        with pytest.raises(SystemExit) as err:
            cli.main(["--source", str(tmp_path), *bad])
        assert err.value.code == 2 and said in capsys.readouterr().err, bad


# ----------------------------------------------------------------------------- the set's checks


def test_assemble_and_verify_refuse_a_sidecar_of_another_grid(full, tree, vit, tiny_vae_dir, tmp_path) -> None:
    out = tmp_path / "side"
    shutil.copytree(full, out)
    side = out / shards.sidecar_name(2)
    rec = json.loads(side.read_text())
    rec["repr_shape"] = [*GRID, 8]
    side.write_text(json.dumps(rec))
    problems = shards.verify_shards(out, deep=False)
    assert len(problems) == 1 and side.name in problems[0] and "repr_shape" in problems[0], problems
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match=rf"{side.name}: repr_shape \[4, 4, 8\] but the job stores \[4, 4, 32\]"):
        run_encode(cfg_for(tree, out, tiny_vae_dir, shard_size=10, repr=str(vit)))


def test_deep_verify_checks_every_samples_grid(full, tmp_path) -> None:
    out = tmp_path / "deep"
    shutil.copytree(full, out)
    man = manifest(out)
    man["repr"]["dims"] = 16  # the tars hold 32-dim grids
    (out / "manifest.json").write_text(json.dumps(man))
    problems = shards.verify_shards(out)
    assert problems and all("repr" in p for p in problems)
    assert any("repr.npy members" in p and "[4, 4, 16]" in p for p in problems), problems
    del man["repr"]  # a manifest without repr over shards that hold grids
    (out / "manifest.json").write_text(json.dumps(man))
    assert any("manifest has no 'repr'" in p for p in shards.verify_shards(out))


# ----------------------------------------------------------------------------- the benchmark


def test_bench_encode_with_repr_bounds_by_vae_plus_encoder(vit, capsys) -> None:
    """--repr: the job stores grids, the bound's encoder part is VAE + representation encoder on the
    same batches (shared cores: beside decoding; separate: against it), and the JSON says how much."""
    from tests.test_encode import _bench_module

    bench = _bench_module()
    tiny = ["--images", "16", "--resolution", "32", "--batch-size", "8", "--repeats", "1", "--repr", str(vit)]
    got = bench.run(tiny)
    assert "representation encoder" in capsys.readouterr().err
    r = got["repr"]
    v, d, e = got["vae_img_s"], got["decode_img_s"], r["vae_plus_repr_img_s"]
    assert e == pytest.approx(1 / (1 / v + 1 / r["img_s"]), rel=2e-2)
    assert got["bound"] == "1/(1/vae + 1/repr + 1/decode)"
    assert got["bound_img_s"] == pytest.approx(1 / (1 / e + 1 / d), rel=2e-2)
    assert got["ratio"] == pytest.approx(got["pipeline_img_s"] / got["bound_img_s"], rel=2e-2)
    assert 0 < r["share_of_bound_time"] < 1
    assert r["share_of_bound_time"] == pytest.approx(got["bound_img_s"] / r["img_s"], rel=3e-2)
    assert (r["grid"], r["dim"], r["spec"]) == ([*GRID], DIM, str(vit.resolve())) and r["gflop_per_encode"] > 0

    got = bench.run([*tiny, "--bound", "separate", "--workers", "1", "--flips", "both"])
    capsys.readouterr()
    r = got["repr"]
    assert got["bound"] == "min(1/(1/vae + 1/repr), decode)"
    assert got["bound_img_s"] == pytest.approx(min(r["vae_plus_repr_img_s"], got["decode_img_s"]), rel=1e-2)
    assert r["encodes_s"] == pytest.approx(2 * r["img_s"], rel=1e-3)
