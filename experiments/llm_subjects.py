"""The two models :mod:`experiments.ptq_llm` quantizes, as :class:`Subject` values (a float copy, calibration
batches, rules per configuration, a score), and the configurations (:data:`CONFIGS`) as qjax rules: Tunix's
NNX Llama3 decoder (:func:`decoder_rules`, :func:`decoder_subject`) and all-MiniLM-L6-v2 as Linen
``FlaxBertModel`` (:func:`minilm_rules`, :func:`minilm_subject`). Both are scored through the quantized
model (qjax) or through a forward ``batch -> outputs`` (Qwix, :mod:`experiments.qwix_ptq`); each subject
checks that the float model scores the same both ways before a study compares the two libraries."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax import PerChannel, PerGroup, PerToken, Quantizer, Rule, presets, ptq
from qjax.summary import summary

WEIGHT_ONLY = ("W4 g128", "W3 g128", "W2 g64")
WITH_INPUTS = ("W8A8", "W4A8", "W4A4", "nvfp4")


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
