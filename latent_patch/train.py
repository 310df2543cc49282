"""The training loop: patch-wise EDM training of a class-conditional denoiser on pre-encoded latents.

One optimizer step, the unit everything here counts (``train_step``):
  1. draw the step's patch side s from the schedule (one per step, per rank; see ``plan_step``),
  2. for each of the gradient-accumulation micro-batches pull ``m = R / s`` loader batches (so each
     patch comes from a different image), crop the posterior (mean, std) at random offsets, draw
     the latent z from it on the device, and take the EDM loss with label dropout,
  3. clip, step AdamW (fp32 master weights; bf16/fp16 autocast through accelerate), update the EMA.
Progress is counted in patches seen (``run.total_patches``, the EMA half-life and the lr warm-up,
as the authors count their 2500 Mimg) and in full-image equivalents (patches x (s/R)^2), so any
GPU count or batch size resumes at the same place.

Around the step: ``checkpoint`` saves and restores everything a step depends on (exact resume),
``monitor`` logs and stops a diverged run, ``evaluate`` makes previews and FID of the EMA weights.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from . import align, checkpoint, dist
from . import config as config_mod
from .budget import run_ended, run_fraction, settle_flops, training_flops
from .codec import LatentNorm, draw_latent, latent_norm
from .config import EMAConfig, OptimConfig, TrainConfig
from .dist import adopt_slurm_env, compile_network, configure_device, resolve_compile, resolve_precision
from .edm import Precond, edm_loss_terms
from .evaluate import Evaluator, Previewer
from .loader import build_loader
from .models import (
    build_model, check_latents_fit, enable_grad_checkpointing, offset_multiple, patch_multiple,
)
from .models.dit import draw_route
from .monitor import (
    NAN_CHECK_EVERY, TrainBar, TrainingError, Window, check_finite_weights, crossed, flush_losses,
    log, log_window, setup_logging, trim_log,
)
from .patches import PatchSchedule, random_crops_at
from .seeds import derive_seed
from .shards import open_manifest

__all__ = ["TrainConfig", "TrainingError", "Trainer", "StepPlan", "train", "train_step", "build_trainer"]


# --------------------------------------------------------------------------- the trainer

@dataclass
class StepPlan:
    """One optimizer step's shape: this rank's patch side and multiplier, and the global counts."""

    size: int
    mult: int
    patches: int  # all ranks, all micro-batches
    full_equiv: float
    flops: float = 0.0  # training FLOPs of the step, all ranks


@dataclass
class Trainer:
    """Everything ``train_step`` touches. Built by ``build_trainer``; the loop owns it."""

    cfg: TrainConfig
    accelerator: Any
    net: torch.nn.Module  # the raw network (its parameters are the optimizer's)
    precond: Precond  # Precond around the accelerate-prepared (DDP / compiled / autocast) network
    ema: torch.nn.Module | None  # None on a rank that never reads it (see build_trainer)
    optimizer: torch.optim.Optimizer
    batches: Iterator
    loader: Any  # has state_dict()/load_state_dict(); None for synthetic data (benchmarks)
    schedule: PatchSchedule
    schedule_gen: torch.Generator  # the patch schedule's draws: the same on every rank (see plan_step)
    gen: torch.Generator  # this rank's generator for crops, noise, sigma, label dropout
    accum: int
    R: int
    C: int
    scaling_factor: float
    shift_factor: float
    manifest: dict | None = None
    norm: LatentNorm | None = None  # data.latent_norm=channel; None: the VAE's scaling only
    offset_step: int = 1  # crop offsets are multiples of this (DiT: its patchify; see patches.random_offsets)
    route_ratio: float = 0.0  # DiT token routing (model.route_ratio); 0: every token through every block
    flops_per_patch: dict[int, float] = field(default_factory=dict)  # training FLOPs of one patch per side
    projector: torch.nn.Module | None = None  # REPA's (repa.weight > 0): trained and saved, never sampled
    align_losses: list[torch.Tensor] = field(default_factory=list)  # per micro-batch, until the next log line
    progress: checkpoint.Progress = field(default_factory=checkpoint.Progress)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes


def split_batch(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) for ``optim.batch_size_global`` on ``world_size``
    processes: the largest micro-batch up to ``data.batch_size`` that divides the per-process share.

    Why derived: a recipe's global batch must train the same on 8 or 64 GPUs (256 on 16 GPUs is
    16 each, 1 step); only a global batch that does not split over the processes is refused.
    """
    total, cap = cfg.optim.batch_size_global, cfg.data.batch_size
    if total % world_size:
        raise TrainingError(f"optim.batch_size_global={total} does not split over {world_size} processes")
    share = total // world_size
    micro = max(d for d in range(1, min(cap, share) + 1) if share % d == 0)
    return micro, share // micro


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step (see :func:`split_batch`)."""
    return split_batch(cfg, world_size)[1]


def build_accelerator(cfg: TrainConfig, with_trackers: bool = True):
    """Accelerator for DDP over processes/nodes and autocast mixed precision ("auto": bf16 on CUDA)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    adopt_slurm_env()  # srun without torchrun: the same process group as torchrun would make
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mp = resolve_precision(cfg.run.mixed_precision, device_type)
    if mp == "fp16" and device_type != "cuda":
        raise TrainingError("run.mixed_precision=fp16 needs a CUDA GPU (loss scaling); on the CPU use bf16 or no")
    acc = Accelerator(
        cpu=device_type != "cuda",  # without it accelerate ignores a CPU torchrun's other processes
        mixed_precision=mp,
        log_with="tensorboard" if (with_trackers and cfg.run.tensorboard) else None,
        project_dir=cfg.run.out_dir,
        # as dist.init_process_group: a first collective may wait on a slow first checkpoint load
        kwargs_handlers=[InitProcessGroupKwargs(timeout=dist.GROUP_TIMEOUT)],
    )
    configure_device(acc.device)
    return acc


