"""Activation-aware per-channel scaling (SmoothQuant, AWQ) and the Hadamard input rotation, on Linen and
NNX models through one view.

Both smoothing methods choose, for every quantized Dense-like layer ``y = x . W`` (``W (*K, *F)`` contracting
its leading ``c`` axes: a Dense kernel ``(K, N)``, an einsum weight ``NHD`` of ``BTNH,NHD->BTD``), a positive
divisor ``s`` of the contracted shape ``K`` and quantize the pair ``(x / s, diag(s) W)``, equal to ``(x, W)``
in float (:mod:`qjax.input_transform`). Statistics are taken over the input's contracted axes flattened
(``prod K`` channels) and the output error is that of the ``(prod K, prod F)`` matrix. Layers reading the
same input tensor (Llama's q/k/v, gate/up) share one ``s`` (:mod:`qjax.ptq.folding`), which is then
folded into the producer of that input where the model allows it (``fold="auto"``: a norm's scale, the
previous linear's output axes: ``p / s``, no run-time cost) or kept as an explicit divide that the frozen
model applies in the op-level core, on every path, before quantizing the input (``fold="never"``, and
wherever no fold is exact). :func:`smoothing_plan` says which.

- :func:`smoothquant` (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
  Language Models", ICML 2023): ``s_j = max|X_j|^a / max_n |W_jn|^(1-a)`` from the calibration inputs' per-
  channel range (the max over the group's weights), ``a = 0.5`` by default; outlier input channels move
  into the weight, so both quantize. ``alphas=`` (SmoothQuant+, Pan et al. 2023) picks ``a`` per group from
  a grid by the group's output error on sampled calibration rows, inputs and weights quantized as the rule
  says.
- :func:`awq` (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
  MLSys 2024): ``s_j = mean|X_j|^a`` (normalised by ``sqrt(max s min s)``), ``a`` searched over ``n_grid``
  points ``0, 1/n, .., (n-1)/n`` per group minimising the summed ``||Q(X / s) Q(diag(s) W) - X W||^2`` of
  its layers on the sampled rows (``a = 0`` is plain rounding, so on those rows AWQ never does worse).
- :func:`hadamard`: a randomized Hadamard rotation of each chosen layer's input over its contracted axes
  flattened (QuaRot, QuIP#), always stored as an input transform.

The scaled weight is then rounded (``method="rtn"``) or quantized by GPTQ with the scaled inputs' Hessian
``H' = diag(1/s) H diag(1/s)`` (``method="gptq"``, :func:`qjax.ptq.gptq_layer`). A channel the calibration
never excited (``max|X_j| = 0``) or a zero weight row gets ``s_j = 1``. Layers stacked by ``scan`` are
refused (their inputs cannot be captured).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax import qat
from qjax.input_transform import DIVISOR, SIGNS, rotation, transform_weight
from qjax.ptq import folding
from qjax.ptq.capture import capture_fn, statistics
from qjax.ptq.folding import SmoothingPlan
from qjax.ptq.gptq import gptq_layer, hessian_stat
from qjax.ptq.hessian import check_hessian, mean_hessian
from qjax.ptq.layers import Layer, Path, check_batches, check_token_mask, weight
from qjax.ptq.model import model_view
from qjax.quantizer import Quantizer, fake_quant, quantize
from qjax.scales import COMPUTED_RULES, MX_RULES

# scale rules computed from the values they quantize (MX block scales included): smoothing changes the
# values, the rule follows them
_DYNAMIC_RULES = (*COMPUTED_RULES, *MX_RULES)

METHODS = ("rtn", "gptq")


def _abs_max(rows, mask):
    return jnp.max(jnp.where(mask[:, None] > 0, jnp.abs(rows), 0.0), axis=0)


def _abs_sum(rows, mask):
    a = jnp.where(mask[:, None] > 0, jnp.abs(rows), 0.0)
    return jnp.sum(a, axis=0), jnp.sum(mask)


def _sample(rows_per_batch: int):
    def stat(rows, mask):
        # the unmasked rows first, in order
        keep = jnp.argsort(-(mask > 0).astype(jnp.int32), stable=True)[:rows_per_batch]
        return rows[keep], (mask[keep] > 0).astype(jnp.float32)

    return stat


def _concatenate(a, b):
    return jnp.concatenate([a, b])


def _check(layers: Sequence[Layer], params, who: str) -> None:
    for layer in layers:
        w = weight(params, layer)
        if layer.stacked:
            raise ValueError(f"{who}: {layer.name} is stacked ({layer.stacked} leading layer axis, run by "
                             f"scan, shape {w.shape}): its inputs cannot be captured; allowed: unstacked "
                             "layers (exclude the stacked ones by rule)")
        if not 1 <= layer.contract < w.ndim:
            raise ValueError(f"{who}: {layer.name} (shape {w.shape}) contracts {layer.contract} axes; "
                             "allowed: Dense-like (*K, *F) kernels contracting their leading axes, at least "
                             "one output axis left (exclude the others by rule)")
        q = layer.quantizer
        if q.scale not in _DYNAMIC_RULES or q.bases != 1:
            raise ValueError(f"{who}: {layer.name}: weight scale rule {q.scale!r} (bases={q.bases}) is not "
                             f"supported; allowed: single-basis computed or block scales: "
                             f"{', '.join(_DYNAMIC_RULES)}")


def _input_quantizer(view, layer: Layer, who: str) -> Quantizer | None:
    q = view.entry(layer.module).rule.input
    if q is not None and q.scale not in _DYNAMIC_RULES:
        raise ValueError(f"{who}: {layer.name}: input scale rule {q.scale!r} is fixed before smoothing would "
                         f"change the inputs; allowed: computed (dynamic) input scales: "
                         f"{', '.join(_DYNAMIC_RULES)}")
    return q


@functools.partial(jax.jit, static_argnames=("quantizers", "contracts"))
def _errors(cands, weights, rows, mask, quantizers, contracts):
    """Per candidate ``s`` (``cands (m, prod K)``): the group's summed output error on the sampled rows,
    ``sum_layers ||Q_x(x / s) Q_w(diag(s) W) - x W||^2``, each weight ``W (*K, *F)`` (contracting
    ``contracts`` axes) as its ``(prod K, prod F)`` matrix and quantized on its own shape, the rows
    quantized as the input's contracted shape ``K`` (the model's own ``(..., *K)`` layout)."""

    def err(s):
        total = jnp.zeros((), jnp.float32)
        for w, (wq, xq), c in zip(weights, quantizers, contracts, strict=True):
            shape_k = w.shape[:c]
            k = math.prod(shape_k)
            wm = w.reshape(k, -1)
            x = rows / s
            if xq is not None:
                x = fake_quant(xq, x.reshape(-1, *shape_k), **qat.surrogate_kwargs(xq, {})).reshape(-1, k)
            wf = fake_quant(wq, (wm * s[:, None]).reshape(w.shape), **qat.surrogate_kwargs(wq, {}))
            total = total + jnp.sum(mask[:, None] * (x @ wf.reshape(k, -1) - rows @ wm) ** 2)
        return total

    return jax.vmap(err)(cands)


@jax.jit
def _smoothquant_candidates(x_max, weights, alphas):
    """``s_j = max|X_j|^a / max_n |W_jn|^(1-a)`` per ``a`` in ``alphas`` (``(m, prod K)``), ``max_n`` over
    every output of every weight ``W (*K, *F)`` of the group; clipped to ``>= 1e-5``, 1 where the channel is
    dead or its weight rows are 0."""
    k = x_max.shape[0]
    w_max = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(w.astype(jnp.float32).reshape(k, -1)), axis=1)
                                           for w in weights])
    ok = (x_max > 0) & (w_max > 0)
    safe_x, safe_w = jnp.where(ok, x_max, 1.0), jnp.where(ok, w_max, 1.0)
    a = alphas[:, None]
    return jnp.where(ok, jnp.maximum(safe_x**a / safe_w ** (1 - a), 1e-5), 1.0)


@jax.jit
def _awq_candidates(total, count, grid):
    """``s = m^a / sqrt(max(m^a) min(m^a))`` per ``a`` in ``grid`` (``(n_grid, prod K)``), ``m = total /
    count`` the mean ``|X_j|``, a dead channel (``m_j = 0``) counted as the smallest live one."""
    m = total / jnp.maximum(count, 1.0)
    live = m > 0
    m = jnp.where(live, m, jnp.where(jnp.any(live), jnp.min(jnp.where(live, m, jnp.inf)), 1.0))
    cands = m[None, :] ** grid[:, None]
    return cands / jnp.sqrt(jnp.max(cands, 1, keepdims=True) * jnp.min(cands, 1, keepdims=True))


def _group_errors(view, members: Sequence[Layer], params, rows, mask, cands, who: str) -> jax.Array:
    weights = tuple(weight(params, layer).astype(jnp.float32) for layer in members)
    quantizers = tuple((layer.quantizer, _input_quantizer(view, layer, who)) for layer in members)
    return _errors(cands, weights, rows, mask, quantizers, tuple(layer.contract for layer in members))


def _transformed_weight(transform: Mapping, w: jax.Array) -> jax.Array:
    """``R^T diag(s) W`` in float32, back in ``w``'s dtype."""
    return transform_weight(transform, w.astype(jnp.float32)).astype(w.dtype)


