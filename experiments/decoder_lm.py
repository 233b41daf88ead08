"""A small causal decoder LM (Tunix's NNX Llama3, tiny) trained once on Python's own documentation, cached.

    python -m experiments.decoder_lm            # train (~14 minutes on 2 busy CPU cores) or load; evaluate
    python -m experiments.decoder_lm --quick    # seconds: a 2-layer model for tests

The model is ``tunix.models.llama3.model.Llama3`` (PyPI ``google-tunix``, installed with ``--no-deps``), as
shipped, with a tiny :class:`LMConfig`: RMSNorm, RoPE, grouped-query attention, a SwiGLU MLP and an untied
head, over the byte vocabulary of :mod:`experiments.llm_text`. Only the initial weights are ours: Tunix
starts its MLP kernels at zero, from which no gradient can move them (gate, up and down all get zero
gradients), so every weight is drawn from a seeded numpy normal (std 1/sqrt(fan in); the attention output
and MLP down projections also / sqrt(2 * layers), as GPT-2 does; the byte embedding std 1), the RMSNorm
scales are ones.

Training: AdamW (weight decay on the matrices only), linear warmup then cosine decay to a tenth of the peak,
gradient clipping at norm 1, batches of windows reshuffled every epoch with a fixed seed. The trained weights
are written once to ``$QJAX_CACHE`` (else ``runs/cache/``, which git ignores) as ``.npz``, under a key of the
config, the corpus hash and :data:`CACHE_VERSION`: a second run loads them. :func:`load_or_train` is what
other experiments call.

Reported (``decoder_lm.{json,md,png}`` in ``runs/``, ``--out DIR``): the fp32 held-out perplexity per byte,
the unigram perplexity of the same bytes (the training split's byte frequencies), parameter count, training
time and seconds per step, tokens seen, and whether the weights came from the cache; the PNG plots the
training loss against the held-out and unigram losses.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import llm_text
from experiments.cli import REPO_ROOT, add_run_options, results_dir, run
from experiments.data import DataError

CACHE_VERSION = 1  # bump when the initialization, the loss or the training loop changes
#: The names of the model's weights, for ``qjax.Rule(..., weight_names=WEIGHT_NAMES)``: Tunix's ``Einsum``
#: (attention q/k/v/o projections, ``lm_head``) holds its weight as ``w``, ``nnx.Linear`` (the MLP) as
#: ``kernel``; a rule with the default ``("kernel",)`` quantizes the MLP only.
WEIGHT_NAMES = ("kernel", "w")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Model (Tunix ``ModelConfig`` fields), sequence length, and training settings."""

    num_layers: int
    embed_dim: int
    hidden_dim: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    seq_len: int
    batch_size: int
    steps: int
    peak_lr: float
    warmup_steps: int
    weight_decay: float = 0.1
    seed: int = 0
    eval_sequences: int | None = None  # held-out windows main evaluates, evenly spaced (None: all)


CONFIGS = {
    # 0.85M parameters. Measured on 2 CPU cores shared with other jobs (load average 7-8): 1.31-1.44 s per
    # step of 16 x 128 bytes and ~22 s of compilation, so 550 steps (1.1M bytes, 0.65 epoch) take ~13.5
    # minutes, and the held-out evaluation (185K bytes) ~40 s more.
    "tiny": LMConfig(num_layers=4, embed_dim=128, hidden_dim=384, num_heads=4, head_dim=32, num_kv_heads=2,
                     seq_len=128, batch_size=16, steps=550, peak_lr=3e-3, warmup_steps=40),
    # 0.13M parameters, for tests: seconds (most of it compilation).
    "quick": LMConfig(num_layers=2, embed_dim=64, hidden_dim=192, num_heads=4, head_dim=16, num_kv_heads=2,
                      seq_len=64, batch_size=16, steps=100, peak_lr=1e-2, warmup_steps=10, eval_sequences=64),
}


