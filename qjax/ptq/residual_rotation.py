"""QuaRot's offline rotation of a pre-RMSNorm decoder's residual stream, folded into the float weights.

A pre-norm decoder keeps a residual stream ``x (tokens, D)``: the embedding writes it, every block reads it
through an RMSNorm (``n(x) = g * x / rms(x)``, ``rms(x) = sqrt(mean(x^2) + eps)``) and adds its attention
output projection's and MLP down projection's outputs to it, and the head reads it through the final norm.
For an orthogonal ``Q``, ``rms(x Q) = rms(x)``, so with the norm's scale folded out (``g = 1``)
``n(x Q) = n(x) Q``: the whole stream can be carried rotated, ``x -> x Q``, with no op added at run time
(Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", 2024, section 4.1; Liu et al.,
"SpinQuant: LLM Quantization with Learned Rotations", 2024, rotation ``R1``; the scale folding is
SliceGPT's, Ashkboos et al., 2024). :func:`rotate_residual` rewrites the weights:

1. **fold** each norm's scale into the linears that read its output: ``W <- diag(g) W``, ``g <- 1``
   (exact: ``(g * u) W = u (diag(g) W)``); a norm computing ``(1 + w) * x / rms(x)`` (Gemma) folds
   ``1 + w`` and gets ``w <- 0``;
2. **rotate**: the embedding table ``E <- E Q`` (its rows are residual vectors), every linear reading the
   stream through a norm ``W <- Q^T W`` (on its input axis), every linear writing into it ``W <- W Q``
   and its bias ``b <- b Q`` (on its output axis), the head ``W <- Q^T W`` (after the final norm's fold).

The float model computes the same function (to float rounding), but its residual activations, and so the
inputs of the linears reading them, have their outlier channels spread over all ``D`` channels: the
linears reading the stream then quantize at W4A4 with a much smaller error. ``Q`` is a randomized Hadamard
``diag(s) H / sqrt(D)`` (:func:`qjax.random_hadamard`, signs from ``key``; block-diagonal where ``D`` has
no Hadamard construction), formed once as a dense ``(D, D)`` matrix (:meth:`qjax.Rotation.matrix`) and
multiplied into each weight at full float32 precision: nothing is added to the model's forward pass.

The linears whose inputs are *not* the stream (attention's output projection reads the attention values,
the down projection the MLP's hidden activations) keep their outliers; QuaRot rotates those inputs online.
After :func:`rotate_residual`, :func:`qjax.ptq.hadamard` does that for every layer its rules quantize
(redundant, but harmless, for the readers: their inputs are rotated already); any other PTQ method
(:func:`qjax.ptq.gptq`, :func:`qjax.ptq.rtn`) runs on the rotated float model as on any float model.

Which parameters are what is a :class:`ResidualLayout` of path regexes over the parameter paths
(``"layers/0/attn/q_proj/w"``: the module path and the parameter name, ``/``-joined, as
:class:`qjax.Rule` paths are, matched with ``re.fullmatch``), not model-specific code.
:data:`LLAMA_LAYOUT` describes Tunix's Llama 3, Qwen 2 and Qwen 3 (dense and MoE) models.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax.linen import unbox
from qjax.ptq.layers import check_batches, with_weights
from qjax.ptq.model import model_view
from qjax.ptq.residual_layout import (
    WHO,
    Norm,
    Plan,
    ResidualLayout,
    check_layout,
    flatten_params,
    make_plan,
    refuse_quantized,
    stream_axis,
)
from qjax.rotation import random_hadamard


def rotate_residual(model: nn.Module | nnx.Module, variables: Mapping | None, layout: ResidualLayout, *,
                    key: jax.Array, batch: Mapping | None = None, rtol: float = 1e-4,
                    apply_kwargs: Mapping | None = None) -> dict | nnx.Module:
    """QuaRot's offline residual-stream rotation (module docstring): the float model with ``Q`` folded in.

    With ``Q`` = :func:`qjax.random_hadamard` ``(D, key)`` (``D`` the embedding width) and each norm's
    effective scale ``g``: ``E <- E Q``; each norm's readers ``W <- Q^T diag(g) W`` and ``g <- 1``; each
    writer ``W <- W Q``, ``b <- b Q``; the head ``W <- Q^T diag(g_final) W``. Since ``rms(x Q) = rms(x)``,
    the rotated model's output equals the original's up to float rounding (Ashkboos et al., "QuaRot:
    Outlier-Free 4-Bit Inference in Rotated LLMs", 2024; Liu et al., "SpinQuant", 2024), and its residual
    stream is ``x Q``: no outlier channels for the readers' input quantizers. Run any PTQ method on the
    result (:func:`qjax.ptq.gptq`, :func:`qjax.ptq.rtn`; :func:`qjax.ptq.hadamard` to rotate the other
    layers' inputs online as well).

    Args:
      model: a float ``flax.linen.Module`` with its ``variables``, or a float ``nnx.Module`` with
        ``variables=None`` (not quantized, not frozen: rotate first, then quantize).
      layout: which parameters are the embedding, the norms and their readers, the writers and the head
        (:class:`ResidualLayout`; :data:`LLAMA_LAYOUT` for Tunix's Llama 3 / Qwen 2 / Qwen 3).
      key: the PRNG key of ``Q``'s random signs.
      batch: an example input (a dict of arrays passed as ``model(**batch)``). When given, the rotated
        model is run on it and its outputs must equal the original's within ``rtol`` (``max |rotated -
        original| / max |original|`` per output array), else ``ValueError`` naming the largest difference:
        a wrong layout must not give a silently different model. Required for Linen, whose norm modules
        exist only during a forward pass.
      rtol: the tolerance of that check (float32 rounding is ~1e-6; use ~3e-2 for bfloat16 models).
      apply_kwargs: static keyword arguments of the model call (``deterministic=True``).

    Each norm is probed before anything changes: called on a probe input with its scale parameter at 0 and
    at 1 (so a ``g * x / rms`` scale and Gemma's ``(1 + w) * x / rms`` both fold), it must compute ``g * u``
    with ``u(x Q) = u(x) Q``; a LayerNorm (mean subtraction, bias) fails that and is refused (convert it
    first, as SliceGPT does). Stacked (``scan``-ned) layers are not supported: norm scales must be ``(D,)``.

    Returns: Linen: new variables (``variables`` is not changed; partitioning boxes kept). NNX: ``model``
    itself, its Params updated in place (after every check has passed; on an error it is unchanged).
    """
    check_layout(layout)
    if not isinstance(rtol, int | float) or isinstance(rtol, bool) or not 0 < rtol < 1:
        raise ValueError(f"{WHO}: rtol={rtol!r}; allowed: a float in (0, 1), e.g. 1e-4 for float32 models")
    if batch is not None:
        (batch,) = check_batches([batch], WHO)
    view = model_view(model, variables, (), batch or {}, apply_kwargs, WHO)
    if view.front_end == "linen" and batch is None:
        raise ValueError(f"{WHO}: a Linen model needs batch= (one example input): its norm modules exist "
                         "only during a forward pass, and each is probed before it is folded")
    refuse_quantized(view, model, variables)
    flat = dict(flatten_params(view.params))
    plan = make_plan(layout, flat)
    q = random_hadamard(plan.width, key).matrix()  # Q (D, D), float32
    norm_fns = _linen_norms(view, batch, plan) if view.front_end == "linen" else _nnx_norms(model, plan)
    folds = {norm.path: _probe(norm, norm_fns[norm.module], flat[norm.path], q) for norm in plan.norms}

    new = {}
    for path in plan.embeddings:
        new[path] = _rotate_axis(q, flat[path], None, np.ndim(flat[path]) - 1)
    for norm in plan.norms:
        g, unit = folds[norm.path]
        if norm.readers:
            new[norm.path] = jnp.full_like(flat[norm.path], unit)
        elif float(jnp.max(jnp.abs(g - g[0]))) > 1e-6 * max(float(jnp.max(jnp.abs(g))), 1e-30):
            head = ("layout.head is None" if layout.head is None
                    else f"layout.head = {layout.head!r} matches no parameter")
            raise ValueError(
                f"{WHO}: the final norm {norm.path!r} has a non-uniform scale (effective values from "
                f"{float(jnp.min(g)):.4g} to {float(jnp.max(g)):.4g}) and no head to fold it into ({head}: "
                "is the head tied to the embedding, logits = n(x) E^T?); diag(g) does not commute with Q, so "
                "the rotation would change the model; allowed: an untied head (name it in layout.head), or "
                "a uniform final-norm scale")
        for reader in norm.readers:
            new[reader] = _rotate_axis(q, flat[reader], g, stream_axis(flat[reader], plan.width, first=True))
    for path in plan.writers:
        new[path] = _rotate_axis(q, flat[path], None, stream_axis(flat[path], plan.width, first=False))

    params = with_weights(view.params, {tuple(p.split("/")): v for p, v in new.items()})
    if batch is not None:
        run = jax.jit(view.apply)
        _compare(run(view.params, view.rest, batch), run(params, view.rest, batch), rtol)
    if view.front_end == "linen":
        return {**variables, "params": params}
    nnx.update(model, params)
    return model


# --------------------------------------------------------------------------------------------- norms

NormFn = Callable[[jax.Array, jax.Array], jax.Array]
"""``(scales (k, D), xs (k, rows, D)) -> (k, rows, D)``: the norm run ``k`` times, its scale parameter set to
``scales[i]`` for the input ``xs[i]``."""


@functools.partial(jax.jit, static_argnums=(0, 3))
def _nnx_norm_calls(graphdef, pure: dict, rest, name: str, scales: jax.Array, xs: jax.Array) -> jax.Array:
    # one compilation per norm class and shape (equal graph definitions hash alike), not one per layer
    return jax.vmap(lambda s, x: nnx.merge(graphdef, {**pure, name: s}, rest)(x))(scales, xs)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _linen_norm_calls(module: nn.Module, params: dict, name: str, scales: jax.Array, xs: jax.Array):
    return jax.vmap(lambda s, x: module.apply({"params": {**params, name: s}}, x))(scales, xs)


def _nnx_norms(model: nnx.Module, plan: Plan) -> dict[str, NormFn]:
    modules = {"/".join(str(p) for p in path): m for path, m in nnx.iter_modules(model)}
    out = {}
    for norm in plan.norms:
        module = modules.get(norm.module)
        if module is None:
            raise ValueError(f"{WHO}: norm scale {norm.path!r} is not a parameter of a module of its own "
                             f"(no module {norm.module!r}); allowed: the scale Param of a norm module")
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        out[norm.module] = functools.partial(_nnx_norm_calls, graphdef, nnx.to_pure_dict(params), rest,
                                             norm.param)
    return out


def _linen_norms(view, batch: Mapping, plan: Plan) -> dict[str, NormFn]:
    """Each norm module as an unbound clone, caught while the model traces on ``batch``."""
    wanted, found = {n.module for n in plan.norms}, {}

    def catch(next_fun, args, kwargs, context):
        module = context.module
        path = "/".join(module.scope.path) if module.scope is not None else None
        if context.method_name == "__call__" and path in wanted and path not in found:
            found[path] = module.clone(parent=None, name=None)  # equal norms compile once
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(catch):
        jax.eval_shape(view.apply, view.params, view.rest, batch)
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"{WHO}: norm modules {missing[:8]} were not called on batch; allowed: norm "
                         "scales of modules the model calls")
    return {norm.module: functools.partial(_linen_norm_calls, found[norm.module],
                                           dict(_module_params(view.params, norm.module)), norm.param)
            for norm in plan.norms}


def _module_params(params: Mapping, module: str) -> Mapping:
    for part in module.split("/") if module else ():
        params = params[part]
    return jax.tree.map(unbox, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def _snap(v: np.ndarray, tol: float) -> np.ndarray:
    """``v`` with the entries within ``tol`` of an integer set to it (the probe's 0 and 1)."""
    return np.where(np.abs(v - np.round(v)) <= tol, np.round(v), v)


def _relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def _probe(norm: Norm, call: NormFn, scale: jax.Array, q: jax.Array) -> tuple[jax.Array, float]:
    """``(g, unit)``: the norm's effective per-channel scale ``g`` (the fold factor) and the value of its
    scale parameter at which ``g = 1``, from calls on a probe input ``x`` with the scale at its value, 0 and
    1 (``g = a + b w``: ``a`` and ``b`` from those calls); ``ValueError`` unless the norm is ``g * u(x)``
    with ``u(x Q) = u(x) Q`` (checked with the scale at ``unit``; ``q`` is ``Q``). The arithmetic is numpy
    float64 on the host: no compilation per norm but the norm's own."""
    width = scale.shape[0]
    x = 100.0 * (np.random.default_rng(0).standard_normal((16, width)) + 2.0)  # large: eps is negligible
    x = np.where(np.abs(x) < 1.0, 1.0, x)  # no division by ~0 below
    rms = np.sqrt(np.mean(x**2, axis=-1, keepdims=True))

    def run(values: Sequence, xs: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
        scales = np.stack([np.broadcast_to(np.asarray(v, np.float64), scale.shape) for v in values])
        scales = jnp.asarray(scales, scale.dtype)
        try:
            y = call(scales, jnp.asarray(np.stack(xs), jnp.float32))
        except Exception as err:  # a module that is not callable as norm(x): name it
            raise ValueError(f"{WHO}: norm {norm.module!r} (scale {norm.path!r}) could not be called as "
                             f"norm(x) on an input of shape {x.shape}: {type(err).__name__}: {err}") from err
        if not hasattr(y, "shape") or y.shape != (len(xs), *x.shape):
            raise ValueError(f"{WHO}: norm {norm.module!r} returned {getattr(y, 'shape', type(y))} for "
                             f"{len(xs)} inputs of shape {x.shape}; allowed: a norm over the last axis")
        return np.asarray(y, np.float64), max(1e-4, 16 * float(jnp.finfo(y.dtype).eps))

    (y, at0, at1), tol = run([scale, 0.0, 1.0], [x, x, x])

    def effective(y: np.ndarray) -> np.ndarray:  # g per channel, from y = g * x / rms(x)
        return np.mean(y * rms / x, axis=0)

    offset = _snap(effective(at0), tol)
    slope = _snap(effective(at1) - offset, tol)
    if float(np.min(np.abs(slope))) < 1e-6:
        raise _not_rms(norm, "its output does not change with that parameter (is it the norm's scale?)")
    unit = _snap((1.0 - offset) / slope, tol)
    if float(np.max(unit) - np.min(unit)) > tol:
        raise _not_rms(norm, f"no single value of the scale gives it a unit scale (g = 1 needs values from "
                             f"{float(np.min(unit)):.3g} to {float(np.max(unit)):.3g})")
    unit = float(unit[0])
    g = offset + slope * np.asarray(scale, np.float64)
    def rotate(a: np.ndarray) -> np.ndarray:  # a Q
        return np.asarray(_rotate_axis(q, jnp.asarray(a, jnp.float32), None, 1), np.float64)

    (u, u_rotated, _), _ = run([unit] * 3, [x, rotate(x), x])
    err = _relative(g * u, y)
    if err > tol:
        raise _not_rms(norm, f"norm(x) differs from g * (the norm at unit scale)(x) by {err:.2g} (relative)")
    err = _relative(u_rotated, rotate(u))
    if err > tol:
        raise _not_rms(norm, f"with its scale at {unit:g}, norm(x Q) differs from norm(x) Q by {err:.2g} "
                             "(relative)")
    return jnp.asarray(g, jnp.float32), unit


def _not_rms(norm: Norm, detail: str) -> ValueError:
    return ValueError(f"{WHO}: norm {norm.module!r} (scale {norm.path!r}) is not an RMSNorm y = g * x / "
                      f"rms(x) (g = w or 1 + w): on a probe input, {detail}. QuaRot's identity "
                      "RMSNorm(x Q) = RMSNorm(x) Q needs one; a LayerNorm subtracts the mean and adds a bias "
                      "(convert it first, as SliceGPT does); refused. Allowed: RMSNorm-like norms on the "
                      "residual stream")


# ------------------------------------------------------------------------------------------ rotations


@functools.partial(jax.jit, static_argnums=3)
def _rotate_axis(q: jax.Array, w: jax.Array, g: jax.Array | None, axis: int) -> jax.Array:
    """``w`` with each vector ``v`` along ``axis`` mapped to ``(g * v) Q`` (``g = 1`` when ``None``), in
    float32: for a reader that is ``Q^T diag(g) W`` (its input axis), for a writer ``W Q`` and ``b Q`` (its
    output axis), for the embedding ``E Q``. ``q``: the dense ``Q`` (:meth:`qjax.Rotation.matrix`); a
    matmul at full float32 precision compiles in a fraction of the fast transform's time, once per weight
    shape, and the weights are rotated once."""
    v = jnp.moveaxis(w.astype(jnp.float32), axis, -1)
    if g is not None:
        v = v * g
    return jnp.moveaxis(jnp.matmul(v, q, precision=jax.lax.Precision.HIGHEST), -1, axis).astype(w.dtype)


def _compare(reference, rotated, rtol: float) -> None:
    """``ValueError`` naming the largest difference when an output array of the rotated model differs from
    the original's by more than ``rtol`` relative to the original's largest entry."""
    pairs = zip(jax.tree_util.tree_flatten_with_path(reference)[0], jax.tree.leaves(rotated), strict=True)
    worst = None
    for (keypath, want), got in pairs:
        if not jnp.issubdtype(jnp.result_type(want), jnp.floating):
            continue
        want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
        diff = np.abs(got - want)
        err = float(diff.max() / max(np.abs(want).max(), 1e-30)) if diff.size else 0.0
        if worst is None or err > worst[0]:
            index = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
            worst = (err, jax.tree_util.keystr(keypath) or "output", tuple(int(i) for i in index),
                     want[index] if diff.size else 0.0, got[index] if diff.size else 0.0)
    if worst is not None and worst[0] > rtol:
        err, name, index, want, got = worst
        raise ValueError(f"{WHO}: the rotated model's output differs from the original's: "
                         f"{name}{list(index)} is {got:.6g}, was {want:.6g} (max |difference| / max "
                         f"|original| = {err:.3g} > rtol={rtol:g}); the layout does not describe this model "
                         "(a reader, writer or norm misnamed, or a norm that is not on the residual stream); "
                         "the model is unchanged")
