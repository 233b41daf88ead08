"""Granularity: which elements share one scale.

Each granularity reshapes an array into a *block view* ``xb`` in which the elements sharing a scale lie
along ``reduce_axes``; the scale has ``xb``'s shape with those axes kept as size 1, so ``xb * scale``
broadcasts. ``from_blocks`` undoes the reshape. Axes are stored as negative indices once an array's rank
is known (``resolve``), so a QArray made inside ``vmap`` still dequantizes correctly outside it.

- ``PerTensor()``: one scale for the whole tensor.
- ``PerChannel(axis)``: one scale per index along ``axis`` (an int or a tuple); reduce all other axes.
  A Dense kernel ``(in, out)`` quantized per output channel is ``PerChannel(-1)``.
- ``PerToken(axis=-1)``: one scale per vector along ``axis``; keep every other axis. BitNet's per-token
  activation scale is ``PerToken(-1)``.
- ``PerGroup(axis, size)``: ``size`` consecutive elements along ``axis`` (the contraction axis) share a
  scale; every other axis keeps its own (GPTQ / AWQ "group size").
- ``PerBlock(size)``: the flattened tensor in consecutive blocks of ``size`` (8-bit optimizer states);
  the last block is padded.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _normalize_axes(axes: tuple[int, ...], ndim: int, who: str) -> tuple[int, ...]:
    out = []
    if ndim == 0:
        axis = axes[0] if len(axes) == 1 else axes
        raise ValueError(f"{who}: axis {axis!r} is out of range for a 0-d array (it has no axes); "
                         "allowed: PerTensor() or PerBlock(size) for a scalar")
    for a in axes:
        if not isinstance(a, int) or isinstance(a, bool) or not -ndim <= a < ndim:
            raise ValueError(f"{who}: axis {a!r} is out of range for an array of rank {ndim}; "
                             f"allowed: integers in [{-ndim}, {ndim - 1}]")
        out.append(a % ndim - ndim)
    return tuple(sorted(set(out)))


@dataclasses.dataclass(frozen=True)
class PerTensor:
    def resolve(self, shape: tuple[int, ...]) -> PerTensor:
        return self

    def to_blocks(self, x: jax.Array) -> jax.Array:
        return x

    def reduce_axes(self, ndim: int) -> tuple[int, ...]:
        return tuple(range(ndim))

    def from_blocks(self, xb: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return xb


@dataclasses.dataclass(frozen=True)
class PerChannel:
    axis: int | tuple[int, ...] = -1

    def resolve(self, shape: tuple[int, ...]) -> PerChannel:
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        return PerChannel(_normalize_axes(axes, len(shape), "PerChannel"))

    def to_blocks(self, x: jax.Array) -> jax.Array:
        return x

    def reduce_axes(self, ndim: int) -> tuple[int, ...]:
        keep = {a % ndim for a in self.axis}
        return tuple(a for a in range(ndim) if a not in keep)

    def from_blocks(self, xb: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return xb


@dataclasses.dataclass(frozen=True)
class PerToken:
    axis: int | tuple[int, ...] = -1

    def resolve(self, shape: tuple[int, ...]) -> PerToken:
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        return PerToken(_normalize_axes(axes, len(shape), "PerToken"))

    def to_blocks(self, x: jax.Array) -> jax.Array:
        return x

    def reduce_axes(self, ndim: int) -> tuple[int, ...]:
        return tuple(a % ndim for a in self.axis)

    def from_blocks(self, xb: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return xb


@dataclasses.dataclass(frozen=True)
class PerGroup:
    axis: int
    size: int

    def resolve(self, shape: tuple[int, ...]) -> PerGroup:
        if not _is_positive_int(self.size):
            raise ValueError(f"PerGroup: group size {self.size!r} must be a positive integer")
        (axis,) = _normalize_axes((self.axis,), len(shape), "PerGroup")
        length = shape[axis]
        if length % self.size:
            divisors = [d for d in range(1, length + 1) if length % d == 0]
            raise ValueError(f"PerGroup: group size {self.size} does not divide axis {self.axis} of "
                             f"length {length} (shape {tuple(shape)}); allowed sizes: {divisors}")
        return PerGroup(axis, self.size)

    def to_blocks(self, x: jax.Array) -> jax.Array:
        axis = self.axis % x.ndim
        return x.reshape(*x.shape[:axis], x.shape[axis] // self.size, self.size, *x.shape[axis + 1:])

    def reduce_axes(self, ndim: int) -> tuple[int, ...]:
        return (self.axis % (ndim - 1) + 1,)

    def from_blocks(self, xb: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return xb.reshape(shape)


@dataclasses.dataclass(frozen=True)
class PerBlock:
    size: int = 256

    def resolve(self, shape: tuple[int, ...]) -> PerBlock:
        if not _is_positive_int(self.size):
            raise ValueError(f"PerBlock: block size {self.size!r} must be a positive integer")
        return self

    def to_blocks(self, x: jax.Array) -> jax.Array:
        flat = x.reshape(-1)
        pad = -flat.size % self.size
        return jnp.pad(flat, (0, pad)).reshape(-1, self.size)

    def reduce_axes(self, ndim: int) -> tuple[int, ...]:
        return (1,)

    def from_blocks(self, xb: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        return xb.reshape(-1)[: math.prod(shape)].reshape(shape)


Granularity = PerTensor | PerChannel | PerToken | PerGroup | PerBlock
