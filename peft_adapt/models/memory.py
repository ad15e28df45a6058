"""Keep the C heap from holding what large tensors freed (glibc; elsewhere these do nothing).

glibc serves an allocation above its mmap threshold from a fresh mapping, returned to the system when freed, and one
below it from its heap, kept for reuse. The threshold rises to the largest block freed so far (up to 32 MiB), so in a
process that has freed one large block, a stream of tensors of many sizes (loading a checkpoint, quantizing it layer by
layer, exporting it) is served from the heap and fragments it: measured, a 0.12B nf4 load peaked at 496 MB over the
interpreter after an unrelated 4 KiB read had raised the threshold, against 207 MB with it held at 1 MiB, and a streamed
export grew by half the model's fp32 size until freed memory was handed back.
"""

from __future__ import annotations

import contextlib

M_MMAP_THRESHOLD = -3
LOADING_THRESHOLD = 1 << 20  # while loading: every tensor of 1 MiB or more is its own mapping
STEADY_THRESHOLD = 32 << 20  # after: glibc's own ceiling, where a process that handles large tensors ends up anyway
_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim, _LIBC.mallopt  # noqa: B018 (absent outside glibc)
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the system."""
    if _libc():
        _LIBC.malloc_trim(0)


@contextlib.contextmanager
def tensors_in_own_mappings():
    """While loading or streaming a model: large allocations are mapped and unmapped on their own, and what the heap
    freed is handed back at the end."""
    libc = _libc()
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, LOADING_THRESHOLD)
    try:
        yield
    finally:
        if libc:
            libc.mallopt(M_MMAP_THRESHOLD, STEADY_THRESHOLD)
            libc.malloc_trim(0)
