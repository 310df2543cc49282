"""The training loop on the CPU with tiny shards: learning, exact resume, failure modes, torchrun.

Fixtures write their own shards (design.md format: webdataset tars + manifest.json) of 64
structured 4 x 8 x 8 latents in 10 classes, and a tiny random AutoencoderKL for previews.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from faults.common import child_env, pinned_threads
from latent_patch import checkpoint as ckpt
from latent_patch import config
from latent_patch.config import TrainConfig
from latent_patch.monitor import TrainingError
from latent_patch.train import accumulation_steps, train
from train_latent import main
from tests.trainkit import TINY, metrics, tiny_cfg, write_train_shards

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


pytestmark = pytest.mark.usefixtures("fresh_accelerate")  # one thread, a clean accelerate


# --------------------------------------------------------------------------- learning

def test_loss_falls(shards, tmp_path):
    cfg = tiny_cfg(shards, tmp_path / "run", "run.total_patches=8000", "run.log_every_patches=1000",
                   "run.ckpt_every_patches=0", "optim.lr=0.003", "model.hidden=128", "model.heads=4")
    progress = train(cfg)
    recs = sorted(metrics(tmp_path / "run").values(), key=lambda r: r["step"])
    first, last = recs[0]["loss"], recs[-1]["loss"]
    assert progress.patches >= 8000 and progress.full_equiv < progress.patches  # half-size patches count 1/4
    assert last < 0.9 * first, f"loss did not fall: {first:.4f} -> {last:.4f}"
    assert ckpt.find_latest(tmp_path / "run") is not None  # the final checkpoint is always written
    assert all(np.isfinite(r["loss"]) for r in recs)


@pytest.mark.parametrize("precision,checkpointing", [("bf16", True), ("no", False)],
                         ids=["bf16+checkpointing", "control-fp32"])
def test_bf16_autocast_and_grad_checkpointing_run(shards, tmp_path, monkeypatch, precision, checkpointing):
    """The paths ran, not only the flags: in the training forward the blocks' linear layers give
    bf16 activations, and inside every backward each block the forward ran is run once more
    (recomputed from its checkpoint). The control run (fp32, no checkpointing) shows the probes
    can tell: fp32 activations and no block run during a backward."""
    import latent_patch.train as train_mod

    seen = {"in_backward": False, "forward": 0, "recomputed": 0, "dtypes": set()}

    def count_block(module, args):
        seen["recomputed" if seen["in_backward"] else "forward"] += 1

    def build(*a, **k):
        trainer = real_build(*a, **k)
        for block in trainer.net.blocks:
            block.register_forward_pre_hook(count_block)
            for layer in block.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.register_forward_hook(lambda m, i, out: seen["dtypes"].add(out.dtype))
        real_backward = trainer.accelerator.backward

        def backward(loss, **kw):
            seen["in_backward"] = True
            try:
                return real_backward(loss, **kw)
            finally:
                seen["in_backward"] = False

        trainer.accelerator.backward = backward
        built.append(trainer)
        return trainer

    built = []
    real_build = train_mod.build_trainer
    monkeypatch.setattr(train_mod, "build_trainer", build)
    cfg = tiny_cfg(shards, tmp_path / "run", f"run.mixed_precision={precision}",
                   f"run.grad_checkpointing={str(checkpointing).lower()}",
                   "run.total_patches=200", "run.log_every_patches=100")
    train(cfg)
    assert built[0].accelerator.mixed_precision == precision
    assert seen["forward"] >= len(built[0].net.blocks) * 2  # a few steps ran through every block
    if checkpointing:
        assert seen["dtypes"] == {torch.bfloat16}
        assert seen["recomputed"] == seen["forward"]
    else:
        assert seen["dtypes"] == {torch.float32}
        assert seen["recomputed"] == 0
    assert all(np.isfinite(r["loss"]) for r in metrics(tmp_path / "run").values())


def test_tiny_unet_config_trains(shards, tmp_path):
    cfg = config.load(TrainConfig, ROOT / "configs" / "tiny_cpu_unet.yaml",
                      [f"data.shards={shards}", f"run.out_dir={tmp_path / 'run'}", "run.tensorboard=false",
                       "run.total_patches=200", "run.log_every_patches=100", "run.mixed_precision=no",
                       "eval.preview_every_patches=100"])
    progress = train(cfg)
    assert progress.patches >= 200 and ckpt.find_latest(tmp_path / "run") is not None
    # the manifest's VAE is unavailable (as a hub id is offline): previews skipped with a log line
    assert "previews skipped: VAE" in (tmp_path / "run" / "log.txt").read_text()
    assert not (tmp_path / "run" / "previews").exists()


def test_named_preview_vae_must_load_and_fit(shards, tmp_path):
    """A VAE the user names is checked before the first step (not at the first preview)."""
    from diffusers import AutoencoderKL

    with pytest.raises(TrainingError, match=r"eval\.vae=.*no_vae: cannot load"):
        train(tiny_cfg(shards, tmp_path / "a", "eval.preview_every_patches=100", f"eval.vae={tmp_path / 'no_vae'}"))
    vae8 = tmp_path / "vae8"
    AutoencoderKL(latent_channels=8, block_out_channels=(8,), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",)).save_pretrained(vae8)
    with pytest.raises(TrainingError, match=r"vae8 has 8 latent channels but the shards' latents have 4"):
        train(tiny_cfg(shards, tmp_path / "b", "eval.preview_every_patches=100", f"eval.vae={vae8}"))
    assert not (tmp_path / "b" / "metrics.jsonl").exists() and ckpt.find_latest(tmp_path / "b") is None


def _to_pre_rename_format(ck: Path) -> None:
    """Rewrite a checkpoint as code before issue 10 wrote it: config.yaml with run.total_images,
    run.preview_*, ... (no eval section) and state.pt counting "images"; DONE restamped."""
    data = config.read_yaml(ck / ckpt.CONFIG_FILE)
    for before, after in TrainConfig.RENAMED.items():
        (sec_a, key_a), (sec_b, key_b) = before.split("."), after.split(".")
        data.setdefault(sec_a, {})[key_a] = data[sec_b].pop(key_b)
    del data["eval"]
    (ck / ckpt.CONFIG_FILE).write_text(yaml.safe_dump(data))
    state = torch.load(ck / ckpt.STATE_FILE, weights_only=True)
    state["images"] = state.pop("patches")
    torch.save(state, ck / ckpt.STATE_FILE)
    done = json.loads((ck / ckpt.DONE).read_text())
    (ck / ckpt.DONE).write_text(json.dumps({"files": {name: (ck / name).stat().st_size for name in done["files"]}}))


def test_checkpoint_written_before_the_rename_resumes_exactly(shards, tmp_path):
    first = ["run.total_patches=160", "run.ckpt_every_patches=160", "run.log_every_patches=1"]
    train(tiny_cfg(shards, tmp_path / "new", *first))
    shutil.copytree(tmp_path / "new", tmp_path / "old")
    old_ck = ckpt.find_latest(tmp_path / "old")
    _to_pre_rename_format(old_ck)
    assert "total_images" in (old_ck / ckpt.CONFIG_FILE).read_text()
    net, cfg, _ = ckpt.load_inference_model(old_ck)  # sample.py reads it too
    assert cfg.run.total_patches == 160 and cfg.eval.preview_images == 8
    more = ["run.total_patches=320", "run.ckpt_every_patches=160", "run.log_every_patches=1"]
    a, b = train(tiny_cfg(shards, tmp_path / "new", *more), "auto"), train(tiny_cfg(shards, tmp_path / "old", *more), "auto")
    assert (a.step, a.patches) == (b.step, b.patches) and a.patches >= 320
    new_m, old_m = metrics(tmp_path / "new"), metrics(tmp_path / "old")
    resumed = [s for s in new_m if s > ckpt.list_complete(tmp_path / "new")[0][0]]
    assert resumed and all(new_m[s]["loss"] == old_m[s]["loss"] for s in resumed)


def test_time_budget_stops_with_a_checkpoint_and_resumes(shards, tmp_path):
    cfg = tiny_cfg(shards, tmp_path / "run", "run.total_patches=10000000", "run.max_train_seconds=1",
                   "run.ckpt_every_patches=0", "run.log_every_patches=1000000")
    first = train(cfg)
    assert 0 < first.patches < 10_000_000
    assert ckpt.list_complete(tmp_path / "run")[-1][0] == first.step
    log_file = tmp_path / "run" / "metrics.jsonl"
    with open(log_file, "a") as f:  # as if killed after logging steps past its last checkpoint
        f.write(json.dumps({"step": first.step + 1, "loss": -1.0}) + "\n")
    second = train(cfg, "auto")
    assert second.step > first.step
    steps = [json.loads(line)["step"] for line in log_file.read_text().splitlines()]
    assert steps == sorted(set(steps)) and all(r["loss"] != -1.0 for r in metrics(tmp_path / "run").values())


# --------------------------------------------------------------------------- exact resume

@pytest.fixture(scope="module")
def run_a(shards, tiny_vae, tmp_path_factory) -> Path:
    """An uninterrupted run of ~30 steps, one log line per step, checkpoints at 600 and the end,
    and previews (which must not disturb any training random stream)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path_factory.mktemp("run_a")
    cfg = tiny_cfg(shards, out, "run.total_patches=1200", "run.log_every_patches=1", "run.ckpt_every_patches=600",
                   "run.keep_last=0", "eval.preview_every_patches=500", f"eval.vae={tiny_vae}",
                   "run.tensorboard=true", "model.dropout=0.1")
    with pinned_threads():  # the count of the runs compared with it (fresh_accelerate's)
        train(cfg)
    return out


