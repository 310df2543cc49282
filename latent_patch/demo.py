"""The embedded default, end to end and offline: ``make demo`` / ``python -m latent_patch.demo``.

It runs the same stages a GPU user runs on ImageNet, on the Fashion-MNIST images shipped in
``latent_patch/assets/`` with the shipped demo VAE (in place of the SD VAE) and demo classifier
(in place of Inception):

  1. encode the training images into latent shards      (encode.py, as encode_latents.py does)
  2. reference statistics of the held-out test images    (fid.py, as ``sample.py fid-ref`` does)
  3. train a small class-conditional patch U-Net         (train.py, as train_latent.py does)
  4. sample a class-balanced set, score FD and accuracy  (sampling.py, as sample.py does)
  5. a report: metrics.json, a grid per class, the training curve

The training budget is a number of patches (``run.total_patches`` in configs/demo.yaml), not
minutes: on one machine the same command gives the same bits whatever its load, only later;
another CPU or core count rounds floats differently (within about 0.15 FD, README).

Every stage resumes: re-running the command after an interruption continues where it stopped.
A re-run with other settings (config, overrides, VAE, sampler) never mixes old outputs
with new settings: the outputs of the first changed stage and of every later one are moved to
``OUT/superseded-STAMP/`` (nothing is deleted) and redone.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import config as config_mod
from . import fsutil
from .cli import HelpFormatter, int_at_least

ASSETS = Path(__file__).resolve().parent / "assets"
DATA = ASSETS / "fashion_mnist"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "demo.yaml"
RESOLUTION = 64

log = logging.getLogger("latent_patch.demo")


def tar_spec(split: str) -> str:
    """Glob over the shipped image shards of one split (train or test)."""
    if not sorted(DATA.glob(f"{split}-*.tar*")):
        raise FileNotFoundError(f"{DATA}: no {split}-*.tar shards; rebuild them with tools/build_demo_data.py")
    return str(DATA / f"{split}-*.tar*")


def encode_stage(out: Path, batch_size: int, vae: str = "demo") -> Path:
    """Stage 1: the shipped training images -> 4 x 16 x 16 latent shards (resumes)."""
    from .config import EncodeConfig
    from .encode import run_encode

    shards = out / "shards"
    if (shards / "manifest.json").is_file():
        log.info("[1/5] shards: %s (already encoded)", shards)
        return shards
    log.info("[1/5] encoding %s with the demo VAE -> %s", tar_spec("train"), shards)
    run_encode(EncodeConfig(source=tar_spec("train"), out=str(shards), vae=vae, resolution=RESOLUTION,
                            flips="none", shard_size=2500, batch_size=batch_size))
    return shards


def reference_stage(out: Path) -> Path:
    """Stage 2: demo-classifier feature statistics of the held-out test images."""
    from .fid import build_extractor, compute_stats

    ref = out / "ref_test_demo.npz"
    if ref.is_file():
        log.info("[2/5] reference statistics: %s (already computed)", ref)
        return ref
    log.info("[2/5] reference statistics of the held-out test images -> %s", ref)
    stats = compute_stats(tar_spec("test"), build_extractor("demo"), RESOLUTION)
    stats.save(ref)
    return ref


# Outputs of each stage that depends on settings, in pipeline order (the reference statistics depend
# on the shipped test images and classifier only).
STAGE_OUTPUTS = {
    "encode": ("shards",),
    "train": ("run",),
    "sample": ("samples", "metrics.json", "grid_per_class.png", "training_curve.png"),
}
SETTINGS_FILE = "demo_settings.json"


def retire_changed(out: Path, settings: dict[str, dict]) -> Path | None:
    """Move aside the outputs a re-run with other ``settings`` must redo; returns where they went.

    Why: every stage resumes, so without this a changed config would quietly resume the old model
    (or sampling would refuse its changed settings). The first stage whose settings differ from
    ``OUT/demo_settings.json`` and every later one are moved to ``OUT/superseded-STAMP/``; outputs
    of a demo that recorded no settings are all moved, since nothing says how they were made.
    """
    path = out / SETTINGS_FILE
    old = fsutil.read_json(path) if path.is_file() else {}
    stages = list(STAGE_OUTPUTS)
    changed = next((s for s in stages if old.get(s) != settings[s]), None)
    moved = [] if changed is None else [
        out / name for s in stages[stages.index(changed):] for name in STAGE_OUTPUTS[s] if (out / name).exists()]
    dest = None
    if moved:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest, k = out / f"superseded-{stamp}", 1
        while dest.exists():  # two re-runs within a second
            k += 1
            dest = out / f"superseded-{stamp}-{k}"
        dest.mkdir()
        for p in moved:
            p.rename(dest / p.name)
        why = f"the {changed} settings changed" if old else "it holds outputs made with unrecorded settings"
        log.info("%s: %s, so %s moved to %s and redone", out, why, ", ".join(p.name for p in moved), dest)
    fsutil.atomic_write_json(path, settings)
    return dest


def train_config(out: Path, config: Path, overrides: Sequence[str], steps: int | None = None,
                 cfg_scale: float | None = None):
    """The resolved TrainConfig of the demo run (shards and run folder inside ``out``); ``steps`` and
    ``cfg_scale`` (when given) replace the config's recommended sampler, which the run then carries."""
    sampler = [f"sampler.{k}={v}" for k, v in (("steps", steps), ("cfg_scale", cfg_scale)) if v is not None]
    return config_mod.load(config_mod.TrainConfig, config, [
        f"data.shards={out / 'shards'}", f"run.out_dir={out / 'run'}", *sampler, *overrides])


