"""Fitting a few-step schedule: valid sigmas, and a smaller error on noise the fit never saw."""

import pytest
import torch

from unnoise.diffusion.samplers import check_sigmas, sample
from unnoise.diffusion.schedule_fit import fit_schedule, ode_reference
from unnoise.diffusion.schedules import karras
from unnoise.errors import UnnoiseError

from .conftest import seeded


def rms(a, b):
    return float((a - b).norm(dim=1).pow(2).mean().sqrt())


def test_fitted_schedule_beats_karras_on_held_out_noise(mixture):
    calibration = torch.randn(128, 2, generator=seeded(0), dtype=torch.float64)
    held_out = torch.randn(512, 2, generator=seeded(1), dtype=torch.float64)
    fitted = fit_schedule(mixture, calibration, steps=8, sampler="dpmpp_2m", max_sampler_runs=400)
    sigmas = check_sigmas(fitted.sigmas)
    assert len(sigmas) == 9 and sigmas[0] == 80.0
    assert fitted.calibration_error < fitted.initial_error
    reference = ode_reference(mixture, held_out, sigma_min=0.002, sigma_max=80.0)
    fitted_error = rms(sample(mixture, held_out, sigmas, sampler="dpmpp_2m"), reference)
    karras_error = rms(sample(mixture, held_out, karras(8), sampler="dpmpp_2m"), reference)
    assert fitted_error < karras_error / 2


def test_fitting_a_stochastic_sampler_is_refused(mixture):
    with pytest.raises(UnnoiseError, match="stochastic"):
        fit_schedule(mixture, torch.randn(4, 2), steps=5, sampler="euler_ancestral")
    with pytest.raises(UnnoiseError, match="unknown sampler"):
        fit_schedule(mixture, torch.randn(4, 2), steps=5, sampler="nope")
