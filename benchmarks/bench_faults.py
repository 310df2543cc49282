"""Fault suite: SIGKILL the three jobs at random moments, feed them every kind of bad input.

    python benchmarks/bench_faults.py            # full: >= 10 kills per stage (encode with 1 and
                                                 # 2 processes, train, sample), seeds printed
    python benchmarks/bench_faults.py --quick    # < 60 s on 2 cores: 1 kill per stage + all bad inputs
    python benchmarks/bench_faults.py --seed 7   # another draw of kill moments (reproducible)

Each kill chain runs the real CLI in its own session and SIGKILLs its whole process tree
mid-work: once a seeded number of complete units (shards, checkpoints, sample parts) exists on
disk, never the last one, plus a seeded share of half a unit's time (the seed, every unit count
and delay are printed; the full run also times a quarter of the later kills from process start,
to hit a resumed run's set-up). It re-runs the same command until it finishes and compares the
output with an uninterrupted run of the same job (same batch size, same torch thread count:
faults.THREADS, which each chain checks before it compares bits): the key set of the shards
(duplicates counted with tarfile), every shard's sha256 against the manifest, the training
losses after each resume (which must say it resumed from the checkpoint at the kill) and the
final weights, the sampled arrays. Bad inputs are judged one by one (see faults/). The last line
printed is one JSON object: {"kills", "resumed_ok", "min_kill_position", "samples_lost",
"samples_duplicated", "bad_inputs", "bad_inputs_handled", ..., "torch_threads", "stages":
{stage: {"positions": [fraction of the output kept on disk at each kill; training: the latest
checkpoint's patches / total], "resumed": [what each re-run said it kept], "moments", ...}}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (shared CPUs)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faults as F  # noqa: E402


@dataclass
class Plan:
    """How much to do: kills per stage, input sizes, whether to kill a 2-process encoding.

    The quick plan is bound by interpreter start-ups (about 6 s of CPU each for the CLIs here):
    one kill per stage is two start-ups per stage, run side by side."""

    kills: int
    images_per_class: int
    train_images: int
    samples: int
    torchrun: bool
    parallel: int
    p_any: float  # share of kills timed from process start rather than from the first work line
    budget_s: float  # no new kill chain starts after this many seconds


QUICK = Plan(kills=1, images_per_class=30, train_images=1200, samples=48, torchrun=False, parallel=3,
             p_any=0.0, budget_s=35.0)
FULL = Plan(kills=10, images_per_class=100, train_images=3200, samples=96, torchrun=True, parallel=2,
            p_any=0.25, budget_s=3600.0)
CLASSES, SHARD_SIZE, CKPT_EVERY, SAMPLE_BATCH, SAMPLE_STEPS = 3, 6, 300, 4, 8

_print_lock = threading.Lock()
_T0 = time.monotonic()


def say(text: str) -> None:
    """Progress lines go to stdout before the JSON line (flushed: the suite can take minutes)."""
    with _print_lock:
        print(text, file=sys.__stdout__, flush=True)  # not a CLI call's captured stdout


def start_stage(pool: ThreadPoolExecutor, futures: list[Future], make_stage, name: str, plan: Plan,
                base_seed: int, timing: F.Timing) -> None:
    """Run a stage's kill chains on the pool (they overlap the in-process work that follows)."""
    futures.append(pool.submit(F.kill_stage, make_stage, base_seed, plan.kills, timing, plan.p_any,
                               _T0 + plan.budget_s, say))


