"""Formulations: round trips, the meaning of each scaling, and exact identities of the parametrizations."""

import math

import pytest
import torch

from unnoise.diffusion.denoiser import Denoiser
from unnoise.diffusion.formulations import (
    EDM,
    FORMULATIONS,
    PARAMETRIZATIONS,
    VP,
    RectifiedFlow,
    VPDiscrete,
    discrete_betas,
    output_target,
    score_from_x0,
    x0_from_output,
)
from unnoise.testing import example_mixture

from .conftest import seeded


def sigma_grid(formulation):
    log_lo, log_hi = math.log(formulation.sigma_min), math.log(formulation.sigma_max)
    return torch.linspace(log_lo, log_hi, 200, dtype=torch.float64).exp()


@pytest.mark.parametrize("name", FORMULATIONS)
def test_sigma_t_round_trip(name):
    f = FORMULATIONS[name]
    sigma = sigma_grid(f)
    torch.testing.assert_close(f.sigma(f.t(sigma)), sigma, rtol=1e-10, atol=0)
    t = f.t(sigma)
    torch.testing.assert_close(f.t(f.sigma(t)), t, rtol=1e-9, atol=1e-12)
    assert (t[1:] > t[:-1]).all(), "t must increase with sigma"


@pytest.mark.parametrize("name", ["vp", "vp-cosine", "ddpm", "ddpm-cosine"])
def test_vp_is_variance_preserving(name):
    """s^2 (1 + sigma^2) = 1: unit-variance data keeps unit variance at every noise level."""
    f = FORMULATIONS[name]
    sigma = sigma_grid(f)
    torch.testing.assert_close(f.scale(sigma) ** 2 * (1 + sigma**2), torch.ones_like(sigma))


def test_vp_linear_matches_closed_form_alpha_bar():
    """Song et al. 2021: alpha_bar(t) = exp(-beta_min t - (beta_max - beta_min) t^2 / 2)."""
    f = VP()
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    alpha_bar = torch.exp(-0.1 * t - 0.5 * 19.9 * t**2)
    torch.testing.assert_close(f.sigma(t), ((1 - alpha_bar) / alpha_bar).sqrt())


def test_ddpm_discrete_sigmas_match_cumulative_product():
    f = VPDiscrete()
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    torch.testing.assert_close(f.sigmas, ((1 - alpha_bar) / alpha_bar).sqrt())
    assert f.t(f.sigmas[[0, 17, 999]]).tolist() == pytest.approx([0, 17, 999])
    assert discrete_betas("cosine", 1000).max() <= 0.999


def test_rectified_flow_is_linear_interpolation():
    """s (x0 + sigma n) = (1 - t) x0 + t n."""
    f = RectifiedFlow()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    sigma = f.sigma(t)
    x0, n = torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    torch.testing.assert_close(f.scale(sigma) * (x0 + sigma * n), (1 - t) * x0 + t * n)


@pytest.mark.parametrize("parametrization", PARAMETRIZATIONS)
def test_training_target_inverts_the_output_scalings(parametrization):
    """Feeding the exact target F back through c_skip x + c_out F gives x0 exactly."""
    x0 = torch.randn(6, 3, generator=seeded(0), dtype=torch.float64)
    noise = torch.randn(6, 3, generator=seeded(1), dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 10.0, 80.0], dtype=torch.float64)
    target = output_target(parametrization, x0, noise, sigma)
    x = x0 + sigma[:, None] * noise
    torch.testing.assert_close(x0_from_output(parametrization, target, x, sigma), x0)


def test_targets_have_their_textbook_meaning():
    x0 = torch.randn(4, 3, generator=seeded(0), dtype=torch.float64)
    n = torch.randn(4, 3, generator=seeded(1), dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 2.0, 9.0], dtype=torch.float64)[:, None]
    torch.testing.assert_close(output_target("eps", x0, n, sigma[:, 0]), n)
    torch.testing.assert_close(output_target("x0", x0, n, sigma[:, 0]), x0)
    torch.testing.assert_close(output_target("flow", x0, n, sigma[:, 0]), n - x0)
    alpha, sigma_vp = 1 / (1 + sigma**2).sqrt(), sigma / (1 + sigma**2).sqrt()  # VP alpha_t, sigma_t
    torch.testing.assert_close(output_target("v", x0, n, sigma[:, 0]), alpha * n - sigma_vp * x0)


class OracleNetwork(torch.nn.Module):
    """A 'network' that outputs the exact target for known clean data x0: the perfect denoiser's F."""

    def __init__(self, formulation, x0, noise, sigma):
        super().__init__()
        self.target = output_target(formulation.parametrization, x0, noise, sigma, formulation.sigma_data)

    def forward(self, x_in, c_noise, cond):
        return self.target


@pytest.mark.parametrize("name", FORMULATIONS)
def test_perfect_network_makes_the_denoiser_return_x0_and_zero_loss(name):
    f = FORMULATIONS[name]
    x0 = torch.randn(5, 4, generator=seeded(0), dtype=torch.float64)
    noise = torch.randn(5, 4, generator=seeded(1), dtype=torch.float64)
    sigma = f.sample_sigma(5, seeded(2)).double()
    denoiser = Denoiser(OracleNetwork(f, x0, noise, sigma), f)
    torch.testing.assert_close(denoiser(x0 + sigma[:, None] * noise, sigma), x0)
    assert denoiser.loss(x0, sigma, noise).abs().max() < 1e-12


