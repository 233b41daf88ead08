"""Stable embedding: Xavier-uniform table, lookup, then LayerNorm; its optimizer state stays 32-bit.

``y = LayerNorm(E[ids])`` with ``E ~ U(-sqrt(6 / (n + d)), sqrt(6 / (n + d)))``. Ids must be integers in
``[0, n)``: a concrete id outside is a ``ValueError``; under jit (traced ids) it gives a NaN row, as
``jnp.take``'s default "fill" mode does, so the mistake stays visible. The 8-bit optimizers paper
(Dettmers, Lewis, Shleifer, Zettlemoyer, ICLR 2022, section 2.3) adds it to keep the variance of token
embeddings uniform, which stabilises training with 8-bit states of the rest of the model; the table itself
is named ``stable_embedding``, a path that :func:`qjax.optim.quantize_state` keeps in 32-bit by default
(:data:`qjax.optim.STABLE_EMBEDDING_PATTERN`). Linen: :class:`StableEmbedding`; NNX:
:class:`StableEmbeddingNNX`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

Initializer = Callable[..., jax.Array]
XAVIER_UNIFORM = nn.initializers.xavier_uniform()


def _check_sizes(num_embeddings, features) -> None:
    for name, value in (("num_embeddings", num_embeddings), ("features", features)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"StableEmbedding: {name}={value!r} is not allowed; allowed: a positive integer")


def _lookup(table: jax.Array, ids: jax.Array, dtype) -> jax.Array:
    ids = jnp.asarray(ids)
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(
            f"StableEmbedding: ids must be integers, got dtype {ids.dtype}; allowed: int32, int64, uint8, ..."
        )
    if not isinstance(ids, jax.core.Tracer):
        n = table.shape[0]
        bad = np.unique(np.asarray(ids)[(np.asarray(ids) < 0) | (np.asarray(ids) >= n)])
        if bad.size:
            raise ValueError(f"StableEmbedding: ids hold {bad[:8].tolist()} outside [0, {n}); allowed: "
                             f"0 .. {n - 1}")
    x = jnp.take(table, ids, axis=0)  # under jit an out-of-range id gives a NaN row (jnp.take's "fill")
    return x if dtype is None else x.astype(dtype)


class StableEmbedding(nn.Module):
    """Linen stable embedding: ``LayerNorm(E[ids])`` (Dettmers et al., ICLR 2022). Params:
    ``stable_embedding`` ``(num_embeddings, features)`` and ``norm/{scale,bias}``."""

    num_embeddings: int
    features: int
    dtype: Any = None
    param_dtype: Any = jnp.float32
    embedding_init: Initializer = XAVIER_UNIFORM
    epsilon: float = 1e-5

    def setup(self):
        _check_sizes(self.num_embeddings, self.features)
        self.stable_embedding = self.param(
            "stable_embedding", self.embedding_init, (self.num_embeddings, self.features), self.param_dtype
        )
        self.norm = nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.norm(_lookup(self.stable_embedding, ids, self.dtype))

    def attend(self, query: jax.Array) -> jax.Array:
        """Tied output logits ``query @ E^T``."""
        return query @ self.stable_embedding.T.astype(query.dtype)


class StableEmbeddingNNX(nnx.Module):
    """NNX stable embedding: ``LayerNorm(E[ids])`` (Dettmers et al., ICLR 2022). Attributes:
    ``stable_embedding`` (an ``nnx.Param`` of shape ``(num_embeddings, features)``) and ``norm``."""

    def __init__(
        self,
        num_embeddings: int,
        features: int,
        *,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        embedding_init: Initializer = XAVIER_UNIFORM,
        epsilon: float = 1e-5,
        rngs: nnx.Rngs,
    ):
        _check_sizes(num_embeddings, features)
        self.dtype = dtype
        self.stable_embedding = nnx.Param(
            embedding_init(rngs.params(), (num_embeddings, features), param_dtype)
        )
        self.norm = nnx.LayerNorm(features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return self.norm(_lookup(self.stable_embedding[...], ids, self.dtype))

    def attend(self, query: jax.Array) -> jax.Array:
        """Tied output logits ``query @ E^T``."""
        return query @ self.stable_embedding[...].T.astype(query.dtype)
