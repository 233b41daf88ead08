"""What machine a benchmark ran on, for the JSON it writes, and where that JSON goes."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

OUT_HELP = ("a .json file, or a folder for NAME.json (default: runs/ or $QJAX_RESULTS_DIR, untracked; "
            "--out results/ updates the repository's figures)")


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()`` or the machine."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return cpu


def out_path(out: str | None, name: str) -> Path:
    """The JSON file a benchmark writes: ``out`` if it ends in ``.json``, else ``name`` in the folder ``out``
    (``--out results/``), else ``name`` in ``runs/`` (or ``$QJAX_RESULTS_DIR``), which git ignores."""
    from experiments.cli import results_dir

    if out is not None and out.endswith(".json"):
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        return Path(out)
    return results_dir(out) / name


def write_results(results: dict, out: Path, table: str) -> dict:
    """Note the 1-minute load average at the end, write ``results`` as JSON to ``out``, print ``table``."""
    import json
    import os

    results["environment"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table)
    print(f"wrote {out}")
    return results
