"""The layer Hessian ``H = 2 X^T X / n`` of a weight contraction's calibration inputs, shared by GPTQ
(:mod:`qjax.ptq.gptq`) and the smoothing methods (:mod:`qjax.ptq.smoothing`): how a summed statistic
becomes the mean, and the check that it is finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mean_hessian(h: jax.Array, count: jax.Array) -> jax.Array:
    """``H / n``: a summed :func:`qjax.ptq.gptq.hessian_stat` divided by its row count (0 rows: left as
    summed). Works under ``jit``."""
    return h / jnp.maximum(count, 1.0)


def check_hessian(hessian, who: str) -> None:
    """``ValueError`` naming ``who`` when the Hessian holds NaN or inf (the calibration inputs did)."""
    h = np.asarray(hessian)
    if not np.all(np.isfinite(h)):
        raise ValueError(f"{who}: the Hessian holds {np.count_nonzero(~np.isfinite(h))} NaN/inf entries (the "
                         "calibration inputs hold NaN or inf); allowed: a finite Hessian from finite inputs")
