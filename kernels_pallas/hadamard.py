"""The fast Walsh-Hadamard transform ``y = x H_n / sqrt(n)`` on the last axis, as a Pallas kernel.

``H_n`` (``n`` a power of two) is Sylvester's Hadamard matrix in natural order, ``H_1 = [1]``, ``H_2k =
[[H_k, H_k], [H_k, -H_k]]`` (J. J. Sylvester, "Thoughts on inverse orthogonal matrices", 1867), so ``H_n[i,
j] = (-1)^popcount(i & j)``, ``H_n = H_2 (x) H_2 (x) ... (x) H_2`` and ``H_n H_n^T = n I``: the normalized
transform is orthogonal and its own inverse. It is the rotation of QuaRot (Ashkboos et al., "QuaRot:
Outlier-Free 4-Bit Inference in Rotated LLMs", 2024) and, with random signs, the randomized Hadamard
transform of QuIP# (Tseng et al., "QuIP#: Even Better LLM Quantization with Hadamard Incoherence and Lattice
Codebooks", 2024); ``qjax.rotation`` builds those rotations on top of this transform.

The kernel. The grid runs over blocks of rows; each program loads a ``(block_rows, n)`` tile (a whole row
per row: the transform mixes every element of it), runs the ``log2(n)`` butterfly stages on it in
registers / VMEM and writes the tile once. The stages use the constant-geometry (Pease) form of the
FWHT: every stage splits the row into its two contiguous halves ``a = y[:n/2]``, ``b = y[n/2:]`` and
writes ``(a + b, a - b)`` interleaved, ``y'[2j] = a[j] + b[j]``, ``y'[2j + 1] = a[j] - b[j]``. A stage
applies ``H_2`` to the top bit of the index and rotates the index bits left by one, so after ``log2(n)``
stages each bit has had its ``H_2`` and the bits are back in place: ``y = x H_n``. Every stage has the
same shape (a split of the last axis into halves and a stack on a new last axis of size 2), which both
the Mosaic (TPU) and Triton (GPU) lowerings have rules for.
:func:`kernels_pallas.reference.hadamard_transform_xla` computes the same transform with the in-place
(Cooley-Tukey order) butterflies; the tests compare both with the dense product.

Arithmetic is float32 (float64 for float64 input, which only the interpreter and GPUs run), the result is
in the input's dtype. Rows are zero-padded to a block multiple and sliced back.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from kernels_pallas import backends
from kernels_pallas.reference import hadamard_transform_xla

BLOCK_ELEMENTS = 1 << 15  # elements per (block_rows, n) tile: 128 KiB of float32
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64)


def hadamard_transform(x: jax.Array, *, backend: str = "auto") -> jax.Array:
    """The normalized fast Walsh-Hadamard transform on the last axis: ``y = x H_n / sqrt(n)``.

    ``x``: a float array ``(..., n)``, ``n`` a power of two (``1, 2, 4, ...``); ``H_n`` is Sylvester's
    Hadamard matrix, ``H_n[i, j] = (-1)^popcount(i & j)`` (module docstring), so the transform is orthogonal,
    symmetric and its own inverse: ``hadamard_transform(hadamard_transform(x)) == x`` up to rounding. Costs
    ``n log2(n)`` additions per row instead of a matmul's ``n^2``. Returns ``x``'s shape and dtype (float32
    arithmetic inside, float64 for float64).

    ``backend``: ``"xla"`` (the jnp reference), ``"pallas"`` (the kernel compiled for TPU / GPU),
    ``"interpret"`` (the kernel in Pallas' interpreter) or ``"auto"`` (:mod:`kernels_pallas.backends`).
    Works under ``jit``, ``vmap`` and ``grad`` (the transform is linear and self-adjoint, so the kernel
    backends differentiate by running the kernel on the cotangent). Used by QuaRot (Ashkboos et al., 2024)
    and QuIP# (Tseng et al., 2024) to spread outliers before quantizing.
    """
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"hadamard_transform: x is a {type(x).__name__}; allowed: an array (jax.Array or "
                        "numpy.ndarray)")
    if x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"hadamard_transform: x of shape {x.shape} and dtype {x.dtype}; allowed: a float "
                         "array (..., n) (float32, bfloat16, float16, float64)")
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        below = 1 << max(n.bit_length() - 1, 0)
        raise ValueError(f"hadamard_transform: last axis of length n={n} (x of shape {x.shape}) is not a "
                         f"power of two; allowed: 1, 2, 4, ..., e.g. {below} or {2 * below} (other widths: "
                         "qjax.rotation, Kronecker or block-diagonal Hadamard rotations)")
    return _transform(x, backends.resolve(backend))


@functools.partial(jax.jit, static_argnums=1)
def _transform(x: jax.Array, backend: str) -> jax.Array:
    """One compiled program per shape and backend (eagerly, ``log2(n)`` stages would dispatch op by op)."""
    if backend == "xla":
        return hadamard_transform_xla(x)
    kernel = functools.partial(hadamard_transform_pallas, interpret=backend == "interpret")
    return _self_adjoint(kernel, x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _self_adjoint(kernel, x):
    """``kernel(x)`` for a linear, symmetric ``kernel``: its VJP is ``g -> kernel(g)``."""
    return kernel(x)


def _self_adjoint_fwd(kernel, x):
    return kernel(x), None


def _self_adjoint_bwd(kernel, _, g):
    return (kernel(g),)


_self_adjoint.defvjp(_self_adjoint_fwd, _self_adjoint_bwd)


def _kernel(x_ref, o_ref, *, stages: int, scale: float, dtype):
    y = x_ref[...].astype(dtype)
    for _ in range(stages):  # constant geometry: halves in, interleaved out (module docstring)
        a, b = jnp.split(y, 2, axis=-1)
        y = jnp.stack([a + b, a - b], axis=-1).reshape(y.shape)
    o_ref[...] = (y * scale).astype(o_ref.dtype)


def hadamard_transform_pallas(x: jax.Array, *, interpret: bool = False,
                              block_elements: int = BLOCK_ELEMENTS) -> jax.Array:
    """:func:`hadamard_transform` as a Pallas kernel (module docstring), arguments assumed checked.

    ``block_elements``: about how many elements one ``(block_rows, n)`` tile holds (at least 8 rows).
    """
    lead, n = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.dtype not in KERNEL_DTYPES:
        x2 = x2.astype(jnp.float32)
    m = x2.shape[0]
    if m == 0:
        return jnp.zeros(x.shape, x.dtype)
    pow2 = not interpret and backends.platform() == "gpu"  # the Triton lowering: power-of-two blocks
    quantum = 16 if x2.dtype.itemsize == 2 else 8
    bm = backends.tile(m, max(quantum, block_elements // n), quantum, pow2)
    mp = backends.round_up(m, bm)
    x2 = jnp.pad(x2, ((0, mp - m), (0, 0)))
    kernel = functools.partial(_kernel, stages=int(np.log2(n)), scale=1.0 / math.sqrt(n),
                               dtype=jnp.promote_types(x2.dtype, jnp.float32))
    y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((mp, n), x2.dtype), grid=(mp // bm,),
                       in_specs=[pl.BlockSpec((bm, n), lambda i: (i, 0))],
                       out_specs=pl.BlockSpec((bm, n), lambda i: (i, 0)), interpret=interpret,
                       compiler_params=backends.compiler_params(1, interpret, parallel=1))(x2)
    return y[:m].reshape(*lead, n).astype(x.dtype)
