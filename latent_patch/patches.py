"""Patch schedule, batched random crops and coordinate grids (Patch Diffusion, arXiv 2304.12526).

Training sees random square crops ("patches") of each latent instead of always the whole latent.
Each patch carries two coordinate channels holding where its cells sit in the FULL latent, so the
denoiser learns one position-aware function that, at sampling time, runs on the whole latent with
the full grid. One patch side is drawn per optimizer step (every sample of the batch shares it),
and a step at side s draws ``R / s`` times more patches, so small-patch steps cost less compute
while seeing more images.
"""

from __future__ import annotations

import functools
import random

import torch

from .config import PatchConfig


class PatchSchedule:
    """A PatchConfig resolved for latent side ``R``: concrete sizes, probabilities, multipliers.

    Resolution happens once, at construction, so a bad schedule (a size that does not fit R, is
    not a multiple of the model's patchify, or makes ``R / s`` fractional) fails before training
    starts, with the offending value named.
    """

    def __init__(self, cfg: PatchConfig, R: int, multiple_of: int = 1) -> None:
        if len(cfg.probs) != len(cfg.sizes):
            raise ValueError(f"patch probs {cfg.probs} must have one entry per size in {cfg.sizes}")
        if any(p < 0 for p in cfg.probs) or abs(sum(cfg.probs) - 1.0) > 1e-6:
            raise ValueError(f"patch probs {cfg.probs} must be non-negative and sum to 1")
        if not 0.0 < cfg.progressive_fraction <= 1.0:
            raise ValueError(f"progressive_fraction {cfg.progressive_fraction} must lie in (0, 1]")
        sizes = [_resolve_size(v, R, multiple_of) for v in cfg.sizes]
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"patch sizes {cfg.sizes} resolve to duplicates {sizes} for R={R}")
        mults = _resolve_multipliers(cfg.batch_multiplier, sizes, R)
        order = sorted(range(len(sizes)), key=lambda i: sizes[i])
        self.R = R
        self.sizes: list[int] = [sizes[i] for i in order]
        self.probs: list[float] = [float(cfg.probs[i]) for i in order]
        self.multipliers: list[int] = [mults[i] for i in order]
        self.progressive = cfg.progressive
        self.progressive_fraction = cfg.progressive_fraction

    def probs_at(self, progress: float) -> list[float]:
        """Size probabilities at ``progress`` in [0, 1] of training (see PatchConfig.progressive)."""
        if not self.progressive or len(self.sizes) == 1:
            return list(self.probs)
        ramp = min(1.0, max(0.0, progress) / self.progressive_fraction)
        p_big = self.probs[-1] * ramp
        small = self.probs[:-1]
        total = sum(small)
        share = [p / total for p in small] if total > 0 else [1.0 / len(small)] * len(small)
        return [(1.0 - p_big) * s for s in share] + [p_big]

    def sample(self, rng: torch.Generator | random.Random, progress: float = 1.0) -> tuple[int, int]:
        """Draw this step's (patch side, batch multiplier); one draw per optimizer step."""
        u = rng.random() if isinstance(rng, random.Random) else float(torch.rand((), generator=rng, device=rng.device))
        cumulative = 0.0
        probs = self.probs_at(progress)
        for size, mult, p in zip(self.sizes, self.multipliers, probs):
            cumulative += p
            if u < cumulative:
                return size, mult
        last = max(i for i, p in enumerate(probs) if p > 0)  # u within rounding of 1.0
        return self.sizes[last], self.multipliers[last]

    def __repr__(self) -> str:
        rows = ", ".join(f"{s}: p={p:g} x{m}" for s, p, m in zip(self.sizes, self.probs, self.multipliers))
        return f"PatchSchedule(R={self.R}, {{{rows}}}, progressive={self.progressive})"


def _resolve_size(value: float, R: int, multiple_of: int) -> int:
    """Turn one configured size (fraction of R or absolute side) into an integer side, or fail."""
    side = value * R if value <= 1 else value
    if value <= 0 or abs(side - round(side)) > 1e-6:
        raise ValueError(f"patch size {value} gives side {side} for R={R}; it must be a whole number of cells")
    side = int(round(side))
    if side > R:
        raise ValueError(f"patch size {value} (side {side}) does not fit the latent side R={R}")
    if side % multiple_of:
        raise ValueError(f"patch size {value} (side {side}) is not a multiple of the model's patchify {multiple_of}")
    return side


