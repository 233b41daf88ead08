"""STE fine-tuning: quantization-aware training of the latent float weights against the float teacher.

The baseline PV-tuning is compared with (Malinovskii et al., NeurIPS 2024, section 4: "STE"): the student
is ``quantize_model(model, rules)``, whose forward uses ``fake_quant(q, W)`` and whose backward is the
rule's straight-through estimator (Bengio et al. 2013), ``dL/dW = dL/dW_q``. Every parameter (latent
weights and the float ones) takes Adam steps on the teacher-student loss (:mod:`qjax.ptq.distill`):

    ``W <- W - lr * adam(dL/dW_q)``,   ``W_q = fake_quant(q, W)``,

then the front end's freeze (:func:`qjax.linen.freeze`, :func:`qjax.nnx.freeze`) turns the latent weights
into packed codes with exactly the codes training used. Starting from a frozen model (e.g. the output of
:func:`qjax.ptq.gptq`) starts from its dequantized weights, so STE and PV-tuning can share an initial
quantization, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import optax

from qjax.ptq.distill import (
    OutputFn,
    check_learning_rate,
    checked_batches,
    first_output,
    mse,
    run_steps,
    view_targets,
)
from qjax.ptq.model import model_view


def ste_finetune(model, variables: Mapping | None, rules, batches: Sequence[Mapping], *,
                 teacher=None, steps: int = 100, learning_rate: float = 1e-4,
                 optimizer: optax.GradientTransformation | None = None, output_fn: OutputFn = first_output,
                 apply_kwargs: Mapping | None = None, progress: Callable | None = None):
    """STE fine-tuning (module docstring); returns ``(frozen model, per-step losses)``.

    Linen: ``ste_finetune(model, variables, rules, batches)``; ``variables`` float or frozen (the start),
    ``teacher`` the float model's variables (default: ``variables``, which must then be float); returns
    frozen variables. NNX: ``ste_finetune(model, None, rules, batches)``; ``model`` float or frozen (the
    start), ``teacher`` a float ``nnx.Module`` of the same structure (default: ``model`` as it is now);
    ``model`` is quantized in place by the rules, trained, frozen (:class:`qjax.nnx.PackedWeight`) and
    returned. ``optimizer`` defaults to ``optax.adam(learning_rate)``; every parameter trains (learned
    quantization scales stay as they are). One jitted step.
    """
    batches = checked_batches(batches, steps, "ste_finetune")
    if optimizer is None:
        check_learning_rate("ste_finetune", learning_rate=learning_rate)
    view = model_view(model, variables, rules, batches[0], apply_kwargs, "ste_finetune")
    _ = view.layers  # raises when the rules match nothing (before any training)
    targets = view_targets(view.teacher(teacher), batches, output_fn)
    optimizer = optimizer or optax.adam(learning_rate)
    params, rest, apply, finish = view.student()

    def loss_fn(params, rest, batch, target):
        return mse(output_fn(apply(params, rest, batch), batch), target)

    @jax.jit
    def step(state, batch, target):
        params, opt_state, rest = state
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch, target)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state, rest), loss

    (params, _, _), losses = run_steps(step, (params, optimizer.init(params), rest), batches, targets, steps,
                                       progress)
    return finish(params), losses
