"""Round-to-nearest (RTN): every quantized weight rounded on its own grid, no data needed.

``W_q = s * (clip(round(W / s + z), lo, hi) - z)`` with the scale ``s`` (and zero point ``z``) of each
group given by the rule's quantizer (:func:`qjax.quantize`); the baseline every PTQ paper starts from
(e.g. Frantar et al., "GPTQ", ICLR 2023, table 1; Dettmers et al., "LLM.int8()", 2022).
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn

from qjax.ptq.layers import check_batches, frozen_variables, quantized_layers, quantized_model, weight
from qjax.quantizer import quantize


def rtn(model: nn.Module, variables: Mapping, rules, batch: Mapping, *,
        apply_kwargs: Mapping | None = None) -> dict:
    """Frozen variables with every weight a rule quantizes rounded to nearest (module docstring).

    ``batch``: one sample input (its shapes tell which modules the rules match; no statistics are taken).
    """
    (batch,) = check_batches([batch], "rtn")
    qmodel = quantized_model(model, rules)
    layers = quantized_layers(qmodel, variables, batch, apply_kwargs)
    params = variables["params"]
    qarrays = {layer.path: quantize(layer.quantizer, weight(params, layer)) for layer in layers}
    return frozen_variables(variables, layers, qarrays)
