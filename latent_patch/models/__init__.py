"""Denoiser networks and a registry of named presets (DiT sizes x patchify, the authors' ADM U-Net).

Every model follows one call signature, so ``edm.Precond`` wraps any of them:
``net(x (B, C+2, h, w), c_noise (B,), class_labels int64 (B,)) -> (B, C, h, w)``, where ``x`` is
``cat(c_in * x_noisy, coords)`` and class index ``num_classes`` is the null (unconditional) class.
A config names a preset and may override single fields; unknown presets or fields that do not
belong to the preset's architecture fail with the name spelled out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch.nn as nn

from ..config import ModelConfig, to_dict
from .dit import DiT
from .unet import ADMUNet, build_adm_unet

__all__ = ["ModelConfig", "Preset", "PRESETS", "register_preset", "build_model", "count_params", "DiT", "ADMUNet",
           "patch_multiple", "offset_multiple", "check_same_model", "enable_grad_checkpointing", "check_latents_fit",
           "forward_flops"]


@dataclass(frozen=True)
class Preset:
    """A named architecture: its family and the builder keyword arguments it fixes."""

    arch: str
    params: dict[str, Any]


PRESETS: dict[str, Preset] = {}

# ModelConfig override field -> builder keyword, per architecture.
_OVERRIDES: dict[str, dict[str, str]] = {
    "dit": {
        "hidden": "hidden_size", "depth": "depth", "heads": "num_heads", "patch": "patch_size", "mlp_ratio": "mlp_ratio",
        "route_ratio": "route_ratio", "route_start": "route_start", "route_end": "route_end",
        "pos": "pos", "mlp": "mlp", "norm": "norm", "qk_norm": "qk_norm", "coord_channels": "coord_channels",
    },
    "unet": {k: k for k in ("channels", "channel_mult", "num_blocks", "attn_resolutions", "head_channels")},
}


def register_preset(name: str, arch: str, **params: Any) -> None:
    """Add a named preset; ``params`` are the builder's keyword arguments (see ``_BUILDERS``)."""
    if arch not in _OVERRIDES:
        raise ValueError(f"preset {name!r}: unknown arch {arch!r} (known: {sorted(_OVERRIDES)})")
    PRESETS[name] = Preset(arch, dict(params))


def _build_dit(in_channels: int, out_channels: int, latent_size: int, num_classes: int, **params: Any) -> nn.Module:
    return DiT(
        in_channels=in_channels, out_channels=out_channels, latent_size=latent_size, num_classes=num_classes, **params
    )


_BUILDERS: dict[str, Callable[..., nn.Module]] = {"dit": _build_dit, "unet": build_adm_unet}

# DiT sizes (Peebles & Xie 2023, Table 1) plus a tiny one for CPU tests, each at patchify 2, 4, 8;
# "-2025": the same sizes with LightningDiT's block (Yao et al. 2025, Table 1: SwiGLU, RMSNorm,
# RoPE, QK-norm); the coordinate channels stay on (model.coord_channels=false takes them off).
_DIT_SIZES = {"T": (64, 2, 2), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
BLOCK_2025 = {"pos": "rope", "mlp": "swiglu", "norm": "rms", "qk_norm": True}
for _size, (_hidden, _depth, _heads) in _DIT_SIZES.items():
    for _p in (2, 4, 8):
        _dims = dict(hidden_size=_hidden, depth=_depth, num_heads=_heads, patch_size=_p, dropout=0.0)
        register_preset(f"DiT-{_size}/{_p}", "dit", **_dims)
        register_preset(f"DiT-{_size}/{_p}-2025", "dit", **_dims, **BLOCK_2025)

# The authors' ImageNet-256 latent network (method.md) and a tiny one of the same shape for CPU tests.
register_preset(
    "adm-imagenet256", "unet",
    channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8], head_channels=64, dropout=0.1,
)
register_preset(
    "adm-tiny", "unet",
    channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[16], head_channels=16, dropout=0.0,
)


