"""The training loop: patch-wise EDM training of a class-conditional denoiser on pre-encoded latents.

One optimizer step, the unit everything here counts:
  1. draw the step's patch side s from the schedule (one per step, per rank; see ``plan_step``),
  2. for each of the gradient-accumulation micro-batches pull ``m = R / s`` loader batches (so each
     patch comes from a different image), crop the posterior (mean, std) at random offsets, draw
     the latent z from it on the device, and take the EDM loss with label dropout,
  3. clip, step AdamW (fp32 master weights; bf16/fp16 autocast through accelerate), update the EMA.
Progress is counted in patches seen (``images``, the unit of ``run.total_images``, the EMA
half-life and the lr warm-up, as the authors count their 2500 Mimg) and in full-image
equivalents (patches x (s/R)^2), so any GPU count or batch size resumes at the same place.

Checkpoints hold everything a step depends on (weights, EMA, optimizer, scaler, every RNG, the
loader position), so a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import math
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch
import yaml

from latent_patch import checkpoint as ckpt_mod
from latent_patch import config as config_mod
from latent_patch import fsutil
from latent_patch.edm import EDMConfig, Precond, SamplerConfig, edm_loss, sample
from latent_patch.loader import DataConfig, LatentNorm, build_loader, draw_latent, latent_norm, open_manifest
from latent_patch.models import ModelConfig, build_model
from latent_patch.patches import PatchConfig, PatchSchedule, random_crops

log = logging.getLogger("latent_patch.train")


# --------------------------------------------------------------------------- configuration

@dataclass
class OptimConfig:
    """AdamW and the batch. ``batch_size_global`` counts loader samples per step over all processes
    (before the patch batch multiplier); accumulation = global / (data.batch_size x processes)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # (beta1, beta2)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_images: int = 0
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    batch_size_global: int = 256


@dataclass
class EMAConfig:
    """EDM-style EMA: per step decay 0.5 ** (patches this step / half-life), half-life in patches.

    With ``rampup_ratio`` the half-life is at most ``rampup_ratio x patches seen``, so early
    weights (random init) are forgotten quickly instead of dominating the average for millions
    of images.
    """

    half_life_images: float = 500_000.0
    rampup_ratio: float | None = 0.05


@dataclass
class RunConfig:
    """Where and how long to run; every interval is in patches seen (all processes)."""

    out_dir: str = "runs/default"
    total_images: int = 1_000_000
    max_train_seconds: float = 0.0  # wall-clock budget of this invocation (0: none); stops with a checkpoint
    log_every_images: int = 10_000
    ckpt_every_images: int = 500_000
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all
    seed: int = 0
    # YAML reads a bare `no` as false, so `run.mixed_precision=no` arrives as False: accepted as "no"
    mixed_precision: Literal["no", "bf16", "fp16"] | bool = "no"
    compile: bool = False
    grad_checkpointing: bool = False  # same as model.grad_checkpointing (either enables it)
    tensorboard: bool = True
    preview_every_images: int = 0  # 0 disables preview grids
    num_preview: int = 16
    preview_per_class: int = 4  # images per row; one class per row
    preview_steps: int = 12  # Heun steps of the preview sampler (quality is secondary)
    preview_vae: str | None = None  # VAE for previews; None -> the manifest's vae.id
    fid_every_images: int = 0  # FID/FD of the EMA weights at this interval (0 disables)
    fid_ref: str | None = None  # reference: stats npz, ADM reference npz, image folder or image tars
    fid_num_samples: int = 2000
    fid_features: Literal["inception", "demo"] = "inception"
    fid_steps: int = 18
    fid_cfg_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.mixed_precision is False:
            self.mixed_precision = "no"
        elif self.mixed_precision is True:
            raise config_mod.ConfigError("run.mixed_precision must be no, bf16 or fp16, got true")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: RunConfig = field(default_factory=RunConfig)


