"""Samplers: plain functions that solve the reverse process over any denoiser D(x, sigma, cond) -> x0_hat.

Every sampler has the signature

    sample_x(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, **options) -> x

where `x` (B, ...) is the starting point at noise level sigmas[0] (noise * sigmas[0] for text-to-image,
a noised image for img2img), `sigmas` is a decreasing schedule ending in 0, and `callback` receives a
`Step(index, sigma, x, denoised)` once per step. All work in the unscaled coordinate x = x0 + sigma n,
where the probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma (Karras et al. 2022, eq. 3).
Exponential integrators use lambda = -log sigma (the half log-SNR of Lu et al. 2022) and h = lambda_next
- lambda. The final step to sigma = 0 of every sampler returns the denoiser's x0_hat.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch

from ..errors import NonFiniteError, UnnoiseError
from .tensors import Generators, randn_like


class Step(NamedTuple):
    """What a sampler reports to its callback after each denoiser evaluation of a step."""

    index: int  # step number, 0 .. len(sigmas) - 2
    sigma: float  # noise level of x
    x: torch.Tensor  # (B, ...) current sample
    denoised: torch.Tensor  # (B, ...) x0_hat = D(x, sigma)


Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
Callback = Callable[[Step], None] | None
SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {}
DEFAULT_SAMPLER = "dpmpp_2m"  # the one place it is written: settings.py, the CLI and the server take it
STOCHASTIC: set[str] = set()  # samplers that draw fresh noise with their default options


NoiseSampler = Callable[[float, float], torch.Tensor] | None  # (sigma, sigma_next) -> unit noise like x


def _sde_noise(x, generator, noise_sampler: NoiseSampler, sigma: float, sigma_next: float) -> torch.Tensor:
    """The step's unit noise: the caller's `noise_sampler(sigma, sigma_next)` (k-diffusion's convention,
    e.g. a Brownian tree) or fresh Gaussian noise from `generator`."""
    return randn_like(x, generator) if noise_sampler is None else noise_sampler(sigma, sigma_next)


# --- checks shared by every sampler -----------------------------------------------------------------


def check_sigmas(sigmas: torch.Tensor, *, to_zero: bool = True) -> torch.Tensor:
    """Validate a schedule: 1-D, finite, strictly decreasing, positive, ending in exactly 0 (unless
    `to_zero` is False: a block of a schedule, as RePaint runs, may end at a positive level)."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise UnnoiseError(
            f"sigmas must be a 1-D tensor of at least 2 values, got shape {tuple(sigmas.shape)}"
        )
    if not torch.isfinite(sigmas).all():
        raise UnnoiseError("sigmas contain NaN or inf")
    if to_zero and sigmas[-1] != 0:
        raise UnnoiseError(f"sigmas must end in 0 (the clean image), got last value {float(sigmas[-1]):.4g}")
    if (sigmas[:-1] <= 0).any() or sigmas[-1] < 0:
        raise UnnoiseError("sigmas before the last must be positive")
    if (sigmas[1:] >= sigmas[:-1]).any():
        i = int(torch.nonzero(sigmas[1:] >= sigmas[:-1])[0])
        raise UnnoiseError(
            f"sigmas must be strictly decreasing, but sigmas[{i + 1}] = {float(sigmas[i + 1]):.4g}"
            f" >= sigmas[{i}] = {float(sigmas[i]):.4g}"
        )
    return sigmas


def bind(denoiser: Denoiser, cond: Any) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """D(x, sigma) for a scalar sigma: calls denoiser(x, sigma (B,), cond) and checks what comes back."""

    def D(x: torch.Tensor, sigma: float) -> torch.Tensor:
        out = denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device), cond)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UnnoiseError(f"the denoiser returned {got} for an input of shape {tuple(x.shape)}")
        if not torch.isfinite(out).all():
            raise NonFiniteError(f"the denoiser returned NaN or inf at sigma = {sigma:.4g}")
        return out

    return D


