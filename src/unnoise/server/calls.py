"""The Pipeline calls a request becomes: generate, edit or inpaint, with its checked settings and inputs.

Each call can also finish an interrupted run (AUTOMATIC1111's interrupt: the images as they are) the way
the complete call finishes: from the x0 estimates at the model's size to images of the answer's size
(resized back for an edit, composited into the input for an inpainting), each with its `parameters` text
and a note of the step it stopped at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image, ImageFilter

from ..diffusion.samplers import Step
from ..images import fit, masked_area, to_pil
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
            callback=callback,
        )  # fmt: skip

    def finish(self, pipe: Pipeline, x0: torch.Tensor, stopped: str) -> list[Image.Image]:
        """x0 (N, 3, H, W): the estimates of an interrupted run."""
        return labelled(to_pil(x0), self.settings, pipe, stopped)


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
            seed=s.seed, num_images=self.count, callback=callback,
        )  # fmt: skip

    def finish(self, pipe: Pipeline, x0: torch.Tensor, stopped: str) -> list[Image.Image]:
        """As `Pipeline.edit` finishes: the model-size images resized back to the input's size."""
        return [fit(image, self.image.size) for image in labelled(to_pil(x0), self.settings, pipe, stopped)]


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
            steps=s.steps, guidance=s.guidance, seed=s.seed, num_images=self.count, callback=callback,
        )  # fmt: skip

    def finish(self, pipe: Pipeline, x0: torch.Tensor, stopped: str) -> list[Image.Image]:
        """As `Pipeline.inpaint` finishes: each image resized to the area the model saw and composited
        into the input through the (feathered) mask, so every kept pixel is the input's."""
        s = self.settings
        whole = (0, 0, *self.image.size)
        box = (masked_area(self.mask, s.masked_padding or 0) if s.inpaint_area == "masked" else None) or whole
        crop, weight = self.image.crop(box), self.mask.crop(box)
        if s.mask_blur:
            weight = weight.filter(ImageFilter.GaussianBlur(s.mask_blur))
        results = []
        for drawn in labelled(to_pil(x0), s, pipe, stopped):
            result = self.image.copy()
            result.paste(Image.composite(fit(drawn, crop.size), crop, weight), box[:2])
            result.info.update(drawn.info)
            results.append(result)
        return results


Call = Generation | Edit | Inpainting


def labelled(
    images: list[Image.Image], first: ImageSettings, pipe: Pipeline, stopped: str
) -> list[Image.Image]:
    """The images of an interrupted run with the `parameters` text the complete run writes (image i has
    seed + i; an edit's size is the model's, as `Pipeline` writes it), and where it stopped."""
    first = first.replace(
        model=pipe.name,
        model_hash=pipe.model_hash,
        width=first.width or pipe.resolution,
        height=first.height or pipe.resolution,
    )
    for i, image in enumerate(images):
        image.info["parameters"] = (
            f"{first.replace(seed=first.seed + i).parameters()}, Interrupted: {stopped}"
        )
    return images