def build_trainer(cfg: TrainConfig, accelerator: Any, batches: Iterator, loader: Any,
                  latent_shape: tuple[int, int], vae: dict, manifest: dict | None = None) -> Trainer:
    """Model, EMA, optimizer, schedule and generators for a (fresh) run; ``checkpoint.resume`` restores state."""
    rank, world, seed = accelerator.process_index, accelerator.num_processes, cfg.run.seed
    C, R = latent_shape
    if len(cfg.optim.betas) != 2:
        raise TrainingError(f"optim.betas must hold two numbers (beta1, beta2), got {cfg.optim.betas}")
    with refusal(""):
        norm = latent_norm(cfg.data.latent_norm, manifest, cfg.edm.sigma_data, where=str(cfg.data.shards))
    torch.manual_seed(derive_seed(seed, 0, "init"))  # same init on every rank
    with refusal("model: "):  # unknown preset, override that does not apply, ...
        net = build_model(cfg.model)
    with refusal(""):  # after the model's init draws: repa.weight=0 leaves every draw as it was
        projector, repr_dims = align.build_projector(cfg.repa, cfg.model, net, manifest, str(cfg.data.shards))
    if cfg.run.grad_checkpointing and not cfg.model.grad_checkpointing:
        with refusal(""):
            enable_grad_checkpointing(net)
    with refusal("patch: "):  # a side that does not fit R or the model's patchify
        schedule = PatchSchedule(cfg.patch, R, multiple_of=patch_multiple(net))
    # the EMA is read by rank 0 (checkpoints, previews) and, when FID runs, by every rank (each
    # samples its share, so all hold the same EMA); other ranks hold none: no copy, load or update
    needs_ema = accelerator.is_main_process or cfg.eval.fid_every_patches > 0
    ema = copy.deepcopy(net).eval().requires_grad_(False) if needs_ema else None
    cuda = accelerator.device.type == "cuda"
    params = [*net.parameters(), *(projector.parameters() if projector is not None else ())]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay, fused=True if cuda else None)
    trained = net if projector is None else align.AlignedNet(net, projector, cfg.repa.block)
    prepared, optimizer = accelerator.prepare(trained, optimizer)
    if resolve_compile(cfg.run.compile, accelerator.device.type):
        prepared = compile_network(prepared, cfg.run.compile_backend, num_shapes=len(schedule.sizes))
    if ema is not None:
        ema.to(accelerator.device)
    schedule_gen = torch.Generator().manual_seed(derive_seed(seed, 0, "schedule"))  # rank 0's stream of old
    gen = torch.Generator(accelerator.device).manual_seed(derive_seed(seed, rank, "step"))
    torch.manual_seed(derive_seed(seed, rank, "torch"))  # model dropout, per rank
    random.seed(derive_seed(seed, rank, "python"))
    np.random.seed(derive_seed(seed, rank, "numpy") % 2**32)
    return Trainer(
        cfg=cfg, accelerator=accelerator, net=net, precond=Precond(prepared, cfg.edm.sigma_data), ema=ema,
        optimizer=optimizer, batches=batches, loader=loader, schedule=schedule, schedule_gen=schedule_gen,
        gen=gen, accum=accumulation_steps(cfg, world), R=R, C=C,
        scaling_factor=float(vae["scaling_factor"]), shift_factor=float(vae.get("shift_factor") or 0.0),
        manifest=manifest, norm=norm, offset_step=offset_multiple(net), route_ratio=cfg.model.route_ratio or 0.0,
        flops_per_patch={s: training_flops(cfg.model, s, cfg.repa, repr_dims) for s in schedule.sizes},
        projector=projector,
    )


