"""How many CPU threads torch uses: one decision, made once per process, stated with every timing.

torch starts one thread per core in every process. Two training processes on a 2-core machine then run four
threads on two cores, and on a busy machine the default made training 5-10x slower than one thread (measured).
`auto` gives each process its share of the cores this process may run on; an explicit OMP_NUM_THREADS wins.
"""

from __future__ import annotations

import logging
import os

from ..errors import UserInputError

log = logging.getLogger(__name__)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_threads() -> int:
    """The cores this process may use, shared with the other processes of a local launch."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return max(1, available_cores() // max(1, local_processes))


def configure_threads(requested: int | str | None = "auto") -> int:
    """Set torch's intra-op threads to `requested` (a count, or auto/None) and return the count."""
    import torch

    if requested in (None, "auto"):
        count = auto_threads()
    elif isinstance(requested, int) or (isinstance(requested, str) and requested.isdigit()):
        count = int(requested)
        if count < 1:
            raise UserInputError(f"threads: {requested!r} must be at least 1 (or auto)")
    else:
        raise UserInputError(f"threads: {requested!r} is neither a number nor auto")
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    log.info("torch uses %d CPU thread(s)", count)
    return count
