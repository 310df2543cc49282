"""What does patch training (or token routing) buy? Quality against TRAINING COMPUTE, with seeds.

Every arm trains on the embedded Fashion-MNIST latents (the demo VAE, 4 x 16 x 16) to the same
budget of training FLOPs for its model family (3 x forward FLOPs of every patch at its side and
route setting, counted once per side by ``models.forward_flops``: the count, and so the result,
does not depend on the machine or its load). At equal FLOP fractions of the budget each run is
evaluated the same way: FD of the demo classifier's features against the held-out test images,
and the class accuracy of its samples (same sample indices, noise and guidance every time).

Arms (settings fixed before any comparison ran; reasons in BENCHMARKS.md):
  unet_full, unet_patch, unet_progressive   the demo's ADM U-Net (7.7 M): full latents; the paper's
                                            {R/2: 0.5, R: 0.5} schedule; the same, small sides first
  dit_full, dit_patch, dit_route,           a DiT-S/2 of hidden 192, depth 6 (4.2 M, the demo's
  dit_patch_route                           DiT): full; patches; TREAD routing of half the tokens
                                            around blocks 1..4; both
  dit_repa, dit_patch_repa,                 the same with representation alignment (REPA, issue 28)
  dit_patch_route_repa,                     to the demo encoder's grids stored in the shards
  dit_patch_route_after_repa,               (encode_latents.py --repr demo): the tokens after block 2
  dit_patch_repa_k64                        aligned with weight 0.5; "route_after" routes blocks 2..4
                                            (0-based), so every token goes through the aligned block;
                                            "k64" aligns to the grids cut to 64 dims by PCA
Each arm runs with seeds 0 and 1 (the same seed pair across arms). Each arm and seed's points
are kept under --results (committed), its checkpoints under --out, so a killed or time-limited
sweep continues where it stopped: rerun it. Several workers may share --out (the shards and
statistics are made once, under a lock) and even the same arms and seeds: each arm-seed is trained
by one worker, under its own lock, and awaited by the others. tools/quality_sweep.sh runs two
workers side by side.

    python benchmarks/bench_quality.py                            # default sweep (about 3 h, 2 cores)
    python benchmarks/bench_quality.py --train-fraction 0.1 --budget-scale 4   # 1,000 images, longer
    python benchmarks/bench_quality.py --quick                    # smoke run (< 60 s, figures meaningless)
    python benchmarks/bench_quality.py --report                   # no training: table + plot of what is done

Before the JSON line it prints the README's table ("what saves training compute, measured"): per
arm, the compute to reach the full run's final FD, the final FD at equal compute and the class
accuracy as mean (range over seeds), and "lower / higher FD" than full only where the seeds'
ranges do not overlap.

Last stdout line: one JSON object with, per arm, the final FD and accuracy (mean and spread =
max - min over seeds), and ``compute_to_full_final_fd``: the fraction of the family's full-latent
run's compute at which the arm first reaches that run's final FD (same seed; linear between
evaluation points; null if never), plus the training seconds per PFLOP measured for each arm
(each run's median over its segments between evaluation points).
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
from functools import partial
from pathlib import Path
from typing import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from latent_patch import checkpoint, demo, filelock, fsutil  # noqa: E402
from latent_patch import config as config_mod  # noqa: E402

log = logging.getLogger("bench_quality")

UNET: list[str] = []  # the demo config's model
DIT = ["model.preset=DiT-S/2", "model.hidden=192", "model.depth=6", "model.heads=3", "model.channels=null",
       "model.channel_mult=null", "model.num_blocks=null", "model.attn_resolutions=null", "model.head_channels=null"]
FULL = ["patch.sizes=[1.0]", "patch.probs=[1.0]"]
PATCH = ["patch.sizes=[0.5,1.0]", "patch.probs=[0.5,0.5]"]
ROUTE = ["model.route_ratio=0.5", "model.route_start=1", "model.route_end=4"]
ROUTE_AFTER = ["model.route_ratio=0.5", "model.route_start=2", "model.route_end=4"]  # after the aligned block
# REPA's weight; block 2 of 6 (REPA: 8 of 28); projector width 2 x hidden (REPA: 2048 for 1152)
REPA = ["repa.weight=0.5", "repa.block=2", "repa.proj_hidden=384"]
# issue 29: the 2025 block (models.BLOCK_2025) on the same DiT dims; its SwiGLU at width 192 is
# 512 wide, so the block's counted FLOPs equal the 2022 block's and the budgets are the same
BLOCK_2025 = ["model.pos=rope", "model.mlp=swiglu", "model.norm=rms", "model.qk_norm=true"]
NO_COORDS = ["model.coord_channels=false"]  # RoPE only: the coordinates set positions, not inputs
ARMS: dict[str, tuple[str, list[str]]] = {
    "unet_full": ("unet", UNET + FULL),
    "unet_patch": ("unet", UNET + PATCH),
    "unet_progressive": ("unet", UNET + PATCH + ["patch.progressive=true", "patch.progressive_fraction=0.5"]),
    "dit_full": ("dit", DIT + FULL),
    "dit_patch": ("dit", DIT + PATCH),
    "dit_route": ("dit", DIT + FULL + ROUTE),
    "dit_patch_route": ("dit", DIT + PATCH + ROUTE),
    "dit_repa": ("dit", DIT + FULL + REPA),
    "dit_patch_repa": ("dit", DIT + PATCH + REPA),
    "dit_patch_route_repa": ("dit", DIT + PATCH + ROUTE + REPA),
    "dit_patch_route_after_repa": ("dit", DIT + PATCH + ROUTE_AFTER + REPA),
    "dit_patch_repa_k64": ("dit", DIT + PATCH + REPA),
    "dit2025_full": ("dit", DIT + BLOCK_2025 + FULL),
    "dit2025_patch": ("dit", DIT + BLOCK_2025 + PATCH),
    "dit2025_patch_nocoord": ("dit", DIT + BLOCK_2025 + NO_COORDS + PATCH),
    "dit2025_patch_route": ("dit", DIT + BLOCK_2025 + PATCH + ROUTE),
    "dit2025_patch_route_repa": ("dit", DIT + BLOCK_2025 + PATCH + ROUTE + REPA),
}
FEATURES: dict[str, int] = {"dit_repa": 0, "dit_patch_repa": 0, "dit_patch_route_repa": 0,
                            "dit_patch_route_after_repa": 0, "dit_patch_repa_k64": 64, "dit2025_patch_route_repa": 0}
"""The arms that align, and the stored grid's dims they align to (0: the encoder's own)."""
# The encoders other than the shipped demo one (ReprEncoder "demo"): name -> the arguments of
# tools/train_demo_repr.py that make it. "e30": the demo encoder's recipe trained 30 epochs
# instead of 6 (is REPA's small gain here the weak encoder's fault?). Not shipped: made once into
# <--out>/demo-repr-<name> by the command that encoder_folder's error prints.
ENCODER_RECIPES: dict[str, dict[str, int]] = {"e30": {"epochs": 30}}
RECIPE_ARMS: dict[str, list[str]] = {"e30": ["dit_repa", "dit_patch_route_repa"]}
"""Per recipe encoder, the aligning arms rerun with its grids: arm ``<arm>_<name>``, the same
training as ``<arm>`` except for the grids it aligns to."""
ENCODERS: dict[str, str] = {}
"""The aligning arms whose grids come from one of ENCODER_RECIPES' encoders (others: "demo")."""
for _name, _bases in RECIPE_ARMS.items():
    for _base in _bases:
        ENCODERS[f"{_base}_{_name}"] = _name
        ARMS[f"{_base}_{_name}"], FEATURES[f"{_base}_{_name}"] = ARMS[_base], FEATURES[_base]
