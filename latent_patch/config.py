"""Every typed config of the project (dataclasses), filled from YAML files and ``key=value``
command-line overrides by one loader (``configfile.py``, re-exported here: ``config.load``).

One loader serves every job (training, sampling, the demo), so a typo in a week-long run's
config fails in the first second with the offending key named, instead of being ignored. Keys
that were renamed are refused with their new name; configs saved in older checkpoints are
migrated when read (:func:`load_saved`). The sections of a training config, in data-flow order:
``data`` (shards and loader), ``model``, ``patch`` (schedule), ``edm`` (loss), ``optim``, ``ema``,
``run`` (where, how long, precision, logging, checkpoints) and ``eval`` (previews and FID while
training). Every count of progress is in PATCHES seen (a patch of any side is one sample).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from .codec import DEFAULT_VAE
from .configfile import (  # noqa: F401  (the loader's API, used as config.load, config.ConfigError, ...)
    ConfigError, from_dict, load, load_saved, merge_override, migrate, parse_override, read_yaml, refuse_renamed,
    save, to_dict,
)
from .images import DEFAULT_MAX_PIXELS

# =========================================================================== the configs


@dataclass
class EncodeConfig:
    """Everything one encoding run needs; the CLI flags of encode_latents.py map onto it."""

    source: str
    out: str = "shards"
    vae: str = DEFAULT_VAE
    resolution: int = 256
    flips: str = "none"  # "none" | "both"
    shard_size: int = 5000  # samples per shard (images per shard halve with flips)
    num_jobs: int = 1
    job_index: int = 0
    batch_size: int = 64  # images per VAE call (original + flipped copies count separately)
    labels: str | None = None
    workers: int | None = None  # decoding processes; None = chosen from the cores and device
    threads: int | None = None  # torch intra-op threads of the main process (CPU encoding)
    dtype: str | None = None  # fp16 / bf16 / fp32 on the GPU; the CPU always uses fp32
    device: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True
    repr: str | None = None  # encoder (timm id, folder, "demo") of the grids stored beside latents (encode_repr.py)
    repr_size: int | None = None  # its input px; None: a folder's own, REPA's 224 per 256 px for a hub id
    repr_dims: int | None = None  # K of a seeded PCA fitted once per output folder; None: the encoder's D
    repr_pca_images: int = 2000  # images whose tokens the PCA's sample is drawn from
    repr_pca_tokens: int = 65536  # tokens the PCA is fitted on
    repr_pca_seed: int = 0

    def inputs_per_shard(self) -> int:
        k = self.shard_size // (2 if self.flips == "both" else 1)
        if k < 1:
            raise ValueError(f"--shard-size {self.shard_size} is too small for --flips both (min 2)")
        return k

    def validate(self) -> None:
        if self.flips not in ("none", "both"):
            raise ValueError(f"--flips {self.flips!r}: choose none or both")
        if not 0 <= self.job_index < self.num_jobs:
            raise ValueError(f"--job-index {self.job_index} not in [0, --num-jobs {self.num_jobs})")
        for name in ("resolution", "shard_size", "batch_size", "num_jobs", "max_pixels", "repr_size", "repr_dims",
                     "repr_pca_images", "repr_pca_tokens"):
            if (value := getattr(self, name)) is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.repr is None and (self.repr_size or self.repr_dims):
            raise ValueError("--repr-size / --repr-dims need --repr ENCODER")
        self.inputs_per_shard()


@dataclass
class DataConfig:
    """The ``data:`` section: which shards, and how the loader reads them.

    ``shards``: a manifest.json or its folder. ``urls`` (optional): the user's own shard URLs
    (brace patterns and ``pipe:`` allowed) in place of the manifest's files; the manifest still
    supplies shape, classes and VAE. ``cache`` (in-memory mode only): None keeps the array in RAM
    (one copy per process); "auto" memory-maps ``<shard folder>/latents-cache.npy`` (one page-cache
    copy per node); any other string is the cache path. ``batch_size`` is per process;
    ``num_workers`` must be equal on every rank.
    """

    shards: str = "shards"
    batch_size: int = 256
    in_memory: bool = False
    cache: str | None = None
    # streaming: samples held for shuffling by the whole run, split evenly over the stream_slots
    # streams (each shuffles through shuffle_buffer // stream_slots); a reader holds only its share
    shuffle_buffer: int = 16384
    # streaming: how many fixed sample streams a pass is cut into (ranks x workers deal them out).
    # Fixed for a run (it decides the sample order); ranks x num_workers may not exceed it, and any
    # layout up to it resumes exactly (stream.StreamLoader)
    stream_slots: int = 256
    num_workers: int = 2
    seed: int = 0
    verify: bool = False
    urls: list[str] = field(default_factory=list)
    # "scale": the VAE's factors only (LDM/DiT); "channel": also standardise each channel to std
    # edm.sigma_data with the manifest's latent_stats (EDM2). Sampling undoes what the run used.
    latent_norm: str = "scale"


@dataclass
class ModelConfig:
    """Which network to build (``models.build_model``).

    preset: a name in ``models.PRESETS`` ("DiT-XL/2", "DiT-B/2", "DiT-T/2", "adm-imagenet256", ...).
    arch: None takes it from the preset; when set it must agree with the preset.
    latent_channels: C of the latent (the net gets C + 2 inputs, the coordinates, and gives C outputs).
    latent_size: side R of the FULL latent (fixes DiT's position scale and the U-Net's attention levels).
    dropout: None keeps the preset's value.
    Overrides (None keeps the preset's value); DiT: hidden, depth, heads, patch, mlp_ratio,
    route_ratio, route_start, route_end, pos, mlp, norm, qk_norm, coord_channels; U-Net: channels, channel_mult, num_blocks,
    attn_resolutions, head_channels.
    """

    preset: str = "DiT-B/2"
    arch: Literal["dit", "unet"] | None = None
    latent_channels: int = 4
    latent_size: int = 32
    num_classes: int = 1000
    dropout: float | None = None
    grad_checkpointing: bool = False
    hidden: int | None = None
    depth: int | None = None
    heads: int | None = None
    patch: int | None = None
    mlp_ratio: float | None = None
    channels: int | None = None
    channel_mult: list[int] | None = None
    num_blocks: int | None = None
    attn_resolutions: list[int] | None = None
    head_channels: int | None = None
    # DiT token routing (TREAD), training only: route_ratio of each sample's tokens skip blocks
    # route_start..route_end (0-based, inclusive) and rejoin unchanged; None / 0: off
    route_ratio: float | None = None
    route_start: int | None = None
    route_end: int | None = None
    # DiT block (issue 29; None keeps the preset's: the 2022 block, or the 2025 one for DiT-*-2025):
    # pos "sincos" | "rope" (2-D axial rotary positions of each token's absolute latent cell),
    # mlp "gelu" | "swiglu", norm "layer" | "rms", qk_norm, coord_channels (false: the coordinates
    # only set the positions and do not enter the patch embedding)
    pos: Literal["sincos", "rope"] | None = None
    mlp: Literal["gelu", "swiglu"] | None = None
    norm: Literal["layer", "rms"] | None = None
    qk_norm: bool | None = None
    coord_channels: bool | None = None


@dataclass
class PatchConfig:
    """The patch-size schedule of a training run (``patches.PatchSchedule``).

    sizes: patch sides. A value in (0, 1] is a fraction of the latent side R (so ``1`` / ``1.0``
        is always the full latent, never a one-cell patch); a value > 1 is an absolute side in cells.
    probs: probability of each size (same order as ``sizes``), summing to 1. The default is the
        authors' latent-space ImageNet-256 schedule: {R/2: 0.5, R: 0.5}.
    batch_multiplier: ``"auto"`` draws ``R / s`` patches per batch slot at side s (the paper's rule,
        which needs s to divide R), or an explicit list of integers, one per size.
    progressive: small patches first. The probability of the LARGEST size ramps linearly from 0 at
        the start of training to its target at ``progressive_fraction`` of training; the mass it
        does not take goes to the smaller sizes in proportion to their target probabilities.
        After that point the schedule is the stationary one.
    progressive_fraction: fraction of training (0..1] over which the ramp runs.
    """

    sizes: list[float] = field(default_factory=lambda: [0.5, 1.0])
    probs: list[float] = field(default_factory=lambda: [0.5, 0.5])
    batch_multiplier: str | list[int] = "auto"
    progressive: bool = False
    progressive_fraction: float = 0.5


@dataclass
class EDMConfig:
    """EDM training constants: log-normal sigma distribution, data std, label dropout for guidance."""

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    label_dropout: float = 0.1


@dataclass
class RepaConfig:
    """Representation alignment (REPA; ``latent_patch/align.py``) to features stored in the shards.

    weight: the alignment loss's factor (REPA: 0.5); 0 is off, and training is bit-identical to a
      run without this section.
    block: the DiT's tokens after this many blocks are aligned (1-based; REPA: 8 of SiT-XL's 28).
    proj_hidden: width of the projector MLP hidden -> proj_hidden -> proj_hidden -> K (REPA: 2048).
    """

    weight: float = 0.0
    block: int = 8
    proj_hidden: int = 2048


@dataclass
class SamplerConfig:
    """EDM stochastic sampler (Algorithm 2) and classifier-free guidance settings.

    The defaults are EDM's deterministic 18-step Heun sampler (35 network evaluations) without
    guidance; ``edm.AUTHORS_IMAGENET256`` holds the settings of the authors' latent run.
    cfg_interval: optional [sigma_lo, sigma_hi]; guidance applies only where
    sigma_lo <= sigma <= sigma_hi (Kynkaanniemi et al. 2024) and is plain conditional elsewhere.
    """

    steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = float("inf")
    S_noise: float = 1.0
    method: Literal["heun", "euler"] = "heun"
    cfg_scale: float = 1.0
    cfg_interval: list[float] | None = None


@dataclass
class OptimConfig:
    """AdamW and the batch. ``batch_size_global`` counts loader samples per step over all processes
    (before the patch batch multiplier); accumulation = global / (data.batch_size x processes)."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # (beta1, beta2)
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_patches: int = 0  # linear lr warm-up over this many patches seen
    grad_clip: float = 0.0  # max global grad norm; 0 disables clipping
    batch_size_global: int = 256


