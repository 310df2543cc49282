"""The encoding job end to end: shards + manifest, exactness, splits, resume, torchrun, kill -9."""

from __future__ import annotations

import importlib.util
import io
import re
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
import torch
from PIL import Image

from faults.common import THREADS
from latent_patch import codec as codec_mod
from latent_patch import encode as enc
from latent_patch import shards
from latent_patch.codec import VAECodec
from latent_patch.config import EncodeConfig
from latent_patch.encode import run_encode
from latent_patch.images import load_image
from latent_patch.sources import list_source

ROOT = Path(__file__).resolve().parents[1]
RES = 32


def read_out(out: Path) -> dict[str, tuple[np.ndarray, int, dict]]:
    """key -> (latent, label, json) from every tar, with tarfile + numpy only."""
    got: dict[str, dict] = {}
    keys: list[str] = []
    for t in sorted(out.glob("*.tar")):
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                data = tf.extractfile(m).read()
                if ext == "latent.npy":
                    keys.append(key)
                    got.setdefault(key, {})["lat"] = np.load(io.BytesIO(data), allow_pickle=False)
                elif ext == "cls":
                    got.setdefault(key, {})["cls"] = int(data)
                else:
                    got.setdefault(key, {})["json"] = json.loads(data)
    assert len(keys) == len(set(keys)), "duplicate keys"
    return {k: (v["lat"], v["cls"], v["json"]) for k, v in got.items()}


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def cfg_for(src: Path, out: Path, vae: Path, **kw) -> EncodeConfig:
    """Encoding pins its own torch threads (``threads``): faults.THREADS, the count of every
    encoding whose bytes a test compares with these (another count may round the fp16 differently)."""
    base = dict(source=str(src), out=str(out), vae=str(vae), resolution=RES, flips="both",
                shard_size=16, batch_size=8, progress=False, device="cpu", threads=THREADS)
    base.update(kw)
    return EncodeConfig(**base)


@pytest.fixture(scope="module")
def tree(tmp_path_factory, class_tree) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("src")
    return root, class_tree(root, per_class=33, classes=3)


