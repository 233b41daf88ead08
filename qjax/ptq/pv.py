"""PV-tuning: fine-tune a quantized model by alternating a continuous P step and a discrete V step.

Malinovskii, Mazur, Ilin, Kuznedelev, Burlachenko, Yi, Alistarh, Richtarik, "PV-Tuning: Beyond Straight-
Through Estimation for Extreme LLM Compression", NeurIPS 2024 (reference code Vahe1994/AQLM,
``src/pv_optimizer.py``). A quantized weight is a partition, its integer codes ``c``, plus values, its
scales ``s`` and zero points ``z``: ``W_q = s * (c - z)`` per group (:func:`qjax.dequantize`).

- **P step** (codes fixed): Adam (lr 3e-4, betas (0.9, 0.95)) on ``s``, ``z`` and every parameter the
  rules leave float, with the exact gradient through dequantization, ``dL/ds = sum_group dL/dW_q * (c - z)``:
  no straight-through estimator.
- **V step**, linearized subspace ("PV + STE", the paper's best variant): a float buffer ``B`` (initially
  ``W_q``, kept between steps) takes a normalized step along ``g = dL/dW_q``, LAMB-style (Adam second moment
  with beta1 0, beta2 0.95, step ``lr * (||B|| / ||u||) * u``, lr 1e-2); then only the top ``tau`` fraction
  (0.01) of entries by ``(B - W_q)^2``, per weight, are re-rounded to the grid,
  ``c = clip(round(B / s + z), lo, hi)`` (the rule's own rounding, :func:`qjax.quantize` with the scale
  given), so at most ``ceil(tau * size)`` codes of a weight change per V step and codes never leave the grid.

The loss is the teacher-student MSE of :mod:`qjax.ptq.distill`. One forward-backward per step gives both
gradients (``dL/dW_q`` through an added zero ``delta``) of the float model run with the dequantized weights
(:mod:`qjax.ptq.model`, Linen or NNX). Input quantizers of the rules are not in that loss (qjax has no
input-only quantization of a contraction to run it with): at W8A8 / W4A4 the codes are tuned for the
weights' error alone, and the frozen model quantizes its inputs as the rules say. The whole step is one
jitted function. ``keep_best`` (default): the tuned codes and scales are kept only if their loss over all
calibration batches is below the start's, else the start is returned (PV's steps are
normalized, Adam's and LAMB's: from a start that is nearly exact, 8-bit GPTQ, they can only add error; on
the quick Tunix Llama3 at W8A8 the loss rose from 5e-6 to 1e-3 in 100 steps).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

from qjax.ptq.distill import (
    OutputFn,
    check_learning_rate,
    checked_batches,
    first_output,
    mse,
    run_steps,
    view_targets,
)
from qjax.ptq.layers import Layer, Path, weight, with_weights
from qjax.ptq.model import model_view
from qjax.qarray import QArray, dequantize, unpack
from qjax.quantizer import Quantizer, quantize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PVState:
    """Everything PV-tuning updates: the continuous group (``floats``: params with the quantized weights
    taken out; ``scales``: ``{name: (s, z)}``), the codes, the V buffers and both optimizer states."""

    floats: dict
    scales: dict
    codes: dict
    buffers: dict
    p_state: optax.OptState
    v_state: optax.OptState


def _check_tau(tau, who: str) -> None:
    if isinstance(tau, bool) or not isinstance(tau, int | float) or not 0 < tau <= 1:
        raise ValueError(f"{who}: tau={tau!r} must be in (0, 1]; the paper uses 0.01")


def top_tau_mask(score: jax.Array, tau: float) -> jax.Array:
    """Boolean mask of the ``ceil(tau * size)`` largest entries of ``score`` (ties broken by position);
    ``tau`` a Python float in ``(0, 1]``."""
    _check_tau(tau, "top_tau_mask")
    k = max(1, math.ceil(tau * score.size))
    _, idx = jax.lax.top_k(score.reshape(-1), k)
    return jnp.zeros(score.size, bool).at[idx].set(True).reshape(score.shape)


def requantize_subspace(qa: QArray, buffer: jax.Array, tau: float) -> QArray:
    """The V step's discrete update of one weight: re-round the top ``tau`` fraction of entries by
    ``(B - W_q)^2`` to the grid with ``qa``'s scales, ``c = clip(round(B / s + z), lo, hi)``;
    keep the rest."""
    qa = unpack(qa)
    if jnp.shape(buffer) != qa.shape:
        raise ValueError(f"requantize_subspace: buffer has shape {jnp.shape(buffer)}; allowed: {qa.shape}, "
                         "the QArray's shape")
    current = dequantize(qa).astype(jnp.float32)
    given = _quantizer_of(qa)
    rounded = quantize(given, buffer.astype(jnp.float32), scale=qa.scale, zero_point=qa.zero_point).codes
    mask = top_tau_mask(jnp.square(buffer - current), tau)
    return dataclasses.replace(qa, codes=jnp.where(mask, rounded, qa.codes))


def _quantizer_of(qa: QArray) -> Quantizer:
    return Quantizer(qa.format, qa.granularity, "given")


def _split(params: Mapping, layers: Sequence[Layer], qarrays: Mapping[Path, QArray]):
    floats = with_weights(params, {layer.path: None for layer in layers})
    scales = {layer.name: (qarrays[layer.path].scale, qarrays[layer.path].zero_point) for layer in layers}
    codes = {layer.name: qarrays[layer.path].codes for layer in layers}
    return floats, scales, codes


def _qarrays(layers: Sequence[Layer], templates: Mapping[Path, QArray], scales, codes) -> dict[Path, QArray]:
    return {layer.path: dataclasses.replace(templates[layer.path], codes=codes[layer.name],
                                            scale=scales[layer.name][0], zero_point=scales[layer.name][1])
            for layer in layers}


def pv_tuning(model, variables: Mapping | None, rules, batches: Sequence[Mapping], *,
              teacher=None, steps: int = 100, p_learning_rate: float = 3e-4,
              v_learning_rate: float = 1e-2, tau: float = 0.01, output_fn: OutputFn = first_output,
              apply_kwargs: Mapping | None = None, progress: Callable | None = None,
              keep_best: bool = True):
    """PV-tuning (module docstring); returns ``(frozen model, per-step losses)``.

    Linen: ``pv_tuning(model, variables, rules, batches)``; ``variables`` frozen variables to start from
    (e.g. :func:`qjax.ptq.gptq`'s) or float ones (then rounded to nearest), ``teacher`` the float model's
    variables (default: ``variables`` if float); returns frozen variables. NNX:
    ``pv_tuning(model, None, rules, batches)``; ``model`` frozen (e.g. by :func:`qjax.ptq.gptq`) or float,
    ``teacher`` a float ``nnx.Module`` of the same structure (default: ``model`` if float); ``model`` is
    frozen in place with the tuned codes and scales (:class:`qjax.nnx.PackedWeight`) and returned.
    Each step is one P step and one V step on one batch; all batches must share their shapes.
    ``keep_best``: return the start instead when tuning did not lower the loss over all the batches
    (module docstring).
    """
    batches = checked_batches(batches, steps, "pv_tuning")
    _check_tau(tau, "pv_tuning")
    check_learning_rate("pv_tuning", p_learning_rate=p_learning_rate, v_learning_rate=v_learning_rate)
    view = model_view(model, variables, rules, batches[0], apply_kwargs, "pv_tuning")
    layers = view.layers
    params = view.params
    templates = {}
    for layer in layers:
        if layer.stacked:
            raise ValueError(f"pv_tuning: {layer.name} stacks {layer.stacked} layer axis (run by scan); "
                             "allowed: unstacked weights (exclude it by rule)")
        w = view.frozen_start.get(layer.path)
        if w is None:
            w = quantize(layer.quantizer, weight(params, layer))
        if w.fmt.kind not in ("int", "ternary") or w.bases != 1:
            raise ValueError(f"pv_tuning: {layer.name} has format {w.format!r}; allowed: scalar integer "
                             "grids (int2..int8, uint2..uint8, ternary)")
        templates[layer.path] = unpack(w)
    if teacher is None and any(layer.path in view.frozen_start for layer in layers):
        raise ValueError("pv_tuning: the model is already quantized; pass teacher= (the float "
                         f"{'variables' if view.front_end == 'linen' else 'nnx.Module'})")
    targets = view_targets(view.teacher(teacher), batches, output_fn)

    p_opt = optax.adam(p_learning_rate, b1=0.9, b2=0.95)
    v_opt = optax.lamb(v_learning_rate, b1=0.0, b2=0.95, weight_decay=0.0)

    def loss_fn(continuous, deltas, codes, rest, batch, target):
        floats, scales = continuous
        qarrays = _qarrays(layers, templates, scales, codes)
        values = {layer.path: dequantize(qarrays[layer.path]) + deltas[layer.name] for layer in layers}
        out = view.apply(with_weights(floats, values), rest, batch)
        return mse(output_fn(out, batch), target)

    @jax.jit
    def step(state: PVState, rest, batch, target):
        deltas = jax.tree_util.tree_map(jnp.zeros_like, state.buffers)
        loss, (g_cont, g_w) = jax.value_and_grad(loss_fn, argnums=(0, 1))(
            (state.floats, state.scales), deltas, state.codes, rest, batch, target)
        # P step: the continuous parameters, codes fixed.
        cont = (state.floats, state.scales)
        updates, p_state = p_opt.update(g_cont, state.p_state, cont)
        floats, scales = optax.apply_updates(cont, updates)
        # V step: the buffer takes a LAMB step, then the top-tau entries are re-rounded.
        updates, v_state = v_opt.update(g_w, state.v_state, state.buffers)
        buffers = optax.apply_updates(state.buffers, updates)
        qarrays = _qarrays(layers, templates, scales, state.codes)
        codes = {layer.name: requantize_subspace(qarrays[layer.path], buffers[layer.name], tau).codes
                 for layer in layers}
        return PVState(floats, scales, codes, buffers, p_state, v_state), loss

    floats, scales, codes = _split(params, layers, templates)
    buffers = {layer.name: dequantize(templates[layer.path]).astype(jnp.float32) for layer in layers}
    state = PVState(floats, scales, codes, buffers, p_opt.init((floats, scales)), v_opt.init(buffers))
    start = state
    rest = view.rest
    state, losses = run_steps(lambda s, b, t: step(s, rest, b, t), state, batches, targets, steps, progress)
    if keep_best:
        calibration_loss = jax.jit(lambda s, b, t: loss_fn((s.floats, s.scales), jax.tree_util.tree_map(
            jnp.zeros_like, s.buffers), s.codes, rest, b, t))

        def total(s):
            return sum(float(calibration_loss(s, b, t)) for b, t in zip(batches, targets, strict=True))

        if total(state) >= total(start):
            state = start
    final = _qarrays(layers, templates, state.scales, state.codes)
    floats = with_weights(state.floats, {p: dequantize(q) for p, q in final.items()})
    return view.frozen(final, floats), losses
