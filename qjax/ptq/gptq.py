"""GPTQ / OPTQ: quantize a layer's weight one input row at a time, spreading each rounding error onto the
rows not yet quantized so that the layer's *output* on calibration inputs changes as little as possible.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers", ICLR 2023 (published as OPTQ). For a Dense kernel ``W (K, N)`` (``y = x W``) and
calibration inputs ``X (n, K)`` it minimises ``||X W - X W_q||^2`` with the Hessian ``H = 2 X^T X / n``:

1. dampening ``H += damp * mean(diag H) * I`` (``damp = 0.01``); a dead input (``H_kk = 0``) gets
   ``H_kk = 1`` and a zero weight row; a Hessian that is 0 everywhere (the layer saw no calibration input:
   every token masked, or every input 0) is replaced by ``I``, so the layer is rounded to nearest (RTN)
   rather than zeroed; eagerly this warns (:func:`gptq` names the layer), under a trace it is silent;
2. optional activation order: rows sorted by decreasing ``H_kk`` (``act_order``);
3. ``U = chol(H^-1)^T``, the upper Cholesky factor of the inverse Hessian;
4. for each row ``k`` in order: ``q_k = quant(w_k)``, ``e_k = (w_k - q_k) / U_kk`` and
   ``w_j -= U_kj e_k`` for every later row ``j``; done lazily in blocks of ``block_size`` rows (128), the
   update of the rows after a block applied once as ``W -= U_block^T E_block``.

``quant`` is the rule's own quantizer (its format's rounding and its scale rule, :mod:`qjax.scales`):
per-channel / per-tensor scales come from the original weight; per-group scales (``PerGroup(0, g)``) of
the range rules (``absmax``, ``absmax_edge``, ``minmax``) and of the MX block rules (``e8m0`` of MXFP8 /
MXFP4, ``nvfp4``, whose float32 tensor scale is the original weight's) are computed from the error-updated
rows when a group starts, as in the reference code (groups run along the last input axis: ``PerGroup(0, g)``
of a Dense kernel, ``PerGroup(1, g)`` of an ``NHD`` einsum weight, consecutive rows of its ``(N H, D)``
matrix); with ``act_order``, and for the statistics rules (``mean_abs``, ``median``: ternary, BitNet) always,
they come from the original weight in its original groups ("static groups"), so a QArray still holds one
scale per contiguous group. (A mean-abs scale computed from error-updated rows grows with
the clipping error it absorbs: on all-MiniLM-L6-v2 at ternary g64 that collapsed the embeddings to cosine
0.02 against RTN's 0.39; static scales gave 0.62.) With ``H = I`` no error moves and GPTQ is exactly RTN.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qjax.granularity import PerChannel, PerGroup, PerTensor
from qjax.ptq.capture import capture_fn, input_statistics, statistics
from qjax.ptq.hessian import check_hessian as _check_hessian
from qjax.ptq.hessian import mean_hessian as _mean_hessian
from qjax.ptq.layers import Layer, Path, check_batches, check_token_mask, dequantized_params, weight
from qjax.ptq.model import model_view
from qjax.qarray import QArray
from qjax.quantizer import Quantizer, quantize
from qjax.scales import COMPUTED_RULES, MX_RULES, compute_scale, mx_scale, scale_value

# Scale rules that map the group's range onto the grid: their group scales may follow the updated rows.
_RANGE_RULES = ("absmax", "absmax_edge", "minmax", *MX_RULES)
_RULES = (*COMPUTED_RULES, *MX_RULES)


def hessian_stat(rows: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(2 X^T diag(mask) X, sum(mask))`` of one batch's input rows (sums over batches; divide last)."""
    rows = jnp.where(mask[:, None] > 0, rows, 0.0)  # padding left out by where: a NaN there stays out
    return 2.0 * (rows * mask[:, None]).T @ rows, jnp.sum(mask)


