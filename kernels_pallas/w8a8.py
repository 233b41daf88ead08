"""W8A8: int8 activations times int8 weights, exact int32 accumulation, as a Pallas kernel.

``acc[m, n] = sum_k a[m, k] * b[k, n]`` over int8 codes, accumulated in int32 (exact: ``|acc| <= K * 2^14``,
no overflow below ``K = 2^17``), then ``y[m, n] = acc[m, n] * sx[m] * sw[n]`` in float32 with per-token
activation scales ``sx`` and per-channel weight scales ``sw``: LLM.int8()'s vector-wise quantization without
the outlier split (Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale",
2022) and SmoothQuant's W8A8 GEMM (Xiao et al., 2023). The integer product is the kernel; the rank-1
rescale is an elementwise epilogue that XLA fuses.

Tiling follows the TPU rules for int8 (blocks ``(32k, 128k)``); M, K, N are zero-padded to block multiples
(zero codes add nothing) and the result is sliced back. The int32 output block is the accumulator over the
K grid axis (TPU, interpret), or a K loop inside the kernel accumulates it (GPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels_pallas.backends import compiler_params, round_up, tile

BLOCK_M = 128
BLOCK_N = 256
BLOCK_K = 512


def _kernel(a_ref, b_ref, o_ref, *, block_k: int, k_blocks: int | None):
    def block(k0):
        a = a_ref[:, pl.ds(k0, block_k)]
        b = b_ref[pl.ds(k0, block_k), :]
        return jnp.dot(a, b, preferred_element_type=jnp.int32)

    if k_blocks is None:
        @pl.when(pl.program_id(2) == 0)
        def _():
            o_ref[...] = jnp.zeros(o_ref.shape, jnp.int32)

        o_ref[...] += block(0)
    else:
        o_ref[...] = jax.lax.fori_loop(0, k_blocks, lambda kb, acc: acc + block(kb * block_k),
                                       jnp.zeros(o_ref.shape, jnp.int32))


def int8_dot_pallas(a: jax.Array, b: jax.Array, *, interpret: bool = False, k_in_grid: bool = True,
                    block_m: int = BLOCK_M, block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> jax.Array:
    """:func:`int8_dot_xla` as a Pallas kernel (module docstring): int32 ``(..., N)``, equal bit for bit."""
    lead, k = a.shape[:-1], a.shape[-1]
    a2 = a.reshape(-1, k)
    m, n = a2.shape[0], b.shape[1]
    if 0 in (m, n, k):  # nothing to tile: an empty sum is 0
        return jnp.zeros((*lead, n), jnp.int32)
    pow2 = not k_in_grid  # the GPU (Triton) lowering: power-of-two arrays
    bm, bn, bk = tile(m, block_m, 32, pow2), tile(n, block_n, 128, pow2), tile(k, block_k, 128, pow2)
    mp, np_, kp = round_up(m, bm), round_up(n, bn), round_up(k, bk)
    a2 = jnp.pad(a2, ((0, mp - m), (0, kp - k)))
    b2 = jnp.pad(b, ((0, kp - k), (0, np_ - n)))
    if k_in_grid:
        grid = (mp // bm, np_ // bn, kp // bk)
        specs = [pl.BlockSpec((bm, bk), lambda i, j, kb: (i, kb)),
                 pl.BlockSpec((bk, bn), lambda i, j, kb: (kb, j))]
        o_spec = pl.BlockSpec((bm, bn), lambda i, j, kb: (i, j))
    else:
        grid = (mp // bm, np_ // bn)
        specs = [pl.BlockSpec((bm, kp), lambda i, j: (i, 0)), pl.BlockSpec((kp, bn), lambda i, j: (0, j))]
        o_spec = pl.BlockSpec((bm, bn), lambda i, j: (i, j))
    kernel = functools.partial(_kernel, block_k=bk, k_blocks=None if k_in_grid else kp // bk)
    y = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((mp, np_), jnp.int32), grid=grid,
                       in_specs=specs, out_specs=o_spec, interpret=interpret,
                       compiler_params=compiler_params(len(grid), interpret))(a2, b2)
    return y[:m, :n].reshape(*lead, n)
