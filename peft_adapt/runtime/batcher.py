"""Dynamic batching: requests that arrive within a short window, whatever their adapters, run as one
mixed batch through the runtime; each request gets its own tokens back as they are generated.

One worker thread owns the runtime. Requests wait in a bounded queue (a full queue is refused at
once, so callers can answer 429). Generation jobs with the same sampling settings share a batch; each
job keeps its own `max_tokens` (the batch runs to the longest, rows stop at their own limit or EOS).
Classification jobs are batched the same way.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .decoding import Sampling

log = logging.getLogger("peft_adapt.batcher")


class QueueFull(Exception):
    """The request queue is at its bound; try again later."""


@dataclass
class GenerationJob:
    prompt: list[int]  # token ids
    adapter: str | None
    sampling: Sampling  # max_new_tokens is this job's own limit
    emit: Callable[[str, object], None]  # ("token", id) | ("done", finish_reason) | ("error", exception)
    cancelled: bool = False  # set by the caller (a stop sequence was reached, the client went away)
    generated: int = 0

    def group_key(self) -> tuple:
        s = self.sampling
        return (s.do_sample, s.temperature, s.top_p, s.top_k, s.seed)


@dataclass
class ClassifyJob:
    texts: list[str]
    adapter: str
    emit: Callable[[str, object], None]  # ("result", [dicts]) | ("error", exception)


@dataclass
class BatcherStats:
    batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class DynamicBatcher:
    def __init__(self, runtime, max_batch: int = 32, window_seconds: float = 0.01, max_queue: int = 256,
                 on_batch: Callable[[int], None] | None = None):
        self.runtime = runtime
        self.max_batch = max_batch
        self.window_seconds = window_seconds
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._on_batch = on_batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="peft-adapt-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: GenerationJob | ClassifyJob) -> None:
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
            generation = [j for j in jobs if isinstance(j, GenerationJob) and not j.cancelled]
            groups: dict[tuple, list[GenerationJob]] = {}
            for job in generation:
                groups.setdefault(job.group_key(), []).append(job)
            for group in groups.values():
                self._generate(group)
            classify = [j for j in jobs if isinstance(j, ClassifyJob)]
            if classify:
                self._classify(classify)

    def _generate(self, jobs: list[GenerationJob]) -> None:
        jobs = self._with_resident_adapters(jobs)
        if not jobs:
            return
        if self._on_batch:
            self._on_batch(len(jobs))
        first = jobs[0].sampling
        sampling = Sampling(
            max_new_tokens=max(j.sampling.max_new_tokens for j in jobs), do_sample=first.do_sample,
            temperature=first.temperature, top_p=first.top_p, top_k=first.top_k, seed=first.seed,
        )
        eos = self.runtime.tokenizer.eos_token_id
        active = set(range(len(jobs)))
        try:
            stream = self.runtime.generate_stream([j.prompt for j in jobs], [j.adapter for j in jobs], sampling)
            for step in stream:
                for i in list(active):
                    job, token = jobs[i], step[i]
                    if job.cancelled:
                        active.discard(i)
                        job.emit("done", "stop")
                        continue
                    if token is None:
                        active.discard(i)
                        job.emit("done", "stop")
                        continue
                    job.generated += 1
                    job.emit("token", token)
                    if token == eos:
                        active.discard(i)
                        job.emit("done", "stop")
                    elif job.generated >= job.sampling.max_new_tokens:
                        active.discard(i)
                        job.emit("done", "length")
                if not active:
                    stream.close()
                    break
            for i in active:
                jobs[i].emit("done", "length")
        except Exception as exc:  # every waiting request hears of it; the worker keeps serving
            _log_unexpected(exc, "a generation batch failed")
            for i in active:
                jobs[i].emit("error", exc)

    def _with_resident_adapters(self, jobs: list) -> list:
        """Load each distinct adapter first; a job whose adapter fails to load fails alone."""
        failed = {}
        for name in {j.adapter for j in jobs if j.adapter is not None}:
            try:
                self.runtime.ensure_resident(name)
            except Exception as exc:
                failed[name] = exc
        for job in jobs:
            if job.adapter in failed:
                job.emit("error", failed[job.adapter])
        return [j for j in jobs if j.adapter not in failed]

    def _classify(self, jobs: list[ClassifyJob]) -> None:
        jobs = self._with_resident_adapters(jobs)
        if not jobs:
            return
        if self._on_batch:
            self._on_batch(len(jobs))
        texts = [t for j in jobs for t in j.texts]
        adapters = [j.adapter for j in jobs for _ in j.texts]
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


def _log_unexpected(exc: Exception, what: str) -> None:
    """A bad request is the client's to hear about; anything else goes to the server's log with its traceback."""
    from ..errors import UserInputError

    if not isinstance(exc, UserInputError):
        log.error("%s: %s", what, exc, exc_info=exc)
