"""The server's engines, shared safely: a bounded queue, one worker thread, micro-batches, cancellation, progress.

A Pipeline is not thread-safe, and the CPU's cores are one pool, so one thread runs every model's jobs in turn; the
event loop only queues and waits. Jobs for the same model that differ only in their seeds (same prompt, sampler, steps,
size, guidance: text-to-image) are merged into one engine batch when the engine was exported with a batch above 1, and
their images split back by job. Jobs for different models are never merged.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from sdfast.errors import SdfastError, StopSampling
from sdfast.runtime.pipeline import GenerationRequest, GenerationResult, Pipeline


class QueueFull(Exception):
    """The bounded queue is full: the caller answers 429 with Retry-After."""

    def __init__(self, retry_after_s: int):
        super().__init__("the queue is full")
        self.retry_after_s = retry_after_s


class Cancelled(Exception):
    """A job stopped before it finished: interrupted, timed out, its client gone, or the server shutting down."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False)  # jobs are compared by identity: their requests hold arrays
class Job:
    pipeline: Pipeline  # the model that runs it
    request: GenerationRequest  # with explicit seeds, one per image
    images: int
    id: int = field(default_factory=itertools.count(1).__next__)
    created: float = field(default_factory=time.monotonic)
    cancelled: str | None = None  # the reason, once cancelled (an error for its client)
    interrupted: bool = False  # A1111's interrupt: sampling stops and the images so far are the answer
    future: asyncio.Future | None = None
    finished: asyncio.Future | None = None  # done once the engine thread is done with the job (or it left the queue)
    step: int = 0
    total_steps: int = 0
    members: list["Job"] = field(default_factory=list)  # the jobs sharing this one's engine batch (it included)
    latest: tuple[int, np.ndarray] | None = None  # (step, its x0 estimate [B, C, h, w]): the live preview's source, one store

    def merge_key(self) -> tuple | None:
        """Jobs with equal keys can share one engine batch (only their seeds differ); None: never merged."""
        r = self.request
        if r.init_image is not None or r.init_latents is not None or r.mask is not None or r.control:  # images (init, mask, control) are not compared
            return None
        # the prompt carries its <lora:...> tags: jobs with other LoRAs (other weights) are never merged
        return (id(self.pipeline), r.width, r.height, r.prompt, r.negative_prompt, r.steps, float(r.cfg_scale), r.sampler, r.clip_skip, float(r.eta), r.n_iter, r.refiner_switch,
                tuple(r.loras), r.hires, r.step_cache, r.guidance_stop, r.vae_decoder, r.int8)


@dataclass
class Stats:
    """What /metrics and /sdapi/v1/progress read; updated by the worker thread, read by the event loop."""

    queued: int = 0
    in_flight: int = 0
    batches: int = 0
    merged_jobs: int = 0
    current: Job | None = None
    current_started: float = 0.0
    interrupted: bool = False  # A1111's state.interrupted: set by an interrupt, cleared when the next batch starts


