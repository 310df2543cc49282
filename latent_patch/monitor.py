"""What a training run reports and how it stops when sick: readable log lines (console and
RUN/log.txt), one metrics.jsonl record and tensorboard scalars per log interval, and the checks
that stop a run on a non-finite loss or weights before anything is saved.

Losses stay on the device during the step (no host sync); a :class:`Window` collects them and
:func:`flush_losses` brings them to the host in one transfer at log points and checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import fsutil

log = logging.getLogger("latent_patch.train")

NAN_CHECK_EVERY = 50  # steps between finiteness checks when no log line is due (one host sync each)


class TrainingError(RuntimeError):
    """A run cannot start or must stop (bad config vs data, non-finite loss, ...)."""


def setup_logging(out_dir: Path | None, is_main: bool) -> None:
    """Readable lines on the console (rank 0) and in RUN/log.txt; other ranks only warn.

    Only the training logger is configured (other modules keep the root logger's setup), and
    previous handlers are closed, so repeated in-process runs neither leak files nor print twice.
    """
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    close_logging()
    log.setLevel(logging.INFO if is_main else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    log.addHandler(console)
    if is_main and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(out_dir / "log.txt")
        fh.setFormatter(fmt)
        log.addHandler(fh)
    log.propagate = False


def close_logging() -> None:
    for handler in list(log.handlers):
        handler.close()
        log.removeHandler(handler)


def crossed(before: int, after: int, every: int) -> bool:
    """Did progress pass a multiple of ``every`` during the last step? (every <= 0: never)."""
    return every > 0 and before // every != after // every


def trim_log(path: Path, last_step: int) -> None:
    """Keep only the complete records of ``path`` (metrics.jsonl, fid.jsonl) up to ``last_step``.

    Why: a run killed after its last checkpoint logged steps it will redo on resume, and its last
    record may be half-written; without this the file would hold those steps twice (or a broken
    line). ``last_step`` is the resumed checkpoint's step (0 for a fresh start).
    """
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    keep = [ln for ln in lines if ln.endswith(b"\n") and _record_step(ln) <= last_step]
    if len(keep) != len(lines):
        fsutil.atomic_write_bytes(path, b"".join(keep))


def _record_step(line: bytes) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except (ValueError, AttributeError):  # not JSON, or not an object: drop it
        return math.inf


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors, or the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


@dataclass
class Window:
    """Accumulates one log interval: device losses (checked in one transfer), counts, time."""

    losses: list[torch.Tensor] = field(default_factory=list)
    first_step: int = 1
    patches: int = 0
    full_equiv: float = 0.0
    sides: list[int] = field(default_factory=list)  # this rank's patch side at each step
    sizes: dict[int, int] = field(default_factory=dict)  # steps per side over ALL ranks (flush_losses)
    sides_checked: int = 0  # steps of ``sides`` already gathered and counted in ``sizes``
    start: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # seconds spent in checkpoints / previews, excluded from throughput

    def add(self, plan: Any, loss: torch.Tensor) -> None:
        """One step's device loss and its plan (``train.StepPlan``: size, patches, full_equiv)."""
        self.losses.append(loss)
        self.sides.append(plan.size)
        self.patches += plan.patches
        self.full_equiv += plan.full_equiv


def flush_losses(accelerator: Any, w: Window, patches_seen: int) -> torch.Tensor:
    """Mean over ranks of each step's loss, on the host; a non-finite one stops the run, naming its step.

    This is the only place losses reach the host, and it runs before every log line and every
    checkpoint, so a checkpoint is never written after a NaN/inf loss. It also gathers every
    rank's patch side of each step (:func:`check_sides`).
    """
    if not w.losses:
        return torch.zeros(0)
    check_sides(accelerator, w)
    hist = accelerator.reduce(torch.stack(w.losses), reduction="mean").float().cpu()
    bad = (~torch.isfinite(hist)).nonzero()
    if len(bad):
        step = w.first_step + int(bad[0])
        raise TrainingError(
            f"non-finite loss ({hist[int(bad[0])].item()}) at step {step} (about {patches_seen:,} patches "
            f"seen at the check); stopping without saving. The last complete checkpoint is intact: "
            f"lower optim.lr or raise optim.warmup_patches, then --resume auto"
        )
    return hist


def check_sides(accelerator: Any, w: Window) -> None:
    """Gather each step's patch side from every rank; refuse a step where they differ; count the mix.

    Why: ranks draw the side from generators they hold identically (``train.plan_step``), with no
    communication; should they ever drift apart (a changed seed, a resume that restored one rank's
    generator only), DDP would silently wait for the slowest rank and the schedule's saving would
    be lost. The logged mix counts the sides of all ranks, so it shows what was run, not one
    rank's view. One small gather per check point of the steps since the last one, never per step.
    """
    start = w.sides_checked
    if start == len(w.sides):  # every rank steps in lockstep: all skip together
        return
    mine = torch.tensor(w.sides[start:], dtype=torch.int64, device=accelerator.device)
    every = accelerator.gather(mine).view(accelerator.num_processes, -1).cpu()
    differ = (every != every[0]).any(dim=0).nonzero()
    if len(differ):
        i = int(differ[0])
        raise TrainingError(
            f"ranks drew different patch sides at step {w.first_step + start + i}: {every[:, i].tolist()} (rank "
            "order); every rank must hold the same schedule generator (train.plan_step): same run.seed on all ranks"
        )
    for side, count in zip(*every.flatten().unique(return_counts=True)):
        w.sizes[int(side)] = w.sizes.get(int(side), 0) + int(count)
    w.sides_checked = len(w.sides)


def check_finite_weights(net: torch.nn.Module, step: int, patches_seen: int) -> None:
    """Refuse to save weights that a finite loss already blew up (the loss lags the update by a step)."""
    finite = torch.stack([p.detach().isfinite().all() for p in net.parameters()]).all()
    if not bool(finite):
        raise TrainingError(
            f"non-finite weights after step {step} ({patches_seen:,} patches seen); stopping "
            "without saving. The last complete checkpoint is intact: lower optim.lr or raise optim.warmup_patches, "
            "then --resume auto"
        )


def log_window(trainer: Any, w: Window, hist: torch.Tensor, bar: TrainBar | None = None) -> dict[str, Any]:
    """One console line, one metrics.jsonl record and the tensorboard scalars of this interval.

    With ``bar`` (the run's last, shorter interval) the rates are the whole invocation's: a rate
    over one or two steps says more about which patch side they drew than about the run.
    """
    elapsed = max(time.perf_counter() - w.start - w.paused, 1e-9)
    patches, full_equiv = w.patches, w.full_equiv
    if bar is not None:
        elapsed, patches, full_equiv = max(bar.train_seconds(), 1e-9), bar.patches, bar.full_equiv
    p, acc = trainer.progress, trainer.accelerator
    n = max(sum(w.sizes.values()), 1)
    rec = {
        "step": p.step, "patches": p.patches, "full_equiv": round(p.full_equiv, 3), "train_flops": p.flops,
        "loss": float(hist.mean()) if len(hist) else float("nan"),
        "patches_per_s": patches / elapsed, "full_equiv_per_s": full_equiv / elapsed,
        "rate_over": "run" if bar is not None else "window",
        "lr": trainer.optimizer.param_groups[0]["lr"], "peak_mem_gib": peak_memory_gib(acc.device),
        "size_mix": {str(s): c / n for s, c in sorted(w.sizes.items())}, "time": time.time(),
    }
    aligned = getattr(trainer, "align_losses", None)  # REPA's term, inside "loss" x repa.weight (this rank's)
    if aligned:
        rec["align_loss"] = float(torch.stack(aligned).mean())
        aligned.clear()
    if acc.is_main_process:
        mix = " ".join(f"{s}:{100 * f:.0f}%" for s, f in rec["size_mix"].items())
        log.info(
            "step %d | %s patches (%s full) | loss %.4f%s | %.0f patches/s %.0f full/s%s | lr %.2e | mem %.2f GiB "
            "| sizes %s",
            p.step, human(p.patches), human(p.full_equiv), rec["loss"],
            f" (align {rec['align_loss']:.4f})" if "align_loss" in rec else "", rec["patches_per_s"],
            rec["full_equiv_per_s"], " (run average)" if bar is not None else "", rec["lr"], rec["peak_mem_gib"], mix,
        )
        with open(Path(trainer.cfg.run.out_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    scalars = {k: rec[k] for k in ("loss", "align_loss", "patches_per_s", "full_equiv_per_s", "lr", "peak_mem_gib",
                                   "full_equiv") if k in rec}
    if trainer.cfg.run.tensorboard:
        acc.log({f"train/{k}": v for k, v in scalars.items()}, step=p.step)
    return rec


class TrainBar:
    """The console progress bar of rank 0: budget done, patches/s, full-image equivalents/s, loss, ETA.

    Use it inside ``logging_redirect_tqdm`` (train.train does) so log lines print above the bar.

    It counts what the step plans say (host integers), so updating it costs no device sync; the
    loss shown is the last logged one. The budget that binds (FLOPs or patches) is the bar's total.
    """

    def __init__(self, run: Any, progress: Any, enabled: bool) -> None:
        from tqdm import tqdm

        flop_ends = [f for f in (run.total_flops, run.stop_flops) if f > 0]
        self.by_flops = bool(flop_ends)
        total = min(flop_ends) / 1e12 if self.by_flops else run.total_patches  # where this invocation ends
        done = progress.flops / 1e12 if self.by_flops else progress.patches
        self.bar = tqdm(total=total, initial=done, disable=not enabled, unit=" TFLOP" if self.by_flops else " patches",
                        unit_scale=not self.by_flops, dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
                        desc="training")
        self.start, self.paused, self.full_equiv, self.patches = time.perf_counter(), 0.0, 0.0, 0
        self.loss = float("nan")

    def update(self, plan: Any) -> None:
        self.patches += plan.patches
        self.full_equiv += plan.full_equiv
        step = plan.flops / 1e12 if self.by_flops else plan.patches
        self.bar.total = max(self.bar.total, self.bar.n + step)  # the last step may overshoot the budget
        self.bar.update(step)
        if not self.bar.disable:  # --no-progress, and every rank but the main one
            seconds = max(self.train_seconds(), 1e-9)
            loss = f"loss {self.loss:.4f}" if math.isfinite(self.loss) else "loss at the first log point"
            self.bar.set_postfix_str(f"{self.full_equiv / seconds:.0f} full/s, {loss}", refresh=False)

    def train_seconds(self) -> float:
        """Seconds of training in this invocation (checkpoints, previews and evaluations excluded)."""
        return time.perf_counter() - self.start - self.paused

    def close(self) -> None:
        self.bar.close()


def human(n: float) -> str:
    """1234567 -> '1.23M': counts a person can read at a glance."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"
