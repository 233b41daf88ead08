"""The report of :mod:`experiments.ptq_llm`: the best row per library, the issue's goals as sentences
(:func:`verdicts`), a Markdown table per model and the plot of fidelity against real bytes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from experiments.llm_subjects import WEIGHT_ONLY, Subject


def print_row(row: dict, subject: Subject) -> None:
    """One finished row, a line."""
    head = f"{row['model']:>8} {row['config']:>8} {row['library']:>4} {row['method']:>11}"
    if "reason" in row:
        print(f"{head}: not run: {row['reason']}", flush=True)
    else:
        print(f"{head}: {subject.metric} {row[subject.metric]:.4f}  {row.get('linear_bytes', 0):,} B  "
              f"{row['time_s']:.1f} s", flush=True)



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

    fig, axes = plt.subplots(len(subjects), 1, figsize=(14, 4.2 * len(subjects)), squeeze=False)
    # one colour per (library, method) in every panel
    every = list(dict.fromkeys((r["library"], r["method"]) for r in rows))
    colours = {key: plt.cm.tab20(i % 20) for i, key in enumerate(every)}
    for ax, s in zip(axes[:, 0], subjects, strict=True):
        mine = [r for r in rows if r["model"] == s.name and s.metric in r]
        configs = list(dict.fromkeys(r["config"] for r in mine))
        series = list(dict.fromkeys((r["library"], r["method"]) for r in mine))
        width = 0.85 / max(len(series), 1)
        for i, (lib, meth) in enumerate(series):
            vals = [next((r[s.metric] for r in mine if r["config"] == c and r["library"] == lib
                          and r["method"] == meth), np.nan) for c in configs]
            ax.bar(np.arange(len(configs)) + i * width, vals, width, label=f"{lib} {meth}",
                   color=colours[(lib, meth)], hatch="//" if lib == "qwix" else None)
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
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))  # beside the bars
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
