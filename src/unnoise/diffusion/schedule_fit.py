"""Fit a few-step schedule to a model: the sigmas that make a sampler's n steps best match the exact ODE.

With 10 steps, where they go matters more than which solver takes them. In the spirit of Align Your
Steps (Sabour et al. 2024), which optimises a schedule per model, this fits the n - 1 noise levels between
sigma_max and 0 to minimise the RMS distance between the sampler's output and an accurate solution of the
probability-flow ODE (adaptive RK45 at a tight tolerance) from the same calibration noise. The fit is
derivative-free (Nelder-Mead over the log-sigma step sizes and the last noise level), so it works with any
deterministic sampler and any denoiser; it costs a few thousand sampler runs on the calibration batch.
Evaluate a fitted schedule on other noise than it was fitted on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import UnnoiseError
from .samplers import STOCHASTIC, get_sampler, sample
from .schedules import karras


@dataclass
class FittedSchedule:
    sigmas: torch.Tensor  # (steps + 1,) float64, decreasing, ending in 0
    calibration_error: float  # RMS distance to the reference on the calibration noise, fitted schedule
    initial_error: float  # the same for the Karras schedule the fit started from
    sampler_runs: int  # how many times the sampler ran during the fit


def ode_reference(
    denoiser,
    noise: torch.Tensor,
    *,
    sigma_min: float,
    sigma_max: float,
    cond: Any = None,
    tolerance: float = 1e-7,
) -> torch.Tensor:
    """x0_hat after an accurate probability-flow ODE solve from noise * sigma_max down to sigma_min."""
    return sample(
        denoiser,
        noise,
        karras(2, sigma_min, sigma_max),
        sampler="rk45",
        cond=cond,
        rtol=tolerance,
        atol=tolerance,
    )


def _sigmas_from(theta: np.ndarray, sigma_max: float, last_range: tuple[float, float]) -> torch.Tensor:
    """theta = (step-size logits (steps - 1,), last-level logit): softmax shares log(sigma_max / last)."""
    lo, hi = (math.log(s) for s in last_range)
    u_last = lo + (hi - lo) / (1 + math.exp(-float(theta[-1])))
    shares = torch.softmax(torch.as_tensor(theta[:-1], dtype=torch.float64), 0)  # (steps - 1,)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), shares.cumsum(0)])  # (steps,) from 0 to 1
    sigmas = (math.log(sigma_max) - (math.log(sigma_max) - u_last) * cumulative).exp()
    sigmas[0] = sigma_max  # exactly, not exp(log(sigma_max))
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def _theta_from(sigmas: torch.Tensor, last_range: tuple[float, float]) -> np.ndarray:
    """The inverse of `_sigmas_from` for a schedule whose last level lies inside last_range."""
    u = sigmas[:-1].log()
    lo, hi = (math.log(s) for s in last_range)
    p = (float(u[-1]) - lo) / (hi - lo)
    return np.concatenate([(u[:-1] - u[1:]).log().numpy(), [math.log(p / (1 - p))]])


def fit_schedule(
    denoiser,
    noise: torch.Tensor,
    *,
    steps: int,
    sampler: str = "unipc",
    cond: Any = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    last_sigma_range: tuple[float, float] = (0.002, 2.0),
    reference: torch.Tensor | None = None,
    max_sampler_runs: int = 3000,
    **options,
) -> FittedSchedule:
    """Fit `steps` noise levels for `sampler` on calibration `noise` (B, ...), starting from Karras (rho 7).

    The reference is the ODE solution down to sigma_min; the fitted schedule's last level is free within
    last_sigma_range (its final step returns x0_hat there).
    """
    from scipy.optimize import minimize

    if sampler in STOCHASTIC:
        raise UnnoiseError(
            f"{sampler} is stochastic: a schedule can only be fitted for a deterministic sampler"
        )
    if steps < 2:
        raise UnnoiseError(f"fitting needs at least 2 steps, got {steps}")
    get_sampler(sampler)
    if reference is None:
        reference = ode_reference(denoiser, noise, sigma_min=sigma_min, sigma_max=sigma_max, cond=cond)

    def error(sigmas: torch.Tensor) -> float:
        x = sample(denoiser, noise, sigmas, sampler=sampler, cond=cond, **options)
        return float((x - reference).flatten(1).norm(dim=1).pow(2).mean().sqrt())

    start_last = min(max(0.05, last_sigma_range[0] * 1.01), last_sigma_range[1] * 0.99)
    initial = karras(steps, start_last, sigma_max)
    result = minimize(
        lambda theta: error(_sigmas_from(theta, sigma_max, last_sigma_range)),
        _theta_from(initial, last_sigma_range),
        method="Nelder-Mead",
        options={"maxfev": max_sampler_runs, "xatol": 1e-3, "fatol": 1e-7},
    )
    return FittedSchedule(
        sigmas=_sigmas_from(result.x, sigma_max, last_sigma_range),
        calibration_error=float(result.fun),
        initial_error=error(initial),
        sampler_runs=int(result.nfev) + 1,
    )