class TrainingError(RuntimeError):
    """A run cannot start or must stop (bad config vs data, non-finite loss, ...)."""


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step; the global batch must split evenly over processes."""
    per_step = cfg.data.batch_size * world_size
    if cfg.optim.batch_size_global % per_step:
        raise TrainingError(
            f"optim.batch_size_global={cfg.optim.batch_size_global} is not divisible by "
            f"data.batch_size={cfg.data.batch_size} x {world_size} processes = {per_step}"
        )
    return cfg.optim.batch_size_global // per_step


def derive_seed(seed: int, rank: int, stream: str) -> int:
    """An independent 63-bit seed per (run seed, rank, purpose): no two streams ever share draws."""
    digest = hashlib.sha256(f"{seed}/{rank}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def check_data_fits_model(manifest: dict, model: ModelConfig, source: str) -> tuple[int, int]:
    """(C, R) of the shards, after checking them against the model config (clear error otherwise)."""
    C, h, w = (int(v) for v in manifest["latent_shape"])
    if h != w:
        raise TrainingError(f"{source}: latents are {h}x{w}; training needs square latents")
    if (C, h) != (model.latent_channels, model.latent_size):
        raise TrainingError(
            f"{source}: shards hold latents of shape [{C}, {h}, {w}] but the model is configured for "
            f"model.latent_channels={model.latent_channels}, model.latent_size={model.latent_size}; "
            f"set model.latent_channels={C} model.latent_size={h} or use matching shards"
        )
    n = len(manifest.get("class_names") or [])
    if n and n != model.num_classes:
        raise TrainingError(
            f"{source}: shards have {n} classes but model.num_classes={model.num_classes}; "
            f"set model.num_classes={n}"
        )
    return C, h


# --------------------------------------------------------------------------- state of a run

@dataclass
class Progress:
    """Where a run is: optimizer steps, patches seen (all ranks), full-image equivalents."""

    step: int = 0
    images: int = 0
    full_equiv: float = 0.0


@dataclass
class StepPlan:
    """One optimizer step's shape: this rank's patch side and multiplier, and the global counts."""

    size: int
    mult: int
    patches: int  # all ranks, all micro-batches
    full_equiv: float
    sizes: list[int] = field(default_factory=list)  # every rank's side this step (for the logged mix)


@dataclass
class Trainer:
    """Everything ``train_step`` touches. Built by ``build_trainer``; the loop owns it."""

    cfg: TrainConfig
    accelerator: Any
    net: torch.nn.Module  # the raw network (its parameters are the optimizer's)
    precond: Precond  # Precond around the accelerate-prepared (DDP / compiled / autocast) network
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: Iterator
    loader: Any  # has state_dict()/load_state_dict(); None for synthetic data (benchmarks)
    schedule: PatchSchedule
    schedule_gens: list[torch.Generator]  # one per rank, the same on every rank (see plan_step)
    gen: torch.Generator  # this rank's generator for crops, noise, sigma, label dropout
    accum: int
    R: int
    C: int
    scaling_factor: float
    shift_factor: float
    manifest: dict | None = None
    norm: LatentNorm | None = None  # data.latent_norm=channel; None: the VAE's scaling only
    progress: Progress = field(default_factory=Progress)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes


def build_accelerator(cfg: TrainConfig, with_trackers: bool = True):
    """Accelerator for DDP over processes/nodes, autocast mixed precision, optional torch.compile."""
    from accelerate import Accelerator

    mp = cfg.run.mixed_precision
    if mp == "fp16" and not torch.cuda.is_available():
        raise TrainingError("run.mixed_precision=fp16 needs a CUDA GPU (loss scaling); on the CPU use bf16 or no")
    trackers = "tensorboard" if (with_trackers and cfg.run.tensorboard) else None
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # without it accelerate ignores a CPU torchrun's other processes
        mixed_precision=mp,
        log_with=trackers,
        project_dir=cfg.run.out_dir,
        dynamo_backend="inductor" if cfg.run.compile else "no",
    )


def build_trainer(
    cfg: TrainConfig,
    accelerator: Any,
    batches: Iterator,
    loader: Any,
    latent_shape: tuple[int, int],
    vae: dict,
    manifest: dict | None = None,
) -> Trainer:
    """Model, EMA, optimizer, schedule and generators for a (fresh) run; ``resume`` restores state."""
    rank, world = accelerator.process_index, accelerator.num_processes
    C, R = latent_shape
    if len(cfg.optim.betas) != 2:
        raise TrainingError(f"optim.betas must hold two numbers (beta1, beta2), got {cfg.optim.betas}")
    try:
        norm = latent_norm(cfg.data.latent_norm, manifest, cfg.edm.sigma_data, where=str(cfg.data.shards))
    except ValueError as err:
        raise TrainingError(str(err)) from err
    torch.manual_seed(derive_seed(cfg.run.seed, 0, "init"))  # same init on every rank
    try:
        net = build_model(cfg.model)
    except ValueError as err:  # unknown preset, override that does not apply, ...
        raise TrainingError(f"model: {err}") from err
    if cfg.run.grad_checkpointing and not cfg.model.grad_checkpointing:
        enable_grad_checkpointing(net)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(
        net.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay,
    )
    prepared, optimizer = accelerator.prepare(net, optimizer)
    ema.to(accelerator.device)
    try:
        schedule = PatchSchedule(cfg.patch, R, multiple_of=patch_multiple(net))
    except ValueError as err:  # a side that does not fit R or the model's patchify
        raise TrainingError(f"patch: {err}") from err
    schedule_gens = [torch.Generator().manual_seed(derive_seed(cfg.run.seed, r, "schedule")) for r in range(world)]
    gen = torch.Generator(accelerator.device).manual_seed(derive_seed(cfg.run.seed, rank, "step"))
    torch.manual_seed(derive_seed(cfg.run.seed, rank, "torch"))  # model dropout, per rank
    random.seed(derive_seed(cfg.run.seed, rank, "python"))
    np.random.seed(derive_seed(cfg.run.seed, rank, "numpy") % 2**32)
    return Trainer(
        cfg=cfg, accelerator=accelerator, net=net, precond=Precond(prepared, cfg.edm.sigma_data), ema=ema,
        optimizer=optimizer, batches=batches, loader=loader, schedule=schedule, schedule_gens=schedule_gens,
        gen=gen, accum=accumulation_steps(cfg, world), R=R, C=C,
        scaling_factor=float(vae["scaling_factor"]), shift_factor=float(vae.get("shift_factor") or 0.0),
        manifest=manifest, norm=norm,
    )


def patch_multiple(net: torch.nn.Module) -> int:
    """Patch sides the network accepts are multiples of this: DiT's patchify, the U-Net's total downsampling."""
    if hasattr(net, "patch_size"):
        return int(net.patch_size)
    levels = getattr(getattr(net, "config", None), "block_out_channels", None)
    return 2 ** (len(levels) - 1) if levels else 1


def enable_grad_checkpointing(net: torch.nn.Module) -> None:
    """Trade compute for memory; models expose it the diffusers way (or set_grad_checkpointing)."""
    if hasattr(net, "enable_gradient_checkpointing"):
        net.enable_gradient_checkpointing()
    elif hasattr(net, "set_grad_checkpointing"):
        net.set_grad_checkpointing(True)
    else:
        raise TrainingError(f"run.grad_checkpointing=true but {type(net).__name__} does not support it")


# --------------------------------------------------------------------------- one optimizer step

def plan_step(t: Trainer) -> StepPlan:
    """Draw this step's patch side for EVERY rank from its own per-rank generator.

    Every process holds all ranks' schedule generators, so each knows the global number of
    patches this step without communicating, and all agree on progress, logging and
    checkpoint boundaries. Ranks still draw independently (sides may differ across ranks).
    """
    progress = min(1.0, t.progress.images / max(t.cfg.run.total_images, 1))
    draws = [t.schedule.sample(g, progress) for g in t.schedule_gens]
    per_rank = t.cfg.data.batch_size * t.accum
    patches = sum(per_rank * m for _, m in draws)
    full_equiv = sum(per_rank * m * (s / t.R) ** 2 for s, m in draws)
    size, mult = draws[t.rank]
    return StepPlan(size=size, mult=mult, patches=patches, full_equiv=full_equiv, sizes=[s for s, _ in draws])


def lr_at(cfg: OptimConfig, images: int) -> float:
    """Linear warm-up over ``warmup_images`` patches, then constant (the authors' schedule)."""
    if cfg.warmup_images <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, images / cfg.warmup_images)


