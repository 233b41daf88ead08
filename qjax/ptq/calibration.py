"""Activation-range calibration: the absmax of each quantized module's input over calibration batches.

For every module a rule quantizes (a ``weight`` or an ``input`` quantizer), :func:`calibrate` records, over
all non-padding tokens ``t`` of all calibration batches,

    ``absmax_k = max_t |x_{t,k}|`` (per input channel ``k``)   and   ``absmax = max_k absmax_k``,

the static ranges of post-training activation quantization (Jacob et al., "Quantization and Training of
Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR 2018; Nagel et al., "A White Paper
on Neural Network Quantization", 2021, section 3.5). :func:`input_scales` turns them into the scale of each
module's ``input`` quantizer, ``s = absmax / fmax`` (:mod:`qjax.scales`' ``absmax`` rule), stored where
the front end reads a ``given``/``learned`` input scale: ``variables["quant"]`` (Linen,
:class:`qjax.linen.QuantizedModel`), or the module's ``input_qscale`` :class:`qjax.nnx.QuantScale` (NNX).

The input is the one the module's weight contraction receives (:mod:`qjax.ptq.capture`), which for a
Dense-like layer is its call's input. Linen: ``calibrate(model, variables, rules, batches)``; NNX:
``calibrate(model, None, rules, batches)`` with ``model`` an ``nnx.Module``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax.ptq.capture import statistics
from qjax.ptq.layers import check_batches, check_token_mask
from qjax.ptq.model import model_view
from qjax.quantizer import scale_shape
from qjax.scales import TINY


@dataclasses.dataclass(frozen=True)
class Range:
    """The calibrated range of one module's input: ``absmax`` (scalar) and ``channel_absmax`` ``(K,)``."""

    absmax: jax.Array
    channel_absmax: jax.Array


def _absmax_stat(rows: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.max(jnp.where(mask[:, None] > 0, jnp.abs(rows), 0.0), axis=0)


def calibrate(model, variables: Mapping | None, rules, batches: Sequence[Mapping], *,
              token_mask: str | None = "attention_mask", apply_kwargs: Mapping | None = None
              ) -> dict[str, Range]:
    """``{module path: Range}`` for every module a rule gives a weight or an input quantizer, over all
    ``batches`` (module docstring).

    ``model``/``variables``: a Linen module and its variables, or an NNX module and ``None``. Padding
    tokens (``batch[token_mask] == 0``) are left out; batches whose every token is masked, and inputs
    holding NaN or inf (outside the padding), are a ``ValueError``. The forward pass is jitted once.
    """
    batches = check_batches(batches, "calibrate")
    check_token_mask(batches, token_mask, "calibrate")
    view = model_view(model, variables, rules, batches[0], apply_kwargs, "calibrate")
    modules = [e.path for e in view.table.values()
               if e.rule is not None and (e.rule.weight is not None or e.rule.input is not None)]
    if not modules:
        raise ValueError(f"calibrate: no module matched the rules {[r.label for r in view.rules]}")
    stats = statistics(view, view.params, batches, modules, _absmax_stat, jnp.maximum, token_mask=token_mask)
    for path, v in stats.items():
        bad = np.flatnonzero(~np.isfinite(np.asarray(v)))
        if bad.size:
            raise ValueError(f"calibrate: the inputs of module {'/'.join(path)!r} hold NaN or inf on the "
                             f"calibration batches (channels {bad[:8].tolist()}); allowed: finite inputs")
    return {"/".join(p): Range(jnp.max(v), v) for p, v in stats.items()}


def input_scales(model, variables: Mapping | None, rules, ranges: Mapping[str, Range], batch: Mapping,
                 apply_kwargs: Mapping | None = None):
    """The model with the scale ``s = absmax / fmax`` of each module whose rule has an ``input`` quantizer
    with a ``given`` or ``learned`` scale (per tensor, or per channel along the last axis), so the
    quantized model quantizes inputs with the calibrated ranges.

    Linen: returns ``variables`` with a ``"quant"`` entry per module (for
    ``quantize_model(model, rules).apply``). NNX (``variables=None``): quantizes ``model`` in place by the
    rules (:func:`qjax.nnx.quantize_model` with ``batch`` as its example input) unless it is quantized
    already, sets each module's ``input_qscale``, and returns ``model``; a later PTQ method keeps them.

    No zero scale is ever stored: a channel that was 0 on every calibration token takes its module's
    ``absmax`` (the range of its other channels), and a module whose every input was 0 takes the floor
    ``s = TINY`` (:data:`qjax.scales.TINY`, the smallest normal float32, as the ``absmax`` rule does): each
    scale is ``max(absmax / fmax, TINY)``. A NaN/inf range is a ``ValueError`` (under a trace, where it
    cannot be checked, it stores ``s = TINY``, as the ``absmax`` rule floors a zero range).
    """
    view = model_view(model, variables, rules, batch, apply_kwargs, "input_scales")
    scales = {}
    for name, entry in view.table.items():
        q = entry.rule.input if entry.rule is not None else None
        if q is None or q.scale not in ("given", "learned"):
            continue
        if name not in ranges:
            raise ValueError(f"input_scales: no calibrated range for module {name!r}; calibrated: "
                             f"{sorted(ranges)[:20]}")
        r = ranges[name]
        if not isinstance(r, Range):
            raise TypeError(f"input_scales: ranges[{name!r}] is a {type(r).__name__}; allowed: a "
                            "qjax.ptq.Range, as calibrate returns")
        k = r.channel_absmax.shape[0]
        shape = scale_shape(q, (1, k))
        if shape == (1, 1):
            value = r.absmax
        elif shape == (1, k):
            value = r.channel_absmax
        else:
            raise ValueError(f"input_scales: {q.granularity} on module {name!r} has no static range; "
                             "allowed: PerTensor() or PerChannel(-1) input quantizers")
        scales[entry.path] = _scale(name, value, r.absmax, q.fmt.max_abs).reshape(shape)
    return view.with_input_scales(scales)


def _scale(name: str, absmax: jax.Array, module_absmax: jax.Array, fmax: float) -> jax.Array:
    """``max(a / fmax, TINY)`` with ``a`` the channel's absmax, its module's where that is 0; a NaN/inf
    range raises when concrete, else takes ``TINY`` (:func:`input_scales`)."""
    if not isinstance(absmax, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(absmax))):
        raise ValueError(f"input_scales: the calibrated range of module {name!r} holds NaN or inf "
                         f"({np.asarray(absmax).ravel()[:4]}); allowed: finite ranges (from finite inputs)")
    a = jnp.where(absmax > 0, absmax, module_absmax)
    return jnp.where(jnp.isfinite(a), jnp.maximum(a / fmax, TINY), TINY)
