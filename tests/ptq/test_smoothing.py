"""SmoothQuant and AWQ: the input transform is exact in float, the frozen model divides its inputs in the core
on every path, Linen and NNX give the same divisors and codes, and on inputs with outlier channels both beat
plain rounding where the papers say they should (W8A8 for SmoothQuant, low-bit weights for AWQ)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qjax import PerChannel, PerGroup, PerToken, Quantizer, Rule, dequantize, fake_quant, presets, ptq
from qjax import linen as ql
from qjax import nnx as qn
from qjax.input_transform import DIVISOR, SIGNS, transform_input, transform_weight
from qjax.ptq import smoothing
from qjax.ptq.layers import weight, with_weights
from tests.clients.models import tokens, tunix_llama3
from tests.ptq.conftest import TokenMLP, make_batches
from tests.ptq.test_nnx_ptq import NAMES, nnx_copy, run_linen, run_nnx

W8A8 = [Rule(".*", types=("Dense", "Linear"), weight=Quantizer("int8", PerChannel(-1)),
             input=Quantizer("int8", PerToken(-1)), name="w8a8")]
W3 = [Rule(".*", types=("Dense", "Linear"), weight=Quantizer("int3", PerGroup(0, 16)), name="w3")]
# the layer whose input holds the outlier channels, alone: its error is the model's
FIRST_W8A8 = [Rule("dense_0", weight=Quantizer("int8", PerChannel(-1)), input=Quantizer("int8", PerToken(-1)),
                   name="w8a8")]


def outlier_batches(n=3, scale=30.0):
    """conftest's batches with two input channels 30x larger: the activation outliers SmoothQuant and AWQ
    exist for."""
    out = []
    for b in make_batches(n):
        out.append({**b, "x": b["x"].at[..., :2].multiply(scale)})
    return out


@pytest.fixture(scope="module")
def outliers():
    model = TokenMLP()
    batches = outlier_batches()
    variables = model.init(jax.random.key(0), **batches[0])
    return model, variables, batches


def output_error(model, rules, frozen, variables, batches):
    ref = [model.apply(variables, **b) for b in batches]
    got = [run_linen(model, rules, frozen, b) for b in batches]
    return sum(float(jnp.sum((g - r) ** 2)) for g, r in zip(got, ref, strict=True))


def test_transform_is_exact_in_float():
    x = jax.random.normal(jax.random.key(0), (5, 7, 16))
    w = jax.random.normal(jax.random.key(1), (16, 9))
    s = {DIVISOR: jnp.exp(jax.random.normal(jax.random.key(2), (16,)))}
    np.testing.assert_allclose(transform_input(s, x) @ transform_weight(s, w), x @ w, rtol=1e-5, atol=1e-5)
    w3 = w.reshape(4, 4, 9)
    s3 = {DIVISOR: s[DIVISOR].reshape(4, 4)}
    got = jnp.tensordot(transform_input(s3, x.reshape(5, 7, 4, 4)), transform_weight(s3, w3), 2)
    np.testing.assert_allclose(got, x @ w, rtol=1e-5, atol=1e-5)


def test_frozen_model_divides_its_inputs_in_the_core(outliers):
    # The frozen output equals the hand computation Q_x(x / s) . dequant(Q(diag(s) W)) layer by layer.
    model, variables, batches = outliers
    frozen = ptq.smoothquant(model, variables, W8A8, batches)
    quant = frozen["quant"]
    b = batches[0]
    h = b["x"]
    for i, name in enumerate(NAMES):
        s = quant[name][ql.TRANSFORM_KEY][DIVISOR]
        assert s.shape == (h.shape[-1],) and bool(jnp.all(s > 0))
        xq = fake_quant(W8A8[0].input, h / s)
        h = xq @ dequantize(frozen["params"][name]["kernel"]) + variables["params"][name]["bias"]
        if i < 2:
            h = jax.nn.gelu(h)
    np.testing.assert_allclose(run_linen(model, W8A8, frozen, b), h, rtol=2e-4, atol=2e-4)
    assert ql.quantize_model(model, W8A8).paths(frozen, **b)["dense_0"].startswith("packed")


def test_smoothquant_formula_and_w8a8_gain(outliers):
    model, variables, batches = outliers
    frozen = ptq.smoothquant(model, variables, FIRST_W8A8, batches, alpha=0.5)
    x_max = jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.where(b["attention_mask"][..., None] > 0, b["x"], 0)),
                                       axis=(0, 1)) for b in batches]), axis=0)
    w_max = jnp.max(jnp.abs(variables["params"]["dense_0"]["kernel"]), axis=1)
    np.testing.assert_allclose(frozen["quant"]["dense_0"][ql.TRANSFORM_KEY][DIVISOR],
                               jnp.maximum(jnp.sqrt(x_max / w_max), 1e-5), rtol=1e-5)
    rtn = ptq.rtn(model, variables, FIRST_W8A8, batches[0])
    e_rtn, e_sq = (output_error(model, FIRST_W8A8, f, variables, batches) for f in (rtn, frozen))
    assert e_sq < 0.5 * e_rtn, (e_sq, e_rtn)
    searched = ptq.smoothquant(model, variables, FIRST_W8A8, batches, alphas=np.linspace(0, 1, 11))
    assert output_error(model, FIRST_W8A8, searched, variables, batches) <= e_sq * 1.05


def test_awq_beats_rtn_and_gptq_variant(outliers):
    model, variables, batches = outliers
    rtn = ptq.rtn(model, variables, W3, batches[0])
    e_rtn = output_error(model, W3, rtn, variables, batches)
    e_awq = output_error(model, W3, ptq.awq(model, variables, W3, batches), variables, batches)
    e_awq_gptq = output_error(model, W3, ptq.awq(model, variables, W3, batches, method="gptq"), variables,
                              batches)
    assert e_awq < e_rtn, (e_awq, e_rtn)
    assert e_awq_gptq < e_rtn, (e_awq_gptq, e_rtn)


def test_nnx_gives_the_linen_divisors_codes_and_output(outliers):
    model, variables, batches = outliers
    frozen = ptq.awq(model, variables, W3, batches)
    nmodel = ptq.awq(nnx_copy(variables), None, W3, batches)
    for name in NAMES:
        layer = getattr(nmodel, name)
        np.testing.assert_allclose(getattr(layer, qn.INPUT_TRANSFORM).get_value()[DIVISOR],
                                   frozen["quant"][name][ql.TRANSFORM_KEY][DIVISOR], rtol=1e-6)
        np.testing.assert_array_equal(dequantize(layer.kernel.qarray),
                                      dequantize(frozen["params"][name]["kernel"]))
    np.testing.assert_allclose(run_nnx(nmodel, batches[0]), run_linen(model, W3, frozen, batches[0]),
                               rtol=1e-5, atol=1e-5)


def test_a_transformed_model_is_no_start_and_bad_arguments_are_named(outliers):
    model, variables, batches = outliers
    frozen = ptq.awq(model, variables, W3, batches[:1], n_grid=2)
    with pytest.raises(ValueError, match=r"carry input transforms.*allowed: start from the float model"):
        ptq.gptq(model, frozen, W3, batches)
    with pytest.raises(ValueError, match=r"n_grid=0; allowed: a positive integer"):
        ptq.awq(model, variables, W3, batches, n_grid=0)
    with pytest.raises(ValueError, match=r"alphas=\[1.5\]; allowed: numbers in \[0, 1\]"):
        ptq.smoothquant(model, variables, W8A8, batches, alphas=[1.5])
    with pytest.raises(ValueError, match=r"method='pv'; allowed: rtn, gptq"):
        ptq.awq(model, variables, W3, batches, method="pv")


def test_hadamard_rotation_is_exact_in_float_and_beats_rtn_on_outliers(outliers):
    model, variables, batches = outliers
    key = jax.random.key(3)
    # exact in float: (x R)(R^T W) = x W through the frozen model's transform path, 8-bit weights and inputs
    x = batches[0]["x"]
    t = {SIGNS: jnp.where(jax.random.bernoulli(key, 0.5, (16,)), 1.0, -1.0)}
    w = variables["params"]["dense_0"]["kernel"]
    np.testing.assert_allclose(transform_input(t, x, "xla") @ transform_weight(t, w, "xla"), x @ w,
                               rtol=1e-5, atol=1e-5)
    rtn = ptq.rtn(model, variables, FIRST_W8A8, batches[0])
    rotated = ptq.hadamard(model, variables, FIRST_W8A8, batches, key=key, method="rtn")
    signs = rotated["quant"]["dense_0"][ql.TRANSFORM_KEY][SIGNS]
    assert signs.shape == (16,) and set(np.unique(np.asarray(signs))) <= {-1.0, 1.0}
    e_rtn, e_rot = (output_error(model, FIRST_W8A8, f, variables, batches) for f in (rtn, rotated))
    assert e_rot < 0.5 * e_rtn, (e_rot, e_rtn)
    e_gptq = output_error(model, FIRST_W8A8, ptq.hadamard(model, variables, FIRST_W8A8, batches, key=key),
                          variables, batches)
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


NVFP4 = [Rule(".*", types=("Dense", "Linear"), weight=presets.nvfp4(0), input=presets.nvfp4(-1),
              name="nvfp4")]
MXFP4 = [Rule("dense_1", weight=presets.mxfp4(0), input=presets.mxfp4(-1), name="mxfp4")]


@pytest.mark.parametrize("rules", [NVFP4, MXFP4], ids=["nvfp4", "mxfp4"])
def test_block_formats_smooth_rotate_and_solve(outliers, rules):
    # MX / NVFP4 weights and inputs: every method runs, keeps the block format and its stored scales, and
    # does better than plain rounding (NVFP4 on every layer, dense_0's inputs with outlier channels)
    model, variables, batches = outliers
    key = jax.random.key(4)
    rtn = ptq.rtn(model, variables, rules, batches[0])
    runs = {"gptq": ptq.gptq(model, variables, rules, batches),
            "smoothquant": ptq.smoothquant(model, variables, rules, batches, alphas=(0.3, 0.5, 0.7)),
            "awq": ptq.awq(model, variables, rules, batches),
            "hadamard": ptq.hadamard(model, variables, rules, batches, key=key)}
    e_rtn = output_error(model, rules, rtn, variables, batches)
    name = rules[0].path if rules is MXFP4 else "dense_0"
    for method, frozen in runs.items():
        got, want = frozen["params"][name]["kernel"], rtn["params"][name]["kernel"]
        assert got.format == want.format and got.scale.dtype == want.scale.dtype, method
        assert (got.tensor_scale is None) == (want.tensor_scale is None), method
        e = output_error(model, rules, frozen, variables, batches)
        assert np.isfinite(e), method
        if rules is NVFP4 or method in ("gptq", "hadamard"):
            assert e < e_rtn, (method, e, e_rtn)
        elif method == "awq":  # a = 0 is plain rounding: never worse, here (no outliers) equal
            assert e <= e_rtn, (method, e, e_rtn)
        # (dense_1's inputs, GELU outputs, hold no outlier channels: SmoothQuant has nothing to move there)


# --- einsum (N-d) layers: Tunix's Llama3 ----------------------------------------------------------------

LLAMA_W4A8 = [Rule(r"layers/.*", weight=Quantizer("int4", PerChannel(-1)),
                   input=Quantizer("int8", PerToken(-1)), weight_names=("kernel", "w"), name="w4a8")]


def recorded_finish(monkeypatch) -> list:
    """Record every call of the smoothing methods' last step: the view, the layers, the float params (folded
    producers included), each layer's transform and the transforms stored on the modules."""
    calls = []
    original = smoothing._finish

    def spy(view, layers, params, transforms, method, hess, stored=None, new_params=False):
        calls.append((view, layers, params, transforms, transforms if stored is None else stored))
        return original(view, layers, params, transforms, method, hess, stored, new_params)

    monkeypatch.setattr(smoothing, "_finish", spy)
    return calls