@contextlib.contextmanager
def refusal(prefix: str) -> Iterator[None]:
    """Turn a ValueError of a config check into a TrainingError (a one-line refusal by the CLI)."""
    try:
        yield
    except ValueError as err:
        raise TrainingError(f"{prefix}{err}") from err


# --------------------------------------------------------------------------- one optimizer step

def plan_step(trainer: Trainer) -> StepPlan:
    """Draw this step's patch side, ONE for every rank and micro-batch, from a generator that every
    rank holds identically (same seed, same draws, no communication).

    Why one side for all: DDP waits for the slowest rank, so with independent draws a step was
    almost always as slow as a full step on 8 ranks and the schedule's saving was lost. The mix of
    sides over steps is the schedule's, as before; every rank knows the global patch count.
    """
    progress = run_fraction(trainer.cfg.run, trainer.progress)
    size, mult = trainer.schedule.sample(trainer.schedule_gen, progress)
    n = trainer.cfg.data.batch_size * trainer.accum * mult * trainer.world_size
    return StepPlan(size=size, mult=mult, patches=n, full_equiv=n * (size / trainer.R) ** 2,
                    flops=n * trainer.flops_per_patch.get(size, 0.0))


def next_batch(trainer: Trainer, mult: int) -> list[torch.Tensor | None]:
    """``mult`` loader batches concatenated (each patch from a different image), on the device:
    [mean, std, labels, feature grids or None]."""
    dev = trainer.accelerator.device
    # copy each (pinned) loader batch as it is, and concatenate on the device: a CPU-side cat
    # would make a pageable tensor, whose host-to-device copy cannot overlap with compute
    parts = [[None if x is None else x.to(dev, non_blocking=True) for x in unpack_batch(next(trainer.batches))]
             for _ in range(mult)]
    return [None if parts[0][i] is None else torch.cat([p[i] for p in parts]) if mult > 1 else parts[0][i]
            for i in range(4)]


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(mean, std, labels, features or None) from a loader batch given as a tuple/list or a mapping."""
    if isinstance(batch, dict):
        return batch["mean"], batch["std"], batch["labels"] if "labels" in batch else batch["label"], batch.get("repr")
    return (*batch[:3], batch[3] if len(batch) > 3 else None)


def micro_batch_loss(trainer: Trainer, size: int, mult: int) -> torch.Tensor:
    """Per-patch losses (B * mult,) of one micro-batch: EDM's, plus repa.weight x the alignment
    loss of each patch's tokens to the crop of its stored feature grid (``align.py``).

    The posterior (mean, std) is cropped BEFORE drawing z: cropping and sampling commute (the
    noise is independent per cell), and drawing only the cropped cells makes the randn cost
    proportional to the patch area instead of the full latent's.
    """
    tr, edm = trainer, trainer.cfg.edm
    mean, std, labels, features = next_batch(tr, mult)
    posterior = torch.cat([mean, std], dim=1).float()
    crops, coords, offsets = random_crops_at(posterior, size, generator=tr.gen, step=tr.offset_step)
    z = draw_latent(crops[:, : tr.C], crops[:, tr.C :], tr.scaling_factor, tr.shift_factor, generator=tr.gen)
    z = tr.norm.apply(z) if tr.norm is not None else z
    route = None
    if tr.route_ratio > 0:  # which tokens skip the routed blocks: drawn from the step's generator
        route = draw_route(len(z), (size // tr.offset_step) ** 2, generator=tr.gen, device=z.device)
    loss, aux = edm_loss_terms(tr.precond, z, coords, labels, generator=tr.gen, num_classes=tr.cfg.model.num_classes,
                               label_dropout=edm.label_dropout, P_mean=edm.P_mean, P_std=edm.P_std, route=route)
    if tr.projector is None:
        return loss
    targets = align.patch_targets(align.token_targets(features, tr.R // tr.offset_step), offsets, size, tr.offset_step)
    aligned = align.alignment_loss(aux[0], targets, aux[1])  # aux: projected tokens, kept indices
    tr.align_losses.append(aligned.detach().mean())
    return loss + tr.cfg.repa.weight * aligned


def train_step(trainer: Trainer, plan: StepPlan) -> torch.Tensor:
    """One optimizer step as planned; returns the mean loss of this rank's patches (on the device).

    No host synchronisation happens here (the loss stays a device tensor), so the GPU queue is
    never drained by logging; the loop checks finiteness in batches (``monitor.flush_losses``).
    """
    acc, opt, p = trainer.accelerator, trainer.optimizer, trainer.progress
    for group in opt.param_groups:
        group["lr"] = lr_at(trainer.cfg.optim, p.patches)
    total = torch.zeros((), device=acc.device)
    for i in range(trainer.accum):
        sync = i == trainer.accum - 1
        with contextlib.nullcontext() if sync else acc.no_sync(trainer.precond.net):
            loss = micro_batch_loss(trainer, plan.size, plan.mult).mean() / trainer.accum
            acc.backward(loss)
        total += loss.detach()
    if trainer.cfg.optim.grad_clip > 0:  # every trained parameter: the network's and the projector's
        acc.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]], trainer.cfg.optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    p.step += 1
    p.patches += plan.patches
    p.full_equiv += plan.full_equiv
    p.flops += plan.flops
    if trainer.ema is not None:
        update_ema(trainer.ema, trainer.net, ema_beta(trainer.cfg.ema, plan.patches, p.patches))
    return total


def lr_at(cfg: OptimConfig, patches: int) -> float:
    """Linear warm-up over ``warmup_patches`` patches, then constant (the authors' schedule)."""
    if cfg.warmup_patches <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, patches / cfg.warmup_patches)