def ema_beta(cfg: EMAConfig, step_images: int, images_after: int) -> float:
    """Per-step EMA decay from a half-life in patches (EDM), with the optional ramp-up cap."""
    half_life = cfg.half_life_images
    if cfg.rampup_ratio is not None:
        half_life = min(half_life, images_after * cfg.rampup_ratio)
    return 0.5 ** (step_images / max(half_life, 1e-8))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """ema <- beta * ema + (1 - beta) * net, one fused op over all parameters; buffers copied."""
    e_params = [p for p in ema.parameters()]
    n_params = [p.detach() for p in net.parameters()]
    torch._foreach_lerp_(e_params, n_params, 1.0 - beta)
    for eb, nb in zip(ema.buffers(), net.buffers()):
        eb.copy_(nb)


def next_batch(t: Trainer, mult: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mult`` loader batches concatenated (each patch from a different image), on the device."""
    dev = t.accelerator.device
    # copy each (pinned) loader batch as it is, and concatenate on the device: a CPU-side cat
    # would make a pageable tensor, whose host-to-device copy cannot overlap with compute
    parts = [[x.to(dev, non_blocking=True) for x in unpack_batch(next(t.batches))] for _ in range(mult)]
    mean, std, labels = (torch.cat([p[i] for p in parts]) if mult > 1 else parts[0][i] for i in range(3))
    return mean, std, labels


def unpack_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, std, labels) from a loader batch given as a tuple/list or a mapping."""
    if isinstance(batch, dict):
        return batch["mean"], batch["std"], batch["labels"] if "labels" in batch else batch["label"]
    mean, std, labels = batch[:3]
    return mean, std, labels


def micro_batch_loss(t: Trainer, size: int, mult: int) -> torch.Tensor:
    """Per-patch EDM losses (B * mult,) of one micro-batch.

    The posterior (mean, std) is cropped BEFORE drawing z: cropping and sampling commute (the
    noise is independent per cell), and drawing only the cropped cells makes the randn cost
    proportional to the patch area instead of the full latent's.
    """
    mean, std, labels = next_batch(t, mult)
    posterior = torch.cat([mean, std], dim=1).float()
    crops, coords = random_crops(posterior, size, generator=t.gen)
    z = draw_latent(crops[:, : t.C], crops[:, t.C :], t.scaling_factor, t.shift_factor, generator=t.gen)
    z = t.norm.apply(z) if t.norm is not None else z
    return edm_loss(
        t.precond, z, coords, labels, generator=t.gen, num_classes=t.cfg.model.num_classes,
        label_dropout=t.cfg.edm.label_dropout, P_mean=t.cfg.edm.P_mean, P_std=t.cfg.edm.P_std,
    )


def train_step(t: Trainer, plan: StepPlan) -> torch.Tensor:
    """One optimizer step as planned; returns the mean loss of this rank's patches (on the device).

    No host synchronisation happens here (the loss stays a device tensor), so the GPU queue is
    never drained by logging; the loop checks finiteness in batches (see ``flush_losses``).
    """
    acc, opt = t.accelerator, t.optimizer
    for group in opt.param_groups:
        group["lr"] = lr_at(t.cfg.optim, t.progress.images)
    total = torch.zeros((), device=acc.device)
    for i in range(t.accum):
        sync = i == t.accum - 1
        with contextlib.nullcontext() if sync else acc.no_sync(t.precond.net):
            loss = micro_batch_loss(t, plan.size, plan.mult).mean() / t.accum
            acc.backward(loss)
        total += loss.detach()
    if t.cfg.optim.grad_clip > 0:
        acc.clip_grad_norm_(t.net.parameters(), t.cfg.optim.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    p = t.progress
    p.step += 1
    p.images += plan.patches
    p.full_equiv += plan.full_equiv
    update_ema(t.ema, t.net, ema_beta(t.cfg.ema, plan.patches, p.images))
    return total


# --------------------------------------------------------------------------- checkpoints

def rng_state(t: Trainer) -> dict[str, Any]:
    """This rank's random streams and loader position (everything a resumed step depends on)."""
    state: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "step_gen": t.gen.get_state(),
        "python": random.getstate(),
        "numpy": numpy_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    if t.loader is not None and hasattr(t.loader, "state_dict"):
        state["loader"] = t.loader.state_dict()
    return state


def numpy_state() -> dict[str, Any]:
    """numpy's global RNG state as tensors and ints (weights_only torch.load cannot read ndarrays)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached": float(cached)}


def set_numpy_state(s: dict[str, Any]) -> None:
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def set_rng_state(t: Trainer, state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch_cpu"])
    t.gen.set_state(state["step_gen"])
    random.setstate(state["python"])
    set_numpy_state(state["numpy"])
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    if "loader" in state and t.loader is not None and hasattr(t.loader, "load_state_dict"):
        t.loader.load_state_dict(state["loader"])


def check_finite_weights(t: Trainer) -> None:
    """Refuse to save weights that a finite loss already blew up (the loss lags the update by a step)."""
    finite = torch.stack([p.detach().isfinite().all() for p in t.net.parameters()]).all()
    if not bool(finite):
        raise TrainingError(
            f"non-finite weights after step {t.progress.step} ({t.progress.images:,} patches seen); stopping "
            "without saving. The last complete checkpoint is intact: lower optim.lr or raise optim.warmup_images, "
            "then --resume auto"
        )


def save_checkpoint(t: Trainer) -> Path:
    """Write ``step-...`` atomically: rank 0 writes weights/state, every other rank its RNG file."""
    acc, run_dir, step = t.accelerator, Path(t.cfg.run.out_dir), t.progress.step
    check_finite_weights(t)  # same parameters on every rank, so every rank stops together
    tmp = run_dir / ckpt_mod.CKPT_DIR / f".tmp-{ckpt_mod.ckpt_name(step)}"
    if acc.is_main_process:
        ckpt_mod.begin(run_dir, step)
    acc.wait_for_everyone()
    if not acc.is_main_process:
        ckpt_mod.save_state(tmp / ckpt_mod.rank_file(t.rank), rng_state(t))
    acc.wait_for_everyone()
    final = tmp.with_name(ckpt_mod.ckpt_name(step))
    if acc.is_main_process:
        meta = {"step": str(step), "images": str(t.progress.images),
                "model": ckpt_mod.dumps_meta(config_mod.to_dict(t.cfg.model))}
        ckpt_mod.save_weights(tmp / ckpt_mod.MODEL_FILE, t.net.state_dict(), meta)
        ckpt_mod.save_weights(tmp / ckpt_mod.EMA_FILE, t.ema.state_dict(), meta)
        ckpt_mod.save_state(tmp / ckpt_mod.STATE_FILE, {
            "step": step, "images": t.progress.images, "full_equiv": t.progress.full_equiv,
            "world_size": t.world_size, "optimizer": t.optimizer.state_dict(),
            "scaler": t.accelerator.scaler.state_dict() if t.accelerator.scaler is not None else None,
            "schedule_gens": [g.get_state() for g in t.schedule_gens],
            "rank_state": rng_state(t),
        })
        ckpt_mod.write_text(tmp / ckpt_mod.CONFIG_FILE, yaml.safe_dump(config_mod.to_dict(t.cfg), sort_keys=False))
        if t.manifest is not None:
            ckpt_mod.write_text(tmp / ckpt_mod.MANIFEST_FILE, json.dumps(t.manifest, indent=1, sort_keys=True))
        final = ckpt_mod.finish(tmp, t.cfg.run.keep_last)
    acc.wait_for_everyone()
    return final


RUNTIME_MODEL_KEYS = ("grad_checkpointing", "dropout")  # may change on resume: the weights still fit


def check_same_model(ckpt: Path, cfg: TrainConfig) -> None:
    """Refuse to resume weights of another architecture, naming the keys that differ."""
    saved = config_mod.read_yaml(ckpt / ckpt_mod.CONFIG_FILE).get("model", {})
    now = config_mod.to_dict(cfg.model)
    keys = (set(saved) | set(now)) - set(RUNTIME_MODEL_KEYS)
    diff = {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}
    if diff:
        pretty = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ckpt_mod.CheckpointError(f"{ckpt}: saved with another model config ({pretty})")


def resume(t: Trainer, ckpt: Path) -> None:
    """Restore weights, EMA, optimizer, scaler, counters and every RNG / loader position from ``ckpt``."""
    ckpt_mod.verify(ckpt)
    check_same_model(ckpt, t.cfg)
    state = ckpt_mod.load_state(ckpt / ckpt_mod.STATE_FILE)
    ckpt_mod.load_into(t.net, ckpt_mod.load_weights(ckpt, ckpt_mod.MODEL_FILE), ckpt / ckpt_mod.MODEL_FILE)
    ckpt_mod.load_into(t.ema, ckpt_mod.load_weights(ckpt, ckpt_mod.EMA_FILE), ckpt / ckpt_mod.EMA_FILE)
    t.optimizer.load_state_dict(state["optimizer"])
    if t.accelerator.scaler is not None and state.get("scaler"):
        t.accelerator.scaler.load_state_dict(state["scaler"])
    t.progress = Progress(step=int(state["step"]), images=int(state["images"]), full_equiv=float(state["full_equiv"]))
    if int(state["world_size"]) != t.world_size:
        log.warning("checkpoint was written by %d processes, this run has %d: progress and weights resume, "
                    "but data order and random streams restart (seeded from the step), so the continuation "
                    "is not bit-identical", state["world_size"], t.world_size)
        reseed(t)
        return
    for g, s in zip(t.schedule_gens, state["schedule_gens"]):
        g.set_state(s)
    own = state["rank_state"] if t.rank == 0 else ckpt_mod.load_state(ckpt / ckpt_mod.rank_file(t.rank))
    set_rng_state(t, own)


def reseed(t: Trainer) -> None:
    """Fresh, step-dependent streams for a resume with another process count (exactness impossible)."""
    s = t.cfg.run.seed
    for r, g in enumerate(t.schedule_gens):
        g.manual_seed(derive_seed(s, r, f"schedule@{t.progress.step}"))
    t.gen.manual_seed(derive_seed(s, t.rank, f"step@{t.progress.step}"))
    torch.manual_seed(derive_seed(s, t.rank, f"torch@{t.progress.step}"))


# --------------------------------------------------------------------------- logging and previews

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
    sizes: dict[int, int] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    paused: float = 0.0  # seconds spent in checkpoints / previews, excluded from throughput

    def add(self, plan: StepPlan, loss: torch.Tensor) -> None:
        self.losses.append(loss)
        self.patches += plan.patches
        self.full_equiv += plan.full_equiv
        for s in plan.sizes:
            self.sizes[s] = self.sizes.get(s, 0) + 1


def flush_losses(t: Trainer, w: Window) -> torch.Tensor:
    """Mean over ranks of each step's loss, on the host; a non-finite one stops the run, naming its step.

    This is the only place losses reach the host, and it runs before every log line and every
    checkpoint, so a checkpoint is never written after a NaN/inf loss.
    """
    if not w.losses:
        return torch.zeros(0)
    hist = t.accelerator.reduce(torch.stack(w.losses), reduction="mean").float().cpu()
    bad = (~torch.isfinite(hist)).nonzero()
    if len(bad):
        step = w.first_step + int(bad[0])
        raise TrainingError(
            f"non-finite loss ({hist[int(bad[0])].item()}) at step {step} (about {t.progress.images:,} patches "
            f"seen at the check); stopping without saving. The last complete checkpoint is intact: "
            f"lower optim.lr or raise optim.warmup_images, then --resume auto"
        )
    return hist


def log_window(t: Trainer, w: Window, hist: torch.Tensor) -> dict[str, Any]:
    """One console line, one metrics.jsonl record and the tensorboard scalars of this interval."""
    elapsed = max(time.perf_counter() - w.start - w.paused, 1e-9)
    p = t.progress
    n = max(sum(w.sizes.values()), 1)
    rec = {
        "step": p.step, "images": p.images, "full_equiv": round(p.full_equiv, 3),
        "loss": float(hist.mean()) if len(hist) else float("nan"),
        "patches_per_s": w.patches / elapsed, "full_equiv_per_s": w.full_equiv / elapsed,
        "lr": t.optimizer.param_groups[0]["lr"], "peak_mem_gib": peak_memory_gib(t.accelerator.device),
        "size_mix": {str(s): c / n for s, c in sorted(w.sizes.items())}, "time": time.time(),
    }
    if t.accelerator.is_main_process:
        mix = " ".join(f"{s}:{100 * f:.0f}%" for s, f in rec["size_mix"].items())
        log.info(
            "step %d | %s patches (%s full) | loss %.4f | %.0f patches/s %.0f full/s | lr %.2e | mem %.2f GiB | sizes %s",
            p.step, _human(p.images), _human(p.full_equiv), rec["loss"], rec["patches_per_s"],
            rec["full_equiv_per_s"], rec["lr"], rec["peak_mem_gib"], mix,
        )
        with open(Path(t.cfg.run.out_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    scalars = {k: rec[k] for k in ("loss", "patches_per_s", "full_equiv_per_s", "lr", "peak_mem_gib", "full_equiv")}
    if t.cfg.run.tensorboard:
        t.accelerator.log({f"train/{k}": v for k, v in scalars.items()}, step=p.step)
    return rec


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


class Previewer:
    """Samples a few full latents with the EMA model and saves them, VAE-decoded, as a PNG grid."""

    def __init__(self, t: Trainer) -> None:
        """Load the VAE before the first step, so a wrong one fails now and not at the first preview.

        The manifest's VAE being unavailable (offline hub id) only skips previews, with a log
        line; a VAE the user named in ``run.preview_vae`` must load and fit the latents.
        """
        from latent_patch.codec import VAECodec

        self.codec = None
        self.disabled = t.cfg.run.preview_every_images <= 0 or not t.accelerator.is_main_process
        if self.disabled:
            return
        explicit = t.cfg.run.preview_vae
        spec = explicit or ((t.manifest or {}).get("vae") or {}).get("id")
        try:
            self.codec = VAECodec.load(spec, device=t.accelerator.device)
        except Exception as err:  # offline hub id, missing folder
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if explicit:
                raise TrainingError(f"run.preview_vae={explicit}: cannot load it ({reason})") from err
            log.info("previews skipped: VAE %r is not available (%s); set run.preview_vae=DIR", spec, reason)
            self.disabled = True
            return
        if self.codec.latent_channels != t.C:
            raise TrainingError(f"preview VAE {spec} has {self.codec.latent_channels} latent channels but the "
                                f"shards' latents have {t.C}: set run.preview_vae to the VAE that encoded them")

    def __call__(self, t: Trainer) -> Path | None:
        """Write RUN/previews/step-XXXXXXXXX.png; does not touch any training RNG."""
        from latent_patch.sampling import make_decoder

        if self.disabled:
            return None
        cfg, dev = t.cfg.run, t.accelerator.device
        per_row = max(1, cfg.preview_per_class)
        rows = max(1, math.ceil(cfg.num_preview / per_row))
        classes = torch.linspace(0, t.cfg.model.num_classes - 1, rows).round().long()
        labels = classes.repeat_interleave(per_row).to(dev)
        gen = torch.Generator(dev).manual_seed(derive_seed(cfg.seed, 0, "preview"))  # same noise each time
        noise = torch.randn((len(labels), t.C, t.R, t.R), generator=gen, device=dev)
        devices = [dev] if dev.type == "cuda" else []
        # inference_mode (not no_grad): codec.decode clamps its inference-mode output in place
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            z = sample(Precond(t.ema, t.cfg.edm.sigma_data), noise, labels, SamplerConfig(steps=cfg.preview_steps),
                       null_class=t.cfg.model.num_classes, generator=gen)
            images = make_decoder(self.codec, t.scaling_factor, t.shift_factor, norm=t.norm)(z)
        path = Path(cfg.out_dir) / "previews" / f"{ckpt_mod.ckpt_name(t.progress.step)}.png"
        save_grid(images, per_row, path)
        log.info("preview: %s (classes %s)", path, classes.tolist())
        return path


class Evaluator:
    """FID (FD with the demo features) of the EMA weights every ``run.fid_every_images`` patches.

    Uses the sampling job's own code (``sampling.evaluate_model``: same per-index noise and
    labels as ``sample.py``), split over all ranks, inside a forked RNG so training continues
    exactly as without it. Results go to RUN/fid.jsonl, the log and tensorboard.
    """

    def __init__(self, t: Trainer) -> None:
        run = t.cfg.run
        self.enabled = run.fid_every_images > 0
        if self.enabled and not run.fid_ref:
            raise TrainingError("run.fid_every_images is set but run.fid_ref is not: name a stats npz or an image folder")
        self.codec = None

    def __call__(self, t: Trainer) -> dict:
        from latent_patch.codec import VAECodec
        from latent_patch.sampling import evaluate_model

        run, dev = t.cfg.run, t.accelerator.device
        if self.codec is None:
            self.codec = VAECodec.load(run.preview_vae or (t.manifest or {})["vae"]["id"], device=dev)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            metrics = evaluate_model(
                t.ema, t.cfg, run.fid_num_samples, run.fid_ref, features=run.fid_features, codec=self.codec,
                manifest=t.manifest, sampler=SamplerConfig(steps=run.fid_steps, cfg_scale=run.fid_cfg_scale),
                distributed=t.world_size > 1)
        record = {"step": t.progress.step, "images": t.progress.images, **metrics}
        if t.accelerator.is_main_process:
            name = "fid" if "fid" in metrics else "fd"
            log.info("%s %.3f on %d samples at %s patches", name.upper(), metrics[name], run.fid_num_samples,
                     f"{t.progress.images:,}")
            with open(Path(run.out_dir) / "fid.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if run.tensorboard:
                t.accelerator.log({f"eval/{name}": metrics[name]}, step=t.progress.step)
        return record


def save_grid(images: torch.Tensor, per_row: int, path: Path) -> None:
    """uint8 NHWC images -> one PNG, ``per_row`` images per row, written atomically."""
    import io

    from PIL import Image

    n, h, w, c = images.shape
    rows = math.ceil(n / per_row)
    grid = torch.zeros((rows * h, per_row * w, c), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, per_row)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = images[i]
    arr = grid.numpy()
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(buf, format="PNG")
    fsutil.atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------- the run

def setup_logging(out_dir: Path | None, is_main: bool) -> None:
    """Readable lines on the console (rank 0) and in RUN/log.txt; other ranks only warn.

    Only this module's logger is configured (other modules keep the root logger's setup), and
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


