"""PB-LLM: keep a small salient fraction of a layer's weights in 8 bits and binarize all the others.

Shang, Yuan, Wu, Yan, Dong, "PB-LLM: Partially Binarized Large Language Models", ICLR 2024. For a Dense
kernel ``W (K, N)`` (``y = x W``, contraction axis 0) and a salient fraction ``f``:

1. salient set ``S``: the ``m = round(f K N)`` weights of largest salience over the whole matrix, by
   magnitude ``|w_kn|`` or, given the Hessian ``H = 2 X^T X / n`` of the layer's calibration inputs, by
   ``w_kn^2 / [H^-1]_kk^2`` (the OBS/SparseGPT criterion the paper uses; ``H`` dampened as in GPTQ,
   ``H += damp * mean(diag H) I``). Ties go to the lower flat index ``k N + n`` (``jax.lax.top_k``);
2. salient weights in 8 bits: ``c = clip(round(w / s), -127, 127)`` int8 with one absmax scale per output
   column over that column's salient entries, ``s_n = max_{k in S_n} |w_kn| / 127``;
3. the others binarized per output column over that column's non-salient entries ``B_n``:
   ``q_kn = alpha_n sign(w_kn - mu_n) + mu_n``, ``mu_n = mean_{B_n} w``, ``alpha_n = mean_{B_n} |w - mu_n|``
   (for a fixed ``mu`` the least-squares scale of ``sign(w - mu)``); ``sign(0) = +1``, so codes are +-1;
4. ``compensate=True`` (the paper's PTQ variant, GPTQ-style): the salient mask and the column statistics
   ``mu, alpha, s`` are fixed from the original weight beforehand; rows are then quantized in order, in
   blocks of ``block_size`` rows, each row by (2) where salient and by (3) elsewhere, with
   ``U = chol(H^-1)^T`` and each row's error ``e_k = (w_k - q_k) / U_kk`` spread onto the later rows
   ``w_j -= U_kj e_k`` (lazily per block, as in :mod:`qjax.ptq.gptq`), which lowers the output error
   ``tr((W - W_q)^T H (W - W_q))`` rather than the weight error. Salient codes of error-updated rows are
   clipped to +-127.

A dead input (``H_kk = 0``) gets ``H_kk = 1`` and a Hessian that is 0 everywhere is replaced by ``I`` (no
error moves: plain PB-LLM); the weights themselves are never zeroed. An all-zero ``W`` gives zeros.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qjax.ptq.layer_args import check_dense_kernel, finite_number

_SALIENCE = ("magnitude", "hessian")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PBLayer:
    """A partially binarized ``(K, N)`` kernel (Shang et al., "PB-LLM", ICLR 2024).

    ``W_q = where(salient_mask, salient_codes * salient_scale, alpha * binary + mu)``.

    Fields: ``binary`` int8 +-1 ``(K, N)`` (``sign(w - mu)``, also set at salient positions, where it is
    unused), ``alpha`` and ``mu`` float32 ``(1, N)``, ``salient_mask`` bool ``(K, N)``, ``salient_codes``
    int8 ``(K, N)`` (0 where not salient), ``salient_scale`` float32 ``(1, N)``.
    """

    binary: jax.Array
    alpha: jax.Array
    mu: jax.Array
    salient_mask: jax.Array
    salient_codes: jax.Array
    salient_scale: jax.Array

    def dequantize(self) -> jax.Array:
        """``W_q = where(S, c * s, alpha * b + mu)`` as float32 ``(K, N)``; works under ``jit``."""
        sparse = self.salient_codes.astype(jnp.float32) * self.salient_scale
        dense = self.alpha * self.binary.astype(jnp.float32) + self.mu
        return jnp.where(self.salient_mask, sparse, dense)

    def real_bits_per_weight(self, index_bits: str | int = "bitmap", scale_bits: int = 32) -> float:
        """Storage in bits per weight, ``(b_bin + b_sal + b_idx + b_scale) / (K N)`` with ``m`` salient:

        * ``b_bin = K N - m``: 1 bit per binarized weight (the binary plane skips salient positions);
        * ``b_sal = 8 m``: one int8 value per salient weight;
        * ``b_idx``: the salient positions, ``index_bits="bitmap"``: a ``K N``-bit mask (1 bit per weight),
          or an integer ``b``: ``b m`` (COO, e.g. ``b = 32`` for one int32 flat index per salient weight);
        * ``b_scale = 3 N scale_bits``: ``alpha``, ``mu`` and ``salient_scale`` per column (float32: 32).

        The paper's headline count ``8 f + (1 - f)`` leaves out ``b_idx`` and ``b_scale``. Eager only.
        """
        if not (index_bits == "bitmap" or (isinstance(index_bits, int) and not isinstance(index_bits, bool)
                                           and index_bits > 0)):
            raise ValueError(f"real_bits_per_weight: index_bits={index_bits!r}; allowed: 'bitmap' (K*N bits) "
                             "or a positive integer of bits per salient position (32: int32 COO indices)")
        if isinstance(scale_bits, bool) or not isinstance(scale_bits, int) or scale_bits < 0:
            raise ValueError(f"real_bits_per_weight: scale_bits={scale_bits!r}; allowed: an integer >= 0")
        k, n = self.binary.shape
        m = int(np.count_nonzero(np.asarray(self.salient_mask)))
        index = k * n if index_bits == "bitmap" else index_bits * m
        return ((k * n - m) + 8 * m + index + 3 * n * scale_bits) / (k * n)



def _check(w, hessian, salient_fraction, salience, compensate, block_size, damp) -> int:
    """Validate the arguments; return the salient count ``m = round(f K N)``."""
    shape = check_dense_kernel(w, "pb_llm_layer")
    if not finite_number(salient_fraction) or not 0 <= float(salient_fraction) < 1:
        raise ValueError(f"pb_llm_layer: salient_fraction={salient_fraction!r}; allowed: a number in [0, 1) "
                         "(0.1 keeps 10% of the weights in 8 bits)")
    if salience not in _SALIENCE:
        raise ValueError(f"pb_llm_layer: salience={salience!r}; allowed: {', '.join(map(repr, _SALIENCE))}")
    if not isinstance(compensate, bool):
        raise ValueError(f"pb_llm_layer: compensate={compensate!r}; allowed: True or False")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"pb_llm_layer: block_size={block_size!r}; allowed: a positive integer (128)")
    if not isinstance(damp, jax.core.Tracer) and not (finite_number(damp) and float(damp) >= 0):
        raise ValueError(f"pb_llm_layer: damp={damp!r}; allowed: a finite number >= 0 (0.01 as in GPTQ)")
    k, n = shape
    needs = [why for why, used in (("salience='hessian'", salience == "hessian"),
                                   ("compensate=True", compensate)) if used]
    if hessian is None:
        if needs:
            raise ValueError(f"pb_llm_layer: hessian=None with {' and '.join(needs)}; allowed: a ({k}, {k}) "
                             "Hessian H = 2 X^T X / n of the layer's inputs")
    elif jnp.shape(hessian) != (k, k):
        raise ValueError(f"pb_llm_layer: hessian of shape {jnp.shape(hessian)}; allowed: ({k}, {k}) for a "
                         f"weight of shape {tuple(shape)}")
    return round(float(salient_fraction) * k * n)


def _prepare_hessian(hessian: jax.Array, damp: jax.Array) -> jax.Array:
    """GPTQ's treatment: dead inputs ``H_kk = 1``, an all-zero ``H`` -> ``I``, then
    ``H += damp mean(diag H) I``."""
    k = hessian.shape[0]
    h = hessian.astype(jnp.float32)
    dead = jnp.diag(h) == 0
    no_input = jnp.all(dead)
    h = jnp.where(no_input, jnp.eye(k, dtype=jnp.float32), h + jnp.diag((dead & ~no_input).astype(h.dtype)))
    return h + damp * jnp.mean(jnp.diag(h)) * jnp.eye(k, dtype=jnp.float32)


def _quant(w, mask, alpha, mu, scale):
    """Rows ``w`` quantized by rule (2) where ``mask``, by (3) elsewhere: ``(q, binary, salient codes)``."""
    binary = jnp.where(w - mu >= 0, jnp.int8(1), jnp.int8(-1))
    codes = jnp.clip(jnp.round(w / jnp.where(scale > 0, scale, 1.0)), -127, 127)
    codes = jnp.where(mask, codes, 0.0).astype(jnp.int8)
    q = jnp.where(mask, codes.astype(jnp.float32) * scale, alpha * binary.astype(jnp.float32) + mu)
    return q, binary, codes


def _pb_llm(w, hessian, damp, m: int, salience: str, compensate: bool, block_size: int):
    k, n = w.shape
    w = w.astype(jnp.float32)
    ok = jnp.bool_(True)
    if hessian is not None:
        h = _prepare_hessian(hessian, damp)
        chol = jnp.linalg.cholesky(h)
        hinv = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(k, dtype=jnp.float32))
        ok = jnp.all(jnp.isfinite(hinv))
    if salience == "hessian":
        score = w**2 / jnp.diag(hinv)[:, None] ** 2
    else:
        score = jnp.abs(w)
    mask = jnp.zeros((k * n,), jnp.bool_)
    if m:
        mask = mask.at[jax.lax.top_k(score.reshape(-1), m)[1]].set(True)
    mask = mask.reshape(k, n)

    rest = (~mask).astype(jnp.float32)
    count = jnp.sum(rest, axis=0, keepdims=True)
    mu = jnp.sum(w * rest, axis=0, keepdims=True) / jnp.maximum(count, 1.0)
    alpha = jnp.sum(jnp.abs(w - mu) * rest, axis=0, keepdims=True) / jnp.maximum(count, 1.0)
    scale = jnp.max(jnp.where(mask, jnp.abs(w), 0.0), axis=0, keepdims=True) / 127.0

    if not compensate:
        _, binary, codes = _quant(w, mask, alpha, mu, scale)
        return PBLayer(binary, alpha, mu, mask, codes, scale), ok

    bsz = min(block_size, k)
    kp = -(-k // bsz) * bsz
    pad = kp - k
    wp = jnp.pad(w, ((0, pad), (0, 0)))
    maskp = jnp.pad(mask, ((0, pad), (0, 0)))
    hp = jnp.pad(h, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(kp) >= k).astype(jnp.float32)
    hinvp = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(hp), True), jnp.eye(kp, dtype=jnp.float32))
    u = jnp.linalg.cholesky(hinvp).T  # upper: u[i, j] = 0 for j < i
    ok = ok & jnp.all(jnp.isfinite(u))

    def block(b, carry):
        wp, binary, codes = carry
        b0 = b * bsz
        u_block = jax.lax.dynamic_slice(u, (b0, b0), (bsz, bsz))

        def row(i, inner):
            block_w, err, binary, codes = inner
            r = block_w[i]
            q, bin_row, code_row = _quant(r[None], maskp[b0 + i][None], alpha, mu, scale)
            e = (r - q[0]) / u_block[i, i]
            block_w = block_w - u_block[i][:, None] * e[None, :]
            binary = binary.at[b0 + i].set(bin_row[0])
            return block_w, err.at[i].set(e), binary, codes.at[b0 + i].set(code_row[0])

        block_w = jax.lax.dynamic_slice(wp, (b0, 0), (bsz, n))
        inner = (block_w, jnp.zeros((bsz, n), jnp.float32), binary, codes)
        _, err, binary, codes = jax.lax.fori_loop(0, bsz, row, inner)
        u_rows = jax.lax.dynamic_slice(u, (b0, 0), (bsz, kp))
        return wp - u_rows.T @ err, binary, codes

    init = (wp, jnp.ones((kp, n), jnp.int8), jnp.zeros((kp, n), jnp.int8))
    _, binary, codes = jax.lax.fori_loop(0, kp // bsz, block, init)
    return PBLayer(binary[:k], alpha, mu, mask, codes[:k], scale), ok


_pb_llm_jit = jax.jit(_pb_llm, static_argnames=("m", "salience", "compensate", "block_size"))


def pb_llm_layer(w: jax.Array, hessian: jax.Array | None = None, *, salient_fraction: float = 0.1,
                 salience: str = "magnitude", compensate: bool = False, block_size: int = 128,
                 damp: float | jax.Array = 0.01) -> PBLayer:
    """PB-LLM of one Dense kernel ``W (K, N)`` (Shang et al., "PB-LLM: Partially Binarized Large Language
    Models", ICLR 2024; module docstring).

    The ``m = round(salient_fraction K N)`` most salient weights (``|w|``, or ``w^2 / [H^-1]_kk^2`` with
    ``salience="hessian"``, ``H += damp mean(diag H) I``) are stored as int8 ``c = round(w / s)`` with
    ``s_n = max_{S_n} |w| / 127`` per output column; the rest as ``alpha_n sign(w - mu_n) + mu_n`` with
    ``mu_n = mean_{B_n} w`` and ``alpha_n = mean_{B_n} |w - mu_n|`` over column ``n``'s non-salient
    entries. ``compensate=True`` quantizes rows in order and spreads each row's error
    ``e_k = (w_k - q_k) / U_kk`` onto later rows, ``w_j -= U_kj e_k``, ``U = chol(H^-1)^T`` (GPTQ), mask and
    column statistics fixed from the original weight.

    ``hessian`` ``(K, K)`` (``H = 2 X^T X / n``) is needed for ``salience="hessian"`` and for
    ``compensate=True``. Jitted (``salient_fraction``, ``salience``, ``compensate``, ``block_size`` static;
    ``w``, ``hessian``, ``damp`` may be traced). Raises ``ValueError`` naming a bad argument, and, unless
    traced, when the Hessian holds NaN/inf or its dampened inverse is not finite (raise ``damp``).
    """
    m = _check(w, hessian, salient_fraction, salience, compensate, block_size, damp)
    used = hessian if (salience == "hessian" or compensate) else None
    traced = any(isinstance(a, jax.core.Tracer) for a in (w, used, damp))
    if used is not None and not traced and not np.all(np.isfinite(np.asarray(used))):
        raise ValueError("pb_llm_layer: the Hessian holds NaN/inf entries; allowed: a finite Hessian from "
                         "finite calibration inputs")
    layer, ok = _pb_llm_jit(jnp.asarray(w), None if used is None else jnp.asarray(used),
                            jnp.asarray(damp, jnp.float32), m, salience, compensate, block_size)
    if not traced and not bool(ok):
        raise ValueError(f"pb_llm_layer: the dampened Hessian is not positive definite (its inverse is not "
                         f"finite) with damp={float(damp)}; allowed: a larger damp, e.g. 0.1")
    return layer


__all__ = ["PBLayer", "pb_llm_layer"]