def ema_beta(cfg: EMAConfig, step_patches: int, patches_after: int) -> float:
    """Per-step EMA decay from a half-life in patches (EDM), with the optional ramp-up cap."""
    half_life = cfg.half_life_patches
    if cfg.rampup_ratio is not None:
        half_life = min(half_life, patches_after * cfg.rampup_ratio)
    return 0.5 ** (step_patches / max(half_life, 1e-8))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net, one fused op over all parameters; buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1.0 - beta)
    for eb, nb in zip(ema.buffers(), net.buffers()):
        eb.copy_(nb)


# --------------------------------------------------------------------------- the run

def prepare_run(cfg: TrainConfig, resume_spec: str | None) -> tuple[Trainer, Path | None]:
    """Accelerator, data, model and (optionally) the restored state; no training yet.

    Everything that can refuse the run (config vs data, checkpoint damage) runs before the run
    folder gets any new file."""
    acc = build_accelerator(cfg)
    run_dir = Path(cfg.run.out_dir)
    setup_logging(run_dir, acc.is_main_process)
    if acc.is_main_process:
        for note in checkpoint.recover(run_dir):
            log.info("checkpoints: %s", note)
    acc.wait_for_everyone()
    ckpt = checkpoint.resolve_resume(resume_spec, run_dir)
    latest = checkpoint.find_latest(run_dir)
    if ckpt is None and resume_spec in (None, "", "none", "no") and latest is not None:
        raise TrainingError(f"{run_dir} already holds checkpoints (latest {latest.name}): "
                            "pass --resume auto to continue it, or choose another run.out_dir")
    micro, accum = split_batch(cfg, acc.num_processes)
    if micro != cfg.data.batch_size:
        log.info("global batch %d on %d processes: %d per process as %d x %d (data.batch_size %d is the cap)",
                 cfg.optim.batch_size_global, acc.num_processes, micro * accum, accum, micro, cfg.data.batch_size)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=micro))
    try:  # ShardError is a ValueError; messages name the file
        manifest = open_manifest(cfg.data.shards)
        loader = build_loader(cfg.data, acc.process_index, acc.num_processes, infinite=True,
                              features=cfg.repa.weight > 0)
    except (ValueError, OSError) as err:
        raise TrainingError(f"data.shards={cfg.data.shards}: {err}") from err
    with refusal(""):
        latent_shape = check_latents_fit(cfg.model, manifest, f"{cfg.data.shards}/manifest.json")
    trainer = build_trainer(cfg, acc, iter(()), loader, latent_shape, manifest["vae"], manifest)
    if ckpt is not None:
        checkpoint.resume(trainer, ckpt)
        settle_flops(trainer, ckpt)
    trainer.batches = iter(loader)  # after load_state_dict, so iteration starts at the saved position
    return trainer, ckpt


