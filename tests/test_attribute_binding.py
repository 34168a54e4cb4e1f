"""Attribute binding: phrases from the tokens, the attention edit's exact values, the option end to end."""

import json
import shutil

import httpx
import numpy as np
import pytest
import torch

import unnoise
from unnoise.errors import UnnoiseError
from unnoise.images import read_png_parameters
from unnoise.nn.layers import BINDING_SHARPNESS, bind_attention
from unnoise.settings import ImageSettings
from unnoise.text.encoders import TextEmbedding
from unnoise.text.phrases import attribute_phrases
from unnoise.train.config import TrainConfig
from unnoise.train.loop import train

from .conftest import run_cli

TWO_OBJECTS = "a red circle and a blue square"


@pytest.mark.parametrize(
    ("pieces", "codes"),
    [
        (
            ["[CLS]", "a", "red", "circle", "to", "the", "left", "of", "a", "green", "square", "[SEP]"],
            [0, 0, 1, -1, 0, 0, 0, 0, 0, 2, -2, 0],
        ),
        # several attributes, a numeral, a noun in two pieces, punctuation
        (
            ["[CLS]", "two", "big", "red", "circles", ",", "a", "blue", "sq", "##uare", "[SEP]"],
            [0, 0, 1, 1, -1, 0, 0, 2, -2, -2, 0],
        ),
        # words of place are no phrase; one phrase alone is still coded (the edit needs two)
        (["[CLS]", "a", "red", "circle", "in", "the", "top", "left", "[SEP]"], [0, 0, 1, -1, 0, 0, 0, 0, 0]),
        (["[CLS]", "circle", "[SEP]"], [0, 0, 0]),
        (["[CLS]", "[SEP]"], [0, 0]),
    ],
)
def test_phrases_are_runs_of_content_words_with_the_noun_last(pieces, codes):
    assert attribute_phrases(pieces) == codes


