"""Do 8-bit optimizer states match 32-bit ones with unchanged hyperparameters? (Dettmers et al., ICLR 2022)

``python -m experiments.optim8bit [--quick] [--seeds 3] [--out results/]``

Three tasks, each trained with Adam, AdamW and Lion in 32-bit (optax) and 8-bit (qjax.optim: block-wise
dynamic-map states, blocks of 256, leaves of at least 4096 elements) with the same hyperparameters, over
several seeds (a seed sets the initialization and the batch order):

- ``fmnist_mlp``: Fashion-MNIST, MLP 784-512-256-10 (ReLU), batch 128, 1500 steps;
- ``fmnist_cnn``: Fashion-MNIST, CNN conv3x3(16)-pool-conv3x3(32)-pool-dense(128)-dense(10), batch 32,
  300 steps;
- ``char_lm``: a character-level Transformer LM (stable embedding, 2 pre-LN blocks, width 128, 4 heads,
  context 64, batch 16, 800 steps) on the English text of Python's ``pydoc_data.topics`` (90% train, 10%
  validation, evaluated on 512 windows).

Sizes are chosen so that the full run (18 trainings x 3 seeds) takes about 10-15 minutes on 2 CPU cores.

Writes ``optim8bit.json`` (every seed's numbers and the summary), ``.md`` (the table and the parity
verdicts) and ``.png`` (training curves, mean over seeds) to ``runs/`` (``--out DIR``). Parity for a task
and optimizer: the 8-bit mean of the final metric lies within two seed standard deviations (at least 0.5
accuracy points, or 1% of the loss) of the 32-bit mean. ``--quick`` runs a few steps on a subset, for CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import qjax.optim as qo
from experiments import data as datasets
from experiments.cli import add_run_options, results_dir, run

OPTIMIZERS = {  # name: (32-bit factory, 8-bit factory, hyperparameters shared by both)
    "adam": (optax.adam, qo.adam8bit, {"learning_rate": 1e-3}),
    "adamw": (optax.adamw, qo.adamw8bit, {"learning_rate": 1e-3, "weight_decay": 1e-2}),
    "lion": (optax.lion, qo.lion8bit, {"learning_rate": 1e-4, "weight_decay": 1e-2}),
}


STEPS = {"fmnist_mlp": 1500, "fmnist_cnn": 300, "char_lm": 800}


class MLP(nn.Module):
    widths: tuple[int, ...] = (512, 256)

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for width in self.widths:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(10)(x)


class CNN(nn.Module):
    channels: tuple[int, ...] = (16, 32)
    hidden: int = 128

    @nn.compact
    def __call__(self, x):
        x = x[..., None]
        for features in self.channels:
            x = nn.relu(nn.Conv(features, (3, 3))(x))
            x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
        return nn.Dense(10)(x)


class Block(nn.Module):
    width: int
    heads: int

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        x = x + nn.MultiHeadDotProductAttention(self.heads)(nn.LayerNorm()(x), mask=mask)
        h = nn.gelu(nn.Dense(4 * self.width)(nn.LayerNorm()(x)))
        return x + nn.Dense(self.width)(h)


class CharLM(nn.Module):
    vocab: int
    width: int = 128
    depth: int = 2
    heads: int = 4
    context: int = 64

    @nn.compact
    def __call__(self, ids):
        x = qo.StableEmbedding(self.vocab, self.width)(ids)
        x = (
            x
            + self.param("position", nn.initializers.normal(0.02), (self.context, self.width))[: ids.shape[1]]
        )
        for _ in range(self.depth):
            x = Block(self.width, self.heads)(x)
        return nn.Dense(self.vocab)(nn.LayerNorm()(x))


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (holds arrays)
class Task:
    name: str
    model: nn.Module
    arrays: dict  # the data, passed to the jitted functions as arguments (never baked in as constants)
    sample: Callable  # (arrays, key) -> (inputs, targets) of one batch
    evaluate: Callable  # (arrays, params) -> (loss, accuracy) on held-out data
    steps: int
    example: jax.Array


def _cross_entropy(logits, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def _classifier_task(name, model, x_train, y_train, x_test, y_test, batch, steps) -> Task:
    arrays = {
        "x_train": jnp.asarray(x_train, jnp.float32) / 255.0,
        "y_train": jnp.asarray(y_train, jnp.int32),
        "x_test": jnp.asarray(x_test, jnp.float32) / 255.0,
        "y_test": jnp.asarray(y_test, jnp.int32),
    }

    def sample(arrays, key):
        idx = jax.random.randint(key, (batch,), 0, arrays["x_train"].shape[0])
        return arrays["x_train"][idx], arrays["y_train"][idx]

    def evaluate(arrays, params):
        x_test, y_test = arrays["x_test"], arrays["y_test"]
        logits = jax.lax.map(lambda x: model.apply(params, x), x_test.reshape(-1, 250, *x_test.shape[1:]))
        logits = logits.reshape(-1, 10)
        return _cross_entropy(logits, y_test), jnp.mean(jnp.argmax(logits, -1) == y_test)

    return Task(name, model, arrays, sample, evaluate, steps, arrays["x_train"][:2])


def pydoc_text() -> str:
    """The English text of Python's own ``pydoc_data.topics`` (the help topics), topics in sorted order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