def start_outputs(trainer: Trainer, ckpt: Path | None) -> None:
    """Rank 0 readies the run folder: stale checkpoint parts out, logs trimmed, config, trackers."""
    cfg, acc, run_dir = trainer.cfg, trainer.accelerator, Path(trainer.cfg.run.out_dir)
    if acc.is_main_process:
        checkpoint.remove_stale(run_dir)
        for name in ("metrics.jsonl", "fid.jsonl"):
            trim_log(run_dir / name, trainer.progress.step if ckpt is not None else 0)
        config_mod.save(cfg, run_dir / "config.yaml")
        if cfg.run.tensorboard:
            acc.init_trackers("tensorboard")
    n_params = sum(p.numel() for p in trainer.net.parameters())
    log.info("run %s | %s %s (%.1fM params) | latents %dx%dx%d | %d process(es) on %s | %s precision",
             cfg.run.out_dir, type(trainer.net).__name__, cfg.model.preset, n_params / 1e6, trainer.C, trainer.R,
             trainer.R, acc.num_processes, acc.device, acc.mixed_precision)
    log.info("batch: global %d = %d per process x %d processes x %d accumulation (x patch multiplier) | %s",
             cfg.optim.batch_size_global, cfg.data.batch_size, acc.num_processes, trainer.accum, trainer.schedule)
    if ckpt is not None:
        log.info("resumed from %s at %s patches", checkpoint.describe(ckpt), f"{trainer.progress.patches:,}")
    log.info("training to %s patches", f"{cfg.run.total_patches:,}")