@pytest.mark.parametrize("name", FORMULATIONS)
def test_loss_weight_equals_plain_mse_on_the_network_output(name):
    f = FORMULATIONS[name]
    x0 = torch.randn(5, 4, generator=seeded(0), dtype=torch.float64)
    noise = torch.randn(5, 4, generator=seeded(1), dtype=torch.float64)
    sigma = f.sample_sigma(5, seeded(2)).double()
    wrong = torch.randn(5, 4, generator=seeded(3), dtype=torch.float64)

    class Constant(torch.nn.Module):
        def forward(self, x_in, c_noise, cond):
            return wrong

    loss = Denoiser(Constant(), f).loss(x0, sigma, noise)
    mse = ((wrong - output_target(f.parametrization, x0, noise, sigma, f.sigma_data)) ** 2).mean(1)
    torch.testing.assert_close(loss, mse)


def test_edm_training_density_is_log_normal():
    sigma = EDM().sample_sigma(200_000, seeded(0)).double()
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.01)


@pytest.mark.parametrize("name", FORMULATIONS)
def test_training_sigmas_lie_in_a_sane_range(name):
    sigma = FORMULATIONS[name].sample_sigma(10_000, seeded(0))
    assert torch.isfinite(sigma).all() and (sigma > 0).all()


def test_score_from_the_ideal_denoiser_is_the_gradient_of_the_log_density():
    mixture = example_mixture(2)
    x = mixture.sample(16, seeded(0), sigma=0.7).requires_grad_(True)
    sigma = torch.full((16,), 0.7, dtype=torch.float64)
    (autograd_score,) = torch.autograd.grad(mixture.log_prob(x, sigma).sum(), x)
    torch.testing.assert_close(score_from_x0(mixture(x, sigma), x, sigma), autograd_score)


SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 3.0, 20.0, 80.0], dtype=torch.float64)


def test_edm_scalings_are_karras_table_1():
    """Karras et al. 2022, Table 1, "ours": c_skip = sd^2 / (s^2 + sd^2), c_out = s sd / sqrt(s^2 + sd^2),
    c_in = 1 / sqrt(s^2 + sd^2), c_noise = ln(s) / 4, with sigma_data = 0.5."""
    c_skip, c_out, c_in, c_noise = FORMULATIONS["edm"].scalings(SIGMAS)
    s, sd = SIGMAS, 0.5
    torch.testing.assert_close(c_skip, sd**2 / (s**2 + sd**2))
    torch.testing.assert_close(c_out, s * sd / (s**2 + sd**2) ** 0.5)
    torch.testing.assert_close(c_in, 1 / (s**2 + sd**2) ** 0.5)
    torch.testing.assert_close(c_noise, torch.log(s) / 4)


def test_vp_scalings_are_karras_table_1():
    """Table 1, VP: c_skip = 1, c_out = -s, c_in = 1 / sqrt(s^2 + 1), c_noise = (M - 1) sigma^-1(s) with
    M = 1000 and sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), beta_d = 19.9, beta_min = 0.1."""
    s = SIGMAS[FORMULATIONS["vp"].sigma_max >= SIGMAS]
    c_skip, c_out, c_in, c_noise = FORMULATIONS["vp"].scalings(s)
    beta_d, beta_min = 19.9, 0.1
    t = ((beta_min**2 + 2 * beta_d * torch.log(s**2 + 1)).sqrt() - beta_min) / beta_d  # the root for t
    torch.testing.assert_close(c_skip, torch.ones_like(s))
    torch.testing.assert_close(c_out, -s)
    torch.testing.assert_close(c_in, 1 / (s**2 + 1).sqrt())
    torch.testing.assert_close(c_noise, 999 * t)


def test_ve_scalings_are_karras_table_1():
    """Table 1, VE: c_skip = 1, c_out = s, c_in = 1, c_noise = ln(s / 2)."""
    c_skip, c_out, c_in, c_noise = FORMULATIONS["ve"].scalings(SIGMAS)
    torch.testing.assert_close(c_skip, torch.ones_like(SIGMAS))
    torch.testing.assert_close(c_out.abs(), SIGMAS)  # the sign is the parametrisation's (eps: -s)
    torch.testing.assert_close(c_in, torch.ones_like(SIGMAS))
    torch.testing.assert_close(c_noise, torch.log(0.5 * SIGMAS))


def test_a_small_network_overfits_a_fixed_batch():
    """The whole training path (network, denoiser loss, AdamW) learns: the loss on one batch falls."""
    from unnoise.nn.presets import PRESETS

    torch.manual_seed(0)
    network = PRESETS["tiny"].build()
    denoiser = Denoiser(network, FORMULATIONS["edm"])
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3)
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    sigma, noise = torch.tensor([0.3, 0.6, 1.0, 2.0]), torch.randn(4, 3, 16, 16)
    losses = []
    for _ in range(60):
        loss = denoiser.loss(x0, sigma, noise).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
