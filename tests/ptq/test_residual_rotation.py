"""QuaRot's offline residual-stream rotation (qjax.ptq.rotate_residual): exact in float on Tunix's Llama 3 and
on a Linen pre-RMSNorm decoder (plain and (1 + w) norm scales, writer biases, a tied head), spreads planted
outlier channels of the residual stream, lowers the W4A4 error of RTN, and refuses wrong layouts, LayerNorms
and a tied head under a non-uniform final norm with clear errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qjax import PerChannel, PerToken, Quantizer, Rule, ptq, random_hadamard
from tests.clients.models import tokens, tunix_llama3

KEY = jax.random.key(7)
OUTLIERS, SCALE = (3, 17, 28), 20.0  # residual channels made 20x larger in the planted model
INT4 = Quantizer("int4", PerChannel(-1))
W4A4 = [  # int4 per-output-channel weights, int4 per-token dynamic inputs, every linear
    Rule(r"layers/\d+/attn/[qkv]_proj", weight=Quantizer("int4", PerChannel((1, 2))),
         input=Quantizer("int4", PerToken(-1)), weight_names=("w",), name="qkv"),
    Rule(r"layers/\d+/attn/o_proj", weight=INT4, input=Quantizer("int4", PerToken((-2, -1))),
         weight_names=("w",), name="o"),
    Rule(".*", weight=INT4, input=Quantizer("int4", PerToken(-1)), weight_names=("kernel", "w"), name="w4a4"),
]


def relative(got, want) -> float:
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


@nnx.jit
def llama_logits(model, inputs):
    return model(**inputs)[0]


@nnx.jit
def llama_stream(model, inputs):
    """The residual stream: the embedding's output and every layer's, ``(layers + 1, B, T, D)``."""
    x = model.embedder.encode(inputs["input_tokens"])
    xs = [x]
    for layer in model.layers:
        _, x = layer(x, inputs["positions"], None, inputs["attention_mask"])
        xs.append(x)
    return jnp.stack(xs)


def channel_ratio(stream) -> float:
    """max over channels / mean over channels of each channel's mean |x|."""
    m = jnp.mean(jnp.abs(stream.reshape(-1, stream.shape[-1])), axis=0)
    return float(jnp.max(m) / jnp.mean(m))


def kurtosis(stream) -> float:
    """Mean over tokens of the kurtosis of the token's D entries (3 for a Gaussian)."""
    x = stream.reshape(-1, stream.shape[-1])
    c = x - jnp.mean(x, -1, keepdims=True)
    return float(jnp.mean(jnp.mean(c**4, -1) / jnp.mean(c**2, -1) ** 2))


@pytest.fixture(scope="module")
def llama():
    """Tunix's Llama 3 with random positive norm scales (so the fold is not a no-op), its inputs (batch 2
    of 8 tokens) and their logits."""
    client = tunix_llama3()
    rng = np.random.default_rng(1)
    for _, module in nnx.iter_modules(client.model):
        if type(module).__name__ == "RMSNorm":
            module.w.set_value(jnp.asarray(np.exp(0.3 * rng.standard_normal(module.w.shape)), jnp.float32))
    return client.model, client.inputs, llama_logits(client.model, client.inputs)


def planted(model):
    """A copy of ``model`` whose residual channels ``OUTLIERS`` are ``SCALE`` times larger: the embedding's
    columns times ``SCALE`` (the stream carries them through every layer), the readers' rows (q/k/v,
    gate/up, head) divided by it, so the readers' outputs keep their size: the shape of the outliers QuaRot
    removes. (Under RMSNorm no
    such planting keeps the function exactly: rms(x) changes; the planted model is its own reference.)"""
    out = nnx.clone(model)
    j = np.asarray(OUTLIERS)

    def scale(param, index, factor):  # in numpy: no compilation per weight shape
        value = np.array(param.get_value())
        value[index] *= factor
        param.set_value(jnp.asarray(value))

    scale(out.embedder.input_embedding, (slice(None), j), SCALE)
    for layer in out.layers:
        for w in (layer.attn.q_proj.w, layer.attn.k_proj.w, layer.attn.v_proj.w, layer.mlp.gate_proj.kernel,
                  layer.mlp.up_proj.kernel):
            scale(w, j, 1 / SCALE)
    scale(out.lm_head.w, j, 1 / SCALE)
    return out


