"""Smoke test of ``python -m benchmarks.kernels --quick``: it runs, writes the JSON it promises with the real
bytes of the packed weights, says the accelerator section was not measured on a CPU, and the accelerator
code runs (through the interpret backend, which is not a measurement)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import kernels as bench  # noqa: E402

pytestmark = pytest.mark.slow


def test_quick_run_writes_json(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["environment"]["jax"] == jax.__version__
    rows = {(r["M"], r["method"]): r for r in result["cpu"]}
    assert {method for _, method in rows} == {"f32_dot", *bench.WEIGHT_ONLY, "w8a8"}
    size = result["cpu"][0]["K=N"]
    for row in rows.values():
        assert row["median_ms"] > 0 and row["time_vs_f32_dot"] > 0
    # real bytes: packed words (32 // bits codes per uint32) plus one float32 scale per column (per group)
    for method, (bits, group) in bench.WEIGHT_ONLY.items():
        groups = 1 if group is None else size // group
        assert rows[(1, method)]["weight_bytes"] == size * size * bits // 8 + 4 * groups * size
    assert rows[(1, "f32_dot")]["bytes_vs_bf16"] == 2.0 and rows[(1, "binary")]["bytes_vs_f32"] < 1 / 28
    if jax.default_backend() == "cpu":
        assert result["accelerator"] == {"measured": False,
                                         "not_measured": "no GPU lent to this session (platform 'cpu')"}
    assert "not measured" in proc.stdout or "speedup vs bf16" in proc.stdout


def test_accelerator_section_code_runs_through_the_interpreter():
    acc = bench.accelerator_section([256], [1], rounds=1, reps=1, backend="interpret")
    assert not acc["measured"] and acc["backend"] == "interpret"
    assert {r["method"] for r in acc["rows"]} == {"bf16_dot", *bench.WEIGHT_ONLY}
    assert all(r["GB/s"] > 0 and r["TFLOP/s"] > 0 and r["speedup_vs_bf16"] > 0 for r in acc["rows"])
    assert set(acc["goals"]) == {f"{name} >= {target}x at M <= 16" for name, target in bench.GOALS.items()}
