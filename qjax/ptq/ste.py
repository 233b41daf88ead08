"""STE fine-tuning: quantization-aware training of the latent float weights against the float teacher.

The baseline PV-tuning is compared with (Malinovskii et al., NeurIPS 2024, section 4: "STE"): the student
is ``quantize_model(model, rules)``, whose forward uses ``fake_quant(q, W)`` and whose backward is the
rule's straight-through estimator (Bengio et al. 2013), ``dL/dW = dL/dW_q``. Every parameter (latent
weights and the float ones) takes Adam steps on the teacher-student loss (:mod:`qjax.ptq.distill`):

    ``W <- W - lr * adam(dL/dW_q)``,   ``W_q = fake_quant(q, W)``,

then :func:`qjax.linen.freeze` turns the latent weights into packed codes with exactly the codes training
used. Starting from frozen variables (e.g. the output of :func:`qjax.ptq.gptq`) starts from their
dequantized weights, so STE and PV-tuning can share an initial quantization, as in the paper.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import optax

from qjax.linen import float_view, freeze
from qjax.ptq.distill import OutputFn, checked_batches, first_output, mse, run_steps, teacher_targets
from qjax.ptq.layers import quantized_layers, quantized_model


def ste_finetune(model: nn.Module, variables: Mapping, rules, batches: Sequence[Mapping], *,
                 teacher: Mapping | None = None, steps: int = 100, learning_rate: float = 1e-4,
                 optimizer: optax.GradientTransformation | None = None, output_fn: OutputFn = first_output,
                 apply_kwargs: Mapping | None = None, progress: Callable | None = None
                 ) -> tuple[dict, list[float]]:
    """STE fine-tuning (module docstring); returns ``(frozen variables, per-step losses)``.

    ``variables``: float or frozen start; ``teacher``: the float model's variables (default: ``variables``,
    which must then be float). ``optimizer`` defaults to ``optax.adam(learning_rate)``. One jitted step.
    """
    batches = checked_batches(batches, steps, "ste_finetune")
    apply_kwargs = dict(apply_kwargs or {})
    qmodel = quantized_model(model, rules)
    start = float_view(variables)
    quantized_layers(qmodel, start, batches[0], apply_kwargs)  # fails early when the rules match nothing
    teacher = float_view(teacher if teacher is not None else variables)
    targets = teacher_targets(qmodel.model, teacher, batches, output_fn, apply_kwargs)
    optimizer = optimizer or optax.adam(learning_rate)
    frozen_rest = {k: v for k, v in start.items() if k != "params"}

    def loss_fn(params, batch, target):
        out = qmodel.apply({**frozen_rest, "params": params}, **batch, **apply_kwargs)
        return mse(output_fn(out, batch), target)

    @jax.jit
    def step(state, batch, target):
        params, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, target)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    state = (start["params"], optimizer.init(start["params"]))
    (params, _), losses = run_steps(step, state, batches, targets, steps, progress)
    trained = {**frozen_rest, "params": params}
    return freeze(qmodel, trained, **batches[0], **apply_kwargs), losses
