"""Bad input and edges of qjax.ptq: calibrate, input_scales, hessians, rtn, gptq / gptq_layer, ste_finetune,
pv_tuning and their helpers. One tiny Linen model and batch, built once."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax import PerChannel, PerGroup, PerTensor, PerToken, Quantizer, Rule, dequantize, ptq, quantize
from qjax.scales import TINY
from tests.bad_input.table import Documented, Raises, Warns, case


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x, attention_mask=None):
        del attention_mask
        return nn.Dense(8, name="head")(nn.gelu(nn.Dense(32, name="dense_0")(x)))


W4 = [Rule(".*", types=("Dense",), weight=Quantizer("int4", PerGroup(0, 16), "minmax"))]
NF4 = [Rule(".*", types=("Dense",), weight=Quantizer("nf4", PerChannel(-1)))]
A8 = [Rule(".*", types=("Dense",), input=Quantizer("int8", PerChannel(-1), "given"))]


@functools.cache
def _setup():
    x = jax.random.normal(jax.random.key(0), (2, 4, 16))
    mask = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], jnp.int32)
    model = _Tiny()
    return model, model.init(jax.random.key(1), x), {"x": x, "attention_mask": mask}


def _model():
    return _setup()[0]


def _vars():
    return _setup()[1]


def _batch(**changes):
    return {**_setup()[2], **changes}


def _masked(value):
    """The batch with ``value`` at a padding token (batch 0, token 3) only."""
    return _batch(x=_batch()["x"].at[0, 3, 5].set(value))


@functools.cache
def _rtn():
    return ptq.rtn(_model(), _vars(), W4, _batch())


def _codes(frozen, name):
    return np.asarray(dequantize(frozen["params"][name]["kernel"]))


def _equals_rtn(frozen):
    for name in ("dense_0", "head"):
        np.testing.assert_array_equal(_codes(frozen, name), _codes(_rtn(), name))


def _all_finite(tree):
    leaves = [np.asarray(dequantize(x) if hasattr(x, "codes") else x)
              for x in jax.tree_util.tree_leaves(tree, is_leaf=lambda x: hasattr(x, "codes"))]
    assert all(np.isfinite(x).all() for x in leaves if x.dtype.kind == "f")


def _nonzero_weights(frozen):
    for name in ("dense_0", "head"):
        assert np.count_nonzero(_codes(frozen, name)) > 0, f"{name} quantized to all zeros"


def _ranges_finite(ranges):
    assert set(ranges) == {"dense_0", "head"}
    assert all(np.isfinite(np.asarray(r.channel_absmax)).all() for r in ranges.values())


def _input_scales(batch):
    ranges = ptq.calibrate(_model(), _vars(), A8, [batch])
    return ranges, ptq.input_scales(_model(), _vars(), A8, ranges, batch)


def _zero_channel_scale(result):
    ranges, variables = result
    s = np.asarray(variables["quant"]["dense_0"]["__input__"]).ravel()
    assert np.all(s > 0) and np.all(np.isfinite(s)), s
    assert s[5] == np.float32(ranges["dense_0"].absmax) / np.float32(127), (s[5], ranges["dense_0"].absmax)


def _all_zero_scale(result):
    _, variables = result
    s = np.asarray(variables["quant"]["dense_0"]["__input__"])
    assert np.all(s == np.float32(TINY)), s
    y = ptq_apply(variables)
    assert np.isfinite(y).all()


def ptq_apply(variables):
    from qjax import linen as qlinen

    return np.asarray(qlinen.quantize_model(_model(), A8).apply(variables, **_batch(x=jnp.zeros((2, 4, 16)))))


def _nan_range():
    ranges = ptq.calibrate(_model(), _vars(), A8, [_batch()])
    bad = ptq.Range(jnp.float32(jnp.nan), ranges["dense_0"].channel_absmax.at[2].set(jnp.nan))
    return ptq.input_scales(_model(), _vars(), A8, {**ranges, "dense_0": bad}, _batch())


def _layer_data():
    w = jax.random.normal(jax.random.key(2), (32, 8)) * 0.1
    x = jax.random.normal(jax.random.key(3), (64, 32))
    return w, 2 * x.T @ x / 64


_Q = Quantizer("int4", PerChannel(-1), "minmax")


def _gptq_layer(q=_Q, w=None, h=None, **kw):
    w0, h0 = _layer_data()
    return ptq.gptq_layer(q, w0 if w is None else w, h0 if h is None else h, **kw)


def _zero_hessian_is_rtn(qa):
    w, _ = _layer_data()
    np.testing.assert_array_equal(np.asarray(qa.codes), np.asarray(quantize(_Q, w).codes))


class _NnxTiny(nnx.Module):
    def __init__(self):
        self.dense = nnx.Linear(16, 8, rngs=nnx.Rngs(0))

    def __call__(self, x, attention_mask=None):
        return self.dense(x)


def _other_variables():
    """Variables of another model (a Dense of other widths) under the same names."""
    return _Tiny().init(jax.random.key(1), jnp.zeros((1, 4, 12)))


def _pv(**kw):
    return ptq.pv_tuning(_model(), _vars(), W4, [_batch()], **{"steps": 1, **kw})


def _ste(**kw):
    return ptq.ste_finetune(_model(), _vars(), W4, [_batch()], **{"steps": 1, **kw})


def _gptq(batches=None, rules=W4, variables=None, **kw):
    return ptq.gptq(_model(), _vars() if variables is None else variables, rules,
                    [_batch()] if batches is None else batches, **kw)


_MATCH_NOTHING = Raises(r"rule 'nothing' matches no module path.*can quantize.*\['dense_0', 'head'\]")
_ZERO_MASK = {"attention_mask": jnp.zeros((2, 4), jnp.int32)}

CASES = [
    # GPTQ: no calibration input (issue 12, point 1)
    case("ptq-gptq-every-token-masked", lambda: _gptq([_batch(**_ZERO_MASK)]),
         Raises(r"every token of every batch is masked.*'attention_mask'.*allowed: 1 for real tokens")),
    case("ptq-gptq-inverted-mask", lambda: _gptq([_batch(attention_mask=1 - jnp.ones((2, 4), jnp.int32))]),
         Raises(r"every token of every batch is masked.*inverted")),
    case("ptq-gptq-layer-gets-only-zero-inputs", lambda: _gptq([_batch(x=jnp.zeros((2, 4, 16)))]),
         Warns(r"gptq: layer dense_0/kernel received no calibration input \(every input is 0.*RTN",
               _equals_rtn)),
    case("ptq-gptq-layer-zero-hessian", lambda: _gptq_layer(h=jnp.zeros((32, 32))),
         Warns(r"Hessian is 0 everywhere.*rounded to nearest \(RTN\)", _zero_hessian_is_rtn)),
    case("ptq-gptq-layer-zero-hessian-under-jit",
         lambda: jax.jit(lambda h: _gptq_layer(h=h))(jnp.zeros((32, 32))),
         Documented(_zero_hessian_is_rtn, doc="gptq module docstring step 1: H = 0 is replaced by I (RTN), "
                                              "silently under a trace")),
    case("ptq-gptq-nan-input", lambda: _gptq([_batch(x=_batch()["x"].at[0, 0, 0].set(jnp.nan))]),
         Raises(r"gptq: layer dense_0/kernel.*NaN/inf.*allowed: a finite Hessian")),
    case("ptq-gptq-nan-in-padding-is-left-out", lambda: _gptq([_masked(jnp.nan)]),
         Documented(lambda f: (_all_finite(f), _nonzero_weights(f)),
                    doc="capture module docstring: padding tokens are left out by jnp.where")),
    case("ptq-gptq-negative-token-mask", lambda: _gptq([_batch(attention_mask=-_batch()["attention_mask"])]),
         Raises(r"'attention_mask'\] holds \[-1.*allowed: finite weights >= 0")),
    case("ptq-gptq-layer-nan-hessian", lambda: _gptq_layer(h=_layer_data()[1].at[3, 3].set(jnp.nan)),
         Raises(r"Hessian holds 1 NaN/inf.*allowed: a finite Hessian")),
    # GPTQ: method arguments
    case("ptq-gptq-layer-not-a-quantizer", lambda: _gptq_layer(q="int4"),
         Raises(r"expects a Quantizer, got str", exc=TypeError)),
    case("ptq-gptq-layer-1d-weight", lambda: _gptq_layer(w=jnp.ones(32)),
         Raises(r"weight of shape \(32,\) with contract=1; allowed: a \(\*K, \*F\) kernel")),
    case("ptq-gptq-layer-hessian-shape", lambda: _gptq_layer(h=jnp.eye(16)),
         Raises(r"hessian has shape \(16, 16\); allowed: \(32, 32\)")),
    case("ptq-gptq-layer-learned-scale", lambda: _gptq_layer(q=Quantizer("int4", PerChannel(-1), "learned")),
         Raises(r"scale rule 'learned'.*allowed: .*absmax")),
    case("ptq-gptq-layer-per-token", lambda: _gptq_layer(q=Quantizer("int4", PerToken(-1))),
         Raises(r"granularity PerToken.*allowed: PerTensor\(\), PerChannel over output axes")),
    case("ptq-gptq-block-size-zero", lambda: _gptq(block_size=0),
         Raises(r"block_size=0.*positive integer")),
    case("ptq-gptq-block-size-float", lambda: _gptq(block_size=64.0),
         Raises(r"block_size=64.0.*positive integer")),
    case("ptq-gptq-block-size-not-multiple-of-group", lambda: _gptq(block_size=24),
         Raises(r"block_size 24 must be a multiple of the group size 16; allowed: 16, 32")),
    case("ptq-gptq-damp-negative", lambda: _gptq(damp=-0.5),
         Raises(r"damp=-0.5.*allowed: a finite number >= 0")),
    case("ptq-gptq-damp-nan", lambda: _gptq_layer(damp=float("nan")),
         Raises(r"damp=nan.*allowed: a finite number >= 0")),
    case("ptq-gptq-group-does-not-divide", lambda: _gptq(rules=[Rule("head", weight=Quantizer(
        "int4", PerGroup(0, 12)))]), Raises(r"layer head.*12")),
    case("ptq-gptq-empty-batches", lambda: _gptq([]), Raises(r"batches is empty; allowed: a non-empty")),
    case("ptq-gptq-batch-not-a-dict", lambda: _gptq([_batch()["x"]]),
         Raises(r"batch 0 is a .*Array.*allowed: a dict of arrays")),
    case("ptq-gptq-batch-of-strings", lambda: _gptq([_batch(x=np.array(["a", "b"]))]),
         Raises(r"batch 0\['x'\] is a ndarray of dtype <U1; allowed: numeric or bool", exc=TypeError)),
    case("ptq-gptq-batches-differ-in-keys", lambda: _gptq([_batch(), {"x": _batch()["x"]}]),
         Raises(r"batch 1 has keys.*batch 0.*allowed: batches of the same inputs")),
    case("ptq-gptq-batch-wrong-feature-size", lambda: _gptq([_batch(x=jnp.ones((2, 4, 12)))]),
         Raises(r"cannot run on these variables and inputs.*\(12, 32\).*\(16, 32\).*pass the variables")),
    case("ptq-gptq-rules-match-nothing", lambda: _gptq(rules=[Rule("nothing", weight=Quantizer("int4"))]),
         _MATCH_NOTHING),
    case("ptq-gptq-variables-of-another-model", lambda: _gptq(variables=_other_variables()),
         Raises(r"cannot run on these variables and inputs.*\(16, 32\).*\(12, 32\).*pass the variables")),
    case("ptq-gptq-variables-without-params", lambda: _gptq(variables={"batch_stats": {}}),
         Raises(r"needs its variables \(a dict with 'params'\)")),
    case("ptq-hessians-unknown-module", lambda: ptq.hessians(_model(), _vars(), [_batch()], [("nope",)]),
         Raises(r"no module 'nope' in the model; modules: \['', 'dense_0', 'head'\]")),
    case("ptq-hessians-every-token-masked",
         lambda: ptq.hessians(_model(), _vars(), [_batch(**_ZERO_MASK)], [("dense_0",)]),
         Raises(r"input_statistics: every token of every batch is masked")),
    # RTN and the model view
    case("ptq-rtn-linen-without-variables", lambda: ptq.rtn(_model(), None, W4, _batch()),
         Raises(r"rtn: a Linen model needs its variables \(a dict with 'params'\), got NoneType")),
    case("ptq-rtn-nnx-with-variables", lambda: ptq.rtn(_NnxTiny(), _vars(), W4, _batch()),
         Raises(r"rtn: an NNX model holds its own variables; pass variables=None")),
    case("ptq-rtn-not-a-model", lambda: ptq.rtn(lambda x: x, _vars(), W4, _batch()),
         Raises(r"rtn: expected a flax.linen Module.*got function")),
    case("ptq-rtn-batch-list", lambda: ptq.rtn(_model(), _vars(), W4, [1, 2]),
         Raises(r"rtn: batch 0 is a list|rtn: batch 0 is a int")),
    case("ptq-rtn-nnx-batch-wrong-feature-size",
         lambda: ptq.rtn(_NnxTiny(), None, W4, {"x": jnp.ones((2, 12))}),
         Raises(r"qjax.nnx: model\(\*example inputs\) failed.*\(12,\) and \(16,\).*pass example inputs")),
    # calibration (issue 12, point 5)
    case("ptq-calibrate-every-token-masked",
         lambda: ptq.calibrate(_model(), _vars(), A8, [_batch(**_ZERO_MASK)]),
         Raises(r"calibrate: every token of every batch is masked")),
    case("ptq-calibrate-nan-input",
         lambda: ptq.calibrate(_model(), _vars(), A8, [_batch(x=_batch()["x"].at[1, 0, 2].set(jnp.inf))]),
         Raises(r"calibrate: the inputs of module 'dense_0' hold NaN or inf.*channels \[2\].*allowed")),
    case("ptq-calibrate-nan-in-padding-is-left-out",
         lambda: ptq.calibrate(_model(), _vars(), A8, [_masked(jnp.nan)]),
         Documented(_ranges_finite, doc="capture module docstring: padding is left out by jnp.where")),
    case("ptq-calibrate-rules-match-nothing",
         lambda: ptq.calibrate(_model(), _vars(), [Rule("nothing", weight=Quantizer("int4"))], [_batch()]),
         _MATCH_NOTHING),
    case("ptq-input-scales-zero-channel", lambda: _input_scales(_batch(x=_batch()["x"].at[..., 5].set(0.0))),
         Documented(_zero_channel_scale, doc="input_scales docstring: a channel that was always 0 takes its "
                                             "module's absmax, never a zero scale")),
    case("ptq-input-scales-all-zero-inputs", lambda: _input_scales(_batch(x=jnp.zeros((2, 4, 16)))),
         Documented(_all_zero_scale, doc="input_scales docstring: a module whose inputs were all 0 stores "
                                         "TINY (the absmax rule's floor); the model runs finite")),
    case("ptq-input-scales-nan-range", _nan_range,
         Raises(r"input_scales: the calibrated range of module 'dense_0' holds NaN.*allowed: finite ranges")),
    case("ptq-input-scales-not-a-range",
         lambda: ptq.input_scales(_model(), _vars(), A8, {"dense_0": 1.0, "head": 1.0}, _batch()),
         Raises(r"ranges\['dense_0'\] is a float; allowed: a qjax.ptq.Range", exc=TypeError)),
    case("ptq-input-scales-missing-module",
         lambda: ptq.input_scales(_model(), _vars(), A8, {}, _batch()),
         Raises(r"no calibrated range for module 'dense_0'; calibrated: \[\]")),
    # STE fine-tuning and PV-tuning
    case("ptq-ste-steps-negative", lambda: _ste(steps=-1), Raises(r"steps=-1 must be an integer >= 0")),
    case("ptq-ste-steps-float", lambda: _ste(steps=2.5), Raises(r"steps=2.5 must be an integer >= 0")),
    case("ptq-ste-learning-rate-nan", lambda: _ste(learning_rate=float("nan")),
         Raises(r"learning_rate=nan.*allowed: a finite number >= 0")),
    case("ptq-ste-learning-rate-negative", lambda: _ste(learning_rate=-1e-3),
         Raises(r"learning_rate=-0.001.*allowed: a finite number >= 0")),
    case("ptq-ste-rules-match-nothing", lambda: ptq.ste_finetune(
        _model(), _vars(), [Rule("nothing", weight=Quantizer("int4"))], [_batch()], steps=1),
         _MATCH_NOTHING),
    case("ptq-pv-tau-zero", lambda: _pv(tau=0), Raises(r"tau=0 must be in \(0, 1\]")),
    case("ptq-pv-tau-nan", lambda: _pv(tau=float("nan")), Raises(r"tau=nan must be in \(0, 1\]")),
    case("ptq-pv-steps-bool", lambda: _pv(steps=True), Raises(r"steps=True must be an integer >= 0")),
    case("ptq-pv-learning-rate-negative", lambda: _pv(v_learning_rate=-0.01),
         Raises(r"v_learning_rate=-0.01.*allowed: a finite number >= 0")),
    case("ptq-pv-batches-of-two-shapes",
         lambda: ptq.pv_tuning(_model(), _vars(), W4, [_batch(), {k: v[:1] for k, v in _batch().items()}],
                               steps=1),
         Raises(r"batch 1 has shapes.*allowed: batches of one shape")),
    case("ptq-pv-nf4", lambda: ptq.pv_tuning(_model(), _vars(), NF4, [_batch()], steps=1),
         Raises(r"format 'nf4'; allowed: scalar integer grids")),
    case("ptq-pv-frozen-start-without-teacher",
         lambda: ptq.pv_tuning(_model(), _rtn(), W4, [_batch()], steps=1),
         Raises(r"already quantized; pass teacher=")),
    case("ptq-top-tau-mask-tau-above-one", lambda: ptq.top_tau_mask(jnp.ones(8), 2.0),
         Raises(r"tau=2.0 must be in \(0, 1\]")),
    case("ptq-requantize-subspace-buffer-shape",
         lambda: ptq.requantize_subspace(quantize(_Q, jnp.ones((32, 8))), jnp.ones((8, 32)), 0.1),
         Raises(r"buffer has shape \(8, 32\); allowed: \(32, 8\)")),
    case("ptq-gptq-per-tensor-zero-weight", lambda: _gptq_layer(q=Quantizer("int4", PerTensor()),
                                                                 w=jnp.zeros((32, 8))),
         Documented(lambda qa: (np.testing.assert_array_equal(np.asarray(dequantize(qa)), 0.0)),
                    doc="an all-zero weight quantizes to 0 without NaN (DESIGN: all-zero tensors)")),
]
