"""qjax: low-bit neural networks in JAX/Flax.

The flat public API: quantizers with surrogate gradients, formats, granularities, QArray and packing; rules
and the Linen / NNX transforms (``qjax.linen``, ``qjax.nnx``), checkpoints and summaries.
"""

from qjax import checkpoint, formats, linen, nnx, packing, presets, qat, rules, summary, surrogates
from qjax.formats import FORMAT_NAMES, Format, dynamic_map, get_format
from qjax.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken
from qjax.qarray import QArray, dequantize
from qjax.quantizer import Quantizer, fake_quant, init_scale, quantize, scale_shape
from qjax.rules import Rule

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
    "Rule",
    "checkpoint",
    "dequantize",
    "dynamic_map",
    "fake_quant",
    "formats",
    "get_format",
    "init_scale",
    "linen",
    "nnx",
    "packing",
    "presets",
    "qat",
    "quantize",
    "rules",
    "scale_shape",
    "summary",
    "surrogates",
]
