"""Statistics of the inputs of chosen modules' weight contractions, captured through qjax's op-level core.

``input_statistics(model, variables, batches, modules, stat)`` runs the float model (Linen or NNX, through
its view, :mod:`qjax.ptq.model`) on every batch inside :func:`qjax.interception.intercepting`. Every
contraction the model calls (``dot_general``, ``einsum``, ``dot``, ``matmul``, ``tensordot``, conv) reaches
the handler, which finds the weight operand the way :class:`qjax.core.Call` does, by identity: the operand
that *is* the value passed in for a weight the module contracts (``kernel`` of a Dense, Tunix's ``w``
inside its ``jnp.einsum``). The other operand is the contraction's real input; ``stat(x, mask)`` is
computed on it, flattened to rows ``(n, K)`` (``K`` its last axis, or the last ``c`` axes a ``(*K, *F)``
weight contracting ``c`` axes meets, :attr:`qjax.core.ModuleEntry.contract`), and returned from the
jitted forward pass. The model's code is not touched, and both front ends are served by the same handler.

``mask`` weights the rows: when the batch holds ``token_mask`` (``"attention_mask"`` by default) and its
shape equals ``x.shape[:-1]``, padding tokens get weight 0 (a statistic must leave them out with
``jnp.where``, not a product, so a NaN in padding stays out); otherwise every row counts. A mask that is 0
everywhere (an inverted mask), negative or not finite is refused (:func:`qjax.ptq.layers.check_token_mask`).

A module whose weight is contracted more than once in one forward pass (a shared layer) adds up all its
calls with ``combine``, and so do the batches (``jnp.add`` for sums, ``jnp.maximum`` for ranges). One
compiled forward serves every batch of the same shapes. A weight no interceptable op contracts as stored
(``x @ w``, or a weight transposed first) is not seen, and neither is a contraction inside a
transformation of the model's own (``scan`` over stacked layers, ``remat``): both raise ``ValueError``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from qjax.core import operand_positions
from qjax.interception import intercepting
from qjax.linen import unbox
from qjax.ptq.layers import Path, check_batches, check_token_mask, get_path

Stat = Callable[[jax.Array, jax.Array], object]  # (rows (n, K) float32, row weights (n,)) -> pytree


def rows_and_mask(x: jax.Array, batch: Mapping, token_mask: str | None,
                  contract: int = 1) -> tuple[jax.Array, jax.Array]:
    """``x`` as float32 rows ``(n, K)`` (``K`` its last ``contract`` axes flattened: the axes a
    ``(*K, *F)`` weight contracts) and a row weight ``(n,)``: the batch's token mask when its shape matches
    ``x``'s leading axes, else ones."""
    lead = x.shape[: x.ndim - contract]
    rows = jnp.asarray(x, jnp.float32).reshape(-1, math.prod(x.shape[x.ndim - contract:]))
    mask = batch.get(token_mask) if token_mask else None
    if mask is not None and tuple(jnp.shape(mask)) == tuple(lead):
        return rows, jnp.asarray(mask, jnp.float32).reshape(-1)
    return rows, jnp.ones(rows.shape[:1], jnp.float32)


def watched_weights(view, modules: Sequence[Path]) -> dict[Path, tuple[str, ...]]:
    """Per module, the parameters whose contractions are captured: the weights its rule quantizes, else
    (no weight quantizer) every parameter it contracts."""
    out = {}
    for module in modules:
        entry = view.entry(tuple(module))
        names = entry.weights
        if not names and entry.rule is not None:
            names = tuple(p for p in entry.contracted if p in entry.rule.weight_names)
        names = names or entry.contracted
        if not names:
            raise ValueError(f"{view.who}: module {entry.name!r} ({entry.type_name}) contracts none of its "
                             f"parameters {list(entry.params)}: it has no weight contraction to capture")
        if entry.stacked:
            raise ValueError(f"{view.who}: module {entry.name!r} is stacked ({entry.stacked} layer axis, run "
                             "by scan): inputs inside a scan cannot be captured; exclude it by rule")
        out[tuple(module)] = names
    return out


