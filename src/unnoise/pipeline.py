"""A released model ready to generate and edit images from text: the one library call every edge adapts.

    pipe = unnoise.load("path/to/model")        # a release folder: model.safetensors + config.json
    images = pipe.generate("a red circle", seed=1, num_images=4)

Every method builds the `ImageSettings` of its first image, checked, and hands them to `render`, the one
path: image i uses seed + i with its own generator (for its starting noise and any fresh noise the sampler
draws), so a seed gives the same image whatever the number of images asked for, bit for bit on a CPU at a
given thread count: each prompt is encoded alone and padded to the encoder's full length, and the network
computes its per-image vectors row by row (`PerImageLinear`), where kernels would round by batch size
(benchmarks/batch_invariance.py measures the cost). Each image carries its settings in a PNG `parameters`
text chunk, in AUTOMATIC1111's format.
"""

from __future__ import annotations

import contextlib
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFilter

from .codec import Codec, IdentityCodec, latent_size_mask, load_codec
from .diffusion.conventions import SCHEDULE_LABELS, Convention, Plan
from .diffusion.denoiser import Denoiser
from .diffusion.editing import img2img, inpaint, masked_start, variation_noise
from .diffusion.formulations import FORMULATIONS
from .diffusion.guidance import cfg
from .diffusion.samplers import Step, sample
from .diffusion.schedules import default_sigmas
from .errors import UnnoiseError
from .images import fit, from_pil, masked_area, open_image, open_mask, to_pil, with_info
from .nn.layers import TransformerBlock
from .release import (
    CODEC_FOLDER,
    cached_sha256,
    load_network,
    model_hash,
    model_name,
    release_bind_attributes,
    release_guidance,
    resolve_model,
)
from .settings import (
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    MAX_IMAGES,
    REPAINT_JUMP,
    REPAINT_RESAMPLE,
    ImageSettings,
    InpaintArea,
    MaskedContent,
    sampler_name,
)
from .single_file import is_single_file, load_single_file
from .stable_diffusion import hub_folder, is_diffusers_folder, load_stable_diffusion, looks_like_hub_id
from .text.encoders import CachedTextEncoder, TextEmbedding, load_text_encoder
from .text.phrases import attribute_phrases

Callback = Callable[[Step], None] | None
PROMPT_CACHE = 1024  # prompts whose encodings a loaded model keeps (about 60 KB each)
MAX_SIZE_FACTOR = 4  # a request may ask for up to this many times the model's own pixels


class StopSamplingError(Exception):
    """Raised by a `callback` to end sampling at that step (AUTOMATIC1111's interrupt): the images are made
    from the step's x0 estimates and finished as complete ones are (resized back, composited into the
    input), their parameters text ending with `Interrupted: <note>`."""

    def __init__(self, denoised: torch.Tensor, note: str):
        super().__init__(note)
        self.denoised = denoised  # (N, 3, H, W): the denoiser's current estimate of every image
        self.note = note  # e.g. "step 3 of 20"


@dataclass(frozen=True)
class Inpainting:
    """What inpainting adds to img2img: the region to regenerate at the model's size (1, 1, R, R), True =
    regenerate, and RePaint's block length and repeats."""

    mask: torch.Tensor  # (1, 1, R, R) in pixels; render brings it to the codec's size
    jump: int
    resample: int


