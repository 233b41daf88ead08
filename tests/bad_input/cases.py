"""Every table of the bad-input suite, in one list: each ``cases_<area>.py`` module here has a ``CASES``."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from tests.bad_input.table import Case

AREAS = tuple(sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)])
                     if m.name.startswith("cases_")))


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for area in AREAS:
        cases.extend(importlib.import_module(f"tests.bad_input.{area}").CASES)
    return cases
