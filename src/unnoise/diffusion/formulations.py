"""Formulations of diffusion: VP (DDPM), VE (score SDE), EDM and rectified flow, in one coordinate.

Every formulation is expressed in EDM's noise level `sigma` (Karras et al. 2022, eq. 1):

    x = s(t) * (x0 + sigma(t) * n),   n ~ N(0, I)

Samplers work on the unscaled `x0 + sigma * n`; a formulation knows `sigma <-> t`, the scale
`s`, the network's input/output scalings `(c_skip, c_out, c_in, c_noise)` (Karras et al. 2022,
Table 1), the training density of `sigma` and the loss weight. The network never sees the
formulation and samplers never see the network: `Denoiser` joins the two.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch

from .tensors import Generators, append_dims

Parametrization = Literal["eps", "x0", "v", "flow", "edm"]
PARAMETRIZATIONS: tuple[Parametrization, ...] = ("eps", "x0", "v", "flow", "edm")


# --- what the network predicts, and how it becomes x0_hat ---------------------------------------


def output_scalings(parametrization: Parametrization, sigma: torch.Tensor, sigma_data: float = 0.5):
    """`(c_skip, c_out)` with `x0_hat = c_skip * x + c_out * F(...)` for each network target.

    eps:  F predicts n                      (Ho et al. 2020):        x0 = x - sigma * eps
    x0:   F predicts x0 directly
    v:    F predicts v = alpha n - sigma_vp x0 (Salimans & Ho 2022), in x = x0 + sigma n units
    flow: F predicts u = n - x0 on x_t = (1 - t) x0 + t n (Lipman et al. 2023; Liu et al. 2023)
    edm:  F is EDM's preconditioned output (Karras et al. 2022, eq. 7 and Table 1)
    """
    one = torch.ones_like(sigma)
    if parametrization == "eps":
        return one, -sigma
    if parametrization == "x0":
        return torch.zeros_like(sigma), one
    if parametrization == "v":
        return 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1).sqrt()
    if parametrization == "flow":
        return 1 / (1 + sigma), -sigma / (1 + sigma)
    if parametrization == "edm":
        sd2 = sigma_data**2
        return sd2 / (sigma**2 + sd2), sigma * sigma_data / (sigma**2 + sd2).sqrt()
    raise ValueError(f"unknown parametrization {parametrization!r}; choose from {PARAMETRIZATIONS}")


def x0_from_output(parametrization, output, x, sigma, sigma_data=0.5):
    """x0_hat from the network output F, at noisy x (B, ...) and noise level sigma (B,)."""
    c_skip, c_out = output_scalings(parametrization, sigma, sigma_data)
    return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * output


def output_target(parametrization, x0, noise, sigma, sigma_data=0.5):
    """The F that makes `x0_from_output` exact for x = x0 + sigma * noise: the training target."""
    c_skip, c_out = output_scalings(parametrization, sigma, sigma_data)
    x = x0 + append_dims(sigma, x0.ndim) * noise
    return (x0 - append_dims(c_skip, x0.ndim) * x) / append_dims(c_out, x0.ndim)


def score_from_x0(x0_hat, x, sigma):
    """Score of the noisy marginal, grad log p(x; sigma) = (x0_hat - x) / sigma^2 (Tweedie)."""
    return (x0_hat - x) / append_dims(sigma, x.ndim) ** 2


def eps_from_x0(x0_hat, x, sigma):
    """The noise estimate n_hat = (x - x0_hat) / sigma."""
    return (x - x0_hat) / append_dims(sigma, x.ndim)


# --- formulations --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Formulation:
    """Base class: subclasses define sigma(t), t(sigma), scale s(sigma), c_in, c_noise, training density."""

    parametrization: Parametrization = "eps"
    sigma_data: float = 0.5
    # Subclasses provide `sigma_min` and `sigma_max`: the noise range a default schedule spans.

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def t(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """s in x_formulation = s * (x0 + sigma * n), written as a function of sigma."""
        return torch.ones_like(sigma)

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        """Input scaling: the network sees the formulation's own scaled x, s * x."""
        return self.scale(sigma)

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def sample_sigma(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw n training noise levels from the formulation's training density."""
        raise NotImplementedError

    def scalings(self, sigma: torch.Tensor):
        """`(c_skip, c_out, c_in, c_noise)` of Karras et al. 2022, Table 1, each (B,)."""
        c_skip, c_out = output_scalings(self.parametrization, sigma, self.sigma_data)
        return c_skip, c_out, self.c_in(sigma), self.c_noise(sigma)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) on ||D(x; sigma) - x0||^2 that equals plain MSE on the network output."""
        _, c_out = output_scalings(self.parametrization, sigma, self.sigma_data)
        return 1 / c_out**2


def _uniform(n: int, generator: Generators, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


@dataclass(frozen=True)
class VP(Formulation):
    """Variance preserving, continuous time (Song et al. 2021, eq. 11; cosine: Nichol & Dhariwal 2021).

    alpha_bar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2)  (linear beta), or the cosine
    schedule; sigma = sqrt(1 / alpha_bar - 1) and s = sqrt(alpha_bar).
    """

    parametrization: Parametrization = "eps"
    beta_schedule: Literal["linear", "cosine"] = "linear"
    beta_min: float = 0.1
    beta_max: float = 20.0
    cosine_s: float = 0.008
    t_min: float = 1e-3  # smallest t used for sampling (Song et al. 2021 use 1e-3 for sampling)
    t_train_min: float = 1e-5  # smallest t drawn in training

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(torch.tensor(self.t_min, dtype=torch.float64)))

    @property
    def sigma_max(self) -> float:
        t_max = 1.0 if self.beta_schedule == "linear" else 0.995  # cosine reaches sigma = inf at t = 1
        return float(self.sigma(torch.tensor(t_max, dtype=torch.float64)))

    def _log_alpha_bar(self, t):
        if self.beta_schedule == "linear":
            return -(self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)
        f = lambda u: torch.cos((u + self.cosine_s) / (1 + self.cosine_s) * math.pi / 2)  # noqa: E731
        return 2 * (torch.log(f(t)) - torch.log(f(torch.zeros_like(t))))

    def sigma(self, t):
        return torch.expm1(-self._log_alpha_bar(t)).sqrt()

    def t(self, sigma):
        log_alpha_bar = -torch.log1p(sigma**2)
        if self.beta_schedule == "linear":  # root of beta_d/2 t^2 + beta_min t + log_alpha_bar = 0
            beta_d = self.beta_max - self.beta_min
            return ((self.beta_min**2 - 2 * beta_d * log_alpha_bar).sqrt() - self.beta_min) / beta_d
        s = self.cosine_s
        f0 = math.cos(s / (1 + s) * math.pi / 2)
        return torch.acos(torch.exp(log_alpha_bar / 2) * f0) * 2 / math.pi * (1 + s) - s

    def scale(self, sigma):
        return 1 / (1 + sigma**2).sqrt()

    def c_noise(self, sigma):
        return 999 * self.t(sigma)  # EDM's VP: (M - 1) t with M = 1000

    def sample_sigma(self, n, generator=None):
        return self.sigma(_uniform(n, generator, self.t_train_min, 1.0)).float()


def discrete_betas(
    kind: str,
    num_timesteps: int,
    start: float | None = None,
    end: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """beta_1..beta_N of DDPM (linear), Stable Diffusion (scaled_linear) or improved DDPM (cosine); `start`
    and `end` replace the first and last beta of the linear kinds (a diffusers scheduler config's). `dtype`
    is the precision the betas are computed in (diffusers computes them in float32)."""
    n = num_timesteps
    if kind == "linear":  # Ho et al. 2020, Sec. 4
        low, high = start or 1e-4 * 1000 / n, end or 0.02 * 1000 / n
        return torch.linspace(low, high, n, dtype=dtype)
    if kind == "scaled_linear":  # Rombach et al. 2022
        low, high = start or 0.00085, end or 0.012
        return torch.linspace(low**0.5, high**0.5, n, dtype=dtype) ** 2
    if kind == "cosine":  # Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999
        steps = torch.arange(n + 1, dtype=torch.float64) / n
        alpha_bar = torch.cos((steps + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999).to(dtype)
    raise ValueError(f"unknown beta schedule {kind!r}; choose linear, scaled_linear or cosine")


def zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas rescaled so the last timestep is pure noise (Lin et al. 2024, Alg. 1): sqrt(alpha_bar) shifted
    to end at 0 and scaled to keep its first value."""
    root = torch.cumprod(1 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


# At zero terminal SNR the last sigma is infinite; like diffusers, alpha_bar there is 2^-24 (sigma ~ 4096).
TERMINAL_ALPHA_BAR = 2.0**-24

# What the network is fed for a sigma between two training timesteps (see VPDiscrete):
# fractional: log sigma interpolated (k-diffusion, so AUTOMATIC1111); nearest: the closest timestep in log
# sigma (ComfyUI; diffusers' DPM-Solver rounds); sigma_linear: sigma interpolated linearly (diffusers' Euler)
TimestepInput = Literal["fractional", "nearest", "sigma_linear"]
# The precision of the sigma table: float64; float32 (betas, alpha_bar and sigmas in float32: diffusers);
# float32_alpha_bar (alpha_bar computed in float64, kept in float32, sigmas from it in float32: CompVis'
# code and k-diffusion, so AUTOMATIC1111); float32_sigmas (sigmas computed in float64, kept in float32:
# ComfyUI). The last two also compute timesteps and Karras' schedule in float32, as k-diffusion does.
SchedulePrecision = Literal["float64", "float32", "float32_alpha_bar", "float32_sigmas"]
K_DIFFUSION_PRECISIONS = ("float32_alpha_bar", "float32_sigmas")


@dataclass(frozen=True)
class VPDiscrete(Formulation):
    """DDPM with N discrete timesteps (Ho et al. 2020): t in {0..N-1}; between timesteps `timestep_input` says
    how sigma and t interpolate, `schedule_precision` the float precision of the table."""

    parametrization: Parametrization = "eps"
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "linear"
    num_timesteps: int = 1000
    beta_start: float | None = None  # None: the schedule's own first and last beta
    beta_end: float | None = None
    timestep_input: TimestepInput = "fractional"
    schedule_precision: SchedulePrecision = "float64"
    terminal_snr: Literal["as_trained", "zero"] = "as_trained"  # zero: rescaled (Lin et al. 2024)

    @functools.cached_property
    def table(self) -> torch.Tensor:  # (N,) sigma of each timestep, increasing in t, float64 (made once)
        dtype = torch.float32 if self.schedule_precision == "float32" else torch.float64
        betas = discrete_betas(self.beta_schedule, self.num_timesteps, self.beta_start, self.beta_end, dtype)
        if self.terminal_snr == "zero":
            betas = zero_terminal_snr(betas)
        alpha_bar = torch.cumprod(1 - betas, 0)
        if self.terminal_snr == "zero":
            alpha_bar[-1] = TERMINAL_ALPHA_BAR
        if self.schedule_precision == "float32_alpha_bar":
            alpha_bar = alpha_bar.float()
        sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()
        return sigmas.float().double() if self.schedule_precision != "float64" else sigmas

    @property
    def log_sigmas(self) -> torch.Tensor:  # (N,), increasing in t
        return self.table.log()

    @property
    def sigmas(self) -> torch.Tensor:
        return self.table

    @property
    def sigma_min(self) -> float:
        return float(self.table[0])

    @property
    def sigma_max(self) -> float:
        return float(self.table[-1])

    def sigma(self, t):
        """sigma(t): the table at integer t; between, interpolated in log sigma (or in sigma)."""
        values = self.table if self.timestep_input == "sigma_linear" else self.log_sigmas
        t64 = t.double().clamp(0, self.num_timesteps - 1)
        low = t64.floor().long().clamp(max=self.num_timesteps - 2)
        w = t64 - low
        values = values.to(t.device)
        mixed = (1 - w) * values[low] + w * values[low + 1]
        return (mixed if self.timestep_input == "sigma_linear" else mixed.exp()).to(t.dtype)

    def t(self, sigma):
        """The inverse of `sigma(t)`, or for `nearest` the closest timestep in log sigma; in float64, or in
        float32 for k-diffusion's precisions (its code computes it so)."""
        linear = self.timestep_input == "sigma_linear"
        dtype = torch.float32 if self.schedule_precision in K_DIFFUSION_PRECISIONS else torch.float64
        values = (self.table if linear else self.log_sigmas).to(sigma.device, dtype)
        target = (sigma.to(dtype) if linear else sigma.to(dtype).log()).clamp(values[0], values[-1])
        low = (torch.searchsorted(values, target.contiguous()) - 1).clamp(0, self.num_timesteps - 2)
        w = (target - values[low]) / (values[low + 1] - values[low])
        t = (1 - w) * low + w * (low + 1)
        return (t.round() if self.timestep_input == "nearest" else t).to(sigma.dtype)

    def scale(self, sigma):
        return 1 / (1 + sigma**2).sqrt()

    def c_noise(self, sigma):
        return self.t(sigma)

    def sample_sigma(self, n, generator=None):
        t = torch.randint(0, self.num_timesteps, (n,), generator=generator)
        return self.sigmas[t].float()


@dataclass(frozen=True)
class VE(Formulation):
    """Variance exploding, SMLD / score SDE (Song et al. 2021, eq. 9): sigma(t) = s_min (s_max/s_min)^t."""

    parametrization: Parametrization = "eps"
    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def t(self, sigma):
        return torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def c_noise(self, sigma):
        return torch.log(0.5 * sigma)  # Karras et al. 2022, Table 1 (VE)

    def sample_sigma(self, n, generator=None):
        return self.sigma(_uniform(n, generator)).float()


@dataclass(frozen=True)
class EDM(Formulation):
    """Karras et al. 2022 (Table 1, "ours"): sigma(t) = t, s = 1, log sigma ~ N(P_mean, P_std^2)."""

    parametrization: Parametrization = "edm"
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    p_mean: float = -1.2
    p_std: float = 1.2

    def sigma(self, t):
        return t

    def t(self, sigma):
        return sigma

    def c_in(self, sigma):
        return 1 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma):
        return sigma.log() / 4

    def sample_sigma(self, n, generator=None):
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return (self.p_mean + self.p_std * z).exp().float()


@dataclass(frozen=True)
class RectifiedFlow(Formulation):
    """Rectified flow / flow matching: x_t = (1 - t) x0 + t n, so sigma = t / (1 - t), s = 1 - t.

    Training t is logit-normal (Esser et al. 2024, SD3) or uniform (Liu et al. 2023).
    """

    parametrization: Parametrization = "flow"
    t_density: Literal["logit_normal", "uniform"] = "logit_normal"
    sigma_min: float = 0.002
    sigma_max: float = 999.0  # t = 0.999: t = 1 is pure noise, sigma = inf

    def sigma(self, t):
        return t / (1 - t)

    def t(self, sigma):
        return sigma / (1 + sigma)

    def scale(self, sigma):
        return 1 / (1 + sigma)

    def c_noise(self, sigma):
        return 1000 * self.t(sigma)

    def sample_sigma(self, n, generator=None):
        if self.t_density == "uniform":
            t = _uniform(n, generator)
        else:
            t = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
        return self.sigma(t.clamp(1e-5, 1 - 1e-5)).float()


FORMULATIONS: dict[str, Formulation] = {
    "edm": EDM(),
    "vp": VP(),
    "vp-cosine": VP(beta_schedule="cosine"),
    "ddpm": VPDiscrete(),
    "ddpm-cosine": VPDiscrete(beta_schedule="cosine"),
    "ve": VE(),
    "flow": RectifiedFlow(),
}
