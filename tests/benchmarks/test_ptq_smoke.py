"""Smoke test of ``python -m benchmarks.ptq --quick`` on the real all-MiniLM-L6-v2 (skipped only where the
model package is missing; ``.ci/run`` installs it): it runs and writes the figures it promises."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ptq.minilm_checks import require_minilm

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_quick_run_writes_json(tmp_path):
    require_minilm()
    out = tmp_path / "ptq_benchmark.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.ptq", "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["calibration_sentences"] == 16
    assert result["float_forward_s"] > 0 and result["rtn_s"] > 0
    for name in ("gptq_one_pass", "gptq_sequential"):
        gptq = result[name]
        assert gptq["compiled_s"] > 0 and gptq["under_30_s"] == (gptq["first_call_s"] < 30)
        assert gptq["vs_rtn"] == pytest.approx(gptq["compiled_s"] / result["rtn_s"])
    for name in ("pv_tuning", "ste"):
        assert result[name]["steps"] == 3 and result[name]["steps_per_s"] > 0
        assert result[name]["final_loss"] == result[name]["final_loss"]  # not NaN
    assert result["pv_vs_ste_step_time"] == pytest.approx(result["ste"]["steps_per_s"]
                                                          / result["pv_tuning"]["steps_per_s"])