def test_llama_rotation_is_exact_and_folds_the_norms(llama):
    model, inputs, ref = llama
    rotated = nnx.clone(model)
    emb = model.embedder.input_embedding.get_value()
    assert ptq.rotate_residual(rotated, None, ptq.LLAMA_LAYOUT, key=KEY, batch=inputs) is rotated
    assert relative(llama_logits(rotated, inputs), ref) < 1e-5
    rot = random_hadamard(32, KEY)  # Q: the embedding is E Q, the norms' scales are 1
    np.testing.assert_allclose(rotated.embedder.input_embedding.get_value(), rot.apply(emb), atol=1e-6)
    for layer in rotated.layers:
        np.testing.assert_array_equal(layer.input_layernorm.w.get_value(), np.ones(32, np.float32))
    np.testing.assert_array_equal(rotated.final_norm.w.get_value(), np.ones(32, np.float32))
    # the original is untouched; without a batch the same weights come out (no check, no probe difference)
    assert np.array_equal(model.embedder.input_embedding.get_value(), emb)
    unchecked = ptq.rotate_residual(nnx.clone(model), None, ptq.LLAMA_LAYOUT, key=KEY)
    np.testing.assert_array_equal(unchecked.lm_head.w.get_value(), rotated.lm_head.w.get_value())


def test_rotation_spreads_outliers_and_lowers_the_w4a4_error(llama):
    model, inputs, _ = llama
    outlier = planted(model)
    ref = llama_logits(outlier, inputs)
    rotated = ptq.rotate_residual(nnx.clone(outlier), None, ptq.LLAMA_LAYOUT, key=KEY, batch=inputs)
    assert relative(llama_logits(rotated, inputs), ref) < 1e-5

    before, after = llama_stream(outlier, inputs), llama_stream(rotated, inputs)
    ratio_before, ratio_after = channel_ratio(before), channel_ratio(after)
    kurt_before, kurt_after = kurtosis(before), kurtosis(after)
    print(f"channel max/mean {ratio_before:.2f} -> {ratio_after:.2f}; kurtosis {kurt_before:.1f} -> "
          f"{kurt_after:.1f}")
    assert ratio_before > 4 and ratio_after < ratio_before / 3  # measured 6.0 -> 1.25
    assert kurt_after < kurt_before / 3  # measured 15.6 -> 2.0

    frozen = {}

    def w4a4_error(float_model):
        frozen[id(float_model)] = ptq.rtn(nnx.clone(float_model), None, W4A4, inputs)
        return float(jnp.sum((llama_logits(frozen[id(float_model)], inputs) - ref) ** 2) / jnp.sum(ref**2))

    err_plain, err_rotated = w4a4_error(outlier), w4a4_error(rotated)
    print(f"W4A4 relative squared logit error: unrotated {err_plain:.4f}, rotated {err_rotated:.4f}")
    assert err_rotated < 0.75 * err_plain  # measured 0.84 -> 0.51 (0.46 - 0.51 over rotation keys)
    with pytest.raises(ValueError, match="the model is quantized or frozen; allowed: the float model"):
        ptq.rotate_residual(frozen[id(rotated)], None, ptq.LLAMA_LAYOUT, key=KEY)


