"""Activation-aware per-channel scaling: SmoothQuant and AWQ, on Linen and NNX models through one view.

Both methods choose, for every quantized Dense-like layer ``y = x W`` (``W (K, N)``), a positive per-input-
channel divisor ``s (K,)`` and quantize the pair ``(x / s, diag(s) W)``, equal to ``(x, W)`` in float
(:mod:`qjax.input_transform`); the frozen model divides its inputs by ``s`` in the op-level core, on every
path, before quantizing them.

- :func:`smoothquant` (Xiao et al., "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large
  Language Models", ICML 2023): ``s_j = max|X_j|^a / max_n |W_jn|^(1-a)`` from the calibration inputs' per-
  channel range, ``a = 0.5`` by default; outlier input channels move into the weight, so both quantize.
  ``alphas=`` (SmoothQuant+, Pan et al. 2023) picks ``a`` per layer from a grid by the layer's output error
  on sampled calibration rows, inputs and weights quantized as the rule says.
- :func:`awq` (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration",
  MLSys 2024): ``s_j = mean|X_j|^a`` (normalised by ``sqrt(max s min s)``), ``a`` searched over ``n_grid``
  points ``0, 1/n, .., (n-1)/n`` per layer minimising ``||Q(X / s) Q(diag(s) W) - X W||^2`` on the sampled
  rows (``a = 0`` is plain rounding, so on those rows AWQ never does worse than it).

The scaled weight is then rounded (``method="rtn"``) or quantized by GPTQ with the scaled inputs' Hessian
``H' = diag(1/s) H diag(1/s)`` (``method="gptq"``, :func:`qjax.ptq.gptq_layer`). A channel the calibration
never excited (``max|X_j| = 0``) or a zero weight row gets ``s_j = 1``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax import qat
from qjax.input_transform import DIVISOR, SIGNS, rotation, transform_weight
from qjax.ptq.capture import capture_fn, statistics
from qjax.ptq.gptq import _check_hessian, _mean_hessian, gptq_layer, hessian_stat
from qjax.ptq.layers import Layer, Path, check_batches, check_token_mask, weight
from qjax.ptq.model import model_view
from qjax.quantizer import Quantizer, fake_quant, quantize
from qjax.scales import COMPUTED_RULES

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
        if layer.contract != 1 or w.ndim != 2 or layer.stacked:
            raise ValueError(f"{who}: {layer.name} is not a Dense (in, out) kernel (shape {w.shape}); "
                             "allowed: 2-D kernels of Dense-like modules (exclude the others by rule)")
        q = layer.quantizer
        if q.scale not in COMPUTED_RULES or q.bases != 1:
            raise ValueError(f"{who}: {layer.name}: weight scale rule {q.scale!r} (bases={q.bases}) is not "
                             f"supported; allowed: single-basis computed scales: {', '.join(COMPUTED_RULES)}")


def _input_quantizer(view, layer: Layer, who: str) -> Quantizer | None:
    q = view.entry(layer.module).rule.input
    if q is not None and q.scale not in COMPUTED_RULES:
        raise ValueError(f"{who}: {layer.name}: input scale rule {q.scale!r} is fixed before smoothing would "
                         f"change the inputs; allowed: computed (dynamic) input scales: "
                         f"{', '.join(COMPUTED_RULES)}")
    return q


def _output_error(wq: Quantizer, xq: Quantizer | None, w, rows, mask):
    """``s -> sum over sampled rows of ||Q(x / s) Q(diag(s) W) - x W||^2`` (jitted per layer)."""
    target = rows @ w

    def err(s):
        x = rows / s
        if xq is not None:
            x = fake_quant(xq, x, **qat.surrogate_kwargs(xq, {}))
        y = x @ fake_quant(wq, w * s[:, None], **qat.surrogate_kwargs(wq, {}))
        return jnp.sum(mask[:, None] * (y - target) ** 2)

    return jax.jit(jax.vmap(err))


def _finish(view, layers, params, transforms: Mapping[Path, Mapping], method: str, hess: Mapping | None):
    """Each layer's weight transformed (``R^T diag(s) W``, :func:`qjax.input_transform.transform_weight`) and
    rounded or GPTQ-quantized with the transformed inputs' Hessian ``H' = R^T diag(1/s) H diag(1/s) R``; the
    frozen model with the transforms."""
    qarrays = {}
    for layer in layers:
        transform = transforms[layer.module]
        w = weight(params, layer)
        w = transform_weight(transform, w.astype(jnp.float32)).astype(w.dtype)
        if method == "gptq":
            h, count = hess[layer.module]
            _check_hessian(h, f"layer {layer.name}")
            h = _mean_hessian(h, count)
            s = transform.get(DIVISOR)
            if s is not None:
                h = h / (s[:, None] * s[None, :])
            r = rotation(transform)
            if r is not None:
                h = r.rotate_weight(r.rotate_weight(h, 0).T, 0)
            qarrays[layer.path] = gptq_layer(layer.quantizer, w, h)
        else:
            qarrays[layer.path] = quantize(layer.quantizer, w)
    return view.frozen(qarrays, transforms=transforms)


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


def smoothquant(model, variables: Mapping | None, rules, batches: Sequence[Mapping], *, alpha: float = 0.5,
                alphas: Sequence[float] | None = None, method: str = "rtn", sample_rows: int = 512,
                token_mask: str | None = "attention_mask", apply_kwargs: Mapping | None = None):
    """SmoothQuant of every weight the rules quantize (module docstring); returns the frozen model.

    ``s_j = max|X_j|^a / max_n |W_jn|^(1-a)`` (clipped to ``>= 1e-5``; 1 for a dead channel or a zero weight
    row) with ``a = alpha``, or per layer the ``a`` in ``alphas`` with the least output error on
    ``sample_rows`` calibration rows (SmoothQuant+). Linen: returns frozen variables whose ``quant``
    collection holds each module's divisor; NNX (``variables=None``): the model, frozen in place, each
    module with an :class:`qjax.nnx.InputTransform`. ``method``: ``"rtn"`` or ``"gptq"`` for the scaled
    weight.
    """
    who = "smoothquant"
    grid = _check_grid([alpha] if alphas is None else alphas, who, "alpha" if alphas is None else "alphas")
    batches, view, layers, modules = _prepare(model, variables, rules, batches, method, token_mask,
                                              apply_kwargs, who)
    x_max = _stats(view, batches, modules, _abs_max, jnp.maximum, token_mask)
    samples = _samples(view, batches, modules, sample_rows, token_mask) if grid.size > 1 else None
    scales = {}
    for layer in layers:
        w = weight(view.params, layer).astype(jnp.float32)
        xm, wm = x_max[layer.module], jnp.max(jnp.abs(w), axis=1)
        ok = (xm > 0) & (wm > 0)
        safe_x, safe_w = jnp.where(ok, xm, 1.0), jnp.where(ok, wm, 1.0)
        cands = jnp.stack([jnp.where(ok, jnp.maximum(safe_x**a / safe_w ** (1 - a), 1e-5), 1.0)
                           for a in grid])
        if samples is not None:
            rows, mask = samples[layer.module]
            errs = _output_error(layer.quantizer, _input_quantizer(view, layer, who), w, rows, mask)(cands)
            cands = cands[int(jnp.argmin(errs))][None]
        scales[layer.module] = cands[0]
    hess = _stats(view, batches, modules, hessian_stat, jnp.add, token_mask) if method == "gptq" else None
    transforms = {m: {DIVISOR: s.astype(jnp.float32)} for m, s in scales.items()}
    return _finish(view, layers, view.params, transforms, method, hess)


def awq(model, variables: Mapping | None, rules, batches: Sequence[Mapping], *, n_grid: int = 20,
        method: str = "rtn", sample_rows: int = 512, token_mask: str | None = "attention_mask",
        apply_kwargs: Mapping | None = None):
    """AWQ of every weight the rules quantize (module docstring); returns the frozen model.

    ``s = m^a / sqrt(max(m^a) min(m^a))`` with ``m_j = mean|X_j|`` over the calibration tokens (a dead
    channel ``m_j = 0`` counts as the smallest live one), ``a`` the point of ``0, 1/n_grid, ..,
    (n_grid-1)/n_grid`` with the least output error ``||Q(X/s) Q(diag(s) W) - X W||^2`` on ``sample_rows``
    calibration rows. Returns as :func:`smoothquant`.
    """
    who = "awq"
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < 1:
        raise ValueError(f"{who}: n_grid={n_grid!r}; allowed: a positive integer (20 in the paper)")
    batches, view, layers, modules = _prepare(model, variables, rules, batches, method, token_mask,
                                              apply_kwargs, who)
    sums = _stats(view, batches, modules, _abs_sum, jnp.add, token_mask)
    samples = _samples(view, batches, modules, sample_rows, token_mask)
    grid = jnp.arange(n_grid, dtype=jnp.float32) / n_grid
    scales = {}
    for layer in layers:
        w = weight(view.params, layer).astype(jnp.float32)
        total, count = sums[layer.module]
        m = total / jnp.maximum(count, 1.0)
        live = m > 0
        m = jnp.where(live, m, jnp.min(jnp.where(live, m, jnp.inf)) if bool(jnp.any(live)) else 1.0)
        cands = m[None, :] ** grid[:, None]
        cands = cands / jnp.sqrt(jnp.max(cands, 1, keepdims=True) * jnp.min(cands, 1, keepdims=True))
        rows, mask = samples[layer.module]
        errs = _output_error(layer.quantizer, _input_quantizer(view, layer, who), w, rows, mask)(cands)
        scales[layer.module] = cands[int(jnp.argmin(errs))]
    hess = _stats(view, batches, modules, hessian_stat, jnp.add, token_mask) if method == "gptq" else None
    transforms = {m: {DIVISOR: s.astype(jnp.float32)} for m, s in scales.items()}
    return _finish(view, layers, view.params, transforms, method, hess)


def hadamard(model, variables: Mapping | None, rules, batches: Sequence[Mapping], *, key: jax.Array,
             method: str = "gptq", token_mask: str | None = "attention_mask",
             apply_kwargs: Mapping | None = None):
    """A randomized Hadamard rotation of every quantized layer's input, then ``method`` on the rotated weight
    (``"gptq"``: QuaRot's and QuIP#'s recipe, GPTQ with the rotated inputs' Hessian ``R^T H R``; ``"rtn"``).

    For ``y = x W`` with ``W (K, N)``: ``R = diag(r) H_K / sqrt(K)`` (:func:`qjax.random_hadamard`, random
    signs ``r`` from ``key``, one draw per layer; block-diagonal for a width with no Hadamard
    construction), ``y = (x R)(R^T W)`` exactly in float. The rotation spreads each outlier input channel
    over all channels, so per-token input scales and per-channel weight scales fit the rotated operands
    (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", 2024; Tseng et al., "QuIP#",
    ICML 2024). The frozen model rotates each such module's input online (the fast Walsh-Hadamard transform,
    :func:`kernels_pallas.hadamard_transform`) before it quantizes it. Returns as :func:`smoothquant`.
    """
    from qjax.rotation import random_hadamard

    who = "hadamard"
    batches, view, layers, modules = _prepare(model, variables, rules, batches, method, token_mask,
                                              apply_kwargs, who)
    transforms = {}
    for i, layer in enumerate(layers):
        k = weight(view.params, layer).shape[0]
        transforms[layer.module] = {SIGNS: random_hadamard(k, jax.random.fold_in(key, i)).signs}
    hess = _stats(view, batches, modules, hessian_stat, jnp.add, token_mask) if method == "gptq" else None
    return _finish(view, layers, view.params, transforms, method, hess)
