"""Post-training quantization of a causal decoder LM and of MiniLM: qjax's methods beside Qwix's, one run.

    python -m experiments.ptq_llm                      # both models, every method and config
    python -m experiments.ptq_llm --models decoder     # the decoder only
    python -m experiments.ptq_llm --quick              # ~2 minutes: the quick decoder, two configs, 4 methods

Models:

- ``decoder``: Tunix's NNX Llama3, tiny, trained once on Python's documentation
  (:mod:`experiments.decoder_lm`, cached); metric: held-out perplexity per byte (lower is better) on a fixed
  set of held-out windows. Quantized: every attention projection (Tunix ``Einsum``, weight ``w``) and MLP
  ``nnx.Linear`` of every layer; the embedding, the RMSNorms and the untied ``lm_head`` stay float, as in
  GPTQ's and AWQ's LLM experiments.
- ``minilm``: all-MiniLM-L6-v2 as transformers' Linen ``FlaxBertModel`` (:mod:`experiments.ptq_minilm`);
  metrics: held-out sentence-embedding cosine to fp32 and top-1 nearest-neighbour agreement. Quantized:
  every encoder Dense layer.

Configurations (:data:`CONFIGS`): weight-only ``W4 g128``, ``W3 g128``, ``W2 g64`` (asymmetric min-max
integer grids per group of input rows, qjax's choice for weight-only; a second RTN row, ``rtn-edge``, uses
Qwix's symmetric grid ``amax / (2^(b-1) - 1/2)`` for weights and inputs, a like-for-like comparison) and
weights + activations ``W8A8``, ``W4A8``, ``W4A4`` (symmetric per-output-channel weights, per-token dynamic
symmetric inputs) and ``nvfp4`` (NVFP4 weights and inputs, :func:`qjax.presets.nvfp4`).

qjax methods (:data:`METHODS`): ``rtn``, ``gptq`` (block by block, sequential), ``awq`` (exponent grid of
20, then RTN), ``smoothquant`` (SmoothQuant+'s per-layer alpha search, then GPTQ), ``rotation`` (a random
Hadamard on every quantized layer's input, then GPTQ: QuIP#/QuaRot incoherence), ``quarot`` (decoder only:
the residual stream rotated offline and folded into the weights, online Hadamards on ``o_proj`` and
``down_proj`` inputs, then GPTQ) and ``pv`` (PV-tuning from the GPTQ model against the fp32 model).
Qwix's ``rtn``, ``gptq``, ``awq`` and ``smoothquant`` (:mod:`experiments.qwix_ptq`) run on the same model,
calibration data, configs and metric in the same process; a config Qwix cannot express is reported with the
reason.

Every row: the metric(s), the real bytes of the quantized weights (packed codes, scales, zero points,
transforms; :func:`qjax.summary.summary` for qjax, the arrays' ``nbytes`` for Qwix) and the wall time of
the method (calibration and quantization, not the evaluation). Writes ``ptq_llm.{json,md,png}`` to
``runs/`` (``--out DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from experiments.cli import add_run_options, results_dir, run
from experiments.llm_subjects import CONFIGS, Config, Subject, decoder_subject, minilm_subject
from experiments.ptq_llm_report import markdown_table, plot, print_row, verdicts
from qjax import ptq

METHODS = ("rtn", "rtn-edge", "gptq", "awq", "smoothquant", "rotation", "quarot", "pv")
#: Methods that change the scale rule of weights and inputs: ``rtn-edge`` is RTN on Qwix's symmetric grid
#: ``s = amax / (2^(b-1) - 1/2)`` (qjax's ``absmax_edge``), for the like-for-like comparison with Qwix's RTN.
GRIDS = {"rtn-edge": "absmax_edge"}
QWIX_METHODS = ("rtn", "gptq", "awq", "smoothquant")
SMOOTHQUANT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MODELS = ("decoder", "minilm")


# ------------------------------------------------------------------------------------------------- methods


def _fine_tune_kwargs(subject: Subject, teacher, args) -> dict:
    kw = dict(teacher=teacher, steps=args.pv_steps, apply_kwargs=subject.apply_kwargs)
    if subject.pv_output is not None:
        kw["output_fn"] = subject.pv_output
    return kw


def run_qjax(subject: Subject, method: str, config: Config, args,
             gptq_cache: dict) -> tuple[Any, Any, str | None]:
    """``(model, frozen variables or None, reason)`` of one qjax method; ``reason`` when it cannot run."""
    model, variables = subject.fresh()
    rules = subject.rules(config, GRIDS.get(method))
    calib, mask, kw = subject.calib, subject.token_mask, subject.apply_kwargs
    key = jax.random.key(args.seed)
    if method in ("rtn", "rtn-edge"):
        if method == "rtn-edge" and config.weight == "nvfp4":
            return None, None, "NVFP4 has its own block scales"
        return _frozen(model, variables, ptq.rtn(model, variables, rules, calib[0], apply_kwargs=kw))
    if method == "gptq":
        return _frozen(model, variables, ptq.gptq(model, variables, rules, calib, token_mask=mask,
                                                  apply_kwargs=kw))
    if method == "awq":
        return _frozen(model, variables, ptq.awq(model, variables, rules, calib, token_mask=mask,
                                                 apply_kwargs=kw))
    if method == "smoothquant":
        return _frozen(model, variables, ptq.smoothquant(model, variables, rules, calib,
                                                         alphas=SMOOTHQUANT_ALPHAS, method="gptq",
                                                         token_mask=mask, apply_kwargs=kw))
    if method == "rotation":
        return _frozen(model, variables, ptq.hadamard(model, variables, rules, calib, key=key, method="gptq",
                                                      token_mask=mask, apply_kwargs=kw))
    if method == "quarot":
        if subject.residual_layout is None or not hasattr(ptq, "rotate_residual"):
            return None, None, "no residual-stream rotation for this model (post-LayerNorm encoder)"
        rotated = ptq.rotate_residual(model, variables, subject.residual_layout, key=key, batch=calib[0])
        if variables is not None:
            variables = rotated
        return _frozen(model, variables, ptq.hadamard(model, variables, rules, calib, key=key, method="gptq",
                                                      paths=subject.online_rotation, token_mask=mask,
                                                      apply_kwargs=kw))
    if method == "pv":
        start = gptq_cache.get(config.name)
        if start is None:
            return None, None, "needs the GPTQ model of the same config"
        teacher, teacher_variables = subject.fresh()
        tune = _fine_tune_kwargs(subject, teacher if variables is None else teacher_variables, args)
        if variables is None:  # NNX: tune a copy of the frozen GPTQ model in place
            tuned, _ = ptq.pv_tuning(nnx.clone(start), None, rules, calib, **tune)
            return tuned, None, None
        tuned, _ = ptq.pv_tuning(model, start, rules, calib, **tune)
        return model, tuned, None
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


def _frozen(model, variables, result):
    """NNX methods return the model frozen in place; Linen ones the frozen variables."""
    if variables is None:
        return result, None, None
    return model, result, None


def qjax_rows(subject: Subject, config: Config, methods: Sequence[str], args, bar,
              done: frozenset = frozenset()) -> list[dict]:
    """The rows of qjax's ``methods`` at ``config``; a method in ``done`` (rows resumed) is not rerun, except
    GPTQ when PV-tuning, which starts from its model, is still to run (then without a second row)."""
    rows, gptq_cache = [], {}
    todo = [m for m in methods if m not in done or (m == "gptq" and "pv" in methods and "pv" not in done)]
    for method in todo:
        bar.set_postfix_str(f"{subject.name} {config.name} qjax {method}")
        start = time.perf_counter()
        try:
            model, frozen, reason = run_qjax(subject, method, config, args, gptq_cache)
        except ValueError as err:  # a method that refuses the config (e.g. GPTQ of NVFP4's block scales)
            model, frozen, reason = None, None, f"refused: {err}"
        jax.block_until_ready(frozen if frozen is not None else nnx.state(model) if model is not None else 0)
        seconds = time.perf_counter() - start
        row = {"model": subject.name, "config": config.name, "library": "qjax", "method": method}
        if reason is not None:
            rows.append({**row, "reason": reason})
        else:
            if method == "gptq":
                gptq_cache[config.name] = model if frozen is None else frozen
            if method in done:  # GPTQ rerun only as PV's start
                continue
            rows.append({**row, **subject.score(model, frozen, subject.rules(config, GRIDS.get(method))),
                         "time_s": seconds})
        print_row(rows[-1], subject)
        bar.update()
    return rows


def qwix_rows(subject: Subject, config: Config, methods: Sequence[str], args, bar,
              done: frozenset = frozenset()) -> list[dict]:
    """The rows of Qwix's ``methods`` at ``config``, but those in ``done``."""
    from experiments import qwix_ptq

    rows = []
    for method in (m for m in methods if m not in done):
        bar.set_postfix_str(f"{subject.name} {config.name} qwix {method}")
        model, variables = subject.fresh()
        result = qwix_ptq.run_qwix(method, config.name, subject.name,
                                   model if variables is None else (model, variables), subject.calib)
        row = {"model": subject.name, "config": config.name, "library": "qwix", "method": method,
               "qwix_rule": result.rule, "rtn_fallback_layers": list(result.rtn_fallback_layers)}
        if result.reason is not None:
            rows.append({**row, "reason": result.reason})
        else:
            rows.append({**row, **subject.score_forward(result.forward), "linear_bytes": result.layer_bytes,
                         "packed_linear_bytes": result.packed_layer_bytes, "time_s": result.quantize_time_s})
        print_row(rows[-1], subject)
        bar.update()
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``--help``)."""
    p = argparse.ArgumentParser(prog="python -m experiments.ptq_llm", description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=None, choices=MODELS)
    p.add_argument("--configs", nargs="+", default=None, metavar="NAME", help=f"of: {', '.join(CONFIGS)}")
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    p.add_argument("--qwix-methods", nargs="*", default=None, choices=QWIX_METHODS)
    p.add_argument("--eval-windows", type=int, default=256, help="held-out windows of the decoder")
    p.add_argument("--calib-windows", type=int, default=64, help="calibration windows of the decoder")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--minilm-calibration", type=int, default=128)
    p.add_argument("--minilm-eval", type=int, default=256)
    p.add_argument("--pv-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", default=None, metavar="JSON", help="rows of an earlier or interrupted run "
                   "(ptq_llm.partial.json, or a ptq_llm.json): each of its (model, config, library, method) "
                   "rows is kept, not rerun; delete a row to redo it")
    add_run_options(p, "the quick decoder, W4 g128 and W4A8, rtn/gptq/rotation and Qwix's rtn")
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or ["decoder"]
        args.configs = args.configs or ["W4 g128", "W4A8"]
        args.methods = args.methods or ["rtn", "gptq", "rotation"]
        args.qwix_methods = ["rtn"] if args.qwix_methods is None else args.qwix_methods
        args.eval_windows, args.calib_windows, args.batch_size, args.pv_steps = 32, 16, 8, 5
    args.models = args.models or list(MODELS)
    args.configs = args.configs or list(CONFIGS)
    args.methods = args.methods or list(METHODS)
    args.qwix_methods = list(QWIX_METHODS) if args.qwix_methods is None else args.qwix_methods
    for c in args.configs:
        if c not in CONFIGS:
            p.error(f"unknown config {c!r}; known: {', '.join(CONFIGS)}")
    if "pv" in args.methods and "gptq" not in args.methods:
        p.error("pv starts from the GPTQ model: add gptq to --methods")
    return args


def resumed_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a ``ptq_llm.partial.json`` (a list) or of a finished ``ptq_llm.json`` (its ``"rows"``)."""
    data = json.loads(Path(path).read_text())
    return data["rows"] if isinstance(data, dict) else data


