"""What every route needs of the worker: submitting a job, waiting for it without holding a thread,
turning its outcome into an answer, and the model's name as AUTOMATIC1111 writes it."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import HTTPException, Request

from ..pipeline import Pipeline
from .jobs import Job, QueueFullError, Worker, log
from .requests import b64, parameters_of

POLL_SECONDS = 0.05  # how often a waiting request looks at its job


class Service:
    def __init__(self, worker: Worker, pipe: Pipeline):
        self.worker, self.pipe = worker, pipe

    def submit(self, job: Job) -> Job:
        """The job, queued; a full queue is a 429 with Retry-After."""
        try:
            return self.worker.submit(job)
        except QueueFullError as full:
            raise HTTPException(429, str(full), headers={"Retry-After": str(full.retry_after)}) from None

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

    @staticmethod
    def result(job: Job) -> list[bytes]:
        """A finished job's PNGs, or the error it ended with: 422 the request's, 500 ours, 409 cancelled."""
        if job.state == "failed":
            status = 503 if job.timed_out else 500 if job.internal else 422
            headers = {"Retry-After": "30"} if job.timed_out else None
            raise HTTPException(status, job.error or "the job failed", headers=headers)
        if job.state == "cancelled":
            raise HTTPException(409, "the job was interrupted")
        return job.images

    def job(self, job_id: str) -> Job:
        job = self.worker.get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @staticmethod
    def view(job: Job) -> dict[str, Any]:
        view = job.summary()
        view["images"] = [b64(png) for png in job.images]
        view["parameters"] = [parameters_of(png) for png in job.images]
        return view

    def model_title(self) -> str:
        """As AUTOMATIC1111 titles a model: "name [hash]"."""
        pipe = self.pipe
        return f"{pipe.name} [{pipe.model_hash}]" if pipe.model_hash else pipe.name