def test_resume_is_bit_exact(run_a, shards, tmp_path):
    done = ckpt.list_complete(run_a)
    assert len(done) == 2, done
    mid_step, mid = done[0]
    out_b = tmp_path / "run_b"
    cfg = tiny_cfg(shards, out_b, "run.total_patches=1200", "run.log_every_patches=1", "run.ckpt_every_patches=600",
                   "run.keep_last=0", "model.dropout=0.1")  # no previews in B: they must not matter
    train(cfg, str(mid))
    a, b = metrics(run_a), metrics(out_b)
    assert sorted(b) == [s for s in sorted(a) if s > mid_step]
    for step in sorted(b):
        assert a[step]["loss"] == b[step]["loss"], f"step {step}: {a[step]['loss']!r} != {b[step]['loss']!r}"
        assert a[step]["patches"] == b[step]["patches"] and a[step]["full_equiv"] == b[step]["full_equiv"]
    end_a, end_b = ckpt.find_latest(run_a), ckpt.find_latest(out_b)
    assert end_a.name == end_b.name
    for name in (ckpt.MODEL_FILE, ckpt.EMA_FILE):
        wa, wb = ckpt.load_weights(end_a, name), ckpt.load_weights(end_b, name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_previews_and_logs_written(run_a):
    pngs = sorted((run_a / "previews").glob("step-*.png"))
    assert len(pngs) >= 2
    from PIL import Image

    img = Image.open(pngs[0])
    assert img.size == (4 * 32, 2 * 32)  # 8 previews, 4 per class row, 8x8 latents decode to 32 px
    rec = next(iter(metrics(run_a).values()))
    for key in ("patches", "full_equiv", "loss", "patches_per_s", "full_equiv_per_s", "lr", "peak_mem_gib"):
        assert key in rec
    assert list((run_a / "tensorboard").rglob("events.out.tfevents.*"))
    assert "patches/s" in (run_a / "log.txt").read_text()
    saved = config.load(TrainConfig, run_a / "config.yaml")
    assert saved.run.total_patches == 1200


def test_resume_auto_takes_latest_complete_and_ignores_half_written(run_a, shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    latest_step, latest = ckpt.list_complete(run)[-1]
    # a later step that never got its DONE marker, and a writer's temp folder of an even later one
    fake = run / "checkpoints" / ckpt.ckpt_name(latest_step + 5)
    shutil.copytree(latest, fake)
    (fake / ckpt.DONE).unlink()
    shutil.copytree(latest, run / "checkpoints" / f".tmp-{ckpt.ckpt_name(latest_step + 9)}")
    assert ckpt.resolve_resume("auto", run) == latest
    cfg = tiny_cfg(shards, run, "run.total_patches=1400", "run.log_every_patches=1", "run.ckpt_every_patches=0")
    progress = train(cfg, "auto")
    assert min(s for s in metrics(run) if s > latest_step) == latest_step + 1  # continued from the latest
    assert progress.patches >= 1400
    assert not (run / "checkpoints" / f".tmp-{ckpt.ckpt_name(latest_step + 9)}").exists()  # stale temp removed


def test_existing_run_without_resume_is_refused(run_a, shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    with pytest.raises(TrainingError, match="--resume auto"):
        train(tiny_cfg(shards, run, "run.total_patches=1400"))


def test_resume_with_other_model_config_is_refused(run_a, shards, tmp_path):
    mid = ckpt.list_complete(run_a)[0][1]
    cfg = tiny_cfg(shards, tmp_path / "run", "model.hidden=32")
    with pytest.raises(ckpt.CheckpointError, match=r"model\.hidden: checkpoint None vs config 32"):
        train(cfg, str(mid))


def test_truncated_checkpoint_error_names_file(run_a, shards, tmp_path):
    mid = tmp_path / "ckpt"
    shutil.copytree(ckpt.list_complete(run_a)[0][1], mid)
    data = (mid / ckpt.STATE_FILE).read_bytes()
    (mid / ckpt.STATE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match=r"state\.pt: truncated"):
        train(tiny_cfg(shards, tmp_path / "run"), str(mid))


# --------------------------------------------------------------------------- failure modes

def test_non_finite_loss_stops_and_keeps_last_checkpoint(run_a, shards, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_a, run)
    before = [(s, p.name) for s, p in ckpt.list_complete(run)]
    cfg = tiny_cfg(shards, run, "optim.lr=1.0e+30", "optim.grad_clip=0", "run.total_patches=100000",
                   "run.ckpt_every_patches=100000", "run.log_every_patches=100000")
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step \d+"):
        train(cfg, "auto")
    assert [(s, p.name) for s, p in ckpt.list_complete(run)] == before
    ckpt.verify(ckpt.find_latest(run))  # intact


def test_no_checkpoint_at_or_after_a_nan_step(shards, tmp_path, monkeypatch):
    """A checkpoint is due after EVERY step; the loss of step 6 turns NaN: steps 1..5 are saved, 6 is not."""
    import latent_patch.train as train_mod

    real, calls = train_mod.micro_batch_loss, {"n": 0}

    def poisoned(trainer, size, mult):
        calls["n"] += 1
        loss = real(trainer, size, mult)
        return loss * float("nan") if trainer.progress.step + 1 >= 6 else loss

    monkeypatch.setattr(train_mod, "micro_batch_loss", poisoned)
    cfg = tiny_cfg(shards, tmp_path / "run", "run.total_patches=5000", "run.ckpt_every_patches=1",
                   "run.keep_last=0", "run.log_every_patches=100000")
    with pytest.raises(TrainingError, match=r"non-finite loss \(nan\) at step 6 "):
        train(cfg)
    assert [s for s, _ in ckpt.list_complete(tmp_path / "run")] == [1, 2, 3, 4, 5]


def test_shape_mismatch_names_both(shards, tmp_path):
    with pytest.raises(TrainingError, match=r"\[4, 8, 8\].*model\.latent_channels=4, model\.latent_size=16"):
        train(tiny_cfg(shards, tmp_path / "run", "model.latent_size=16"))
    with pytest.raises(TrainingError, match=r"10 classes but model\.num_classes=7"):
        train(tiny_cfg(shards, tmp_path / "run", "model.num_classes=7"))
    with pytest.raises(TrainingError, match=r"latents of shape \[4, 8, 8\].*latent_channels=3"):
        train(tiny_cfg(shards, tmp_path / "run", "model.latent_channels=3"))


def test_global_batch_must_divide():
    cfg = config.load(TrainConfig, TINY, ["optim.batch_size_global=20", "data.batch_size=8"])
    with pytest.raises(TrainingError, match=r"batch_size_global=20 does not split over 3 processes"):
        accumulation_steps(cfg, 3)
    assert accumulation_steps(cfg, 2) == 2  # 10 per process as 2 x 5 (issue 13: derived, not refused)
    assert accumulation_steps(config.load(TrainConfig, TINY, ["optim.batch_size_global=64"]), 2) == 4


def test_cli_names_bad_key(capsys):
    with pytest.raises(SystemExit):
        main(["--config", str(TINY), "optim.lrr=1"])
    assert "optim.lrr" in capsys.readouterr().err


def test_cli_refusal_is_one_prog_error_line(tmp_path, capsys):
    missing = tmp_path / "no-such-shards"
    assert main(["--config", str(TINY), f"data.shards={missing}", f"run.out_dir={tmp_path / 'run'}"]) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train_latent.py: error: data.shards=") and str(missing) in lines[0]
    assert "Traceback" not in captured.out + captured.err and " ERROR " not in captured.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal only")
def test_fp16_needs_a_gpu(shards, tmp_path):
    with pytest.raises(TrainingError, match="fp16 needs a CUDA GPU"):
        train(tiny_cfg(shards, tmp_path / "run", "run.mixed_precision=fp16"))


# --------------------------------------------------------------------------- multi-process

def torchrun(shards: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--standalone",
           str(ROOT / "train_latent.py"), "--config", str(TINY), f"data.shards={shards}", f"run.out_dir={out}",
           "run.total_patches=400", "run.log_every_patches=1", "run.ckpt_every_patches=200", "run.keep_last=0", *args]
    # both runs a test compares start here, with one environment: faults.THREADS torch threads each
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_torchrun_two_processes_train_and_resume_exactly(shards, tmp_path):
    """2 gloo processes: the run finishes, checkpoints hold rank 1's state, and a resume from the
    middle checkpoint (also under torchrun) reproduces the uninterrupted losses exactly."""
    out = tmp_path / "run"
    proc = torchrun(shards, out)
    assert "2 process(es)" in proc.stdout
    done = ckpt.list_complete(out)
    assert len(done) == 2
    for _, path in done:
        sizes = ckpt.verify(path)
        assert ckpt.rank_file(1) in sizes and ckpt.STATE_FILE in sizes
    state = ckpt.load_state(done[-1][1] / ckpt.STATE_FILE)
    assert state["world_size"] == 2 and state["patches"] >= 400
    mid_step, mid = done[0]
    torchrun(shards, tmp_path / "resumed", "--resume", str(mid))
    a, b = metrics(out), metrics(tmp_path / "resumed")
    assert sorted(b) == [s for s in sorted(a) if s > mid_step]
    assert all(a[s]["loss"] == b[s]["loss"] for s in b), [(a[s]["loss"], b[s]["loss"]) for s in b]


# --------------------------------------------------------------------------- benchmark helpers

def _bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flop_count_matches_dit_paper():
    """DiT reports 118.6 G multiply-adds for DiT-XL/2 on a 32x32 latent: 2x that in FLOPs."""
    from latent_patch.models import ModelConfig

    flops = _bench().forward_flops(ModelConfig(preset="DiT-XL/2"))
    assert flops == pytest.approx(2 * 118.6e9, rel=0.01)


def test_bench_train_smoke(capsys):
    args = ["--quick", "--steps", "2", "--warmup", "1", "--batch", "2", "--hidden", "64", "--depth", "1",
            "--heads", "2", "--latent", "8", "--samples", "32"]
    assert _bench().main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("full_samples_s", "patch_samples_s", "ratio", "full_equiv_ratio", "drawn_mix", "peak_rss_gib"):
        assert key in out
    assert out["steps"] == 2 and sum(out["drawn_mix"].values()) == 2


def test_bench_train_block_compares_two_different_blocks_on_the_same_draws(capsys):
    """--block 2025 (issue 29): both blocks train on the same sides; the new one has its q/k norms."""
    args = ["--quick", "--block", "2025", "--steps", "2", "--warmup", "1", "--batch", "2", "--hidden", "64",
            "--depth", "1", "--heads", "2", "--latent", "8", "--samples", "32"]
    assert _bench().main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["params_m"]["2025"] != out["params_m"]["2022"]  # q/k norm weights, SwiGLU's rounding
    assert out["block_flop_rate_ratio"] == pytest.approx(out["train_gflop_s"]["2025"] / out["train_gflop_s"]["2022"])
    assert set(out["train_gflops_per_patch"]["2025"]) == {"4", "8"}
    assert out["compiled"] is False  # the CPU default is eager


def test_bench_train_compile_flag_compiles_on_the_cpu_too():
    """--compile sets run.compile=true (compiled on every device); without it the trainer's own
    "auto" stays (eager on the CPU). Only the config: the inductor build is test_compile_cpu's."""
    from latent_patch.dist import resolve_compile

    bench = _bench()
    base = ["--model", "DiT-S/2", "--latent", "8", "--batch", "2", "--precision", "no"]
    for flag, expected in (([], "auto"), (["--compile"], True)):
        cfg = bench.bench_config(bench.parse_args(base + flag))
        assert cfg.run.compile == expected
        assert resolve_compile(cfg.run.compile, "cpu") is bool(flag)


def test_logs_are_trimmed_to_the_resumed_checkpoint(tmp_path):
    from latent_patch.monitor import trim_log

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    trim_log(path, 2)  # steps after the checkpoint and the half-written record go
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    before = path.stat().st_mtime_ns
    trim_log(path, 2)  # nothing to cut: the file is not rewritten
    assert path.stat().st_mtime_ns == before
    trim_log(path, 0)  # fresh start: records of a run that never checkpointed go
    assert path.read_text() == ""


def test_training_time_fd_does_not_disturb_training(shards, tiny_vae, tmp_path):
    """FD of the EMA at an interval is logged to fid.jsonl, and the losses equal a run without it."""
    import numpy as np
    from PIL import Image

    ref = tmp_path / "ref"
    ref.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(ref / f"{i}.png")
    common = ("run.total_patches=400", "run.log_every_patches=1", "run.ckpt_every_patches=0")
    train(tiny_cfg(shards, tmp_path / "plain", *common))
    train(tiny_cfg(shards, tmp_path / "eval", *common, "eval.fid_every_patches=200", f"eval.fid_ref={ref}",
                   "eval.fid_num_samples=12", "eval.fid_features=demo", "eval.fid_steps=2",
                   f"eval.vae={tiny_vae}"))
    records = [json.loads(line) for line in (tmp_path / "eval" / "fid.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(np.isfinite(r["fd"]) and r["num_samples"] == 12 for r in records)
    plain, evaluated = metrics(tmp_path / "plain"), metrics(tmp_path / "eval")
    assert [plain[s]["loss"] for s in sorted(plain)] == [evaluated[s]["loss"] for s in sorted(evaluated)]


def test_training_time_fid_needs_a_reference(shards, tmp_path):
    with pytest.raises(TrainingError, match="fid_ref"):
        train(tiny_cfg(shards, tmp_path / "run", "run.total_patches=100", "eval.fid_every_patches=50"))


def test_channel_latent_norm_feeds_the_model_standardised_latents(tmp_path, monkeypatch):
    """data.latent_norm=channel: the EDM loss sees each channel at mean 0, std sigma_data, using the
    manifest's latent_stats; a manifest without them is refused before any step, naming it."""
    import latent_patch.train as train_mod

    data = write_train_shards(tmp_path / "shards", n=200)
    man = json.loads((data / "manifest.json").read_text())
    lat = []  # the scaled latents the loader serves: templates + noise, times scaling 0.5
    for name in sorted(p.name for p in data.glob("*.tar")):
        import tarfile
        with tarfile.open(data / name) as tf:
            lat += [np.load(io.BytesIO(tf.extractfile(m).read())) for m in tf.getmembers() if m.name.endswith(".npy")]
    z = np.stack(lat).astype(np.float64)
    m, s = z[:, 0] * 0.5, z[:, 1] * 0.5
    mean = m.mean(axis=(0, 2, 3))
    std = np.sqrt((m * m + s * s).mean(axis=(0, 2, 3)) - mean**2)
    man["latent_stats"] = {"mean": mean.tolist(), "std": std.tolist()}
    (data / "manifest.json").write_text(json.dumps(man))

    seen = []
    real_loss = train_mod.edm_loss_terms

    def spy(precond, z, *a, **k):
        seen.append(z.detach().clone())
        return real_loss(precond, z, *a, **k)

    monkeypatch.setattr(train_mod, "edm_loss_terms", spy)
    train(tiny_cfg(data, tmp_path / "run", "data.latent_norm=channel", "patch.sizes=[1.0]", "patch.probs=[1.0]",
                   "run.total_patches=600", "run.ckpt_every_patches=0"))
    zs = torch.cat(seen).transpose(0, 1).reshape(4, -1)
    assert torch.allclose(zs.mean(1), torch.zeros(4), atol=0.1)
    assert torch.allclose(zs.std(1), torch.full((4,), 0.5), atol=0.05)

    del man["latent_stats"]
    (data / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(TrainingError, match="latent_stats") as err:
        train(tiny_cfg(data, tmp_path / "run2", "data.latent_norm=channel"))
    assert str(data) in str(err.value) and not (tmp_path / "run2" / "checkpoints").exists()



# --------------------------------------------------------------------------- GPU-path properties, checked on the CPU

def _counting_backend(log: list):
    """A torch.compile backend that runs the captured graph as is and records each compilation."""
    def backend(gm, example_inputs):
        log.append(len(example_inputs))
        return gm.forward
    return backend


def test_compiled_training_makes_one_graph_per_patch_side(shards, tmp_path, monkeypatch):
    """3 patch sides: each side compiles when first drawn and never again (static shapes, cache big enough)."""
    import torch._dynamo

    import latent_patch.train as train_mod
    from latent_patch import dist

    compiles: list = []
    real = dist.compile_network
    monkeypatch.setattr(train_mod, "compile_network",
                        lambda net, backend, num_shapes: real(net, _counting_backend(compiles), num_shapes))
    torch._dynamo.reset()
    cfg = tiny_cfg(shards, tmp_path / "run", "run.compile=true", "patch.sizes=[0.25, 0.5, 1.0]",
                   "patch.probs=[0.34, 0.33, 0.33]")
    trainer, _ = train_mod.prepare_run(cfg, None)
    assert trainer.schedule.sizes == [2, 4, 8]
    new_per_step = []
    for _ in range(24):
        plan, before = train_mod.plan_step(trainer), len(compiles)
        assert torch.isfinite(train_mod.train_step(trainer, plan))
        new_per_step.append((plan.size, len(compiles) - before))
    seen = set()
    for size, new in new_per_step:
        assert (new > 0) == (size not in seen), new_per_step  # compiled at a side's first step only
        seen.add(size)
    assert seen == {2, 4, 8}
    torch._dynamo.reset()


def test_the_step_reads_no_device_value(shards, tmp_path, monkeypatch):
    """Nothing in latent_patch/ pulls a tensor's value to the host during train_step (on a GPU that
    would drain the queue every step); the loop asks the clock across ranks only at check points."""
    import sys

    import latent_patch.train as train_mod

    reads = []

    def spy(name):
        real = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if "/latent_patch/" in caller and not caller.endswith(("loader.py", "stream.py")):  # loaders: host data by design
                reads.append(f"{name} in {caller}:{sys._getframe(1).f_lineno}")
            return real(self, *a, **k)
        return wrapper

    cfg = tiny_cfg(shards, tmp_path / "run")
    trainer, _ = train_mod.prepare_run(cfg, None)
    for _ in range(4):
        plan = train_mod.plan_step(trainer)  # host-side draws from CPU generators, by design
        for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy"):
            monkeypatch.setattr(torch.Tensor, name, spy(name))
        train_mod.train_step(trainer, plan)
        monkeypatch.undo()
    assert reads == []
    calls = []
    real_oot = train_mod.out_of_time
    monkeypatch.setattr(train_mod, "out_of_time", lambda *a: calls.append(1) or real_oot(*a))
    progress = train(tiny_cfg(shards, tmp_path / "run2", "run.total_patches=2400", "run.log_every_patches=100000",
                              "run.ckpt_every_patches=100000", "run.max_train_seconds=3600"))
    assert progress.step > 60 and len(calls) <= progress.step // train_mod.NAN_CHECK_EVERY + 1


def test_dit_training_crops_on_the_token_grid(shards, tmp_path, monkeypatch):
    """The trainer crops a DiT's patches at multiples of its patchify (issue 12); a U-Net anywhere."""
    import latent_patch.train as train_mod

    steps = []
    real = train_mod.random_crops_at
    monkeypatch.setattr(train_mod, "random_crops_at", lambda x, size, generator, step: steps.append(step) or real(
        x, size, generator, step))
    for config_name, want in (("tiny_cpu_dit.yaml", 2), ("tiny_cpu_unet.yaml", 1)):
        cfg = config.load(TrainConfig, ROOT / "configs" / config_name,
                          [f"data.shards={shards}", f"run.out_dir={tmp_path / config_name}", "run.tensorboard=false"])
        trainer, _ = train_mod.prepare_run(cfg, None)
        steps.clear()
        train_mod.train_step(trainer, train_mod.plan_step(trainer))
        assert steps and set(steps) == {want}, config_name


@pytest.mark.parametrize("block", [[], ["model.pos=rope", "model.mlp=swiglu", "model.norm=rms", "model.qk_norm=true"]],
                         ids=["2022", "2025"])
def test_routed_training_resumes_exactly(shards, tmp_path, block):
    """model.route_ratio draws its routes from the step's generator: an interrupted and resumed
    run logs the same losses as an uninterrupted one, and routing does change the training; with
    the 2025 block (issue 29) too."""
    route = ["model.depth=4", "model.route_ratio=0.5", "model.route_start=1", "model.route_end=2", *block]
    every = ["run.log_every_patches=1", "run.ckpt_every_patches=160"]
    train(tiny_cfg(shards, tmp_path / "whole", *route, *every, "run.total_patches=320"))
    train(tiny_cfg(shards, tmp_path / "split", *route, *every, "run.total_patches=160"))
    train(tiny_cfg(shards, tmp_path / "split", *route, *every, "run.total_patches=320"), "auto")
    train(tiny_cfg(shards, tmp_path / "plain", "model.depth=4", *block, *every, "run.total_patches=320"))
    whole, split, plain = metrics(tmp_path / "whole"), metrics(tmp_path / "split"), metrics(tmp_path / "plain")
    assert sorted(whole) == sorted(split) and len(whole) > 10
    assert all(whole[s]["loss"] == split[s]["loss"] for s in whole)
    assert any(whole[s]["loss"] != plain[s]["loss"] for s in whole if s > 1)


def test_flop_budget_counts_each_sides_cost_and_stops_the_run(shards, tmp_path):
    """run.total_flops: progress in training FLOPs (3 x forward FLOPs of each patch at its side),
    the same on any machine; the run stops at the first step that reaches it and says so in its log."""
    from latent_patch.models import forward_flops

    base = ["run.total_patches=100000000", "run.log_every_patches=1", "run.ckpt_every_patches=100000000"]
    model = tiny_cfg(shards, tmp_path / "x").model
    cost = {s: 3 * forward_flops(model, s) for s in (4, 8)}
    assert cost[4] < cost[8] / 2  # a half-side patch costs about a quarter
    budget = 30 * 16 * cost[8]
    progress = train(tiny_cfg(shards, tmp_path / "run", *base, f"run.total_flops={budget}"))
    recs = [metrics(tmp_path / "run")[s] for s in sorted(metrics(tmp_path / "run"))]
    seen, total = 0, 0.0
    for rec in recs:
        (side, share), = rec["size_mix"].items()
        total += (rec["patches"] - seen) * cost[int(side)]
        seen = rec["patches"]
        assert share == 1.0 and rec["train_flops"] == pytest.approx(total)
    assert progress.flops == pytest.approx(total) and budget <= total < budget + 16 * 2 * cost[4] * 2


def test_progressive_ramp_follows_a_flop_budget_and_stop_flops_splits_a_run_exactly(shards, tmp_path):
    """A run counted in FLOPs (total_patches out of reach, as bench_quality runs it): the
    progressive ramp follows total_flops (it used to stay at its start: only small patches), and
    run.stop_flops ends a segment that resumes into the same run, loss for loss."""
    from latent_patch.models import forward_flops
    from latent_patch.budget import run_fraction

    base = ["run.total_patches=100000000", "run.log_every_patches=1", "run.ckpt_every_patches=100000000",
            "patch.sizes=[0.5,1.0]", "patch.probs=[0.5,0.5]", "patch.progressive=true",
            "patch.progressive_fraction=0.5"]
    cost8 = 3 * forward_flops(tiny_cfg(shards, tmp_path / "x").model, 8)
    budget = 40 * 16 * cost8
    run = tiny_cfg(shards, tmp_path / "x", *base, f"run.total_flops={budget}").run
    assert run_fraction(run, ckpt.Progress(patches=10, flops=budget / 4)) == pytest.approx(0.25)
    train(tiny_cfg(shards, tmp_path / "whole", *base, f"run.total_flops={budget}"))
    whole = metrics(tmp_path / "whole")
    sides = [next(iter(whole[s]["size_mix"])) for s in sorted(whole)]
    assert sides[0] == "4" and "8" in sides  # small first, then the ramp brings full latents in
    late = sides[len(sides) // 2:]
    assert late.count("8") >= len(late) // 4  # past the ramp: the full side at its target share
    split = tmp_path / "split"
    first = train(tiny_cfg(shards, split, *base, f"run.total_flops={budget}", f"run.stop_flops={budget / 3}"))
    assert budget / 3 <= first.flops < budget / 2
    train(tiny_cfg(shards, split, *base, f"run.total_flops={budget}"), resume_spec="auto")
    parts = metrics(split)
    assert sorted(parts) == sorted(whole) and all(parts[s]["loss"] == whole[s]["loss"] for s in whole)
