"""DiT (Peebles & Xie 2023) for patch-wise training: adaLN-Zero transformer with GLOBAL positions.

Differences from the original DiT, all for Patch Diffusion:
- Input is ``cat(c_in * x_noisy, coords)`` (C + 2 channels); output has C channels (no learned sigma).
- A token's position embedding is not looked up by its index in the input but computed from the
  coordinate channels: the coordinates are averaged over each p x p token cell, mapped to
  token-grid units of the FULL latent, and fed to a 2D sin-cos embedding. A token of a patch cut
  at an offset that is a multiple of p (how training crops for a DiT: ``models.offset_multiple``)
  groups the same cells and has the same embedding as the token at that place in the full latent
  (tested for every offset); any input side divisible by p works.
- Time is EDM's c_noise = ln(sigma) / 4 (see ``time_scale``), the class table has a null row.
- Optional token routing in training (TREAD, Krause et al. 2025): ``route_ratio`` of each
  sample's tokens skip blocks ``route_start..route_end`` and rejoin unchanged (see ``forward``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from timm.layers import Attention, Mlp


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine of normalised tokens (x: (B, T, D), shift/scale: (B, D))."""
    return x * (1 + scale[:, None]) + shift[:, None]


def frequencies(dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """The dim/2 angular frequencies of a sin-cos embedding: periods 2*pi .. 2*pi*max_period (DiT's)."""
    return max_period ** (-torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))


def sincos(u: torch.Tensor, dim: int, omega: torch.Tensor | None = None) -> torch.Tensor:
    """(..., dim) sin-cos features of continuous positions ``u`` (``omega``: precomputed frequencies)."""
    omega = frequencies(dim).to(u.device) if omega is None else omega
    angle = u.float()[..., None] * omega
    return torch.cat([angle.sin(), angle.cos()], dim=-1)