# the smoke run's default: the issue-12 arms, one aligning arm, one arm of the 2025 block
QUICK_ARMS = [a for a in ARMS if a not in FEATURES and not a.startswith("dit2025")] + ["dit_patch_repa",
                                                                                      "dit2025_patch_route"]
# Budgets in full-latent training equivalents of each family (x 3 x forward FLOPs of one full
# latent): about 8 minutes of training per run on the 2-core machine, so 14 runs and their
# evaluations fit in about 3 hours. The DiT trains about twice as many latents per second.
BUDGET_FULL_EQUIV = {"unet": 24_000, "dit": 48_000}


def shipped_training_set() -> dict[str, dict[str, bytes]]:
    """The shipped demo training images: sample key -> {extension: bytes}."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar in sorted(demo.DATA.glob("train-*.tar*")):
        with tarfile.open(tar) as tf:  # transparent gzip
            for m in tf:
                if m.isfile():
                    key, ext = m.name.split(".", 1)
                    samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def class_balanced_keys(samples: dict[str, dict[str, bytes]], fraction: float) -> list[str]:
    """The first ``fraction`` of every class's keys (at least one each), sorted."""
    by_class: dict[int, list[str]] = {}
    for key, parts in samples.items():
        by_class.setdefault(int(parts["cls"]), []).append(key)
    return sorted(k for keys in by_class.values() for k in sorted(keys)[: max(1, round(len(keys) * fraction))])


