"""Small Flax Linen models of the kind in Flax's own examples (ResNet, Transformer encoder), for tests."""

from functools import partial

import flax.linen as nn
import jax.numpy as jnp


class ResNetBlock(nn.Module):
    filters: int
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        residual = x
        y = nn.Conv(self.filters, (3, 3), self.strides, use_bias=False)(x)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.filters, (3, 3), use_bias=False)(y)
        y = norm(scale_init=nn.initializers.zeros)(y)
        if residual.shape != y.shape:
            residual = nn.Conv(self.filters, (1, 1), self.strides, use_bias=False, name="proj")(residual)
            residual = norm(name="proj_norm")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    stages: tuple[int, ...] = (1, 1)
    width: int = 8
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), name="stem")(x)
        for i, blocks in enumerate(self.stages):
            for j in range(blocks):
                x = ResNetBlock(self.width * 2**i, (2, 2) if i > 0 and j == 0 else (1, 1))(x, train)
        return nn.Dense(self.num_classes, name="head")(jnp.mean(x, axis=(1, 2)))


class EncoderBlock(nn.Module):
    dim: int
    heads: int

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm()(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attention")(y, y)
        x = x + y
        y = nn.LayerNorm()(x)
        y = nn.Dense(4 * self.dim, name="mlp_in")(y)
        y = nn.Dense(self.dim, name="mlp_out")(nn.gelu(y))
        return x + y


class Transformer(nn.Module):
    vocab: int = 64
    dim: int = 32
    heads: int = 4
    layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.dim)(tokens)
        for i in range(self.layers):
            x = EncoderBlock(self.dim, self.heads, name=f"block_{i}")(x)
        return nn.Dense(self.vocab, name="lm_head")(nn.LayerNorm()(x))
