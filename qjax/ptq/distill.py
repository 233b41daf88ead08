"""Teacher-student pieces shared by STE fine-tuning and PV-tuning.

The teacher is the float model; the student its quantized copy. On every calibration batch the loss is the
mean squared error between their outputs,

    ``L = mean((f(student(batch)) - f(teacher(batch)))^2)``,

where ``f = output_fn(outputs, batch)`` picks what to match (by default the model's first output, e.g. a
transformer's last hidden state; an embedding model can match its pooled embedding). Knowledge distillation
on outputs (Hinton et al., 2015) is how both STE-based QAT and PV-tuning (Malinovskii et al., NeurIPS 2024)
fine-tune a quantized model without labels; PV-tuning's language models use KL on logits, an embedding
model has no logits, so MSE on its outputs is the analogue.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from qjax.ptq.layers import check_batches

OutputFn = Callable[[object, Mapping], jax.Array]


def first_output(outputs, batch: Mapping) -> jax.Array:
    """The model's first output: ``outputs[0]`` for a tuple or a transformers ``ModelOutput``, else
    ``outputs`` itself."""
    del batch
    if isinstance(outputs, jax.Array):
        return outputs
    return outputs[0]


def mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """``mean((student - teacher)^2)`` in float32."""
    return jnp.mean(jnp.square(student.astype(jnp.float32) - teacher.astype(jnp.float32)))


def teacher_targets(model, variables: Mapping | None, batches: Sequence[Mapping],
                    output_fn: OutputFn = first_output, apply_kwargs: Mapping | None = None
                    ) -> list[jax.Array]:
    """``output_fn(outputs, batch)`` of the float model for every batch (one jitted forward): a Linen
    module and its variables (``model.apply(variables, **batch)``, frozen weights dequantized), or an NNX
    module and ``None`` (``model(**batch)`` run as float, frozen weights dequantized)."""
    from qjax.ptq.model import model_view

    batches = check_batches(batches, "teacher_targets")
    view = model_view(model, variables, (), batches[0], apply_kwargs, "teacher_targets")
    return view_targets(view, batches, output_fn)


def view_targets(view, batches: Sequence[Mapping], output_fn: OutputFn = first_output) -> list[jax.Array]:
    """:func:`teacher_targets` of a model view (:mod:`qjax.ptq.model`) with its own float params."""
    fn = jax.jit(lambda p, r, b: output_fn(view.apply(p, r, b), b))
    return [fn(view.params, view.rest, b) for b in batches]


def checked_batches(batches: Sequence[Mapping], steps: int, who: str) -> list[dict]:
    """The fine-tuning batches after the checks: a non-empty list of dicts of arrays, all of the first
    batch's shapes (the step compiles once), and ``steps`` an integer >= 0."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"{who}: steps={steps!r} must be an integer >= 0")
    batches = check_batches(batches, who)
    shapes = [jax.tree_util.tree_map(jnp.shape, dict(b)) for b in batches]
    for i, s in enumerate(shapes[1:], 1):
        if s != shapes[0]:
            raise ValueError(f"{who}: batch {i} has shapes {s}, batch 0 {shapes[0]}; allowed: batches of "
                             "one shape (pad every batch to the same length), so the step compiles once")
    return batches


def check_learning_rate(who: str, **rates) -> None:
    """Each ``name=value`` a finite number >= 0 (0 turns the step off; a schedule, a callable, passes)."""
    for name, value in rates.items():
        if callable(value):
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise ValueError(f"{who}: {name}={value!r} is not allowed; allowed: a finite number >= 0")


def run_steps(step: Callable, state, batches: Sequence[Mapping], targets: Sequence[jax.Array], steps: int,
              progress: Callable | None = None):
    """``state, loss = step(state, batch, target)`` for ``steps`` steps cycling over the batches.

    Returns ``(state, losses)``; ``progress(iterable)`` (e.g. ``tqdm``) wraps the step range.
    """
    pairs = itertools.cycle(list(zip(batches, targets, strict=True)))
    losses = []
    for _ in (progress or (lambda r: r))(range(steps)):
        batch, target = next(pairs)
        state, loss = step(state, batch, target)
        losses.append(loss)
    jax.block_until_ready(state)
    return state, [float(x) for x in losses]
