"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022).

    D_w(x; sigma, cond) = D(x; sigma, uncond) + w * (D(x; sigma, cond) - D(x; sigma, uncond))

on every channel. w = 1 is the conditional denoiser (no guidance), w = 0 the unconditional one; a
negative prompt is simply the `uncond` condition.
"""

from __future__ import annotations

from typing import Any

import torch


def cfg(denoiser, scale: float, uncond: Any):
    """A denoiser that applies guidance scale `scale` between `cond` (given per call) and `uncond`."""

    def guided(x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        conditional = denoiser(x, sigma, cond)
        if scale == 1.0:
            return conditional
        unconditional = denoiser(x, sigma, uncond)
        return unconditional + scale * (conditional - unconditional)

    return guided
