"""Post-training quantization: calibration, RTN, GPTQ, STE fine-tuning and PV-tuning (module docstrings).

Every method works on ``(model, variables, rules, batches)`` (:mod:`qjax.ptq.layers`) and returns frozen
variables whose quantized weights are packed :class:`~qjax.QArray`\\ s, ready for
``qjax.linen.quantize_model(model, rules).apply`` and :func:`qjax.summary.summary`.
"""

from qjax.ptq.calibration import Range, calibrate, input_scales
from qjax.ptq.capture import input_statistics
from qjax.ptq.distill import first_output, mse, teacher_targets
from qjax.ptq.gptq import gptq, gptq_layer, hessians
from qjax.ptq.layers import Layer, frozen_variables, quantized_layers
from qjax.ptq.pv import pv_tuning, requantize_subspace, top_tau_mask
from qjax.ptq.rtn import rtn
from qjax.ptq.ste import ste_finetune

__all__ = ["Layer", "Range", "calibrate", "first_output", "frozen_variables", "gptq", "gptq_layer",
           "hessians", "input_scales", "input_statistics", "mse", "pv_tuning", "quantized_layers",
           "requantize_subspace", "rtn", "ste_finetune", "teacher_targets", "top_tau_mask"]