@dataclass
class EMAConfig:
    """EDM-style EMA: per step decay 0.5 ** (patches this step / half-life), half-life in patches.

    With ``rampup_ratio`` the half-life is at most ``rampup_ratio x patches seen``, so early
    weights (random init) are forgotten quickly instead of dominating the average for millions
    of patches.
    """

    half_life_patches: float = 500_000.0
    rampup_ratio: float | None = 0.05


@dataclass
class RunConfig:
    """Where and how long to run, precision, logging and checkpoints; intervals in patches seen."""

    out_dir: str = "runs/default"
    total_patches: int = 1_000_000
    total_flops: float = 0.0  # also stop at this many training FLOPs (3 x forward, counted per side); 0: no limit
    # stop here (with a checkpoint) before the budget: a sweep that evaluates on the way and resumes.
    # Schedules (the progressive patch ramp) still follow the budget: total_patches / total_flops.
    stop_flops: float = 0.0
    max_train_seconds: float = 0.0  # wall-clock budget of this invocation (0: none); stops with a checkpoint
    log_every_patches: int = 10_000
    ckpt_every_patches: int = 500_000
    keep_last: int = 3  # complete checkpoints kept; 0 keeps all
    seed: int = 0
    # "auto": bf16 on CUDA, fp32 on the CPU. YAML reads a bare `no` as false: accepted as "no"
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] | bool = "auto"
    compile: Literal["auto"] | bool = "auto"  # "auto": torch.compile on CUDA (static shapes), not on the CPU
    compile_backend: str = "inductor"
    grad_checkpointing: bool = False  # same as model.grad_checkpointing (either enables it)
    tensorboard: bool = True
    progress: bool = True  # a console progress bar on rank 0 (patches/s, full-image equivalents/s, loss, ETA)

    def __post_init__(self) -> None:
        if self.mixed_precision is False:
            self.mixed_precision = "no"
        elif self.mixed_precision is True:
            raise ConfigError("run.mixed_precision must be auto, no, bf16 or fp16, got true")


