"""The seed promise, bit for bit: an image's result never depends on how many images share its batch.

Kernels round differently by batch size (MKL on an AMD EPYC with AVX-512 picks one matrix-product kernel
for 1 row, another for 2-3 and a third for 4 and more), so an image drawn in a batch of 2 differed from the
same seed drawn alone by one level in one pixel. These tests hold the promise at 1 thread and at the
thread count CI uses (2), on random networks of each kind and on the shipped model.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import unnoise
from unnoise.diffusion.denoiser import Denoiser
from unnoise.diffusion.formulations import FORMULATIONS
from unnoise.nn.presets import PRESETS
from unnoise.settings import ImageSettings
from unnoise.text.encoders import TextEmbedding

THREADS = (1, 2)


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def random_network(preset: str) -> torch.nn.Module:
    """The preset's network with every parameter random (zero-initialised branches would hide rounding), in
    the channels-last layout `unnoise.load` gives a network on a CPU (PyTorch's NCHW convolutions do round
    by batch size)."""
    network = PRESETS[preset].build()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return network.eval().to(memory_format=torch.channels_last)


def text_of(batch: int, config, generator: torch.Generator) -> TextEmbedding:
    """Random prompts of different lengths, padded to 32 tokens as the pipeline pads them."""
    tokens = torch.randn(batch, 32, config.text_dim, generator=generator)
    lengths = torch.tensor([3 + 5 * b for b in range(batch)])  # (B,)
    mask = torch.arange(32) < lengths[:, None]  # (B, T)
    pooled = torch.randn(batch, config.text_dim, generator=generator)
    return TextEmbedding(tokens * mask[..., None], mask, pooled)


@pytest.mark.parametrize("preset", ["tiny", "small-p2q", "dit-tiny"])
@pytest.mark.parametrize("n_threads", THREADS)
def test_each_image_of_a_batch_is_denoised_as_it_is_alone(preset, n_threads):
    denoiser = Denoiser(random_network(preset), FORMULATIONS["edm"])
    config = denoiser.network.config
    generator = torch.Generator().manual_seed(1)
    r = config.resolution
    x = torch.randn(7, config.in_channels, r, r, generator=generator)  # (B, C, H, W)
    sigma = torch.rand(7, generator=generator) * 10  # (B,)
    text = text_of(7, config, generator)
    with threads(n_threads), torch.no_grad():
        alone = [denoiser(x[i : i + 1], sigma[i : i + 1], text[i]) for i in range(7)]
        for batch in (2, 3, 4, 5, 7):
            together = denoiser(x[:batch], sigma[:batch], text[:batch])
            for i in range(batch):
                assert torch.equal(together[i : i + 1], alone[i]), f"image {i} of a batch of {batch}"


@pytest.fixture(scope="module")
def shipped():
    return unnoise.load("shapes-32", device="cpu")


@pytest.mark.parametrize("n_threads", THREADS)
@pytest.mark.parametrize("guidance", [1.0, 1.5])
def test_a_seed_draws_the_same_image_alone_and_in_batches_of_every_size(shipped, n_threads, guidance):
    prompt = "a red circle to the left of a blue square"
    args = {"steps": 4, "guidance": guidance, "sampler": "euler_ancestral"}
    with threads(n_threads):
        alone = [np.asarray(shipped.generate(prompt, seed=20 + i, **args)[0]) for i in range(3)]
        for n in (2, 3):
            batch = shipped.generate(prompt, seed=20, num_images=n, **args)
            for i in range(n):
                assert np.array_equal(np.asarray(batch[i]), alone[i]), f"image {i} of {n}"


@pytest.mark.parametrize("n_threads", THREADS)
def test_an_interpolation_frame_is_the_image_its_settings_draw_alone(shipped, n_threads):
    """Frames differ in prompt (each encoded alone, padded to one length) and in noise."""
    with threads(n_threads):
        frames = shipped.interpolate(
            "a red circle", to_prompt="three small green triangles", seed=1, to_seed=2, frames=3, steps=3
        )
        middle = shipped.render(ImageSettings.from_parameters(frames[1].info["parameters"]))[0]
    assert np.array_equal(np.asarray(middle), np.asarray(frames[1]))
