"""Bad-input table, area "quantizers": formats, granularities, Quantizer fields, quantize / fake_quant /
init_scale, scale rules (and the packing rows that lived in the old tests/test_bad_input.py).

Documented results (``qjax/scales.py`` and ``qjax/quantizer.py`` docstrings): an all-zero group quantizes
to exact zeros without NaN; a group holding a NaN or Inf dequantizes to NaN, other groups untouched; an
empty input gives an empty output and scales of ``TINY`` (the smallest normal float32); finite input never
gives NaN or inf (sums and differences of scaled values, outputs saturated at the dtype's largest finite
value); a traced ``given`` scale is floored at ``TINY``, an infinite or negative one gives NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qjax import (
    FORMAT_NAMES,
    PerBlock,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    Quantizer,
    dequantize,
    dynamic_map,
    fake_quant,
    get_format,
    init_scale,
    packing,
    quantize,
    scale_shape,
)
from qjax.scales import TINY
from tests.bad_input.table import Documented, Raises, case

X = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(16, 4)
INT8_CODES = jnp.array([-3, 0, 2, 1, -1, 7, -8, 5], jnp.int8)
WORDS_2 = jnp.zeros((2,), jnp.uint32)  # 2 words: 16 codes at 4 bits
FMAX = float(jnp.finfo(jnp.float32).max)

_INT4_ALLOWED = r"allowed: ste, clipped_ste"
_PACK_BITS_ALLOWED = r"allowed: \(1, 2, 4, 8\)"

# One quantizer per format family (and the multi-basis binary), per output channel.
FAMILIES = {
    "int2": Quantizer("int2", PerChannel(-1)),
    "int8": Quantizer("int8", PerChannel(-1)),
    "uint4-minmax": Quantizer("uint4", PerChannel(-1), "minmax"),
    "binary": Quantizer("binary", PerChannel(-1), "mean_abs", "reste"),
    "binary-bases-3": Quantizer("binary", PerChannel(-1), "mean_abs", "clipped_ste", bases=3),
    "ternary": Quantizer("ternary", PerChannel(-1), "mean_abs"),
    "fp8-e4m3": Quantizer("fp8_e4m3", PerChannel(-1)),
    "fp8-e5m2": Quantizer("fp8_e5m2", PerChannel(-1)),
    "fp4-e2m1": Quantizer("fp4_e2m1", PerChannel(-1)),
    "nf4": Quantizer("nf4", PerChannel(-1)),
    "dynamic": Quantizer("dynamic", PerBlock(16)),
    "dynamic-unsigned": Quantizer("dynamic_unsigned", PerBlock(16)),
}
GRANULARITIES = {
    "per-tensor": PerTensor(),
    "per-channel": PerChannel(-1),
    "per-channel-0": PerChannel(0),
    "per-token": PerToken(-1),
    "per-group": PerGroup(0, 4),
    "per-block": PerBlock(8),
}
EMPTY_SHAPES = {"per-tensor": (0, 4), "per-channel": (0, 4), "per-channel-0": (4, 0), "per-token": (4, 0),
                "per-group": (0, 4), "per-block": (0, 4)}


def both(q, x, **kw):
    """``fake_quant`` and ``dequantize(quantize)`` of ``x``, with the QArray."""
    qa = quantize(q, x, **kw)
    return fake_quant(q, x, **kw), dequantize(qa), qa


def _same(a, b):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _empty(shape, q):
    def check(r):
        fq, dq, qa = r
        assert fq.shape == dq.shape == shape and fq.dtype == jnp.float32, (fq.shape, dq.shape)
        assert qa.scale.shape == scale_shape(q, shape), (qa.scale.shape, scale_shape(q, shape))
        np.testing.assert_array_equal(np.asarray(qa.scale), TINY)  # the floor, as for an all-zero group
    return check


def _all_zero(r):
    fq, dq, _ = r
    assert not bool(jnp.any(jnp.isnan(fq))), fq
    _same(fq, dq)
    assert bool(jnp.all(jnp.abs(fq) <= TINY)), fq  # exact zeros (binary: +-TINY, the floor of its scale)


def _nan_at(pos):
    def check(r):
        fq, dq, _ = r
        assert bool(jnp.isnan(fq[pos])) and bool(jnp.isnan(dq[pos])), fq[pos]
        col = np.asarray(jnp.isnan(fq)).all(axis=0)
        assert col.sum() <= 1, col  # only the group (channel or block) holding the NaN
    return check


def _finite_close(x, rtol):
    def check(r):
        fq, dq, _ = r
        assert bool(jnp.all(jnp.isfinite(fq))) and bool(jnp.all(jnp.isfinite(dq))), (fq, dq)
        _same(fq, dq)
        np.testing.assert_allclose(np.asarray(fq, np.float64), np.asarray(x, np.float64), rtol=rtol)
    return check


def _nan_columns(y, expected):
    np.testing.assert_array_equal(np.isnan(np.asarray(y)).all(0), expected)


def _finite(r):
    fq, dq, _ = r[:3] if isinstance(r, tuple) else (r, r, None)
    assert bool(jnp.all(jnp.isfinite(fq))) and bool(jnp.all(jnp.isfinite(dq))), fq


HUGE_MIXED = jnp.asarray(np.outer(np.linspace(-1.0, 1.0, 64), [1.0, 0.5, 0.25, 1.0]), jnp.float32)

CASES = [
    # --- migrated from tests/test_bad_input.py ------------------------------------------------------
    case("quantizers-format-int9", lambda: get_format("int9"),
         Raises(r"'int9'.*2 to 8 bits.*allowed: .*int8")),
    case("quantizers-format-int1", lambda: get_format("int1"),
         Raises(r"'int1'.*'binary' for 1 bit.*allowed: int2")),
    case("quantizers-format-fp16", lambda: get_format("fp16"),
         Raises(r"'fp16'.*allowed: .*fp8_e4m3")),
    case("quantizers-format-float8", lambda: get_format("float8"),
         Raises(r"'float8'.*allowed: .*fp8_e5m2")),
    case("quantizers-format-int-not-str", lambda: get_format(123),
         Raises(r"unknown format 123\b.*allowed: .*int4")),
    case("quantizers-format-none", lambda: get_format(None),
         Raises(r"unknown format None\b.*allowed: .*nf4")),
    case("quantizers-format-unhashable-list", lambda: get_format(["int4"]),
         Raises(r"\['int4'\].*allowed: .*int4")),
    case("quantizers-quantizer-format-int9", lambda: Quantizer("int9"),
         Raises(r"'int9'.*allowed: .*int8")),
    case("quantizers-quantizer-format-float8", lambda: Quantizer("float8"),
         Raises(r"'float8'.*allowed: .*fp8_e4m3")),
    case("quantizers-dynamic-map-signed-yes", lambda: dynamic_map(signed="yes"),
         Raises(r"signed must be a bool, got 'yes'; allowed: True, False", exc=TypeError)),
    case("quantizers-pack-bits-0", lambda: packing.pack(INT8_CODES, 0),
         Raises(rf"bits=0 .*{_PACK_BITS_ALLOWED}")),
    case("quantizers-pack-bits-3", lambda: packing.pack(INT8_CODES, 3),
         Raises(rf"bits=3 .*{_PACK_BITS_ALLOWED}")),
    case("quantizers-pack-bits-16", lambda: packing.pack(INT8_CODES, 16),
         Raises(rf"bits=16 .*{_PACK_BITS_ALLOWED}")),
    case("quantizers-pack-bits-bool", lambda: packing.pack(INT8_CODES, True),
         Raises(rf"bits=True .*{_PACK_BITS_ALLOWED}")),
    case("quantizers-pack-bits-float-4.0", lambda: packing.pack(INT8_CODES, 4.0),
         Raises(rf"bits=4\.0 .*{_PACK_BITS_ALLOWED}")),
    case("quantizers-unpack-bits-0", lambda: packing.unpack(WORDS_2, 0, 0, 16),
         Raises(rf"bits=0 .*{_PACK_BITS_ALLOWED}")),
    case("quantizers-unpack-bits-3", lambda: packing.unpack(WORDS_2, 3, 0, 16),
         Raises(rf"bits=3 .*{_PACK_BITS_ALLOWED}")),
    case("quantizers-unpack-bits-16", lambda: packing.unpack(WORDS_2, 16, 0, 4),
         Raises(rf"bits=16 .*{_PACK_BITS_ALLOWED}")),
    case("quantizers-pack-float-codes", lambda: packing.pack(jnp.zeros((8,), jnp.float32), 4),
         Raises(r"integer dtype, got float32; allowed: int8")),
    case("quantizers-pack-int8-code-9-at-4-bits", lambda: packing.pack(jnp.array([1, 9, -2], jnp.int8), 4),
         Raises(r"code 9 does not fit in 4 bits \(signed\); allowed: \[-8, 7\]")),
    case("quantizers-pack-signed-1bit-code-0", lambda: packing.pack(jnp.array([1, 0, -1], jnp.int8), 1),
         Raises(r"code 0 does not fit in 1 bits \(signed\); allowed: \{-1, \+1\}")),
    case("quantizers-pack-uint8-code-16-at-4-bits", lambda: packing.pack(jnp.array([3, 16], jnp.uint8), 4),
         Raises(r"code 16 does not fit in 4 bits \(unsigned\); allowed: \[0, 15\]")),
    case("quantizers-pack-axis-out-of-range", lambda: packing.pack(INT8_CODES, 4, axis=1),
         Raises(r"axis=1 is out of range.*allowed: \[-1, 0\]")),
    case("quantizers-unpack-int32-words", lambda: packing.unpack(jnp.zeros((2,), jnp.int32), 4, 0, 16),
         Raises(r"got int32; allowed: uint32")),
    case("quantizers-unpack-size-too-big", lambda: packing.unpack(WORDS_2, 4, 0, 17),
         Raises(r"size=17 does not match 2 words.*allowed: 9 \.\. 16")),
    case("quantizers-unpack-size-too-small", lambda: packing.unpack(WORDS_2, 4, 0, 8),
         Raises(r"size=8 does not match 2 words.*allowed: 9 \.\. 16")),
    case("quantizers-qarray-pack-axis-out-of-range", lambda: quantize(Quantizer("int4"), X).pack(2),
         Raises(r"QArray.pack: axis=2 is out of range for rank 2; allowed: \[-2, 1\]")),
    case("quantizers-qarray-pack-axis-bool", lambda: quantize(Quantizer("int4"), X).pack(True),
         Raises(r"axis=True is out of range.*allowed")),
    case("quantizers-given-scale-zero",
         lambda: fake_quant(Quantizer("int4", scale="given"), X, scale=jnp.zeros((1, 1))),
         Raises(r"scale must be positive and finite, got 0\.0; allowed: finite values >= 1.17549e-38")),
    case("quantizers-pergroup-size-5-on-16",
         lambda: fake_quant(Quantizer("int4", PerGroup(axis=0, size=5)), X),
         Raises(r"group size 5 does not divide axis 0 of length 16.*allowed sizes: " r"\[1, 2, 4, 8, 16\]")),
    case("quantizers-pergroup-size-3-on-4-quantize",
         lambda: quantize(Quantizer("int4", PerGroup(axis=-1, size=3)), X),
         Raises(r"group size 3 does not divide axis -1 of length 4.*allowed sizes: \[1, 2, 4\]")),
    case("quantizers-pergroup-size-0", lambda: fake_quant(Quantizer("int4", PerGroup(0, 0)), X),
         Raises(r"group size 0 must be a positive integer")),
    case("quantizers-pergroup-size-negative", lambda: fake_quant(Quantizer("int4", PerGroup(0, -4)), X),
         Raises(r"group size -4 must be a positive integer")),
    case("quantizers-pergroup-size-bool", lambda: fake_quant(Quantizer("int4", PerGroup(0, True)), X),
         Raises(r"group size True must be a positive integer")),
    case("quantizers-perchannel-axis-2-rank-2", lambda: fake_quant(Quantizer("int4", PerChannel(2)), X),
         Raises(r"axis 2 is out of range .* rank 2; allowed: integers in \[-2, 1\]")),
    case("quantizers-perchannel-axis-minus-3-rank-2",
         lambda: fake_quant(Quantizer("int4", PerChannel(-3)), X),
         Raises(r"axis -3 is out of range .* rank 2; allowed: integers in \[-2, 1\]")),
    case("quantizers-pertoken-axis-5", lambda: fake_quant(Quantizer("int8", PerToken(5)), X),
         Raises(r"PerToken: axis 5 is out of range.*allowed: integers in \[-2, 1\]")),
    case("quantizers-perblock-size-0", lambda: fake_quant(Quantizer("nf4", PerBlock(0)), X),
         Raises(r"block size 0 must be a positive integer")),
    case("quantizers-granularity-string", lambda: Quantizer("int4", "per_channel"),
         Raises(r"'per_channel' is not a granularity; allowed: PerTensor\(\)", exc=TypeError)),
    case("quantizers-surrogate-foo-int4", lambda: Quantizer("int4", surrogate="foo"),
         Raises(rf"'foo'.*{_INT4_ALLOWED}")),
    case("quantizers-surrogate-foo-binary", lambda: Quantizer("binary", surrogate="foo"),
         Raises(r"'foo'.*allowed: .*reste.*biper")),
    case("quantizers-sign-surrogate-on-int4", lambda: Quantizer("int4", surrogate="reste"),
         Raises(rf"'reste' for format 'int4'; {_INT4_ALLOWED}")),
    case("quantizers-sign-surrogate-on-nf4", lambda: Quantizer("nf4", surrogate="biper"),
         Raises(rf"'biper' for format 'nf4'; {_INT4_ALLOWED}")),
    case("quantizers-sign-surrogate-multibasis",
         lambda: Quantizer("binary", PerTensor(), "mean_abs", "reste", bases=2),
         Raises(rf"'reste' for format 'binary' with bases > 1; {_INT4_ALLOWED}")),
    case("quantizers-scale-rule-foo", lambda: Quantizer("int4", scale="foo"),
         Raises(r"unknown scale rule 'foo'; allowed: absmax, absmax_edge, mean_abs")),
    case("quantizers-minmax-nf4", lambda: Quantizer("nf4", scale="minmax"),
         Raises(r"'minmax' needs an integer format, got 'nf4'; allowed: int2\.\.int8")),
    case("quantizers-minmax-fp8", lambda: Quantizer("fp8_e4m3", scale="minmax"),
         Raises(r"'minmax' needs an integer format, got 'fp8_e4m3'; allowed: int2\.\.int8")),
    case("quantizers-minmax-binary", lambda: Quantizer("binary", scale="minmax"),
         Raises(r"'minmax' needs an integer format, got 'binary'; allowed: int2\.\.int8")),
    case("quantizers-bases-2-int4", lambda: Quantizer("int4", scale="mean_abs", bases=2),
         Raises(r"bases=2 needs format 'binary', got 'int4'")),
    case("quantizers-bases-2-absmax", lambda: Quantizer("binary", scale="absmax", bases=2),
         Raises(r"scale 'absmax' is not supported; allowed: 'mean_abs', 'given'")),
    case("quantizers-bases-0", lambda: Quantizer("binary", scale="mean_abs", bases=0),
         Raises(r"bases=0 must be a positive integer")),
    case("quantizers-bases-bool", lambda: Quantizer("binary", scale="mean_abs", bases=True),
         Raises(r"bases=True must be a positive integer")),
    case("quantizers-eps-negative", lambda: Quantizer("int4", eps=-1e-5),
         Raises(r"eps=-1e-05 must be a finite float >= 0")),
    case("quantizers-eps-nan", lambda: Quantizer("int4", eps=float("nan")),
         Raises(r"eps=nan must be a finite float >= 0")),
    case("quantizers-quantize-int32-x", lambda: quantize(Quantizer("int4"), jnp.ones((4, 4), jnp.int32)),
         Raises(r"quantize: .*dtype int32; allowed: float32", exc=TypeError)),
    case("quantizers-fake-quant-int8-x", lambda: fake_quant(Quantizer("int4"), jnp.ones((4, 4), jnp.int8)),
         Raises(r"fake_quant: .*dtype int8; allowed: float32", exc=TypeError)),
    case("quantizers-init-scale-int32-x",
         lambda: init_scale(Quantizer("int4", scale="learned"), jnp.ones((4,), jnp.int32)),
         Raises(r"init_scale: .*dtype int32; allowed: float32", exc=TypeError)),
    case("quantizers-given-without-scale", lambda: fake_quant(Quantizer("int4", scale="given"), X),
         Raises(r"'given' needs scale=")),
    case("quantizers-learned-without-scale", lambda: quantize(Quantizer("int4", scale="learned"), X),
         Raises(r"'learned' needs scale=")),
    case("quantizers-scale-with-absmax", lambda: fake_quant(Quantizer("int4"), X, scale=jnp.float32(0.1)),
         Raises(r"'absmax' computes its own scale; pass scale= only with scale='given' or " r"'learned'")),
    case("quantizers-zero-point-with-minmax",
         lambda: quantize(Quantizer("uint4", scale="minmax"), X, zero_point=1.0),
         Raises(r"'minmax' computes its own scale;.*'given' or 'learned'")),
    case("quantizers-given-scale-wrong-shape",
         lambda: fake_quant(Quantizer("int4", PerChannel(-1), "given"), X, scale=jnp.ones((3,))),
         Raises(r"scale has shape \(3,\); allowed: \(1, 4\)")),
    case("quantizers-given-zero-point-wrong-shape",
         lambda: quantize(Quantizer("int4", PerGroup(0, 8), "given"), X, scale=jnp.ones((2, 1, 4)),
                          zero_point=jnp.ones((5,))),
         Raises(r"zero_point has shape \(5,\); allowed: \(2, 1, 4\)")),
    case("quantizers-hparam-omega-for-reste",
         lambda: fake_quant(Quantizer("binary", surrogate="reste"), X, omega=1.0),
         Raises(r"\['omega'\] for surrogate 'reste'.*allowed: \['o', 't'\]")),
    case("quantizers-hparam-o-for-int4", lambda: quantize(Quantizer("int4"), X, o=2.0),
         Raises(r"\['o'\] for surrogate 'ste' on 'int4'; allowed: none")),
    case("quantizers-quantize-non-quantizer", lambda: quantize("int4", X),
         Raises(r"expects a Quantizer, got str", exc=TypeError)),
    case("quantizers-fake-quant-non-quantizer", lambda: fake_quant(None, X),
         Raises(r"expects a Quantizer, got NoneType", exc=TypeError)),
    case("quantizers-dequantize-non-qarray", lambda: dequantize(X),
         Raises(r"expects a QArray, got ArrayImpl")),
    case("quantizers-init-scale-rule-foo", lambda: init_scale(Quantizer("int4", scale="learned"), X, "foo"),
         Raises(r"unknown rule 'foo'; allowed: absmax, absmax_edge, mean_abs, median, lsq_init")),
    case("quantizers-init-scale-rule-minmax",
         lambda: init_scale(Quantizer("int4", scale="learned"), X, "minmax"),
         Raises(r"unknown rule 'minmax'; allowed: absmax, absmax_edge, mean_abs, median, lsq_init")),
    case("quantizers-quantize-biper-omega-nan",
         lambda: quantize(Quantizer("binary", surrogate="biper"), X, omega=float("nan")),
         Raises(r"omega=nan must be finite")),
    # --- caller scales: finite and >= the smallest normal float32 (issue 12, point 6) ---------------
    case("quantizers-given-scale-inf", lambda: fake_quant(Quantizer("int4", scale="given"), X,
                                                          scale=jnp.full((1, 1), jnp.inf)),
         Raises(r"scale must be positive and finite, got inf; allowed: finite values >= 1.17549e-38")),
    case("quantizers-given-scale-minus-inf-one-channel",
         lambda: fake_quant(Quantizer("int4", PerChannel(-1), "given"), X,
                            scale=jnp.array([0.1, -jnp.inf, 0.1, 0.1])),
         Raises(r"got -inf; allowed: finite values >= 1.17549e-38")),
    case("quantizers-given-scale-subnormal", lambda: fake_quant(Quantizer("int4", scale="given"), X,
                                                                scale=jnp.full((1, 1), 1e-40)),
         Raises(r"got 9.9999\d*e-41; allowed: finite values >= 1.17549e-38 \(the smallest normal float32")),
    case("quantizers-given-scale-negative", lambda: quantize(Quantizer("int8", scale="given"), X, scale=-0.5),
         Raises(r"got -0.5; allowed: finite values >= 1.17549e-38")),
    case("quantizers-learned-scale-wrong-shape",
         lambda: fake_quant(Quantizer("int4", PerChannel(0), "learned"), X, scale=jnp.ones((4,))),
         Raises(r"scale has shape \(4,\); allowed: \(16, 1\)")),
    # --- formats, Quantizer fields ------------------------------------------------------------------
    case("quantizers-format-uppercase",
         lambda: get_format("INT4"), Raises(r"unknown format 'INT4'; allowed: int2")),
    case("quantizers-format-uint9",
         lambda: Quantizer("uint9"), Raises(r"'uint9' \(integer formats have 2 to 8")),
    case("quantizers-dynamic-map-signed-int", lambda: dynamic_map(signed=1),
         Raises(r"signed must be a bool, got 1; allowed: True, False", exc=TypeError)),
    case("quantizers-surrogate-none", lambda: Quantizer("int4", surrogate=None),
         Raises(r"unknown surrogate None for format 'int4'; allowed: ste, clipped_ste")),
    case("quantizers-scale-none", lambda: Quantizer("int4", scale=None),
         Raises(r"unknown scale rule None; allowed: absmax, absmax_edge, mean_abs, median, minmax, given, "
                r"learned")),
    case("quantizers-bases-float", lambda: Quantizer("binary", scale="mean_abs", bases=2.0),
         Raises(r"bases=2.0 must be a positive integer")),
    case("quantizers-eps-inf", lambda: Quantizer("int4", eps=float("inf")),
         Raises(r"eps=inf must be a finite float >= 0")),
    case("quantizers-eps-string", lambda: Quantizer("int4", eps="1e-5"),
         Raises(r"eps='1e-5' must be a finite float >= 0")),
    case("quantizers-granularity-class-not-instance", lambda: Quantizer("int4", PerTensor),
         Raises(r"granularity <class .*PerTensor'> is not a granularity; allowed: PerTensor\(\)",
                exc=TypeError)),
    # --- granularities ------------------------------------------------------------------------------
    case("quantizers-perchannel-on-scalar",
         lambda: fake_quant(Quantizer("int8", PerChannel(-1)), jnp.float32(1)),
         Raises(r"PerChannel: axis -1 is out of range for a 0-d array .*allowed: PerTensor\(\) or PerBlock")),
    case("quantizers-pertoken-on-scalar", lambda: quantize(Quantizer("int8", PerToken(-1)), jnp.float32(1)),
         Raises(r"PerToken: axis -1 is out of range for a 0-d array")),
    case("quantizers-pergroup-on-scalar",
         lambda: fake_quant(Quantizer("int4", PerGroup(0, 1)), jnp.float32(1)),
         Raises(r"PerGroup: axis 0 is out of range for a 0-d array")),
    case("quantizers-pergroup-axis-out-of-range", lambda: fake_quant(Quantizer("int4", PerGroup(2, 4)), X),
         Raises(r"PerGroup: axis 2 is out of range for an array of rank 2; allowed: integers in \[-2, 1\]")),
    case("quantizers-perchannel-axis-float", lambda: fake_quant(Quantizer("int4", PerChannel(1.0)), X),
         Raises(r"PerChannel: axis 1.0 is out of range .*allowed: integers in \[-2, 1\]")),
    case("quantizers-perchannel-axis-tuple-bad", lambda: fake_quant(Quantizer("int4", PerChannel((0, 5))), X),
         Raises(r"PerChannel: axis 5 is out of range .*allowed: integers in \[-2, 1\]")),
    case("quantizers-perblock-size-negative", lambda: fake_quant(Quantizer("int8", PerBlock(-8)), X),
         Raises(r"PerBlock: block size -8 must be a positive integer")),
    case("quantizers-perblock-size-float", lambda: quantize(Quantizer("dynamic", PerBlock(64.0)), X),
         Raises(r"PerBlock: block size 64.0 must be a positive integer")),
    # --- inputs of the three calls ------------------------------------------------------------------
    case("quantizers-fake-quant-bool-x", lambda: fake_quant(Quantizer("int4"), X > 0),
         Raises(r"fake_quant: x must be a floating-point array, got dtype bool; allowed: float32",
                exc=TypeError)),
    case("quantizers-quantize-complex-x", lambda: quantize(Quantizer("int4"), X.astype(jnp.complex64)),
         Raises(r"quantize: x must be a floating-point array, got dtype complex64", exc=TypeError)),
    case("quantizers-init-scale-non-quantizer", lambda: init_scale("int4", X),
         Raises(r"init_scale expects a Quantizer, got str", exc=TypeError)),
    case("quantizers-init-scale-rule-given",
         lambda: init_scale(Quantizer("int4", scale="learned"), X, "given"),
         Raises(r"unknown rule 'given'; allowed: absmax, absmax_edge, mean_abs, median, lsq_init")),
    # --- empty inputs: an empty result with TINY scales, for every granularity (issue 12, point 7) ---
    *(case(f"quantizers-empty-{name}-{rule}", lambda g=g, rule=rule, name=name: both(
        Quantizer("uint4" if rule == "minmax" else "int4", g, rule), jnp.zeros(EMPTY_SHAPES[name])),
           Documented(_empty(EMPTY_SHAPES[name], Quantizer("uint4" if rule == "minmax" else "int4", g, rule)),
                      doc="qjax/scales.py: an empty group gets the scale TINY, the output is empty"))
      for name, g in GRANULARITIES.items() for rule in ("absmax", "median")),
    case("quantizers-empty-per-tensor-minmax", lambda: both(Quantizer("uint8", PerTensor(), "minmax"),
                                                            jnp.zeros((0,))),
         Documented(_empty((0,), Quantizer("uint8", PerTensor(), "minmax")), doc="qjax/scales.py: empty")),
    case("quantizers-empty-per-token-mean-abs", lambda: both(Quantizer("ternary", PerToken(-1), "mean_abs"),
                                                             jnp.zeros((3, 0))),
         Documented(_empty((3, 0), Quantizer("ternary", PerToken(-1), "mean_abs")),
                    doc="qjax/scales.py: empty")),
    case("quantizers-empty-multi-basis", lambda: both(FAMILIES["binary-bases-3"], jnp.zeros((0, 4))),
         Documented(lambda r: (np.testing.assert_array_equal(r[2].scale, TINY), _same(r[0], r[1])),
                    doc="multi-basis alpha_i of an empty group: TINY")),
    case("quantizers-empty-init-scale-lsq", lambda: init_scale(Quantizer("int4", scale="learned"),
                                                               jnp.zeros((0, 4)), "lsq_init"),
         Documented(lambda s: np.testing.assert_array_equal(s, np.full((1, 1), TINY, np.float32)),
                    doc="init_scale of an empty input: TINY")),
    # --- all-zero, NaN and Inf inputs, per format family --------------------------------------------
    *(case(f"quantizers-all-zero-{name}", lambda q=q: both(q, jnp.zeros((16, 4))),
           Documented(_all_zero, doc="qjax/scales.py: an all-zero group quantizes to zeros without NaN"))
      for name, q in FAMILIES.items()),
    *(case(f"quantizers-nan-stays-nan-{name}", lambda q=q: both(q, X.at[5, 3].set(jnp.nan)),
           Documented(_nan_at((5, 3)), doc="qjax/scales.py: a group holding a NaN dequantizes to NaN, "
                                           "other groups untouched"))
      for name, q in FAMILIES.items()),
    case("quantizers-inf-marks-its-channel", lambda: both(FAMILIES["fp8-e4m3"], X.at[0, 1].set(-jnp.inf)),
         Documented(lambda r: (_nan_columns(r[0], [False, True, False, False]), _same(r[0], r[1])),
                    doc="qjax/scales.py: an Inf marks its group NaN")),
    case("quantizers-given-scale-nan-marks-group",
         lambda: both(Quantizer("int4", PerChannel(-1), "given"), X,
                      scale=jnp.array([0.1, jnp.nan, 0.1, 0.1])),
         Documented(lambda r: _nan_columns(r[0], [False, True, False, False]),
                    doc="quantizer: a NaN given scale marks a poisoned group")),
    # --- huge finite inputs never give NaN or inf (issue 12, point 7; Deliver 2) --------------------
    case("quantizers-huge-mean-abs-1e37", lambda: both(Quantizer("int8", PerTensor(), "mean_abs"),
                                                       jnp.full((64, 4), 1e37).at[0, 0].set(-1e37)),
         # a float32 sum of 256 terms: rounding up to n eps / 2 (XLA may order it either way), 1e-5
         Documented(_finite_close(jnp.full((64, 4), 1e37).at[0, 0].set(-1e37), 1e-5),
                    doc="scales.mean_abs: sum(|x| 2^-k) / (n 2^-k), no overflow")),
    case("quantizers-huge-mean-abs-binary", lambda: both(FAMILIES["binary"], jnp.full((64, 4), 1e37)),
         Documented(_finite_close(jnp.full((64, 4), 1e37), 1e-6), doc="scales.mean_abs")),
    case("quantizers-huge-mean-abs-multi-basis",
         lambda: both(FAMILIES["binary-bases-3"], jnp.full((64, 4), 1e37)),
         Documented(_finite_close(jnp.full((64, 4), 1e37), 1e-6), doc="scales.mean_abs for each alpha_i")),
    case("quantizers-huge-median-3e38", lambda: both(Quantizer("int8", PerTensor(), "median"),
                                                     jnp.full((4, 4), 3e38).at[0, 0].set(-3e38)),
         Documented(_finite_close(jnp.full((4, 4), 3e38).at[0, 0].set(-3e38), 1e-6),
                    doc="scales: the median of |x|/2, doubled; grid_units divides huge scales exactly")),
    case("quantizers-huge-minmax-3e38", lambda: both(Quantizer("uint8", PerTensor(), "minmax"),
                                                     jnp.full((4, 4), 3e38).at[0, 0].set(-3e38)),
         Documented(_finite_close(jnp.full((4, 4), 3e38).at[0, 0].set(-3e38), 0.01),
                    doc="scales: hi - lo as 2 (hi/2 - lo/2) where it would overflow")),
    case("quantizers-huge-minmax-float32-max", lambda: both(Quantizer("int4", PerChannel(-1), "minmax"),
                                                            HUGE_MIXED * FMAX),
         Documented(_finite, doc="formats.Format.dequant saturates at the largest finite float32")),
    *(case(f"quantizers-huge-float32-max-{name}", lambda q=q: both(q, HUGE_MIXED * FMAX),
           Documented(_finite, doc="scales clip at the largest float32; dequant saturates; grid_units"))
      for name, q in FAMILIES.items()),
    case("quantizers-huge-ternary-absmax-3e38", lambda: both(Quantizer("ternary"), jnp.full((8,), 3e38)),
         Documented(_finite_close(jnp.full((8,), 3e38), 1e-6),
                    doc="scales.grid_units: x / s right for s > 8.5e37 (XLA's reciprocal would flush)")),
    case("quantizers-huge-init-scale-lsq", lambda: init_scale(Quantizer("ternary", scale="learned"),
                                                              jnp.full((8,), 3e38), "lsq_init"),
         Documented(lambda s: np.testing.assert_array_equal(s, np.float32(FMAX)),
                    doc="scales: 2 mean|x| past the largest float32 is clipped to it")),
    case("quantizers-float16-near-max-mean-abs",
         lambda: fake_quant(Quantizer("int8", PerTensor(), "mean_abs"),
                            jnp.array([65504.0, 6550.0, -65504.0, 100.0], jnp.float16)),
         Documented(lambda y: (assert_dtype(y, jnp.float16), _finite(y)),
                    doc="formats.Format.dequant saturates at x's dtype's largest finite value")),
    # --- tiny, 0-d, low-precision inputs -------------------------------------------------------------
    case("quantizers-subnormal-input", lambda: both(Quantizer("int8", PerChannel(-1), "mean_abs"),
                                                    jnp.full((8, 4), 1e-40)),
         Documented(_finite, doc="scales are floored at TINY: no NaN from subnormal data")),
    case("quantizers-scalar-per-tensor", lambda: both(Quantizer("int8"), jnp.float32(0.3)),
         Documented(lambda r: (assert_shape(r[0], ()), _finite_close(jnp.float32(0.3), 1e-6)(r)),
                    doc="a 0-d input quantizes per tensor to a 0-d result")),
    case("quantizers-scalar-per-block", lambda: both(Quantizer("nf4", PerBlock(64)), jnp.float32(-2.0)),
         Documented(lambda r: (assert_shape(r[0], ()), _finite_close(jnp.float32(-2.0), 1e-6)(r)),
                    doc="PerBlock pads a 0-d input to one block")),
    case("quantizers-bfloat16-input", lambda: both(Quantizer("int4", PerGroup(0, 8)), X.astype(jnp.bfloat16)),
         Documented(lambda r: (assert_dtype(r[0], jnp.bfloat16), _same(r[0], r[1])),
                    doc="fake_quant returns x's dtype; equal to dequantize(quantize)")),
    case("quantizers-float16-input-fp8", lambda: both(FAMILIES["fp8-e4m3"], X.astype(jnp.float16)),
         Documented(lambda r: (assert_dtype(r[0], jnp.float16), _same(r[0], r[1])),
                    doc="fake_quant returns x's dtype")),
    # --- traced and learned caller scales (documented in qjax/quantizer.py) --------------------------
    case("quantizers-traced-given-scale-zero-is-floored",
         lambda: jax.jit(lambda s: fake_quant(Quantizer("int8", scale="given"), jnp.zeros((4, 4)), scale=s))(
             jnp.zeros((1, 1))),
         Documented(lambda y: np.testing.assert_array_equal(y, 0.0),
                    doc="quantizer: a traced given scale is floored at TINY")),
    case("quantizers-traced-given-scale-inf-is-nan",
         lambda: jax.jit(lambda s: fake_quant(Quantizer("binary", scale="given"), X, scale=s))(
             jnp.full((1, 1), jnp.inf)),
         Documented(lambda y: np.testing.assert_array_equal(np.isnan(y), True),
                    doc="quantizer: a traced infinite given scale makes its group NaN")),
    case("quantizers-traced-given-scale-negative-is-nan",
         lambda: jax.jit(lambda s: fake_quant(Quantizer("int4", PerChannel(-1), "given"), X, scale=s))(
             jnp.array([0.1, -0.1, 0.1, 0.1])),
         Documented(lambda y: _nan_columns(y, [False, True, False, False]),
                    doc="quantizer: a traced negative given scale makes its group NaN")),
    case("quantizers-learned-scale-negative-used-by-magnitude",
         lambda: (fake_quant(Quantizer("int4", scale="learned"), X, scale=-0.1),
                  fake_quant(Quantizer("int4", scale="learned"), X, scale=0.1)),
         Documented(lambda r: _same(r[0], r[1]), doc="quantizer: a learned scale is used by its magnitude")),
    case("quantizers-every-format-registered", lambda: [get_format(n).name for n in FORMAT_NAMES],
         Documented(lambda names: assert_true(len(names) == 22 and "nf4" in names and "int2" in names),
                    doc="qjax/formats.py: int2..8, uint2..8, binary, ternary, fp8, fp4, nf4, dynamic")),
]


def assert_true(ok):
    assert ok


def assert_dtype(y, dtype):
    assert y.dtype == dtype, y.dtype


def assert_shape(y, shape):
    assert y.shape == shape, y.shape
