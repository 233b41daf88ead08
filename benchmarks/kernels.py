"""Packed matmul kernels: speed against a dense matmul measured in the same run, and the real bytes.

CPU section (always): ``kernels_pallas.packed_matmul(..., backend="xla")`` (the pure-jnp reference that a
CPU runs; a CPU has no Pallas kernel) for int8 / int4 / int2 / binary weights with per-channel scales, int4
with group-128 scales, and W8A8 (``kernels_pallas.int8_matmul``), each against a float32 ``jnp.dot`` of the
same shape: ``x (M, K) @ W (K, N)``, ``K = N``. Every function is ``jax.jit``-compiled, warmed up, then timed
with ``jax.block_until_ready``; methods are interleaved (every round runs ``reps`` calls of each, in a
rotated order) and the figure is the median per-call time; the ratio is against the float32 dot of the same
shape in the same run. Bytes are the ``nbytes`` of the arrays the matmul reads (packed uint32 words plus
float32 scales), against a float32 and a bfloat16 copy of the weight.

Accelerator section (only where ``jax.default_backend()`` is ``"gpu"`` or ``"tpu"``): weight-only
int8 / int4 / int2 / binary on the ``"pallas"`` backend at M in {1, 16, 64, 256}, K = N in {4096, 8192}
against a bfloat16 ``jnp.dot``, with achieved GB/s (bytes the kernel must read and write / time) and TFLOP/s
(2MKN / time) against the device's roofline where its peaks are known, and the issue's goals at M <= 16
(int4 >= 3.5x, int8 >= 1.8x, binary >= 8x over bfloat16). Elsewhere it is recorded as not measured.

    python -m benchmarks.kernels [--quick] [--out results/]      # default: runs/kernels.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

import kernels_pallas as kp
from benchmarks.machine import OUT_HELP, cpu_name, out_path
from qjax import packing

WEIGHT_ONLY = {"int8": (8, None), "int4": (4, None), "int4_g128": (4, 128), "int2": (2, None),
               "binary": (1, None)}  # name -> (bits, group_size)
_DOT = jax.jit(jnp.dot)
_PACKED = jax.jit(kp.packed_matmul, static_argnames=("bits", "group_size", "backend"))
_W8A8 = jax.jit(kp.int8_matmul, static_argnames=("backend",))
GOALS = {"int4": 3.5, "int8": 1.8, "binary": 8.0}  # speedup over bf16 at M <= 16 (issue 5)
PEAKS = {  # device_kind substring -> (HBM GB/s, dense bf16 TFLOP/s), vendor datasheets
    "H200": (4800.0, 989.0), "H100": (3350.0, 989.0), "A100": (2039.0, 312.0), "L4": (300.0, 121.0),
    "TPU v5 lite": (819.0, 197.0), "TPU v5p": (2765.0, 459.0), "TPU v4": (1200.0, 275.0),
}


def packed_weight(key: jax.Array, bits: int, k: int, n: int, group_size: int | None):
    """Random ``bits``-bit codes of a ``(k, n)`` weight packed along K, and their float32 scales."""
    lo, hi = packing.code_range(bits, True)
    codes = jax.random.randint(key, (k, n), lo, hi + 1, jnp.int8)
    if bits == 1:
        codes = jnp.where(codes == 0, 1, codes).astype(jnp.int8)
    groups = 1 if group_size is None else k // group_size
    scales = jax.random.uniform(jax.random.fold_in(key, 1), (groups, n), jnp.float32, 0.01, 0.02)
    return packing.pack(codes, bits, 0), scales


def time_interleaved(calls: dict[str, Callable[[], jax.Array]], rounds: int, reps: int) -> dict[str, float]:
    """Median seconds per call of each zero-argument function, interleaved over ``rounds`` rounds."""
    for call in calls.values():  # compile and warm up
        jax.block_until_ready(call())
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            for _ in range(reps):
                jax.block_until_ready(calls[name]())
            times[name].append((time.perf_counter() - start) / reps)
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_section(sizes: list[int], ms: list[int], rounds: int, reps: int) -> list[dict]:
    """One row per (K = N, M, method): median ms, ratio against the float32 dot, real bytes."""
    rows = []
    for size in sizes:
        key = jax.random.key(size)
        w32 = jax.random.normal(key, (size, size), jnp.float32) * 0.02
        w16 = w32.astype(jnp.bfloat16)
        weights = {name: packed_weight(jax.random.fold_in(key, bits), bits, size, size, group)
                   for name, (bits, group) in WEIGHT_ONLY.items()}
        w8 = jax.random.randint(key, (size, size), -127, 128, jnp.int8)
        w8_scales = jnp.full((1, size), 0.01, jnp.float32)
        read = {name: words.nbytes + scales.nbytes for name, (words, scales) in weights.items()}
        read["w8a8"] = w8.nbytes + w8_scales.nbytes
        for m in ms:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, size), jnp.float32)
            x8 = jax.random.randint(key, (m, size), -127, 128, jnp.int8)
            x8_scales = jnp.full((m, 1), 0.01, jnp.float32)
            calls = {"f32_dot": functools.partial(_DOT, x, w32)}
            for name, (bits, group) in WEIGHT_ONLY.items():
                calls[name] = functools.partial(_PACKED, x, *weights[name], bits=bits, group_size=group,
                                                backend="xla")
            calls["w8a8"] = functools.partial(_W8A8, x8, x8_scales, w8, w8_scales, backend="xla")
            seconds = time_interleaved(calls, rounds, reps)
            for name, sec in seconds.items():
                weight_bytes = w32.nbytes if name == "f32_dot" else read[name]
                rows.append({"K=N": size, "M": m, "method": name, "median_ms": 1e3 * sec,
                             "time_vs_f32_dot": sec / seconds["f32_dot"], "weight_bytes": weight_bytes,
                             "bytes_vs_f32": weight_bytes / w32.nbytes,
                             "bytes_vs_bf16": weight_bytes / w16.nbytes})
    return rows


def accelerator_section(sizes: list[int], ms: list[int], rounds: int, reps: int,
                        backend: str = "pallas") -> dict:
    """Weight-only kernels on ``backend`` against a bfloat16 ``jnp.dot``: speedup, GB/s, TFLOP/s, roofline.

    Runs only on a GPU or TPU, unless called with ``backend="interpret"`` (a check that this code runs,
    not a measurement)."""
    where = kp.backends.platform()
    if backend == "pallas" and where not in kp.backends.KERNEL_PLATFORMS:
        return {"measured": False, "not_measured": f"no GPU lent to this session (platform {where!r})"}
    kind = jax.devices()[0].device_kind
    peak = next((v for name, v in PEAKS.items() if name.lower() in kind.lower()), None)
    rows = []
    for size in sizes:
        key = jax.random.key(size)
        w16 = (jax.random.normal(key, (size, size), jnp.float32) * 0.02).astype(jnp.bfloat16)
        weights = {name: packed_weight(jax.random.fold_in(key, bits), bits, size, size, group)
                   for name, (bits, group) in WEIGHT_ONLY.items()}
        for m in ms:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, size), jnp.bfloat16)
            calls, read = {"bf16_dot": functools.partial(_DOT, x, w16)}, {"bf16_dot": w16.nbytes}
            for name, (bits, group) in WEIGHT_ONLY.items():
                words, scales = weights[name]
                calls[name] = functools.partial(_PACKED, x, words, scales, bits=bits, group_size=group,
                                                backend=backend)
                read[name] = words.nbytes + scales.nbytes
            seconds = time_interleaved(calls, rounds, reps)
            for name, sec in seconds.items():
                moved = read[name] + x.nbytes + m * size * (2 if name == "bf16_dot" else 4)
                flops = 2.0 * m * size * size
                row = {"K=N": size, "M": m, "method": name, "median_ms": 1e3 * sec,
                       "speedup_vs_bf16": seconds["bf16_dot"] / sec, "GB/s": moved / sec / 1e9,
                       "TFLOP/s": flops / sec / 1e12}
                if peak is not None:
                    row["fraction_of_roofline"] = max(moved / (peak[0] * 1e9), flops / (peak[1] * 1e12)) / sec
                rows.append(row)
    goals = {}
    for name, target in GOALS.items():
        small = [r["speedup_vs_bf16"] for r in rows if r["method"] == name and r["M"] <= 16]
        if small:
            goals[f"{name} >= {target}x at M <= 16"] = {"worst": min(small), "met": min(small) >= target}
    return {"measured": backend == "pallas", "backend": backend, "device_kind": kind,
            "peak_GB/s_TFLOP/s": peak, "rows": rows, "goals": goals}


def environment() -> dict:
    dev = jax.devices()[0]
    return {"device": f"{dev.platform}: {dev.device_kind}", "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "python": platform.python_version(),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2)}


def table(result: dict) -> str:
    lines = ["| K=N | M | method | median ms | time / f32 dot | weight bytes | bytes / f32 | bytes / bf16 |",
             "|---|---|---|---|---|---|---|---|"] if result["cpu"] else []
    for r in result["cpu"]:
        lines.append(f"| {r['K=N']} | {r['M']} | {r['method']} | {r['median_ms']:.3f} | "
                     f"{r['time_vs_f32_dot']:.2f} | {r['weight_bytes']:,} | {r['bytes_vs_f32']:.4f} | "
                     f"{r['bytes_vs_bf16']:.4f} |")
    acc = result["accelerator"]
    if not acc["measured"]:
        lines.append(f"\naccelerator section: not measured ({acc.get('not_measured', 'interpret check')})")
    else:
        lines += [f"\naccelerator: {acc['device_kind']}",
                  "| K=N | M | method | ms | speedup vs bf16 | GB/s | TFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['K=N']} | {r['M']} | {r['method']} | {r['median_ms']:.4f} | "
                  f"{r['speedup_vs_bf16']:.2f} | {r['GB/s']:.0f} | {r['TFLOP/s']:.2f} |" for r in acc["rows"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few rounds (a smoke run)")
    parser.add_argument("--out", default=None, help=OUT_HELP.replace("NAME", "kernels"))
    args = parser.parse_args(argv)
    out = out_path(args.out, "kernels.json")
    if args.quick:
        cpu_sizes, cpu_ms, acc_sizes, acc_ms, rounds, reps = [256], [1, 8], [1024], [1, 16], 2, 2
    else:
        cpu_sizes, cpu_ms, acc_sizes, acc_ms, rounds, reps = [1024, 4096], [1, 16, 256], [4096, 8192], \
            [1, 16, 64, 256], 7, 5
    result = {"environment": environment(), "quick": args.quick, "rounds": rounds, "reps_per_round": reps,
              "cpu": cpu_section(cpu_sizes, cpu_ms, rounds, reps),
              "accelerator": accelerator_section(acc_sizes, acc_ms, rounds, reps)}
    result["environment"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    out.write_text(json.dumps(result, indent=1, default=float))
    print(table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
