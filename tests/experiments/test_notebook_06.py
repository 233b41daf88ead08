"""``colab/06_llm_ptq.ipynb`` runs top to bottom in quick mode: the quick decoder, RTN / GPTQ / rotation +
GPTQ at W4A8 (the full notebook adds W4 g128), perplexities that are finite and near fp32's."""

import re

import pytest

from tests.experiments._checks import REPO_ROOT, quick_env, require_experiment_deps

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def test_notebook_06_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat missing: pip install -e '.[notebooks]'")
    nbclient = pytest.importorskip("nbclient", reason="nbclient missing: pip install -e '.[notebooks]'")
    pytest.importorskip("tunix", reason="Tunix missing: pip install --no-deps google-tunix==0.1.7")
    require_experiment_deps()
    for key, value in quick_env().items():  # the kernel inherits this environment
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("QJAX_RESULTS_DIR", str(tmp_path))
    notebook = nbformat.read(REPO_ROOT / "colab" / "06_llm_ptq.ipynb", as_version=4)
    assert "find_spec(\"qjax\") is None" in notebook.cells[1].source  # the guarded Colab install cell
    client = nbclient.NotebookClient(notebook, timeout=400, kernel_name="python3",
                                     resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    fp32 = float(re.search(r"fp32 ([0-9.]+), unigram", outputs).group(1))
    found = re.findall(r"(W4 g128|W4A8)\s+(rtn|gptq|rotation \+ gptq): perplexity ([0-9.]+)", outputs)
    assert len(found) == 3, outputs[-2000:]
    for setting, method, ppl in found:  # quantized: near fp32, not garbage (the quick model's fp32 is ~14)
        assert fp32 <= float(ppl) * 1.02 and float(ppl) < 1.5 * fp32, (setting, method, ppl, fp32)
    assert "quantized layers:" in outputs and "packed" in outputs