class Worker:
    """Owns the pipeline. ``submit`` returns the job's images, or raises QueueFull, Cancelled or SdfastError."""

    def __init__(self, max_queue: int, observe_stage=None):
        self.max_queue = max_queue
        self.stats = Stats()
        self.observe_stage = observe_stage or (lambda stage, seconds: None)
        self._pending: list[Job] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sdfast-engine", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recent_seconds: list[float] = []

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    # -- the event loop's side ---------------------------------------------------------------------------------

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the recent job time times the queue ahead, at least 1."""
        typical = float(np.median(self._recent_seconds)) if self._recent_seconds else 1.0
        return max(1, int(np.ceil(typical * (len(self._pending) + 1))))

    def preview(self) -> tuple[int, np.ndarray] | None:
        """(step, the running job's first image as A1111's "Approx cheap" live preview [h, w, 3] uint8), or None."""
        from sdfast.runtime.families import family_class
        from sdfast.runtime.previews import approx_cheap

        job = self.stats.current
        latest = job.latest if job is not None else None  # one read: the step and its estimate belong together
        if latest is None:
            return None
        step, x0 = latest
        return step, approx_cheap(x0[0], family_class(job.pipeline.manifest.family).preview_rgb)

    async def submit(self, pipeline: Pipeline, request: GenerationRequest, images: int, timeout_s: float,
                     disconnected=None, track=None) -> list[GenerationResult]:
        """``track(future)``, if given, gets a future that is done once the engine thread no longer uses the job's
        pipeline: it may run on to its next step after its request was cancelled or timed out."""
        job = Job(pipeline, request, images)
        job.future, job.finished = self._loop.create_future(), self._loop.create_future()
        if track is not None:
            track(job.finished)
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # read, so an abandoned one is not logged
        with self._lock:
            if self._stopping:
                self._finish(job)
                raise Cancelled("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                self._finish(job)
                raise QueueFull(self.retry_after())
            self._pending.append(job)
            self.stats.queued = len(self._pending)
        self._wake.set()
        watcher = asyncio.ensure_future(self._watch(job, disconnected)) if disconnected else None
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout=timeout_s)
        except asyncio.TimeoutError:
            self.cancel(job, f"timed out after {timeout_s:g} s")
            raise Cancelled(f"timed out after {timeout_s:g} s") from None
        except asyncio.CancelledError:
            self.cancel(job, "the request was cancelled")
            raise
        finally:
            if watcher:
                watcher.cancel()

    async def _watch(self, job: Job, disconnected) -> None:
        while not job.future.done():
            if await disconnected():
                self.cancel(job, "the client disconnected")
                return
            await asyncio.sleep(0.25)

    def cancel(self, job: Job, reason: str) -> None:
        """Stop ``job``: dropped from the queue, or stopped at its next step if running."""
        with self._lock:
            job.cancelled = job.cancelled or reason
            if job in self._pending:
                self._pending.remove(job)
                self.stats.queued = len(self._pending)
                self._resolve(job, exception=Cancelled(reason))
                self._finish(job)

    def interrupt(self) -> bool:
        """A1111's interrupt, global as there: every job of the running engine batch stops at its next step and gets the
        images decoded so far. Queued jobs are left alone. True when something was running."""
        self.stats.interrupted = True
        running = self._running()
        for job in running:
            job.interrupted = True
        return bool(running)

    def _running(self) -> list[Job]:
        current = self.stats.current
        return [] if current is None else (current.members or [current])

    def stop(self, grace_s: float) -> None:
        """Refuse new jobs, cancel the queued ones, give the running one ``grace_s`` to finish, then cancel it."""
        with self._lock:
            self._stopping = True
            for job in list(self._pending):
                job.cancelled = "the server is shutting down"
                self._resolve(job, exception=Cancelled(job.cancelled))
                self._finish(job)
            self._pending.clear()
            self.stats.queued = 0
        self._wake.set()
        self._thread.join(timeout=grace_s)
        if self._thread.is_alive():
            for job in self._running():  # an error for its clients (503), not an interrupt's partial images
                self.cancel(job, "the server is shutting down")
            self._thread.join(timeout=30)

    # -- the worker thread ------------------------------------------------------------------------------------

    def _resolve(self, job: Job, result=None, exception: BaseException | None = None) -> None:
        def settle():
            if not job.future.done():
                job.future.set_exception(exception) if exception else job.future.set_result(result)

        self._loop.call_soon_threadsafe(settle)

    def _finish(self, job: Job) -> None:
        """The engine thread is done with ``job`` (any thread may call this)."""
        self._loop.call_soon_threadsafe(lambda: job.finished.done() or job.finished.set_result(None))

    def _take(self) -> list[Job]:
        """The next job and the queued jobs it can share an engine batch with."""
        with self._lock:
            if not self._pending:
                return []
            first = self._pending.pop(0)
            batch, room = [first], first.pipeline.batch_size - first.images
            key = first.merge_key()
            if key is not None and first.request.n_iter == 1:
                for job in list(self._pending):
                    if room <= 0:
                        break
                    if job.merge_key() == key and job.images <= room:
                        self._pending.remove(job)
                        batch.append(job)
                        room -= job.images
            self.stats.queued = len(self._pending)
            return batch

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        log = logging.getLogger("sdfast.serve")
        while True:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            try:
                while batch := self._take():
                    self._run_batch(batch)
            except Exception:  # noqa: BLE001 - the engine thread must outlive any one job's fault
                log.exception("sdfast serve: the engine worker caught an error and goes on")
            if self._stopping:
                return

    def _run_batch(self, batch: list[Job]) -> None:
        lead = batch[0]
        if len(batch) > 1:
            seeds = [seed for job in batch for seed in job.request.seeds]
            request = dataclasses.replace(lead.request, seeds=seeds, batch_size=len(seeds), n_iter=1)
            self.stats.merged_jobs += len(batch)
        else:
            request = lead.request
        lead.members = batch  # interrupt() stops every member
        lead.total_steps = request.steps * request.n_iter
        self.stats.current, self.stats.current_started = lead, time.monotonic()
        self.stats.in_flight, self.stats.interrupted = len(batch), False
        started = time.perf_counter()

        def on_step(done: int, total: int) -> None:
            lead.step, lead.total_steps = done, total
            if any(job.interrupted for job in batch):
                raise StopSampling("interrupted")  # the pipeline decodes this batch's x0 and runs no further batch
            stopped = next((job.cancelled for job in batch if job.cancelled), None)
            if stopped and all(job.cancelled for job in batch):
                raise Cancelled(stopped)

        def on_latents(x0: np.ndarray) -> None:  # before on_step counts the step: the preview is of step lead.step + 1
            lead.latest = (lead.step + 1, x0)

        try:
            if all(job.cancelled for job in batch):
                raise Cancelled(lead.cancelled)
            results = []
            try:
                for result in lead.pipeline.generate_batches(request, on_step=on_step, on_latents=on_latents):
                    results.append(result)
                    if any(job.interrupted for job in batch):
                        break  # interrupted while decoding: A1111 skips the rest of the batch count
            except StopSampling:
                pass  # stopped with no estimate to decode: the images so far are the answer
            self._observe(results)
            self._idle()  # before the answers go out: a client that polls /progress right after sees no job
            self._split(batch, results)
        except (Cancelled, SdfastError) as error:
            self._idle()
            for job in batch:
                self._resolve(job, exception=Cancelled(job.cancelled) if job.cancelled and isinstance(error, Cancelled) else error)
        except Exception as error:  # noqa: BLE001 - an engine fault fails the jobs, never the server
            self._idle()
            for job in batch:
                self._resolve(job, exception=RuntimeError(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"))
        finally:
            self.stats.batches += 1
            self._idle()
            for job in batch:
                self._finish(job)
            self._recent_seconds = (self._recent_seconds + [time.perf_counter() - started])[-20:]

    def _idle(self) -> None:
        self.stats.current, self.stats.in_flight = None, 0

    def _observe(self, results: list[GenerationResult]) -> None:
        for result in results:
            t = result.timings
            if t.text_encoder:
                self.observe_stage("text_encoder", t.text_encoder)
            if t.vae_encode:
                self.observe_stage("vae_encode", t.vae_encode)
            for step in t.unet_steps:
                self.observe_stage("unet_step", step)
            self.observe_stage("vae_decode", t.vae_decode)

    def _split(self, batch: list[Job], results: list[GenerationResult]) -> None:
        """Give each job its own images (in seed order; fewer when interrupted); a cancelled member gets its Cancelled."""
        images = [(results_index, row) for results_index, result in enumerate(results) for row in range(len(result.images))]
        first = 0
        for job in batch:
            mine = images[first : first + job.images]
            first += job.images
            if job.cancelled or not mine:
                self._resolve(job, exception=Cancelled(job.cancelled or "interrupted"))
                continue
            picked = [_one_image(results[i], row) for i, row in mine]
            self._resolve(job, result=picked)


def _one_image(result: GenerationResult, row: int) -> GenerationResult:
    return GenerationResult(result.images[row : row + 1], [result.seeds[row]], [result.parameters[row]], result.latents[row : row + 1],
                            result.timings, result.warnings, result.steps_run)
