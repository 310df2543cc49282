"""Representation alignment (REPA, Yu et al. 2025) on latent patches, with targets encoded once.

REPA adds to the denoising loss ``repa.weight`` x the negative cosine similarity, token by token,
between the DiT's hidden tokens after block ``repa.block`` (through a projector MLP) and a frozen
encoder's patch tokens of the clean image (DINOv2-B/14 at 224 px: a 16 x 16 grid, DiT-XL/2's
token grid on a 32 x 32 latent). REPA runs the encoder every step; here its grid is stored beside
each latent by ``encode_latents.py --repr`` (``represent.py``), and the loss reads it:

- the stored grid (gh, gw, K) is resampled by area to the model's full token grid R/p x R/p (an
  identity when they agree; the area mean when they do not, e.g. DiT-XL/4's 8 x 8 tokens);
- a patch's targets are that grid's crop under the patch's tokens (its offset / p, side s / p),
  in the DiT's token order (row-major), so a crop's token i and its target cover the same place;
- with token routing, only the tokens that went through the aligned block count (``kept``).

The projector trains with the model and is saved in checkpoints (``projector.safetensors``) but
is never used at sampling nor exported: sampling calls the DiT alone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, RepaConfig

PROJECTOR_FILE = "projector.safetensors"


class Projector(nn.Sequential):
    """REPA's projector: hidden -> proj_hidden -> proj_hidden -> dims, SiLU between (its ``build_mlp``)."""

    def __init__(self, hidden: int, proj_hidden: int, dims: int) -> None:
        super().__init__(nn.Linear(hidden, proj_hidden), nn.SiLU(), nn.Linear(proj_hidden, proj_hidden), nn.SiLU(),
                         nn.Linear(proj_hidden, dims))


class AlignedNet(nn.Module):
    """The DiT and its projector as one module, so DDP syncs and torch.compile traces both:
    ``(x, c_noise, labels, route) -> (output, projected tokens (B, T', dims), kept (B, T') or None)``."""

    def __init__(self, net: nn.Module, projector: Projector, block: int) -> None:
        super().__init__()
        self.net, self.projector, self.block = net, projector, block

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor,
                route: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        out, tokens, kept = self.net(x, c_noise, class_labels, route=route, align_block=self.block)
        return out, self.projector(tokens), kept


def repr_dims(manifest: dict | None, where: str) -> tuple[tuple[int, int], int]:
    """((gh, gw), K) of the shards' stored feature grids; refuses shards without them in one line."""
    info = (manifest or {}).get("repr")
    if not info:
        raise ValueError(f"{where} holds no representation features, which repa.weight > 0 aligns to: encode the "
                         "shards with `encode_latents.py --repr ENCODER` (e.g. --repr demo, or "
                         "vit_base_patch14_dinov2.lvd142m), or set repa.weight=0")
    try:
        gh, gw = (int(v) for v in info["grid"])
        dims = int(info["dims"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{where}: field 'repr' needs 'grid' [gh, gw] and 'dims' K, got {info!r}") from err
    if min(gh, gw, dims) < 1:
        raise ValueError(f"{where}: field 'repr' has grid {[gh, gw]} and dims {dims}; all must be >= 1")
    return (gh, gw), dims


def check_config(repa: RepaConfig, model: ModelConfig, arch: str, depth: int) -> None:
    """Refuse settings that cannot align, naming the key."""
    if repa.weight < 0:
        raise ValueError(f"repa.weight={repa.weight} must be >= 0 (0: off)")
    if repa.weight == 0:
        return
    if arch != "dit":
        raise ValueError(f"repa.weight={repa.weight} aligns a DiT's tokens; model.preset={model.preset!r} is a {arch}")
    if not 1 <= repa.block <= depth:
        raise ValueError(f"repa.block={repa.block} must name a block 1..{depth} (the tokens after it are aligned)")
    if repa.proj_hidden < 1:
        raise ValueError(f"repa.proj_hidden={repa.proj_hidden} must be >= 1")


def build_projector(repa: RepaConfig, model: ModelConfig, net: nn.Module, manifest: dict | None,
                    where: str) -> tuple[Projector | None, int]:
    """(the projector, K) of a run with ``repa.weight > 0``, checked against the network and the
    shards' features; (None, 0) when alignment is off (nothing is built, no random draw made)."""
    blocks = getattr(net, "blocks", None)
    check_config(repa, model, "dit" if blocks is not None else "unet", len(blocks or ()))
    if repa.weight == 0:
        return None, 0
    _, dims = repr_dims(manifest, f"{where}/manifest.json")
    return Projector(net.config.hidden_size, repa.proj_hidden, dims), dims


def token_targets(features: torch.Tensor, grid: int) -> torch.Tensor:
    """(B, gh, gw, K) stored grids -> (B, K, grid, grid) float32 on the model's full token grid,
    resampled by area where the sizes differ (each token takes the mean of the features over
    its place), unchanged where they agree."""
    t = features.float().permute(0, 3, 1, 2)
    return t if tuple(t.shape[-2:]) == (grid, grid) else F.adaptive_avg_pool2d(t, grid)


def patch_targets(targets: torch.Tensor, offsets: torch.Tensor, size: int, patch: int) -> torch.Tensor:
    """The (B, (size/p)^2, K) targets of patches of side ``size`` cut at ``offsets`` (B, 2: row,
    col, in latent cells, multiples of p): the full token grid's crop, in the DiT's token order."""
    B, K, G, _ = targets.shape
    s, off = size // patch, offsets.to(targets.device) // patch
    ar = torch.arange(s, device=targets.device)
    idx = ((off[:, 0, None] + ar)[:, :, None] * G + (off[:, 1, None] + ar)[:, None, :]).view(B, 1, s * s)
    return targets.flatten(2).gather(2, idx.expand(B, K, -1)).transpose(1, 2)


def alignment_loss(projected: torch.Tensor, targets: torch.Tensor, kept: torch.Tensor | None) -> torch.Tensor:
    """Per-sample REPA loss (B,): the mean over the counted tokens of -cos(projected, target).
    ``kept`` (B, T') names the tokens that went through the aligned block under routing."""
    if kept is not None:
        targets = targets.gather(1, kept[..., None].expand(-1, -1, targets.shape[-1]))
    z, t = F.normalize(projected.float(), dim=-1), F.normalize(targets, dim=-1)
    return -(z * t).sum(dim=-1).mean(dim=1)


def aligned_tokens(model: ModelConfig, repa: RepaConfig, tokens: int) -> int:
    """Tokens the projector sees in training: all of a patch's, or the routed blocks' share when
    the aligned block lies in the routed span (models.dit: route_start..route_end, 0-based)."""
    from .models.dit import routed_keep

    i, ratio = repa.block - 1, model.route_ratio or 0.0
    if ratio > 0 and model.route_start is not None and model.route_start <= i <= model.route_end:
        return routed_keep(tokens, ratio)
    return tokens


def forward_flops(model: ModelConfig, repa: RepaConfig, hidden: int, tokens: int, dims: int) -> float:
    """Forward FLOPs (2 per MAC) of the projector and the loss for one patch of ``tokens`` tokens:
    three matmuls per aligned token, and for the loss two norms and a dot product of K values."""
    n, h, ph = aligned_tokens(model, repa, tokens), hidden, repa.proj_hidden
    return float(n * (2 * (h * ph + ph * ph + ph * dims) + 3 * 2 * dims))
