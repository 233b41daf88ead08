"""Binary and low-bit networks on Fashion-MNIST: an MLP and a small CNN, every method, several seeds.

    python -m experiments.bnn_fashion_mnist            # the full study (about 20 minutes on 2 CPU cores)
    python -m experiments.bnn_fashion_mnist --quick    # seconds (CI; also QJAX_QUICK=1)

Methods (:data:`experiments.bnn_common.METHODS`): fp32, int8, int4, ternary (BitNet b1.58), and binary
weights and activations with STE, clipped STE, ReSTE (``o`` annealed 1 -> 3) and BiPer (two stages,
``omega = 20``). Each (model, method) is trained with 3 seeds; the table gives the mean and standard
deviation of the test accuracy, the frozen model's accuracy and its real size. Writes
``bnn_fashion_mnist.{json,md,png}`` to ``runs/`` (``--out DIR``). Data: ``$QJAX_DATA``, the Debian package
``dataset-fashion-mnist``, or a checksummed download (:mod:`experiments.data`).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

from experiments import bnn_common as bc
from experiments import bnn_report as report
from experiments.cli import add_run_options, run


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``--help``)."""
    p = argparse.ArgumentParser(prog="python -m experiments.bnn_fashion_mnist",
                                description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs-mlp", type=int, default=4)
    p.add_argument("--epochs-cnn", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help=f"a subset of: {', '.join(m.name for m in bc.METHODS)}")
    add_run_options(p, "tiny run for CI: small models, 2 epochs, 2 seeds, 2048 training images")
    return p.parse_args(argv)


CHALLENGERS = ("binary ReSTE", "binary BiPer")
BASELINES = ("binary STE", "binary clipped STE")


def _short(method: str) -> str:
    return method.removeprefix("binary ")


def verdicts(rows: list[dict]) -> list[dict]:
    """For each model, ReSTE and BiPer against STE and clipped STE: the difference of mean accuracies, the
    combined std ``sqrt(s1^2 + s2^2)`` and a verdict (``beats`` / ``trails``, or ``ties with`` when the
    difference is within the combined std)."""
    by_key = {(r["model"], r["method"]): r for r in rows}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for challenger in CHALLENGERS:
            for baseline in BASELINES:
                a, b = by_key.get((model, challenger)), by_key.get((model, baseline))
                if a is None or b is None:
                    continue
                diff = a["accuracy"] - b["accuracy"]
                spread = math.hypot(a.get("accuracy_std", 0.0), b.get("accuracy_std", 0.0))
                verdict = "ties with" if abs(diff) <= spread else "beats" if diff > 0 else "trails"
                out.append({"model": model, "challenger": challenger, "baseline": baseline, "diff": diff,
                            "spread": spread, "verdict": verdict})
    return out


def _summary(found: list[dict], challenger: str, baseline: str) -> str:
    items = [v for v in found if v["challenger"] == challenger and v["baseline"] == baseline]
    groups: dict[str, list[str]] = {}
    for v in items:
        groups.setdefault(v["verdict"], []).append(f"{v['model'].upper()} {100 * v['diff']:+.2f}")
    return "; ".join(f"{verdict.replace('ties with', 'ties')} on {', '.join(where)}"
                     for verdict, where in groups.items())


def compare_to_ste(rows: list[dict]) -> str:
    """Per model, whether ReSTE and BiPer beat binary STE and clipped STE (a difference of the means within
    one combined std is a tie), then one summary sentence against the papers' claim."""
    found = verdicts(rows)
    lines = []
    for model in dict.fromkeys(v["model"] for v in found):
        parts = [f"{_short(v['challenger'])} {v['verdict']} {_short(v['baseline'])} ({100 * v['diff']:+.2f} "
                 f"points, combined std {100 * v['spread']:.2f})" for v in found if v["model"] == model]
        lines.append(f"- {model.upper()}: " + "; ".join(parts) + ".")
    if not lines:
        return ""
    sentences = []
    for challenger in CHALLENGERS:
        versus_ste = [v for v in found if v["challenger"] == challenger and v["baseline"] == "binary STE"]
        if not versus_ste:
            continue
        claim = ("as its paper claims" if all(v["verdict"] == "beats" for v in versus_ste)
                 else "so its paper's claim of beating STE does not fully hold here")
        plain = _summary(found, challenger, "binary STE")
        clipped = _summary(found, challenger, "binary clipped STE") or "not run"
        sentences.append(f"{_short(challenger)} against plain STE: {plain} points, {claim}; "
                         f"against clipped STE: {clipped} points.")
    return "\n".join(lines) + "\n\n" + " ".join(sentences)


def _bytes_caveat(rows: list[dict]) -> str:
    """A warning when the CNN's frozen sizes do not follow the bit widths (qjax's conv packing)."""
    size = {r["method"]: r["model_bytes"] for r in rows if r["model"] == "cnn"}
    if "int8" in size and "binary STE" in size and size["binary STE"] >= size["int8"]:
        return ("CNN model bytes: `qjax.linen.freeze` currently packs every kernel along its axis 0, which "
                "for a Conv kernel (kh, kw, cin, cout) is kh = 3, so int8, int4, ternary and binary conv "
                "kernels all take one uint32 word per 3 codes; the CNN's byte column does not follow the "
                "bit width (the MLP's does).\n\n")
    return ""


def main(argv=None) -> list[dict]:
    """Run the study; print the table; write the results; return the aggregated rows."""
    args = parse_args(argv)
    data = bc.load_data("fashion_mnist")
    seeds = args.seeds
    epochs = {"mlp": args.epochs_mlp, "cnn": args.epochs_cnn}
    if args.quick:
        data = data.subset(2048, 500)
        seeds = seeds[:2]
        epochs = {"mlp": 2, "cnn": 2}
    configs = {m: bc.TrainConfig(epochs=epochs[m]) for m in args.models}
    methods = bc.select_methods(args.methods)
    start = time.perf_counter()
    runs = bc.run_study(methods, args.models, seeds, data, configs, small=args.quick,
                        progress=not args.no_progress)
    total = time.perf_counter() - start
    rows = bc.aggregate(runs)
    print(report.text_table(rows))
    comparison = compare_to_ste(rows)
    print(comparison)

    same = all(r["frozen_accuracy"] == r["accuracy"] for r in runs)
    sizes = ("MLP (64, 64, 64), CNN (8, 16, 16)" if args.quick
             else "MLP 784-256-256-256-10, CNN 3x3 convs with 16 (stride 2), 32 (stride 2), 32 channels")
    notes = (
        f"Data: Fashion-MNIST, {len(data.x_train)} training and {len(data.x_test)} test images. Models: "
        f"{sizes}. Epochs: {', '.join(f'{m} {configs[m].epochs}' for m in args.models)}; seeds "
        f"{', '.join(map(str, seeds))}; accuracy is the mean ± population std over seeds"
        f"{'; quick mode' if args.quick else ''}. Total wall time {total / 60:.1f} min on "
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other jobs; "
        f"train time is the mean over seeds of the training loop (the first seed's includes compilation)."
        f"\n\n{_bytes_caveat(rows)}"
        f"Frozen model accuracy equals the QAT model's for every run: {'yes' if same else 'NO'}.\n\n"
        f"ReSTE and BiPer against STE (a difference within one combined std is a tie):\n\n{comparison}\n\n"
        + report.SETUP_NOTES)
    paths = report.write_results(rows, "bnn_fashion_mnist", "Binary and low-bit networks on Fashion-MNIST",
                             notes, args.results_dir)
    print(f"total {total / 60:.1f} min; wrote {', '.join(str(p) for p in paths.values())}")
    return rows


if __name__ == "__main__":
    run(main)
