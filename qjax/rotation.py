"""Hadamard rotations for incoherence processing: ``y = x W = (x R)(R^T W)`` for an orthogonal ``R``.

A randomized Hadamard transform ``R = diag(s) H / sqrt(n)`` (random signs ``s`` in ``{-1, +1}``, ``H`` a
Hadamard matrix: entries ``+-1``, ``H H^T = n I``) is orthogonal, so rotating a linear layer's input by ``R``
and its weight by ``R^T`` leaves the layer's output unchanged, while both rotated factors have their large
outlier channels spread over all channels: they quantize with a smaller error. QuIP# (Tseng et al.,
"QuIP#: Even Better LLM Quantization with Hadamard Incoherence and Lattice Codebooks", 2024) rotates weights
for incoherence; QuaRot (Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", 2024)
rotates a decoder's residual stream offline and adds online Hadamards; HALO (Ashkboos et al., 2025) and
Quartet (Castro et al., 2025) rotate in low-precision training. This module is the math: the matrices and
the rotation; folding rotations into a model is the post-training code's job.

Hadamard matrices (:func:`hadamard_matrix`):

- ``n = 2^k``: Sylvester's ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]`` (J. J. Sylvester, "Thoughts on
  inverse orthogonal matrices", 1867), ``H[i, j] = (-1)^popcount(i & j)``;
- ``m`` in :data:`HADAMARD_ORDERS` (12, 20, 24, 28, 36, ...): Paley's constructions from the quadratic
  characters ``chi`` of a prime ``q`` (R. E. A. C. Paley, "On orthogonal matrices", J. Math. Phys. 12,
  1933), with the Jacobsthal matrix ``Q[i, j] = chi(j - i mod q)``, ``Q Q^T = q I - J``:
  Paley I for ``q = 3 mod 4``, order ``q + 1``: ``H = I + [[0, 1^T], [-1, Q]]``;
  Paley II for ``q = 1 mod 4``, order ``2(q + 1)``: with ``S = [[0, 1^T], [1, Q]]``,
  ``H = S (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]``;
- ``n = m 2^k``: the Kronecker product ``H_m (x) H_{2^k}``.

:data:`HADAMARD_ORDERS` holds, for each odd number, the smallest Paley order (at most
:data:`MAX_PALEY_ORDER`, not a power of two) with that odd part. A width with no construction here (LLaMA-2's
11008 = 2^8 * 43, say) is rotated block-diagonally: ``I_{n/b} (x) H_b`` for the widest block ``b`` dividing
``n`` that has one (QuaRot and QuIP# also use such fallbacks).

Applying a rotation never forms the ``n x n`` matrix: ``x R`` reshapes ``x (..., n)`` to ``(..., n/b, m,
2^k)``, runs the fast Walsh-Hadamard transform (:func:`kernels_pallas.hadamard_transform`, ``O(n log n)``
additions) on the ``2^k`` axis and a small dense ``m x m`` matmul on the ``m`` axis. The backend argument
picks the FWHT's implementation (``"auto"``: the Pallas kernel on TPU / GPU, the jnp reference on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np

import kernels_pallas
from kernels_pallas.backends import BACKENDS

MAX_PALEY_ORDER = 256  # the largest dense factor m of a Kronecker Hadamard: m multiply-adds per element


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _odd_part(n: int) -> int:
    return n // (n & -n)


def _paley_table() -> dict[int, tuple[int, int]]:
    """odd part -> ``(m, q)``: the smallest Paley order ``m <= MAX_PALEY_ORDER`` (from the prime ``q``) with
    that odd part, powers of two left out (Sylvester has them); Paley I wins a tie."""
    table: dict[int, tuple[int, int]] = {}
    for q in range(3, MAX_PALEY_ORDER, 2):
        if not _is_prime(q):
            continue
        m = q + 1 if q % 4 == 3 else 2 * (q + 1)
        odd = _odd_part(m)
        if m > MAX_PALEY_ORDER or odd == 1:
            continue
        if odd not in table or m < table[odd][0] or (m == table[odd][0] and q % 4 == 3):
            table[odd] = (m, q)
    return table


_PALEY = _paley_table()
HADAMARD_ORDERS: tuple[int, ...] = tuple(sorted(m for m, _ in _PALEY.values()))
"""The orders ``m`` (not powers of two) of the Paley matrices this module builds; with Sylvester's, every
``n = m 2^k`` (and ``n = 2^k``) has a Hadamard matrix here."""


@functools.cache
def _paley(q: int) -> np.ndarray:
    """Paley's Hadamard matrix from the prime ``q`` (module docstring), int8, read-only."""
    chi = -np.ones(q, np.int64)
    chi[0] = 0
    chi[np.arange(1, q) ** 2 % q] = 1  # the quadratic residues
    i = np.arange(q)
    jacobsthal = chi[(i[None, :] - i[:, None]) % q]
    ones = np.ones((q, 1), np.int64)
    if q % 4 == 3:  # Paley I: Q is skew, I + S with S skew and S S^T = q I
        s = np.block([[np.zeros((1, 1), np.int64), ones.T], [-ones, jacobsthal]])
        h = np.eye(q + 1, dtype=np.int64) + s
    else:  # Paley II: Q is symmetric
        s = np.block([[np.zeros((1, 1), np.int64), ones.T], [ones, jacobsthal]])
        h = np.kron(s, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), [[1, -1], [-1, -1]])
    h = h.astype(np.int8)
    h.flags.writeable = False
    return h


