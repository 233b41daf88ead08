"""Ready 8-bit optimizers: optax's Adam, AdamW, Lion and SGD with momentum under :func:`quantize_state`.

Each takes the hyperparameters of its optax counterpart, unchanged (checked when concrete: a learning rate
a finite number >= 0 or a schedule, betas and momentum in ``[0, 1)``, eps >= 0), plus ``block_size``
(default 256), ``min_size`` (default 4096), ``overrides`` and ``skip_nonfinite`` of :func:`quantize_state`.
The two sizes default to ``None`` (meaning 256 and 4096) so that
``optax.inject_hyperparams(adam8bit)(learning_rate=...)`` treats them as static; pass explicit sizes
through ``inject_hyperparams`` with ``static_args=("block_size", "min_size")``.

Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization", ICLR 2022.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import optax

from qjax.optim.quantized_state import Override, quantize_state

ScalarOrSchedule = optax.ScalarOrSchedule
DEFAULT_BLOCK_SIZE = 256
DEFAULT_MIN_SIZE = 4096


def _check_hparams(who: str, learning_rate, betas: Mapping[str, float], eps: Mapping[str, float] = {}):
    """Concrete hyperparameters in range: a learning rate a finite number >= 0 or a schedule (a callable),
    each beta in ``[0, 1)``, each eps a finite number >= 0. Arrays (``inject_hyperparams``) pass."""
    checks = [("learning_rate", learning_rate, "a finite number >= 0 or a schedule (a callable)",
               lambda v: 0 <= v < math.inf)]
    checks += [(name, v, "a number in [0, 1)", lambda v: 0 <= v < 1) for name, v in betas.items()]
    checks += [(name, v, "a finite number >= 0", lambda v: 0 <= v < math.inf) for name, v in eps.items()]
    for name, value, allowed, ok in checks:
        if callable(value) or hasattr(value, "shape"):
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{who}: {name}={value!r} is not allowed; allowed: {allowed}")
        if not ok(value):
            raise ValueError(f"{who}: {name}={value!r} is not allowed; allowed: {allowed}")


def _wrap(
    inner: optax.GradientTransformation,
    block_size: int | None,
    min_size: int | None,
    overrides,
    skip_nonfinite: bool,
) -> optax.GradientTransformationExtraArgs:
    for name, value in (("block_size", block_size), ("min_size", min_size)):
        if hasattr(value, "shape"):
            raise ValueError(
                f"{name}={value!r} is an array; it must be a Python int (under "
                "optax.inject_hyperparams pass static_args=('block_size', 'min_size'))"
            )
    return quantize_state(
        inner,
        DEFAULT_BLOCK_SIZE if block_size is None else block_size,
        DEFAULT_MIN_SIZE if min_size is None else min_size,
        overrides=overrides,
        skip_nonfinite=skip_nonfinite,
    )


def adam8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    *,
    nesterov: bool = False,
    block_size: int | None = None,
    min_size: int | None = None,
    overrides: Mapping | Sequence[Override] = (),
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """``optax.adam`` with block-wise 8-bit ``mu`` (signed map) and ``nu`` (unsigned map).

    ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``, ``u = -lr m_hat / (sqrt(v_hat + eps_root) + eps)``
    with bias-corrected ``m_hat``, ``v_hat``; ``m`` and ``v`` are stored as uint8 codes of the dynamic map
    plus one float32 absmax per ``block_size`` elements (Dettmers et al., ICLR 2022). 2.03 bytes of state per
    parameter instead of 8.
    """
    _check_hparams("adam8bit", learning_rate, {"b1": b1, "b2": b2}, {"eps": eps, "eps_root": eps_root})
    inner = optax.adam(learning_rate, b1, b2, eps, eps_root, mu_dtype, nesterov=nesterov)
    return _wrap(inner, block_size, min_size, overrides, skip_nonfinite)


def adamw8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any | None = None,
    *,
    nesterov: bool = False,
    block_size: int | None = None,
    min_size: int | None = None,
    overrides: Mapping | Sequence[Override] = (),
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """``optax.adamw`` (decoupled weight decay) with block-wise 8-bit ``mu`` and ``nu``.

    ``u = -lr (m_hat / (sqrt(v_hat + eps_root) + eps) + weight_decay * p)``; ``m`` (signed map) and ``v``
    (unsigned map) as in :func:`adam8bit` (Dettmers et al., ICLR 2022; Loshchilov & Hutter, ICLR 2019).
    """
    _check_hparams("adamw8bit", learning_rate, {"b1": b1, "b2": b2}, {"eps": eps, "eps_root": eps_root})
    inner = optax.adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask, nesterov=nesterov)
    return _wrap(inner, block_size, min_size, overrides, skip_nonfinite)


def lion8bit(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.99,
    mu_dtype: Any | None = None,
    weight_decay: ScalarOrSchedule = 1e-3,
    mask: Any | None = None,
    *,
    block_size: int | None = None,
    min_size: int | None = None,
    overrides: Mapping | Sequence[Override] = (),
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """``optax.lion`` with its one momentum ``m`` block-wise 8-bit (signed map).

    ``u = -lr (sign(b1 m + (1 - b1) g) + weight_decay * p)``, ``m = b2 m + (1 - b2) g`` (Chen et al.,
    "Symbolic Discovery of Optimization Algorithms", 2023); ``m`` stored as in Dettmers et al., ICLR 2022.
    """
    _check_hparams("lion8bit", learning_rate, {"b1": b1, "b2": b2})
    inner = optax.lion(learning_rate, b1, b2, mu_dtype, weight_decay, mask)
    return _wrap(inner, block_size, min_size, overrides, skip_nonfinite)


def momentum8bit(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    accumulator_dtype: Any | None = None,
    *,
    block_size: int | None = None,
    min_size: int | None = None,
    overrides: Mapping | Sequence[Override] = (),
    skip_nonfinite: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """``optax.sgd(learning_rate, momentum, nesterov)`` with the momentum buffer block-wise 8-bit (signed).

    ``t = momentum * t + g``, ``u = -lr t`` (or ``-lr (g + momentum * t)`` with Nesterov); ``t`` stored as
    in Dettmers et al., ICLR 2022. ``momentum=None`` (plain SGD, no state) is refused: use ``optax.sgd``.
    """
    if momentum is None:
        raise ValueError(
            "momentum8bit: momentum=None has no state to quantize; allowed: a float such as "
            "0.9 (use optax.sgd for plain SGD)"
        )
    _check_hparams("momentum8bit", learning_rate, {"momentum": momentum})
    inner = optax.sgd(learning_rate, momentum, nesterov, accumulator_dtype)
    return _wrap(inner, block_size, min_size, overrides, skip_nonfinite)
