"""Bad input is refused with a ValueError that names the offending value and what is allowed.

Every case is ``(call, match)``: ``call()`` must raise ``ValueError`` whose message matches
``match``, a regex naming the bad value first and then (part of) the allowed values or the rule it
breaks.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from qjax import (
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
    surrogates,
)

X = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(16, 4)
INT8_CODES = jnp.array([-3, 0, 2, 1, -1, 7, -8, 5], jnp.int8)
WORDS_2 = jnp.zeros((2,), jnp.uint32)  # 2 words: 16 codes at 4 bits

_INT4_ALLOWED = r"allowed: ste, clipped_ste"
_PACK_BITS_ALLOWED = r"allowed: \(1, 2, 4, 8\)"


CASES = [
    # --- formats -------------------------------------------------------------------------------
    pytest.param(lambda: get_format("int9"), r"'int9'.*2 to 8 bits.*allowed: .*int8",
                 id="format-int9"),
    pytest.param(lambda: get_format("int1"), r"'int1'.*'binary' for 1 bit.*allowed: int2",
                 id="format-int1"),
    pytest.param(lambda: get_format("fp16"), r"'fp16'.*allowed: .*fp8_e4m3", id="format-fp16"),
    pytest.param(lambda: get_format("float8"), r"'float8'.*allowed: .*fp8_e5m2",
                 id="format-float8"),
    pytest.param(lambda: get_format(123), r"unknown format 123\b.*allowed: .*int4",
                 id="format-int-not-str"),
    pytest.param(lambda: get_format(None), r"unknown format None\b.*allowed: .*nf4",
                 id="format-none"),
    pytest.param(lambda: get_format(["int4"]), r"\['int4'\].*allowed: .*int4",
                 id="format-unhashable-list"),
    pytest.param(lambda: Quantizer("int9"), r"'int9'.*allowed: .*int8", id="quantizer-format-int9"),
    pytest.param(lambda: Quantizer("float8"), r"'float8'.*allowed: .*fp8_e4m3",
                 id="quantizer-format-float8"),
    pytest.param(lambda: surrogates.lsq(X, 1.0, bits=9), r"'int9'.*allowed: .*int8",
                 id="lsq-bits-9"),
    pytest.param(lambda: dynamic_map(signed="yes"), r"signed must be a bool, got 'yes'",
                 id="dynamic-map-signed-yes"),
    # --- packing: bits -------------------------------------------------------------------------
    pytest.param(lambda: packing.pack(INT8_CODES, 0), rf"bits=0 .*{_PACK_BITS_ALLOWED}",
                 id="pack-bits-0"),
    pytest.param(lambda: packing.pack(INT8_CODES, 3), rf"bits=3 .*{_PACK_BITS_ALLOWED}",
                 id="pack-bits-3"),
    pytest.param(lambda: packing.pack(INT8_CODES, 16), rf"bits=16 .*{_PACK_BITS_ALLOWED}",
                 id="pack-bits-16"),
    pytest.param(lambda: packing.pack(INT8_CODES, True), rf"bits=True .*{_PACK_BITS_ALLOWED}",
                 id="pack-bits-bool"),
    pytest.param(lambda: packing.pack(INT8_CODES, 4.0), rf"bits=4\.0 .*{_PACK_BITS_ALLOWED}",
                 id="pack-bits-float-4.0"),
    pytest.param(lambda: packing.unpack(WORDS_2, 0, 0, 16), rf"bits=0 .*{_PACK_BITS_ALLOWED}",
                 id="unpack-bits-0"),
    pytest.param(lambda: packing.unpack(WORDS_2, 3, 0, 16), rf"bits=3 .*{_PACK_BITS_ALLOWED}",
                 id="unpack-bits-3"),
    pytest.param(lambda: packing.unpack(WORDS_2, 16, 0, 4), rf"bits=16 .*{_PACK_BITS_ALLOWED}",
                 id="unpack-bits-16"),
    # --- packing: codes, words, sizes, axes ----------------------------------------------------
    pytest.param(lambda: packing.pack(jnp.zeros((8,), jnp.float32), 4),
                 r"integer dtype, got float32; allowed: int8", id="pack-float-codes"),
    pytest.param(lambda: packing.pack(jnp.array([1, 9, -2], jnp.int8), 4),
                 r"code 9 does not fit in 4 bits \(signed\); allowed: \[-8, 7\]",
                 id="pack-int8-code-9-at-4-bits"),
    pytest.param(lambda: packing.pack(jnp.array([1, 0, -1], jnp.int8), 1),
                 r"code 0 does not fit in 1 bits \(signed\); allowed: \{-1, \+1\}",
                 id="pack-signed-1bit-code-0"),
    pytest.param(lambda: packing.pack(jnp.array([3, 16], jnp.uint8), 4),
                 r"code 16 does not fit in 4 bits \(unsigned\); allowed: \[0, 15\]",
                 id="pack-uint8-code-16-at-4-bits"),
    pytest.param(lambda: packing.pack(INT8_CODES, 4, axis=1),
                 r"axis=1 is out of range.*allowed: \[-1, 0\]", id="pack-axis-out-of-range"),
    pytest.param(lambda: packing.unpack(jnp.zeros((2,), jnp.int32), 4, 0, 16),
                 r"got int32; allowed: uint32", id="unpack-int32-words"),
    pytest.param(lambda: packing.unpack(WORDS_2, 4, 0, 17),
                 r"size=17 does not match 2 words.*allowed: 9 \.\. 16", id="unpack-size-too-big"),
    pytest.param(lambda: packing.unpack(WORDS_2, 4, 0, 8),
                 r"size=8 does not match 2 words.*allowed: 9 \.\. 16", id="unpack-size-too-small"),
    pytest.param(lambda: quantize(Quantizer("int4"), X).pack(2),
                 r"QArray.pack: axis=2 is out of range for rank 2; allowed: \[-2, 1\]",
                 id="qarray-pack-axis-out-of-range"),
    pytest.param(lambda: quantize(Quantizer("int4"), X).pack(True),
                 r"axis=True is out of range.*allowed", id="qarray-pack-axis-bool"),
    pytest.param(lambda: fake_quant(Quantizer("int4", scale="given"), X, scale=jnp.zeros((1, 1))),
                 r"scale must be positive, got minimum 0\.0; allowed: finite values > 0",
                 id="given-scale-zero"),
    # --- granularity ---------------------------------------------------------------------------
    pytest.param(lambda: fake_quant(Quantizer("int4", PerGroup(axis=0, size=5)), X),
                 r"group size 5 does not divide axis 0 of length 16.*allowed sizes: "
                 r"\[1, 2, 4, 8, 16\]", id="pergroup-size-5-on-16"),
    pytest.param(lambda: quantize(Quantizer("int4", PerGroup(axis=-1, size=3)), X),
                 r"group size 3 does not divide axis -1 of length 4.*allowed sizes: \[1, 2, 4\]",
                 id="pergroup-size-3-on-4-quantize"),
    pytest.param(lambda: fake_quant(Quantizer("int4", PerGroup(0, 0)), X),
                 r"group size 0 must be a positive integer", id="pergroup-size-0"),
    pytest.param(lambda: fake_quant(Quantizer("int4", PerGroup(0, -4)), X),
                 r"group size -4 must be a positive integer", id="pergroup-size-negative"),
    pytest.param(lambda: fake_quant(Quantizer("int4", PerGroup(0, True)), X),
                 r"group size True must be a positive integer", id="pergroup-size-bool"),
    pytest.param(lambda: fake_quant(Quantizer("int4", PerChannel(2)), X),
                 r"axis 2 is out of range .* rank 2; allowed: integers in \[-2, 1\]",
                 id="perchannel-axis-2-rank-2"),
    pytest.param(lambda: fake_quant(Quantizer("int4", PerChannel(-3)), X),
                 r"axis -3 is out of range .* rank 2; allowed: integers in \[-2, 1\]",
                 id="perchannel-axis-minus-3-rank-2"),
    pytest.param(lambda: fake_quant(Quantizer("int8", PerToken(5)), X),
                 r"PerToken: axis 5 is out of range.*allowed: integers in \[-2, 1\]",
                 id="pertoken-axis-5"),
    pytest.param(lambda: fake_quant(Quantizer("nf4", PerBlock(0)), X),
                 r"block size 0 must be a positive integer", id="perblock-size-0"),
    pytest.param(lambda: Quantizer("int4", "per_channel"),
                 r"'per_channel' is not a granularity; allowed: PerTensor\(\)",
                 id="granularity-string"),
    # --- Quantizer fields ----------------------------------------------------------------------
    pytest.param(lambda: Quantizer("int4", surrogate="foo"), rf"'foo'.*{_INT4_ALLOWED}",
                 id="surrogate-foo-int4"),
    pytest.param(lambda: Quantizer("binary", surrogate="foo"), r"'foo'.*allowed: .*reste.*biper",
                 id="surrogate-foo-binary"),
    pytest.param(lambda: Quantizer("int4", surrogate="reste"),
                 rf"'reste' for format 'int4'; {_INT4_ALLOWED}", id="sign-surrogate-on-int4"),
    pytest.param(lambda: Quantizer("nf4", surrogate="biper"),
                 rf"'biper' for format 'nf4'; {_INT4_ALLOWED}", id="sign-surrogate-on-nf4"),
    pytest.param(lambda: Quantizer("binary", PerTensor(), "mean_abs", "reste", bases=2),
                 rf"'reste' for format 'binary' with bases > 1; {_INT4_ALLOWED}",
                 id="sign-surrogate-multibasis"),
    pytest.param(lambda: Quantizer("int4", scale="foo"),
                 r"unknown scale rule 'foo'; allowed: absmax, mean_abs", id="scale-rule-foo"),
    pytest.param(lambda: Quantizer("nf4", scale="minmax"),
                 r"'minmax' needs an integer format, got 'nf4'; allowed: int2\.\.int8",
                 id="minmax-nf4"),
    pytest.param(lambda: Quantizer("fp8_e4m3", scale="minmax"),
                 r"'minmax' needs an integer format, got 'fp8_e4m3'; allowed: int2\.\.int8",
                 id="minmax-fp8"),
    pytest.param(lambda: Quantizer("binary", scale="minmax"),
                 r"'minmax' needs an integer format, got 'binary'; allowed: int2\.\.int8",
                 id="minmax-binary"),
    pytest.param(lambda: Quantizer("int4", scale="mean_abs", bases=2),
                 r"bases=2 needs format 'binary', got 'int4'", id="bases-2-int4"),
    pytest.param(lambda: Quantizer("binary", scale="absmax", bases=2),
                 r"scale 'absmax' is not supported; allowed: 'mean_abs', 'given'",
                 id="bases-2-absmax"),
    pytest.param(lambda: Quantizer("binary", scale="mean_abs", bases=0),
                 r"bases=0 must be a positive integer", id="bases-0"),
    pytest.param(lambda: Quantizer("binary", scale="mean_abs", bases=True),
                 r"bases=True must be a positive integer", id="bases-bool"),
    pytest.param(lambda: Quantizer("int4", eps=-1e-5), r"eps=-1e-05 must be a finite float >= 0",
                 id="eps-negative"),
    pytest.param(lambda: Quantizer("int4", eps=float("nan")),
                 r"eps=nan must be a finite float >= 0", id="eps-nan"),
    # --- quantize / fake_quant / dequantize / init_scale calls ---------------------------------
    pytest.param(lambda: quantize(Quantizer("int4"), jnp.ones((4, 4), jnp.int32)),
                 r"quantize: .*dtype int32; allowed: float32", id="quantize-int32-x"),
    pytest.param(lambda: fake_quant(Quantizer("int4"), jnp.ones((4, 4), jnp.int8)),
                 r"fake_quant: .*dtype int8; allowed: float32", id="fake-quant-int8-x"),
    pytest.param(lambda: init_scale(Quantizer("int4", scale="learned"), jnp.ones((4,), jnp.int32)),
                 r"init_scale: .*dtype int32; allowed: float32", id="init-scale-int32-x"),
    pytest.param(lambda: fake_quant(Quantizer("int4", scale="given"), X),
                 r"'given' needs scale=", id="given-without-scale"),
    pytest.param(lambda: quantize(Quantizer("int4", scale="learned"), X),
                 r"'learned' needs scale=", id="learned-without-scale"),
    pytest.param(lambda: fake_quant(Quantizer("int4"), X, scale=jnp.float32(0.1)),
                 r"'absmax' computes its own scale; pass scale= only with scale='given' or "
                 r"'learned'", id="scale-with-absmax"),
    pytest.param(lambda: quantize(Quantizer("uint4", scale="minmax"), X, zero_point=1.0),
                 r"'minmax' computes its own scale;.*'given' or 'learned'",
                 id="zero-point-with-minmax"),
    pytest.param(lambda: fake_quant(Quantizer("int4", PerChannel(-1), "given"), X,
                                    scale=jnp.ones((3,))),
                 r"scale has shape \(3,\); allowed: \(1, 4\)", id="given-scale-wrong-shape"),
    pytest.param(lambda: quantize(Quantizer("int4", PerGroup(0, 8), "given"), X,
                                  scale=jnp.ones((2, 1, 4)), zero_point=jnp.ones((5,))),
                 r"zero_point has shape \(5,\); allowed: \(2, 1, 4\)",
                 id="given-zero-point-wrong-shape"),
    pytest.param(lambda: fake_quant(Quantizer("binary", surrogate="reste"), X, omega=1.0),
                 r"\['omega'\] for surrogate 'reste'.*allowed: \['o', 't'\]",
                 id="hparam-omega-for-reste"),
    pytest.param(lambda: quantize(Quantizer("int4"), X, o=2.0),
                 r"\['o'\] for surrogate 'ste' on 'int4'; allowed: none", id="hparam-o-for-int4"),
    pytest.param(lambda: quantize("int4", X), r"expects a Quantizer, got str",
                 id="quantize-non-quantizer"),
    pytest.param(lambda: fake_quant(None, X), r"expects a Quantizer, got NoneType",
                 id="fake-quant-non-quantizer"),
    pytest.param(lambda: dequantize(X), r"expects a QArray, got ArrayImpl",
                 id="dequantize-non-qarray"),
    pytest.param(lambda: init_scale(Quantizer("int4", scale="learned"), X, "foo"),
                 r"unknown rule 'foo'; allowed: absmax, mean_abs, median, lsq_init",
                 id="init-scale-rule-foo"),
    pytest.param(lambda: init_scale(Quantizer("int4", scale="learned"), X, "minmax"),
                 r"unknown rule 'minmax'; allowed: absmax, mean_abs, median, lsq_init",
                 id="init-scale-rule-minmax"),
    # --- surrogate hyperparameters -------------------------------------------------------------
    pytest.param(lambda: surrogates.reste(X, o=float("nan")), r"o=nan must be finite",
                 id="reste-o-nan"),
    pytest.param(lambda: surrogates.reste(X, t=float("inf")), r"t=inf must be finite",
                 id="reste-t-inf"),
    pytest.param(lambda: surrogates.biper(X, omega=float("-inf")), r"omega=-inf must be finite",
                 id="biper-omega-minus-inf"),
    pytest.param(lambda: fake_quant(Quantizer("binary", surrogate="reste"), X, o=float("nan")),
                 r"o=nan must be finite", id="fake-quant-reste-o-nan"),
    pytest.param(lambda: surrogates.reste(X, o=np.float32("nan")), r"o=.*nan.* must be finite",
                 id="reste-o-numpy-float32-nan"),
    pytest.param(lambda: quantize(Quantizer("binary", surrogate="biper"), X, omega=float("nan")),
                 r"omega=nan must be finite", id="quantize-biper-omega-nan"),
]


@pytest.mark.parametrize(("call", "match"), CASES)
def test_bad_input_raises_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_enough_distinct_cases():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 26
