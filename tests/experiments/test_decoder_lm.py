"""experiments.llm_text and experiments.decoder_lm: Python's own documentation as a fixed, byte-tokenized
corpus; Tunix's Llama3 trained on it (quick config), cached, evaluated; qjax quantizes it at int8."""

from __future__ import annotations

import json
import platform
import sys
import time

import numpy as np
import pytest

pytest.importorskip("tqdm", reason="tqdm missing: pip install -e '.[experiments]'")
pytest.importorskip("matplotlib", reason="matplotlib missing: pip install -e '.[experiments]'")

import jax
from flax import nnx

import qjax
from experiments import decoder_lm as lm
from experiments import llm_text
from experiments.cli import run
from qjax import nnx as qnnx

QUICK = lm.CONFIGS["quick"]
# Tunix 0.1.7 uses APIs flax 0.12 and jax 0.8 deprecate (``Variable.value``, ``sharding=``, pxla's mesh)
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def jax_leaves(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


# ------------------------------------------------------------------------------------------ the corpus


def test_corpus_is_deterministic_and_its_hash_is_recorded(capfd):
    corpus = llm_text.load_corpus()
    assert len(corpus.names) > 300 and corpus.num_bytes > 1_000_000
    assert list(corpus.names) == sorted(corpus.names) and len(set(corpus.texts)) == len(corpus.texts)
    assert all(n.startswith(("pydoc:", "module:")) for n in corpus.names)
    again = llm_text._stdlib_docstrings()  # a fresh child process: the same docstrings, nothing printed
    assert again["json"] and "asyncio.locks" in again and "antigravity" not in again
    out = capfd.readouterr()
    assert out.out == "" and out.err == "", out
    reference = llm_text.REFERENCE_SHA256.get((platform.python_version(), sys.platform))
    if reference is not None:  # a different hash: the text changed, so do cached models and perplexities
        assert corpus.sha256 == reference


def test_split_is_by_document_fixed_and_disjoint():
    data = llm_text.load_data(64)
    assert not set(data.train_documents) & set(data.heldout_documents)
    assert all(llm_text.is_heldout(n) for n in data.heldout_documents)
    assert not any(llm_text.is_heldout(n) for n in data.train_documents)
    frac = len(data.heldout) / (len(data.train) + len(data.heldout))
    assert 0.05 < frac < 0.2, frac
    assert data.train_sequences.shape[1] == data.heldout_sequences.shape[1] == 65
    assert data.train_sequences.dtype == np.int32 and data.train.max() < llm_text.VOCAB_SIZE
    # consecutive windows share their boundary token; documents end with the NUL byte
    np.testing.assert_array_equal(data.train_sequences[0, -1], data.train_sequences[1, 0])
    assert (data.heldout == llm_text.END_OF_DOCUMENT).sum() == len(data.heldout_documents)
    assert 10 < data.unigram_perplexity() < 60


def test_bytes_round_trip_and_batches_repeat_with_the_seed():
    text = "Return the value of x ** y — with unicode."
    assert llm_text.decode(llm_text.encode(text)) == text
    seqs = np.arange(40 * 5, dtype=np.int32).reshape(40, 5)
    first = [b.copy() for b, _ in zip(llm_text.batches(seqs, 8, seed=3), range(12), strict=False)]
    again = [b.copy() for b, _ in zip(llm_text.batches(seqs, 8, seed=3), range(12), strict=False)]
    assert all((a == b).all() for a, b in zip(first, again, strict=True))
    epoch = np.concatenate(first[:5])
    assert sorted(epoch[:, 0].tolist()) == seqs[:, 0].tolist()  # one epoch sees every window once
    assert not (first[5] == first[0]).all()  # reshuffled
    assert len(list(llm_text.batches(seqs, 16, epochs=1))) == 2  # partial batch dropped
    unigram = llm_text.unigram_perplexity(np.array([0, 0, 1]), np.array([[0]]), vocab_size=2)
    assert unigram == pytest.approx(5 / 3)  # add-one smoothing: p(0) = (2 + 1) / (3 + 2)


# ----------------------------------------------------------------------------------------- the model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The quick model trained once into a fresh cache, then loaded back from it."""
    pytest.importorskip("tunix.models.llama3.model", reason="google-tunix missing: pip install --no-deps "
                        "google-tunix==0.1.7 (and .[test] for what its model modules import)")
    cache = tmp_path_factory.mktemp("cache")
    first = lm.train_or_load("quick", directory=cache)
    start = time.perf_counter()
    second = lm.train_or_load("quick", directory=cache)
    return cache, first, second, time.perf_counter() - start


def test_training_lowers_heldout_perplexity_below_unigram(trained):
    _, first, _, _ = trained
    held = lm.eval_sequences(first.data, QUICK)
    unigram = llm_text.unigram_perplexity(first.data.train, held[:, 1:])
    untrained = lm.perplexity(lm.init_model(QUICK), held)
    ppl = lm.perplexity(first.model, held)
    assert not first.info["from_cache"] and first.info["tokens_seen"] == QUICK.steps * 16 * 64
    assert ppl < 0.75 * unigram < unigram < untrained, (ppl, unigram, untrained)
    assert first.info["losses"][-1] < first.info["losses"][0] - 2
    assert lm.parameter_count(first.model) == 131_392


def test_second_call_loads_from_the_cache(trained, monkeypatch):
    cache, first, second, seconds = trained
    assert second.info["from_cache"] and seconds < first.info["train_time_s"]
    assert second.info["cache_file"] == first.info["cache_file"]
    assert second.info["losses"] == first.info["losses"]
    for a, b in zip(jax_leaves(first.model), jax_leaves(second.model), strict=True):
        np.testing.assert_array_equal(a, b)
    monkeypatch.setenv("QJAX_CACHE", str(cache))
    monkeypatch.setattr(lm, "train", lambda *a, **k: pytest.fail("load_or_train trained again"))
    model, data = lm.load_or_train("tiny", quick=True)
    assert data.corpus_sha256 == first.data.corpus_sha256 and data.length == QUICK.seq_len
    np.testing.assert_array_equal(model.lm_head.w.get_value(), first.model.lm_head.w.get_value())
    other = lm.cache_key(lm.CONFIGS["tiny"], data.corpus_sha256)
    assert other != lm.cache_key(QUICK, data.corpus_sha256) != lm.cache_key(QUICK, "another corpus")


def test_main_writes_json_and_markdown(trained, tmp_path, capsys):
    cache, first, _, _ = trained
    row = lm.main(["--quick", "--no-progress", "--cache", str(cache), "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "decoder_lm.json").read_text())
    assert saved["from_cache"] and saved["config"] == "quick" and saved["parameters"] == 131_392
    assert saved["perplexity"] == pytest.approx(row["perplexity"])
    assert saved["perplexity"] < saved["unigram_perplexity"]
    assert saved["eval_sequences"] == 64 and saved["corpus_sha256"] == first.data.corpus_sha256
    assert saved["train_time_s"] == pytest.approx(first.info["train_time_s"])
    assert "| quick | 131,392 |" in (tmp_path / "decoder_lm.md").read_text()
    assert (tmp_path / "decoder_lm.png").stat().st_size > 0
    assert "held-out ppl" in capsys.readouterr().out


def test_qjax_quantizes_it_at_int8_and_perplexity_barely_moves(trained):
    cache, first, _, _ = trained
    model, data = lm.train_or_load("quick", directory=cache).model, first.data  # a fresh copy to quantize
    held = lm.eval_sequences(data, QUICK)
    fp32 = lm.perplexity(model, held)
    # Tunix's Einsum holds its weight as ``w`` (q/k/v/o projections, lm_head), nnx.Linear as ``kernel`` (MLP)
    int8 = qjax.Quantizer("int8", qjax.PerChannel(-1))
    rules = [qjax.Rule(".*", weight=int8, weight_names=lm.WEIGHT_NAMES)]
    qnnx.quantize_model(model, rules, **lm.model_inputs(np.asarray(held[:2, :-1])))
    layers = [f"layers/{i}/{m}" for i in range(QUICK.num_layers) for m in (
        "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
        "mlp/down_proj")]
    assert sorted(qnnx.paths(model)) == sorted([*layers, "lm_head"])  # the embedder is only gathered
    quantized = lm.perplexity(model, held)
    assert quantized != fp32 and abs(quantized / fp32 - 1) < 0.01, (fp32, quantized)


def test_without_tunix_the_job_stops_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tunix.models.llama3", None)  # import raises, as when not installed
    with pytest.raises(SystemExit) as exit_:
        run(lambda: lm.main(["--quick", "--no-progress", "--cache", str(tmp_path), "--out", str(tmp_path)]))
    assert "pip install --no-deps google-tunix==0.1.7" in exit_.value.code and "\n" not in exit_.value.code
    assert not list(tmp_path.iterdir())
