"""What lets a run be watched: TensorBoard logs (an optional extra) and the validation loss on held-out
images at fixed noise levels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..errors import UnnoiseError

VALIDATION_IMAGES = 64  # held-out images the validation loss is measured on (the first, always the same)
VALIDATION_LEVELS = 6  # noise levels, log-spaced over the formulation's range


class Board:
    """TensorBoard's SummaryWriter under OUT/tensorboard, or nothing when it is off (and on ranks > 0)."""

    def __init__(self, folder: Path, enabled: bool):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UnnoiseError(
                '--tensorboard needs TensorBoard: pip install "unnoise[tensorboard]"'
            ) from None
        self.writer = SummaryWriter(str(folder))

    def scalars(self, step: int, prefix: str = "train", **values: float) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
            self.writer.flush()

    def image(self, name: str, image, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def validation_levels(formulation) -> list[float]:
    """VALIDATION_LEVELS noise levels from the formulation's smallest to its largest, evenly in log sigma."""
    low, high = math.log(formulation.sigma_min), math.log(formulation.sigma_max)
    return [math.exp(low + (high - low) * i / (VALIDATION_LEVELS - 1)) for i in range(VALIDATION_LEVELS)]


@torch.no_grad()
def validation_loss(run) -> dict[str, float] | None:
    """The EMA model's loss (the formulation's weighting) on the first held-out images at each fixed noise
    level, with fixed noise: comparable from one checkpoint to the next. None without held-out images."""
    from ..diffusion.denoiser import Denoiser

    held = getattr(run.source, "held_out_indices", lambda: [])()[:VALIDATION_IMAGES]
    if not held:
        return None
    dataset = run.source.dataset
    pixels = torch.stack([dataset[i][0] for i in held]).to(run.setup.device)  # (N, 3, R, R) in [-1, 1]
    x0 = pixels if run.codec is None else run.codec.encode(pixels)
    cond = run.text.encode([dataset.captions[i] for i in held]).to(run.setup.device)
    denoiser = Denoiser(run.ema.module, run.formulation)
    generator = torch.Generator().manual_seed(0)
    losses = {}
    for sigma in validation_levels(run.formulation):
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        sigmas = torch.full((len(x0),), sigma, device=x0.device)
        losses[f"sigma_{sigma:.3g}"] = float(denoiser.loss(x0, sigmas, noise, cond).mean())
    losses["mean"] = sum(losses.values()) / len(losses)
    return losses
