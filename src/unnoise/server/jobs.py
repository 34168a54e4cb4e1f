"""Jobs: one worker thread runs the model; requests wait in a bounded queue; anyone may watch a job.

A job is one call of the pipeline (generate, edit or inpaint), or a switch to another model, which runs in
its turn: the jobs queued before it use the old model, those after it the new one. The worker reports each
sampler step to the job (step, total, a PNG preview of the current x0_hat), checks for cancellation at every
step, and keeps the finished images as PNG bytes with their parameters. Watchers wait on the job's version
number, which grows with every change, so several clients can follow one job without missing its end.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from ..errors import UnnoiseError
from ..images import png_bytes
from ..pipeline import Pipeline, StopSamplingError
from ..threads import CpuShare

State = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED: tuple[State, ...] = ("done", "failed", "cancelled")


log = logging.getLogger("unnoise.server")
INTERNAL_ERROR = "internal error (the server's log has the details)"


STOPPING = "the server is stopping; try again in a moment (or at another server)"


class ServerStoppingError(Exception):
    """A job submitted while the server stops."""


class CancelledError(Exception):
    """Raised inside the sampler's callback to stop a job at the next step."""


class DeadlineError(Exception):
    """Raised inside the sampler's callback when a job has outlived the server's deadline."""


DEFAULT_DEADLINE = 300.0  # seconds; under a competing CPU-bound process a job may slow down many times


class QueueFullError(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    kind: Literal["generate", "edit", "inpaint", "load"]
    # call(pipe, callback): the Pipeline method with its arguments; None once finished, so a finished job
    # keeps no decoded input images (a large img2img held about 10 MB per kept job)
    call: Callable[..., list[Image.Image]] | None
    total_steps: int  # sampler steps expected (for progress; the sampler may report a few more)
    seed: int  # of the first image
    notes: dict[str, str] = field(default_factory=dict)  # what the client should know: "size", "interrupted"
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    # the owner's proof: /jobs answers it to the submitter only, and asks for it to show or cancel the job
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    state: State = "queued"
    step: int = 0
    preview: bytes | None = None  # PNG of the current x0_hat of the first image
    images: list[bytes] = field(default_factory=list)
    error: str | None = None
    internal: bool = False  # the failure was a bug of ours, not the request's mistake
    timed_out: bool = False  # it outlived the server's deadline
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    version: int = 0
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    interrupt_requested: threading.Event = field(default_factory=threading.Event)  # A1111: keep what is there
    ended: threading.Event = field(default_factory=threading.Event)  # set once the job is finished
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        return min(0.99, self.step / max(1, self.total_steps))

    def eta(self) -> float | None:
        """Seconds left, from the pace so far (None before the first step)."""
        if self.state != "running" or not self.step or self.started is None:
            return None
        elapsed = time.time() - self.started
        return max(0.0, elapsed / self.step * (self.total_steps - self.step))

    def update(self, **values) -> None:
        with self.changed:
            for name, value in values.items():
                setattr(self, name, value)
            self.version += 1
            self.changed.notify_all()
        if self.state in FINISHED:
            self.ended.set()

    def drop_call(self) -> None:
        """Let go of the bound call, and with it the decoded input images (about 10 MB for a large img2img):
        a job ended, however it ended, keeps only its results."""
        self.call = None

    def wait_for_change(self, version: int, timeout: float) -> int:
        """Block until the job's version passes `version` (or `timeout` seconds); returns the version."""
        with self.changed:
            self.changed.wait_for(lambda: self.version != version, timeout=timeout)
            return self.version

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "step": self.step,
            "total_steps": self.total_steps,
            "progress": round(self.progress, 4),
            "eta_seconds": self.eta(),
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "images": len(self.images),
            "notes": self.notes,
        }


