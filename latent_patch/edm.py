"""EDM preconditioning, loss, guidance and samplers (Karras et al. 2022), with Patch Diffusion's coordinates.

The network never sees raw noisy latents: ``Precond`` scales them by c_in, appends the coordinate
channels (after scaling, as the authors do, so the coordinates keep their [-1, 1] range at every
noise level) and mixes the network output with a skip path, so the network's target has unit
variance at every sigma. The same ``Precond`` serves training on patches and sampling on the
whole latent; only the coordinates differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn as nn

from .patches import coord_grid

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``D(x, sigma (B,), labels (B,)) -> denoised x``: a denoiser with its coordinates bound."""

NoiseSource = torch.Generator | Callable[[torch.Tensor], torch.Tensor] | None
"""A torch.Generator, or ``randn_like(x)`` (e.g. per-sample-index streams, EDM2 style), or None."""


@dataclass
class EDMConfig:
    """EDM training constants: log-normal sigma distribution, data std, label dropout for guidance."""

    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_data: float = 0.5
    label_dropout: float = 0.1


@dataclass
class SamplerConfig:
    """EDM stochastic sampler (Algorithm 2) and classifier-free guidance settings.

    The defaults are EDM's deterministic 18-step Heun sampler (35 network evaluations) without
    guidance. ``AUTHORS_IMAGENET256`` below holds the settings of the authors' latent run.
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


AUTHORS_IMAGENET256 = SamplerConfig(steps=256, S_churn=40.0, S_min=0.05, S_max=50.0, S_noise=1.003, cfg_scale=1.3)
"""The sampler of the authors' ImageNet-256 latent run (FID 2.72)."""


