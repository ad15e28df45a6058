"""`peft-adapt serve`: an OpenAI-compatible HTTP server over one base and every registered adapter.

The `model` field of a request names the adapter (or the base). Requests are batched across adapters by
`runtime.batcher.DynamicBatcher`; this module only parses, checks and formats. Errors come back in
OpenAI's shape (`{"error": {"message", "type", "param", "code"}}`), never as a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import UserInputError
from .runtime.batcher import ClassifyJob, DynamicBatcher, GenerationJob, QueueFull
from .runtime.decoding import Sampling

log = logging.getLogger("peft_adapt.server")

@dataclass
class ServerSettings:
    base_name: str
    api_key: str | None = None
    admin_key: str | None = None
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int | None = None  # default: the base's positions
    max_tokens: int = 512
    max_batch: int = 32
    batch_window_ms: float = 10.0
    max_queue: int = 256


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def error_body(status: int, message: str, kind: str, param=None, code=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# ---------------------------------------------------------------- request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use


class _GenerationBody(_Body):
    """What completions and chat completions share."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_GenerationBody):
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ClassifyRequest(_Body):
    model: str
    input: str | list[str]


class AdapterRequest(_Body):
    name: str
    pin: bool = False


# ---------------------------------------------------------------- the app


def create_app(runtime, registry, settings: ServerSettings) -> FastAPI:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
    from prometheus_client.core import GaugeMetricFamily

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        batcher.close()

    app = FastAPI(title="peft-adapt", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = CollectorRegistry()
    requests_total = Counter("peft_adapt_requests", "HTTP requests", ["endpoint", "status"], registry=metrics)
    latency = Histogram("peft_adapt_request_seconds", "request latency", ["endpoint"], registry=metrics)
    batch_sizes = Histogram("peft_adapt_batch_size", "requests per batch", registry=metrics,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))

    class RuntimeCollector:
        def collect(self):
            stats = runtime.stats()
            for key in ("hits", "misses", "evictions", "resident", "resident_adapter_bytes"):
                gauge = GaugeMetricFamily(f"peft_adapt_adapter_{key}", f"adapter residency: {key}")
                gauge.add_metric([], stats[key])
                yield gauge
            gauge = GaugeMetricFamily("peft_adapt_queue_waiting", "requests waiting for a batch")
            gauge.add_metric([], batcher.waiting)
            yield gauge

    metrics.register(RuntimeCollector())
    if settings.max_prompt_tokens is None:
        settings.max_prompt_tokens = runtime.max_positions
    elif settings.max_prompt_tokens > runtime.max_positions:
        log.warning("--max-prompt-tokens %d exceeds the %d positions of the base; using %d",
                    settings.max_prompt_tokens, runtime.max_positions, runtime.max_positions)
        settings.max_prompt_tokens = runtime.max_positions
    batcher = DynamicBatcher(runtime, settings.max_batch, settings.batch_window_ms / 1000, settings.max_queue,
                             on_batch=batch_sizes.observe)
    app.state.batcher = batcher
    base_names = {"base", settings.base_name}

    # -------------------------------------------------- cross-cutting: limits, keys, errors, metrics

    @app.middleware("http")
    async def guard(request: Request, call_next):
        started = time.perf_counter()
        endpoint = request.url.path
        try:
            length = int(request.headers.get("content-length") or 0)
        except ValueError:
            length = 0
        if length > settings.max_body_bytes:
            response = error_body(413, f"request body of {length} bytes exceeds the limit of {settings.max_body_bytes}",
                                  "invalid_request_error", code="body_too_large")
        else:
            try:
                response = await call_next(request)
            except Exception:  # never a traceback to the client; always one in the server's log
                log.exception("%s %s failed", request.method, endpoint)
                response = error_body(500, "internal server error", "server_error")
        requests_total.labels(endpoint, str(response.status_code)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_body(exc.status, exc.message, exc.kind, exc.param, exc.code)

    @app.exception_handler(UserInputError)
    async def bad_input(request: Request, exc: UserInputError):
        return error_body(400, str(exc), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        return error_body(400, f"{param or 'body'}: {first['msg']}", "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_body(exc.status_code, str(exc.detail), "invalid_request_error")

    def check_key(request: Request, admin: bool = False) -> None:
        expected = settings.admin_key if admin else settings.api_key
        if expected is None:
            if admin:
                raise APIError(403, "adapter management is disabled: start the server with --admin-key", "permission_error")
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), expected.encode()):
            kind = "admin key" if admin else "API key"
            raise APIError(401, f"missing or wrong {kind}: send 'Authorization: Bearer <key>'", "authentication_error",
                           code="invalid_api_key")

    def adapter_for(model: str) -> str | None:
        if model in base_names:
            return None
        if model in runtime.resident():
            return model
        try:
            registry.get(model)
            return model
        except UserInputError:
            known = sorted(base_names | set(runtime.resident()) | {e.name for e in registry.list()})
            raise APIError(404, f"the model {model!r} does not exist; available: {', '.join(known)}",
                           code="model_not_found", param="model") from None

    def tokens_of(text: str) -> list[int]:
        ids = runtime.tokenizer(text)["input_ids"]
        if len(ids) > settings.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the limit is {settings.max_prompt_tokens}",
                           param="prompt", code="context_length_exceeded")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    def sampling_of(max_tokens: int, temperature: float, top_p: float, seed: int | None, prompt_tokens: int) -> Sampling:
        if max_tokens > settings.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} exceeds the limit of {settings.max_tokens}", param="max_tokens")
        if prompt_tokens + max_tokens > runtime.max_positions:
            raise APIError(400, f"the prompt's {prompt_tokens} tokens plus max_tokens {max_tokens} exceed the "
                                f"{runtime.max_positions} positions of the base", param="max_tokens",
                           code="context_length_exceeded")
        return Sampling(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                        top_p=top_p, seed=seed)

    def submit(job) -> None:
        try:
            batcher.submit(job)
        except QueueFull as exc:
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full") from None

    # -------------------------------------------------- generation

    async def run_generation(prompts: list[list[int]], adapter: str | None, sampling: Sampling, stops: list[str]):
        """Submit one job per prompt; yield (index, text piece, finish_reason or None) as they come."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = []
        for index, prompt in enumerate(prompts):
            def emit(kind, value, index=index):
                loop.call_soon_threadsafe(events.put_nowait, (index, kind, value))
            jobs.append(GenerationJob(prompt, adapter, sampling, emit))
        for job in jobs:
            submit(job)
        tokens: list[list[int]] = [[] for _ in prompts]
        sent = [""] * len(prompts)
        open_jobs = set(range(len(prompts)))
        try:
            while open_jobs:
                index, kind, value = await events.get()
                if index not in open_jobs:
                    continue
                if kind == "error":
                    for job in jobs:
                        job.cancelled = True
                    raise _as_api_error(value, "generation failed")
                if kind == "token":
                    tokens[index].append(value)
                    text = runtime.tokenizer.decode(tokens[index], skip_special_tokens=True)
                    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
                    if cut >= 0:  # a stop sequence: end here, without it
                        jobs[index].cancelled = True
                        piece, sent[index] = text[len(sent[index]):cut], text[:cut]
                        open_jobs.discard(index)
                        yield index, piece, "stop", len(tokens[index])
                        continue
                    piece, sent[index] = text[len(sent[index]):], text
                    if piece:
                        yield index, piece, None, len(tokens[index])
                else:
                    open_jobs.discard(index)
                    yield index, "", value, len(tokens[index])
        finally:
            for job in jobs:  # a client that went away stops its rows
                job.cancelled = True

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def answer(kind: str, model: str, prompts: list[list[int]], adapter: str | None, sampling: Sampling,
                     stops: list[str], stream: bool):
        request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        prompt_tokens = sum(len(p) for p in prompts)
        if not stream:
            texts, reasons, counts = [""] * len(prompts), [None] * len(prompts), [0] * len(prompts)
            async for index, piece, reason, count in run_generation(prompts, adapter, sampling, stops):
                texts[index] += piece
                counts[index] = count
                reasons[index] = reason or reasons[index]
            if kind == "chat":
                choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r}
                           for i, (t, r) in enumerate(zip(texts, reasons))]
                obj = "chat.completion"
            else:
                choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                           for i, (t, r) in enumerate(zip(texts, reasons))]
                obj = "text_completion"
            return JSONResponse({"id": request_id, "object": obj, "created": created, "model": model,
                                 "choices": choices, "usage": usage(prompt_tokens, sum(counts))})

        generation = run_generation(prompts, adapter, sampling, stops)
        first = await generation.__anext__()  # errors before the first token still get a status code

        async def events():
            obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
            if kind == "chat":
                yield _sse({"id": request_id, "object": obj, "created": created, "model": model,
                            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            item = first
            while True:
                index, piece, reason, _ = item
                if kind == "chat":
                    delta = {"content": piece} if piece else {}
                    choice = {"index": index, "delta": delta, "finish_reason": reason}
                else:
                    choice = {"index": index, "text": piece, "finish_reason": reason, "logprobs": None}
                yield _sse({"id": request_id, "object": obj, "created": created, "model": model, "choices": [choice]})
                try:
                    item = await generation.__anext__()
                except StopAsyncIteration:
                    break
                except Exception:
                    yield _sse({"error": {"message": "generation failed", "type": "server_error", "param": None, "code": None}})
                    break
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def check_common(n: int, count: int) -> None:
        if n != 1:
            raise APIError(400, "n must be 1: send one request per completion", param="n")
        if count > settings.max_batch:
            raise APIError(400, f"{count} prompts in one request; the limit is {settings.max_batch}", param="prompt")
        if runtime.task != "causal_lm":
            raise APIError(400, "this server serves a classification base: use /v1/classify")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_key(request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        check_common(body.n, len(prompts))
        adapter = adapter_for(body.model)
        ids = [tokens_of(p) for p in prompts]
        sampling = sampling_of(body.max_tokens, body.temperature, body.top_p, body.seed, max(map(len, ids)))
        return await answer("completion", body.model, ids, adapter, sampling, body.stops, body.stream)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_key(request)
        check_common(body.n, 1)
        adapter = adapter_for(body.model)
        ids = [tokens_of(chat_prompt(runtime.tokenizer, [m.model_dump(include={"role", "content"}) for m in body.messages]))]
        max_tokens = body.max_completion_tokens or body.max_tokens or 256
        sampling = sampling_of(max_tokens, body.temperature, body.top_p, body.seed, len(ids[0]))
        return await answer("chat", body.model, ids, adapter, sampling, body.stops, body.stream)

    @app.post("/v1/classify")
    async def classify(body: ClassifyRequest, request: Request):
        check_key(request)
        if runtime.task != "classification":
            raise APIError(400, "this server serves a causal LM base: use /v1/completions")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts or len(texts) > settings.max_batch:
            raise APIError(400, f"input: give 1 to {settings.max_batch} texts", param="input")
        # texts are cut to the adapter's training max_length by the runtime, off the event loop
        adapter = adapter_for(body.model)
        if adapter is None:
            raise APIError(400, "classification needs an adapter: the base has no head", param="model")
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        submit(ClassifyJob(texts, adapter, lambda kind, value: loop.call_soon_threadsafe(
            lambda: done.done() or done.set_result((kind, value)))))
        kind, value = await done
        if kind == "error":
            raise _as_api_error(value, "classification failed")
        return {"object": "list", "model": body.model,
                "data": [{"index": i, **{k: r[k] for k in ("label", "label_id", "probs")}} for i, r in enumerate(value)]}

    # -------------------------------------------------- models, adapters, health, metrics

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        created = int(time.time())
        servable = {e.name for e in registry.list(base=runtime.backbone.fingerprint["id"]) if e.task == runtime.task}
        names = [settings.base_name] + sorted(set(runtime.resident()) | servable)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "peft-adapt",
                                            "resident": n in runtime.resident() or n == settings.base_name}
                                           for n in names]}

    @app.post("/v1/adapters/load")
    async def load_adapter(body: AdapterRequest, request: Request):
        check_key(request, admin=True)
        adapter_for(body.name)
        entry = await asyncio.to_thread(runtime.load, body.name, None, body.pin)
        return {"loaded": entry.name, "slot": entry.slot, "pinned": entry.pinned, "source": entry.source}

    @app.post("/v1/adapters/unload")
    async def unload_adapter(body: AdapterRequest, request: Request):
        check_key(request, admin=True)
        if body.name not in runtime.resident():
            raise APIError(404, f"adapter {body.name!r} is not resident; resident: {', '.join(runtime.resident()) or 'none'}",
                           param="name", code="model_not_found")
        await asyncio.to_thread(runtime.unload, body.name)
        return {"unloaded": body.name}

    @app.get("/health")
    async def health():
        return {"status": "ok", "base": settings.base_name, "task": runtime.task, "resident": runtime.resident(),
                "waiting": batcher.waiting}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics).decode(), media_type="text/plain; version=0.0.4")

    return app


def _as_api_error(exc: Exception, what: str) -> Exception:
    """A client's mistake passes through as a 400; anything else is logged with its traceback and becomes a 500."""
    if isinstance(exc, (UserInputError, APIError)):
        return exc
    log.error("%s: %s", what, exc, exc_info=exc)
    return APIError(500, what, "server_error")


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation rendered as chat training renders it, ready for the assistant's turn."""
    from .data import render_chat

    return render_chat(tokenizer, messages, add_generation_prompt=True)


def serve(base: str, quantization: str = "nf4", registry_root: str | None = None, adapters: list[str] | None = None,
          host: str = "127.0.0.1", port: int = 8000, task: str = "auto", max_adapters: int | None = None,
          settings: ServerSettings | None = None) -> None:
    import uvicorn

    from .registry import Registry
    from .runtime import AdapterRuntime

    registry = Registry(registry_root)
    if task == "auto":
        task = _task_of(base)
    runtime = AdapterRuntime(base, task=task, quantization=quantization, registry=registry, max_adapters=max_adapters)
    for name in adapters or []:
        runtime.load(name, pin=True)
    app = create_app(runtime, registry, settings or ServerSettings(base_name=base))
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _task_of(base: str) -> str:
    """causal_lm for a model with a language-modelling head, classification for a bare encoder."""
    from transformers import AutoConfig

    from .backbone import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(base))
    architectures = " ".join(config.architectures or [])
    return "causal_lm" if "CausalLM" in architectures or "LMHead" in architectures else "classification"
