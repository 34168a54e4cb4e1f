"""Image codecs: what the denoiser's space is. pixels (B, 3, H, W) in [-1, 1] <-> z (B, c, H/f, W/f).

A pixel model holds the identity; a latent model an autoencoder whose latents are made unit-variance per
channel by statistics measured on its training images and stored with it (Rombach et al. 2022, sec. 4.3:
"rescale the latents by the component-wise standard deviation"). Samplers, guidance and editing never know
which: the Pipeline encodes an image to edit, samples in z, and decodes what comes out. Stable Diffusion's
AutoencoderKL is one more codec of the same shape (a scale factor instead of per-channel statistics).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from .errors import UnnoiseError
from .nn.autoencoder import Autoencoder, AutoencoderConfig


@runtime_checkable
class Codec(Protocol):
    """pixels <-> what the network sees. `factor`: pixels per latent position along a side."""

    factor: int
    channels: int
    name: str
    fingerprint: str  # changes with the codec's weights (a latent cache is keyed by it)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...

    def preview(self, z: torch.Tensor) -> torch.Tensor: ...


class IdentityCodec:
    """Pixel models: the network sees the pixels themselves."""

    factor, channels, name, fingerprint = 1, 3, "pixels", "pixels"

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def preview(self, z: torch.Tensor) -> torch.Tensor:
        return z


@dataclass(frozen=True)
class LatentStatistics:
    """Per-channel mean and standard deviation of a training set's raw latents: z = (raw - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        if len(self.mean) != len(self.std) or not all(s > 0 for s in self.std):
            raise ValueError("latent statistics need one mean and one positive std per channel")

    @classmethod
    def measure(cls, raw: torch.Tensor) -> LatentStatistics:
        """From raw latents (N, c, h, w)."""
        flat = raw.transpose(0, 1).flatten(1).double()  # (c, N h w)
        return cls(tuple(flat.mean(1).tolist()), tuple(flat.std(1).clamp_min(1e-6).tolist()))

    def shaped(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device)[None, :, None, None]
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device)[None, :, None, None]
        return mean, std  # (1, c, 1, 1) each


class AutoencoderCodec:
    """unnoise's own autoencoder with its latent statistics."""

    def __init__(
        self,
        autoencoder: Autoencoder,
        statistics: LatentStatistics,
        name: str = "autoencoder",
        fingerprint: str = "",
    ):
        self.autoencoder, self.statistics, self.name = autoencoder, statistics, name
        self.fingerprint = fingerprint or f"{name}:{statistics}"
        self.factor = autoencoder.config.factor
        self.channels = autoencoder.config.latent_channels

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        raw = self.autoencoder.encoder(pixels)  # (B, c, H/f, W/f)
        mean, std = self.statistics.shaped(raw)
        return (raw - mean) / std

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self.statistics.shaped(z)
        return self.autoencoder.decoder(z * std + mean).clamp(-1, 1)  # (B, 3, H, W)

    def preview(self, z: torch.Tensor) -> torch.Tensor:
        """The full decoder: the cheapest preview that looks right at 64x64 (benchmarks/latent_preview.py)."""
        return self.decode(z)

    def to(self, device: torch.device | str) -> AutoencoderCodec:
        self.autoencoder.to(device)
        return self


def latent_size_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A pixel mask (B, 1, H, W), True = regenerate, at latent size (B, 1, H/f, W/f): a latent position is
    regenerated if any pixel it covers is (max pooling), so the decoded change covers the whole mask."""
    if factor == 1:
        return mask
    return F.max_pool2d(mask.float(), factor) > 0


def load_codec(folder: str | Path) -> AutoencoderCodec:
    """An autoencoder release (train-autoencoder's model/): checked config, then weights; never unpickled."""
    from .release import AUTOENCODER_FORMAT, materialise, read_release_config

    folder = Path(folder)
    config = read_release_config(folder)
    if config.get("format") != AUTOENCODER_FORMAT:
        raise UnnoiseError(
            f"{folder} is not an autoencoder release (its config.json says format {config.get('format')!r});"
            " give the model/ folder `unnoise train-autoencoder` wrote"
        )
    try:
        network_config = AutoencoderConfig.from_dict(config["network"])
        statistics = LatentStatistics(**config["latent_statistics"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        raise UnnoiseError(f"{folder}: config.json does not describe an autoencoder ({error})") from None
    if len(statistics.mean) != network_config.latent_channels:
        raise UnnoiseError(
            f"{folder}: config.json gives latent statistics for {len(statistics.mean)} channels, but the"
            f" autoencoder makes {network_config.latent_channels}"
        )
    autoencoder = materialise(folder, network_config, config)
    name = folder.resolve().parent.name if folder.resolve().name == "model" else folder.resolve().name
    return AutoencoderCodec(
        autoencoder.eval().requires_grad_(False),
        statistics,
        name=name,
        fingerprint=config.get("weights_sha256", ""),
    )
