"""Smoke test of ``python -m benchmarks.memory --quick``: it runs, writes the JSON it promises, and qjax's
in-place ``quantize_model`` + ``freeze`` keeps the peak of live device bytes within 1.1x of the float model's
parameter bytes (no second copy of the weights: a promise of ``qjax.nnx``, not a tolerance of this test)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import memory as bench  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "memory.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_run_writes_json(quick_run):
    result, stdout = quick_run
    env = result["environment"]
    assert env["jax"] == jax.__version__ and env["device"].startswith("cpu") and env["cpu"]
    assert result["quick"] and result["model"]["float_param_bytes"] > 10e6
    qj = result["qjax"]
    assert qj["measured"] and list(qj["steps"]) == ["quantize_model", "freeze"]
    assert qj["float_param_bytes"] == result["model"]["float_param_bytes"]
    assert qj["other_live_bytes_at_start"] < 0.01 * qj["float_param_bytes"]
    for step in qj["steps"].values():
        assert step["wall_s"] >= 0 and step["peak_live_bytes"] >= step["live_bytes_before"] > 0
        assert step["background_samples"] > 0 or step["wall_s"] < 0.01
    # every Linear quantized and packed: the frozen model holds far less than the float one
    assert qj["quantized_weights"] == 7 * result["model"]["layers"] + 1
    assert 0 < qj["packed_weight_bytes"] < qj["bytes_after"] <= qj["steps"]["freeze"]["live_bytes_after"]
    assert qj["after_ratio"] < 0.4 and qj["relative_output_error"] < 1
    diag = qj["diagnosis"]
    assert diag["jit"]["packed_over_weight"] == diag["op_by_op"]["packed_over_weight"] < 0.2
    qw = result["qwix"]
    if qw["measured"]:
        assert list(qw["steps"]) == ["quantize_model", "drop_float_model"]
        assert qw["float_param_bytes"] == qj["float_param_bytes"]
        assert qw["quantized_weights"] == qj["quantized_weights"]
        assert qw["peak_ratio"] > 1 and result["qwix_peak_ratio"] == qw["peak_ratio"]
    else:
        assert "qwix" in qw["not_measured"] or "worker failed" in qw["not_measured"]
    assert result["goal_met"] == (qj["peak_ratio"] <= bench.GOAL)
    assert "freeze" in stdout and "x float" in stdout


def test_qjax_holds_no_second_copy(quick_run):
    result, _ = quick_run
    qj = result["qjax"]
    steps = {name: step["peak_ratio"] for name, step in qj["steps"].items()}
    diag = qj["diagnosis"]
    assert qj["peak_ratio"] <= bench.GOAL, (
        f"qjax's peak live bytes are {qj['peak_ratio']}x the float parameters (per step: {steps}; goal "
        f"<= {bench.GOAL}x); freeze's per-weight step adds {diag['op_by_op']['peak_over_weight']}x one "
        f"weight op by op, {diag['jit']['peak_over_weight']}x under jit")
