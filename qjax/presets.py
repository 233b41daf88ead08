"""Published quantizers, exactly as their papers define them.

- ``BITNET_TERNARY``: BitNet b1.58 weights (Ma et al. 2024): ``gamma = mean|W|``,
  ``W_q = clip(round(W / max(gamma, 1e-5)), -1, 1)``, value ``W_q * max(gamma, 1e-5)``, STE.
- ``BITNET_ACTIVATIONS``: BitNet's per-token 8-bit activations: ``s = 127 / max(max|x|, 1e-5)`` over the
  feature axis, ``clip(round(x * s), -128, 127) / s``, STE.
- ``XNOR_WEIGHTS``: XNOR-Net / Bi-Real weights (Rastegari et al. 2016; Liu et al. 2018): ``sign(W)``
  times ``alpha = mean|W|`` per output channel (detached, as in Bi-Real), clipped STE.
"""

from qjax.granularity import PerChannel, PerTensor, PerToken
from qjax.quantizer import Quantizer

BITNET_TERNARY = Quantizer("ternary", PerTensor(), "mean_abs", "ste", eps=1e-5)
BITNET_ACTIVATIONS = Quantizer("int8", PerToken(-1), "absmax", "ste", eps=1e-5)
XNOR_WEIGHTS = Quantizer("binary", PerChannel(-1), "mean_abs", "clipped_ste")