def _check_layer(q: Quantizer, w: jax.Array, hessian: jax.Array, block_size: int, damp, contract: int = 1):
    if not isinstance(q, Quantizer):
        raise TypeError(f"gptq_layer expects a Quantizer, got {type(q).__name__}")
    if not isinstance(damp, jax.core.Tracer) and not (np.ndim(damp) == 0 and np.isfinite(damp) and damp >= 0):
        raise ValueError(f"gptq_layer: damp={damp!r} is not allowed; allowed: a finite number >= 0 (0.01 "
                         "as in the paper)")
    if isinstance(contract, bool) or not isinstance(contract, int) or not 1 <= contract < jnp.ndim(w):
        raise ValueError(f"gptq_layer: weight of shape {jnp.shape(w)} with contract={contract!r}; allowed: a "
                         "(*K, *F) kernel whose leading contract >= 1 axes are the input ones, at least one "
                         "output axis left (a Dense (in, out) kernel: contract=1)")
    k = math.prod(w.shape[:contract])
    if jnp.shape(hessian) != (k, k):
        raise ValueError(f"gptq_layer: hessian has shape {jnp.shape(hessian)}; allowed: ({k}, {k}) for a "
                         f"weight of shape {tuple(w.shape)} contracting {contract} axes")
    if q.scale not in _RULES or q.bases != 1:
        raise ValueError(f"gptq_layer: scale rule {q.scale!r} (bases={q.bases}) is not supported; allowed: "
                         f"single-basis quantizers with a computed or block scale: {', '.join(_RULES)}")
    gran = q.granularity.resolve(w.shape)
    per_output = isinstance(gran, PerChannel) and all(a % w.ndim >= contract for a in gran.axis)
    grouped = isinstance(gran, PerGroup) and gran.axis % w.ndim == contract - 1
    if not (per_output or isinstance(gran, PerTensor) or grouped):
        raise ValueError(f"gptq_layer: granularity {q.granularity} is not supported; allowed: PerTensor(), "
                         "PerChannel over output axes (PerChannel(-1)) or PerGroup(contract - 1, size) "
                         "(groups along the last input axis: PerGroup(0, size) for a Dense kernel)")
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"gptq_layer: block_size={block_size!r} must be a positive integer")
    if isinstance(gran, PerGroup) and block_size % gran.size:
        raise ValueError(f"gptq_layer: block_size {block_size} must be a multiple of the group size "
                         f"{gran.size}; allowed: {gran.size}, {2 * gran.size}, ...")