@dataclasses.dataclass
class TrainedLM:
    """A trained (or loaded) model, its data, and what training reported (``info["from_cache"]``)."""

    model: nnx.Module
    data: llm_text.LMData
    info: dict[str, Any]


def llama3_config(config: LMConfig) -> Any:
    """Tunix's ``llama3.ModelConfig`` for ``config`` (byte vocabulary, untied head, float32)."""
    llama3 = _import_llama3()
    return llama3.ModelConfig(num_layers=config.num_layers, vocab_size=llm_text.VOCAB_SIZE,
                              embed_dim=config.embed_dim, hidden_dim=config.hidden_dim,
                              num_heads=config.num_heads, head_dim=config.head_dim,
                              num_kv_heads=config.num_kv_heads, rope_theta=10_000, norm_eps=1e-5,
                              weight_tying=False)


def _import_llama3() -> Any:
    try:
        from tunix.models.llama3 import model as llama3
    except ImportError as err:
        raise DataError(f"Tunix's Llama3 does not import (no module {err.name}): pip install --no-deps "
                        "google-tunix==0.1.7 and what .[test] lists for its model modules") from None
    return llama3


def _path(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _fan_in(module: nnx.Module | None, shape: tuple[int, ...]) -> int:
    """The dims a Tunix ``Einsum`` contracts (from its einsum string), else ``shape[0]`` (``nnx.Linear``)."""
    spec = getattr(module, "einsum_str", None)
    if not isinstance(spec, str):
        return shape[0]
    inputs, out = spec.replace(" ", "").split("->")
    x_spec, w_spec = inputs.split(",")
    dims = dict(zip(w_spec, shape, strict=True))
    return math.prod(dims[c] for c in set(x_spec) & set(w_spec) - set(out))


def abstract_model(config: LMConfig) -> nnx.Module:
    """Tunix's ``Llama3`` for ``config`` with abstract (shape-only) variables: nothing is computed."""
    llama3 = _import_llama3()
    return nnx.eval_shape(lambda: llama3.Llama3(llama3_config(config), rngs=nnx.Rngs(config.seed)))


def init_model(config: LMConfig) -> nnx.Module:
    """The untrained model: Tunix's ``Llama3`` with the weights of the module docstring (numpy, seeded)."""
    model = abstract_model(config)
    modules = {_path(p): m for p, m in nnx.iter_modules(model)}
    rng = np.random.default_rng(config.seed)
    residual = 1.0 / math.sqrt(2 * config.num_layers)
    for p, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Variable):
            continue
        path, owner = _path(p), modules.get(_path(p[:-1]))
        shape, dtype = variable.get_value().shape, variable.get_value().dtype
        if len(shape) < 2:  # RMSNorm scales
            value = np.ones(shape)
        elif path.endswith("input_embedding"):
            value = rng.standard_normal(shape)
        else:
            std = 1.0 / math.sqrt(_fan_in(owner, shape))
            if path.endswith(("o_proj/w", "down_proj/kernel")):
                std *= residual
            value = rng.standard_normal(shape) * std
        variable.set_value(jnp.asarray(value, dtype))
    return model


