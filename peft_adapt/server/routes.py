"""The endpoints. Each parses, checks, and hands work to the batcher's thread: tokenizing and chat templates run
in a thread pool, never on the event loop; keys and body limits were checked at the door (`guard.py`)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from ..errors import ServiceUnavailable, UserInputError
from ..faults import fault_point
from ..registry.refs import Auto, Base, Mix, Stack, is_folder_ref, parse_ref
from ..registry.stacks import DOMAIN_TASKS
from ..routing.router import is_auto
from ..runtime.batcher import ClassifyJob
from ..runtime.decoding import Sampling
from ..runtime.residency import SERVED_TASKS
from .generation import as_api_error, chat_prompt, respond, routed, submit
from .schemas import (
    AdapterRequest,
    APIError,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    ServerSettings,
    TagRequest,
)

DEFAULT_CHAT_TOKENS = 256  # a chat request without max_tokens gets this, or the server's limit if lower

router = APIRouter()


@dataclass
class ServerState:
    runtime: object
    registry: object
    batcher: object
    settings: ServerSettings
    metrics: object
    from_folders: set[str] = field(default_factory=set)  # adapters the operator loaded from folders at start

    @property
    def base_names(self) -> set[str]:
        return {"base", self.settings.base_name}

    def servable(self) -> list[str]:
        """Registered adapters of this server's base and task, and the operator's own."""
        fingerprint = self.runtime.backbone.fingerprint["id"]
        names = {e.name for e in self.registry.list(base=fingerprint) if e.task in SERVED_TASKS[self.runtime.task]}
        return sorted(names | self.from_folders)

    def adapter_for(self, model: str) -> str | None:
        """The adapter a request's `model` names, in its canonical spelling (None: the base), as the registry says
        now. Requests name registered adapters only: a path is never read from a request."""
        if model == self.settings.base_name:
            return None
        if model in self.from_folders and model in self.runtime.resident():
            return model
        if is_folder_ref(model):  # a path is never read from a request: no such model
            raise self._not_found(model)
        ref = parse_ref(model, folders=False)  # a malformed reference: a 400 saying what is wrong
        if isinstance(ref, Base):
            return None
        if isinstance(ref, Auto):  # routed per input in the batcher's thread (`routed`); the router checks its members
            return str(ref)
        if isinstance(ref, Mix):  # routes name mixes; requests name adapters
            raise self._not_found(model)
        parts = ref.parts if isinstance(ref, Stack) else (ref,)  # `domain+task`: a stack, bottom first
        for i, part in enumerate(parts):
            self._check_servable(part, top=i == len(parts) - 1, stacked=len(parts) > 1)
        return str(ref)

    def _not_found(self, model: str) -> APIError:
        shown = ", ".join(sorted(self.base_names) + self.servable()[:30])
        return APIError(404, f"the model {model[:200]!r} does not exist; available: {shown}", code="model_not_found",
                        param="model")

    def _check_servable(self, ref, top: bool, stacked: bool) -> None:
        try:
            entry = self.registry.get(ref)
        except ServiceUnavailable:
            raise
        except UserInputError:
            raise self._not_found(str(ref)) from None
        fingerprint = self.runtime.backbone.fingerprint["id"]
        task = self.runtime.task
        tasks = SERVED_TASKS[task] if top else DOMAIN_TASKS.get(task, (task,))
        if entry.fingerprint != fingerprint or entry.task not in tasks:
            role = "" if not stacked else " at the top of a stack" if top else " under the task adapter of a stack"
            raise APIError(400, f"{entry.ref} is a {entry.task} adapter of base {entry.base_model!r}; this server "
                                f"serves {' or '.join(tasks)}{role} on {self.settings.base_name!r}", param="model")

    def tokens_of(self, text: str | list[int]) -> list[int]:
        """A prompt's token ids: a text tokenized (in a worker thread: a long text takes time), or ids as given
        (OpenAI's token-array prompt, which lm-evaluation-harness sends), checked against the vocabulary."""
        if isinstance(text, list):
            vocabulary = self.vocabulary
            if any(not 0 <= token < vocabulary for token in text):
                raise APIError(400, f"the prompt holds token ids outside 0-{vocabulary - 1}", param="prompt")
            ids = list(text)
        else:
            ids = self.runtime.tokenizer(text)["input_ids"]
        if len(ids) > self.settings.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens; the limit is {self.settings.max_prompt_tokens}",
                           param="prompt", code="context_length_exceeded")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        return ids

    def cut_texts(self, texts: list[str]) -> list[str]:
        """Runs in a worker thread: each text cut after the token the base can no longer read (a few past it), so
        the batcher's thread, which tokenizes again with the adapter's own limit, never reads a 900 kB text."""
        limit, tokenizer = self.settings.max_prompt_tokens + 8, self.runtime.tokenizer
        cut = []
        for text in texts:
            if len(text) > limit and getattr(tokenizer, "is_fast", False):
                ends = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=True,
                                 max_length=limit)["offset_mapping"]
                text = text[: ends[-1][1]] if len(ends) >= limit else text
            cut.append(text)
        return cut

    @property
    def vocabulary(self) -> int:
        """How many token ids the base has logits for."""
        return int(getattr(self.runtime.model.config, "vocab_size", 0) or len(self.runtime.tokenizer))

    def sampling_of(self, max_tokens: int, body, prompt_tokens: int) -> Sampling:
        if max_tokens > self.settings.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} exceeds the limit of {self.settings.max_tokens}",
                           param="max_tokens")
        if prompt_tokens + max_tokens > self.runtime.max_positions:
            raise APIError(400, f"the prompt's {prompt_tokens} tokens plus max_tokens {max_tokens} exceed the "
                                f"{self.runtime.max_positions} positions of the base", param="max_tokens",
                           code="context_length_exceeded")
        if (body.min_tokens or 0) > max_tokens:
            raise APIError(400, f"min_tokens {body.min_tokens} exceeds max_tokens {max_tokens}", param="min_tokens")
        vocabulary = self.vocabulary
        bias = tuple(sorted((int(k), float(v)) for k, v in (body.logit_bias or {}).items()))
        if bias and bias[-1][0] >= vocabulary:
            raise APIError(400, f"logit_bias names token {bias[-1][0]}; this base's token ids run 0-{vocabulary - 1}",
                           param="logit_bias")
        return Sampling(max_new_tokens=max_tokens, min_new_tokens=body.min_tokens or 0, do_sample=body.temperature > 0,
                        temperature=body.temperature or 1.0, top_p=body.top_p, seed=body.seed,
                        presence_penalty=body.presence_penalty or 0.0,
                        frequency_penalty=body.frequency_penalty or 0.0,
                        logit_bias=bias)

    def check_generation(self, n: int, count: int) -> None:
        if n != 1:
            raise APIError(400, "n must be 1: send one request per completion", param="n")
        if count > self.settings.max_batch:
            raise APIError(400, f"{count} prompts in one request; the limit is {self.settings.max_batch}", param="prompt")
        if self.runtime.task == "classification":
            raise APIError(400, "this server serves a classification base: use /v1/classify")


