"""Stochastic (and deterministic) samplers reach the right distribution, and a broken one is caught.

Each sampler draws 4000 points of a 2-D Gaussian mixture, compared with 4000 exact samples by the sliced
2-Wasserstein distance, plus the mean and covariance. Two independent exact sample sets are 0.036 apart
(measured); correct samplers with 100-200 steps measured 0.028-0.056; the threshold is 0.072 (twice the
floor). The same sampler with its noise scaled by 1.2 measured 0.11, and is caught below.
"""

import pytest
import torch

from unnoise.diffusion.samplers import SAMPLERS, STOCHASTIC, sample
from unnoise.diffusion.schedules import karras
from unnoise.testing import energy_distance, sliced_wasserstein

from .conftest import seeded

N = 4000
THRESHOLD = 0.072


@pytest.fixture(scope="module")
def setup():
    from unnoise.testing import example_mixture

    mixture = example_mixture(2)
    exact = mixture.sample(N, seeded(1))
    noise = torch.randn(N, 2, generator=seeded(3), dtype=torch.float64)
    return mixture, exact, noise


def distance(x, exact):
    return sliced_wasserstein(x, exact, generator=seeded(0))


def check_distribution(x, mixture, exact):
    assert distance(x, exact) < THRESHOLD, f"sliced W2 {distance(x, exact):.4f} >= {THRESHOLD}"
    assert (x.mean(0) - mixture.mean).norm() < 0.06
    assert (torch.cov(x.T) - mixture.covariance).norm() < 0.15


def test_threshold_is_above_the_noise_floor_of_exact_samples(setup):
    mixture, exact, _ = setup
    floor = distance(mixture.sample(N, seeded(2)), exact)
    assert floor < THRESHOLD / 1.5
    assert energy_distance(mixture.sample(N, seeded(2)), exact) < 2e-3


CASES = [
    ("ddpm", 100, {}),
    ("ddim", 100, {"eta": 1.0}),
    ("euler_ancestral", 100, {}),
    ("heun", 100, {"s_churn": 40.0}),
    ("dpmpp_2m_sde", 100, {}),
    ("dpmpp_3m_sde", 100, {}),
    ("dpmpp_2m_sde_heun", 100, {}),
    ("pc", 200, {}),
    ("euler", 200, {}),
    ("dpmpp_2m", 50, {}),
    ("dpmpp_3m", 50, {}),
    ("unipc", 50, {}),
    ("rk45", 10, {}),
]


def test_every_sampler_is_checked():
    assert {name for name, _, _ in CASES} == set(SAMPLERS)


@pytest.mark.parametrize(("sampler", "steps", "options"), CASES)
def test_sampler_reaches_the_true_distribution(sampler, steps, options, setup):
    mixture, exact, noise = setup
    x = sample(mixture, noise, karras(steps), sampler=sampler, generator=seeded(4), **options)
    check_distribution(x, mixture, exact)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])
def test_a_sampler_with_the_wrong_noise_scale_is_caught(sampler, setup):
    mixture, exact, noise = setup
    x = sample(mixture, noise, karras(100), sampler=sampler, generator=seeded(4), s_noise=1.2)
    assert distance(x, exact) > THRESHOLD


def test_stochastic_samplers_use_the_generator(setup):
    mixture, _, noise = setup
    for name in STOCHASTIC:
        a = sample(mixture, noise[:8], karras(5), sampler=name, generator=seeded(1))
        b = sample(mixture, noise[:8], karras(5), sampler=name, generator=seeded(1))
        c = sample(mixture, noise[:8], karras(5), sampler=name, generator=seeded(2))
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c), name


# --- exact identities between samplers -------------------------------------------------------------


def run(name, mixture, noise, seed=7, steps=12, **options):
    return sample(mixture, noise[:64], karras(steps), sampler=name, generator=seeded(seed), **options)


def test_ddim_at_eta_0_is_euler(setup):
    mixture, _, noise = setup
    torch.testing.assert_close(run("ddim", mixture, noise), run("euler", mixture, noise))


def test_ddim_at_eta_1_is_ddpm_is_euler_ancestral(setup):
    """Song et al. 2021 (DDIM, Sec. 4.1): eta = 1 gives DDPM's posterior sampling."""
    mixture, _, noise = setup
    ddpm = run("ddpm", mixture, noise)
    torch.testing.assert_close(run("ddim", mixture, noise, eta=1.0), ddpm)
    torch.testing.assert_close(run("euler_ancestral", mixture, noise), ddpm)


def test_unipc_first_order_is_ddim_and_unip2_is_dpmpp_2m(setup):
    """UniP-1 is DDIM; UniP-2 with B(h) = e^h - 1 and a_1 = 1/2 is DPM-Solver++(2M) (Zhao et al. 2023)."""
    mixture, _, noise = setup
    torch.testing.assert_close(
        run("unipc", mixture, noise, order=1, corrector=False), run("euler", mixture, noise)
    )
    torch.testing.assert_close(run("unipc", mixture, noise, corrector=False), run("dpmpp_2m", mixture, noise))


def test_heun_without_churn_is_deterministic_and_ignores_the_generator(setup):
    mixture, _, noise = setup
    torch.testing.assert_close(run("heun", mixture, noise, seed=1), run("heun", mixture, noise, seed=2))


def test_sde_solvers_at_eta_0_are_deterministic(setup):
    mixture, _, noise = setup
    for name in ("dpmpp_2m_sde", "dpmpp_3m_sde"):
        torch.testing.assert_close(
            run(name, mixture, noise, seed=1, eta=0.0), run(name, mixture, noise, seed=2, eta=0.0)
        )
    # k-diffusion's 2M SDE in its midpoint form at eta = 0 is DPM-Solver++(2M) term for term
    torch.testing.assert_close(run("dpmpp_2m_sde", mixture, noise, eta=0.0), run("dpmpp_2m", mixture, noise))


def test_sde_solvers_take_their_noise_from_a_noise_sampler_as_k_diffusion_s_do(setup):
    """noise_sampler(sigma, sigma_next) gives each step's unit noise (k-diffusion's convention: the noise of
    a Brownian tree, or a caller's own): called once per step before the last, and what it gives is used."""
    mixture, _, noise = setup
    sigmas = karras(8, 0.02, 20.0)
    for name in ("euler_ancestral", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"):
        calls = []

        def zeros(sigma, sigma_next, calls=calls):
            calls.append((sigma, sigma_next))
            return torch.zeros_like(noise)

        out = sample(mixture, noise, sigmas, sampler=name, noise_sampler=zeros)
        pairs = list(zip(sigmas.tolist(), sigmas.tolist()[1:], strict=False))[:-1]
        assert calls == pairs, name

        def ones(sigma, sigma_next):
            return torch.ones_like(noise)

        again = sample(mixture, noise, sigmas, sampler=name, noise_sampler=zeros, generator=seeded(9))
        torch.testing.assert_close(out, again, rtol=0, atol=0)  # no other randomness
        shifted = sample(mixture, noise, sigmas, sampler=name, noise_sampler=ones)
        assert (shifted - out).abs().max() > 1e-3, name
