"""EDM preconditioning, loss, guidance and samplers (Karras et al. 2022), with Patch Diffusion's
coordinates, and sampling by index (the one sampler loop of ``sample.py``, training-time FID and
previews).

The network never sees raw noisy latents: ``Precond`` scales them by c_in, appends the coordinate
channels (after scaling, as the authors do, so the coordinates keep their [-1, 1] range at every
noise level) and mixes the network output with a skip path, so the network's target has unit
variance at every sigma. The same ``Precond`` serves training on patches and sampling on the
whole latent; only the coordinates differ.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from .config import SamplerConfig
from .dist import autocast, compile_network
from .patches import coord_grid
from .seeds import derive_seed

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``D(x, sigma (B,), labels (B,)) -> denoised x``: a denoiser with its coordinates bound."""

NoiseSource = torch.Generator | Callable[[torch.Tensor], torch.Tensor] | None
"""A torch.Generator, or ``randn_like(x)`` (e.g. per-sample-index streams, EDM2 style), or None."""


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
        self, x_noisy: torch.Tensor, sigma: torch.Tensor | float, coords: torch.Tensor, class_labels: torch.Tensor,
        route: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x_noisy.to(torch.float32)
        B = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(B)
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        if coords.dim() == 3:
            coords = coords.expand(B, *coords.shape)
        inp = torch.cat([c_in.view(-1, 1, 1, 1) * x, coords.to(x)], dim=1)
        extra = {} if route is None else {"route": route}  # token routing (DiT, training only)
        out = self.net(inp.to(self._dtype()), c_noise, class_labels, **extra)
        aux = ()
        if isinstance(out, tuple):  # align.AlignedNet: (output, projected tokens, kept) in training
            out, *aux = out
        D = c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * out.to(torch.float32)
        return (D, *aux) if aux else D

    def _dtype(self) -> torch.dtype:
        """The network's parameter dtype; autocast, when active, overrides it per op."""
        for p in self.net.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32


def _device_of(generator: torch.Generator | None, fallback: torch.device) -> torch.device:
    return generator.device if generator is not None else fallback


def edm_loss(precond: Precond, y: torch.Tensor, coords: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator | None = None, **kwargs: Any) -> torch.Tensor:
    """Per-sample EDM loss (B,); see :func:`edm_loss_terms` (which also returns the network's extras)."""
    return edm_loss_terms(precond, y, coords, labels, generator, **kwargs)[0]


def edm_loss_terms(
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
    route: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple]:
    """(per-sample EDM loss (B,), what the network gave beside its output: ``align.AlignedNet``'s
    projected tokens and kept indices, else ()). The loss: weight(sigma) * mean over C,H,W of
    (D(y + n, sigma) - y)^2.

    sigma ~ exp(N(P_mean, P_std)). With probability ``label_dropout`` a label becomes the null
    class ``num_classes``, which trains the unconditional branch that guidance needs (the public
    Patch Diffusion code has none). Random draws come from ``generator`` (on its own device).
    ``route``: a DiT's token routing for this batch (``models.dit.draw_route``); the loss is on all tokens.
    """
    B, dev = y.shape[0], _device_of(generator, y.device)
    sigma = (torch.randn(B, generator=generator, device=dev) * P_std + P_mean).exp().to(y.device)
    noise = torch.randn(y.shape, generator=generator, device=dev).to(y.device, torch.float32)
    if label_dropout > 0:
        drop = (torch.rand(B, generator=generator, device=dev) < label_dropout).to(y.device)
        labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    y = y.to(torch.float32)
    x_noisy = y + noise * sigma.view(-1, 1, 1, 1)
    D = precond(x_noisy, sigma, coords, labels) if route is None else precond(x_noisy, sigma, coords, labels, route)
    D, *aux = D if isinstance(D, tuple) else (D,)
    return loss_weight(sigma, precond.sigma_data) * (D - y).square().mean(dim=(1, 2, 3)), tuple(aux)


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

    def denoise(x: torch.Tensor, sigma: torch.Tensor | float, labels: torch.Tensor) -> torch.Tensor:
        """``sigma``: one noise level per row, or a Python float for the whole batch (the sampler's
        case: which branch runs is then decided on the host, with no device sync)."""
        if isinstance(sigma, float):
            inside = lo <= sigma <= hi
            sigma = torch.full((x.shape[0],), sigma, dtype=torch.float64, device=x.device)
            if cfg_scale == 1.0 or not inside:
                return precond(x, sigma, coords, labels)
            any_active = all_active = True
            active = None
        else:
            if cfg_scale == 1.0:
                return precond(x, sigma, coords, labels)
            sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
            active = (sigma >= lo) & (sigma <= hi)
            any_active, all_active = bool(active.any()), bool(active.all())
        if not any_active:
            return precond(x, sigma, coords, labels)
        null = torch.full_like(labels, null_class)
        if cfg_scale == 0.0 and all_active:
            return precond(x, sigma, coords, null)
        both = coords if coords.dim() == 3 else torch.cat([coords, coords])
        d_cond, d_uncond = precond(
            torch.cat([x, x]), torch.cat([sigma, sigma]), both, torch.cat([labels, null])
        ).chunk(2)
        guided = d_uncond + cfg_scale * (d_cond - d_uncond)
        return guided if all_active else torch.where(active.view(-1, 1, 1, 1), guided, d_cond)

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
    R = noise.shape[-1]
    D = guided_denoiser(denoise, coord_grid(R, noise.device), null_class, cfg.cfg_scale, cfg.cfg_interval)
    randn_like = _randn_like_from(generator)
    ts = sigma_steps(cfg).tolist()
    gamma_max = min(cfg.S_churn / cfg.steps, math.sqrt(2) - 1)
    x = noise.to(torch.float64) * ts[0]

    def slope(x: torch.Tensor, t: float) -> torch.Tensor:
        return (x - D(x, float(t), labels).to(torch.float64)) / t

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