def _char_lm_task(batch, steps, model_kwargs, eval_windows) -> Task:
    text = pydoc_text()
    chars = sorted(set(text))
    ids = np.searchsorted(np.asarray(chars), np.asarray(list(text))).astype(np.int32)
    split = int(0.9 * len(ids))
    val = ids[split:]
    model = CharLM(len(chars), **model_kwargs)
    context = model.context
    starts = np.linspace(0, len(val) - context - 2, eval_windows).astype(int)
    arrays = {
        "train": jnp.asarray(ids[:split]),
        "val_windows": jnp.asarray(np.stack([val[i : i + context + 1] for i in starts])),
    }

    def sample(arrays, key):
        train = arrays["train"]
        start = jax.random.randint(key, (batch,), 0, train.shape[0] - context - 1)
        windows = jax.vmap(lambda s: jax.lax.dynamic_slice(train, (s,), (context + 1,)))(start)
        return windows[:, :-1], windows[:, 1:]

    def evaluate(arrays, params):
        val_windows = arrays["val_windows"]
        logits = jax.lax.map(
            lambda w: model.apply(params, w[:, :-1]), val_windows.reshape(-1, 32, context + 1)
        )
        targets = val_windows[:, 1:].reshape(-1)
        logits = logits.reshape(targets.shape[0], -1)
        return _cross_entropy(logits, targets), jnp.mean(jnp.argmax(logits, -1) == targets)

    return Task("char_lm", model, arrays, sample, evaluate, steps, arrays["train"][None, :context])


def make_tasks(quick: bool) -> list[Task]:
    x_train, y_train, x_test, y_test = datasets.load_fashion_mnist()
    if quick:  # small models (every big leaf still >= 4096 elements, so 8-bit), few steps
        x_train, y_train, x_test, y_test = x_train[:2000], y_train[:2000], x_test[:500], y_test[:500]
        return [
            _classifier_task("fmnist_mlp", MLP((64,)), x_train, y_train, x_test, y_test, 64, 20),
            _classifier_task("fmnist_cnn", CNN((8, 16), 32), x_train, y_train, x_test, y_test, 32, 10),
            _char_lm_task(8, 10, {"width": 32, "depth": 1, "heads": 2, "context": 32}, 64),
        ]
    return [
        _classifier_task("fmnist_mlp", MLP(), x_train, y_train, x_test, y_test, 128, STEPS["fmnist_mlp"]),
        _classifier_task("fmnist_cnn", CNN(), x_train, y_train, x_test, y_test, 32, STEPS["fmnist_cnn"]),
        _char_lm_task(16, STEPS["char_lm"], {}, 512),
    ]