@jax.jit
def _transformed_hessian(transform: Mapping, h: jax.Array, count: jax.Array) -> jax.Array:
    """The transformed inputs' Hessian ``R^T diag(1/s) (H / n) diag(1/s) R`` over the flattened channels."""
    h = mean_hessian(h, count)
    s = transform.get(DIVISOR)
    if s is not None:
        s = s.reshape(-1)
        h = h / (s[:, None] * s[None, :])
    r = rotation(transform)
    return h if r is None else r.rotate_weight(r.rotate_weight(h, 0).T, 0)


# one compilation per weight shape and transform, not one per eager op
_transform_weight = jax.jit(_transformed_weight)
_transform_and_round = jax.jit(lambda q, t, w: quantize(q, _transformed_weight(t, w)), static_argnums=0)


def _finish(view, layers, params, transforms: Mapping[Path, Mapping], method: str, hess: Mapping | None,
            stored: Mapping[Path, Mapping] | None = None, new_params: bool = False):
    """Each layer's weight transformed (``R^T diag(s) W``, :func:`qjax.input_transform.transform_weight`; a
    layer without a transform as it is) and rounded or GPTQ-quantized with the transformed inputs' Hessian
    ``H' = R^T diag(1/s) H diag(1/s) R``; the frozen model with the ``stored`` transforms (default: all of
    them) and, with ``new_params``, ``params`` written as the float parameters (a folded producer)."""
    qarrays = {}
    for layer in layers:
        transform = dict(transforms.get(layer.module) or {})
        w = weight(params, layer)
        if method == "gptq":
            h, count = hess[layer.module]
            check_hessian(h, f"layer {layer.name}")
            qarrays[layer.path] = gptq_layer(layer.quantizer, _transform_weight(transform, w),
                                             _transformed_hessian(transform, h, count),
                                             contract=layer.contract)
        else:
            qarrays[layer.path] = _transform_and_round(layer.quantizer, transform, w)
    stored = transforms if stored is None else stored
    return view.frozen(qarrays, params=params if new_params else None,
                       transforms={m: t for m, t in stored.items() if t})


