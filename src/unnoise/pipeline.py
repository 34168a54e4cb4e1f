"""Load a released model and generate images from text: the one library call every edge adapts.

    pipe = unnoise.load("path/to/model")        # a release folder: model.safetensors + config.json
    images = pipe.generate("a red circle", seed=1, num_images=4)

Image i of a request uses seed + i with its own generator (for its starting noise and any fresh noise the
sampler draws), so a seed gives the same image whatever the number of images asked for. Each image
carries its parameters in a PNG `parameters` text chunk, in AUTOMATIC1111's format.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFilter

from .diffusion.denoiser import Denoiser
from .diffusion.editing import check_strength, img2img, inpaint, variation_noise
from .diffusion.formulations import FORMULATIONS
from .diffusion.guidance import cfg
from .diffusion.samplers import Step, get_sampler, sample
from .diffusion.schedules import default_sigmas
from .errors import UnnoiseError
from .images import from_pil, to_pil
from .nn.unet import UNet, UNetConfig
from .release import load_release
from .text.encoders import CachedTextEncoder, TextEmbedding, load_text_encoder

MODELS_DIR = Path(__file__).resolve().parent / "models"  # models shipped inside the package
# RePaint's default for inpainting: blocks of 2 steps, each run 5 times. On shapes-32 it took InpaintEval
# from 77% to 92% (README, "Edit"); resample=1 turns it off, five times faster.
REPAINT_JUMP, REPAINT_RESAMPLE = 2, 5


@dataclass(frozen=True)
class Request:
    """Everything that determines a generated image; written into and read back from its PNG."""

    prompt: str
    negative_prompt: str = ""
    sampler: str = "dpmpp_2m"
    steps: int = 20
    guidance: float = 3.0
    seed: int = 0
    width: int = 32
    height: int = 32
    model: str = ""
    variation_seed: int | None = None  # the noise is slerped variation_strength of the way to this seed's
    variation_strength: float = 0.0
    mix_prompt: str = ""  # the condition is lerped prompt_mix of the way to this prompt's
    prompt_mix: float = 0.0
    denoising_strength: float | None = None  # img2img and inpainting only
    mask_blur: int | None = None  # inpainting only: the feathering radius in input pixels
    inpaint_area: str | None = None  # inpainting only: "masked" when the model saw only the mask's area
    masked_padding: int | None = None  # ... with this many pixels of context around it

    def parameters(self) -> str:
        """AUTOMATIC1111's `parameters` text: prompt, negative prompt line, then key: value pairs."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        if self.prompt_mix:
            lines.append(f"Mix prompt: {self.mix_prompt}")
        pairs = [
            f"Steps: {self.steps}",
            f"Sampler: {self.sampler}",
            f"CFG scale: {self.guidance:g}",
            f"Seed: {self.seed}",
            f"Size: {self.width}x{self.height}",
            f"Model: {self.model}",
        ]
        if self.variation_seed is not None and self.variation_strength:
            pairs += [
                f"Variation seed: {self.variation_seed}",
                f"Variation seed strength: {_number(self.variation_strength)}",
            ]
        if self.prompt_mix:
            pairs.append(f"Prompt mix: {_number(self.prompt_mix)}")
        if self.denoising_strength is not None:
            pairs.append(f"Denoising strength: {_number(self.denoising_strength)}")
        if self.mask_blur is not None:
            pairs.append(f"Mask blur: {self.mask_blur}")
        if self.inpaint_area == "masked":
            pairs += ["Inpaint area: Only masked", f"Masked area padding: {self.masked_padding}"]
        lines.append(", ".join(pairs))
        return "\n".join(lines)

    @classmethod
    def from_parameters(cls, text: str) -> Request:
        """Parse the `parameters` text written by `parameters()` (or by AUTOMATIC1111, for these keys)."""
        lines = text.strip().splitlines()
        if not lines or not lines[-1].startswith("Steps:"):
            raise UnnoiseError("the PNG's parameters do not end with a 'Steps: ...' line")
        values = dict(re.findall(r"\s*([\w ]+):\s*([^,]*)", lines[-1]))
        labelled = {"Negative prompt:": "", "Mix prompt:": ""}
        prompt_lines = []
        for line in lines[:-1]:
            label = next((name for name in labelled if line.startswith(name)), None)
            if label is None:
                prompt_lines.append(line)
            else:
                labelled[label] = line.removeprefix(label).strip()
        width, height = (int(v) for v in values.get("Size", "32x32").split("x"))

        def optional(key: str, kind):
            return kind(values[key]) if key in values else None

        try:
            return cls(
                prompt="\n".join(prompt_lines),
                negative_prompt=labelled["Negative prompt:"],
                sampler=values.get("Sampler", "dpmpp_2m").strip(),
                steps=int(values["Steps"]),
                guidance=float(values.get("CFG scale", 3.0)),
                seed=int(values["Seed"]),
                width=width,
                height=height,
                model=values.get("Model", "").strip(),
                variation_seed=optional("Variation seed", int),
                variation_strength=float(values.get("Variation seed strength", 0.0)),
                mix_prompt=labelled["Mix prompt:"],
                prompt_mix=float(values.get("Prompt mix", 0.0)),
                denoising_strength=optional("Denoising strength", float),
                mask_blur=optional("Mask blur", int),
                inpaint_area="masked" if values.get("Inpaint area", "").strip() == "Only masked" else None,
                masked_padding=optional("Masked area padding", int),
            )
        except (KeyError, ValueError) as error:
            raise UnnoiseError(f"the PNG's parameters are incomplete or malformed ({error})") from None