def float_transformed(call, batch):
    """The outputs of the float model as a method transformed it: each quantized weight ``T(W)`` in float
    (``R^T diag(s) W``), the folded producers, and the stored input transforms applied by the core with
    quantization switched off (``enabled=0``). Exact transforms give the float model's outputs."""
    view, layers, params, transforms, stored = call
    params = with_weights(params, {layer.path: transform_weight(transforms.get(layer.module) or {},
                                                                 weight(params, layer)) for layer in layers})
    stored = {module: t for module, t in stored.items() if t}
    off = {"enabled": jnp.zeros((), jnp.float32)}
    if view.front_end == "nnx":
        model = nnx.merge(view.graphdef, params, view.rest)
        qn.quantize_model(model, view.rules, hparams={"enabled": 0.0}, **batch)
        modules = {"/".join(str(p) for p in path): m for path, m in nnx.iter_modules(model)}
        for module, t in stored.items():
            setattr(modules["/".join(module)], qn.INPUT_TRANSFORM, qn.InputTransform(dict(t)))
        return nnx.jit(lambda m, b: m(**b))(model, batch)
    quant = {}
    for module, t in stored.items():
        quant = ql.set_path(quant, (*module, ql.TRANSFORM_KEY), dict(t))
    run = jax.jit(lambda v, b: view.qmodel.apply(v, **b, hparams=off))
    return run({**view.rest, "params": params, "quant": quant}, batch)