def _resolve_multipliers(spec: str | list[int], sizes: list[int], R: int) -> list[int]:
    """``"auto"`` -> R / s per size (s must divide R); an explicit list is checked and kept."""
    if isinstance(spec, str):
        if spec != "auto":
            raise ValueError(f"batch_multiplier {spec!r} must be 'auto' or a list of integers")
        bad = [s for s in sizes if R % s]
        if bad:
            raise ValueError(
                f"patch side {bad[0]} does not divide R={R}, so batch_multiplier 'auto' (R/s) is fractional"
            )
        return [R // s for s in sizes]
    if len(spec) != len(sizes) or any(int(m) != m or m < 1 for m in spec):
        raise ValueError(f"batch_multiplier {spec} must hold one positive integer per size in {sizes}")
    return [int(m) for m in spec]


def coord_grid(R: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(2, R, R) coordinates of every cell of the full latent: ch0 = x (column), ch1 = y (row).

    Values are ``(index / (R - 1) - 0.5) * 2`` so the corners sit at -1 and +1 whatever R is;
    R = 1 has no extent and gives zeros. Made once per (R, device, dtype) and shared: callers
    only take views of it (expand, gather), never write into it.
    """
    return _grid(R, torch.device(device) if device is not None else torch.device("cpu"), dtype)


@functools.lru_cache(maxsize=32)
def _grid(R: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():  # a normal tensor even if first asked for in inference
        idx = torch.arange(R, device=device, dtype=torch.float64)
        v = (idx / (R - 1) - 0.5) * 2 if R > 1 else torch.zeros_like(idx)
        v = v.to(dtype)
        return torch.stack([v[None, :].expand(R, R), v[:, None].expand(R, R)])


def random_offsets(
    batch: int, R: int, size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None,
    step: int = 1,
) -> torch.Tensor:
    """(B, 2) int64 crop offsets (row, col), each uniform over the multiples of ``step`` in
    0..R-size, independent per sample.

    ``step``: a DiT's patchify p, so a patch's tokens group the same cells, and get the same
    position embeddings, as the tokens at that place in the full latent (an offset off the token
    grid shifts the grouping: tokens the full grid never has at sampling). A U-Net takes step 1.
    Drawn on the generator's device (so a CPU generator works with CUDA data) and moved to ``device``.
    """
    gen_device = generator.device if generator is not None else device
    off = torch.randint(0, (R - size) // step + 1, (batch, 2), generator=generator, device=gen_device)
    off = off * step if step != 1 else off
    return off.to(device) if device is not None else off


def crop(x: torch.Tensor, offsets: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop a size x size window at per-sample ``offsets`` (row, col) from ``x`` and from the full grid.

    One vectorized gather over the flattened spatial axis serves the whole batch; the coordinate
    channels are gathered from the full grid with the same indices, so they are by construction
    the grid's slice at the patch's offset.
    """
    B, C, R, _ = x.shape
    ar = torch.arange(size, device=x.device)
    offsets = offsets.to(x.device)
    rows = offsets[:, 0, None] + ar  # (B, s)
    cols = offsets[:, 1, None] + ar
    flat = (rows[:, :, None] * R + cols[:, None, :]).view(B, 1, size * size)
    patches = x.flatten(2).gather(2, flat.expand(B, C, -1)).view(B, C, size, size)
    grid = coord_grid(R, x.device, _coord_dtype(x)).flatten(1)[None].expand(B, 2, R * R)
    coords = grid.gather(2, flat.expand(B, 2, -1)).view(B, 2, size, size)
    return patches, coords


def random_crops(
    x: torch.Tensor, size: int, generator: torch.Generator | None = None, step: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random size x size patches of ``x`` (B, C, R, R), one offset per sample (multiples of
    ``step``, see :func:`random_offsets`), with their coordinates.

    ``size == R`` returns ``x`` itself and the full grid expanded over the batch (no copy).
    """
    return random_crops_at(x, size, generator, step)[:2]


def random_crops_at(
    x: torch.Tensor, size: int, generator: torch.Generator | None = None, step: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`random_crops` and the (B, 2) offsets it cut at (zeros for ``size == R``, where
    nothing is drawn): what else is cut at the patch's place (REPA's targets) needs them."""
    B, _, H, W = x.shape
    if H != W:
        raise ValueError(f"random_crops expects square latents, got {H}x{W}")
    if not 1 <= size <= H:
        raise ValueError(f"patch size {size} does not fit latent side {H}")
    if size == H:
        full = coord_grid(H, x.device, _coord_dtype(x)).expand(B, 2, H, H)
        return x, full, torch.zeros(B, 2, dtype=torch.int64, device=x.device)
    offsets = random_offsets(B, H, size, generator, x.device, step)
    return (*crop(x, offsets, size), offsets)


def _coord_dtype(x: torch.Tensor) -> torch.dtype:
    """Coordinates follow the latent's float dtype so ``torch.cat`` with it needs no cast."""
    return x.dtype if x.is_floating_point() else torch.float32
