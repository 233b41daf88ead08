"""packed_matmul on inputs sharded over 8 simulated CPU devices (a fresh interpreter: the device count
must be set before jax starts) gives the unsharded result and keeps the output distributed."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import kernels_pallas as kp
from qjax import packing
rng = np.random.default_rng(0)
words = packing.pack(jnp.asarray(rng.integers(-8, 8, (64, 32)), jnp.int8), 4, 0)
scales = jnp.asarray(rng.uniform(0.5, 2, (4, 32)), jnp.float32)
x = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
mesh = Mesh(np.array(jax.devices()), ("d",))
out = {}
for backend in ("xla", "interpret"):
    f = jax.jit(lambda x, w, s: kp.packed_matmul(x, w, s, bits=4, group_size=16, backend=backend))
    want = f(x, words, scales)
    got = f(jax.device_put(x, NamedSharding(mesh, P("d", None))), words, scales)
    out[backend] = {"max_abs_diff": float(jnp.max(jnp.abs(got - want))),
                    "devices": len(got.sharding.device_set)}
print(json.dumps(out))
'''


def test_sharded_rows_give_the_unsharded_result():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {"xla", "interpret"}
    for backend, row in result.items():
        assert row["devices"] == 8 and row["max_abs_diff"] < 1e-5, (backend, row)