def _row_order(row: dict) -> tuple:
    """Model, config, library, method in the study's own order (resumed and new rows interleaved)."""
    methods = {"qjax": METHODS, "qwix": QWIX_METHODS}[row["library"]]
    return (MODELS.index(row["model"]), list(CONFIGS).index(row["config"]), row["library"],
            methods.index(row["method"]))


def main(argv=None) -> list[dict]:
    """Run the study; print the tables and verdicts; write JSON, Markdown and PNG; return the rows."""
    from tqdm.auto import tqdm

    args = parse_args(argv)
    start = time.perf_counter()
    makers = {"decoder": decoder_subject, "minilm": minilm_subject}
    subjects = [makers[m](args) for m in args.models]
    methods = [m for m in METHODS if m in args.methods]  # gptq before pv
    out = results_dir(args.results_dir)
    partial = out / "ptq_llm.partial.json"  # every finished (model, config), so a crash loses nothing
    rows = resumed_rows(args.resume) if args.resume else []
    resumed = len(rows)
    done = {(r["model"], r["config"], r["library"], r["method"]) for r in rows}
    total = len(subjects) * len(args.configs) * (len(methods) + len(args.qwix_methods))
    with tqdm(total=total, unit="run", disable=args.no_progress, dynamic_ncols=True) as bar:
        for s in subjects:
            for c in args.configs:
                skip = {lib: frozenset(m for (n, cc, lb, m) in done if (n, cc, lb) == (s.name, c, lib))
                        for lib in ("qjax", "qwix")}
                bar.update(len(skip["qjax"] & set(methods)) + len(skip["qwix"] & set(args.qwix_methods)))
                new = (qjax_rows(s, CONFIGS[c], methods, args, bar, skip["qjax"])
                       + qwix_rows(s, CONFIGS[c], args.qwix_methods, args, bar, skip["qwix"]))
                if new:
                    rows += new
                    partial.write_text(json.dumps(rows, indent=1, default=str))
    rows = sorted(rows, key=_row_order)
    partial.unlink(missing_ok=True)  # the full report follows
    seconds = time.perf_counter() - start
    said = verdicts(rows, subjects)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version(), "jax": jax.__version__, "total_s": seconds,
               "quick": args.quick, "resumed_rows": resumed}
    (out / "ptq_llm.json").write_text(json.dumps({"subjects": {s.name: s.info for s in subjects},
                                                  "machine": machine, "rows": rows, "verdicts": said},
                                                 indent=1, default=str))
    parts = ["# PTQ of a causal decoder LM and MiniLM: qjax beside Qwix\n"]
    for s in subjects:
        table = markdown_table(rows, s)
        print(table)
        facts = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.info.items())
        parts.append(f"## {s.name}\n\n{facts}\n\n{table}\n")
    for v in said:
        print(v)
    parts.append("## Goals\n\n" + "".join(f"- {v}\n" for v in said))
    kept = f" ({resumed} of the {len(rows)} rows from earlier runs: their own times)" if resumed else ""
    parts.append(f"\nThis run {seconds:.0f} s{kept} on {machine['cores']} CPU cores ({machine['cpu']}), jax "
                 f"{machine['jax']}{'; quick mode' if args.quick else ''}.\n")
    (out / "ptq_llm.md").write_text("\n".join(parts))
    plot(rows, subjects, out / "ptq_llm.png")
    print(f"total {seconds:.1f} s; wrote {out}/ptq_llm.{{json,md,png}}")
    return rows


if __name__ == "__main__":
    run(main)
