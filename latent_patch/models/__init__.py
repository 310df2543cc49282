"""Denoiser networks and a registry of named presets (DiT sizes x patchify, the authors' ADM U-Net).

Every model follows one call signature, so ``edm.Precond`` wraps any of them:
``net(x (B, C+2, h, w), c_noise (B,), class_labels int64 (B,)) -> (B, C, h, w)``, where ``x`` is
``cat(c_in * x_noisy, coords)`` and class index ``num_classes`` is the null (unconditional) class.
A config names a preset and may override single fields; unknown presets or fields that do not
belong to the preset's architecture fail with the name spelled out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch.nn as nn

from .dit import DiT
from .unet import ADMUNet, build_adm_unet

__all__ = ["ModelConfig", "Preset", "PRESETS", "register_preset", "build_model", "count_params", "DiT", "ADMUNet"]


@dataclass
class ModelConfig:
    """Which network to build.

    preset: a name in ``PRESETS`` ("DiT-XL/2", "DiT-B/2", "DiT-T/2", "adm-imagenet256", "adm-tiny", ...).
    arch: None takes it from the preset; when set it must agree with the preset.
    latent_channels: C of the latent (the net gets C + 2 inputs, the coordinates, and gives C outputs).
    latent_size: side R of the FULL latent (fixes DiT's position scale and the U-Net's attention levels).
    dropout: None keeps the preset's value.
    Overrides (None keeps the preset's value); DiT: hidden, depth, heads, patch, mlp_ratio;
    U-Net: channels, channel_mult, num_blocks, attn_resolutions, head_channels.
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

# DiT sizes (Peebles & Xie 2023, Table 1) plus a tiny one for CPU tests, each at patchify 2, 4, 8.
_DIT_SIZES = {"T": (64, 2, 2), "S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
for _size, (_hidden, _depth, _heads) in _DIT_SIZES.items():
    for _p in (2, 4, 8):
        register_preset(
            f"DiT-{_size}/{_p}", "dit", hidden_size=_hidden, depth=_depth, num_heads=_heads, patch_size=_p, dropout=0.0
        )

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

