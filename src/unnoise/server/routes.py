"""The HTTP routes: AUTOMATIC1111's /sdapi/v1, OpenAI's /v1, and /jobs with live previews. Each is a thin
adapter: the request becomes one Pipeline call (`requests.job_for`), the worker runs it, `Service` waits."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.responses import StreamingResponse
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..diffusion.samplers import SAMPLERS
from ..errors import UnnoiseError
from ..images import open_image
from ..settings import (
    A1111_LABELS,
    DEFAULT_STEPS,
    REPAINT_JUMP,
    REPAINT_RESAMPLE,
    ImageSettings,
    a1111_label,
)
from .calls import Inpainting
from .jobs import FINISHED, Job
from .requests import (
    MAX_IMAGE_BYTES,
    MAX_PROMPT,
    REQUEST_MAX_IMAGES,
    Img2Img,
    JobRequest,
    OpenAIImages,
    PngInfo,
    Txt2Img,
    b64,
    decode_bytes,
    decode_image,
    job_for,
    parameters_of,
    random_seed,
    with_model_defaults,
)
from .service import Service


def a1111_routes(service: Service) -> APIRouter:
    """AUTOMATIC1111's API, with its field names and answers."""
    router = APIRouter()
    worker = service.worker

    async def a1111(body: Txt2Img, request: Request) -> dict[str, Any]:
        body = with_model_defaults(body, service.pipe)  # the answer's "parameters" say what was used
        job = await run_in_threadpool(job_for, body, service.pipe)  # decoding off the loop
        job = await service.finished(service.submit(job, request), request)
        pngs = service.result(job)
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

    @router.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2Img, request: Request) -> dict[str, Any]:
        return await a1111(body, request)

    @router.post("/sdapi/v1/img2img")
    async def img2img(body: Img2Img, request: Request) -> dict[str, Any]:
        return await a1111(body, request)

    @router.get("/sdapi/v1/progress")
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
                "job": job.kind,  # what runs, not its id: a job is its submitter's (see /jobs)
            },
        }

    @router.post("/sdapi/v1/interrupt")
    async def interrupt() -> dict[str, Any]:
        """As in AUTOMATIC1111: the running request returns at once with the images as they are."""
        job = worker.current
        if job is not None:
            worker.interrupt(job)
        return {}

    @router.post("/sdapi/v1/skip")
    async def skip() -> dict[str, Any]:
        """AUTOMATIC1111 skips the current image of a batch; a batch here is one sampling run, so skip is
        interrupt: the request returns with what it has."""
        return await interrupt()

    @router.get("/sdapi/v1/samplers")
    async def samplers() -> list[dict[str, Any]]:
        named = A1111_LABELS
        return [{"name": named.get(s, s), "aliases": [s], "options": {}} for s in sorted(SAMPLERS)]

    @router.get("/sdapi/v1/sd-models")
    async def sd_models() -> list[dict[str, Any]]:
        """The models this server may switch to (`POST /sdapi/v1/options` with `sd_model_checkpoint`)."""
        return [
            {"title": service.titled(name, short), "model_name": name, "hash": short or None,
             "sha256": digest or None, "filename": name, "config": None}
            for name, short, digest in await run_in_threadpool(service.catalogue)
        ]  # fmt: skip

    @router.get("/sdapi/v1/loras")
    async def loras() -> list[dict[str, Any]]:
        """The LoRA files of --lora-dir, as AUTOMATIC1111's Lora extension lists them (no path is given out:
        a prompt names a file by its name alone)."""
        from ..lora import loras_in_folder

        return [{"name": p.stem, "alias": p.stem, "path": p.name, "metadata": {}} for p in
                loras_in_folder(service.lora_folder)]  # fmt: skip

    @router.post("/sdapi/v1/refresh-loras")
    async def refresh_loras() -> None:
        """The folder is read at each request: nothing to refresh."""

    @router.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints() -> None:
        """AUTOMATIC1111 rescans its model folder; the catalogue here is read when the server starts."""

    @router.get("/sdapi/v1/schedulers")
    async def schedulers() -> list[dict[str, Any]]:
        return [
            {"name": label.lower(), "label": label, "aliases": []} for label in service.pipe.schedule_types()
        ]

    @router.get("/sdapi/v1/options")
    async def options() -> dict[str, Any]:
        """The few AUTOMATIC1111 options that mean something here (webuiapi reads the model's from them)."""
        name = service.pipe.name
        digest = await run_in_threadpool(service.digest_of, name)
        # the weights' SHA-256, as AUTOMATIC1111 gives it (webuiapi finds it among /sd-models' "sha256")
        return {"sd_model_checkpoint": service.titled(name, service.short_hash(name, digest)),
                "sd_checkpoint_hash": digest or None}  # fmt: skip

    @router.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any], request: Request) -> dict[str, Any]:
        """The one option that means something here: `sd_model_checkpoint` switches the model, by name or
        title, once the jobs queued before it have run (AUTOMATIC1111 also answers when it has loaded)."""
        others = sorted(set(body) - {"sd_model_checkpoint"})
        if others:
            raise HTTPException(422, f"unnoise has no options {', '.join(others)}")
        wanted = body.get("sd_model_checkpoint")
        if wanted is not None:
            if not isinstance(wanted, str):
                raise HTTPException(422, "sd_model_checkpoint must be a model's name")
            await service.switch(await run_in_threadpool(service.model_named, wanted), request)
        return {}

    @router.post("/sdapi/v1/png-info")
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
            "seed": settings.seed, "width": settings.width, "height": settings.height,
            "bind_attributes": settings.bind_attributes,
        }  # fmt: skip
        return {"info": text, "items": items, "parameters": parameters, "settings": ours}

    return router


