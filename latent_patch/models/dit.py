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
- The 2025 block (LightningDiT, Yao et al. 2025, Table 1), each part its own option, defaults
  the 2022 block: ``pos="rope"`` (2-D axial rotary positions of each token's absolute cell on the
  full latent, read from the coordinate channels like the sin-cos ones, so a crop's tokens rotate
  exactly as the full latent's at the same cells), ``mlp="swiglu"``, ``norm="rms"`` and
  ``qk_norm``; ``coord_channels=False`` keeps the coordinates out of the patch embedding (they
  still set the positions).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.utils.checkpoint
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from timm.layers import Attention as TimmAttention
from timm.layers import GluMlp, Mlp

POS = ("sincos", "rope")
MLPS = ("gelu", "swiglu")
NORMS = ("layer", "rms")
ROPE_THETA = 10000.0  # LightningDiT's (from EVA): periods 2*pi .. 2*pi*10^4 token spacings


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


def swiglu_hidden(hidden: int, mlp_ratio: float) -> int:
    """SwiGLU's inner width: 2/3 of the GELU MLP's, rounded to a multiple of 8, so its three
    matrices hold about the parameters (and FLOPs) of the GELU MLP's two (3072 for DiT-XL's 1152)."""
    return max(8, 8 * round(2 / 3 * mlp_ratio * hidden / 8))


def _rms(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / rms(x), 1 / rms(x)) over the last dim, in float32: one pass for the norm."""
    x = x.float()
    rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
    return x * rstd, rstd


def _rms_grad(grad: torch.Tensor, n: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """d/dx of n = x * rstd(x), given the gradient of n: rstd * (grad - n * mean(grad * n))."""
    dot = torch.linalg.vecdot(grad, n).unsqueeze(-1).div_(-n.shape[-1])
    return torch.addcmul(grad, n, dot).mul_(rstd)


def _weight_grad(grad: torch.Tensor, n: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The gradient of a per-dim weight that multiplies n, summed over every token and head."""
    return (grad * n).reshape(-1, n.shape[-1]).sum(0).to(weight.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """RMS norm over the last dim in float32 with a hand-written backward: five passes over the
    tokens instead of the dozen of torch's composite rms_norm, which has no fused CPU kernel
    (forward + backward of the block's norm 0.86 vs 2.6 ms at (8, 256, 192), LayerNorm's fused
    kernel 0.70: BENCHMARKS.md, issue 29)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        n, rstd = _rms(x, eps)
        ctx.save_for_backward(n, rstd, weight)
        return (n if weight is None else n * weight).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        n, rstd, weight = ctx.saved_tensors
        g = grad.float()
        grad_weight = None
        if weight is not None:
            if ctx.needs_input_grad[1]:
                grad_weight = _weight_grad(g, n, weight)
            g = g * weight
        return _rms_grad(g, n, rstd).to(grad.dtype), grad_weight, None


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm (same parameters and state-dict keys; the same values to float rounding),
    on the CPU through ``_RMSNormFunction``; elsewhere torch's own (fused where torch has a kernel,
    and what torch.compile fuses anyway)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def token_norm(kind: str, dim: int, affine: bool, **factory: object) -> nn.Module:
    """LayerNorm or RMSNorm over the last dim. The block's norms are not affine (adaLN scales them,
    as DiT's LayerNorms); the q/k norms are (per head dim, as timm and LightningDiT). ``factory``:
    the device/dtype keywords timm passes to a norm layer."""
    if kind == "rms":
        return RMSNorm(dim, eps=1e-6, elementwise_affine=affine, **factory)
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine, **factory)


def rope_frequencies(head_dim: int) -> torch.Tensor:
    """The head_dim/4 angular frequencies of each axis of 2-D axial RoPE (EVA's and LightningDiT's)."""
    n = head_dim // 4
    return ROPE_THETA ** (-torch.arange(n, dtype=torch.float32) / n)


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """(a, b) -> (b, a) over the last dim: pairs dims i and i + d/2 for the rotation."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat([b, a], dim=-1)


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate query or key heads x (B, T, H, d) by per-token angles: rope = (cos, sin) from
    ``DiT.rope``, each (B, T, 1, d), the half-width angles twice with the sine's first half
    negated. Dims i and i + d/2 form a pair (a, b) -> (a cos - b sin, b cos + a sin); the first
    d/4 pairs turn with the token's row, the last d/4 with its column. In float32 (angles of a
    16x16 grid need more than bf16's 8 bits)."""
    cos, sin = rope
    x32 = x.float()
    return torch.addcmul(x32 * cos, swap_halves(x32), sin).to(x.dtype)


class _NormRotateFunction(torch.autograd.Function):
    """``rotate(rms_norm(x) * weight, (cos, sin))`` in one function, the weight folded into the
    (B, T, 1, d) angles, with a hand-written backward: the attention's q/k norm and rotation on
    the CPU, where autograd's dozen passes over q and k cost more than the rest of the 2025 block's
    extra work (BENCHMARKS.md, issue 29)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                eps: float) -> torch.Tensor:
        n, rstd = _rms(x, eps)
        ctx.save_for_backward(n, rstd, weight, cos, sin)
        ctx.input_dtype = x.dtype
        return torch.addcmul(n * (weight * cos), swap_halves(n), swap_halves(weight) * sin)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None, None, None]:
        n, rstd, weight, cos, sin = ctx.saved_tensors
        g = grad.float()
        g = torch.addcmul(g * cos, swap_halves(g), sin, value=-1)  # the rotation's transpose: back by -angle
        grad_weight = _weight_grad(g, n, weight) if ctx.needs_input_grad[1] else None
        return _rms_grad(g * weight, n, rstd).to(ctx.input_dtype), grad_weight, None, None, None


class Attention(TimmAttention):
    """timm's attention (same parameters and state-dict keys). With rotary positions (``rope``) or
    q/k norms, our own forward: the norms and the rotation run on the (B, T, H, d) layout the qkv
    projection gives (2.5x faster on the CPU than on timm's permuted heads), in float32; with
    neither, timm's forward unchanged (the 2022 block, bit for bit)."""

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if rope is None and isinstance(self.q_norm, nn.Identity):
            return super().forward(x)
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).unbind(2)  # (B, N, H, d)
        q, k = (self.norm_rotate(a, norm, rope) for norm, a in ((self.q_norm, q), (self.k_norm, k)))
        q, k, v = (a.to(v.dtype).transpose(1, 2) for a in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = getattr(self, "norm", nn.Identity())(x.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(self.proj(x))

    @staticmethod
    def norm_rotate(x: torch.Tensor, norm: nn.Module, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """A query or key (B, N, H, d) normed (or not) and rotated (or not), in float32."""
        if rope is not None and type(norm) is RMSNorm and x.device.type == "cpu":
            return _NormRotateFunction.apply(x, norm.weight, *rope, norm.eps)
        x = norm(x.float())
        return x if rope is None else rotate(x, rope)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated (shift, scale, gate) by the condition.

    ``mlp``: "gelu" (DiT's 4x GELU-tanh MLP) or "swiglu" (one fused input matrix to 2 x
    ``swiglu_hidden``, SiLU gate); ``norm``: "layer" or "rms" for the block norms and, with
    ``qk_norm``, for the per-head q/k norms."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float, dropout: float, mlp: str = "gelu",
                 norm: str = "layer", qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = token_norm(norm, hidden, affine=False)
        self.attn = Attention(hidden, num_heads=heads, qkv_bias=True, proj_drop=dropout, qk_norm=qk_norm,
                              norm_layer=partial(token_norm, norm, affine=True))
        self.norm2 = token_norm(norm, hidden, affine=False)
        if mlp == "swiglu":
            self.mlp = GluMlp(hidden, 2 * swiglu_hidden(hidden, mlp_ratio), act_layer=nn.SiLU, gate_last=False,
                              drop=dropout)
        else:
            self.mlp = Mlp(hidden, int(hidden * mlp_ratio), act_layer=_gelu_tanh, drop=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), sh1, sc1), rope)
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    """Modulated norm + linear to p*p*C values per token (unpatchified by the model)."""

    def __init__(self, hidden: int, patch: int, out_channels: int, norm: str = "layer") -> None:
        super().__init__()
        self.norm = token_norm(norm, hidden, affine=False)
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
    frequency, exactly DiT's integer token grid), not the input size. With ``pos="rope"`` the same
    token-grid positions (row, column) turn each head's queries and keys instead: attention then
    sees where tokens lie relative to each other, and the coordinate channels (unless
    ``coord_channels=False``) where they lie in the latent.
    ``in_channels`` counts the two coordinate channels, which every model is given
    (``edm.Precond``); ``coord_channels=False`` embeds only the first ``in_channels - 2``.
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
        pos: str = "sincos",
        mlp: str = "gelu",
        norm: str = "layer",
        qk_norm: bool = False,
        coord_channels: bool = True,
    ) -> None:
        super().__init__()
        if hidden_size % 4 or hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 and by num_heads {num_heads}")
        check_route(route_ratio, route_start, route_end, depth)
        check_block(pos, mlp, norm, hidden_size // num_heads)
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.pos_scale = (latent_size - 1) / (2 * patch_size)  # [-1, 1] -> full-latent token units
        embedded = in_channels if coord_channels else in_channels - 2
        self.x_embedder = nn.Conv2d(embedded, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.t_proj = Timesteps(freq_dim, flip_sin_to_cos=True, downscale_freq_shift=0, scale=time_scale)
        self.t_embedder = TimestepEmbedding(freq_dim, hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)  # row num_classes = null class
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, dropout, mlp, norm, qk_norm)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels, norm)
        self.gradient_checkpointing = False
        # made once (moves with the model), not at every step; not saved: a function of the widths
        freq = frequencies(hidden_size // 2) if pos == "sincos" else rope_frequencies(hidden_size // num_heads)
        self.register_buffer("pos_freq", freq, persistent=False)
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
        D = self.config.hidden_size
        u = self.token_positions(coords)
        return torch.cat([sincos(u[:, 0], D // 2, self.pos_freq), sincos(u[:, 1], D // 2, self.pos_freq)], dim=-1)

    def token_positions(self, coords: torch.Tensor) -> torch.Tensor:
        """(B, 2, T) float32 (x, y) of each token in full-latent token units: the mean coordinate of
        its p x p cell, so a crop's token and the full latent's token at the same cells agree."""
        return ((F.avg_pool2d(coords.float(), self.patch_size) + 1) * self.pos_scale).flatten(2)

    def rope(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (B, T, 1, head_dim) float32, as ``rotate`` takes them: the rotary
        angles of each token (its row times the first head_dim/4 frequencies, then its column
        times the same) twice, the sine's first copy negated. Computed once per forward, shared
        by every block."""
        u = self.token_positions(coords)
        angle = torch.cat([u[:, 1, :, None] * self.pos_freq, u[:, 0, :, None] * self.pos_freq], dim=-1)[:, :, None]
        cos, sin = angle.cos(), angle.sin()
        return torch.cat([cos, cos], dim=-1), torch.cat([-sin, sin], dim=-1)

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
        cfg, kept, aligned, coords = self.config, None, None, x[:, -2:]
        # contiguous (B, T, D): the conv's (B, D, T) seen transposed would keep every elementwise op
        # of the stream, and the matmuls fed by a norm that keeps layouts (RMSNorm), strided; values
        # are unchanged (the quick CPU bench's 2022 block: about 60 -> 65-68 GFLOP/s, BENCHMARKS.md)
        tokens = self.x_embedder(x if cfg.coord_channels else x[:, :-2]).flatten(2).transpose(1, 2).to(dtype)
        tokens = tokens.contiguous()
        rope = all_rope = self.rope(coords) if cfg.pos == "rope" else None
        if rope is None:
            tokens = tokens + self.pos_embed(coords).to(dtype)
        t = self.t_proj(c_noise.reshape(-1).expand(B)).to(dtype)
        c = (self.t_embedder(t) + self.y_embedder(class_labels)).to(dtype)
        for i, block in enumerate(self.blocks):
            if route is not None and i == cfg.route_start:
                kept = route[:, :routed_keep(tokens.shape[1], cfg.route_ratio)]
                keep = kept[..., None].expand(-1, -1, tokens.shape[2])
                skipped, tokens = tokens, tokens.gather(1, keep)
                if rope is not None:  # the kept tokens keep their own positions
                    at = kept[:, :, None, None].expand(-1, -1, 1, rope[0].shape[-1])
                    rope = (all_rope[0].gather(1, at), all_rope[1].gather(1, at))
            args = (tokens, c) if rope is None else (tokens, c, rope)
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                tokens = block(*args)
            if i + 1 == align_block:  # before a rejoin: only tokens that went through block i count
                aligned = (tokens, kept if route is not None and cfg.route_start <= i <= cfg.route_end else None)
            if route is not None and i == cfg.route_end:
                tokens = skipped.scatter(1, keep, tokens)
                rope = all_rope
        out = self.unpatchify(self.final_layer(tokens, c), H // p, W // p)
        return out if align_block is None else (out, *aligned)


def check_route(ratio: float, start: int | None, end: int | None, depth: int) -> None:
    """Refuse a routing that cannot work, naming the config keys."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"model.route_ratio={ratio} must lie in [0, 1)")
    if ratio > 0 and (start is None or end is None or not 0 <= start <= end < depth):
        raise ValueError(f"model.route_ratio={ratio} needs 0 <= model.route_start <= model.route_end < depth {depth} "
                         f"(the first and last block the kept tokens go through alone); got {start}, {end}")


def check_block(pos: str, mlp: str, norm: str, head_dim: int) -> None:
    """Refuse block options that do not exist or cannot work, naming the config key."""
    for key, value, known in (("pos", pos, POS), ("mlp", mlp, MLPS), ("norm", norm, NORMS)):
        if value not in known:
            raise ValueError(f"model.{key}={value!r} is unknown (known: {', '.join(known)})")
    if pos == "rope" and head_dim % 4:
        raise ValueError(f"model.pos=rope needs a head dim divisible by 4 (half per axis, in pairs); "
                         f"hidden / heads = {head_dim}")


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