# --------------------------------------------------------------------------- sampling by index
# Sample ``i`` is a pure function of (settings, seed, i): its label is fixed by ``i`` alone and all
# of its noise (initial and churn) comes from its own generator seeded from (seed, i), as in EDM2.
# So images do not depend on the number of processes, the batch size or where a killed job resumed.

def index_labels(indices: Sequence[int], num_classes: int, classes: Sequence[int] | None = None) -> torch.Tensor:
    """Label of sample i: ``classes[i % len(classes)]``, by default ``i % num_classes``.

    Any prefix 0..N-1 is then class-balanced (N // K per class, the remainder on the first
    classes), and a label never depends on N, so a run can later be extended without changes.
    An unconditional model (num_classes 0) gets the null class 0 everywhere.
    """
    idx = torch.as_tensor(list(indices), dtype=torch.int64)
    if classes:
        return torch.as_tensor(list(classes), dtype=torch.int64)[idx % len(classes)]
    if num_classes <= 0:
        return torch.zeros_like(idx)
    return idx % num_classes


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index``'s own generator (``seeds.derive_seed``: nearby pairs are unrelated)."""
    return derive_seed("sample", seed, index)


class RowRandn:
    """Standard-normal draws where row b of every batch comes from sample ``indices[b]``'s own
    generator: the noise a sample sees is the same whichever batch it lands in.

    Draws are made in float32 on the generators' device and cast, so a float64 sampler state
    consumes the same stream as a float32 one.
    """

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(sample_seed(seed, int(i))) for i in indices]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(indices), *shape): one draw of ``shape`` per row from that row's generator."""
        rows = [torch.randn(tuple(shape), generator=g, device=self.device) for g in self.generators]
        return torch.stack(rows).to(dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} rows but {len(self.generators)} per-sample generators")
        return self.randn(x.shape[1:]).to(x.device, x.dtype)


def plan_batches(todo: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches: ``todo`` cut into runs of consecutive indices, each run into blocks of
    at most ``batch_size``, block k to rank k % world. No index twice, none left out, and every
    block is contiguous so its part file is named by its range."""
    blocks: list[list[int]] = []
    run: list[int] = []
    for i in sorted(todo):
        if run and (i != run[-1] + 1 or len(run) == batch_size):
            blocks.append(run)
            run = []
        run.append(i)
    if run:
        blocks.append(run)
    return blocks[rank::world_size]


class ImageSampler:
    """Sample indices -> (uint8 images NHWC, labels): the per-batch work of the sampling job.

    Holds everything that decides the pixels (network, preconditioning, sampler settings, seed,
    label rule, decoder) and nothing about files, so training-time FID and the benchmark run the
    very same code path as the 50k job.
    """

    def __init__(self, net: torch.nn.Module, *, sigma_data: float, latent_channels: int, latent_size: int,
                 num_classes: int, sampler: SamplerConfig, decode: Callable[[torch.Tensor], torch.Tensor], seed: int = 0,
                 classes: Sequence[int] | None = None, device: torch.device | str | None = None,
                 amp: str = "none", compile: bool = False):
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        # one batch size and one latent size: a static graph per shape (a short last batch adds one)
        self.precond = Precond(compile_network(net, num_shapes=2) if compile else net, sigma_data)
        self.shape = (latent_channels, latent_size, latent_size)
        self.num_classes = num_classes
        self.null_class = num_classes if num_classes > 0 else None
        self.sampler = sampler
        self.decode = decode
        self.seed = seed
        self.classes = list(classes) if classes else None
        self.amp = amp
        if self.classes and num_classes > 0 and not all(0 <= c < num_classes for c in self.classes):
            raise ValueError(f"--classes {self.classes}: every class must lie in 0..{num_classes - 1}")
        if sampler.cfg_scale != 1.0 and self.null_class is None:
            raise ValueError("guidance (cfg_scale != 1) needs a class-conditional model")

    def labels(self, indices: Sequence[int]) -> torch.Tensor:
        return index_labels(indices, self.num_classes, self.classes)

    @torch.no_grad()
    def latents(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled latents float32 on the device, labels) of the given sample indices."""
        rng = RowRandn(self.seed, indices, self.device)
        noise = rng.randn(self.shape).to(self.device)
        labels = self.labels(indices).to(self.device)
        with autocast(self.device, self.amp):
            x0 = sample(self.precond, noise, labels, self.sampler, self.null_class, generator=rng.randn_like)
        return x0, labels

    @torch.no_grad()
    def start(self, indices: Sequence[int]) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """Queue the sampling and decoding of ``indices``; the returned call waits for the result.

        Why: on a GPU nothing here waits for the device, so the job can queue the next batch
        while this one's images are copied out and written (the decoder's ``start``, when it has
        one, copies asynchronously). On the CPU the work is done before this returns.
        """
        x0, _ = self.latents(indices)
        labels = self.labels(indices).numpy()
        pending = self.decode.start(x0) if hasattr(self.decode, "start") else _done(self.decode(x0))

        def result() -> tuple[np.ndarray, np.ndarray]:
            imgs = pending()
            imgs = imgs.numpy() if isinstance(imgs, torch.Tensor) else np.asarray(imgs)
            return np.ascontiguousarray(imgs, dtype=np.uint8), labels

        return result

    def images(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 (B, H, W, 3), int64 labels (B,)) on the CPU."""
        return self.start(indices)()


def _done(value: torch.Tensor) -> Callable[[], torch.Tensor]:
    return lambda: value.cpu()
