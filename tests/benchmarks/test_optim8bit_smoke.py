"""Smoke test of ``benchmarks/optim8bit.py`` at toy size, without the torch peer: it measures real state
bytes and update times, and the table says what was not measured."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import optim8bit as bench  # noqa: E402


def test_toy_run_measures_bytes_and_times(tmp_path):
    result = bench.main(
        ["--toy", "--rounds", "1", "--steps", "1", "--no-peer", "--out", str(tmp_path / "b.json")]
    )
    assert (tmp_path / "b.json").is_file()
    jr = result["jax_results"]
    assert jr["optax.adam"]["state_bytes"] > jr["qjax.optim.adam8bit"]["state_bytes"] > 0
    assert 0.25 < result["qjax_state_ratio"] < 0.4  # toy leaves are small: more of them stay 32-bit
    assert jr["optax.adam"]["update_ms"] > 0 and jr["qjax.optim.adam8bit"]["update_ms"] > 0
    assert result["bnb_time_ratio"] == bench.NOT_MEASURED
    assert "not measured" in bench.table(result)


def test_model_shapes_have_about_10m_parameters():
    n = sum(
        a * (b if b else 1)
        for a, b in ((s[0], s[1] if len(s) > 1 else 0) for s in bench.model_shapes().values())
    )
    assert 9.5e6 < n < 11e6


def test_bad_rounds_are_refused():
    with pytest.raises(SystemExit):
        bench.main(["--toy", "--rounds", "0", "--no-peer"])
