"""What an optimizer state holds: per leaf its storage format, shape and real bytes.

``state_nbytes(state)`` is the real byte count of every array in the state (codes, absmaxes, float leaves,
counts), the figure the 8-bit optimizers paper reports as optimizer memory (Dettmers et al., ICLR 2022).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.optim.quantized_state import _is_qarray, path_str
from qjax.qarray import QArray


def state_formats(state) -> dict[str, str]:
    """``{"/"-joined path: storage}`` for every state leaf: ``"dynamic"`` or ``"dynamic_unsigned"`` for an
    8-bit QArray, else the dtype name of the leaf kept as it is (``"float32"``, ``"int32"``, ...)."""
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_qarray)
    return {
        path_str(path): x.format if isinstance(x, QArray) else jnp.dtype(x.dtype).name for path, x in leaves
    }


def state_nbytes(state) -> int:
    """Real bytes of all arrays in ``state``: ``sum(leaf.nbytes)`` over codes, scales and float leaves."""
    return sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(state))
