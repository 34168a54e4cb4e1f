"""The public sampling call: registry, user denoisers, callbacks, per-sample seeds, and clear errors."""

import pytest
import torch

import unnoise
from unnoise.diffusion.samplers import SAMPLERS, STOCHASTIC, Step
from unnoise.diffusion.schedules import karras
from unnoise.diffusion.tensors import randn_like
from unnoise.errors import NonFiniteError, UnnoiseError

from .conftest import seeded


def test_registry_uses_k_diffusion_names():
    expected = {
        "euler",
        "euler_ancestral",
        "heun",
        "dpmpp_2m",
        "dpmpp_3m",
        "dpmpp_2m_sde",
        "ddim",
        "ddpm",
        "unipc",
        "pc",
        "rk45",
    }
    assert expected <= set(unnoise.SAMPLERS)


def test_any_callable_is_a_denoiser():
    """A user's own denoiser: here the ideal one for N(0, 1), D = x / (1 + sigma^2)."""

    def my_denoiser(x, sigma, cond):
        assert sigma.shape == (x.shape[0],)
        return x / (1 + sigma[:, None, None, None] ** 2)

    noise = torch.randn(3, 1, 4, 4, generator=seeded(0))
    out = unnoise.sample(my_denoiser, noise, karras(8), sampler="heun")
    assert out.shape == noise.shape and out.dtype == torch.float32


def test_cond_reaches_the_denoiser(mixture):
    seen = []

    def denoiser(x, sigma, cond):
        seen.append(cond)
        return mixture(x, sigma)

    unnoise.sample(
        denoiser, torch.randn(2, 2, dtype=torch.float64), karras(3), sampler="euler", cond="a red circle"
    )
    assert seen == ["a red circle"] * 3


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_runs_in_float32_and_reports_each_step(name, mixture):
    steps = []
    x = unnoise.sample(
        lambda x, s, c: mixture(x, s),
        torch.randn(5, 2, generator=seeded(0)),
        karras(6),
        sampler=name,
        generator=seeded(1),
        callback=steps.append,
    )
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert all(isinstance(s, Step) and s.x.shape == (5, 2) and s.denoised.shape == (5, 2) for s in steps)
    if name != "rk45":  # rk45 reports every evaluation of its adaptive solver
        assert [s.index for s in steps] == list(range(6))
        assert steps[-1].sigma == pytest.approx(0.002)


@pytest.mark.parametrize("name", [*sorted(STOCHASTIC - {"pc"}), "pc-sample"])
def test_a_seed_gives_the_same_sample_whatever_the_batch(name, mixture):
    """Sample i depends only on generator i: a batch of 4 and a batch of 1 agree on the shared seed."""
    options = {"step_size": "sample"} if name == "pc-sample" else {}
    name = name.removesuffix("-sample")
    seeds = [10, 11, 12, 13]

    def draw(seeds):
        noise = randn_like(torch.zeros(len(seeds), 2, dtype=torch.float64), [seeded(s) for s in seeds])
        return unnoise.sample(
            mixture, noise, karras(10), sampler=name, generator=[seeded(s + 100) for s in seeds], **options
        )

    torch.testing.assert_close(draw(seeds)[2], draw([12])[0])


def test_unknown_sampler_names_the_closest(mixture):
    with pytest.raises(UnnoiseError, match=r"unknown sampler 'eular'.*Did you mean euler"):
        unnoise.sample(mixture, torch.randn(2, 2), karras(4), sampler="eular")


@pytest.mark.parametrize(
    ("sigmas", "message"),
    [
        (torch.tensor([10.0, 1.0, 0.1]), "must end in 0"),
        (torch.tensor([1.0, 10.0, 0.0]), "strictly decreasing.*sigmas\\[1\\]"),
        (torch.tensor([10.0, float("nan"), 0.0]), "NaN"),
        (torch.tensor([[10.0, 0.0]]), "1-D"),
        (torch.tensor([0.0]), "1-D tensor of at least 2"),
        (torch.tensor([1.0, -1.0, 0.0]), "positive"),
    ],
)
def test_bad_sigmas_are_named(sigmas, message, mixture):
    for name in SAMPLERS:
        with pytest.raises(UnnoiseError, match=message):
            SAMPLERS[name](mixture, torch.randn(2, 2), sigmas)


def test_a_denoiser_returning_nan_is_reported_with_its_noise_level():
    def broken(x, sigma, cond):
        return torch.where(sigma[:, None] < 1, torch.nan, x / (1 + sigma[:, None] ** 2))

    for name in SAMPLERS:
        with pytest.raises(NonFiniteError, match=r"NaN or inf at sigma = 0\.9"):
            unnoise.sample(broken, torch.randn(2, 2), torch.tensor([2.0, 0.9, 0.0]), sampler=name)


def test_a_denoiser_returning_the_wrong_shape_is_reported():
    with pytest.raises(UnnoiseError, match=r"returned \(2,\) for an input of shape \(2, 2\)"):
        unnoise.sample(lambda x, s, c: x[:, 0], torch.randn(2, 2), karras(3), sampler="euler")


def test_bad_options_are_named(mixture):
    with pytest.raises(UnnoiseError, match="variant"):
        unnoise.sample(mixture, torch.randn(2, 2), karras(3), sampler="unipc", variant="bh3")
    with pytest.raises(TypeError, match="eta"):
        unnoise.sample(mixture, torch.randn(2, 2), karras(3), sampler="euler", eta=1.0)
    with pytest.raises(UnnoiseError, match="positive integer"):
        karras(0)
