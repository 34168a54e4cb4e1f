"""What clients send: the request bodies (AUTOMATIC1111's and OpenAI's field names), their limits, image
decoding restricted to plain formats and bounded before it starts, and the job each request becomes."""

from __future__ import annotations

import base64
import binascii
import io
import secrets
from typing import Any

from fastapi import HTTPException
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from ..errors import UnnoiseError
from ..pipeline import Pipeline
from ..settings import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    MASKED_CONTENTS,
    REPAINT_RESAMPLE,
    SCHEDULE_TYPE,
    SCHEDULE_TYPES,
    ImageSettings,
    sampler_name,
)
from .jobs import Job

MAX_STEPS = 200
MAX_IMAGES = 8  # per request: batch_size x n_iter, or n
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
    """AUTOMATIC1111's txt2img fields that mean something here; other fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field("", max_length=MAX_PROMPT)
    negative_prompt: str = Field("", max_length=MAX_PROMPT)
    steps: int = Field(DEFAULT_STEPS, ge=1, le=MAX_STEPS)
    cfg_scale: float = Field(DEFAULT_GUIDANCE, ge=0.0, le=30.0)
    seed: int = Field(-1, ge=-1, le=2**32 - 1)  # AUTOMATIC1111's range; -1 is random
    subseed: int = Field(-1, ge=-1, le=2**32 - 1)  # AUTOMATIC1111's variation seed
    subseed_strength: float = Field(0.0, ge=0.0, le=1.0)
    width: int | None = Field(None, ge=1, le=4096)
    height: int | None = Field(None, ge=1, le=4096)
    sampler_name: str | None = Field(None, max_length=64)
    sampler_index: str | None = Field(None, max_length=64)  # AUTOMATIC1111's older name for the sampler
    scheduler: str | None = Field(None, max_length=64)  # the schedule type: Karras (or Automatic) only
    batch_size: int = Field(1, ge=1, le=MAX_IMAGES)
    n_iter: int = Field(1, ge=1, le=MAX_IMAGES)
    # AUTOMATIC1111 features unnoise does not have: given with anything but their off value, a 422 names
    # them, so a client never gets an image that silently ignored what it asked for
    enable_hr: bool = False
    restore_faces: bool | None = None
    tiling: bool | None = None
    styles: list[str] = Field(default_factory=list, max_length=64)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    script_name: str | None = Field(None, max_length=256)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)

    def unhonoured(self) -> list[str]:
        """The fields set to something unnoise cannot do (each one's "off" is empty, False or None)."""
        return [name for name in UNHONOURED if getattr(self, name)]


UNHONOURED = (
    "enable_hr", "restore_faces", "tiling", "styles", "override_settings", "script_name", "alwayson_scripts",
)  # fmt: skip


class Img2Img(Txt2Img):
    init_images: list[str] = Field(..., min_length=1, max_length=1)  # one base64 image (a data URL is fine)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask: str | None = None  # base64: white = regenerate
    mask_blur: int = Field(0, ge=0, le=64)
    inpaint_full_res: bool = False  # AUTOMATIC1111's "only masked"
    inpaint_full_res_padding: int = Field(4, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)  # 1: regenerate the black part of the mask
    # what the masked part starts from below strength 1: 0 fill, 1 original, 2 latent noise, 3 latent nothing
    inpainting_fill: int = Field(0, ge=0, le=3)


class JobRequest(Img2Img):
    """POST /jobs: txt2img fields, plus init_images (img2img) and mask (inpainting) when given."""

    init_images: list[str] | None = Field(None, min_length=1, max_length=1)


class PngInfo(BaseModel):
    image: str = Field(..., max_length=MAX_IMAGE_BYTES * 4 // 3 + 64)  # base64 PNG (a data URL is fine)


class OpenAIImages(BaseModel):
    """OpenAI's POST /v1/images/generations."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(..., max_length=MAX_PROMPT)
    n: int = Field(1, ge=1, le=MAX_IMAGES)
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
    except Image.DecompressionBombError as error:  # Pillow's own guard, for sizes far beyond ours
        raise HTTPException(413, f"the {what} has too many pixels ({error})") from None
    except (OSError, SyntaxError, ValueError):
        raise HTTPException(
            422, f"the {what} is not a readable image (accepted: {', '.join(IMAGE_FORMATS)})"
        ) from None
    return image


def random_seed(value: int) -> int:
    return secrets.randbelow(2**31) if value == -1 else value


def job_for(body: Txt2Img, pipe: Pipeline) -> Job:
    """The Pipeline call a request asks for, checked before it waits in the queue."""
    count = body.batch_size * body.n_iter
    if count > MAX_IMAGES:
        raise HTTPException(422, f"batch_size x n_iter is {count}; at most {MAX_IMAGES} images per request")
    if body.unhonoured():
        raise HTTPException(422, f"unnoise cannot honour {', '.join(body.unhonoured())}: leave them off")
    if (body.scheduler or "automatic").lower() not in {t.lower() for t in SCHEDULE_TYPES}:
        raise HTTPException(
            422,
            f"unknown scheduler {body.scheduler!r}: unnoise samples on Karras' schedule ({SCHEDULE_TYPE})",
        )
    s = ImageSettings(  # the first image's: checked here, so a mistake is a 422 before the queue
        body.prompt,
        negative_prompt=body.negative_prompt,
        sampler=our_sampler(body.sampler_name or body.sampler_index),
        steps=body.steps,
        guidance=body.cfg_scale,
        seed=random_seed(body.seed),
    )
    try:
        s.check()
    except UnnoiseError as error:
        raise HTTPException(422, str(error)) from None
    init = getattr(body, "init_images", None)
    if not init:
        width, height = pipe.size_for(body.width, body.height)
        asked = (body.width or pipe.resolution, body.height or pipe.resolution)
        notes = {}
        if asked != (width, height):
            notes["size"] = (
                f"asked for {asked[0]}x{asked[1]}; made {width}x{height}: at most {pipe.size_note()}"
            )
        variation_seed = random_seed(body.subseed) if body.subseed_strength > 0 else None

        def generate(pipe: Pipeline, callback) -> list[Image.Image]:
            return pipe.generate(
                s.prompt, negative_prompt=s.negative_prompt, sampler=s.sampler, steps=s.steps,
                guidance=s.guidance, seed=s.seed, num_images=count, width=width, height=height,
                variation_seed=variation_seed, variation_strength=body.subseed_strength, callback=callback,
            )  # fmt: skip

        return Job("generate", generate, total_steps=body.steps, seed=s.seed, notes=notes)
    image = decode_image(init[0], "init image")
    strength = body.denoising_strength
    steps = max(1, round(body.steps * strength))
    if body.mask is None:

        def edit(pipe: Pipeline, callback) -> list[Image.Image]:
            return pipe.edit(
                image, s.prompt, strength=strength, negative_prompt=s.negative_prompt, sampler=s.sampler,
                steps=s.steps, guidance=s.guidance, seed=s.seed, num_images=count, callback=callback,
            )  # fmt: skip

        return Job("edit", edit, total_steps=steps, seed=s.seed)
    mask = decode_image(body.mask, "mask")
    if getattr(body, "inpainting_mask_invert", 0):
        mask = ImageOps.invert(mask.convert("L"))
    if mask.size != image.size:
        raise HTTPException(
            422, f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}"
        )
    area = "masked" if body.inpaint_full_res else "whole"
    feather, padding = body.mask_blur, body.inpaint_full_res_padding
    content = MASKED_CONTENTS[body.inpainting_fill]

    def inpaint(pipe: Pipeline, callback) -> list[Image.Image]:
        return pipe.inpaint(
            image, mask, s.prompt, strength=strength, feather=feather, area=area, padding=padding,
            masked_content=content, negative_prompt=s.negative_prompt, sampler=s.sampler, steps=s.steps,
            guidance=s.guidance, seed=s.seed, num_images=count, callback=callback,
        )  # fmt: skip

    # RePaint runs each block again
    return Job("inpaint", inpaint, total_steps=steps * REPAINT_RESAMPLE, seed=s.seed)


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def parameters_of(png: bytes) -> str:
    return Image.open(io.BytesIO(png)).info.get("parameters", "")


# --- the application ------------------------------------------------------------------------------------
