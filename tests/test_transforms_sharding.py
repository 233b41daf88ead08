"""The Linen and NNX transforms (QAT with both products of the fused matmul, frozen) under SPMD sharding on 8
simulated CPU devices."""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r'''
import json
import flax.linen as nn
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from qjax import PerChannel, PerToken, Quantizer, Rule, linen as ql, nnx as qn

mesh = Mesh(np.array(jax.devices()), ("d",))
rows = NamedSharding(mesh, P("d", None))
cols = NamedSharding(mesh, P(None, "d"))
x = jax.random.normal(jax.random.key(0), (16, 32))
out = {"devices": len(jax.devices())}

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8)(nn.relu(nn.Dense(64)(x)))

rules = [Rule(".*", types=("Dense",), weight=Quantizer("int4", PerChannel(-1)),
              input=Quantizer("int8", PerToken(-1)))]
qmodel = ql.quantize_model(MLP(), rules)
variables = qmodel.init(jax.random.key(1), x)
loss = lambda v, x: jnp.sum(qmodel.apply(v, x) ** 2)
ref_y, ref_g = jax.jit(qmodel.apply)(variables, x), jax.jit(jax.grad(loss))(variables, x)
sharded_vars = jax.tree_util.tree_map(
    lambda a: jax.device_put(a, cols if a.ndim == 2 and a.shape[1] % 8 == 0 else NamedSharding(mesh, P())),
    variables)
for product in ("int8", "float"):
    qp = ql.quantize_model(MLP(), rules, product=product)
    loss_p = lambda v, x: jnp.sum(qp.apply(v, x) ** 2)
    y = jax.jit(qp.apply)(sharded_vars, jax.device_put(x, rows))
    g = jax.jit(jax.grad(loss_p))(sharded_vars, jax.device_put(x, rows))
    out[f"linen_paths_{product}"] = sorted(set(qp.paths(variables, x).values()))
    out[f"linen_y_{product}"] = float(jnp.max(jnp.abs(y - ref_y)) / jnp.max(jnp.abs(ref_y)))
    out[f"linen_grad_{product}"] = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
        for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)))
    out[f"linen_y_sharded_{product}"] = len(y.sharding.device_set)
frozen = ql.freeze(qmodel, variables, x)
fy = jax.jit(qmodel.apply)(frozen, jax.device_put(x, rows))
out["linen_frozen"] = float(jnp.max(jnp.abs(fy - ref_y)) / jnp.max(jnp.abs(ref_y)))

class Net(nnx.Module):
    def __init__(self, rngs):
        self.a, self.b = nnx.Linear(32, 64, rngs=rngs), nnx.Linear(64, 8, rngs=rngs)
    def __call__(self, x):
        return self.b(jax.nn.relu(self.a(x)))

model = Net(nnx.Rngs(0))
qn.quantize_model(model, [Rule(".*", weight=Quantizer("binary", PerChannel(-1), "mean_abs", "reste"))], x)
ref = nnx.jit(lambda m, x: m(x))(model, x)
y = nnx.jit(lambda m, x: m(x))(model, jax.device_put(x, rows))
out["nnx_y"] = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
qn.freeze(model)
y = nnx.jit(lambda m, x: m(x))(model, jax.device_put(x, rows))
out["nnx_frozen"] = float(jnp.max(jnp.abs(y - ref)) / jnp.max(jnp.abs(ref)))
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_eight_devices(results):
    assert results["devices"] == 8


@pytest.mark.parametrize("key", ["linen_y_int8", "linen_grad_int8", "linen_y_float", "linen_grad_float",
                                 "linen_frozen", "nnx_y", "nnx_frozen"])
def test_sharded_matches_single_device(results, key):
    assert results[key] < 1e-5, results


@pytest.mark.parametrize("product,path", [("int8", "int8 dot_general"), ("float", "fused fake-quant float")])
def test_fused_path_taken_and_output_stays_sharded(results, product, path):
    assert results[f"linen_paths_{product}"] == [path]
    assert results[f"linen_y_sharded_{product}"] == 8
