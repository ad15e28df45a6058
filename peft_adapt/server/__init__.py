"""`peft-adapt serve`: an OpenAI-compatible HTTP server over one base and every registered adapter.

The `model` field of a request names the adapter (or the base). The parts:
- `schemas.py`: settings, request bodies, OpenAI's error shape;
- `guard.py`: the door, as ASGI middleware: keys, body limits (streamed bodies too), route-template metrics,
  5xx logged with their traceback and answered without it;
- `routes.py`: the endpoints; `generation.py`: the batcher's text events as responses and streams;
- `telemetry.py`: Prometheus metrics with bounded labels; `app.py`: wiring; `serve.py`: uvicorn.
Requests are batched across adapters by `runtime.batcher.DynamicBatcher`, in its own thread.
"""

from .app import create_app
from .generation import chat_prompt
from .schemas import ServerSettings
from .serve import serve

__all__ = ["ServerSettings", "chat_prompt", "create_app", "serve"]
