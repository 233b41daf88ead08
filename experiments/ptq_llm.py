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
import dataclasses
import functools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.cli import add_run_options, results_dir, run
from qjax import PerChannel, PerGroup, PerToken, Quantizer, Rule, presets, ptq
from qjax.summary import summary

WEIGHT_ONLY = ("W4 g128", "W3 g128", "W2 g64")
WITH_INPUTS = ("W8A8", "W4A8", "W4A4", "nvfp4")
METHODS = ("rtn", "rtn-edge", "gptq", "awq", "smoothquant", "rotation", "quarot", "pv")
#: Methods that change the scale rule of weights and inputs: ``rtn-edge`` is RTN on Qwix's symmetric grid
#: ``s = amax / (2^(b-1) - 1/2)`` (qjax's ``absmax_edge``), for the like-for-like comparison with Qwix's RTN.
GRIDS = {"rtn-edge": "absmax_edge"}
QWIX_METHODS = ("rtn", "gptq", "awq", "smoothquant")
SMOOTHQUANT_ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MODELS = ("decoder", "minilm")


@dataclasses.dataclass(frozen=True)
class Config:
    """One configuration: the weight format (bits, group or ``None`` per channel, symmetric or not) and the
    input format (``None``: weight-only)."""

    name: str
    weight: str  # "int4", "int3", ... or "nvfp4"
    group: int | None
    symmetric: bool
    input: str | None = None  # "int8", "int4", "nvfp4" or None

    def weight_quantizer(self, contract_axis: int, out_axes: tuple[int, ...], grid: str | None = None
                         ) -> Quantizer:
        """The weight quantizer of a kernel whose contraction axis (the one groups run along) is
        ``contract_axis`` and whose output axes are ``out_axes`` (one scale per output channel); ``grid``
        overrides the scale rule (``"absmax_edge"``: Qwix's symmetric grid)."""
        if self.weight == "nvfp4":
            return presets.nvfp4(contract_axis)
        rule = grid or ("absmax" if self.symmetric else "minmax")
        if self.group is None:
            return Quantizer(self.weight, PerChannel(out_axes), rule)
        return Quantizer(self.weight, PerGroup(contract_axis, self.group), rule)

    def input_quantizer(self, axes: tuple[int, ...], grid: str | None = None) -> Quantizer | None:
        """The input quantizer of a contraction over the input's trailing ``axes``: per token, dynamic,
        symmetric; ``grid`` as in :meth:`weight_quantizer` (Qwix places its input grid as its weight grid)."""
        if self.input is None:
            return None
        if self.input == "nvfp4":
            return presets.nvfp4(-1)
        return Quantizer(self.input, PerToken(axes), grid or "absmax")


CONFIGS = {c.name: c for c in (
    Config("W4 g128", "int4", 128, False), Config("W3 g128", "int3", 128, False),
    Config("W2 g64", "int2", 64, False),
    Config("W8A8", "int8", None, True, "int8"), Config("W4A8", "int4", None, True, "int8"),
    Config("W4A4", "int4", None, True, "int4"), Config("nvfp4", "nvfp4", None, True, "nvfp4"))}


# ------------------------------------------------------------------------------------------------ subjects


@dataclasses.dataclass
class Subject:
    """A model the study quantizes: how to get a float copy, its calibration batches, its rules per
    config, how to score a quantized copy (``score(result)`` -> metrics), which metric decides."""

    name: str
    fresh: Callable[[], tuple[Any, dict | None]]  # (model, variables) of the float model; NNX: variables None
    calib: list[dict]
    rules: Callable[[Config, str | None], list[Rule]]
    score: Callable[[Any, dict | None, list[Rule]], dict]  # (model or module, frozen variables, rules)
    score_forward: Callable[[Callable], dict]  # a forward ``batch -> outputs`` (Qwix's models)
    metric: str
    lower_is_better: bool
    info: dict
    apply_kwargs: dict = dataclasses.field(default_factory=dict)
    token_mask: str | None = None
    pv_output: Callable | None = None
    residual_layout: Any = None  # ptq.rotate_residual's layout, None when the model has no residual rotation
    online_rotation: str | None = None  # layers whose inputs quarot rotates online


