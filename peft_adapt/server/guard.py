"""The server's front door, as plain ASGI middleware: it runs before any body is read or any route is called.

- Metrics are labelled by route template; every path that names no route shares one label.
- Keys are checked first: a request without the right key is refused before its body is read.
- The body limit holds for a declared Content-Length and, counted as it arrives, for a streamed (chunked) body.
- Whatever fails inside is logged with its traceback and answered 500 in OpenAI's shape, without it.
"""

from __future__ import annotations

import logging
import secrets
import time

from starlette.exceptions import HTTPException
from starlette.routing import Match

from .schemas import error_response
from .telemetry import UNMATCHED

log = logging.getLogger("peft_adapt.server")


class BodyTooLarge(HTTPException):
    """Raised while a body is read past the limit; an HTTPException, so the app answers it (413)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes")


def flat_routes(routes) -> list:
    """Routes with included routers opened up (FastAPI keeps an included router as one entry)."""
    flat = []
    for route in routes:
        inner = getattr(route, "original_router", None)
        flat += flat_routes(inner.routes) if inner is not None else [route]
    return flat


def route_template(routes, scope) -> str:
    """The template of the route `scope` reaches (`/v1/completions`), or UNMATCHED."""
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return getattr(route, "path", UNMATCHED)
    return UNMATCHED


def key_for(route: str) -> str | None:
    """Which key a route needs: adapter management the admin key, the rest of /v1 the API key, the others none."""
    if route.startswith("/v1/adapters/"):
        return "admin"
    if route.startswith("/v1/"):
        return "api"
    return None


class Guard:
    def __init__(self, app, settings, metrics, routes):
        self.app, self.settings, self.metrics, self.routes = app, settings, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        route = route_template(self.routes, scope)
        status = {"code": 500, "sent": False}

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        try:
            refusal = self._refusal(scope, route)
            if refusal is not None:
                await refusal(scope, receive, tracked_send)
            else:
                await self.app(scope, self._limited(receive), tracked_send)
        except Exception:  # never a traceback to the client; always one in the server's log
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if not status["sent"]:
                await error_response(500, "internal server error", "server_error")(scope, receive, tracked_send)
        finally:
            self.metrics.observe(route, status["code"], time.perf_counter() - started)

    def _refusal(self, scope, route: str):
        """An error response for a request refused at the door, or None."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        needed = key_for(route) if route != UNMATCHED else None
        if needed == "admin" and self.settings.admin_key is None:
            return error_response(403, "adapter management is disabled: start the server with --admin-key",
                                  "permission_error")
        expected = self.settings.admin_key if needed == "admin" else self.settings.api_key if needed else None
        if expected is not None:
            given = headers.get("authorization", "")
            given = given[7:] if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(given.encode(), expected.encode()):
                kind = "admin key" if needed == "admin" else "API key"
                return error_response(401, f"missing or wrong {kind}: send 'Authorization: Bearer <key>'",
                                      "authentication_error", code="invalid_api_key")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            return error_response(413, f"request body of {declared} bytes exceeds the limit of "
                                       f"{self.settings.max_body_bytes}", code="body_too_large")
        return None

    def _limited(self, receive):
        """`receive` that counts the body as it arrives and stops it at the limit, whatever the headers said."""
        limit, seen = self.settings.max_body_bytes, 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return limited_receive
