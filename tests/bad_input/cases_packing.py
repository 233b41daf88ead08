"""qjax.packing (the uint32 plane layout of kernels_pallas.layout): bad codes, bits, axes, sizes; edges."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qjax import packing
from tests.bad_input.table import Documented, Raises, case

_BITS = r"allowed: \(1, 2, 4, 8\)"
WORDS = jnp.zeros((2, 3), jnp.uint32)  # 2 words along axis 0: 9 .. 16 codes at 4 bits
CODES = jnp.array([[-8, 7, 0], [3, -1, 5], [1, 2, -3]], jnp.int8)


def _round_trip(codes, bits, axis=0, signed=True):
    codes = jnp.asarray(codes)
    return packing.unpack(packing.pack(codes, bits, axis), bits, axis, codes.shape[axis], signed=signed)


def _equals(expected):
    def check(result):
        np.testing.assert_array_equal(np.asarray(result), np.asarray(expected))
    return check


CASES = [
    # --- pack: codes ---------------------------------------------------------------------------------------
    case("packing-pack-float-codes", lambda: packing.pack(jnp.zeros((4,), jnp.float32), 4),
         Raises(r"codes must have an integer dtype, got float32; allowed: int8")),
    case("packing-pack-bool-codes", lambda: packing.pack(jnp.ones((4,), bool), 1),
         Raises(r"integer dtype, got bool; allowed: int8")),
    case("packing-pack-signed-code-2-at-2-bits", lambda: packing.pack(jnp.array([1, 2], jnp.int8), 2),
         Raises(r"code 2 does not fit in 2 bits \(signed\); allowed: \[-2, 1\]")),
    case("packing-pack-unsigned-code-2-at-1-bit", lambda: packing.pack(jnp.array([0, 2], jnp.uint8), 1),
         Raises(r"code 2 does not fit in 1 bits \(unsigned\); allowed: \[0, 1\]")),
    case("packing-pack-uint32-code-2-to-the-31", lambda: packing.pack(jnp.array([2**31], jnp.uint32), 8),
         Raises(r"code 2147483648 does not fit in 8 bits \(unsigned\); allowed: \[0, 255\]")),
    case("packing-pack-numpy-code-out-of-range", lambda: packing.pack(np.array([-9], np.int16), 4),
         Raises(r"code -9 does not fit in 4 bits \(signed\); allowed: \[-8, 7\]")),
    # --- pack / unpack: bits, axes ------------------------------------------------------------------------
    case("packing-pack-bits-none", lambda: packing.pack(CODES, None),
         Raises(rf"bits=None cannot be packed; {_BITS}")),
    case("packing-pack-bits-string", lambda: packing.pack(CODES, "4"),
         Raises(rf"bits='4' cannot be packed; {_BITS}")),
    case("packing-unpack-bits-bool", lambda: packing.unpack(WORDS, True, 0, 16),
         Raises(rf"bits=True cannot be packed; {_BITS}")),
    case("packing-pack-axis-float", lambda: packing.pack(CODES, 4, axis=0.0),
         Raises(r"pack: axis=0.0 is out of range for rank 2; allowed: \[-2, 1\]")),
    case("packing-pack-rank-0", lambda: packing.pack(jnp.int8(3), 4),
         Raises(r"axis=0 is out of range for rank 0; allowed: none \(a rank-0 array has no axis")),
    case("packing-unpack-axis-out-of-range", lambda: packing.unpack(WORDS, 4, -3, 16),
         Raises(r"unpack: axis=-3 is out of range for rank 2; allowed: \[-2, 1\]")),
    # --- unpack: words, sizes, signedness ------------------------------------------------------------------
    case("packing-unpack-int32-words", lambda: packing.unpack(WORDS.astype(jnp.int32), 4, 0, 16),
         Raises(r"words must be uint32, got int32; allowed: uint32")),
    case("packing-unpack-size-too-big", lambda: packing.unpack(WORDS, 4, 0, 17),
         Raises(r"size=17 does not match 2 words of 8 codes each; allowed: 9 \.\. 16")),
    case("packing-unpack-size-float", lambda: packing.unpack(WORDS, 4, 0, 12.0),
         Raises(r"size=12.0 does not match 2 words.*allowed: 9 \.\. 16")),
    case("packing-unpack-signed-a-string", lambda: packing.unpack(WORDS, 4, 0, 16, signed="no"),
         Raises(r"signed='no'; allowed: True or False", exc=TypeError)),
    case("packing-packed-size-negative", lambda: packing.packed_size(-1, 4),
         Raises(r"packed_size: size=-1; allowed: an integer >= 0")),
    case("packing-packed-size-float", lambda: packing.packed_size(2.5, 4),
         Raises(r"packed_size: size=2.5; allowed: an integer >= 0")),
    case("packing-packed-size-bits-3", lambda: packing.packed_size(8, 3),
         Raises(rf"bits=3 cannot be packed; {_BITS}")),
    # --- documented edges -----------------------------------------------------------------------------------
    case("packing-empty-axis-round-trip", lambda: _round_trip(jnp.zeros((0, 3), jnp.int8), 4),
         Documented(lambda r: r.shape == (0, 3) and r.dtype == jnp.int8,
                    doc="qjax.packing: K = 0 packs into 0 words and unpacks to (0, 3)")),
    case("packing-odd-length-round-trip",
         lambda: _round_trip(jnp.arange(-4, 5, dtype=jnp.int8)[:, None], 4),
         Documented(_equals(np.arange(-4, 5, dtype=np.int8)[:, None]),
                    doc="kernels_pallas.layout: positions past K are stored as 0 and cut off by unpack")),
    case("packing-all-zero-int4-codes-are-offset-binary",
         lambda: packing.pack(jnp.zeros((8,), jnp.int8), 4),
         Documented(_equals(np.array([0x88888888], np.uint32)),
                    doc="kernels_pallas.layout: offset binary, code 0 -> field 8 in all 8 planes")),
    case("packing-unsigned-round-trip",
         lambda: _round_trip(jnp.arange(16, dtype=jnp.uint8), 4, signed=False),
         Documented(_equals(np.arange(16, dtype=np.uint8)), doc="unpack(signed=False): uint8 codes back")),
    case("packing-binary-round-trip-along-axis-1",
         lambda: _round_trip(jnp.where(CODES > 0, 1, -1).astype(jnp.int8), 1, axis=1),
         Documented(_equals(np.where(np.asarray(CODES) > 0, 1, -1)),
                    doc="binary {-1, +1} -> {0, 1} -> {-1, +1}")),
    case("packing-unsigned-view-of-signed-words",
         lambda: packing.unpack(packing.pack(CODES, 4), 4, 0, 3, signed=False),
         Documented(_equals(np.asarray(CODES) + 8),
                    doc="unpack(signed=False) of signed words: the stored fields, code + 8 (offset binary)")),
    case("packing-python-list-codes", lambda: packing.pack([[1], [-2], [3]], 4),
         Documented(_equals(packing.pack(jnp.array([[1], [-2], [3]], jnp.int32), 4)),
                    doc="a list of ints packs as the int32 array it makes")),
    case("packing-jit-code-that-does-not-fit-stays-in-its-field",
         lambda: packing.unpack(jax.jit(lambda c: packing.pack(c, 4))(jnp.array([9, 1, -1], jnp.int8)),
                                4, 0, 3),
         Documented(_equals(np.array([-7, 1, -1], np.int8)),
                    doc="kernels_pallas.layout.pack: under jit a code is stored as its field's low bits "
                        "(9 + 8 -> 17 mod 16 = 1 -> -7); its neighbours keep their codes")),
]
