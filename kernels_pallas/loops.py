"""The two loops every packed-matmul kernel body runs: over the ``32 // bits`` bit planes of a packed word
block, and over K (a grid axis that accumulates into the output tile, or a loop inside the kernel)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def over_planes(plane: Callable[[int, jax.Array], jax.Array], planes: int, acc: jax.Array,
                unroll: bool) -> jax.Array:
    """``acc = plane(j, acc)`` for ``j = 0 .. planes - 1``: unrolled (constant shifts and plane indices, for
    compiled kernels) or as a ``fori_loop`` (the interpreter, which compiles it faster)."""
    if not unroll:
        return jax.lax.fori_loop(0, planes, plane, acc)
    for j in range(planes):
        acc = plane(j, acc)
    return acc


def accumulate_over_k(o_ref, block: Callable[[jax.Array, jax.Array], jax.Array], k_blocks: int | None,
                      block_words: int) -> None:
    """Write the output tile ``o_ref`` as the sum over K blocks of ``block(kb, k0)`` (block ``kb``, whose
    first word is ``k0`` in the kernel's view): ``k_blocks is None``, K is the grid's third axis (TPU,
    interpret) and each step adds its block at offset 0; else the kernel holds all of K and loops over its
    ``k_blocks`` blocks (GPU)."""
    if k_blocks is None:
        kb = pl.program_id(2)

        @pl.when(kb == 0)
        def _():
            o_ref[...] = jnp.zeros(o_ref.shape, o_ref.dtype)

        o_ref[...] += block(kb, 0)
    else:
        o_ref[...] = jax.lax.fori_loop(0, k_blocks, lambda kb, acc: acc + block(kb, kb * block_words),
                                       jnp.zeros(o_ref.shape, o_ref.dtype))
