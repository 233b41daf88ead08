"""qjax under SPMD sharding: 8 fake CPU devices, in one subprocess.

``--xla_force_host_platform_device_count`` must be set before jax initialises its backend, so the
checks run in a fresh interpreter (one, since starting jax and compiling takes seconds). The script
prints a JSON dict ``{check: {"ok": bool, "detail": str, ...}}`` on its last stdout line; the tests below
parametrize over the check names and assert on that dict.

Checks, on a ``(64, 32)`` float32 input sharded over a 1-D mesh of 8 devices along rows
(``P("d", None)``) or columns (``P(None, "d")``), compared with the same jitted function on an
unsharded (single-device) copy:

- ``fake_quant`` and ``grad(sum(fake_quant))`` are bit-identical;
- ``quantize`` gives the same codes, ``dequantize`` the same values, and the codes stay distributed
  over the 8 devices (a ``NamedSharding``, not a ``SingleDeviceSharding``);
- ``packing.pack`` / ``packing.unpack`` of sharded int8 codes round-trip, eagerly and under ``jit``,
  and the packed words equal those of the unsharded codes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

N_DEVICES = 8
QUANTIZERS = ("int4_perchannel", "int4_pergroup32", "binary_reste", "nf4_perblock64")
SHARDINGS = ("rows", "cols")
PACK_CASES = ("int4", "binary", "ternary", "int8")
PACK_AXES = (0, 1)
# Eager (un-jitted) calls compile every op separately (~0.5 s each on 8 devices): only these run
# eagerly, the rest under jit only.
EAGER_QUANTIZERS = ("int4_perchannel", "binary_reste")
EAGER_PACK_CASES = ("int4",)

_SCRIPT = r'''
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from qjax import (PerBlock, PerChannel, PerGroup, PerTensor, Quantizer, dequantize, fake_quant,
                  packing, quantize)

QUANTIZERS = {
    "int4_perchannel": Quantizer("int4", PerChannel(-1)),
    "int4_pergroup32": Quantizer("int4", PerGroup(0, 32)),
    "binary_reste": Quantizer("binary", PerChannel(-1), "mean_abs", "reste"),
    "nf4_perblock64": Quantizer("nf4", PerBlock(64)),
}
PACK_CASES = {  # name: (quantizer making int8 codes, bits)
    "int4": (Quantizer("int4", PerChannel(-1)), 4),
    "binary": (Quantizer("binary", PerChannel(-1), "mean_abs"), 1),
    "ternary": (Quantizer("ternary", PerTensor(), "mean_abs"), 2),
    "int8": (Quantizer("int8", PerChannel(-1)), 8),
}
EAGER_QUANTIZERS = ("int4_perchannel", "binary_reste")
EAGER_PACK_CASES = ("int4",)

results = {}
mesh = Mesh(np.array(jax.devices()), ("d",))
SPECS = {"rows": P("d", None), "cols": P(None, "d")}
single = jax.devices()[0]
x_ref = jax.device_put(jax.random.normal(jax.random.key(0), (64, 32), jnp.float32), single)


def compare(key, got, want):
    got, want = np.asarray(got), np.asarray(want)
    entry = {"ok": False, "detail": ""}
    if got.shape != want.shape or got.dtype != want.dtype:
        entry["detail"] = f"got {got.shape} {got.dtype}, want {want.shape} {want.dtype}"
    else:
        entry["ok"] = got.tobytes() == want.tobytes()
        if not entry["ok"]:
            entry["detail"] = f"{int(np.sum(got != want))} of {got.size} elements differ"
        if got.dtype == np.float32:
            ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32))
            entry["max_ulp"] = int(ulps.max())
            entry["detail"] += f" (max {entry['max_ulp']} ulp)" if not entry["ok"] else ""
    results[key] = entry


def record_sharding(key, arr):
    sh = arr.sharding
    n = len(sh.device_set)
    results[key] = {
        "ok": not isinstance(sh, jax.sharding.SingleDeviceSharding) and n == 8,
        "detail": f"{type(sh).__name__} over {n} devices, spec={getattr(sh, 'spec', None)}",
        "fully_replicated": bool(sh.is_fully_replicated),
    }


results["device_count"] = {"ok": jax.device_count() == 8, "detail": str(jax.devices())}

for qname, q in QUANTIZERS.items():
    fq = jax.jit(lambda x, q=q: fake_quant(q, x))
    grad = jax.jit(jax.grad(lambda x, q=q: fake_quant(q, x).sum()))
    quant = jax.jit(lambda x, q=q: quantize(q, x))
    ref_y, ref_g, ref_qa = fq(x_ref), grad(x_ref), quant(x_ref)
    ref_deq = dequantize(ref_qa)
    compare(f"reference/{qname}", ref_y, ref_deq)
    modes = {"jit": quant}
    if qname in EAGER_QUANTIZERS:
        modes["eager"] = lambda x, q=q: quantize(q, x)
    for sname, spec in SPECS.items():
        xs = jax.device_put(x_ref, NamedSharding(mesh, spec))
        assert len(xs.sharding.device_set) == 8, xs.sharding
        compare(f"fake_quant/{qname}/{sname}", fq(xs), ref_y)
        compare(f"grad/{qname}/{sname}", grad(xs), ref_g)
        for mode, fn in modes.items():
            qa = fn(xs)
            compare(f"codes/{qname}/{sname}/{mode}", qa.codes, ref_qa.codes)
            compare(f"dequantize/{qname}/{sname}/{mode}", dequantize(qa), ref_deq)
            record_sharding(f"codes_sharded/{qname}/{sname}/{mode}", qa.codes)

for cname, (q, bits) in PACK_CASES.items():
    codes_ref = quantize(q, x_ref).codes
    assert codes_ref.dtype == jnp.int8, codes_ref.dtype
    for sname, spec in SPECS.items():
        codes = jax.device_put(codes_ref, NamedSharding(mesh, spec))
        for axis in (0, 1):
            size = codes.shape[axis]
            key = f"{cname}/{sname}/axis{axis}"
            ref_words = packing.pack(codes_ref, bits, axis)
            pack = jax.jit(lambda c, b=bits, a=axis: packing.pack(c, b, a))
            unpack = jax.jit(lambda w, b=bits, a=axis, s=size: packing.unpack(w, b, a, s))
            words = pack(codes)
            compare(f"pack_words/{key}/jit", words, ref_words)
            compare(f"pack_roundtrip/{key}/jit", unpack(words), codes_ref)
            if cname in EAGER_PACK_CASES:
                words = packing.pack(codes, bits, axis)
                compare(f"pack_words/{key}/eager", words, ref_words)
                compare(f"pack_roundtrip/{key}/eager",
                        packing.unpack(words, bits, axis, size, signed=True), codes_ref)

print(json.dumps(results))
'''


@pytest.fixture(scope="module")
def results() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEVICES}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, (
        f"sharding script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(results: dict, key: str) -> dict:
    assert key in results, f"{key!r} not computed; have {sorted(results)}"
    entry = results[key]
    assert entry["ok"], f"{key}: {entry['detail']}"
    return entry


# Splitting a mean over the sharded axis sums partial sums per device, in another order than the
# single-device reduction: mean_abs scales may differ by an ulp or two (see test_*_within_ulps).
_SPLIT_MEAN = pytest.mark.xfail(
    strict=True,
    reason="binary mean_abs PerChannel(-1) reduces over rows: with rows sharded, the mean|x| scale "
    "is summed in a different order (per-device partial sums + all-reduce) and differs by ~2 ulp",
)


def _params(*parts, xfail_rows_binary: bool = False):
    """Cartesian product of ``parts`` as pytest params with readable ids; optionally mark the
    binary_reste/rows combination xfail (see _SPLIT_MEAN)."""
    combos = [()]
    for part in parts:
        combos = [(*c, p) for c in combos for p in part]
    out = []
    for combo in combos:
        marks = ()
        if xfail_rows_binary and combo[0] == "binary_reste" and combo[1] == "rows":
            marks = (_SPLIT_MEAN,)
        out.append(pytest.param(*combo, id="-".join(map(str, combo)), marks=marks))
    return out


def test_subprocess_sees_eight_devices(results):
    _check(results, "device_count")


def test_all_expected_checks_ran(results):
    expected = {"device_count"}
    for q in QUANTIZERS:
        expected.add(f"reference/{q}")
        for s in SHARDINGS:
            expected |= {f"fake_quant/{q}/{s}", f"grad/{q}/{s}"}
            for mode in ("jit", "eager") if q in EAGER_QUANTIZERS else ("jit",):
                for k in ("codes", "dequantize", "codes_sharded"):
                    expected.add(f"{k}/{q}/{s}/{mode}")
    for c in PACK_CASES:
        for s in SHARDINGS:
            for a in PACK_AXES:
                for mode in ("jit", "eager") if c in EAGER_PACK_CASES else ("jit",):
                    for k in ("pack_words", "pack_roundtrip"):
                        expected.add(f"{k}/{c}/{s}/axis{a}/{mode}")
    assert set(results) == expected


@pytest.mark.parametrize("qname", QUANTIZERS)
def test_unsharded_fake_quant_equals_dequantize_quantize(results, qname):
    _check(results, f"reference/{qname}")


@pytest.mark.parametrize(
    ("qname", "sharding"), _params(QUANTIZERS, SHARDINGS, xfail_rows_binary=True)
)
def test_fake_quant_sharded_bit_identical(results, qname, sharding):
    _check(results, f"fake_quant/{qname}/{sharding}")


@pytest.mark.parametrize(
    ("qname", "sharding"), _params(QUANTIZERS, SHARDINGS, xfail_rows_binary=True)
)
def test_grad_sharded_bit_identical(results, qname, sharding):
    _check(results, f"grad/{qname}/{sharding}")


@pytest.mark.parametrize(("qname", "sharding"), _params(QUANTIZERS, SHARDINGS))
def test_fake_quant_and_grad_sharded_within_ulps(results, qname, sharding):
    """What does hold everywhere: sharding moves fake_quant and its gradient by a few ulp at most."""
    for kind in ("fake_quant", "grad"):
        entry = results[f"{kind}/{qname}/{sharding}"]
        assert entry["max_ulp"] <= 4, f"{kind}/{qname}/{sharding}: {entry['detail']}"


@pytest.mark.parametrize(("qname", "sharding"), _params(QUANTIZERS, SHARDINGS))
def test_quantize_sharded_same_codes(results, qname, sharding):
    modes = ("jit", "eager") if qname in EAGER_QUANTIZERS else ("jit",)
    for mode in modes:
        _check(results, f"codes/{qname}/{sharding}/{mode}")


@pytest.mark.parametrize(
    ("qname", "sharding"), _params(QUANTIZERS, SHARDINGS, xfail_rows_binary=True)
)
def test_quantize_sharded_dequantize_bit_identical(results, qname, sharding):
    modes = ("jit", "eager") if qname in EAGER_QUANTIZERS else ("jit",)
    for mode in modes:
        _check(results, f"dequantize/{qname}/{sharding}/{mode}")


@pytest.mark.parametrize(("qname", "sharding"), _params(QUANTIZERS, SHARDINGS))
def test_quantize_sharded_codes_stay_distributed(results, qname, sharding):
    modes = ("jit", "eager") if qname in EAGER_QUANTIZERS else ("jit",)
    for mode in modes:
        _check(results, f"codes_sharded/{qname}/{sharding}/{mode}")


@pytest.mark.parametrize(("case", "sharding", "axis"), _params(PACK_CASES, SHARDINGS, PACK_AXES))
def test_pack_unpack_sharded_roundtrip(results, case, sharding, axis):
    modes = ("jit", "eager") if case in EAGER_PACK_CASES else ("jit",)
    for mode in modes:
        _check(results, f"pack_words/{case}/{sharding}/axis{axis}/{mode}")
        _check(results, f"pack_roundtrip/{case}/{sharding}/axis{axis}/{mode}")
