"""The sampling job: labels, per-sample noise, work split, CFG, output layout, resume, multi-process.

Runs on the CPU with a tiny DiT (latent 4 x 8 x 8) and a toy decoder. This file doubles as the
worker script that the multi-process tests start under torchrun (see ``worker`` at the bottom).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from latent_patch import codec, edm, evaluate, sampling  # noqa: E402
from latent_patch.config import SamplerConfig  # noqa: E402
from latent_patch.edm import Precond, sample  # noqa: E402

C, R, K = 4, 8, 10  # latent channels, latent side, classes
SAMPLER = SamplerConfig(steps=4, S_churn=10.0, cfg_scale=1.5, cfg_interval=[0.05, 50.0])
IDENTITY = {"model": "tiny-dit-seed0", "sampler": dataclasses.asdict(SAMPLER), "seed": 7}


# --------------------------------------------------------------------------- fixtures

class TinyNet(torch.nn.Module):
    """A few-thousand-parameter denoiser with the project's call signature
    ``net(x (B, C+2, h, w), c_noise (B,), labels (B,)) -> (B, C, h, w)``; label K is the null class.
    Pure torch, so the torchrun workers start in seconds (the real models import diffusers)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.inp = torch.nn.Conv2d(C + 2, width, 3, padding=1)
        self.noise = torch.nn.Linear(1, width)
        self.label = torch.nn.Embedding(K + 1, width)
        self.out = torch.nn.Conv2d(width, C, 3, padding=1)

    def forward(self, x, c_noise, labels):
        h = self.inp(x) + (self.noise(c_noise.view(-1, 1).float()) + self.label(labels))[:, :, None, None]
        return self.out(torch.nn.functional.silu(h))


def tiny_net() -> torch.nn.Module:
    """The same random weights in every process that calls it."""
    torch.manual_seed(0)
    return TinyNet().eval()


def tiny_dit() -> torch.nn.Module:
    """DiT-T/2 (the real model code) with weights moved off adaLN-Zero's init, so labels matter."""
    from latent_patch.models import ModelConfig, build_model

    torch.manual_seed(0)
    net = build_model(ModelConfig(preset="DiT-T/2", latent_channels=C, latent_size=R, num_classes=K))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net.eval()


