"""PTQTP: a layer's weight as two ternary planes with their own scales, fitted without data.

Xiao, Yang, Yang, Xu, Li, Su, Liu, Yang, Wong, "PTQTP: Post-Training Quantization to Trit-Plane
Representation for Large Language Models", 2025 (arXiv 2509.16989). For a Dense kernel ``W (K, N)``
(contraction axis 0), in every group ``G_j`` of ``g`` consecutive rows along ``K`` and every output column
``n``::

    W[k, n] ~ a1[j, n] * T1[k, n] + a2[j, n] * T2[k, n],    T1, T2 in {-1, 0, 1},   k in G_j

two trit-planes (2 x 1.58 bits; 5 trits per byte with :mod:`kernels_pallas.trits`, 3.2 bits per weight) and
two float scales per (group, column): at most 9 levels per group, and multiplication-free inference
(``x W_hat = a1 (x T1) + a2 (x T2)``, the products only additions). Each (group, column) is its own
problem ``min ||w - a1 t1 - a2 t2||^2`` over ``w`` in ``R^g``; it is solved by alternation:

1. initialisation (greedy, one plane after the other): ``t1 = sign(w) [|w| > 0.7 mean|w|]`` (the
   ternary-weight-network threshold, Li & Liu 2016), ``a1 = <t1, w> / <t1, t1>`` (least squares); the
   residual ``r = w - a1 t1`` gives ``t2 = sign(r) [|r| > 0.7 mean|r|]`` and ``a2 = <t2, r> / <t2, t2>``.
   The alternation below only finds a local minimum near its start, and the greedy start misses the right
   one when ``a2 / a1`` is near or above 1/2 (no threshold on ``|w|`` then separates ``t1 = 0`` from
   ``t1 != 0``), so ``ratio_starts + 1`` more starts run too (an addition to the paper's algorithm): with
   ``rho = i / ratio_starts`` (``i = 0 .. ratio_starts``), ``a1 = max|w| / (1 + rho)``, ``a2 = rho a1``,
   then one round of (b), (a), (b); each (group, column) starts from the start of lowest error
   (``ratio_starts = 0``: the greedy start alone);
2. (a) scales given the planes: the 2x2 ridge regression of the paper,
   ``[a1, a2] = (S^T S + lambda I)^-1 S^T w`` with ``S = [t1 t2]`` ``(g, 2)`` and
   ``lambda = ridge * (<t1, t1> + <t2, t2>) / 2`` (one relative ridge, scale-free, where the paper adapts
   its lambda; it only guards the solve, kept small so the fit stays least squares); collinear planes
   (``S^T S`` singular: a zero plane, or ``t2 = +-t1``) fit the one nonzero plane alone, the same fit;
3. (b) planes given the scales: per element the best pair among the 9 in ``{-1, 0, 1}^2``,
   ``argmin (w_k - a1 t1 - a2 t2)^2`` (ties to ``(0, 0)`` first, then to the earlier pair);
4. repeat (a), (b) for at most ``iters`` rounds, stopping early once no (group, column) lowers its error;
   each (group, column) keeps its best ``(t1, t2, a1, a2)`` seen, so the error never increases (step (b)
   is exact, step (a) exact up to the ridge).

Every group is fitted on ``w / max|w|`` (the scales multiplied back), so magnitudes neither overflow nor
underflow. All-zero groups give zero planes and scales (no NaN). A group holding a NaN or an inf gives
zero planes and NaN scales for that (group, column) only, so its dequantized weights are NaN and no other
group changes. The fit is data-free: no calibration- (Hessian-) weighted variant is implemented.

Scales come as ``(K / g, 1, N)`` float32, the layout :func:`qjax.quantize` gives ``PerGroup(0, g)`` scales
of a Dense kernel; planes as ``(K, N)`` int8 (:func:`kernels_pallas.trits.pack_trits` packs them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels_pallas.layout import as_int
from qjax.ptq.layer_args import check_count, check_dense_kernel, check_group, finite_number

# The TWN threshold of the initial ternary rounding: |w| > 0.7 mean|w| (Li & Liu, "Ternary Weight Networks").
_THRESHOLD = 0.7
# The largest group whose plane Gram determinant c11 c22 - c12^2 (counts <= g) is exact in int32.
_MAX_GROUP = 46340
# The 9 (t1, t2) pairs step (b) chooses from; (0, 0) first so that ties (all-zero groups) give zeros.
_PAIRS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1))



def _check_layer(w, group_size, iters, ridge, ratio_starts) -> None:
    shape = check_dense_kernel(w, "ptqtp_layer")
    g = check_group("ptqtp_layer", group_size, shape[0])
    if g > _MAX_GROUP:
        raise ValueError(f"ptqtp_layer: group_size={g} is too large; allowed: up to {_MAX_GROUP} rows "
                         "(the planes' Gram determinant is computed exactly in int32)")
    check_count("ptqtp_layer", "iters", iters, 0, "0: the greedy initialisation only")
    if not isinstance(ridge, jax.core.Tracer) and not finite_number(ridge, nonnegative=True):
        raise ValueError(f"ptqtp_layer: ridge={ridge!r}; allowed: a finite number >= 0 (relative to the "
                         "planes' mean squared norm; 0 = plain least squares)")
    check_count("ptqtp_layer", "ratio_starts", ratio_starts, 0, "0: the greedy initialisation only")


def _ternary(x: jax.Array) -> jax.Array:
    """``sign(x) [|x| > 0.7 mean|x|]`` per (group, column) of ``x (G, g, N)``, as float32."""
    delta = _THRESHOLD * jnp.mean(jnp.abs(x), axis=1, keepdims=True)
    return jnp.where(jnp.abs(x) > delta, jnp.sign(x), 0.0)


def _fit_one(t: jax.Array, x: jax.Array) -> jax.Array:
    """Least-squares scale ``<t, x> / <t, t>`` (0 for an empty plane), ``(G, 1, N)``."""
    count = jnp.sum(t * t, axis=1, keepdims=True)
    return jnp.sum(t * x, axis=1, keepdims=True) / jnp.maximum(count, 1.0)


def _fit_scales(w, t1, t2, ridge):
    """Step (a): ``[a1, a2] = (S^T S + lambda I)^-1 S^T w`` per (group, column) (module docstring)."""
    i1, i2 = t1.astype(jnp.int32), t2.astype(jnp.int32)
    c11, c22, c12 = (jnp.sum(u * v, axis=1, keepdims=True) for u, v in ((i1, i1), (i2, i2), (i1, i2)))
    det0 = c11 * c22 - c12 * c12  # exact in int32 (g <= _MAX_GROUP): 0 iff the planes are collinear
    f1, f2 = t1.astype(jnp.float32), t2.astype(jnp.float32)
    b1, b2 = jnp.sum(f1 * w, axis=1, keepdims=True), jnp.sum(f2 * w, axis=1, keepdims=True)
    p, q, r = c11.astype(jnp.float32), c22.astype(jnp.float32), c12.astype(jnp.float32)
    lam = ridge * (p + q) / 2
    p, q = p + lam, q + lam
    solvable = det0 > 0
    det = jnp.where(solvable, p * q - r * r, 1.0)
    a1 = jnp.where(solvable, (q * b1 - r * b2) / det, jnp.where(c11 > 0, b1 / jnp.maximum(p, 1.0), 0.0))
    a2 = jnp.where(solvable, (p * b2 - r * b1) / det,
                   jnp.where((c11 == 0) & (c22 > 0), b2 / jnp.maximum(q, 1.0), 0.0))
    return a1, a2


def _fit_planes(w, a1, a2):
    """Step (b): per element the best ``(t1, t2)`` of the 9 pairs (first of the ties), as int8."""
    best_err = jnp.full(w.shape, jnp.inf, jnp.float32)
    t1 = t2 = jnp.zeros(w.shape, jnp.int8)
    for u, v in _PAIRS:  # a running minimum: memory of one weight, not nine
        err = (w - (u * a1 + v * a2)) ** 2
        better = err < best_err
        best_err = jnp.where(better, err, best_err)
        t1 = jnp.where(better, jnp.int8(u), t1)
        t2 = jnp.where(better, jnp.int8(v), t2)
    return t1, t2


def _error(w, t1, t2, a1, a2):
    """``||w - a1 t1 - a2 t2||^2`` per (group, column), ``(G, 1, N)``."""
    return jnp.sum((w - a1 * t1 - a2 * t2) ** 2, axis=1, keepdims=True)


def _keep_better(new, best):
    """``(better, kept)``: per (group, column) the fit ``(t1, t2, a1, a2, error)`` of lower error (``best`` on
    ties)."""
    better = new[4] < best[4]
    return better, tuple(jnp.where(better, n, b) for n, b in zip(new, best, strict=True))


def _ptqtp(w: jax.Array, ridge: jax.Array, group_size: int, iters: int, ratio_starts: int):
    k, n = w.shape
    w = w.astype(jnp.float32).reshape(k // group_size, group_size, n)
    finite = jnp.all(jnp.isfinite(w), axis=1, keepdims=True)
    w = jnp.where(finite, w, 0.0)
    peak = jnp.max(jnp.abs(w), axis=1, keepdims=True)
    norm = jnp.where(peak > 0, peak, 1.0)
    w = w / norm  # each (group, column) fitted at unit peak: no overflow or underflow in the squares

    f1 = _ternary(w)
    a1 = _fit_one(f1, w)
    residual = w - a1 * f1
    f2 = _ternary(residual)
    a2 = _fit_one(f2, residual)
    t1, t2 = f1.astype(jnp.int8), f2.astype(jnp.int8)
    greedy = (t1, t2, a1, a2, _error(w, t1, t2, a1, a2))

    def start(i, best):
        """Ratio start ``rho = i / ratio_starts``: ``a1 = 1 / (1 + rho)`` (the unit peak), ``a2 = rho a1``,
        then (b), (a), (b); kept where it beats the best start so far."""
        rho = i.astype(jnp.float32) / ratio_starts
        a1 = jnp.full(best[2].shape, 1.0, jnp.float32) / (1.0 + rho)
        t1, t2 = _fit_planes(w, a1, rho * a1)
        a1, a2 = _fit_scales(w, t1, t2, ridge)
        t1, t2 = _fit_planes(w, a1, a2)
        return _keep_better((t1, t2, a1, a2, _error(w, t1, t2, a1, a2)), best)[1]

    init = jax.lax.fori_loop(0, ratio_starts + 1, start, greedy) if ratio_starts else greedy

    def cond(carry):
        i, improved, _, _ = carry
        return (i < iters) & improved

    def body(carry):
        i, _, (t1, t2), best = carry
        a1, a2 = _fit_scales(w, t1, t2, ridge)  # (a)
        t1, t2 = _fit_planes(w, a1, a2)  # (b)
        better, best = _keep_better((t1, t2, a1, a2, _error(w, t1, t2, a1, a2)), best)
        return i + 1, jnp.any(better), (t1, t2), best

    _, _, _, (t1, t2, a1, a2, _) = jax.lax.while_loop(cond, body, (0, jnp.bool_(True), (t1, t2), init))
    a1 = jnp.where(finite, a1 * norm, jnp.nan)
    a2 = jnp.where(finite, a2 * norm, jnp.nan)
    t1, t2 = (jnp.where(finite, t, jnp.int8(0)).reshape(k, n) for t in (t1, t2))
    return t1, t2, a1, a2


_ptqtp_jit = jax.jit(_ptqtp, static_argnames=("group_size", "iters", "ratio_starts"))


def ptqtp_layer(w: jax.Array, *, group_size: int = 128, iters: int = 50, ridge: float | jax.Array = 1e-6,
                ratio_starts: int = 16) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """PTQTP of one Dense kernel ``W (K, N)``: ``W ~ a1 T1 + a2 T2`` per group of ``group_size`` rows along
    ``K`` and per column, ``T1, T2 in {-1, 0, 1}`` (module docstring; Xiao et al., "PTQTP: Post-Training
    Quantization to Trit-Plane Representation for Large Language Models", 2025).

    Initialisation: the greedy fit (TWN-threshold ternary rounding of ``W``, its least-squares scale, the same
    on the residual) and ``ratio_starts + 1`` ratio starts ``a2 / a1 = i / ratio_starts`` (0: the greedy fit
    only), the best per (group, column) kept. Then at most ``iters`` rounds of (a) the 2x2 ridge least squares
    of ``(a1, a2)`` per (group, column), ``(S^T S + ridge * tr(S^T S) / 2 * I)^-1 S^T w``, and (b) the best
    of the 9 ``(t1, t2)`` pairs per element; stops early when no (group, column) improves and keeps each
    one's best fit, so the error ``||W - W_hat||_F`` never increases with ``iters``.

    Returns ``(t1, t2, a1, a2)``: planes ``(K, N)`` int8, scales ``(K // group_size, 1, N)`` float32 (the
    ``PerGroup(0, group_size)`` scale layout); :func:`ptqtp_dequantize` gives ``W_hat``. Jitted
    (``group_size``, ``iters`` and ``ratio_starts`` static; ``ridge`` may be traced); works under ``jit``
    and ``vmap`` (a stack of kernels). All-zero groups give zeros; a NaN/inf makes that (group, column)'s
    scales NaN, no other's. Bad arguments raise ``ValueError``.
    """
    _check_layer(w, group_size, iters, ridge, ratio_starts)
    return _ptqtp_jit(jnp.asarray(w), jnp.asarray(ridge, jnp.float32), as_int(group_size), as_int(iters),
                      as_int(ratio_starts))


def ptqtp_dequantize(t1: jax.Array, t2: jax.Array, a1: jax.Array, a2: jax.Array) -> jax.Array:
    """``W_hat[k, n] = a1[j, 0, n] T1[k, n] + a2[j, 0, n] T2[k, n]`` for row ``k`` in group ``j``
    (``g = K / G`` rows per group): the weight :func:`ptqtp_layer`'s trit-planes stand for (Xiao et al.,
    "PTQTP", 2025), float32 ``(K, N)``. Planes ``(K, N)``, scales ``(G, 1, N)`` with ``G`` dividing ``K``."""
    shapes = tuple(jnp.shape(x) for x in (t1, t2, a1, a2))
    ts, _, s, _ = shapes
    ok = (len(ts) == 2 and shapes[1] == ts and len(s) == 3 and shapes[3] == s and s[1] == 1
          and s[2] == ts[1] and s[0] >= 1 and ts[0] % s[0] == 0)
    if not ok:
        raise ValueError(f"ptqtp_dequantize: planes of shapes {shapes[0]}, {shapes[1]} and scales of shapes "
                         f"{shapes[2]}, {shapes[3]}; allowed: both planes (K, N), both scales (G, 1, N) with "
                         "G dividing K (as ptqtp_layer returns them)")
    k, n = ts
    g = k // s[0]
    planes = [jnp.asarray(t).astype(jnp.float32).reshape(s[0], g, n) for t in (t1, t2)]
    w = jnp.asarray(a1, jnp.float32) * planes[0] + jnp.asarray(a2, jnp.float32) * planes[1]
    return w.reshape(k, n)
