"""Every PTQ method on an NNX model: the per-token MLP of conftest written in NNX with the Linen model's
weights copied in gives the same ranges, codes and scales as the Linen model (RTN and GPTQ), runs frozen
(PackedWeight, packed matmul) with the Linen frozen variables' output, and STE / PV-tuning beat RTN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qjax import PerGroup, PerTensor, QArray, Quantizer, Rule, ptq
from qjax import linen as ql
from qjax import nnx as qn
from qjax.qarray import unpack

W3 = [Rule(".*", types=("Dense", "Linear"), weight=Quantizer("int3", PerGroup(0, 16), "minmax"), name="w3")]
W2 = [Rule(".*", types=("Dense", "Linear"), weight=Quantizer("int2", PerGroup(0, 16), "minmax"), name="w2")]
NAMES = ("dense_0", "dense_1", "head")


class NnxTokenMLP(nnx.Module):
    """conftest's ``TokenMLP`` in NNX: the same three layers, names and call."""

    def __init__(self, rngs):
        self.dense_0, self.dense_1 = nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 64, rngs=rngs)
        self.head = nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x, attention_mask=None):
        del attention_mask
        h = nnx.gelu(self.dense_0(x))
        return self.head(nnx.gelu(self.dense_1(h)))


def nnx_copy(variables) -> NnxTokenMLP:
    """A fresh NNX model holding the Linen model's weights."""
    model = NnxTokenMLP(nnx.Rngs(0))
    for name in NAMES:
        layer = getattr(model, name)
        layer.kernel.set_value(variables["params"][name]["kernel"])
        layer.bias.set_value(variables["params"][name]["bias"])
    return model


def run_nnx(model, batch):
    return nnx.jit(lambda m, b: m(**b))(model, batch)


def run_linen(model, rules, frozen, batch):
    qmodel = ql.quantize_model(model, rules)
    return jax.jit(lambda v, b: qmodel.apply(v, **b))(frozen, batch)


def error(outputs, model, variables, batches):
    return sum(float(jnp.mean((y - model.apply(variables, **b)) ** 2)) for y, b in zip(outputs, batches,
                                                                                       strict=True))


def assert_same_qarrays(frozen, model):
    for name in NAMES:
        a, b = frozen["params"][name]["kernel"], getattr(model, name).kernel
        assert isinstance(b, qn.PackedWeight) and isinstance(a, QArray)
        b = b.qarray
        assert a.packing == b.packing and a.format == b.format and a.shape == b.shape
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)
        np.testing.assert_array_equal(a.zero_point, b.zero_point)
        np.testing.assert_array_equal(getattr(model, name).bias.get_value(), frozen["params"][name]["bias"])


def test_calibration_ranges_and_input_scales_match_linen(mlp):
    model, variables, batches = mlp
    rules = [Rule(".*", types=("Dense", "Linear"), weight=Quantizer("int8"),
                  input=Quantizer("int8", PerTensor(), "given"))]
    linen_ranges = ptq.calibrate(model, variables, rules, batches)
    nnx_model = nnx_copy(variables)
    nnx_ranges = ptq.calibrate(nnx_model, None, rules, batches)
    assert sorted(nnx_ranges) == sorted(linen_ranges) == list(NAMES)
    for name in NAMES:
        np.testing.assert_array_equal(nnx_ranges[name].channel_absmax, linen_ranges[name].channel_absmax)
    assert not hasattr(nnx_model, qn.HPARAMS)  # calibration does not touch the model
    calibrated = ptq.input_scales(model, variables, rules, linen_ranges, batches[0])
    assert ptq.input_scales(nnx_model, None, rules, nnx_ranges, batches[0]) is nnx_model
    for name in NAMES:
        np.testing.assert_array_equal(getattr(nnx_model, name).input_qscale.get_value(),
                                      calibrated["quant"][name]["__input__"])
    # RTN on the calibrated model keeps its input scales, as Linen's frozen variables do
    frozen = ptq.rtn(model, calibrated, rules, batches[0])
    ptq.rtn(nnx_model, None, rules, batches[0])
    assert_same_qarrays(frozen, nnx_model)
    np.testing.assert_array_equal(nnx_model.dense_1.input_qscale.get_value(),
                                  calibrated["quant"]["dense_1"]["__input__"])
    np.testing.assert_allclose(run_nnx(nnx_model, batches[0]), run_linen(model, rules, frozen, batches[0]),
                               rtol=1e-6, atol=1e-6)


def test_rtn_and_gptq_give_the_same_codes_and_scales_and_run_frozen(mlp):
    model, variables, batches = mlp
    for method in ("rtn", "gptq"):
        nnx_model = nnx_copy(variables)
        if method == "rtn":
            frozen = ptq.rtn(model, variables, W3, batches[0])
            assert ptq.rtn(nnx_model, None, W3, batches[0]) is nnx_model
        else:
            frozen = ptq.gptq(model, variables, W3, batches)
            assert ptq.gptq(nnx_model, None, W3, batches) is nnx_model
        assert_same_qarrays(frozen, nnx_model)
        assert set(qn.paths(nnx_model).values()) == {qn.PACKED}
        for b in batches[:2]:
            np.testing.assert_allclose(run_nnx(nnx_model, b), run_linen(model, W3, frozen, b), rtol=1e-6,
                                       atol=1e-6)


def test_one_pass_hessians_match_linen(mlp):
    model, variables, batches = mlp
    modules = [("dense_0",), ("head",)]
    linen = ptq.hessians(model, variables, batches, modules)
    nnx_h = ptq.hessians(nnx_copy(variables), None, batches, modules)
    for m in modules:
        np.testing.assert_array_equal(nnx_h[m], linen[m])