def openai_routes(service: Service) -> APIRouter:
    """OpenAI's image API, as its official client calls it."""
    router = APIRouter()

    @router.get("/v1/models")
    async def openai_models() -> dict[str, Any]:
        """OpenAI's model list: the model serving now first, then the others it may switch to."""
        models = [
            {"id": name, "object": "model", "created": 0, "owned_by": "unnoise"} for name in service.names()
        ]
        return {"object": "list", "data": models}

    @router.get("/v1/models/{model_id}")
    async def openai_model(model_id: str) -> dict[str, Any]:
        """One model of the list (the openai client's `models.retrieve`); 404 in OpenAI's shape if none."""
        if model_id not in service.names():
            raise HTTPException(404, f"The model '{model_id}' does not exist")
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "unnoise"}

    @router.post("/v1/images/generations")
    async def openai_images(body: OpenAIImages, http: Request) -> dict[str, Any]:
        if body.response_format not in (None, "b64_json"):
            raise HTTPException(400, "only response_format b64_json is supported: this server keeps no files")
        width = height = None
        if body.size not in (None, "auto"):
            match = re.fullmatch(r"([0-9]{1,5})[xX]([0-9]{1,5})", body.size)  # int() took "1_000", " 8", "+8"
            if match is None:
                raise HTTPException(400, f"size {body.size!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
            width, height = int(match[1]), int(match[2])
            if not (1 <= width <= 4096 and 1 <= height <= 4096):
                raise HTTPException(400, f"size {body.size!r}: each side must be in 1..4096")
        request = Txt2Img(prompt=body.prompt, batch_size=body.n, width=width, height=height)
        job = await service.finished(service.submit(job_for(request, service.pipe), http), http)
        return {"created": int(time.time()), "data": [{"b64_json": b64(png)} for png in service.result(job)]}

    @router.post("/v1/images/edits")
    async def openai_edits(
        http: Request,
        image: Annotated[UploadFile, File()],
        prompt: Annotated[str, Form(max_length=MAX_PROMPT)],
        mask: Annotated[UploadFile | None, File()] = None,
        n: Annotated[int, Form(ge=1, le=REQUEST_MAX_IMAGES)] = 1,
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
        settings = ImageSettings(  # what Pipeline.inpaint writes for its defaults
            prompt, guidance=service.pipe.default_guidance, seed=random_seed(-1), denoising_strength=1.0,
            bind_attributes=service.pipe.default_bind_attributes,
            mask_blur=0, repaint_jump=REPAINT_JUMP, repaint_resample=REPAINT_RESAMPLE,
            masked_content="original",
        )  # fmt: skip
        call = Inpainting(settings, n, open_image(picture), regenerate)
        steps = DEFAULT_STEPS * REPAINT_RESAMPLE
        job = Job("inpaint", call.run, steps, settings.seed)
        job = await service.finished(service.submit(job, http), http)
        return {"created": int(time.time()), "data": [{"b64_json": b64(png)} for png in service.result(job)]}

    return router


JobToken = Annotated[str | None, Header(max_length=64)]  # X-Job-Token: the token POST /jobs answered


def job_routes(service: Service) -> APIRouter:
    """/jobs: submit at once (202), then poll, watch (server-sent events) or cancel."""
    router = APIRouter()
    worker = service.worker

    @router.post("/jobs", status_code=202)
    async def create_job(body: JobRequest, request: Request) -> dict[str, Any]:
        """The job, queued. Its `token` is the owner's: send it as `X-Job-Token` to see or cancel the job."""
        job = await run_in_threadpool(job_for, body, service.pipe)  # decoding off the loop
        job = service.submit(job, request)
        return {**job.summary(), "token": job.token, "events": f"/jobs/{job.id}/events"}

    @router.get("/jobs/{job_id}")
    async def get_job(job_id: str, request: Request, x_job_token: JobToken = None) -> dict[str, Any]:
        return service.view(service.job(job_id, x_job_token, request))

    @router.delete("/jobs/{job_id}")
    async def cancel_job(job_id: str, request: Request, x_job_token: JobToken = None) -> dict[str, Any]:
        job = service.job(job_id, x_job_token, request)
        if job.state not in FINISHED:
            worker.cancel(job)
        return job.summary()

    @router.get("/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request, x_job_token: JobToken = None) -> StreamingResponse:
        """Server-sent events: `progress` at every step with a preview of x0_hat, then `done`, `failed` or
        `cancelled` with the results. Any number of the owner's clients may watch one job."""
        job = service.job(job_id, x_job_token, request)

        async def stream():
            version = -1
            while True:
                if await request.is_disconnected():
                    return
                version = await service.changed(job, version, 10.0)
                if job.state in FINISHED:
                    yield f"event: {job.state}\ndata: {json.dumps(service.view(job))}\n\n"
                    return
                event = {**job.summary(), "preview": b64(job.preview) if job.preview else None}
                yield f"event: progress\ndata: {json.dumps(event)}\n\n"
                await asyncio.sleep(0)

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    return router
