"""Fault injection for the crash-safety tests: a process dies at a named step when PEFT_ADAPT_CRASH_AT names it."""

from __future__ import annotations

import os


def crash_point(step: str) -> None:
    if os.environ.get("PEFT_ADAPT_CRASH_AT") == step:
        os.kill(os.getpid(), 9)


def fault_point(step: str) -> None:
    """Fault injection for the error-path tests: raise an unexpected error here if PEFT_ADAPT_FAULT names this step."""
    if os.environ.get("PEFT_ADAPT_FAULT") == step:
        raise RuntimeError(f"injected fault at {step}")


def delay_point(step: str) -> None:
    """A slow step for the tests of abandoned work: sleep PEFT_ADAPT_DELAY_S seconds if PEFT_ADAPT_DELAY_AT names it."""
    if os.environ.get("PEFT_ADAPT_DELAY_AT") == step:
        import time

        time.sleep(float(os.environ.get("PEFT_ADAPT_DELAY_S", "0.05")))