def training_images(fraction: float) -> int:
    """How many images a run at ``--train-fraction`` trains on (the README table's data size)."""
    samples = shipped_training_set()
    return len(samples) if fraction >= 1.0 else len(class_balanced_keys(samples, fraction))


def subset_source(fraction: float, out: Path) -> str:
    """A class-balanced ``fraction`` of the shipped training images, as one plain image tar."""
    path = out / f"train-subset-{fraction:g}.tar"
    if path.is_file():
        return str(path)
    samples = shipped_training_set()
    keep = class_balanced_keys(samples, fraction)
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


def shards_folder(out: Path, dims: int | None, encoder: str = "demo") -> Path:
    """Where an arm's shards are: plain, or with an encoder's grids (``dims`` 0: full; the demo
    encoder's in shards-repr[-kK], a recipe encoder's (its folder) in shards-repr-<name>[-kK])."""
    if dims is None:
        return out / "shards"
    name = "" if encoder == "demo" else "-" + Path(encoder).name.removeprefix("demo-repr-")
    return out / ("shards-repr" + name + (f"-k{dims}" if dims else ""))


def encoder_folder(name: str, args: argparse.Namespace) -> Path:
    """The folder of a recipe encoder, checked: made by the recipe's command, or refused naming it."""
    folder, recipe = Path(args.out) / f"demo-repr-{name}", ENCODER_RECIPES[name]
    command = (f"python tools/train_demo_repr.py --out {folder} "
               + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items()))
    info = folder / "training.json"
    if not info.is_file():
        raise SystemExit(f"{folder}: the {name} encoder is not made yet ({info} missing); make it once with: {command}")
    made = fsutil.read_json(info).get("args", {})
    wrong = {k: made.get(k) for k, v in recipe.items() if made.get(k) != v}
    if wrong:
        raise SystemExit(f"{info}: made with {wrong}, the {name} recipe is {recipe}; remake it with: {command}")
    return folder


def encode(out: Path, fraction: float, batch_size: int, dims: int | None = None, encoder: str = "demo") -> Path:
    """Latent shards of the (subset of the) shipped training images; with ``dims`` also an
    encoder's grids (0: all its dims; K: a PCA to K fitted by the encoder on the same images);
    ``encoder`` is "demo" or a folder."""
    from latent_patch.config import EncodeConfig
    from latent_patch.encode import run_encode

    shards = shards_folder(out, dims, encoder)
    if not (shards / "manifest.json").is_file():
        source = demo.tar_spec("train") if fraction >= 1.0 else subset_source(fraction, out)
        extra = {} if dims is None else {"repr": encoder, "repr_dims": dims or None}
        run_encode(EncodeConfig(source=source, out=str(shards), vae="demo", resolution=demo.RESOLUTION,
                                flips="none", shard_size=2500, batch_size=batch_size, progress=False, **extra))
    return shards


def feature_shards(out: Path, fraction: float, dims: int, encoder: str = "demo") -> Path:
    """The shards with stored grids, made once per ``out`` folder (under a lock, as prepare_data)."""
    shards = shards_folder(out, dims, encoder)
    return filelock.do_once(out / f"{shards.name}.lock",
                            lambda: shards if (shards / "manifest.json").is_file() else None,
                            lambda: encode(out, fraction, 256, dims, encoder), f"the shards {shards}")


def encoder_cost(out: Path) -> dict:
    """The one-time cost of the stored grids per shard set (manifest ``repr``: FLOPs and seconds of
    the encoder), reported beside the training compute, as encoding is."""
    cost = {}
    for man in sorted(out.glob("shards-repr*/manifest.json")):
        info = fsutil.read_json(man).get("repr") or {}
        cost[man.parent.name] = {k: info.get(k) for k in ("spec", "grid", "dims", "flops_per_image", "flops",
                                                          "seconds")}
    return cost


def asked(args: argparse.Namespace) -> tuple[list[str], list[int]]:
    """The arms that ``--arms`` names, plus each named family's full arm (the reference every
    arm of the family is measured against, so it is trained, awaited and reported too), and the
    seeds that ``--seeds`` names."""
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; known: {', '.join(ARMS)}")
    refs = [f"{f}_full" for f in ("unet", "dit") if any(ARMS[a][0] == f for a in arms) and f"{f}_full" not in arms]
    return arms + refs, [int(s) for s in args.seeds.split(",") if s]


