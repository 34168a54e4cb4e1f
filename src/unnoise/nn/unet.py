"""A text-conditioned UNet for pixel space: F(c_in x, c_noise, text) -> (B, C, H, W).

Residual blocks carry the noise embedding (plus the pooled text embedding) as a scale and shift; at the
resolutions listed in `attention_levels` each residual block is followed by a transformer block with
self-attention and cross-attention to the text tokens. The network knows nothing of the formulation:
`unnoise.diffusion.denoiser.Denoiser` wraps it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..text.encoders import TextEmbedding, masked_mean
from .layers import (
    Downsample,
    NetworkConfigBase,
    NoiseEmbedding,
    PerImageLinear,
    ResBlock,
    TextRefiner,
    TransformerBlock,
    Upsample,
    group_norm,
    sincos_positions,
    zero_init,
)


@dataclass(frozen=True)
class UNetConfig(NetworkConfigBase):
    """The network's shape. Level i works at resolution / 2^i with channels * channel_mult[i] channels."""

    kind: ClassVar[str] = "unet"

    resolution: int = 32
    in_channels: int = 3
    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 2
    attention_levels: tuple[int, ...] = (1, 2)  # level indices with cross-attention to the text
    self_attention_levels: tuple[int, ...] = (2,)  # level indices that also have self-attention
    head_channels: int = 32
    text_dim: int = 384  # all-MiniLM-L6-v2's hidden size
    dropout: float = 0.0
    text_layers: int = 0  # trainable self-attention layers over the frozen encoder's tokens
    position_embedding: bool = False  # fixed 2-D sine-cosine positions added after the stem (learned gain)
    patch: int = 1  # the stem folds p x p pixels into one position (pixel unshuffle); the output unfolds them
    query_positions: bool = False  # cross-attention queries carry each pixel's place (TransformerBlock)

    def __post_init__(self):
        stride = self.stride
        if self.patch < 1:
            raise ValueError(f"the patch must be at least 1, got {self.patch}")
        if self.resolution % stride:
            raise ValueError(
                f"the resolution {self.resolution} is not a multiple of the UNet's stride {stride}"
            )

    @property
    def stride(self) -> int:
        """Image sides must be multiples of this: the patch, times one halving per level below the first."""
        return self.patch * 2 ** (len(self.channel_mult) - 1)

    def build(self) -> UNet:
        return UNet(self)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config.channels
        widths = [c * m for m in config.channel_mult]  # channels per level
        emb_dim = 4 * c
        self.noise_embedding = NoiseEmbedding(emb_dim)
        self.pooled_text = PerImageLinear(config.text_dim, emb_dim)
        folded = config.in_channels * config.patch**2  # channels of the patch-folded image
        self.stem = nn.Conv2d(folded, c, 3, padding=1)
        self.positions = zero_init(nn.Conv2d(c, c, 1)) if config.position_embedding else None
        self.text_refiner = TextRefiner(config.text_dim, config.text_layers, head_channels=64)

        def block(c_in: int, c_out: int, level: int) -> nn.ModuleList:
            layers = [ResBlock(c_in, c_out, emb_dim, config.dropout)]
            if level in config.attention_levels:
                self_attention = level in config.self_attention_levels
                layers.append(
                    TransformerBlock(
                        c_out,
                        config.text_dim,
                        config.head_channels,
                        self_attention=self_attention,
                        query_positions=config.query_positions,
                    )
                )
            return nn.ModuleList(layers)

        self.down, skip_widths, width = nn.ModuleList(), [c], c
        for level, w in enumerate(widths):
            for _ in range(config.blocks_per_level):
                self.down.append(block(width, w, level))
                width = w
                skip_widths.append(width)
            if level < len(widths) - 1:
                self.down.append(nn.ModuleList([Downsample(width)]))
                skip_widths.append(width)

        deepest = len(widths) - 1
        self.middle = nn.ModuleList(
            [
                ResBlock(width, width, emb_dim, config.dropout),
                TransformerBlock(
                    width, config.text_dim, config.head_channels, query_positions=config.query_positions
                ),
                ResBlock(width, width, emb_dim, config.dropout),
            ]
        )

        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            for _ in range(config.blocks_per_level + 1):
                self.up.append(block(width + skip_widths.pop(), widths[level], level))
                width = widths[level]
            if level > 0:
                self.up.append(nn.ModuleList([Upsample(width)]))
        assert not skip_widths and deepest >= 0

        self.out_norm = group_norm(width)
        self.out = zero_init(nn.Conv2d(width, folded, 3, padding=1))

    def _run(self, layers: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor, text) -> torch.Tensor:
        for layer in layers:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, TransformerBlock):
                h = layer(h, text)
            else:
                h = layer(h)
        return h

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, text=None) -> torch.Tensor:
        """x (B, C, H, W) already scaled by c_in; c_noise (B,); text with .tokens (B, T, D), .mask (B, T),
        .pooled (B, D), or None for an unconditional call."""
        emb = self.noise_embedding(c_noise)  # (B, 4c)
        if text is not None:
            text = self.refine(text)
            emb = emb + self.pooled_text(text.pooled.to(emb.dtype))
        emb = F.silu(emb)

        p = self.config.patch
        h = self.stem(F.pixel_unshuffle(x, p) if p > 1 else x)  # (B, c, H / p, W / p)
        if self.positions is not None:
            _, c, H, W = h.shape
            grid = sincos_positions(H, W, c).to(h).T.reshape(1, c, H, W)  # (1, c, H, W)
            h = h + self.positions(grid)
        skips = [h]
        for layers in self.down:
            h = self._run(layers, h, emb, text)
            skips.append(h)
        h = self._run(self.middle, h, emb, text)  # (B, c_deep, H / 2^L, W / 2^L)
        for layers in self.up:
            if isinstance(layers[0], Upsample):
                h = layers[0](h)
            else:
                h = self._run(layers, torch.cat([h, skips.pop()], dim=1), emb, text)
        out = self.out(F.silu(self.out_norm(h)))  # (B, C p^2, H / p, W / p)
        return F.pixel_shuffle(out, p) if p > 1 else out  # (B, C, H, W)

    def refine(self, text: TextEmbedding) -> TextEmbedding:
        """The text with refined tokens and, as its pooled vector, their masked mean (when refining)."""
        if not self.config.text_layers:
            return text
        tokens = self.text_refiner(text.tokens, text.mask)  # (B, T, D)
        return replace(text, tokens=tokens, pooled=masked_mean(tokens, text.mask))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