def train_stage(out: Path, cfg) -> int:
    """Stage 3: train (or finish training) the patch model of ``cfg``; returns the patches this call
    trained (0 when already trained, less than the budget when it resumed a killed run)."""
    from . import checkpoint
    from .train import train

    run_dir = out / "run"
    done = run_dir / "demo_trained.json"
    if done.is_file():
        log.info("[3/5] training: %s (already trained)", run_dir)
        return 0
    log.info("[3/5] training %s for %s patches -> %s (a progress bar with the time left follows)",
             describe_model(cfg.model), f"{cfg.run.total_patches:,}", run_dir)
    latest = checkpoint.find_latest(run_dir)
    progress = train(cfg, resume_spec="auto" if latest else None)
    fsutil.atomic_write_json(done, {"patches": progress.patches, "full_equiv": progress.full_equiv})
    return progress.patches - (patches_at(latest / checkpoint.MODEL_FILE) if latest else 0)


def patches_at(weights: Path) -> int:
    """Patches seen when a checkpoint's weights were written, from their header (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        return int((f.metadata() or {}).get("patches", 0))


def sample_stage(out: Path, num_samples: int, sampler, ref: Path, vae: str = "demo") -> Path:
    """Stage 4: class-balanced samples from the EMA weights, scored with the demo classifier.

    The sampler is the run's recommended one (``cfg.sampler``), every field passed explicitly so
    that a run trained before a re-run changed it samples with this invocation's settings."""
    from .cli import sampler_flags
    from .sampling import main as sample_main

    samples = out / "samples"
    log.info("[4/5] sampling %d images (%d %s steps, guidance %.2g) -> %s", num_samples, sampler.steps,
             sampler.method, sampler.cfg_scale, samples)
    sample_main(["--checkpoint", str(out / "run"), "--out", str(samples), "--num-samples", str(num_samples),
                 *sampler_flags(sampler), "--batch-size", "100", "--vae", vae, "--save", "npz", "--grid", "100",
                 "--fid-ref", str(ref), "--features", "demo"])
    return samples


def class_grid(samples: Path, class_names: list[str], per_class: int, path: Path) -> Path:
    """One row per class (first ``per_class`` samples of it; white where a class has fewer), as a PNG."""
    from .images import save_grid

    with np.load(samples / "samples.npz", allow_pickle=False) as f:
        images, labels = f["arr_0"], f["labels"]
    cells = np.full((len(class_names), per_class, *images.shape[1:]), 255, np.uint8)
    for c in range(len(class_names)):
        picks = np.flatnonzero(labels == c)[:per_class]
        cells[c, :len(picks)] = images[picks]
    return save_grid(cells.reshape(-1, *images.shape[1:]), path, per_class, row_labels=class_names)


def training_curve(run_dir: Path, path: Path) -> Path | None:
    """Loss against patches seen, from the run's metrics.jsonl, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not records:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([r["patches"] for r in records], [r["loss"] for r in records], marker=".")
    ax.set_xlabel("patches seen")
    ax.set_ylabel("EDM loss")
    ax.set_title("demo training curve")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def describe_model(model_cfg) -> str:
    """The preset and the fields the config overrides, e.g. "adm-tiny (channels=64, num_blocks=2)"."""
    fixed = ("preset", "arch", "latent_channels", "latent_size", "num_classes", "grad_checkpointing")
    extra = {k: v for k, v in config_mod.to_dict(model_cfg).items() if v is not None and k not in fixed}
    return model_cfg.preset + (f" ({', '.join(f'{k}={v}' for k, v in extra.items())})" if extra else "")


def count_weights(run_dir: Path) -> int:
    """Parameters of the latest checkpoint's EMA weights."""
    from . import checkpoint

    ckpt = checkpoint.resolve_checkpoint(run_dir)
    return sum(t.numel() for t in checkpoint.load_weights(ckpt, checkpoint.EMA_FILE).values())


