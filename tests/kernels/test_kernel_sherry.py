"""Sherry 1.25-bit weights (ternary, 3:4 sparse): projection, packing, and the matmul on every backend."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import kernels_pallas as kp
from kernels_pallas.sherry import sherry_matmul_pallas

PATTERNS = np.array([[0 if t == z else s[t - (t > z)] for t in range(4)]
                     for z in range(4) for s in itertools.product([1, -1], repeat=3)])  # the 32 patterns


def random_codes(rng: np.random.Generator, k: int, *shape: int) -> np.ndarray:
    """Random 3:4-sparse ternary int8 codes ``(k, *shape)``, each block of 4 along axis 0 a random pattern."""
    blocks = PATTERNS[rng.integers(0, 32, (k // 4, *shape))]  # (k / 4, *shape, 4)
    return np.moveaxis(blocks, -1, 1).reshape(k, *shape).astype(np.int8)


def random_weight(rng, k, n, group_size=None):
    """``(codes, words, scales)`` of a random Sherry ``(k, n)`` weight, scales ``(K / group_size, N)``."""
    codes = random_codes(rng, k, n)
    groups = 1 if group_size is None else k // group_size
    return codes, kp.sherry_pack(codes), jnp.asarray(rng.uniform(0.25, 2.0, (groups, n)), jnp.float32)


def dense(x, codes, scales) -> np.ndarray:
    """``x @ (codes * scales)`` in float64, the scales' rows repeated over their groups."""
    scales = np.asarray(scales, np.float64)
    scales = np.broadcast_to(scales.reshape(scales.shape[0], -1), (scales.shape[0], codes.shape[1]))
    w = codes * np.repeat(scales, codes.shape[0] // scales.shape[0], axis=0)
    return np.asarray(x, np.float64) @ w


def assert_close(got, want, k):
    """allclose at rtol 1e-5, with an atol for float32 rounding of a K-term sum of outputs near 0."""
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@settings(max_examples=25, deadline=None)
@given(blocks=st.sampled_from([0, 1, 7, 32, 33, 40]), other=st.sampled_from([(1,), (3,), (2, 2)]),
       axis=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(blocks, other, axis, seed):
    codes = random_codes(np.random.default_rng(seed), 4 * blocks, *other)
    axis = min(axis, len(other))
    codes = np.moveaxis(codes, 0, axis)
    words = kp.sherry_pack(codes, axis=axis)
    assert words.dtype == jnp.uint32 and words.shape[axis] == kp.sherry_packed_size(4 * blocks)
    back = kp.sherry_unpack(words, axis, 4 * blocks)
    assert back.dtype == jnp.int8 and back.shape == codes.shape
    np.testing.assert_array_equal(back, codes)


def test_real_size_is_1_25_bits_per_weight():
    rng = np.random.default_rng(0)
    for k, n in [(128, 3), (384, 5), (1024, 2)]:
        words = kp.sherry_pack(random_codes(rng, k, n))
        assert words.nbytes * 8 == 1.25 * k * n and words.shape == (k // 128 * 5, n)
    assert [kp.sherry_packed_size(k) for k in (0, 4, 128, 132, 256)] == [0, 5, 5, 10, 10]


def test_layout_field_j_of_group_q_is_block_j_Q_plus_q():
    """Zero positions: 2-bit fields, 16 per word in words 0 .. 2Q - 1; signs: one bit per field in the three
    planes after them; padding blocks are the all-zero field ``[0, 1, 1, 1]``."""
    np.testing.assert_array_equal(kp.sherry_pack(np.array([1, 0, -1, 1], np.int8)), [1, 0, 0, 1, 0])
    padded = kp.sherry_unpack(jnp.zeros((5,), jnp.uint32), 0, 128)
    np.testing.assert_array_equal(padded, np.tile([0, 1, 1, 1], 32))
    q_count = 2  # K = 256
    codes = np.tile(np.array([0, 1, 1, 1], np.int8), 64)
    codes[4 * 11:4 * 12] = [1, 1, 1, 0]  # block 11 = field 5 of group 1: zero at 3
    codes[4 * 32:4 * 33] = [-1, 0, 1, -1]  # block 32 = field 16 of group 0: zero at 1, signs - + -
    want = np.zeros(5 * q_count, np.uint32)
    want[1] = 3 << 10
    want[q_count + 0] = 1
    want[2 * q_count + 0] = want[4 * q_count + 0] = 1 << 16
    np.testing.assert_array_equal(kp.sherry_pack(codes), want)


def test_every_word_decodes_to_3_4_codes_and_packs_back():
    """Any 5-bit field is one of the 32 patterns: unpack is a bijection onto valid codes (K % 128 == 0)."""
    words = jnp.asarray(np.random.default_rng(1).integers(0, 2**32, (15, 4), dtype=np.uint64), jnp.uint32)
    codes = np.asarray(kp.sherry_unpack(words, 0, 384))
    assert (np.sum(codes.reshape(96, 4, 4) == 0, axis=1) == 1).all() and set(np.unique(codes)) == {-1, 0, 1}
    np.testing.assert_array_equal(kp.sherry_pack(codes), words)
    np.testing.assert_array_equal(jax.jit(kp.sherry_unpack, static_argnums=(1, 2))(words, 0, 384), codes)


def test_pack_under_jit_and_unpack_of_traced_words():
    codes = random_codes(np.random.default_rng(2), 136, 3)
    words = jax.jit(kp.sherry_pack)(codes)
    np.testing.assert_array_equal(words, kp.sherry_pack(codes))
    np.testing.assert_array_equal(jax.jit(lambda w: kp.sherry_unpack(w, 0, 136))(words), codes)


@pytest.mark.parametrize("codes,match", [
    ([1, 0, 0, 1], "with 2 zeros"),
    ([1, -1, 1, 1], "with 0 zeros"),
    ([1, 0, 2, 1], "code 2 is not ternary"),
    ([1, 0, 1, 1, 0, 1], "length 6"),
])
def test_codes_that_are_not_3_4_ternary_raise(codes, match):
    with pytest.raises(ValueError, match=match):
        kp.sherry_pack(np.array(codes, np.int8))


def test_bad_pack_and_unpack_arguments_raise():
    with pytest.raises(ValueError, match="integer dtype, got float32"):
        kp.sherry_pack(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="axis=2"):
        kp.sherry_pack(np.zeros((4, 4), np.int8), axis=2)
    words = jnp.zeros((10, 2), jnp.uint32)
    with pytest.raises(ValueError, match=r"size=100 .* allowed: a multiple of 4 in 132 \.\. 256"):
        kp.sherry_unpack(words, 0, 100)
    with pytest.raises(ValueError, match="size=254"):
        kp.sherry_unpack(words, 0, 254)
    with pytest.raises(ValueError, match="7 words are not a multiple of 5"):
        kp.sherry_unpack(jnp.zeros(7, jnp.uint32), 0, 128)
    with pytest.raises(ValueError, match="uint32, got int32"):
        kp.sherry_unpack(jnp.zeros(5, jnp.int32), 0, 128)
    with pytest.raises(ValueError, match="length 10"):
        kp.sherry_packed_size(10)
    with pytest.raises(ValueError, match="length 6"):
        kp.sherry_project(np.ones((2, 6)), axis=1)


def test_projection_is_the_nearest_3_4_pattern():
    cases = [([0.5, -0.1, 2.0, -3.0], [1, 0, 1, -1]),
             ([-1.0, 1.0, -1.0, 1.0], [0, 1, -1, 1]),  # ties: the first smallest magnitude is zeroed
             ([0.0, 0.0, 0.0, 0.0], [0, 1, 1, 1]),  # sign(0) = +1 off the zero
             ([3.0, -2.0, 0.0, -0.0], [1, -1, 0, 1])]
    for w, want in cases:
        got = kp.sherry_project(jnp.asarray(w))
        assert got.dtype == jnp.int8 and got.tolist() == want, (w, got)
    w = np.random.default_rng(3).normal(size=(64, 8))
    for axis in (0, 1):
        codes = np.asarray(kp.sherry_project(w, axis=axis))
        blocks = np.moveaxis(codes, axis, 0).reshape(-1, 4, np.moveaxis(codes, axis, 0).shape[1])
        assert (np.sum(blocks == 0, axis=1) == 1).all() and (np.abs(codes) <= 1).all()
    # brute force over the 32 patterns of every block: the least squares error at each one's best scale a >= 0
    codes, blocks = np.asarray(kp.sherry_project(w)), w.T.reshape(-1, 4)

    def error(w, c):
        a = np.maximum(np.sum(w * c, axis=-1, keepdims=True) / 3, 0)
        return np.sum((w - a * c) ** 2, axis=-1)

    best = error(blocks[:, None, :], PATTERNS[None]).min(axis=1)
    np.testing.assert_allclose(error(blocks, codes.T.reshape(-1, 4)), best, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(kp.sherry_unpack(kp.sherry_pack(codes), 0, 64), codes)


# (m, k, n, group_size, kernel options): per channel; per group, ragged against the 3 words of a plane
# (segments of one word); K % 128 != 0 (padding blocks), a group per field; several K blocks; the K loop
# of a GPU compile with power-of-two tiles; the 32 fields unrolled.
GRID = [
    (3, 256, 5, None, {}),
    (7, 384, 33, 32, {}),
    (5, 100, 9, 20, {}),
    (1, 2560, 17, 64, {"block_k": 1024}),
    (3, 2560, 20, 128, {"k_in_grid": False, "block_k": 2048}),
    (2, 128, 3, 64, {"unroll": True}),
]


@pytest.mark.parametrize("m,k,n,group_size,options", GRID)
def test_xla_equals_interpret_equals_dense(m, k, n, group_size, options):
    rng = np.random.default_rng(k + n)
    codes, words, scales = random_weight(rng, k, n, group_size)
    x = jnp.asarray(rng.normal(size=(m, k)), jnp.float32)

    @jax.jit
    def run(x, words, scales):
        xla = kp.sherry_matmul(x, words, scales, k=k, group_size=group_size, backend="xla")
        if options:
            kernel = sherry_matmul_pallas(x, words, scales, interpret=True, **options)
        else:
            kernel = kp.sherry_matmul(x, words, scales, k=k, group_size=group_size, backend="interpret")
        return xla, kernel

    want = dense(x, codes, scales)
    for got in run(x, words, scales):
        assert got.shape == (m, n) and got.dtype == jnp.float32
        assert_close(got, want, k)


def test_scale_shapes_bfloat16_and_leading_axes():
    """``(1, 1)`` per tensor, ``(G, 1, N)`` per group; bfloat16 activations times the exact ternary codes
    are exact products, so the result is the dense one of the rounded activations."""
    rng = np.random.default_rng(4)
    codes, words, scales = random_weight(rng, 256, 6, 64)
    x = jnp.asarray(rng.normal(size=(2, 3, 256)), jnp.bfloat16)
    f = jax.jit(functools.partial(kp.sherry_matmul, k=256, backend="interpret"))
    y = f(x, words, scales[:, None, :])
    assert y.shape == (2, 3, 6)
    assert_close(y, dense(np.asarray(x.astype(jnp.float32)).reshape(6, 256), codes, scales).reshape(2, 3, 6),
                 256)
    y = f(x, words, scales[:1, :1])
    assert_close(y, dense(np.asarray(x.astype(jnp.float32)), codes, scales[:1, :1]), 256)


def test_empty_k_and_empty_batch():
    for backend in ("xla", "interpret"):
        y = kp.sherry_matmul(jnp.ones((3, 0)), jnp.zeros((0, 4), jnp.uint32), jnp.ones((1, 4)), k=0,
                             backend=backend)
        assert y.shape == (3, 4) and not y.any()
        _, words, scales = random_weight(np.random.default_rng(5), 128, 4)
        assert kp.sherry_matmul(jnp.ones((0, 128)), words, scales, k=128, backend=backend).shape == (0, 4)


def test_jit_and_vmap():
    rng = np.random.default_rng(6)
    codes, words, scales = random_weight(rng, 256, 12, 32)
    x = jnp.asarray(rng.normal(size=(3, 5, 256)), jnp.float32)
    f = functools.partial(kp.sherry_matmul, k=256, group_size=32, backend="interpret")
    want = dense(x.reshape(15, 256), codes, scales).reshape(3, 5, 12)
    assert_close(jax.jit(jax.vmap(f, in_axes=(0, None, None)))(x, words, scales), want, 256)
    codes2 = -codes  # a second weight: every sign flipped, the zeros kept
    stacked = jnp.stack([words, kp.sherry_pack(codes2)])
    ys = jax.jit(jax.vmap(f))(x[:2], stacked, jnp.stack([scales, 2 * scales]))
    for i, c in enumerate([codes, codes2]):
        assert_close(ys[i], dense(x[i], c, (1 + i) * scales), 256)


def test_grad_through_the_kernel_equals_the_dense_one():
    """d/dx of the interpret kernel is the dense ``g @ W^T``; d/dscales equals the reference's."""
    rng = np.random.default_rng(7)
    codes, words, scales = random_weight(rng, 256, 10, 64)
    x = jnp.asarray(rng.normal(size=(3, 256)), jnp.float32)

    def loss(x, scales, backend):
        return jnp.sum(jnp.sin(kp.sherry_matmul(x, words, scales, k=256, group_size=64, backend=backend)))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    gx, gs = grad(x, scales, "interpret")
    w = np.asarray(kp.sherry_dequantize(words, scales, k=256), np.float64)
    want_gx = np.cos(dense(x, codes, scales)) @ w.T
    assert_close(gx, want_gx, 256)
    np.testing.assert_allclose(gs, grad(x, scales, "xla")[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("change,match", [
    ({"k": 6}, "k=6"),
    ({"k": 256}, r"x of shape \(2, 128\) .* with k=256"),
    ({"x": np.ones((2, 128), np.int32)}, "dtype int32"),
    ({"words": jnp.zeros((5, 3), jnp.int32)}, "words of shape .* dtype int32"),
    ({"words": jnp.zeros((10, 3), jnp.uint32)}, r"words of shape \(10, 3\) .* allowed: uint32 \(5, N\)"),
    ({"group_size": 3}, "group_size=3"),
    ({"group_size": 48}, "group_size=48"),
    ({"group_size": 2}, "group_size=2 is not a multiple of 4"),
    ({"scales": jnp.ones((3, 3))}, r"scales of shape \(3, 3\)"),
    ({"scales": jnp.ones((64, 3))}, r"scales of shape \(64, 3\): 64 groups of 2"),
    ({"scales": jnp.ones((1, 3), jnp.int32)}, "scales of dtype int32"),
    ({"backend": "cuda"}, "unknown backend 'cuda'"),
])
def test_bad_arguments_raise_naming_the_value(change, match):
    args = {"x": jnp.ones((2, 128)), "words": jnp.zeros((5, 3), jnp.uint32), "scales": jnp.ones((1, 3)),
            "k": 128, "group_size": None, "backend": "interpret"} | change
    with pytest.raises(ValueError, match=match):
        kp.sherry_matmul(args.pop("x"), args.pop("words"), args.pop("scales"), **args)


def test_blocks_obey_the_tpu_rules(monkeypatch):
    """Every block's last two dimensions are multiples of 8 and 128, or span the whole (padded) array."""
    from jax.experimental import pallas as pl

    seen = []
    original = pl.pallas_call

    def recording(kernel, **kwargs):
        call = original(kernel, **kwargs)
        specs = [*kwargs["in_specs"], kwargs["out_specs"]]
        return lambda *ops: seen.extend(zip(specs, [*ops, call(*ops)], strict=True)) or seen[-1][1]

    monkeypatch.setattr(pl, "pallas_call", recording)
    _, words, scales = random_weight(np.random.default_rng(8), 1000, 300, 40)
    y = sherry_matmul_pallas(jnp.ones((5, 1000)), words, scales, interpret=True, block_k=1024)
    assert y.shape == (5, 300) and len(seen) == 4  # x tiles, words, scale table, output
    for spec, array in seen:
        *_, rows, cols = spec.block_shape
        assert rows % 8 == 0 or rows == array.shape[-2], (spec.block_shape, array.shape)
        assert cols % 128 == 0 or cols == array.shape[-1], (spec.block_shape, array.shape)