def _sylvester(p: int) -> np.ndarray:
    h = np.ones((1, 1), np.int8)
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


def _factor(n: int) -> tuple[int, int] | None:
    """``(m, p)`` with ``n = m p``, ``p`` a power of two and ``m = 1`` or in :data:`HADAMARD_ORDERS`; ``None``
    where this module has no Hadamard matrix of order ``n``."""
    odd = _odd_part(n)
    if odd == 1:
        return 1, n
    if odd not in _PALEY or n % _PALEY[odd][0]:
        return None
    m = _PALEY[odd][0]
    return m, n // m


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small) | {n // d for d in small}, reverse=True)


def _widest_block(n: int) -> int:
    return next(b for b in _divisors(n) if _factor(b) is not None)


def _as_width(n, who: str, name: str = "n") -> int:
    if isinstance(n, bool | np.bool_):
        raise TypeError(f"{who}: {name}={n!r} is a bool; allowed: a positive int")
    try:
        value = operator.index(n)
    except TypeError:
        raise TypeError(f"{who}: {name}={n!r} is a {type(n).__name__}; allowed: a positive int") from None
    if value < 1:
        raise ValueError(f"{who}: {name}={n!r}; allowed: a positive int")
    return value


def _no_construction(n: int) -> str:
    p = n & -n
    why = (f" (no Hadamard matrix of order {n} exists: beyond 1 and 2 the order is a multiple of 4)"
           if n > 2 and n % 4 else "")
    return (f"no Hadamard matrix of order {n} = {p} * {n // p} is constructed here{why}; allowed: orders "
            f"2^k * m with m = 1 (Sylvester) or m in {HADAMARD_ORDERS} (Paley); of the divisors of {n}, "
            f"{_allowed_blocks(n)} have one, and random_hadamard({n}, key) rotates block-diagonally with "
            f"blocks of {_widest_block(n)}")


def hadamard_matrix(n: int, dtype=np.float32) -> np.ndarray:
    """A Hadamard matrix ``H`` of order ``n``: an ``(n, n)`` numpy array of ``+-1`` with ``H H^T = n I``.

    ``n = 2^k``: Sylvester's matrix (1867), ``H[i, j] = (-1)^popcount(i & j)``; ``n = m 2^k`` with ``m``
    in :data:`HADAMARD_ORDERS`: ``H_m (x) H_{2^k}`` with ``H_m`` Paley's matrix (1933) (module docstring).
    This is the ``H`` that :class:`Rotation` applies with the fast transform. Other ``n`` raise
    ``ValueError``; a non-integer ``n`` raises ``TypeError``. ``dtype``: the array's dtype (float32 holds
    ``H H^T`` exactly). The matrix is dense (``n^2`` entries), for checks and small ``n``; a
    :class:`Rotation` never builds it.
    """
    n = _as_width(n, "hadamard_matrix")
    factors = _factor(n)
    if factors is None:
        raise ValueError(f"hadamard_matrix: {_no_construction(n)}")
    m, p = factors
    h = _sylvester(p) if m == 1 else np.kron(_paley(_PALEY[_odd_part(m)][1]), _sylvester(p))
    return h.astype(dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class Rotation:
    """An orthogonal Hadamard rotation of width ``n``: ``R = diag(signs) (I_{n/b} (x) H_b) / sqrt(b)``.

    ``H_b`` is :func:`hadamard_matrix` ``(b)``, ``b = block``: ``b = n`` (``R = diag(s) H / sqrt(n)``, QuIP#'s
    and QuaRot's randomized Hadamard transform) where ``n`` has a construction, else the widest block
    dividing ``n`` that has one (block-diagonal). ``inverted``: the rotation is ``R^T = R^{-1}`` instead.
    ``signs`` (``(n,)`` of ``+-1``) is the pytree leaf; ``n``, ``block``, ``inverted`` and ``backend`` (the
    FWHT's, :func:`kernels_pallas.hadamard_transform`) are static. Build one with :func:`random_hadamard`
    or :func:`hadamard_rotation`; a stack of them (``jax.vmap(random_hadamard)``) applies under ``vmap``.

    For a linear layer ``y = x W``, ``W`` of shape ``(n, out)``: ``apply(x) @ rotate_weight(W) == x @ W`` up
    to float rounding.
    """

    signs: jax.Array
    n: int
    block: int
    inverted: bool = False
    backend: str = "auto"

    def __post_init__(self):
        n = _as_width(self.n, "Rotation")
        block = _as_width(self.block, "Rotation", "block")
        if n % block or _factor(block) is None:
            raise ValueError(f"Rotation: block={block!r} for n={n}: {_block_problem(n, block)}")
        if not isinstance(self.inverted, bool):
            raise TypeError(f"Rotation: inverted={self.inverted!r}; allowed: True or False")
        if self.backend not in BACKENDS:
            raise ValueError(f"Rotation: unknown backend {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "block", block)

    @property
    def blocks(self) -> int:
        """How many diagonal blocks ``H_b``: ``n // block`` (1 for a full Hadamard rotation)."""
        return self.n // self.block

    def inverse(self) -> Rotation:
        """The inverse rotation ``R^{-1} = R^T`` (same signs, ``inverted`` flipped)."""
        return dataclasses.replace(self, inverted=not self.inverted)

    def apply(self, x: jax.Array) -> jax.Array:
        """``x R`` on the last axis of a float ``x (..., n)``, in ``x``'s dtype: ``(x * signs)`` times
        ``I (x) H_b / sqrt(b)`` by the fast Walsh-Hadamard transform and a small dense factor (``x R^T =
        (x (I (x) H_b^T) / sqrt(b)) * signs`` when ``inverted``). Works under ``jit``, ``grad``, ``vmap``."""
        x = _float_array(x, "Rotation.apply", "x")
        if x.shape[-1] != self.n:
            raise ValueError(f"Rotation.apply: x of shape {x.shape} has {x.shape[-1]} features on its last "
                             f"axis; allowed: x of shape (..., {self.n}) for this width-{self.n} rotation")
        return _rotate(self._signs(), x, self.block, self.inverted, self.backend)

    def rotate_weight(self, w: jax.Array, axis: int = 0) -> jax.Array:
        """``R^T W`` for the weight of ``y = x W`` whose input axis ``axis`` has length ``n`` (``W (n, out)``
        of a Dense layer: ``axis=0``), so ``apply(x) @ rotate_weight(W) == x @ W``; computed as
        ``(W^T R)^T`` with the fast transform. Works under ``jit``, ``grad``, ``vmap``."""
        w = _float_array(w, "Rotation.rotate_weight", "w")
        if not isinstance(axis, int) or isinstance(axis, bool) or not -w.ndim <= axis < w.ndim:
            raise ValueError(f"Rotation.rotate_weight: axis={axis!r} for a weight of rank {w.ndim}; "
                             f"allowed: an int in [{-w.ndim}, {w.ndim - 1}]")
        if w.shape[axis] != self.n:
            raise ValueError(f"Rotation.rotate_weight: w of shape {w.shape} has {w.shape[axis]} input "
                             f"features on axis {axis}; allowed: {self.n} there (a Dense weight of shape "
                             f"({self.n}, out) for y = x W)")
        return jnp.moveaxis(self.apply(jnp.moveaxis(w, axis, -1)), -1, axis)

    def matrix(self, dtype=jnp.float32) -> jax.Array:
        """The dense ``(n, n)`` matrix ``R`` (``R^T`` when ``inverted``): ``apply`` of the identity."""
        return self.apply(jnp.eye(self.n, dtype=dtype))

    def _signs(self) -> jax.Array:
        signs = jnp.asarray(self.signs)
        if signs.shape != (self.n,):
            raise ValueError(f"Rotation: signs of shape {signs.shape}; allowed: ({self.n},) (a stack of "
                             "rotations applies under jax.vmap, one rotation per call)")
        return signs


jax.tree_util.register_dataclass(Rotation, data_fields=["signs"],
                                 meta_fields=["n", "block", "inverted", "backend"])


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _rotate(signs: jax.Array, x: jax.Array, block: int, inverted: bool, backend: str) -> jax.Array:
    """``x R`` (``x R^T`` if ``inverted``), ``R = diag(signs) (I (x) H_b) / sqrt(b)``: one compiled program
    per shape and setting."""
    signs = signs.astype(x.dtype)
    if not inverted:
        return _hadamard(x * signs, block, False, backend)
    return _hadamard(x, block, True, backend) * signs


def _hadamard(x: jax.Array, block: int, transpose: bool, backend: str) -> jax.Array:
    """``x (I_{n/b} (x) H_b) / sqrt(b)`` (``H_b^T`` if ``transpose``), ``H_b = H_m (x) H_p``: the FWHT on the
    ``p`` axis, a dense ``m x m`` product on the ``m`` axis."""
    m, p = _factor(block)
    lead, n = x.shape[:-1], x.shape[-1]
    y = x.astype(jnp.promote_types(x.dtype, jnp.float32)).reshape(*lead, n // block, m, p)
    if p > 1:
        y = kernels_pallas.hadamard_transform(y, backend=backend)
    if m > 1:
        h = hadamard_matrix(m, np.float64) / math.sqrt(m)
        h = jnp.asarray(h.T if transpose else h, y.dtype)
        y = jnp.einsum("...ip,ij->...jp", y, h, precision=jax.lax.Precision.HIGHEST)
    return y.reshape(*lead, n).astype(x.dtype)


def _block_problem(n: int, block: int) -> str:
    if n % block:
        return f"{block} does not divide n; allowed: None or one of {_allowed_blocks(n)}"
    return f"{_no_construction(block)}; allowed blocks for n={n}: None or one of {_allowed_blocks(n)}"


def _allowed_blocks(n: int) -> list[int]:
    return [b for b in _divisors(n) if _factor(b) is not None][:8]


def _float_array(x, who: str, name: str) -> jax.Array:
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{who}: {name} is a {type(x).__name__}; allowed: an array (jax.Array or "
                        "numpy.ndarray)")
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{who}: {name} of shape {x.shape} and dtype {x.dtype}; allowed: a float array "
                         "(float32, bfloat16, float16, float64) with at least one axis")
    return jnp.asarray(x)


def _check_key(key, who: str) -> None:
    if hasattr(key, "dtype") and hasattr(key, "shape"):
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ():
            return
        raw = jax.eval_shape(lambda: jax.random.PRNGKey(0))
        if key.dtype == raw.dtype and key.shape == raw.shape:
            return
        what = f"an array of shape {key.shape} and dtype {key.dtype}"
    else:
        what = f"{key!r} of type {type(key).__name__}"
    raise TypeError(f"{who}: key is {what}; allowed: one PRNG key, jax.random.key(seed) (or the raw "
                    f"uint32 jax.random.PRNGKey(seed)); for several rotations, jax.vmap over keys")


def default_block(n: int) -> int:
    """The block :func:`random_hadamard` takes for width ``n`` when none is asked for: ``n`` where it has a
    Hadamard construction, else the widest divisor of ``n`` that has one."""
    return _check_block(_as_width(n, "default_block"), None, "default_block")


def _check_block(n: int, block, who: str) -> int:
    if block is None:
        return _widest_block(n)
    block = _as_width(block, who, "block")
    if n % block or _factor(block) is None:
        raise ValueError(f"{who}: block={block} for n={n}: {_block_problem(n, block)}")
    return block


@functools.partial(jax.jit, static_argnums=1)
def _random_signs(key: jax.Array, n: int) -> jax.Array:
    return jax.random.rademacher(key, (n,), jnp.float32)


def random_hadamard(n: int, key: jax.Array, *, block: int | None = None, backend: str = "auto") -> Rotation:
    """A random orthogonal Hadamard rotation of width ``n``: ``R = diag(s) (I_{n/b} (x) H_b) / sqrt(b)``.

    ``s`` is ``n`` independent random signs drawn from ``key`` (Rademacher), ``H_b`` the Hadamard matrix of
    :func:`hadamard_matrix`: QuIP#'s randomized Hadamard transform (Tseng et al., 2024) and QuaRot's random
    Hadamard rotation (Ashkboos et al., 2024). ``block``: ``None`` takes ``b = n`` where ``n = 2^k`` or
    ``m 2^k`` with ``m`` in :data:`HADAMARD_ORDERS`, else the widest ``b`` dividing ``n`` that has a
    Hadamard matrix (``b = 1``, signs alone, for odd ``n``); an int asks for that block size (``block=n``:
    the full Kronecker form), a ``ValueError`` where it has no construction or does not divide ``n``.
    ``backend``: the fast Walsh-Hadamard transform's (:func:`kernels_pallas.hadamard_transform`).
    Traceable in ``key``: ``jax.vmap(lambda k: random_hadamard(n, k))(keys)`` stacks rotations.
    """
    n = _as_width(n, "random_hadamard")
    _check_key(key, "random_hadamard")
    block = _check_block(n, block, "random_hadamard")
    return Rotation(_random_signs(key, n), n, block, backend=backend)


def hadamard_rotation(n: int, *, block: int | None = None, backend: str = "auto") -> Rotation:
    """The deterministic Hadamard rotation ``R = (I_{n/b} (x) H_b) / sqrt(b)`` (all signs ``+1``): QuaRot's
    online Hadamard (Ashkboos et al., 2024); for ``n = 2^k`` it is symmetric and its own inverse.
    ``block`` and ``backend`` as in :func:`random_hadamard`."""
    n = _as_width(n, "hadamard_rotation")
    block = _check_block(n, block, "hadamard_rotation")
    return Rotation(jnp.ones((n,), jnp.float32), n, block, backend=backend)