NAN_CHECK_EVERY = 50  # steps between finiteness checks when no log line is due (one host sync each)


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


def open_data(cfg: TrainConfig, rank: int, world_size: int) -> tuple[dict, Any]:
    """The shards' manifest and this rank's loader; a bad manifest or shard stops the run, naming it."""
    try:
        return open_manifest(cfg.data.shards), build_loader(cfg.data, rank, world_size, infinite=True)
    except (ValueError, OSError) as err:  # ShardError is a ValueError; messages name the file
        raise TrainingError(f"data.shards={cfg.data.shards}: {err}") from err


def prepare_run(cfg: TrainConfig, resume_spec: str | None) -> tuple[Trainer, Path | None, Previewer]:
    """Accelerator, data, model, (optionally) the restored state and the previewer; no training yet.

    Everything that can refuse the run (config vs data, checkpoint damage, preview VAE) runs
    before the run folder gets any new file."""
    acc = build_accelerator(cfg)
    run_dir = Path(cfg.run.out_dir)
    setup_logging(run_dir, acc.is_main_process)
    if acc.is_main_process:
        for note in ckpt_mod.recover(run_dir):
            log.info("checkpoints: %s", note)
    acc.wait_for_everyone()
    ckpt = ckpt_mod.resolve_resume(resume_spec, run_dir)
    if ckpt is None and resume_spec in (None, "", "none", "no") and ckpt_mod.find_latest(run_dir) is not None:
        raise TrainingError(f"{run_dir} already holds checkpoints (latest {ckpt_mod.find_latest(run_dir).name}): "
                            "pass --resume auto to continue it, or choose another run.out_dir")
    manifest, loader = open_data(cfg, acc.process_index, acc.num_processes)
    C, R = check_data_fits_model(manifest, cfg.model, f"{cfg.data.shards}/manifest.json")
    t = build_trainer(cfg, acc, iter(()), loader, (C, R), manifest["vae"], manifest)
    if ckpt is not None:
        resume(t, ckpt)
    t.batches = iter(loader)  # after load_state_dict, so iteration starts at the saved position
    previews = Previewer(t)
    if acc.is_main_process:
        ckpt_mod.remove_stale(run_dir)
        for name in ("metrics.jsonl", "fid.jsonl"):
            trim_log(run_dir / name, t.progress.step if ckpt is not None else 0)
        config_mod.save(cfg, run_dir / "config.yaml")
        if cfg.run.tensorboard:
            acc.init_trackers("tensorboard")
    return t, ckpt, previews


