"""Shared pieces of the low-bit studies (``experiments.quickstart``, ``experiments.bnn_fashion_mnist``).

- the models, written in plain Flax Linen (:class:`MLP`, :class:`CNN`); every quantized variant is the same
  model wrapped by :func:`qjax.linen.quantize_model` with the :class:`Method`'s rules;
- the methods table (:data:`METHODS`): fp32, int8, int4, ternary (BitNet b1.58) and binary weights and
  activations with STE, clipped STE, ReSTE and BiPer;
- one training loop (:class:`Trainer`) with a single jitted train step that receives each step's
  surrogate hyperparameters (ReSTE's ``o``, BiPer's stage and ``omega``) as arrays, so a schedule never
  recompiles (the row records the number of compilations);
- evaluation of the QAT model and of its frozen, packed form (:func:`qjax.linen.freeze`), whose real byte
  count is the ``model_bytes`` column;
- :func:`aggregate` (mean and std over seeds); writing the results is :mod:`experiments.bnn_report`.

Which layers are quantized (the same for MLP and CNN; module names ``first``, ``hidden_i``, ``head``):

- ``first`` (the layer that reads the pixels) and ``head`` (the classifier): 8-bit weights (int8, absmax
  per output channel) in every quantized method, as the binary-network papers keep them in higher precision;
  the pixels entering ``first`` are quantized to int8 with one absmax scale per example.
- ``hidden_i``: the method's weight format. Their inputs (and the head's input, which is the last hidden
  activation) are int8 per token (BitNet's activation quantizer) for int8 / int4 / ternary, and binary
  (``mean|x|`` per token times ``sign``) for the binary methods, whose sign *is* the nonlinearity
  (Dense/Conv -> BatchNorm -> sign, as in BNN and XNOR-Net); the other methods use ReLU.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import qjax
import qjax.linen
from qjax import PerChannel, PerTensor, PerToken, Quantizer
from qjax.presets import BITNET_ACTIVATIONS, BITNET_TERNARY, XNOR_WEIGHTS
from qjax.rules import Rule

# --- models ------------------------------------------------------------------------------------------

def _activation(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "relu":
        return nn.relu
    if name == "identity":
        return lambda x: x
    raise ValueError(f"unknown activation {name!r}; allowed: relu, identity")


class MLP(nn.Module):
    """``first`` Dense -> BN -> act, ``hidden_i`` Dense -> BN -> act, ``head`` Dense (the logits)."""

    features: Sequence[int] = (256, 256, 256)
    classes: int = 10
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = _activation(self.activation)
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.features):
            name = "first" if i == 0 else f"hidden_{i - 1}"
            x = nn.Dense(width, name=name)(x)
            x = act(nn.BatchNorm(use_running_average=not train, name=f"bn_{i}")(x))
        return nn.Dense(self.classes, name="head")(x)


def conv_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Flax's default ``lecun_normal`` for a conv kernel, drawn as a ``(kh * kw * cin, cout)`` matrix and
    reshaped: the same values (same fan-in, and JAX's partitionable threefry numbers elements in row-major
    order), but XLA on CPU compiles it in 0.3 s instead of 4-9 s for the rank-4 draw."""
    flat = nn.initializers.lecun_normal()(key, (math.prod(shape[:-1]), shape[-1]), dtype)
    return flat.reshape(shape)


class CNN(nn.Module):
    """Three 3x3 conv blocks (``first``, ``hidden_0``, ``hidden_1``): Conv -> BN -> act, the first two with
    stride 2 (28 -> 14 -> 7), then the ``head`` Dense on the flattened map. Strided convolutions instead
    of max-pooling: XLA's max-pool backward is the slowest op of such a network on CPU."""

    features: Sequence[int] = (16, 32, 32)
    strides: Sequence[int] = (2, 2, 1)
    classes: int = 10
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        act = _activation(self.activation)
        if x.ndim == 3:
            x = x[..., None]
        for i, (width, stride) in enumerate(zip(self.features, self.strides, strict=True)):
            name = "first" if i == 0 else f"hidden_{i - 1}"
            x = nn.Conv(width, (3, 3), strides=stride, padding="SAME", kernel_init=conv_kernel_init,
                        name=name)(x)
            x = act(nn.BatchNorm(use_running_average=not train, name=f"bn_{i}")(x))
        return nn.Dense(self.classes, name="head")(x.reshape(x.shape[0], -1))


