"""kernels_pallas knows only arrays: importing it loads neither qjax nor Flax."""

import subprocess
import sys


def test_import_kernels_pallas_loads_no_qjax_and_no_flax():
    code = ("import sys, kernels_pallas, kernels_pallas.layout; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('qjax', 'flax', 'orbax')); "
            "print(bad); assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
