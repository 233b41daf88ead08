"""Writing the results of the low-bit studies: JSON rows, a Markdown table, a PNG plot, and the setup notes.

Rows are the dicts of :func:`experiments.bnn_common.Trainer.run` (one run) or
:func:`experiments.bnn_common.aggregate` (seeds averaged, with ``accuracy_std``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from experiments.cli import results_dir


def _fmt_bits(bits: float) -> str:
    return f"{bits:g}"


def markdown_table(rows: Sequence[dict]) -> str:
    """A Markdown table of result rows (with a model column and ``mean ± std`` when present)."""
    multi_model = len({r.get("model") for r in rows}) > 1
    std = any("accuracy_std" in r for r in rows)
    head = (["model"] if multi_model else []) + ["method", "bits", "accuracy", "frozen accuracy",
                                                 "model bytes", "train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        acc = f"{r['accuracy']:.4f}" + (f" ± {r['accuracy_std']:.4f}" if std else "")
        cells = ([r["model"]] if multi_model else []) + [
            r["method"], _fmt_bits(r["bits"]), acc, f"{r['frozen_accuracy']:.4f}", f"{r['model_bytes']:,}",
            f"{r['train_time_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def text_table(rows: Sequence[dict]) -> str:
    """The same table as plain aligned text (for the terminal)."""
    md = markdown_table(rows).splitlines()
    cells = [[c.strip() for c in line.strip("|").split("|")] for i, line in enumerate(md) if i != 1]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths]), *map(fmt, cells[1:])])


def plot(rows: Sequence[dict], path: Path, title: str) -> None:
    """Two panels: test accuracy per method (bars, std error bars when present) and accuracy against the
    real model bytes (log scale), one colour per method, one marker per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    markers = dict(zip(models, "os^D", strict=False))
    fig, (bars, scatter) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw={"width_ratios": [1, 1.1]})
    height = 0.8 / len(models)
    for j, model in enumerate(models):
        for i, method in enumerate(methods):
            r = next((r for r in rows if r["model"] == model and r["method"] == method), None)
            if r is None:
                continue
            bars.barh(i + j * height, r["accuracy"], height, xerr=r.get("accuracy_std", 0.0),
                      color=colors[method], alpha=1.0 if j == 0 else 0.55, capsize=2,
                      label=model.upper() if i == 0 and len(models) > 1 else None)
            scatter.errorbar(r["model_bytes"], r["accuracy"], yerr=r.get("accuracy_std", 0.0),
                             fmt=markers[model], color=colors[method], capsize=3, markersize=7,
                             label=method + (f" ({model})" if len(models) > 1 else ""))
    low = min(r["accuracy"] - r.get("accuracy_std", 0.0) for r in rows)
    high = max(r["accuracy"] + r.get("accuracy_std", 0.0) for r in rows)
    bars.set_xlim(max(0.0, low - 0.1 * (high - low) - 0.01), min(1.0, high + 0.01))
    bars.set_yticks([i + height * (len(models) - 1) / 2 for i in range(len(methods))], methods, fontsize=8)
    bars.invert_yaxis()
    bars.set_xlabel("test accuracy" + (" (light bars: " + ", ".join(m.upper() for m in models[1:]) + ")"
                                       if len(models) > 1 else ""))
    bars.grid(axis="x", alpha=0.3)
    scatter.set_xscale("log")
    scatter.set_xlabel("model bytes (frozen, packed; log scale)")
    scatter.set_ylabel("test accuracy")
    scatter.grid(alpha=0.3)
    scatter.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(rows: Sequence[dict], name: str, title: str, notes: str = "",
                  out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Write ``<name>.json`` (the rows), ``<name>.md`` (title, table, notes) and ``<name>.png``."""
    out = results_dir(out_dir)
    paths = {ext: out / f"{name}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(list(rows), indent=1) + "\n")
    paths["md"].write_text(f"# {title}\n\n{markdown_table(rows)}\n\n{notes.strip()}\n")
    plot(rows, paths["png"], title)
    return paths


SETUP_NOTES = """\
Setup (shared by every row; `experiments/bnn_common.py`):

- Quantized layers: the first layer (reads the pixels) and the classifier head keep 8-bit weights
  (int8, absmax per output channel) in every quantized method; the pixels entering the first layer are
  int8 with one absmax scale per example. The hidden layers get the method's weight format.
- Hidden-layer inputs and the head's input: int8 per token (BitNet's activation quantizer) for int8, int4
  and ternary; binary (`mean|x|` per token times sign) for the binary methods, where the sign is the
  nonlinearity (Dense/Conv -> BatchNorm -> sign). fp32 and the multi-bit methods use ReLU.
- Weights: int8/int4 absmax per output channel, straight-through gradient; ternary = BitNet b1.58
  (`mean|W|` per tensor, STE); binary STE and clipped STE: XNOR-Net `mean|W|` per output channel; ReSTE:
  one `mean|W|` per layer (the reference code), `o` annealed 1 -> 3 by cosine over the steps, `t = 1.5`,
  for weights and activations; BiPer: `alpha sign(sin(20 w))` with a learned per-output-channel alpha
  (trained with the params), stage 1 (`alpha sin(20 w)`, real-valued) for the first half of the steps,
  stage 2 (binarized) after, ApproxSign activations.
- Training: Adam, cosine-decayed learning rate, batch 128, cross-entropy, the same for every method; one
  jitted train step per run, the schedule passed as arrays through `hparams=` (column `compiles` in the
  JSON is 1 for every run: no recompilation).
- Model bytes: real bytes of `qjax.linen.freeze(...)` (packed codes + scales + biases + BatchNorm
  statistics); "frozen accuracy" is the frozen model's test accuracy, "accuracy" the QAT model's.
"""