def state_of(request: Request) -> ServerState:
    return request.app.state.server


async def route_inputs(state: ServerState, inputs: list, adapter: str | None) -> tuple[str | None | list, dict, str | None]:
    """For a routed request (`model: auto...`): each input's adapter, the response headers naming the choice, and
    the one adapter chosen for all inputs (None if they differ). Otherwise the adapter as it was, no headers."""
    if adapter is None or not is_auto(adapter):
        return adapter, {}, None
    # the router is built here, in a worker thread: a slow or failing build is this client's wait or 400 alone
    await run_in_threadpool(state.runtime.router, adapter)
    routes = await routed(state.batcher, inputs, adapter)
    state.metrics.count_routes(routes)
    chosen = [r.serve_as for r in routes]
    headers = {"x-peft-adapt-adapter": ",".join(c or "base" for c in chosen),
               "x-peft-adapt-route-confidence": ",".join(f"{r.confidence:.4f}" for r in routes)}
    return chosen, headers, (chosen[0] or "base") if len(set(chosen)) == 1 else None


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    state = state_of(request)
    prompts = body.prompts
    state.check_generation(body.n, len(prompts))
    adapter = await run_in_threadpool(state.adapter_for, body.model)
    ids = await run_in_threadpool(lambda: [state.tokens_of(p) for p in prompts])
    if not all(isinstance(p, str) for p in prompts):  # token arrays: their text, for echo
        prompts = [state.runtime.tokenizer.decode(row) for row in ids]
    sampling = state.sampling_of(body.max_tokens, body, max(map(len, ids)))
    adapter, headers, chosen = await route_inputs(state, ids, adapter)
    finish = None
    if body.logprobs is not None or body.echo:
        finish = scored_choice(state, prompts, ids, adapter, body.logprobs, body.echo)
    return await respond("completion", chosen or body.model, ids, adapter, sampling, body.stops, body.stream,
                         state.batcher, headers, request.app.state.private, request, finish, body.include_usage)


