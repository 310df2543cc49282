"""The ADM U-Net (Dhariwal & Nichol 2021) the Patch Diffusion authors trained, built from diffusers' UNet2DModel.

The authors used EDM's re-implementation of ADM ("DhariwalUNet"). UNet2DModel expresses the same
network when configured as below:
- resolution levels with ``channels * mult`` channels and ``num_blocks`` residual blocks each
  (``num_blocks + 1`` on the way up), skip connections after the input conv, every block and
  every downsampling;
- down/upsampling by residual blocks (``downsample_type="resnet"`` / ResnetUpsampleBlock2D:
  ADM's ``resblock_updown``, 2x2 average pooling / nearest upsampling, no resample projection);
- adaptive group norm (``resnet_time_scale_shift="scale_shift"``: ADM's ``use_scale_shift_norm``),
  group norm 32, eps 1e-5, dropout inside every residual block;
- self-attention with 64 channels per head after every block of a level whose resolution is in
  ``attn_resolutions``, and a middle block resnet-attention-resnet (its group norm set explicitly:
  diffusers drops it by default under scale_shift);
- time: sinusoidal embedding of ``channels`` features (cos first, periods up to 10^4, EDM's
  PositionalEmbedding) of c_noise = ln(sigma)/4 UNSCALED, as EDM feeds DhariwalUNet, then an
  MLP to 4 * channels; the class embedding (a table with a null row) is added to it;
- zero-initialised last conv of every residual block, attention output projection and output
  conv (EDM's ``init_zero``), so each block starts as the identity.
Remaining differences: diffusers' attention uses linear q/k/v/out projections (ADM: 1x1 convs,
the same function) and the class embedding is a table (EDM: a bias-free linear of the one-hot
label, the same function except that EDM's dropped label is the zero vector, ours a learned null
row). Attention placement is decided per level from the FULL latent side, so a 16 x 16 patch runs
through the very same modules as the 32 x 32 latent (attention then acts at 16/8/4).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from diffusers import UNet2DModel


class ADMUNet(UNet2DModel):
    """UNet2DModel with our call signature: ``net(x, c_noise, class_labels) -> (B, C, h, w)``."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        return super().forward(x, c_noise.reshape(-1), class_labels, return_dict=False)[0]


def build_adm_unet(
    in_channels: int,
    out_channels: int,
    latent_size: int,
    num_classes: int,
    channels: int = 192,
    channel_mult: Sequence[int] = (1, 2, 3, 4),
    num_blocks: int = 3,
    attn_resolutions: Sequence[int] = (32, 16, 8),
    head_channels: int = 64,
    dropout: float = 0.1,
) -> ADMUNet:
    """Configure UNet2DModel as ADM (see the module docstring); input sides must be divisible by 2^(levels-1)."""
    levels = len(channel_mult)
    attn = [(latent_size >> i) in set(attn_resolutions) for i in range(levels)]
    net = ADMUNet(
        sample_size=latent_size,
        in_channels=in_channels,
        out_channels=out_channels,
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=tuple("AttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(channels * m for m in channel_mult),
        layers_per_block=num_blocks,
        downsample_type="resnet",
        upsample_type="resnet",
        dropout=dropout,
        act_fn="silu",
        attention_head_dim=head_channels,
        norm_num_groups=32,
        attn_norm_num_groups=32,
        norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift",
        add_attention=True,
        num_class_embeds=num_classes + 1,  # row num_classes = null class
    )
    _zero_init_outputs(net)
    return net


def _zero_init_outputs(net: UNet2DModel) -> None:
    """Zero the layers that end a residual branch (EDM's init_zero), so every block starts as identity."""
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    for m in net.modules():
        if isinstance(m, ResnetBlock2D):
            _zero(m.conv2)
        elif isinstance(m, Attention):
            _zero(m.to_out[0])
    _zero(net.conv_out)


def _zero(layer: nn.Module) -> None:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
