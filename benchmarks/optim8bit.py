"""8-bit optimizer state: real bytes and update time against 32-bit Adam, with bitsandbytes as the peer.

``python -m benchmarks.optim8bit [--toy] [--rounds 7] [--no-peer] [--out results/]`` (default:
``runs/optim8bit_benchmark.json``)

On the parameter shapes of a ~10.5M-parameter Transformer (a 8192 x 512 embedding and two blocks of width
512 with a 2048 MLP), all in one run:

- state bytes: ``sum(leaf.nbytes)`` of ``qjax.optim.adam8bit``'s state against ``optax.adam``'s (goal
  <= 0.26x);
- update time: one jitted ``update`` + ``apply_updates`` (buffers donated), median over ``--rounds`` rounds
  of ``--steps`` steps, optimizers interleaved round by round (goal <= 1.3x of ``optax.adam``), and the
  XLA temporary buffer of each step (``xla_temp_bytes``: on CPU it is allocated, and page-faulted in, on
  every call);
- peer: ``bitsandbytes.optim.Adam8bit`` against ``torch.optim.Adam`` on CPU tensors of the same shapes,
  its state bytes read from the optimizer's tensors. If bitsandbytes' CPU path fails, the error is recorded
  and its figures are "not measured".

Writes the JSON to ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax.optim as qo
from benchmarks.machine import OUT_HELP, out_path

NOT_MEASURED = "not measured"


def model_shapes(width: int = 512, vocab: int = 8192, depth: int = 2) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a small Transformer (embedding, attention, MLP, LayerNorms, biases)."""
    shapes = {"embedding": (vocab, width)}
    for i in range(depth):
        shapes |= {
            f"block{i}/qkv": (width, 3 * width),
            f"block{i}/qkv_bias": (3 * width,),
            f"block{i}/out": (width, width),
            f"block{i}/up": (width, 4 * width),
            f"block{i}/up_bias": (4 * width,),
            f"block{i}/down": (4 * width, width),
            f"block{i}/ln1": (width,),
            f"block{i}/ln2": (width,),
        }
    return shapes


def _median_step_seconds(step, carry, grads, steps: int) -> tuple[float, tuple]:
    start = time.perf_counter()
    for _ in range(steps):
        carry = step(*carry, grads)
    jax.block_until_ready(carry)
    return (time.perf_counter() - start) / steps, carry


def bench_jax(shapes: dict, rounds: int, steps: int) -> dict:
    key = jax.random.key(0)
    params = {
        k: jax.random.normal(jax.random.fold_in(key, i), s) * 0.02 for i, (k, s) in enumerate(shapes.items())
    }
    grads = {
        k: jax.random.normal(jax.random.fold_in(key, 1000 + i), s) * 1e-3
        for i, (k, s) in enumerate(shapes.items())
    }
    optimizers = {"optax.adam": optax.adam(1e-3), "qjax.optim.adam8bit": qo.adam8bit(1e-3)}
    runs, out = {}, {}
    for name, opt in optimizers.items():
        state = opt.init(params)
        out[name] = {"state_bytes": qo.state_nbytes(state)}

        def step(p, s, g, opt=opt):
            updates, s = opt.update(g, s, p)
            return optax.apply_updates(p, updates), s

        step = jax.jit(step, donate_argnums=(0, 1))
        memory = step.lower(params, state, grads).compile().memory_analysis()
        out[name]["xla_temp_bytes"] = int(memory.temp_size_in_bytes) if memory is not None else NOT_MEASURED
        carry = step(jax.tree_util.tree_map(jnp.copy, params), state, grads)  # compile
        runs[name] = [step, carry, []]
    for _ in range(rounds):
        for run in runs.values():
            seconds, run[1] = _median_step_seconds(run[0], run[1], grads, steps)
            run[2].append(seconds)
    for name, run in runs.items():
        out[name]["update_ms"] = 1e3 * float(np.median(run[2]))
        out[name]["update_ms_rounds"] = [round(1e3 * t, 3) for t in run[2]]
    return out


def bench_bitsandbytes(shapes: dict, rounds: int, steps: int) -> dict:
    """torch.optim.Adam and bitsandbytes.optim.Adam8bit on CPU; errors are recorded, never estimated."""
    out = {"torch.optim.Adam": {}, "bitsandbytes.optim.Adam8bit": {}}
    try:
        import torch

        out["torch_version"] = torch.__version__
        import bitsandbytes as bnb

        out["bitsandbytes_version"] = bnb.__version__
    except Exception as err:  # an ImportError, or a broken native library
        out["error"] = f"import failed: {type(err).__name__}: {err}"
        return out
    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    makers = {
        "torch.optim.Adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
        "bitsandbytes.optim.Adam8bit": lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3),
    }
    runs = {}
    for name, make in makers.items():
        try:
            params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes.values()]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            opt = make(params)
            opt.step()  # creates the state
            state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
            out[name]["state_bytes"] = int(sum(t.numel() * t.element_size() for t in state))
            out[name]["state_dtypes"] = sorted({str(t.dtype) for t in state})
            runs[name] = (opt, [])
        except Exception as err:
            out[name] = {
                "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()[-2000:],
                "state_bytes": NOT_MEASURED,
                "update_ms": NOT_MEASURED,
            }
    for _ in range(rounds):
        for opt, times in runs.values():
            start = time.perf_counter()
            for _ in range(steps):
                opt.step()
            times.append((time.perf_counter() - start) / steps)
    for name, (_, times) in runs.items():
        out[name]["update_ms"] = 1e3 * float(np.median(times))
        out[name]["update_ms_rounds"] = [round(1e3 * t, 3) for t in times]
    return out