def _number(value: float) -> str:
    """Shortest text that reads back as the same float (0.5, not 0.5000; 1/3 in full)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def _png_text(image: Image.Image):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if "parameters" in image.info:
        info.add_text("parameters", image.info["parameters"])
    return info


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save with the image's `parameters` text chunk, written to a temporary name and renamed."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}")
    image.save(tmp, format="PNG", pnginfo=_png_text(image))
    tmp.replace(path)
    return path


def png_bytes(image: Image.Image) -> bytes:
    """The PNG file of an image, its `parameters` text chunk included."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=_png_text(image))
    return buffer.getvalue()


def read_png_parameters(path: str | Path) -> Request:
    try:
        with Image.open(path) as image:
            text = image.info.get("parameters")
    except (OSError, ValueError) as error:
        raise UnnoiseError(f"cannot read {path}: {error}") from None
    if not text:
        raise UnnoiseError(f"{path} carries no 'parameters' text chunk")
    return Request.from_parameters(text)


class Pipeline:
    """A released model ready to generate and edit: its denoiser, its text encoder and its name.

    Every method makes num_images images; image i uses seed + i with its own generator, for its starting
    noise and any fresh noise its sampler or RePaint draws.
    """

    def __init__(self, denoiser: Denoiser, text: CachedTextEncoder, resolution: int, name: str):
        self.denoiser, self.text, self.resolution, self.name = denoiser, text, resolution, name

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        guidance: float = 3.0,
        seed: int | None = None,
        num_images: int = 1,
        variation_seed: int | None = None,
        variation_strength: float = 0.0,
        mix_prompt: str = "",
        prompt_mix: float = 0.0,
        callback: Callable[[Step], None] | None = None,
        **options,
    ) -> list[Image.Image]:
        """num_images images for the prompt. A variation seed moves each image's starting noise
        `variation_strength` of the way (on the sphere) to that seed's noise; `prompt_mix` moves the text
        condition that far towards `mix_prompt`'s."""
        requests = self.requests(
            prompt,
            negative_prompt=negative_prompt,
            sampler=sampler,
            steps=steps,
            guidance=guidance,
            seed=seed,
            num_images=num_images,
            variation_seed=variation_seed,
            variation_strength=variation_strength,
            mix_prompt=mix_prompt,
            prompt_mix=prompt_mix,
        )
        return self.run(requests, callback=callback, **options)

    def edit(
        self,
        image: Image.Image | str | Path,
        prompt: str,
        *,
        strength: float = 0.6,
        resize_back: bool = True,
        callback: Callable[[Step], None] | None = None,
        **settings,
    ) -> list[Image.Image]:
        """img2img (SDEdit): the image, resized to the model's size, noised by `strength` and denoised
        towards the prompt. strength 0 returns the (resized) input; 1 ignores it. `settings` are
        generate's (negative_prompt, sampler, steps, guidance, seed, num_images, ...)."""
        strength = check_strength(strength)
        source = open_image(image)
        requests = self.requests(prompt, denoising_strength=strength, **settings)
        init = from_pil([fit(source, self.resolution)]).to(self.device)  # (1, 3, R, R)
        images = self.run(requests, callback=callback, init=init)
        if not resize_back:
            return images
        if strength == 0:  # no step ran: the input itself, not a copy resized there and back
            return [_with_info(source.copy(), im.info) for im in images]
        return [fit(im, source.size) for im in images]

    def inpaint(
        self,
        image: Image.Image | str | Path,
        mask: Image.Image | str | Path,
        prompt: str,
        *,
        strength: float = 1.0,
        feather: int = 0,
        area: Literal["whole", "masked"] = "whole",
        padding: int = 4,
        jump: int = REPAINT_JUMP,
        resample: int = REPAINT_RESAMPLE,
        callback: Callable[[Step], None] | None = None,
        **settings,
    ) -> list[Image.Image]:
        """Regenerate the white part of `mask` (same size as the image) to fit the prompt; every pixel where
        the mask is black stays exactly as in the input, which keeps its size. `feather` blurs the mask's
        edge by that many input pixels. RePaint resampling runs each block of `jump` steps `resample` times
        (on by default, see REPAINT_JUMP; resample=1 turns it off).

        area="whole" shows the model the whole picture; area="masked" (AUTOMATIC1111's "only masked") only a
        square around the mask with `padding` pixels of context, enlarged to the model's size, so the prompt
        describes what goes in the mask and the model draws it at its full resolution."""
        strength = check_strength(strength)
        source, weight = open_image(image), open_mask(mask)
        if weight.size != source.size:
            raise UnnoiseError(
                f"the mask is {weight.width}x{weight.height} but the image is {source.width}x{source.height}"
            )
        if feather < 0 or padding < 0:
            raise UnnoiseError(f"feather and padding must be 0 or more pixels, got {feather} and {padding}")
        if area not in ("whole", "masked"):
            raise UnnoiseError(f"area must be 'whole' or 'masked', got {area!r}")
        extra = dict(denoising_strength=strength, mask_blur=feather)
        if area == "masked":
            extra.update(inpaint_area="masked", masked_padding=padding)
        box = (masked_area(weight, padding) if area == "masked" else None) or (0, 0, *source.size)
        crop, weight = source.crop(box), weight.crop(box)
        r = self.resolution
        requests = self.requests(prompt, **extra, **settings)
        init = from_pil([fit(crop, r)]).to(self.device)  # (1, 3, R, R)
        cover = torch.from_numpy(np.array(weight.resize((r, r), Image.BOX))) > 0  # (R, R): any coverage
        inpainting = dict(mask=cover[None, None].to(self.device), jump=jump, resample=resample)
        images = self.run(requests, callback=callback, init=init, inpainting=inpainting)
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
        **settings,
    ) -> list[Image.Image]:
        """A strip of `frames` images from (prompt, seed) to (to_prompt, to_seed): the noise is slerped and
        the text condition lerped. Frame k is `generate` with variation strength / prompt mix k/(frames-1)."""
        if not 2 <= frames <= 64:
            raise UnnoiseError(f"frames must be in 2..64, got {frames}")
        if to_prompt is None and to_seed is None:
            raise UnnoiseError("interpolate needs to_prompt, to_seed or both")
        seed = secrets.randbelow(2**31) if seed is None else int(seed)
        mixes = [k / (frames - 1) for k in range(frames)]
        requests = [
            replace(
                self.requests(prompt, seed=seed, **settings)[0],
                variation_seed=to_seed,
                variation_strength=t if to_seed is not None else 0.0,
                mix_prompt=to_prompt or "",
                prompt_mix=t if to_prompt is not None else 0.0,
            )
            for t in mixes
        ]
        return self.run(requests)

    # --- the one path every method takes ------------------------------------------------------------

    def requests(
        self,
        prompt: str,
        *,
        negative_prompt: str = "",
        sampler: str = "dpmpp_2m",
        steps: int = 20,
        guidance: float = 3.0,
        seed: int | None = None,
        num_images: int = 1,
        **extra,
    ) -> list[Request]:
        """Checked requests for images seed, seed + 1, ..., seed + num_images - 1."""
        get_sampler(sampler)
        if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
            raise UnnoiseError("the prompt and the negative prompt must be strings")
        if not 1 <= steps <= 1000 or not 1 <= num_images <= 64:
            raise UnnoiseError(
                f"steps must be in 1..1000 and num_images in 1..64, got {steps} and {num_images}"
            )
        for name in ("variation_strength", "prompt_mix"):
            check_strength(extra.get(name, 0.0), name=name)
        seed = secrets.randbelow(2**31) if seed is None else int(seed)
        r = self.resolution
        return [
            Request(prompt, negative_prompt, sampler, steps, guidance, seed + i, r, r, self.name, **extra)
            for i in range(num_images)
        ]

    def run(
        self,
        requests: list[Request],
        *,
        init: torch.Tensor | None = None,
        inpainting: dict | None = None,
        callback: Callable[[Step], None] | None = None,
        **options,
    ) -> list[Image.Image]:
        """Sample one image per request (they share sampler, steps and guidance). init (1, 3, R, R) is the
        image to edit; with `inpainting` (mask, jump, resample) it is the one to inpaint."""
        first = requests[0]
        generators = [torch.Generator().manual_seed(q.seed) for q in requests]
        noise = torch.stack([self.noise(q, g) for q, g in zip(requests, generators, strict=True)])
        noise = noise.to(self.device)  # (N, 3, R, R)
        cond = self.condition(requests)
        uncond = self.text.encode([q.negative_prompt for q in requests]).to(self.device)
        denoiser = cfg(self.denoiser, first.guidance, uncond)
        sigmas = default_sigmas(self.denoiser.formulation, first.steps)
        common = dict(sampler=first.sampler, cond=cond, generator=generators, callback=callback, **options)
        with torch.no_grad():
            if inpainting is not None:
                x = inpaint(
                    denoiser,
                    init.expand_as(noise),
                    noise=noise,
                    sigmas=sigmas,
                    strength=first.denoising_strength,
                    **inpainting,
                    **common,
                )
            elif init is not None:
                x = img2img(
                    denoiser,
                    init.expand_as(noise),
                    noise,
                    sigmas,
                    strength=first.denoising_strength,
                    **common,
                )
            else:
                x = sample(denoiser, noise, sigmas, **common)
        images = to_pil(x)
        for image, request in zip(images, requests, strict=True):
            image.info["parameters"] = request.parameters()
        return images

    def noise(self, request: Request, generator: torch.Generator) -> torch.Tensor:
        """The request's unit starting noise (3, R, R), drawn first from its own generator."""
        r = self.resolution
        noise = torch.randn(3, r, r, generator=generator)
        if request.variation_seed is None or not request.variation_strength:
            return noise
        other = torch.randn(3, r, r, generator=torch.Generator().manual_seed(request.variation_seed))
        return variation_noise(noise[None], other[None], request.variation_strength)[0]

    def condition(self, requests: list[Request]) -> TextEmbedding:
        """The prompts' text condition, each moved prompt_mix of the way to its mix prompt's."""
        cond = self.text.encode([q.prompt for q in requests])
        if any(q.prompt_mix for q in requests):
            other = self.text.encode([q.mix_prompt if q.prompt_mix else q.prompt for q in requests])
            cond = mix_embeddings(
                cond, other, torch.tensor([q.prompt_mix for q in requests], device=cond.device)
            )
        return cond.to(self.device)


