"""QArray: a pytree through jit, vmap and tree_map; packed form; real bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import (
    FORMAT_NAMES,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    QArray,
    Quantizer,
    dequantize,
    quantize,
)

X = jax.random.normal(jax.random.key(0), (48, 16))


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("axis", [0, -1])
def test_pack_unpack_every_format(name, axis):
    qa = quantize(Quantizer(name, PerChannel(-1)), X)
    packed = qa.pack(axis)
    assert packed.codes.dtype == jnp.uint32 and packed.shape == qa.shape == X.shape
    bits = {1: 1, 2: 2, 3: 4, 4: 4}.get(qa.fmt.bits, 8)
    length = X.shape[axis]
    assert packed.codes.size == -(-length // (32 // bits)) * (X.size // length)
    np.testing.assert_array_equal(dequantize(packed), dequantize(qa))
    back = packed.unpack()
    assert back.codes.dtype == qa.codes.dtype
    np.testing.assert_array_equal(np.asarray(back.codes).view(np.uint8),
                                  np.asarray(qa.codes).view(np.uint8))


def test_packed_multi_basis_and_groups():
    qa = quantize(Quantizer("binary", PerGroup(0, 16), "mean_abs", bases=2), X)
    np.testing.assert_array_equal(dequantize(qa.pack(0)), dequantize(qa))
    assert qa.pack(0).codes.shape == (2, 2, 16)


def test_real_bytes_shrink_with_bits():
    w = jax.random.normal(jax.random.key(1), (1024, 256))
    sizes = {n: quantize(Quantizer(n, PerChannel(-1)), w).pack(0).nbytes
             for n in ("int8", "int4", "ternary", "binary")}
    scales = 256 * 4
    assert sizes == {"int8": w.size + scales, "int4": w.size // 2 + scales,
                     "ternary": w.size // 4 + scales, "binary": w.size // 8 + scales}
    assert quantize(Quantizer("int4", PerGroup(0, 128)), w).nbytes == w.size + 8 * 256 * 4


def test_is_a_pytree_through_jit_vmap_tree_map():
    q = Quantizer("int4", PerGroup(0, 8))
    qa = quantize(q, X)
    leaves, treedef = jax.tree_util.tree_flatten(qa)
    assert len(leaves) == 2  # codes and scale (no zero point)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(rebuilt, QArray) and rebuilt.granularity == qa.granularity
    through_jit = jax.jit(lambda a: a)(qa)
    np.testing.assert_array_equal(dequantize(through_jit), dequantize(qa))
    doubled = jax.tree_util.tree_map(lambda leaf: leaf * 2 if leaf.dtype == jnp.float32 else leaf, qa)
    np.testing.assert_allclose(dequantize(doubled), 2 * dequantize(qa))
    jitted = jax.jit(dequantize)(qa.pack(0))
    np.testing.assert_array_equal(jitted, dequantize(qa))
    xs = jnp.stack([X, -X, 2 * X])
    batch = jax.vmap(lambda x: quantize(q, x))(xs)
    assert batch.codes.shape == (3, 48, 16)
    np.testing.assert_array_equal(jax.vmap(dequantize)(batch)[1], dequantize(quantize(q, -X)))
    np.testing.assert_array_equal(dequantize(batch)[2], dequantize(quantize(q, 2 * X)))


def test_zero_point_is_a_leaf_and_dtype_restored():
    qa = quantize(Quantizer("uint4", PerChannel(-1), "minmax"), X.astype(jnp.bfloat16))
    assert len(jax.tree_util.tree_leaves(qa)) == 3
    assert dequantize(qa).dtype == jnp.bfloat16
    assert qa.dtype == "bfloat16"


def test_per_block_odd_size_round_trip():
    x = jax.random.normal(jax.random.key(2), (37, 11))  # 407 elements, blocks of 64
    qa = quantize(Quantizer("dynamic", PerBlock(64)), x)
    assert qa.scale.shape == (7, 1) and qa.codes.shape == x.shape
    y = dequantize(qa)
    blocks = np.pad(np.asarray(x).ravel(), (0, 41)).reshape(7, 64)
    np.testing.assert_allclose(np.asarray(qa.scale).ravel(), np.abs(blocks).max(1), rtol=1e-6)
    assert float(jnp.max(jnp.abs(y - x) / np.abs(blocks).max())) < 0.02


def test_per_tensor_scale_is_scalar_shaped():
    qa = quantize(Quantizer("int8", PerTensor()), X)
    assert qa.scale.shape == (1, 1)
