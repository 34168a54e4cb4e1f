"""The HTTP application: the routes (routes.py: AUTOMATIC1111's /sdapi/v1, OpenAI's /v1, /jobs with live
previews), the web page at /, the error answers, and `serve`. A thin adapter: every request becomes one
Pipeline call (requests.py) run by the worker (jobs.py).

Every input is bounded (steps, images, sizes, prompt length, image bytes and pixels, body size) and
refused with a 4xx error that says why; errors never carry a traceback. Requests whose Host or Origin is
not this server are refused (no drive-by generation from other pages, no DNS rebinding); there is no CORS.
No endpoint reads or writes a path a client names.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..diffusion.samplers import SAMPLERS
from ..errors import UnnoiseError
from ..pipeline import Pipeline, load
from ..release import model_catalogue, model_name, resolve_model
from ..settings import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    a1111_label,
)
from ..stable_diffusion import looks_like_hub_id
from ..threads import CpuShare
from .jobs import DEFAULT_DEADLINE, INTERNAL_ERROR, Worker, log
from .requests import MAX_BODY, REQUEST_MAX_IMAGES, REQUEST_MAX_STEPS
from .routes import a1111_routes, job_routes, openai_routes
from .security import Guard, note_planned_stop
from .service import Service

STATIC = Path(__file__).resolve().parent / "static"
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def create_app(
    model: Pipeline | Callable[[], Pipeline],
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    api_key: str | None = None,
    queue_size: int = 16,
    allowed_hosts: tuple[str, ...] = (),
    deadline: float = DEFAULT_DEADLINE,
    models: dict[str, Path] | None = None,
    load_model: Callable[[Path], Pipeline] | None = None,
    cpu_share: CpuShare | None = None,
    lora_folder: Path | None = None,
) -> FastAPI:
    """The application for a loaded Pipeline, or for a function that loads one (`serve` passes one, so the
    model is loaded on the worker's thread, see jobs.Worker). Clients may switch to any of `models` (by
    default the shipped ones), which `load_model` loads (by default `unnoise.load` on the best device).
    With `cpu_share` each job runs on the cores other processes leave free (`serve --threads auto`)."""
    worker = Worker(model, queue_size=queue_size, deadline=deadline, cpu_share=cpu_share)
    worker.wait_ready()

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
        if error.status_code == 503 and worker.stopping.is_set():
            note_planned_stop(request.scope)
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

    service = Service(worker, model_catalogue() if models is None else models, load_model or load)
    service.lora_folder = lora_folder
    if lora_folder is not None:  # `serve` sets it on each model it loads; a model handed in gets it here
        worker.pipe.lora_folder = lora_folder
    for routes in (a1111_routes, openai_routes, job_routes):
        app.include_router(routes(service))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": service.pipe.name, "queued": worker.queue_length(),
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
        limits = {
            "max_steps": REQUEST_MAX_STEPS,
            "max_images": REQUEST_MAX_IMAGES,
            "needs_key": api_key is not None,
        }
        defaults = {
            "sampler": DEFAULT_SAMPLER,
            "steps": DEFAULT_STEPS,
            "guidance": service.pipe.default_guidance,
            "bind_attributes": service.pipe.default_bind_attributes,
        }
        return {
            "model": service.pipe.name,
            "resolution": service.pipe.resolution,
            "stride": service.pipe.stride,
            "size_rule": service.pipe.size_note(),
            "samplers": sorted(SAMPLERS),
            "sampler_labels": {name: a1111_label(name) for name in SAMPLERS},  # what captions and PNGs say
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
    deadline: float = DEFAULT_DEADLINE,
    models_dirs: tuple[str, ...] = (),
    auto_threads: bool = False,
    log_level: str = "info",
    lora_dir: str | None = None,
    load_options: dict | None = None,
) -> None:
    """`unnoise serve`: load the model and run uvicorn until interrupted. Clients may switch to the shipped
    models and the releases in `models_dirs`. `log_level` is the least a logged line is: each request's
    access line is INFO, WARNING for a 4xx (and a planned stop's 503), ERROR for a 5xx."""
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise UnnoiseError(f"binding {host} exposes the server beyond this machine: pass --api-key too")
    if not 1 <= port <= 65535:
        raise UnnoiseError(f"--port must be in 1..65535, got {port}")
    if queue_size < 1:
        raise UnnoiseError(f"--queue-size must be at least 1, got {queue_size}")
    if not deadline > 0:
        raise UnnoiseError(f"--deadline must be a positive number of seconds, got {deadline}")
    if log_level.lower() not in LOG_LEVELS:
        raise UnnoiseError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    if lora_dir is not None and not Path(lora_dir).is_dir():
        raise UnnoiseError(f"--lora-dir {lora_dir}: not a folder")
    lora_folder = Path(lora_dir) if lora_dir is not None else None

    def loaded(name: str | Path) -> Pipeline:  # every model served finds prompts' LoRAs in lora_folder
        own = (resolve_model(name) / "config.json").is_file() if not looks_like_hub_id(str(name)) else False
        options = {} if own else (load_options or {})  # a convention, clip skip, ...: SD models only
        pipe = load(name, device=device, **options)
        pipe.lora_folder = lora_folder
        return pipe

    models = model_catalogue(Path(d) for d in models_dirs)
    served = resolve_model(model)  # an unknown model is an error before anything loads
    models.setdefault(model_name(served), served)
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    app = create_app(
        lambda: loaded(model),
        host=host,
        port=port,
        api_key=api_key,
        queue_size=queue_size,
        allowed_hosts=allowed_hosts,
        deadline=deadline,
        models=models,
        load_model=loaded,
        cpu_share=CpuShare() if auto_threads else None,
        lora_folder=lora_folder,
    )
    print(f"unnoise: serving {app.state.worker.pipe.name} on http://{host}:{port}/ (API docs at /docs)")
    # one line a request comes from our access log (security.Guard), with the duration; not uvicorn's
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level.lower(), access_log=False, limit_concurrency=256,
        timeout_graceful_shutdown=5,  # nothing waits for the queue: the stop cancels every job at once
    )  # fmt: skip
    StoppingServer(config, app.state.worker).run()


class StoppingServer(uvicorn.Server):
    """uvicorn's server that, on SIGTERM or Ctrl-C, first stops the worker: every queued or running job is
    cancelled at once, so each waiting client is answered 503 with Retry-After and each watcher gets its
    final event within the graceful shutdown, instead of being cut off with a cancelled task's 500."""

    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig, frame) -> None:
        if not self.worker.stopping.is_set():
            log.info("stopping: new jobs refused, every job cancelled")
        self.worker.stop()
        super().handle_exit(sig, frame)
