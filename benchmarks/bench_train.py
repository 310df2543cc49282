"""Patch-schedule training throughput vs full-latent training, with the loop's own step function.

One DiT, one process, one run: steps on full latents (side R, batch B) and steps drawn from the
paper's schedule {R/2: 0.5, R: 0.5} (batch B x R/s patches) are INTERLEAVED (ABBA order), so both
see the same machine load, the same model state and the same number of steps. Each step is
``latent_patch.train.train_step`` (the function the training loop calls) fed by the real in-memory
loader over synthetic latents; warm-up steps are excluded. The patch run's draws are recorded and
reported, with the ratio an ideal (compute-proportional) implementation would reach on that mix:
a step at side s costs m (s/R)^2 = s/R of a full step and yields m = R/s times the patches.

    python benchmarks/bench_train.py --quick     # < 60 s on a 2-core CPU, smaller DiT
    python benchmarks/bench_train.py             # DiT-S/2 on 4 x 32 x 32 latents
    python benchmarks/bench_train.py --flops     # FLOP counts and an H100 step-time estimate
    python benchmarks/bench_train.py --block 2025 [--quick]   # the 2025 block vs today's, per FLOP
    python benchmarks/bench_train.py --block 2025 --compile    # the same, both networks torch.compiled

``--block 2025`` (issue 29) times the same preset with today's block and with the 2025 block
(``models.BLOCK_2025``), steps interleaved ABBA on the same draws of the schedule, and reports each
one's training FLOP rate (patches/s x 3 x forward FLOPs per patch, summed over the sides drawn)
and their ratio, ``block_flop_rate_ratio`` (new / old; target >= 0.9 on the CPU, 0.95 on a GPU).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latent_patch import config  # noqa: E402
from latent_patch.loader import MemoryLoader  # noqa: E402
from latent_patch.models import ModelConfig, forward_flops  # noqa: E402
from latent_patch.patches import PatchConfig, PatchSchedule  # noqa: E402
from latent_patch.stream import DatasetInfo  # noqa: E402
from latent_patch.config import TrainConfig  # noqa: E402
from latent_patch.train import StepPlan, build_accelerator, build_trainer, train_step  # noqa: E402

H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM dense bf16 tensor-core peak
ASSUMED_MFU = 0.40


# --------------------------------------------------------------------------- FLOP estimates

def h100_estimate(preset: str, batch: int = 256, mfu: float = ASSUMED_MFU) -> dict:
    """Step time on one H100 for a full-latent step and the mean of the {R/2, R} schedule.

    Assumptions: training = 3 x forward FLOPs (backward ~ 2 x forward), ``mfu`` of the bf16 dense
    peak, no data/optimizer/communication time. The DiT paper's "118.6 GFLOPs" for DiT-XL/2 are
    multiply-accumulates (fvcore); in FLOPs that is ~237 G, which the counter here reproduces.
    """
    cfg = ModelConfig(preset=preset)
    full = forward_flops(cfg)
    half = forward_flops(cfg, cfg.latent_size // 2)
    rate = H100_BF16_DENSE * mfu
    full_step = 3 * full * batch / rate
    half_step = 3 * half * batch * 2 / rate  # batch x R/s = 2 x the patches
    mean_step = 0.5 * (full_step + half_step)
    return {
        "preset": preset, "forward_gflops_full": full / 1e9, "forward_gflops_half": half / 1e9,
        "train_gflops_per_image": 3 * full / 1e9, "batch": batch, "mfu": mfu,
        "h100_full_step_s": full_step, "h100_half_step_s": half_step, "h100_schedule_mean_step_s": mean_step,
        "h100_full_images_s": batch / full_step, "h100_schedule_patches_s": batch * 1.5 / mean_step,
    }


# --------------------------------------------------------------------------- throughput

def synthetic_loader(n: int, C: int, R: int, num_classes: int, batch: int) -> MemoryLoader:
    """The real in-memory loader over random fp16 posteriors (mean ~ N(0, 1), std 0.1)."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(n, C, R, R, generator=g)
    lat = torch.stack([mean, torch.full_like(mean, 0.1)], dim=1).half()
    labels = torch.randint(0, num_classes, (n,), generator=g)
    vae = {"id": "synthetic", "scaling_factor": 0.18215, "shift_factor": 0.0, "latent_channels": C}
    info = DatasetInfo({}, (C, R, R), num_classes, vae, n)
    return MemoryLoader(info, lat, labels, batch, seed=0)