def out_of_time(trainer: Trainer, start: float) -> bool:
    """Has this invocation used up ``run.max_train_seconds``? Ranks agree (max over ranks); a
    collective, so the loop asks only at its check points (about every NAN_CHECK_EVERY steps)."""
    budget = trainer.cfg.run.max_train_seconds
    if budget <= 0:
        return False
    flag = torch.tensor(float(time.perf_counter() - start >= budget), device=trainer.accelerator.device)
    return bool(trainer.accelerator.reduce(flag, reduction="sum") > 0)


def train(cfg: TrainConfig, resume_spec: str | None = None) -> checkpoint.Progress:
    """Run (or continue) training until ``run.total_patches`` patches; returns the final progress."""
    trainer, ckpt = prepare_run(cfg, resume_spec)
    previews, evaluator = Previewer(trainer), Evaluator(trainer)  # a bad eval.vae refuses the run here
    start_outputs(trainer, ckpt)
    run, p, start = cfg.run, trainer.progress, time.perf_counter()
    w = Window(first_step=p.step + 1)
    bar = TrainBar(run, p, enabled=run.progress and trainer.accelerator.is_main_process)
    console = contextlib.ExitStack()  # log lines print above the bar, not through it
    if not bar.bar.disable:
        console.enter_context(logging_redirect_tqdm(loggers=[log]))
    try:
        while not run_ended(run, p):
            before = p.patches
            plan = plan_step(trainer)
            w.add(plan, train_step(trainer, plan))
            bar.update(plan)
            # the host reads device values only at check points: log points and every NAN_CHECK_EVERY steps
            log_due = crossed(before, p.patches, run.log_every_patches)
            check_due = log_due or len(w.losses) % NAN_CHECK_EVERY == 0
            stop = check_due and out_of_time(trainer, start)
            last = run_ended(run, p) or stop
            if check_due and not (log_due or last):
                flush_losses(trainer.accelerator, w, p.patches)  # long intervals still stop a diverged run soon
            if log_due or last:
                short = last and not log_due  # the run's tail: rates over the whole run, not its last steps
                bar.loss = log_window(trainer, w, flush_losses(trainer.accelerator, w, p.patches),
                                      bar if short else None)["loss"]
                w = Window(first_step=p.step + 1)
            paused = time.perf_counter()
            if crossed(before, p.patches, run.ckpt_every_patches) or last:
                flush_losses(trainer.accelerator, w, p.patches)  # never save after a non-finite loss
                check_finite_weights(trainer.net, p.step, p.patches)  # same on every rank: all stop together
                log.info("checkpoint: %s", checkpoint.save_run(trainer))
            if crossed(before, p.patches, cfg.eval.preview_every_patches) and not previews.disabled:
                previews(trainer)
            if evaluator.enabled and (crossed(before, p.patches, cfg.eval.fid_every_patches) or last):
                evaluator(trainer)
            w.paused += time.perf_counter() - paused
            bar.paused += time.perf_counter() - paused
            if stop:
                log.info("run.max_train_seconds=%g used up: stopping here; --resume auto continues",
                         run.max_train_seconds)
                break
    finally:
        bar.close()
        console.close()
        trainer.accelerator.end_training()
    seconds = bar.train_seconds()
    log.info("training done: step %d, %s patches (%s full-image equivalents) in %s; this run trained %s patches in "
             "%.0f s (%.1f patches/s, %.1f full/s, checkpoints and evaluations excluded); checkpoints in %s",
             p.step, f"{p.patches:,}", f"{p.full_equiv:,.0f}", run.out_dir, f"{bar.patches:,}", seconds,
             bar.patches / max(seconds, 1e-9), bar.full_equiv / max(seconds, 1e-9), Path(run.out_dir) / checkpoint.CKPT_DIR)
    for handler in log.handlers:
        handler.flush()
    return p
