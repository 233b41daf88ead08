"""Which parameters a model contracts: found in its jaxpr, whatever code or operator the model uses.

A module is eligible for quantization by what it does: it contracts one of its own parameters. The
model's forward pass, traced once with :func:`jax.make_jaxpr` (no FLOPs), says so: a parameter leaf is
*contracted* when it reaches an operand of a ``dot_general`` or ``conv_general_dilated`` equation through
layout-only equations (casts, reshapes, transposes, slices, broadcasts, copies: the value is still the
weight, laid out differently; a ``gather`` is a lookup, so an embedding table is not contracted by it).
Calls into sub-jaxprs (``jit``, ``remat``, ``custom_jvp``/``custom_vjp``,
``scan``, ``while``, ``cond``) are followed, so ``x @ w``, ``jnp.dot`` inside a jitted helper, Tunix's
``jnp.einsum`` and a weight sliced per layer by ``scan`` are all seen. A parameter used otherwise (a norm's
scale, an embedding only looked up with ``take``) is not contracted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
from jax.extend import core as jex_core

CONTRACTIONS = frozenset({"dot_general", "conv_general_dilated", "ragged_dot_general", "ragged_dot"})
LAYOUT = frozenset({
    "convert_element_type", "reshape", "transpose", "squeeze", "expand_dims", "broadcast_in_dim", "copy",
    "copy_p", "slice", "dynamic_slice", "rev", "reduce_precision", "sharding_constraint", "pvary",
    "device_put", "optimization_barrier", "select_n", "mesh_cast",
})


def _sub_jaxprs(eqn) -> list[tuple[object, Callable[[int], int | None]]]:
    """(jaxpr, map from the sub-jaxpr's invar index to the eqn's invar index) for the eqn's callees."""
    params = eqn.params
    out = []
    name = eqn.primitive.name
    if name == "scan":
        out.append((params["jaxpr"], lambda i: i))
    elif name == "while":
        nc = params["cond_nconsts"]
        out.append((params["body_jaxpr"], lambda i: nc + i))  # body invars: body consts, then carry
    elif name == "cond":
        for branch in params["branches"]:
            out.append((branch, lambda i: i + 1))
    else:
        for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
            if key in params:
                out.append((params[key], lambda i: i))
                break
    return out


def _jaxpr_of(j):
    return j.jaxpr if isinstance(j, jex_core.ClosedJaxpr) else j


def _walk(jaxpr, origins: dict, found: set) -> list[set]:
    """Propagate ``origins`` (var -> set of leaf ids) through ``jaxpr``; add contracted ids to ``found``.
    Returns the origin sets of the outvars."""
    jaxpr = _jaxpr_of(jaxpr)

    def of(v) -> set:
        return origins.get(v, set()) if not isinstance(v, jex_core.Literal) else set()

    for eqn in jaxpr.eqns:
        ins = [of(v) for v in eqn.invars]
        if not any(ins):
            continue
        name = eqn.primitive.name
        if name in CONTRACTIONS:
            for s in ins:
                found |= s
            continue
        subs = _sub_jaxprs(eqn)
        if subs:
            outs: list[set] = [set() for _ in eqn.outvars]
            for sub, index in subs:
                sub_j = _jaxpr_of(sub)
                sub_origins = {}
                for k, v in enumerate(sub_j.invars):
                    j = index(k)
                    if j is not None and j < len(ins) and ins[j]:
                        sub_origins[v] = ins[j]
                for k, s in enumerate(_walk(sub_j, sub_origins, found)):
                    if k < len(outs):
                        outs[k] |= s
            for v, s in zip(eqn.outvars, outs, strict=False):
                if s:
                    origins[v] = s
            continue
        if name in LAYOUT:
            s = set().union(*ins)
            for v in eqn.outvars:
                origins[v] = s
    return [of(v) for v in jaxpr.outvars]


def contracted_leaves(fn: Callable, leaves: Sequence, *args, **kwargs) -> set[int]:
    """Indices of ``leaves`` (arrays, ``fn``'s first argument as a list) that ``fn(leaves, *args)``
    contracts (module docstring). Traces ``fn`` abstractly; runs nothing."""
    closed = jax.make_jaxpr(lambda ls: fn(ls, *args, **kwargs))(list(leaves))
    invars = closed.jaxpr.invars
    found: set[int] = set()
    _walk(closed.jaxpr, {v: {i} for i, v in enumerate(invars[: len(leaves)])}, found)
    return found