def resolve(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(arch, builder kwargs) for ``cfg``: the preset's parameters with the config's overrides applied."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"model preset {cfg.preset!r} is unknown (known: {', '.join(sorted(PRESETS))})")
    preset = PRESETS[cfg.preset]
    if cfg.arch is not None and cfg.arch != preset.arch:
        raise ValueError(f"model arch {cfg.arch!r} does not match preset {cfg.preset!r}, which is a {preset.arch!r}")
    params = dict(preset.params)
    mapping = _OVERRIDES[preset.arch]
    for name in (n for other in _OVERRIDES.values() for n in other):
        value = getattr(cfg, name)
        if value is None:
            continue
        if name not in mapping:
            raise ValueError(f"model.{name} does not apply to preset {cfg.preset!r} ({preset.arch})")
        params[mapping[name]] = value
    if cfg.dropout is not None:
        params["dropout"] = cfg.dropout
    return preset.arch, params


def build_model(cfg: ModelConfig) -> nn.Module:
    """Build the network of ``cfg`` (C + 2 inputs, C outputs, num_classes + 1 class rows)."""
    arch, params = resolve(cfg)
    net = _BUILDERS[arch](
        in_channels=cfg.latent_channels + 2,
        out_channels=cfg.latent_channels,
        latent_size=cfg.latent_size,
        num_classes=cfg.num_classes,
        **params,
    )
    if cfg.grad_checkpointing:
        net.enable_gradient_checkpointing()
    return net


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def patch_multiple(net: nn.Module) -> int:
    """Patch sides the network accepts are multiples of this: DiT's patchify, the U-Net's total downsampling."""
    if hasattr(net, "patch_size"):
        return int(net.patch_size)
    levels = getattr(getattr(net, "config", None), "block_out_channels", None)
    return 2 ** (len(levels) - 1) if levels else 1


def offset_multiple(net: nn.Module) -> int:
    """Crop offsets the network needs: DiT's patchify p (tokens on the full latent's token grid);
    any offset for a U-Net (its convolutions have no grid)."""
    return int(net.patch_size) if hasattr(net, "patch_size") else 1


def enable_grad_checkpointing(net: nn.Module) -> None:
    """Trade compute for memory; models expose it the diffusers way (or set_grad_checkpointing)."""
    if hasattr(net, "enable_gradient_checkpointing"):
        net.enable_gradient_checkpointing()
    elif hasattr(net, "set_grad_checkpointing"):
        net.set_grad_checkpointing(True)
    else:
        raise ValueError(f"run.grad_checkpointing=true but {type(net).__name__} does not support it")


# may change on resume: the weights still fit (routing changes which tokens train, not the weights' shapes)
RUNTIME_MODEL_KEYS = ("grad_checkpointing", "dropout", "route_ratio", "route_start", "route_end")


def check_same_model(saved: ModelConfig, now: ModelConfig) -> None:
    """Refuse to resume weights of another architecture, naming the keys that differ."""
    a, b = to_dict(saved), to_dict(now)
    diff = {k: (a.get(k), b.get(k)) for k in (set(a) | set(b)) - set(RUNTIME_MODEL_KEYS) if a.get(k) != b.get(k)}
    if diff:
        pretty = ", ".join(f"model.{k}: checkpoint {x!r} vs config {y!r}" for k, (x, y) in sorted(diff.items()))
        raise ValueError(f"saved with another model config ({pretty})")


def check_latents_fit(cfg: ModelConfig, manifest: dict, source: str) -> tuple[int, int]:
    """(C, R) of a shard set's latents, after checking them against the model config.

    Why here: the model fixes C, R and the class count; a mismatch must stop a run before it
    starts, with both sides and the key to change named (``source`` names the manifest)."""
    C, h, w = (int(v) for v in manifest["latent_shape"])
    if h != w:
        raise ValueError(f"{source}: latents are {h}x{w}; training needs square latents")
    if (C, h) != (cfg.latent_channels, cfg.latent_size):
        raise ValueError(
            f"{source}: shards hold latents of shape [{C}, {h}, {w}] but the model is configured for "
            f"model.latent_channels={cfg.latent_channels}, model.latent_size={cfg.latent_size}; "
            f"set model.latent_channels={C} model.latent_size={h} or use matching shards")
    n = len(manifest.get("class_names") or [])
    if n and n != cfg.num_classes:
        raise ValueError(f"{source}: shards have {n} classes but model.num_classes={cfg.num_classes}; "
                         f"set model.num_classes={n}")
    return C, h


def forward_flops(cfg: ModelConfig, side: int | None = None, routed: bool = False) -> float:
    """Forward FLOPs of one sample at patch ``side`` (default: the full latent), counted by
    ``torch.utils.flop_counter`` on meta tensors (no compute, no memory; matmuls count 2 per MAC).

    ``routed``: as in training with ``model.route_ratio`` (fewer tokens in the routed blocks);
    sampling never routes. Training costs about 3x this (backward ~ 2x forward).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .dit import draw_route

    side = side or cfg.latent_size
    with torch.device("meta"):
        net = build_model(cfg)
        x = torch.zeros(1, cfg.latent_channels + 2, side, side)
        extra = {}
        if routed and (cfg.route_ratio or 0) > 0:
            extra["route"] = draw_route(1, (side // net.patch_size) ** 2, device="meta")
        with FlopCounterMode(display=False) as counter:
            net(x, torch.zeros(1), torch.zeros(1, dtype=torch.long), **extra)
    return float(counter.get_total_flops())
