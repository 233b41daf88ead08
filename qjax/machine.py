"""Facts of the machine qjax runs on that choose the fastest exact path (never a setting)."""

from __future__ import annotations

import contextlib
import functools

import jax

PRODUCTS = ("auto", "int8", "float")


def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


@functools.cache
def int8_product_is_faster() -> bool:
    """Whether int8 x int8 -> int32 dots beat float32 ones here: on GPU and TPU, and on CPUs with int8
    dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX), where XLA's int8 dot runs a QAT step faster
    than float32 (measured on this project's Xeon); not on AVX2-only CPUs (measured on its EPYC)."""
    if jax.default_backend() in ("gpu", "tpu"):
        return True
    return bool(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8"})


def resolve_product(product: str) -> str:
    """``"int8"`` or ``"float"`` for a QAT product setting (``"auto"``: :func:`int8_product_is_faster`)."""
    if product == "auto":
        return "int8" if int8_product_is_faster() else "float"
    return product