def make_model(kind: str, activation: str = "relu", small: bool = False) -> nn.Module:
    """The study's ``"mlp"`` or ``"cnn"``; ``small`` shrinks the widths (quick runs)."""
    if kind == "mlp":
        return MLP((64, 64, 64) if small else (256, 256, 256), activation=activation)
    if kind == "cnn":
        return CNN((8, 16, 16) if small else (16, 32, 32), activation=activation)
    raise ValueError(f"unknown model {kind!r}; allowed: mlp, cnn")


# --- methods -----------------------------------------------------------------------------------------

EDGE_WEIGHT = Quantizer("int8", PerChannel(-1), "absmax")        # first and last layer weights
PIXELS = Quantizer("int8", PerChannel(0), "absmax", eps=1e-5)    # the first layer's input, per example
ACT8 = BITNET_ACTIVATIONS                                        # int8 per token (BitNet)


def _binary_act(surrogate: str) -> Quantizer:
    return Quantizer("binary", PerToken(-1), "mean_abs", surrogate)


def _no_schedule(step: int, total_steps: int) -> dict:
    return {}


def _reste_schedule(step: int, total_steps: int) -> dict:
    """ReSTE's ``o``, annealed 1 -> 3 over training (Wu et al. 2023), for weights and activations."""
    return {"o": np.float32(qjax.surrogates.reste_schedule(step, total_steps))}


