"""qjax: low-bit neural networks in JAX/Flax.

The flat public API: quantizers with surrogate gradients, formats, granularities, QArray and packing.
"""

from qjax import formats, packing, presets, surrogates
from qjax.formats import FORMAT_NAMES, Format, dynamic_map, get_format
from qjax.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken
from qjax.qarray import QArray, dequantize
from qjax.quantizer import Quantizer, fake_quant, init_scale, quantize, scale_shape

__version__ = "0.1.0"

__all__ = [
    "FORMAT_NAMES",
    "Format",
    "PerBlock",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "QArray",
    "Quantizer",
    "dequantize",
    "dynamic_map",
    "fake_quant",
    "formats",
    "get_format",
    "init_scale",
    "packing",
    "presets",
    "quantize",
    "scale_shape",
    "surrogates",
]