def scored_choice(state: ServerState, prompts: list[str], ids: list[list[int]], adapter, top: int | None, echo: bool):
    """A completion choice's text with the prompt first (`echo`), and its logprobs in OpenAI's legacy shape
    (tokens, token_logprobs, top_logprobs, text_offset): the prompt's tokens too with `echo`, the first of which
    nothing predicts (None). Scored by the runtime in one forward over prompt and completion."""
    tokenizer = state.runtime.tokenizer

    async def finish(index: int, text: str, generated: list[int]):
        shown = (prompts[index] if echo else "") + text
        if top is None:
            return shown, None
        name = adapter[index] if isinstance(adapter, list) else adapter
        prompt = ids[index]
        start = 0 if echo else len(prompt)
        scores = await run_in_threadpool(state.runtime.token_logprobs, prompt + generated, name, start, top)
        listed = (prompt if echo else []) + generated
        offsets, at = [], 0 if echo else len(prompts[index])
        for token in listed:
            offsets.append(at)
            at += len(tokenizer.decode([token]))
        # tokens in the vocabulary's own spelling: unique per id (decoding one byte of a character gives U+FFFD for
        # many), so a top alternative and the chosen token compare as equal strings exactly when they are one token
        return shown, {"tokens": tokenizer.convert_ids_to_tokens(listed), "token_logprobs": [lp for lp, _ in scores],
                       "top_logprobs": [None if lp is None else dict(zip(tokenizer.convert_ids_to_tokens(list(alts)),
                                                                         alts.values())) for lp, alts in scores],
                       "text_offset": offsets}

    return finish


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request):
    state = state_of(request)
    state.check_generation(body.n, 1)
    adapter = await run_in_threadpool(state.adapter_for, body.model)
    messages = [m.model_dump(include={"role", "content"}) for m in body.messages]
    ids = [await run_in_threadpool(lambda: state.tokens_of(chat_prompt(state.runtime.tokenizer, messages)))]
    max_tokens = body.max_completion_tokens or body.max_tokens or min(DEFAULT_CHAT_TOKENS, state.settings.max_tokens)
    sampling = state.sampling_of(max_tokens, body, len(ids[0]))
    adapter, headers, chosen = await route_inputs(state, ids, adapter)
    finish = chat_scored(state, ids[0], adapter, body.top_logprobs or 0) if body.logprobs else None
    return await respond("chat", chosen or body.model, ids, adapter, sampling, body.stops, body.stream, state.batcher,
                         headers, request.app.state.private, request, finish, body.include_usage)


