"""Named network shapes: `tiny` for tests, `small` for 32x32 on a CPU, `large` for 64x64, `latent-small` for
the 16x16 latents of a 64x64 autoencoder and `pixel-64` for 64x64 pixels folded 4x4 (its fair baseline).

`small` was chosen by measured training speed on 2 CPU cores (bf16, batch 64): 32 base channels with
(1, 2, 4) multipliers trains at about 44 images/s with 5.7M parameters, where 64 channels with (1, 2, 2)
gave 17 images/s, and self-attention at 16x16 as well cost another 3x.
"""

from __future__ import annotations

from dataclasses import replace

from .transformer import TransformerConfig
from .unet import UNetConfig

NetworkConfig = UNetConfig | TransformerConfig

PRESETS: dict[str, NetworkConfig] = {
    "tiny": UNetConfig(
        resolution=16,
        channels=32,
        channel_mult=(1, 2),
        blocks_per_level=1,
        attention_levels=(1,),
        self_attention_levels=(1,),
        head_channels=16,
    ),
    "small": UNetConfig(
        resolution=32,
        channels=32,
        channel_mult=(1, 2, 4),
        blocks_per_level=2,
        attention_levels=(1, 2),
        self_attention_levels=(2,),
    ),
    "large": UNetConfig(
        resolution=64,
        channels=64,
        channel_mult=(1, 2, 3, 4),
        blocks_per_level=2,
        attention_levels=(2, 3),
        self_attention_levels=(3,),
    ),
    # issue 11's alternative: a transformer over 2x2 patches with the text tokens in its sequence (U-ViT)
    "dit-small": TransformerConfig(resolution=32, patch=2, width=192, depth=8, head_channels=48),
    "dit-tiny": TransformerConfig(resolution=16, patch=2, width=64, depth=2, head_channels=32),
    # issue 11's faster candidates: 4x4 patches (64 image tokens at 32x32) ...
    "dit-p4": TransformerConfig(resolution=32, patch=4, width=256, depth=8, head_channels=64),
}


# issue 11's candidate fix: `small` with fixed 2-D positions and two trainable text layers
PRESETS["small-pos"] = replace(PRESETS["small"], text_layers=2, position_embedding=True)
# ... and a UNet on 2x2-folded pixels (16, 8, 4) with positions and cross-attention at every level
PRESETS["small-p2"] = UNetConfig(
    resolution=32,
    patch=2,
    channels=64,
    channel_mult=(1, 2, 2),
    attention_levels=(0, 1, 2),
    self_attention_levels=(1, 2),
    text_layers=2,
    position_embedding=True,
)

# ... the same with each pixel's place in its cross-attention queries
PRESETS["small-p2q"] = replace(PRESETS["small-p2"], query_positions=True)


def network_config_from_dict(values: dict) -> NetworkConfig:
    """A release's network config: {"kind": "transformer", ...}, or a UNet's (releases before the kinds)."""
    kinds = {c.kind: c for c in (UNetConfig, TransformerConfig)}
    kind = values.get("kind", "unet")
    if kind not in kinds:
        raise ValueError(f"unknown network kind {kind!r}; known: {', '.join(kinds)}")
    return kinds[kind].from_dict(values)


# Issue 29: real images at 64x64. small-p2q's UNet on the 16x16 latents of an f4 autoencoder (the channels
# are the codec's, set by `train --autoencoder`) ...
PRESETS["latent-small"] = replace(PRESETS["small-p2q"], resolution=16, patch=1, in_channels=4)
PRESETS["latent-tiny"] = replace(PRESETS["tiny"], resolution=8, in_channels=4)
# ... and the same UNet on 64x64 pixels folded 4x4 into 48 channels at 16x16: the pixel baseline of equal
# cost
PRESETS["pixel-64"] = replace(PRESETS["small-p2q"], resolution=64, patch=4)
