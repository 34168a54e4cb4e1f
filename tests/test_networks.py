"""The networks behind the denoiser: the UNet and the transformer start as the identity of the formulation
(zero-initialised outputs), know where each pixel is, build from their saved config, and old releases load."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from unnoise.diffusion.denoiser import Denoiser
from unnoise.diffusion.formulations import FORMULATIONS
from unnoise.nn.presets import PRESETS, network_config_from_dict
from unnoise.nn.transformer import TransformerConfig, sincos_positions
from unnoise.nn.unet import UNetConfig
from unnoise.text.encoders import TextEmbedding

TINY_FOLDED = UNetConfig(
    resolution=16, patch=2, channels=16, channel_mult=(1, 2), blocks_per_level=1, head_channels=16
)
PRESETS_AND_FOLDED = {**PRESETS, "tiny-folded": TINY_FOLDED}
NETWORKS = ["tiny", "dit-tiny", "small-pos", "tiny-folded"]


def text(batch: int, length: int = 5, dim: int = 384) -> TextEmbedding:
    mask = torch.arange(length)[None] < torch.tensor([[length], [length - 2]][:batch])  # (B, T)
    tokens = torch.randn(batch, length, dim) * mask[..., None]
    return TextEmbedding(tokens, mask, torch.nn.functional.normalize(torch.randn(batch, dim), dim=-1))


@pytest.mark.parametrize("preset", NETWORKS)
def test_a_new_network_is_the_formulations_skip_and_has_the_images_shape(preset):
    config = PRESETS_AND_FOLDED[preset]
    torch.manual_seed(0)
    network = config.build()
    x = torch.randn(2, 3, config.resolution, config.resolution)
    out = network(x, torch.tensor([0.1, -0.5]), text(2))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0  # zero-initialised output layers
    denoiser = Denoiser(network, FORMULATIONS["edm"])
    sigma = torch.tensor([0.5, 2.0])
    c_skip = FORMULATIONS["edm"].scalings(sigma)[0]
    assert torch.allclose(denoiser(x, sigma, text(2)), c_skip[:, None, None, None] * x)
    assert network(x, torch.tensor([0.1, -0.5]), None).shape == x.shape  # unconditional


@pytest.mark.parametrize("preset", NETWORKS)
def test_the_text_and_the_noise_level_reach_the_output_once_trained(preset):
    torch.manual_seed(0)
    network = PRESETS_AND_FOLDED[preset].build()
    for p in network.parameters():  # move every parameter off its initial value
        torch.nn.init.normal_(p, std=0.05)
    r = PRESETS_AND_FOLDED[preset].resolution
    x = torch.randn(1, 3, r, r)
    a, b = text(2)[0], text(2)[1]
    assert not torch.allclose(network(x, torch.tensor([0.1]), a), network(x, torch.tensor([0.1]), b))
    assert not torch.allclose(network(x, torch.tensor([0.1]), a), network(x, torch.tensor([0.9]), a))


def test_padding_tokens_do_not_change_the_transformers_output():
    torch.manual_seed(0)
    network = TransformerConfig(resolution=16, width=64, depth=2, head_channels=32, text_layers=1).build()
    for p in network.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, c_noise, short = torch.randn(1, 3, 16, 16), torch.tensor([0.3]), text(1, length=4)
    assert torch.allclose(network(x, c_noise, short), network(x, c_noise, short.padded_to(9)), atol=1e-5)


def test_the_transformer_takes_other_sizes_in_patch_multiples():
    network = PRESETS["dit-tiny"].build()
    assert network(torch.randn(1, 3, 24, 32), torch.zeros(1), text(1)).shape == (1, 3, 24, 32)


def test_sincos_positions_tell_every_patch_apart_and_mirror_images_differ():
    p = sincos_positions(8, 8, 64)  # (64, 64)
    assert p.shape == (64, 64)
    distances = torch.cdist(p, p) + torch.eye(64) * 1e9
    assert distances.min() > 0.1
    grid = p.view(8, 8, 64)
    assert not torch.allclose(grid, grid.flip(1))  # left and right are different places


def test_a_folded_unet_sees_each_pixel_of_its_patch_and_has_the_patchs_stride():
    """patch=2: the stem folds 2x2 pixels into channels, so changing one pixel changes the output there."""
    assert TINY_FOLDED.stride == 4 and PRESETS["small-p2"].stride == 8
    torch.manual_seed(0)
    network = TINY_FOLDED.build()
    for p in network.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(1, 3, 16, 16)
    moved = x.clone()
    moved[0, :, 5, 6] += 1.0
    change = (network(moved, torch.zeros(1), text(1)) - network(x, torch.zeros(1), text(1))).abs().sum(1)[0]
    assert change[5, 6] > 0 and change.shape == (16, 16)
    assert network(torch.randn(1, 3, 12, 20), torch.zeros(1), text(1)).shape == (1, 3, 12, 20)  # stride 4
    with pytest.raises(ValueError, match="not a multiple of the UNet's stride 4"):
        replace(TINY_FOLDED, resolution=18)


@pytest.mark.parametrize("preset", ["small", "small-pos", "small-p2", "small-p2q", "dit-small", "dit-p4"])
def test_a_config_round_trips_through_json(preset):
    config = PRESETS[preset]
    assert network_config_from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_releases_before_network_kinds_are_unets():
    values = UNetConfig().to_dict()
    del values["kind"]
    assert isinstance(network_config_from_dict(values), UNetConfig)
    with pytest.raises(ValueError, match="unknown network kind"):
        network_config_from_dict({"kind": "mamba"})


def test_a_transformer_config_that_cannot_be_built_says_why():
    with pytest.raises(ValueError, match="multiple of the patch"):
        TransformerConfig(resolution=30, patch=4)
    with pytest.raises(ValueError, match="depth must be even"):
        TransformerConfig(depth=3)


def test_fractional_positions_code_a_place_the_same_at_every_resolution():
    from unnoise.nn.layers import fractional_positions

    coarse, fine = fractional_positions(3, 3, 64), fractional_positions(9, 9, 64)  # (9, 64), (81, 64)
    torch.testing.assert_close(coarse[4], fine[4 * 9 + 4])  # the centre pixel: u = (0.5, 0.5) in both
    torch.testing.assert_close(coarse[0], fine[1 * 9 + 1])  # u = 1/6 in both
    column = fractional_positions(1, 8, 64)[:, 32]  # cos(pi u) of the column, left to right
    assert torch.all(column[1:] < column[:-1]) and column[0] > 0 > column[-1]
    assert fractional_positions(2, 2, 66).shape == (4, 66)  # channels beyond 4 * (dim // 4) are zero


@pytest.mark.parametrize("query_positions", [False, True])
def test_query_positions_let_cross_attention_read_words_differently_across_the_image(query_positions):
    from unnoise.nn.layers import TransformerBlock
    from unnoise.text.encoders import TextEmbedding

    torch.manual_seed(0)
    block = TransformerBlock(64, 16, 32, self_attention=False, query_positions=query_positions)
    with torch.no_grad():
        block.cross_attention.out.weight.copy_(torch.eye(64))  # pass the attended values through
    text = TextEmbedding(torch.randn(1, 5, 16) * 3, torch.ones(1, 5, dtype=torch.bool), torch.randn(1, 16))
    out = block(torch.zeros(1, 64, 4, 4), text).flatten(2)  # (1, 64, 16): the same input at every pixel
    spread = (out - out.mean(2, keepdim=True)).abs().max()
    assert (spread > 1e-3) if query_positions else (spread < 1e-6)


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    """A valid release of the untrained tiny UNet (its config.json is what each case below breaks)."""
    from unnoise.release import release_config, save_release

    folder = tmp_path_factory.mktemp("release")
    network = PRESETS["tiny"].build()
    config = release_config(
        folder,
        network.config,
        formulation="edm",
        text_encoder="minilm",
        text_fingerprint="all-MiniLM-L6-v2-35cd86d015-t32",
        max_tokens=32,
        token_layers="last",
        steps=3,
        images_seen=12,
    )
    return save_release(folder, network, config)


REMOVED = "(removed)"


@pytest.mark.parametrize(
    "field, value",
    [
        ("formulation", REMOVED),
        ("formulation", "banana"),
        ("formulation", ["edm"]),
        ("text_encoder", REMOVED),
        ("text_encoder", "minilm"),
        ("text_encoder.name", REMOVED),
        ("text_encoder.name", 42),
        ("text_encoder.max_tokens", REMOVED),
        ("text_encoder.max_tokens", "32"),
        ("text_encoder.max_tokens", 0),
        ("text_encoder.max_tokens", True),
        ("text_encoder.token_layers", 3),
        ("text_encoder.token_layers", "all"),
    ],
    ids=repr,
)
def test_a_release_config_that_load_cannot_use_names_the_field(tiny_release, tmp_path, field, value):
    """Issue 12: pipeline.load read these fields unchecked (a KeyError or TypeError traceback)."""
    import shutil

    import unnoise

    folder = Path(shutil.copytree(tiny_release, tmp_path / "model"))
    config = json.loads((folder / "config.json").read_text())
    *parents, key = field.split(".")
    parent = config[parents[0]] if parents else config
    parent.pop(key) if value == REMOVED else parent.update({key: value})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(unnoise.UnnoiseError, match=rf"config.json: {field} must be .*, got"):
        unnoise.load(folder)


def test_the_unbroken_release_loads(tiny_release):
    import unnoise

    pipe = unnoise.load(tiny_release)
    assert pipe.resolution == 16 and pipe.text.max_tokens == 32


def test_the_release_format_is_written_and_read_in_one_module(tiny_release):
    """Issue 12: train/loop.py held the release schema; release.py now writes it as well as reading it."""
    from unnoise.release import RELEASE_FORMAT, read_release_config, released_steps

    config = read_release_config(tiny_release)
    assert config["format"] == RELEASE_FORMAT and config["resolution"] == 16
    assert config["text_encoder"]["name"] == "minilm" and released_steps(tiny_release) == 3
    assert released_steps(tiny_release / "missing") is None
