"""Exponential moving average of the weights, with its memory given as a half-life in training images."""

from __future__ import annotations

import copy

import torch


def ema_decay(batch_images: int, images_seen: int, half_life: float, warmup: float) -> float:
    """beta per step such that the average forgets half its past after `half_life` images.

    During warm-up the half-life is capped at `warmup * images_seen` so early weights fade fast
    (as EDM's ema_rampup_ratio does).
    """
    if warmup > 0:
        half_life = min(half_life, warmup * images_seen)
    return 0.5 ** (batch_images / max(half_life, 1e-8))


class EMA:
    """A frozen copy of a module that follows it by x_ema <- beta x_ema + (1 - beta) x."""

    def __init__(self, module: torch.nn.Module):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module, beta: float) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in module.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - beta)
        for ema_buffer, buffer in zip(self.module.buffers(), module.buffers(), strict=True):
            ema_buffer.copy_(buffer)
