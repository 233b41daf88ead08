"""SqueezeLLM: a non-uniform, sensitivity-weighted grid per output column plus a sparse full-precision part.

Kim, Hooper, Gholami, Dong, Li, Shen, Mahoney, Keutzer, "SqueezeLLM: Dense-and-Sparse Quantization",
ICML 2024. For a Dense kernel ``W (K, N)`` (``y = x W``, contraction axis 0), a sensitivity ``F (K, N)``
(the Fisher diagonal, e.g. squared gradients ``g_kn^2`` summed over calibration samples; default all ones),
``b`` bits and an outlier fraction ``f``:

1. dense-and-sparse split: the ``m = round(f K N)`` weights of largest ``|w_kn|`` over the whole matrix
   (ties to the lower flat index ``k N + n``, ``jax.lax.top_k``) form the sparse part ``O``, kept exactly
   (stored as 16-bit values plus their indices) and left out of the grid fit;
2. per output column ``n`` a non-uniform grid ``c_n = (c_n1 .. c_nC)``, ``C = 2^b``, by sensitivity-weighted
   k-means over that column's dense entries ``D_n = {k : (k, n) not in O}``::

       min_{c_n}  J_n(c_n) = sum_{k in D_n} F_kn min_j (w_kn - c_nj)^2

   solved by weighted Lloyd iterations: assign ``a_kn = argmin_j (w_kn - c_nj)^2`` (first index on ties),
   then ``c_nj = sum_{a_kn = j} F_kn w_kn / sum_{a_kn = j} F_kn``; an empty cluster (zero weight) keeps its
   old centroid, so ``J`` never increases (up to float rounding). The paper's Fisher weighting makes the
   grid spend its levels where the loss is sensitive (a second-order approximation of the output loss,
   ``Delta L ~ sum_kn F_kn (w_kn - q_kn)^2``);
3. initialisation (deterministic): the weighted quantiles ``c_nj = Q_n((j + 1/2) / C)`` of column ``n``'s
   dense entries under the weights ``F`` (unweighted when that column's dense sensitivity sums to 0; all
   entries when it has no dense entry), where ``Q_n(p)`` is the smallest ``w`` whose weighted CDF reaches
   ``p``;
4. codes ``a_kn`` (uint8) of the nearest final centroid for every entry, and
   ``W_q = where(O, w, c_{n, a_kn})``.

An all-zero ``W`` gives an all-zero grid (no NaN). The iterations run under ``jit`` in ``lax.fori_loop``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.layout import as_int
from qjax.ptq.layer_args import check_count, check_dense_kernel, finite_number


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SqueezeLayer:
    """A dense-and-sparse quantized ``(K, N)`` kernel (Kim et al., "SqueezeLLM", ICML 2024).

    ``W_q[k, n] = where(outlier_mask, outlier_values, table[n, codes])[k, n]``.

    Fields: ``codes`` uint8 ``(K, N)`` (index of the nearest centroid, also set at outlier positions, where
    it is unused), ``table`` float32 ``(N, 2^bits)`` (one non-uniform grid per output column),
    ``outlier_mask`` bool ``(K, N)``, ``outlier_values`` float32 ``(K, N)`` (0 where not an outlier).
    """

    codes: jax.Array
    table: jax.Array
    outlier_mask: jax.Array
    outlier_values: jax.Array

    def dequantize(self) -> jax.Array:
        """``W_q = where(O, outlier_values, table[n, codes])`` as float32 ``(K, N)``; works under ``jit``."""
        dense = jnp.take_along_axis(self.table.T, self.codes.astype(jnp.int32), axis=0)
        return jnp.where(self.outlier_mask, self.outlier_values, dense)

    def bits_per_weight(self, index_bits: int = 32, table_bits: int = 32, value_bits: int = 16) -> float:
        """Storage in bits per weight, ``(b K N + C N table_bits + m (value_bits + index_bits)) / (K N)``:

        * ``b K N``: one ``b``-bit code per weight (``C = 2^b``; the dense plane keeps outlier positions);
        * ``C N table_bits``: the per-column grids (float32 as stored: 32; the paper's fp16 table: 16);
        * ``m (value_bits + index_bits)``: the ``m`` outliers, a 16-bit value each and its position (COO,
          ``index_bits = 32``: one int32 flat index; the paper's CSR is ``m`` column indices plus ``K + 1``
          row pointers, about the same for small ``m``).

        Eager only (counts the mask).
        """
        named = (("index_bits", index_bits), ("table_bits", table_bits), ("value_bits", value_bits))
        for name, value in named:
            if as_int(value) is None or value < 0:
                raise ValueError(f"bits_per_weight: {name}={value!r}; allowed: an integer >= 0")
        k, n = self.codes.shape
        c = self.table.shape[1]
        b = int(np.log2(c))
        m = int(np.count_nonzero(np.asarray(self.outlier_mask)))
        return (b * k * n + c * n * table_bits + m * (value_bits + index_bits)) / (k * n)



def _check(w, sensitivity, bits, outlier_fraction, iters) -> int:
    """Validate the arguments; return the outlier count ``m = round(f K N)``."""
    shape = check_dense_kernel(w, "squeeze_llm_layer")
    b = as_int(bits)
    if b is None or not 1 <= b <= 8:
        raise ValueError(f"squeeze_llm_layer: bits={bits!r}; allowed: an integer in 1..8 (uint8 codes, "
                         "2^bits centroids per column)")
    if not finite_number(outlier_fraction) or not 0 <= float(outlier_fraction) < 0.5:
        raise ValueError(f"squeeze_llm_layer: outlier_fraction={outlier_fraction!r}; allowed: a number in "
                         "[0, 0.5) (0.0045 keeps 0.45% of the weights in full precision, as in the paper)")
    check_count("squeeze_llm_layer", "iters", iters, 0, "0: the weighted quantile initialisation only")
    if not isinstance(w, jax.core.Tracer) and not np.all(np.isfinite(np.asarray(w, np.float32))):
        raise ValueError("squeeze_llm_layer: the weight holds NaN/inf entries; allowed: a finite weight")
    if sensitivity is not None:
        if jnp.shape(sensitivity) != tuple(shape):
            raise ValueError(f"squeeze_llm_layer: sensitivity of shape {jnp.shape(sensitivity)}; allowed: "
                             f"{tuple(shape)}, the weight's shape (e.g. squared gradients)")
        if not isinstance(sensitivity, jax.core.Tracer):
            s = np.asarray(sensitivity, np.float32)
            if not np.all(np.isfinite(s)):
                raise ValueError("squeeze_llm_layer: sensitivity holds NaN/inf entries; allowed: finite "
                                 "values >= 0")
            if np.any(s < 0):
                raise ValueError(f"squeeze_llm_layer: sensitivity holds negative values (min {s.min():g}); "
                                 "allowed: values >= 0 (a Fisher diagonal / squared gradients)")
    k, n = shape
    return round(float(outlier_fraction) * k * n)


def _assign(w: jax.Array, table: jax.Array) -> jax.Array:
    """Nearest centroid per entry, ``argmin_j (w_kn - table[n, j])^2`` (first on ties), int32 ``(K, N)``."""
    return jnp.argmin((w[:, :, None] - table[None]) ** 2, axis=-1).astype(jnp.int32)


def _objective(w, weight, table) -> jax.Array:
    """``sum_n J_n = sum_kn weight_kn min_j (w_kn - c_nj)^2``, the weighted k-means objective (scalar)."""
    return jnp.sum(weight * jnp.min((w[:, :, None] - table[None]) ** 2, axis=-1))


def _weighted_quantiles(w, weight, c: int) -> jax.Array:
    """Per column the weighted quantiles ``Q_n((j + 1/2) / C)``, ``j = 0 .. C-1``, as ``(N, C)``."""
    order = jnp.argsort(w, axis=0)
    ws = jnp.take_along_axis(w, order, axis=0)
    cdf = jnp.cumsum(jnp.take_along_axis(weight, order, axis=0), axis=0)
    cdf = cdf / jnp.maximum(cdf[-1:], jnp.finfo(jnp.float32).tiny)
    levels = (jnp.arange(c, dtype=jnp.float32) + 0.5) / c
    # the first sorted index whose CDF reaches the level, per column (clipped for rounding at the top)
    idx = jax.vmap(lambda col: jnp.searchsorted(col, levels, side="left"), in_axes=1)(cdf)
    idx = jnp.clip(idx, 0, w.shape[0] - 1)
    return jnp.take_along_axis(ws.T, idx, axis=1)


def _squeeze(w, sensitivity, m: int, bits: int, iters: int):
    """The solver (module docstring): ``(SqueezeLayer, objective history (iters + 1,))``."""
    k, n = w.shape
    c = 2**bits
    w = w.astype(jnp.float32)
    sens = jnp.ones((k, n), jnp.float32) if sensitivity is None else sensitivity.astype(jnp.float32)

    mask = jnp.zeros((k * n,), jnp.bool_)
    if m:
        mask = mask.at[jax.lax.top_k(jnp.abs(w).reshape(-1), m)[1]].set(True)
    mask = mask.reshape(k, n)
    dense = (~mask).astype(jnp.float32)
    weight = sens * dense  # outliers left out of the fit

    # initial weights for the quantiles: F on the dense entries, else the dense entries, else all entries
    has_weight = jnp.sum(weight, axis=0, keepdims=True) > 0
    has_dense = jnp.sum(dense, axis=0, keepdims=True) > 0
    init_weight = jnp.where(has_weight, weight, jnp.where(has_dense, dense, 1.0))
    table = _weighted_quantiles(w, init_weight, c)

    def lloyd(i, carry):
        table, history = carry
        history = history.at[i].set(_objective(w, weight, table))
        onehot = jax.nn.one_hot(_assign(w, table), c, dtype=jnp.float32)  # (K, N, C)
        mass = jnp.sum(weight[:, :, None] * onehot, axis=0)  # (N, C)
        moment = jnp.sum((weight * w)[:, :, None] * onehot, axis=0)
        table = jnp.where(mass > 0, moment / jnp.where(mass > 0, mass, 1.0), table)  # empty: keep
        return table, history

    history = jnp.zeros((iters + 1,), jnp.float32)
    table, history = jax.lax.fori_loop(0, iters, lloyd, (table, history))
    history = history.at[iters].set(_objective(w, weight, table))
    codes = _assign(w, table).astype(jnp.uint8)
    values = jnp.where(mask, w, 0.0)
    return SqueezeLayer(codes, table, mask, values), history


_squeeze_jit = jax.jit(_squeeze, static_argnames=("m", "bits", "iters"))


def squeeze_llm_layer(w: jax.Array, sensitivity: jax.Array | None = None, *, bits: int = 3,
                      outlier_fraction: float = 0.0045, iters: int = 20) -> SqueezeLayer:
    """SqueezeLLM of one Dense kernel ``W (K, N)`` (Kim et al., "SqueezeLLM: Dense-and-Sparse Quantization",
    ICML 2024; module docstring).

    The ``m = round(outlier_fraction K N)`` weights of largest ``|w|`` are kept exactly (sparse part); every
    output column ``n`` gets ``2^bits`` centroids minimizing ``sum_{k in D_n} F_kn min_j (w_kn - c_nj)^2``
    over its dense entries, by ``iters`` weighted Lloyd iterations from the weighted quantiles
    ``Q_n((j + 1/2) / 2^bits)`` (empty clusters keep their centroid). ``sensitivity`` ``F (K, N)`` >= 0 is
    the Fisher diagonal (e.g. squared gradients); ``None``: all ones (plain k-means).

    Jitted (``bits``, ``outlier_fraction``, ``iters`` static; ``w`` and ``sensitivity`` may be traced, their
    value checks then skipped). Raises ``ValueError`` naming a bad argument.
    """
    m = _check(w, sensitivity, bits, outlier_fraction, iters)
    sens = None if sensitivity is None else jnp.asarray(sensitivity)
    layer, _ = _squeeze_jit(jnp.asarray(w), sens, m, as_int(bits), as_int(iters))
    return layer


__all__ = ["SqueezeLayer", "squeeze_llm_layer"]
