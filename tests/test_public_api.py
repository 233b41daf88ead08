"""The flat public API: ``import qjax`` loads the core only; the front ends load on first access."""

import subprocess
import sys

import pytest

import qjax


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_core_quantizers_import_no_flax_and_no_orbax():
    out = run_python(
        "import sys, jax.numpy as jnp, qjax\n"
        "q = qjax.Quantizer('int4', qjax.PerChannel(-1))\n"
        "x = jnp.linspace(-1, 1, 24).reshape(4, 6)\n"
        "y = qjax.fake_quant(q, x)\n"
        "assert (y == qjax.dequantize(qjax.quantize(q, x))).all()\n"
        "qjax.surrogates.biper(x); qjax.quantize(q, x).pack(0).unpack(); qjax.Rule('.*', weight=q)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'flax', 'orbax', 'optax'}))\n")
    assert out.strip() == "[]"


def test_lazy_modules_are_reachable_as_attributes():
    out = run_python(
        "import qjax\n"
        "print(qjax.ptq.gptq.__name__, qjax.linen.quantize_model.__name__, qjax.nnx.__name__,\n"
        "      qjax.checkpoint.__name__, qjax.optim.__name__, qjax.summary.__name__)\n")
    assert out.split() == ["gptq", "quantize_model", "qjax.nnx", "qjax.checkpoint", "qjax.optim",
                           "qjax.summary"]


def test_from_qjax_import_star_does_not_shadow_flax():
    namespace = {}
    exec("from qjax import *", namespace)
    assert "linen" not in namespace and "nnx" not in namespace
    assert "linen" not in qjax.__all__ and "nnx" not in qjax.__all__
    assert {"ptq", "optim", "checkpoint", "summary"} <= set(namespace)


def test_every_name_in_all_resolves_and_is_listed_once():
    assert len(qjax.__all__) == len(set(qjax.__all__))
    for name in qjax.__all__:
        assert getattr(qjax, name) is not None, name
    assert {"linen", "nnx", "ptq"} <= set(dir(qjax))
    for name in qjax._LAZY_MODULES:  # the lazily loaded submodules, public or internal
        assert getattr(qjax, name).__name__ == f"qjax.{name}"


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="module 'qjax' has no attribute 'not_a_module'"):
        qjax.not_a_module  # noqa: B018
