"""Exact likelihood through the probability-flow ODE (Song et al. 2021, Sec. 4.3 and App. D.2).

Along dx/du = f(x, u) = x - D(x; e^u), u = log sigma, the instantaneous change of variables gives
d log p(x(u)) / du = -div f = tr(dD/dx) - d. Integrating from sigma_min up to sigma_max, where the
marginal is close to N(0, sigma_max^2 I):

    log p(x; sigma_min) = log N(x(u_max); 0, sigma_max^2 I) + int_{u_min}^{u_max} (d - tr(dD/dx)) du.

The trace is exact (d backward passes: small d) or Hutchinson's estimate E[e^T (dD/dx) e] (Hutchinson
1989; Grathwohl et al. 2019), with Rademacher probes fixed over the solve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .samplers import bind
from .tensors import Generators, randn_like


@dataclass
class Likelihood:
    nll: torch.Tensor  # (B,) negative log-likelihood in nats, of the density at sigma_min
    dims: int  # d, the number of dimensions of one sample
    evaluations: int  # denoiser evaluations the ODE solver used

    def bits_per_dim(self, levels: int = 256, data_range: float = 2.0) -> torch.Tensor:
        return bits_per_dim(self.nll, self.dims, levels=levels, data_range=data_range)


def bits_per_dim(nll: torch.Tensor, dims: int, *, levels: int = 256, data_range: float = 2.0) -> torch.Tensor:
    """Bits per dimension of images with `levels` values per channel spread over `data_range`.

    Uniform dequantisation: a bin is data_range / levels wide, so bpd = nll / (d ln 2) + log2(levels /
    data_range) (e.g. + 7 for 8-bit images in [-1, 1], as in Song et al. 2021).
    """
    return nll / (dims * math.log(2)) + math.log2(levels / data_range)


def _trace_exact(denoised: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """tr(dD/dx) per sample by one backward pass per dimension. (B,)"""
    flat = denoised.flatten(1)
    trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for j in range(flat.shape[1]):
        (grad,) = torch.autograd.grad(flat[:, j].sum(), x, retain_graph=True)
        trace = trace + grad.flatten(1)[:, j]
    return trace


def _trace_hutchinson(denoised: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """tr(dD/dx) per sample ~ mean over probes e of e^T (dD/dx) e. probes: (P, B, ...). Returns (B,)"""
    trace = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for e in probes:
        (vjp,) = torch.autograd.grad(denoised, x, e, retain_graph=True)  # e^T dD/dx, (B, ...)
        trace = trace + (vjp * e).flatten(1).sum(1)
    return trace / len(probes)


def log_likelihood(
    denoiser,
    x: torch.Tensor,
    *,
    cond: Any = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    divergence: Literal["hutchinson", "exact"] = "hutchinson",
    probes: int = 1,
    generator: Generators = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Likelihood:
    """Negative log-likelihood of data x (B, ...) under the model's probability-flow ODE, in nats."""
    from torchdiffeq import odeint

    if divergence not in ("hutchinson", "exact"):
        raise ValueError(f"divergence must be 'hutchinson' or 'exact', got {divergence!r}")
    D = bind(denoiser, cond)
    dims = x[0].numel()
    rademacher = torch.stack([randn_like(x, generator).sign() for _ in range(probes)])  # (P, B, ...)
    evaluations = 0

    def dynamics(u, state):
        nonlocal evaluations
        x_u, _ = state
        evaluations += 1
        with torch.enable_grad():
            x_u = x_u.detach().requires_grad_(True)
            denoised = D(x_u, math.exp(float(u)))
            trace = (
                _trace_exact(denoised, x_u)
                if divergence == "exact"
                else _trace_hutchinson(denoised, x_u, rademacher)
            )
        return (x_u - denoised).detach(), dims - trace.detach()

    u = torch.tensor([math.log(sigma_min), math.log(sigma_max)], dtype=torch.float64)
    state = (x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
    x_end, delta = (s[-1] for s in odeint(dynamics, state, u, method="dopri5", rtol=rtol, atol=atol))
    prior = -0.5 * (x_end.flatten(1) ** 2).sum(1) / sigma_max**2 - 0.5 * dims * math.log(
        2 * math.pi * sigma_max**2
    )
    return Likelihood(nll=-(prior + delta), dims=dims, evaluations=evaluations)
