"""What every experiment's command line shares: ``--quick`` (also ``QJAX_QUICK=1``), ``--out`` (else
``$QJAX_RESULTS_DIR``, else ``runs/`` at the repository root, which git ignores; ``--out results/`` writes
the tracked figures), ``--no-progress``, and :func:`run`, which ends a job whose optional data is missing
with one line saying how to get it."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from experiments.data import DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "runs"


def add_run_options(parser: argparse.ArgumentParser, quick_help: str) -> argparse.ArgumentParser:
    """Add ``--quick``, ``--out`` (alias ``--results-dir``) and ``--no-progress`` to ``parser``."""
    parser.add_argument("--quick", action="store_true", default=os.environ.get("QJAX_QUICK") == "1",
                        help=f"{quick_help} (also QJAX_QUICK=1)")
    parser.add_argument("--out", "--results-dir", dest="results_dir", default=None, metavar="DIR",
                        help="where to write the results (default: $QJAX_RESULTS_DIR or runs/, untracked; "
                             "--out results/ updates the repository's figures)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def results_dir(path: str | os.PathLike | None = None) -> Path:
    """Where results go: ``path``, else ``$QJAX_RESULTS_DIR``, else ``runs/`` at the repository root
    (created if missing)."""
    out = Path(path or os.environ.get("QJAX_RESULTS_DIR") or DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(main: Callable[[], object]) -> None:
    """``main()`` for ``python -m``: data that is missing or damaged (:class:`~experiments.data.DataError`,
    whose message says how to get it) ends the process with that one line and exit status 1, no traceback."""
    try:
        main()
    except DataError as err:
        sys.exit(f"error: {err}".replace("\n", " "))
