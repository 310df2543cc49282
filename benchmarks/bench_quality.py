"""The paper's claim in miniature, on real data: patch training vs full-latent training.

One run trains the same model twice from the same seed on the embedded Fashion-MNIST latents
(the demo VAE, 4 x 16 x 16): once on full latents (patch.sizes=[1.0]) and once with the paper's
latent schedule ({R/2: 0.5, R: 0.5}, batch x R/s). Each gets the same wall-clock TRAINING budget,
cut into equal chunks; after every chunk both are evaluated at the same point (evaluation time
excluded): Frechet distance of the demo classifier's features against the held-out test images,
and the class accuracy of the generated samples. Because resume is exact, training in chunks is
the same as training in one go.

    python benchmarks/bench_quality.py                    # default run (about 42 min on 2 cores)
    python benchmarks/bench_quality.py --train-fraction 0.1   # the data-efficiency variant
    python benchmarks/bench_quality.py --quick            # smoke run (< 60 s, figures meaningless)

Last stdout line: {"fd_full", "fd_patch", "acc_full", "acc_patch", "speedup_to_full_fd", ...}
where speedup = (time for the full run to reach its final FD) / (time for the patch run to reach
that FD), interpolated linearly between evaluation points (0 when the patch run never does).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tarfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latent_patch import checkpoint, demo, fsutil  # noqa: E402
from latent_patch import config as config_mod  # noqa: E402

log = logging.getLogger("bench_quality")


def subset_source(fraction: float, out: Path) -> str:
    """A class-balanced ``fraction`` of the shipped training images, as one plain image tar."""
    path = out / f"train-subset-{fraction:g}.tar"
    if path.is_file():
        return str(path)
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(demo.DATA.glob("train-*.tar*")):
        with tarfile.open(tar) as tf:  # transparent gzip
            for m in tf:
                if m.isfile():
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    by_class: dict[int, list[str]] = {}
    for key, parts in samples.items():
        by_class.setdefault(int(parts["cls"]), []).append(key)
    keep = sorted(k for keys in by_class.values() for k in sorted(keys)[: max(1, round(len(keys) * fraction))])
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key in keep:
            for ext, data in sorted(samples[key].items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    fsutil.atomic_write_bytes(path, buf.getvalue())
    (out / "classes.txt").write_text((demo.DATA / "classes.txt").read_text())
    log.info("subset: %d of %d training images (%.0f%%) -> %s", len(keep), len(samples), 100 * fraction, path)
    return str(path)


def encode(out: Path, fraction: float, batch_size: int) -> Path:
    """Latent shards of the (subset of the) shipped training images."""
    from latent_patch.config import EncodeConfig
    from latent_patch.encode import run_encode

    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        source = demo.tar_spec("train") if fraction >= 1.0 else subset_source(fraction, out)
        run_encode(EncodeConfig(source=source, out=str(shards), vae="demo", resolution=demo.RESOLUTION,
                                flips="none", shard_size=2500, batch_size=batch_size))
    return shards


def evaluate(run_dir: Path, ref, codec, args) -> dict:
    """FD and class accuracy of the latest checkpoint's EMA weights (same indices and noise each time)."""
    from latent_patch.edm import SamplerConfig
    from latent_patch.evaluate import evaluate_model

    net, cfg, manifest = checkpoint.load_inference_model(run_dir, use_ema=True, device="cpu")
    sampler = SamplerConfig(steps=args.steps, cfg_scale=args.cfg_scale)
    m = evaluate_model(net, cfg, args.num_samples, ref, features="demo", codec=codec, manifest=manifest,
                       sampler=sampler, seed=0, batch_size=100)
    return {"fd": float(m["fd"]), "acc": float(m["class_accuracy"])}


def train_chunk(name: str, out: Path, shards: Path, args, chunk_s: float, overrides: list[str]) -> dict:
    """Train ``chunk_s`` more seconds (resuming exactly), return the progress recorded in metrics.jsonl."""
    from latent_patch.train import TrainConfig, train

    run_dir = out / name
    cfg = config_mod.load(TrainConfig, args.config, [
        f"data.shards={shards}", f"run.out_dir={run_dir}", f"run.max_train_seconds={chunk_s:g}",
        "run.total_patches=1000000000", "run.ckpt_every_patches=1000000000", "run.tensorboard=false",
        f"run.seed={args.seed}", *overrides, *args.overrides])
    resume = "auto" if checkpoint.find_latest(run_dir) else None
    t0 = time.perf_counter()
    progress = train(cfg, resume_spec=resume)
    return {"images": progress.images, "full_equiv": progress.full_equiv, "wall_s": time.perf_counter() - t0}


