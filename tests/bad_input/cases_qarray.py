"""QArray construction and methods, dequantize: bad codes, scales, formats and packing; documented edges."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax import PerChannel, PerGroup, PerTensor, QArray, Quantizer, dequantize, get_format, quantize
from tests.bad_input.table import Documented, Raises, case

W = jnp.linspace(-1.0, 1.0, 128, dtype=jnp.float32).reshape(16, 8)
Q4 = Quantizer("int4", PerChannel(-1))
S8 = jnp.full((1, 8), 0.5, jnp.float32)  # per-channel (PerChannel(-1)) scales of a (16, 8) array


def qa(name: str = "int4", gran=None, scale: str = "absmax") -> QArray:
    return quantize(Quantizer(name, gran or PerChannel(-1), scale), W)


def codes(values, dtype=jnp.int8, shape=(16, 8)) -> jax.Array:
    return jnp.full(shape, 0, dtype).at[0, 0].set(values)


def make(c, fmt="int4", scale=S8, zero_point=None, gran=None, **kw) -> QArray:
    return QArray(c, scale, zero_point, fmt, gran or PerChannel(-1), **kw)


def _same_packed(result):
    assert result.packing == (-2, 16, 4)
    np.testing.assert_array_equal(dequantize(result), dequantize(qa()))


def _equal(expected):
    def check(result):
        np.testing.assert_array_equal(np.asarray(result), np.asarray(expected()))
    return check


def _empty(result):
    assert result.shape == (0, 8) and result.dtype == jnp.float32


def _zeros_no_nan(result):
    assert not bool(jnp.any(jnp.isnan(result))) and not bool(jnp.any(result))


def _stacked(result):
    batch, xs = result
    assert batch.scale.shape == (3, 1, 8)
    for i in range(3):
        np.testing.assert_array_equal(dequantize(batch)[i], dequantize(quantize(Q4, xs[i])))


def _nan_group(result):
    assert bool(jnp.all(jnp.isnan(result[:, 3]))) and not bool(jnp.any(jnp.isnan(jnp.delete(result, 3, 1))))


def _grad_of_scale(result):
    assert result.codes.dtype == jax.dtypes.float0
    np.testing.assert_allclose(result.scale, jnp.sum(qa().codes.astype(jnp.float32), 0, keepdims=True))


def _resolved(result):
    assert result.granularity == PerChannel((-1,))
    np.testing.assert_array_equal(dequantize(result), dequantize(make(qa().codes)))


def _nf4_lookup(result):
    table = jnp.asarray(get_format("nf4").table)
    np.testing.assert_array_equal(result, table[qa("uint4").codes.astype(jnp.int32)] * qa("uint4").scale)


def _with_shardings(result):
    assert isinstance(result, QArray) and all(isinstance(s, jax.sharding.Sharding)
                                              for s in jax.tree_util.tree_leaves(result))


CASES = [
    # --- re-packing ---------------------------------------------------------------------------------------
    case("qarray-repack-along-another-axis", lambda: qa().pack(0).pack(1),
         Raises(r"QArray.pack: axis=1 of a QArray packed along axis 0 already; allowed: axis=0.*unpack\(\)")),
    case("qarray-repack-along-another-negative-axis", lambda: qa().pack(-1).pack(-2),
         Raises(r"axis=0 of a QArray packed along axis 1 already; allowed: axis=1")),
    case("qarray-repack-along-the-same-axis", lambda: qa().pack(0).pack(0),
         Documented(_same_packed, doc="qjax.qarray.pack: packed along axis already -> returned as it is")),
    case("qarray-repack-same-axis-negative-spelling", lambda: qa().pack(0).pack(-2),
         Documented(_same_packed, doc="qjax.qarray.pack: axis -2 of a rank-2 QArray is axis 0")),
    case("qarray-pack-axis-out-of-range", lambda: qa().pack(2),
         Raises(r"QArray.pack: axis=2 is out of range for rank 2; allowed: \[-2, 1\]")),
    case("qarray-unpack-of-unpacked-passes-through", lambda: qa().unpack(),
         Documented(lambda r: np.testing.assert_array_equal(r.codes, qa().codes),
                    doc="qjax.qarray.unpack: an unpacked QArray passes through")),
    # --- codes: dtype ---------------------------------------------------------------------------------------
    case("qarray-float-codes-for-int4", lambda: make(W),
         Raises(r"codes of dtype float32 for format 'int4'; allowed: int8")),
    case("qarray-int32-codes-for-int8", lambda: make(jnp.zeros((16, 8), jnp.int32), "int8"),
         Raises(r"codes of dtype int32 for format 'int8'; allowed: int8")),
    case("qarray-int8-codes-for-uint4", lambda: make(jnp.zeros((16, 8), jnp.int8), "uint4"),
         Raises(r"codes of dtype int8 for format 'uint4'; allowed: uint8")),
    case("qarray-int4-relabelled-nf4", lambda: dataclasses.replace(qa(), format="nf4"),
         Raises(r"codes of dtype int8 for format 'nf4'; allowed: uint8")),
    case("qarray-nf4-relabelled-int4", lambda: dataclasses.replace(qa("nf4"), format="int4"),
         Raises(r"codes of dtype uint8 for format 'int4'; allowed: int8")),
    case("qarray-fp8-relabelled-int8", lambda: dataclasses.replace(qa("fp8_e4m3"), format="int8"),
         Raises(r"codes of dtype float8_e4m3fn for format 'int8'; allowed: int8")),
    case("qarray-int8-relabelled-fp8", lambda: dataclasses.replace(qa("int8"), format="fp8_e4m3"),
         Raises(r"codes of dtype int8 for format 'fp8_e4m3'; allowed: float8_e4m3fn")),
    case("qarray-unknown-format", lambda: dataclasses.replace(qa(), format="int9"),
         Raises(r"unknown format 'int9'.*allowed: int2")),
    case("qarray-uint4-relabelled-nf4-reads-the-table",
         lambda: dequantize(dataclasses.replace(qa("uint4", scale="absmax"), format="nf4")),
         Documented(_nf4_lookup, doc="qjax.qarray module docstring: uint4 codes and nf4 indices are the same "
                                     "uint8 values 0..15, so a relabelled QArray reads them as nf4 indices")),
    # --- codes: values (concrete) ---------------------------------------------------------------------------
    case("qarray-int4-code-9", lambda: make(codes(9)),
         Raises(r"QArray: code 9 is not a 'int4' code; allowed: \[-8, 7\]")),
    case("qarray-int2-code-minus-3", lambda: make(codes(-3), "int2"),
         Raises(r"code -3 is not a 'int2' code; allowed: \[-2, 1\]")),
    case("qarray-uint4-code-16", lambda: make(codes(16, jnp.uint8), "uint4"),
         Raises(r"code 16 is not a 'uint4' code; allowed: \[0, 15\]")),
    case("qarray-binary-code-0", lambda: make(jnp.ones((16, 8), jnp.int8).at[2, 3].set(0), "binary"),
         Raises(r"code 0 is not a 'binary' code; allowed: \{-1, \+1\}")),
    case("qarray-ternary-code-2", lambda: make(codes(2), "ternary"),
         Raises(r"code 2 is not a 'ternary' code; allowed: \[-1, 1\]")),
    case("qarray-nf4-index-20", lambda: make(codes(20, jnp.uint8), "nf4"),
         Raises(r"code 20 is not a 'nf4' code; allowed: \[0, 15\]")),
    case("qarray-dequantize-numpy-codes-out-of-range", lambda: make(np.full((16, 8), 8, np.int8)),
         Raises(r"code 8 is not a 'int4' code; allowed: \[-8, 7\]")),
    case("qarray-packed-ternary-field-0-decodes-to-minus-2",
         lambda: dequantize(dataclasses.replace(qa("ternary").pack(0),
                                                codes=jnp.zeros((1, 8), jnp.uint32))),
         Raises(r"code -2 is not a 'ternary' code; allowed: \[-1, 1\]")),
    case("qarray-int8-codes-any-value", lambda: dequantize(make(codes(-128), "int8")),
         Documented(lambda r: float(r[0, 0]) == -64.0,
                    doc="every int8 value is an int8 code: -128 * 0.5")),
    case("qarray-all-zero-codes", lambda: dequantize(make(jnp.zeros((16, 8), jnp.int8))),
         Documented(_zeros_no_nan, doc="dequantize: (0 - z) * s = 0, no NaN")),
    case("qarray-jit-int4-code-9-is-not-checked",
         lambda: jax.jit(lambda c: dequantize(make(c)))(codes(9)),
         Documented(lambda r: float(r[0, 0]) == 4.5,
                    doc="qjax.qarray module docstring: under jit an out-of-range integer code dequantizes to "
                        "its own value times the scale")),
    case("qarray-jit-nf4-index-past-the-table",
         lambda: jax.jit(lambda c: dequantize(make(c, "nf4")))(codes(20, jnp.uint8)),
         Documented(lambda r: float(r[0, 0]) == 0.5,
                    doc="qjax.qarray module docstring: under jit an index past a table reads its last value "
                        "(nf4: 1.0, times the scale 0.5)")),
    # --- scales and zero points -----------------------------------------------------------------------------
    case("qarray-transposed-scales", lambda: make(qa().codes, scale=qa().scale.T),
         Raises(r"scale of shape \(8, 1\) does not fit codes of shape \(16, 8\) with PerChannel.*"
                r"allowed: \(1, 8\)")),
    case("qarray-transposed-scales-square",
         lambda: make(jnp.zeros((8, 8), jnp.int8), scale=jnp.ones((8, 1))),
         Raises(r"scale of shape \(8, 1\) does not fit codes of shape \(8, 8\).*allowed: \(1, 8\)")),
    case("qarray-per-group-scales-transposed",
         lambda: make(qa(gran=PerGroup(0, 4)).codes, scale=jnp.ones((8, 1, 4)), gran=PerGroup(0, 4)),
         Raises(r"scale of shape \(8, 1, 4\) does not fit.*PerGroup.*allowed: \(4, 1, 8\)")),
    case("qarray-scales-without-their-size-1-axis", lambda: make(qa().codes, scale=jnp.ones((8,))),
         Raises(r"scale of shape \(8,\) does not fit.*allowed: \(1, 8\)")),
    case("qarray-per-tensor-scales-per-column",
         lambda: make(qa().codes, scale=jnp.ones((1, 8)), gran=PerTensor()),
         Raises(r"scale of shape \(1, 8\) does not fit.*PerTensor.*allowed: \(1, 1\)")),
    case("qarray-integer-scales", lambda: make(qa().codes, scale=jnp.ones((1, 8), jnp.int32)),
         Raises(r"scale of dtype int32; allowed: a float dtype")),
    case("qarray-transposed-zero-point",
         lambda: dataclasses.replace(qa("uint4", scale="minmax"), zero_point=jnp.zeros((8, 1))),
         Raises(r"zero_point of shape \(8, 1\) does not fit codes of shape \(16, 8\).*allowed: \(1, 8\)")),
    case("qarray-nan-scale-marks-its-group",
         lambda: dequantize(make(qa().codes, scale=qa().scale.at[0, 3].set(jnp.nan))),
         Documented(_nan_group, doc="dequantize: a NaN scale makes exactly its group NaN (NaN stays NaN)")),
    case("qarray-stacked-by-vmap",
         lambda: (jax.vmap(lambda x: quantize(Q4, x))(jnp.stack([W, -W, 2 * W])),
                  jnp.stack([W, -W, 2 * W])),
         Documented(_stacked, doc="qjax.qarray module docstring: leading full-size axes of the scales are a "
                                  "stack made by vmap")),
    # --- metadata -------------------------------------------------------------------------------------------
    case("qarray-granularity-a-string", lambda: make(qa().codes, gran="per_channel"),
         Raises(r"granularity 'per_channel' is not a granularity; allowed: PerTensor", exc=TypeError)),
    case("qarray-group-size-not-dividing", lambda: make(qa().codes, gran=PerGroup(0, 5)),
         Raises(r"group size 5 does not divide axis 0 of length 16.*allowed sizes: \[1, 2, 4, 8, 16\]")),
    case("qarray-unresolved-granularity-is-resolved", lambda: make(qa().codes, gran=PerChannel(1)),
         Documented(_resolved, doc="QArray resolves its granularity against the codes' shape (PerChannel(1) "
                                   "of a rank-2 array is PerChannel((-1,)))")),
    case("qarray-integer-dtype-to-dequantize-to", lambda: make(qa().codes, dtype="int32"),
         Raises(r"dtype 'int32' is what dequantize returns; allowed: a float dtype name")),
    case("qarray-bases-0", lambda: make(qa().codes, bases=0),
         Raises(r"bases=0; allowed: a positive integer")),
    case("qarray-bases-2-without-a-leading-axis",
         lambda: make(jnp.ones((16, 8), jnp.int8), "binary", bases=2),
         Raises(r"codes of shape \(16, 8\) with bases=2; allowed: a leading axis of 2")),
    case("qarray-packing-with-the-wrong-bits", lambda: dataclasses.replace(qa().pack(0), packing=(-2, 16, 8)),
         Raises(r"packing=\(-2, 16, 8\) for format 'int4'.*allowed: None or .*bits=4")),
    case("qarray-packing-size-not-matching-the-words",
         lambda: dataclasses.replace(qa().pack(0), packing=(-2, 40, 4)),
         Raises(r"packed codes of shape \(2, 8\) and dtype uint32; allowed: uint32 words with 5 along "
                r"axis -2")),
    case("qarray-dequantize-of-an-array", lambda: dequantize(W),
         Raises(r"dequantize expects a QArray, got ArrayImpl")),
    # --- documented edges -----------------------------------------------------------------------------------
    case("qarray-empty-round-trip",
         lambda: dequantize(make(jnp.zeros((0, 8), jnp.int8)).pack(0)),
         Documented(_empty, doc="an empty QArray packs into 0 words and dequantizes to a (0, 8) array")),
    case("qarray-packed-round-trip-every-container",
         lambda: [bool(jnp.all(dequantize(qa(n).pack(0)) == dequantize(qa(n))))
                  for n in ("binary", "ternary", "int3", "int4", "uint6", "nf4", "fp8_e5m2", "fp4_e2m1")],
         Documented(lambda r: all(r), doc="QArray.pack: dequantize(pack(q)) == dequantize(q), any format")),
    case("qarray-grad-through-dequantize",
         lambda: jax.grad(lambda a: jnp.sum(dequantize(a)), allow_int=True)(qa()),
         Documented(_grad_of_scale, doc="a cotangent QArray (float0 codes) passes: d/ds sum(cs) = sum(c)")),
    case("qarray-leaves-that-are-shardings",
         lambda: jax.tree_util.tree_map(lambda leaf: leaf.sharding, qa()),
         Documented(_with_shardings, doc="qjax.qarray module docstring: leaves that are not arrays are not "
                                         "checked (qjax.optim.state_shardings builds such trees)")),
    case("qarray-jit-round-trip-equals-eager", lambda: jax.jit(dequantize)(qa("ternary").pack(1)),
         Documented(_equal(lambda: dequantize(qa("ternary"))), doc="dequantize is the same under jit")),
]
