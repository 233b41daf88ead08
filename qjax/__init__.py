"""qjax: low-bit neural networks in JAX/Flax.

``qjax.linen`` and ``qjax.nnx`` are left out of ``__all__`` so that ``from qjax import *`` never shadows
Flax's own ``nnx`` or ``linen``.

The flat public API: quantizers with surrogate gradients, formats, granularities, QArray and packing; rules
and the Linen / NNX transforms (``qjax.linen``, ``qjax.nnx``), checkpoints and summaries.
"""

from qjax import checkpoint, formats, optim, packing, presets, qat, rules, summary, surrogates
from qjax import linen as linen
from qjax import nnx as nnx
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
    "optim",
    "packing",
    "presets",
    "qat",
    "quantize",
    "rules",
    "scale_shape",
    "summary",
    "surrogates",
]
