"""Peak memory of quantizing an NNX model in place and freezing it, against its float parameter bytes.

qjax promises that ``qjax.nnx.quantize_model`` (a class swap, no clone) followed by ``qjax.nnx.freeze`` (each
quantized weight replaced by a packed :class:`qjax.nnx.PackedWeight`) never holds a second copy of the
weights: the goal is a peak of <= 1.1x the float model's parameter bytes. Qwix's ``quantize_model`` on the
same model is measured beside it: it ``nnx.clone``\\ s the model, runs it once and, with a
``qwix.PtqProvider``, replaces each weight of the clone by its quantized value as the call reaches it; the
caller still holds the float model it passed in.

The model is a small Llama-like decoder (token embedding, RMSNorm, grouped-query attention with RoPE, SwiGLU
MLP, untied head; every projection an ``nnx.Linear``): hidden 2048, MLP 5632, 3 layers, vocabulary 8192,
~169M float32 parameters (~675 MB) in the full run; hidden 512, 2 layers (~31 MB) with ``--quick``. Both
libraries quantize the same weights: every ``nnx.Linear`` kernel, int4, one absmax scale per output channel;
the embedding and norms stay float.

Each library runs in a fresh subprocess (so one's garbage, caches and allocator state cannot inflate the
other's peak) on an identical model built from the same seed. After ``gc.collect()`` the model's float
parameters must be the only big arrays alive (anything else over 1% of their bytes is an error). Live device
bytes, ``sum(a.nbytes for a in jax.live_arrays())``, are read at explicit points (before, after each step)
and by a background thread every ``--interval-ms`` during each step; a step's peak is the largest of these.
Arrays that live only inside one XLA computation are not live arrays, so each step also records the growth
of the process's resident set over its start (``VmHWM`` after ``/proc/self/clear_refs`` reset it, minus
``VmRSS`` at the step's start): a cross-check that includes XLA temporaries and compilation, and misses pages
the allocator reuses. ``jax.devices()[0].memory_stats()`` is recorded too (``None`` on CPU).

For qjax, a diagnosis follows the main measurement: on a fresh float32 weight of the largest quantized
shape, the peak of the per-weight step ``freeze`` runs (``pack_for_serving(quantize(q, w), contract)``, as
in ``qjax/nnx.py``'s ``freeze``), run op by op (as ``freeze`` runs it) and under ``jax.jit``, in units of
that weight's bytes: what one weight's temporaries add to the peak.

    python -m benchmarks.memory [--quick] [--out results/]      # default: runs/memory.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.machine import OUT_HELP, cpu_name, out_path, write_results

GOAL = 1.1  # qjax's peak live bytes / float parameter bytes
CONFIGS = {
    "full": dict(vocab=8192, dim=2048, heads=16, kv_heads=4, mlp=5632, layers=3, tokens=16),
    "quick": dict(vocab=2048, dim=512, heads=8, kv_heads=2, mlp=1408, layers=2, tokens=16),
}
LINEARS = r"(^|.*/)(q|k|v|o|gate|up|down|head)$"  # every nnx.Linear of the model, by module path
QJAX_RULE = 'Rule(".*", types=("Linear",), weight=Quantizer("int4", PerChannel(-1)))'
QWIX_RULE = f'qwix.PtqProvider([qwix.QuantizationRule(module_path={LINEARS!r}, weight_qtype=jnp.int4)])'


# --- the model ---------------------------------------------------------------------------------------

def rope(x: jax.Array) -> jax.Array:
    """Rotary position embedding of ``x (B, T, H, D)`` (base 10000, halves rotated)."""
    t, d = x.shape[1], x.shape[-1]
    freq = 10000.0 ** (-jnp.arange(0, d // 2, dtype=jnp.float32) / (d // 2))
    angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, rngs: nnx.Rngs):
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nnx.Linear(dim, heads * self.head_dim, use_bias=False, rngs=rngs)
        self.k = nnx.Linear(dim, kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.v = nnx.Linear(dim, kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.o = nnx.Linear(heads * self.head_dim, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        q = rope(self.q(x).reshape(b, t, self.heads, self.head_dim))
        k = rope(self.k(x).reshape(b, t, self.kv_heads, self.head_dim))
        v = self.v(x).reshape(b, t, self.kv_heads, self.head_dim)
        y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.reshape(b, t, -1))


class Block(nnx.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, mlp: int, rngs: nnx.Rngs):
        self.attn_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.attn = Attention(dim, heads, kv_heads, rngs)
        self.mlp_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.gate = nnx.Linear(dim, mlp, use_bias=False, rngs=rngs)
        self.up = nnx.Linear(dim, mlp, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(mlp, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        y = self.mlp_norm(x)
        return x + self.down(jax.nn.silu(self.gate(y)) * self.up(y))


class Decoder(nnx.Module):
    """A small Llama-like decoder: every projection an ``nnx.Linear``."""

    def __init__(self, vocab: int, dim: int, heads: int, kv_heads: int, mlp: int, layers: int,
                 rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.layers = nnx.List([Block(dim, heads, kv_heads, mlp, rngs) for _ in range(layers)])
        self.norm = nnx.RMSNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))


def build(config: dict) -> tuple[Decoder, jax.Array]:
    """The model and example tokens. Its structure comes from ``nnx.eval_shape`` (no arrays); its weights are
    drawn with NumPy (seed 0: normal, std 1/sqrt(fan-in); norm scales 1), one array at a time, so building
    leaves no temporaries behind and compiles nothing."""
    shape = {k: v for k, v in config.items() if k != "tokens"}
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(**shape, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def draw(leaf):
        if len(leaf.shape) < 2:
            return jnp.ones(leaf.shape, leaf.dtype)
        values = rng.standard_normal(leaf.shape, dtype=np.float32)
        values *= 1 / np.sqrt(leaf.shape[0])
        return jnp.asarray(values, leaf.dtype)

    model = nnx.merge(graphdef, jax.tree.map(draw, abstract))
    tokens = jax.random.randint(jax.random.key(1), (1, config["tokens"]), 0, config["vocab"])
    return model, tokens


# --- measuring ---------------------------------------------------------------------------------------

def live_bytes() -> int:
    return sum(a.nbytes for a in jax.live_arrays())


def tree_bytes(tree) -> int:
    return sum(getattr(a, "nbytes", 0) for a in jax.tree.leaves(tree))


def _status(key: str) -> int | None:
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return None


def _reset_peak_rss() -> bool:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), then reset ``VmHWM`` to ``VmRSS``."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler:
    """Peak live bytes per step: explicit readings at each step's ends plus a background thread."""

    def __init__(self, interval_s: float):
        self.interval_s, self.steps = interval_s, {}
        self._step, self._peak, self._samples = None, 0, 0
        self._stop, self._lock = threading.Event(), threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            value = live_bytes()
            with self._lock:
                if self._step is not None:
                    self._peak, self._samples = max(self._peak, value), self._samples + 1
            time.sleep(self.interval_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @contextlib.contextmanager
    def step(self, name: str):
        gc.collect()
        before = live_bytes()
        rss_reset = _reset_peak_rss()
        rss_before = _status("VmRSS")
        with self._lock:
            self._step, self._peak, self._samples = name, before, 0
        start = time.perf_counter()
        yield
        wall = time.perf_counter() - start
        hwm = _status("VmHWM")
        gc.collect()
        after = live_bytes()
        with self._lock:
            peak, samples, self._step = max(self._peak, after), self._samples, None
        self.steps[name] = {
            "wall_s": round(wall, 3), "live_bytes_before": before, "live_bytes_after": after,
            "peak_live_bytes": peak, "background_samples": samples,
            "rss_peak_growth_bytes": hwm - rss_before if rss_reset and hwm and rss_before else None}


def _check_only_params_alive(model, allowed_fraction: float = 0.01) -> dict:
    """The float parameters are the only big arrays alive: the rest is under ``allowed_fraction`` of them."""
    gc.collect()
    params = jax.tree.leaves(nnx.state(model))
    ids = {a.unsafe_buffer_pointer() for a in params}
    param_bytes = sum(a.nbytes for a in params)
    others = [a for a in jax.live_arrays() if a.unsafe_buffer_pointer() not in ids]
    other_bytes = sum(a.nbytes for a in others)
    if other_bytes > allowed_fraction * param_bytes:
        big = sorted(((a.nbytes, a.shape, str(a.dtype)) for a in others), reverse=True)[:5]
        raise RuntimeError(f"{other_bytes} bytes of arrays other than the model's parameters are alive at "
                           f"the start (largest: {big}); the measurement needs the parameters alone")
    return {"float_param_bytes": param_bytes, "float_param_count": sum(a.size for a in params),
            "other_live_bytes_at_start": other_bytes, "largest_param_bytes": max(a.nbytes for a in params)}


def _forward(model, tokens) -> jax.Array:
    return nnx.jit(lambda m, t: m(t))(model, tokens)


def _forward_error(model, tokens, reference) -> float:
    out = _forward(model, tokens)
    return float(jnp.linalg.norm(out - reference) / jnp.linalg.norm(reference))


# --- the two runs (each in its own process) ------------------------------------------------------------

def run_qjax(config: dict, interval_s: float) -> dict:
    from qjax import PerChannel, Quantizer, Rule
    from qjax import nnx as qn

    model, tokens = build(config)
    reference = _forward(model, tokens)
    start = _check_only_params_alive(model)
    rules = [Rule(".*", types=("Linear",), weight=Quantizer("int4", PerChannel(-1)))]
    stats_before = jax.devices()[0].memory_stats()
    with Sampler(interval_s) as sampler:
        with sampler.step("quantize_model"):
            qn.quantize_model(model, rules, tokens)
        with sampler.step("freeze"):
            qn.freeze(model)
    packed = nnx.state(model, qn.PackedWeight)
    count = len(jax.tree.leaves(packed, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    result = {**start, "steps": sampler.steps, "rule": QJAX_RULE, "quantized_weights": count,
              "bytes_after": tree_bytes(nnx.state(model)), "packed_weight_bytes": tree_bytes(packed),
              "relative_output_error": _forward_error(model, tokens, reference),
              "memory_stats": {"before": stats_before, "after": jax.devices()[0].memory_stats()}}
    del model, packed, reference
    result["diagnosis"] = diagnose_freeze_step(start["float_param_bytes"], config, interval_s)
    return result


def diagnose_freeze_step(param_bytes: int, config: dict, interval_s: float) -> dict:
    """Peak added by ``freeze``'s per-weight step on one weight of the largest quantized shape, op by op and
    jitted, in units of the weight's bytes, and the whole-model peak ratio each would give (one float model
    plus that weight's excess)."""
    from qjax import PerChannel, Quantizer, quantize
    from qjax.serving import pack_for_serving

    shape = (config["dim"], config["vocab"])  # the head: the largest nnx.Linear kernel of both configs
    q = Quantizer("int4", PerChannel(-1))

    def one(w):
        return pack_for_serving(quantize(q, w), 0)

    out, w_bytes = {"weight_shape": list(shape)}, 4 * shape[0] * shape[1]
    for name, fn in (("op_by_op", one), ("jit", jax.jit(one))):
        w = jax.random.normal(jax.random.key(2), shape)
        if name == "jit":  # compiled first; the op-by-op step runs cold, as in freeze
            jax.block_until_ready(fn(w))
        with Sampler(interval_s) as sampler, sampler.step(name):
            packed = jax.block_until_ready(fn(w))
        step = sampler.steps[name]
        growth = step["rss_peak_growth_bytes"]
        out[name] = {"peak_over_weight": round((step["peak_live_bytes"] - step["live_bytes_before"])
                                               / w.nbytes, 3),
                     "rss_growth_over_weight": None if growth is None else round(growth / w.nbytes, 3),
                     "packed_over_weight": round(tree_bytes(packed) / w.nbytes, 4), "wall_s": step["wall_s"]}
        del w, packed
    share = w_bytes / param_bytes
    out["weight_share_of_float_params"] = round(share, 4)
    out["freeze_peak_ratio_predicted_op_by_op"] = round(1 + out["op_by_op"]["peak_over_weight"] * share, 4)
    out["freeze_peak_ratio_predicted_jit"] = round(1 + out["jit"]["peak_over_weight"] * share, 4)
    return out


def run_qwix(config: dict, interval_s: float) -> dict:
    import qwix

    tiny = nnx.Linear(4, 4, rngs=nnx.Rngs(0))
    clone_shares = tiny.kernel.get_value().unsafe_buffer_pointer() == \
        nnx.clone(tiny).kernel.get_value().unsafe_buffer_pointer()
    del tiny
    model, tokens = build(config)
    reference = _forward(model, tokens)
    start = _check_only_params_alive(model)
    provider = qwix.PtqProvider([qwix.QuantizationRule(module_path=LINEARS, weight_qtype=jnp.int4)])
    stats_before = jax.devices()[0].memory_stats()
    with Sampler(interval_s) as sampler:
        with sampler.step("quantize_model"):
            qmodel = qwix.quantize_model(model, provider, tokens)
        with sampler.step("drop_float_model"):
            del model
    quantized = [v for _, module in nnx.iter_modules(qmodel) for v in vars(module).values()
                 if hasattr(v, "array") and hasattr(v, "how")]  # Qwix's WithAux(QArray, how)
    return {**start, "steps": sampler.steps, "rule": QWIX_RULE, "quantized_weights": len(quantized),
            "bytes_after": tree_bytes(nnx.state(qmodel)), "quantized_weight_bytes": tree_bytes(quantized),
            "bytes_after_with_float_model_held": sampler.steps["quantize_model"]["live_bytes_after"],
            "relative_output_error": _forward_error(qmodel, tokens, reference),
            "nnx_clone_shares_buffers": clone_shares,
            "memory_stats": {"before": stats_before, "after": jax.devices()[0].memory_stats()}}


WORKERS = {"qjax": run_qjax, "qwix": run_qwix}


def _in_subprocess(name: str, quick: bool, interval_ms: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, "-m", "benchmarks.memory", "--worker", name, "--worker-out", str(out),
               "--interval-ms", str(interval_ms), *(["--quick"] if quick else [])]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        if proc.returncode != 0:
            return {"measured": False, "not_measured": f"worker failed (exit {proc.returncode}): "
                                                       f"{proc.stderr.strip()[-2000:]}"}
        return {"measured": True, **json.loads(out.read_text())}


# --- the report --------------------------------------------------------------------------------------

def summarize(run: dict) -> None:
    """Peak and after figures as ratios to the float parameter bytes, added to ``run`` in place."""
    if not run.get("measured"):
        return
    base = run["float_param_bytes"]
    peak = max(s["peak_live_bytes"] for s in run["steps"].values())
    run["peak_live_bytes"] = peak
    run["peak_ratio"] = round(peak / base, 4)
    run["after_ratio"] = round(run["bytes_after"] / base, 4)
    for step in run["steps"].values():
        step["peak_ratio"] = round(step["peak_live_bytes"] / base, 4)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment() -> dict:
    import qjax

    flags = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        flags = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    dev = jax.devices()[0]
    return {"device": f"{dev.platform}: {dev.device_kind}", "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8",
                                         "fma", "f16c"}),
            "xla_flags": os.environ.get("XLA_FLAGS"), "jax": jax.__version__, "jaxlib": _version("jaxlib"),
            "flax": flax.__version__, "qjax": qjax.__version__, "qwix": _version("qwix"),
            "python": platform.python_version(), "load_average_1m_at_start": round(os.getloadavg()[0], 2)}


def table(results: dict) -> str:
    mb = 1e6
    lines = [f"float params: {results['model']['float_param_bytes'] / mb:.1f} MB; goal: qjax peak <= {GOAL}x",
             f"{'library':<6} {'step':<18} {'wall s':>7} {'peak MB':>9} {'x float':>8} {'after MB':>9} "
             f"{'RSS growth MB':>14} (includes compiling)", "-" * 78]
    for lib in ("qjax", "qwix"):
        run = results[lib]
        if not run.get("measured"):
            lines.append(f"{lib:<6} not measured: {run['not_measured'][:200]}")
            continue
        for name, s in run["steps"].items():
            growth = s["rss_peak_growth_bytes"]
            lines.append(f"{lib:<6} {name:<18} {s['wall_s']:>7.2f} {s['peak_live_bytes'] / mb:>9.1f} "
                         f"{s['peak_ratio']:>8.3f} {s['live_bytes_after'] / mb:>9.1f} "
                         f"{'-' if growth is None else f'{growth / mb:.1f}':>14}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~31 MB model instead of ~675 MB")
    parser.add_argument("--out", default=None, help=OUT_HELP.replace("NAME", "memory"))
    parser.add_argument("--interval-ms", type=float, default=1.0, help="background sampling period")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = CONFIGS["quick" if args.quick else "full"]
    if args.worker:
        result = WORKERS[args.worker](config, args.interval_ms / 1000)
        Path(args.worker_out).write_text(json.dumps(result, indent=1) + "\n")
        return None
    results = {"benchmark": "memory", "quick": args.quick, "environment": environment(),
               "model": {"name": "Llama-like NNX decoder", **config},
               "protocol": {"goal": f"qjax peak live bytes <= {GOAL}x the float parameter bytes",
                            "live_bytes": "sum(a.nbytes for a in jax.live_arrays())",
                            "sampling": f"explicit readings at each step's ends and a background thread "
                                        f"every {args.interval_ms} ms during it; one fresh subprocess per "
                                        "library",
                            "rss_peak_growth_bytes": "VmHWM after the step (reset by /proc/self/clear_refs) "
                                                     "minus VmRSS at its start: a cross-check"}}
    for lib in ("qjax", "qwix"):
        print(f"{lib} ...", flush=True)
        results[lib] = _in_subprocess(lib, args.quick, args.interval_ms)
        summarize(results[lib])
    qj = results["qjax"]
    if not qj["measured"]:
        raise RuntimeError(qj["not_measured"])
    results["model"].update(float_param_bytes=qj["float_param_bytes"],
                            float_param_count=qj["float_param_count"])
    results["qjax_peak_ratio"] = qj["peak_ratio"]
    results["qwix_peak_ratio"] = results["qwix"].get("peak_ratio", "not measured")
    results["goal_met"] = qj["peak_ratio"] <= GOAL
    return write_results(results, out_path(args.out, "memory.json"), table(results))


if __name__ == "__main__":
    main(sys.argv[1:])