def edm_scalings(
    sigma: torch.Tensor, sigma_data: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in, c_noise) of EDM's preconditioning, elementwise in ``sigma``."""
    s2 = sigma**2 + sigma_data**2
    c_skip = sigma_data**2 / s2
    c_out = sigma * sigma_data / s2.sqrt()
    c_in = 1 / s2.sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's lambda(sigma) = 1 / c_out^2: makes the effective training target unit-variance."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class Precond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(cat(c_in x, coords), c_noise, labels), returned in float32.

    The network runs in its own parameter dtype (or under the caller's autocast); the skip mix
    is done in float32 so a half-precision network does not cost precision near sigma -> 0,
    where D is almost exactly the input.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.net = net
        self.sigma_data = sigma_data

    def forward(
        self, x_noisy: torch.Tensor, sigma: torch.Tensor | float, coords: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        x = x_noisy.to(torch.float32)
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        if coords.dim() == 3:
            coords = coords.expand(B, *coords.shape)
        inp = torch.cat([c_in.view(-1, 1, 1, 1) * x, coords.to(x)], dim=1)
        out = self.net(inp.to(self._dtype()), c_noise, class_labels)
        return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * out.to(torch.float32)

    def _dtype(self) -> torch.dtype:
        """The network's parameter dtype; autocast, when active, overrides it per op."""
        for p in self.net.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32


def _device_of(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def edm_loss(
    precond: Precond,
    y: torch.Tensor,
    coords: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    num_classes: int,
    label_dropout: float = 0.1,
    P_mean: float = -1.2,
    P_std: float = 1.2,
) -> torch.Tensor:
    """Per-sample EDM loss (B,): weight(sigma) * mean over C,H,W of (D(y + n, sigma) - y)^2.

    sigma ~ exp(N(P_mean, P_std)). With probability ``label_dropout`` a label becomes the null
    class ``num_classes``, which trains the unconditional branch that guidance needs (the public
    Patch Diffusion code has none). Random draws come from ``generator`` (on its own device).
    """
    B, dev = y.shape[0], _device_of(generator, y.device)
    sigma = (torch.randn(B, generator=generator, device=dev) * P_std + P_mean).exp().to(y.device)
    noise = torch.randn(y.shape, generator=generator, device=dev).to(y.device, torch.float32)
    if label_dropout > 0:
        drop = (torch.rand(B, generator=generator, device=dev) < label_dropout).to(y.device)
        labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    y = y.to(torch.float32)
    D = precond(y + noise * sigma.view(-1, 1, 1, 1), sigma, coords, labels)
    return loss_weight(sigma, precond.sigma_data) * (D - y).square().mean(dim=(1, 2, 3))


def guided_denoiser(
    precond: Callable[..., torch.Tensor],
    coords: torch.Tensor,
    null_class: int | None,
    cfg_scale: float = 1.0,
    cfg_interval: list[float] | tuple[float, float] | None = None,
) -> Denoiser:
    """Bind coordinates and classifier-free guidance: D = D_u + w (D_c - D_u) on ALL channels.

    Conditional and unconditional branches run as ONE batched forward (cat along the batch).
    w == 1, or every sigma outside ``cfg_interval``, costs one conditional pass; w == 0 inside the
    interval costs one unconditional pass.
    """
    if cfg_scale != 1.0 and null_class is None:
        raise ValueError(f"cfg_scale {cfg_scale} needs the null class index for the unconditional branch")
    if cfg_interval is not None and (len(cfg_interval) != 2 or cfg_interval[0] > cfg_interval[1]):
        raise ValueError(f"cfg_interval {cfg_interval} must be [sigma_lo, sigma_hi] with sigma_lo <= sigma_hi")
    lo, hi = cfg_interval if cfg_interval is not None else (-math.inf, math.inf)

    def denoise(x: torch.Tensor, sigma: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if cfg_scale == 1.0:
            return precond(x, sigma, coords, labels)
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        active = (sigma >= lo) & (sigma <= hi)
        if not bool(active.any()):
            return precond(x, sigma, coords, labels)
        null = torch.full_like(labels, null_class)
        if cfg_scale == 0.0 and bool(active.all()):
            return precond(x, sigma, coords, null)
        both = coords if coords.dim() == 3 else torch.cat([coords, coords])
        d_cond, d_uncond = precond(
            torch.cat([x, x]), torch.cat([sigma, sigma]), both, torch.cat([labels, null])
        ).chunk(2)
        guided = d_uncond + cfg_scale * (d_cond - d_uncond)
        return torch.where(active.view(-1, 1, 1, 1), guided, d_cond)

    return denoise


def sigma_steps(cfg: SamplerConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Karras et al.'s schedule: ``steps`` sigmas from sigma_max to sigma_min (rho-spaced), then 0; float64."""
    i = torch.arange(cfg.steps, dtype=torch.float64, device=device)
    frac = i / (cfg.steps - 1) if cfg.steps > 1 else torch.zeros_like(i)
    hi, lo = cfg.sigma_max ** (1 / cfg.rho), cfg.sigma_min ** (1 / cfg.rho)
    t = (hi + frac * (lo - hi)) ** cfg.rho
    return torch.cat([t, t.new_zeros(1)])


def _randn_like_from(source: NoiseSource) -> Callable[[torch.Tensor], torch.Tensor]:
    """Normalise the accepted noise sources into one ``randn_like(x)`` callable."""
    if callable(source) and not isinstance(source, torch.Generator):
        return source
    gen = source

    def randn_like(x: torch.Tensor) -> torch.Tensor:
        dev = _device_of(gen, x.device)
        return torch.randn(x.shape, generator=gen, device=dev, dtype=x.dtype).to(x.device)

    return randn_like


@torch.no_grad()
def sample(
    denoise: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    labels: torch.Tensor,
    cfg: SamplerConfig,
    null_class: int | None = None,
    generator: NoiseSource = None,
) -> torch.Tensor:
    """Integrate the probability-flow ODE (with EDM's optional churn) from pure noise to x0 (float32).

    ``denoise`` has Precond's signature ``(x, sigma, coords, labels)``; the sampler binds the FULL
    coordinate grid (sampling runs on the whole latent) and the guidance of ``cfg``. ``noise`` is
    standard normal (the sampler scales it by sigma_max). The churn noise is drawn from
    ``generator`` (a torch.Generator or a ``randn_like(x)`` callable), and is drawn only at steps
    with churn, so a deterministic sampler consumes no randomness. The state is kept in float64
    (as EDM does) so 256-step runs do not accumulate float32 rounding.
    """
    B, R = noise.shape[0], noise.shape[-1]
    D = guided_denoiser(denoise, coord_grid(R, noise.device), null_class, cfg.cfg_scale, cfg.cfg_interval)
    randn_like = _randn_like_from(generator)
    ts = sigma_steps(cfg).tolist()
    gamma_max = min(cfg.S_churn / cfg.steps, math.sqrt(2) - 1)
    x = noise.to(torch.float64) * ts[0]

    def slope(x: torch.Tensor, t: float) -> torch.Tensor:
        sigma = torch.full((B,), t, dtype=torch.float64, device=x.device)
        return (x - D(x, sigma, labels).to(torch.float64)) / t

    for t_cur, t_next in zip(ts[:-1], ts[1:]):
        gamma = gamma_max if cfg.S_min <= t_cur <= cfg.S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(t_hat**2 - t_cur**2) * cfg.S_noise * randn_like(x)
        d = slope(x, t_hat)
        x_next = x + (t_next - t_hat) * d
        if cfg.method == "heun" and t_next > 0:
            x_next = x + (t_next - t_hat) * 0.5 * (d + slope(x_next, t_next))
        x = x_next
    return x.to(torch.float32)