def parameter_count(model: nnx.Module) -> int:
    """Number of parameters (elements of every ``nnx.Param``)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def model_inputs(tokens: jax.Array | np.ndarray) -> dict[str, Any]:
    """The keyword arguments of a Tunix Llama3 call on ``tokens[B, L]``: positions ``0..L-1``, no cache, a
    causal ``[B, L, L]`` mask. ``model(**model_inputs(tokens))`` returns ``(logits[B, L, V], None)``; also
    the example inputs for ``qjax.nnx.quantize_model(model, rules, **model_inputs(tokens))``."""
    batch, length = tokens.shape
    return {"input_tokens": tokens,
            "positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length)),
            "cache": None,
            "attention_mask": jnp.broadcast_to(jnp.tril(jnp.ones((length, length), jnp.bool_)),
                                               (batch, length, length))}


def token_nll(model: nnx.Module, sequences: jax.Array) -> jax.Array:
    """Negative log-likelihood ``[B, L]`` of ``sequences[:, 1:]`` given the tokens before each."""
    logits, _ = model(**model_inputs(sequences[:, :-1]))
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), sequences[:, 1:])


@functools.partial(jax.jit, static_argnums=0)
def _nll_sum(graphdef, state, sequences: jax.Array, weight: jax.Array) -> jax.Array:
    nll = token_nll(nnx.merge(graphdef, state), sequences)
    return jnp.sum(nll * weight[:, None])


def perplexity(model: nnx.Module, sequences: np.ndarray, batch_size: int = 64) -> float:
    """``exp`` of the mean token NLL of ``model`` on ``sequences[n, L + 1]`` (every target position),
    in jitted batches of ``batch_size`` (the last one padded and masked: one compilation per model
    structure and shape). Works on a model quantized in place by ``qjax.nnx.quantize_model``."""
    sequences = np.asarray(sequences, np.int32)
    if len(sequences) == 0:
        raise ValueError("no sequences to evaluate")
    graphdef, state = nnx.split(model)
    batch_size = min(batch_size, len(sequences))
    total = 0.0
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        weight = np.zeros(batch_size, np.float32)
        weight[:len(chunk)] = 1.0
        if len(chunk) < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - len(chunk), 0)])
        total += float(_nll_sum(graphdef, state, jnp.asarray(chunk), jnp.asarray(weight)))
    return math.exp(total / (len(sequences) * (sequences.shape[1] - 1)))


def optimizer(config: LMConfig) -> optax.GradientTransformation:
    """Gradient clipping at norm 1, then AdamW with linear warmup and cosine decay to 10% of the peak;
    weight decay on the matrices only (not the RMSNorm scales)."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, config.peak_lr, config.warmup_steps, config.steps,
                                                  end_value=config.peak_lr / 10)
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=config.weight_decay,
                                   mask=decay_mask))


def train(model: nnx.Module, data: llm_text.LMData, config: LMConfig,
          progress: bool = False) -> dict[str, Any]:
    """Train ``model`` in place for ``config.steps`` steps on ``data.train_sequences``; what it measured:
    ``losses`` (every step), ``train_time_s`` (compilation included), ``step_time_s`` (mean after the first
    step), ``tokens_seen`` (target tokens)."""
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optimizer(config)

    def loss_fn(params, sequences):
        return jnp.mean(token_nll(nnx.merge(graphdef, params), sequences))

    @jax.jit
    def step(params, opt_state, sequences):
        loss, grads = jax.value_and_grad(loss_fn)(params, sequences)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    from tqdm.auto import tqdm

    opt_state = tx.init(params)
    stream = llm_text.batches(data.train_sequences, config.batch_size, seed=config.seed)
    losses, start, after_first = [], time.perf_counter(), None
    with tqdm(total=config.steps, unit="step", disable=not progress, dynamic_ncols=True, leave=False) as bar:
        for i in range(config.steps):
            params, opt_state, loss = step(params, opt_state, jnp.asarray(next(stream)))
            losses.append(float(loss))
            if i == 0:
                after_first = time.perf_counter()
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    end = time.perf_counter()
    nnx.update(model, params)
    return {"losses": losses, "train_time_s": end - start,
            "step_time_s": (end - after_first) / max(config.steps - 1, 1),
            "tokens_seen": config.steps * config.batch_size * config.seq_len}


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """Where trained weights are kept: ``path``, else ``$QJAX_CACHE``, else ``runs/cache/`` (git-ignored)."""
    return Path(path or os.environ.get("QJAX_CACHE") or REPO_ROOT / "runs" / "cache")


def cache_key(config: LMConfig, corpus_sha256: str) -> str:
    """16 hex digits of the SHA-256 of the config (but its ``eval_sequences``), the corpus hash, the
    tokenizer and :data:`CACHE_VERSION`."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "eval_sequences"}  # not training
    blob = json.dumps({"config": fields, "corpus": corpus_sha256, "tokenizer": "bytes",
                       "version": CACHE_VERSION, "model": "tunix.models.llama3"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_path(config_name: str, config: LMConfig, corpus_sha256: str,
               directory: str | os.PathLike | None = None) -> Path:
    """The ``.npz`` file of ``config``'s trained weights for this corpus."""
    return cache_dir(directory) / "decoder_lm" / f"{config_name}-{cache_key(config, corpus_sha256)}.npz"


