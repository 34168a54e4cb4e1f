"""The HTTP API: AUTOMATIC1111's /sdapi/v1, OpenAI's /v1/images/generations, /jobs with live previews, and
the web page at /. A thin adapter: every request becomes one Pipeline call run by the worker (jobs.py).

Every input is bounded (steps, images, sizes, prompt length, image bytes and pixels, body size) and
refused with a 4xx error that says why; errors never carry a traceback. Requests whose Host or Origin is
not this server are refused (no drive-by generation from other pages, no DNS rebinding); there is no CORS.
No endpoint reads or writes a path a client names.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..diffusion.samplers import SAMPLERS
from ..errors import UnnoiseError
from ..pipeline import Pipeline
from ..settings import (
    A1111_LABELS,
    DEFAULT_GUIDANCE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    REPAINT_RESAMPLE,
    SCHEDULE_TYPE,
    SCHEDULE_TYPES,
    ImageSettings,
    a1111_label,
    sampler_name,
)
from .jobs import FINISHED, INTERNAL_ERROR, Job, QueueFullError, Worker, log
from .security import Guard

STATIC = Path(__file__).resolve().parent / "static"

MAX_STEPS = 200
POLL_SECONDS = 0.05  # how often a waiting request looks at its job
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
        """The fields set to something unnoise cannot do."""
        off = {"enable_hr": False, "restore_faces": (None, False), "tiling": (None, False), "styles": [],
               "override_settings": {}, "script_name": (None, ""), "alwayson_scripts": {}}  # fmt: skip
        return [name for name, value in off.items() if getattr(self, name) not in _as_tuple(value)]


def _as_tuple(value) -> tuple:
    return value if isinstance(value, tuple) else (value,)


class Img2Img(Txt2Img):
    init_images: list[str] = Field(..., min_length=1, max_length=1)  # one base64 image (a data URL is fine)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask: str | None = None  # base64: white = regenerate
    mask_blur: int = Field(0, ge=0, le=64)
    inpaint_full_res: bool = False  # AUTOMATIC1111's "only masked"
    inpaint_full_res_padding: int = Field(4, ge=0, le=256)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)  # 1: regenerate the black part of the mask


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


def _seed(value: int) -> int:
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
    settings: dict[str, Any] = dict(
        prompt=body.prompt,
        negative_prompt=body.negative_prompt,
        sampler=our_sampler(body.sampler_name or body.sampler_index),
        steps=body.steps,
        guidance=body.cfg_scale,
        seed=_seed(body.seed),
        num_images=count,
    )
    init = getattr(body, "init_images", None)
    if not init:
        width, height = pipe.size_for(body.width, body.height)
        settings.update(width=width, height=height)
        asked = (body.width or pipe.resolution, body.height or pipe.resolution)
        notes = {}
        if asked != (width, height):
            notes["size"] = (
                f"asked for {asked[0]}x{asked[1]}; made {width}x{height}: at most {pipe.size_note()}"
            )
        if body.subseed_strength > 0:
            settings.update(variation_seed=_seed(body.subseed), variation_strength=body.subseed_strength)
        return Job(
            "generate",
            lambda pipe, callback: pipe.generate(**settings, callback=callback),
            total_steps=body.steps,
            seed=settings["seed"],
            notes=notes,
        )
    image = decode_image(init[0], "init image")
    strength = body.denoising_strength
    steps = max(1, round(body.steps * strength))
    if body.mask is None:
        return Job(
            "edit",
            lambda pipe, callback: pipe.edit(image, strength=strength, **settings, callback=callback),
            total_steps=steps,
            seed=settings["seed"],
        )
    mask = decode_image(body.mask, "mask")
    if getattr(body, "inpainting_mask_invert", 0):
        mask = ImageOps.invert(mask.convert("L"))
    if mask.size != image.size:
        raise HTTPException(
            422, f"the mask is {mask.width}x{mask.height} but the image is {image.width}x{image.height}"
        )
    area = "masked" if body.inpaint_full_res else "whole"
    feather, padding = body.mask_blur, body.inpaint_full_res_padding

    def inpaint(pipe: Pipeline, callback) -> list[Image.Image]:
        return pipe.inpaint(
            image, mask, strength=strength, feather=feather, area=area, padding=padding, **settings,
            callback=callback,
        )  # fmt: skip

    # RePaint runs each block again
    return Job("inpaint", inpaint, total_steps=steps * REPAINT_RESAMPLE, seed=settings["seed"])


def b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def parameters_of(png: bytes) -> str:
    return Image.open(io.BytesIO(png)).info.get("parameters", "")


# --- the application ------------------------------------------------------------------------------------


def create_app(
    model: Pipeline | Callable[[], Pipeline],
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    api_key: str | None = None,
    queue_size: int = 16,
    allowed_hosts: tuple[str, ...] = (),
) -> FastAPI:
    """The application for a loaded Pipeline, or for a function that loads one (`serve` passes one, so the
    model is loaded on the worker's thread, see jobs.Worker)."""
    worker = Worker(model, queue_size=queue_size)
    pipe = worker.wait_ready()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()  # stopping: no job keeps the model busy after the server is gone

    app = FastAPI(
        title="unnoise",
        description="Text-to-image diffusion: AUTOMATIC1111- and OpenAI-compatible endpoints and jobs.",
        version="1",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's own pages load their scripts from a CDN: /docs is ours, offline
        redoc_url=None,
    )
    app.state.worker = worker
    guard = dict(host=host, port=port, api_key=api_key, max_body=MAX_BODY, allowed_hosts=allowed_hosts)
    app.add_middleware(Guard, **guard)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        headers = getattr(error, "headers", None)
        if request.url.path.startswith("/v1/"):  # OpenAI's error shape, which its client reads
            body = {"error": {"message": error.detail, "type": "invalid_request_error", "code": None}}
            return JSONResponse(body, status_code=error.status_code, headers=headers)
        return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()]
        message = "; ".join(problems)
        if request.url.path.startswith("/v1/"):
            body = {"error": {"message": message, "type": "invalid_request_error", "code": None}}
            return JSONResponse(body, status_code=422)
        return JSONResponse({"error": message}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):  # never a traceback to the client
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=error)
        return JSONResponse({"error": INTERNAL_ERROR}, status_code=500)

    def submit(job: Job) -> Job:
        try:
            return worker.submit(job)
        except QueueFullError as full:
            raise HTTPException(429, str(full), headers={"Retry-After": str(full.retry_after)}) from None

    async def finished(job: Job, request: Request) -> Job:
        """The job once it ends, waited for on the event loop (a waiting client holds no thread). A client
        that hangs up cancels its job: nobody would receive the images."""
        while not job.ended.is_set():
            await asyncio.sleep(POLL_SECONDS)
            if job.state in ("queued", "running") and await request.is_disconnected():
                worker.cancel(job)
                log.info("job %s cancelled: its client disconnected", job.id)
        return job

    async def changed(job: Job, version: int, timeout: float) -> int:
        """The job's version once it passes `version` (or after `timeout` s), waited for on the event loop:
        a watcher holds no thread (60 watchers on one job made the page wait 16 s when each held one)."""
        waited = 0.0
        while job.version == version and waited < timeout:
            await asyncio.sleep(POLL_SECONDS)
            waited += POLL_SECONDS
        return job.version

    def checked_result(job: Job) -> list[bytes]:
        if job.state == "failed":
            raise HTTPException(500 if job.internal else 422, job.error or "the job failed")
        if job.state == "cancelled":
            raise HTTPException(409, "the job was interrupted")
        return job.images

    # --- AUTOMATIC1111 --------------------------------------------------------------------------------

    async def a1111(body: Txt2Img, request: Request) -> dict[str, Any]:
        job = submit(await run_in_threadpool(job_for, body, pipe))  # images decode off the event loop
        job = await finished(job, request)
        pngs = checked_result(job)
        infotexts = [parameters_of(png) for png in pngs]
        seed = job.seed
        info = {"infotexts": infotexts, "seed": seed, "all_seeds": [seed + i for i in range(len(pngs))]}
        if pngs:
            info["width"], info["height"] = Image.open(io.BytesIO(pngs[0])).size
        if job.notes:
            info["comments"] = job.notes  # where AUTOMATIC1111 puts its own remarks
        return {
            "images": [b64(png) for png in pngs],
            "parameters": body.model_dump(exclude={"init_images", "mask"}),
            "info": json.dumps(info),
        }

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2Img, request: Request) -> dict[str, Any]:
        return await a1111(body, request)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2Img, request: Request) -> dict[str, Any]:
        return await a1111(body, request)

    @app.get("/sdapi/v1/progress")
    async def progress() -> dict[str, Any]:
        job = worker.current
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None,
                    "state": {"job_count": worker.queue_length(), "sampling_step": 0, "sampling_steps": 0,
                              "interrupted": False}}  # fmt: skip
        return {
            "progress": job.progress,
            "eta_relative": job.eta() or 0.0,
            "current_image": b64(job.preview) if job.preview else None,
            "textinfo": None,
            "state": {
                "job_count": worker.queue_length() + 1,
                "sampling_step": job.step,
                "sampling_steps": job.total_steps,
                "interrupted": job.cancel_requested.is_set() or job.interrupt_requested.is_set(),
                "job": job.id,
            },
        }

    @app.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict[str, Any]:
        """As in AUTOMATIC1111: the running request returns at once with the images as they are."""
        job = worker.current
        if job is not None:
            worker.interrupt(job)
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip() -> dict[str, Any]:
        """AUTOMATIC1111 skips the current image of a batch; a batch here is one sampling run, so skip is
        interrupt: the request returns with what it has."""
        return await interrupt()

    @app.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        named = A1111_LABELS
        return [{"name": named.get(s, s), "aliases": [s], "options": {}} for s in sorted(SAMPLERS)]

    def model_title() -> str:
        return f"{pipe.name} [{pipe.model_hash}]" if pipe.model_hash else pipe.name  # as A1111 titles them

    @app.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        return [{"title": model_title(), "model_name": pipe.name, "hash": pipe.model_hash or None,
                 "sha256": None, "filename": pipe.name, "config": None}]  # fmt: skip

    @app.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return [{"name": SCHEDULE_TYPE.lower(), "label": SCHEDULE_TYPE, "aliases": ["Automatic"]}]

    @app.get("/sdapi/v1/options")
    async def options() -> dict[str, Any]:
        """The few AUTOMATIC1111 options that mean something here (webuiapi reads the model's from them)."""
        return {"sd_model_checkpoint": model_title(), "sd_checkpoint_hash": pipe.model_hash or None}

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any]) -> dict[str, Any]:
        """Options may be set only to what they are: this server runs the one model it was started with."""
        wanted = body.get("sd_model_checkpoint")
        if wanted not in (None, pipe.name, model_title()):
            raise HTTPException(422, f"this server runs {pipe.name} only (start another for {wanted!r})")
        others = sorted(set(body) - {"sd_model_checkpoint"})
        if others:
            raise HTTPException(422, f"unnoise has no options {', '.join(others)}")
        return {}

    @app.post("/sdapi/v1/png-info")
    async def png_info(body: PngInfo) -> dict[str, Any]:
        """The `parameters` text of a PNG and its fields, as AUTOMATIC1111 answers."""
        image = await run_in_threadpool(decode_image, body.image, "image")
        text = image.info.get("parameters", "")
        items = {"parameters": text} if text else {}
        try:
            settings = ImageSettings.from_parameters(text) if text else None
        except UnnoiseError:
            settings = None
        parameters = {} if settings is None else {"Prompt": settings.prompt, "Seed": settings.seed,
                                                   "Steps": settings.steps, "CFG scale": settings.guidance,
                                                   "Sampler": a1111_label(settings.sampler)}  # fmt: skip
        ours = None if settings is None else {
            "prompt": settings.prompt, "negative_prompt": settings.negative_prompt,
            "sampler": settings.sampler, "steps": settings.steps, "guidance": settings.guidance,
            "seed": settings.seed,
        }  # fmt: skip
        return {"info": text, "items": items, "parameters": parameters, "settings": ours}

    # --- OpenAI ---------------------------------------------------------------------------------------

    @app.get("/v1/models")
    async def openai_models() -> dict[str, Any]:
        """OpenAI's model list: the one model this server runs."""
        return {
            "object": "list",
            "data": [{"id": pipe.name, "object": "model", "created": 0, "owned_by": "unnoise"}],
        }

    @app.post("/v1/images/generations")
    async def openai_images(body: OpenAIImages, http: Request) -> dict[str, Any]:
        if body.response_format not in (None, "b64_json"):
            raise HTTPException(400, "only response_format b64_json is supported: this server keeps no files")
        width = height = None
        if body.size not in (None, "auto"):
            try:
                width, height = (int(v) for v in body.size.lower().split("x"))
            except ValueError:
                raise HTTPException(400, f"size {body.size!r} is not WIDTHxHEIGHT (e.g. 1024x1024)") from None
            if not (1 <= width <= 4096 and 1 <= height <= 4096):
                raise HTTPException(400, f"size {body.size!r}: each side must be in 1..4096")
        request = Txt2Img(prompt=body.prompt, batch_size=body.n, width=width, height=height)
        job = await finished(submit(job_for(request, pipe)), http)
        return {"created": int(time.time()), "data": [{"b64_json": b64(png)} for png in checked_result(job)]}

    @app.post("/v1/images/edits")
    async def openai_edits(
        http: Request,
        image: Annotated[UploadFile, File()],
        prompt: Annotated[str, Form(max_length=MAX_PROMPT)],
        mask: Annotated[UploadFile | None, File()] = None,
        n: Annotated[int, Form(ge=1, le=MAX_IMAGES)] = 1,
        size: Annotated[str | None, Form(max_length=16)] = None,
        response_format: Annotated[str | None, Form(max_length=16)] = None,
        model: Annotated[str | None, Form(max_length=128)] = None,
    ) -> dict[str, Any]:
        """OpenAI's image edit: the transparent part (alpha 0) of `mask`, or of the image when no mask is
        given, is inpainted to fit the prompt; every other pixel is kept. The answer has the image's size."""
        if response_format not in (None, "b64_json"):
            raise HTTPException(400, "only response_format b64_json is supported: this server keeps no files")
        picture = await run_in_threadpool(decode_bytes, await image.read(MAX_IMAGE_BYTES + 1), "image")
        source = picture if mask is None else await run_in_threadpool(
            decode_bytes, await mask.read(MAX_IMAGE_BYTES + 1), "mask"
        )  # fmt: skip
        if source.size != picture.size:
            raise HTTPException(
                400, f"the mask is {source.width}x{source.height}, the image {picture.width}x{picture.height}"
            )
        if "A" not in source.getbands() and "transparency" not in source.info:
            raise HTTPException(
                400, "the mask (or the image, without a mask) has no transparent part to edit"
            )
        regenerate = source.convert("RGBA").getchannel("A").point(lambda a: 255 if a == 0 else 0)
        seed = _seed(-1)

        def edit(pipe: Pipeline, callback) -> list[Image.Image]:
            return pipe.inpaint(picture, regenerate, prompt, seed=seed, num_images=n, callback=callback)

        job = await finished(
            submit(Job("inpaint", edit, total_steps=DEFAULT_STEPS * REPAINT_RESAMPLE, seed=seed)), http
        )
        return {"created": int(time.time()), "data": [{"b64_json": b64(png)} for png in checked_result(job)]}

    # --- jobs -------------------------------------------------------------------------------------------

    def job_or_404(job_id: str) -> Job:
        job = worker.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    def job_view(job: Job) -> dict[str, Any]:
        view = job.summary()
        view["images"] = [b64(png) for png in job.images]
        view["parameters"] = [parameters_of(png) for png in job.images]
        return view

    @app.post("/jobs", status_code=202)
    async def create_job(body: JobRequest) -> dict[str, Any]:
        job = submit(await run_in_threadpool(job_for, body, pipe))  # images decode off the event loop
        return {**job.summary(), "events": f"/jobs/{job.id}/events"}

    @app.get("/jobs/{job_id}")
    async def get_job(job_id: str) -> dict[str, Any]:
        return job_view(job_or_404(job_id))

    @app.delete("/jobs/{job_id}")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        job = job_or_404(job_id)
        if job.state not in FINISHED:
            worker.cancel(job)
        return job.summary()

    @app.get("/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-sent events: `progress` at every step with a preview of x0_hat, then `done`, `failed` or
        `cancelled` with the results. Any number of clients may watch one job."""
        job = job_or_404(job_id)

        async def stream():
            version = -1
            while True:
                if await request.is_disconnected():
                    return
                version = await changed(job, version, 10.0)
                if job.state in FINISHED:
                    yield f"event: {job.state}\ndata: {json.dumps(job_view(job))}\n\n"
                    return
                event = {**job.summary(), "preview": b64(job.preview) if job.preview else None}
                yield f"event: progress\ndata: {json.dumps(event)}\n\n"
                await asyncio.sleep(0)

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": pipe.name, "queued": worker.queue_length(),
                "busy": worker.current is not None, "worker_alive": worker.thread.is_alive()}  # fmt: skip

    # --- the web page -----------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> FileResponse:
        return FileResponse(STATIC / "docs.html")

    @app.get("/config", include_in_schema=False)
    async def config() -> dict[str, Any]:
        limits = {"max_steps": MAX_STEPS, "max_images": MAX_IMAGES, "needs_key": api_key is not None}
        defaults = {"sampler": DEFAULT_SAMPLER, "steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE}
        return {
            "model": pipe.name,
            "resolution": pipe.resolution,
            "samplers": sorted(SAMPLERS),
            "defaults": defaults,
            **limits,
        }

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(
    model: str,
    *,
    host: str,
    port: int,
    api_key: str | None,
    queue_size: int,
    allowed_hosts: tuple[str, ...] = (),
    device: str = "auto",
) -> None:
    """`unnoise serve`: load the model and run uvicorn until interrupted."""
    import uvicorn

    from ..pipeline import load

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise UnnoiseError(f"binding {host} exposes the server beyond this machine: pass --api-key too")
    if not 1 <= port <= 65535:
        raise UnnoiseError(f"--port must be in 1..65535, got {port}")
    if queue_size < 1:
        raise UnnoiseError(f"--queue-size must be at least 1, got {queue_size}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    app = create_app(
        lambda: load(model, device=device),
        host=host,
        port=port,
        api_key=api_key,
        queue_size=queue_size,
        allowed_hosts=allowed_hosts,
    )
    print(f"unnoise: serving {app.state.worker.pipe.name} on http://{host}:{port}/ (API docs at /docs)")
    # one line a request comes from our access log (security.Guard), with the duration; not uvicorn's
    uvicorn.run(
        app, host=host, port=port, log_level="info", access_log=False, limit_concurrency=256,
        timeout_graceful_shutdown=5,  # SIGTERM: the lifespan cancels every job; nothing waits for the queue
    )  # fmt: skip