class Worker:
    """Runs jobs one at a time on a thread; at most `queue_size` wait; the last `keep` jobs are kept."""

    def __init__(
        self,
        model: Pipeline | Callable[[], Pipeline],
        *,
        queue_size: int = 16,
        keep: int = 256,
        deadline: float = DEFAULT_DEADLINE,
        cpu_share: CpuShare | None = None,
    ):
        """`model` is a loaded Pipeline, or a function that loads one, which then runs on the worker's
        thread: PyTorch's CPU kernels run about 2x slower in a thread when another thread has run them
        too (two OpenMP thread pools on the cores), so the server keeps every tensor op on this thread."""
        self.pipe: Pipeline | None = model if isinstance(model, Pipeline) else None
        self.load = None if self.pipe is not None else model
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.waiting: queue.Queue[Job] = queue.Queue()  # bounded by counting the jobs still queued
        self.queue_size = queue_size
        self.deadline = deadline  # seconds from a job's submission to its end, queue included
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.keep = keep
        self.current: Job | None = None
        self.lock = threading.Lock()
        self.seconds_per_job = 1.0  # running mean, for Retry-After
        self.stopping = threading.Event()  # a planned stop (SIGTERM): no new job, every job cancelled
        self.cpu_share = cpu_share  # None: PyTorch's thread count as it is
        self.thread = threading.Thread(target=self._loop, name="unnoise-worker", daemon=True)
        self.thread.start()

    def wait_ready(self) -> Pipeline:
        """The pipeline, once the worker has loaded it; the loading error, raised here, if it failed."""
        self.ready.wait()
        if self.pipe is None:
            raise UnnoiseError(self.load_error or "the model could not be loaded")
        return self.pipe

    def submit(self, job: Job) -> Job:
        if self.stopping.is_set():
            raise ServerStoppingError(STOPPING)
        with self.lock:
            queued = self.queue_length()  # cancelled jobs still in the queue hold no place
            if queued >= self.queue_size:
                raise QueueFullError(max(1, round(self.seconds_per_job * queued)))
            self.waiting.put_nowait(job)
            self.jobs[job.id] = job
            while len(self.jobs) > self.keep:
                oldest = next(iter(self.jobs.values()))
                if oldest.state not in FINISHED:
                    break
                self.jobs.popitem(last=False)
        return job

    def get(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    def cancel(self, job: Job) -> None:
        """A queued job is cancelled at once, and lets go of its inputs; a running one at its next step."""
        job.cancel_requested.set()
        with self.lock:  # the worker starts a job under the lock: a job here is queued or running
            if job.state == "queued":
                job.update(state="cancelled", finished=time.time())
                job.drop_call()

    def close(self) -> None:
        """Cancel every job not yet finished (the server is stopping)."""
        for job in list(self.jobs.values()):
            if job.state not in FINISHED:
                self.cancel(job)

    def stop(self) -> None:
        """A planned stop: refuse new jobs and cancel the others, so that every waiting client is answered
        (503) and every watcher gets its final event while the server still sends them."""
        self.stopping.set()
        for job in list(self.jobs.values()):
            if job.state not in FINISHED:
                job.error = STOPPING  # what the watchers' final `cancelled` event says
        self.close()

    def queue_length(self) -> int:
        return sum(1 for job in list(self.jobs.values()) if job.state == "queued")

    def switch_job(self, load: Callable[[], Pipeline], name: str) -> Job:
        """A job that switches to the model `load` returns when its turn comes (submit it); a load that fails
        leaves the current model serving."""

        def install(_current: Pipeline, _callback) -> list[Image.Image]:
            self.pipe = load()
            log.info("now serving %s", self.pipe.name)
            return []

        return Job("load", install, total_steps=0, seed=0, notes={"model": name})

    def interrupt(self, job: Job) -> None:
        """AUTOMATIC1111's interrupt: the running job ends at its next step with what it has drawn."""
        job.interrupt_requested.set()

    def _loop(self) -> None:
        try:
            if self.load is not None:
                self.pipe = self.load()
        except Exception as error:  # reported by wait_ready on the caller's thread
            self.load_error = str(error)
            return
        finally:
            self.ready.set()
        while True:
            job = self.waiting.get()
            if not self._start(job):
                continue
            self.current = job
            try:
                self._run(job)
            finally:
                self.current = None

    def use_free_cores(self) -> None:
        """Before a job: as many threads as cores the other processes left free since the last job."""
        threads = self.cpu_share.threads()
        if threads != torch.get_num_threads():
            log.info("running on %d thread(s): other processes keep the other cores busy", threads)
            torch.set_num_threads(threads)

    def _start(self, job: Job) -> bool:
        """Mark a job taken from the queue running; False for one cancelled, or out of time, while it
        waited (a cancel finds the job either queued or running, never in between)."""
        with self.lock:
            if job.state != "queued":
                return False
            if self.past_deadline(job):  # it waited its whole deadline in the queue
                self.time_out(job)
                return False
            job.update(state="running", started=time.time())
            return True

    def _run(self, job: Job) -> None:
        if self.cpu_share is not None:
            self.use_free_cores()
        try:
            images = self._images(job)
        except CancelledError:
            job.update(state="cancelled", finished=time.time())
            return
        except DeadlineError:
            self.time_out(job)
            return
        except UnnoiseError as error:  # the request's mistake: the client gets the message
            job.update(state="failed", error=str(error), finished=time.time())
            return
        except Exception:  # a bug: logged for the operator, the worker goes on, the client gets a 500
            log.exception("job %s (%s) failed with an internal error", job.id, job.kind)
            job.update(state="failed", error=INTERNAL_ERROR, internal=True, finished=time.time())
            return
        finally:
            job.drop_call()
        job.update(state="done", images=[png_bytes(im) for im in images], finished=time.time())
        took = job.finished - job.started
        self.seconds_per_job = 0.8 * self.seconds_per_job + 0.2 * took

    def _images(self, job: Job) -> list[Image.Image]:
        """The job's images; an interrupted call finishes them from its x0 estimates (Pipeline's
        StopSamplingError), and the job notes where it stopped."""
        return job.call(self.pipe, self._reporter(job))

    def past_deadline(self, job: Job) -> bool:
        return time.time() - job.created > self.deadline

    def time_out(self, job: Job) -> None:
        job.update(state="failed", error=self.deadline_message(), timed_out=True, finished=time.time())
        job.drop_call()

    def deadline_message(self) -> str:
        return (
            f"the request took longer than the server's deadline of {self.deadline:g} s (the machine is busy:"
            " retry later, or ask for fewer steps or images)"
        )

    def _reporter(self, job: Job):
        def report(step) -> None:
            if job.cancel_requested.is_set():
                raise CancelledError
            if self.past_deadline(job):
                raise DeadlineError
            if job.interrupt_requested.is_set():
                stopped = f"step {job.step} of {job.total_steps}"
                job.notes["interrupted"] = f"at {stopped}: the images are finished from its x0 estimates"
                raise StopSamplingError(step.denoised, stopped)
            preview = png_bytes(self.pipe.preview(step.denoised))  # the first image's x0_hat, decoded
            job.update(step=job.step + 1, preview=preview)

        return report
