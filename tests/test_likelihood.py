"""Likelihood through the probability-flow ODE matches the exact Gaussian-mixture log density."""

import math

import pytest
import torch

import unnoise
from unnoise.diffusion.likelihood import bits_per_dim
from unnoise.testing import example_mixture

from .conftest import seeded

SIGMA_MIN = 0.002


@pytest.fixture(scope="module")
def data():
    mixture = example_mixture(2)
    x = mixture.sample(200, seeded(1))
    return mixture, x, -mixture.log_prob(x, SIGMA_MIN)


def test_exact_divergence_matches_the_true_density(data):
    """Error is dominated by the N(0, sigma_max^2) prior at sigma_max = 80 (0.013 nats max, measured)."""
    mixture, x, exact_nll = data
    result = unnoise.log_likelihood(mixture, x, sigma_min=SIGMA_MIN, divergence="exact")
    assert (result.nll - exact_nll).abs().max() < 0.02
    assert result.evaluations > 10


def test_larger_sigma_max_shrinks_the_prior_error(data):
    mixture, x, exact_nll = data
    result = unnoise.log_likelihood(
        mixture, x[:50], sigma_min=SIGMA_MIN, sigma_max=500.0, divergence="exact", rtol=1e-7, atol=1e-7
    )
    assert (result.nll - exact_nll[:50]).abs().max() < 0.003


def test_hutchinson_estimate_is_unbiased(data):
    """Per-point estimates are noisy; their mean is within 4 standard errors (+ the prior's 0.02)."""
    mixture, x, exact_nll = data
    result = unnoise.log_likelihood(mixture, x, sigma_min=SIGMA_MIN, probes=4, generator=seeded(2))
    difference = result.nll - exact_nll
    standard_error = difference.std() / math.sqrt(len(difference))
    assert difference.mean().abs() < 4 * standard_error + 0.02


def test_a_wrong_model_gets_a_worse_likelihood(data):
    _mixture, x, exact_nll = data
    wrong = example_mixture(2)
    wrong.means = wrong.means + 0.5
    result = unnoise.log_likelihood(wrong, x, sigma_min=SIGMA_MIN, divergence="exact")
    assert result.nll.mean() > exact_nll.mean() + 0.5


def test_bits_per_dim_of_8_bit_images():
    """A uniform density on [-1, 1]^d has nll = d log 2, i.e. 8 bits per dim for 256 levels."""
    dims = 3 * 32 * 32
    assert float(bits_per_dim(torch.tensor(dims * math.log(2.0)), dims)) == pytest.approx(8.0)