@pytest.fixture(scope="module")
def encoded(tree, tiny_vae_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("enc") / "out"
    run_encode(cfg_for(tree[0], out, tiny_vae_dir))
    return out


def test_manifest_counts_and_skips(encoded: Path, tree) -> None:
    man = json.loads((encoded / "manifest.json").read_text())
    assert man["format"] == "latent-patch-shards/1"
    assert man["num_images"] == 99 and man["num_samples"] == 198
    assert man["class_counts"] == [33, 33, 33, 0]
    assert man["class_names"] == ["c0", "c1", "c2", "c3_empty"]
    assert man["latent_shape"] == [4, RES // 4, RES // 4] and man["flips"] == "both"
    assert man["vae"]["downsample"] == 4 and man["vae"]["shift_factor"] == 0.0
    assert man["source"]["num_inputs"] == 102 and man["source"]["kind"] == "class_tree"
    reasons = {s["source"]: s["reason"] for s in man["skipped"]}
    assert set(reasons) == {"c0/zero.JPEG", "c0/text.JPEG", "c0/truncated.JPEG", "c3_empty/"}
    assert "empty" in reasons["c0/zero.JPEG"] and "truncated" in reasons["c0/truncated.JPEG"]
    assert len(man["shards"]) == 13  # ceil(102 inputs / 8 per shard)
    assert all(s["num_samples"] <= 16 for s in man["shards"])
    assert shards.verify_shards(encoded) == []
    assert not list(encoded.glob(".*.tmp"))


def test_stored_posterior_equals_direct_encode(encoded: Path, tree, tiny_vae_dir) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae_dir).eval()
    got = read_out(encoded)
    lst = list_source(tree[0])
    checked = 0
    for i in (0, 1, 2, 3, 4, 40, 101):  # every mode (RGB, L, RGBA, P, CMYK) and other classes
        key = shards.sample_key(i, lst.sources[i])
        if key not in got:
            continue
        for flip in (False, True):
            lat, cls, meta = got[key + ("_flip" if flip else "")]
            pix = torch.from_numpy(load_image(lst.read_bytes(i), RES, flip=flip).copy())
            x = pix.permute(2, 0, 1)[None].float() / 127.5 - 1
            with torch.no_grad():
                post = vae.encode(x).latent_dist
            assert lat.dtype == np.float16 and lat.shape == (2, 4, RES // 4, RES // 4)
            np.testing.assert_allclose(lat[0], post.mean[0].numpy(), atol=2e-3, rtol=2e-3)
            np.testing.assert_allclose(lat[1], post.std[0].numpy(), atol=2e-3, rtol=2e-3)
            assert cls == lst.labels[i] and meta == {"source": lst.sources[i], "flip": flip}
        checked += 1
    assert checked >= 6
    # the flipped sample is NOT the flipped latent of the original
    lat, _, _ = got[shards.sample_key(0, lst.sources[0])]
    flat, _, _ = got[shards.sample_key(0, lst.sources[0], flip=True)]
    assert not np.allclose(flat[0], lat[0][..., ::-1], atol=1e-3)


def test_latent_stats_match_the_stored_latents(encoded: Path) -> None:
    man = json.loads((encoded / "manifest.json").read_text())
    lats = np.stack([v[0] for v in read_out(encoded).values()]).astype(np.float64)
    s = man["vae"]["scaling_factor"]
    m, sd = lats[:, 0] * s, lats[:, 1] * s
    mean = m.mean(axis=(0, 2, 3))
    std = np.sqrt((m ** 2 + sd ** 2).mean(axis=(0, 2, 3)) - mean ** 2)
    np.testing.assert_allclose(man["latent_stats"]["mean"], mean, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(man["latent_stats"]["std"], std, rtol=1e-6)


def test_jobs_split_gives_identical_shards(encoded: Path, tree, tiny_vae_dir, tmp_path,
                                           capsys) -> None:
    out = tmp_path / "jobs"
    for i in range(3):
        assert not (out / "manifest.json").exists()
        run_encode(cfg_for(tree[0], out, tiny_vae_dir, num_jobs=3, job_index=i, batch_size=8))
        last = capsys.readouterr().out.strip().splitlines()[-1]  # each job's one summary line, with its rate
        assert re.search(r"this process encoded \d+ images -> \d+ samples, \d+ skipped, in [\d.]+ s "
                         r"\([\d.]+ img/s\)", last), last
        if i < 2:
            assert last.startswith("this part is done;") and "shards remain" in last, last
    assert last.startswith(f"encoding done: {out / 'manifest.json'} (99 images, 198 samples, "), last
    assert shard_bytes(out) == shard_bytes(encoded)
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (out, encoded))
    assert a == b


def test_resume_after_a_crash_redoes_only_missing_shards(encoded: Path, tree, tiny_vae_dir,
                                                          tmp_path) -> None:
    out = tmp_path / "resume"
    shutil.copytree(encoded, out)
    (out / "manifest.json").unlink()
    (out / "shard-000003.tar").unlink()  # killed between sidecar write and tar rename
    for j in (5, 7):  # killed mid-write: temp files only
        (out / shards.shard_name(j)).unlink()
        (out / shards.sidecar_name(j)).unlink()
        (out / f".{shards.shard_name(j)}.99999.tmp").write_bytes(b"half")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # killed while writing manifest.json: its temporary names a PID that is gone
    (out / f".manifest.json.{dead.pid}.tmp").write_text('{"half')
    live = out / f".manifest.json.{os.getppid()}.tmp"  # another job writing it right now: kept
    live.write_text("{")
    kept = (out / "shard-000000.tar").stat().st_mtime_ns
    run_encode(cfg_for(tree[0], out, tiny_vae_dir))
    assert shard_bytes(out) == shard_bytes(encoded)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == kept  # complete shards untouched
    assert list(out.glob(".*.tmp")) == [live] and (out / "manifest.json").is_file()


def test_other_parameters_are_refused(encoded: Path, tree, tiny_vae_dir, tmp_path) -> None:
    out = tmp_path / "other"
    shutil.copytree(encoded, out)
    with pytest.raises(ValueError, match="resolution: 32 -> 64"):
        run_encode(cfg_for(tree[0], out, tiny_vae_dir, resolution=64))
    with pytest.raises(ValueError, match="flips"):
        run_encode(cfg_for(tree[0], out, tiny_vae_dir, flips="none"))
    (out / "job.json").unlink()
    with pytest.raises(ValueError, match="no job.json"):
        run_encode(cfg_for(tree[0], out, tiny_vae_dir))


def test_verify_detects_a_changed_shard(encoded: Path, tmp_path) -> None:
    out = tmp_path / "tampered"
    shutil.copytree(encoded, out)
    data = bytearray((out / "shard-000002.tar").read_bytes())
    data[600] ^= 1
    (out / "shard-000002.tar").write_bytes(bytes(data))
    problems = shards.verify_shards(out)
    assert len(problems) == 1 and "shard-000002.tar: sha256" in problems[0]


def test_tar_and_flat_sources(tmp_path: Path, tiny_vae_dir) -> None:
    rng = np.random.default_rng(3)
    imgs = [(rng.random((20, 24, 3)) * 255).astype(np.uint8) for _ in range(5)]
    tar = tmp_path / "data-000000.tar"
    with tarfile.open(tar, "w") as tf:
        for n, a in enumerate(imgs):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, "PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(n % 2).encode())):
                ti = tarfile.TarInfo(f"s{n}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    run_encode(cfg_for(str(tmp_path / "data-{000000..000000}.tar"), tmp_path / "o1", tiny_vae_dir,
                       flips="none"))
    man = json.loads((tmp_path / "o1" / "manifest.json").read_text())
    assert man["num_samples"] == 5 and man["class_names"] == ["0", "1"]
    assert man["class_counts"] == [3, 2] and man["source"]["kind"] == "tars"

    flat = tmp_path / "flat"
    flat.mkdir()
    for n, a in enumerate(imgs):
        Image.fromarray(a).save(flat / f"v{n}.png")
    (tmp_path / "labels.txt").write_text("".join(f"v{n}.png {n}\n" for n in range(5)))
    run_encode(cfg_for(flat, tmp_path / "o2", tiny_vae_dir, flips="none",
                       labels=str(tmp_path / "labels.txt")))
    a, b = read_out(tmp_path / "o1"), read_out(tmp_path / "o2")
    assert len(b) == 5 and {v[1] for v in b.values()} == set(range(5))
    np.testing.assert_array_equal(a["00000002_s2"][0], b["00000002_v2"][0])


def test_a_folder_of_shards_with_other_files_is_a_source(tmp_path: Path, tiny_vae_dir) -> None:
    """A data folder holds a README (and class names) beside its shards: the tars are read, every
    other entry is listed as skipped with its reason, and the shipped Fashion-MNIST folder lists."""
    rng = np.random.default_rng(4)
    data = tmp_path / "data"
    data.mkdir()
    for t in range(2):
        with tarfile.open(data / f"part-{t}.tar", "w") as tf:
            for n in range(3):
                buf = io.BytesIO()
                Image.fromarray((rng.random((20, 24, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
                for ext, payload in (("png", buf.getvalue()), ("cls", str((n + t) % 2).encode())):
                    ti = tarfile.TarInfo(f"t{t}s{n}.{ext}")
                    ti.size = len(payload)
                    tf.addfile(ti, io.BytesIO(payload))
    (data / "README.md").write_text("how this data was made\n")
    (data / "classes.txt").write_text("cat\ndog\n")
    (data / "checksums").mkdir()
    run_encode(cfg_for(data, tmp_path / "out", tiny_vae_dir, flips="none"))
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["num_samples"] == 6 and man["class_names"] == ["cat", "dog"] and man["source"]["kind"] == "tars"
    skipped = {s["source"]: s["reason"] for s in man["skipped"]}
    assert skipped["README.md"].startswith("not a tar shard") and skipped["checksums/"].startswith("not a tar shard")
    assert "class_names" in skipped["classes.txt"] and len(skipped) == 3
    shipped = list_source(Path(__file__).resolve().parents[1] / "latent_patch" / "assets" / "fashion_mnist")
    assert shipped.kind == "tars" and len(shipped) == 15_000  # 10,000 train + 5,000 test images
    assert {w["source"] for w in shipped.warnings} >= {"README.md", "LICENSE.txt", "dataset.json"}


def test_a_source_without_valid_images_is_an_error(tmp_path: Path, tiny_vae_dir) -> None:
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.JPEG").write_text("nope")
    with pytest.raises(ValueError, match="no valid image"):
        run_encode(cfg_for(tmp_path / "src", tmp_path / "o", tiny_vae_dir))


# ----------------------------------------------------------------------------- codec


def test_codec_conventions(tiny_vae_dir, monkeypatch, tmp_path) -> None:
    c = VAECodec.load(str(tiny_vae_dir), device="cpu")
    assert c.dtype == torch.float32 and c.latent_channels == 4 and c.downsample == 4
    z = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(c.unscale(c.scale(z)), z)
    img = c.decode_uint8(z)
    assert img.shape == (2, 16, 16, 3) and img.dtype == torch.uint8
    monkeypatch.setattr(codec_mod, "DEMO_VAE_DIR", tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="tools/train_demo_vae.py"):
        VAECodec.load("demo", device="cpu")

    def offline(*a, **kw):
        raise OSError("no network")

    import diffusers
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(RuntimeError, match="'org/some-vae'.*local folder"):
        VAECodec.load("org/some-vae", device="cpu")


def test_reduced_precision_is_gpu_only_so_a_cpu_request_falls_back_to_fp32(tiny_vae_dir, caplog) -> None:
    """codec.parse_dtype's rule, by device type (so the GPU side is checked without a GPU): on the
    CPU every request computes in fp32, an explicit reduced one with a warning saying so; on
    CUDA the default is fp16, fp16 / bf16 / fp32 are honoured and an unknown name is refused."""
    import logging

    from latent_patch.codec import parse_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with caplog.at_level(logging.WARNING, logger="latent_patch.codec"):
        for request in ("fp16", "bf16", torch.float16, torch.bfloat16):
            caplog.clear()
            assert parse_dtype(request, cpu) == torch.float32, request
            assert "using fp32" in caplog.text, request
        caplog.clear()
        assert parse_dtype(None, cpu) == parse_dtype("fp32", cpu) == torch.float32
        assert not caplog.text  # nothing to warn about
        assert VAECodec.load(str(tiny_vae_dir), device="cpu", dtype="fp16").dtype == torch.float32
    assert parse_dtype(None, cuda) == torch.float16
    assert [parse_dtype(n, cuda) for n in ("fp16", "bf16", "fp32")] == [torch.float16, torch.bfloat16, torch.float32]
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        parse_dtype("fp8", cuda)


def test_reduced_precision_runs_in_it_and_an_overflow_is_redone_in_fp32(tiny_vae_dir, caplog) -> None:
    """The compute-dtype path itself, in bf16 on the CPU (CPU autocast has bf16; load() never picks
    it there, so the codec is built directly): the decoder computes in bf16 and hands back float32
    close to the fp32 decode; a batch whose reduced-precision output is not finite is decoded again
    in fp32 (the very fp32 pixels), with a warning, by decode and by decode_uint8_start alike."""
    import copy
    import logging

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae_dir)
    cpu = torch.device("cpu")
    full = VAECodec(vae, "tiny", cpu, torch.float32)
    half = VAECodec(copy.deepcopy(vae), "tiny", cpu, torch.bfloat16)
    seen: list[torch.dtype] = []
    hook = half.vae.decoder.conv_out.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    want = full.decode(z)
    got = half.decode(z)
    assert seen == [torch.bfloat16] and got.dtype == torch.float32
    assert 0 < (got - want).abs().max() < 0.05  # bf16 really computed it (not bit-equal), and close
    hook.remove()

    def overflow(module, inputs, out):  # an fp16-style overflow, in reduced precision only
        return torch.full_like(out, float("inf")) if out.dtype != torch.float32 else out

    half.vae.decoder.conv_out.register_forward_hook(overflow)
    with caplog.at_level(logging.WARNING, logger="latent_patch.codec"):
        torch.testing.assert_close(half.decode(z), want, rtol=0, atol=0)
        assert "redone in fp32" in caplog.text
        caplog.clear()
        torch.testing.assert_close(half.decode_uint8_start(z)(), full.decode_uint8(z), rtol=0, atol=0)
        assert "redone in fp32" in caplog.text


# ----------------------------------------------------------------------------- CLI + processes


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "encode_latents.py"), *args]


def _cli_module():
    spec = importlib.util.spec_from_file_location("encode_latents", ROOT / "encode_latents.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_rejects_bad_flags(tmp_path: Path, capsys) -> None:
    cli = _cli_module()
    for bad in (["--flips", "sideways"], ["--resolution", "0"], ["--shard-size", "x"],
                ["--num-jobs", "2", "--job-index", "2"], ["--workers", "-1"]):
        with pytest.raises(SystemExit) as err:
            cli.main(["--source", str(tmp_path), *bad])
        assert err.value.code == 2 and "error:" in capsys.readouterr().err, bad
    with pytest.raises(SystemExit):
        cli.main([])
    assert "one of the arguments --source --verify is required" in capsys.readouterr().err


def test_cli_reports_errors_and_verifies(encoded: Path, tmp_path: Path, capsys) -> None:
    cli = _cli_module()
    assert cli.main(["--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "missing: no such file or folder" in capsys.readouterr().err
    assert cli.main(["--verify", "--out", str(encoded)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "13 shards" in out[-1] and "MiB/s" in out[-1], out
    bad = tmp_path / "bad"
    shutil.copytree(encoded, bad)
    tar = sorted(bad.glob("shard-*.tar"))[1]
    tar.write_bytes(tar.read_bytes()[:-1] + b"x")
    assert cli.main(["--verify", "--out", str(bad)]) == 1
    got = capsys.readouterr()
    assert any(tar.name in line and line.startswith("FAIL") for line in got.out.splitlines()), got.out
    err = got.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("encode_latents.py: error: 1 problem(s)") and tar.name in err[0], err


@pytest.mark.slow
def test_torchrun_two_processes_byte_identical(encoded: Path, tree, tiny_vae_dir, tmp_path) -> None:
    out = tmp_path / "two"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node", "2", str(ROOT / "encode_latents.py"),
           "--source", str(tree[0]), "--out", str(out), "--vae", str(tiny_vae_dir),
           "--resolution", str(RES), "--flips", "both", "--shard-size", "16", "--batch-size", "8",
           "--no-progress", "--device", "cpu", "--threads", str(THREADS)]  # cfg_for's batch and threads
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shard_bytes(out) == shard_bytes(encoded)
    assert json.loads((out / "manifest.json").read_text()) == json.loads(
        (encoded / "manifest.json").read_text())


@pytest.mark.slow
def test_kill_9_then_rerun_finishes_with_each_image_once(tmp_path: Path, class_tree,
                                                         tiny_vae_dir) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    class_tree(src, per_class=80, classes=3, seed=1)
    args = ["--source", str(src), "--out", str(out), "--vae", str(tiny_vae_dir), "--resolution",
            "64", "--flips", "none", "--shard-size", "6", "--batch-size", "2", "--no-progress",
            "--threads", "1"]
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None and not list(out.glob("shard-*.tar")):
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    run_encode(cfg_for(src, out, tiny_vae_dir, resolution=64, flips="none", shard_size=6,
                       batch_size=2))
    lst = list_source(src)
    bad = {"c0/zero.JPEG", "c0/text.JPEG", "c0/truncated.JPEG"}
    want = {shards.sample_key(i, s) for i, s in enumerate(lst.sources) if s not in bad}
    assert set(read_out(out)) == want  # read_out also asserts there is no duplicate
    assert shards.verify_shards(out) == [] and not list(out.glob(".*.tmp"))


def test_tar_stream_matches_tarfile_and_reads_with_webdataset(encoded: Path, tmp_path) -> None:
    lat = np.arange(2 * 4 * 2 * 2, dtype=np.float16).reshape(2, 4, 2, 2)
    samples = [shards.encode_sample(f"{i:08d}_{'x' * (120 if i == 1 else 3)}", lat, i, "a/b.png",
                                    False) for i in range(3)]
    ours = io.BytesIO()
    ts = shards.TarStream(ours)
    for s in samples:
        ts.write(s)
    ts.close()
    ref = io.BytesIO()
    with tarfile.open(fileobj=ref, mode="w|") as tf:
        for s in samples:
            for ext in sorted(k for k in s if k != "__key__"):
                ti = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(s[ext]), 0, 0o444, "", ""
                tf.addfile(ti, io.BytesIO(s[ext]))
    assert ours.getvalue() == ref.getvalue()
    np.testing.assert_array_equal(np.load(io.BytesIO(samples[0]["latent.npy"])), lat)

    import webdataset as wds
    ds = wds.WebDataset(str(encoded / "shard-000000.tar"), shardshuffle=False, empty_check=False)
    first = next(iter(ds))
    # keys are {listing index:08d}_{stem}; shard 0 holds a random (seeded) part of the listing (issue 13)
    assert {"latent.npy", "cls", "json"} <= set(first) and re.match(r"\d{8}_\w+$", first["__key__"])


# ----------------------------------------------------------------------------- parallelism + bench


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 16 simulated cores
def test_gpu_decode_workers_use_every_core_but_one(monkeypatch, tree) -> None:
    from latent_patch import encode as enc

    cfg = EncodeConfig(source=str(tree[0]), resolution=RES)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(enc, "cpus_per_process", lambda: 16)  # 16 cores, one GPU
    workers, _ = enc.choose_parallelism(cfg, gpu)
    assert 14 <= workers <= 15  # the main process keeps a core (VAE launches, tar writing)
    assert enc.choose_parallelism(cfg, cpu) == (0, 16)  # the CPU decodes inline, as before
    monkeypatch.setattr(enc, "cpus_per_process", lambda: 1)
    assert enc.choose_parallelism(cfg, gpu)[0] == 1
    cfg.workers, cfg.threads = 3, 2
    assert enc.choose_parallelism(cfg, gpu) == (3, 2)
    # the loader: pinned on a GPU, and enough batches ahead without flooding /dev/shm
    lst = list_source(tree[0])
    plan = enc.plan_chunks([0], 8, enc.input_order(len(lst)), 8)
    for w in (1, 8, 15, 31):
        dl = enc.make_loader(lst, cfg, plan, w, pin=True)
        assert dl.num_workers == w and dl.pin_memory and not dl.persistent_workers
        ahead = w * dl.prefetch_factor  # as many as before up to 8 workers, then about 32
        assert dl.prefetch_factor >= 2 and min(30, 4 * w) <= ahead <= max(32, 2 * w)
    assert enc.make_loader(lst, cfg, plan, 0, pin=False).prefetch_factor is None


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_encode",
                                                  ROOT / "benchmarks" / "bench_encode.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_encode_uses_the_gpu_when_there_is_one(monkeypatch) -> None:
    bench = _bench_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert bench.pick_device(None).type == "cuda"  # was pinned to the CPU: silent for minutes
    assert bench.pick_device("cpu").type == "cpu"
    args = bench.parse_args(["--sd-vae", "--images", "1024", "--resolution", "256"])
    assert bench.defaults(args, cuda=True)[:3] == (1024, 256, 64)


def test_bench_encode_reports_parts_bound_and_flops(capsys) -> None:
    """In process, tiny sizes: the CPU (shared-cores) and the GPU-style (separate decode workers)
    measurements, with the sweep, on the CPU."""
    bench = _bench_module()
    tiny = ["--images", "16", "--resolution", "32", "--batch-size", "8", "--repeats", "1"]
    got = bench.run([*tiny, "--batch-sizes", "4,8"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("[bench_encode")]
    assert "device cpu" in lines[0] and any("pipeline: 16/16 images" in ln for ln in lines)
    assert any("each batch also through the parts alone" in ln for ln in lines)
    for key in ("pipeline_img_s", "vae_img_s", "decode_img_s", "bound_img_s", "ratio",
                "ratio_total", "ratios_all_repeats", "ratio_best_of_each", "workers"):
        assert key in got, key  # the fields the acceptance check and BENCHMARKS.md use
    v, d, p = got["vae_img_s"], got["decode_img_s"], got["pipeline_img_s"]
    assert got["bound"] == "1/(1/vae + 1/decode)" and got["decode_workers"] == 0
    assert got["bound_img_s"] == pytest.approx(1 / (1 / v + 1 / d), rel=1e-3)
    assert got["ratio"] == pytest.approx(p / got["bound_img_s"], rel=2e-2)
    assert got["ratio_vae"] == pytest.approx(p / v, rel=2e-2)
    assert got["vae_gflop_per_encode"] > 0 and got["vae_encodes_s"] == pytest.approx(v, rel=1e-3)
    assert got["vae_tflops"] == pytest.approx(v * got["vae_gflop_per_encode"] / 1e3, rel=5e-2)
    assert got["pipeline_steady_img_s"] > 0 and got["dtype"] == "float32"
    assert set(got["batch_sweep"]) == {"4", "8"} and got["best_batch_size"] in (4, 8)

    got = bench.run([*tiny, "--bound", "separate", "--workers", "1", "--flips", "both",
                     "--batch-sizes", "none"])
    capsys.readouterr()
    v, d = got["vae_img_s"], got["decode_img_s"]
    assert got["bound"] == "min(vae, decode)" and got["decode_workers"] == 1
    assert got["bound_img_s"] == pytest.approx(min(v, d), rel=1e-3)
    assert got["bottleneck"] == ("vae" if v <= d else "decode")
    assert got["vae_encodes_s"] == pytest.approx(2 * v, rel=1e-3)  # flips: 2 encodes an image
    assert got["batch_sweep"] is None and got["flips"] == "both"


def test_bench_encode_times_the_parts_inside_the_job_loop_and_leaves_them_out(tmp_path) -> None:
    """Shared cores: the parts alone run on each batch as it reaches the job (the job waits), so
    both meet the same moment of the machine; the job's times must not include that work."""
    bench = _bench_module()
    bench.make_jpegs(tmp_path / "src", 24)
    bench.make_vae(tmp_path / "vae", sd=False)
    cfg = EncodeConfig(source=str(tmp_path / "src"), out=str(tmp_path / "out"),
                       vae=str(tmp_path / "vae"), resolution=32, batch_size=8, workers=0,
                       device="cpu", progress=False)
    seen: list[list[int]] = []

    class SlowParts:  # stands in for PartsAlone: 0.3 s per batch, a cost the job must not carry
        def __call__(self, indices: list[int]) -> None:
            seen.append(indices)
            time.sleep(0.3)

    t = time.perf_counter()
    loop, total, steady = bench.time_pipeline(cfg, parts=SlowParts())
    wall = time.perf_counter() - t
    assert sorted(i for b in seen for i in b) == list(range(24)) and len(seen) == 3
    assert wall > 0.9 and loop < wall - 0.85 and total < wall - 0.85  # the 0.9 s of parts left out
    assert steady[0] == 16 and steady[1] < 0.6  # batches 1-2 arrived 2 batches of work apart


def test_bench_encode_counts_encoder_flops_with_attention(tiny_vae_dir) -> None:
    """FLOPs counted once on one image, attention included: convolutions grow 4x from 32 to 64
    px, the mid-block attention 16x (64 -> 256 tokens), so the total grows by more than 4x
    (exactly 4x when the counter misses the fused CPU attention kernel)."""
    bench = _bench_module()
    codec = VAECodec.load(str(tiny_vae_dir), device="cpu")
    f32, f64 = bench.encoder_flops(codec, 32), bench.encoder_flops(codec, 64)
    assert f32 > 0 and 4.1 < f64 / f32 < 4.6


def test_shards_of_a_class_sorted_source_mix_its_classes(encoded: Path) -> None:
    """Issue 13: samples go to shards in a seeded permutation of the class-sorted listing, so every
    shard holds a mix of classes (a block of the sorted listing held one or two)."""
    classes_per_shard = []
    for shard in sorted(encoded.glob("shard-*.tar")):
        with tarfile.open(shard) as tf:
            labels = {int(tf.extractfile(m).read()) for m in tf.getmembers() if m.name.endswith(".cls")}
        classes_per_shard.append(len(labels))
    assert len(classes_per_shard) == 13 and sum(n >= 2 for n in classes_per_shard) >= 11, classes_per_shard
    order = enc.input_order(102)
    assert sorted(order.tolist()) == list(range(102)) and order.tolist() != list(range(102))
    assert np.array_equal(order, enc.input_order(102))  # a function of the listing size and the seed only


def test_encoding_leaves_the_callers_thread_count(tree, tiny_vae_dir, tmp_path) -> None:
    """Encoding on the CPU sets its own torch thread count; the caller's comes back after (the demo
    trains in the same process, and a fresh run must train like a resumed one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_encode(cfg_for(tree[0], tmp_path / "out", tiny_vae_dir, threads=2, flips="none"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