def register(name: str, *, stochastic: bool = False):
    """Add a sampler to SAMPLERS under `name`; the registered function validates its sigmas first."""

    def wrap(fn):
        @functools.wraps(fn)
        def checked(denoiser, x, sigmas, *, to_zero: bool = True, **kwargs):
            return fn(denoiser, x, check_sigmas(sigmas, to_zero=to_zero), **kwargs)

        SAMPLERS[name] = checked
        if stochastic:
            STOCHASTIC.add(name)
        return checked

    return wrap


def get_sampler(name: str):
    """The sampler registered as `name`, or a clear error with the closest names."""
    if name in SAMPLERS:
        return SAMPLERS[name]
    close = difflib.get_close_matches(name, SAMPLERS, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UnnoiseError(f"unknown sampler {name!r}.{hint} Available: {', '.join(sorted(SAMPLERS))}")


def sample(
    denoiser: Denoiser,
    noise: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    sampler: str = DEFAULT_SAMPLER,
    cond: Any = None,
    generator: Generators = None,
    callback: Callback = None,
    start_scale: float | None = None,
    to_zero: bool = True,
    **options,
) -> torch.Tensor:
    """Draw samples: start from unit `noise` (B, ...) scaled by `start_scale` (None: sigmas[0]) and run
    `sampler` down to sigmas[-1]: 0, or with `to_zero` False a last positive level (DDIM's final alpha)."""
    fn = get_sampler(sampler)
    sigmas = check_sigmas(sigmas, to_zero=to_zero)
    scale = float(sigmas[0]) if start_scale is None else start_scale
    return fn(
        denoiser, noise * scale, sigmas, cond=cond, generator=generator, callback=callback, to_zero=to_zero,
        **options,
    )  # fmt: skip


def _steps(sigmas: torch.Tensor):
    """(i, sigma_i, sigma_{i+1}) as Python floats."""
    values = sigmas.tolist()
    return [(i, values[i], values[i + 1]) for i in range(len(values) - 1)]


def _report(callback: Callback, i: int, sigma: float, x: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback(Step(i, sigma, x, denoised))


def _lambda(sigma: float) -> float:
    """lambda = -log sigma: half the log signal-to-noise ratio."""
    return -math.log(sigma)


# --- first-order and ancestral samplers ------------------------------------------------------------


@register("euler")
def sample_euler(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
    """Euler on the probability-flow ODE (Karras et al. 2022, Alg. 1 without the 2nd-order correction)."""
    D = bind(denoiser, cond)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = D(x, sigma)
        _report(callback, i, sigma, x, denoised)
        d = (x - denoised) / sigma  # dx/dsigma
        x = x + (sigma_next - sigma) * d
    return x


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic move to sigma_down and fresh noise of std sigma_up.

    sigma_up = eta * sigma_next * sqrt(sigma^2 - sigma_next^2) / sigma is DDIM's sigma_t (Song et al. 2021,
    eq. 16) in x = x0 + sigma n units; sigma_down^2 + sigma_up^2 = sigma_next^2 keeps the marginal.
    """
    if sigma_next == 0:
        return 0.0, 0.0
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(sigma**2 - sigma_next**2) / sigma)
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


@register("euler_ancestral", stochastic=True)
def sample_euler_ancestral(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=1.0, s_noise=1.0,
    noise_sampler: NoiseSampler = None,
):  # fmt: skip
    """Euler to sigma_down, then add noise of std sigma_up (ancestral sampling, as in k-diffusion; its
    noise from `noise_sampler(sigma, sigma_next)` when given, as k-diffusion takes it)."""
    D = bind(denoiser, cond)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = D(x, sigma)
        _report(callback, i, sigma, x, denoised)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + (sigma_down - sigma) * (x - denoised) / sigma
        if sigma_up > 0:
            x = x + s_noise * sigma_up * _sde_noise(x, generator, noise_sampler, sigma, sigma_next)
    return x


@register("ddim")
def sample_ddim(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=0.0,
    noise_sampler: NoiseSampler = None,
):  # fmt: skip
    """DDIM (Song, Meng & Ermon 2021, eq. 12): x_next = x0_hat + sqrt(s_next^2 - s_up^2) eps_hat + s_up z.

    eta = 0 is deterministic (identical to Euler in this coordinate); eta = 1 is DDPM's ancestral step.
    """
    D = bind(denoiser, cond)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = D(x, sigma)
        _report(callback, i, sigma, x, denoised)
        eps = (x - denoised) / sigma
        _, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = denoised + math.sqrt(sigma_next**2 - sigma_up**2) * eps
        if sigma_up > 0:
            x = x + sigma_up * _sde_noise(x, generator, noise_sampler, sigma, sigma_next)
    return x


@register("ddpm", stochastic=True)
def sample_ddpm(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
    """DDPM ancestral sampling from the posterior q(x_next | x, x0_hat) (Ho et al. 2020, eqs. 6-7, Alg. 2).

    In x = x0 + sigma n units: mean x0 + (s_next/s)^2 (x - x0), variance s_next^2 (s^2 - s_next^2) / s^2.
    """
    D = bind(denoiser, cond)
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = D(x, sigma)
        _report(callback, i, sigma, x, denoised)
        x = denoised + (sigma_next / sigma) ** 2 * (x - denoised)
        if sigma_next > 0:
            std = sigma_next / sigma * math.sqrt(sigma**2 - sigma_next**2)
            x = x + std * randn_like(x, generator)
    return x


# --- Heun with stochastic churn -----------------------------------------------------------------------


@register("heun")
def sample_heun(
    denoiser,
    x,
    sigmas,
    *,
    cond=None,
    generator=None,
    callback=None,
    s_churn=0.0,
    s_tmin=0.0,
    s_tmax=float("inf"),
    s_noise=1.0,
):
    """Heun's 2nd-order method with EDM's stochastic churn (Karras et al. 2022, Alg. 2).

    With s_churn = 0 (the default) it is deterministic, Alg. 1; each step but the last costs 2 evaluations.
    """
    D = bind(denoiser, cond)
    n = len(sigmas) - 1
    for i, sigma, sigma_next in _steps(sigmas):
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:  # raise the noise level to sigma_hat (Alg. 2, lines 5-6)
            x = x + s_noise * math.sqrt(sigma_hat**2 - sigma**2) * randn_like(x, generator)
        denoised = D(x, sigma_hat)
        _report(callback, i, sigma_hat, x, denoised)
        d = (x - denoised) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * d
        if sigma_next > 0:  # 2nd-order correction (Alg. 2, lines 9-11)
            d_next = (x_next - D(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * (d + d_next) / 2
        x = x_next
    return x


# --- DPM-Solver++ -------------------------------------------------------------------------------------


@register("dpmpp_2m")
def sample_dpmpp_2m(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
    """DPM-Solver++(2M), multistep 2nd order in data prediction (Lu et al. 2022b, Alg. 2).

    x_next = (s_next/s) x + (1 - e^-h) D_hat with D_hat = (1 + 1/2r) D_i - 1/2r D_{i-1}, r = h_{i-1}/h.
    """
    D = bind(denoiser, cond)
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = D(x, sigma)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            return denoised
        h = _lambda(sigma_next) - _lambda(sigma)
        d_hat = denoised
        if old_denoised is not None:
            r = h_last / h
            d_hat = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * old_denoised
        x = (sigma_next / sigma) * x - math.expm1(-h) * d_hat
        old_denoised, h_last = denoised, h
    return x


def exponential_integrator_weights(h: float, k: float) -> tuple[float, float, float]:
    """I_j = int_0^h k e^{k(tau - h)} tau^j dtau for j = 0, 1, 2: weights of D, D' and D'' (Taylor in lambda).

    k = 1 is the probability-flow ODE (Lu et al. 2022b, eq. 9); k = 1 + eta the marginal-preserving SDE.
    """
    i0 = -math.expm1(-k * h)
    i1 = h - i0 / k
    i2 = h * h - 2 * i1 / k
    return i0, i1, i2


def _lambda_derivatives(history: list[tuple[float, torch.Tensor]]):
    """D' and D'' in lambda at the newest point, from backward divided differences of 1 to 3 points."""
    (lam0, d0), *older = reversed(history)
    if not older:
        return None, None
    lam1, d1 = older[0]
    slope0 = (d0 - d1) / (lam0 - lam1)
    if len(older) == 1:
        return slope0, None
    lam2, d2 = older[1]
    slope1 = (d1 - d2) / (lam1 - lam2)
    curvature = (slope0 - slope1) / (lam0 - lam2)  # D[lam0, lam1, lam2] = D'' / 2
    return slope0 + (lam0 - lam1) * curvature, 2 * curvature


@register("dpmpp_3m")
def sample_dpmpp_3m(denoiser, x, sigmas, *, cond=None, generator=None, callback=None):
    """DPM-Solver++(3M): multistep 3rd order on the ODE (Lu et al. 2022b, eq. 9 and Appendix; data
    prediction), unnoise's own (no AUTOMATIC1111 label: k-diffusion's 3M is dpmpp_3m_sde at eta 0).

    x_next = (s_next/s) x + I0 D + I1 D' + I2/2 D'', the exponential integrator with D(lambda)
    Taylor-expanded; the first steps use the lower orders that history allows.
    """
    D = bind(denoiser, cond)
    history: list[tuple[float, torch.Tensor]] = []  # (lambda, D) of the last 3 points
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = D(x, sigma)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            return denoised
        history = [*history, (_lambda(sigma), denoised)][-3:]
        h = _lambda(sigma_next) - _lambda(sigma)
        i0, i1, i2 = exponential_integrator_weights(h, 1.0)
        slope, second = _lambda_derivatives(history)
        x = (sigma_next / sigma) * x + i0 * denoised
        if slope is not None:
            x = x + i1 * slope
        if second is not None:
            x = x + (i2 / 2) * second
    return x


# The SDE samplers AUTOMATIC1111 and ComfyUI call "DPM++ 2M SDE" and "DPM++ 3M SDE" are k-diffusion's:
# the exponential integrator of the SDE family with eta (x_next = (s_next/s) e^{-eta h} x + (1 -
# e^{-(1+eta)h}) D + ...), its higher-order terms from divided differences of the previous D in lambda
# (the midpoint or Heun form of the 2nd-order term; DPM-Solver-v3's phi functions for the 3rd), and
# noise of std s_next sqrt(1 - e^{-2 eta h}). Same names, same algorithm: written here from those
# equations and checked against k-diffusion's own code (benchmarks/k_diffusion_parity.py).


def _phi_1(a: float) -> float:
    """(1 - e^{-a}) for a = (1 + eta) h: the weight of D in one exponential-integrator step."""
    return -math.expm1(-a)


def _sde_first_order(x, denoised, sigma: float, sigma_next: float, h: float, eta: float):
    """The first-order part of an SDE-DPM-Solver++ step: (s_next/s) e^{-eta h} x + (1 - e^{-(1+eta)h}) D."""
    return (sigma_next / sigma) * math.exp(-eta * h) * x + _phi_1((1 + eta) * h) * denoised


def _sde_add_noise(x, generator, noise_sampler, sigma, sigma_next, h: float, eta: float, s_noise: float):
    """x plus the step's fresh noise, s_next sqrt(1 - e^{-2 eta h}) s_noise z (nothing at eta = 0)."""
    if eta <= 0:
        return x
    noise = _sde_noise(x, generator, noise_sampler, sigma, sigma_next)
    return x + sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise * noise


@register("dpmpp_2m_sde", stochastic=True)
def sample_dpmpp_2m_sde(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=1.0, s_noise=1.0,
    solver_type: Literal["midpoint", "heun"] = "midpoint", noise_sampler: NoiseSampler = None,
):  # fmt: skip
    """SDE-DPM-Solver++(2M) (Lu et al. 2022b, Sec. 5) as k-diffusion writes it ("DPM++ 2M SDE"): eta = 1
    the reverse SDE, eta = 0 the ODE (then the midpoint form is exactly dpmpp_2m).

    With a = (1 + eta) h and r = h_prev / h,
        x_next = (s_next/s) e^{-eta h} x + (1 - e^{-a}) D + c (D - D_prev) / r + s_next sigma_z z,
    sigma_z = sqrt(1 - e^{-2 eta h}),
    c = (1 - e^{-a}) / 2 in the midpoint form, c = phi_2 = 1 - (1 - e^{-a}) / a in Heun's.
    """
    if solver_type not in ("midpoint", "heun"):
        raise UnnoiseError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    D = bind(denoiser, cond)
    old_denoised, h_last = None, None
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = D(x, sigma)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            return denoised
        h = _lambda(sigma_next) - _lambda(sigma)
        a = (1 + eta) * h
        x = _sde_first_order(x, denoised, sigma, sigma_next, h, eta)
        if old_denoised is not None:
            r = h_last / h
            c = _phi_1(a) / 2 if solver_type == "midpoint" else 1 - _phi_1(a) / a
            x = x + c / r * (denoised - old_denoised)
        x = _sde_add_noise(x, generator, noise_sampler, sigma, sigma_next, h, eta, s_noise)
        old_denoised, h_last = denoised, h
    return x


@register("dpmpp_2m_sde_heun", stochastic=True)
def sample_dpmpp_2m_sde_heun(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=1.0, s_noise=1.0,
    noise_sampler: NoiseSampler = None,
):  # fmt: skip
    """dpmpp_2m_sde with the Heun form of its 2nd-order term (AUTOMATIC1111's "DPM++ 2M SDE Heun")."""
    return sample_dpmpp_2m_sde(
        denoiser, x, sigmas, cond=cond, generator=generator, callback=callback, eta=eta, s_noise=s_noise,
        solver_type="heun", noise_sampler=noise_sampler, to_zero=bool(sigmas[-1] == 0),
    )  # fmt: skip


@register("dpmpp_3m_sde", stochastic=True)
def sample_dpmpp_3m_sde(
    denoiser, x, sigmas, *, cond=None, generator=None, callback=None, eta=1.0, s_noise=1.0,
    noise_sampler: NoiseSampler = None,
):  # fmt: skip
    """SDE-DPM-Solver++ of 3rd order, multistep, as k-diffusion writes it ("DPM++ 3M SDE").

    With a = (1 + eta) h, phi_2 = 1 - (1 - e^{-a}) / a, phi_3 = phi_2 / a - 1/2, and the divided
    differences of the last three D (h_1, h_2 the previous steps, r0 = h_1 / h, r1 = h_2 / h):
        d1_0 = (D - D_1) / r0,  d1_1 = (D_1 - D_2) / r1,
        d1 = d1_0 + (d1_0 - d1_1) r0 / (r0 + r1),  d2 = (d1_0 - d1_1) / (r0 + r1),
        x_next = (s_next/s) e^{-eta h} x + (1 - e^{-a}) D + phi_2 d1 - phi_3 d2 + s_next sigma_z z;
    with two points only d1 = (D - D_1) / r0 and no d2; with one, the first-order step.
    """
    D = bind(denoiser, cond)
    previous: list[tuple[torch.Tensor, float]] = []  # (D, h) of the last two steps, newest first
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = D(x, sigma)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            return denoised
        h = _lambda(sigma_next) - _lambda(sigma)
        a = (1 + eta) * h
        phi_2 = 1 - _phi_1(a) / a
        x = _sde_first_order(x, denoised, sigma, sigma_next, h, eta)
        if len(previous) == 2:
            (d_1, h_1), (d_2, h_2) = previous
            r0, r1 = h_1 / h, h_2 / h
            d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / a - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif len(previous) == 1:
            ((d_1, h_1),) = previous
            x = x + phi_2 * (denoised - d_1) / (h_1 / h)
        x = _sde_add_noise(x, generator, noise_sampler, sigma, sigma_next, h, eta, s_noise)
        previous = [(denoised, h), *previous][:2]
    return x


# --- UniPC ---------------------------------------------------------------------------------------------


def _unipc_update(x, sigma, sigma_next, history, *, variant: str, denoised_next=None):
    """One UniP predictor step, or with `denoised_next` the UniC corrector (Zhao et al. 2023, Alg. 2-3).

    x_next = (s_next/s) x + (1 - e^-h) m0 - B(h) sum_k a_k (m_k - m0) / r_k, r_k = (lambda_k - lambda_0)/h,
    with R a = b, R_ik = r_k^(i-1), b_i = i! phi_{i+1}(-h) / B(h) and B(h) = -h (bh1) or e^-h - 1 (bh2).
    As in the paper, a 1x1 system uses a = 1/2.
    """
    lam0, m0 = history[-1]
    h = _lambda(sigma_next) - lam0
    rs = [(lam_k - lam0) / h for lam_k, _ in reversed(history[:-1])]
    diffs = [(m_k - m0) / r for r, (_, m_k) in zip(rs, reversed(history[:-1]), strict=True)]
    if denoised_next is not None:  # the corrector also uses the model output at the new point (r = 1)
        rs.append(1.0)
        diffs.append(denoised_next - m0)
    hh = -h
    phi_1 = math.expm1(hh)
    x_next = (sigma_next / sigma) * x - phi_1 * m0
    if not rs:
        return x_next
    b_h = hh if variant == "bh1" else phi_1
    b, phi_k, factorial = [], phi_1 / hh - 1, 1
    for i in range(1, len(rs) + 1):
        b.append(phi_k * factorial / b_h)
        factorial *= i + 1
        phi_k = phi_k / hh - 1 / factorial
    if len(rs) == 1:
        a = [0.5]
    else:
        R = torch.tensor([[r ** (i - 1) for r in rs] for i in range(1, len(rs) + 1)], dtype=torch.float64)
        a = torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()
    return x_next - b_h * sum(a_k * d_k for a_k, d_k in zip(a, diffs, strict=True))


@register("unipc")
def sample_unipc(
    denoiser,
    x,
    sigmas,
    *,
    cond=None,
    generator=None,
    callback=None,
    order=2,
    variant: Literal["bh1", "bh2"] = "bh2",
    corrector=True,
):
    """UniPC: multistep UniP-`order` predictor and UniC corrector, data prediction (Zhao et al. 2023).

    The corrector reuses the evaluation at the new point that the next step needs anyway, so it raises the
    order by one (to order + 1) at no extra cost.
    """
    if variant not in ("bh1", "bh2"):
        raise UnnoiseError(f"unknown UniPC variant {variant!r}; choose bh1 or bh2")
    D = bind(denoiser, cond)
    history: list[tuple[float, torch.Tensor]] = []
    last = None  # (x, sigma, history) before the previous predictor step, for the corrector
    for i, sigma, sigma_next in _steps(sigmas):
        denoised = D(x, sigma)
        if corrector and last is not None:
            x_prev, sigma_prev, history_prev = last
            x = _unipc_update(
                x_prev, sigma_prev, sigma, history_prev, variant=variant, denoised_next=denoised
            )
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            return denoised
        history = [*history, (_lambda(sigma), denoised)][-order:]
        last = (x, sigma, history)
        x = _unipc_update(x, sigma, sigma_next, history, variant=variant)
    return x


# --- score SDE predictor-corrector ---------------------------------------------------------------------


def _per_sample_norm(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).norm(dim=1).reshape(-1, *([1] * (v.ndim - 1)))  # (B, 1, ...)


@register("pc", stochastic=True)
def sample_pc(
    denoiser,
    x,
    sigmas,
    *,
    cond=None,
    generator=None,
    callback=None,
    snr=0.16,
    n_corrector=1,
    step_size: Literal["batch", "sample"] = "batch",
):
    """Predictor-corrector (Song et al. 2021, Alg. 2 for VE): Langevin corrector, reverse-diffusion predictor.

    Corrector: x += eps s + sqrt(2 eps) z with eps = 2 (snr ||z|| / ||s||)^2 (Alg. 4, alpha = 1).
    Predictor: x += (sigma^2 - s_next^2) s + sqrt(sigma^2 - s_next^2) z, s the score (x0_hat - x)/sigma^2.
    Each step costs n_corrector + 1 evaluations. step_size="batch" takes the norms' batch means, as the
    authors' code does; "sample" uses each sample's own norms, which keeps a seed's result independent
    of the batch but is unstable in low dimensions, where ||s|| of one sample can be near 0.
    """
    if step_size not in ("batch", "sample"):
        raise UnnoiseError(f"step_size must be 'batch' or 'sample', got {step_size!r}")
    norm = _per_sample_norm if step_size == "sample" else lambda v: _per_sample_norm(v).mean()
    D = bind(denoiser, cond)
    for i, sigma, sigma_next in _steps(sigmas):
        for _ in range(n_corrector):
            score = (D(x, sigma) - x) / sigma**2
            z = randn_like(x, generator)
            eps = 2 * (snr * norm(z) / norm(score).clamp_min(1e-20)) ** 2
            x = x + eps * score + (2 * eps).sqrt() * z
        denoised = D(x, sigma)
        _report(callback, i, sigma, x, denoised)
        if sigma_next == 0:
            return denoised
        variance = sigma**2 - sigma_next**2
        x = x + variance * (denoised - x) / sigma**2 + math.sqrt(variance) * randn_like(x, generator)
    return x


# --- adaptive probability-flow ODE ---------------------------------------------------------------------


@register("rk45")
def sample_rk45(denoiser, x, sigmas, *, cond=None, generator=None, callback=None, rtol=1e-4, atol=1e-4):
    """Probability-flow ODE (Song et al. 2021, eq. 13) solved adaptively by Dormand-Prince RK45 (torchdiffeq).

    Integrates dx/du = x - D(x; e^u) in u = log sigma from sigmas[0] to sigmas[-2], then returns x0_hat
    there (a block ending at sigmas[-1] > 0 is integrated to sigmas[-1]); intermediate sigmas are ignored.
    The batch shares step sizes (results depend on the batch only to within rtol/atol).
    """
    from torchdiffeq import odeint

    D = bind(denoiser, cond)
    evaluations = 0

    def velocity(u, x):
        nonlocal evaluations
        sigma = math.exp(float(u))
        denoised = D(x, sigma)
        _report(callback, evaluations, sigma, x, denoised)
        evaluations += 1
        return x - denoised

    if sigmas[-1] > 0:  # a block of a schedule: integrate to its end and stay noisy
        u = torch.tensor([math.log(sigmas[0]), math.log(sigmas[-1])], dtype=torch.float64)
        return odeint(velocity, x, u, method="dopri5", rtol=rtol, atol=atol)[-1]
    u = torch.tensor([math.log(sigmas[0]), math.log(sigmas[-2])], dtype=torch.float64)
    if len(sigmas) > 2:
        x = odeint(velocity, x, u, method="dopri5", rtol=rtol, atol=atol)[-1]
    return D(x, float(sigmas[-2]))
