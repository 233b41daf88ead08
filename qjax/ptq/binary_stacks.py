"""Binary stacks: a layer's weight as a sum of ~1-bit sign planes with their own scales, fitted without data.

For a Dense kernel ``W (K, N)`` (contraction axis 0), in every group ``G_j`` of ``g`` consecutive rows along
``K`` (``group_size=None``: one group, ``g = K``) and every output column ``n``::

    W[k, n] ~ sum_i s_i[j, n] * B_i[k, n],    B_i in {-1, +1},   k in G_j

:func:`bitstack_layer` (Wang et al., "BitStack: Any-Size Compression of Large Language Models in Variable
Memory Environments", 2024): residual stacks, greedy one after the other. ``R_0 = W``,
``B_i = sign(R_i)``, ``s_i = mean_{G_j} |R_i|`` (for a fixed ``B_i = sign(R_i)`` the least-squares scale
``<B_i, R_i> / <B_i, B_i>``), ``R_{i+1} = R_i - s_i B_i``. Each stack only sees what the earlier ones
left, so the first ``j`` stacks of a fit are exactly the ``j``-stack fit and the error is non-increasing
in ``j`` (each step is the best scale for its sign plane, and ``s = 0`` would keep the error): stacks
can be dropped after the fact (:meth:`BinaryStacks.dequantize` with ``stacks=j``) to shrink the model
without fitting again. (BitStack proper decomposes ``W`` by activation-aware SVD sign/magnitude splits
and sorts the stacks of all layers globally; here only the residual-binary structure is kept.)
(DB-LLM's dual binarization, two sign planes with jointly fitted scales, is the same alternating fit as
PTQTP's over another set of pairs: it is to come as one implementation with :mod:`qjax.ptq.ptqtp`.)

``sign(0) = +1``, so planes are +-1 and an all-zero group gives zero scales (zeros, no NaN). A NaN or inf in a
group makes that (group, column)'s scales NaN (no other group changes). Planes come as ``(k, K, N)`` int8,
scales as ``(k, K / g, 1, N)`` float32 (stack ``i`` in the ``PerGroup(0, g)`` scale layout of a Dense
kernel). Storage: ``k`` bits per weight plus ``k`` scales per (group, column).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels_pallas.layout import as_int
from qjax.ptq.layer_args import check_count, check_dense_kernel, check_group


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BinaryStacks:
    """``k`` binary planes of a ``(K, N)`` kernel with their own scales:
    ``W_hat[r, n] = sum_i scales[i, j, 0, n] * signs[i, r, n]`` for row ``r`` in group ``j``.

    Fields: ``signs`` int8 ``(k, K, N)`` in ``{-1, +1}``, ``scales`` float32 ``(k, G, 1, N)`` (``G`` groups of
    ``K / G`` rows along ``K``).
    """

    signs: jax.Array
    scales: jax.Array

    @property
    def num_stacks(self) -> int:
        """The number of planes ``k``."""
        return self.signs.shape[0]

    def _stacks(self, stacks: int | None, name: str) -> int:
        if stacks is None:
            return self.num_stacks
        j = as_int(stacks)
        if j is None or not 1 <= j <= self.num_stacks:
            raise ValueError(f"{name}: stacks={stacks!r}; allowed: None (all) or an integer in "
                             f"[1, {self.num_stacks}] (the number of stacks kept)")
        return j

    def dequantize(self, stacks: int | None = None) -> jax.Array:
        """``W_hat = sum_{i < stacks} s_i B_i`` as float32 ``(K, N)``, the first ``stacks`` planes only
        (``None``: all). For :func:`bitstack_layer` this equals a fresh fit with that many stacks (greedy
        residuals), so dropping stacks shrinks the model without fitting again. Works under ``jit``
        (``stacks`` a Python int)."""
        j = self._stacks(stacks, "BinaryStacks.dequantize")
        _, k, n = self.signs.shape
        groups = self.scales.shape[1]
        planes = self.signs[:j].astype(jnp.float32).reshape(j, groups, k // groups, n)
        return jnp.sum(self.scales[:j].astype(jnp.float32) * planes, axis=0).reshape(k, n)

    def bits_per_weight(self, stacks: int | None = None, scale_bits: int = 16) -> float:
        """Storage in bits per weight of the first ``stacks`` planes (``None``: all),
        ``stacks * (K N + G N scale_bits) / (K N) = stacks * (1 + scale_bits / g)``: one bit per weight and
        one ``scale_bits``-bit scale per (group, column) per stack (16: bfloat16 / float16 scales)."""
        j = self._stacks(stacks, "BinaryStacks.bits_per_weight")
        if as_int(scale_bits) is None or scale_bits < 0:
            raise ValueError(f"BinaryStacks.bits_per_weight: scale_bits={scale_bits!r}; allowed: an "
                             "integer >= 0 (16: bfloat16 scales)")
        _, k, n = self.signs.shape
        groups = self.scales.shape[1]
        return j * (k * n + groups * n * as_int(scale_bits)) / (k * n)


def _check_layer(name: str, w, group_size, **counts: tuple[object, int, str]) -> int:
    """Validate the weight, ``group_size`` and integer ``counts`` (``name: (value, minimum, hint)``); return
    the group size ``g``."""
    shape = check_dense_kernel(w, name)
    g = check_group(name, group_size, shape[0], allow_none=True)
    for arg, (value, low, hint) in counts.items():
        check_count(name, arg, value, low, hint)
    return g


def _sign(x: jax.Array) -> jax.Array:
    """``sign(x)`` with ``sign(0) = +1`` as int8 (NaN -> -1; its group's scale is NaN anyway)."""
    return jnp.where(x >= 0, jnp.int8(1), jnp.int8(-1))


def _residual(w: jax.Array, stacks: int):
    """Greedy residual stacks of grouped ``w (G, g, N)``: planes ``(k, G, g, N)``, scales ``(k, G, 1, N)``."""
    residual = w
    signs, scales = [], []
    for _ in range(stacks):
        b = _sign(residual)
        s = jnp.mean(jnp.abs(residual), axis=1, keepdims=True)
        signs.append(b)
        scales.append(s)
        residual = residual - s * b.astype(jnp.float32)
    return jnp.stack(signs), jnp.stack(scales)


def _bitstack(w: jax.Array, group_size: int, stacks: int) -> BinaryStacks:
    k, n = w.shape
    signs, scales = _residual(w.astype(jnp.float32).reshape(k // group_size, group_size, n), stacks)
    return BinaryStacks(signs.reshape(stacks, k, n), scales)


_bitstack_jit = jax.jit(_bitstack, static_argnames=("group_size", "stacks"))


def bitstack_layer(w: jax.Array, *, stacks: int = 4, group_size: int | None = None) -> BinaryStacks:
    """BitStack-style residual binary stacks of one Dense kernel ``W (K, N)`` (module docstring; Wang et al.,
    "BitStack: Any-Size Compression of Large Language Models in Variable Memory Environments", 2024):
    ``W ~ sum_{i < stacks} s_i sign(R_i)``, ``R_0 = W``, ``R_{i+1} = R_i - s_i sign(R_i)``, with
    ``s_i = mean|R_i|`` (the least-squares scale) per output column, or per group of ``group_size`` rows
    along ``K`` and column.

    Greedy: the first ``j`` stacks of a fit are the ``j``-stack fit, the error ``||W - W_hat||_F`` is
    non-increasing in ``j``, and :meth:`BinaryStacks.dequantize` with ``stacks=j`` drops the rest after the
    fact. Jitted (``stacks``, ``group_size`` static); works under ``jit`` and ``vmap``. All-zero groups give
    zero scales. Bad arguments raise ``ValueError``.
    """
    g = _check_layer("bitstack_layer", w, group_size, stacks=(stacks, 1, "the number of 1-bit stacks, 4"))
    return _bitstack_jit(jnp.asarray(w), g, as_int(stacks))