def decoder_rules(config: Config, grid: str | None, dims: dict[str, int]) -> list[Rule]:
    """Tunix Llama3's quantized layers for ``config`` (``dims``: ``embed``, ``hidden``, ``heads``,
    ``head_dim``): q/k/v ``(D, N, H)`` and the MLP ``(in, out)`` contract axis 0; ``o_proj (N, H, D)``
    contracts ``(N, H)``: its groups run along ``H``, so a group of ``g > H`` inputs of the flattened
    ``N * H`` (whole heads) is not one group along one axis: ``o_proj`` then has one scale per output
    channel (coarser than asked, never finer; said in the results). A group at least as long as the
    contraction is one scale per output channel. Inputs: one scale
    per token over the contracted axes (NVFP4: blocks of 16 along the last axis)."""
    from experiments.decoder_lm import WEIGHT_NAMES

    def fit(k: int) -> Config:  # (the quick model's widths: the largest group dividing k and GPTQ's 128)
        if config.group is None or config.group >= k:
            return dataclasses.replace(config, group=None)
        return dataclasses.replace(config, group=max(g for g in range(1, config.group + 1)
                                                     if k % g == 0 and 128 % g == 0))

    o_config = fit(dims["head_dim"] + 1)  # a group within a head, else per output channel
    if o_config.group is not None and dims["head_dim"] % o_config.group:
        o_config = dataclasses.replace(o_config, group=None)
    o_w = presets.nvfp4(1) if config.weight == "nvfp4" else o_config.weight_quantizer(1, (2,), grid)
    common = dict(weight_names=WEIGHT_NAMES, name=config.name)
    inputs = config.input_quantizer((-1,), grid)
    qkv_w = fit(dims["embed"]).weight_quantizer(0, (1, 2), grid)
    up_w = fit(dims["embed"]).weight_quantizer(0, (1,), grid)
    down_w = fit(dims["hidden"]).weight_quantizer(0, (1,), grid)
    return [Rule(r"layers/\d+/attn/o_proj", weight=o_w, input=config.input_quantizer((-2, -1), grid),
                 **common),
            Rule(r"layers/\d+/attn/[qkv]_proj", weight=qkv_w, input=inputs, **common),
            Rule(r"layers/\d+/mlp/(gate|up)_proj", weight=up_w, input=inputs, **common),
            Rule(r"layers/\d+/mlp/down_proj", weight=down_w, input=inputs, **common)]


def _nnx_bytes(model: nnx.Module) -> dict:
    info = summary(model)
    linear = sum(r.real_bytes for r in info.layers if r.rule != "-")
    return {"model_bytes": info.real_bytes, "linear_bytes": linear}


def forward_perplexity(forward: Callable[[jax.Array], jax.Array], sequences: np.ndarray,
                       batch_size: int = 32) -> float:
    """``exp`` of the mean next-byte NLL of ``forward(tokens[B, L]) -> logits[B, L, V]`` on
    ``sequences[n, L + 1]``, in jitted batches (the last padded and masked)."""
    import optax

    jitted = jax.jit(forward)
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        chunk = np.asarray(sequences[i:i + batch_size], np.int32)
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, 0)])
        logits = jitted(jnp.asarray(chunk[:, :-1]))
        nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                              jnp.asarray(chunk[:, 1:]))
        total += float(jnp.sum(nll[:n]))
        count += n * (chunk.shape[1] - 1)
    return math.exp(total / count)


def _check_forward_scoring(kind: str, model: Any, score_forward: Callable, metric: str, expected: float
                           ) -> None:
    """Qwix's rows are scored through ``score_forward`` and qjax's through the model: the float model's
    forward (:func:`experiments.qwix_ptq.float_forward`) must score as the float model does, else the two
    libraries' figures are not comparable and the study stops here."""
    from experiments import qwix_ptq

    got = score_forward(qwix_ptq.float_forward(kind, model))[metric]
    if not math.isclose(got, expected, rel_tol=1e-4):
        raise RuntimeError(f"{kind}: the float forward scores {metric} {got:.6g}, the float model "
                           f"{expected:.6g}: the Qwix rows would not be comparable")


