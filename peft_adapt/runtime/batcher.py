"""Dynamic batching: requests that arrive within a short window, whatever their adapters, run as one
mixed batch through the runtime; each request gets its own text back as it is generated.

One worker thread owns the runtime: every tokenizer call and forward pass happens there, never on a
server's event loop. Requests wait in a bounded queue (a full queue is refused at once, so callers can
answer 429). Generation jobs share a batch whatever their sampling: each row samples with its own settings
and its own seeded generator, and keeps its own `max_tokens` and stop sequences (the batch runs to the
longest, rows stop at their own limit, EOS or stop sequence). Classification jobs are batched the same way.
Before each batch the runtime is told of registry changes made by any process (a name now meaning another
version, or nothing).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UserInputError
from ..faults import delay_point, fault_point
from .decoding import Sampling, TextStream

log = logging.getLogger("peft_adapt.batcher")


class QueueFull(Exception):
    """The request queue is at its bound; try again later."""


@dataclass
class GenerationJob:
    prompt: list[int]  # token ids
    adapter: str | None
    sampling: Sampling  # max_new_tokens is this job's own limit
    emit: Callable[[str, object], None]  # ("text", (piece, tokens so far)) | ("done", reason) | ("error", exc)
    stops: list[str] = field(default_factory=list)
    cancelled: bool = False  # set by the caller (the client went away)
    generated: int = 0
    tokens: list[int] = field(default_factory=list)  # what it generated (its logprobs are scored from these)
    text: TextStream | None = None


@dataclass
class ClassifyJob:
    texts: list[str]
    adapter: str | list[str]  # one for every text, or one per text
    emit: Callable[[str, object], None]  # ("result", [dicts]) | ("error", exception)

    def adapters(self) -> list[str]:
        return [self.adapter] * len(self.texts) if isinstance(self.adapter, str) else list(self.adapter)


@dataclass
class RouteJob:
    """Route inputs (texts or token ids) with a router selector (`auto`, `auto:TAG`, ...) in the worker's thread,
    which owns the model; the request then runs as one naming the chosen adapters."""

    inputs: list
    selector: str
    emit: Callable[[str, object], None]  # ("routes", [Route]) | ("error", exception)


class DynamicBatcher:
    def __init__(self, runtime, max_batch: int = 32, window_seconds: float = 0.01, max_queue: int = 256,
                 on_batch: Callable[[int], None] | None = None):
        self.runtime = runtime
        self.max_batch = max_batch
        self.window_seconds = window_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._on_batch = on_batch
        self._stop = threading.Event()
        self.cancelled = 0  # generations stopped because their client went away
        self._thread = threading.Thread(target=self._work, name="peft-adapt-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: GenerationJob | ClassifyJob | RouteJob) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the request queue is full ({self._queue.maxsize} waiting); retry shortly") from None

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = self._gather(first)
            try:
                self.runtime.sync_with_registry()
            except Exception as exc:  # an unreadable registry fails this batch, not the worker
                _log_unexpected(exc, "reading the registry failed")
                for job in jobs:
                    job.emit("error", exc)
                continue
            for job in jobs:
                if isinstance(job, RouteJob):
                    self._route(job)
            generation = [j for j in jobs if isinstance(j, GenerationJob) and not j.cancelled]
            if generation:  # one batch whatever each samples: every row has its own settings and seed
                self._generate(generation)
            classify = [j for j in jobs if isinstance(j, ClassifyJob)]
            if classify:
                self._classify(classify)

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
        jobs = self._with_resident_adapters(jobs)
        if not jobs:
            return
        if self._on_batch:
            self._on_batch(len(jobs))
        sampling = [j.sampling for j in jobs]
        for job in jobs:
            job.text = TextStream(self.runtime.tokenizer, job.stops)
        active = set(range(len(jobs)))
        try:
            fault_point("generation")
            stream = self.runtime.generate_stream([j.prompt for j in jobs], [j.adapter for j in jobs], sampling)
            for step in stream:
                delay_point("decode_step")
                for i in list(active):
                    if self._advance(jobs[i], step[i]):
                        active.discard(i)
                if not active:
                    stream.close()
                    break
            for i in active:
                _finish(jobs[i], "length")
        except Exception as exc:  # every waiting request hears of it; the worker keeps serving
            _log_unexpected(exc, "a generation batch failed")
            for i in active:
                jobs[i].emit("error", exc)

    def _route(self, job: RouteJob) -> None:
        try:
            job.emit("routes", self.runtime.route(job.inputs, job.selector))
        except Exception as exc:
            _log_unexpected(exc, "routing failed")
            job.emit("error", exc)

    def _advance(self, job: GenerationJob, token: int | None) -> bool:
        """Take the row's next token; True once the job is done (EOS, its limit, a stop sequence, or cancelled)."""
        if job.cancelled or token is None:
            if job.cancelled:
                self.cancelled += 1  # the client went away: its row stops here
            _finish(job, "stop")
            return True
        job.generated += 1
        job.tokens.append(token)
        eos = token == self.runtime.tokenizer.eos_token_id
        piece = "" if eos else job.text.add(token)
        if piece:
            job.emit("text", (piece, job.generated))
        if eos or job.text.stopped:
            _finish(job, "stop")
            return True
        if job.generated >= job.sampling.max_new_tokens:
            _finish(job, "length")
            return True
        return False

    def _with_resident_adapters(self, jobs: list) -> list:
        """Load each distinct adapter first; a job whose adapter fails to load fails alone."""
        failed = {}
        names = {n for j in jobs for n in (j.adapters() if isinstance(j, ClassifyJob) else [j.adapter])}
        for name in {n for n in names if n is not None}:
            try:
                self.runtime.ensure_resident(name)
            except Exception as exc:
                _log_unexpected(exc, f"loading adapter {name!r} failed")
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

    def _classify(self, jobs: list[ClassifyJob]) -> None:
        jobs = self._with_resident_adapters(jobs)
        if not jobs:
            return
        if self._on_batch:
            self._on_batch(len(jobs))
        texts = [t for j in jobs for t in j.texts]
        adapters = [n for j in jobs for n in j.adapters()]
        try:
            results = self.runtime.classify(texts, adapters)
        except Exception as exc:
            _log_unexpected(exc, "a classification batch failed")
            for j in jobs:
                j.emit("error", exc)
            return
        start = 0
        for j in jobs:
            j.emit("result", results[start : start + len(j.texts)])
            start += len(j.texts)


def _finish(job: GenerationJob, reason: str) -> None:
    rest = job.text.finish() if job.text is not None else ""
    if rest:
        job.emit("text", (rest, job.generated))
    job.emit("done", (reason, job.generated))


def _log_unexpected(exc: Exception, what: str) -> None:
    """A bad request is the client's to hear about; anything else goes to the server's log with its traceback."""
    if not isinstance(exc, UserInputError):
        log.error("%s: %s", what, exc, exc_info=exc)