def prepare_data(out: Path, fraction: float) -> tuple[Path, Path]:
    """The shards and the held-out reference statistics, made once per ``out`` folder.

    Why a lock: the sweep runs its seeds as separate processes side by side
    (tools/quality_sweep.sh), and both want the same subset, shards and statistics at start;
    unlocked, both encoded into one folder at once."""
    from latent_patch.fid import build_extractor, compute_stats

    shards, ref_path = out / "shards", out / "ref_test_demo.npz"

    def ready() -> tuple[Path, Path] | None:
        return (shards, ref_path) if (shards / "manifest.json").is_file() and ref_path.is_file() else None

    def work() -> tuple[Path, Path]:
        encode(out, fraction, batch_size=256)
        if not ref_path.is_file():
            compute_stats(demo.tar_spec("test"), build_extractor("demo"), demo.RESOLUTION, progress=False).save(ref_path)
        return shards, ref_path

    return filelock.do_once(out / "prepare.lock", ready, work, f"the shards and statistics in {out}")


def arm_config(arm: str, seed: int, run_dir: Path, shards: Path, args, extra: list[str] = ()):
    family, overrides = ARMS[arm]
    return config_mod.load(config_mod.TrainConfig, args.config, [
        f"data.shards={shards}", f"run.out_dir={run_dir}", "run.max_train_seconds=0",
        "run.total_patches=1000000000000", "run.ckpt_every_patches=1000000000000", "run.tensorboard=false",
        "run.log_every_patches=1000000000000", "run.progress=false", f"run.seed={seed}", f"data.seed={seed}",
        *overrides, *args.family_overrides.get(family, []), *args.overrides, *extra])


def budget_flops(family: str, cfg, scale: float) -> float:
    """The family's budget: its full-latent training equivalents x 3 x one full latent's forward FLOPs."""
    from latent_patch.models import forward_flops

    return BUDGET_FULL_EQUIV[family] * scale * 3 * forward_flops(cfg.model)


def arm_budget(arm: str, seed: int, run_dir: Path, shards: Path, args) -> float:
    """The arm's training FLOPs: its family's full arm's budget, so every arm of a family gets the
    same compute whatever its own model costs per latent (an arm without coordinate channels
    embeds 4 channels, not 6)."""
    family = ARMS[arm][0]
    return budget_flops(family, arm_config(f"{family}_full", seed, run_dir, shards, args), args.budget_scale)


def evaluate(run_dir: Path, ref, codec, args) -> dict:
    """FD and class accuracy of the latest checkpoint's EMA weights (same indices and noise each time)."""
    from latent_patch.config import SamplerConfig
    from latent_patch.evaluate import evaluate_model

    net, cfg, manifest = checkpoint.load_inference_model(run_dir, use_ema=True, device=args.device)
    sampler = SamplerConfig(steps=args.steps, cfg_scale=args.cfg_scale)
    m = evaluate_model(net, cfg, args.num_samples, ref, features="demo", codec=codec, manifest=manifest,
                       sampler=sampler, seed=0, batch_size=100)
    return {"fd": float(m["fd"]), "acc": float(m["class_accuracy"])}


def arm_shards(arm: str, out: Path, shards: Path, args) -> Path:
    """The shards an arm trains on: the plain ones, or (aligning arms) those with its grids."""
    if arm not in FEATURES:
        return shards
    encoder = str(encoder_folder(ENCODERS[arm], args)) if arm in ENCODERS else "demo"
    return feature_shards(out, args.train_fraction, FEATURES[arm], encoder)


