"""Small tensor helpers shared by the diffusion math: broadcasting and per-sample random noise."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Generators = torch.Generator | Sequence[torch.Generator] | None


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a (B,) tensor broadcasts against a (B, ...) tensor."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def randn_like(x: torch.Tensor, generator: Generators = None) -> torch.Tensor:
    """Standard normal noise shaped like `x`.

    `generator` is one `torch.Generator` for the whole batch, or one per sample: with a list,
    sample i's noise depends only on generator i, so a seed gives the same image whatever the
    batch size.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=_device_of(generator, x)).to(
            x.device
        )
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    rows = [
        torch.randn(x.shape[1:], generator=g, dtype=x.dtype, device=_device_of(g, x)) for g in generator
    ]  # B x (...)
    return torch.stack(rows).to(x.device)  # (B, ...)


def _device_of(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else x.device


def batch_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """Turn a scalar noise level into the (B,) tensor every denoiser receives."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma
