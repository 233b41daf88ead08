"""Activation-range calibration: the absmax of each quantized module's input over calibration batches.

For every module a rule quantizes (a ``weight`` or an ``input`` quantizer), :func:`calibrate` records, over
all non-padding tokens ``t`` of all calibration batches,

    ``absmax_k = max_t |x_{t,k}|`` (per input channel ``k``)   and   ``absmax = max_k absmax_k``,

the static ranges of post-training activation quantization (Jacob et al., "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018; Nagel et al., "A White Paper
on Neural Network Quantization", 2021, section 3.5). :func:`input_scales` turns them into the scale of each
module's ``input`` quantizer, ``s = absmax / fmax`` (:mod:`qjax.scales`' ``absmax`` rule), stored where
:class:`qjax.linen.QuantizedModel` reads a ``given``/``learned`` input scale: ``variables["quant"]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.linen import INPUT_KEY, set_path
from qjax.ptq.capture import input_statistics
from qjax.ptq.layers import check_batches, quantized_model
from qjax.quantizer import scale_shape


@dataclasses.dataclass(frozen=True)
class Range:
    """The calibrated range of one module's input: ``absmax`` (scalar) and ``channel_absmax`` ``(K,)``."""

    absmax: jax.Array
    channel_absmax: jax.Array


def _absmax_stat(rows: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.max(jnp.abs(rows) * (mask[:, None] > 0), axis=0)


def calibrate(model: nn.Module, variables: Mapping, rules, batches: Sequence[Mapping], *,
              token_mask: str | None = "attention_mask", apply_kwargs: Mapping | None = None
              ) -> dict[str, Range]:
    """``{module path: Range}`` for every module a rule matches, over all ``batches`` (module docstring).

    Padding tokens (``batch[token_mask] == 0``) are left out. The forward pass is jitted once.
    """
    batches = check_batches(batches, "calibrate")
    qmodel = quantized_model(model, rules)
    apply_kwargs = dict(apply_kwargs or {})
    table = qmodel.table(dict(variables), **batches[0], **apply_kwargs)
    modules = [e.path for e in table.values() if e.rule is not None]
    if not modules:
        raise ValueError(f"calibrate: no module matched the rules {[r.label for r in qmodel.rules]}")
    stats = input_statistics(qmodel.model, variables, batches, modules, _absmax_stat, jnp.maximum,
                             token_mask=token_mask, apply_kwargs=apply_kwargs)
    return {"/".join(p): Range(jnp.max(v), v) for p, v in stats.items()}


def input_scales(model: nn.Module, variables: Mapping, rules, ranges: Mapping[str, Range],
                 batch: Mapping, apply_kwargs: Mapping | None = None) -> dict:
    """``variables`` with a ``"quant"`` entry ``s = absmax / fmax`` for each module whose rule has an
    ``input`` quantizer with a ``given`` or ``learned`` scale (per tensor, or per channel along the
    last axis), so ``quantize_model(model, rules).apply`` quantizes inputs with the calibrated ranges."""
    qmodel = quantized_model(model, rules)
    table = qmodel.table(dict(variables), **batch, **dict(apply_kwargs or {}))
    quant = dict(variables.get("quant", {}))
    for name, entry in table.items():
        q = entry.rule.input if entry.rule is not None else None
        if q is None or q.scale not in ("given", "learned"):
            continue
        if name not in ranges:
            raise ValueError(f"input_scales: no calibrated range for module {name!r}; calibrated: "
                             f"{sorted(ranges)[:20]}")
        r = ranges[name]
        k = r.channel_absmax.shape[0]
        shape = scale_shape(q, (1, k))
        if shape == (1, 1):
            value = r.absmax
        elif shape == (1, k):
            value = r.channel_absmax
        else:
            raise ValueError(f"input_scales: {q.granularity} on module {name!r} has no static range; "
                             "allowed: PerTensor() or PerChannel(-1) input quantizers")
        scale = jnp.maximum(value, jnp.finfo(jnp.float32).tiny) / q.fmt.max_abs
        quant = set_path(quant, (*entry.path, INPUT_KEY), scale.reshape(shape))
    return {**variables, "quant": quant}