def _ratio(a, b):
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else NOT_MEASURED


def run(toy: bool = False, rounds: int = 7, steps: int = 5, peer: bool = True) -> dict:
    shapes = model_shapes(width=64, vocab=512, depth=1) if toy else model_shapes()
    n_params = int(sum(np.prod(s) for s in shapes.values()))
    result = {
        "params": n_params,
        "shapes": {k: list(v) for k, v in shapes.items()},
        "rounds": rounds,
        "steps_per_round": steps,
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "jax_results": bench_jax(shapes, rounds, steps),
    }
    jr = result["jax_results"]
    result["qjax_state_ratio"] = _ratio(
        jr["qjax.optim.adam8bit"]["state_bytes"], jr["optax.adam"]["state_bytes"]
    )
    result["qjax_time_ratio"] = _ratio(jr["qjax.optim.adam8bit"]["update_ms"], jr["optax.adam"]["update_ms"])
    result["peer"] = bench_bitsandbytes(shapes, rounds, steps) if peer else {"skipped": "--no-peer"}
    pr = result["peer"]
    bnb8, torch32 = pr.get("bitsandbytes.optim.Adam8bit", {}), pr.get("torch.optim.Adam", {})
    result["bnb_state_ratio"] = _ratio(bnb8.get("state_bytes"), torch32.get("state_bytes"))
    result["bnb_time_ratio"] = _ratio(bnb8.get("update_ms"), torch32.get("update_ms"))
    result["goals"] = {
        "state_ratio <= 0.26": _ratio(result["qjax_state_ratio"], 1) != NOT_MEASURED
        and result["qjax_state_ratio"] <= 0.26,
        "time_ratio <= 1.3": result["qjax_time_ratio"] <= 1.3,
    }
    return result


def _fmt(value, spec=",.0f"):
    return format(value, spec) if isinstance(value, int | float) else str(value)


def table(result: dict) -> str:
    jr, pr = result["jax_results"], result["peer"]
    rows = [
        ("optax.adam (32-bit)", jr["optax.adam"]),
        ("qjax.optim.adam8bit", jr["qjax.optim.adam8bit"]),
        ("torch.optim.Adam (32-bit)", pr.get("torch.optim.Adam", {})),
        ("bitsandbytes Adam8bit", pr.get("bitsandbytes.optim.Adam8bit", {})),
    ]
    lines = [
        f"{result['params']:,} parameters; median of {result['rounds']} rounds x {result['steps_per_round']} "
        "steps",
        "",
        "| optimizer | state bytes | update ms |",
        "|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {_fmt(r.get('state_bytes', NOT_MEASURED))} | "
            f"{_fmt(r.get('update_ms', NOT_MEASURED), '.2f')} |"
        )
    lines += [
        "",
        f"qjax 8-bit / optax 32-bit: state {_fmt(result['qjax_state_ratio'], '.4f')}x (goal <= 0.26), "
        f"time {_fmt(result['qjax_time_ratio'], '.2f')}x (goal <= 1.3)",
        f"bitsandbytes 8-bit / torch 32-bit: state {_fmt(result['bnb_state_ratio'], '.4f')}x, "
        f"time {_fmt(result['bnb_time_ratio'], '.2f')}x",
    ]
    if "error" in pr:
        lines.append(f"bitsandbytes: {pr['error']}")
    for name in ("torch.optim.Adam", "bitsandbytes.optim.Adam8bit"):
        if "error" in pr.get(name, {}):
            lines.append(f"{name}: {pr[name]['error']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny shapes (smoke test)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--no-peer", action="store_true", help="skip torch / bitsandbytes")
    parser.add_argument("--out", default=None, help=OUT_HELP.replace("NAME", "optim8bit_benchmark"))
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error(f"--rounds {args.rounds} --steps {args.steps}: allowed: integers >= 1")
    out = out_path(args.out, "optim8bit_benchmark.json")
    result = run(args.toy, args.rounds, args.steps, peer=not args.no_peer)
    out.write_text(json.dumps(result, indent=1))
    print(table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
