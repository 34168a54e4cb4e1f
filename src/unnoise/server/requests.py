"""What clients send: the request bodies (AUTOMATIC1111's and OpenAI's field names), their limits, image
decoding restricted to plain formats and bounded before it starts, and the job each request becomes."""

from __future__ import annotations

import base64
import binascii
import io
import math
import secrets
from typing import Any, ClassVar

import numpy as np
from fastapi import HTTPException
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from ..diffusion.samplers import SAMPLERS
from ..errors import UnnoiseError
from ..images import open_image, open_mask
from ..pipeline import Pipeline
from ..settings import (
    DEFAULT_STEPS,
    MASKED_CONTENTS,
    MAX_GUIDANCE,
    REPAINT_JUMP,
    REPAINT_RESAMPLE,
    ImageSettings,
    a1111_label,
    sampler_name,
    sampler_options,
)
from .calls import Edit, Generation, Inpainting
from .jobs import Job

# a request's bounds on its cost, tighter than the library's own (settings.MAX_STEPS, settings.MAX_IMAGES)
REQUEST_MAX_STEPS = 200
REQUEST_MAX_IMAGES = 8  # per request: batch_size x n_iter, or n
MAX_PROMPT = 2000  # characters
MAX_IMAGE_BYTES = 8 * 1024 * 1024  # one decoded input image
MAX_PIXELS = 2048 * 2048  # one input image, checked before it is decoded
MAX_BODY = 24 * 1024 * 1024  # a whole request


def our_sampler(name: str | None) -> str:
    """Ours for an AUTOMATIC1111 label or one of our names; a 422 that lists the known ones otherwise."""
    try:
        return sampler_name(name)
    except UnnoiseError as error:
        raise HTTPException(422, str(error)) from None


# --- request bodies -----------------------------------------------------------------------------------


class Txt2Img(BaseModel):
    """AUTOMATIC1111's txt2img fields that mean something here. Fields that ask for something unnoise cannot
    do are a 422 that names them (see `unhonoured`); the rest only matter to A1111 itself (saving on its own
    disk, hires-fix settings without enable_hr) and are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field("", max_length=MAX_PROMPT)
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    steps: int = Field(DEFAULT_STEPS, ge=1, le=REQUEST_MAX_STEPS)
    cfg_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE)  # None: the model's default
    seed: int = Field(-1, ge=-1, le=2**32 - 1)  # AUTOMATIC1111's range; -1 is random
    subseed: int = Field(-1, ge=-1, le=2**32 - 1)  # AUTOMATIC1111's variation seed
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    width: int | None = Field(None, ge=1, le=4096)
    height: int | None = Field(None, ge=1, le=4096)
    sampler_name: str | None = Field(None, max_length=64)
    sampler_index: str | None = Field(None, max_length=64)  # AUTOMATIC1111's older name for the sampler
    scheduler: str | None = Field(None, max_length=64)  # the schedule type: Karras (or Automatic) only
    batch_size: int = Field(1, ge=1, le=REQUEST_MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=REQUEST_MAX_IMAGES)
    # the sampler's options, for the samplers that take them (see `sampler_options_of`)
    eta: float | None = Field(None, ge=0.0, le=10.0)
    s_churn: float | None = Field(None, ge=0.0, le=1000.0)
    s_noise: float | None = Field(None, ge=0.0, le=10.0)
    s_tmin: float | None = Field(None, ge=0.0, le=1e6)
    s_tmax: float | None = Field(None, ge=0.0, le=1e6)  # 0 is no upper bound, as in A1111
    # unnoise's own: each noun's cross-attention bound to its attributes' (ImageSettings.bind_attributes);
    # None: the model's default
    bind_attributes: bool | None = None
    # AUTOMATIC1111 features unnoise does not have: given with anything but their off value, a 422 names
    # them, so a client never gets an image that silently ignored what it asked for
    enable_hr: bool = False
    restore_faces: bool | None = None
    tiling: bool | None = None
    styles: list[str] = Field(default_factory=list, max_length=64)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    script_name: str | None = Field(None, max_length=256)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    seed_resize_from_h: int = Field(-1, ge=-1, le=4096)  # A1111's noise drawn at another size
    seed_resize_from_w: int = Field(-1, ge=-1, le=4096)

    # each unhonoured field's values that ask for nothing: A1111's defaults and webuiapi's
    UNHONOURED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "enable_hr": (False,), "restore_faces": (None, False), "tiling": (None, False), "styles": ([],),
        "override_settings": ({},), "script_name": (None, ""), "alwayson_scripts": ({},),
        "seed_resize_from_h": (-1, 0), "seed_resize_from_w": (-1, 0),
    }  # fmt: skip

    def unhonoured(self) -> list[str]:
        """The fields set to something unnoise cannot do, as `name=value`."""
        return [f"{name}={getattr(self, name)!r}" for name, off in self.UNHONOURED.items()
                if getattr(self, name) not in off]  # fmt: skip


class Img2Img(Txt2Img):
    init_images: list[str] = Field(..., min_length=1, max_length=1)  # one base64 image (a data URL is fine)
    # how the input is brought to width x height: 0 stretched, 1 cropped, 2 filled (AUTOMATIC1111's modes;
    # its 3, an upscale in latent space, has no meaning here); without width and height it keeps its size
    resize_mode: int = Field(0, ge=0, le=2)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask: str | None = None  # base64: white = regenerate
    mask_blur: int = Field(0, ge=0, le=64)
    inpaint_full_res: bool = False  # AUTOMATIC1111's "only masked"
    inpaint_full_res_padding: int = Field(4, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)  # 1: regenerate the black part of the mask
    # what the masked part starts from below strength 1: 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpainting_fill: int = Field(0, ge=0, le=3)
    image_cfg_scale: float | None = Field(None, ge=0.0, le=30.0)  # instruct-pix2pix's image guidance
    initial_noise_multiplier: float | None = Field(None, ge=0.0, le=10.0)  # scales img2img's starting noise

    UNHONOURED: ClassVar[dict[str, tuple[Any, ...]]] = {
        **Txt2Img.UNHONOURED, "image_cfg_scale": (None, 1.5), "initial_noise_multiplier": (None, 1.0)
    }  # fmt: skip


class JobRequest(Img2Img):
    """POST /jobs: txt2img fields, plus init_images (img2img) and mask (inpainting) when given."""

    init_images: list[str] | None = Field(None, min_length=1, max_length=1)


class PngInfo(BaseModel):
    image: str = Field(..., max_length=MAX_IMAGE_BYTES * 4 // 3 + 64)  # base64 PNG (a data URL is fine)


class OpenAIImages(BaseModel):
    """OpenAI's POST /v1/images/generations."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., max_length=MAX_PROMPT)
    n: int = Field(1, ge=1, le=REQUEST_MAX_IMAGES)
    size: str | None = Field(None, max_length=16)
    response_format: str | None = Field("b64_json", max_length=16)
    model: str | None = Field(None, max_length=128)


