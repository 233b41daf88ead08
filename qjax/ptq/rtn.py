"""Round-to-nearest (RTN): every quantized weight rounded on its own grid, no data needed.

``W_q = s * (clip(round(W / s + z), lo, hi) - z)`` with the scale ``s`` (and zero point ``z``) of each
group given by the rule's quantizer (:func:`qjax.quantize`; one quantization per layer of a stacked
weight); the baseline every PTQ paper starts from (e.g. Frantar et al., "GPTQ", ICLR 2023, table 1;
Dettmers et al., "LLM.int8()", 2022).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax

from qjax.core import stacked_map
from qjax.ptq.layers import check_batches, weight
from qjax.ptq.model import model_view
from qjax.quantizer import quantize


def rtn(model, variables: Mapping | None, rules, batch: Mapping, *, apply_kwargs: Mapping | None = None):
    """Every weight a rule quantizes rounded to nearest (module docstring); returns the frozen model.

    Linen: ``rtn(model, variables, rules, batch)`` returns frozen variables (packed QArrays). NNX:
    ``rtn(model, None, rules, batch)`` quantizes and freezes the ``nnx.Module`` in place
    (:class:`qjax.nnx.PackedWeight` weights) and returns it. ``batch``: one sample input (its shapes tell
    which modules the rules match; no statistics are taken).
    """
    (batch,) = check_batches([batch], "rtn")
    view = model_view(model, variables, rules, batch, apply_kwargs, "rtn")
    qarrays = {layer.path: _round(layer.quantizer, layer.stacked, weight(view.params, layer))
               for layer in view.layers}
    return view.frozen(qarrays)


def _round(q, stacked: int, w):
    """``quantize(q, w)``, one quantization per layer of a stacked weight."""
    return quantize(q, w) if not stacked else _round_stacked(q, stacked, w)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _round_stacked(q, stacked: int, w):
    # one compilation per shape, not one per eager op under vmap
    return stacked_map(lambda v: quantize(q, v), stacked)(w)
