"""qjax: low-bit neural networks in JAX/Flax.

The flat public API: quantizers with surrogate gradients, formats, granularities, QArray and packing;
Hadamard rotations (``qjax.rotation``); rules and the Linen / NNX transforms (``qjax.linen``,
``qjax.nnx``), post-training quantization (``qjax.ptq``), 8-bit optimizers (``qjax.optim``), checkpoints
and summaries.

``import qjax`` loads only the core (surrogates, formats, quantizers, QArray, packing, rotations, rules),
never Flax, Optax or Orbax: the front ends and the modules that need them (``linen``, ``nnx``, ``ptq``,
``optim``, ``checkpoint``, ``summary``, and the op-level core the front ends share: ``core``,
``interception``, ``discovery``, ``int_matmul``, ``serving``, ``machine``) are imported on first attribute
access (PEP 562 ``__getattr__``), so ``qjax.ptq.gptq`` works after a plain ``import qjax``.

``qjax.linen`` and ``qjax.nnx`` are left out of ``__all__`` so that ``from qjax import *`` never shadows
Flax's own ``nnx`` or ``linen``.
"""

import importlib

from qjax import formats, packing, presets, qat, rotation, rules, surrogates
from qjax.formats import FORMAT_NAMES, Format, dynamic_map, get_format
from qjax.granularity import PerBlock, PerChannel, PerGroup, PerTensor, PerToken
from qjax.qarray import QArray, dequantize
from qjax.quantizer import Quantizer, fake_quant, init_scale, quantize, relaxed_quant, scale_shape
from qjax.rotation import HADAMARD_ORDERS, Rotation, hadamard_matrix, hadamard_rotation, random_hadamard
from qjax.rules import Rule

__version__ = "0.1.0"

# Submodules imported on first access: the front ends and what needs Flax, Optax or Orbax, and the op-level
# core the front ends share (internal, reachable as attributes as before).
_LAZY_MODULES = ("checkpoint", "core", "discovery", "int_matmul", "interception", "linen", "machine", "nnx",
                 "optim", "ptq", "serving", "summary")

__all__ = [
    "FORMAT_NAMES",
    "HADAMARD_ORDERS",
    "Format",
    "PerBlock",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "QArray",
    "Quantizer",
    "Rotation",
    "Rule",
    "checkpoint",
    "dequantize",
    "dynamic_map",
    "fake_quant",
    "formats",
    "get_format",
    "hadamard_matrix",
    "hadamard_rotation",
    "init_scale",
    "optim",
    "packing",
    "presets",
    "ptq",
    "qat",
    "quantize",
    "random_hadamard",
    "relaxed_quant",
    "rotation",
    "rules",
    "scale_shape",
    "summary",
    "surrogates",
]


def __getattr__(name: str):
    """Import a lazily loaded submodule (``qjax.linen``, ``qjax.ptq``, ...) on first access (PEP 562)."""
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_MODULES))