def test_ste_and_pv_tuning_on_nnx_beat_rtn(mlp):
    model, variables, batches = mlp
    rtn_model = ptq.rtn(nnx_copy(variables), None, W2, batches[0])
    rtn_error = error([run_nnx(rtn_model, b) for b in batches], model, variables, batches)

    ste_model, losses = ptq.ste_finetune(nnx_copy(variables), None, W2, batches, steps=30, learning_rate=3e-3)
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    kernel = ste_model.dense_0.kernel
    assert isinstance(kernel, qn.PackedWeight) and kernel.qarray.format == "int2"
    assert error([run_nnx(ste_model, b) for b in batches], model, variables, batches) < rtn_error

    start = ptq.gptq(nnx_copy(variables), None, W2, batches)
    before = {n: np.asarray(unpack(getattr(start, n).kernel.qarray).codes) for n in NAMES}
    scale_before = np.asarray(unpack(start.head.kernel.qarray).scale)
    with pytest.raises(ValueError, match="pass teacher="):
        ptq.pv_tuning(start, None, W2, batches, steps=1)
    pv_model, losses = ptq.pv_tuning(start, None, W2, batches, teacher=nnx_copy(variables), steps=20,
                                     p_learning_rate=1e-3, tau=0.01)
    assert pv_model is start and np.mean(losses[-3:]) < np.mean(losses[:3])
    changed = {n: int(np.sum(before[n] != np.asarray(unpack(getattr(pv_model, n).kernel.qarray).codes)))
               for n in NAMES}
    assert all(changed[n] <= 20 * np.ceil(0.01 * before[n].size) for n in NAMES)  # at most tau per V step
    assert not np.allclose(unpack(pv_model.head.kernel.qarray).scale, scale_before)  # the P step moved them
    assert error([run_nnx(pv_model, b) for b in batches], model, variables, batches) < rtn_error


def test_nnx_call_errors(mlp):
    model, variables, batches = mlp
    nnx_model = nnx_copy(variables)
    with pytest.raises(ValueError, match="pass variables=None"):
        ptq.rtn(nnx_model, variables, W3, batches[0])
    with pytest.raises(ValueError, match="needs its variables"):
        ptq.rtn(model, None, W3, batches[0])
    with pytest.raises(ValueError, match=r"no weight matched|matches no module path"):
        ptq.gptq(nnx_model, None, [Rule("nothing", weight=Quantizer("int4"))], batches)
    assert not hasattr(nnx_model, qn.HPARAMS)  # a failed method leaves the model as it was


def test_tunix_llama3_einsum_inputs_are_captured_and_gptq_beats_rtn():
    """Tunix's Llama3 (NNX, code nobody here wrote): its attention projections contract ``w`` inside
    ``jnp.einsum``; the captured input of q, k and v is the same normed hidden state, and GPTQ of the
    MLP's nnx.Linear layers beats RTN on the logits."""
    import flax

    before = flax.config.flax_always_shard_variable
    pytest.importorskip("tunix")
    flax.config.update("flax_always_shard_variable", before)  # importing tunix flips it process-wide
    from tests.clients.models import tunix_llama3

    client = tunix_llama3(num_layers=1)
    qkv = Rule(r"layers/\d+/attn/[qkv]_proj", weight=Quantizer("int8"), weight_names=("w",))
    ranges = ptq.calibrate(client.model, None, [qkv], [client.inputs])
    assert sorted(ranges) == [f"layers/0/attn/{m}_proj" for m in "kqv"]
    for m in "kv":
        np.testing.assert_array_equal(ranges[f"layers/0/attn/{m}_proj"].channel_absmax,
                                      ranges["layers/0/attn/q_proj"].channel_absmax)
    mlp = [Rule(r"layers/\d+/mlp/.*", weight=Quantizer("int3", PerGroup(0, 16), "minmax"))]
    reference = nnx.jit(client.forward)(client.model, client.inputs)

    def logits_error(model):
        return float(jnp.mean((nnx.jit(client.forward)(model, client.inputs) - reference) ** 2))

    rtn_error = logits_error(ptq.rtn(tunix_llama3(num_layers=1).model, None, mlp, client.inputs))
    frozen = ptq.gptq(client.model, None, mlp, [client.inputs])
    assert isinstance(frozen.layers[0].mlp.up_proj.kernel, qn.PackedWeight)
    assert logits_error(frozen) < rtn_error


def test_rtn_of_a_scanned_stack_is_per_layer_and_equals_the_front_ends_freeze():
    """Layers stacked by nnx.vmap and run by nnx.scan: RTN quantizes each layer on its own, exactly as
    ``qjax.nnx.freeze`` does; GPTQ and calibration, which need inputs inside the scan, say so."""
    from tests.test_front_ends import Stack, X

    rules = [Rule(".*", weight=Quantizer("int4", PerGroup(0, 4), "minmax"))]
    model, reference = Stack(nnx.Rngs(0)), Stack(nnx.Rngs(0))
    ptq.rtn(model, None, rules, {"x": X})
    qn.quantize_model(reference, rules, X)
    qn.freeze(reference)
    for name in ("up", "down"):
        a, b = getattr(model.blocks, name).kernel.qarray, getattr(reference.blocks, name).kernel.qarray
        assert a.codes.shape[0] == 3 and a.packing == b.packing
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(run_nnx(model, {"x": X}), run_nnx(reference, {"x": X}))
    with pytest.raises(ValueError, match=r"is stacked .* inputs inside a scan cannot be captured"):
        ptq.gptq(Stack(nnx.Rngs(0)), None, rules, [{"x": X}])
    with pytest.raises(ValueError, match="inside a scan cannot be captured"):
        ptq.calibrate(Stack(nnx.Rngs(0)), None, rules, [{"x": X}])
