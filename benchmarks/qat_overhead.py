"""QAT step-time overhead: a jitted training step with quantization-aware training over the fp32 step.

For each model (an MLP and a small Transformer encoder LM, plain Flax Linen) and each method

- ``fp32``: the unmodified model (the baseline);
- ``qjax_w4a8``: ``qjax.linen.quantize_model`` with int4 per-output-channel weights and int8 per-token
  inputs on every Dense / DenseGeneral layer;
- ``qjax_w1a1``: binary weights (``mean_abs`` per output channel) and binary inputs (``mean_abs`` per
  token), clipped STE, on every Dense / DenseGeneral layer except the first (the MLP's ``dense_0``; the
  Transformer's first layer is its embedding, not a Dense) and the last (``head``), which stay float as in
  XNOR-Net / Bi-Real Net;
- ``qwix_w4a8``: Qwix's quantized training (``qwix.QtProvider`` + ``qwix.QtRule``, int4 weights, int8
  dynamic-range activations on the same layers' ``dot_general``; Qwix's closest equivalent);
- ``qwix_w1a1``: not measured: Qwix has no 1-bit (sign) format, its smallest integer type is ``int2``;
- ``qjax_w8a8`` and ``qwix_w8a8``: int8 weights and inputs, the case Qwix's integer path is built for;
- ``qjax_{w4a8,w8a8}_original``: the same with ``residuals="original"``: the backward multiplies the
  gradient by the unquantized weight and input, ``dx = g w^T``, ``dw = x^T g``, which is what Qwix's
  ``QtProvider`` computes (its compiled backward reads the float kernel and input); qjax's default,
  ``"quantized"``, is the exact gradient of the fake-quant product, ``dx = g Q(w)^T``, ``dw = Q(x)^T g``,
  and keeps the fake-quant values for it. These rows compare like with like;
- ``qjax_{w4a8,w8a8}_{int8,float}``: the same with qjax's fused QAT product forced
  (``quantize_model(..., product=...)``); the plain ``qjax_*`` rows use ``product="auto"``, which picks the
  int8 product on CPUs with int8 dot instructions (AVX-512 VNNI, AVX-VNNI, AMX) and the float one elsewhere
  (:func:`qjax.machine.int8_product_is_faster`);

the step is one ``jax.jit``-compiled forward + backward + ``optax.adam`` update, and every method starts from
the fp32 model's initial weights. Each step is compiled ahead of time (compile time is reported, not
timed), warmed up, then timed with ``jax.block_until_ready``.
Methods are interleaved: every round runs ``steps_per_round`` steps of each method in a rotated order, so
machine noise falls on all of them alike; the figure is the median over all timed steps and the ratio is
against the fp32 step of the same model in the same run. The 1-minute load average at the start and the
end is recorded: on a shared machine, a ratio is only as good as the quiet it was measured in.

Each method also records which dot products its compiled step runs (operand and result dtypes of every
``dot`` in the optimized HLO), so an integer forward path shows up as ``s8,s8->s32`` dots; and, if
``qjax.linen`` reports the path its QAT forward took, that report.

    python -m benchmarks.qat_overhead [--quick] [--out results/]      # default: runs/qat_overhead.json
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import qjax
from benchmarks.machine import OUT_HELP, cpu_name, out_path, write_results
from qjax import PerChannel, PerToken, Quantizer, Rule
from qjax import linen as qlinen
from qjax.machine import _cpu_flags, int8_product_is_faster, resolve_product

DENSE_TYPES = ("Dense", "DenseGeneral")
FIRST_AND_LAST = r"(?!dense_0$|head$).*"  # W1A1 keeps the first and the last layer float


# --- models ------------------------------------------------------------------------------------------

class MLP(nn.Module):
    features: tuple[int, ...] = (1024, 1024, 10)

    @nn.compact
    def __call__(self, x):
        for i, width in enumerate(self.features[:-1]):
            x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
        return nn.Dense(self.features[-1], name="head")(x)


class Block(nn.Module):
    heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x, mask):
        y = nn.LayerNorm(name="ln_attn")(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(y, mask=mask)
        y = nn.LayerNorm(name="ln_mlp")(x)
        y = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(y))
        return x + nn.Dense(x.shape[-1], name="mlp_out")(y)


class TransformerLM(nn.Module):
    vocab: int = 512
    dim: int = 256
    heads: int = 4
    layers: int = 2
    mlp_dim: int = 1024

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.dim, name="embed")(tokens)
        x = x + self.param("pos", nn.initializers.normal(0.02), (tokens.shape[-1], self.dim))
        mask = nn.make_causal_mask(tokens)
        for i in range(self.layers):
            x = Block(self.heads, self.mlp_dim, name=f"block_{i}")(x, mask)
        return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: nn.Module
    batch: Callable[[jax.Array], tuple[jax.Array, jax.Array]]  # key -> (inputs, labels)
    loss: Callable[[jax.Array, jax.Array], jax.Array]  # (logits, labels) -> scalar
    shape: dict


def _classification_loss(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _next_token_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def cases(quick: bool) -> list[Case]:
    if quick:
        mlp = dict(inputs=32, features=(64, 64, 10), batch=16)
        lm = dict(vocab=64, dim=32, heads=2, layers=1, mlp_dim=64, seq=16, batch=2)
    else:
        mlp = dict(inputs=784, features=(1024, 1024, 10), batch=256)
        lm = dict(vocab=512, dim=256, heads=4, layers=2, mlp_dim=1024, seq=128, batch=2)

    def mlp_batch(key):
        k1, k2 = jax.random.split(key)
        return (jax.random.normal(k1, (mlp["batch"], mlp["inputs"])),
                jax.random.randint(k2, (mlp["batch"],), 0, mlp["features"][-1]))

    def lm_batch(key):
        tokens = jax.random.randint(key, (lm["batch"], lm["seq"]), 0, lm["vocab"])
        return tokens, tokens

    lm_model = TransformerLM(lm["vocab"], lm["dim"], lm["heads"], lm["layers"], lm["mlp_dim"])
    return [Case("mlp", MLP(mlp["features"]), mlp_batch, _classification_loss, mlp),
            Case("transformer", lm_model, lm_batch, _next_token_loss, lm)]


# --- methods: (init, apply) pairs -----------------------------------------------------------------

W8A8_RULES = [Rule(".*", types=DENSE_TYPES, weight=Quantizer("int8", PerChannel(-1)),
                   input=Quantizer("int8", PerToken(-1)), name="w8a8")]
W4A8_RULES = [Rule(".*", types=DENSE_TYPES, weight=Quantizer("int4", PerChannel(-1)),
                   input=Quantizer("int8", PerToken(-1)), name="w4a8")]
W1A1_RULES = [Rule(FIRST_AND_LAST, types=DENSE_TYPES,
                   weight=Quantizer("binary", PerChannel(-1), "mean_abs", "clipped_ste"),
                   input=Quantizer("binary", PerToken(-1), "mean_abs", "clipped_ste"), name="w1a1")]


_W4A8 = "int4 PerChannel(-1) absmax weights, int8 PerToken(-1) absmax inputs, every Dense/DenseGeneral"
_W8A8 = "int8 PerChannel(-1) absmax weights, int8 PerToken(-1) absmax inputs, every Dense/DenseGeneral"
_ORIGINAL = (', product="auto", residuals="original": the backward takes the unquantized operands, as '
             "Qwix's QtProvider does")
QJAX_METHODS = {  # name: (rules, description, QAT product, backward residuals)
    "qjax_w4a8": (W4A8_RULES, _W4A8 + ', product="auto"', "auto", "quantized"),
    "qjax_w1a1": (W1A1_RULES, "binary mean_abs PerChannel(-1) weights and PerToken(-1) inputs, clipped_ste, "
                              "every Dense/DenseGeneral but the first and the last layer (float)", "auto",
                  "quantized"),
    "qjax_w8a8": (W8A8_RULES, _W8A8 + ', product="auto"', "auto", "quantized"),
    "qjax_w4a8_original": (W4A8_RULES, _W4A8 + _ORIGINAL, "auto", "original"),
    "qjax_w8a8_original": (W8A8_RULES, _W8A8 + _ORIGINAL, "auto", "original"),
    "qjax_w4a8_int8": (W4A8_RULES, _W4A8 + ", int8 x int8 -> int32 product forced", "int8", "quantized"),
    "qjax_w4a8_float": (W4A8_RULES, _W4A8 + ", float product forced", "float", "quantized"),
    "qjax_w8a8_int8": (W8A8_RULES, _W8A8 + ", int8 x int8 -> int32 product forced", "int8", "quantized"),
    "qjax_w8a8_float": (W8A8_RULES, _W8A8 + ", float product forced", "float", "quantized"),
    "qjax_w8a8_int8_original": (W8A8_RULES, _W8A8 + ", int8 product forced" + _ORIGINAL[16:], "int8",
                                "original"),
}
# The comparison asked for; the same with Qwix's backward (its gradient ignores the rounding); then qjax's
# two products forced, so either machine shows both.
METHODS = ("fp32", "qjax_w4a8", "qjax_w1a1", "qwix_w4a8", "qwix_w1a1", "qjax_w8a8", "qwix_w8a8",
           "qjax_w4a8_original", "qjax_w8a8_original",
           "qjax_w4a8_int8", "qjax_w4a8_float", "qjax_w8a8_int8", "qjax_w8a8_float",
           "qjax_w8a8_int8_original")


@dataclasses.dataclass
class Method:
    name: str
    init: Callable | None = None
    apply: Callable | None = None
    config: str = ""
    not_measured: str | None = None  # why, when the method cannot run here
    qmodel: Any = None
    product: str | None = None  # qjax's QAT product setting (quantize_model(..., product=...))


def qwix_status() -> tuple[Any, str | None]:
    """(the qwix module, None) or (None, why it cannot run)."""
    try:
        import qwix
    except Exception as err:  # ImportError, or a broken install
        return None, f"qwix is not importable here: {type(err).__name__}: {err}"
    return qwix, None


def _qwix_method(qwix, model: nn.Module, name: str, weight_qtype, act_qtype) -> Method:
    rule = qwix.QtRule(module_path=".*", op_names=("dot_general",), weight_qtype=weight_qtype,
                       act_qtype=act_qtype)
    qmodel = qwix.quantize_model(model, qwix.QtProvider([rule]))
    config = (f"qwix.QtRule(module_path='.*', op_names=('dot_general',), "
              f"weight_qtype={jnp.dtype(weight_qtype)}, act_qtype={jnp.dtype(act_qtype)}): "
              "per-output-channel absmax weights, per-token absmax dynamic activations, "
              f"straight-through backward; qwix {getattr(qwix, '__version__', '?')}")
    return Method(name, qmodel.init, qmodel.apply, config)


def methods(model: nn.Module, names: set[str] | None = None) -> list[Method]:
    """The methods compared on ``model`` (all of :data:`METHODS`, or those in ``names``)."""
    out = [Method("fp32", model.init, model.apply, "unmodified Flax Linen model")]
    for name, (rules, config, product, residuals) in QJAX_METHODS.items():
        qmodel = qlinen.quantize_model(model, rules, product=product, residuals=residuals)
        out.append(Method(name, qmodel.init, qmodel.apply, config, qmodel=qmodel, product=product))
    qwix, why = qwix_status()
    if qwix is None:
        out += [Method("qwix_w4a8", not_measured=why), Method("qwix_w8a8", not_measured=why)]
    else:
        out += [_qwix_method(qwix, model, "qwix_w4a8", jnp.int4, jnp.int8),
                _qwix_method(qwix, model, "qwix_w8a8", jnp.int8, jnp.int8)]
    out.append(Method("qwix_w1a1", not_measured="Qwix has no 1-bit (sign) format: its integer qtypes are "
                                                "int2..int8 (int2 is a 4-level grid), so W1A1 has no Qwix "
                                                "equivalent"))
    order = {name: i for i, name in enumerate(METHODS)}
    out.sort(key=lambda m: order[m.name])
    return [m for m in out if names is None or m.name in names]


# --- the training step ------------------------------------------------------------------------------

def make_step(apply: Callable, loss: Callable, tx: optax.GradientTransformation) -> Callable:
    def step(params, opt_state, rest, x, labels):
        def objective(p):
            return loss(apply({"params": p, **rest}, x), labels)

        value, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?[\w.\-]+ .*\{$")
_DEF = re.compile(r"%([\w.\-]+) = (\w+)\[")
_DOT = re.compile(r"= (\w+)\[[^=]* dot\(%([\w.\-]+), %([\w.\-]+)\)")


def hlo_dots(hlo_text: str) -> dict[str, int]:
    """``{"lhs,rhs->out": count}`` for the ``dot`` instructions of an optimized HLO module."""
    counts: Counter = Counter()
    types: dict[str, str] = {}
    for line in hlo_text.splitlines():
        if _COMPUTATION.match(line.strip()) and "=" not in line.split("(")[0]:
            types = {}  # a new computation: instruction names are local to it
            for name, dtype in re.findall(r"([\w.\-]+): (\w+)\[", line):
                types[name] = dtype
            continue
        m = _DEF.search(line)
        if m:
            types[m.group(1)] = m.group(2)
        d = _DOT.search(line)
        if d:
            out, lhs, rhs = d.groups()
            counts[f"{types.get(lhs, '?')},{types.get(rhs, '?')}->{out}"] += 1
    return dict(sorted(counts.items()))


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def reported_paths(qmodel, variables, x) -> dict | None:
    """``QuantizedModel.paths``: module -> the path its QAT contraction took ("fused fake-quant float",
    "int8 dot_general", "fake-quant float", ...) for a qjax model; ``None`` for a peer."""
    paths = getattr(qmodel, "paths", None) if isinstance(qmodel, qlinen.QuantizedModel) else None
    if not callable(paths):
        return None
    return {"source": "QuantizedModel.paths", "value": _jsonable(paths(variables, x))}


@dataclasses.dataclass
class Prepared:
    method: Method
    run: Callable[[], None]
    compile_s: float
    dots: dict
    paths: dict | None
    variables: dict
    shared_init: bool = False  # starts from the fp32 model's initial variables
    times: list[float] = dataclasses.field(default_factory=list)


def initial_variables(method: Method, x, reference: dict | None) -> dict:
    """``method.init``'s variables; the fp32 model's own (``reference``) when they have the same structure,
    so that every method starts from the same weights and init costs no extra compiles."""
    key = jax.random.key(0)
    if reference is not None:
        shapes = jax.eval_shape(method.init, key, x)
        same = jax.tree.structure(dict(shapes)) == jax.tree.structure(reference)
        pairs = zip(jax.tree.leaves(shapes), jax.tree.leaves(reference), strict=same)
        if same and all(a.shape == b.shape for a, b in pairs):
            return dict(reference)
    return dict(jax.jit(method.init)(key, x))


def prepare(method: Method, case: Case, x, labels, tx, reference: dict | None = None) -> Prepared:
    variables = initial_variables(method, x, reference)
    params = variables.pop("params")
    opt_state = tx.init(params)
    step = jax.jit(make_step(method.apply, case.loss, tx))
    start = time.perf_counter()
    compiled = step.lower(params, opt_state, variables, x, labels).compile()
    compile_s = time.perf_counter() - start
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = compiled(state[0], state[1], variables, x, labels)
        jax.block_until_ready((state[0], loss))

    paths = reported_paths(method.qmodel, {"params": params, **variables}, x)
    initial = {"params": params, **variables}
    return Prepared(method, run, compile_s, hlo_dots(compiled.as_text()), paths, initial,
                    shared_init=reference is not None and initial["params"] is reference["params"])


def time_case(case: Case, warmup: int, rounds: int, steps_per_round: int, names: set[str] | None = None,
              log=print) -> dict:
    x, labels = case.batch(jax.random.key(1))
    tx = optax.adam(1e-4)
    result = {"shape": case.shape, "methods": {}}
    prepared: list[Prepared] = []
    for method in methods(case.model, names):
        if method.not_measured:
            result["methods"][method.name] = {"measured": False, "not_measured": method.not_measured}
            continue
        try:
            p = prepare(method, case, x, labels, tx, prepared[0].variables if prepared else None)
        except Exception as err:  # a peer library that fails on this model is reported, not fatal
            if method.name == "fp32" or method.name.startswith("qjax"):
                raise
            why = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            result["methods"][method.name] = {"measured": False, "not_measured": why}
            log(f"  {method.name}: not measured ({why})")
            continue
        for _ in range(warmup):
            p.run()
        prepared.append(p)
        log(f"  {case.name}/{method.name}: compiled in {p.compile_s:.1f} s")
    for r in range(rounds):
        order = prepared[r % len(prepared):] + prepared[:r % len(prepared)]
        for p in order:
            for _ in range(steps_per_round):
                start = time.perf_counter()
                p.run()
                p.times.append(time.perf_counter() - start)
    base = statistics.median(prepared[0].times)
    for p in prepared:
        med = statistics.median(p.times)
        q1, _, q3 = statistics.quantiles(p.times, n=4) if len(p.times) > 1 else (med, med, med)
        result["methods"][p.method.name] = {
            "measured": True, "config": p.method.config,
            "median_ms": round(med * 1e3, 3), "ratio_vs_fp32": round(med / base, 3),
            "iqr_ms": [round(q1 * 1e3, 3), round(q3 * 1e3, 3)], "steps": len(p.times),
            "compile_s": round(p.compile_s, 2), "init_shared_with_fp32": p.shared_init or p is prepared[0],
            "hlo_dots": p.dots, "qjax_reported_paths": p.paths,
        }
    result["methods"] = {k: result["methods"][k] for k in METHODS if k in result["methods"]}
    return result


def environment() -> dict:
    qwix, why = qwix_status()
    dev = jax.devices()[0]
    return {"device": f"{dev.platform}: {dev.device_kind}", "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jaxlib": _version("jaxlib"),
            "flax": flax.__version__, "optax": optax.__version__, "qjax": qjax.__version__,
            "qwix": getattr(qwix, "__version__", None) if qwix else None, "qwix_status": why or "ok",
            "python": platform.python_version(), "qjax_git": _git_state(),
            "qjax_qat_product_auto": resolve_product("auto"),
            "cpu_int8_dot_flags": sorted(_cpu_flags() & {"avx512_vnni", "avx_vnni", "amx_int8", "avx512bw",
                                                         "avx512f", "avx2"}),
            "int8_product_is_faster": int8_product_is_faster(),
            "load_average_1m_at_start": round(os.getloadavg()[0], 2)}


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_state() -> str | None:
    """The commit qjax runs from, with ``+dirty`` when its tracked files have local changes."""
    import subprocess

    root = Path(qjax.__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "qjax"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}{'+dirty' if dirty else ''}" if head else None


def table(results: dict) -> str:
    lines = [f"{'model':<12} {'method':<10} {'median ms':>10} {'x fp32':>7}  dots in the compiled step "
             "(lhs,rhs->out dtypes)",
             "-" * 90]
    for model, res in results["models"].items():
        for name, m in res["methods"].items():
            if not m["measured"]:
                lines.append(f"{model:<12} {name:<10} {'not measured':>10}  ({m['not_measured']})")
                continue
            dots = ", ".join(f"{k} x{v}" for k, v in m["hlo_dots"].items())
            lines.append(f"{model:<12} {name:<10} {m['median_ms']:>10.2f} {m['ratio_vs_fp32']:>7.3f}  {dots}")
            if m.get("qjax_reported_paths"):
                paths = Counter(m["qjax_reported_paths"]["value"].values())
                lines.append(f"{'':<42}qjax paths: " + ", ".join(f"{k} x{v}" for k, v in paths.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps (a smoke test)")
    parser.add_argument("--out", default=None, help=OUT_HELP.replace("NAME", "qat_overhead"))
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 30; quick 2)")
    parser.add_argument("--steps-per-round", type=int, default=None, help="default 3; quick 2")
    parser.add_argument("--models", default="mlp,transformer", help="comma-separated subset")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset (fp32 is always run: it is the baseline)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 30)
    per_round = args.steps_per_round or (2 if args.quick else 3)
    warmup = 1 if args.quick else 3
    wanted = set(args.models.split(","))
    names = {"fp32", *args.methods.split(",")}
    unknown = names - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; allowed: {', '.join(METHODS)}")
    results = {"benchmark": "qat_overhead", "quick": args.quick, "environment": environment(),
               "protocol": {"warmup_steps": warmup, "rounds": rounds, "steps_per_round": per_round,
                            "optimizer": "optax.adam(1e-4)", "statistic": "median step time; ratio to the "
                            "fp32 median of the same model in the same run"},
               "models": {}}
    for case in cases(args.quick):
        if case.name in wanted:
            print(f"{case.name}: {case.shape}", flush=True)
            results["models"][case.name] = time_case(case, warmup, rounds, per_round, names,
                                                     log=lambda s: print(s, flush=True))
    return write_results(results, out_path(args.out, "qat_overhead.json"), table(results))


if __name__ == "__main__":
    main(sys.argv[1:])
