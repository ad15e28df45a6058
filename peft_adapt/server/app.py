"""Wiring: the batcher, metrics, the door (`Guard`), error handlers and the routes, into one FastAPI app."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ServiceUnavailable, UserInputError
from ..runtime.batcher import DynamicBatcher
from ..runtime.continuous import DEFAULT_KV_BUDGET
from .generation import ClientGone
from .guard import Guard, flat_routes
from .public import private_locations, public_message, without_locations
from .routes import ServerState, router
from .schemas import APIError, ServerSettings, error_response
from .telemetry import ServerMetrics

log = logging.getLogger("peft_adapt.server")
RETRY_AFTER_S = 5  # what a 503 for a registry outage asks clients to wait


def create_app(runtime, registry, settings: ServerSettings, from_folders: set[str] | None = None) -> FastAPI:
    """An app serving `runtime` (one base) and `registry`'s adapters of that base; `from_folders`: adapters the
    operator loaded from folders at start, which requests may name too."""
    _bound_prompt_limit(settings, runtime.max_positions)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        state.batcher.close()

    app = FastAPI(title="peft-adapt", docs_url=None, redoc_url=None, lifespan=lifespan)
    metrics = ServerMetrics(runtime, waiting=lambda: batcher.waiting, cancelled=lambda: batcher.cancelled)
    # by default the cache budget takes at least one longest request the server accepts
    budget = settings.kv_budget or max(DEFAULT_KV_BUDGET, settings.max_prompt_tokens + settings.max_tokens)
    batcher = DynamicBatcher(runtime, settings.max_batch, settings.batch_window_ms / 1000, settings.max_queue,
                             on_batch=metrics.batch_sizes.observe, scheduler=settings.scheduler, kv_budget=budget,
                             prefill_chunk=settings.prefill_chunk)
    state = ServerState(runtime, registry, batcher, settings, metrics, set(from_folders or ()))
    app.state.server = state
    app.state.private = private_locations(registry, runtime)
    app.state.batcher = batcher
    app.include_router(router)
    _add_error_handlers(app)
    app.add_middleware(Guard, settings=settings, metrics=metrics, routes=flat_routes(app.router.routes))
    return app


def _bound_prompt_limit(settings: ServerSettings, positions: int) -> None:
    """The prompt limit never exceeds what the base can take; by default it is exactly that."""
    if settings.max_prompt_tokens is None:
        settings.max_prompt_tokens = positions
    elif settings.max_prompt_tokens > positions:
        log.warning("--max-prompt-tokens %d exceeds the %d positions of the base; using %d",
                    settings.max_prompt_tokens, positions, positions)
        settings.max_prompt_tokens = positions


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        exc.message = without_locations(exc.message, getattr(request.app.state, "private", {}))
        return exc.response()

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, exc: ClientGone):
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it, the log counts it

    @app.exception_handler(UserInputError)
    async def bad_input(request: Request, exc: UserInputError):
        return user_error_response(exc, getattr(request.app.state, "private", {}))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _validation_error(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = "body_too_large" if exc.status_code == 413 else None
        return error_response(exc.status_code, str(exc.detail), code=code, headers=getattr(exc, "headers", None))


def user_error_response(exc: UserInputError, private: dict[str, str]):
    """A client's mistake is a 400; an outage of the registry is a 503 to retry. Either way the client reads the
    error's public message, without the registry's location, its other adapters or the server's files."""
    if isinstance(exc, ServiceUnavailable):
        log.warning("answered 503: %s", exc)  # the operator reads the whole message, the client the public one
        return error_response(503, public_message(exc, private), "service_unavailable", code="registry_unavailable",
                              headers={"Retry-After": str(RETRY_AFTER_S)})
    return error_response(400, public_message(exc, private))


def _validation_error(errors: list[dict]):
    """The first problem, named by its field (`temperature: ...`); a body that is not JSON says so, with where."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        position = next((p for p in first["loc"][1:] if isinstance(p, int)), None)
        where = f" (at character {position})" if position is not None else ""
        return error_response(400, f"the request body is not valid JSON{where}: {first['msg']}")
    param = ".".join(str(p) for p in first["loc"] if p != "body") or None
    message = first["msg"].removeprefix("Value error, ")  # a validator's own message names its field already
    return error_response(400, f"{param}: {message}" if param else message, param=param)