class Pipeline:
    """A released model ready to generate and edit: its denoiser, its text encoder, its image codec and its
    name. `resolution` and `stride` are in pixels; the denoiser works at 1/codec.factor of them."""

    def __init__(
        self,
        denoiser: Denoiser,
        text: CachedTextEncoder,
        resolution: int,
        name: str,
        model_hash: str = "",
        stride: int = 1,
        default_guidance: float = DEFAULT_GUIDANCE,
        default_bind_attributes: bool = False,
        codec: Codec | None = None,
        convention: Convention | None = None,
    ):
        self.denoiser, self.text, self.resolution, self.name = denoiser, text, resolution, name
        # how a discrete-time model (Stable Diffusion) turns steps into a schedule, as a tool does it
        # (diffusion/conventions.py); None: Karras' schedule over the formulation's range (unnoise's models)
        self.convention = convention
        self.lora_hooks: list = []  # forward hooks of the LoRAs applied (lora.py)
        self.loras: list[tuple[str, float]] = []  # (file name, scale), in the order applied
        self.lora_folder: Path | None = None  # where a prompt's <lora:NAME:WEIGHT> finds NAME.safetensors
        self.codec = codec or IdentityCodec()  # pixels <-> what the denoiser works on
        self.model_hash = model_hash  # first 10 hex digits of the weights' SHA-256 (A1111's "Model hash")
        self.stride = stride  # image sides are multiples of this (the network's downsampling or patch)
        self.default_guidance = default_guidance  # what `guidance=None` means: the release's recommendation
        self.default_bind_attributes = default_bind_attributes  # what `bind_attributes=None` means

    def size_note(self) -> str:
        """The rule of `size_for`, in words, for the CLI's and the server's notes."""
        r = self.resolution
        return f"{MAX_SIZE_FACTOR}x the pixels of this model's {r}x{r}, sides in multiples of {self.stride}"

    def size_for(self, width: int | None, height: int | None) -> tuple[int, int]:
        """The (width, height) this model makes for a request: the model's size for None; otherwise the
        requested aspect within MAX_SIZE_FACTOR times the model's pixels, sides rounded down to the stride.

        A model trained at one size draws worse at others (objects keep their trained size in pixels), so
        the budget is small; a client's 512x512 becomes 64x64 for a 32x32 model, and says so."""
        r, s = self.resolution, self.stride
        width, height = r if width is None else width, r if height is None else height
        if width < 1 or height < 1:
            raise UnnoiseError(f"width and height must be positive, got {width}x{height}")
        shrink = min(1.0, (MAX_SIZE_FACTOR * r * r / (width * height)) ** 0.5)
        return max(s, int(width * shrink) // s * s), max(s, int(height * shrink) // s * s)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        sampler: str = DEFAULT_SAMPLER,
        sampler_options: Mapping[str, float] | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        width: int | None = None,
        height: int | None = None,
        variation_seed: int | None = None,
        variation_strength: float = 0.0,
        mix_prompt: str = "",
        prompt_mix: float = 0.0,
        bind_attributes: bool | None = None,
        schedule: str = "Automatic",
        latents: torch.Tensor | None = None,
        output_type: Literal["pil", "latent"] = "pil",
        callback: Callback = None,
    ) -> list[Image.Image] | torch.Tensor:
        """num_images images for the prompt. A variation seed moves each image's starting noise
        `variation_strength` of the way (on the sphere) to that seed's noise; `prompt_mix` moves the text
        condition that far towards `mix_prompt`'s. sampler_options: e.g. {"eta": 0.5} for ddim. width and
        height: see `size_for` (the images' size is what it gives, written in their PNG text).
        bind_attributes: each noun's cross-attention follows its attributes' (ImageSettings; None: the
        model's default, `default_bind_attributes`). schedule: A1111's schedule type (Automatic: the model's
        choice for the sampler). latents (num_images, c, h, w): the unit starting noise to use instead of the
        seeds' (as diffusers' `latents=`; the seed still drives the noise a stochastic sampler draws).
        output_type "latent" returns the final latents (num_images, c, h, w) undecoded."""
        width, height = self.size_for(width, height)
        settings = self.settings(prompt, negative_prompt, sampler, sampler_options, steps, guidance, seed)
        settings = settings.replace(
            width=width, height=height, variation_seed=variation_seed, variation_strength=variation_strength,
            mix_prompt=mix_prompt, prompt_mix=prompt_mix,
            bind_attributes=self.binds(bind_attributes, mixing=bool(prompt_mix)), schedule=schedule,
        ).check()  # fmt: skip
        return self.render(settings, num_images, callback=callback, latents=latents, output_type=output_type)

    def edit(
        self,
        image: Image.Image | str | Path,
        prompt: str,
        *,
        strength: float = 0.6,
        resize_back: bool = True,
        negative_prompt: str = "",
        sampler: str = DEFAULT_SAMPLER,
        sampler_options: Mapping[str, float] | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        bind_attributes: bool | None = None,
        callback: Callback = None,
    ) -> list[Image.Image]:
        """img2img (SDEdit): the image, resized to the model's size, noised by `strength` and denoised
        towards the prompt. strength 0 returns the (resized) input; 1 ignores it."""
        settings = self.settings(prompt, negative_prompt, sampler, sampler_options, steps, guidance, seed)
        settings = settings.replace(
            denoising_strength=strength, bind_attributes=self.binds(bind_attributes)
        ).check()
        source = open_image(image)
        init = from_pil([fit(source, self.resolution)]).to(self.device)  # (1, 3, R, R)
        images = self.render(settings, num_images, init=init, callback=callback)
        if not resize_back:
            return images
        if strength == 0:  # no step ran: the input itself, not a copy resized there and back
            return [with_info(source.copy(), im.info) for im in images]
        return [fit(im, source.size) for im in images]

    def inpaint(
        self,
        image: Image.Image | str | Path,
        mask: Image.Image | str | Path,
        prompt: str,
        *,
        strength: float = 1.0,
        feather: int = 0,
        area: InpaintArea = "whole",
        padding: int = 4,
        jump: int = REPAINT_JUMP,
        resample: int = REPAINT_RESAMPLE,
        masked_content: MaskedContent = "original",
        negative_prompt: str = "",
        sampler: str = DEFAULT_SAMPLER,
        sampler_options: Mapping[str, float] | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        seed: int | None = None,
        num_images: int = 1,
        bind_attributes: bool | None = None,
        callback: Callback = None,
    ) -> list[Image.Image]:
        """Regenerate the white part of `mask` (same size as the image) to fit the prompt; every pixel where
        the mask is black stays exactly as in the input, which keeps its size. `feather` blurs the mask's
        edge by that many input pixels. RePaint resampling runs each block of `jump` steps `resample` times
        (on by default, see REPAINT_JUMP; resample=1 turns it off). Below strength 1 the white part starts
        from `masked_content` (settings.MaskedContent) noised to the strength.

        area="whole" shows the model the whole picture; area="masked" (AUTOMATIC1111's "only masked") only a
        square around the mask with `padding` pixels of context, enlarged to the model's size, so the prompt
        describes what goes in the mask and the model draws it at its full resolution."""
        settings = self.settings(prompt, negative_prompt, sampler, sampler_options, steps, guidance, seed)
        settings = settings.replace(
            denoising_strength=strength, mask_blur=feather, repaint_jump=jump, repaint_resample=resample,
            inpaint_area="masked" if area == "masked" else None,
            masked_padding=padding if area == "masked" else None, masked_content=masked_content,
            bind_attributes=self.binds(bind_attributes),
        ).check()  # fmt: skip
        if area not in ("whole", "masked"):
            raise UnnoiseError(f"area must be 'whole' or 'masked', got {area!r}")
        if padding < 0:
            raise UnnoiseError(f"padding must be 0 or more pixels, got {padding}")
        source, weight = open_image(image), open_mask(mask)
        if weight.size != source.size:
            raise UnnoiseError(
                f"the mask is {weight.width}x{weight.height} but the image is {source.width}x{source.height}"
            )
        box = (masked_area(weight, padding) if area == "masked" else None) or (0, 0, *source.size)
        crop, weight = source.crop(box), weight.crop(box)
        r = self.resolution
        init = from_pil([fit(crop, r)]).to(self.device)  # (1, 3, R, R)
        cover = torch.from_numpy(np.array(weight.resize((r, r), Image.BOX))) > 0  # (R, R): any coverage
        cover = cover[None, None].to(self.device)  # (1, 1, R, R)
        noise = torch.Generator(device=self.device).manual_seed(settings.seed)  # for masked_content "noise"
        init = masked_start(init, cover, masked_content, noise)
        inpainting = Inpainting(cover, jump, resample)
        images = self.render(settings, num_images, init=init, inpainting=inpainting, callback=callback)
        if feather:
            weight = weight.filter(ImageFilter.GaussianBlur(feather))
        results = []
        for image_ in images:
            result = source.copy()  # the crop pasted back is the input wherever the weight is 0
            result.paste(Image.composite(fit(image_, crop.size), crop, weight), box[:2])
            result.info.update(image_.info)
            results.append(result)
        return results

    def interpolate(
        self,
        prompt: str,
        *,
        to_prompt: str | None = None,
        seed: int | None = None,
        to_seed: int | None = None,
        frames: int = 8,
        negative_prompt: str = "",
        sampler: str = DEFAULT_SAMPLER,
        sampler_options: Mapping[str, float] | None = None,
        steps: int = DEFAULT_STEPS,
        guidance: float | None = None,
        callback: Callback = None,
    ) -> list[Image.Image]:
        """A strip of `frames` images from (prompt, seed) to (to_prompt, to_seed): the noise is slerped and
        the text condition lerped. Frame k is `generate` with variation strength / prompt mix k/(frames-1)."""
        if not 2 <= frames <= MAX_IMAGES:
            raise UnnoiseError(f"frames must be in 2..{MAX_IMAGES}, got {frames}")
        if to_prompt is None and to_seed is None:
            raise UnnoiseError("interpolate needs to_prompt, to_seed or both")
        first = self.settings(prompt, negative_prompt, sampler, sampler_options, steps, guidance, seed)
        first = first.replace(variation_seed=to_seed, mix_prompt=to_prompt or "").check()
        mixes = [k / (frames - 1) for k in range(frames)]
        strip = [
            first.replace(
                variation_strength=t if to_seed is not None else 0.0,
                prompt_mix=t if to_prompt is not None else 0.0,
            )
            for t in mixes
        ]
        return self.render_each(strip, callback=callback)

    # --- the one path every method takes ------------------------------------------------------------

    def settings(
        self,
        prompt: str,
        negative_prompt: str,
        sampler: str,
        sampler_options: Mapping[str, float] | None,
        steps: int,
        guidance: float | None,
        seed: int | None,
    ) -> ImageSettings:
        """The checked settings every request's first image shares, at this model's size (a random seed for
        None, the model's default guidance for None); the sampler by our name or AUTOMATIC1111's label
        ("Euler a"). Each method adds its own fields with `replace(...).check()`."""
        r = self.resolution
        seed = secrets.randbelow(2**31) if seed is None else seed
        guidance = self.default_guidance if guidance is None else guidance
        return ImageSettings(
            prompt, negative_prompt, sampler_name(sampler), dict(sampler_options or {}), steps, guidance,
            seed, width=r, height=r, model=self.name, model_hash=self.model_hash,
        ).check()  # fmt: skip

    def render(
        self,
        settings: ImageSettings,
        num_images: int = 1,
        *,
        init: torch.Tensor | None = None,
        inpainting: Inpainting | None = None,
        callback: Callback = None,
        latents: torch.Tensor | None = None,
        output_type: Literal["pil", "latent"] = "pil",
    ) -> list[Image.Image] | torch.Tensor:
        """num_images images of `settings`, image i with seed + i. init (1, 3, R, R) is the image to edit;
        with `inpainting` it is the one to inpaint. latents, output_type: see `generate`."""
        if not 1 <= num_images <= MAX_IMAGES:
            raise UnnoiseError(f"num_images must be in 1..{MAX_IMAGES}, got {num_images}")
        settings = self.with_schedule(settings.check())
        each = [settings.replace(seed=settings.seed + i) for i in range(num_images)]
        with self.prompt_loras(settings.prompt):
            return self.render_each(
                each, init=init, inpainting=inpainting, callback=callback, latents=latents,
                output_type=output_type,
            )  # fmt: skip

    def render_each(
        self,
        each: list[ImageSettings],
        *,
        init: torch.Tensor | None = None,
        inpainting: Inpainting | None = None,
        callback: Callback = None,
        latents: torch.Tensor | None = None,
        output_type: Literal["pil", "latent"] = "pil",
    ) -> list[Image.Image] | torch.Tensor:
        """One image per settings; they share sampler, options, steps, guidance and strength."""
        first = each[0]
        generators = [torch.Generator().manual_seed(s.seed) for s in each]
        noise = torch.stack([self.noise(s, g) for s, g in zip(each, generators, strict=True)])
        if latents is not None:
            noise = self.check_latents(latents, noise.shape)
        noise = noise.to(self.device)  # (N, c, R / f, R / f)
        cond = self.condition(each)
        uncond = self.encode([s.negative_prompt for s in each]).to(self.device)
        denoiser = cfg(self.denoiser_for(first), first.guidance, uncond)
        stopped = ""
        with torch.no_grad():
            if init is not None:  # pixels (1, 3, R, R) -> the denoiser's space (1, c, R / f, R / f)
                init = self.codec.encode(init)
            if inpainting is not None:
                inpainting = replace(inpainting, mask=latent_size_mask(inpainting.mask, self.codec.factor))
            try:
                x = self.draw(denoiser, noise, first, cond, generators, init, inpainting, callback)
            except StopSamplingError as stop:
                x, stopped = stop.denoised, f", Interrupted: {stop.note}"
            if output_type == "latent":
                return x
            x = self.codec.decode(x)  # (N, 3, R, R)
        images = to_pil(x)
        for image, settings in zip(images, each, strict=True):
            image.info["parameters"] = settings.parameters() + stopped
        return images

    def draw(
        self,
        denoiser: Denoiser,
        noise: torch.Tensor,
        first: ImageSettings,
        cond: TextEmbedding,
        generators: list[torch.Generator],
        init: torch.Tensor | None,
        inpainting: Inpainting | None,
        callback: Callback,
    ) -> torch.Tensor:
        """x (N, 3, H, W) in [-1, 1] from unit `noise` (N, 3, H, W): generation, img2img of `init`, or
        inpainting; `first` holds the sampler, its options, the steps and the strength they share."""
        plan = self.plan(first)
        sigmas = self.sigmas(plan, first.steps)
        options = first.sampler_options  # the sampler's own keywords (eta, s_churn, ...), checked by name
        if init is not None and first.denoising_strength == 0:
            return init.expand_as(noise)  # nothing to regenerate: no step runs
        if sigmas[-1] > 0 and init is not None:  # an edit ends at the clean image
            sigmas = torch.cat([sigmas[:-1], sigmas.new_zeros(1)])
        if inpainting is not None:
            return inpaint(
                denoiser, init.expand_as(noise), noise=noise, sigmas=sigmas,
                strength=first.denoising_strength, mask=inpainting.mask, jump=inpainting.jump,
                resample=inpainting.resample, sampler=first.sampler, cond=cond, generator=generators,
                callback=callback, **options,
            )  # fmt: skip
        if init is not None:
            return img2img(
                denoiser, init.expand_as(noise), noise, sigmas, strength=first.denoising_strength,
                sampler=first.sampler, cond=cond, generator=generators, callback=callback, **options,
            )  # fmt: skip
        start = None if plan is None else plan.start_scale(float(sigmas[0]))
        x = sample(
            denoiser, noise, sigmas, sampler=first.sampler, cond=cond, generator=generators,
            callback=callback, start_scale=start, to_zero=sigmas[-1] == 0, **options,
        )  # fmt: skip
        if sigmas[-1] > 0:  # DDIM's final alpha: the result is the VP latent at that level, as diffusers'
            x = x * self.denoiser.formulation.scale(sigmas[-1:]).item()
        return x

    def check_latents(self, latents: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.shape != shape:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise UnnoiseError(f"latents must be a tensor of shape {tuple(shape)} here, got {got}")
        if not torch.isfinite(latents).all():
            raise UnnoiseError("latents contain NaN or inf")
        return latents.float().cpu()

    def plan(self, settings: ImageSettings) -> Plan | None:
        """How this model's convention samples `settings`' sampler and schedule (None: unnoise's own way)."""
        if self.convention is None:
            return None
        return self.convention.plan(settings.sampler, settings.schedule)

    def sigmas(self, plan: Plan | None, steps: int) -> torch.Tensor:
        if plan is None:
            return default_sigmas(self.denoiser.formulation, steps)
        return plan.sigmas(self.denoiser.formulation, steps)

    def with_schedule(self, settings: ImageSettings) -> ImageSettings:
        """`settings` with its schedule type resolved to the one it runs on (A1111's label for its PNG), or
        an UnnoiseError if this model cannot run that one."""
        if self.convention is None:
            if settings.schedule.lower() not in ("automatic", "karras"):
                raise UnnoiseError(f"{self.name} samples on Karras' schedule only, not {settings.schedule!r}")
            return settings.replace(schedule="Karras")
        return settings.replace(schedule=SCHEDULE_LABELS[self.plan(settings).spacing])

    def add_lora(self, path: str | Path, scale: float = 1.0, *, merge: bool = False) -> None:
        """Apply a LoRA file (kohya-ss or diffusers/PEFT layout) at `scale` to the network (and a Stable
        Diffusion model's text encoder): as hooks (`remove_loras` takes them off; scale 0 is the base model
        bit for bit) or merged into the weights (permanent). unnoise's own models take the LoRAs that
        `train --init-from MODEL --lora-rank R` writes."""
        from .lora import attach, read_lora

        network = getattr(self.denoiser.network, "unet", self.denoiser.network)  # SD's UNet, or ours
        text_model = getattr(getattr(self.text, "encoder", None), "model", None)
        if not math.isfinite(scale):
            raise UnnoiseError(f"a LoRA's scale must be a finite number, got {scale}")
        layers = read_lora(path)
        parts: dict[str, torch.nn.Module] = {"unet": network}
        if isinstance(text_model, torch.nn.Module) and hasattr(text_model, "config"):  # SD's CLIP
            parts["text"] = text_model
        self.lora_hooks += attach(parts, layers, scale, source=str(path), merge=merge)
        self.text.entries.clear()  # cached prompts were encoded without it
        self.loras.append((Path(path).stem, scale))

    @contextlib.contextmanager
    def prompt_loras(self, prompt: str):
        """The prompt's <lora:NAME:WEIGHT> files (from `lora_folder`) applied while inside, then taken off."""
        from .lora import lora_in_folder, prompt_loras

        tags = prompt_loras(prompt)
        if not tags:
            yield
            return
        paths = [(lora_in_folder(self.lora_folder, name), weight) for name, weight in tags]
        applied, named = len(self.lora_hooks), len(self.loras)
        try:
            for path, weight in paths:
                self.add_lora(path, weight)
            yield
        finally:
            for hook in self.lora_hooks[applied:]:
                hook.remove()
            del self.lora_hooks[applied:], self.loras[named:]
            self.text.entries.clear()

    def remove_loras(self) -> None:
        """Take off the hooked LoRAs (merged ones stay)."""
        for hook in self.lora_hooks:
            hook.remove()
        self.lora_hooks, self.loras = [], []
        self.text.entries.clear()

    def schedule_types(self) -> list[str]:
        """The schedule types (A1111's labels) this model runs, besides Automatic."""
        if self.convention is None or self.convention.name == "diffusers":
            return ["Karras"]
        return ["Karras", "Exponential", "Uniform"]

    def denoiser_for(self, settings: ImageSettings) -> Denoiser:
        """The denoiser, its formulation fed timesteps as the convention's plan says."""
        plan = self.plan(settings)
        if plan is None:
            return self.denoiser
        return Denoiser(self.denoiser.network, plan.formulation(self.denoiser.formulation))

    def preview(self, denoised: torch.Tensor) -> Image.Image:
        """A sampler step's x0 estimate (N, c, h, w) of the first image, as a picture (the codec's cheap
        decoder)."""
        with torch.no_grad():
            return to_pil(self.codec.preview(denoised[:1]))[0]

    def noise(self, settings: ImageSettings, generator: torch.Generator) -> torch.Tensor:
        """The image's unit starting noise (c, H / f, W / f), drawn first from its own generator."""
        f = self.codec.factor
        height, width = settings.height or self.resolution, settings.width or self.resolution
        shape = (self.codec.channels, height // f, width // f)
        noise = torch.randn(shape, generator=generator)
        if settings.variation_seed is None or not settings.variation_strength:
            return noise
        other = torch.randn(shape, generator=torch.Generator().manual_seed(settings.variation_seed))
        return variation_noise(noise[None], other[None], settings.variation_strength)[0]

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """The prompts' embedding (B, T, D) at the encoder's full length T, whatever the prompts: an image's
        text then has the same shape in every batch, so no kernel sees a batch-dependent length."""
        from .lora import without_lora_tags

        return self.text.encode([without_lora_tags(p) for p in prompts]).padded_to(self.text.max_tokens)

    def condition(self, each: list[ImageSettings]) -> TextEmbedding:
        """The prompts' text condition, each moved prompt_mix of the way to its mix prompt's, with their
        attribute phrases where binding is asked for."""
        cond = self.encode([s.prompt for s in each])
        if any(s.prompt_mix for s in each):
            other = self.encode([s.mix_prompt if s.prompt_mix else s.prompt for s in each])
            cond = cond.mix(other, torch.tensor([s.prompt_mix for s in each], device=cond.device))
        if any(s.bind_attributes for s in each):
            self.check_binds_attributes()
            codes = [
                attribute_phrases(self.text.token_strings(s.prompt)) if s.bind_attributes else []
                for s in each
            ]
            if any(
                max(row, default=0) >= 2 for row in codes
            ):  # else nothing to bind: SDPA's faster path stays
                cond = cond.with_phrases(codes)
        return cond.to(self.device)

    def binds(self, bind_attributes: bool | None, *, mixing: bool = False) -> bool:
        """Whether to bind attributes: as asked, else as the model does by default (not while mixing two
        prompts, which have no one set of phrases; asking for both is an error in ImageSettings.check)."""
        if bind_attributes is None:
            return self.default_bind_attributes and not mixing
        return bind_attributes

    def check_binds_attributes(self) -> None:
        """An UnnoiseError unless this model can bind attributes: a network with cross-attention to the text
        tokens, and a text encoder that says what its tokens are."""
        if not any(isinstance(m, TransformerBlock) for m in self.denoiser.network.modules()):
            raise UnnoiseError(
                f"{self.name} has no cross-attention to the text (its text is part of its sequence), so"
                " attribute binding cannot be used with it"
            )
        if not hasattr(getattr(self.text, "encoder", None), "token_strings"):
            raise UnnoiseError(f"{self.name}'s text encoder does not name its tokens: no attribute binding")


def resolve_device(name: str | torch.device) -> torch.device:
    """The device named, or for "auto": CUDA if there is a GPU, else Apple's MPS if there is one, else CPU."""
    if str(name) != "auto":
        try:
            device = torch.device(name)
        except RuntimeError as error:
            raise UnnoiseError(f"unknown device {name!r} ({error}); try auto, cpu, cuda or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UnnoiseError(f"device {name!r}: this PyTorch sees no CUDA GPU; use --device cpu or auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "auto",
    convention: str = "a1111",
    clip_skip: int = 1,
    precision: str = "float32",
    prediction_type: str | None = None,
    config_from: str | Path | None = None,
) -> Pipeline:
    """Load a released model (safetensors + config.json) with its text encoder; nothing is unpickled.

    A Stable Diffusion model (a diffusers folder) samples as the tool `convention` names does (a1111,
    comfyui or diffusers: diffusion/conventions.py), its text read `clip_skip` layers from the end, its UNet
    and text encoder in `precision` (float32, bfloat16 or float16; the VAE stays in float32). A single-file
    checkpoint (`.safetensors`) takes its config from `config_from` (a diffusers folder) or unnoise's own for
    its family; `prediction_type` (epsilon or v) says what an SD 2.x file predicts."""
    device = resolve_device(device)
    try:
        folder = resolve_model(name_or_path)
    except UnnoiseError:
        if not looks_like_hub_id(str(name_or_path)):
            raise
        folder = hub_folder(str(name_or_path))  # "owner/name": diffusers downloads it (online only)
    sd_options = {"clip_skip": clip_skip, "convention": convention, "precision": precision}
    if not is_single_file(folder) and (prediction_type is not None or config_from is not None):
        raise UnnoiseError(f"{folder}: prediction_type and config_from apply to single-file checkpoints only")
    if is_single_file(folder):
        sd = load_single_file(
            folder, device, prediction_type=prediction_type, config_from=config_from, **sd_options
        )
    elif is_diffusers_folder(folder):
        sd = load_stable_diffusion(folder, device, **sd_options)
    else:
        sd = None
    if sd is not None:
        return Pipeline(
            sd.denoiser, CachedTextEncoder(sd.text, max_entries=PROMPT_CACHE), sd.resolution, sd.name,
            cached_sha256(sd.weights)[:10], stride=sd.stride, default_guidance=sd.default_guidance,
            codec=sd.codec, convention=sd.convention,
        )  # fmt: skip
    if convention != "a1111" or clip_skip != 1 or precision != "float32":
        raise UnnoiseError(
            f"{folder}: a convention, clip skip and precision apply to Stable Diffusion models only"
        )
    network, config = load_network(folder)
    if device.type == "cpu":  # the layout PyTorch's CPU convolutions are fastest in
        network = network.to(memory_format=torch.channels_last)
    formulation = FORMULATIONS[config["formulation"]]
    denoiser = Denoiser(network.eval().requires_grad_(False), formulation).to(device)
    codec = release_codec(folder, config)
    if codec is not None:
        codec.to(device)
    encoder = config["text_encoder"]
    text = CachedTextEncoder(
        load_text_encoder(
            encoder["name"],
            device=device,
            max_tokens=encoder["max_tokens"],
            token_layers=encoder.get("token_layers", "last"),  # releases before issue 11 read the last
        ),
        max_entries=PROMPT_CACHE,
    )
    factor = codec.factor if codec is not None else 1
    return Pipeline(
        denoiser,
        text,
        network.config.resolution * factor,
        model_name(folder),
        model_hash(config),
        stride=network.config.stride * factor,
        default_guidance=release_guidance(config),
        default_bind_attributes=release_bind_attributes(config),
        codec=codec,
    )


def release_codec(folder: Path, config: dict) -> Codec | None:
    """The image codec a release names (None: pixels), checked against the network's input channels."""
    named = config.get("codec")
    if named is None:
        return None
    if (
        not isinstance(named, dict)
        or named.get("kind") != "autoencoder"
        or named.get("folder") != CODEC_FOLDER
    ):
        raise UnnoiseError(
            f'{folder}: config.json: codec must be {{"kind": "autoencoder", "folder": "{CODEC_FOLDER}"}},'
            f" got {named!r}"
        )
    where = Path(folder) / CODEC_FOLDER
    if not (where / "config.json").is_file():
        raise UnnoiseError(
            f"{folder} is a latent model but its autoencoder is missing ({where} has no config.json): copy"
            " the whole release folder, autoencoder/ included"
        )
    codec = load_codec(where)
    channels = (config.get("network") or {}).get("in_channels", 3)
    if codec.channels != channels:
        raise UnnoiseError(
            f"{folder}: the network sees {channels} channels but its autoencoder makes {codec.channels}"
        )
    return codec
