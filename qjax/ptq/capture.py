"""Statistics of the inputs of chosen modules, captured by Flax's method interception.

``input_statistics(model, variables, batches, modules, stat)`` runs ``model.apply(variables, **batch)``
for every batch under ``nn.intercept_methods``; when a module whose path is in ``modules`` is called, the
interceptor computes ``stat(x, mask)`` on its first positional input ``x`` flattened to rows ``(n, K)``
(``K`` its last axis) and returns it from the jitted forward pass. The model's code is not touched.

``mask`` weights the rows: when the batch holds ``token_mask`` (``"attention_mask"`` by default) and its
shape equals ``x.shape[:-1]``, padding tokens get weight 0; otherwise every row counts.

The per-batch statistics are combined with ``combine`` (``jnp.add`` for sums, ``jnp.maximum`` for ranges).
One compiled forward serves every batch of the same shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qjax.ptq.layers import Path, check_batches

Stat = Callable[[jax.Array, jax.Array], object]  # (rows (n, K) float32, row weights (n,)) -> pytree


def rows_and_mask(x: jax.Array, batch: Mapping, token_mask: str | None) -> tuple[jax.Array, jax.Array]:
    """``x`` as float32 rows ``(n, K)`` and a row weight ``(n,)``: the batch's token mask when its shape
    matches ``x.shape[:-1]``, else ones."""
    rows = jnp.asarray(x, jnp.float32).reshape(-1, x.shape[-1])
    mask = batch.get(token_mask) if token_mask else None
    if mask is not None and tuple(jnp.shape(mask)) == tuple(x.shape[:-1]):
        return rows, jnp.asarray(mask, jnp.float32).reshape(-1)
    return rows, jnp.ones(rows.shape[:1], jnp.float32)


def _module_path(context) -> Path:
    return tuple(str(p) for p in context.module.path)


def capture_fn(model: nn.Module, modules: Sequence[Path], stat: Stat, *, token_mask: str | None,
               apply_kwargs: Mapping) -> Callable:
    """A jitted ``(variables, batch, active=None) -> {module path: stat}`` for the inputs of ``modules``.

    ``active``: optional ``{module path: bool array}``; a module whose flag is false skips ``stat`` at run
    time (``lax.cond``) and reports zeros, so one compilation serves any subset of the modules.
    """
    wanted = set(modules)

    def run(variables, batch, active=None):
        found: dict = {}

        def compute(path, rows, mask):
            if active is None:
                return stat(rows, mask)
            zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                           jax.eval_shape(stat, rows, mask))
            return jax.lax.cond(active[path], lambda: stat(rows, mask), lambda: zeros)

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and context.module.scope is not None and args:
                path = _module_path(context)
                if path in wanted and hasattr(args[0], "shape"):
                    rows, mask = rows_and_mask(args[0], batch, token_mask)
                    found[path] = compute(path, rows, mask)
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply(variables, **batch, **apply_kwargs)
        missing = wanted - set(found)
        if missing:
            raise ValueError(f"these modules were never called with an array input: {sorted(missing)}")
        return found

    return jax.jit(run)


def input_statistics(model: nn.Module, variables: Mapping, batches: Sequence[Mapping],
                     modules: Sequence[Path], stat: Stat, combine: Callable = jnp.add, *,
                     token_mask: str | None = "attention_mask", apply_kwargs: Mapping | None = None,
                     fn: Callable | None = None, active: Mapping | None = None) -> dict:
    """``{module path: combine over batches of stat(rows, mask)}`` (module docstring).

    ``fn``: a function from :func:`capture_fn` to reuse (saves a compilation across calls); ``active``:
    its per-module flags (modules not active report zeros).
    """
    batches = check_batches(batches, "input_statistics")
    fn = fn or capture_fn(model, modules, stat, token_mask=token_mask, apply_kwargs=dict(apply_kwargs or {}))
    if active is not None:
        active = {path: jnp.asarray(bool(active.get(path, False))) for path in modules}
    total = None
    for batch in batches:
        stats = fn(dict(variables), batch, active)
        total = stats if total is None else jax.tree_util.tree_map(combine, total, stats)
    return total
