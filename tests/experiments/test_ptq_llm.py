"""``python -m experiments.ptq_llm --quick``: the quick decoder at W4 g128 and W4A8, qjax's RTN, GPTQ and
rotation + GPTQ beside Qwix's RTN in one run (Qwix's GPTQ, minutes of compilation, is tested in
tests/experiments/test_qwix_ptq.py); JSON, Markdown and PNG written."""

import json
import math

import pytest

from tests.experiments._checks import require_experiment_deps, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_quick_study_runs_and_reports_qjax_beside_qwix(tmp_path):
    require_experiment_deps()
    pytest.importorskip("tunix", reason="Tunix missing: pip install --no-deps google-tunix==0.1.7")
    pytest.importorskip("qwix", reason="Qwix missing: pip install -e '.[test]'")
    run_cli("experiments.ptq_llm", tmp_path, timeout=600)
    for ext in ("md", "png"):
        assert (tmp_path / f"ptq_llm.{ext}").stat().st_size > 0
    report = json.loads((tmp_path / "ptq_llm.json").read_text())
    fp32 = report["subjects"]["decoder"]["fp32_perplexity"]
    float_linear = 4 * report["subjects"]["decoder"]["parameters"]
    rows = {(r["library"], r["method"], r["config"]): r for r in report["rows"]}
    for config in ("W4 g128", "W4A8"):
        for key in (("qjax", "rtn"), ("qjax", "gptq"), ("qjax", "rotation"), ("qwix", "rtn")):
            row = rows[(*key, config)]
            if key[0] == "qwix" and "reason" in row:  # a config Qwix cannot express says why
                assert row["reason"]
                continue
            ppl = row["perplexity"]
            assert math.isfinite(ppl) and 0.98 * fp32 <= ppl < 1.5 * fp32, (key, config, ppl, fp32)
            assert 0 < row["linear_bytes"] < float_linear and row["time_s"] > 0, row
    # GPTQ at 4 bits stays near RTN or better
    gptq, rtn = (rows[("qjax", m, "W4 g128")]["perplexity"] for m in ("gptq", "rtn"))
    assert gptq <= 1.02 * rtn, (gptq, rtn)
    assert report["verdicts"] and report["machine"]["quick"] is True
