"""On a small CPU, how should independent training runs share the cores? One process with every
core's thread, or one single-thread process per core side by side?

The question behind ``tools/quality_sweep.sh``: its runs (arms x seeds) are independent, so the
machine's throughput in training samples per second is what counts. For each model of
``bench_quality`` (the demo U-Net, the DiT-S/2 of hidden 192) this times full-latent training
steps (``train.train_step``, the loop's own step, on the real in-memory loader over synthetic
latents) in 1 process x N threads, then in N processes x 1 thread side by side; N = the cores
torch sees. Each process warms up, and the side-by-side ones then wait for one go signal, so
every process steps through the same window of wall-clock: a rate is the steps completed in the
window over its length, and the side-by-side rates are summed.

    python benchmarks/bench_cpu_layout.py            # a 30 s window per measurement
    python benchmarks/bench_cpu_layout.py --quick    # 3 s windows, < 60 s on 2 cores

Last stdout line: one JSON object, per model: samples/s of the one process, the sum over the side
by side processes, and their ratio (> 1: side by side trains more per second).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def build(arm: str, warmup: int):
    """``arm``'s trainer (bench_quality's model, the demo config) on synthetic latents, warmed up."""
    from bench_quality import ARMS
    from bench_train import synthetic_loader, timed_step
    from latent_patch import config, demo
    from latent_patch.train import StepPlan, build_accelerator, build_trainer

    cfg = config.load(config.TrainConfig, str(demo.DEFAULT_CONFIG), [
        *ARMS[arm][1], "run.tensorboard=false", "run.out_dir=/tmp/bench_cpu_layout_unused",
        "data.latent_norm=scale"])  # per-channel stats would need real shards; the step's cost is the same
    acc = build_accelerator(cfg, with_trackers=False)
    C, R, B = cfg.model.latent_channels, cfg.model.latent_size, cfg.data.batch_size
    loader = synthetic_loader(4 * B, C, R, cfg.model.num_classes, B)
    trainer = build_trainer(cfg, acc, iter(loader), loader, (C, R), loader.vae)
    plan = StepPlan(size=R, mult=1, patches=B, full_equiv=float(B))
    for _ in range(warmup):
        timed_step(trainer, plan)
    return trainer, plan


def window(trainer, plan, seconds: float) -> float:
    """Full-latent training samples per second over a window of ``seconds`` (it ends with the
    first step that reaches it)."""
    from bench_train import timed_step

    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        timed_step(trainer, plan)
        steps += 1
    return steps * plan.patches / (time.perf_counter() - start)


def worker(seconds: float, warmup: int) -> None:
    """A side-by-side process, driven by lines on stdin: an arm (build and warm it up, answer
    "ready"), then "go" (time a window, answer its rate as JSON). It answers "idle" once its
    imports are done, so none of that work overlaps anyone's window."""
    import torch

    torch.set_num_threads(1)
    print("idle", flush=True)
    for arm in iter(sys.stdin.readline, ""):
        trainer, plan = build(arm.strip(), warmup)
        print("ready", flush=True)
        sys.stdin.readline()
        print(json.dumps({"samples_s": window(trainer, plan, seconds)}), flush=True)
        del trainer


def answer(p: subprocess.Popen, expected: str) -> str:
    """The worker's next line starting with ``expected`` (other output is skipped)."""
    for line in iter(p.stdout.readline, ""):
        if line.startswith(expected):
            return line
    raise SystemExit(f"a side-by-side process failed (exit {p.wait()}) before answering {expected!r}")


def tell(procs: list[subprocess.Popen], line: str) -> None:
    for p in procs:
        p.stdin.write(line + "\n")
        p.stdin.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 s windows, 1 warm-up step (< 60 s on 2 cores)")
    p.add_argument("--seconds", type=float, default=30.0, help="timed window per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--arms", default="unet_full,dit_full", help="bench_quality arms whose models to time")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a side-by-side process
    args = p.parse_args()
    if args.quick:
        args.seconds, args.warmup = 3.0, 1
    if args.worker:
        worker(args.seconds, args.warmup)
        return
    import torch

    cores = torch.get_num_threads()
    cmd = [sys.executable, __file__, "--worker", "--seconds", str(args.seconds), "--warmup", str(args.warmup)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(cores)]
    for proc in procs:
        answer(proc, "idle")
    result: dict = {"cores": cores, "window_s": args.seconds}
    for arm in args.arms.split(","):
        trainer, plan = build(arm, args.warmup)
        one = window(trainer, plan, args.seconds)  # the workers wait on stdin meanwhile
        del trainer
        tell(procs, arm)
        for proc in procs:
            answer(proc, "ready")
        tell(procs, "go")
        many = [json.loads(answer(proc, "{"))["samples_s"] for proc in procs]
        result[arm] = {"one_process_samples_s": round(one, 2), "side_by_side_samples_s": [round(r, 2) for r in many],
                       "side_by_side_total": round(sum(many), 2), "ratio": round(sum(many) / one, 3)}
        print(f"{arm}: 1 process x {cores} threads {one:.1f} samples/s; {cores} x 1 thread "
              f"{' + '.join(f'{r:.1f}' for r in many)} = {sum(many):.1f} ({sum(many) / one:.2f}x)", flush=True)
    for proc in procs:
        proc.stdin.close()
        proc.wait()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
