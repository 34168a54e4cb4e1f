"""Schedules: decreasing, ending in exactly 0, with the spacing each one promises."""

import math

import pytest
import torch

from unnoise.diffusion.formulations import FORMULATIONS, RectifiedFlow, VPDiscrete
from unnoise.diffusion.samplers import check_sigmas
from unnoise.diffusion.schedules import default_sigmas, discrete, exponential, flow_shift, karras, uniform_t
from unnoise.errors import UnnoiseError


@pytest.mark.parametrize(
    "sigmas",
    [
        karras(10),
        exponential(10),
        uniform_t(FORMULATIONS["vp"], 10),
        discrete(VPDiscrete(), 10),
        flow_shift(10),
        *(default_sigmas(f, 10) for f in FORMULATIONS.values()),
    ],
)
def test_every_schedule_is_valid(sigmas):
    check_sigmas(sigmas)
    assert len(sigmas) == 11 and sigmas[-1] == 0 and sigmas.dtype == torch.float64


def test_karras_endpoints_and_rho_spacing():
    sigmas = karras(5, 0.002, 80.0, rho=7.0)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[-2].item() == pytest.approx(0.002)
    roots = sigmas[:-1] ** (1 / 7)
    torch.testing.assert_close(roots.diff(), roots.diff()[:1].expand(4))  # uniform in sigma^(1/rho)


def test_exponential_is_uniform_in_log_snr():
    log_snr = -2 * exponential(6, 0.01, 10.0)[:-1].log()
    torch.testing.assert_close(log_snr.diff(), log_snr.diff()[:1].expand(5))


def test_uniform_t_is_uniform_in_the_formulations_time():
    vp = FORMULATIONS["vp"]
    t = vp.t(uniform_t(vp, 8, t_min=1e-3, t_max=1.0)[:-1])
    torch.testing.assert_close(t, torch.linspace(1.0, 1e-3, 8, dtype=torch.float64))


def test_discrete_spacings_pick_training_timesteps():
    f = VPDiscrete()
    trailing = f.t(discrete(f, 10, "trailing")[:-1]).round().long()
    leading = f.t(discrete(f, 10, "leading", offset=1)[:-1]).round().long()
    linspace = f.t(discrete(f, 10, "linspace")[:-1]).round().long()
    assert trailing.tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert leading.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert linspace[0] == 999 and linspace[-1] == 0
    with pytest.raises(UnnoiseError, match="1001 steps asked of a model with 1000 timesteps"):
        discrete(f, 1001)


def test_flow_shift_moves_time_towards_noise():
    flow = RectifiedFlow()
    unshifted = flow.t(flow_shift(10, shift=1.0)[:-1])
    shifted = flow.t(flow_shift(10, shift=3.0)[:-1])
    assert (shifted[1:] > unshifted[1:]).all()
    t = unshifted[4]
    assert shifted[4].item() == pytest.approx(3 * t / (1 + 2 * t))


def test_bad_step_counts_are_named():
    for bad in (0, -3, 2.5):
        with pytest.raises(UnnoiseError, match="positive integer"):
            karras(bad)
    assert math.isfinite(float(karras(1)[0]))