def mix_embeddings(a: TextEmbedding, b: TextEmbedding, t: torch.Tensor) -> TextEmbedding:
    """(1 - t) a + t b per row t (B,), over the union of their tokens; the pooled vector renormalised.

    Each embedding's padding states are exactly 0, so between the ends a token only one prompt has is
    faded in or out."""
    T = max(a.tokens.shape[1], b.tokens.shape[1])
    a, b = a.padded_to(T), b.padded_to(T)
    w = t.to(a.tokens.dtype)
    tokens = (1 - w)[:, None, None] * a.tokens + w[:, None, None] * b.tokens  # (B, T, D)
    pooled = torch.nn.functional.normalize((1 - w)[:, None] * a.pooled + w[:, None] * b.pooled, dim=-1)
    at_a, at_b = w[:, None] == 0, w[:, None] == 1  # (B, 1) each: a row at an end is exactly that prompt
    pooled = torch.where(at_a, a.pooled, torch.where(at_b, b.pooled, pooled))  # (B, D)
    mask = torch.where(at_a, a.mask, torch.where(at_b, b.mask, a.mask | b.mask))  # (B, T)
    return TextEmbedding(tokens, mask, pooled)


# --- images in and out ------------------------------------------------------------------------------------


def open_image(image: Image.Image | str | Path) -> Image.Image:
    """An RGB image from a Pillow image or a file of any mode (transparency over white)."""
    image = _read(image, "image")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_mask(mask: Image.Image | str | Path) -> Image.Image:
    """A mask as 8-bit grey, any mode in: white (255) = regenerate, black (0) = keep."""
    return _read(mask, "mask").convert("L")


