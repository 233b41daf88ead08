"""SmoothQuant's divisor folded into the producer of the input (qjax.ptq.folding), on code nobody here wrote
(Tunix's NNX Llama3) and on a Linen pre-norm block: q/k/v fold into the attention norm, gate/up into the MLP
norm, down into up_proj; the fold leaves the float model unchanged to 1e-5; folded and explicit-divide
models quantize alike; a non-linear or shared producer is refused and keeps the divide."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qjax import PerChannel, PerToken, Quantizer, Rule, ptq
from qjax import linen as ql
from qjax import nnx as qn
from qjax.input_transform import DIVISOR
from qjax.ptq import folding
from tests.ptq.test_smoothing import (
    LLAMA_W4A8,
    assert_same_outputs,
    float_transformed,
    llama_batches,
    recorded_finish,
)

W8A8 = [Rule(".*", weight=Quantizer("int8", PerChannel(-1)), input=Quantizer("int8", PerToken(-1)),
             name="w8a8")]
# q/k/v (D, N, H) scaled per output channel (N, H): v's output axes can take o's divisor
PER_HEAD = [Rule("block/(q|k|v)", weight=Quantizer("int8", PerChannel((-2, -1))),
                 input=Quantizer("int8", PerToken(-1)), name="qkv"), *W8A8]


def llama_expected(i: int) -> dict:
    p = f"layers/{i}"
    return {**{f"{p}/attn/{n}_proj": (f"{p}/input_layernorm/w",) for n in "qkv"},
            **{f"{p}/mlp/{n}_proj": (f"{p}/post_attention_layernorm/w",) for n in ("gate", "up")},
            f"{p}/mlp/down_proj": (f"{p}/mlp/up_proj/kernel",)}


def spread(y_a, y_b, ref):
    """``||a - b|| / ||b - ref||``: how far two quantized models are apart, relative to their error."""
    a, b, r = (np.asarray(jax.tree_util.tree_leaves(t)[0], np.float64) for t in (y_a, y_b, ref))
    return np.linalg.norm(a - b) / np.linalg.norm(b - r)


def test_llama3_folds_qkv_gate_up_and_down_and_keeps_the_model(monkeypatch):
    client, batches = llama_batches()
    ref = client.forward(client.model, batches[0])
    plan = ptq.smoothing_plan(client.model, None, LLAMA_W4A8, batches)
    assert plan.folds() == {**llama_expected(0), **llama_expected(1)}
    o = plan.group("layers/0/attn/o_proj")  # GQA: v_proj's (2, 8) heads are not o_proj's (4, 8)
    assert not o.folded and o.shape == (4, 8) and "no parameter scales the input exactly" in o.reason
    assert plan.group("layers/1/attn/k_proj").members == tuple(f"layers/1/attn/{n}_proj" for n in "kqv")
    assert "folded into layers/0/input_layernorm/w" in str(plan)
    never = ptq.smoothing_plan(client.model, None, LLAMA_W4A8, batches, fold="never")
    assert never.folds() == {} and [g.members for g in never.groups] == [g.members for g in plan.groups]

    calls = recorded_finish(monkeypatch)
    folded = ptq.smoothquant(nnx.clone(client.model), None, LLAMA_W4A8, batches)
    assert_same_outputs(float_transformed(calls[-1], batches[0]), ref)  # the "Done when" check
    explicit = ptq.smoothquant(nnx.clone(client.model), None, LLAMA_W4A8, batches, fold="never")
    for i in range(2):
        new, old = folded.layers[i], client.model.layers[i]
        for layer in (new.attn.q_proj, new.attn.k_proj, new.attn.v_proj, new.mlp.gate_proj, new.mlp.up_proj,
                      new.mlp.down_proj):
            assert not hasattr(layer, qn.INPUT_TRANSFORM)
        assert hasattr(new.attn.o_proj, qn.INPUT_TRANSFORM)
        s = old.input_layernorm.w.get_value() / new.input_layernorm.w.get_value()  # the divisor, folded
        np.testing.assert_allclose(s, getattr(explicit.layers[i].attn.q_proj, qn.INPUT_TRANSFORM)
                                   .get_value()[DIVISOR], rtol=1e-6)
    run = nnx.jit(client.forward)
    assert spread(run(folded, batches[0]), run(explicit, batches[0]), ref) < 0.05


class Block(nn.Module):
    """A pre-norm decoder block: LayerNorm (scale and bias) -> q/k/v DenseGeneral (D, N, H) with biases ->
    attention -> o (N, H, D); RMSNorm -> SwiGLU gate/up (up with a bias) -> down."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="attn_norm")(x)
        q, k, v = (nn.DenseGeneral((4, 8), name=n)(h) for n in "qkv")
        x = x + nn.DenseGeneral(32, axis=(-2, -1), name="o")(nn.dot_product_attention(q, k, v))
        h = nn.RMSNorm(name="mlp_norm")(x)
        gate, up = nn.Dense(64, use_bias=False, name="gate")(h), nn.Dense(64, name="up")(h)
        return x + nn.Dense(32, name="down")(nn.silu(gate) * up)