def run_arm(arm: str, seed: int, out: Path, results: Path, shards: Path, ref, codec, args) -> list[dict]:
    """Train and evaluate one arm/seed to its budget, continuing from what ``points.json`` holds.

    Points live in the (committed) results folder, checkpoints in ``out``: without the
    checkpoint (a fresh checkout) the next target is trained from step 0 with the same seed,
    which is the same deterministic run, only slower."""
    from latent_patch.train import train

    folder = out / arm / f"seed-{seed}"
    points_file = results / arm / f"seed-{seed}" / "points.json"
    shards = arm_shards(arm, out, shards, args)
    points = fsutil.read_json(points_file) if points_file.is_file() else []
    budget = arm_budget(arm, seed, folder / "run", shards, args)
    if points and abs(points[0]["budget_flops"] - budget) > 1e-6 * budget:
        raise SystemExit(f"{points_file}: its points were trained to a budget of {points[0]['budget_flops']:.6g} FLOPs, "
                         f"this run's is {budget:.6g} (another --budget-scale or model?); use another --results/--out")
    if len(points) >= args.evals:
        log.info("%s seed %d: all %d points already in %s", arm, seed, args.evals, points_file)
    for k in range(len(points) + 1, args.evals + 1):
        target = budget * k / args.evals
        log.info("%s seed %d: training segment %d/%d, to %.4g of %.4g PFLOP", arm, seed, k, args.evals,
                 target / 1e15, budget / 1e15)
        # the budget is the run's length (the progressive ramp follows it); stop_flops ends this segment
        cfg = arm_config(arm, seed, folder / "run", shards, args,
                         [f"run.total_flops={budget:.6g}", f"run.stop_flops={target:.6g}"])
        check_resume(folder / "run", target, k, args.evals)
        t0 = time.perf_counter()
        progress = train(cfg, resume_spec="auto" if checkpoint.find_latest(folder / "run") else None)
        wall = time.perf_counter() - t0
        point = {"k": k, "fraction": k / args.evals, "train_flops": progress.flops, "budget_flops": budget,
                 "patches": progress.patches, "full_equiv": progress.full_equiv,
                 "train_s": (points[-1]["train_s"] if points else 0.0) + wall, **evaluate(folder / "run", ref, codec, args)}
        points.append(point)
        fsutil.atomic_write_json(points_file, points)
        print(f"{arm:16s} seed {seed}  {k}/{args.evals}: {progress.flops / 1e15:7.3f} PFLOP  FD {point['fd']:7.3f}  "
              f"acc {100 * point['acc']:5.1f}%  ({progress.patches:,} patches, {point['train_s']:.0f} s)", flush=True)
    return points


def check_resume(run_dir: Path, target: float, k: int, evals: int) -> None:
    """Refuse to train segment ``k`` from a checkpoint written for a later segment (points.json
    lost or cut while the checkpoints stayed): training would stop at once and its point would be
    filed under the wrong fraction. Each checkpoint's config holds the ``run.stop_flops`` it was
    written for; one written for segment ``k`` itself (killed during its evaluation) is fine."""
    latest = checkpoint.find_latest(run_dir)
    if latest is None:
        return
    written_for = checkpoint.load_config(latest).run.stop_flops
    if written_for > float(f"{target:.6g}") * (1 + 1e-6):
        raise SystemExit(f"{latest}: written for {written_for:.6g} training FLOPs, past evaluation point {k} of "
                         f"{evals} ({target:.6g}): this arm-seed's points were lost; remove {run_dir.parent} "
                         f"to train it again from step 0")


def reach_fraction(points: list[dict], target: float) -> float | None:
    """First budget fraction at which the FD curve reaches ``target`` (linear between points)."""
    prev_x, prev_fd = 0.0, None
    for p in points:
        x = p["train_flops"] / p["budget_flops"]
        if p["fd"] <= target:
            if prev_fd is None or prev_fd == p["fd"]:
                return x
            return prev_x + (prev_fd - target) / (prev_fd - p["fd"]) * (x - prev_x)
        prev_x, prev_fd = x, p["fd"]
    return None


def seconds_per_pflop(points: list[dict]) -> float:
    """Wall-clock seconds per training PFLOP of one run: the median over its segments (one per
    evaluation point), so one segment stretched by the machine (another job, a paused process)
    does not set the figure; the whole run's mean would carry it."""
    rates, prev_s, prev_f = [], 0.0, 0.0
    for p in points:
        if p["train_flops"] > prev_f:
            rates.append((p["train_s"] - prev_s) / ((p["train_flops"] - prev_f) / 1e15))
        prev_s, prev_f = p["train_s"], p["train_flops"]
    rates.sort()
    mid = len(rates) // 2
    return rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2


def mean_spread(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "spread": max(values) - min(values), "min": min(values),
            "max": max(values), "n": len(values)} if values else None


def summarize(results: dict[str, dict[int, list[dict]]], evals: int) -> dict:
    """Per arm: final FD / accuracy over seeds and the compute to reach the full run's final FD."""
    out = {}
    for arm, by_seed in results.items():
        done = {s: pts for s, pts in by_seed.items() if len(pts) == evals}
        full = results[f"{ARMS[arm][0]}_full"]
        reach = []
        for s, pts in done.items():
            if len(full.get(s, [])) == evals:
                reach.append(reach_fraction(pts, full[s][-1]["fd"]))
        secs = [seconds_per_pflop(pts) for pts in done.values()]
        out[arm] = {
            "seeds_done": sorted(done), "final_fd": mean_spread([p[-1]["fd"] for p in done.values()]),
            "final_acc": mean_spread([p[-1]["acc"] for p in done.values()]),
            "compute_to_full_final_fd": (mean_spread(reach) if reach and None not in reach else
                                         (None if not reach else {"per_seed": reach})),
            "train_s_per_pflop": mean_spread(secs),
        }
    return out