def assert_same_outputs(got, want, rtol=1e-5):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert float(jnp.max(jnp.abs(g - w))) <= rtol * float(jnp.max(jnp.abs(w))), \
            (float(jnp.max(jnp.abs(g - w))), float(jnp.max(jnp.abs(w))))


def llama_batches():
    client = tunix_llama3()
    return client, [{**client.inputs, "input_tokens": tokens(seed=s)} for s in range(2)]


def logits_error(client, model, batches, ref):
    run = nnx.jit(client.forward)
    return sum(float(jnp.sum((run(model, b) - r) ** 2)) for b, r in zip(batches, ref, strict=True))


@pytest.fixture(scope="module")
def llama_runs():
    """RTN, SmoothQuant (folded where exact) and AWQ (explicit divides) of Tunix's Llama3 at W4A8:
    ``{name: (frozen model, logits error on the calibration batches, the recorded last step)}``, the
    batches and the float logits."""
    client, batches = llama_batches()
    ref = [nnx.jit(client.forward)(client.model, b) for b in batches]
    methods = {"rtn": lambda m: ptq.rtn(m, None, LLAMA_W4A8, batches[0]),
               "smoothquant": lambda m: ptq.smoothquant(m, None, LLAMA_W4A8, batches),
               "awq": lambda m: ptq.awq(m, None, LLAMA_W4A8, batches, fold="never")}
    runs = {}
    with pytest.MonkeyPatch.context() as mp:
        calls = recorded_finish(mp)
        for name, run in methods.items():
            model = run(nnx.clone(client.model))
            last = calls[-1] if name != "rtn" else None
            runs[name] = (model, logits_error(client, model, batches, ref), last)
    return {"client": client, "batches": batches, "ref": ref, "runs": runs}


