"""RTN and GPTQ on whole models: frozen packed QArrays, lower output error for GPTQ, real bytes; a small
random FlaxBertModel quantized by rules with padding masked out of the Hessians."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import PerChannel, PerGroup, QArray, Quantizer, Rule
from qjax.linen import quantize_model
from qjax.ptq import gptq, hessians, rtn
from qjax.summary import summary

W3 = [Rule(".*", types=("Dense",), weight=Quantizer("int3", PerGroup(0, 16), "minmax"), name="w3")]


def _error(model, rules, variables, frozen, batches):
    qmodel = quantize_model(model, rules)
    fn = jax.jit(lambda v, b: qmodel.apply(v, **b))
    return sum(float(jnp.mean((fn(frozen, b) - model.apply(variables, **b)) ** 2)) for b in batches)


def test_rtn_and_gptq_freeze_to_packed_qarrays(mlp):
    model, variables, batches = mlp
    frozen_rtn = rtn(model, variables, W3, batches[0])
    frozen_gptq = gptq(model, variables, W3, batches)
    for frozen in (frozen_rtn, frozen_gptq):
        kernel = frozen["params"]["dense_1"]["kernel"]
        assert isinstance(kernel, QArray) and kernel.packing is not None and kernel.shape == (64, 64)
        assert not isinstance(frozen["params"]["dense_1"]["bias"], QArray)
    qmodel = quantize_model(model, W3)
    info = summary(qmodel, frozen_gptq, **batches[0])
    float_bytes = summary(qmodel, variables, **batches[0]).real_bytes
    assert info.real_bytes < 0.35 * float_bytes
    gptq_error = _error(model, W3, variables, frozen_gptq, batches)
    assert gptq_error < _error(model, W3, variables, frozen_rtn, batches)


def test_one_pass_hessians_are_2xtx_over_real_tokens(mlp):
    model, variables, batches = mlp
    h = hessians(model, variables, batches, [("dense_0",)])[("dense_0",)]
    rows = np.concatenate([np.asarray(b["x"])[np.asarray(b["attention_mask"]) > 0] for b in batches])
    np.testing.assert_allclose(h, 2 * rows.T @ rows / len(rows), rtol=1e-4, atol=1e-5)


def test_sequential_and_one_pass_both_beat_rtn(mlp):
    model, variables, batches = mlp
    rtn_error = _error(model, W3, variables, rtn(model, variables, W3, batches[0]), batches)
    one_pass = gptq(model, variables, W3, batches, sequential=False, act_order=True)
    assert _error(model, W3, variables, one_pass, batches) < rtn_error


def test_model_level_errors(mlp):
    model, variables, batches = mlp
    with pytest.raises(ValueError, match="matches no module path"):
        gptq(model, variables, [Rule("nothing", weight=Quantizer("int4"))], batches)
    with pytest.raises(ValueError, match="layer head"):
        gptq(model, variables, [Rule("head", weight=Quantizer("int4", PerGroup(0, 48)))], batches)


transformers = pytest.importorskip("transformers", reason="transformers<5 is in the test extras")


def test_gptq_on_flax_bert_by_rules():
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,  # one kernel shape:
                                     num_attention_heads=4, intermediate_size=32, max_position_embeddings=16)
    bert = transformers.FlaxBertModel(config, seed=0)
    variables = {"params": bert.params}
    ids = jax.random.randint(jax.random.key(0), (8, 12), 1, 64)
    mask = (jnp.arange(12)[None] < jnp.arange(5, 13)[:, None]).astype(jnp.int32)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": jnp.zeros_like(ids),
             "position_ids": jnp.broadcast_to(jnp.arange(12), ids.shape)}
    rules = [Rule(r"encoder/layer/\d+/.*", types=("Dense",), weight=Quantizer("int4", PerChannel(-1)))]
    kw = {"apply_kwargs": {"deterministic": True}}
    frozen = gptq(bert.module, variables, rules, [batch], **kw)
    layer = frozen["params"]["encoder"]["layer"]
    assert all(isinstance(layer[i]["attention"]["self"][m]["kernel"], QArray)
               for i in "01" for m in ("query", "key", "value"))
    assert not isinstance(frozen["params"]["pooler"]["dense"]["kernel"], QArray)
    qmodel = quantize_model(bert.module, rules)
    out = lambda v: qmodel.apply(v, **batch, deterministic=True)[0]
    ref = bert.module.apply(variables, **batch, deterministic=True)[0]
    err = lambda v: float(jnp.mean(((out(v) - ref) * mask[..., None]) ** 2))
    assert err(frozen) < err(rtn(bert.module, variables, rules, batch, **kw))


def test_no_calibration_input_is_refused_or_rounded_to_nearest_never_zeroed(mlp):
    """Issue 12: an inverted mask used to zero every weight silently."""
    model, variables, batches = mlp
    masked = [{**b, "attention_mask": jnp.zeros_like(b["attention_mask"])} for b in batches]
    with pytest.raises(ValueError, match="every token of every batch is masked"):
        gptq(model, variables, W3, masked)
    zeros = [{**b, "x": jnp.zeros_like(b["x"])} for b in batches[:1]]  # dense_0 sees only 0 inputs
    with pytest.warns(UserWarning, match="layer dense_0/kernel received no calibration input"):
        frozen = gptq(model, variables, W3, zeros)
    got, want = (np.asarray(f["params"]["dense_0"]["kernel"].unpack().codes)
                 for f in (frozen, rtn(model, variables, W3, batches[0])))
    np.testing.assert_array_equal(got, want)
    assert np.count_nonzero(got) > 0
    nan_padding = [{**b, "x": jnp.where(b["attention_mask"][..., None] > 0, b["x"], jnp.nan)}
                   for b in batches]
    clean = gptq(model, variables, W3, batches)
    spiked = gptq(model, variables, W3, nan_padding)
    for name in ("dense_0", "dense_1", "head"):  # NaN in padding tokens stays out of every Hessian
        np.testing.assert_array_equal(spiked["params"][name]["kernel"].codes,
                                      clean["params"][name]["kernel"].codes)