def train(task: Task, opt: optax.GradientTransformation, seeds: int):
    """Train one model per seed (one compilation, reused); returns (per-step losses [steps, seeds], eval
    loss [seeds], eval accuracy [seeds], seed 0's optimizer state, parameter count)."""

    def loss_fn(params, batch):
        inputs, targets = batch
        return _cross_entropy(task.model.apply(params, inputs), targets)

    def step(arrays, carry, key):
        params, state = carry
        loss, grads = jax.value_and_grad(loss_fn)(params, task.sample(arrays, key))
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    def run(arrays, params, key):
        (params, state), losses = jax.lax.scan(
            functools.partial(step, arrays), (params, opt.init(params)), jax.random.split(key, task.steps)
        )
        return losses, params, state

    run, (init, evaluate) = jax.jit(run), _jitted_init_evaluate(task)
    losses, eval_loss, eval_acc = [], [], []
    for seed in range(seeds):
        init_key, data_key = jax.random.split(jax.random.key(seed))
        seed_losses, params, state = run(task.arrays, init(init_key, task.example), data_key)
        loss, accuracy = evaluate(task.arrays, params)
        losses.append(np.asarray(seed_losses))
        eval_loss.append(float(loss))
        eval_acc.append(float(accuracy))
        if seed == 0:
            first_state, n_params = state, sum(x.size for x in jax.tree_util.tree_leaves(params))
    return np.stack(losses, axis=1), np.asarray(eval_loss), np.asarray(eval_acc), first_state, int(n_params)


@functools.cache
def _jitted_init_evaluate(task: Task):
    """The model's init and the evaluation, compiled once per task and shared by all optimizers."""
    return jax.jit(task.model.init), jax.jit(task.evaluate)


def _tail_mean(losses: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    tail = max(1, int(len(losses) * fraction))
    return losses[-tail:].mean(0)


def parity(row32: dict, row8: dict) -> dict:
    """8-bit within two seed standard deviations of 32-bit (floors: 0.5 accuracy points, 1% of the loss)."""
    out = {}
    for metric, floor in (("eval_accuracy", 0.005), ("eval_loss", 0.01 * abs(np.mean(row32["eval_loss"])))):
        a, b = np.asarray(row32[metric]), np.asarray(row8[metric])
        tolerance = max(2 * np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2) if len(a) > 1 else 0.0, floor)
        out[metric] = {
            "difference": float(b.mean() - a.mean()),
            "tolerance": float(tolerance),
            "parity": bool(abs(b.mean() - a.mean()) <= tolerance),
        }
    return out


def run_all(quick: bool, seeds: int, progress: bool = True) -> dict:
    rows, curves = [], {}
    for task in make_tasks(quick):
        for name, (opt32, opt8, hyper) in OPTIMIZERS.items():
            for bits, factory in ((32, opt32), (8, opt8)):
                start = time.perf_counter()
                losses, eval_loss, eval_acc, state, n_params = train(task, factory(**hyper), seeds)
                seconds = time.perf_counter() - start
                row = {
                    "task": task.name,
                    "optimizer": name,
                    "bits": bits,
                    "hyperparameters": hyper,
                    "steps": task.steps,
                    "seeds": seeds,
                    "params": n_params,
                    "final_train_loss": _tail_mean(losses).tolist(),
                    "eval_loss": eval_loss.tolist(),
                    "eval_accuracy": eval_acc.tolist(),
                    "state_bytes": qo.state_nbytes(state),
                    "state_formats": sorted(set(qo.state_formats(state).values())),
                    "train_time_s": round(seconds, 2),
                }
                rows.append(row)
                curves[f"{task.name}/{name}/{bits}"] = losses.mean(1).tolist()
                if progress:
                    print(
                        f"{task.name:11s} {name:5s} {bits:2d}-bit: eval loss {eval_loss.mean():.4f}, "
                        f"accuracy {eval_acc.mean():.4f}, state {row['state_bytes']} B, {seconds:.1f} s",
                        flush=True,
                    )
    verdicts = []
    for r32 in (r for r in rows if r["bits"] == 32):
        r8 = next(
            r
            for r in rows
            if r["bits"] == 8 and r["task"] == r32["task"] and r["optimizer"] == r32["optimizer"]
        )
        verdicts.append(
            {
                "task": r32["task"],
                "optimizer": r32["optimizer"],
                **parity(r32, r8),
                "state_ratio": r8["state_bytes"] / r32["state_bytes"],
            }
        )
    return {
        "quick": quick,
        "seeds": seeds,
        "jax": jax.__version__,
        "devices": str(jax.devices()),
        "rows": rows,
        "parity": verdicts,
        "curves": curves,
    }


