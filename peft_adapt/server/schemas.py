"""What the server accepts and answers: settings, request bodies, and OpenAI's error shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Annotated, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOPS = 4  # as OpenAI allows
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


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use


class _GenerationBody(_Body):
    """What completions and chat completions share."""

    model: str = Field(min_length=1, max_length=300)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])

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
    prompt: str | Annotated[list[str], Field(min_length=1)]
    max_tokens: int = Field(16, ge=1)


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ClassifyRequest(_Body):
    model: str = Field(min_length=1, max_length=300)
    input: str | Annotated[list[str], Field(min_length=1)]


class AdapterRequest(_Body):
    name: str = Field(min_length=1, max_length=300)
    pin: bool = False