def save_weights(model: nnx.Module, path: Path, info: dict[str, Any]) -> None:
    """Every ``nnx.Param`` of ``model`` by its '/'-joined path, and ``info`` as JSON, into ``path``
    (written to a temporary name, then renamed: a reader never sees half a file)."""
    arrays = {_path(p): np.asarray(v.get_value()) for p, v in nnx.iter_graph(model)
              if isinstance(v, nnx.Param)}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(partial, "wb") as f:
        np.savez(f, __info__=np.array(json.dumps(info)), **arrays)
    partial.replace(path)


def load_weights(config: LMConfig, path: Path) -> tuple[nnx.Module, dict[str, Any]]:
    """The model saved at ``path`` by :func:`save_weights` (every Param must be there, of its shape), and
    its saved ``info``."""
    model = abstract_model(config)
    with np.load(path) as saved:
        info = json.loads(str(saved["__info__"]))
        for p, variable in nnx.iter_graph(model):
            if isinstance(variable, nnx.Param):
                value = saved[_path(p)]
                if value.shape != variable.get_value().shape:
                    raise ValueError(f"{path}: {_path(p)} has shape {value.shape}, the model "
                                     f"{variable.get_value().shape}")
                variable.set_value(jnp.asarray(value, variable.get_value().dtype))
    return model, info


def train_or_load(config_name: str = "tiny", quick: bool = False, *,
                  directory: str | os.PathLike | None = None, progress: bool = False) -> TrainedLM:
    """The trained model of ``CONFIGS[config_name]`` (``quick=True``: the ``"quick"`` config), from the
    cache when it is there, else trained and saved. ``info["from_cache"]`` says which; ``info`` also holds
    what training measured (:func:`train`) and ``load_time_s``."""
    name = "quick" if quick else config_name
    if name not in CONFIGS:
        raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
    config = CONFIGS[name]
    start = time.perf_counter()
    data = llm_text.load_data(config.seq_len)
    path = cache_path(name, config, data.corpus_sha256, directory)
    if path.is_file():
        model, info = load_weights(config, path)
        info.update(from_cache=True, cache_file=str(path))
        print(f"decoder_lm: {name} loaded from {path}", file=sys.stderr)
    else:
        print(f"decoder_lm: training {name} ({config.steps} steps), then caching it in {path}",
              file=sys.stderr)
        model = init_model(config)
        info = {"config": name, **dataclasses.asdict(config), "corpus_sha256": data.corpus_sha256,
                **train(model, data, config, progress)}
        save_weights(model, path, info)
        info.update(from_cache=False, cache_file=str(path))
    info["load_time_s"] = time.perf_counter() - start
    return TrainedLM(model, data, info)


def load_or_train(config_name: str = "tiny", quick: bool = False) -> tuple[nnx.Module, llm_text.LMData]:
    """``(model, data)``: the trained Llama3 of ``config_name`` (or the quick config) and its data, from the
    cache (``$QJAX_CACHE`` or ``runs/cache/``) or trained once; see :func:`train_or_load` for what else it
    reports."""
    lm = train_or_load(config_name, quick)
    return lm.model, lm.data


