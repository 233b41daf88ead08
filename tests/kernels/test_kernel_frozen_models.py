"""Frozen Linen and NNX models run their packed weights on the kernel backend given as their static
setting (``quantize_model(..., backend=)``, ``qjax.nnx.freeze(model, backend=)``), with the same outputs on
the Pallas kernel as on the XLA reference; one jitted function under two backends runs two programs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kernels_pallas
from qjax import PerChannel, PerGroup, PerToken, Quantizer
from qjax import linen as ql
from qjax import nnx as qn
from qjax.rules import Rule

X = jax.random.normal(jax.random.key(1), (5, 48))
RULES = [Rule("layer_0", weight=Quantizer("int4", PerGroup(0, 16)), input=Quantizer("int8", PerToken(-1))),
         Rule("layer_1", weight=Quantizer("uint4", PerChannel(-1), "minmax")),
         Rule("layer_2", weight=Quantizer("ternary", PerChannel(-1), "mean_abs")),
         Rule("head", weight=Quantizer("binary", PerChannel(-1), "mean_abs"))]


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i, width in enumerate((40, 36, 24)):
            x = nn.relu(nn.Dense(width, name=f"layer_{i}")(x))
        return nn.Dense(10, name="head")(x)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.layer_0 = nnx.Linear(48, 40, rngs=rngs)
        self.layer_1 = nnx.Linear(40, 36, rngs=rngs)
        self.layer_2 = nnx.Linear(36, 24, rngs=rngs)
        self.head = nnx.Linear(24, 10, rngs=rngs)

    def __call__(self, x):
        for layer in (self.layer_0, self.layer_1, self.layer_2):
            x = jax.nn.relu(layer(x))
        return self.head(x)


def per_backend(forward, monkeypatch) -> dict[str, jax.Array]:
    """``forward(backend)`` for each backend, counting the Pallas kernel calls of each (layer_0, W4A8, on the
    packed integer kernel; the others on the weight-only one)."""
    calls = []
    for name in ("packed_matmul_pallas", "packed_int_matmul_pallas"):
        original = getattr(kernels_pallas, name)
        monkeypatch.setattr(kernels_pallas, name,
                            lambda *a, original=original, **k: calls.append(1) or original(*a, **k))
    outputs = {}
    for backend in ("xla", "interpret"):
        outputs[backend] = forward(backend)
        assert len(calls) == (4 if backend == "interpret" else 0), backend  # all four layers on the kernel
    return outputs


def test_frozen_linen_model_same_outputs_on_xla_and_interpret(monkeypatch):
    qmodel = ql.quantize_model(LinenMLP(), RULES)
    variables = jax.jit(qmodel.init)(jax.random.key(0), X)
    frozen = ql.freeze(qmodel, variables, X)

    def forward(backend):
        return jax.jit(ql.quantize_model(LinenMLP(), RULES, backend=backend).apply)(frozen, X)

    out = per_backend(forward, monkeypatch)
    scale = float(jnp.max(jnp.abs(out["xla"])))
    np.testing.assert_allclose(out["interpret"], out["xla"], rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(out["xla"], jax.jit(qmodel.apply)(variables, X), rtol=1e-5, atol=1e-5 * scale)


def test_frozen_nnx_model_same_outputs_on_xla_and_interpret(monkeypatch):
    model = NnxMLP(nnx.Rngs(0))
    qn.quantize_model(model, RULES, X)
    before = model(X)
    qn.freeze(model)
    run = nnx.jit(lambda m, x: m(x))  # one jitted function: the backend is part of the model's graph

    def forward(backend):
        qn.freeze(model, backend=backend)
        return run(model, X)

    out = per_backend(forward, monkeypatch)
    scale = float(jnp.max(jnp.abs(before)))
    np.testing.assert_allclose(out["interpret"], out["xla"], rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(out["xla"], before, rtol=1e-5, atol=1e-5 * scale)


def test_unknown_backend_is_refused_when_quantizing():
    with pytest.raises(ValueError, match="unknown kernel backend 'gpu'; allowed: auto, xla, pallas, interp"):
        ql.quantize_model(LinenMLP(), RULES, backend="gpu")
    with pytest.raises(ValueError, match="unknown QAT product 'int4'; allowed: auto, int8, float"):
        qn.quantize_model(NnxMLP(nnx.Rngs(0)), RULES, X, product="int4")