def run(plan: Plan, work: Path, seed: int, mode: str) -> dict:
    """References in this process, kill chains in the background as soon as their reference
    exists, bad inputs in this process meanwhile; returns the summary."""
    t0 = time.monotonic()
    vae = F.make_tiny_vae(work / "vae")
    src = work / "src"
    F.make_image_tree(src, CLASSES, plan.images_per_class, seed=seed)
    enc_ref = work / "enc_ref"
    res = F.encode_in_process(src, enc_ref, vae, shard_size=SHARD_SIZE)
    if res.rc:
        raise SystemExit(f"reference encoding failed: {res.text[-2000:]}")
    F.note_threads(enc_ref, res.threads)
    pool = ThreadPoolExecutor(max_workers=plan.parallel)
    futures: list[Future] = []
    start_stage(pool, futures, lambda c: F.EncodeStage(src, work / f"enc1_{c}", enc_ref, vae, 1, SHARD_SIZE),
                "encode_1proc", plan, seed * 1000 + 100, F.Timing(5.0, 1.5))
    if plan.torchrun:
        start_stage(pool, futures, lambda c: F.EncodeStage(src, work / f"enc2_{c}", enc_ref, vae, 2, SHARD_SIZE),
                    "encode_2proc", plan, seed * 1000 + 200, F.Timing(9.0, 1.5))
    run_ref, train_ready = work / "run_ref", threading.Event()
    start_stage(pool, futures, lambda c: F.TrainStage(enc_ref, work / f"run_{c}", run_ref, CLASSES,
                                                      plan.train_images, CKPT_EVERY, train_ready),
                "train", plan, seed * 1000 + 300, F.Timing(9.0, 2.0))
    reference(F.train_cli, F.train_argv(enc_ref, run_ref, CLASSES, resume=None, total=plan.train_images,
                                        ckpt_every=CKPT_EVERY), run_ref, train_ready)
    save, smp_ready = ("npz" if mode == "quick" else "npz,png"), threading.Event()
    smp = lambda c: F.SampleStage(run_ref, work / f"smp_{c}", work / "smp_ref", plan.samples,  # noqa: E731
                                  SAMPLE_BATCH, SAMPLE_STEPS, save, smp_ready)
    start_stage(pool, futures, smp, "sample", plan, seed * 1000 + 400, F.Timing(6.0, 1.0))
    reference(F.sample_cli, smp(0).argv(work / "smp_ref"), work / "smp_ref", smp_ready)
    outcomes = bad_inputs(work / "bad", vae, enc_ref, run_ref)
    chains = [c for f in futures for c in f.result()]
    pool.shutdown()
    return F.summarize(outcomes, chains, time.monotonic() - t0, mode)


def reference(cli, argv: list[str], out: Path, ready: threading.Event) -> None:
    """An uninterrupted run into ``out``, in this process while its stage's kill chain already
    runs, at the killed runs' torch thread count (call_cli pins it), noted beside ``out`` for the
    chain's final comparison, which waits for ``ready``."""
    res = cli(argv)
    F.note_threads(out, res.threads)
    ready.set()  # also on failure: waiting chains then fail fast instead of hanging
    if res.rc:
        raise SystemExit(f"reference run failed: {res.text[-2000:]}")


def bad_inputs(work: Path, vae: Path, good_shards: Path, good_run: Path) -> list[F.Outcome]:
    """Every bad-input kind, in this process (they fail fast; no interpreter start-ups)."""
    work.mkdir()
    vae8 = F.make_tiny_vae(work / "vae8", latent_channels=8)
    outcomes = F.run_image_suite(work, vae)
    outcomes += F.run_shard_suite(work, good_shards)
    outcomes += F.run_checkpoint_suite(F.make_run_fixture(work, good_shards, vae, vae8, good_run))
    for o in outcomes:
        flag = "ok  " if o.handled else "FAIL"
        say(f"  bad input [{flag}] {o.group}/{o.kind}{' (traceback)' if o.traceback else ''}: {o.detail[:240]}")
    return outcomes


def main() -> int:
    """Parse the flags, run in a temporary (or --keep) folder, print the JSON line last."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 kill per stage + every bad input (< 60 s)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the kill moments (recorded)")
    p.add_argument("--kills", type=int, default=None, help="kills per stage (default 10, quick 1)")
    p.add_argument("--keep", default=None, help="work in this folder and keep it (default: a temp folder)")
    args = p.parse_args()
    plan = QUICK if args.quick else FULL
    if args.kills is not None:
        plan.kills = args.kills
    mode = "quick" if args.quick else "full"
    import torch

    torch.set_num_threads(F.THREADS)  # the bad inputs' runs too (call_cli pins every CLI call anyway)
    say(f"fault suite ({mode}): {plan.kills} kill(s) per stage, base seed {args.seed}")
    if args.keep:
        work = Path(args.keep)
        work.mkdir(parents=True, exist_ok=False)
        result = run(plan, work, args.seed, mode)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_faults_") as tmp:
            result = run(plan, Path(tmp), args.seed, mode)
    result["seed"] = args.seed
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
