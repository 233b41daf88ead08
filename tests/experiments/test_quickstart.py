"""``python -m experiments.quickstart --quick``: every method trains, freezes to the same accuracy, and the
frozen sizes are ordered by bit width."""

import warnings

import numpy as np
import pytest
from _checks import check_bytes_order, check_rows, load_rows, require_experiment_deps, run_cli

from experiments import bnn_common as bc
from experiments.bnn_common import METHODS


@pytest.mark.slow
def test_quickstart_quick(tmp_path):
    require_experiment_deps()
    out = run_cli("experiments.quickstart", tmp_path, no_warnings=True)  # e.g. no kernel fallback notice
    rows = load_rows(tmp_path, "quickstart")
    assert [r["method"] for r in rows] == [m.name for m in METHODS]
    check_rows(rows, fp32_floor=0.5)
    check_bytes_order(rows)
    assert "binary BiPer" in out and "total" in out  # the printed table
    md = (tmp_path / "quickstart.md").read_text()
    assert "| method | bits | accuracy |" in md and "8-bit weights" in md


def test_a_warning_during_the_study_gets_its_own_line_above_the_progress_bar(monkeypatch, capsys):
    pytest.importorskip("tqdm", reason="tqdm missing: pip install -e '.[experiments]'")

    class Warns:
        def __init__(self, method, *args):
            self.method = method

        def run(self, data, seed, on_epoch):
            on_epoch(0, 1.0)
            warnings.warn("something to act on", UserWarning, stacklevel=1)
            return {"accuracy": 0.5}

    monkeypatch.setattr(bc, "Trainer", Warns)
    data = bc.Data("toy", *(np.zeros((256, 4), np.float32), np.zeros(256, np.int32)) * 2)
    bc.run_study(METHODS[:1], ["mlp"], [0], data, bc.TrainConfig(epochs=1), progress=True)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "UserWarning: something to act on" in lines, lines
