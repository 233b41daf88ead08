"""kernels_pallas (packed_matmul, int8_matmul, int8_dot), qjax.serving.frozen_matmul, qjax.int_matmul."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas as kp
from qjax import PerChannel, PerGroup, PerTensor, PerToken, Quantizer, dequantize, quantize
from qjax.int_matmul import qat_matmul
from qjax.serving import frozen_matmul
from tests.bad_input.table import Documented, Raises, case

K, N = 256, 8
X = jnp.linspace(-1.0, 1.0, 2 * K, dtype=jnp.float32).reshape(2, K)
W = jnp.cos(jnp.arange(K * N, dtype=jnp.float32)).reshape(K, N) * 0.05
WORDS = jnp.zeros((K // 8, N), jnp.uint32)  # 4-bit words along K
S1 = jnp.ones((1, N), jnp.float32)
S2 = jnp.ones((2, N), jnp.float32)  # two groups of 128
WEIGHT, INPUTS = Quantizer("int4", PerChannel(-1)), Quantizer("int8", PerToken(-1))
I8 = jnp.ones((2, K), jnp.int8)
W8 = jnp.ones((K, N), jnp.int8)


def pm(x=X, words=WORDS, scales=S2, **kw):
    kw = {"bits": 4, "group_size": 128, "backend": "xla", **kw}
    return kp.packed_matmul(x, words, scales, **kw)


def i8(x=I8, sx=None, w=W8, sw=S1, backend="xla"):
    sx = jnp.ones((*x.shape[:-1], 1)) if sx is None else sx
    return kp.int8_matmul(x, sx, w, sw, backend=backend)


def packed(name="int4", gran=None):
    return quantize(Quantizer(name, gran or PerGroup(0, 128)), W).pack(0)


def _zeros(shape):
    def check(result):
        assert result.shape == shape and result.dtype == jnp.float32 and not bool(jnp.any(result))
    return check


def _close_to(reference):
    def check(result):
        expected = reference()
        assert result.shape == expected.shape
        np.testing.assert_allclose(np.asarray(result), np.asarray(expected), rtol=1e-5, atol=1e-5)
    return check


def _nan_row(result):
    assert bool(jnp.all(jnp.isnan(result[0]))) and bool(jnp.all(jnp.isfinite(result[1])))


CASES = [
    # --- packed_matmul: bits, group size, backend ------------------------------------------------------
    case("kernels-packed-bits-3", lambda: pm(bits=3),
         Raises(r"bits=3 has no packed matmul; allowed: \(1, 2, 4, 8\)")),
    case("kernels-packed-bits-float", lambda: pm(bits=4.0),
         Raises(r"bits=4.0 has no packed matmul; allowed: \(1, 2, 4, 8\)")),
    case("kernels-packed-bits-bool", lambda: pm(bits=True),
         Raises(r"bits=True has no packed matmul; allowed: \(1, 2, 4, 8\)")),
    case("kernels-packed-group-size-not-dividing-k", lambda: pm(group_size=100),
         Raises(r"group_size=100 does not divide K=256; allowed: None or one of \[1, 2, 4, .*128, 256\]")),
    case("kernels-packed-group-size-0", lambda: pm(group_size=0),
         Raises(r"group_size=0 does not divide K=256; allowed: None or one of")),
    case("kernels-packed-group-size-negative", lambda: pm(group_size=-128),
         Raises(r"group_size=-128 does not divide K=256; allowed")),
    case("kernels-packed-group-size-against-the-scales", lambda: pm(group_size=64),
         Raises(r"scales of shape \(2, 8\) do not fit K=256, N=8 with group_size=64; allowed: \(4, 8\)")),
    case("kernels-packed-unknown-backend", lambda: pm(backend="cuda"),
         Raises(r"unknown backend 'cuda'; allowed: auto, xla, pallas, interpret")),
    case("kernels-packed-signed-a-string", lambda: pm(signed="yes"),
         Raises(r"signed='yes'; allowed: True or False", exc=TypeError)),
    # --- packed_matmul: shapes and dtypes of x, words, scales ----------------------------------------
    case("kernels-packed-integer-x", lambda: pm(x=X.astype(jnp.int32)),
         Raises(r"x of shape \(2, 256\) and dtype int32: allowed a float array \(\.\.\., K\)")),
    case("kernels-packed-rank-0-x", lambda: pm(x=jnp.float32(1.0)),
         Raises(r"x of shape \(\) and dtype float32: allowed a float array \(\.\.\., K\)")),
    case("kernels-packed-x-a-list", lambda: pm(x=X.tolist()),
         Raises(r"x is a list; allowed: an array", exc=TypeError)),
    case("kernels-packed-k-not-matching-the-words", lambda: pm(x=X[:, :200], group_size=None, scales=S1),
         Raises(r"w_packed of shape \(32, 8\) and dtype uint32 does not hold K=200 4-bit codes; allowed: "
                r"uint32 \(25, N\)")),
    case("kernels-packed-int32-words", lambda: pm(words=WORDS.astype(jnp.int32)),
         Raises(r"w_packed of shape \(32, 8\) and dtype int32 .*allowed: uint32 \(32, N\)")),
    case("kernels-packed-1d-words", lambda: pm(words=WORDS[:, 0]),
         Raises(r"w_packed of shape \(32,\) .*allowed: uint32 \(32, N\)")),
    case("kernels-packed-scales-for-another-n", lambda: pm(scales=jnp.ones((2, 4))),
         Raises(r"scales of shape \(2, 4\) do not fit K=256, N=8.*allowed: \(2, 8\) or \(2, 1, 8\)")),
    case("kernels-packed-integer-scales", lambda: pm(scales=S2.astype(jnp.int32)),
         Raises(r"scales of dtype int32; allowed: a float dtype")),
    case("kernels-packed-transposed-scales", lambda: pm(scales=S2.T, group_size=None),
         Raises(r"scales of shape \(8, 2\) do not fit.*allowed: \(K / group_size, 8\)")),
    case("kernels-packed-zero-point-of-another-shape", lambda: pm(zero_point=jnp.zeros((1, N))),
         Raises(r"zero_point of shape \(1, 8\) do not fit .*group_size=128; allowed: \(2, 8\)")),
    # --- packed_matmul: documented results ----------------------------------------------------------------
    case("kernels-packed-readme-recipe-per-group",
         lambda: kp.packed_matmul(X, packed().codes, packed().scale, bits=4, group_size=128, backend="xla"),
         Documented(_close_to(lambda: X @ dequantize(packed())),
                    doc="README 'Packed low-bit matmul': a packed QArray's codes and (G, 1, N) scales")),
    case("kernels-packed-readme-recipe-per-channel-interpret",
         lambda: kp.packed_matmul(X, packed(gran=PerChannel(-1)).codes, packed(gran=PerChannel(-1)).scale,
                                  bits=4, backend="interpret"),
         Documented(_close_to(lambda: X @ dequantize(packed(gran=PerChannel(-1)))),
                    doc="README: per-channel (1, N) scales; the interpret backend equals the float product")),
    case("kernels-packed-per-tensor-scale",
         lambda: kp.packed_matmul(X, packed(gran=PerTensor()).codes, packed(gran=PerTensor()).scale, bits=4,
                                  backend="xla"),
         Documented(_close_to(lambda: X @ dequantize(packed(gran=PerTensor()))),
                    doc="kernels_pallas.packed_matmul: (1, 1) scales are per tensor")),
    case("kernels-packed-k-0-is-an-empty-sum",
         lambda: kp.packed_matmul(jnp.ones((2, 0)), jnp.zeros((0, N), jnp.uint32), S1, bits=4, backend="xla"),
         Documented(_zeros((2, N)), doc="kernels_pallas.packed_matmul: K = 0 gives zeros (an empty sum)")),
    case("kernels-packed-k-0-interpret",
         lambda: kp.packed_matmul(jnp.ones((3, 0)), jnp.zeros((0, N), jnp.uint32), jnp.ones((0, N)), bits=2,
                                  group_size=4, backend="interpret"),
         Documented(_zeros((3, N)), doc="kernels_pallas.packed_matmul: K = 0 (no groups) gives zeros")),
    case("kernels-packed-k-0-reference-directly",
         lambda: kp.packed_matmul_xla(jnp.ones((2, 0)), jnp.zeros((0, N), jnp.uint32), S1, bits=8),
         Documented(_zeros((2, N)), doc="kernels_pallas.reference: K = 0 gives zeros")),
    case("kernels-packed-m-0", lambda: pm(x=jnp.ones((0, K))),
         Documented(_zeros((0, N)), doc="an empty batch gives an empty (0, N) result")),
    case("kernels-packed-all-zero-codes",
         lambda: pm(words=jnp.full((K // 8, N), 0x88888888, jnp.uint32)),
         Documented(_zeros((2, N)), doc="int4 code 0 (field 8): the product is exactly 0, no NaN")),
    case("kernels-packed-nan-in-x-stays-in-its-row",
         lambda: pm(x=X.at[0, 5].set(jnp.nan), words=packed().codes),
         Documented(_nan_row, doc="a NaN activation makes its own output row NaN, no other")),
    # --- int8_matmul / int8_dot ----------------------------------------------------------------------------
    case("kernels-int8-float-activation-codes", lambda: i8(x=I8.astype(jnp.float32)),
         Raises(r"int8_dot: codes of dtypes float32 and int8; allowed: int8 and int8")),
    case("kernels-int8-rank-3-weight", lambda: i8(w=W8[:, :, None]),
         Raises(r"int8_dot: shapes \(2, 256\) @ \(256, 8, 1\) do not contract; allowed: "
                r"\(\.\.\., K\) @ \(K, N\)")),
    case("kernels-int8-k-mismatch", lambda: i8(w=W8[:100]),
         Raises(r"shapes \(2, 256\) @ \(100, 8\) do not contract; allowed")),
    case("kernels-int8-activation-scales-per-tensor", lambda: i8(sx=jnp.ones((1, 1))),
         Raises(r"x_scales of shape \(1, 1\) do not fit x_codes \(2, 256\); allowed: \(2, 1\)")),
    case("kernels-int8-weight-scales-transposed", lambda: i8(sw=jnp.ones((N, 1))),
         Raises(r"w_scales of shape \(8, 1\) do not fit w_codes \(256, 8\); allowed: \(1, 8\) or \(8,\)")),
    case("kernels-int8-integer-scales", lambda: i8(sw=jnp.ones((1, N), jnp.int32)),
         Raises(r"w_scales of dtype int32; allowed: a float dtype")),
    case("kernels-int8-unknown-backend", lambda: i8(backend="tpu"),
         Raises(r"unknown backend 'tpu'; allowed: auto, xla, pallas, interpret")),
    case("kernels-int8-dot-rank-0", lambda: kp.int8_dot(jnp.int8(1), W8, backend="xla"),
         Raises(r"int8_dot: shapes \(\) @ \(256, 8\) do not contract")),
    case("kernels-int8-k-0", lambda: i8(x=jnp.ones((2, 0), jnp.int8), w=jnp.ones((0, N), jnp.int8)),
         Documented(_zeros((2, N)), doc="int8_matmul: K = 0 is an empty exact sum, zeros")),
    case("kernels-int8-interpret-equals-reference",
         lambda: i8(x=jnp.arange(-6, 6, dtype=jnp.int8).reshape(3, 4), w=jnp.ones((4, N), jnp.int8),
                    backend="interpret"),
         Documented(_close_to(lambda: jnp.tile(jnp.array([[-18.0], [-2.0], [14.0]]), (1, N))),
                    doc="int8_matmul: the integer sum is exact on every backend")),
    # --- qjax.serving.frozen_matmul ----------------------------------------------------------------------
    case("kernels-serving-weight-not-a-qarray", lambda: frozen_matmul(X, W, backend="xla"),
         Raises(r"frozen_matmul: w is a ArrayImpl; allowed: a QArray", exc=TypeError)),
    case("kernels-serving-k-mismatch-packed", lambda: frozen_matmul(X[:, :100], packed(), backend="xla"),
         Raises(r"x of shape \(2, 100\) does not contract with a weight of shape \(256, 8\); allowed: x of "
                r"shape \(\.\.\., 256\)")),
    case("kernels-serving-k-mismatch-dequantized",
         lambda: frozen_matmul(X[:, :100], quantize(Quantizer("nf4"), W), backend="xla"),
         Raises(r"x of shape \(2, 100\) .*allowed: x of shape \(\.\.\., 256\)")),
    case("kernels-serving-unknown-backend-dequantized",
         lambda: frozen_matmul(X, quantize(Quantizer("nf4"), W), backend="gpu"),
         Raises(r"frozen_matmul: unknown backend 'gpu'; allowed: auto, xla, pallas, interpret")),
    case("kernels-serving-per-group-runs-the-packed-matmul",
         lambda: frozen_matmul(X, packed(), backend="xla"),
         Documented(_close_to(lambda: X @ dequantize(packed())),
                    doc="qjax.serving: a per-group packed QArray runs the packed matmul, equal to x @ W")),
    # --- qjax.int_matmul.qat_matmul --------------------------------------------------------------------
    case("kernels-qat-nf4-weight", lambda: qat_matmul(X, W, Quantizer("nf4", PerChannel(-1)), INPUTS,
                                                      product="int8"),
         Raises(r"weight 'nf4' PerChannel.*have no integer product; allowed: signed integer codes")),
    case("kernels-qat-per-group-weight", lambda: qat_matmul(X, W, Quantizer("int4", PerGroup(0, 128)), INPUTS,
                                                            product="float"),
         Raises(r"weight 'int4' PerGroup\(axis=0, size=128\).*no integer product; allowed.*per tensor or "
                r"output channel")),
    case("kernels-qat-contract-0", lambda: qat_matmul(X, W, WEIGHT, INPUTS, contract=0, product="int8"),
         Raises(r"contract=0 for a weight of rank 2; allowed: an integer in 1 \.\. 1")),
    case("kernels-qat-k-mismatch", lambda: qat_matmul(X[:, :100], W, WEIGHT, INPUTS, product="int8"),
         Raises(r"x of shape \(2, 100\) does not contract with w of shape \(256, 8\) over 1 axes; allowed: x "
                r"of shape \(\.\.\., 256\)")),
    case("kernels-qat-weight-a-format-name", lambda: qat_matmul(X, W, "int4", INPUTS, product="int8"),
         Raises(r"weight is a str; allowed: a Quantizer", exc=TypeError)),
    case("kernels-qat-unknown-product", lambda: qat_matmul(X, W, WEIGHT, INPUTS, product="int4"),
         Raises(r"unknown product 'int4'; allowed: auto, int8, float")),
    case("kernels-qat-eligible-equals-fake-quant",
         lambda: jax.jit(lambda x, w: qat_matmul(x, w, WEIGHT, INPUTS, product="int8"))(X, W),
         Documented(_close_to(lambda: dequantize(quantize(INPUTS, X)) @ dequantize(quantize(WEIGHT, W))),
                    doc="qjax.int_matmul: the int8 product equals fake_quant(x) . fake_quant(w)")),
]