def two_phrase_attention(attr_share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One row, one head, one pixel; tokens: [CLS] red circle and blue square [SEP]."""
    phrases = torch.tensor([[0, 1, -1, 0, 2, -2, 0]])
    p = torch.tensor([[[[0.1, 0.3 * attr_share, 0.2, 0.05, 0.3 * (1 - attr_share), 0.04, 0.01]]]])
    return p / p.sum(-1, keepdim=True), phrases


def test_the_nouns_attention_follows_the_attributes_and_the_rest_is_kept():
    p, phrases = two_phrase_attention(0.8)
    q = bind_attention(p, phrases)
    assert torch.allclose(q.sum(-1), torch.ones(1, 1, 1))
    others = [0, 1, 3, 4, 6]
    assert torch.equal(q[..., others], p[..., others])
    nouns = p[..., 2] + p[..., 5]
    share = torch.softmax(BINDING_SHARPNESS * torch.log(torch.tensor([0.8, 0.2])), 0)
    assert torch.allclose(q[..., 2], nouns * share[0]) and torch.allclose(q[..., 5], nouns * share[1])
    assert q[..., 2] > 3.9 * q[..., 5]  # "red" read 4x more than "blue": so is "circle" than "square"


def test_rows_with_fewer_than_two_phrases_are_untouched():
    p, phrases = two_phrase_attention(0.8)
    both = torch.cat([p, p])  # (2, 1, 1, 7)
    codes = torch.stack([phrases[0], torch.tensor([0, 1, -1, 0, 0, 0, 0])])  # the second row: one phrase
    q = bind_attention(both, codes)
    assert torch.equal(q[1], p[0]) and not torch.equal(q[0], p[0])
    assert torch.equal(bind_attention(p, torch.zeros_like(phrases)), p)


def embedding(batch: int, length: int) -> TextEmbedding:
    mask = torch.ones(batch, length, dtype=torch.bool)
    return TextEmbedding(torch.randn(batch, length, 4), mask, torch.randn(batch, 4))


def test_the_codes_travel_with_the_embedding():
    coded = embedding(2, 3).with_phrases([[0, 1, -1], [1, -1]])
    assert coded.phrases.tolist() == [[0, 1, -1], [1, -1, 0]]
    both = TextEmbedding.cat([embedding(1, 5), coded])  # [uncond; cond] for guidance
    assert both.phrases.tolist() == [[0] * 5, [0, 1, -1, 0, 0], [1, -1, 0, 0, 0]]
    assert both.select([2]).phrases.tolist() == [[1, -1, 0, 0, 0]]
    assert TextEmbedding.cat([embedding(1, 2), embedding(1, 3)]).phrases is None
    with pytest.raises(UnnoiseError, match="phrase codes"):
        TextEmbedding(coded.tokens, coded.mask, coded.pooled, torch.zeros(2, 3))


def test_settings_write_and_read_it_and_refuse_what_it_cannot_do():
    settings = ImageSettings(TWO_OBJECTS, width=32, height=32, bind_attributes=True).check()
    assert settings.parameters().endswith(", Attribute binding: on")
    assert ImageSettings.from_parameters(settings.parameters()) == settings
    assert "Attribute binding" not in settings.replace(bind_attributes=False).parameters()
    with pytest.raises(UnnoiseError, match="prompt mix"):
        settings.replace(mix_prompt="a green circle", prompt_mix=0.5).check()
    with pytest.raises(UnnoiseError, match="true or false"):
        settings.replace(bind_attributes="yes").check()


@pytest.fixture(scope="module")
def pipe():
    return unnoise.load("shapes-32")


def test_it_changes_prompts_of_several_phrases_only_and_the_png_re_creates_it(pipe, tmp_path):
    args = {"seed": 3, "num_images": 2, "steps": 6}
    bound = pipe.generate(TWO_OBJECTS, bind_attributes=True, **args)
    plain = pipe.generate(TWO_OBJECTS, bind_attributes=False, **args)  # shapes-32 binds by default
    assert not np.array_equal(np.asarray(bound[0]), np.asarray(plain[0]))
    one = "a red circle in the top left"
    assert np.array_equal(
        np.asarray(pipe.generate(one, bind_attributes=True, **args)[1]),
        np.asarray(pipe.generate(one, bind_attributes=False, **args)[1]),
    )
    again = pipe.render(ImageSettings.from_parameters(bound[1].info["parameters"]))[0]
    assert np.array_equal(np.asarray(again), np.asarray(bound[1]))


def test_the_cli_and_the_server_take_it(pipe, tmp_path):
    from unnoise.server.app import create_app

    from .test_server import Server, free_port

    done = run_cli(
        "generate", TWO_OBJECTS, "--seed", "1", "--steps", "4", "--bind-attributes", "--out", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    assert read_png_parameters(tmp_path / "00000-1.png").bind_attributes
    port = free_port()
    server = Server(create_app(pipe, port=port, queue_size=2), port)
    try:
        body = {"prompt": TWO_OBJECTS, "steps": 4, "seed": 1, "bind_attributes": True}
        reply = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)
    finally:
        server.stop()
    assert reply.status_code == 200, reply.text
    assert "Attribute binding: on" in reply.json()["info"]


def test_a_model_without_cross_attention_names_why_it_cannot(tmp_path):
    config = TrainConfig(
        preset="dit-tiny", batch_size=4, steps=1, checkpoint_every=1, sample_every=0, out=str(tmp_path)
    )
    dit = unnoise.load(train(config))
    with pytest.raises(UnnoiseError, match="no cross-attention"):
        dit.generate(TWO_OBJECTS, steps=2, bind_attributes=True)


# --- a release that binds by default: trained so, or set with `unnoise defaults` ------------------------


@pytest.fixture(scope="module")
def bound_release(tmp_path_factory):
    """A tiny model trained with its attention bound: its release binds by default."""
    out = tmp_path_factory.mktemp("bound")
    config = TrainConfig(
        preset="tiny",
        batch_size=4,
        steps=2,
        checkpoint_every=2,
        sample_every=2,
        bind_attributes=True,
        out=str(out),
    )
    return train(config)


def test_a_model_trained_bound_samples_bound_unless_told_not_to(bound_release):
    assert json.loads((bound_release / "config.json").read_text())["defaults"] == {"bind_attributes": True}
    pipe = unnoise.load(bound_release)
    assert pipe.default_bind_attributes
    made = pipe.generate(TWO_OBJECTS, seed=1, steps=2)[0]
    assert ImageSettings.from_parameters(made.info["parameters"]).bind_attributes
    plain = pipe.generate(TWO_OBJECTS, seed=1, steps=2, bind_attributes=False)[0]
    assert "Attribute binding" not in plain.info["parameters"]
    mixed = pipe.generate(TWO_OBJECTS, seed=1, steps=2, mix_prompt="a green circle", prompt_mix=0.5)[0]
    assert "Attribute binding" not in mixed.info["parameters"]  # the default gives way to a prompt mix
    with pytest.raises(UnnoiseError, match="prompt mix"):
        pipe.generate(TWO_OBJECTS, steps=2, bind_attributes=True, mix_prompt="a green circle", prompt_mix=0.5)


def test_unnoise_defaults_sets_shows_and_resets_it(bound_release, tmp_path):
    release = tmp_path / "model"
    shutil.copytree(bound_release, release)
    shown = run_cli("defaults", str(release))
    assert shown.returncode == 0 and "attribute binding on (the release's own)" in shown.stdout
    off = run_cli("defaults", str(release), "--no-bind-attributes", "--guidance", "2")
    assert off.returncode == 0, off.stderr
    assert json.loads((release / "config.json").read_text())["defaults"] == {
        "bind_attributes": False,
        "guidance": 2,
    }
    assert not unnoise.load(release).default_bind_attributes
    both = run_cli("defaults", str(release), "--reset", "--guidance", "2")
    assert both.returncode == 2 and "--reset" in both.stderr
    reset = run_cli("defaults", str(release), "--reset")
    assert reset.returncode == 0 and "attribute binding off (unnoise's default" in reset.stdout
    assert "defaults" not in json.loads((release / "config.json").read_text())
    config = json.loads((release / "config.json").read_text())
    (release / "config.json").write_text(json.dumps({**config, "defaults": {"bind_attributes": "yes"}}))
    with pytest.raises(UnnoiseError, match="bind_attributes"):
        unnoise.load(release)


def test_a_request_that_leaves_it_out_gets_the_model_s(bound_release):
    from unnoise.server.requests import Txt2Img, with_model_defaults

    pipe = unnoise.load(bound_release)
    assert with_model_defaults(Txt2Img(prompt=TWO_OBJECTS), pipe).bind_attributes is True
    assert (
        with_model_defaults(Txt2Img(prompt=TWO_OBJECTS, bind_attributes=False), pipe).bind_attributes is False
    )


def test_training_bound_needs_cross_attention_and_no_compile(tmp_path):
    with pytest.raises(UnnoiseError, match="--bind-attributes"):
        TrainConfig(bind_attributes=True, compile=True).validate()
    config = TrainConfig(preset="dit-tiny", batch_size=4, steps=1, bind_attributes=True, out=str(tmp_path))
    with pytest.raises(UnnoiseError, match="no cross-attention"):
        train(config)
