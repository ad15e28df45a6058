"""One base, many resident adapters: hot-swap and mixed-adapter batches (see `runtime.py`)."""

from .runtime import AdapterRuntime

__all__ = ["AdapterRuntime"]
