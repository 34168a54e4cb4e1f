"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022).

    D_w(x; sigma, cond) = D(x; sigma, uncond) + w * (D(x; sigma, cond) - D(x; sigma, uncond))

on every channel. w = 1 is the conditional denoiser (no guidance), w = 0 the unconditional one; a
negative prompt is simply the `uncond` condition. Both denoiser evaluations go in one batch when the
conditions can be stacked (tensors, or objects with a `cat` classmethod such as `TextEmbedding`): one
network call of batch 2B is faster than two of batch B, most of all for the single images people ask for.
"""

from __future__ import annotations

from typing import Any

import torch


def stack_conditions(first: Any, second: Any) -> Any | None:
    """[first; second] along the batch, or None when they cannot be stacked (then: two calls)."""
    if isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor):
        return torch.cat([first, second]) if first.shape[1:] == second.shape[1:] else None
    if type(first) is type(second) and callable(getattr(type(first), "cat", None)):
        return type(first).cat([first, second])
    return None


def cfg(denoiser, scale: float, uncond: Any):
    """A denoiser that applies guidance scale `scale` between `cond` (given per call) and `uncond`."""

    def guided(x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if scale == 1.0:
            return denoiser(x, sigma, cond)
        both = stack_conditions(uncond, cond)
        if both is None:
            unconditional, conditional = denoiser(x, sigma, uncond), denoiser(x, sigma, cond)
        else:  # x (B, ...), sigma (B,) -> one call on (2B, ...)
            unconditional, conditional = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        return unconditional + scale * (conditional - unconditional)

    return guided