def _ms(values) -> str:
    values = np.asarray(values)
    return f"{values.mean():.4f} ± {values.std(ddof=1) if len(values) > 1 else 0.0:.4f}"


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# 8-bit vs 32-bit optimizer states (qjax.optim)",
        "",
        f"{'Quick run (CI sizes)' if result['quick'] else 'Full run'}; {result['seeds']} seeds; mean ± std "
        "over seeds. Same hyperparameters for 32-bit and 8-bit; 8-bit = block-wise dynamic map, blocks of "
        "256, leaves >= 4096 elements (smaller ones and the stable embedding stay 32-bit).",
        "",
        "| task | optimizer | bits | steps | final train loss | eval loss | eval accuracy | state bytes "
        "| time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['task']} | {r['optimizer']} | {r['bits']} | {r['steps']} | {_ms(r['final_train_loss'])} "
            f"| {_ms(r['eval_loss'])} | {_ms(r['eval_accuracy'])} | {r['state_bytes']:,} "
            f"| {r['train_time_s']} |"
        )
    lines += [
        "",
        "Parity (8-bit mean within 2 seed std of 32-bit, floors 0.5 points / 1% loss):",
        "",
        "| task | optimizer | Δ accuracy (8 − 32) | parity | Δ eval loss | parity | state 8-bit / 32-bit |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in result["parity"]:
        acc, loss = v["eval_accuracy"], v["eval_loss"]
        lines.append(
            f"| {v['task']} | {v['optimizer']} | {acc['difference']:+.4f} (tol {acc['tolerance']:.4f}) | "
            f"{'yes' if acc['parity'] else 'NO'} | {loss['difference']:+.4f} (tol {loss['tolerance']:.4f}) | "
            f"{'yes' if loss['parity'] else 'NO'} | {v['state_ratio']:.3f} |"
        )
    held = sum(v["eval_accuracy"]["parity"] and v["eval_loss"]["parity"] for v in result["parity"])
    lines += ["", f"Parity held in {held} of {len(result['parity'])} task/optimizer pairs."]
    path.write_text("\n".join(lines) + "\n")


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4))
    for ax, task in zip(np.atleast_1d(axes), tasks, strict=True):
        for i, name in enumerate(OPTIMIZERS):
            for bits, style in ((32, "-"), (8, "--")):
                if f"{task}/{name}/{bits}" not in result["curves"]:
                    continue
                curve = np.asarray(result["curves"][f"{task}/{name}/{bits}"])
                window = max(1, len(curve) // 50)
                smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
                ax.plot(smooth, style, color=f"C{i}", label=f"{name} {bits}-bit")
        ax.set(title=task, xlabel="step", ylabel="train loss (moving average)", yscale="log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    add_run_options(parser, "a few steps on a subset (CI)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: allowed: an integer >= 1")
    start = time.perf_counter()
    result = run_all(args.quick, args.seeds, progress=not args.no_progress)
    result["total_time_s"] = round(time.perf_counter() - start, 1)
    out = results_dir(args.results_dir)
    (out / "optim8bit.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, out / "optim8bit.md")
    write_plot(result, out / "optim8bit.png")
    print((out / "optim8bit.md").read_text())
    print(f"total {result['total_time_s']} s; wrote {out}/optim8bit.json, .md, .png")
    return result


if __name__ == "__main__":
    run(main)