def _gptq(q: Quantizer, w: jax.Array, hessian: jax.Array, damp: jax.Array, block_size: int,
          act_order: bool, contract: int = 1):
    gran = q.granularity.resolve(w.shape)
    fmt, dtype = q.fmt, w.dtype.name
    shape = w.shape  # (*K, *F), solved as the (K, F) matrix of its flattened axes
    k, n = math.prod(shape[:contract]), math.prod(shape[contract:])
    dynamic = isinstance(gran, PerGroup) and not act_order and q.scale in _RANGE_RULES
    g = gran.size if isinstance(gran, PerGroup) else k
    bsz = min(block_size, k) if not isinstance(gran, PerGroup) else block_size
    kp = -(-k // bsz) * bsz

    h = hessian.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    no_input = jnp.all(dead)  # H = 0: no calibration input at all; H = I instead, i.e. RTN
    dead = dead & ~no_input
    h = jnp.where(no_input, jnp.eye(k, dtype=jnp.float32), h + jnp.diag(dead.astype(jnp.float32)))
    w = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32).reshape(k, n))
    perm = jnp.argsort(-jnp.diag(h)) if act_order else jnp.arange(k)
    h = h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=jnp.float32)

    # Static scales (per channel / tensor, or act-order groups) from the original weight, one per row.
    static = quantize(q, w.reshape(shape))
    blocks_shape = gran.to_blocks(w.reshape(shape)).shape
    rows = lambda s: gran.from_blocks(jnp.broadcast_to(s, blocks_shape), shape).reshape(k, n)
    has_zero = static.zero_point is not None
    mx, tensor = q.scale in MX_RULES, static.tensor_scale
    # the float32 scale a stored scale stands for (block rules store E8M0 exponents / E4M3 block scales)
    t = None if tensor is None else tensor.reshape(())
    used = (lambda stored: scale_value(stored.astype(static.scale.dtype), t)) if mx else (lambda s: s)
    s_rows = rows(used(static.scale))[perm]
    z_rows = rows(static.zero_point)[perm] if has_zero else jnp.zeros((k, n), jnp.float32)

    wp, hp = w[perm], h[perm][:, perm]
    pad = kp - k
    wp = jnp.pad(wp, ((0, pad), (0, 0)))
    s_rows = jnp.pad(s_rows, ((0, pad), (0, 0)), constant_values=1.0)
    z_rows = jnp.pad(z_rows, ((0, pad), (0, 0)))
    hp = jnp.pad(hp, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(kp) >= k).astype(jnp.float32)
    chol = jnp.linalg.cholesky(hp)
    hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(kp, dtype=jnp.float32))
    u = jnp.linalg.cholesky(hinv).T  # upper: u[i, j] = 0 for j < i
    ok = jnp.all(jnp.isfinite(u))

    def group_scale(block_w, i):
        """The group's scale as stored (float32 values: E8M0 exponents and E4M3 scales are exact in
        float32) and zero point, from rows ``i .. i + g`` of the block as updated so far."""
        part = jax.lax.dynamic_slice(block_w, (i, 0), (g, n))
        if mx:
            s, _ = mx_scale(q.scale, fmt, part, (0,), q.eps, tensor_scale=tensor)
            return s[0].astype(jnp.float32), jnp.zeros((n,), jnp.float32)
        s, z = compute_scale(q.scale, fmt, part, (0,), q.eps)
        return s[0], (z[0] if has_zero else jnp.zeros((n,), jnp.float32))

    def columns(b0, first, count, u_block, carry, scale_of):
        """Quantize rows ``first .. first + count`` of the block, spreading each error inside it."""

        def column(i, carry):
            block_w, err, codes = carry
            s, z = scale_of(b0 + i)
            row = block_w[i]
            code = fmt.encode(row / s + z if has_zero else row / s)
            e = (row - fmt.dequant(code, s, z if has_zero else None)) / u_block[i, i]
            block_w = block_w - u_block[i][:, None] * e[None, :]
            return block_w, err.at[i].set(e), codes.at[b0 + i].set(code)

        return jax.lax.fori_loop(first, first + count, column, carry)

    def block(b, carry):
        wp, codes, group_s, group_z = carry
        b0 = b * bsz
        u_block = jax.lax.dynamic_slice(u, (b0, b0), (bsz, bsz))
        inner = (jax.lax.dynamic_slice(wp, (b0, 0), (bsz, n)), jnp.zeros((bsz, n), jnp.float32), codes)
        if dynamic:  # each group's scale from its rows as updated so far (reference GPTQ)
            for j in range(bsz // g):
                s, z = group_scale(inner[0], j * g)
                group_s = jax.lax.dynamic_update_slice(group_s, s[None], ((b0 + j * g) // g, 0))
                group_z = jax.lax.dynamic_update_slice(group_z, z[None], ((b0 + j * g) // g, 0))
                s = used(s)
                inner = columns(b0, j * g, g, u_block, inner, lambda c, s=s, z=z: (s, z))
        else:
            inner = columns(b0, 0, bsz, u_block, inner, lambda c: (s_rows[c], z_rows[c]))
        _, err, codes = inner
        u_rows = jax.lax.dynamic_slice(u, (b0, 0), (bsz, kp))
        return wp - u_rows.T @ err, codes, group_s, group_z

    codes = jnp.zeros((kp, n), fmt.code_dtype)
    groups = jnp.zeros((kp // g if dynamic else 1, n), jnp.float32)
    _, codes, group_s, group_z = jax.lax.fori_loop(0, kp // bsz, block, (wp, codes, groups, groups))
    inverse = jnp.argsort(perm)
    codes = codes[:k][inverse].reshape(shape)
    if dynamic:  # (groups of the flattened rows, n) -> the block view's scale (*K[:-1], K[-1] / g, 1, *F)
        lead = (*shape[:contract - 1], shape[contract - 1] // g, 1, *shape[contract:])
        scale = group_s[: k // g].reshape(lead).astype(static.scale.dtype)
        zero = group_z[: k // g].reshape(lead) if has_zero else None
    else:
        scale, zero = static.scale, static.zero_point
    return QArray(codes, scale, zero, q.format, gran, dtype, 1, tensor_scale=tensor), ok


_STATIC = ("q", "block_size", "act_order", "contract")
_gptq_nested = jax.jit(_gptq, static_argnames=_STATIC)
# The solver is a long sequential loop whose speed depends on XLA's backend optimizations: at top level
# keep them on even when a caller lowers the global level to compile faster (the quick tests do).
_gptq_top = jax.jit(_gptq, static_argnames=_STATIC, compiler_options={"xla_backend_optimization_level": 3})


def _tracing(*arrays) -> bool:
    """Whether we run under a trace (jit, vmap, grad): there, only a plain nested jit is allowed."""
    return any(isinstance(a, jax.core.Tracer) for a in (*arrays, jnp.zeros(()) + 1))


def gptq_layer(q: Quantizer, w: jax.Array, hessian: jax.Array, *, block_size: int = 128,
               damp: float | jax.Array = 0.01, act_order: bool = False, contract: int = 1) -> QArray:
    """GPTQ of one ``(K, N)`` kernel with Hessian ``H = 2 X^T X / n`` ``(K, K)`` (module docstring).

    ``contract``: a ``(*K, *F)`` kernel whose leading ``contract`` axes meet the input (an einsum weight such
    as ``NHD`` of ``BTNH,NHD->BTD``: 2) is solved as the ``(prod K, prod F)`` matrix, ``H`` over the
    flattened input axes; its scales follow ``q`` on the kernel's own shape.

    Returns the QArray (unpacked codes, scales as :func:`qjax.quantize` lays them out for ``q``) that
    minimises the layer's output error greedily; ``dequantize`` gives ``W_q``. Jitted (``q``,
    ``block_size`` and ``act_order`` static); raises ``ValueError`` when the dampened Hessian is not
    positive definite (increase ``damp``) or holds NaN/inf, unless called under a trace. A Hessian that
    is 0 everywhere gives RTN (module docstring, step 1), with a warning unless traced.
    """
    _check_layer(q, w, hessian, block_size, damp, contract)
    traced = _tracing(w, hessian, damp)
    if not traced:
        _check_hessian(hessian, "gptq_layer")
        if not np.any(np.diag(np.asarray(hessian))):
            warnings.warn("gptq_layer: the Hessian is 0 everywhere (no calibration input): rounded to "
                          "nearest (RTN) instead", stacklevel=2)
    solver = _gptq_nested if traced else _gptq_top
    qa, ok = solver(q, w, hessian, jnp.asarray(damp, jnp.float32), block_size, act_order, contract)
    if not traced and not bool(ok):
        raise ValueError(f"gptq_layer: the dampened Hessian is not positive definite (Cholesky gave "
                         f"non-finite values) with damp={float(damp)}; allowed: a larger damp, e.g. 0.1")
    return qa


def _stage(layer: Layer) -> Path:
    """The block a layer belongs to: its path up to the first numeric component (``encoder/layer/3``)."""
    for i, part in enumerate(layer.module):
        if part.isdigit():
            return layer.module[: i + 1]
    return layer.module


def hessians(model, variables: Mapping | None, batches: Sequence[Mapping], modules: Sequence[Path], *,
             token_mask: str | None = "attention_mask", apply_kwargs: Mapping | None = None
             ) -> dict[Path, jax.Array]:
    """``{module path: H = 2 X^T X / n}`` over the non-padding input rows of each module's weight
    contraction (:mod:`qjax.ptq.capture`); ``model``/``variables`` a Linen module and its variables, or an
    NNX module and ``None``."""
    stats = input_statistics(model, variables, batches, modules, hessian_stat, token_mask=token_mask,
                             apply_kwargs=apply_kwargs)
    return {path: _mean_hessian(h, count) for path, (h, count) in stats.items()}


def gptq(model, variables: Mapping | None, rules, batches: Sequence[Mapping], *,
         block_size: int = 128, damp: float = 0.01, act_order: bool = False, sequential: bool = True,
         token_mask: str | None = "attention_mask", apply_kwargs: Mapping | None = None):
    """GPTQ of every weight the rules quantize; returns the frozen model (packed QArrays).

    Linen: ``gptq(model, variables, rules, batches)`` returns frozen variables. NNX:
    ``gptq(model, None, rules, batches)`` quantizes and freezes the ``nnx.Module`` in place
    (:class:`qjax.nnx.PackedWeight` weights) and returns it.

    The Hessian of each Dense-like module's input is collected by interception of its weight contraction
    over the calibration ``batches`` (padding tokens left out). ``sequential=True`` (the paper's protocol,
    by block) quantizes the model block by block (``encoder/layer/0``, ``.../1``, ...): a block's Hessians
    are collected with every earlier block already quantized, so later layers correct the earlier error;
    ``False`` collects every Hessian from the float model in one pass (faster, slightly worse).

    No silent zeros: batches whose every token is masked (``batch[token_mask] == 0`` everywhere, e.g. an
    inverted attention mask) are refused with ``ValueError``; a layer that still receives no calibration
    input (0 unmasked tokens, or every input 0, so ``H = 0`` and GPTQ would zero every weight) is rounded
    to nearest (RTN) instead, with a warning naming the layer; NaN/inf inputs are a ``ValueError`` naming
    the layer.
    """
    batches = check_batches(batches, "gptq")
    check_token_mask(batches, token_mask, "gptq")
    view = model_view(model, variables, rules, batches[0], apply_kwargs, "gptq")
    layers = view.layers
    params = view.params
    for layer in layers:
        w = weight(params, layer)
        if layer.contract < 1 or w.ndim <= layer.contract:
            raise ValueError(f"gptq: {layer.name} (shape {w.shape}) is not contracted as a (*K, *F) kernel "
                             "against its input's trailing axes; allowed: Dense-like kernels (Dense, "
                             "DenseGeneral, Linear, x . w einsums; exclude the others by rule)")
    stages: dict[Path, list[Layer]] = {}
    for layer in layers:
        stages.setdefault(_stage(layer) if sequential else (), []).append(layer)
    qarrays: dict[Path, QArray] = {}
    modules = list(dict.fromkeys(layer.module for layer in layers))
    fn = capture_fn(view, modules, hessian_stat, token_mask=token_mask)
    for stage_layers in stages.values():  # one compiled forward; each stage computes only its Hessians
        active = {layer.module: True for layer in stage_layers}
        stats = statistics(view, dequantized_params(params, qarrays), batches, modules, hessian_stat, fn=fn,
                           active=active)
        for layer in stage_layers:
            h, count = stats[layer.module]
            w = weight(params, layer)
            if float(count) == 0 or not np.any(np.diag(np.asarray(h))):
                why = "0 unmasked tokens" if float(count) == 0 else "every input is 0"
                warnings.warn(f"gptq: layer {layer.name} received no calibration input ({why} over "
                              f"{len(batches)} batches): rounded to nearest (RTN) instead", stacklevel=2)
                qarrays[layer.path] = quantize(layer.quantizer, w)
                continue
            try:
                _check_hessian(h, f"layer {layer.name}")
                qarrays[layer.path] = gptq_layer(layer.quantizer, w, _mean_hessian(h, count),
                                                 block_size=block_size, damp=damp, act_order=act_order,
                                                 contract=layer.contract)
            except ValueError as err:
                raise ValueError(f"gptq: layer {layer.name}: {err}") from None
    return view.frozen(qarrays)
