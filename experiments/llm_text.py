"""Real English text that ships with Python, for a small causal language model: no download.

The corpus is two kinds of documents, both part of every CPython installation:

- the topics of the Python documentation in ``pydoc_data.topics`` (what ``help("if")`` prints; 79 in 3.11,
  0.47 MB), one document per distinct text, named ``pydoc:<topic>``;
- the docstrings of the standard library: every non-private top-level module of
  ``sys.stdlib_module_names`` (a fixed, sorted list per Python version) and, for packages, their
  non-private submodules (``pkgutil.iter_modules``, sorted), except :data:`SKIPPED_MODULES`. A module's
  document (``module:<name>``) is its own docstring, then those of the classes and functions it defines
  (``obj.__module__`` is the module; names sorted) and of their methods and properties, each cleaned with
  ``inspect.cleandoc``. A docstring already seen (re-exported, inherited, boilerplate) is kept only the first
  time, so no text is in both the training and the held-out split.

The modules are imported in a child process (``python -B -s -S``: no bytecode written, no site-packages,
``PYTHONHASHSEED=0``) whose stdin, stdout and stderr are ``/dev/null``, with a 20 s alarm per module and a
5-minute limit overall; a module that fails to import is skipped. So collecting cannot print, hang or pick
up third-party code, and it is deterministic on one Python build: :attr:`Corpus.sha256` (over every
document's name and text) changes when the text does, and :data:`REFERENCE_SHA256` records it for the
Python this was written on.

Tokenizer: **bytes** (UTF-8), vocabulary 256; byte 0 (NUL, absent from the text) ends every document. Why
bytes, not a byte-pair vocabulary: there is nothing to fit, so nothing can leak from the held-out split or
change between runs; no token is unknown; and a ~1M-parameter model trained for ~15 minutes on two CPU cores
sees ~2M tokens, enough to learn English spelling and common words at the byte level, whereas a BPE
vocabulary of a few thousand would spend most of those parameters and tokens on its embedding and output
rows. The perplexity is per byte (``log2`` of it is bits per byte).

Split, by document and fixed: a document is held out when the SHA-256 of its name is 0 modulo 10 (about a
tenth of the documents; adding a module moves no other document). Each split's documents are concatenated
(name order) into one token stream, cut into non-overlapping windows of ``length + 1`` tokens (``length``
inputs, the targets shifted by one; consecutive windows share their boundary token).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from experiments.data import DataError

VOCAB_SIZE = 256
END_OF_DOCUMENT = 0  # the NUL byte; never in the text (removed if it were)
HELDOUT_MODULUS = 10  # a document is held out when sha256(name) % 10 == 0
#: Top-level modules not imported: side effects on import (``antigravity`` opens a browser, ``this``
#: prints, ``lib2to3`` writes grammar pickles), GUI toolkits and demos, the regression-test suite, and
#: ``pydoc_data`` (the other half of the corpus).
SKIPPED_MODULES = ("antigravity", "idlelib", "lib2to3", "pydoc_data", "test", "this", "tkinter", "turtle",
                   "turtledemo")
#: :attr:`Corpus.sha256` where it was measured: (Python version, platform) -> hash. A different hash on
#: one of these means the text changed, and so do every cached model and published perplexity.
REFERENCE_SHA256 = {
    ("3.11.7", "linux"): "b2865dbdc3b528b6d6d939c402d165df5ad132e52c14b4e7e56c863cbc3f11fa",
}

# The child process: imports each module and writes {module: [docstring, ...]} as JSON to argv[1].
_COLLECT = r"""
import importlib, inspect, json, pkgutil, signal, sys, warnings

skipped = set(json.loads(sys.argv[2]))
warnings.simplefilter("ignore")


def timeout(signum, frame):
    raise TimeoutError


if hasattr(signal, "SIGALRM"):
    signal.signal(signal.SIGALRM, timeout)


def alarm(seconds):
    if hasattr(signal, "alarm"):
        signal.alarm(seconds)