def _prepare(model, variables, rules, batches, method, token_mask, apply_kwargs, who):
    if method not in METHODS:
        raise ValueError(f"{who}: method={method!r}; allowed: {', '.join(METHODS)}")
    batches = check_batches(batches, who)
    check_token_mask(batches, token_mask, who)
    view = model_view(model, variables, rules, batches[0], apply_kwargs, who)
    layers = view.layers
    _check(layers, view.params, who)
    modules = list(dict.fromkeys(layer.module for layer in layers))
    if len(modules) != len(layers):
        raise ValueError(f"{who}: a module quantizes more than one weight; allowed: one weight per module")
    return batches, view, layers, modules


def _stats(view, batches, modules, stat, combine, token_mask):
    fn = capture_fn(view, modules, stat, combine, token_mask=token_mask)
    return statistics(view, view.params, batches, modules, stat, combine, token_mask=token_mask, fn=fn)


def _samples(view, batches, modules, sample_rows: int, token_mask):
    per_batch = max(1, -(-sample_rows // len(batches)))
    return _stats(view, batches, modules, _sample(per_batch), _concatenate, token_mask)


def _check_grid(values, who: str, name: str) -> np.ndarray:
    grid = np.asarray(values, np.float32).reshape(-1)
    if grid.size == 0 or not np.all(np.isfinite(grid)) or np.any(grid < 0) or np.any(grid > 1):
        raise ValueError(f"{who}: {name}={values!r}; allowed: numbers in [0, 1]")
    return grid


def _check_fold(fold, who: str) -> None:
    if not isinstance(fold, str) or fold not in folding.FOLDS:
        raise ValueError(f"{who}: fold={fold!r}; allowed: {', '.join(repr(f) for f in folding.FOLDS)}")


def _stats_and_fingerprints(view, batches, modules, stat, combine, token_mask):
    """``stat`` over all batches, and the plan's fingerprint capture (:mod:`qjax.ptq.folding`), from one
    compiled capture pass."""
    fn = capture_fn(view, modules, folding.with_fingerprint(stat), combine, token_mask=token_mask)
    total = statistics(view, view.params, batches, modules, stat, combine, token_mask=token_mask, fn=fn)
    return {m: v[0] for m, v in total.items()}, folding.fingerprints(fn)


def _smooth(view, batches, layers, modules, method, fold, token_mask, who, choose, prints):
    """The shared end of :func:`smoothquant` and :func:`awq`: the plan (groups, folds), one divisor per group
    from ``choose(members) -> s (prod K,)``, the folds applied, the weights quantized."""
    check = folding.FloatCheck(view, batches[0])
    the_plan = folding.plan(view, layers, batches[0], fold, token_mask, who, prints, check)
    scales = {}
    for members in folding.group_layers(the_plan, layers):
        shape = tuple(weight(view.params, members[0]).shape[: members[0].contract])
        s = choose(members).astype(jnp.float32).reshape(shape)
        scales.update({layer.module: s for layer in members})
    params, the_plan = folding.fold(view, the_plan, layers, scales, check, who)
    folded = {tuple(m.split("/")) for m in the_plan.folds()}
    transforms = {m: {DIVISOR: s} for m, s in scales.items()}
    stored = {m: ({} if m in folded else t) for m, t in transforms.items()}
    hess = _stats(view, batches, modules, hessian_stat, jnp.add, token_mask) if method == "gptq" else None
    return _finish(view, layers, params, transforms, method, hess, stored, new_params=bool(folded))


def smoothquant(model, variables: Mapping | None, rules, batches: Sequence[Mapping], *, alpha: float = 0.5,
                alphas: Sequence[float] | None = None, method: str = "rtn", fold: str = "auto",
                sample_rows: int = 512, token_mask: str | None = "attention_mask",
                apply_kwargs: Mapping | None = None):
    """SmoothQuant (Xiao et al., ICML 2023) of every weight the rules quantize (module docstring); returns the
    frozen model.

    Per group of layers reading one input (:func:`smoothing_plan`), ``s_j = max|X_j|^a / max_n |W_jn|^(1-a)``
    over the input's contracted channels ``j`` (``max_n`` over every output of every layer of the group;
    clipped to ``>= 1e-5``; 1 for a dead channel or a zero weight row) with ``a = alpha``, or the ``a`` in
    ``alphas`` with the least summed output error on ``sample_rows`` calibration rows (SmoothQuant+).
    ``fold="auto"``: ``1 / s`` is folded into the input's producer where :func:`smoothing_plan` finds an
    exact fold (a norm's scale: no run-time divide), else stored as an input transform; ``"never"``: always
    stored. Linen: returns frozen variables whose ``quant`` collection holds each stored divisor (and whose
    ``params`` hold the folded producers); NNX (``variables=None``): the model, frozen in place, each module
    with a stored divisor holding an :class:`qjax.nnx.InputTransform`. ``method``: ``"rtn"`` or ``"gptq"``
    for the scaled weight.
    """
    who = "smoothquant"
    _check_fold(fold, who)
    grid = _check_grid([alpha] if alphas is None else alphas, who, "alpha" if alphas is None else "alphas")
    batches, view, layers, modules = _prepare(model, variables, rules, batches, method, token_mask,
                                              apply_kwargs, who)
    x_max, prints = _stats_and_fingerprints(view, batches, modules, _abs_max, jnp.maximum, token_mask)
    samples = _samples(view, batches, modules, sample_rows, token_mask) if grid.size > 1 else None

    def choose(members):
        weights = tuple(weight(view.params, m) for m in members)
        cands = _smoothquant_candidates(x_max[members[0].module], weights, jnp.asarray(grid))
        if samples is None:
            return cands[0]
        rows, mask = samples[members[0].module]
        return cands[int(jnp.argmin(_group_errors(view, members, view.params, rows, mask, cands, who)))]

    return _smooth(view, batches, layers, modules, method, fold, token_mask, who, choose, prints)


def awq(model, variables: Mapping | None, rules, batches: Sequence[Mapping], *, n_grid: int = 20,
        method: str = "rtn", fold: str = "auto", sample_rows: int = 512,
        token_mask: str | None = "attention_mask", apply_kwargs: Mapping | None = None):
    """AWQ (Lin et al., MLSys 2024) of every weight the rules quantize (module docstring); returns the frozen
    model.

    Per group of layers reading one input (:func:`smoothing_plan`), ``s = m^a / sqrt(max(m^a) min(m^a))``
    with ``m_j = mean|X_j|`` over the calibration tokens and the input's contracted channels ``j`` (a dead
    channel ``m_j = 0`` counts as the smallest live one), ``a`` the point of ``0, 1/n_grid, ..,
    (n_grid-1)/n_grid`` with the least summed output error ``sum_layers ||Q(X/s) Q(diag(s) W) - X W||^2``
    on ``sample_rows`` calibration rows. ``fold`` and the result as in :func:`smoothquant`.
    """
    who = "awq"
    _check_fold(fold, who)
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"{who}: n_grid={n_grid!r}; allowed: a positive integer (20 in the paper)")
    batches, view, layers, modules = _prepare(model, variables, rules, batches, method, token_mask,
                                              apply_kwargs, who)
    sums, prints = _stats_and_fingerprints(view, batches, modules, _abs_sum, jnp.add, token_mask)
    samples = _samples(view, batches, modules, sample_rows, token_mask)
    grid = jnp.arange(n_grid, dtype=jnp.float32) / n_grid

    def choose(members):
        cands = _awq_candidates(*sums[members[0].module], grid)
        rows, mask = samples[members[0].module]
        return cands[int(jnp.argmin(_group_errors(view, members, view.params, rows, mask, cands, who)))]

    return _smooth(view, batches, layers, modules, method, fold, token_mask, who, choose, prints)


def smoothing_plan(model, variables: Mapping | None, rules, batches: Sequence[Mapping], *,
                   fold: str = "auto", token_mask: str | None = "attention_mask",
                   apply_kwargs: Mapping | None = None) -> SmoothingPlan:
    """Which layers :func:`smoothquant` and :func:`awq` group and where each group's divisor goes: a
    :class:`qjax.ptq.folding.SmoothingPlan` (``plan.folds()``: ``{module path: producer parameter paths}``;
    ``str(plan)``: one line per group), computed exactly as those methods compute it; the model is not
    changed.

    Layers whose contraction input is one tensor share ``s``; ``1 / s`` folds into a producer ``p`` (``p / s``
    along its trailing axes, the input's contracted shape ``K``) when multiplying ``p`` by a random positive
    ``c`` multiplies every member's captured input by exactly ``c`` and folding leaves the float model's
    outputs unchanged (both to ``1e-5``, on the first batch); the checks are in :mod:`qjax.ptq.folding`.
    """
    who = "smoothing_plan"
    _check_fold(fold, who)
    batches, view, layers, _ = _prepare(model, variables, rules, batches, "rtn", token_mask, apply_kwargs,
                                        who)
    return folding.plan(view, layers, batches[0], fold, token_mask, who)


def _check_paths(paths, layers: Sequence[Layer], who: str):
    if paths is None:
        return None
    if not isinstance(paths, str):
        raise ValueError(f"{who}: paths={paths!r} is a {type(paths).__name__}; allowed: None (every "
                         "quantized layer) or a regex over module paths (re.fullmatch, as the rules match)")
    try:
        pattern = re.compile(paths)
    except re.error as err:
        raise ValueError(f"{who}: paths={paths!r} is not a regular expression ({err}); allowed: a regex over "
                         "module paths (re.fullmatch, as the rules match)") from None
    if not any(pattern.fullmatch("/".join(layer.module)) for layer in layers):
        raise ValueError(f"{who}: paths={paths!r} matches none of the quantized modules "
                         f"{['/'.join(layer.module) for layer in layers][:20]}; allowed: a regex that "
                         "fullmatches at least one of them")
    return pattern


def hadamard(model, variables: Mapping | None, rules, batches: Sequence[Mapping], *, key: jax.Array,
             method: str = "gptq", paths: str | None = None, token_mask: str | None = "attention_mask",
             apply_kwargs: Mapping | None = None):
    """A randomized Hadamard rotation of every chosen quantized layer's input, then ``method`` on the rotated
    weight (``"gptq"``: QuaRot's and QuIP#'s recipe, GPTQ with the rotated inputs' Hessian ``R^T H R``;
    ``"rtn"``).

    For ``y = x . W`` with ``W (*K, *F)`` contracting ``c`` axes: ``R = diag(r) H_n / sqrt(n)`` over the
    ``n = prod K`` contracted channels flattened (:func:`qjax.random_hadamard`, random signs ``r`` from
    ``key``, one draw per layer; block-diagonal for a width with no Hadamard construction),
    ``y = (x R)(R^T W)`` exactly in float, ``W`` as the ``(n, prod F)`` matrix. The rotation spreads each
    outlier input channel over all channels, so per-token input scales and per-channel weight scales fit the
    rotated operands (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", 2024; Tseng
    et al., "QuIP#", ICML 2024). The frozen model rotates each such module's input online (the fast
    Walsh-Hadamard transform, :func:`kernels_pallas.hadamard_transform`) before it quantizes it.
    ``paths``: a regex over module paths (``re.fullmatch``, the strings the rules match) choosing the
    layers rotated; the others are quantized by ``method`` with no transform. Returns as
    :func:`smoothquant` (the stored transform is ``{"signs": r}``, ``r`` of length ``n``).
    """
    from qjax.rotation import random_hadamard

    who = "hadamard"
    batches, view, layers, modules = _prepare(model, variables, rules, batches, method, token_mask,
                                              apply_kwargs, who)
    pattern = _check_paths(paths, layers, who)
    transforms = {}
    for i, layer in enumerate(layers):
        if pattern is not None and not pattern.fullmatch("/".join(layer.module)):
            continue
        k = math.prod(weight(view.params, layer).shape[: layer.contract])
        transforms[layer.module] = {SIGNS: random_hadamard(k, jax.random.fold_in(key, i)).signs}
    hess = _stats(view, batches, modules, hessian_stat, jnp.add, token_mask) if method == "gptq" else None
    return _finish(view, layers, view.params, transforms, method, hess)
