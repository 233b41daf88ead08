"""Settings read when a function is traced (a kernel backend, a QAT product): a checked value held in a
:class:`contextvars.ContextVar` for the duration of a ``with`` block, so that settings nest and stay
thread- and async-safe."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence


@contextlib.contextmanager
def holding(var: contextvars.ContextVar, value: str, allowed: Sequence[str], what: str) -> Iterator[str]:
    """Within the block, ``var`` holds ``value`` (one of ``allowed``; else a ValueError naming ``what``)."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)