def describe_run(t: Trainer, ckpt: Path | None) -> None:
    cfg, acc = t.cfg, t.accelerator
    n_params = sum(p.numel() for p in t.net.parameters())
    log.info("run %s | %s %s (%.1fM params) | latents %dx%dx%d | %d process(es) on %s | %s precision",
             cfg.run.out_dir, type(t.net).__name__, cfg.model.preset, n_params / 1e6, t.C, t.R, t.R,
             acc.num_processes, acc.device, cfg.run.mixed_precision)
    log.info("batch: global %d = %d per process x %d processes x %d accumulation (x patch multiplier) | %s",
             cfg.optim.batch_size_global, cfg.data.batch_size, acc.num_processes, t.accum, t.schedule)
    if ckpt is not None:
        log.info("resumed from %s at %s patches", ckpt_mod.describe(ckpt), f"{t.progress.images:,}")
    log.info("training to %s patches", f"{cfg.run.total_images:,}")


def out_of_time(t: Trainer, start: float) -> bool:
    """Has this invocation used up ``run.max_train_seconds``? Ranks agree (max over ranks)."""
    budget = t.cfg.run.max_train_seconds
    if budget <= 0:
        return False
    flag = torch.tensor(float(time.perf_counter() - start >= budget), device=t.accelerator.device)
    return bool(t.accelerator.reduce(flag, reduction="sum") > 0)


