"""Bad-input table, area "mx": the MX block formats (``qjax.presets.mxfp8``, ``mxfp4``, ``nvfp4``; scale rules
``e8m0`` and ``nvfp4``) and QArrays holding their narrow scales.

Documented results (``qjax/scales.py``): an all-zero block gets the smallest scale (``TINY``: E8M0 code 1, an
``nvfp4`` block scale of ``2^-9``) and quantizes to zeros; a block holding a NaN or Inf gets the E8M0 NaN
code ``0xFF`` (an ``nvfp4`` block scale NaN) and dequantizes to NaN, other blocks (and ``nvfp4``'s tensor
scale) untouched; finite input near the largest float32 stays finite; an empty input gives scales ``TINY``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qjax import (
    PerChannel,
    PerGroup,
    QArray,
    Quantizer,
    dequantize,
    fake_quant,
    get_format,
    presets,
    quantize,
)
from qjax.scales import TINY, mx_scale, scale_value
from tests.bad_input.table import Documented, Raises, case

X48 = jnp.linspace(-1.0, 1.0, 48 * 4, dtype=jnp.float32).reshape(48, 4)  # axis 0 of 48: not a block of 32
X = X48[:32]
FP4_CODES = jnp.zeros((32, 4), jnp.float4_e2m1fn)
E4M3_SCALES = jnp.ones((2, 1, 4), jnp.float8_e4m3fn)  # nvfp4 block scales of FP4_CODES along axis 0
PRESETS = {"mxfp8": presets.mxfp8, "mxfp4": presets.mxfp4, "nvfp4": presets.nvfp4}
_FLOAT_FORMATS = r"allowed: fp8_e4m3, fp8_e5m2, fp4_e2m1"


def both(q, x):
    qa = quantize(q, x)
    return fake_quant(q, x), dequantize(qa), qa


def _zeros_tiny(r):
    fq, dq, qa = r
    assert not bool(jnp.any(jnp.isnan(fq))) and bool(jnp.all(fq == 0)) and bool(jnp.all(dq == 0)), fq
    np.testing.assert_array_equal(np.asarray(scale_value(qa.scale, qa.tensor_scale)), TINY)


def _nan_block(size):
    def check(r):
        fq, dq, qa = r
        nan = np.asarray(jnp.isnan(fq))
        expected = np.zeros(nan.shape, bool)
        expected[:size, 1] = True  # the block of rows 0..size-1 in column 1
        np.testing.assert_array_equal(nan, expected)
        np.testing.assert_array_equal(np.asarray(jnp.isnan(dq)), expected)
        assert qa.tensor_scale is None or bool(jnp.all(jnp.isfinite(qa.tensor_scale)))
    return check


def _finite(r):
    fq, dq, _ = r
    assert bool(jnp.all(jnp.isfinite(fq))) and bool(jnp.all(jnp.isfinite(dq))), fq
    np.testing.assert_array_equal(np.asarray(fq), np.asarray(dq))


def _empty(r):
    fq, dq, qa = r
    assert fq.shape == dq.shape == (0, 4), (fq.shape, dq.shape)
    np.testing.assert_array_equal(np.asarray(scale_value(qa.scale, qa.tensor_scale)), TINY)


HUGE = jnp.asarray(np.outer(np.linspace(-1.0, 1.0, 32), [1.0, 0.5, 1e-30, 1.0]) * 3.4e38, jnp.float32)

CASES = [
    # --- block sizes, formats, axes -----------------------------------------------------------------
    case("mx-mxfp4-block-32-on-axis-of-48", lambda: fake_quant(presets.mxfp4(0), X48),
         Raises(r"group size 32 does not divide axis 0 of length 48.*allowed sizes: "
                r"\[1, 2, 3, 4, 6, 8, 12, 16, 24, 48\]")),
    case("mx-mxfp8-block-32-on-axis-of-48-quantize", lambda: quantize(presets.mxfp8(0), X48),
         Raises(r"group size 32 does not divide axis 0 of length 48")),
    case("mx-nvfp4-block-16-on-axis-of-4", lambda: quantize(presets.nvfp4(-1), X48),
         Raises(r"group size 16 does not divide axis -1 of length 4.*allowed sizes: \[1, 2, 4\]")),
    case("mx-mxfp4-on-scalar", lambda: fake_quant(presets.mxfp4(0), jnp.float32(1.0)),
         Raises(r"PerGroup: axis 0 is out of range for a 0-d array")),
    case("mx-e8m0-int8", lambda: Quantizer("int8", PerGroup(0, 32), "e8m0"),
         Raises(rf"scale rule 'e8m0' needs a float element format, got 'int8'; {_FLOAT_FORMATS}")),
    case("mx-e8m0-int4-per-channel", lambda: Quantizer("int4", PerChannel(-1), "e8m0"),
         Raises(rf"'e8m0' needs a float element format, got 'int4'; {_FLOAT_FORMATS}")),
    case("mx-e8m0-nf4", lambda: Quantizer("nf4", PerGroup(0, 32), "e8m0"),
         Raises(rf"'e8m0' needs a float element format, got 'nf4'; {_FLOAT_FORMATS}")),
    case("mx-e8m0-binary", lambda: Quantizer("binary", PerGroup(0, 32), "e8m0"),
         Raises(rf"'e8m0' needs a float element format, got 'binary'; {_FLOAT_FORMATS}")),
    case("mx-nvfp4-rule-fp8-e4m3", lambda: Quantizer("fp8_e4m3", PerGroup(0, 16), "nvfp4"),
         Raises(r"scale rule 'nvfp4' needs a float element format, got 'fp8_e4m3'; allowed: fp4_e2m1")),
    case("mx-nvfp4-rule-uint8", lambda: Quantizer("uint8", PerGroup(0, 16), "nvfp4"),
         Raises(r"'nvfp4' needs a float element format, got 'uint8'; allowed: fp4_e2m1")),
    case("mx-preset-axis-string", lambda: presets.mxfp8("0"),
         Raises(r"mxfp8: axis '0' must be an integer .*allowed: e\.g\. 0 for a Dense kernel")),
    case("mx-preset-axis-bool", lambda: presets.mxfp4(True),
         Raises(r"mxfp4: axis True must be an integer")),
    case("mx-preset-axis-float", lambda: presets.nvfp4(0.0),
         Raises(r"nvfp4: axis 0\.0 must be an integer")),
    case("mx-preset-axis-out-of-range", lambda: fake_quant(presets.mxfp4(2), X),
         Raises(r"PerGroup: axis 2 is out of range for an array of rank 2; allowed: integers in \[-2, 1\]")),
    case("mx-e8m0-with-given-scale", lambda: fake_quant(presets.mxfp4(0), X, scale=jnp.ones((1, 1, 4))),
         Raises(r"scale rule 'e8m0' computes its own scale; pass scale= only with scale='given' or "
                r"'learned'")),
    case("mx-nvfp4-with-zero-point", lambda: quantize(presets.nvfp4(0), X, zero_point=jnp.zeros((2, 1, 4))),
         Raises(r"scale rule 'nvfp4' computes its own scale")),
    case("mx-e8m0-multi-basis", lambda: Quantizer("fp4_e2m1", PerGroup(0, 32), "e8m0", bases=2),
         Raises(r"bases=2 needs format 'binary', got 'fp4_e2m1'")),
    case("mx-scale-rule-name-typo", lambda: Quantizer("fp4_e2m1", PerGroup(0, 32), "mxfp4"),
         Raises(r"unknown scale rule 'mxfp4'; allowed: .*e8m0, nvfp4")),
    case("mx-mx-scale-unknown-rule", lambda: mx_scale("e5m0", get_format("fp4_e2m1"), X, (0,)),
         Raises(r"unknown block scale rule 'e5m0'; allowed: e8m0, nvfp4")),
    case("mx-mx-scale-int-format", lambda: mx_scale("e8m0", get_format("int4"), X, (0,)),
         Raises(rf"'e8m0' needs a float element format, got 'int4'; {_FLOAT_FORMATS}")),
    # --- QArrays holding narrow scales --------------------------------------------------------------
    case("mx-qarray-int8-scale",
         lambda: QArray(FP4_CODES, jnp.zeros((1, 1, 4), jnp.int8), None, "fp4_e2m1", PerGroup(0, 32)),
         Raises(r"QArray: scale of dtype int8; allowed: a float dtype \(float32\), or uint8 "
                r"\(E8M0 exponents\)")),
    case("mx-qarray-uint8-zero-point",
         lambda: QArray(FP4_CODES, jnp.ones((1, 1, 4), jnp.uint8), jnp.zeros((1, 1, 4), jnp.uint8),
                        "fp4_e2m1", PerGroup(0, 32)),
         Raises(r"QArray: zero_point of dtype uint8; allowed: a float dtype \(float32\)$")),
    case("mx-qarray-tensor-scale-per-column",
         lambda: QArray(FP4_CODES, E4M3_SCALES, None, "fp4_e2m1", PerGroup(0, 16),
                        tensor_scale=jnp.ones((4,))),
         Raises(r"QArray: tensor_scale of shape \(4,\) does not fit .*allowed: \(1, 1, 1\)")),
    case("mx-qarray-tensor-scale-int32",
         lambda: QArray(FP4_CODES, E4M3_SCALES, None, "fp4_e2m1", PerGroup(0, 16),
                        tensor_scale=jnp.ones((1, 1, 1), jnp.int32)),
         Raises(r"QArray: tensor_scale of dtype int32; allowed: a float dtype \(float32\)")),
    case("mx-qarray-e8m0-scale-wrong-shape",
         lambda: QArray(FP4_CODES, jnp.ones((2, 1, 4), jnp.uint8), None, "fp4_e2m1", PerGroup(0, 32)),
         Raises(r"QArray: scale of shape \(2, 1, 4\) does not fit codes of shape \(32, 4\).*"
                r"allowed: \(1, 1, 4\)")),
    # --- documented numerics ------------------------------------------------------------------------
    *(case(f"mx-all-zero-{name}", lambda p=p: both(p(0), jnp.zeros((32, 4))),
           Documented(_zeros_tiny, doc="qjax/scales.py: an all-zero block gets the smallest scale, TINY"))
      for name, p in PRESETS.items()),
    *(case(f"mx-nan-marks-its-block-{name}", lambda p=p: both(p(0), X.at[3, 1].set(jnp.nan)),
           Documented(_nan_block(p(0).granularity.size),
                      doc="qjax/scales.py: a block holding a NaN gets the NaN scale, others untouched"))
      for name, p in PRESETS.items()),
    *(case(f"mx-inf-marks-its-block-{name}", lambda p=p: both(p(0), X.at[0, 1].set(-jnp.inf)),
           Documented(_nan_block(p(0).granularity.size), doc="qjax/scales.py: an Inf marks its block NaN"))
      for name, p in PRESETS.items()),
    *(case(f"mx-huge-finite-{name}", lambda p=p: both(p(0), HUGE),
           Documented(_finite, doc="qjax/scales.py: finite input near float32 max stays finite"))
      for name, p in PRESETS.items()),
    *(case(f"mx-empty-{name}", lambda p=p: both(p(0), jnp.zeros((0, 4))),
           Documented(_empty, doc="qjax/scales.py mx_scale: an empty input counts as all zeros (TINY)"))
      for name, p in PRESETS.items()),
    case("mx-e8m0-code-0-reads-as-2-to-minus-127",
         lambda: scale_value(jnp.array([0, 1, 127, 254, 255], jnp.uint8)),
         Documented(lambda s: np.testing.assert_array_equal(np.asarray(s).view(np.uint32), np.array(
             [0x00400000, 0x00800000, 0x3F800000, 0x7F000000, 0x7FC00000], np.uint32)),
             doc="qjax/scales.py scale_value: E8M0 2^(e - 127), 0xFF NaN, 0 the subnormal 2^-127")),
]