def test_wrong_layouts_are_refused_and_leave_the_model_unchanged(llama):
    model, inputs, _ = llama
    layout = ptq.LLAMA_LAYOUT
    cases = [
        (ptq.ResidualLayout(**{**vars(layout), "embedding": "embedder/embedding"}),
         r"layout.embedding = 'embedder/embedding' matches no parameter"),
        (ptq.ResidualLayout(**{**vars(layout), "norms": {r"layers/(\d+)/input_layernorm/w":
                                                          r"layers/\1/attn/q/w"}}),
         r"the readers of norm 'layers/0/input_layernorm/w'.*'layers/0/attn/q/w'.*match no parameter"),
        (ptq.ResidualLayout(**{**vars(layout), "writers": r"layers/\d+/attn/o_proj/w"}),
         r"\['layers/0/mlp/down_proj/kernel'.*residual width 32 but the layout names them nowhere"),
        # down_proj declared off the stream: passes the static checks, caught by running the model
        (ptq.ResidualLayout(**{**vars(layout), "writers": r"layers/\d+/attn/o_proj/w",
                               "unrotated": r"layers/\d+/mlp/down_proj/kernel"}),
         r"output differs from the original's: .*\[.*\] is .*, was .* > rtol=0.0001"),
        (ptq.ResidualLayout(**{**vars(layout), "head": r"lm_head/w|embedder/input_embedding"}),
         r"'embedder/input_embedding' is both embedding and a reader"),
    ]
    copy = nnx.clone(model)
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(copy, nnx.Param)))
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            ptq.rotate_residual(copy, None, bad, key=KEY, batch=inputs)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(copy, nnx.Param)))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))
    with pytest.raises(ValueError, match=r"norms=\{\}; allowed: a non-empty dict"):
        ptq.ResidualLayout(embedding="e", norms={}, writers="w")
    with pytest.raises(ValueError, match=r"refers to group '\\\\2', which the norm regex does not have"):
        ptq.ResidualLayout(embedding="e", norms={r"l/(\d+)/n": r"l/\2/q"}, writers="w")
    with pytest.raises(ValueError, match=r"layout is a dict; allowed: a qjax\.ptq\.ResidualLayout"):
        ptq.rotate_residual(copy, None, {}, key=KEY)


# ---------------------------------------------------------------------------------- a Linen toy decoder


class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: ``(1 + w) * x / rms(x)``, ``w`` initialised to 0."""

    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
        return (1 + w) * x * jax.lax.rsqrt(jnp.mean(x**2, -1, keepdims=True) + 1e-6)


NORMS = {"rms": lambda name: nn.RMSNorm(name=name), "offset": lambda name: OffsetRMSNorm(name=name),
         "layer": lambda name: nn.LayerNorm(name=name)}


class ToyBlock(nn.Module):
    norm: str
    heads: int = 4

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        h = NORMS[self.norm]("attn_norm")(x)
        q, k, v = (nn.Dense(d, name=n)(h).reshape(b, t, self.heads, -1) for n in "qkv")
        scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(d // self.heads)
        probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e9), -1)
        x = x + nn.Dense(d, name="out")(jnp.einsum("bnts,bsnh->btnh", probs, v).reshape(b, t, d))
        h = nn.gelu(nn.Dense(2 * d, name="up")(NORMS[self.norm]("mlp_norm")(x)))
        return x + nn.Dense(d, name="down")(h)


class ToyLM(nn.Module):
    """A pre-norm decoder in Linen: ``nn.Embed``, 2 blocks of ``nn.Dense`` (with biases), a final norm and
    an ``nn.Dense`` head, or the embedding's ``attend`` (tied)."""

    norm: str = "rms"
    tied: bool = False
    vocab: int = 96
    dim: int = 64

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.dim, name="embed")
        x = embed(tokens)
        for i in range(2):
            x = ToyBlock(self.norm, name=f"block_{i}")(x)
        x = NORMS[self.norm]("final_norm")(x)
        return embed.attend(x) if self.tied else nn.Dense(self.vocab, name="head")(x)


