"""Quickstart: one small network trained in fp32, int8, int4, ternary and binary, compared in one table.

    python -m experiments.quickstart                           # scikit-learn's digits, under 3 minutes on CPU
    python -m experiments.quickstart --dataset fashion_mnist   # the real benchmark (a few minutes per method)
    python -m experiments.quickstart --quick                   # seconds (CI; also QJAX_QUICK=1)

The network is a plain Flax Linen MLP (three hidden Dense + BatchNorm blocks, then a Dense head); each
method wraps the same model with :func:`qjax.linen.quantize_model` and its rules (see
:mod:`experiments.bnn_common` for which layers get what). For every method it prints and writes
(``quickstart.{json,md,png}`` in ``runs/``, or ``--out DIR``) the test accuracy of the QAT model, the
accuracy of the frozen, packed model, its real size in bytes and the training time. Fashion-MNIST: see
:mod:`experiments.data` (a missing copy ends the run with one line saying how to get it).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from experiments import bnn_common as bc
from experiments import bnn_report as report
from experiments.cli import add_run_options, run

DEFAULT_EPOCHS = {"digits": 30, "fashion_mnist": 3}


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``--help``)."""
    p = argparse.ArgumentParser(prog="python -m experiments.quickstart", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", choices=("digits", "fashion_mnist"), default="digits")
    p.add_argument("--epochs", type=int, default=None, help="default: 30 (digits), 3 (fashion_mnist)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help=f"a subset of: {', '.join(m.name for m in bc.METHODS)}")
    add_run_options(p, "tiny run for CI: small model, 5 epochs, <= 2048 training images")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    """Run the quickstart; print the table; write the results; return the rows."""
    args = parse_args(argv)
    data = bc.load_data(args.dataset)
    epochs = args.epochs or DEFAULT_EPOCHS[args.dataset]
    if args.quick:
        data = data.subset(min(2048, len(data.x_train)), min(500, len(data.x_test)), args.seed)
        epochs = args.epochs or 5
    config = bc.TrainConfig(epochs=epochs)
    methods = bc.select_methods(args.methods)
    start = time.perf_counter()
    rows = bc.run_study(methods, ["mlp"], [args.seed], data, config, small=args.quick,
                        progress=not args.no_progress)
    total = time.perf_counter() - start
    print(report.text_table(rows))

    same = all(r["frozen_accuracy"] == r["accuracy"] for r in rows)
    notes = (
        f"Data: {data.name}, {len(data.x_train)} training and {len(data.x_test)} test images; MLP "
        f"{'(64, 64, 64)' if args.quick else '(256, 256, 256)'}; {epochs} epochs; seed {args.seed}"
        f"{'; quick mode' if args.quick else ''}. Total wall time {total:.0f} s on {os.cpu_count()} CPU "
        f"cores ({platform.processor() or platform.machine()}), compilation included.\n\n"
        f"Frozen model accuracy equals the QAT model's for every row: {'yes' if same else 'NO'}.\n\n"
        + report.SETUP_NOTES)
    name = "quickstart" if args.dataset == "digits" else f"quickstart_{args.dataset}"
    paths = report.write_results(rows, name, f"qjax quickstart: {data.name}, MLP", notes, args.results_dir)
    print(f"total {total:.1f} s; wrote {', '.join(str(p) for p in paths.values())}")
    return rows


if __name__ == "__main__":
    run(main)