def report_stage(out: Path, samples: Path, cfg, seconds: dict[str, float]) -> Path:
    """Stage 5: metrics.json (FD, class accuracy, timings) plus the grid and curve PNGs."""
    from .shards import open_manifest

    log.info("[5/5] report -> %s", out / "metrics.json")
    scored = fsutil.read_json(samples / "metrics.json")
    names = open_manifest(out / "shards")["class_names"]
    grid = class_grid(samples, names, 10, out / "grid_per_class.png")
    curve = training_curve(out / "run", out / "training_curve.png")
    last = json.loads((out / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    metrics = {
        "fd": scored["fd"], "class_accuracy": scored["class_accuracy"], "num_samples": scored["num_samples"],
        "features": scored["features"], "reference": "held-out Fashion-MNIST test images (shipped)",
        "model": describe_model(cfg.model), "model_params": count_weights(out / "run"),
        "patches_seen": last["patches"], "full_image_equivalents": last["full_equiv"],
        "final_loss": last["loss"], "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "grid_per_class": str(grid), "grid_rows": names, "training_curve": str(curve) if curve else None,
        "sampler": {"steps": cfg.sampler.steps, "method": cfg.sampler.method, "cfg_scale": cfg.sampler.cfg_scale},
        "samples_npz": str(samples / "samples.npz"),
    }
    path = out / "metrics.json"
    fsutil.atomic_write_json(path, metrics)
    return path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m latent_patch.demo", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--out", default="demo_out", help="output folder (resumes when it exists)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config")
    p.add_argument("--num-samples", type=int_at_least(1), default=500, help="samples for FD and class accuracy")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="sampler steps (default: the config's sampler.steps)")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance weight (default: the config's sampler.cfg_scale)")
    p.add_argument("--encode-batch-size", type=int_at_least(1), default=256, help="images per VAE call while encoding")
    p.add_argument("--vae", default="demo", help="VAE spec: the shipped demo VAE, or a folder / hub id")
    p.add_argument("overrides", nargs="*", help="training config overrides, key=value")
    return p


def main(argv: Sequence[str] | None = None) -> Path:
    """Run the demo; a refusal (bad override, missing file, a stage's error) is one ``prog: error:``
    line and exit status 1, like every entry point, and what the stages finished is kept."""
    from .checkpoint import CheckpointError
    from .monitor import TrainingError

    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # overrides before, between or after the options
    try:
        return run(args)
    except (ValueError, FileNotFoundError, TrainingError, CheckpointError) as err:  # ConfigError is a ValueError
        parser.exit(1, f"{parser.prog}: error: {err}\n")


def run(args: argparse.Namespace) -> Path:
    """The five stages in order, each skipped where its output is complete and its settings unchanged."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = train_config(out, Path(args.config), args.overrides, args.steps, args.cfg_scale)
    train_settings = config_mod.to_dict(cfg)
    sampler = train_settings.pop("sampler")  # a changed guidance re-samples, it does not retrain
    retire_changed(out, {
        "encode": {"vae": args.vae},
        "train": train_settings,
        "sample": {"num_samples": args.num_samples, **sampler},
    })
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    encode_stage(out, args.encode_batch_size, args.vae)
    seconds["encode"], t = time.perf_counter() - t, time.perf_counter()
    ref = reference_stage(out)
    seconds["reference"], t = time.perf_counter() - t, time.perf_counter()
    trained = train_stage(out, cfg)
    seconds["train"], t = time.perf_counter() - t, time.perf_counter()
    samples = sample_stage(out, args.num_samples, cfg.sampler, ref, args.vae)
    seconds["sample"] = time.perf_counter() - t
    path = report_stage(out, samples, cfg, seconds)
    print(summary_line(fsutil.read_json(path), path, seconds, trained), flush=True)
    return path


def summary_line(m: dict, path: Path, seconds: dict[str, float], trained: int) -> str:
    """The demo's one closing line: its figures, its budget, where the report went, and the rates of
    this invocation over each whole stage (``trained``: patches this call trained; 0 leaves the
    training rate out, as when the run was already trained)."""
    rates = []
    if trained > 0 and seconds.get("train", 0) > 0:
        rates.append(f"training {trained / seconds['train']:.0f} patches/s")
    if seconds.get("sample", 0) > 0:
        rates.append(f"sampling and scoring {m['num_samples']} images in {seconds['sample']:.0f} s "
                     f"({m['num_samples'] / seconds['sample']:.1f} images/s)")
    took = f"{sum(seconds.values()) / 60:.1f} min in all" + (f" ({', '.join(rates)})" if rates else "")
    return (f"demo done: FD {m['fd']:.2f}, class accuracy {100 * m['class_accuracy']:.1f}% on {m['num_samples']} "
            f"samples after {m['patches_seen']:,} patches; report {path} (grid {Path(m['grid_per_class']).name}, "
            f"curve {Path(m['training_curve'] or 'none').name}); {took}")


if __name__ == "__main__":
    main()
