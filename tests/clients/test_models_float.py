"""The client models of tests/clients/models.py run in float: jitted forward, shapes, finiteness, docs.

No qjax here: these tests pin down the fixtures the core's tests build on.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tests.clients import models as M

# Tunix 0.1.7 and transformers' Flax classes warn about their own deprecated calls on every use.
pytestmark = [
    pytest.mark.filterwarnings("ignore:'.value' access is now deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:'sharding' is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:jax.experimental.shard_map is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:jax.interpreters.pxla.thread_resources:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:TensorFlow and JAX classes are deprecated:FutureWarning"),
]

NNX_NAMES = sorted(M.NNX_BUILDERS) + sorted(M.TUNIX_BUILDERS)
LINEN_NAMES = sorted(M.LINEN_BUILDERS)


def build(name):
    if name in M.TUNIX_BUILDERS:
        pytest.importorskip("tunix")
        return M.TUNIX_BUILDERS[name]()
    return {**M.NNX_BUILDERS, **M.LINEN_BUILDERS}[name]()


def stacked(name):
    return M.SCANNED_STACKED if name == "scanned_nnx" else ()


def check_logits(logits):
    assert logits.shape == (M.BATCH, M.SEQ, M.VOCAB)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert float(jnp.std(logits)) > 1e-3  # not a degenerate (zero-weight) model


@pytest.mark.parametrize("name", NNX_NAMES)
def test_nnx_forward_jitted(name):
    client = build(name)
    assert isinstance(client.model, nnx.Module)
    check_logits(nnx.jit(client.forward)(client.model, client.inputs))


@pytest.mark.parametrize("name", LINEN_NAMES)
def test_linen_forward_jitted(name):
    client = build(name)
    forward = jax.jit(lambda variables, inputs: client.forward(client.module, variables, inputs))
    check_logits(forward(client.variables, client.inputs))


@pytest.mark.parametrize("name", NNX_NAMES)
def test_nnx_dense_paths_documented(name):
    client = build(name)
    assert set(M.weight_owners(client.model, stacked(name))) == set(client.dense_paths)


@pytest.mark.parametrize("name", LINEN_NAMES)
def test_linen_dense_paths_documented(name):
    client = build(name)
    assert set(M.linen_weight_owners(client.variables["params"])) == set(client.dense_paths)


@pytest.mark.parametrize("name", NNX_NAMES + LINEN_NAMES)
def test_builders_deterministic(name):
    def leaves(client):
        tree = nnx.state(client.model) if isinstance(client, M.NnxClient) else client.variables
        return jax.tree.leaves(tree)

    a, b = leaves(build(name)), leaves(build(name))
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("name", sorted(M.TUNIX_BUILDERS))
def test_tunix_params_carry_sharding_metadata(name):
    client = build(name)
    # Tunix passes sharding=(...) / nnx.with_partitioning(...); flax 0.12 keeps either as out_sharding.
    q_name = {"tunix_gemma3": "q_einsum", "tunix_gemma3_qkv": "qkv_einsum"}.get(name, "q_proj")
    q_path = ("layers", 0, "attn", q_name, "w")
    variables = dict(nnx.iter_graph(client.model))
    assert variables[q_path].get_metadata()["out_sharding"][-1] is None
    kernel = variables[("layers", 0, "mlp", "gate_proj")] if name == "tunix_qwen3_moe" else \
        variables[("layers", 0, "mlp", "gate_proj", "kernel")]
    assert len(kernel.get_metadata()["out_sharding"]) == kernel.get_value().ndim
    assert isinstance(client.model.layers[0], nnx.Module)  # a Python list (nnx.List) of layers, not scanned


def test_scanned_layers_stacked():
    client = M.scanned_nnx(num_layers=3)
    state = nnx.state(client.model)
    assert state["layers"]["qkv"]["w"].get_value().shape == (3, 3, 32, 4, 8)
    assert state["layers"]["up"]["kernel"].get_value().shape == (3, 32, 64)
    assert state["head"]["kernel"].get_value().shape == (32, M.VOCAB)


def test_linen_partitioned_boxes():
    client = M.linen_partitioned()
    boxed = jax.tree.leaves(client.variables, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    assert all(isinstance(x, nn.meta.AxisMetadata) for x in boxed)
    assert any(type(x) is nn.LogicallyPartitioned for x in boxed)
    assert any(type(x) is nn.Partitioned for x in boxed)
    params = client.variables["params"]
    assert params["decoderblock_0"]["mlp"]["wi"]["kernel"].names == ("embed", "mlp")
    assert params["logits_dense"]["kernel"].names == (None, "model")
    # what init itself returns (abstractly): the same boxed tree
    abstract = jax.eval_shape(client.init, M.rng_key())
    assert jax.tree.structure(abstract) == jax.tree.structure(client.variables)
    assert type(abstract["params"]["embed"]["embedding"]) is nn.LogicallyPartitioned
    specs = nn.get_partition_spec(client.variables)
    assert specs["params"]["decoderblock_0"]["mlp"]["wi"]["kernel"] == P("embed", "mlp")
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("model",))
    shardings = nn.logical_to_mesh_sharding(specs, mesh, M.LOGICAL_RULES)
    assert shardings["params"]["decoderblock_0"]["mlp"]["wi"]["kernel"].spec == P(None, "model")
    # apply takes the boxed variables as they are, or unboxed
    unboxed = nn.meta.unbox(client.variables)
    np.testing.assert_array_equal(client.forward(client.module, client.variables, client.inputs),
                                  client.forward(client.module, unboxed, client.inputs))


def test_gpt2_tied_head():
    client = M.flax_gpt2()
    params = client.variables["params"]
    assert "lm_head" not in params
    hidden = client.module.apply(client.variables, **client.inputs, deterministic=True,
                                 method=lambda m, **kw: m.transformer(**kw).last_hidden_state)
    logits = client.forward(client.module, client.variables, client.inputs)
    wte = params["transformer"]["wte"]["embedding"]
    np.testing.assert_allclose(logits, hidden @ wte.T, rtol=1e-5, atol=1e-6)
    # FlaxConv1D stores its kernel [out, in]
    assert params["transformer"]["h"]["0"]["mlp"]["c_fc"]["kernel"].shape == (4 * 32, 32)