def doc(obj):
    text = getattr(obj, "__doc__", None)
    return inspect.cleandoc(text) if isinstance(text, str) and text.strip() else None


def docstrings(module):
    found = [doc(module)]
    namespace = vars(module)
    for name in sorted(namespace):
        obj = namespace[name]
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        found.append(doc(obj))
        if inspect.isclass(obj):
            members = vars(obj)
            for key in sorted(members):
                member = members[key]
                if inspect.isroutine(member) or isinstance(member, (property, classmethod, staticmethod)):
                    found.append(doc(member))
    return [d for d in found if d]


names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in skipped)
todo, seen, out = list(names), set(), {}
while todo:
    todo.sort()
    name = todo.pop(0)
    if name in seen:
        continue
    seen.add(name)
    alarm(20)
    try:
        module = importlib.import_module(name)
        out[name] = docstrings(module)
        if hasattr(module, "__path__"):
            todo += [f"{name}.{m.name}" for m in pkgutil.iter_modules(module.__path__)
                     if not m.name.startswith("_") and m.name not in ("test", "tests")]
    except BaseException:  # a module that cannot be imported here (or exits) is skipped
        pass
    finally:
        alarm(0)
with open(sys.argv[1], "w", encoding="ascii") as f:
    json.dump(out, f, ensure_ascii=True)
"""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Named documents (name order) and the SHA-256 of all of them."""

    names: tuple[str, ...]
    texts: tuple[str, ...]
    sha256: str

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of all the texts (without the end-of-document bytes)."""
        return sum(len(t.encode("utf-8")) for t in self.texts)


@dataclasses.dataclass(frozen=True)
class LMData:
    """The tokenized corpus split for language modelling.

    ``train`` and ``heldout`` are int32 token streams (documents joined, each ending in
    :data:`END_OF_DOCUMENT`); ``train_sequences`` / ``heldout_sequences`` are their windows
    ``[n, length + 1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``).
    """

    corpus_sha256: str
    length: int
    train_documents: tuple[str, ...]
    heldout_documents: tuple[str, ...]
    train: np.ndarray
    heldout: np.ndarray
    train_sequences: np.ndarray
    heldout_sequences: np.ndarray
    vocab_size: int = VOCAB_SIZE

    def unigram_perplexity(self) -> float:
        """The held-out windows' perplexity under the training split's byte frequencies (add-one
        smoothed): the baseline a language model has to beat."""
        return unigram_perplexity(self.train, self.heldout_sequences[:, 1:])


def encode(text: str) -> np.ndarray:
    """``text`` as byte tokens (UTF-8), int32."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens: np.ndarray | list[int]) -> str:
    """Byte tokens back to text (invalid UTF-8, e.g. a window cut inside a character, is replaced)."""
    return bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", errors="replace")


def _stdlib_docstrings() -> dict[str, list[str]]:
    """``{module: [docstring, ...]}`` from the isolated child process (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "docstrings.json"
        env = {"PYTHONHASHSEED": "0", "PYTHONUTF8": "1", "PATH": os.environ.get("PATH", "")}
        try:
            subprocess.run([sys.executable, "-B", "-s", "-S", "-c", _COLLECT, str(target),
                            json.dumps(SKIPPED_MODULES)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=env, cwd=tmp, timeout=300, check=True)
            return json.loads(target.read_text(encoding="ascii"))
        except (subprocess.SubprocessError, OSError, ValueError) as err:
            raise DataError(f"could not collect the standard library's docstrings with {sys.executable} "
                            f"({type(err).__name__}: {err})") from None


@functools.lru_cache(maxsize=1)
def load_corpus() -> Corpus:
    """The documentation corpus of this Python (cached for the process; a couple of seconds)."""
    try:
        import pydoc_data.topics
    except ImportError:
        raise DataError("this Python has no pydoc_data.topics (some distributions split it out, e.g. "
                        "Debian's libpython3-stdlib); install the full standard library") from None
    docs, seen = {}, set()
    for topic, text in sorted(pydoc_data.topics.topics.items()):
        if text not in seen:  # in 3.11 "else" is the text of "if"
            seen.add(text)
            docs[f"pydoc:{topic}"] = text
    for module, strings in sorted(_stdlib_docstrings().items()):
        fresh = []
        for s in strings:
            if s not in seen:
                seen.add(s)
                fresh.append(s)
        if fresh:
            docs[f"module:{module}"] = "\n\n".join(fresh)
    names = tuple(sorted(docs))
    texts = tuple(docs[n].replace("\x00", "") for n in names)
    digest = hashlib.sha256()
    for name, text in zip(names, texts, strict=True):
        digest.update(f"{len(name)}:{name}{len(text)}:".encode())
        digest.update(text.encode("utf-8"))
    return Corpus(names, texts, digest.hexdigest())


def is_heldout(name: str) -> bool:
    """Whether the document ``name`` is in the held-out split (SHA-256 of the name, modulo 10)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % HELDOUT_MODULUS == 0