class TinyLM(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = Block(name="block")(nn.Embed(64, 32, name="embed")(tokens))
        return nn.Dense(64, name="head")(nn.LayerNorm(name="final_norm")(x))


def linen_batches(n=2):
    return [{"tokens": jax.random.randint(jax.random.key(i), (2, 8), 0, 64)} for i in range(n)]


def test_linen_block_folds_every_layer_and_matches_the_explicit_divide(monkeypatch):
    model, batches = TinyLM(), linen_batches()
    variables = jax.jit(model.init)(jax.random.key(0), **batches[0])
    # a trained-looking norm: scales and biases away from 1 and 0, so a wrong fold would show
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: v + 0.3 * jax.random.normal(jax.random.key(len(str(p))), v.shape) if v.ndim == 1 else v,
        variables)
    ref = model.apply(variables, **batches[0])
    plan = ptq.smoothing_plan(model, variables, PER_HEAD, batches)
    norm = ("block/attn_norm/bias", "block/attn_norm/scale")
    assert plan.folds() == {"block/q": norm, "block/k": norm, "block/v": norm,
                            "block/o": ("block/v/bias", "block/v/kernel"),  # heads match: v feeds o
                            "block/gate": ("block/mlp_norm/scale",), "block/up": ("block/mlp_norm/scale",),
                            "block/down": ("block/up/bias", "block/up/kernel"),
                            "head": ("final_norm/bias", "final_norm/scale")}
    calls = recorded_finish(monkeypatch)
    folded = ptq.smoothquant(model, variables, PER_HEAD, batches)
    assert_same_outputs(float_transformed(calls[-1], batches[0]), ref)
    assert ql.TRANSFORM_KEY not in str(folded.get("quant", {}))  # every divisor folded: none stored
    explicit = ptq.smoothquant(model, variables, PER_HEAD, batches, fold="never")
    assert explicit["quant"]["block"]["o"][ql.TRANSFORM_KEY][DIVISOR].shape == (4, 8)
    qmodel = ql.quantize_model(model, PER_HEAD)
    run = jax.jit(lambda v, b: qmodel.apply(v, **b))
    assert spread(run(folded, batches[0]), run(explicit, batches[0]), ref) < 0.05
    # v scaled per H only, one scale shared by the 4 heads: folding o's (4, 8) divisor into v would change
    # v's codes, so o keeps its divide (and the folded model still quantizes as the explicit one)
    o = ptq.smoothing_plan(model, variables, W8A8, batches).group("block/o")
    assert not o.folded and o.reason.startswith("folding into block/v/kernel would change how it is")


class GemmaNorm(nn.Module):
    """Gemma's RMSNorm, ``x / rms(x) * (1 + w)``: not linear in its parameter."""

    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.initializers.normal(0.5), (x.shape[-1],))
        return x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6) * (1 + w)


class Refusals(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.Dense(16, name="a")(GemmaNorm(name="gemma_norm")(x))
        shared = nn.LayerNorm(name="shared_norm")  # one norm applied twice: a tied producer
        x = x + nn.Dense(16, name="b")(shared(x))
        return nn.Dense(8, name="c")(shared(x))


def test_a_nonlinear_or_shared_producer_keeps_the_explicit_divide(monkeypatch):
    model = Refusals()
    batches = [{"x": jax.random.normal(jax.random.key(i), (2, 8, 16))} for i in range(2)]
    variables = jax.jit(model.init)(jax.random.key(0), **batches[0])
    plan = ptq.smoothing_plan(model, variables, W8A8, batches)
    assert plan.folds() == {}
    a = plan.group("a").reason  # gemma_norm multiplies by (1 + w): scaling w does not scale its output
    assert a.startswith("no parameter scales the input exactly; tried") and "gemma_norm" in a
    assert plan.group("b").reason.startswith("shared_norm scales the input, but folding into it changes")
    calls = recorded_finish(monkeypatch)
    frozen = ptq.smoothquant(model, variables, W8A8, batches)
    for name in "abc":
        assert frozen["quant"][name][ql.TRANSFORM_KEY][DIVISOR].shape == (16,)
    assert_same_outputs(float_transformed(calls[-1], batches[0]), model.apply(variables, **batches[0]))
    with pytest.raises(ValueError, match=r"smoothquant: fold='always'; allowed: 'auto', 'never'"):
        ptq.smoothquant(model, variables, W8A8, batches, fold="always")


def test_fingerprints_combine_like_the_inputs():
    # positively homogeneous and additive over rows: combined by add or max over batches, the checks hold
    rows = jax.random.normal(jax.random.key(0), (12, 5))
    mask = jnp.ones((12,))
    c = jnp.exp(jax.random.normal(jax.random.key(1), (5,)))
    p, a = folding._fingerprint(rows * c, mask)
    p0, a0 = folding._fingerprint(rows, mask)
    np.testing.assert_allclose(p, p0 * c, rtol=1e-5)
    np.testing.assert_allclose(a, a0 * c, rtol=1e-5)
    assert not folding._same((p, a), (p0 * c[::-1], a0 * c[::-1]), folding.RTOL)


def test_gemma3_norm_is_not_linear_in_its_scale():
    # Tunix's Gemma3 RMSNorm computes x / rms(x) * (1 + scale): gate/up keep the divide, down still folds
    from tests.clients.models import tunix_gemma3

    client = tunix_gemma3()
    rules = [Rule(r"layers/\d+/mlp/.*", weight=Quantizer("int8", PerChannel(-1)),
                  input=Quantizer("int8", PerToken(-1)), weight_names=("kernel",))]
    plan = ptq.smoothing_plan(client.model, None, rules, [client.inputs])
    assert plan.folds() == {f"layers/{i}/mlp/down_proj": (f"layers/{i}/mlp/up_proj/kernel",)
                            for i in range(2)}
    gate = plan.group("layers/0/mlp/gate_proj")
    assert gate.members == ("layers/0/mlp/gate_proj", "layers/0/mlp/up_proj")
    assert gate.reason.startswith("no parameter scales the input exactly") and "pre_ffw_norm" in gate.reason