TOY_LAYOUT = ptq.ResidualLayout(
    embedding="embed/embedding",
    norms={r"block_(\d+)/attn_norm/scale": r"block_\1/[qkv]/kernel", r"block_(\d+)/mlp_norm/scale":
           r"block_\1/up/kernel"},
    writers=r"block_\d+/(out|down)/kernel",  # their biases are rotated with them
    final_norm="final_norm/scale", head="head/kernel",
    unrotated=r"block_\d+/[qkv]/bias")  # the readers' biases: y = n(x) W + b keeps b


def toy(norm="rms", tied=False, uniform_final=False):
    """The model, variables and a batch; variables drawn by numpy into ``init``'s tree (no compilation):
    kernels and embeddings N(0, 1/fan_in) and N(0, 1), nonzero biases, non-uniform norm scales (around 1
    for ``g``, around 0 for ``1 + w``; the final one uniform with ``uniform_final``)."""
    model = ToyLM(norm, tied)
    batch = {"tokens": tokens(seed=3, vocab=96)}
    shapes = jax.eval_shape(model.init, jax.random.key(0), **batch)
    rng = np.random.default_rng(2)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            base = 0.0 if norm == "offset" else 1.0
            noise = 0.0 if uniform_final and "final_norm" in name else 0.3
            value = base + noise * rng.standard_normal(leaf.shape)
        elif "bias" in name:
            value = 0.1 * rng.standard_normal(leaf.shape)
        else:
            value = rng.standard_normal(leaf.shape) / (1.0 if "embedding" in name else np.sqrt(leaf.shape[0]))
        return jnp.asarray(value, leaf.dtype)

    return model, jax.tree_util.tree_map_with_path(draw, shapes), batch


@pytest.mark.parametrize("norm,tied", [("rms", False), ("offset", False), ("rms", True)])
def test_linen_decoder_rotation_is_exact(norm, tied):
    model, variables, batch = toy(norm, tied, uniform_final=tied)
    layout = TOY_LAYOUT if not tied else ptq.ResidualLayout(**{**vars(TOY_LAYOUT), "head": None})
    apply = jax.jit(model.apply)
    ref = apply(variables, **batch)
    rotated = ptq.rotate_residual(model, variables, layout, key=KEY, batch=batch)
    assert relative(apply(rotated, **batch), ref) < 1e-5
    params, old = rotated["params"], variables["params"]
    unit = 1.0 if norm == "rms" else 0.0  # g <- 1: scale 1, or w 0 for (1 + w)
    np.testing.assert_array_equal(params["block_0"]["attn_norm"]["scale"], np.full(64, unit, np.float32))
    np.testing.assert_array_equal(params["block_1"]["q"]["bias"], old["block_1"]["q"]["bias"])
    assert not np.allclose(params["block_1"]["down"]["bias"], old["block_1"]["down"]["bias"])
    if tied:  # the final norm's uniform scale stays: it commutes with Q
        np.testing.assert_array_equal(params["final_norm"]["scale"], old["final_norm"]["scale"])


def test_linen_refusals():
    model, variables, batch = toy("rms", tied=True)  # a tied head under a non-uniform final norm
    layout = ptq.ResidualLayout(**{**vars(TOY_LAYOUT), "head": None})
    with pytest.raises(ValueError, match=r"final norm 'final_norm/scale' has a non-uniform scale .* no head "
                                         r"to fold it into .*tied"):
        ptq.rotate_residual(model, variables, layout, key=KEY, batch=batch)
    with pytest.raises(ValueError, match="a Linen model needs batch="):
        ptq.rotate_residual(model, variables, layout, key=KEY)
    model, variables, batch = toy("layer")
    with pytest.raises(ValueError, match=r"norm 'block_0/attn_norm' \(scale 'block_0/attn_norm/scale'\) is "
                                         r"not an RMSNorm y = g \* x / rms\(x\).*LayerNorm.*refused"):
        ptq.rotate_residual(model, variables, TOY_LAYOUT, key=KEY, batch=batch)
