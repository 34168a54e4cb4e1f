"""Noise schedules: functions returning a decreasing 1-D `sigmas` tensor of n + 1 values ending in 0.

A schedule is data, not an object with state: `sample(denoiser, noise, karras(20))` takes n = 20
steps from sigmas[0] to sigmas[-1] = 0. All are float64 so the math below is exact to round-off.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..errors import UnnoiseError
from .formulations import Formulation, VPDiscrete

Spacing = Literal["leading", "trailing", "linspace"]


def _with_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])


def _check_steps(n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise UnnoiseError(f"the number of steps must be a positive integer, got {n!r}")


def karras(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, dtype=torch.float64
) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho,
    computed in `dtype` (k-diffusion, so AUTOMATIC1111, computes it in float32) and returned in float64."""
    _check_steps(n)
    ramp = torch.linspace(0, 1, n, dtype=dtype)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _with_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(
    n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, dtype=torch.float64
) -> torch.Tensor:
    """Uniform in log sigma, i.e. uniform in log-SNR = -2 log sigma (Lu et al. 2022, DPM-Solver)."""
    _check_steps(n)
    return _with_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=dtype).exp())


def uniform_t(formulation: Formulation, n: int, t_min: float | None = None, t_max: float | None = None):
    """Uniform in the formulation's own time t (VP-uniform of Song et al. 2021; flow's uniform t)."""
    _check_steps(n)
    t_min = t_min if t_min is not None else float(formulation.t(torch.tensor(formulation.sigma_min)))
    t_max = t_max if t_max is not None else float(formulation.t(torch.tensor(formulation.sigma_max)))
    t = torch.linspace(t_max, t_min, n, dtype=torch.float64)
    return _with_zero(formulation.sigma(t))


def discrete(formulation: VPDiscrete, n: int, spacing: Spacing = "trailing", offset: int = 0):
    """DDIM-style subsequence of the N training timesteps (Song et al. 2021, DDIM; Lin et al. 2024, Table 2).

    leading: 0, N/n, 2N/n, ... (+offset); trailing: N-1, N-1-N/n, ... (starts at the last timestep,
    so the first step sees pure noise); linspace: n evenly spaced, rounded, from N-1 to 0.
    """
    _check_steps(n)
    big_n = formulation.num_timesteps
    if n > big_n:
        raise UnnoiseError(f"{n} steps asked of a model with {big_n} timesteps")
    if spacing == "leading":
        t = torch.arange(0, n) * (big_n // n) + offset
    elif spacing == "trailing":
        t = (torch.arange(big_n, 0, -big_n / n).round() - 1).long().flip(0)
    elif spacing == "linspace":
        t = torch.linspace(0, big_n - 1, n, dtype=torch.float64).round().long()
    else:
        raise UnnoiseError(f"unknown spacing {spacing!r}; choose leading, trailing or linspace")
    return _with_zero(formulation.sigmas[t.clamp(0, big_n - 1)].flip(0))


def flow_shift(n: int, shift: float = 3.0, t_max: float = 0.999, t_min: float | None = None):
    """Rectified-flow times uniform in t, shifted: t' = shift t / (1 + (shift - 1) t) (Esser et al. 2024)."""
    _check_steps(n)
    t_min = t_min if t_min is not None else 1.0 / n / 10
    t = torch.linspace(t_max, t_min, n, dtype=torch.float64)
    t = shift * t / (1 + (shift - 1) * t)
    return _with_zero(t / (1 - t))


def default_sigmas(formulation: Formulation, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras schedule over the formulation's own sigma range: a good default for every sampler."""
    return karras(n, formulation.sigma_min, formulation.sigma_max, rho)


SCHEDULES = {
    "karras": karras,
    "exponential": exponential,
    "uniform_t": uniform_t,
    "discrete": discrete,
    "flow_shift": flow_shift,
}
