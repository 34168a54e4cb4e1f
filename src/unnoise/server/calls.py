"""The Pipeline calls a request becomes: generate, edit or inpaint, with its checked settings and inputs.

An interrupted call (AUTOMATIC1111's interrupt) is finished by the Pipeline itself, as a complete one is:
the worker's callback raises `StopSamplingError` with the step's x0 estimates.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

from ..diffusion.samplers import Step
from ..pipeline import Pipeline
from ..settings import ImageSettings

Callback = Callable[[Step], None]


@dataclass(frozen=True)
class Generation:
    """txt2img: `count` images; `settings` are the first image's, at the size it makes."""

    settings: ImageSettings
    count: int

    def run(self, pipe: Pipeline, callback: Callback) -> list[Image.Image]:
        s = self.settings
        return pipe.generate(
            s.prompt, negative_prompt=s.negative_prompt, sampler=s.sampler, sampler_options=s.sampler_options,
            steps=s.steps, guidance=s.guidance, seed=s.seed, num_images=self.count, width=s.width,
            height=s.height, variation_seed=s.variation_seed, variation_strength=s.variation_strength,
            bind_attributes=s.bind_attributes, callback=callback,
        )  # fmt: skip


@dataclass(frozen=True)
class Edit:
    """img2img: `image` (RGB, at the size of the answer) redrawn by `settings.denoising_strength`."""

    settings: ImageSettings
    count: int
    image: Image.Image

    def run(self, pipe: Pipeline, callback: Callback) -> list[Image.Image]:
        s = self.settings
        return pipe.edit(
            self.image, s.prompt, strength=s.denoising_strength, negative_prompt=s.negative_prompt,
            sampler=s.sampler, sampler_options=s.sampler_options, steps=s.steps, guidance=s.guidance,
            seed=s.seed, num_images=self.count, bind_attributes=s.bind_attributes, callback=callback,
        )  # fmt: skip


@dataclass(frozen=True)
class Inpainting:
    """Inpainting: the white part of `mask` (L, the size of `image`) regenerated, the rest kept."""

    settings: ImageSettings  # with mask_blur, inpaint_area, masked_padding, masked_content, RePaint's
    count: int
    image: Image.Image
    mask: Image.Image

    def run(self, pipe: Pipeline, callback: Callback) -> list[Image.Image]:
        s = self.settings
        return pipe.inpaint(
            self.image, self.mask, s.prompt, strength=s.denoising_strength, feather=s.mask_blur,
            area=s.inpaint_area or "whole", padding=s.masked_padding or 0, jump=s.repaint_jump,
            resample=s.repaint_resample, masked_content=s.masked_content or "original",
            negative_prompt=s.negative_prompt, sampler=s.sampler, sampler_options=s.sampler_options,
            steps=s.steps, guidance=s.guidance, seed=s.seed, num_images=self.count,
            bind_attributes=s.bind_attributes, callback=callback,
        )  # fmt: skip


Call = Generation | Edit | Inpainting