def token_stream(texts: list[str] | tuple[str, ...]) -> np.ndarray:
    """The byte tokens of ``texts``, each followed by :data:`END_OF_DOCUMENT`, as one int32 array."""
    parts = []
    for text in texts:
        parts += [encode(text), np.array([END_OF_DOCUMENT], np.int32)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def windows(stream: np.ndarray, length: int) -> np.ndarray:
    """Non-overlapping windows ``[n, length + 1]`` of ``stream`` (window ``i`` starts at ``i * length``);
    the tail that does not fill one is dropped."""
    n = (len(stream) - 1) // length
    index = np.arange(n)[:, None] * length + np.arange(length + 1)[None, :]
    return stream[index]


def load_data(length: int = 128) -> LMData:
    """The corpus of this Python, byte-tokenized, split by document, in windows of ``length`` tokens."""
    corpus = load_corpus()
    held = [is_heldout(n) for n in corpus.names]
    train_docs = tuple(n for n, h in zip(corpus.names, held, strict=True) if not h)
    heldout_docs = tuple(n for n, h in zip(corpus.names, held, strict=True) if h)
    text = dict(zip(corpus.names, corpus.texts, strict=True))
    train = token_stream([text[n] for n in train_docs])
    heldout = token_stream([text[n] for n in heldout_docs])
    return LMData(corpus.sha256, length, train_docs, heldout_docs, train, heldout,
                  windows(train, length), windows(heldout, length))


def unigram_perplexity(train_tokens: np.ndarray, targets: np.ndarray, vocab_size: int = VOCAB_SIZE) -> float:
    """``exp`` of the mean negative log-likelihood of ``targets`` under ``train_tokens``' token frequencies
    with add-one smoothing."""
    counts = np.bincount(np.asarray(train_tokens).ravel(), minlength=vocab_size).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-np.mean(log_p[np.asarray(targets).ravel()])))


def batches(sequences: np.ndarray, batch_size: int, seed: int = 0, epochs: int | None = None
            ) -> Iterator[np.ndarray]:
    """Batches ``[batch_size, length + 1]`` of ``sequences``, reshuffled every epoch by a numpy generator
    seeded with ``seed`` (the same order every run); the last partial batch of an epoch is dropped.
    ``epochs=None`` repeats forever."""
    if len(sequences) < batch_size:
        raise ValueError(f"{len(sequences)} sequences cannot fill a batch of {batch_size}")
    rng = np.random.default_rng(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = rng.permutation(len(sequences))
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield sequences[order[i:i + batch_size]]
        epoch += 1


def describe(data: LMData) -> dict:
    """Sizes and hash of ``data``, for result files."""
    return {"corpus_sha256": data.corpus_sha256, "tokenizer": f"bytes (UTF-8), vocab {data.vocab_size}",
            "sequence_length": data.length,
            "train_documents": len(data.train_documents), "heldout_documents": len(data.heldout_documents),
            "train_tokens": len(data.train), "heldout_tokens": len(data.heldout),
            "train_sequences": len(data.train_sequences), "heldout_sequences": len(data.heldout_sequences)}