def toy_decode(z: torch.Tensor, sleep: float = 0.0) -> torch.Tensor:
    """Stand-in for the VAE: 2x nearest upsampling of 3 latent channels, squashed to uint8."""
    if sleep:
        time.sleep(sleep)
    x = torch.nn.functional.interpolate(z[:, :3], scale_factor=2)
    return ((x.tanh() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def make_sampler(net=None, sampler_cfg: SamplerConfig = SAMPLER, seed: int = 7, sleep: float = 0.0,
                 classes=None) -> edm.ImageSampler:
    return edm.ImageSampler(net if net is not None else tiny_net(), sigma_data=0.5, latent_channels=C,
                                 latent_size=R, num_classes=K, sampler=sampler_cfg,
                                 decode=lambda z: toy_decode(z, sleep), seed=seed, classes=classes)


def load_npz(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / "samples.npz", allow_pickle=False) as f:
        return f["arr_0"], f["labels"]


# --------------------------------------------------------------------------- labels, seeds, split

def test_labels_class_balanced_and_stable():
    labels = edm.index_labels(range(25), K).numpy()
    counts = np.bincount(labels, minlength=K)
    assert counts.tolist() == [3] * 5 + [2] * 5  # N // K each, remainder on the first classes
    assert (edm.index_labels(range(20), K).numpy() == labels[:20]).all()  # independent of N
    chosen = edm.index_labels(range(7), K, classes=[1, 5, 7]).tolist()
    assert chosen == [1, 5, 7, 1, 5, 7, 1]


def test_row_noise_depends_only_on_seed_and_index():
    whole = edm.RowRandn(3, range(6)).randn((2, 3))
    parts = torch.cat([edm.RowRandn(3, [0, 1]).randn((2, 3)), edm.RowRandn(3, [2, 3, 4, 5]).randn((2, 3))])
    assert torch.equal(whole, parts)
    assert torch.equal(edm.RowRandn(3, [4]).randn((2, 3))[0], whole[4])
    assert not torch.equal(edm.RowRandn(4, range(6)).randn((2, 3)), whole)  # the seed matters
    rows = edm.RowRandn(3, range(6))
    x = torch.zeros(6, 2, 3, dtype=torch.float64)
    assert rows.randn_like(x).dtype == torch.float64


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_plan_batches_no_duplicate_no_gap(world):
    todo = [i for i in range(40) if i not in {3, 4, 17, 30, 31, 32}]
    blocks = [b for r in range(world) for b in edm.plan_batches(todo, 4, r, world)]
    flat = [i for b in blocks for i in b]
    assert sorted(flat) == todo and len(flat) == len(set(flat))
    assert all(len(b) <= 4 and b == list(range(b[0], b[-1] + 1)) for b in blocks)


# --------------------------------------------------------------------------- CFG through the job path

class CountingNet(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.batches = net, []

    def forward(self, x, c_noise, labels):
        self.batches.append(x.shape[0])
        return self.net(x, c_noise, labels)


@pytest.mark.parametrize("make_net", [tiny_net, tiny_dit], ids=["tiny", "dit"])
def test_cfg_scale_one_zero_and_interval(one_thread, make_net):
    net = make_net()
    idx = list(range(6))
    base = SamplerConfig(steps=3)

    def latents(cfg, classes=None):
        counting = CountingNet(net)
        x, _ = make_sampler(counting, cfg, classes=classes).latents(idx)
        return x, counting.batches

    cond, passes = latents(base)
    assert passes == [6] * 5  # 3 Heun steps = 5 evaluations, one batch each: scale 1 costs one pass
    # scale 1 is the plain conditional model
    rng = edm.RowRandn(7, idx)
    manual = sample(Precond(net, 0.5), rng.randn((C, R, R)), torch.tensor(idx) % K, base, K, rng.randn_like)
    assert torch.equal(cond, manual)
    # scale 0 is the unconditional model (every label the null class K)
    uncond, _ = latents(dataclasses.replace(base, cfg_scale=0.0))
    rng = edm.RowRandn(7, idx)
    manual_u = sample(Precond(net, 0.5), rng.randn((C, R, R)), torch.full((6,), K), base, K, rng.randn_like)
    assert torch.allclose(uncond, manual_u, atol=1e-5) and not torch.allclose(uncond, cond, atol=1e-3)
    # guidance: one batched pass of 2B rows; an interval that excludes every sigma gates it off
    guided, passes = latents(dataclasses.replace(base, cfg_scale=2.0))
    assert passes == [12] * 5 and not torch.allclose(guided, cond, atol=1e-3)
    gated, passes = latents(dataclasses.replace(base, cfg_scale=2.0, cfg_interval=[1000.0, 2000.0]))
    assert torch.equal(gated, cond) and passes == [6] * 5
    everywhere, _ = latents(dataclasses.replace(base, cfg_scale=2.0, cfg_interval=[0.0, 1000.0]))
    assert torch.allclose(everywhere, guided, atol=1e-6)
    partly, passes = latents(dataclasses.replace(base, cfg_scale=2.0, cfg_interval=[0.1, 10.0]))
    assert 6 in passes and 12 in passes  # guided only at the sigmas inside the interval


# --------------------------------------------------------------------------- the job in-process

def test_job_layout_and_settings_guard(tmp_path, one_thread):
    s = make_sampler()
    out = tmp_path / "out"
    sampling.run_job(s, out, 13, 4, IDENTITY, save=("npz", "png"), grid=9, progress=False)
    arr, labels = load_npz(out)
    assert arr.dtype == np.uint8 and arr.shape == (13, 2 * R, 2 * R, 3)
    assert labels.tolist() == [i % K for i in range(13)]
    direct, _ = s.images(list(range(4, 8)))  # index order: rows 4..7 are samples 4..7
    assert np.array_equal(arr[4:8], direct)
    pngs = sorted((out / "images").glob("*.png"))
    assert [p.name for p in pngs[:2]] == ["000000.png", "000001.png"] and len(pngs) == 13
    from PIL import Image

    assert np.array_equal(np.asarray(Image.open(pngs[12])), arr[12])
    assert (out / "grid.png").is_file()
    meta = json.loads((out / "sampling.json").read_text())
    assert meta["identity"]["seed"] == 7 and meta["num_samples"] == 13
    # other settings into the same OUT: refused with the differing key named
    with pytest.raises(sampling.SettingsMismatch, match="seed") as err:
        sampling.run_job(s, out, 13, 4, {**IDENTITY, "seed": 8}, progress=False)
    assert "seed: 7 -> 8" in str(err.value) and "model" not in str(err.value)
    # a nested change is named by its dotted key alone, not by two whole dicts
    changed = {**IDENTITY, "sampler": {**IDENTITY["sampler"], "steps": IDENTITY["sampler"]["steps"] + 1}}
    with pytest.raises(sampling.SettingsMismatch) as err:
        sampling.run_job(s, out, 13, 4, changed, progress=False)
    steps = IDENTITY["sampler"]["steps"]
    assert f"(sampling.json -> now: sampler.steps: {steps} -> {steps + 1})" in str(err.value)
    # a larger N with the same settings reuses the 13 done samples and only adds the rest
    sampling.run_job(s, out, 16, 5, IDENTITY, save=("npz",), grid=0, progress=False)
    arr16, _ = load_npz(out)
    assert np.array_equal(arr16[:13], arr)


def test_resume_after_lost_parts_and_other_batch_size(tmp_path, one_thread):
    s = make_sampler()
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    sampling.run_job(s, ref_out, 12, 4, IDENTITY, save=("npz",), grid=0, progress=False)
    ref, _ = load_npz(ref_out)
    sampling.run_job(s, out, 12, 4, IDENTITY, save=("npz",), grid=0, progress=False)
    parts = sampling.list_parts(out)
    for _, _, p in parts[1:]:
        p.unlink()  # as if killed after the first block
    (out / "parts" / ".idx-00000004-00000008.npz.123.tmp").write_bytes(b"half")  # a killed writer's leftover
    sampling.run_job(s, out, 12, 3, IDENTITY, save=("npz",), grid=0, progress=False)
    again, labels = load_npz(out)
    assert not list((out / "parts").glob(".*.tmp"))
    # the kept part is the first run's bytes; the rest, made in blocks of 3, is bit for bit what the
    # sampler makes for those blocks (bits are compared at one batch size: a kernel may sum in
    # another order for another batch size, which can move a rare pixel by one level on some CPU)
    blocks = [[4, 5, 6], [7, 8, 9], [10, 11]]
    assert np.array_equal(again[:4], ref[:4])
    assert np.array_equal(again[4:], np.concatenate([s.images(b)[0] for b in blocks]))
    assert labels.tolist() == [i % K for i in range(12)]
    assert np.abs(again.astype(np.int16) - ref).max() <= 1  # and the first run's images, to a level


def test_gap_is_reported(tmp_path):
    s = make_sampler(sampler_cfg=SamplerConfig(steps=2))
    out = tmp_path / "out"
    sampling.run_job(s, out, 8, 4, IDENTITY, save=("npz",), grid=0, progress=False)
    sampling.list_parts(out)[0][2].unlink()
    with pytest.raises(RuntimeError, match="samples 0..3 are missing"):
        sampling.write_npz(out, 8)


def test_make_decoder_undoes_the_training_normalisation():
    calls = []

    class FakeCodec:
        scaling_factor, shift_factor = 0.5, 0.1

        def scale(self, x):
            return (x - self.shift_factor) * self.scaling_factor

        def decode_uint8(self, z):
            calls.append(len(z))
            return z[:, :3].permute(0, 2, 3, 1).clone()

    z = torch.randn(5, 4, 2, 2)
    same = codec.make_decoder(FakeCodec(), batch_size=2)(z)
    assert torch.equal(same, z[:, :3].permute(0, 2, 3, 1)) and calls == [2, 2, 1]
    other = codec.make_decoder(FakeCodec(), scaling_factor=0.25, shift_factor=0.0)(z)
    raw = z / 0.25
    assert torch.allclose(other, ((raw - 0.1) * 0.5)[:, :3].permute(0, 2, 3, 1))


def test_make_decoder_undoes_the_channel_norm_first():
    from latent_patch.codec import latent_norm

    class IdentityCodec:
        scaling_factor, shift_factor = 0.5, 0.0

        def decode_uint8(self, z):
            return z

    norm = latent_norm("channel", {"latent_stats": {"mean": [1.0, -1.0], "std": [2.0, 0.5]}}, 0.5)
    z = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(codec.make_decoder(IdentityCodec(), norm=norm)(norm.apply(z)), z)
    cfg = SimpleNamespace(data=SimpleNamespace(latent_norm="channel"), edm=SimpleNamespace(sigma_data=0.5))
    with pytest.raises(ValueError, match="latent_stats.*ckpt-dir"):  # checkpoint manifest without stats
        codec.model_norm(cfg, {"vae": {}}, "ckpt-dir")
    assert codec.model_norm(SimpleNamespace(edm=SimpleNamespace(sigma_data=0.5)), None) is None  # old configs


class ToyCodec:
    scaling_factor, shift_factor = 0.18215, 0.0

    def decode_uint8(self, z):
        return toy_decode(z)


def toy_evaluate(net, distributed: bool = False) -> dict:
    """evaluate_model on 20 samples with a cheap extractor, against the statistics of those very
    samples (so FD ~ 0) made directly by ImageSampler."""
    from latent_patch import fid

    extractor = fid.CallableFeatures(lambda im: im.reshape(len(im), -1)[:, ::97].astype(np.float64), "toy")
    cfg = SimpleNamespace(model=SimpleNamespace(latent_channels=C, latent_size=R, num_classes=K),
                          edm=SimpleNamespace(sigma_data=0.5), data=SimpleNamespace(shards=None))
    imgs, _ = make_sampler(net, SamplerConfig(steps=3), seed=0).images(list(range(20)))
    ref = fid.Stats(*fid.stats_of(extractor.features(imgs)), num=20, extractor="toy")
    return evaluate.evaluate_model(net, cfg, 20, ref, features=extractor, codec=ToyCodec(), manifest={},
                                   sampler=SamplerConfig(steps=3), batch_size=8, distributed=distributed)


def test_evaluate_model_with_custom_features(one_thread):
    net = tiny_net().train()
    m = toy_evaluate(net)
    assert net.training  # mode restored
    assert m["features"] == "toy" and m["num_samples"] == 20 and abs(m["fd"]) < 1e-6


# --------------------------------------------------------------------------- the CLI on a real checkpoint

def _write_checkpoint(run: Path, vae_dir: Path, sampler: SamplerConfig | None = None) -> None:
    """A complete checkpoint folder as train.py writes it (tiny DiT, manifest naming a tiny VAE)."""
    import yaml

    from latent_patch import checkpoint as ck
    from latent_patch import config as config_mod
    from latent_patch.config import TrainConfig

    from latent_patch.models import ModelConfig

    cfg = TrainConfig()
    cfg.model = ModelConfig(preset="DiT-T/2", latent_channels=C, latent_size=R, num_classes=K)
    cfg.sampler = sampler or SamplerConfig()
    net = tiny_dit()
    tmp = ck.begin(run, 10)
    ck.save_weights(tmp / ck.MODEL_FILE, net.state_dict(), {})
    ck.save_weights(tmp / ck.EMA_FILE, net.state_dict(), {})
    ck.write_text(tmp / ck.CONFIG_FILE, yaml.safe_dump(config_mod.to_dict(cfg), sort_keys=False))
    manifest = {"vae": {"id": str(vae_dir), "scaling_factor": 0.5, "shift_factor": 0.0}}
    ck.write_text(tmp / ck.MANIFEST_FILE, json.dumps(manifest))
    ck.finish(tmp)


def _tiny_vae(path: Path) -> None:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=C, block_out_channels=(8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                  layers_per_block=1, norm_num_groups=4, sample_size=16).save_pretrained(path)


def test_cli_end_to_end(tmp_path, one_thread, monkeypatch, capsys):
    import sample as sample_cli
    from scipy import linalg

    from latent_patch import fid

    _tiny_vae(tmp_path / "vae")
    _write_checkpoint(tmp_path / "run", tmp_path / "vae")
    out = tmp_path / "out"

    def toy(im: np.ndarray) -> np.ndarray:  # 4 fixed pixel values: fewer than the 6 samples, so
        return im.reshape(len(im), -1)[:, ::200].astype(np.float64)  # their covariance is full rank

    extractor = fid.CallableFeatures(toy, "toy")
    monkeypatch.setattr(fid, "build_extractor", lambda *a, **k: extractor)
    ref_feats = np.random.default_rng(0).normal(100.0, 30.0, size=(50, 4))
    ref = fid.Stats(ref_feats.mean(0), np.cov(ref_feats, rowvar=False), num=50, extractor="toy")
    ref.save(tmp_path / "ref.npz")
    args = ["--checkpoint", str(tmp_path / "run"), "--num-samples", "6", "--out", str(out), "--seed", "1",
            "--steps", "3", "--cfg-scale", "1.5", "--batch-size", "4", "--fid-ref", str(tmp_path / "ref.npz"),
            "--no-progress"]
    sample_cli.main(args)
    captured = capsys.readouterr()
    assert "features (" not in captured.err and "sampling (" not in captured.err  # --no-progress: no bars
    printed = captured.out.splitlines()  # --no-progress still says what it made and where
    summary = [line for line in printed if line.startswith("sampling done:")]
    assert len(summary) == 1 and f"6 samples in {out} (samples.npz, images/, grid.png); this run made 6 in" in summary[0]
    arr, labels = load_npz(out)
    assert arr.shape == (6, 16, 16, 3) and labels.tolist() == [0, 1, 2, 3, 4, 5]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["features"] == "toy" and metrics["num_samples"] == 6
    # the FD of the saved samples against the reference, with numpy + scipy alone
    feats = toy(arr)
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    covmean = linalg.sqrtm(sigma @ ref.sigma).real
    expect = float(np.sum((mu - ref.mu) ** 2) + np.trace(sigma) + np.trace(ref.sigma) - 2 * np.trace(covmean))
    assert metrics["fd"] == pytest.approx(expect, rel=1e-6)
    meta = json.loads((out / "sampling.json").read_text())
    assert meta["identity"]["sampler"]["steps"] == 3 and meta["identity"]["vae"]["scaling_factor"] == 0.5
    with pytest.raises(SystemExit):  # refused with one clear line, not a traceback
        sample_cli.main([a if a != "1.5" else "2.0" for a in args])
    assert "different settings" in capsys.readouterr().err
    sample_cli.main(args[:-3] + ["--no-progress", "--batch-size", "5"])  # same settings: nothing to redo
    assert np.array_equal(load_npz(out)[0], arr)
    assert "this run made 0 in" in capsys.readouterr().out


def test_sampler_defaults_come_from_the_run_then_presets_then_flags(tmp_path, one_thread):
    """The run's recommended sampler is sample.py's default; --preset replaces it; flags override either."""
    import sample as sample_cli

    from latent_patch.edm import AUTHORS_IMAGENET256

    _tiny_vae(tmp_path / "vae")
    recommended = SamplerConfig(steps=3, cfg_scale=2.5, cfg_interval=[0.3, 5.0], method="euler")
    _write_checkpoint(tmp_path / "run", tmp_path / "vae", recommended)
    base = ["--checkpoint", str(tmp_path / "run"), "--num-samples", "2", "--batch-size", "2", "--save", "npz",
            "--grid", "0", "--no-progress"]

    def used(out: str, *flags: str) -> dict:
        sample_cli.main([*base, "--out", str(tmp_path / out), *flags])
        return json.loads((tmp_path / out / "sampling.json").read_text())["identity"]["sampler"]

    assert used("run-default") == dataclasses.asdict(recommended)
    assert used("flag", "--cfg-scale", "1.0") == {**dataclasses.asdict(recommended), "cfg_scale": 1.0}
    assert used("edm", "--preset", "edm", "--steps", "2") == {**dataclasses.asdict(SamplerConfig()), "steps": 2}
    authors = used("authors", "--preset", "authors", "--steps", "2")  # every other field is the authors'
    # the authors' ImageNet-256 sampler as method.md states it (256 steps, S_churn 40, S_min 0.05,
    # S_max 50, S_noise 1.003, guidance 1.3), with EDM's sigma range and rho and no interval
    paper = {"steps": 256, "S_churn": 40.0, "S_min": 0.05, "S_max": 50.0, "S_noise": 1.003, "cfg_scale": 1.3,
             "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "method": "heun", "cfg_interval": None}
    assert dataclasses.asdict(AUTHORS_IMAGENET256) == paper
    assert authors == {**paper, "steps": 2}
    # sampler_flags (the demo's way to pass its own sampler): nothing of the run's recommended one leaks,
    # not its interval nor its method, and every field comes through exactly
    from latent_patch.cli import sampler_flags

    mine = SamplerConfig(steps=2, sigma_min=0.01, sigma_max=40.0, rho=5.0, S_churn=1.5, S_min=0.1, S_max=9.0,
                         S_noise=1.001, method="heun", cfg_scale=1.7, cfg_interval=None)
    assert used("flags", *sampler_flags(mine)) == dataclasses.asdict(mine)
    interval = dataclasses.replace(mine, cfg_interval=[0.5, 2.0], method="euler")
    assert used("flags-interval", *sampler_flags(interval)) == dataclasses.asdict(interval)


# --------------------------------------------------------------------------- multi-process and kill

def _torchrun(out: Path, nproc: int, batch: int, n: int, sleep: float = 0.0, **popen) -> subprocess.Popen:
    from faults.common import child_env

    env = child_env()  # faults.THREADS torch threads: the in-process references' count (one_thread)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           __file__, "--out", str(out), "--num-samples", str(n), "--batch-size", str(batch), "--sleep", str(sleep)]
    if nproc == 1:
        cmd = [sys.executable, __file__] + cmd[cmd.index(__file__) + 1:]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **popen)


def _kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the launcher and every descendant, found through /proc (the fault suite's kill):
    torchrun starts its workers in sessions of their own, so a process-group kill would leave
    them running, writing parts into the folder the resume works on (and, orphaned, waiting for
    the launcher's store until the 2 h collective timeout). Returns the pids it killed."""
    from faults.common import kill_tree, process_tree

    if proc.poll() is not None:  # ended (and reaped): its pid may belong to someone else now
        return []
    pids = process_tree(proc.pid)
    kill_tree(proc.pid)
    proc.wait()
    return pids


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie does not: it is dead, only not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def _finish(proc: subprocess.Popen, timeout: float = 120) -> None:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _kill_tree(proc)  # a timed-out or failed test leaves no worker behind
    assert proc.returncode == 0, out.decode()[-3000:]


@pytest.mark.slow
def test_two_processes_equal_one_and_kill_resume(tmp_path, one_thread):
    n, batch = 10, 3
    ref_out = tmp_path / "ref"
    sampling.run_job(make_sampler(), ref_out, n, batch, IDENTITY, save=("npz", "png"), grid=0, progress=False)
    ref, ref_labels = load_npz(ref_out)

    # 2 processes under torchrun (gloo): the same arrays as one process
    two = tmp_path / "two"
    _finish(_torchrun(two, 2, batch, n))
    # the premise of comparing bits: each worker sampled at the reference's torch thread count
    assert [int((two / f"threads-{r}.txt").read_text()) for r in range(2)] == [torch.get_num_threads()] * 2
    arr, labels = load_npz(two)
    assert np.array_equal(arr, ref) and np.array_equal(labels, ref_labels)
    assert len(list((two / "images").glob("*.png"))) == n
    evals = [json.loads((two / f"eval-{r}.json").read_text()) for r in range(2)]  # distributed evaluate_model
    assert evals[0] == evals[1] and evals[0]["num_samples"] == 20 and abs(evals[0]["fd"]) < 1e-6

    # SIGKILL a 2-process run mid-way, then finish it with ONE process: the same arrays again
    killed = tmp_path / "killed"
    proc = _torchrun(killed, 2, batch, n, sleep=0.5)
    deadline = time.time() + 90
    while len(sampling.list_parts(killed)) < 1 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    tree = _kill_tree(proc)  # launcher, its workers and whatever they started, collected before the kill
    assert len(tree) >= 3, f"expected the launcher and 2 workers alive at the kill, found pids {tree}"
    deadline = time.time() + 1.0  # SIGKILL is immediate; this only covers the kernel's teardown
    while any(_alive(p) for p in tree) and time.time() < deadline:
        time.sleep(0.02)
    assert not [p for p in tree if _alive(p)], f"processes outlived the kill: {[p for p in tree if _alive(p)]}"
    done = len(sampling.done_indices(killed, n))
    assert 0 < done < n, f"kill landed outside the run ({done} of {n} done)"
    assert not (killed / "samples.npz").exists()
    sampling.run_job(make_sampler(), killed, n, batch, IDENTITY, save=("npz",), grid=0, progress=False)
    arr, _ = load_npz(killed)
    assert np.array_equal(arr, ref)


# --------------------------------------------------------------------------- worker (torchrun entry)

def worker(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--sleep", type=float, default=0.0)
    a = p.parse_args(argv)
    from latent_patch import dist

    dist.init_process_group()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    Path(a.out, f"threads-{dist.dist_info().rank}.txt").write_text(str(torch.get_num_threads()))
    sampling.run_job(make_sampler(sleep=a.sleep), a.out, a.num_samples, a.batch_size, IDENTITY,
                     save=("npz", "png"), grid=0, progress=False)
    if a.sleep == 0.0:  # also: training-time FID split over the ranks, features gathered
        info = dist.dist_info()
        m = toy_evaluate(tiny_net(), distributed=info.world_size > 1)
        Path(a.out, f"eval-{info.rank}.json").write_text(json.dumps({k: v for k, v in m.items() if k != "seconds"}))
    dist.destroy()


if __name__ == "__main__":
    worker()


def test_queued_decode_gives_the_pixels_of_a_plain_decode(tmp_path, one_thread):
    """The decoder's start() (what the job uses, so a GPU can queue the next batch meanwhile) and a
    plain call give the same uint8 images, chunked or not; the sampler's start() the same batch.
    Bits are compared at one chunk size (another may sum in another order on some CPU)."""
    from latent_patch.codec import VAECodec, make_decoder

    _tiny_vae(tmp_path / "vae")
    vae = VAECodec.load(str(tmp_path / "vae"), "cpu")
    z = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    decoder = make_decoder(vae, scaling_factor=0.3, batch_size=2)
    plain = decoder(z)
    assert plain.dtype == torch.uint8 and plain.shape == (5, 16, 16, 3)  # the tiny VAE upsamples 2x
    assert torch.equal(decoder.start(z)(), plain)
    whole = make_decoder(vae, scaling_factor=0.3)  # one chunk of 5
    assert torch.equal(whole.start(z)(), whole(z))
    assert (whole(z).int() - plain.int()).abs().max() <= 1  # the chunks of 2, to a level
    sampler = edm.ImageSampler(tiny_net(), sigma_data=0.5, latent_channels=4, latent_size=8, num_classes=10,
                               sampler=SamplerConfig(steps=3), decode=decoder, seed=3, device="cpu")
    images, labels = sampler.start([4, 5, 6])()
    again, labels2 = sampler.images([4, 5, 6])
    assert np.array_equal(images, again) and np.array_equal(labels, labels2) and images.shape == (3, 16, 16, 3)


def test_a_part_of_other_settings_is_refused_not_mixed(tmp_path, one_thread):
    """Issue 13: every part carries the identity hash of the settings it was made with; a part
    made under others (a rank that resolved another checkpoint) stops the assembly, naming it."""
    s = make_sampler()
    out = tmp_path / "out"
    sampling.run_job(s, out, 8, 4, IDENTITY, save=("npz",), grid=0, progress=False)
    part = sorted((out / "parts").glob("idx-*.npz"))[1]
    with np.load(part) as f:
        assert str(f["identity"]) == sampling.identity_hash(IDENTITY)
        arrays = {k: f[k] for k in f.files}
    arrays["identity"] = np.str_(sampling.identity_hash({**IDENTITY, "weights_sha256": "another model"}))
    np.savez(part, **arrays)
    with pytest.raises(sampling.SettingsMismatch, match=rf"{part.name}: written under other sampling settings"):
        sampling.run_job(s, out, 8, 4, IDENTITY, save=("npz",), grid=0, progress=False)


def _two_rank_agreement(rank: int, world: int, init: str, results) -> None:
    import torch.distributed as tdist

    from latent_patch import dist

    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        results[rank] = (dist.broadcast_text(f"checkpoint of rank {rank}"),
                         dist.same_on_all_ranks("same"), dist.same_on_all_ranks(f"differs {rank}"))
    finally:
        tdist.destroy_process_group()


def test_ranks_share_rank0s_checkpoint_and_compare_their_settings(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_two_rank_agreement, args=(2, f"file://{tmp_path / 'store'}", results), nprocs=2)
    assert results[0] == results[1] == ("checkpoint of rank 0", True, False)
