"""Small models and batches for the PTQ tests (the real MiniLM only in the experiment and notebook tests)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest


class TokenMLP(nn.Module):
    """A per-token MLP: ``x (batch, tokens, 16)`` through three Dense layers (the shape of a transformer's
    feed-forward blocks, small enough to compile in a second)."""

    @nn.compact
    def __call__(self, x, attention_mask=None):
        del attention_mask  # only the statistics read it
        h = nn.gelu(nn.Dense(64, name="dense_0")(x))
        h = nn.gelu(nn.Dense(64, name="dense_1")(h))
        return nn.Dense(16, name="head")(h)


def make_batches(n: int = 3, batch: int = 4, tokens: int = 8, seed: int = 0) -> list[dict]:
    keys = jax.random.split(jax.random.key(seed), n)
    out = []
    for key in keys:
        x = jax.random.normal(key, (batch, tokens, 16))
        lengths = jax.random.randint(jax.random.fold_in(key, 1), (batch,), 3, tokens + 1)
        mask = (jnp.arange(tokens)[None] < lengths[:, None]).astype(jnp.int32)
        out.append({"x": x, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def mlp():
    model = TokenMLP()
    batches = make_batches()
    variables = model.init(jax.random.key(0), **batches[0])
    return model, variables, batches