# --- turning a request into a job ----------------------------------------------------------------------


IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")  # the only decoders a client's bytes reach


def decode_image(data: str, what: str) -> Image.Image:
    """A base64 image (optionally a data: URL), bounded in bytes and pixels before it is decoded."""
    if data.startswith("data:"):
        data = data.partition(",")[2]
    if len(data) * 3 // 4 > MAX_IMAGE_BYTES:
        raise HTTPException(413, f"the {what} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"the {what} is not valid base64") from None
    return decode_bytes(raw, what)


def decode_bytes(raw: bytes, what: str) -> Image.Image:
    """An image file's bytes, bounded in bytes and pixels before it is decoded, by the plain decoders only."""
    if len(raw) > MAX_IMAGE_BYTES:
        raise HTTPException(413, f"the {what} is larger than {MAX_IMAGE_BYTES // 2**20} MB")
    try:
        image = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)  # never EPS (Ghostscript) and the like
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise HTTPException(413, f"the {what} has {width}x{height} pixels; at most {MAX_PIXELS} allowed")
        image.load()
    except Image.DecompressionBombError:  # Pillow's own guard, for sizes far beyond ours: our bound is said
        raise HTTPException(413, f"the {what} has too many pixels; at most {MAX_PIXELS} allowed") from None
    except (OSError, SyntaxError, ValueError):
        raise HTTPException(
            422, f"the {what} is not a readable image (accepted: {', '.join(IMAGE_FORMATS)})"
        ) from None
    return image


def random_seed(value: int) -> int:
    return secrets.randbelow(2**31) if value == -1 else value


# AUTOMATIC1111's sampler fields and the value of each that asks for nothing (its default for the samplers
# that take it; s_tmax 0 is read as no bound)
A1111_SAMPLER_FIELDS = {"eta": 1.0, "s_churn": 0.0, "s_noise": 1.0, "s_tmin": 0.0, "s_tmax": math.inf}


