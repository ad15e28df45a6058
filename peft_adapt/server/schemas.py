"""What the server accepts and answers: settings, request bodies, and OpenAI's error shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import UserInputError
from ..runtime.batcher import SCHEDULERS

MAX_STOPS = 4  # as OpenAI allows
MAX_LOGPROBS = 5  # top alternatives per token, as OpenAI's completions allow
MAX_TOP_LOGPROBS = 20  # and as its chat completions allow
MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI's own cap)
MAX_MESSAGES = 2048  # turns in one chat request (templating 30,000 of them held the interpreter for seconds)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


@dataclass
class ServerSettings:
    base_name: str
    api_key: str | None = None
    admin_key: str | None = None
    max_body_bytes: int = 1_000_000
    max_prompt_tokens: int | None = None  # default and upper bound: the base's positions
    max_tokens: int = 512
    max_batch: int = 32
    batch_window_ms: float = 10.0
    max_queue: int = 256
    batch_invariant: bool = False
    scheduler: str = "step"  # continuous batching; "request": whole requests per batch (the baseline)
    kv_budget: int | None = None  # cache positions running rows may hold (default: 32768, or one longest request)
    prefill_chunk: int = 128  # prompt tokens read per decode step
    header_timeout_s: float = 10.0  # a request's headers must arrive within this (slowloris)
    body_timeout_s: float = 30.0  # and its body within this after them
    keep_alive_s: float = 5.0  # an idle connection between requests is closed after this
    max_connections: int = 512  # open at once, in all
    max_connections_per_peer: int = 64  # open at once from one address

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise UserInputError(f"--scheduler {self.scheduler!r}: use {' or '.join(SCHEDULERS)}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s", "max_connections",
                     "max_connections_per_peer", "prefill_chunk") + (("kv_budget",) if self.kv_budget is not None else ()):
            value = getattr(self, name)
            if not (value > 0 and value < float("inf")):
                flag = "--" + name.removesuffix("_s").replace("_", "-")
                raise UserInputError(f"{flag} {value!r}: give a positive number")

    def loggable(self) -> dict:
        """The settings as a log line may show them: whether a key is set, never the key."""
        shown = asdict(self)
        for name in ("api_key", "admin_key"):
            shown[name] = "<set>" if shown[name] else None
        return shown


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.kind, self.param, self.code)


def error_response(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}, never a traceback."""
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


# fields of OpenAI's API this server does not implement: a request setting one to anything but its default is
# refused naming it (answered as if it were absent, a client would get what it did not ask for)
UNSUPPORTED = {"best_of": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False),
               "suffix": (None, ""), "tools": (None, []), "response_format": (None,)}


def _strings(value, where: str = ""):
    """(where, string) for every string in a parsed JSON body, keys included, without recursion."""
    stack = [(where, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            yield where, item
        elif isinstance(item, dict):
            for k, v in item.items():
                yield where, str(k)
                stack.append((f"{where}.{k}" if where else str(k), v))
        elif isinstance(item, list):
            stack.extend((f"{where}.{i}", v) for i, v in enumerate(item))


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data):
        """JSON lets a string hold a lone surrogate (\\ud800), which no tokenizer or header can encode."""
        for where, text in _strings(data):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{where or 'body'} holds a lone surrogate (an unpaired \\ud800-\\udfff escape); "
                                 f"send valid Unicode text") from None
        return data


class StreamOptions(_Body):
    include_usage: bool = False  # a last chunk with the request's token counts (and no choices)


class _GenerationBody(_Body):
    """What completions and chat completions share."""

    model: str = Field(min_length=1, max_length=300)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # None (as SDKs may send it): 0
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, description=f"token id -> bias in [-100, 100], at most "
                                                                   f"{MAX_LOGIT_BIAS} tokens")
    min_tokens: int | None = Field(None, ge=0, description="tokens generated before end-of-sequence may end it (vLLM's field)")

    @field_validator("logit_bias")
    @classmethod
    def _small_bias(cls, value):
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased, got {len(value)}")
        for token, bias in value.items():
            if not (token.isascii() and token.isdigit() and len(token) <= 9):
                raise ValueError(f"key {token[:20]!r}: give token ids as decimal strings, e.g. {{\"50256\": -100}}")
            if not -100 <= bias <= 100:
                raise ValueError(f"token {token}: bias {bias} is outside [-100, 100]")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @model_validator(mode="before")
    @classmethod
    def _no_unsupported_fields(cls, data):
        if isinstance(data, dict):
            for name, defaults in UNSUPPORTED.items():
                if name in cls.model_fields:  # implemented by this endpoint
                    continue
                value = data.get(name)
                if value is not None and not any(type(value) is type(d) and value == d for d in defaults):
                    raise ValueError(f"{name}: this server does not implement {name}; leave it out (or at its "
                                     f"default)")
        return data

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        return value

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_GenerationBody):
    # a text, texts, a token array or token arrays (as OpenAI's API takes them)
    prompt: (str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)]
             | Annotated[list[Annotated[list[int], Field(min_length=1)]], Field(min_length=1)])
    max_tokens: int = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="log-probabilities of each token and "
                                                                           "its top alternatives")
    echo: bool = Field(False, description="the prompt first in the text (and in logprobs)")

    @property
    def prompts(self) -> list[str] | list[list[int]]:
        if isinstance(self.prompt, str) or isinstance(self.prompt[0], int):
            return [self.prompt]
        return self.prompt

    @model_validator(mode="after")
    def _not_streamed_with_scores(self):
        if self.stream and (self.logprobs is not None or self.echo):
            raise ValueError("logprobs and echo are answered in one body: send them without stream")
        return self


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="the log-probability of each generated token")
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="and its top alternatives")

    @model_validator(mode="after")
    def _scores_asked_right(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.stream and self.logprobs:
            raise ValueError("logprobs are answered in one body: send them without stream")
        return self


class ClassifyRequest(_Body):
    model: str = Field(min_length=1, max_length=300)
    input: str | Annotated[list[str], Field(min_length=1)]


class TagRequest(_Body):
    model: str = Field(min_length=1, max_length=300)
    # a text (split on whitespace), a list of texts, or a list of rows of words
    input: str | Annotated[list[str], Field(min_length=1)] | Annotated[
        list[Annotated[list[Annotated[str, Field(min_length=1, max_length=1000)]], Field(min_length=1)]],
        Field(min_length=1)]


class AdapterRequest(_Body):
    name: str = Field(min_length=1, max_length=300)
    pin: bool = False
