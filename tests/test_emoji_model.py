"""The shipped `emoji-64` (issue 29): it loads by name, draws 64x64 images through its autoencoder, its
card's commands are how it was trained, its data's licence ships with it, and the folder evaluation
beside its card holds the issue's floor."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex

import numpy as np
import pytest

import unnoise
from unnoise.cli import build_parser
from unnoise.release import MODELS_DIR
from unnoise.train.autoencoder import AutoencoderTrainConfig
from unnoise.train.config import TrainConfig

MODEL = MODELS_DIR / "emoji-64"
FOLDERS = ("data", "autoencoder", "out")  # paths: the card's are relative, the recorded ones absolute


@pytest.fixture(scope="module")
def pipe():
    return unnoise.load("emoji-64")


def test_it_loads_by_name_and_draws_64_pixel_images_through_its_autoencoder(pipe):
    assert (pipe.resolution, pipe.codec.factor, pipe.codec.channels) == (64, 4, 4)
    image = pipe.generate("red apple", seed=0, steps=4)[0]
    assert image.size == (64, 64) and "Model: emoji-64" in image.info["parameters"].split(", ")
    assert np.asarray(image).std() > 5  # not a blank image


def configuration(command: str, config_class) -> dict:
    args = build_parser().parse_args(shlex.split(command)[1:])
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_class) if hasattr(args, f.name)}
    return dataclasses.asdict(config_class(**given))


def test_the_card_commands_are_the_recorded_configurations():
    card = (MODEL / "README.md").read_text()
    (ae_command,) = re.findall(r"^(unnoise train-autoencoder .*)$", card, flags=re.M)
    (command,) = re.findall(r"^(unnoise train .*)$", card, flags=re.M)
    for said, recorded, config_class in (
        (command, MODEL / "training.json", TrainConfig),
        (ae_command, MODEL / "autoencoder" / "training.json", AutoencoderTrainConfig),
    ):
        today, saved = configuration(said, config_class), json.loads(recorded.read_text())
        assert set(today) == set(saved), set(today) ^ set(saved)
        for name in set(today) - set(FOLDERS):
            assert today[name] == saved[name], name
        assert saved["data"].endswith("emoji-noto-64") and today["data"].endswith("emoji-noto-64")


def test_the_data_licence_ships_with_it():
    notice = (MODEL / "NOTICE.md").read_text()
    assert "Apache License" in notice and "Noto" in notice


def test_its_folder_evaluation_holds_the_floor():
    """Issue 29: text alignment on training captions at least halfway from the shuffled floor to the
    real-image ceiling; the held-out side reported beside it; the autoencoder >= 28 dB held out."""
    report = json.loads((MODEL / "folder_eval.json").read_text())
    assert (
        report["model"] == "emoji-64"
        and report["settings"]["guidance"] == unnoise.load("emoji-64").default_guidance
    )
    assert report["train"]["text_alignment"]["fraction"] >= 0.5
    assert report["held_out"]["captions"] > 0
    codec = json.loads((MODEL / "autoencoder" / "config.json").read_text())
    assert codec["evaluation"]["held_out"]["psnr"] >= 28
