"""Shared fixtures: the exact 2-D mixture, and float64 math so error slopes are not swamped by round-off."""

from pathlib import Path

import pytest
import torch

from unnoise.testing import example_mixture


@pytest.fixture
def mixture():
    return example_mixture(2)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_cli(*args: str):
    """`unnoise ARGS` in this process (no interpreter start-up per call): its exit code, stdout, stderr.
    An exception the CLI does not turn into a message propagates, so a traceback fails the test."""
    import contextlib
    import io
    from types import SimpleNamespace

    from unnoise.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def weights_of(release) -> Path:
    """The weights file a release's config.json names (model-<checksum>.safetensors since issue 31)."""
    from unnoise.release import read_release_config, weights_path

    return weights_path(Path(release), read_release_config(Path(release)))