def sampler_options_of(body: Txt2Img, sampler: str) -> dict[str, float]:
    """The sampler fields the sampler takes, where they differ from its own defaults (webuiapi's eta 1 runs
    DDIM with eta 1, as in AUTOMATIC1111). A field the sampler does not take, set to anything but the value
    that asks for nothing, is a 422 that names it."""
    takes = sampler_options(sampler)
    options, refused = {}, []
    for name, neutral in A1111_SAMPLER_FIELDS.items():
        value = getattr(body, name)
        if value is None:
            continue
        value = math.inf if name == "s_tmax" and value == 0 else value
        if name in takes:
            if value != takes[name]:
                options[name] = value
        elif value != neutral:
            samplers = ", ".join(a1111_label(s) for s in sorted(SAMPLERS) if name in sampler_options(s))
            refused.append(f"{name}={value:g} (the samplers that take it: {samplers})")
    if refused:
        raise HTTPException(422, f"the sampler {a1111_label(sampler)} takes no {'; no '.join(refused)}")
    return options


def with_model_defaults(body: Txt2Img, pipe: Pipeline) -> Txt2Img:
    """The request with what it left to the model filled in: the guidance and attribute binding."""
    filled = {
        "cfg_scale": pipe.default_guidance if body.cfg_scale is None else body.cfg_scale,
        "bind_attributes": pipe.default_bind_attributes
        if body.bind_attributes is None
        else body.bind_attributes,
    }
    return body.model_copy(update=filled)


def job_for(body: Txt2Img, pipe: Pipeline) -> Job:
    """The Pipeline call a request asks for, checked before it waits in the queue."""
    body = with_model_defaults(body, pipe)
    count = body.batch_size * body.n_iter
    if count > REQUEST_MAX_IMAGES:
        raise HTTPException(
            422, f"batch_size x n_iter is {count}; at most {REQUEST_MAX_IMAGES} images per request"
        )
    unhonoured = body.unhonoured()
    if unhonoured:
        raise HTTPException(
            422, f"unnoise cannot honour {', '.join(unhonoured)}: leave them out or at A1111's defaults"
        )
    sampler = our_sampler(body.sampler_name or body.sampler_index)
    first = checked(  # the first image's: checked here, so a mistake is a 422 before the queue
        ImageSettings(
            body.prompt,
            negative_prompt=body.negative_prompt,
            sampler=sampler,
            sampler_options=sampler_options_of(body, sampler),
            steps=body.steps,
            guidance=body.cfg_scale,
            seed=random_seed(body.seed),
            bind_attributes=body.bind_attributes,
            schedule=body.scheduler or "Automatic",
        )
    )
    checked_by(pipe.with_schedule, first)  # the schedule types the model can run: a 422 otherwise
    init = getattr(body, "init_images", None)
    if not init:
        return generation_job(body, first, count, pipe)
    image = open_image(decode_image(init[0], "init image"))
    if body.mask is None:
        return edit_job(body, first, count, image, pipe)
    return inpainting_job(body, first, count, image, pipe)


def checked(settings: ImageSettings) -> ImageSettings:
    return checked_by(ImageSettings.check, settings)


def checked_by(check, settings: ImageSettings) -> ImageSettings:
    """check(settings), its UnnoiseError a 422 that says it."""
    try:
        return check(settings)
    except UnnoiseError as error:
        raise HTTPException(422, str(error)) from None


def generation_job(body: Txt2Img, first: ImageSettings, count: int, pipe: Pipeline) -> Job:
    """txt2img at the size `Pipeline.size_for` gives for the request's, which the notes say if it differs."""
    width, height = pipe.size_for(body.width, body.height)
    asked = (body.width or pipe.resolution, body.height or pipe.resolution)
    variation_seed = random_seed(body.subseed) if body.subseed_strength > 0 else None
    settings = first.replace(
        width=width, height=height, variation_seed=variation_seed, variation_strength=body.subseed_strength
    )
    call = Generation(checked(settings), count)
    notes = size_notes(asked, (width, height), pipe)
    return Job(
        "generate",
        call.run,
        total_steps=body.steps,
        seed=settings.seed,
        notes=notes,
    )


def edit_job(body: Img2Img, first: ImageSettings, count: int, image: Image.Image, pipe: Pipeline) -> Job:
    """img2img of the whole picture, at the size asked for (see `whole_picture`)."""
    image, notes = whole_picture(image, body, pipe)
    call = Edit(checked(first.replace(denoising_strength=body.denoising_strength)), count, image)
    steps = max(1, round(body.steps * body.denoising_strength))
    return Job("edit", call.run, total_steps=steps, seed=first.seed, notes=notes)