def decoder_subject(args) -> Subject:
    """The trained Tunix Llama3 (:func:`experiments.decoder_lm.train_or_load`), its calibration windows
    from the training split, its held-out windows."""
    from experiments import decoder_lm, llm_text

    name = "quick" if args.quick else "tiny"
    lm = decoder_lm.train_or_load(name, progress=not args.no_progress)
    config = decoder_lm.CONFIGS[name]
    held = lm.data.heldout_sequences
    picks = np.linspace(0, len(held) - 1, min(args.eval_windows, len(held))).round().astype(int)
    held = held[picks]
    train = lm.data.train_sequences
    rng = np.random.default_rng(args.seed)
    rows = train[rng.choice(len(train), args.calib_windows, replace=False)]
    calib = [decoder_lm.model_inputs(jnp.asarray(rows[i:i + args.batch_size, :-1]))
             for i in range(0, len(rows) - args.batch_size + 1, args.batch_size)]
    float_model = lm.model

    def fresh():
        return nnx.clone(float_model), None

    def perplexity(model) -> float:
        return decoder_lm.perplexity(model, held, batch_size=args.batch_size * 2)

    def score(model, variables, rules):
        del variables, rules
        return {"perplexity": perplexity(model), **_nnx_bytes(model)}

    def score_forward(forward):
        return {"perplexity": forward_perplexity(lambda t: forward(decoder_lm.model_inputs(t)), held,
                                                 args.batch_size * 2)}

    fp32 = perplexity(float_model)
    if args.qwix_methods:
        _check_forward_scoring("decoder", float_model, score_forward, "perplexity", fp32)
    info = {"model": "tunix.models.llama3.Llama3", "config": name, "parameters":
            decoder_lm.parameter_count(float_model), "fp32_perplexity": fp32,
            "unigram_perplexity": llm_text.unigram_perplexity(lm.data.train, held[:, 1:]),
            "eval_windows": len(held), "eval_tokens": int(held[:, 1:].size),
            "calib_windows": int(len(calib) * args.batch_size), "seq_len": config.seq_len,
            "from_cache": lm.info["from_cache"], **_nnx_bytes(float_model)}
    layout = getattr(ptq, "LLAMA_LAYOUT", None)
    dims = {"embed": config.embed_dim, "hidden": config.hidden_dim, "heads": config.num_heads,
            "head_dim": config.head_dim}
    rules = functools.partial(decoder_rules, dims=dims)
    return Subject("decoder", fresh, calib, rules, score, score_forward, "perplexity", True, info,
                   residual_layout=layout, online_rotation=r"layers/\d+/(attn/o_proj|mlp/down_proj)",
                   pv_output=None)


def minilm_rules(config: Config, grid: str | None = None) -> list[Rule]:
    """Every encoder Dense kernel ``(in, out)`` of FlaxBert, inputs per token; ``grid`` as in
    :func:`decoder_rules`."""
    w = config.weight_quantizer(0, (1,), grid)
    inputs = config.input_quantizer((-1,), grid)
    return [Rule(r"encoder/layer/\d+/.*", types=("Dense",), weight=w, input=inputs, name=config.name)]