def time_to_reach(points: list[dict], target: float) -> float | None:
    """First training time at which the FD curve reaches ``target`` (linear between points)."""
    prev_t, prev_fd = 0.0, None
    for p in points:
        if p["fd"] <= target:
            if prev_fd is None or prev_fd == p["fd"]:
                return p["train_s"]
            frac = (prev_fd - target) / (prev_fd - p["fd"])
            return prev_t + frac * (p["train_s"] - prev_t)
        prev_t, prev_fd = p["train_s"], p["fd"]
    return None


def plot(curves: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for name, pts in curves.items():
        ts = [p["train_s"] / 60 for p in pts]
        ax[0].plot(ts, [p["fd"] for p in pts], marker="o", label=name)
        ax[1].plot(ts, [100 * p["acc"] for p in pts], marker="o", label=name)
    ax[0].set_ylabel("FD (demo classifier features)")
    ax[1].set_ylabel("class accuracy of samples (%)")
    for a in ax:
        a.set_xlabel("training time (min, evaluation excluded)")
        a.grid(alpha=0.3)
        a.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


RUNS = {
    "full": ["patch.sizes=[1.0]", "patch.probs=[1.0]"],
    "patch": ["patch.sizes=[0.5,1.0]", "patch.probs=[0.5,0.5]"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/quality")
    p.add_argument("--config", default=str(demo.DEFAULT_CONFIG))
    p.add_argument("--minutes", type=float, default=12.0, help="training budget of EACH run")
    p.add_argument("--evals", type=int, default=6, help="evaluation points per run (equal chunks)")
    p.add_argument("--num-samples", type=int, default=500, help="samples per evaluation")
    p.add_argument("--steps", type=int, default=12, help="Heun steps per evaluation sample (12 keeps the run in 45 min)")
    p.add_argument("--cfg-scale", type=float, default=demo.CFG_SCALE, help="guidance (the demo's)")
    p.add_argument("--train-fraction", type=float, default=1.0, help="train on this class-balanced share of the data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run under 60 s; figures are not meaningful")
    p.add_argument("overrides", nargs="*", help="training config overrides for both runs, key=value")
    args = p.parse_args()
    if args.quick:
        args.minutes, args.evals, args.num_samples, args.steps = 0.12, 2, 100, 6
        args.overrides = ["model.channels=32", "model.channel_mult=[1,2]", "model.num_blocks=1",
                          "model.attn_resolutions=[]", *args.overrides]  # the demo U-Net, shrunk
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    out = Path(args.out) / (f"fraction-{args.train_fraction:g}" + ("-quick" if args.quick else ""))
    out.mkdir(parents=True, exist_ok=True)
    for name in RUNS:  # a fresh comparison every time: no checkpoint from an earlier invocation
        if (out / name).exists():
            import shutil

            shutil.rmtree(out / name)

    import torch

    from latent_patch.codec import VAECodec
    from latent_patch.fid import Stats, build_extractor, compute_stats

    torch.manual_seed(args.seed)
    shards = encode(out, args.train_fraction, batch_size=256)
    ref_path = out / "ref_test_demo.npz"
    if not ref_path.is_file():
        compute_stats(demo.tar_spec("test"), build_extractor("demo"), demo.RESOLUTION).save(ref_path)
    ref = Stats.load(ref_path)
    codec = VAECodec.load("demo", device="cpu")
    chunk_s = args.minutes * 60 / args.evals
    curves: dict[str, list[dict]] = {name: [] for name in RUNS}
    for k in range(1, args.evals + 1):
        for name, overrides in RUNS.items():
            prog = train_chunk(name, out, shards, args, chunk_s, overrides)
            point = {"train_s": k * chunk_s, **prog, **evaluate(out / name, ref, codec, args)}
            curves[name].append(point)
            print(f"{name:5s} after {point['train_s'] / 60:5.1f} min: FD {point['fd']:8.2f}  acc "
                  f"{100 * point['acc']:5.1f}%  ({point['images']:,} patches, {point['full_equiv']:,.0f} full eq.)",
                  flush=True)
    full, patch = curves["full"], curves["patch"]
    target = full[-1]["fd"]
    t_full, t_patch = time_to_reach(full, target), time_to_reach(patch, target)
    speedup = (t_full / t_patch) if t_patch else 0.0
    plot(curves, out / "fd_vs_time.png", f"Fashion-MNIST latents, train fraction {args.train_fraction:g}")
    fsutil.atomic_write_json(out / "curves.json", {"curves": curves, "args": vars(args)})
    print(json.dumps({
        "fd_full": full[-1]["fd"], "fd_patch": patch[-1]["fd"], "acc_full": full[-1]["acc"],
        "acc_patch": patch[-1]["acc"], "speedup_to_full_fd": round(speedup, 3),
        "minutes_per_run": args.minutes, "evals": args.evals, "num_samples": args.num_samples,
        "train_fraction": args.train_fraction, "plot": str(out / "fd_vs_time.png"), "quick": args.quick,
    }), flush=True)


if __name__ == "__main__":
    main()
