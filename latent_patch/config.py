"""Every typed config of the project (dataclasses), filled from YAML files and ``key=value``
command-line overrides.

One loader serves every job (training, sampling, the demo), so a typo in a week-long run's
config fails in the first second with the offending key named, instead of being ignored. Keys
that were renamed are refused with their new name; configs saved in older checkpoints are
migrated when read (:func:`load_saved`). The sections of a training config, in data-flow order:
``data`` (shards and loader), ``model``, ``patch`` (schedule), ``edm`` (loss), ``optim``, ``ema``,
``run`` (where, how long, precision, logging, checkpoints) and ``eval`` (previews and FID while
training). Every count of progress is in PATCHES seen (a patch of any side is one sample).
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping, Sequence, TypeVar, Union

import yaml

from .codec import DEFAULT_VAE
from .images import DEFAULT_MAX_PIXELS

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a value of the wrong type."""


def _describe(source: str, key: str) -> str:
    return f"{source}: '{key}'" if source else f"'{key}'"


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Return ``value`` converted to the annotated type ``tp``, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{_describe(source, key)} = {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{_describe(source, key)} = {value!r}; expected one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_describe(source, key)} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=key + ".", source=source)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{_describe(source, key)} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{_describe(source, key)} needs {len(args)} items, got {value!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(out) if origin is tuple or tp is tuple else out
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{_describe(source, key)} must be a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, key, source): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{_describe(source, key)} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{_describe(source, key)} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{_describe(source, key)} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{_describe(source, key)} must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "", source: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) mapping; unknown keys are an error naming them."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{_describe(source, prefix + str(unknown[0]))} is not a config key"
            f" (known under '{prefix or '<top>'}': {', '.join(sorted(fields))})"
        )
    kwargs = {name: _coerce(value, hints[name], prefix + name, source) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Plain nested dicts/lists of a config, ready for YAML or JSON (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (['a','b','c'], value); the value is parsed as YAML (so 1e-4, [16,32], true work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. optim.lr=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from err
    return key.split("."), value


def merge_override(data: dict, parts: list[str], value: Any) -> None:
    """Set data[parts[0]][parts[1]]... = value, creating nested mappings as needed."""
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {} if child is None else child
            if not isinstance(child, dict):
                raise ConfigError(f"override '{'.'.join(parts)}': '{part}' is not a section")
            node[part] = child
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict:
    """Read a YAML mapping with safe_load; a missing file or non-mapping is an error naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML ({err})") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``key=value`` overrides, in that order.

    A key that ``cls.RENAMED`` lists is refused with its new name (silently mapping it would
    hide that an old config's meaning changed; a saved config is migrated by :func:`load_saved`).
    """
    renamed = getattr(cls, "RENAMED", {})
    source = str(path) if path is not None else ""
    data = to_dict(cls())
    if path is not None:
        file_data = read_yaml(path)
        refuse_renamed(file_data, renamed, source)
        from_dict(cls, file_data, source=source)  # names unknown keys against the file itself
        data = _deep_merge(data, file_data)
    for text in overrides:
        parts, value = parse_override(text)
        nested: dict = {}
        merge_override(nested, parts, value)
        refuse_renamed(nested, renamed, "override")
        merge_override(data, parts, value)
    return from_dict(cls, data, source=source or "overrides")


def load_saved(cls: type[T], path: str | Path) -> T:
    """A config written by an earlier run (a checkpoint's config.yaml), old key names migrated."""
    data = migrate(read_yaml(path), getattr(cls, "RENAMED", {}))
    return from_dict(cls, _deep_merge(to_dict(cls()), data), source=str(path))


def _dotted(data: Mapping, prefix: str = "") -> list[str]:
    """Every key of a nested mapping as a dotted path (sections and leaves)."""
    keys = []
    for k, v in data.items():
        keys.append(prefix + str(k))
        if isinstance(v, Mapping):
            keys += _dotted(v, prefix + str(k) + ".")
    return keys


def refuse_renamed(data: Mapping, renamed: Mapping[str, str], source: str) -> None:
    """ConfigError naming the new key when ``data`` uses a renamed one."""
    for key in _dotted(data):
        if key in renamed:
            raise ConfigError(f"{_describe(source, key)} was renamed: use '{renamed[key]}' instead "
                              "(progress and intervals are counted in patches seen)")


def migrate(data: dict, renamed: Mapping[str, str]) -> dict:
    """``data`` with every renamed key moved to its new place (the value is kept as it was)."""
    out = copy.deepcopy(data)
    for old, new in renamed.items():
        *sec, leaf = old.split(".")
        node = out
        for part in sec:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            value = node.pop(leaf)
            target = out
            *new_sec, new_leaf = new.split(".")
            for part in new_sec:
                target = target.setdefault(part, {})
            target.setdefault(new_leaf, value)
    return out


def _deep_merge(base: dict, extra: Mapping) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def save(obj: Any, path: str | Path) -> None:
    """Write a config as YAML (used to store the resolved config beside checkpoints)."""
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


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
    route_ratio, route_start, route_end; U-Net: channels, channel_mult, num_blocks,
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