def minilm_subject(args) -> Subject:
    """all-MiniLM-L6-v2 (:mod:`experiments.ptq_minilm`): calibration and held-out sentences."""
    from experiments import ptq_minilm as pm
    from qjax.linen import quantize_model

    module, variables, tokenizer = pm.load_minilm()
    texts = pm.sentences(args.seed)
    n_cal, n_eval = (16, 32) if args.quick else (args.minilm_calibration, args.minilm_eval)
    calib = pm.batches(tokenizer, texts[:n_cal], 8, 64)
    held = pm.batches(tokenizer, texts[n_cal:n_cal + n_eval], 8, 64)
    fp32 = quantize_model(module, [], warn_unused=False)
    reference = pm.embeddings(pm.embed_fn(fp32), variables, held)

    def fresh():
        return module, variables

    def score(model, frozen, rules):
        del model
        qmodel = quantize_model(module, rules)
        info = summary(qmodel, frozen, **calib[0], **pm.APPLY_KWARGS)
        linear = sum(r.real_bytes for r in info.layers if r.rule != "-")
        return {**pm.compare(pm.embeddings(pm.embed_fn(qmodel), frozen, held), reference),
                "model_bytes": info.real_bytes, "linear_bytes": linear}

    def score_forward(forward):
        # a Qwix forward returns the last hidden states, the first of FlaxBert's outputs
        emb = np.concatenate([np.asarray(pm.embed((forward(b),), b)) for b in held])
        return pm.compare(emb, reference)

    if args.qwix_methods:
        _check_forward_scoring("minilm", (module, variables), score_forward, "cosine", 1.0)
    info = {"model": "all-MiniLM-L6-v2 (FlaxBertModel)", "calibration_sentences": n_cal,
            "eval_sentences": n_eval,
            "model_bytes": summary(fp32, variables, **calib[0], **pm.APPLY_KWARGS).real_bytes}
    return Subject("minilm", fresh, calib, minilm_rules, score, score_forward, "cosine", False, info,
                   apply_kwargs=dict(pm.APPLY_KWARGS), token_mask="attention_mask",
                   pv_output=pm.token_states)


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
        _print(rows[-1], subject)
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
        _print(rows[-1], subject)
        bar.update()
    return rows


def _print(row: dict, subject: Subject) -> None:
    head = f"{row['model']:>8} {row['config']:>8} {row['library']:>4} {row['method']:>11}"
    if "reason" in row:
        print(f"{head}: not run: {row['reason']}", flush=True)
    else:
        print(f"{head}: {subject.metric} {row[subject.metric]:.4f}  {row.get('linear_bytes', 0):,} B  "
              f"{row['time_s']:.1f} s", flush=True)


# ------------------------------------------------------------------------------------------------- report


def best(rows: list[dict], model: str, config: str, library: str, metric: str, lower: bool) -> dict | None:
    """The best row of ``library`` at ``(model, config)`` by ``metric``."""
    cands = [r for r in rows if r["model"] == model and r["config"] == config and r["library"] == library
             and metric in r and np.isfinite(r[metric])]
    if not cands:
        return None
    return min(cands, key=lambda r: r[metric] if lower else -r[metric])


def verdicts(rows: list[dict], subjects: Sequence[Subject]) -> list[str]:
    """The issue's goals, each said as it came out."""
    out = []
    for s in subjects:
        m, lower = s.metric, s.lower_is_better
        better = (lambda a, b: a <= b) if lower else (lambda a, b: a >= b)
        for c in WEIGHT_ONLY:
            q, w = best(rows, s.name, c, "qjax", m, lower), best(rows, s.name, c, "qwix", m, lower)
            if q and w:
                out.append(f"{s.name} {c}: qjax's best ({q['method']}, {m} {q[m]:.4f}) "
                           f"{'matches or beats' if better(q[m], w[m]) else 'LOSES TO'} Qwix's best "
                           f"({w['method']}, {w[m]:.4f})")
        for c in ("W4A8", "W4A4"):
            got = {r["method"]: r[m] for r in rows if r["model"] == s.name and r["config"] == c
                   and r["library"] == "qjax" and m in r}
            if "gptq" in got:
                for meth in ("smoothquant", "rotation", "quarot"):
                    if meth in got:
                        wins = better(got[meth], got["gptq"]) and got[meth] != got["gptq"]
                        out.append(f"{s.name} {c}: {meth} + GPTQ {got[meth]:.4f} vs GPTQ {got['gptq']:.4f}: "
                                   f"{'beats' if wins else 'does NOT beat'} plain GPTQ")
        qt = [r["time_s"] for r in rows if r["model"] == s.name and r["library"] == "qjax"
              and r["method"] == "gptq" and "time_s" in r]
        wt = [r["time_s"] for r in rows if r["model"] == s.name and r["library"] == "qwix"
              and r["method"] == "gptq" and "time_s" in r]
        if qt and wt:
            out.append(f"{s.name}: GPTQ time summed over configs: qjax {sum(qt):.1f} s, Qwix {sum(wt):.1f} s "
                       f"({'at most' if sum(qt) <= sum(wt) else 'MORE than'} Qwix's)")
    return out


