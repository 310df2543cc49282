"""A run's budget: how far through it a run is and when it ends, in patches and training FLOPs,
and the FLOPs of a checkpoint saved before they were counted.

Training FLOPs are 3 x the forward FLOPs of every patch at its side and routing (backward ~ 2x
forward), counted per step by ``train.plan_step``; ``run.total_flops`` / ``run.stop_flops``
put every arm of a comparison on one compute axis (bench_quality).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from . import align, checkpoint
from .config import ModelConfig, RepaConfig, RunConfig
from .models import forward_flops, patch_multiple, resolve
from .patches import PatchSchedule

log = logging.getLogger("latent_patch.train")


def training_flops(model: ModelConfig, side: int, repa: RepaConfig | None = None, repr_dims: int = 0) -> float:
    """Training FLOPs of one patch at ``side``: 3 x forward (backward ~ 2x), routed as training
    routes; with ``repa.weight > 0`` also the projector and the alignment loss (``align.py``) on
    the patch's aligned tokens, K = ``repr_dims`` target dims. The encoder that made the targets
    ran once, at encoding: its cost is the manifest's (``repr.flops``), not a training step's."""
    flops = forward_flops(model, side, routed=True)
    if repa is not None and repa.weight > 0:
        params = resolve(model)[1]
        tokens = (side // params["patch_size"]) ** 2
        flops += align.forward_flops(model, repa, params["hidden_size"], tokens, repr_dims)
    return 3 * flops


def run_fraction(run: RunConfig, p: checkpoint.Progress) -> float:
    """How far through its budget the run is, for schedules (the progressive patch ramp): the
    larger of patches / total_patches and FLOPs / total_flops, whichever budget ends it first.
    A budget in FLOPs alone (total_patches set out of reach, as bench_quality does) used to
    leave this at ~0: the progressive ramp never started. ``run.stop_flops`` does not move it."""
    frac = p.patches / max(run.total_patches, 1)
    if run.total_flops > 0:
        frac = max(frac, p.flops / run.total_flops)
    return min(1.0, frac)


def run_ended(run: RunConfig, p: checkpoint.Progress) -> bool:
    """This invocation's end: the patch budget, the FLOP budget or the earlier stop
    (run.stop_flops) is reached."""
    return p.patches >= run.total_patches or 0 < run.total_flops <= p.flops or 0 < run.stop_flops <= p.flops


def settle_flops(trainer: Any, ckpt: Path) -> None:
    """Give a checkpoint saved before FLOP counting (no "flops" in its state) its training FLOPs.

    Why: counted from 0, a FLOP budget would overshoot by the checkpoint's FLOPs and the
    progressive ramp (:func:`run_fraction`) would go back. Its patches give them exactly when its
    run (the checkpoint's config) could draw one patch side only; otherwise a FLOP budget is
    refused, and without one the FLOP figures count from this resume."""
    p, run = trainer.progress, trainer.cfg.run
    if not math.isnan(p.flops):  # counted
        return
    saved = checkpoint.load_config(ckpt)
    try:
        schedule = PatchSchedule(saved.patch, trainer.R, multiple_of=patch_multiple(trainer.net))
    except ValueError as err:
        raise checkpoint.CheckpointError(f"{ckpt}: {err}") from err
    sides = sorted({s for f in (0.0, 1.0) for s, q in zip(schedule.sizes, schedule.probs_at(f)) if q > 0})
    if len(sides) == 1 or p.patches == 0:
        p.flops = p.patches * training_flops(saved.model, sides[0])  # the routing its patches trained with
        log.info("%s was saved before FLOP counting: %s patches at side %d are %.4g training FLOPs",
                 ckpt, f"{p.patches:,}", sides[0], p.flops)
        return
    if run.total_flops > 0 or run.stop_flops > 0:
        raise checkpoint.CheckpointError(
            f"{ckpt} was saved before FLOP counting and its run drew patch sides {sides} in unrecorded numbers, "
            f"so its FLOPs are unknown and run.total_flops={run.total_flops:g} run.stop_flops={run.stop_flops:g} "
            "cannot be honoured: resume it with a patch budget (run.total_patches) and run.total_flops=0 "
            "run.stop_flops=0")
    log.warning("%s was saved before FLOP counting and drew patch sides %s: its FLOPs are unknown, so the FLOP "
                "figures count from this resume", ckpt, sides)
    p.flops = 0.0
