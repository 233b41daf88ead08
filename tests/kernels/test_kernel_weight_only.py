"""The weight-only packed matmul: the Pallas kernel (interpret mode) equals the pure-jnp reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels_pallas as kp
from kernels_pallas.backends import tile
from kernels_pallas.weight_only import packed_matmul_pallas, scale_table
from qjax import PerChannel, PerGroup, Quantizer, quantize
from qjax.serving import frozen_matmul
from tests.kernels.kernel_cases import error_bound, random_packed


def check_against_reference(x, words, scales, zero, *, bits, group_size=None, signed=True, **kernel):
    """The interpret backend (or the kernel with explicit tiling options) against the xla backend, within
    float rounding of ``|x| @ |W|``; all in one jit (one compile)."""
    args = dict(bits=bits, zero_point=zero, signed=signed)

    def run(x, words, scales):
        want = kp.packed_matmul(x, words, scales, group_size=group_size, backend="xla", **args)
        if kernel:
            got = packed_matmul_pallas(x, words, scales, interpret=True, **kernel, **args)
        else:
            got = kp.packed_matmul(x, words, scales, group_size=group_size, backend="interpret", **args)
        return got, want, error_bound(x, words, scales, zero, bits=bits, group_size=group_size,
                                      signed=signed, dtype=x.dtype)

    got, want, bound = jax.jit(run)(x, words, scales)
    assert got.shape == want.shape == (*x.shape[:-1], words.shape[1]) and got.dtype == jnp.float32
    np.testing.assert_array_less(jnp.abs(got - want), bound)


# (bits, m, k, n, group_size, options): per channel, a group per plane, several groups per plane, ragged
# groups (gcd 1), non-multiples of every block, several K blocks, ternary, unsigned with a zero point.
GRID = [
    (4, 5, 64, 10, None, {}),
    (4, 5, 64, 10, 16, {}),
    (8, 3, 1152, 130, 128, {"block_k": 512}),
    (2, 3, 1152, 130, 64, {"block_k": 512, "signed": False, "zero_point": True}),
    (1, 2, 8200, 20, None, {}),
    (1, 3, 96, 20, 32, {}),
    (2, 7, 300, 33, None, {"ternary": True}),
    (4, 17, 256, 300, 32, {"block_k": 1024, "k_in_grid": False, "unroll": True}),  # as compiled for a GPU
    (8, 4, 40, 9, 8, {"k_in_grid": False, "signed": False, "zero_point": True}),
]


@pytest.mark.parametrize("bits,m,k,n,group_size,options", GRID)
def test_kernel_matches_reference_on_a_grid(bits, m, k, n, group_size, options):
    rng = np.random.default_rng(bits * 1000 + k)
    kernel = {key: options[key] for key in ("block_k", "k_in_grid", "unroll") if key in options}
    signed = options.get("signed", True)
    words, scales, zero = random_packed(rng, bits, k, n, group_size=group_size, signed=signed,
                                        ternary=options.get("ternary", False),
                                        zero_point=options.get("zero_point", False))
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)
    check_against_reference(x, words, scales, zero, bits=bits, group_size=group_size,
                            signed=signed, **kernel)


@settings(max_examples=6)
@given(bits=st.sampled_from([1, 2, 4, 8]), m=st.integers(1, 9), n=st.integers(1, 40),
       groups=st.integers(1, 3), group_size=st.sampled_from([8, 16, 24, 48]), per_channel=st.booleans(),
       bf16=st.booleans(), signed=st.booleans(), seed=st.integers(0, 2**16))
def test_kernel_matches_reference_hypothesis(bits, m, n, groups, group_size, per_channel, bf16, signed, seed):
    rng = np.random.default_rng(seed)
    k = groups * group_size
    words, scales, zero = random_packed(rng, bits, k, n, group_size=None if per_channel else group_size,
                                        signed=signed, zero_point=not signed)
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    x = jnp.asarray(rng.normal(size=(m, k)), dtype)
    check_against_reference(x, words, scales, zero, bits=bits, group_size=None if per_channel else group_size,
                            signed=signed)


def test_bfloat16_activations_and_leading_axes():
    rng = np.random.default_rng(1)
    words, scales, _ = random_packed(rng, 4, 128, 24, group_size=32)
    x = jnp.asarray(rng.normal(size=(2, 3, 128)), jnp.bfloat16)
    check_against_reference(x, words, scales, None, bits=4, group_size=32)
    assert kp.packed_matmul(x, words, scales, bits=4, backend="interpret").shape == (2, 3, 24)


def test_tiles_meet_the_tpu_and_gpu_rules():
    assert tile(20, 128, 8, False) == 24 and tile(300, 128, 8, False) == 128  # whole axis, or a 128 multiple
    assert tile(20, 128, 16, True) == 32 and tile(3, 256, 128, True) == 128
    assert tile(700, 512, 128, True) == 512


def test_scale_table_rows_follow_the_groups():
    """Row ``t`` of plane ``j`` is the group of word ``t * seg`` of that plane: of row ``j*P + t*seg``."""
    values = jnp.arange(12.0)[:, None]  # 12 groups of 8 rows: K = 96
    table, seg = scale_table(values, planes=8, words=12, padded_words=16, block_words=16, k=96)  # 4-bit
    assert seg == 4 and table.shape == (8, 4, 1)
    starts = np.arange(8)[:, None] * 12 + np.arange(4) * 4
    np.testing.assert_array_equal(table[:, :, 0], np.minimum(starts // 8, 11))
    table, seg = scale_table(values[:4], planes=8, words=12, padded_words=16, block_words=16, k=96)
    assert seg is None and table[:, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # 24-row groups, 12 per plane


def test_empty_batch_and_empty_output():
    words, scales, _ = random_packed(np.random.default_rng(3), 4, 64, 8)
    for backend in ("xla", "interpret"):
        assert kp.packed_matmul(jnp.ones((0, 64)), words, scales, bits=4, backend=backend).shape == (0, 8)
        y = kp.packed_matmul(jnp.ones((2, 64)), words[:, :0], scales[:, :0], bits=4, backend=backend)
        assert y.shape == (2, 0)
        acc = kp.int8_dot(jnp.ones((0, 5), jnp.int8), jnp.ones((5, 3), jnp.int8), backend=backend)
        assert acc.shape == (0, 3) and acc.dtype == jnp.int32


def test_jit_and_vmap():
    rng = np.random.default_rng(2)
    words, scales, _ = random_packed(rng, 2, 64, 12, group_size=16)
    x = jnp.asarray(rng.normal(size=(3, 5, 64)), jnp.float32)
    f = functools.partial(kp.packed_matmul, bits=2, group_size=16, backend="interpret")
    want = kp.packed_matmul(x, words, scales, bits=2, group_size=16, backend="xla")
    np.testing.assert_allclose(jax.jit(f)(x, words, scales), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(f, in_axes=(0, None, None))(x, words, scales), want, rtol=1e-5,
                               atol=1e-5)
    stacked = jnp.stack([words, words ^ jnp.uint32(0x5555_5555)])  # a second weight: every code changed
    ys = jax.vmap(f)(x[:2], stacked, jnp.stack([scales, 2 * scales]))
    for i in range(2):
        want_i = kp.packed_matmul(x[i], stacked[i], (1 + i) * scales, bits=2, group_size=16, backend="xla")
        np.testing.assert_allclose(ys[i], want_i, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["int4", "binary"])
def test_all_zero_weight_gives_zeros_and_nan_input_stays_nan(fmt):
    q = Quantizer(fmt, PerGroup(0, 32) if fmt == "int4" else PerChannel(-1))
    x = jnp.ones((3, 64)).at[1, 5].set(jnp.nan)

    @jax.jit
    def run(x):
        w = quantize(q, jnp.zeros((64, 8))).pack(axis=0)
        return frozen_matmul(x, w, backend="interpret"), frozen_matmul(x, w, backend="xla")

    y, want = run(x)
    assert not np.isnan(y[::2]).any() and np.isnan(y[1]).all() and np.isnan(want[1]).all()
    np.testing.assert_array_equal(y[::2], want[::2])


def test_grad_through_the_kernel_matches_the_reference():
    """The Pallas backends differentiate by the reference's backward: d/dx, d/dscales and d/dzero_point."""
    rng = np.random.default_rng(4)
    words, scales, zero = random_packed(rng, 4, 64, 12, group_size=16, signed=False, zero_point=True)
    x = jnp.asarray(rng.normal(size=(3, 64)), jnp.float32)

    def loss(x, scales, zero, backend):
        y = kp.packed_matmul(x, words, scales, bits=4, group_size=16, zero_point=zero, signed=False,
                             backend=backend)
        return jnp.sum(jnp.sin(y))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    for got, want in zip(grad(x, scales, zero, "interpret"), grad(x, scales, zero, "xla"), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize("bits,m,k,n,block_k", [(4, 5, 1000, 300, 512), (1, 20, 9000, 40, 2048),
                                                (8, 3, 40, 9, 2048)])
def test_blocks_obey_the_tpu_rules(bits, m, k, n, block_k, monkeypatch):
    """Every block's last two dimensions are multiples of 8 and 128, or span the whole (padded) array."""
    from jax.experimental import pallas as pl

    seen = []
    original = pl.pallas_call

    def recording(kernel, **kwargs):
        call = original(kernel, **kwargs)
        specs = [*kwargs["in_specs"], kwargs["out_specs"]]
        return lambda *ops: seen.extend(zip(specs, [*ops, call(*ops)], strict=True)) or seen[-1][1]

    monkeypatch.setattr(pl, "pallas_call", recording)
    words, scales, _ = random_packed(np.random.default_rng(0), bits, k, n)
    x = jnp.ones((m, k), jnp.float32)
    y = packed_matmul_pallas(x, words, scales, bits=bits, interpret=True, block_k=block_k)
    assert y.shape == (m, n) and len(seen) == 4  # x planes, words, scales, output
    for spec, array in seen:
        *_, rows, cols = spec.block_shape
        assert rows % 8 == 0 or rows == array.shape[-2], (spec.block_shape, array.shape)
        assert cols % 128 == 0 or cols == array.shape[-1], (spec.block_shape, array.shape)


def test_e2m1_fields_decode_to_fp4_values():
    from kernels_pallas.layout import decode_e2m1

    patterns = jnp.arange(16, dtype=jnp.uint8)
    fp4 = jax.lax.bitcast_convert_type(patterns.astype(jnp.uint4), jnp.float4_e2m1fn).astype(jnp.float32)
    np.testing.assert_array_equal(decode_e2m1(patterns.astype(jnp.int32)), fp4)


@pytest.mark.parametrize("k,n,block,kernel", [(96, 20, 16, {}), (160, 33, 32, {}),
                                              (256, 40, 16, {"k_in_grid": False, "unroll": True})])
def test_e2m1_weights_match_the_dense_product(k, n, block, kernel):
    # FP4 E2M1 codes (MXFP4 / NVFP4 elements) packed as 4-bit bit patterns, float block scales along K: the
    # interpret kernel (grid or GPU-style loop) and the reference equal x @ (values * scales)
    kx, kw, ks = jax.random.split(jax.random.key(k), 3)
    values = jax.random.normal(kw, (k, n)).astype(jnp.float4_e2m1fn)
    words = kp.layout.pack(jax.lax.bitcast_convert_type(values, jnp.uint4).astype(jnp.uint8), 4, 0)
    scales = jnp.exp2(jax.random.randint(ks, (k // block, n), -3, 3).astype(jnp.float32))
    x = jax.random.normal(kx, (5, k))
    dense = x @ (values.astype(jnp.float32).reshape(k // block, block, n) * scales[:, None]).reshape(k, n)
    args = dict(bits=4, element="e2m1")
    ref = kp.packed_matmul(x, words, scales, backend="xla", **args)
    if kernel:
        got = packed_matmul_pallas(x, words, scales, interpret=True, **kernel, **args)
    else:
        got = kp.packed_matmul(x, words, scales, backend="interpret", **args)
    np.testing.assert_allclose(ref, dense, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(got, dense, rtol=1e-5, atol=1e-4)


def test_e2m1_needs_four_bit_fields_and_no_zero_point():
    words, scales, x = jnp.zeros((8, 3), jnp.uint32), jnp.ones((1, 3)), jnp.ones((2, 64))
    with pytest.raises(ValueError, match=r"element='e2m1' with bits=8 .*allowed: 'int', or 'e2m1'"):
        kp.packed_matmul(x, jnp.zeros((16, 3), jnp.uint32), scales, bits=8, element="e2m1")
    with pytest.raises(ValueError, match=r"element='e2m1' with bits=4 and a zero point"):
        kp.packed_matmul(x, words, scales, bits=4, element="e2m1", zero_point=jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match=r"element='fp8'"):
        kp.packed_matmul(x, words, scales, bits=4, element="fp8")