def bench_config(args: argparse.Namespace, block: dict | None = None) -> TrainConfig:
    overrides = [
        f"model.preset={args.model}", f"model.latent_size={args.latent}", "model.latent_channels=4",
        "model.num_classes=1000", f"data.batch_size={args.batch}", f"optim.batch_size_global={args.batch}",
        "run.tensorboard=false", f"run.mixed_precision={args.precision}", "run.out_dir=/tmp/bench_train_unused",
        f"run.compile={'true' if args.compile else 'auto'}",
    ]
    overrides += [f"model.{k}={v}" for k, v in (("hidden", args.hidden), ("depth", args.depth), ("heads", args.heads)) if v]
    overrides += [f"model.{k}={str(v).lower()}" for k, v in (block or {}).items()]
    return config.load(TrainConfig, None, overrides)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(trainer, plan: StepPlan) -> float:
    dev = trainer.accelerator.device
    sync(dev)
    start = time.perf_counter()
    loss = train_step(trainer, plan)
    sync(dev)
    elapsed = time.perf_counter() - start
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss in the benchmark at side {plan.size}")
    return elapsed


def compiled(trainer) -> bool:
    """Whether the trainer runs its network through torch.compile (what it did, not the setting)."""
    return isinstance(trainer.precond.net, torch._dynamo.eval_frame.OptimizedModule)


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"cuda_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    return {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_config(args)
    acc = build_accelerator(cfg, with_trackers=False)
    C, R, B = 4, args.latent, args.batch
    loader = synthetic_loader(args.samples, C, R, cfg.model.num_classes, B)
    trainer = build_trainer(cfg, acc, iter(loader), loader, (C, R), loader.vae)
    schedule = PatchSchedule(PatchConfig(sizes=[0.5, 1.0], probs=[0.5, 0.5]), R)
    gen = torch.Generator().manual_seed(args.seed)
    draws = [schedule.sample(gen) for _ in range(args.steps)]
    full_plan = StepPlan(size=R, mult=1, patches=B, full_equiv=float(B))

    def patch_plan(s: int, m: int) -> StepPlan:
        return StepPlan(size=s, mult=m, patches=B * m, full_equiv=B * m * (s / R) ** 2)

    for _ in range(args.warmup):  # allocator, autotuning, both shapes
        timed_step(trainer, full_plan)
        timed_step(trainer, patch_plan(R // 2, 2))
    if acc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(acc.device)
    full_time = patch_time = 0.0
    patches = full_equiv = 0.0
    per_side: dict[int, list[float]] = {}
    for i, (s, m) in enumerate(draws):
        # interleaved in ABBA order (full, patch, patch, full, ...) so neither kind always runs
        # right after the other: what ran before (its buffer sizes) affects a CPU step's time
        plan = patch_plan(s, m)
        first, second = (full_plan, plan) if i % 2 == 0 else (plan, full_plan)
        times = {id(first): timed_step(trainer, first)}
        times[id(second)] = timed_step(trainer, second)
        full_time += times[id(full_plan)]
        per_side.setdefault(s, []).append(times[id(plan)])
        patch_time += times[id(plan)]
        patches += plan.patches
        full_equiv += plan.full_equiv
    n = len(draws)
    full_rate = n * B / full_time
    patch_rate = patches / patch_time
    ideal = sum(m for _, m in draws) / sum(s / R for s, _ in draws)
    mix = {str(s): len(v) for s, v in sorted(per_side.items())}
    step_s = {str(s): sum(v) / len(v) for s, v in sorted(per_side.items())}
    # the same measurement re-weighted to the schedule's exact probabilities (removes draw luck)
    expected = expected_equiv = None
    if len(per_side) == len(schedule.sizes):
        num = sum(p * B * m for p, m in zip(schedule.probs, schedule.multipliers))
        num_equiv = sum(p * B * m * (s / R) ** 2 for p, m, s in zip(schedule.probs, schedule.multipliers, schedule.sizes))
        den = sum(p * step_s[str(s)] for p, s in zip(schedule.probs, schedule.sizes))
        expected, expected_equiv = (num / den) / full_rate, (num_equiv / den) / full_rate
    result = {
        "model": cfg.model.preset, "params_m": sum(p.numel() for p in trainer.net.parameters()) / 1e6,
        "hidden": args.hidden, "depth": args.depth, "latent": [C, R, R], "batch": B, "steps": n,
        "warmup_steps_per_kind": args.warmup, "device": str(acc.device), "precision": args.precision,
        "compiled": compiled(trainer),
        "threads": torch.get_num_threads(), "drawn_mix": mix,
        "full_step_s": full_time / n, "patch_step_s": patch_time / n,
        # headline figures at the schedule's exact probabilities (measured step times per side,
        # weighted by the schedule), so a lucky or unlucky draw of sides does not move them
        "full_samples_s": full_rate, "patch_samples_s": full_rate * (expected or patch_rate / full_rate),
        "ratio": expected if expected is not None else patch_rate / full_rate,
        "full_equiv_ratio": expected_equiv if expected_equiv is not None else (full_equiv / patch_time) / full_rate,
        "ratio_drawn_mix": patch_rate / full_rate, "ideal_ratio_for_mix": ideal,
        "full_equiv_ratio_drawn_mix": (full_equiv / patch_time) / full_rate,
        "patch_step_s_by_side": step_s, "ratio_at_schedule_probs": expected,
        # full steps and the patch run's side-R steps do identical work: their gap is timing noise
        "same_work_gap": (step_s[str(R)] / (full_time / n) - 1) if str(R) in step_s else None,
    }
    result.update(peak_memory(acc.device))
    return result


def run_block_compare(args: argparse.Namespace) -> dict:
    """Today's block vs the 2025 block at equal work: the FLOP rate of each (issue 29's target)."""
    from latent_patch.models import BLOCK_2025

    if args.threads:
        torch.set_num_threads(args.threads)
    blocks = {"2022": {}, "2025": BLOCK_2025}
    cfgs = {name: bench_config(args, block) for name, block in blocks.items()}
    acc = build_accelerator(cfgs["2022"], with_trackers=False)
    C, R, B = 4, args.latent, args.batch
    loader = synthetic_loader(args.samples, C, R, 1000, B)
    trainers = {name: build_trainer(cfg, acc, iter(loader), loader, (C, R), loader.vae) for name, cfg in cfgs.items()}
    schedule = PatchSchedule(PatchConfig(sizes=[0.5, 1.0], probs=[0.5, 0.5]), R)
    gen = torch.Generator().manual_seed(args.seed)
    draws = [schedule.sample(gen) for _ in range(args.steps)]
    flops = {name: {s: 3 * forward_flops(cfg.model, s) for s in schedule.sizes} for name, cfg in cfgs.items()}

    def plan(s: int, m: int) -> StepPlan:
        return StepPlan(size=s, mult=m, patches=B * m, full_equiv=B * m * (s / R) ** 2)

    for _ in range(args.warmup):
        for trainer in trainers.values():
            for s, m in zip(schedule.sizes, schedule.multipliers):
                timed_step(trainer, plan(s, m))
    seconds = dict.fromkeys(blocks, 0.0)
    work = dict.fromkeys(blocks, 0.0)
    for i, (s, m) in enumerate(draws):
        order = list(blocks) if i % 2 == 0 else list(blocks)[::-1]  # ABBA: neither always runs first
        for name in order:
            seconds[name] += timed_step(trainers[name], plan(s, m))
            work[name] += flops[name][s] * B * m
    rates = {name: work[name] / seconds[name] for name in blocks}
    params = {name: sum(p.numel() for p in t.net.parameters()) / 1e6 for name, t in trainers.items()}
    return {
        "model": cfgs["2022"].model.preset, "hidden": args.hidden, "depth": args.depth, "latent": [C, R, R],
        "batch": B, "steps": len(draws), "device": str(acc.device), "precision": args.precision,
        "compiled": all(compiled(t) for t in trainers.values()),
        "threads": torch.get_num_threads(), "block_2025": BLOCK_2025, "params_m": params,
        "train_gflops_per_patch": {n: {str(s): f / 1e9 for s, f in v.items()} for n, v in flops.items()},
        "patches_s": {n: sum(B * m for _, m in draws) / seconds[n] for n in blocks},
        "train_gflop_s": {n: r / 1e9 for n, r in rates.items()},
        "block_flop_rate_ratio": rates["2025"] / rates["2022"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller DiT and fewer steps: < 60 s on a 2-core CPU")
    p.add_argument("--flops", action="store_true", help="only FLOP counts and H100 step-time estimates")
    p.add_argument("--model", default="DiT-S/2")
    p.add_argument("--hidden", type=int, default=0, help="override the preset's width (0 keeps it)")
    p.add_argument("--depth", type=int, default=0)
    p.add_argument("--heads", type=int, default=0)
    p.add_argument("--latent", type=int, default=32)
    p.add_argument("--batch", type=int, default=0, help="loader batch per step (full-latent batch)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per kind")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 keeps the default)")
    p.add_argument("--precision", default=None, choices=["no", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (run.compile=true) on every device; default: the trainer's "
                        "own choice (compiled on CUDA, eager on the CPU). Warm-up steps absorb the compiling")
    p.add_argument("--block", choices=["2025"], default=None,
                   help="compare today's DiT block with the 2025 one (FLOP rate of each, same draws)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.flops:
        out = {"estimates": [h100_estimate(name) for name in ("DiT-XL/2", "DiT-B/2", "adm-imagenet256")],
               "assumptions": f"train = 3 x forward; {ASSUMED_MFU:.0%} of {H100_BF16_DENSE / 1e12:.0f} TFLOP/s bf16 "
                              "dense; batch 256; compute only (no data, optimizer, communication)"}
        for e in out["estimates"]:
            print(f"{e['preset']:>16}: forward {e['forward_gflops_full']:.1f} GFLOPs/img (half side "
                  f"{e['forward_gflops_half']:.1f}); H100 full step {e['h100_full_step_s'] * 1e3:.0f} ms, "
                  f"schedule mean {e['h100_schedule_mean_step_s'] * 1e3:.0f} ms")
        print(json.dumps(out))
        return 0
    cuda = torch.cuda.is_available()
    args.precision = args.precision or ("bf16" if cuda else "no")
    if args.quick:
        args.hidden = args.hidden or 192
        args.depth = args.depth or 4
        args.heads = args.heads or 3
        args.batch = args.batch or 8
        args.steps = args.steps or 12
        args.threads = args.threads or (0 if cuda else 1)
    else:
        args.batch = args.batch or (64 if cuda else 8)
        args.steps = args.steps or (50 if cuda else 16)
        args.threads = args.threads or (0 if cuda else 1)
    t0 = time.perf_counter()
    if args.block:
        result = run_block_compare(args)
        result["wall_s"] = time.perf_counter() - t0
        print(f"2022 block: {result['train_gflop_s']['2022']:.2f} GFLOP/s ({result['patches_s']['2022']:.1f} patches/s) | "
              f"2025 block: {result['train_gflop_s']['2025']:.2f} GFLOP/s ({result['patches_s']['2025']:.1f} patches/s) | "
              f"FLOP-rate ratio {result['block_flop_rate_ratio']:.3f}")
        print(json.dumps(result))
        return 0
    result = run(args)
    result["wall_s"] = time.perf_counter() - t0
    at_probs, gap = result["ratio_at_schedule_probs"], result["same_work_gap"]
    print(f"full: {result['full_samples_s']:.1f} latents/s | patch: {result['patch_samples_s']:.1f} patches/s | "
          f"ratio {result['ratio']:.3f} (drawn mix {result['ratio_drawn_mix']:.3f}, ideal for it {result['ideal_ratio_for_mix']:.3f}) | "
          f"full-equiv ratio {result['full_equiv_ratio']:.3f} | mix {result['drawn_mix']} | "
          f"ratio at the schedule's exact probabilities {'n/a' if at_probs is None else f'{at_probs:.3f}'} | "
          f"timing noise (same-work gap) {'n/a' if gap is None else f'{gap:+.1%}'}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
