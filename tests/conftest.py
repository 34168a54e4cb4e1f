"""Shared fixtures: the exact 2-D mixture, and float64 math so error slopes are not swamped by round-off."""

import pytest
import torch

from unnoise.testing import example_mixture


@pytest.fixture
def mixture():
    return example_mixture(2)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
