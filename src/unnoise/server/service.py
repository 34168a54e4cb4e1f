"""What every route needs of the worker: submitting a job, waiting for it without holding a thread,
turning its outcome into an answer, the model being served and the models it may switch to."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import HTTPException, Request

from ..errors import UnnoiseError
from ..pipeline import Pipeline
from ..release import cached_sha256, read_release_config, sha256, weights_path
from ..stable_diffusion import is_diffusers_folder, weights_file
from .jobs import STOPPING, Job, QueueFullError, ServerStoppingError, Worker, log
from .requests import b64, parameters_of
from .security import note_job

STOP_RETRY_AFTER = "10"  # seconds: about a restart's time

POLL_SECONDS = 0.05  # how often a waiting request looks at its job


class Service:
    def __init__(self, worker: Worker, models: dict[str, Path], load: Callable[[Path], Pipeline]):
        """`models`: the released models clients may switch to, by name; `load` loads one of them."""
        self.worker, self.models, self.load = worker, models, load
        self.digests: dict[Path, str] = {}  # weights file -> SHA-256, for releases whose config has none
        self.lora_folder: Path | None = None  # where prompts' <lora:NAME:WEIGHT> are found (--lora-dir)

    @property
    def pipe(self) -> Pipeline:
        """The model serving now (a switch changes it between two jobs)."""
        return self.worker.pipe

    def names(self) -> list[str]:
        """Every model a client may ask for: the one serving now first."""
        return list(dict.fromkeys([self.pipe.name, *sorted(self.models)]))

    def digest_of(self, name: str) -> str:
        """A model's full SHA-256 of its weights, as AUTOMATIC1111 lists it: from its config.json, or for a
        release without one computed from the weights file once; '' when unknown (a damaged release is
        listed, and refused when switched to). The model serving now is known by its short hash, which its
        catalogued release must begin with."""
        folder = self.models.get(name)
        try:
            if folder and is_diffusers_folder(folder):
                weights = weights_file(folder)
                return cached_sha256(weights) if weights else ""
            config = read_release_config(folder) if folder else {}
            digest = config.get("weights_sha256", "")
            digest = digest if isinstance(digest, str) else ""
            if folder and not digest:
                digest = self.computed_digest(weights_path(folder, config))
        except (UnnoiseError, OSError):
            digest = ""
        if name == self.pipe.name and not digest.startswith(self.pipe.model_hash):
            return ""  # a catalogued release of the same name that is not the one serving
        return digest

    def computed_digest(self, weights: Path) -> str:
        if weights not in self.digests:
            self.digests[weights] = sha256(weights)
        return self.digests[weights]

    def short_hash(self, name: str, digest: str) -> str:
        """AUTOMATIC1111's short hash: the first 10 hex digits of the weights' SHA-256."""
        return (self.pipe.model_hash if name == self.pipe.name else "") or digest[:10]

    def catalogue(self) -> list[tuple[str, str, str]]:
        """(name, short hash, SHA-256) of every model a client may ask for; each config.json is read once.
        It reads files: call it off the event loop."""
        named = [(name, self.digest_of(name)) for name in self.names()]
        return [(name, self.short_hash(name, digest), digest) for name, digest in named]

    @staticmethod
    def titled(name: str, digest: str) -> str:
        """As AUTOMATIC1111 titles a model: "name [hash]"."""
        return f"{name} [{digest}]" if digest else name

    def model_named(self, wanted: str) -> str:
        """The catalogued name a client's model name or title ("name [hash]") means; 422 if none."""
        for name, short, _ in self.catalogue():
            if wanted in (name, self.titled(name, short)):
                return name
        known = ", ".join(self.names())
        raise HTTPException(422, f"no model {wanted!r} here; this server has: {known}")

    async def switch(self, name: str, request: Request) -> None:
        """Serve model `name` from the next job on (waits for the jobs queued before the switch)."""
        if name == self.pipe.name:
            return
        switch = self.worker.switch_job(lambda: self.load(self.models[name]), name)
        self.result(await self.finished(self.submit(switch, request), request))

    def submit(self, job: Job, request: Request) -> Job:
        """The job, queued (and named on the request's access line); a full queue is a 429 with
        Retry-After."""
        try:
            self.worker.submit(job)
        except QueueFullError as full:
            raise HTTPException(429, str(full), headers={"Retry-After": str(full.retry_after)}) from None
        except ServerStoppingError as stopping:
            raise HTTPException(503, str(stopping), headers={"Retry-After": STOP_RETRY_AFTER}) from None
        note_job(request.scope, job.id)
        return job

    async def finished(self, job: Job, request: Request) -> Job:
        """The job once it ends, waited for on the event loop (a waiting client holds no thread). A client
        that hangs up cancels its job: nobody would receive the images."""
        while not job.ended.is_set():
            await asyncio.sleep(POLL_SECONDS)
            if job.state in ("queued", "running") and await request.is_disconnected():
                self.worker.cancel(job)
                log.info("job %s cancelled: its client disconnected", job.id)
        return job

    async def changed(self, job: Job, version: int, timeout: float) -> int:
        """The job's version once it passes `version` (or after `timeout` s), waited for on the event loop:
        a watcher holds no thread (60 watchers on one job made the page wait 16 s when each held one)."""
        waited = 0.0
        while job.version == version and waited < timeout:
            await asyncio.sleep(POLL_SECONDS)
            waited += POLL_SECONDS
        return job.version

    def result(self, job: Job) -> list[bytes]:
        """A finished job's PNGs, or the error it ended with: 422 the request's, 500 ours, 409 cancelled,
        503 with Retry-After when the server's stop cancelled it."""
        if job.state == "failed":
            status = 503 if job.timed_out else 500 if job.internal else 422
            headers = {"Retry-After": "30"} if job.timed_out else None
            raise HTTPException(status, job.error or "the job failed", headers=headers)
        if job.state == "cancelled" and self.worker.stopping.is_set():
            raise HTTPException(503, STOPPING, headers={"Retry-After": STOP_RETRY_AFTER})
        if job.state == "cancelled":
            raise HTTPException(409, "the job was interrupted")
        return job.images

    def job(self, job_id: str, token: str | None, request: Request) -> Job:
        """The job, for its owner: the token its submission answered. Another client gets the 404 of a job
        that does not exist, so ids cannot be probed."""
        job = self.worker.get(job_id)
        if job is None or not hmac.compare_digest(job.token.encode(), (token or "").encode()):
            raise HTTPException(404, f"no job {job_id!r} with this X-Job-Token (the one POST /jobs answered)")
        note_job(request.scope, job.id)
        return job

    @staticmethod
    def view(job: Job) -> dict[str, Any]:
        view = job.summary()
        view["images"] = [b64(png) for png in job.images]
        view["parameters"] = [parameters_of(png) for png in job.images]
        return view