def verdict(arm: dict, full: dict) -> str:
    """Final FD against the family's full run: better / worse only where the seeds' ranges do
    not overlap, else "within spread"."""
    a, f = arm["final_fd"], full["final_fd"]
    if not a or not f or a["n"] < 2 or f["n"] < 2:
        return "needs 2 seeds"
    return "lower FD" if a["max"] < f["min"] else "higher FD" if a["min"] > f["max"] else "within spread"


def markdown_table(summary: dict, train_images: int) -> str:
    """README's "what saves training compute, measured" table from the summary, every figure
    as mean (range over seeds)."""
    def fmt(ms: dict | None, digits: int = 2, pct: bool = False) -> str:
        if not ms:
            return "-"
        k = 100 if pct else 1
        return f"{k * ms['mean']:.{digits}f} ({k * ms['spread']:.{digits}f})"

    rows = ["| arm | training images | seeds | compute to reach the full run's final FD | final FD at equal "
            "compute | vs full | class accuracy % | s / PFLOP here |", "|---|---|---|---|---|---|---|---|"]
    for arm, a in summary.items():
        reach = a["compute_to_full_final_fd"]
        if reach and "per_seed" in reach:  # some seed never reached it
            hit = [f"{r:.2f}" for r in reach["per_seed"] if r is not None]
            n_never = len(reach["per_seed"]) - len(hit)
            reach_s = f"never in {n_never} of {len(reach['per_seed'])} seeds" + (f" (others: {', '.join(hit)})" if hit else "")
        else:
            reach_s = fmt(reach)
        ref = f"{ARMS[arm][0]}_full"  # the family's full run: dit2025_full is measured against dit_full
        full = summary.get(ref)
        rows.append(f"| {arm} | {train_images:,} | {len(a['seeds_done'])} | {reach_s} | {fmt(a['final_fd'])} | "
                    f"{'(reference)' if arm == ref else verdict(a, full) if full else '-'} | "
                    f"{fmt(a['final_acc'], 1, pct=True)} | {fmt(a['train_s_per_pflop'], 0)} |")
    return "\n".join(rows)


def load_results(res_dir: Path, arms: list[str], seeds: list[int]) -> dict[str, dict[int, list[dict]]]:
    """The points already in the results folder (nothing trained)."""
    results: dict[str, dict[int, list[dict]]] = {}
    for arm in arms:
        for seed in seeds:
            f = res_dir / arm / f"seed-{seed}" / "points.json"
            if f.is_file():
                results.setdefault(arm, {})[seed] = fsutil.read_json(f)
    return results


