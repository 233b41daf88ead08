"""Assertions shared by the experiment tests: run an experiment's CLI, check the JSON it wrote."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("method", "bits", "accuracy", "frozen_accuracy", "model_bytes", "train_time_s", "compiles")
FORMAT_ORDER = ("binary", "ternary (BitNet b1.58)", "int4", "int8", "fp32")  # strictly growing bytes
# Quick runs take a few dozen steps, so compilation dominates: XLA's backend at -O0 compiles about a third
# faster on CPU (measured on the quickstart: 35 s -> 24.5 s of CPU time).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def quick_env() -> dict[str, str]:
    """Environment for a quick-mode subprocess or notebook kernel: the repo importable, fast compilation."""
    flags = os.environ.get("XLA_FLAGS", "")
    flags = flags if FAST_COMPILE in flags else f"{flags} {FAST_COMPILE}".strip()
    return {"PYTHONPATH": str(REPO_ROOT), "XLA_FLAGS": flags, "QJAX_QUICK": "1"}


def require_experiment_deps() -> None:
    """Skip (naming the extra) when the experiments' dependencies are not installed."""
    for module in ("sklearn", "matplotlib", "tqdm"):
        pytest.importorskip(module, reason=f"{module} missing: pip install -e '.[experiments]'")


def run_cli(module: str, results_dir: Path, *args: str, timeout: int = 300, no_warnings: bool = False) -> str:
    """``python -m module --quick --no-progress *args`` from the repo root, writing into ``results_dir``; its
    stdout. ``no_warnings``: also assert that it printed no Python warning."""
    env = {**os.environ, **quick_env(), "QJAX_RESULTS_DIR": str(results_dir)}
    proc = subprocess.run([sys.executable, "-m", module, "--quick", "--no-progress", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if no_warnings:
        assert "Warning" not in proc.stderr, f"{module} printed a warning:\n{proc.stderr[-3000:]}"
    return proc.stdout


def load_rows(results_dir: Path, name: str) -> list[dict]:
    """The JSON rows of ``name``, after checking that the .md and .png were written too."""
    for ext in ("md", "png"):
        path = results_dir / f"{name}.{ext}"
        assert path.is_file() and path.stat().st_size > 0, f"{path} missing"
    rows = json.loads((results_dir / f"{name}.json").read_text())
    assert isinstance(rows, list) and rows
    return rows


def check_rows(rows: list[dict], fp32_floor: float = 0.3) -> None:
    """Fields present, accuracies in [0, 1], fp32 above chance, frozen == QAT, no recompilation."""
    for row in rows:
        missing = [f for f in FIELDS if f not in row]
        assert not missing, f"row {row.get('method')} lacks {missing}"
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["frozen_accuracy"] <= 1.0
        assert row["frozen_accuracy"] == row["accuracy"], row
        assert row["compiles"] == 1, f"{row['method']}: train step compiled {row['compiles']} times"
        assert row["model_bytes"] > 0 and row["train_time_s"] > 0
    for row in rows:
        if row["method"] == "fp32":
            assert row["accuracy"] > fp32_floor, f"fp32 quick accuracy {row['accuracy']} is near chance (0.1)"


def check_bytes_order(rows: list[dict]) -> None:
    """binary < ternary < int4 < int8 < fp32 in real frozen bytes (every binary method)."""
    size = {}
    for row in rows:
        key = "binary" if row["method"].startswith("binary") else row["method"]
        size.setdefault(key, []).append(row["model_bytes"])
    present = [k for k in FORMAT_ORDER if k in size]
    for smaller, larger in itertools.pairwise(present):
        assert max(size[smaller]) < min(size[larger]), f"{smaller} {size[smaller]} !< {larger} {size[larger]}"
