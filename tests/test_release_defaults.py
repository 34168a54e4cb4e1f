"""A release's own sampling defaults: config.json's "defaults" ({"guidance": G}), set by `unnoise defaults`,
used by every edge (library, CLI, eval, server) when a caller gives no guidance; checked like the rest."""

import json
import shutil

import httpx
import pytest

import unnoise
from tests.conftest import weights_of
from unnoise.errors import UnnoiseError
from unnoise.eval.shapes_eval import run_shapes_eval
from unnoise.images import read_png_parameters
from unnoise.release import sha256
from unnoise.server.app import create_app
from unnoise.settings import DEFAULT_GUIDANCE
from unnoise.train.config import TrainConfig
from unnoise.train.loop import train

from .conftest import run_cli
from .test_server import Server, free_port


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(
        TrainConfig(preset="tiny", batch_size=4, steps=2, checkpoint_every=2, sample_every=0, out=str(out))
    )


@pytest.fixture
def release(trained, tmp_path):
    """A copy of the trained release that a test may change."""
    return shutil.copytree(trained, tmp_path / "release")


def config_of(release):
    return json.loads((release / "config.json").read_text())


def test_a_release_without_defaults_uses_unnoise_s(release):
    assert "defaults" not in config_of(release)
    assert unnoise.load(release).default_guidance == DEFAULT_GUIDANCE
    shown = run_cli("defaults", str(release))
    assert shown.returncode == 0 and f"guidance {DEFAULT_GUIDANCE:g} (unnoise's default" in shown.stdout


def test_defaults_sets_the_guidance_every_call_without_one_uses(release, tmp_path):
    weights = sha256(weights_of(release))
    set_ = run_cli("defaults", str(release), "--guidance", "1.5")
    assert set_.returncode == 0 and "guidance 1.5 (the release's own)" in set_.stdout, set_.stderr
    assert config_of(release)["defaults"] == {"guidance": 1.5}
    assert sha256(weights_of(release)) == weights == config_of(release)["weights_sha256"]
    assert not list(release.glob(".tmp-*"))

    pipe = unnoise.load(release)
    assert pipe.default_guidance == 1.5
    assert "CFG scale: 1.5," in pipe.generate("a red circle", seed=1, steps=2)[0].info["parameters"]
    assert "CFG scale: 4," in pipe.generate("a red circle", seed=1, steps=2, guidance=4)[0].info["parameters"]

    for flags, expected in (((), 1.5), (("--guidance", "2.5"), 2.5)):
        out = tmp_path / f"out{len(flags)}"
        made = run_cli("generate", "a red circle", "--model", str(release), "--steps", "2", "--seed", "3",
                       "--out", str(out), *flags)  # fmt: skip
        assert made.returncode == 0, made.stderr
        assert read_png_parameters(next(out.glob("*.png"))).guidance == expected

    report = run_shapes_eval(release, samples_per_prompt=1, steps=2, prompts_per_category=1, device="cpu")
    assert report.settings["guidance"] == 1.5

    reset = run_cli("defaults", str(release), "--reset")
    assert reset.returncode == 0 and "defaults" not in config_of(release)
    assert unnoise.load(release).default_guidance == DEFAULT_GUIDANCE


@pytest.mark.parametrize("value", ["31", "-1", "nan", "inf"])
def test_a_guidance_out_of_range_is_refused_and_nothing_is_written(release, value):
    before = (release / "config.json").read_text()
    refused = run_cli("defaults", str(release), "--guidance", value)
    assert refused.returncode == 2 and "--guidance must be in 0..30" in refused.stderr
    assert (release / "config.json").read_text() == before


@pytest.mark.parametrize(
    "defaults, named",
    [
        ({"guidance": "high"}, "defaults.guidance must be a number in 0..30, got 'high'"),
        ({"guidance": float("nan")}, "defaults.guidance must be a number in 0..30, got nan"),
        ({"guidance": True}, "defaults.guidance must be a number in 0..30"),
        ({"guidence": 1.5}, "defaults must be an object of guidance, bind_attributes only, got ['guidence']"),
        ([1.5], "defaults must be an object"),
    ],
)
def test_hand_edited_defaults_are_named_when_the_model_loads(release, defaults, named):
    config = {**config_of(release), "defaults": defaults}
    (release / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnnoiseError, match="config.json: " + named.replace("[", r"\[").replace("]", r"\]")):
        unnoise.load(release)
    made = run_cli("generate", "a red circle", "--model", str(release), "--steps", "1")
    assert made.returncode == 2 and named in made.stderr


def test_the_server_fills_in_the_model_s_guidance_and_a_client_s_own_wins(release):
    run_cli("defaults", str(release), "--guidance", "1.5")
    port = free_port()
    server = Server(create_app(unnoise.load(release), port=port, queue_size=2), port)
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            assert client.get("/config").json()["defaults"]["guidance"] == 1.5
            for sent, used in (({}, 1.5), ({"cfg_scale": 7}, 7.0)):
                reply = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, **sent})
                assert reply.status_code == 200, reply.text
                assert reply.json()["parameters"]["cfg_scale"] == used
                assert f"CFG scale: {used:g}," in json.loads(reply.json()["info"])["infotexts"][0]
    finally:
        server.stop()


def test_defaults_removes_what_a_killed_writer_left_and_not_what_a_live_one_is_writing(release):
    """Issue 31 item 7: a killed `unnoise defaults` left `.tmp-config-PID.json` files nothing removed."""
    import subprocess
    import sys

    argv = [sys.executable, "-c", "import os; print(os.getpid())"]
    gone = subprocess.run(argv, capture_output=True, text=True, check=True)  # a process that has ended
    dead_pid, live_pid = int(gone.stdout), 1
    left = [release / f".tmp-config-{dead_pid}.json", release / f".tmp-model-{dead_pid}.safetensors"]
    writing = release / f".tmp-config-{live_pid}.json"  # PID 1, init: alive, and not this writer
    for path in [*left, writing]:
        path.write_text("half")
    assert run_cli("defaults", str(release), "--guidance", "2").returncode == 0
    assert not any(path.exists() for path in left) and writing.exists()
