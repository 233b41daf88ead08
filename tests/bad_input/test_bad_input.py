"""Run the bad-input table: every case must end in the class its row promises."""

from __future__ import annotations

from collections import Counter

import pytest

from tests.bad_input.cases import all_cases
from tests.bad_input.table import CLASSES, observe

CASES = all_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_ends_in_its_promised_class(case):
    outcome = observe(case)
    assert outcome.kind == case.expect.kind, f"{case.id}: expected {case.expect.kind}, got {outcome}"


def test_table_is_large_distinct_and_covers_every_class():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1]
    assert len(ids) >= 150
    assert set(Counter(c.expect.kind for c in CASES)) == set(CLASSES)
