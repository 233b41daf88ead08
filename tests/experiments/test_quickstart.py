"""``python -m experiments.quickstart --quick``: every method trains, freezes to the same accuracy, and the
frozen sizes are ordered by bit width."""

from _checks import check_bytes_order, check_rows, load_rows, require_experiment_deps, run_cli

from experiments.bnn_common import METHODS


def test_quickstart_quick(tmp_path):
    require_experiment_deps()
    out = run_cli("experiments.quickstart", tmp_path)
    rows = load_rows(tmp_path, "quickstart")
    assert [r["method"] for r in rows] == [m.name for m in METHODS]
    check_rows(rows, fp32_floor=0.5)
    check_bytes_order(rows)
    assert "binary BiPer" in out and "total" in out  # the printed table
    md = (tmp_path / "quickstart.md").read_text()
    assert "| method | bits | accuracy |" in md and "8-bit weights" in md