def plot(results: dict[str, dict[int, list[dict]]], path: Path, title: str) -> None:
    """FD against training FLOPs, one panel per model family: mean over seeds, min-max band, and
    the full arm's last FD as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    families = [f for f in ("unet", "dit") if any(ARMS[a][0] == f and any(by.values()) for a, by in results.items())]
    families = families or ["unet", "dit"]  # a sweep with no point yet still draws its empty axes
    fig, axes = plt.subplots(1, len(families), figsize=(max(5.5 * len(families), 7.5), 4), dpi=100, squeeze=False)
    for ax, family in zip(axes[0], families):
        for arm, by_seed in results.items():
            runs = [pts for pts in by_seed.values() if pts]
            if ARMS[arm][0] != family or not runs:
                continue
            n = min(len(r) for r in runs)
            x = [sum(r[i]["train_flops"] for r in runs) / len(runs) / 1e15 for i in range(n)]
            fds = [[r[i]["fd"] for r in runs] for i in range(n)]
            ax.plot(x, [sum(f) / len(f) for f in fds], marker="o", label=f"{arm} ({len(runs)} seeds)")
            ax.fill_between(x, [min(f) for f in fds], [max(f) for f in fds], alpha=0.15)
        full = [pts for pts in results.get(f"{family}_full", {}).values() if pts]
        if full:  # the level the compute-to-reach column asks about
            ax.axhline(sum(r[-1]["fd"] for r in full) / len(full), color="gray", linestyle="--", linewidth=1,
                       label="full run's last FD (mean)")
        ax.set_yscale("log")  # the comparison is decided late, where FD is a few units, not at the start
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("training PFLOP")
        ax.set_ylabel("FD (demo classifier features)")
        ax.set_title(family)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()  # written whole: workers that finish together draw the same file
    fig.savefig(buf, format="png")
    plt.close(fig)
    fsutil.atomic_write_bytes(path, buf.getvalue())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The sweep's settings; ``--quick`` shrinks every budget and model, and runs seed 0 unless
    ``--seeds`` names others (two quick runs side by side then keep to their own seeds' folders)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out/quality-compute", help="checkpoints, shards (not kept in git)")
    p.add_argument("--results", default="benchmarks/results/quality-compute",
                   help="points.json per arm and seed, summary.json (small; committed as they come)")
    p.add_argument("--config", default=str(demo.DEFAULT_CONFIG))
    p.add_argument("--arms", help=f"comma list of arms (default: all but those of an unshipped encoder, "
                                          f"{','.join(ENCODERS)}; with --quick: {','.join(QUICK_ARMS)})")
    p.add_argument("--seeds", help="comma list (default: 0,1; with --quick: 0)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiplies every family's FLOP budget")
    p.add_argument("--evals", type=int, default=6, help="evaluation points per run, at equal FLOP fractions")
    p.add_argument("--num-samples", type=int, default=300, help="samples per evaluation")
    p.add_argument("--steps", type=int, default=12, help="Heun steps per evaluation sample")
    p.add_argument("--cfg-scale", type=float, help="guidance (default: the demo config's sampler.cfg_scale)")
    p.add_argument("--train-fraction", type=float, default=1.0, help="train on this class-balanced share of the data")
    p.add_argument("--plot", default="docs/figures/quality_vs_compute.png")
    p.add_argument("--quick", action="store_true", help="smoke run under 60 s; figures are not meaningful")
    p.add_argument("--report", action="store_true",
                   help="train nothing: summarize the points already in --results, redraw the plot, print "
                   "the README table (complete runs only)")
    p.add_argument("overrides", nargs="*", help="training config overrides for every arm, key=value")
    args = p.parse_args(argv)
    if args.cfg_scale is None:
        args.cfg_scale = config_mod.load(config_mod.TrainConfig, args.config).sampler.cfg_scale
    args.family_overrides = {}
    if args.quick:
        args.budget_scale, args.evals = 0.003, 2  # every arm, tiny budgets
        args.num_samples, args.steps, args.train_fraction = 40, 3, 0.05
        args.plot = str(Path(args.out) / "quick.png")
        args.family_overrides = {"unet": ["model.channels=32", "model.channel_mult=[1,2]", "model.num_blocks=1",
                                          "model.attn_resolutions=[]"], "dit": ["model.hidden=64", "model.heads=2"]}
    args.seeds = args.seeds or ("0" if args.quick else "0,1")  # --quick: one seed unless named
    args.arms = args.arms or ",".join(QUICK_ARMS if args.quick else [a for a in ARMS if a not in ENCODERS])
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    logging.getLogger("latent_patch.train").disabled = True  # the sweep prints one line per evaluation
    tag = f"fraction-{args.train_fraction:g}" + ("-quick" if args.quick else "")
    out, res_dir = Path(args.out) / tag, Path(args.results if not args.quick else args.out) / tag
    if args.report or finished(args, res_dir):  # a finished sweep rerun: no shards to make, nothing to train
        report(args, res_dir)
        return
    out.mkdir(parents=True, exist_ok=True)

    import torch

    from latent_patch.codec import VAECodec
    from latent_patch.fid import Stats

    args.device = "cuda" if torch.cuda.is_available() else "cpu"  # training picks the same (accelerate)
    arms, seeds = asked(args)
    for name in sorted({ENCODERS[a] for a in arms if a in ENCODERS}):
        encoder_folder(name, args)  # a missing encoder is refused now, not hours into the sweep
    shards, ref_path = prepare_data(out, args.train_fraction)
    ref, codec = Stats.load(ref_path), VAECodec.load("demo", device=args.device)
    results = train_all(arms, seeds, out, res_dir, args.evals,
                        lambda arm, seed: run_arm(arm, seed, out, res_dir, shards, ref, codec, args))
    finish(args, res_dir, results, seeds)


def train_all(arms: list[str], seeds: list[int], out: Path, res_dir: Path, evals: int,
              run: Callable[[str, int], list[dict]]) -> dict[str, dict[int, list[dict]]]:
    """Every asked arm-seed's points: trained by ``run`` here, unless another worker has it.

    Why: several workers may share ``out`` and the same list (tools/quality_sweep.sh runs two
    side by side, one torch thread each, which uses 2 cores better than one 2-thread process), so
    each arm-seed is trained under its own lock, exactly once. One held by another worker is put
    off and awaited once this worker has nothing else to do; one whose worker died (a killed
    sweep, rerun) is taken over at once and continued from its last checkpoint, so a rerun
    finishes what was half done before it starts anything new."""
    results: dict[str, dict[int, list[dict]]] = {a: {} for a in arms}
    put_off: list[tuple[str, int]] = []
    for seed in seeds:  # all arms of a seed first: partial results stay comparable
        for arm in arms:
            if (done := complete_points(res_dir, arm, seed, evals)) is not None:
                results[arm][seed] = done
                continue
            lock = filelock.take(arm_lock(out, arm, seed))
            if lock is None:
                log.info("%s seed %d: another worker holds %s; later", arm, seed, arm_lock(out, arm, seed))
                put_off.append((arm, seed))
                continue
            try:
                results[arm][seed] = run(arm, seed)
            finally:
                lock.release()
    for arm, seed in put_off:
        results[arm][seed] = filelock.do_once(
            arm_lock(out, arm, seed), partial(complete_points, res_dir, arm, seed, evals), partial(run, arm, seed),
            f"{arm} seed {seed} (trained by another worker)")
    return results


def complete_points(res_dir: Path, arm: str, seed: int, evals: int) -> list[dict] | None:
    """The arm-seed's points if all ``evals`` are in, else None."""
    f = res_dir / arm / f"seed-{seed}" / "points.json"
    points = fsutil.read_json(f) if f.is_file() else []
    return points if len(points) >= evals else None