def test_smoothing_freezes_the_einsum_layers_of_llama3(llama_runs):
    for name in ("smoothquant", "awq"):
        model, error, _ = llama_runs["runs"][name]
        attn = model.layers[0].attn
        for layer in (attn.q_proj, attn.o_proj, model.layers[1].mlp.down_proj):
            w = layer.w if hasattr(layer, "w") else layer.kernel
            assert isinstance(w, qn.PackedWeight) and w.qarray.format == "int4", name
        o = getattr(attn.o_proj, qn.INPUT_TRANSFORM).get_value()[DIVISOR]  # o_proj contracts (N, H) = (4, 8)
        assert o.shape == (4, 8) and bool(jnp.all(o > 0))
        q = getattr(attn.q_proj, qn.INPUT_TRANSFORM, None)
        if name == "smoothquant":
            assert q is None  # folded into the attention norm (tests/ptq/test_folding.py)
        else:
            assert q.get_value()[DIVISOR].shape == (32,)
        assert np.isfinite(error)
    # the float model with the transformed weights, the folded norms and the stored (4, 8) divisors
    call = llama_runs["runs"]["smoothquant"][2]
    assert_same_outputs(float_transformed(call, llama_runs["batches"][0]), llama_runs["ref"][0])


def test_w4a8_errors_on_llama3(llama_runs):
    # AWQ's search includes a = 0 (plain rounding) and its paper claims low-bit weights: better than RTN
    # (282 vs 357 here). Not asserted, as their claims do not cover this model: SmoothQuant at a = 0.5 (400;
    # the paper's claim is W8A8, where it gives 2.2 vs RTN's 2.9) and the rotation with RTN (375: the tiny
    # model's random weights and inputs have no outlier channels to spread; with GPTQ it gives 113).
    e = {name: run[1] for name, run in llama_runs["runs"].items()}
    assert e["awq"] < e["rtn"], e


def test_hadamard_rotates_the_chosen_einsum_layers_of_llama3(llama_runs, monkeypatch):
    client, batches = llama_runs["client"], llama_runs["batches"]
    calls = recorded_finish(monkeypatch)
    model = ptq.hadamard(nnx.clone(client.model), None, LLAMA_W4A8, batches[:1], key=jax.random.key(1),
                         method="rtn", paths=r"layers/\d+/attn/(o|q)_proj")
    for i in range(2):
        attn, mlp = model.layers[i].attn, model.layers[i].mlp
        for layer in (attn.o_proj, attn.q_proj):  # o_proj: over (N, H) flattened, 4 * 8 channels
            signs = getattr(layer, qn.INPUT_TRANSFORM).get_value()[SIGNS]
            assert signs.shape == (32,) and set(np.unique(np.asarray(signs))) <= {-1.0, 1.0}
        for layer in (attn.k_proj, attn.v_proj, mlp.up_proj, mlp.down_proj):
            assert not hasattr(layer, qn.INPUT_TRANSFORM)
            assert isinstance(layer.w if hasattr(layer, "w") else layer.kernel, qn.PackedWeight)
    assert_same_outputs(float_transformed(calls[-1], batches[0]), llama_runs["ref"][0])
    with pytest.raises(ValueError, match=r"paths='mlp' matches none of the quantized modules"):
        ptq.hadamard(client.model, None, LLAMA_W4A8, batches[:1], key=jax.random.key(1), paths="mlp")
    with pytest.raises(ValueError, match=r"paths='\(' is not a regular expression"):
        ptq.hadamard(client.model, None, LLAMA_W4A8, batches[:1], key=jax.random.key(1), paths="(")
