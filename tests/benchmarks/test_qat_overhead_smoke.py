"""Smoke test of ``python -m benchmarks.qat_overhead --quick``: it runs, writes the JSON it promises, and
every method of the comparison traces on both models. Qwix is optional: without it the Qwix rows must say
why they were not measured."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import qat_overhead as bench  # noqa: E402

pytestmark = pytest.mark.slow


def test_quick_run_writes_json(tmp_path):
    out = tmp_path / "qat_overhead.json"
    methods = "fp32,qjax_w4a8,qjax_w1a1,qwix_w4a8,qwix_w1a1,qjax_w4a8_int8"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.qat_overhead", "--quick", "--models", "mlp",
                           "--methods", methods, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    env = result["environment"]
    assert env["jax"] == jax.__version__ and env["device"].startswith("cpu")
    rows = result["models"]["mlp"]["methods"]
    assert list(rows) == methods.split(",")
    for name in ("fp32", "qjax_w4a8", "qjax_w1a1", "qjax_w4a8_int8"):
        row = rows[name]
        assert row["measured"] and row["median_ms"] > 0 and row["steps"] == 4
        assert row["hlo_dots"] and all(n > 0 for n in row["hlo_dots"].values())
    assert rows["fp32"]["ratio_vs_fp32"] == 1.0
    # "auto": the int8 product where this CPU has int8 dot instructions, else the float product of the
    # fake-quant values; the forced int8 product runs int8 dots.
    auto = env["qjax_qat_product_auto"]
    assert auto == ("int8" if env["int8_product_is_faster"] else "float")
    fused = {"int8": "int8 dot_general", "float": "fused fake-quant float"}
    assert set(rows["qjax_w4a8"]["qjax_reported_paths"]["value"].values()) == {fused[auto]}
    assert set(rows["qjax_w4a8_int8"]["qjax_reported_paths"]["value"].values()) == {"int8 dot_general"}
    assert "s8,s8->s32" in rows["qjax_w4a8_int8"]["hlo_dots"]
    assert ("s8,s8->s32" in rows["qjax_w4a8"]["hlo_dots"]) == (auto == "int8")
    assert rows["qwix_w1a1"] == {"measured": False, "not_measured": rows["qwix_w1a1"]["not_measured"]}
    if bench.qwix_status()[0] is None:
        assert not rows["qwix_w4a8"]["measured"] and "qwix" in rows["qwix_w4a8"]["not_measured"]
    else:
        assert rows["qwix_w4a8"]["measured"] and rows["qwix_w4a8"]["ratio_vs_fp32"] > 0
    assert "qjax_w4a8" in proc.stdout and "median ms" in proc.stdout


@pytest.mark.parametrize("case", bench.cases(quick=True), ids=lambda c: c.name)
def test_every_method_traces(case):
    """Every method's full training step traces (shapes only: no compile, no run) on both models."""
    x, labels = case.batch(jax.random.key(0))
    tx = optax.adam(1e-3)
    for method in bench.methods(case.model):
        if method.not_measured:
            assert method.name.startswith("qwix")
            continue
        variables = dict(jax.eval_shape(method.init, jax.random.key(0), x))
        params = variables.pop("params")
        step = bench.make_step(method.apply, case.loss, tx)
        opt_state = jax.eval_shape(tx.init, params)
        new_params, _, loss = jax.eval_shape(step, params, opt_state, variables, x, labels)
        assert loss.shape == () and loss.dtype == jnp.float32, method.name
        assert jax.tree.structure(new_params) == jax.tree.structure(params), method.name


def test_hlo_dots_reads_operand_dtypes():
    f = jax.jit(lambda a, b, c: (jax.lax.dot(a, b, preferred_element_type=jnp.int32), c @ c))
    args = jnp.ones((4, 8), jnp.int8), jnp.ones((8, 4), jnp.int8), jnp.ones((4, 4))
    text = f.lower(*args).compile().as_text()
    assert bench.hlo_dots(text) == {"f32,f32->f32": 1, "s8,s8->s32": 1}
