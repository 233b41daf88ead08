"""Which implementation a kernel call runs: the backend names and the platform dispatch.

- ``"xla"``: the pure-jnp reference (:mod:`kernels_pallas.reference`), on every platform;
- ``"pallas"``: the Pallas kernel compiled for the platform, Mosaic on TPU, the GPU lowering (Triton or
  Mosaic GPU) on GPU; on any other platform a ``ValueError``;
- ``"interpret"``: the same Pallas kernel run by Pallas' interpreter (``interpret=True``), on every
  platform, the way the kernels are tested on CPU;
- ``"auto"``: ``"pallas"`` on TPU and GPU, else ``"xla"``, saying once per platform that it fell back.

The platform is :func:`jax.default_backend` at trace time.
"""

from __future__ import annotations

import functools
import warnings

import jax

BACKENDS = ("auto", "xla", "pallas", "interpret")
KERNEL_PLATFORMS = ("tpu", "gpu")  # platforms with a compiled Pallas kernel


class KernelFallbackWarning(UserWarning):
    """``backend="auto"`` ran the pure-jnp reference because the platform has no Pallas kernel."""


def platform() -> str:
    """``"tpu"``, ``"gpu"`` (CUDA or ROCm) or another JAX platform name such as ``"cpu"``."""
    name = jax.default_backend()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


@functools.cache
def _warn_fallback(where: str) -> None:
    warnings.warn(f"kernels_pallas: no Pallas kernel for platform {where!r} (kernels exist for "
                  f"{', '.join(KERNEL_PLATFORMS)}); backend='auto' runs the 'xla' reference here. Pass "
                  "backend='xla' to silence this, or backend='interpret' to run the Pallas kernel in the "
                  "interpreter.", KernelFallbackWarning, stacklevel=4)


def resolve(backend: str) -> str:
    """The concrete backend (``"xla"``, ``"pallas"`` or ``"interpret"``) that ``backend`` runs here.

    Raises ``ValueError`` for an unknown name, or for ``"pallas"`` on a platform without a kernel.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    where = platform()
    if backend == "auto":
        if where in KERNEL_PLATFORMS:
            return "pallas"
        _warn_fallback(where)
        return "xla"
    if backend == "pallas" and where not in KERNEL_PLATFORMS:
        raise ValueError(f"backend='pallas' needs a TPU or GPU, this platform is {where!r}; allowed here: "
                         "'xla', 'interpret', 'auto'")
    return backend


def kernel_options(backend: str) -> dict[str, bool]:
    """The Pallas options of a resolved kernel backend: ``interpret``, and ``k_in_grid`` (accumulate over a K
    grid axis, sequential on TPU and in the interpreter; GPU grid programs run in parallel, so there the
    kernel loops over K itself)."""
    return {"interpret": backend == "interpret", "k_in_grid": backend == "interpret" or platform() != "gpu"}


def tile(size: int, cap: int, quantum: int, pow2: bool) -> int:
    """A block length for an axis of ``size``: ``size`` rounded up to a multiple of ``quantum`` (and to a
    power of two if ``pow2``: the GPU lowering wants power-of-two arrays), at most ``cap``. A block below
    ``cap`` spans the whole padded axis; ``cap`` itself must meet the TPU rule (a multiple of 8 or 128)."""
    length = round_up(size, quantum)
    return min(cap, 1 << (length - 1).bit_length() if pow2 else length)


def round_up(value: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is ``>= value``."""
    return -(-value // multiple) * multiple


def compiler_params(grid_rank: int, interpret: bool, parallel: int = 2):
    """Mosaic's dimension semantics on TPU: the first ``parallel`` grid axes are ``"parallel"``, the rest (a
    K grid axis, last, is a reduction) ``"arbitrary"``; ``None`` in interpret mode and on other platforms."""
    if interpret or platform() != "tpu":
        return None
    from jax.experimental.pallas import tpu as pltpu

    parallel = min(parallel, grid_rank)
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * parallel
                                + ("arbitrary",) * (grid_rank - parallel))
