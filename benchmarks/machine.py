"""What machine a benchmark ran on, for the JSON it writes."""

from __future__ import annotations

import contextlib
import platform


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()`` or the machine."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return cpu


def write_results(results: dict, out: str, table: str) -> dict:
    """Note the 1-minute load average at the end, write ``results`` as JSON to ``out``, print ``table``."""
    import json
    import os
    from pathlib import Path

    results["environment"]["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(table)
    print(f"wrote {path}")
    return results