def eval_sequences(data: llm_text.LMData, config: LMConfig) -> np.ndarray:
    """The held-out windows :func:`main` evaluates: all of them, or ``config.eval_sequences`` evenly spaced
    over the split (every held-out document has a chance, the same windows every run)."""
    held = data.heldout_sequences
    if config.eval_sequences is None or config.eval_sequences >= len(held):
        return held
    return held[np.linspace(0, len(held) - 1, config.eval_sequences).round().astype(int)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--help``)."""
    p = argparse.ArgumentParser(prog="python -m experiments.decoder_lm", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    p.add_argument("--cache", default=None, metavar="DIR", help="weights cache (default: $QJAX_CACHE or "
                                                                "runs/cache/)")
    add_run_options(p, "a 2-layer model trained in seconds (the quick config)")
    return p.parse_args(argv)


def markdown_table(row: dict[str, Any]) -> str:
    """The result row as a Markdown table."""
    head = ("| config | params | held-out ppl (per byte) | bits per byte | unigram ppl | steps | "
            "tokens seen | train s | s per step | from cache |")
    line = (f"| {row['config']} | {row['parameters']:,} | {row['perplexity']:.3f} | "
            f"{row['bits_per_byte']:.3f} | {row['unigram_perplexity']:.3f} | {row['steps']} | "
            f"{row['tokens_seen']:,} | {row['train_time_s']:.1f} | {row['step_time_s']:.3f} | "
            f"{'yes' if row['from_cache'] else 'no'} |")
    return "\n".join([head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|", line])


def plot(losses: list[float], heldout_ppl: float, unigram_ppl: float, path: Path) -> None:
    """The training loss per step against the held-out and unigram losses (nats per byte), into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1, label="training batch loss")
    ax.axhline(math.log(heldout_ppl), color="C1", ls="--", label=f"held-out, ppl {heldout_ppl:.2f}")
    ax.axhline(math.log(unigram_ppl), color="C2", ls=":", label=f"unigram, ppl {unigram_ppl:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("nats per byte")
    ax.set_title("Tunix Llama3 on Python's documentation (bytes)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train or load the model, evaluate it in fp32 on the held-out split, print and write the results."""
    args = parse_args(argv)
    name = "quick" if args.quick else args.config
    config = CONFIGS[name]
    lm = train_or_load(name, directory=args.cache, progress=not args.no_progress)
    held = eval_sequences(lm.data, config)
    start = time.perf_counter()
    ppl = perplexity(lm.model, held)
    eval_time = time.perf_counter() - start
    unigram = llm_text.unigram_perplexity(lm.data.train, held[:, 1:])
    info = lm.info
    row = {"config": name, "model": "tunix.models.llama3.Llama3", "parameters": parameter_count(lm.model),
           "perplexity": ppl, "bits_per_byte": math.log2(ppl), "unigram_perplexity": unigram,
           "eval_sequences": len(held), "eval_tokens": int(held[:, 1:].size), "eval_time_s": eval_time,
           "steps": config.steps, "tokens_seen": info["tokens_seen"], "train_time_s": info["train_time_s"],
           "step_time_s": info["step_time_s"], "first_loss": info["losses"][0],
           "final_loss": info["losses"][-1],
           "from_cache": info["from_cache"], "cache_file": info["cache_file"],
           "config_fields": dataclasses.asdict(config), **llm_text.describe(lm.data),
           "python": platform.python_version(), "cpus": os.cpu_count()}
    table = markdown_table(row)
    print(table)
    out = results_dir(args.results_dir)
    stem = "decoder_lm"
    (out / f"{stem}.json").write_text(json.dumps(row, indent=1))
    notes = (f"Tunix Llama3 ({config.num_layers} layers, embed {config.embed_dim}, MLP {config.hidden_dim}, "
             f"{config.num_heads} query / {config.num_kv_heads} KV heads of {config.head_dim}), byte "
             "vocabulary; "
             f"{len(held)} held-out windows of {config.seq_len} bytes ({row['heldout_documents']} documents "
             f"never trained on); corpus sha256 {row['corpus_sha256'][:16]}... (Python {row['python']}). "
             f"Unigram: the training split's byte frequencies. Training time includes compilation, on "
             f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}).")
    (out / f"{stem}.md").write_text(f"# Decoder LM (fp32)\n\n{table}\n\n{notes}\n")
    plot(info["losses"], ppl, unigram, out / f"{stem}.png")
    print(f"wrote {out}/{stem}.{{json,md,png}}")
    return row


if __name__ == "__main__":
    run(main)