def markdown_table(rows: list[dict], subject: Subject) -> str:
    m = subject.metric
    extra = " | top-1 NN agreement" if m == "cosine" else ""
    lines = [f"| config | library | method | {m}{extra} | linear bytes | time s | note |",
             "|---|---|---|---:|" + ("---:|" if extra else "") + "---:|---:|---|"]
    for r in rows:
        if r["model"] != subject.name:
            continue
        if "reason" in r:
            lines.append(f"| {r['config']} | {r['library']} | {r['method']} | - |" + (" - |" if extra else "")
                         + f" - | - | not run: {r['reason']} |")
            continue
        nn_col = f" {r['nn_agreement']:.3f} |" if extra else ""
        lines.append(f"| {r['config']} | {r['library']} | {r['method']} | {r[m]:.4f} |{nn_col} "
                     f"{r.get('linear_bytes', 0):,} | {r['time_s']:.1f} | {_note(r)} |")
    return "\n".join(lines)


def _note(row: dict) -> str:
    """Where a row is not what its config says (the full Qwix rules are in the JSON)."""
    notes = []
    if row.get("rtn_fallback_layers"):
        notes.append(f"Qwix rounds {len(row['rtn_fallback_layers'])} layer(s) by RTN (no statistics): "
                     + ", ".join(sorted({p.split('/')[-1] for p in row["rtn_fallback_layers"]})))
    if row.get("packed_linear_bytes"):
        notes.append(f"{row['packed_linear_bytes']:,} B if Qwix packed its sub-byte codes")
    return "; ".join(notes)


def plot(rows: list[dict], subjects: Sequence[Subject], path: Path) -> None:
    """One panel per model: the metric per config, a bar per (library, method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(subjects), 1, figsize=(13, 4.2 * len(subjects)), squeeze=False)
    for ax, s in zip(axes[:, 0], subjects, strict=True):
        mine = [r for r in rows if r["model"] == s.name and s.metric in r]
        configs = list(dict.fromkeys(r["config"] for r in mine))
        series = list(dict.fromkeys((r["library"], r["method"]) for r in mine))
        width = 0.85 / max(len(series), 1)
        for i, (lib, meth) in enumerate(series):
            vals = [next((r[s.metric] for r in mine if r["config"] == c and r["library"] == lib
                          and r["method"] == meth), np.nan) for c in configs]
            ax.bar(np.arange(len(configs)) + i * width, vals, width, label=f"{lib} {meth}",
                   hatch="//" if lib == "qwix" else None)
        ax.set_xticks(np.arange(len(configs)) + width * (len(series) - 1) / 2, configs)
        if s.lower_is_better:
            fp = s.info.get("fp32_perplexity")
            if fp:
                ax.axhline(fp, color="k", ls="--", lw=1, label=f"fp32 {fp:.2f}")
            ax.set_yscale("log")
            ax.set_ylabel("held-out perplexity per byte (log)")
        else:
            ax.set_ylabel("held-out cosine to fp32")
            ax.set_ylim(0, 1)
        ax.set_title(s.info["model"])
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
               "quick": args.quick}
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
    parts.append(f"\nTotal {seconds:.0f} s on {machine['cores']} CPU cores ({machine['cpu']}), jax "
                 f"{machine['jax']}{'; quick mode' if args.quick else ''}.\n")
    (out / "ptq_llm.md").write_text("\n".join(parts))
    plot(rows, subjects, out / "ptq_llm.png")
    print(f"total {seconds:.1f} s; wrote {out}/ptq_llm.{{json,md,png}}")
    return rows


if __name__ == "__main__":
    run(main)
