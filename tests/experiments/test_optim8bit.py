"""experiments.optim8bit: one quick task end to end (train, parity verdict, the .md and .png writers)."""

from __future__ import annotations

import dataclasses

import numpy as np
import optax
import pytest

from experiments import data as datasets
from experiments import optim8bit as exp


@pytest.fixture(scope="module")
def quick_result():
    pytest.importorskip("matplotlib", reason="matplotlib missing: pip install -e '.[experiments]'")
    try:
        datasets.fashion_mnist_source(download=False)
    except datasets.DataError as err:
        pytest.skip(f"Fashion-MNIST not available locally ({err})")
    task = next(t for t in exp.make_tasks(quick=True) if t.name == "fmnist_mlp")
    rows, curves = [], {}
    for name in ("adam",):  # AdamW and Lion run the same code path in the experiment
        opt32, opt8, hyper = exp.OPTIMIZERS[name]
        for bits, factory in ((32, opt32), (8, opt8)):
            losses, eval_loss, eval_acc, state, _ = exp.train(task, factory(**hyper), seeds=2)
            rows.append(
                {
                    "task": task.name,
                    "optimizer": name,
                    "bits": bits,
                    "steps": task.steps,
                    "final_train_loss": exp._tail_mean(losses).tolist(),
                    "eval_loss": eval_loss.tolist(),
                    "eval_accuracy": eval_acc.tolist(),
                    "state_bytes": exp.qo.state_nbytes(state),
                    "train_time_s": 0.0,
                }
            )
            curves[f"{task.name}/{name}/{bits}"] = losses.mean(1).tolist()
    verdicts = [{"task": task.name, "optimizer": "adam", "state_ratio": 0.26, **exp.parity(rows[0], rows[1])}]
    return {"quick": True, "seeds": 2, "rows": rows, "parity": verdicts, "curves": curves}


@pytest.mark.slow
def test_quick_task_trains_and_8bit_tracks_32bit(quick_result, tmp_path):
    rows = quick_result["rows"]
    for row in rows:
        assert 0.0 <= min(row["eval_accuracy"]) and max(row["eval_accuracy"]) <= 1.0
    adam32, adam8 = rows[0], rows[1]
    assert np.mean(adam32["eval_accuracy"]) > 0.4  # well above chance (0.1) after 20 steps
    assert abs(np.mean(adam8["eval_loss"]) - np.mean(adam32["eval_loss"])) < 0.05
    assert adam8["state_bytes"] < 0.3 * adam32["state_bytes"]
    exp.write_markdown(quick_result, tmp_path / "r.md")
    exp.write_plot(quick_result, tmp_path / "r.png")
    assert "Parity held in" in (tmp_path / "r.md").read_text() and (tmp_path / "r.png").stat().st_size > 0


def test_parity_rule():
    base = {"eval_accuracy": [0.80, 0.81, 0.82], "eval_loss": [0.50, 0.51, 0.52]}
    assert exp.parity(base, {"eval_accuracy": [0.80, 0.81, 0.82], "eval_loss": [0.5, 0.51, 0.52]})[
        "eval_accuracy"
    ]["parity"]
    verdict = exp.parity(base, {"eval_accuracy": [0.70, 0.71, 0.72], "eval_loss": [0.9, 0.91, 0.92]})
    assert not verdict["eval_accuracy"]["parity"] and not verdict["eval_loss"]["parity"]


def test_pydoc_text_is_real_english_text():
    text = exp.pydoc_text()
    assert len(text) > 100_000 and "the" in text


def test_task_arrays_are_arguments_not_constants():
    """Data passed to jit as arguments (a baked-in 188 MB constant would make compiles crawl)."""
    fields = {f.name for f in dataclasses.fields(exp.Task)}
    assert "arrays" in fields
    optax.adam(1e-3)  # optax imported for the experiment's optimizers