def arm_lock(out: Path, arm: str, seed: int) -> Path:
    """The lock that one worker holds while it trains this arm-seed (beside its checkpoints)."""
    folder = out / arm / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "train.lock"


def finish(args: argparse.Namespace, res_dir: Path, results: dict[str, dict[int, list[dict]]],
           seeds: list[int]) -> None:
    """Summary, plot, README table, summary.json, and the JSON line (last)."""
    summary = summarize(results, args.evals)
    plot(results, Path(args.plot), f"Fashion-MNIST latents, train fraction {args.train_fraction:g}: FD vs training compute")
    merge_summary(res_dir / "summary.json", summary, results, vars(args))
    print(markdown_table(summary, training_images(args.train_fraction)), flush=True)
    print(json.dumps({"arms": summary, "budget_full_equiv": {k: v * args.budget_scale for k, v in BUDGET_FULL_EQUIV.items()},
                      "evals": args.evals, "num_samples": args.num_samples, "seeds": seeds,
                      "train_fraction": args.train_fraction, "plot": args.plot, "quick": args.quick,
                      "repr_encoding": encoder_cost(Path(args.out) / res_dir.name)}), flush=True)


def merge_summary(path: Path, summary: dict, results: dict, args: dict) -> None:
    """Write this run's arms into summary.json beside the arms other runs reported there.

    One results folder serves several sweeps (the issue-12 arms, then the REPA arms against the
    same dit_full points), and each reports only the arms it was asked for: overwriting would drop
    the others' rows. Each arm keeps the arguments of the run that last reported it."""
    old = fsutil.read_json(path) if path.is_file() else {}
    by_arm = dict(old.get("args_by_arm", {}))
    if "args" in old:  # written before the merge: one run's args for all its arms
        by_arm.update({arm: old["args"] for arm in old.get("summary", {}) if arm not in by_arm})
    by_arm.update({arm: args for arm in summary})
    fsutil.atomic_write_json(path, {"summary": {**old.get("summary", {}), **summary},
                                    "results": {**old.get("results", {}), **results},
                                    "args_by_arm": by_arm})


def finished(args: argparse.Namespace, res_dir: Path) -> bool:
    """Whether every asked arm and seed already holds all its points."""
    arms, seeds = asked(args)
    return bool(arms and seeds) and all(complete_points(res_dir, a, s, args.evals) is not None
                                        for a in arms for s in seeds)


def report(args: argparse.Namespace, res_dir: Path) -> None:
    """--report: the figures from what is already measured."""
    arms, seeds = asked(args)
    results = load_results(res_dir, arms, seeds)
    if not results:
        raise SystemExit(f"--report: no points under {res_dir} for arms {','.join(arms)}")
    finish(args, res_dir, results, seeds)


if __name__ == "__main__":
    main()
