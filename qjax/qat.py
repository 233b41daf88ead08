"""Quantization-aware training pieces shared by the Linen and NNX transforms.

Per-step hyperparameters are a dict of (possibly traced) arrays, so a schedule never recompiles:

- ``o``, ``t`` (ReSTE), ``omega`` (BiPer), ``beta`` (SwishSign): passed to each quantizer whose surrogate
  takes them, ignored by the others;
- ``enabled``: ``0`` keeps every tensor float (a warm-up), ``1`` quantizes (default 1);
- ``biper_binarize``: BiPer's two stages (Vargas et al. 2024): ``0`` gives stage 1, weights
  ``|alpha| * sin(omega w)`` real-valued; ``1`` (default) stage 2, ``|alpha| * sign(sin(omega w))``
  (one alpha for both: a learned scale is used by its magnitude).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax import surrogates
from qjax.quantizer import Quantizer, fake_quant, init_scale, relaxed_quant

HPARAM_NAMES = ("o", "t", "omega", "beta", "enabled", "biper_binarize")


_RANGES = {name: h.allowed for s in surrogates.SURROGATES.values() for name, h in s.hyperparameters.items()}


def check_hparams(hparams: dict | None) -> dict:
    """``hparams`` as a dict, each name one of :data:`HPARAM_NAMES` and each concrete value in its range: a
    surrogate's own (``o``, ``t``, ``omega``, ``beta`` > 0, from the :mod:`qjax.surrogates` records), any
    finite number for the gates ``enabled`` and ``biper_binarize``. Traced values pass (the surrogates guard
    them: an out-of-range one gives NaN gradients)."""
    hparams = dict(hparams or {})
    unknown = sorted(set(hparams) - set(HPARAM_NAMES))
    if unknown:
        raise ValueError(f"unknown QAT hyperparameter(s) {unknown}; allowed: {', '.join(HPARAM_NAMES)}")
    for name, value in hparams.items():
        surrogates.as_hyperparameter(value, name, _RANGES.get(name))
    return hparams


def surrogate_kwargs(q: Quantizer, hparams: dict) -> dict:
    """The hyperparameters ``q``'s surrogate takes (its record's ``hyperparameters``), from ``hparams``."""
    if not q.is_sign:
        return {}
    return q.surrogate_spec.select(hparams)


def needs_state(q: Quantizer | None) -> bool:
    """Whether ``q`` has a learned scale, kept in the ``quant`` state."""
    return q is not None and q.scale == "learned"


def initial_scale(q: Quantizer, x: jax.Array) -> jax.Array:
    """Learned scale start: ``mean|x|`` (binary, XNOR/BiPer's alpha), else LSQ's ``2 mean|x|/sqrt(fmax)``."""
    return init_scale(q, x, "mean_abs" if q.fmt.kind == "binary" else "lsq_init")


def _gate(hparams: dict, quantized: jax.Array, value: jax.Array) -> jax.Array:
    if "enabled" not in hparams:
        return quantized
    return jnp.where(jnp.asarray(hparams["enabled"]) > 0, quantized, value)


def quantize_weight(q: Quantizer, w: jax.Array, scale: jax.Array | None, hparams: dict) -> jax.Array:
    """The fake-quantized weight for QAT, honouring ``enabled`` and BiPer's stage.

    A sign surrogate with a custom real-valued forward ``r`` (BiPer's ``sin(omega w)``) and
    ``biper_binarize`` in ``hparams``: stage 1 (``0``) is :func:`qjax.quantizer.relaxed_quant`,
    ``s * r(w)``, stage 2 (``1``) ``fake_quant``, ``s * sign(r(w))``, with the same ``s`` (a learned alpha
    by its magnitude ``|alpha|``), so the switch keeps every weight's sign.
    """
    kwargs = surrogate_kwargs(q, hparams)
    y = fake_quant(q, w, scale=scale, **kwargs)
    if q.is_sign and q.surrogate_spec.has_custom_forward and "biper_binarize" in hparams:
        wave = relaxed_quant(q, w, scale=scale, **kwargs)
        y = jnp.where(jnp.asarray(hparams["biper_binarize"]) > 0, y, wave)
    return _gate(hparams, y, w)


def quantize_input(q: Quantizer, x: jax.Array, scale: jax.Array | None, hparams: dict) -> jax.Array:
    """The fake-quantized input (or activation operand) for QAT, honouring ``enabled``."""
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
        return x  # token ids and masks pass through
    return _gate(hparams, fake_quant(q, x, scale=scale, **surrogate_kwargs(q, hparams)), x)
