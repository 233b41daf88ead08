"""qjax on Flax models nobody here wrote (tests/clients/models.py): Tunix's NNX Llama3, Qwen2 and Gemma3,
transformers' FlaxGPT2 with its tied head, a scanned NNX stack and a Linen model with logical partitioning.

For each: a catch-all rule quantizes every Dense-like layer (every module that contracts its own weight;
embedding tables that are only looked up stay float), the jitted W8A8 forward is close to the float one,
every quantized weight gets a nonzero gradient, the frozen model gives QAT's output, int4 packs the
quantized weights into about 1/8 of their float bytes, and a binary ReSTE rule runs forward and backward.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qjax import PerChannel, PerToken, QArray, Quantizer, Rule
from qjax import linen as ql
from qjax import nnx as qn
from tests.clients import models as C

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

W8, W4 = Quantizer("int8", PerChannel(-1)), Quantizer("int4", PerChannel(-1))
A8 = Quantizer("int8", PerToken(-1))
RESTE = Quantizer("binary", PerChannel(-1), "mean_abs", "reste")
NAMES = ("kernel", "w", "embedding", "input_embedding")

# Dense-like owners in models.py that are embedding tables only looked up (never contracted): they stay float.
LOOKUP_ONLY = {"tunix_llama3": {"embedder"}, "scanned_nnx": {"embed"}, "flax_gpt2": {"transformer/wpe"},
               "linen_partitioned": {"embed"}}
NESTED = {"flax_gpt2": {"lm_head"}}  # the tied head, applied through a nested .apply (no params of its own)
CLIENTS = ["tunix_llama3", "tunix_qwen2", "tunix_gemma3", "scanned_nnx", "flax_gpt2", "linen_partitioned"]


def build(name):
    if name.startswith("tunix"):
        import flax

        before = flax.config.flax_always_shard_variable
        pytest.importorskip("tunix")
        flax.config.update("flax_always_shard_variable", before)  # importing tunix flips it process-wide
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(C, name)()


def expected_layers(name, client):
    return (set(client.dense_paths) - LOOKUP_ONLY.get(name, set())) | NESTED.get(name, set())


def rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def linen_kwargs(name):
    return {"deterministic": True} if name == "flax_gpt2" else {}


def logits(out):
    return out.logits if hasattr(out, "logits") else out


class Run:
    """The same checks for an NNX or a Linen client."""

    def __init__(self, name, rules):
        self.name, self.client = name, build(name)
        c = self.client
        if isinstance(c, C.NnxClient):
            self.nnx = True
            self.float = nnx.jit(c.forward)(c.model, c.inputs)
            qn.quantize_model(c.model, rules, **c.inputs)
            self.paths = qn.paths(c.model)
        else:
            self.nnx = False
            self.float = logits(c.forward(c.module, c.variables, c.inputs))
            self.qmodel = ql.quantize_model(c.module, rules)
            self.kw = {**c.inputs, **linen_kwargs(name)}
            self.paths = self.qmodel.paths(c.variables, **self.kw)
            self.variables = c.variables

    def forward(self, variables=None):
        c = self.client
        if self.nnx:
            return nnx.jit(c.forward)(c.model, c.inputs)
        return logits(jax.jit(lambda v: self.qmodel.apply(v, **self.kw))(variables or self.variables))

    def weight_grads(self) -> dict[str, float]:
        """Module path -> max |gradient| over its quantized weights."""
        c = self.client
        if self.nnx:
            grads = nnx.grad(lambda m: jnp.sum(c.forward(m, c.inputs) ** 2))(c.model)
            state = {"/".join(str(k) for k in path): v for path, v in nnx.to_flat_state(grads)}
            get = lambda module, name: state.get(f"{module}/{name}" if module else name)
        else:
            params = self.variables["params"]
            apply = lambda p: logits(self.qmodel.apply({**self.variables, "params": p}, **self.kw))
            loss = lambda p: jnp.sum(apply(p) ** 2)
            grads = jax.grad(loss)(params)
            get = lambda module, name: ql.unbox(ql.get_path(grads, (*module.split("/"), name)))
        table = (qn.module_table(c.model, []) if self.nnx else self.qmodel.table(self.variables, **self.kw))
        out = {}
        for path, entry in table.items():
            if entry.rule is None or path in NESTED.get(self.name, set()):
                continue
            values = [get(path, w) for w in entry.weights]
            out[path] = max(float(jnp.max(jnp.abs(jnp.asarray(getattr(v, "value", v))))) for v in values)
        if self.name == "flax_gpt2":  # the tied head's gradient reaches the embedding table it reads
            out["lm_head -> transformer/wte"] = float(jnp.max(jnp.abs(
                ql.unbox(grads["transformer"]["wte"]["embedding"]))))
        return out

    def freeze(self):
        c = self.client
        if self.nnx:
            qn.freeze(c.model)
            return None
        return ql.freeze(self.qmodel, self.variables, **self.kw)

    def weight_bytes(self, frozen) -> tuple[int, int]:
        """(real bytes of the frozen quantized weights, float32 bytes of the same weights)."""
        if self.nnx:
            leaves = [v.get_raw_value() for _, v in nnx.to_flat_state(nnx.state(self.client.model,
                                                                               qn.PackedWeight))]
        else:
            leaves = [x for x in jax.tree_util.tree_leaves(frozen["params"], is_leaf=lambda x: isinstance(
                x, QArray)) if isinstance(x, QArray)]
        assert leaves
        real = sum(q.nbytes for q in leaves)
        layers = lambda q: math.prod(q.codes.shape[:q.codes.ndim - len(q.shape)])  # stacked by scan: L
        floats = sum(4 * layers(q) * math.prod(q.shape) for q in leaves)
        return real, floats


@pytest.mark.slow
@pytest.mark.parametrize("name", CLIENTS)
def test_w8a8_every_dense_layer_gradients_and_frozen_equals_qat(name):
    run = Run(name, [Rule(".*", weight=W8, input=A8, weight_names=NAMES)])
    assert set(run.paths) == expected_layers(name, run.client), sorted(run.paths)
    y = run.forward()
    assert y.shape == run.float.shape and bool(jnp.all(jnp.isfinite(y)))
    assert 0 < rel(y, run.float) < 0.1
    grads = run.weight_grads()
    assert grads and all(g > 0 for g in grads.values()), grads
    frozen = run.freeze()
    np.testing.assert_allclose(run.forward(frozen), y, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(y))))


@pytest.mark.slow
@pytest.mark.parametrize("name", CLIENTS)
def test_int4_packs_to_an_eighth_and_binary_reste_trains(name):
    run = Run(name, [Rule(".*", weight=W4, weight_names=NAMES)])
    real, floats = run.weight_bytes(run.freeze())
    assert 0.12 <= real / floats <= 0.16, (real, floats)  # 4 bits + one float32 scale per output column
    run = Run(name, [Rule(".*", weight=RESTE, weight_names=NAMES)])
    y = run.forward()
    assert bool(jnp.all(jnp.isfinite(y))) and rel(y, run.float) > 1e-3
    grads = run.weight_grads()
    assert all(np.isfinite(g) and g > 0 for g in grads.values()), grads
