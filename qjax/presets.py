"""Published quantizers, exactly as their papers define them.

- ``BITNET_TERNARY``: BitNet b1.58 weights (Ma et al. 2024): ``gamma = mean|W|``,
  ``W_q = clip(round(W / max(gamma, 1e-5)), -1, 1)``, value ``W_q * max(gamma, 1e-5)``, STE.
- ``BITNET_ACTIVATIONS``: BitNet's per-token 8-bit activations: ``s = 127 / max(max|x|, 1e-5)`` over the
  feature axis, ``clip(round(x * s), -128, 127) / s``, STE.
- ``XNOR_WEIGHTS``: XNOR-Net / Bi-Real weights (Rastegari et al. 2016; Liu et al. 2018): ``sign(W)``
  times ``alpha = mean|W|`` per output channel (detached, as in Bi-Real), clipped STE.

The microscaling block formats, one function each of the contraction axis (``0`` for a Dense kernel
``(in, out)``, ``-1`` for activations ``(..., features)``), each a :class:`~qjax.Quantizer` of an existing
element format, ``PerGroup(axis, block)`` and a block scale rule (:mod:`qjax.scales`), straight-through
gradient:

- :func:`mxfp8`: E4M3 elements, blocks of 32, one E8M0 scale per block (8.25 bits per element).
- :func:`mxfp4`: E2M1 elements, blocks of 32, one E8M0 scale per block (4.25 bits per element).
- :func:`nvfp4`: E2M1 elements, blocks of 16, one E4M3 scale per block and one float32 scale per tensor
  (4.5 bits per element plus 32 bits per tensor).

The axis length must be a multiple of the block (:class:`~qjax.PerGroup` says so when it is not); use
``dataclasses.replace(mxfp4(0), surrogate="clipped_ste")`` for another gradient.
"""

from qjax.granularity import PerChannel, PerGroup, PerTensor, PerToken
from qjax.quantizer import Quantizer

BITNET_TERNARY = Quantizer("ternary", PerTensor(), "mean_abs", "ste", eps=1e-5)
BITNET_ACTIVATIONS = Quantizer("int8", PerToken(-1), "absmax", "ste", eps=1e-5)
XNOR_WEIGHTS = Quantizer("binary", PerChannel(-1), "mean_abs", "clipped_ste")


MX_BLOCK = 32
"""Elements per E8M0 scale in the OCP MX formats (OCP Microscaling Formats v1.0, section 5)."""
NVFP4_BLOCK = 16
"""Elements per E4M3 scale in NVIDIA's NVFP4."""


def _block_quantizer(who: str, element: str, block: int, rule: str, axis: int) -> Quantizer:
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ValueError(f"{who}: axis {axis!r} must be an integer (the contraction axis); allowed: e.g. 0 "
                         "for a Dense kernel (in, out), -1 for activations (..., features)")
    return Quantizer(element, PerGroup(axis, block), rule)


def mxfp8(axis: int) -> Quantizer:
    """MXFP8 (E4M3) along ``axis``: blocks of 32 elements share ``s = 2^(floor(log2 amax) - 8)``, stored as
    one uint8 E8M0 exponent per block; elements ``e4m3(x / s)``, saturating at 448.
    OCP Microscaling Formats (MX) v1.0, sections 5.2 and 6.3; scale rule ``e8m0`` (:mod:`qjax.scales`)."""
    return _block_quantizer("mxfp8", "fp8_e4m3", MX_BLOCK, "e8m0", axis)


def mxfp4(axis: int) -> Quantizer:
    """MXFP4 (E2M1) along ``axis``: blocks of 32 elements share ``s = 2^(floor(log2 amax) - 2)``, stored as
    one uint8 E8M0 exponent per block; elements ``e2m1(x / s)`` in ``{0, 0.5, 1, 1.5, 2, 3, 4, 6}`` with a
    sign, saturating at 6. OCP Microscaling Formats (MX) v1.0, sections 5.3.3 and 6.3; scale rule ``e8m0``."""
    return _block_quantizer("mxfp4", "fp4_e2m1", MX_BLOCK, "e8m0", axis)


def nvfp4(axis: int) -> Quantizer:
    """NVFP4 along ``axis``: a float32 tensor scale ``t = amax_tensor / (448 * 6)``, per block of 16 an E4M3
    scale ``b = e4m3(amax_block / 6 / t)`` (float8_e4m3fn, one byte), elements ``e2m1(x / (b t))``.
    NVIDIA NVFP4 (two-level microscaling: FP8 E4M3 per 16 values, FP32 per tensor); scale rule ``nvfp4``
    (:mod:`qjax.scales`)."""
    return _block_quantizer("nvfp4", "fp4_e2m1", NVFP4_BLOCK, "nvfp4", axis)
