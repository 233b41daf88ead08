"""What every experiment's command line shares: ``--quick`` (also ``QJAX_QUICK=1``), ``--results-dir``
(else ``$QJAX_RESULTS_DIR``, else ``results/`` at the repository root) and ``--no-progress``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def add_run_options(parser: argparse.ArgumentParser, quick_help: str) -> argparse.ArgumentParser:
    """Add ``--quick``, ``--results-dir`` and ``--no-progress`` to ``parser``."""
    parser.add_argument("--quick", action="store_true", default=os.environ.get("QJAX_QUICK") == "1",
                        help=f"{quick_help} (also QJAX_QUICK=1)")
    parser.add_argument("--results-dir", default=None, help="default: $QJAX_RESULTS_DIR or results/")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def results_dir(path: str | os.PathLike | None = None) -> Path:
    """Where results go: ``path``, else ``$QJAX_RESULTS_DIR``, else ``results/`` at the repository root
    (created if missing)."""
    out = Path(path or os.environ.get("QJAX_RESULTS_DIR") or REPO_ROOT / "results")
    out.mkdir(parents=True, exist_ok=True)
    return out
