"""Post-training quantization: calibration, RTN, GPTQ, SmoothQuant, AWQ, STE fine-tuning and PV-tuning
(module docstrings).

Every method takes ``(model, variables, rules, batches)`` (:mod:`qjax.ptq.layers`) and is written once over
one functional view of the model (:mod:`qjax.ptq.model`), so it runs on Linen and NNX models alike:

- **Linen**: ``model`` a ``flax.linen.Module`` (or a :class:`qjax.linen.QuantizedModel`), ``variables`` its
  variables. A method returns frozen variables whose quantized weights are packed :class:`~qjax.QArray`\\ s,
  ready for ``qjax.linen.quantize_model(model, rules).apply`` and :func:`qjax.summary.summary`;
  ``variables`` is not changed. ``frozen = ptq.gptq(module, variables, rules, batches)``.
- **NNX**: ``model`` an ``nnx.Module`` and ``variables=None``. A method quantizes the model in place by
  the rules (:func:`qjax.nnx.quantize_model`, the first batch as example input) and freezes it: each
  quantized weight becomes a :class:`qjax.nnx.PackedWeight` holding the QArray the method found, so the
  model runs its packed path; it returns the model. ``ptq.gptq(model, None, rules, batches); model(**x)``.
  The model may start float, quantized or frozen; it is not changed before the result is ready.

``ste_finetune`` and ``pv_tuning`` return ``(frozen model, losses)``; their ``teacher`` is the float
variables (Linen) or a float ``nnx.Module`` (NNX). ``calibrate``, ``hessians`` and ``input_statistics``
return statistics; ``input_scales`` returns the variables (Linen) or the model quantized in place (NNX)
with the calibrated input scales. Inputs are captured at each weight contraction through qjax's op-level
interception (:mod:`qjax.ptq.capture`).

``rotate_residual(model, variables, layout, key=...)`` (:mod:`qjax.ptq.residual_rotation`) runs before a
method: QuaRot's offline rotation of a pre-RMSNorm decoder's residual stream, folded into the float weights
(:class:`ResidualLayout` says which parameters read and write the stream; :data:`LLAMA_LAYOUT` for Tunix's
Llama 3 / Qwen 2 / Qwen 3); it returns the rotated float variables (Linen) or rotates the model in place
(NNX).
"""

from qjax.ptq.binary_stacks import BinaryStacks, bitstack_layer
from qjax.ptq.calibration import Range, calibrate, input_scales
from qjax.ptq.capture import input_statistics
from qjax.ptq.distill import first_output, mse, teacher_targets
from qjax.ptq.folding import InputGroup, SmoothingPlan
from qjax.ptq.gptq import gptq, gptq_layer, hessians
from qjax.ptq.layers import Layer, frozen_variables, quantized_layers
from qjax.ptq.pb_llm import PBLayer, pb_llm_layer
from qjax.ptq.ptqtp import ptqtp_dequantize, ptqtp_layer
from qjax.ptq.pv import pv_tuning, requantize_subspace, top_tau_mask
from qjax.ptq.residual_layout import LLAMA_LAYOUT, ResidualLayout
from qjax.ptq.residual_rotation import rotate_residual
from qjax.ptq.rtn import rtn
from qjax.ptq.smoothing import awq, hadamard, smoothing_plan, smoothquant
from qjax.ptq.squeeze_llm import SqueezeLayer, squeeze_llm_layer
from qjax.ptq.ste import ste_finetune

__all__ = ["LLAMA_LAYOUT", "BinaryStacks", "InputGroup", "Layer", "PBLayer", "Range", "ResidualLayout",
           "SmoothingPlan", "SqueezeLayer", "awq", "bitstack_layer", "calibrate",
           "first_output", "frozen_variables", "gptq", "gptq_layer", "hadamard", "hessians", "input_scales",
           "input_statistics", "mse", "pb_llm_layer", "ptqtp_dequantize", "ptqtp_layer", "pv_tuning",
           "quantized_layers", "requantize_subspace", "rotate_residual", "rtn", "smoothing_plan",
           "smoothquant", "squeeze_llm_layer", "ste_finetune", "teacher_targets", "top_tau_mask"]