def _biper_schedule(step: int, total_steps: int) -> dict:
    """BiPer's two stages (Vargas et al. 2024): weights ``alpha sin(20 w)`` for the first half, then
    ``alpha sign(sin(20 w))``; activations binary throughout."""
    return {"omega": np.float32(20.0), "biper_binarize": np.int32(step >= total_steps // 2)}


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the study: what the hidden layers' weights and inputs become, and the schedule.

    Attributes:
      name: label in the tables.
      bits: bits per hidden-layer weight (32, 8, 4, 1.58, 1).
      weight: quantizer of the hidden layers' weights (``None``: float model, no rules at all).
      act: quantizer of the hidden layers' inputs and of the head's input.
      activation: the model's nonlinearity (``"identity"`` when ``act``'s sign is the nonlinearity).
      schedule: ``(step, total_steps) -> hparams`` (numpy scalars) passed to ``apply(hparams=...)``.
    """

    name: str
    bits: float
    weight: Quantizer | None = None
    act: Quantizer | None = None
    activation: str = "relu"
    schedule: Callable[[int, int], dict] = _no_schedule

    def rules(self) -> list[Rule]:
        """The qjax rules: first and head 8-bit, hidden layers by this method (module docstring)."""
        if self.weight is None:
            return []
        return [
            Rule("first", weight=EDGE_WEIGHT, input=PIXELS, name="first: int8"),
            Rule("hidden_.*", weight=self.weight, input=self.act, name=f"hidden: {self.name}"),
            Rule("head", weight=EDGE_WEIGHT, input=self.act, name="head: int8"),
        ]


METHODS: tuple[Method, ...] = (
    Method("fp32", 32),
    Method("int8", 8, Quantizer("int8", PerChannel(-1), "absmax"), ACT8),
    Method("int4", 4, Quantizer("int4", PerChannel(-1), "absmax"), ACT8),
    Method("ternary (BitNet b1.58)", 1.58, BITNET_TERNARY, ACT8),
    Method("binary STE", 1, Quantizer("binary", PerChannel(-1), "mean_abs", "ste"), _binary_act("ste"),
           "identity"),
    Method("binary clipped STE", 1, XNOR_WEIGHTS, _binary_act("clipped_ste"), "identity"),
    Method("binary ReSTE", 1, Quantizer("binary", PerTensor(), "mean_abs", "reste"), _binary_act("reste"),
           "identity", _reste_schedule),
    Method("binary BiPer", 1, Quantizer("binary", PerChannel(-1), "learned", "biper"),
           _binary_act("approx_sign"), "identity", _biper_schedule),
)


def select_methods(names: Sequence[str] | None) -> tuple[Method, ...]:
    """The methods whose names are in ``names`` (all when ``None``); an unknown name raises."""
    if not names:
        return METHODS
    known = {m.name: m for m in METHODS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; allowed: {list(known)}")
    return tuple(known[n] for n in names)


# --- data --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Data:
    """float32 images scaled to [0, 1] (``(n, 8, 8)`` or ``(n, 28, 28)``) and int32 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def subset(self, n_train: int, n_test: int, seed: int = 0) -> Data:
        """A random subset (quick runs)."""
        rng = np.random.default_rng(seed)
        tr = rng.permutation(len(self.x_train))[:n_train]
        te = rng.permutation(len(self.x_test))[:n_test]
        return Data(self.name, self.x_train[tr], self.y_train[tr], self.x_test[te], self.y_test[te])


def _prepare(x: np.ndarray, side: int, top: float) -> np.ndarray:
    return (np.asarray(x, np.float32) / top).reshape(len(x), side, side)


def load_data(name: str) -> Data:
    """``"digits"`` (scikit-learn's embedded 8x8 digits) or ``"fashion_mnist"`` (:mod:`experiments.data`),
    scaled to [0, 1]."""
    from experiments import data

    loaders = {"digits": (data.load_digits, 8, 16.0), "fashion_mnist": (data.load_fashion_mnist, 28, 255.0)}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; allowed: {', '.join(loaders)}")
    loader, side, top = loaders[name]
    x_train, y_train, x_test, y_test = loader()
    return Data(name, _prepare(x_train, side, top), np.asarray(y_train, np.int32),
                _prepare(x_test, side, top), np.asarray(y_test, np.int32))


# --- training ----------------------------------------------------------------------------------------

def serving_backend() -> str:
    """The frozen model's packed-matmul backend: the Pallas kernel on GPU/TPU (``"auto"``), the pure-jnp
    reference on CPU (``"xla"``, which is what ``"auto"`` runs there, without its once-only fallback warning:
    there is nothing a user of these studies should change)."""
    return "xla" if jax.default_backend() == "cpu" else "auto"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer and loop sizes (Adam with a cosine-decayed learning rate, the same for every method)."""

    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 2e-3
    eval_batch_size: int = 2000


def _batches(n: int, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(n)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start:start + batch_size]


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _evaluate(predict: Callable, variables, x: np.ndarray, y: np.ndarray, batch_size: int):
    """(accuracy, logits) of ``predict(variables, x_batch)`` over the whole set."""
    logits = np.concatenate([np.asarray(predict(variables, jnp.asarray(x[i:i + batch_size])))
                             for i in range(0, len(x), batch_size)])
    return float(np.mean(logits.argmax(-1) == y)), logits


def tree_nbytes(tree) -> int:
    """Real bytes of every array in a pytree (a QArray counts its packed codes and scales)."""
    return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree)))


def fold_negative_scales(variables: dict, method: Method) -> dict:
    """Make every learned binary weight scale positive without changing the function.

    Training leaves a learned scale free (BiPer's alpha; BatchNorm after the layer makes the loss almost
    invariant to it, so Adam lets it wander and it can cross zero), but :func:`qjax.linen.freeze` accepts
    only positive scales. For a sign-type binary weight ``alpha * b(w)`` with ``b`` odd (``sign``,
    ``sign(sin(omega w))``), ``(alpha, w) -> (-alpha, -w)`` gives the same values, so each channel with a
    negative alpha is flipped.
    """
    if method.weight is None or method.weight.scale != "learned" or not method.weight.is_sign:
        return variables
    params = variables["params"]

    def visit(params, quant):
        out = dict(params)
        for key, value in quant.items():
            if isinstance(value, dict):
                out[key] = visit(params[key], value)
            elif key in params:
                flip = jnp.where(value < 0, -1.0, 1.0)
                out[key] = params[key] * flip.astype(params[key].dtype)
        return out

    quant = variables["quant"]
    return {**variables, "params": visit(params, quant), "quant": jax.tree_util.tree_map(jnp.abs, quant)}


class Trainer:
    """One (method, model, loop size): the quantized model and its jitted train and predict functions,
    compiled once and reused for every seed.

    The train step takes the schedule's hyperparameters (ReSTE's ``o``, BiPer's ``biper_binarize`` and
    ``omega``) as array arguments, so it compiles exactly once; :meth:`run` records the compile count.
    """

    def __init__(self, method: Method, model_kind: str, config: TrainConfig, steps_per_epoch: int,
                 small: bool = False):
        self.method, self.model_kind, self.config = method, model_kind, config
        self.qmodel = qjax.linen.quantize_model(make_model(model_kind, method.activation, small),
                                                method.rules(), backend=serving_backend())
        self.total_steps = max(steps_per_epoch * config.epochs, 1)
        self.optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, self.total_steps))
        self.final_hparams = method.schedule(self.total_steps, self.total_steps)
        self.train_step = jax.jit(self._train_step)
        self.predict = jax.jit(lambda v, x: self.qmodel.apply(v, x, hparams=self.final_hparams))
        self._freeze = jax.jit(lambda v, x: qjax.linen.freeze(self.qmodel, v, x, hparams=self.final_hparams))

    def _train_step(self, trainable, batch_stats, opt_state, x, y, hparams):
        def loss_fn(trainable):
            logits, updates = self.qmodel.apply({**trainable, "batch_stats": batch_stats}, x, train=True,
                                                hparams=hparams, mutable=["batch_stats"])
            return _cross_entropy(logits, y), updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
        updates, opt_state = self.optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), new_stats, opt_state, loss

    def fit(self, data: Data, seed: int = 0, on_epoch: Callable[[int, float], None] | None = None
            ) -> tuple[dict, dict]:
        """Train from ``seed``: ``(trained variables, info)``; info has train_time_s (the loop; the first
        call's includes compilation), steps, final_loss. ``on_epoch(epoch, mean_loss)`` after each epoch.

        Learned binary scales are made positive (:func:`fold_negative_scales`), so the result freezes.
        """
        x0 = jnp.asarray(data.x_train[:2])
        variables = self.qmodel.init(jax.random.key(seed), x0)
        trainable = {k: variables[k] for k in ("params", "quant") if k in variables}
        batch_stats = variables["batch_stats"]
        opt_state = self.optimizer.init(trainable)
        rng = np.random.default_rng(seed)
        step, loss = 0, float("nan")
        start = time.perf_counter()
        for epoch in range(self.config.epochs):
            losses = []
            for idx in _batches(len(data.x_train), self.config.batch_size, rng):
                hparams = self.method.schedule(step, self.total_steps)
                trainable, batch_stats, opt_state, loss = self.train_step(
                    trainable, batch_stats, opt_state, data.x_train[idx], data.y_train[idx], hparams)
                losses.append(loss)
                step += 1
            loss = float(np.mean(jax.device_get(losses)))
            if on_epoch is not None:
                on_epoch(epoch, loss)
        jax.block_until_ready(trainable)
        info = {"train_time_s": round(time.perf_counter() - start, 3), "steps": step, "final_loss": loss}
        return fold_negative_scales({**trainable, "batch_stats": batch_stats}, self.method), info

    def freeze(self, trained: dict, data: Data) -> dict:
        """The serving variables: :func:`qjax.linen.freeze` with the schedule's final hyperparameters
        (jitted: one compilation instead of many small eager ones)."""
        return self._freeze(trained, jnp.asarray(data.x_train[:2]))

    def evaluate(self, trained: dict, data: Data) -> dict:
        """Test accuracy of the QAT model and of its frozen form, and the frozen model's real bytes."""
        accuracy, logits = _evaluate(self.predict, trained, data.x_test, data.y_test,
                                     self.config.eval_batch_size)
        frozen = self.freeze(trained, data)
        frozen_accuracy, frozen_logits = _evaluate(self.predict, frozen, data.x_test, data.y_test,
                                                   self.config.eval_batch_size)
        return {
            "accuracy": accuracy,
            "frozen_accuracy": frozen_accuracy,
            "frozen_max_logit_diff": float(np.max(np.abs(logits - frozen_logits))),
            "model_bytes": tree_nbytes(frozen),
            "float_bytes": tree_nbytes(trained["params"]) + tree_nbytes(trained["batch_stats"]),
        }

    def run(self, data: Data, seed: int = 0, on_epoch: Callable[[int, float], None] | None = None) -> dict:
        """:meth:`fit` then :meth:`evaluate`: the result row.

        Row: method, bits, model, dataset, seed, accuracy (QAT model), frozen_accuracy (the frozen, packed
        model), frozen_max_logit_diff, model_bytes (real bytes of the frozen variables: packed codes,
        scales, biases, BatchNorm statistics), float_bytes, train_time_s, compiles (train-step compilations
        so far: 1 means no recompilation), final_loss, sizes.
        """
        trained, info = self.fit(data, seed, on_epoch)
        return {
            "method": self.method.name,
            "bits": self.method.bits,
            "model": self.model_kind,
            "dataset": data.name,
            "seed": seed,
            **self.evaluate(trained, data),
            "train_time_s": info["train_time_s"],
            "compiles": int(self.train_step._cache_size()),
            "final_loss": info["final_loss"],
            "epochs": self.config.epochs,
            "steps": info["steps"],
            "train_examples": len(data.x_train),
            "test_examples": len(data.x_test),
        }


def run_study(methods: Sequence[Method], models: Sequence[str], seeds: Sequence[int], data: Data,
              config: TrainConfig | dict, small: bool = False, progress: bool = True) -> list[dict]:
    """Every (model, method, seed) run under one tqdm progress bar (one tick per epoch); the run rows.
    A warning raised meanwhile is printed on its own line above the bar (one line: category and message).

    ``config`` is one :class:`TrainConfig` or a dict model kind -> TrainConfig.
    """
    try:  # a notebook widget where ipywidgets exists (Colab), else the terminal bar
        import ipywidgets  # noqa: F401
        from tqdm.auto import tqdm
    except ImportError:
        from tqdm import tqdm

    configs = config if isinstance(config, dict) else {m: config for m in models}
    total = sum(configs[m].epochs for m in models) * len(methods) * len(seeds)
    rows = []
    with tqdm(total=total, unit="epoch", disable=not progress, dynamic_ncols=True) as bar, \
            warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *_: bar.write(f"{category.__name__}: {message}",
                                                                     file=sys.stderr)
        for model_kind in models:
            for method in methods:
                config = configs[model_kind]
                trainer = Trainer(method, model_kind, config, len(data.x_train) // config.batch_size, small)
                for seed in seeds:
                    bar.set_description(f"{model_kind} {method.name} seed {seed}")
                    on_epoch = lambda epoch, loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}"))
                    rows.append(trainer.run(data, seed, on_epoch))
                    bar.set_postfix(acc=f"{rows[-1]['accuracy']:.3f}")
    return rows


def aggregate(rows: Sequence[dict]) -> list[dict]:
    """Seeds averaged per (model, method): accuracy / frozen_accuracy / train_time_s as the mean, with
    ``accuracy_std`` (population std over seeds) and the per-seed ``accuracies``."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["method"]), []).append(row)
    out = []
    for runs in groups.values():
        acc = np.array([r["accuracy"] for r in runs])
        first = runs[0]
        out.append({
            **{k: first[k] for k in ("method", "bits", "model", "dataset", "model_bytes", "float_bytes",
                                     "epochs", "train_examples", "test_examples")},
            "accuracy": float(acc.mean()),
            "accuracy_std": float(acc.std()),
            "frozen_accuracy": float(np.mean([r["frozen_accuracy"] for r in runs])),
            "accuracies": [float(a) for a in acc],
            "frozen_accuracies": [float(r["frozen_accuracy"]) for r in runs],
            "frozen_max_logit_diff": float(max(r["frozen_max_logit_diff"] for r in runs)),
            "train_time_s": float(np.mean([r["train_time_s"] for r in runs])),
            "compiles": int(max(r["compiles"] for r in runs)),
            "seeds": [r["seed"] for r in runs],
        })
    return out
