"""Shardings of an 8-bit optimizer state that follow its parameters' shardings.

A quantized leaf's codes have the parameter's shape, so they take the parameter's sharding. Its absmaxes
(one per block of the flattened parameter) are split along the blocks when the parameter is split along
its first axis only and every shard holds whole blocks; otherwise they are replicated (a few bytes per
block). Float leaves matched to a parameter take its sharding; all others (counts, hyperparameters) are
replicated. Which leaves are 8-bit never depends on the sharding (see :func:`qjax.optim.leaf_format`).

Use: ``jax.jit(opt.init, out_shardings=state_shardings(jax.eval_shape(opt.init, params), params))``, and the
same tree as the state's ``out_shardings`` of a jitted step, so XLA never picks another layout for it.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding

from qjax.optim.quantized_state import _is_qarray, match_params
from qjax.qarray import QArray


def _replicated(like: Sharding) -> Sharding:
    return NamedSharding(like.mesh, PartitionSpec()) if isinstance(like, NamedSharding) else like


def _block_sharding(param: Sharding, shape: tuple[int, ...], block_size: int) -> Sharding:
    """Absmax sharding: split along blocks when ``param`` splits only axis 0 into shards of whole blocks."""
    if not isinstance(param, NamedSharding) or not shape:
        return _replicated(param)
    spec = tuple(param.spec) + (None,) * (len(shape) - len(param.spec))
    if spec[0] is None or any(axis is not None for axis in spec[1:]):
        return _replicated(param)
    names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
    shards = math.prod(param.mesh.shape[name] for name in names)
    per_shard = shape[0] // shards * math.prod(shape[1:])
    if shape[0] % shards or per_shard % block_size:
        return _replicated(param)
    return NamedSharding(param.mesh, PartitionSpec(spec[0], None))


def state_shardings(state, params):
    """A tree of shardings with ``state``'s structure (QArray nodes included) following ``params``.

    Args:
      state: an optimizer state, or its ``jax.eval_shape`` (``ShapeDtypeStruct`` leaves).
      params: the parameters as arrays or ``ShapeDtypeStruct`` s that carry a ``sharding``.

    Codes follow their parameter's sharding; absmaxes are split along blocks when each shard holds whole
    blocks (Dettmers et al., ICLR 2022 block-wise layout), else replicated.
    """
    param_leaves = jax.tree_util.tree_leaves(params)
    shardings = [getattr(x, "sharding", None) for x in param_leaves]
    if not param_leaves or any(s is None for s in shardings):
        raise ValueError(
            "state_shardings: params must be a non-empty tree of arrays (or ShapeDtypeStructs) "
            "that carry a sharding"
        )
    fallback = _replicated(shardings[0])
    nodes, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_qarray)
    shapes = [(path, x.codes.shape if _is_qarray(x) else x.shape) for path, x in nodes]
    out = []
    for (_, node), param in zip(nodes, match_params(shapes, params), strict=True):
        sharding = fallback if param is None else param.sharding
        if _is_qarray(node):
            scale = _block_sharding(sharding, node.codes.shape, node.granularity.size)
            out.append(
                QArray(
                    sharding,
                    scale if param is not None else fallback,
                    None,
                    node.format,
                    node.granularity,
                    node.dtype,
                )
            )
        else:
            out.append(sharding)
    return treedef.unflatten(out)
