"""Counts of the bad-input table per promised class, and per observed class when run.

    python -m tests.bad_input.report           # what each case promises
    python -m tests.bad_input.report --run     # run every case, count what happened (e.g. on an old commit)
"""

from __future__ import annotations

import argparse
from collections import Counter

from tests.bad_input.cases import AREAS, all_cases
from tests.bad_input.table import observe


def promised_counts() -> Counter:
    return Counter(c.expect.kind for c in all_cases())


def format_counts(counts: Counter, title: str) -> str:
    total = sum(counts.values())
    rows = [f"{title}: {total} cases"] + [f"  {n:4d}  {kind}" for kind, n in counts.most_common()]
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bad_input.report", description=__doc__.split("\n")[0])
    p.add_argument("--run", action="store_true", help="run every case and count the observed outcomes")
    p.add_argument("--verbose", action="store_true", help="print every case that misses its class")
    args = p.parse_args(argv)
    print(format_counts(promised_counts(), f"bad-input table ({len(AREAS)} areas), promised"))
    if args.run:
        observed: Counter = Counter()
        for c in all_cases():
            outcome = observe(c)
            kind = outcome.kind if not outcome.kind.startswith("crash in") else "crash inside another library"
            observed[kind] += 1
            if args.verbose and outcome.kind != c.expect.kind:
                print(f"  MISS {c.id}: {outcome.kind}: {outcome.detail}")
        print(format_counts(observed, "observed"))


if __name__ == "__main__":
    main()
