"""README.md runs as written: every ```python block executes; every ``python -m X`` in a ```bash block is a
module whose ``--help`` works and lists the flags shown; the set-up and test commands name what exists; the
CI script runs the README's test command and fails when pytest does (exit status 5 included)."""

from __future__ import annotations

import os
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[tuple[str, str]]:
    """``(heading, code)`` of every fenced block of ``lang``, in order; heading: the section it is in."""
    found = []
    for match in re.finditer(rf"^```{lang}\n(.*?)^```", README, re.S | re.M):
        heading = re.findall(r"^## (.+)$", README[:match.start()], re.M)
        found.append((heading[-1] if heading else "(top)", match.group(1)))
    return found


PYTHON = blocks("python")
BASH = [line.split("#")[0].strip() for _, code in blocks("bash") for line in code.splitlines()]
BASH = [line for line in BASH if line]
MODULES = sorted({m for line in BASH for m in re.findall(r"python -m ([\w.]+)", line)} - {"pytest"})


def test_readme_has_the_blocks_this_test_reads():
    assert len(PYTHON) >= 5 and any("nnx.List" in code for _, code in PYTHON)
    assert {"experiments.quickstart", "experiments.ptq_minilm", "benchmarks.ptq"} <= set(MODULES)


@pytest.mark.parametrize("heading, code", PYTHON, ids=[f"{i}-{h}" for i, (h, _) in enumerate(PYTHON)])
def test_python_block_runs_as_written(heading, code, monkeypatch):
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"README.md ({heading})", "exec"), namespace)
    if "qnnx.quantize_model" in code:  # the NNX example quantizes the layers its rule names
        import qjax.nnx

        paths = qjax.nnx.paths(namespace["model"])
        assert {"layers/0", "layers/1"} <= set(paths) and "head" not in paths, paths
    if "qlinen.quantize_model(model, rules)" in code:
        assert namespace["qmodel"].paths(namespace["variables"], namespace["x"]), "nothing was quantized"
        assert "int4" in str(namespace["qjax"].summary.summary(namespace["qmodel"], namespace["frozen"],
                                                               namespace["x"]))


def _help(module: str, capsys, monkeypatch) -> str:
    """What ``python -m module --help`` prints (its ``__main__`` code path, run in this process)."""
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with warnings.catch_warnings(), pytest.raises(SystemExit) as exit_:
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: the module is already imported
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exit_.value.code in (0, None), f"python -m {module} --help exited {exit_.value.code}"
    return capsys.readouterr().out


@pytest.mark.parametrize("module", MODULES)
def test_bash_module_help_works_and_lists_the_flags_shown(module, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = _help(module, capsys, monkeypatch)
    shown = {f for line in BASH if re.search(rf"python -m {re.escape(module)}(\s|$)", line)
             for f in re.findall(r"--[\w-]+", line)}
    missing = [f for f in sorted(shown) if not re.search(rf"{f}\b", text)]
    assert not missing, f"python -m {module}: README shows {missing}, --help does not list them"
    assert "runs/" in text, f"python -m {module} --help does not say its results go to runs/"


def test_setup_and_test_commands_name_what_exists():
    table = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^(\w+) = \[", table, re.M))
    named = {e for group in re.findall(r'pip install -e "\.\[([\w,]+)\]"', README) for e in group.split(",")}
    assert named and named <= extras, (named, extras)
    assert 'pip install -e ".[experiments]" && python -m experiments.quickstart' in BASH
    assert ".ci/test" in BASH and os.access(ROOT / ".ci/test", os.X_OK)
    assert "python -m pytest -q -n 2" in README
    for path in re.findall(r"\]\(([^)#]+)\)", README):  # every link points into the repository
        assert (ROOT / path).exists(), f"README links {path}, which is not in the repository"


def _fake_tools(tmp_path: Path, pytest_status: int) -> tuple[dict, Path]:
    """A PATH whose python, ruff, sudo and apt-get log their arguments; ``python -m pytest`` exits with
    ``pytest_status``, everything else with 0."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool in ("python", "ruff", "sudo", "apt-get"):
        status = f'case "$*" in *"-m pytest"*) exit {pytest_status};; esac\n' if tool == "python" else ""
        (bin_dir / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{log}"\n{status}exit 0\n')
        (bin_dir / tool).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, log


@pytest.mark.parametrize("pytest_status", [0, 1, 5])
def test_ci_runs_the_readme_test_command_and_fails_with_pytest(pytest_status, tmp_path):
    env, log = _fake_tools(tmp_path, pytest_status)
    proc = subprocess.run(["bash", str(ROOT / ".ci/run")], env=env, capture_output=True, text=True,
                          timeout=60)
    calls = log.read_text().splitlines()
    assert "python -m pytest -q -n 2" in calls, calls
    assert any(c.startswith("python -m pip install") and ".[test]" in c for c in calls), calls
    assert (proc.returncode == 0) == (pytest_status == 0), (pytest_status, proc.returncode, calls)
    assert ("ruff check ." in calls) == (pytest_status == 0)