def chat_scored(state: ServerState, prompt: list[int], adapter, top: int):
    """A chat answer's logprobs in OpenAI's chat shape: per generated token its text, logprob, UTF-8 bytes and top
    alternatives; scored as a completion's are (one forward over prompt and answer)."""
    tokenizer = state.runtime.tokenizer

    def entry(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    async def finish(index: int, text: str, generated: list[int]):
        name = adapter[index] if isinstance(adapter, list) else adapter
        scores = await run_in_threadpool(state.runtime.token_logprobs, prompt + generated, name, len(prompt), top)
        return text, {"content": [entry(t, lp) | {"top_logprobs": [entry(k, v) for k, v in alts.items()]}
                                  for t, (lp, alts) in zip(generated, scores)]}

    return finish


@router.post("/v1/classify")
async def classify(body: ClassifyRequest, request: Request):
    state = state_of(request)
    if state.runtime.task != "classification":
        raise APIError(400, f"this server serves a {state.runtime.task.replace('causal_lm', 'causal LM')} base: use "
                            f"/v1/completions")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if len(texts) > state.settings.max_batch:
        raise APIError(400, f"input: give 1 to {state.settings.max_batch} texts", param="input")
    adapter = await run_in_threadpool(state.adapter_for, body.model)
    if adapter is None:
        raise APIError(400, "classification needs an adapter: the base has no head", param="model")
    texts = await run_in_threadpool(state.cut_texts, texts)
    adapter, headers, chosen = await route_inputs(state, texts, adapter)
    value = await _run_on_encoder(state, ClassifyJob(texts, adapter, None, "classify"))
    per_text = adapter if isinstance(adapter, list) else None  # routed: each item names its adapter
    data = [{"index": i, **{k: r[k] for k in ("label", "label_id", "probs")},
             **({"model": per_text[i]} if per_text else {})} for i, r in enumerate(value)]
    return JSONResponse({"object": "list", "model": chosen or body.model, "data": data}, headers=headers)


@router.post("/v1/tag")
async def tag(body: TagRequest, request: Request):
    """A tag per word from a token-classification adapter (NER and the like), and the entities the tags spell."""
    state = state_of(request)
    if state.runtime.task != "classification":
        raise APIError(400, f"this server serves a {state.runtime.task.replace('causal_lm', 'causal LM')} base: "
                            f"tagging needs an encoder base", param="model")
    rows = [body.input] if isinstance(body.input, str) else body.input
    if len(rows) > state.settings.max_batch:
        raise APIError(400, f"input: give 1 to {state.settings.max_batch} texts", param="input")
    for i, row in enumerate(rows):
        if isinstance(row, list) and len(row) > state.settings.max_prompt_tokens:
            raise APIError(400, f"input {i}: {len(row)} words; give at most {state.settings.max_prompt_tokens}",
                           param="input")
    adapter = await run_in_threadpool(state.adapter_for, body.model)
    if adapter is None or is_auto(adapter):
        raise APIError(400, "tagging needs a token-classification adapter by name", param="model")
    texts = [r for r in rows if isinstance(r, str)]
    cut = iter(await run_in_threadpool(state.cut_texts, texts))
    rows = [next(cut) if isinstance(r, str) else r for r in rows]
    value = await _run_on_encoder(state, ClassifyJob(rows, adapter, None, "tag"))
    data = [{"index": i, **{k: r[k] for k in ("words", "tags", "entities", "untagged")}} for i, r in enumerate(value)]
    return JSONResponse({"object": "list", "model": body.model, "data": data})


async def _run_on_encoder(state: ServerState, job: ClassifyJob) -> list[dict]:
    """Run a classify or tag job in the batcher and wait for its results (inputs are cut to the adapter's training
    max_length in the batcher's thread, as training cut them)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    job.emit = lambda kind, value: loop.call_soon_threadsafe(lambda: done.done() or done.set_result((kind, value)))
    submit(state.batcher, job)
    kind, value = await done
    if kind == "error":
        raise as_api_error(value, "classification failed" if job.kind == "classify" else "tagging failed")
    return value


@router.get("/v1/models")
async def models(request: Request):
    fault_point("models")
    state = state_of(request)
    created, resident = int(time.time()), set(state.runtime.resident())
    names = [state.settings.base_name] + await run_in_threadpool(state.servable)
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "peft-adapt",
                                        "resident": n in resident or n == state.settings.base_name} for n in names]}


@router.post("/v1/adapters/load")
async def load_adapter(body: AdapterRequest, request: Request):
    state = state_of(request)
    name = await run_in_threadpool(state.adapter_for, body.name)
    if name is None:
        raise APIError(400, f"{body.name!r} names the base, not an adapter", param="name")
    entry = await run_in_threadpool(state.runtime.load, name, None, body.pin)
    return {"loaded": entry.name, "slot": entry.slot, "pinned": entry.pinned, "source": entry.source}


@router.post("/v1/adapters/unload")
async def unload_adapter(body: AdapterRequest, request: Request):
    state = state_of(request)
    if body.name not in state.runtime.resident():
        raise APIError(404, f"adapter {body.name!r} is not resident; resident: "
                            f"{', '.join(state.runtime.resident()) or 'none'}", param="name", code="model_not_found")
    await run_in_threadpool(state.runtime.unload, body.name)
    return {"unloaded": body.name}


@router.get("/health")
async def health(request: Request):
    state = state_of(request)
    return {"status": "ok", "base": state.settings.base_name, "task": state.runtime.task,
            "resident": state.runtime.resident(), "waiting": state.batcher.waiting,
            "batch_invariant": state.runtime.batch_invariant}


@router.get("/metrics")
async def prometheus(request: Request):
    return PlainTextResponse(state_of(request).metrics.text(), media_type="text/plain; version=0.0.4")
