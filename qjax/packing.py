"""Bit packing of 1-, 2-, 4- and 8-bit codes into uint32 words, in planes along one axis.

The layout is defined once, in :mod:`kernels_pallas.layout` (arrays only, the one the packed matmul kernels
read); this module is qjax's name for it. Along ``axis`` of length ``K``, with ``n = 32 // bits`` codes per
word and ``P = ceil(K / n)`` words, ``word[p] = sum_j stored(code[p + j * P]) << (j * bits)``; signed codes
are stored as offset binary (binary ``{-1, +1} -> {0, 1}``), unsigned codes as they are, and
``unpack(words, bits, axis, K, signed=...)`` inverts ``pack`` for both (``signed`` is the dtype the codes
had). :meth:`qjax.QArray.pack` packs a QArray's codes with it.
"""

from kernels_pallas.layout import PACK_BITS, check_axis, code_range, decode_fields, pack, packed_size, unpack

__all__ = ["PACK_BITS", "check_axis", "code_range", "decode_fields", "pack", "packed_size", "unpack"]