def train(cfg: TrainConfig, resume_spec: str | None = None) -> Progress:
    """Run (or continue) training until ``run.total_images`` patches; returns the final progress."""
    t, ckpt, previews = prepare_run(cfg, resume_spec)
    evaluator = Evaluator(t)
    describe_run(t, ckpt)
    run, start = cfg.run, time.perf_counter()
    w = Window(first_step=t.progress.step + 1)
    try:
        while t.progress.images < run.total_images:
            before = t.progress.images
            plan = plan_step(t)
            w.add(plan, train_step(t, plan))
            after = t.progress.images
            stop = out_of_time(t, start)
            last = after >= run.total_images or stop
            if len(w.losses) % NAN_CHECK_EVERY == 0:
                flush_losses(t, w)  # long log intervals still stop a diverged run within a few steps
            if crossed(before, after, run.log_every_images) or last:
                log_window(t, w, flush_losses(t, w))
                w = Window(first_step=t.progress.step + 1)
            paused = time.perf_counter()
            if crossed(before, after, run.ckpt_every_images) or last:
                flush_losses(t, w)  # never save after a non-finite loss
                log.info("checkpoint: %s", save_checkpoint(t))
            if crossed(before, after, run.preview_every_images) and not previews.disabled:
                previews(t)
            if evaluator.enabled and (crossed(before, after, run.fid_every_images) or last):
                evaluator(t)
            w.paused += time.perf_counter() - paused
            if stop:
                log.info("run.max_train_seconds=%g used up: stopping here; --resume auto continues", run.max_train_seconds)
                break
    finally:
        t.accelerator.end_training()
    log.info("done: %d steps, %s patches, %s full-image equivalents", t.progress.step,
             f"{t.progress.images:,}", f"{t.progress.full_equiv:,.0f}")
    for handler in log.handlers:
        handler.flush()
    return t.progress


def main(argv: list[str] | None = None) -> int:
    """CLI: ``train_latent.py --config CONFIG [--resume auto|PATH] [key=value ...]``."""
    parser = argparse.ArgumentParser(
        description="Train a Patch Diffusion denoiser on pre-encoded latents (works under torchrun / accelerate launch).")
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", default=None,
                        help="'auto' = latest complete checkpoint of run.out_dir (fresh start if none); "
                             "or a checkpoint / run folder")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=2e-4 run.out_dir=runs/x")
    args = parser.parse_args(argv)
    try:
        cfg = config_mod.load(TrainConfig, args.config, args.overrides)
    except config_mod.ConfigError as err:
        parser.error(str(err))
    setup_logging(None, True)  # console now; prepare_run adds RUN/log.txt
    try:
        train(cfg, args.resume)
    except (TrainingError, ckpt_mod.CheckpointError, ValueError, FileNotFoundError) as err:
        # ValueError covers ShardError, ConfigError and malformed files (read_json names them)
        log.error("%s", err)  # a refusal with its reason, not a traceback
        return 1
    finally:
        close_logging()
    return 0