@dataclass
class EvalConfig:
    """What the run shows of itself while it trains (``evaluate.py``): preview grids and FID/FD of
    the EMA weights, both at intervals in patches seen (0 disables)."""

    preview_every_patches: int = 0
    preview_images: int = 16
    preview_per_class: int = 4  # images per row; one class per row
    preview_steps: int = 12  # Heun steps of the preview sampler (quality is secondary)
    fid_every_patches: int = 0
    fid_ref: str | None = None  # reference: stats npz, ADM reference npz, image folder or image tars
    fid_num_samples: int = 2000
    fid_features: Literal["inception", "demo"] = "inception"
    fid_steps: int = 18
    fid_cfg_scale: float = 1.0
    vae: str | None = None  # VAE that decodes previews and FID samples; None -> the manifest's vae.id


@dataclass
class TrainConfig:
    """A training run: every section, as ``train_latent.py --config FILE key=value ...`` sees it."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    edm: EDMConfig = field(default_factory=EDMConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # the sampler this run recommends for its checkpoints: sample.py's and the exported pipeline's
    # defaults (their flags / call arguments override), so the settings travel with the model
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    RENAMED: ClassVar[dict[str, str]] = {
        "run.total_images": "run.total_patches",
        "run.log_every_images": "run.log_every_patches",
        "run.ckpt_every_images": "run.ckpt_every_patches",
        "optim.warmup_images": "optim.warmup_patches",
        "ema.half_life_images": "ema.half_life_patches",
        "run.preview_every_images": "eval.preview_every_patches",
        "run.num_preview": "eval.preview_images",
        "run.preview_per_class": "eval.preview_per_class",
        "run.preview_steps": "eval.preview_steps",
        "run.preview_vae": "eval.vae",
        "run.fid_every_images": "eval.fid_every_patches",
        "run.fid_ref": "eval.fid_ref",
        "run.fid_num_samples": "eval.fid_num_samples",
        "run.fid_features": "eval.fid_features",
        "run.fid_steps": "eval.fid_steps",
        "run.fid_cfg_scale": "eval.fid_cfg_scale",
    }
    """Old key -> new key. Old keys counted patches under names that said images (issue 10)."""
