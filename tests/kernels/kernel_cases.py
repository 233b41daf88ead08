"""Random packed weights for the kernel tests: codes of a bit width, packed (kernels_pallas.layout)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas import dequantize_packed, layout


def random_packed(rng: np.random.Generator, bits: int, k: int, n: int, *, group_size: int | None = None,
                  signed: bool = True, ternary: bool = False, zero_point: bool = False):
    """``(w_packed, scales, zero_point or None)`` for random ``bits``-bit codes of a ``(k, n)`` weight."""
    lo, hi = (-1, 1) if ternary else layout.code_range(bits, signed)
    codes = rng.integers(lo, hi + 1, (k, n))
    if bits == 1 and signed:
        codes = np.where(codes == 0, 1, codes)
    words = _pack(jnp.asarray(codes, jnp.int8 if signed else jnp.uint8), bits)
    groups = 1 if group_size is None else k // group_size
    scales = jnp.asarray(rng.uniform(0.25, 2.0, (groups, n)), jnp.float32)
    zero = jnp.asarray(rng.integers(0, 3, (groups, n)), jnp.float32) if zero_point else None
    return words, scales, zero


@functools.partial(jax.jit, static_argnums=1)
def _pack(codes, bits):  # one compile instead of one per eager op: the tests time interpret mode
    return layout.pack(codes, bits, 0)


def error_bound(x, words, scales, zero, *, bits, group_size, signed, dtype):
    """``tol * (|x| @ |W|)``: float rounding allows at most this much per output (bfloat16 weights round to
    8 significant bits inside the kernel, float32 to 24)."""
    w = dequantize_packed(words, scales, bits=bits, k=x.shape[-1], group_size=group_size, zero_point=zero,
                          signed=signed)
    tol = 8e-3 if dtype == jnp.bfloat16 else 1e-5
    return tol * (jnp.abs(x.astype(jnp.float32)) @ jnp.abs(w)) + 1e-6
