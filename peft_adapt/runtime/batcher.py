"""Dynamic batching: requests of any adapters run as one mixed batch through the runtime; each request gets its
own text back as it is generated.

One worker thread owns the runtime: every tokenizer call and forward pass happens there, never on a server's event
loop. Requests wait in a bounded queue (a full queue is refused at once, so callers can answer 429). Generation is
scheduled one of two ways:
- `step` (the default): continuous batching (`continuous.py`): a request joins the running batch at the next decode
  step, its prompt read in chunks between steps, and leaves at its own end or when its client goes away;
- `request`: whole requests: those that arrive within a short window run as one batch to the longest one's end
  (each row samples with its own settings and seeded generator and stops at its own limit, EOS or stop sequence),
  and the next batch waits for it. Kept as the baseline `benchmarks/serve_load.py` measures against.
Classification jobs are batched per window. Before new work the runtime is told of registry changes made by any
process (a name now meaning another version, or nothing).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from ..errors import UserInputError
from ..faults import delay_point, fault_point
from .continuous import DEFAULT_KV_BUDGET, DEFAULT_PREFILL_CHUNK, ContinuousScheduler
from .decoding import TextStream
from .jobs import ClassifyJob, GenerationJob, RouteJob, advance, finish, log_unexpected

__all__ = ["ClassifyJob", "DynamicBatcher", "GenerationJob", "QueueFull", "RouteJob", "SCHEDULERS"]

SCHEDULERS = ("step", "request")  # continuous batching (the default), or whole requests (the one before it)


class QueueFull(Exception):
    """The request queue is at its bound; try again later."""


class DynamicBatcher:
    def __init__(self, runtime, max_batch: int = 32, window_seconds: float = 0.01, max_queue: int = 256,
                 on_batch: Callable[[int], None] | None = None, scheduler: str = "step",
                 kv_budget: int = DEFAULT_KV_BUDGET, prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        if scheduler not in SCHEDULERS:
            raise UserInputError(f"scheduler {scheduler!r} is not known; use {' or '.join(SCHEDULERS)}")
        self.runtime = runtime
        self.max_batch = max_batch
        self.window_seconds = window_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._on_batch = on_batch
        self._stop = threading.Event()
        self._cancelled = 0  # generations stopped because their client went away (whole-request scheduling)
        self.steps = ContinuousScheduler(runtime, max_batch, kv_budget, prefill_chunk, on_batch) \
            if scheduler == "step" and runtime.task == "causal_lm" else None
        self._thread = threading.Thread(target=self._work, name="peft-adapt-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: GenerationJob | ClassifyJob | RouteJob) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self._queue.maxsize} waiting); retry shortly") from None

    @property
    def waiting(self) -> int:
        return self._queue.qsize() + (len(self.steps.waiting) if self.steps else 0)

    @property
    def cancelled(self) -> int:
        return self._cancelled + (self.steps.cancelled if self.steps else 0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _work(self) -> None:
        while not self._stop.is_set():
            running = self.steps is not None and self.steps.busy()
            jobs = self._take(wait=not running)
            if jobs:
                self._start(jobs)
            if self.steps is not None and self.steps.busy():
                try:
                    self.steps.iterate()
                except Exception as exc:  # the scheduler's own failure: its rows hear of it, the worker goes on
                    log_unexpected(exc, "continuous batching failed")
                    self.steps.fail_all(exc)

    def _take(self, wait: bool) -> list:
        """New jobs: while nothing runs, the first to come and whatever else arrives within the window (up to
        max_batch); while rows are decoding, only what is already queued (the next step does not wait)."""
        if not wait:
            jobs = []
            # jobs stay in the bounded queue (a full one answers 429) until the scheduler has room to hold them
            room = self.max_batch - len(self.steps.waiting) if self.steps is not None else self.max_batch
            while len(jobs) < room:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            return jobs
        try:
            first = self._queue.get(timeout=0.1)
        except queue.Empty:
            return []
        return self._gather(first)

    def _start(self, jobs: list) -> None:
        try:
            self.runtime.sync_with_registry()
        except Exception as exc:  # an unreadable registry fails these jobs, not the worker
            log_unexpected(exc, "reading the registry failed")
            for job in jobs:
                job.emit("error", exc)
            return
        for job in jobs:
            if isinstance(job, RouteJob):
                self._route(job)
        generation = [j for j in jobs if isinstance(j, GenerationJob) and not j.cancelled]
        if generation and self.steps is not None:
            self.steps.add(generation)
        elif generation:  # one batch whatever each samples: every row has its own settings and seed
            self._generate(generation)
        for kind in ("classify", "tag"):
            if same := [j for j in jobs if isinstance(j, ClassifyJob) and j.kind == kind]:
                self._classify(same, kind)

    def _gather(self, first) -> list:
        """The first job and whatever else arrives within the window, up to max_batch."""
        jobs = [first]
        deadline = time.monotonic() + self.window_seconds
        while len(jobs) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                jobs.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return jobs

    def _generate(self, jobs: list[GenerationJob]) -> None:
        """Whole-request scheduling: the jobs run as one batch to the longest one's end."""
        jobs = self._with_resident_adapters(jobs)
        if not jobs:
            return
        if self._on_batch:
            self._on_batch(len(jobs))
        sampling = [j.sampling for j in jobs]
        for job in jobs:
            job.text = TextStream(self.runtime.tokenizer, job.stops)
        active = set(range(len(jobs)))
        eos = self.runtime.tokenizer.eos_token_id
        try:
            fault_point("generation")
            stream = self.runtime.generate_stream([j.prompt for j in jobs], [j.adapter for j in jobs], sampling)
            for step in stream:
                delay_point("decode_step")
                for i in list(active):
                    if jobs[i].cancelled:  # the client went away: its row stops here
                        self._cancelled += 1
                        finish(jobs[i], "stop")
                        active.discard(i)
                    elif advance(jobs[i], step[i], eos):
                        active.discard(i)
                if not active:
                    stream.close()
                    break
            for i in active:
                finish(jobs[i], "length")
        except Exception as exc:  # every waiting request hears of it; the worker keeps serving
            log_unexpected(exc, "a generation batch failed")
            for i in active:
                jobs[i].emit("error", exc)

    def _route(self, job: RouteJob) -> None:
        try:
            job.emit("routes", self.runtime.route(job.inputs, job.selector))
        except Exception as exc:
            log_unexpected(exc, "routing failed")
            job.emit("error", exc)

    def _with_resident_adapters(self, jobs: list) -> list:
        """Load each distinct adapter first; a job whose adapter fails to load fails alone."""
        failed = {}
        names = {n for j in jobs for n in (j.adapters() if isinstance(j, ClassifyJob) else [j.adapter])}
        for name in {n for n in names if n is not None}:
            try:
                self.runtime.ensure_resident(name)
            except Exception as exc:
                log_unexpected(exc, f"loading adapter {name!r} failed")
                failed[name] = exc
        kept = []
        for job in jobs:
            wanted = job.adapters() if isinstance(job, ClassifyJob) else [job.adapter]
            broken = next((failed[n] for n in wanted if n in failed), None)
            if broken is not None:
                job.emit("error", broken)
            else:
                kept.append(job)
        return kept

    def _classify(self, jobs: list[ClassifyJob], kind: str) -> None:
        jobs = self._with_resident_adapters(jobs)
        if not jobs:
            return
        if self._on_batch:
            self._on_batch(len(jobs))
        texts = [t for j in jobs for t in j.texts]
        adapters = [n for j in jobs for n in j.adapters()]
        try:
            results = getattr(self.runtime, kind)(texts, adapters)
        except Exception as exc:
            log_unexpected(exc, f"a {kind} batch failed")
            for j in jobs:
                j.emit("error", exc)
            return
        start = 0
        for j in jobs:
            j.emit("result", results[start : start + len(j.texts)])
            start += len(j.texts)