def _gelu_tanh() -> nn.Module:
    return nn.GELU(approximate="tanh")


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated (shift, scale, gate) by the condition."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True, proj_drop=dropout)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=_gelu_tanh, drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    """Modulated norm + linear to p*p*C values per token (unpatchified by the model)."""

    def __init__(self, hidden: int, patch: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(ModelMixin, ConfigMixin):
    """Class-conditional DiT: ``net(x (B, C+2, h, w), c_noise (B,), class_labels (B,)) -> (B, C, h, w)``.

    The last two input channels are the coordinates (``cat(c_in * x_noisy, coords)``); they feed
    the patch embedding like the latent channels AND set each token's position embedding (read
    in float32; a half-precision input rounds them to ~3 significant digits, still well below
    one token spacing).

    ``latent_size`` is the side R of the FULL latent the coordinates refer to; it fixes the scale
    of the position embedding (one token spacing of the full grid = one radian at the highest
    frequency, exactly DiT's integer token grid), not the input size.
    ``time_scale`` multiplies c_noise = ln(sigma)/4 before DiT's sinusoidal embedding (periods up
    to 10^4): c_noise spans about [-1.6, 1.1] over sigma in [0.002, 80], so x1000 spreads it over
    a range like DiT's integer timesteps (0..999), and the embedding's frequencies cover both the
    whole sigma range (lowest) and neighbouring sampler steps (highest).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 6,
        out_channels: int = 4,
        latent_size: int = 32,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        dropout: float = 0.0,
        time_scale: float = 1000.0,
        freq_dim: int = 256,
        route_ratio: float = 0.0,
        route_start: int | None = None,
        route_end: int | None = None,
    ) -> None:
        super().__init__()
        if hidden_size % 4 or hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 and by num_heads {num_heads}")
        check_route(route_ratio, route_start, route_end, depth)
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.pos_scale = (latent_size - 1) / (2 * patch_size)  # [-1, 1] -> full-latent token units
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=time_scale)
        self.t_embedder = TimestepEmbedding(freq_dim, hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # row num_classes = null class
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self.gradient_checkpointing = False
        # made once (moves with the model), not at every step; not saved: a function of hidden_size
        self.register_buffer("pos_freq", frequencies(hidden_size // 2), persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's init: xavier linears, N(0, 0.02) embeddings, zero adaLN and output (block = identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.t_embedder.linear_2.weight, std=0.02)
        for layer in [*(b.adaLN_modulation[-1] for b in self.blocks), self.final_layer.adaLN_modulation[-1]]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass (memory for compute).

        Our own switch and ``torch.utils.checkpoint``, not diffusers' hooks: those changed in
        diffusers 0.33 (``_gradient_checkpointing_func``), and pyproject allows 0.32."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def pos_embed(self, coords: torch.Tensor) -> torch.Tensor:
        """(B, T, D) float32 sin-cos embedding of each token's mean GLOBAL (x, y) coordinate.

        First half of D encodes x, second half y (as DiT). Computed from the coordinate channels,
        so it only depends on where the token lies in the full latent.
        """
        p, D = self.patch_size, self.config.hidden_size
        centre = F.avg_pool2d(coords.float(), p)  # (B, 2, h, w), token-cell means
        u = ((centre + 1) * self.pos_scale).flatten(2)  # (B, 2, T) in full-latent token units
        return torch.cat([sincos(u[:, 0], D // 2, self.pos_freq), sincos(u[:, 1], D // 2, self.pos_freq)], dim=-1)

    def unpatchify(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """(B, h*w, p*p*C) -> (B, C, h*p, w*p)."""
        p, C = self.patch_size, self.out_channels
        x = tokens.view(tokens.shape[0], h, w, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], C, h * p, w * p)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor,
                route: torch.Tensor | None = None, align_block: int | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``route`` (training only, from :func:`draw_route`): a per-sample token permutation; its
        first ``routed_keep(T)`` tokens go through blocks route_start..route_end, the others skip
        them and rejoin after route_end with their representation from before route_start
        (position embeddings were added before, so a rejoining token keeps its place). Without
        ``route`` (sampling) every token goes through every block.

        ``align_block`` (training with representation alignment, ``align.AlignedNet``): also return
        the tokens after that many blocks and, when they are the routed blocks' subset, which
        tokens they are: ``(output, tokens (B, T', D), kept (B, T') or None)``."""
        p = self.patch_size
        B, _, H, W = x.shape
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not divisible by the DiT patch size {p}")
        # the residual stream (tokens between blocks, the routed-around ones, c) stays in the
        # weights' dtype, fp32 under autocast, which runs only the matmuls in bf16: a bf16 stream
        # loses every block update under 1/256 of the residual (DiT and TREAD keep it fp32 too)
        dtype = self.x_embedder.weight.dtype
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2).to(dtype)  # (B, T, D)
        tokens = tokens + self.pos_embed(x[:, -2:]).to(dtype)
        t = self.t_proj(c_noise.reshape(-1).expand(B)).to(dtype)
        c = (self.t_embedder(t) + self.y_embedder(class_labels)).to(dtype)
        cfg, kept, aligned = self.config, None, None
        for i, block in enumerate(self.blocks):
            if route is not None and i == cfg.route_start:
                kept = route[:, :routed_keep(tokens.shape[1], cfg.route_ratio)]
                keep = kept[..., None].expand(-1, -1, tokens.shape[2])
                skipped, tokens = tokens, tokens.gather(1, keep)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, c, use_reentrant=False)
            else:
                tokens = block(tokens, c)
            if i + 1 == align_block:  # before a rejoin: only tokens that went through block i count
                aligned = (tokens, kept if route is not None and cfg.route_start <= i <= cfg.route_end else None)
            if route is not None and i == cfg.route_end:
                tokens = skipped.scatter(1, keep, tokens)
        out = self.unpatchify(self.final_layer(tokens, c), H // p, W // p)
        return out if align_block is None else (out, *aligned)


def check_route(ratio: float, start: int | None, end: int | None, depth: int) -> None:
    """Refuse a routing that cannot work, naming the config keys."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"model.route_ratio={ratio} must lie in [0, 1)")
    if ratio > 0 and (start is None or end is None or not 0 <= start <= end < depth):
        raise ValueError(f"model.route_ratio={ratio} needs 0 <= model.route_start <= model.route_end < depth {depth} "
                         f"(the first and last block the kept tokens go through alone); got {start}, {end}")


def routed_keep(tokens: int, ratio: float) -> int:
    """Tokens that go through the routed blocks: all but floor(tokens x ratio) (TREAD's count)."""
    return tokens - int(tokens * ratio)


def draw_route(batch: int, tokens: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """(B, T) int64: an independent random permutation of the token indices per sample (its
    first ``routed_keep`` entries are the kept tokens). Drawn from the training step's generator,
    so a resumed run draws the same routes; its shape is fixed by T, so compiled graphs stay static."""
    gen_device = generator.device if generator is not None else device
    noise = torch.rand(batch, tokens, generator=generator, device=gen_device)
    return noise.argsort(dim=1).to(device) if device is not None else noise.argsort(dim=1)
