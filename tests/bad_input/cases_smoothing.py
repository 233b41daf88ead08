"""Bad input and edges of qjax.ptq's smoothing methods (smoothquant, awq, hadamard, smoothing_plan) and of the
input transforms they store (qjax.input_transform), N-d (einsum) layers included. One tiny Linen model."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qjax import PerChannel, PerToken, Quantizer, Rule, ptq
from qjax import linen as ql
from qjax.input_transform import DIVISOR, SIGNS, transform_input, transform_weight
from tests.bad_input.table import Documented, Raises, case


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="head")(nn.gelu(nn.Dense(32, name="dense_0")(nn.LayerNorm(name="norm")(x))))


W8A8 = [Rule(".*", types=("Dense",), weight=Quantizer("int8", PerChannel(-1)),
             input=Quantizer("int8", PerToken(-1)))]


@functools.cache
def _setup():
    x = jax.random.normal(jax.random.key(0), (2, 4, 16))
    model = _Tiny()
    return model, jax.jit(model.init)(jax.random.key(1), x), {"x": x}


def _call(fn, variables=None, **kw):
    model, start, batch = _setup()
    return fn(model, start if variables is None else variables, W8A8, [batch], **kw)


def _dead_channel_variables():
    """The norm's scale and bias 0 at channel 3: dense_0 never sees an input there."""
    variables = _setup()[1]
    norm = {k: v.at[3].set(0.0) for k, v in variables["params"]["norm"].items()}
    return {**variables, "params": {**variables["params"], "norm": norm}}


def _hadamard(**kw):
    return _call(ptq.hadamard, key=jax.random.key(2), method="rtn", **kw)


def _folded_into_the_norm(plan):
    assert plan.folds() == {"dense_0": ("norm/bias", "norm/scale")}, plan
    head = plan.group("head")
    assert not head.folded and "no parameter scales the input exactly" in head.reason


def _only_dense_0_rotated(frozen):
    quant = frozen["quant"]
    assert quant["dense_0"][ql.TRANSFORM_KEY][SIGNS].shape == (16,) and "head" not in quant


def _zero_channel_divisor_is_one(frozen):
    s = np.asarray(frozen["quant"]["dense_0"][ql.TRANSFORM_KEY][DIVISOR])
    assert s[3] == 1.0 and np.all(s > 0), s


def _stacked():
    from tests.clients.models import scanned_nnx

    client = scanned_nnx(num_layers=2)
    rules = [Rule("layers/.*", weight=Quantizer("int8", PerChannel(-1)), weight_names=("kernel", "w"))]
    return ptq.smoothquant(client.model, None, rules, [client.inputs], token_mask=None)


_X4 = jnp.linspace(-1, 1, 2 * 3 * 4 * 8, dtype=jnp.float32).reshape(2, 3, 4, 8)
_W4 = jnp.linspace(-1, 1, 4 * 8 * 5, dtype=jnp.float32).reshape(4, 8, 5)
_SIGNS32 = {SIGNS: jnp.where(jnp.arange(32) % 3 == 0, -1.0, 1.0)}


def _nd_rotation_is_exact(y):
    np.testing.assert_allclose(y, jnp.tensordot(_X4, _W4, 2), rtol=1e-5, atol=1e-5)


CASES = [
    case("smoothing-smoothquant-unknown-fold", lambda: _call(ptq.smoothquant, fold="always"),
         Raises(r"smoothquant: fold='always'; allowed: 'auto', 'never'")),
    case("smoothing-awq-fold-none", lambda: _call(ptq.awq, fold=None),
         Raises(r"awq: fold=None; allowed: 'auto', 'never'")),
    case("smoothing-plan-fold-a-bool", lambda: _call(ptq.smoothing_plan, fold=True),
         Raises(r"smoothing_plan: fold=True; allowed: 'auto', 'never'")),
    case("smoothing-plan-folds-into-the-layernorm", lambda: _call(ptq.smoothing_plan),
         Documented(_folded_into_the_norm, doc="qjax.ptq.folding module docstring: a LayerNorm's scale and "
                                               "bias take 1 / s; gelu's output has no exact producer")),
    case("smoothing-dead-input-channel",
         lambda: _call(ptq.smoothquant, variables=_dead_channel_variables(), fold="never"),
         Documented(_zero_channel_divisor_is_one,
                    doc="smoothquant docstring: a dead channel (max|X_j| = 0) gets s_j = 1")),
    case("smoothing-stacked-layers", _stacked,
         Raises(r"smoothquant: .* is stacked \(1 leading layer axis, run by scan.*allowed: unstacked "
                r"layers")),
    case("hadamard-paths-not-a-string", lambda: _hadamard(paths=3),
         Raises(r"hadamard: paths=3 is a int; allowed: None \(every quantized layer\) or a regex")),
    case("hadamard-paths-not-a-regex", lambda: _hadamard(paths="dense_(0"),
         Raises(r"hadamard: paths='dense_\(0' is not a regular expression .*allowed: a regex")),
    case("hadamard-paths-match-nothing", lambda: _hadamard(paths="mlp/.*"),
         Raises(r"hadamard: paths='mlp/\.\*' matches none of the quantized modules \['dense_0', 'head'\]")),
    case("hadamard-paths-choose-layers", lambda: _hadamard(paths="dense_0"),
         Documented(_only_dense_0_rotated, doc="hadamard docstring: paths chooses the rotated layers; the "
                                               "others are quantized with no transform")),
    case("transform-input-rotation-width-mismatch",
         lambda: transform_input({SIGNS: jnp.ones(24)}, _X4, "xla"),
         Raises(r"rotation of width 24 does not match the input's contracted axes \(input shape \(2, 3, 4, "
                r"8\)\); allowed: trailing contracted axes whose sizes multiply to 24")),
    case("transform-weight-rotation-width-mismatch",
         lambda: transform_weight({SIGNS: jnp.ones(12)}, _W4, "xla"),
         Raises(r"rotation of width 12 does not match the weight's contracted axes \(weight shape \(4, 8, "
                r"5\)\); allowed: leading contracted axes whose sizes multiply to 12")),
    case("transform-divisor-and-rotation-shapes-disagree",
         lambda: transform_input({DIVISOR: jnp.ones((8,)), **_SIGNS32}, _X4, "xla"),
         Raises(r"rotation of width 32 does not match the input's contracted axes")),
    case("transform-nd-rotation-over-flattened-axes",
         lambda: jnp.tensordot(transform_input(_SIGNS32, _X4, "xla"), transform_weight(_SIGNS32, _W4, "xla"),
                               2),
         Documented(_nd_rotation_is_exact, doc="qjax.input_transform: a rotation of width prod K acts on the "
                                               "contracted axes flattened; exact in float")),
]
