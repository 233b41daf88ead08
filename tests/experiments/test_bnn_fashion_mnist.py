"""``python -m experiments.bnn_fashion_mnist --quick``: MLP and CNN, two seeds, mean and std."""

import jax
import jax.numpy as jnp
import pytest
from _checks import check_bytes_order, check_rows, load_rows, require_experiment_deps, run_cli

import qjax.linen
from experiments import bnn_common as bc
from experiments.bnn_fashion_mnist import compare_to_ste

QUICK_METHODS = ("fp32", "binary BiPer")  # every method: test_quickstart.py


def _fashion_mnist_available() -> bool:
    from experiments import data

    try:
        data.fashion_mnist_source(download=False)
    except data.DataError:
        return False
    return True


@pytest.mark.slow
def test_bnn_fashion_mnist_quick(tmp_path):
    require_experiment_deps()
    if not _fashion_mnist_available():
        pytest.skip("Fashion-MNIST not found: apt-get install dataset-fashion-mnist, or set QJAX_DATA")
    run_cli("experiments.bnn_fashion_mnist", tmp_path, "--methods", *QUICK_METHODS)
    rows = load_rows(tmp_path, "bnn_fashion_mnist")
    expected = {(model, name) for model in ("mlp", "cnn") for name in QUICK_METHODS}
    assert {(r["model"], r["method"]) for r in rows} == expected
    check_rows(rows)
    for row in rows:
        assert len(row["accuracies"]) == 2 and row["accuracy_std"] >= 0
        assert row["frozen_accuracies"] == row["accuracies"]
    for model in ("mlp", "cnn"):
        check_bytes_order([r for r in rows if r["model"] == model])


def test_cnn_frozen_bytes_follow_bit_width():
    """freeze packs conv kernels along a channel axis, not along kh = 3 (qjax.serving.pack_axis); with the
    small test CNN's few channels a 32-code binary word is partly padding, hence the factor 2, not 8."""
    x = jnp.zeros((2, 28, 28, 1))
    sizes = {}
    for method in bc.select_methods(["int8", "binary STE"]):
        model = bc.make_model("cnn", method.activation, small=True)
        qmodel = qjax.linen.quantize_model(model, method.rules())
        frozen = jax.jit(lambda v, x, qmodel=qmodel: qjax.linen.freeze(qmodel, v, x))(
            qmodel.init(jax.random.key(0), x), x)
        sizes[method.name] = bc.tree_nbytes(frozen["params"]["hidden_0"]["kernel"])
    assert sizes["binary STE"] * 2 <= sizes["int8"], sizes


def test_compare_to_ste_sentence():
    row = lambda method, acc, std: {"model": "mlp", "method": method, "accuracy": acc, "accuracy_std": std}
    rows = [row("binary STE", 0.80, 0.01), row("binary clipped STE", 0.85, 0.01),
            row("binary ReSTE", 0.86, 0.01), row("binary BiPer", 0.845, 0.01)]
    text = compare_to_ste(rows)
    assert "ReSTE beats STE (+6.00 points" in text
    assert "ReSTE ties with clipped STE" in text
    assert "BiPer beats STE" in text and "BiPer ties with clipped STE" in text
    assert "ReSTE against plain STE: beats on MLP +6.00 points, as its paper claims" in text
    rows[0]["accuracy"] = 0.95
    assert "ReSTE against plain STE: trails on MLP -9.00 points, so its paper's claim" in compare_to_ste(rows)
