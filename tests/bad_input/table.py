"""The bad-input table: each case is a call and the class of outcome qjax promises for it.

A case's expected class is one of

- :class:`Raises`: a ``ValueError`` / ``TypeError`` *raised by qjax* (the innermost frame of the traceback
  is in ``qjax`` or ``kernels_pallas``, not in JAX, Flax, Orbax or numpy) whose message matches ``match``, a
  regex naming the bad value and what is allowed;
- :class:`Warns`: the call completes, emits a warning from qjax matching ``match`` (naming what it did
  instead), and ``check(result)`` holds;
- :class:`Documented`: the call completes and ``check(result)`` asserts the documented result (``doc``
  says where it is documented or what the rule is).

:func:`observe` runs a case and names what actually happened, with the same vocabulary plus the failure
classes of the issue that asked for this suite ("unclear error", "crash in <library>", "silent"), so the
same table measures the code before and after a fix (``python -m tests.bad_input.report``).
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Callable
from typing import Any

OURS = ("qjax", "kernels_pallas")

CLEAR_ERROR = "clear error"
WARNING = "warning + documented result"
DOCUMENTED = "documented result"
UNCLEAR = "unclear error"
SILENT = "silent wrong result"
CLASSES = (CLEAR_ERROR, WARNING, DOCUMENTED)


@dataclasses.dataclass(frozen=True)
class Raises:
    match: str
    exc: type[BaseException] | tuple[type[BaseException], ...] = ValueError
    kind = CLEAR_ERROR


@dataclasses.dataclass(frozen=True)
class Warns:
    match: str
    check: Callable[[Any], None] = lambda result: None
    kind = WARNING


@dataclasses.dataclass(frozen=True)
class Documented:
    check: Callable[[Any], None]
    doc: str
    kind = DOCUMENTED


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[], Any]
    expect: Raises | Warns | Documented


def case(id: str, call: Callable[[], Any], expect: Raises | Warns | Documented) -> Case:
    return Case(id, call, expect)


def raising_package(exc: BaseException) -> str:
    """Top-level package of the innermost frame of ``exc``'s traceback (where it was raised)."""
    tb = exc.__traceback__
    module = "?"
    while tb is not None:
        module = tb.tb_frame.f_globals.get("__name__", "?")
        tb = tb.tb_next
    return module.split(".")[0]


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str
    detail: str = ""


def observe(c: Case) -> Outcome:
    """Run ``c.call()`` and classify what happened."""
    expect = c.expect
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = c.call()
        except Exception as exc:  # classifying every failure is the point
            origin = raising_package(exc)
            text = f"{type(exc).__name__} from {origin}: {str(exc)[:300]}"
            if origin not in OURS:
                return Outcome(f"crash in {origin}", text)
            if (isinstance(expect, Raises) and isinstance(exc, expect.exc)
                    and re.search(expect.match, str(exc), re.DOTALL)):
                return Outcome(CLEAR_ERROR, text)
            return Outcome(UNCLEAR, text)
    said = [str(w.message)[:160] for w in caught]
    if isinstance(expect, Raises):
        return Outcome(SILENT, f"no error; warnings: {said}")
    try:
        expect.check(result)
    except AssertionError as exc:
        return Outcome(SILENT, f"check failed: {exc}")
    if isinstance(expect, Warns):
        if any(re.search(expect.match, str(w.message), re.DOTALL) for w in caught):
            return Outcome(WARNING)
        return Outcome(SILENT, f"no warning matching {expect.match!r}; got {said}")
    return Outcome(DOCUMENTED)

