"""From the batcher's text events to OpenAI responses: one JSON body, or server-sent events as they come."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from ..data import render_chat
from ..errors import UserInputError
from ..runtime.batcher import GenerationJob, QueueFull, RouteJob
from ..runtime.decoding import Sampling
from .public import public_message
from .schemas import APIError

log = logging.getLogger("peft_adapt.server")


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation rendered as chat training renders it, ready for the assistant's turn."""
    return render_chat(tokenizer, messages, add_generation_prompt=True)


def as_api_error(exc: Exception, what: str) -> Exception:
    """A client's mistake passes through as a 400; anything else is logged with its traceback and becomes a 500."""
    if isinstance(exc, (UserInputError, APIError)):
        return exc
    log.error("%s: %s", what, exc, exc_info=exc)
    return APIError(500, what, "server_error")


def submit(batcher, job) -> None:
    try:
        batcher.submit(job)
    except QueueFull as exc:
        raise APIError(429, str(exc), "rate_limit_error", code="queue_full") from None


async def text_events(batcher, prompts: list[list[int]], adapter: str | None | list, sampling: Sampling,
                      stops: list[str], jobs_out: list | None = None) -> AsyncIterator[tuple[int, str, str | None, int]]:
    """Submit one job per prompt (`adapter`: one for all, or a list of one per prompt); yield (index, text piece,
    finish_reason or None, completion tokens) as they come."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    jobs = []
    adapters = adapter if isinstance(adapter, list) else [adapter] * len(prompts)
    for index, (prompt, name) in enumerate(zip(prompts, adapters)):
        def emit(kind, value, index=index):
            loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))
        jobs.append(GenerationJob(prompt, name, sampling, emit, stops=stops))
    if jobs_out is not None:
        jobs_out.extend(jobs)
    for job in jobs:
        submit(batcher, job)
    open_jobs = set(range(len(prompts)))
    try:
        while open_jobs:
            index, kind, value = await events.get()
            if index not in open_jobs:
                continue
            if kind == "error":
                raise as_api_error(value, "generation failed")
            if kind == "text":
                piece, count = value
                yield index, piece, None, count
            else:
                reason, count = value
                open_jobs.discard(index)
                yield index, "", reason, count
    finally:
        for job in jobs:  # a client that went away (or an error) stops every row of its request
            job.cancelled = True


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(kind: str, index: int, text: str, reason: str | None, streaming: bool) -> dict:
    if kind != "chat":
        return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
    if streaming:
        return {"index": index, "delta": {"content": text} if text else {}, "finish_reason": reason}
    return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
            "logprobs": None}


async def routed(batcher, inputs: list, selector: str) -> list:
    """The routes of `inputs`, computed in the batcher's thread (it owns the model)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    submit(batcher, RouteJob(inputs, selector, lambda kind, value: loop.call_soon_threadsafe(
        lambda: done.done() or done.set_result((kind, value)))))
    kind, value = await done
    if kind == "error":
        raise as_api_error(value, "routing failed")
    return value


async def respond(kind: str, model: str, prompts: list[list[int]], adapter: str | None | list, sampling: Sampling,
                  stops: list[str], stream: bool, batcher, headers: dict | None = None, private: dict | None = None,
                  request=None, finish=None, include_usage: bool = False):
    """The whole answer as one JSON body, or (stream) server-sent events. `finish(index, text, tokens)`, for a
    request that asked for `echo` or `logprobs`: awaited per choice, it gives the choice's text and logprobs."""
    request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    head = {"id": request_id, "created": created, "model": model}
    jobs: list = []
    events = text_events(batcher, prompts, adapter, sampling, stops, jobs)
    if not stream:
        texts, reasons, counts = [""] * len(prompts), [None] * len(prompts), [0] * len(prompts)

        async def collect():
            async for index, piece, reason, count in events:
                texts[index] += piece
                counts[index] = count
                reasons[index] = reason or reasons[index]

        await until_done_or_gone(collect(), request)
        choices = [_choice(kind, i, t, r, False) for i, (t, r) in enumerate(zip(texts, reasons))]
        if finish is not None:
            for i, choice in enumerate(choices):
                text, choice["logprobs"] = await finish(i, texts[i], jobs[i].tokens)
                if kind == "chat":
                    choice["message"]["content"] = text
                else:
                    choice["text"] = text
        body = head | {"object": "chat.completion" if kind == "chat" else "text_completion", "choices": choices,
                       "usage": usage(sum(len(p) for p in prompts), sum(counts))}
        return JSONResponse(body, headers=headers)
    first = await events.__anext__()  # errors before the first piece still get a status code
    return StreamingResponse(_sse_events(kind, head, first, events, private or {},
                                         sum(len(p) for p in prompts) if include_usage else None), media_type="text/event-stream", headers=headers)


async def until_done_or_gone(work, request, poll_s: float = 0.25) -> None:
    """Await `work`; if the client disconnects first, stop it (its jobs are cancelled in `text_events`' finally,
    so an abandoned generation no longer runs to its end holding the batcher) and answer nobody."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if request is not None and await request.is_disconnected():
                task.cancel()
                await asyncio.wait({task})  # the cancellation runs `text_events`' finally: its jobs stop
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


async def _sse_events(kind: str, head: dict, first, events, private: dict, prompt_tokens: int | None = None):
    """`prompt_tokens` (stream_options.include_usage): a last chunk carries the usage, with no choices."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    counts: dict[int, int] = {}
    if kind == "chat":
        yield _sse(head | {"object": obj, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                        "finish_reason": None}]})
    item = first
    while True:
        index, piece, reason, count = item
        counts[index] = count
        yield _sse(head | {"object": obj, "choices": [_choice(kind, index, piece, reason, True)]})
        try:
            item = await events.__anext__()
        except StopAsyncIteration:
            break
        except Exception as exc:  # the status line is gone: the error travels as an event, logged here
            error = as_api_error(exc, "generation failed")
            message = error.message if isinstance(error, APIError) else public_message(error, private)
            yield _sse({"error": {"message": message, "type": getattr(error, "kind", "invalid_request_error"),
                                  "param": None, "code": None}})
            break
    if prompt_tokens is not None:
        yield _sse(head | {"object": obj, "choices": [], "usage": usage(prompt_tokens, sum(counts.values()))})
    yield "data: [DONE]\n\n"


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
