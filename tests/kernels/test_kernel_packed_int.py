"""packed_int_matmul: int8 activation codes times packed low-bit weight codes. The Pallas kernel (interpret
mode) equals the jnp reference, the reference equals the exact integer formula, and the op works under jit,
vmap, grad and on sharded inputs; bad arguments are refused before any backend runs."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas as kp
from kernels_pallas import layout
from kernels_pallas.w8a8 import packed_int_matmul_pallas
from tests.kernels.kernel_cases import random_packed

ROOT = Path(__file__).resolve().parents[2]
matmul = jax.jit(kp.packed_int_matmul, static_argnames=("bits", "group_size", "signed", "backend"))


def exact(x, sx, words, scales, zero, *, bits, group_size, signed):
    """``s_x * sum_k x[k] (c[k] - z[g(k)]) s_w[g(k)]`` in float64 from the unpacked codes (numpy)."""
    k = x.shape[-1]
    c = np.asarray(layout.unpack(words, bits, 0, k, signed=signed), np.float64)
    groups = scales.shape[0]
    c = c.reshape(groups, k // groups, -1)
    if zero is not None:
        c = c - np.asarray(zero, np.float64)[:, None]
    w = (c * np.asarray(scales, np.float64)[:, None]).reshape(k, -1)
    return np.asarray(x, np.float64) @ w * np.asarray(sx, np.float64)


def codes(rng, shape, bits=8):
    lo, hi = layout.code_range(bits, True)
    return jnp.asarray(rng.integers(lo, hi + 1, shape), jnp.int8)


# (bits, x_bits, m, k, n, group_size, options): groups over two K blocks in segments of 16 words (loops
# unrolled, as compiled), ragged
# groups (segments of gcd(P, group) words) with a zero point, unsigned 8-bit codes (read as c - 128) with and
# without a zero point, one group with a zero point (ternary), binary weights in the GPU structure (a K loop
# in the kernel), a per-tensor activation scale.
GRID = [
    (8, 8, 3, 576, 9, 64, {"block_k": 128, "unroll": True}),  # as compiled: static planes and segments
    (4, 4, 3, 96, 33, 32, {"signed": False, "zero_point": True}),
    (8, 8, 3, 64, 9, 16, {"signed": False, "per_tensor": True}),
    (8, 8, 2, 40, 9, None, {"signed": False, "zero_point": True}),
    (2, 8, 4, 300, 20, None, {"ternary": True, "zero_point": True}),
    (1, 2, 3, 96, 20, 32, {"k_in_grid": False, "block_k": 128}),
]


@pytest.mark.parametrize("bits,x_bits,m,k,n,group_size,options", GRID)
def test_kernel_matches_reference_and_exact_formula(bits, x_bits, m, k, n, group_size, options):
    rng = np.random.default_rng(bits * 1000 + k)
    signed = options.get("signed", True)
    words, scales, zero = random_packed(rng, bits, k, n, group_size=group_size, signed=signed,
                                        ternary=options.get("ternary", False),
                                        zero_point=options.get("zero_point", False))
    x = codes(rng, (m, k), x_bits)
    x = x.at[0].set(layout.code_range(x_bits, True)[0])  # the extreme codes, all K of them
    sx = jnp.asarray(rng.uniform(0.01, 1, () if options.get("per_tensor") else (m, 1)), jnp.float32)
    kernel = {key: options[key] for key in ("block_k", "k_in_grid", "unroll") if key in options}

    @jax.jit
    def run(x, sx, words, scales, zero):  # both backends in one program: one compile
        want = kp.packed_int_matmul(x, sx, words, scales, bits=bits, group_size=group_size, zero_point=zero,
                                    signed=signed, backend="xla")
        got = packed_int_matmul_pallas(x, sx, words, scales, zero, bits=bits, signed=signed, interpret=True,
                                       **kernel)
        return got, want

    got, want = run(x, sx, words, scales, zero)
    assert got.shape == want.shape == (m, n) and got.dtype == jnp.float32
    truth = exact(x, sx, words, scales, zero, bits=bits, group_size=group_size, signed=signed)
    scale = np.max(np.abs(truth))
    np.testing.assert_allclose(want, truth, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)


def test_one_group_sums_are_exact_integers_as_int8_matmul():
    # int8 weights, unit scales: the output is the exact int32 sum, as int8_matmul's (one implementation).
    rng = np.random.default_rng(0)
    x, w = codes(rng, (4, 256)), codes(rng, (256, 8))
    x, w = x.at[0].set(-128), w.at[:, 0].set(-128)
    ones_x, ones_w = jnp.ones((4, 1), jnp.float32), jnp.ones((1, 8), jnp.float32)

    @jax.jit
    def run(x, w):
        words = layout.pack(w, 8, 0)
        packed = [kp.packed_int_matmul(x, ones_x, words, ones_w, bits=8, backend=b)
                  for b in ("xla", "interpret")]
        return (*packed, kp.int8_matmul(x, ones_x, w, ones_w, backend="xla"))

    truth = np.asarray(x, np.int64) @ np.asarray(w, np.int64)
    for got in run(x, w):
        np.testing.assert_array_equal(got, truth)


def test_jit_vmap_grad_and_special_values():
    rng = np.random.default_rng(1)
    words, scales, zero = random_packed(rng, 4, 64, 12, group_size=16, signed=False, zero_point=True)
    x = codes(rng, (2, 3, 64))
    sx = jnp.asarray(rng.uniform(0.1, 1, (2, 3, 1)), jnp.float32)

    def f(x, sx, s, z, backend):
        return kp.packed_int_matmul(x, sx, words, s, bits=4, group_size=16, zero_point=z, signed=False,
                                    backend=backend)

    both = jax.jit(lambda sx: (f(x, sx, scales, zero, "xla"),
                               jax.vmap(lambda x, sx: f(x, sx, scales, zero, "interpret"))(x, sx)))
    want, got = both(sx)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * float(jnp.max(jnp.abs(want))))
    # a NaN token scale makes that token's outputs NaN, only those (the same compiled program)
    _, y = both(sx.at[0, 1].set(jnp.nan))
    assert bool(jnp.all(jnp.isnan(y[0, 1]))) and not bool(jnp.any(jnp.isnan(y.at[0, 1].set(0))))
    # gradients in the scales and the zero point: the interpret backend by the reference's backward
    def loss(sx, s, z, backend):
        return jnp.sum(f(x, sx, s, z, backend) ** 2)

    grads = jax.jit(lambda *a: [jax.grad(loss, argnums=(0, 1, 2))(*a, b) for b in ("interpret", "xla")])
    for g_got, g_want in zip(*grads(sx, scales, zero), strict=True):
        np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(g_want))))
    # K = 0 is an empty sum
    empty = kp.packed_int_matmul(jnp.zeros((2, 0), jnp.int8), jnp.ones((2, 1)), jnp.zeros((0, 3), jnp.uint32),
                                 jnp.ones((1, 3)), bits=4, backend="interpret")
    np.testing.assert_array_equal(empty, np.zeros((2, 3)))


X8, SX, W4, S4 = (jnp.ones((4, 64), jnp.int8), jnp.ones((4, 1)), jnp.zeros((8, 6), jnp.uint32),
                  jnp.ones((2, 6)))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"bits": 3}, ValueError, r"bits=3 has no packed integer matmul; allowed: \(1, 2, 4, 8\)"),
    ({"x_codes": X8.astype(jnp.float32)}, ValueError, "dtype float32; allowed: int8 codes"),
    ({"x_scale": jnp.ones((4,))}, ValueError, r"x_scale of shape \(4,\) .* allowed: \(4, 1\)"),
    ({"x_scale": jnp.ones((4, 1), jnp.int32)}, ValueError, "x_scale of dtype int32; allowed: a float"),
    ({"w_scales": jnp.ones((3, 6))}, ValueError, r"w_scales of shape \(3, 6\) do not fit K=64, N=6"),
    ({"w_packed": W4[:7]}, ValueError, r"w_packed of shape \(7, 6\) .* allowed: uint32 \(8, N\)"),
    ({"group_size": 24}, ValueError, "group_size=24 does not divide K=64"),
    ({"zero_point": jnp.ones((1, 6))}, ValueError, r"zero_point of shape \(1, 6\); allowed: None or .*\(2,"),
    ({"signed": 1}, TypeError, "signed=1; allowed: True or False"),
    ({"backend": "cuda"}, ValueError, "unknown backend 'cuda'; allowed: auto, xla, pallas, interpret"),
    ({"w_scales": [1.0]}, TypeError, "w_scales is a list; allowed: an array"),
])
def test_errors_name_the_bad_value(kwargs, error, match):
    args = {"x_codes": X8, "x_scale": SX, "w_packed": W4, "w_scales": S4, "bits": 4, "backend": "xla",
            **kwargs}
    with pytest.raises(error, match=match):
        kp.packed_int_matmul(**args)


SCRIPT = r'''
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import kernels_pallas as kp
rng = np.random.default_rng(0)
words = kp.layout.pack(jnp.asarray(rng.integers(-8, 8, (64, 32)), jnp.int8), 4, 0)
scales = jnp.asarray(rng.uniform(0.5, 2, (4, 32)), jnp.float32)
x = jnp.asarray(rng.integers(-128, 128, (16, 64)), jnp.int8)
sx = jnp.asarray(rng.uniform(0.5, 2, (16, 1)), jnp.float32)
mesh = Mesh(np.array(jax.devices()), ("d",))
rows = NamedSharding(mesh, P("d", None))
f = jax.jit(lambda x, sx: kp.packed_int_matmul(x, sx, words, scales, bits=4, group_size=16,
                                               backend="interpret"))
want = kp.packed_int_matmul(x, sx, words, scales, bits=4, group_size=16, backend="xla")
got = f(jax.device_put(x, rows), jax.device_put(sx, rows))
print(json.dumps({"rel_diff": float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want))),
                  "devices": len(got.sharding.device_set)}))
'''


def test_sharded_rows_give_the_unsharded_result():
    # the kernel (interpret) on rows sharded over 8 simulated CPU devices, against the unsharded reference
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["devices"] == 8 and row["rel_diff"] < 1e-6, row
