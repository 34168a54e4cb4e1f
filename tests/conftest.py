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


def reports_alone_and_under_torchrun(args: list[str], tmp_path: Path) -> tuple[dict, dict]:
    """The JSON report of `unnoise ARGS --report FILE` run alone, and under a two-process torchrun launch;
    both at one thread per process (where each image is bit for bit the same)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    alone, shared = tmp_path / "alone.json", tmp_path / "shared.json"
    single = [sys.executable, "-m", "unnoise", *args, "--report", str(alone)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "unnoise", *args, "--report", str(shared)]  # fmt: skip
    for command in (single, launch):
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=300)
    return json.loads(alone.read_text()), json.loads(shared.read_text())