def inpainting_job(
    body: Img2Img, first: ImageSettings, count: int, image: Image.Image, pipe: Pipeline
) -> Job:
    """Inpainting. As in AUTOMATIC1111, "only masked" (inpaint_full_res) keeps the image's size and draws the
    masked area at the model's; the whole picture is made at the size asked for (see `whole_picture`)."""
    mask = open_mask(decode_image(body.mask, "mask"))
    if body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if mask.size != image.size:
        raise HTTPException(
            422, f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}"
        )
    if body.inpaint_full_res:
        notes = {}
        if body.width is not None or body.height is not None:
            r = pipe.resolution
            notes["size"] = (
                f"inpaint_full_res (only masked): the image keeps its {image.width}x{image.height}, as in"
                f" AUTOMATIC1111, and the masked area is drawn at this model's {r}x{r}"
            )
    else:
        size = image.size
        image, notes = whole_picture(image, body, pipe)
        if image.size != size:
            mask = resized(mask, image.size, body.resize_mode)
    settings = first.replace(
        denoising_strength=body.denoising_strength,
        mask_blur=body.mask_blur,
        inpaint_area="masked" if body.inpaint_full_res else None,
        masked_padding=body.inpaint_full_res_padding if body.inpaint_full_res else None,
        repaint_jump=REPAINT_JUMP,
        repaint_resample=REPAINT_RESAMPLE,
        masked_content=MASKED_CONTENTS[body.inpainting_fill],
    )
    call = Inpainting(checked(settings), count, image, mask)
    # RePaint runs each block again
    steps = max(1, round(body.steps * body.denoising_strength)) * REPAINT_RESAMPLE
    return Job("inpaint", call.run, total_steps=steps, seed=first.seed, notes=notes)


def size_notes(asked: tuple[int, int], made: tuple[int, int], pipe: Pipeline) -> dict[str, str]:
    if asked == made:
        return {}
    return {"size": f"asked for {asked[0]}x{asked[1]}; made {made[0]}x{made[1]}: at most {pipe.size_note()}"}


RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")  # AUTOMATIC1111's resize_mode 0, 1, 2


def whole_picture(image: Image.Image, body: Img2Img, pipe: Pipeline) -> tuple[Image.Image, dict[str, str]]:
    """The input brought to the size asked for (txt2img's rule, `Pipeline.size_for`) by AUTOMATIC1111's
    resize_mode, and the notes that say what changed; with no width or height, the input as it is."""
    if body.width is None and body.height is None:
        return image, {}
    asked = (body.width or image.width, body.height or image.height)
    width, height = pipe.size_for(*asked)
    notes = size_notes(asked, (width, height), pipe)
    if body.resize_mode == 0 and round(image.height * width / image.width) != height:
        notes["resize"] = (
            f"resize_mode 0 ({RESIZE_MODES[0]}) stretched the {image.width}x{image.height} input to"
            f" {width}x{height}; resize_mode 1 crops it to that shape, 2 fills the sides"
        )
    return resized(image, (width, height), body.resize_mode), notes


def resized(image: Image.Image, size: tuple[int, int], mode: int) -> Image.Image:
    """The image at `size` as AUTOMATIC1111's resize_mode makes it: 0 stretched, 1 scaled to cover and
    cropped to the middle, 2 scaled to fit with the sides filled by its edge pixels."""
    if image.size == size:
        return image
    if mode == 0:
        return image.resize(size, Image.LANCZOS)
    if mode == 1:
        return ImageOps.fit(image, size, Image.LANCZOS)
    scale = min(size[0] / image.width, size[1] / image.height)  # the whole image inside, at least 1 px wide
    inner = image.resize([max(1, round(side * scale)) for side in image.size], Image.LANCZOS)
    left, top = (size[0] - inner.width) // 2, (size[1] - inner.height) // 2
    pixels = np.asarray(inner)  # (H, W, 3) or (H, W)
    sides = ((top, size[1] - inner.height - top), (left, size[0] - inner.width - left))
    return Image.fromarray(np.pad(pixels, sides + ((0, 0),) * (pixels.ndim - 2), mode="edge"))


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def parameters_of(png: bytes) -> str:
    return Image.open(io.BytesIO(png)).info.get("parameters", "")


# --- the application ------------------------------------------------------------------------------------