def _read(image: Image.Image | str | Path, what: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    try:
        with Image.open(image) as opened:
            opened.load()
            return opened.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnnoiseError(f"cannot read the {what} {image}: {error}") from None


def fit(image: Image.Image, size: int | tuple[int, int]) -> Image.Image:
    """The image resized (stretched) to size x size or (width, height); itself when it already fits."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if image.size == size:
        return image
    resized = image.resize(size, Image.LANCZOS)
    resized.info.update(image.info)
    return resized


def masked_area(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """A square (left, top, right, bottom) around the mask's white pixels with `padding` pixels beside
    them, moved inside the image (and cut to it when the image is smaller); None for an empty mask."""
    bbox = mask.getbbox()
    if bbox is None:
        return None
    left, top, right, bottom = bbox
    side = max(right - left, bottom - top) + 2 * padding
    box = []
    for low, high, size in ((left, right, mask.width), (top, bottom, mask.height)):
        length = min(side, size)
        start = min(max(0, (low + high - length) // 2), size - length)
        box.append((start, start + length))
    (x0, x1), (y0, y1) = box
    return x0, y0, x1, y1


def _with_info(image: Image.Image, info: dict) -> Image.Image:
    image.info.update(info)
    return image


def resolve_model(name_or_path: str | Path) -> Path:
    """A release folder: a path as given, or the name of a model shipped in the package."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    shipped = MODELS_DIR / str(name_or_path)
    if (shipped / "config.json").is_file():
        return shipped
    available = (
        sorted(p.name for p in MODELS_DIR.iterdir() if (p / "config.json").is_file())
        if (MODELS_DIR.is_dir())
        else []
    )
    raise UnnoiseError(
        f"no model {str(name_or_path)!r}: not a folder with config.json, nor a shipped model"
        f" (shipped: {', '.join(available) or 'none yet'})"
    )


def load(name_or_path: str | Path, *, device: str = "cpu") -> Pipeline:
    """Load a released model (safetensors + config.json) with its text encoder; nothing is unpickled."""
    folder = resolve_model(name_or_path)
    weights, config = load_release(folder)
    unet_config = UNetConfig.from_dict(config["unet"])
    network = UNet(unet_config)
    try:
        network.load_state_dict(weights)
    except RuntimeError as error:
        raise UnnoiseError(
            f"{folder}: the weights do not match config.json ({str(error).splitlines()[0]})"
        ) from None
    if torch.device(device).type == "cpu":  # the layout PyTorch's CPU convolutions are fastest in
        network = network.to(memory_format=torch.channels_last)
    formulation = FORMULATIONS[config["formulation"]]
    denoiser = Denoiser(network.eval().requires_grad_(False), formulation).to(device)
    encoder = config["text_encoder"]
    text = CachedTextEncoder(
        load_text_encoder(encoder["name"], device=device, max_tokens=encoder["max_tokens"])
    )
    return Pipeline(denoiser, text, unet_config.resolution, name=folder.name)
