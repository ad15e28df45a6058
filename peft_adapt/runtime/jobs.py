"""What the batcher's worker is asked to do (generate, classify or tag, route) and how a generation job takes its tokens:
shared by both schedulers (whole requests, `batcher.py`; decode steps, `continuous.py`)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UserInputError
from .decoding import Sampling, TextStream

log = logging.getLogger("peft_adapt.batcher")


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
    texts: list  # texts; for tagging, texts or lists of words
    adapter: str | list[str]  # one for every text, or one per text
    emit: Callable[[str, object], None]  # ("result", [dicts]) | ("error", exception)
    kind: str = "classify"  # the runtime's method: classify (a label per text) or tag (a tag per word)

    def adapters(self) -> list[str]:
        return [self.adapter] * len(self.texts) if isinstance(self.adapter, str) else list(self.adapter)


@dataclass
class RouteJob:
    """Route inputs (texts or token ids) with a router selector (`auto`, `auto:TAG`, ...) in the worker's thread,
    which owns the model; the request then runs as one naming the chosen adapters."""

    inputs: list
    selector: str
    emit: Callable[[str, object], None]  # ("routes", [Route]) | ("error", exception)


def advance(job: GenerationJob, token: int | None, eos_token_id: int | None) -> bool:
    """Give the job its next token; True once it is done (EOS, its limit, a stop sequence, or the row ended).
    A cancelled job is the caller's to check first."""
    if token is None:
        finish(job, "stop")
        return True
    job.generated += 1
    job.tokens.append(token)
    eos = token == eos_token_id
    piece = "" if eos else job.text.add(token)
    if piece:
        job.emit("text", (piece, job.generated))
    if eos or job.text.stopped:
        finish(job, "stop")
        return True
    if job.generated >= job.sampling.max_new_tokens:
        finish(job, "length")
        return True
    return False


def finish(job: GenerationJob, reason: str) -> None:
    rest = job.text.finish() if job.text is not None else ""
    if rest:
        job.emit("text", (rest, job.generated))
    job.emit("done", (reason, job.generated))


def log_unexpected(exc: Exception, what: str) -> None:
    """A bad request is the client's to hear about; anything else goes to the server's log with its traceback."""
    if not isinstance(exc, UserInputError):
        log.error("%s: %s", what, exc, exc_info=exc)