def capture_fn(view, modules: Sequence[Path], stat: Stat, combine: Callable = jnp.add, *,
               token_mask: str | None = "attention_mask") -> Callable:
    """A jitted ``(params, rest, batch, active=None) -> {module path: stat}`` for the inputs of
    ``modules``' weight contractions when ``view.apply(params, rest, batch)`` runs (module docstring).

    ``active``: optional ``{module path: bool array}``; a module whose flag is false skips ``stat`` at run
    time (``lax.cond``) and reports zeros, so one compilation serves any subset of the modules.
    """
    watched = watched_weights(view, modules)
    contracts = {module: max(view.entry(module).contract, 1) for module in watched}

    def run(params, rest, batch, active=None):
        targets = [(unbox(get_path(params, (*module, name))), module)
                   for module, names in watched.items() for name in names]
        trace = jex_core.get_opaque_trace_state()
        found: dict = {}

        def compute(module, rows, mask):
            if active is None:
                return stat(rows, mask)
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                           jax.eval_shape(stat, rows, mask))
            return jax.lax.cond(active[module], lambda: stat(rows, mask), lambda: zeros)

        def handler(op, original, args, kwargs):
            positions = operand_positions(op, args)
            hit = next(((i, module) for i in positions for w, module in targets if args[i] is w), None)
            inputs = [args[j] for j in positions if hit is not None and j != hit[0]]
            if inputs:
                module = hit[1]
                if jex_core.get_opaque_trace_state() != trace:
                    raise ValueError(f"{view.who}: module {'/'.join(module)!r} contracts its weight inside a "
                                     "transformation of the model's own (scan, remat, a jitted helper): its "
                                     "input cannot be captured; exclude it by rule")
                s = compute(module, *rows_and_mask(inputs[0], batch, token_mask, contracts[module]))
                if module in found:
                    try:
                        s = jax.tree_util.tree_map(combine, found[module], s)
                    except (TypeError, ValueError) as err:
                        raise ValueError(f"{view.who}: module {'/'.join(module)!r} contracts weights with "
                                         f"inputs of different shapes ({err}); capture one weight per "
                                         "module") from None
                found[module] = s
            return original(*args, **kwargs)

        with intercepting(handler):
            view.apply(params, rest, batch)
        missing = set(watched) - set(found)
        if missing:
            raise ValueError(f"{view.who}: no interceptable contraction of these modules' weights was seen: "
                             f"{sorted('/'.join(m) for m in missing)} (a weight contracted by `x @ w`, or "
                             "changed before its contraction, e.g. transposed); exclude them by rule")
        return found

    return jax.jit(run)


def statistics(view, params, batches: Sequence[Mapping], modules: Sequence[Path], stat: Stat,
               combine: Callable = jnp.add, *, token_mask: str | None = "attention_mask",
               fn: Callable | None = None, active: Mapping | None = None) -> dict:
    """``{module path: combine over batches of stat(rows, mask)}`` with the model's weights ``params``
    (``view.params`` or a modified copy); ``fn``/``active`` as in :func:`input_statistics`."""
    fn = fn or capture_fn(view, modules, stat, combine, token_mask=token_mask)
    if active is not None:
        active = {tuple(path): jnp.asarray(bool(active.get(tuple(path), False))) for path in modules}
    total = None
    for batch in batches:
        stats = fn(params, view.rest, batch, active)
        total = stats if total is None else jax.tree_util.tree_map(combine, total, stats)
    return total


def input_statistics(model, variables: Mapping | None, batches: Sequence[Mapping],
                     modules: Sequence[Path], stat: Stat, combine: Callable = jnp.add, *,
                     token_mask: str | None = "attention_mask", apply_kwargs: Mapping | None = None,
                     fn: Callable | None = None, active: Mapping | None = None) -> dict:
    """``{module path: combine over batches of stat(rows, mask)}`` (module docstring).

    ``model``/``variables``: a Linen module and its variables, or an NNX module and ``None``. ``fn``: a
    function from :func:`capture_fn` to reuse (saves a compilation across calls); ``active``: its
    per-module flags (modules not active report zeros).
    """
    from qjax.ptq.model import model_view

    batches = check_batches(batches, "input_statistics")
    check_token_mask(batches, token_mask, "input_statistics")
    view = model_view(model, variables, (), batches[0], apply_kwargs, "input_statistics")
    return statistics(view, view.params, batches, [tuple(m) for m in modules], stat, combine,
                      token_mask=token_mask, fn=fn, active=active)
