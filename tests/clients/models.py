"""Tiny Flax models that nobody on this project wrote, ready to call, for testing qjax's core on them.

Every builder returns a client: the model (NNX module, or Linen module plus its variables), an example input
and a ``forward`` that returns logits. The model code is the packages' own (Tunix, transformers), used
as shipped; only the configs (2-3 layers, width 32, vocab 128, float32), the seeds and the weight values
are ours. The two
last builders are small models written here in the style of Flax's NNX docs / MaxText (``scanned_nnx``)
and of Flax's lm1b example (``linen_partitioned``).

- ``tunix_llama3()``, ``tunix_qwen2()``, ``tunix_qwen3(moe=False)``, ``tunix_gemma3(num_kv_heads=1)``:
  ``NnxClient``, ``forward(model, inputs)``. Tunix's ``Einsum`` modules contract ``w`` with
  ``jnp.einsum``; the MLPs are ``nnx.Linear``; a tied head (qwen2, gemma3) is ``jnp.dot(x, emb.T)`` in
  ``Embedder.decode``; Qwen3's MoE experts are raw Params of the ``MoELayer``, sliced and ``jnp.einsum``-ed.
- ``flax_gpt2()``: ``LinenClient``, ``forward(module, variables, inputs)``. ``FlaxConv1D`` contracts its
  [out, in] kernel with ``lax.dot_general``; the tied head is a nested ``nn.Dense.apply`` on ``wte.T``.
- ``scanned_nnx()``: ``NnxClient``; ``nnx.Linear`` and a local ``Einsum`` (``jnp.einsum``) in blocks
  stacked by ``nnx.vmap`` and run by ``nnx.scan``.
- ``linen_partitioned()``: ``LinenClient``; ``nn.Dense`` / ``nn.DenseGeneral`` (``lax.dot_general``),
  params boxed in ``nn.LogicallyPartitioned`` / ``nn.Partitioned``.

``nnx.Linear`` contracts through its ``dot_general`` attribute (``lax.dot_general`` unless one is passed),
``nn.Dense`` / ``nn.DenseGeneral`` through theirs (``lax.dot_general``), a Tunix ``Einsum`` through
``jnp.einsum(self.einsum_str, x, self.w.value)`` (which lowers to ``lax.dot_general`` too).

``client.dense_paths`` lists the '/'-joined paths of the modules that own a weight (a Param of rank >= 2)
and contract it; :func:`weight_owners` (NNX) and :func:`linen_weight_owners` (Linen) compute them from
the model, and the float tests check the two agree, so these docs stay true when a package changes.

Weights: each builder runs the model's own ``__init__`` (or Linen ``init``) twice, never eagerly: once
under ``nnx.eval_shape`` / ``jax.eval_shape`` for the structure and the Params' metadata, once under
``jax.jit`` keeping only the small variables (rank < 2: norm scales, biases), whose package values are
kept (constants in all these models; XLA drops the dead random weight draws, so this compiles in ~0.1 s).
Every weight (a Param of rank >= 2, not counting a stacked layer axis) is then drawn from a seeded numpy
normal with std 1/sqrt(fan_in) (``fill_nnx_weights`` / ``fill_linen_weights``; GPT-2 keeps its own std
0.02). Why: eager init on XLA:CPU compiles the random sampler once per weight shape (0.2-2 s each;
``FlaxGPT2LMHeadModel(config, seed=0)`` took 13 s here, a tiny Llama3 4-6 s), and numpy's draws are the
same on every backend, CPU or GPU. It also replaces Tunix's zero-initialised MLP kernels
(``nnx.initializers.zeros_init()``), which would make every MLP a no-op and hand a quantizer all-zero
weights.

Importing any Tunix model module runs ``tunix.utils.env_utils.setup_sharding_environment()``, which sets
``flax.config.flax_always_shard_variable = False`` for the whole process (its Params carry sharding
metadata and would otherwise need a mesh when created).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

SEED = 0
BATCH, SEQ, VOCAB = 2, 8, 128


@dataclasses.dataclass
class NnxClient:
    """An NNX model and how to call it: ``logits = client.forward(client.model, client.inputs)``.

    ``inputs`` holds only arrays (and ``None``), so ``nnx.jit(client.forward)(client.model, client.inputs)``
    works as is.
    """

    name: str
    model: nnx.Module
    inputs: dict[str, Any]
    forward: Callable[[nnx.Module, dict[str, Any]], jax.Array]
    dense_paths: tuple[str, ...]


@dataclasses.dataclass
class LinenClient:
    """A Linen module, its variables and how to call it:
    ``logits = client.forward(client.module, client.variables, client.inputs)``.

    ``forward`` only calls ``module.apply(variables, **inputs, ...)``, so any object with a Linen-like
    ``apply`` (a quantized model) can stand in for ``module``. ``client.init(key)`` runs
    ``module.init(key, **inputs)`` as is: eagerly that is slow on CPU (GPT-2: ~10 s), so wrap it in
    ``jax.jit`` or ``jax.eval_shape``.
    """

    name: str
    module: nn.Module
    variables: dict[str, Any]
    inputs: dict[str, Any]
    forward: Callable[[Any, dict[str, Any], dict[str, Any]], jax.Array]
    dense_paths: tuple[str, ...]

    def init(self, key: jax.Array) -> dict[str, Any]:
        return self.module.init(key, **self.inputs)


def rng_key(seed: int = SEED) -> jax.Array:
    """A new-style key with the rbg implementation (fast to compile on CPU; deterministic per backend)."""
    return jax.random.key(seed, impl="rbg")


def tokens(seed: int = SEED, batch: int = BATCH, seq: int = SEQ, vocab: int = VOCAB) -> jax.Array:
    """Deterministic int32 token ids in [1, vocab), from numpy's generator (the same on every machine)."""
    return jnp.asarray(np.random.default_rng(seed).integers(1, vocab, (batch, seq)), jnp.int32)


def causal_mask(batch: int = BATCH, seq: int = SEQ) -> jax.Array:
    """Boolean [batch, seq, seq] lower-triangular mask, the ``attention_mask`` Tunix models take."""
    return jnp.broadcast_to(jnp.tril(jnp.ones((seq, seq), jnp.bool_)), (batch, seq, seq))


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def weight_owners(model: nnx.Module, stacked: tuple[str, ...] = ()) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{path: (module type name, names of its own weights)}`` for an NNX model; a weight is a Param of
    rank >= 2, not counting the leading layer axis of paths under a prefix in ``stacked``.

    Paths come from ``nnx.iter_modules`` ('/'-joined: ``layers/0/attn/q_proj``). Only a module's direct
    attributes count (a Param of a child module belongs to the child).
    """
    owners = {}
    for path, module in nnx.iter_modules(model):
        names = tuple(sorted(name for name, value in vars(module).items() if isinstance(value, nnx.Param)
                             and _is_weight(path_str((*path, name)), value.get_value(), stacked)))
        if names:
            owners[path_str(path)] = (type(module).__name__, names)
    return owners


def linen_weight_owners(params) -> dict[str, tuple[str, ...]]:
    """``{path: names of its rank >= 2 leaves}`` for a Linen params tree (boxed leaves are unboxed)."""
    owners: dict[str, list[str]] = {}
    flat = jax.tree_util.tree_flatten_with_path(
        nn.meta.unbox(params), is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))[0]
    for keypath, leaf in flat:
        if jnp.ndim(leaf) >= 2:
            keys = [k.key for k in keypath]
            owners.setdefault("/".join(keys[:-1]), []).append(keys[-1])
    return {path: tuple(sorted(names)) for path, names in owners.items()}


def _is_weight(path: str, value, stacked: tuple[str, ...]) -> bool:
    extra = 1 if any(path == pre or path.startswith(pre + "/") for pre in stacked) else 0
    return jnp.ndim(value) - extra >= 2


def _einsum_fan_in(einsum_str: str, shape: tuple[int, ...]) -> int:
    """Product of the weight's dims that ``jnp.einsum(einsum_str, x, w)`` contracts (trailing-aligned)."""
    lhs, out = einsum_str.replace(" ", "").split("->")
    x_spec, w_spec = lhs.split(",")
    contracted = (set(x_spec) & set(w_spec)) - set(out)
    dims = dict(zip(w_spec, shape[len(shape) - len(w_spec):], strict=True))
    return int(np.prod([dims[c] for c in contracted]))


def fill_nnx_weights(create: Callable[[], nnx.Module], seed: int = SEED,
                     stacked: tuple[str, ...] = ()) -> nnx.Module:
    """Build ``create()`` without eager init: structure and metadata from ``nnx.eval_shape``, small
    variables (rank < 2 and every non-Param) from a jitted ``create()``, weights from numpy.

    A weight's std is 1/sqrt(fan_in): the dims its ``Einsum`` contracts (a module with a string
    ``einsum_str``), else ``shape[-2]`` (``nnx.Linear`` [in, out], ``Embed`` [V, D], experts [E, D, F]).
    Paths under a prefix in ``stacked`` carry a leading layer axis, not counted in their rank.
    """

    def small_values():
        return {path_str(p): v.get_value() for p, v in nnx.iter_graph(create())
                if isinstance(v, nnx.Variable)
                and not (isinstance(v, nnx.Param) and _is_weight(path_str(p), v.get_value(), stacked))}

    small = jax.jit(small_values)()
    model = nnx.eval_shape(create)
    modules = {path_str(p): m for p, m in nnx.iter_modules(model)}
    rng = np.random.default_rng(seed)
    for p, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Variable):
            continue
        path = path_str(p)
        if path in small:
            variable.set_value(small[path])
            continue
        abstract = variable.get_value()
        owner = modules.get(path_str(p[:-1]))
        einsum_str = getattr(owner, "einsum_str", None)
        if isinstance(einsum_str, str):
            fan_in = _einsum_fan_in(einsum_str, abstract.shape)
        else:
            fan_in = abstract.shape[-2]
        value = rng.standard_normal(abstract.shape) / np.sqrt(fan_in)
        variable.set_value(jnp.asarray(value, abstract.dtype))
    return model


def fill_linen_weights(module: nn.Module, inputs: dict[str, Any], seed: int = SEED,
                       std: float | None = None) -> dict[str, Any]:
    """``module.init(key, **inputs)`` without eager init: the same tree (boxes included) from
    ``jax.eval_shape``, rank < 2 leaves from a jitted ``init``, rank >= 2 leaves from numpy with
    std ``std`` or 1/sqrt(prod(shape[:-1]))."""
    key = rng_key(seed)

    def small_values():
        return jax.tree.map(lambda x: x if jnp.ndim(x) < 2 else None, module.init(key, **inputs))

    small = jax.tree.leaves(jax.jit(small_values)(), is_leaf=lambda x: x is None)
    abstract, treedef = jax.tree.flatten(jax.eval_shape(lambda: module.init(key, **inputs)))
    rng = np.random.default_rng(seed)
    leaves = []
    for leaf, value in zip(abstract, small, strict=True):
        if value is None:
            scale = std if std is not None else 1 / np.sqrt(np.prod(leaf.shape[:-1]))
            value = jnp.asarray(rng.standard_normal(leaf.shape) * scale, leaf.dtype)
        leaves.append(value)
    return jax.tree.unflatten(treedef, leaves)


def _per_layer(num_layers: int, names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"layers/{i}/{name}" for i in range(num_layers) for name in names)


def _tunix_inputs(token_key: str) -> dict[str, Any]:
    positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (BATCH, SEQ))
    return {token_key: tokens(), "positions": positions, "cache": None, "attention_mask": causal_mask()}


def _tunix_forward(model, inputs):
    logits, _cache = model(**inputs)
    return logits


# --------------------------------------------------------------------------------------------------- Tunix


def tunix_llama3(num_layers: int = 2, seed: int = SEED) -> NnxClient:
    """Tunix's ``tunix.models.llama3.model.Llama3`` (NNX), tiny: 2 layers, embed 32, MLP 64, 4 query heads
    and 2 KV heads of 8 (GQA), vocab 128, float32 params, an untied ``lm_head``.

    Call: ``model(input_tokens[B, L] int32, positions[B, L] int32, cache=None, attention_mask[B, L, L] bool)``
    returns ``(logits[B, L, 128] float32, None)``; ``forward`` returns the logits.

    Layers are a Python list (``nnx.List``): paths ``layers/0/...``, not scanned. Dense-like modules:

    - ``layers/{i}/attn/{q,k,v,o}_proj``: Tunix ``Einsum(nnx.Module)``, Param ``w`` of shape [D, N, H]
      (``'BTD,DNH->BTNH'``; k/v ``'BSD,DKH->BSKH'``), o_proj [N, H, D] (``'BTNH,NHD->BTD'``), applied as
      ``jnp.einsum(self.einsum_str, x, self.w.value)``; init ``normal()`` (std 0.01).
    - ``layers/{i}/mlp/{gate,up,down}_proj``: ``nnx.Linear(use_bias=False)``, ``kernel`` [in, out], zero
      init in Tunix (filled here).
    - ``lm_head``: ``Einsum('BTD,DV->BTV')``; ``embedder``: ``Embedder`` with Param ``input_embedding``
      [V, D], only gathered here (``decode`` = ``jnp.dot(x, emb.T)`` is used when ``weight_tying``).

    Every Param carries ``out_sharding`` metadata (Tunix passes ``sharding=(...)`` or
    ``nnx.with_partitioning``; flax 0.12 stores both as ``out_sharding``), e.g. ``('fsdp', 'tp', None)`` for
    q_proj. Attention is ``jnp.einsum`` of activations (``'BTHGD,BSHD->BHGTS'``).
    """
    from tunix.models.llama3 import model as llama3

    config = llama3.ModelConfig(num_layers=num_layers, vocab_size=VOCAB, embed_dim=32, hidden_dim=64,
                                num_heads=4, head_dim=8, num_kv_heads=2, rope_theta=10_000, norm_eps=1e-5,
                                weight_tying=False)
    model = fill_nnx_weights(lambda: llama3.Llama3(config, rngs=nnx.Rngs(rng_key(seed))), seed)
    dense = ("embedder", "lm_head", *_per_layer(num_layers, (
        "attn/k_proj", "attn/o_proj", "attn/q_proj", "attn/v_proj",
        "mlp/down_proj", "mlp/gate_proj", "mlp/up_proj")))
    return NnxClient("tunix_llama3", model, _tunix_inputs("input_tokens"), _tunix_forward, dense)


def tunix_qwen2(num_layers: int = 2, seed: int = SEED) -> NnxClient:
    """Tunix's ``tunix.models.qwen2.model.Qwen2`` (NNX), tiny (as ``tunix_llama3``) with a tied embedding.

    Call: ``model(input_tokens, positions, cache=None, attention_mask[B, L, L] bool)`` returns
    ``(logits float32, None)``. Python-list layers (``layers/0/...``). Dense-like modules:

    - ``layers/{i}/attn/{q,k,v,o}_proj``: Tunix ``Einsum`` (Param ``w``, glorot-uniform, cast to
      ``config.dtype`` then ``jnp.einsum``); q/k/v biases are separate Params ``q_bias``/``k_bias``/``v_bias``
      of the ``Attention`` module (flat [N*H], added after reshaping).
    - ``layers/{i}/mlp/{gate,up,down}_proj``: ``nnx.Linear`` (zero init in Tunix; filled here).
    - ``embedder``: ``input_embedding`` [V, D], gathered in ``encode`` and contracted as the LM head in
      ``decode`` by ``jnp.dot(x, w.T)`` (``use_tied_embedding=True``, so there is no ``lm_head``).

    ``use_flash_attention`` stays False (the TPU splash kernel is imported but not used).
    """
    from tunix.models.qwen2 import model as qwen2

    config = qwen2.ModelConfig(num_layers=num_layers, vocab_size=VOCAB, embed_dim=32, hidden_dim=64,
                               num_heads=4, head_dim=8, num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6,
                               use_tied_embedding=True)
    model = fill_nnx_weights(lambda: qwen2.Qwen2(config, rngs=nnx.Rngs(rng_key(seed))), seed)
    dense = ("embedder", *_per_layer(num_layers, (
        "attn/k_proj", "attn/o_proj", "attn/q_proj", "attn/v_proj",
        "mlp/down_proj", "mlp/gate_proj", "mlp/up_proj")))
    return NnxClient("tunix_qwen2", model, _tunix_inputs("input_tokens"), _tunix_forward, dense)


def tunix_qwen3(num_layers: int = 2, moe: bool = False, seed: int = SEED) -> NnxClient:
    """Tunix's ``tunix.models.qwen3.model.Qwen3`` (NNX), tiny, untied ``lm_head``; ``moe=True`` swaps each
    MLP for a ``MoELayer`` with 4 experts, 2 per token.

    Call and layout as ``tunix_qwen2`` (plus per-head ``q_norm``/``k_norm``). Dense-like modules:
    ``layers/{i}/attn/{q,k,v,o}_proj`` and ``lm_head`` (Tunix ``Einsum``, ``jnp.einsum``), and either
    ``layers/{i}/mlp/{gate,up,down}_proj`` (``nnx.Linear``) or, with ``moe``, ``layers/{i}/mlp/router``
    (``nnx.Linear``) plus the ``MoELayer`` at ``layers/{i}/mlp`` itself, whose expert weights are raw Params
    ``gate_proj``/``up_proj`` [E, D, F] and ``down_proj`` [E, F, D] of the MoE module (no module of their
    own), sliced per expert (``self.gate_proj.value[i]``) and contracted with ``jnp.einsum('BTD,DF->BTF',
    ...)`` on the dense fallback path taken on CPU or without a mesh (the megablox ``gmm`` path needs a
    mesh).
    """
    from tunix.models.qwen3 import model as qwen3

    extra = {"num_experts": 4, "num_experts_per_tok": 2} if moe else {}
    config = qwen3.ModelConfig(num_layers=num_layers, vocab_size=VOCAB, embed_dim=32, hidden_dim=64,
                               num_heads=4, head_dim=8, num_kv_heads=2, rope_theta=10_000, norm_eps=1e-6,
                               use_tied_embedding=False, **extra)
    model = fill_nnx_weights(lambda: qwen3.Qwen3(config, rngs=nnx.Rngs(rng_key(seed))), seed)
    mlp = ("mlp", "mlp/router") if moe else ("mlp/down_proj", "mlp/gate_proj", "mlp/up_proj")
    dense = ("embedder", "lm_head", *_per_layer(num_layers, (
        "attn/k_proj", "attn/o_proj", "attn/q_proj", "attn/v_proj", *mlp)))
    return NnxClient("tunix_qwen3_moe" if moe else "tunix_qwen3", model, _tunix_inputs("input_tokens"),
                     _tunix_forward, dense)


def tunix_gemma3(num_layers: int = 2, num_kv_heads: int = 1, seed: int = SEED) -> NnxClient:
    """Tunix's ``tunix.models.gemma3.model.Gemma3`` (NNX, text only), tiny: embed 32, MLP 64, 4 heads of 8,
    ``num_kv_heads`` KV heads (1: GQA, separate ``q_einsum`` + ``kv_einsum``; 4: one fused ``qkv_einsum``),
    sliding window 4, vocab 128, ``param_dtype=float32`` (Tunix's default is bfloat16).

    Call: ``model(last_tokens[B, L], positions[B, L], cache=None, attention_mask[B, L, L] bool)`` (the
    token argument is ``last_tokens`` here) returns ``(logits, None)``. The first 5 of every 6 layers are
    local sliding-window attention, the 6th global. Python-list layers. Dense-like modules:

    - ``layers/{i}/attn/q_einsum`` (``'BTD,NDH->BTNH'``, ``w`` [N, D, H]) and ``layers/{i}/attn/kv_einsum``
      (``'BSD,CKDH->CBSKH'``, ``w`` [2, K, D, H], the K and V weights stacked on a leading axis), or
      ``qkv_einsum`` (``'BTD,SNDH->SBTNH'``, [3, N, D, H]); ``layers/{i}/attn/attn_vec_einsum``
      (``'BTNH,NHD->BTD'``): all Tunix ``Einsum``, ``jnp.einsum(self.einsum_str, x, self.w.value)``.
    - ``layers/{i}/mlp/{gate,up,down}_proj``: ``nnx.Linear`` (zero init in Tunix; filled here).
    - ``embedder``: ``input_embedding`` [V, D]; gathered then always used as the tied head,
      ``decode`` = ``jnp.dot(x, emb.T)``.

    RMSNorm ``scale`` Params are zero-initialised (applied as ``1 + scale``).
    """
    from tunix.models.gemma3 import model as gemma3

    config = gemma3.ModelConfig(num_layers=num_layers, num_embed=VOCAB, embed_dim=32, hidden_dim=64,
                                num_heads=4, head_dim=8, num_kv_heads=num_kv_heads, sliding_window_size=4,
                                param_dtype=jnp.float32)
    model = fill_nnx_weights(lambda: gemma3.Gemma3(config, rngs=nnx.Rngs(rng_key(seed))), seed)
    qkv = ("attn/qkv_einsum",) if num_kv_heads == 4 else ("attn/kv_einsum", "attn/q_einsum")
    dense = ("embedder", *_per_layer(num_layers, (
        "attn/attn_vec_einsum", *qkv, "mlp/down_proj", "mlp/gate_proj", "mlp/up_proj")))
    return NnxClient("tunix_gemma3", model, _tunix_inputs("last_tokens"), _tunix_forward, dense)


# ---------------------------------------------------------------------------------------- transformers


def _gpt2_forward(module, variables, inputs):
    return module.apply(variables, **inputs, deterministic=True).logits


def flax_gpt2(seed: int = SEED) -> LinenClient:
    """transformers' ``FlaxGPT2LMHeadModel`` (Linen ``FlaxGPT2LMHeadModule``), built from a local tiny
    ``GPT2Config`` (2 layers, n_embd 32, 4 heads, vocab 128, 32 positions; no download).

    Call: ``module.apply({"params": params}, input_ids[B, L], attention_mask[B, L], position_ids[B, L],
    deterministic=True)`` returns a ``FlaxCausalLMOutputWithCrossAttentions``; ``forward`` returns its
    ``.logits`` [B, L, 128]. The mask's second row pads its last two tokens.

    Module paths (params tree): ``transformer/wte`` and ``transformer/wpe`` (``nn.Embed``, ``embedding``),
    ``transformer/h/{i}/attn/c_attn`` ([3D, D]), ``transformer/h/{i}/attn/c_proj``,
    ``transformer/h/{i}/mlp/c_fc`` ([4D, D]), ``transformer/h/{i}/mlp/c_proj``, LayerNorms ``ln_1``,
    ``ln_2``, ``transformer/ln_f``. The four per-layer projections are ``FlaxConv1D``, not ``nn.Dense``:
    their ``kernel`` is stored **[out, in]** and applied as ``lax.dot_general(x, kernel.transpose(),
    (((x.ndim - 1,), (0,)), ((), ())))`` plus ``bias``. Attention is ``dot_product_attention_weights``
    then ``jnp.einsum('...hqk,...khd->...qhd')`` of activations.

    The LM head is tied (``tie_word_embeddings`` is GPT-2's default): ``lm_head`` is an ``nn.Dense`` that
    owns no params (there is no ``lm_head`` entry in ``params``); ``FlaxGPT2LMHeadModule.__call__`` runs
    ``self.lm_head.apply({"params": {"kernel": wte.embedding.T}}, hidden_states)``, a nested ``apply`` of
    the Dense on the transposed embedding [D, V].
    """
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    # _do_init=False: no eager init (13 s on CPU); fill_linen_weights draws GPT-2's own N(0, 0.02) instead.
    module = transformers.FlaxGPT2LMHeadModel(config, seed=seed, _do_init=False).module
    ids = tokens(seed)
    mask = jnp.ones_like(ids).at[1, -2:].set(0)
    inputs = {"input_ids": ids, "attention_mask": mask,
              "position_ids": jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), ids.shape)}
    variables = fill_linen_weights(module, inputs, seed, std=config.initializer_range)
    dense = ("transformer/wpe", "transformer/wte", *(
        f"transformer/h/{i}/{name}" for i in range(config.n_layer)
        for name in ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")))
    return LinenClient("flax_gpt2", module, variables, inputs, _gpt2_forward, dense)


# ------------------------------------------------------------------- NNX, scanned layers (MaxText style)


class Einsum(nnx.Module):
    """A weight contracted by ``jnp.einsum`` (as Tunix's and MaxText's ``Einsum`` / ``DenseGeneral``)."""

    def __init__(self, einsum_str: str, shape: tuple[int, ...], *, in_axis: int, rngs: nnx.Rngs):
        self.einsum_str = einsum_str
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=in_axis, out_axis=-1)
        self.w = nnx.Param(init(rngs.params(), shape, jnp.float32))

    def __call__(self, x):
        return jnp.einsum(self.einsum_str, x, self.w[...])


class Block(nnx.Module):
    """Pre-norm attention (fused qkv ``Einsum``, ``out`` Linear) and MLP (``up``/``down`` Linear)."""

    def __init__(self, dim: int, heads: int, hidden: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.attn_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.qkv = Einsum("btd,sdnh->sbtnh", (3, dim, heads, dim // heads), in_axis=1, rngs=rngs)
        self.out = nnx.Linear(dim, dim, rngs=rngs)
        self.mlp_norm = nnx.RMSNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x))
        scores = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(d // self.heads)
        probs = jax.nn.softmax(jnp.where(mask[:, None], scores, -1e9), axis=-1)
        x = x + self.out(jnp.einsum("bnts,bsnh->btnh", probs, v).reshape(b, t, d))
        return x + self.down(nnx.gelu(self.up(self.mlp_norm(x))))


class ScannedLM(nnx.Module):
    """``num_layers`` identical ``Block`` s created by ``nnx.vmap`` and run by ``nnx.scan`` (Flax NNX docs'
    "scan over layers"), between an ``nnx.Embed`` and an ``nnx.Linear`` head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, hidden: int = 64,
                 num_layers: int = 3, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)

        @nnx.split_rngs(splits=num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def create_block(rngs: nnx.Rngs) -> Block:
            return Block(dim, heads, hidden, rngs=rngs)

        self.layers = create_block(rngs)
        self.norm = nnx.RMSNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens, mask):
        @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
        def run_layers(block: Block, x, mask):
            return block(x, mask)

        x = run_layers(self.layers, self.embed(tokens), mask)
        return self.head(self.norm(x))


#: Path prefixes of ``ScannedLM`` whose variables have a leading layer axis.
SCANNED_STACKED = ("layers",)


def _scanned_forward(model, inputs):
    return model(**inputs)


def scanned_nnx(num_layers: int = 3, seed: int = SEED) -> NnxClient:
    """``ScannedLM``: 3 stacked blocks (dim 32, 4 heads, MLP 64, vocab 128), float32, no sharding metadata.

    Call: ``model(tokens[B, L] int32, mask[B, L, L] bool)`` returns logits [B, L, 128].

    The blocks are one ``Block`` whose every Param has a leading layer axis (``nnx.vmap(in_axes=(0,),
    out_axes=0)`` over ``create_block`` under ``nnx.split_rngs(splits=num_layers)``), run by
    ``nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)``. So there are no per-layer paths:
    ``layers/qkv`` (``Einsum``, ``w`` [L, 3, D, N, H], ``jnp.einsum('btd,sdnh->sbtnh')``),
    ``layers/out`` / ``layers/up`` / ``layers/down`` (``nnx.Linear``, ``kernel`` [L, in, out], ``bias``
    [L, out]); outside the scan ``embed`` (``nnx.Embed``, ``embedding`` [V, D], gathered only) and ``head``
    (``nnx.Linear``, no bias). Inside the scan body each layer sees its own unstacked slice.
    """
    model = fill_nnx_weights(lambda: ScannedLM(num_layers=num_layers, rngs=nnx.Rngs(rng_key(seed))), seed,
                             stacked=SCANNED_STACKED)
    inputs = {"tokens": tokens(seed), "mask": causal_mask()}
    dense = ("embed", "head", "layers/down", "layers/out", "layers/qkv", "layers/up")
    return NnxClient("scanned_nnx", model, inputs, _scanned_forward, dense)


# ------------------------------------------------------------- Linen, partitioned params (lm1b style)

#: Logical-to-mesh axis rules for ``linen_partitioned`` (as lm1b's), for ``nn.logical_to_mesh_sharding``.
LOGICAL_RULES = (("vocab", "model"), ("embed", None), ("mlp", "model"), ("heads", "model"), ("kv", None))

_kernel_init = nn.initializers.xavier_uniform()


def _layer_norm(name: str) -> nn.LayerNorm:
    return nn.LayerNorm(scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                        name=name)


class PartitionedMlp(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        y = nn.Dense(self.mlp_dim, kernel_init=nn.with_logical_partitioning(_kernel_init, ("embed", "mlp")),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
                     name="wi")(x)
        return nn.Dense(dim, kernel_init=nn.with_logical_partitioning(_kernel_init, ("mlp", "embed")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                        name="wo")(nn.gelu(y))


class PartitionedBlock(nn.Module):
    num_heads: int
    mlp_dim: int

    @nn.compact
    def __call__(self, x, mask):
        def norm(name):
            return _layer_norm(name)

        y = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads, use_bias=False, deterministic=True, name="attention",
            kernel_init=nn.with_logical_partitioning(_kernel_init, ("embed", "kv")))(
                norm("pre_attention_norm")(x), mask=mask)
        x = x + y
        return x + PartitionedMlp(self.mlp_dim, name="mlp")(norm("pre_mlp_norm")(x))


class PartitionedLM(nn.Module):
    """A decoder-only LM like Flax's lm1b example: every param is created through
    ``nn.with_logical_partitioning`` except the output head's kernel (``nn.with_partitioning``)."""

    vocab: int = VOCAB
    dim: int = 32
    num_heads: int = 4
    mlp_dim: int = 64
    num_layers: int = 2

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab, self.dim, name="embed", embedding_init=nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")))
        x = embed(tokens)
        mask = nn.make_causal_mask(tokens)
        for i in range(self.num_layers):
            x = PartitionedBlock(self.num_heads, self.mlp_dim, name=f"decoderblock_{i}")(x, mask)
        x = _layer_norm("final_norm")(x)
        return nn.Dense(self.vocab, use_bias=False, name="logits_dense",
                        kernel_init=nn.with_partitioning(_kernel_init, (None, "model")))(x)


def _linen_forward(module, variables, inputs):
    return module.apply(variables, **inputs)


def linen_partitioned(seed: int = SEED) -> LinenClient:
    """``PartitionedLM``: 2 blocks (dim 32, 4 heads, MLP 64), vocab 128, float32.

    Call: ``module.apply(variables, tokens[B, L] int32)`` returns logits [B, L, 128]; ``client.init(key)``
    = ``module.init(key, tokens=...)``. ``client.variables`` has the tree ``init`` returns (weights
    drawn by ``fill_linen_weights``): its leaves are **boxed** (``nn.LogicallyPartitioned`` with
    ``names`` such as ``("embed", "mlp")``, and one
    ``nn.Partitioned`` with ``names=(None, "model")``: ``logits_dense/kernel``), and ``apply`` takes them
    boxed (``self.param`` unboxes). ``nn.get_partition_spec(variables)`` / ``nn.logical_to_mesh_sharding(
    ..., mesh, LOGICAL_RULES)`` read them.

    Module paths: ``embed`` (``nn.Embed``, ``embedding`` [V, D], gathered only),
    ``decoderblock_{i}/attention/{query,key,value}`` (``DenseGeneral``, ``kernel`` [D, N, H], no bias),
    ``decoderblock_{i}/attention/out`` (``DenseGeneral``, [N, H, D]), ``decoderblock_{i}/mlp/{wi,wo}``
    (``nn.Dense`` with bias), ``logits_dense`` (``nn.Dense``, no bias); LayerNorms
    ``decoderblock_{i}/pre_attention_norm``, ``pre_mlp_norm``, ``final_norm``. The attention kernels are
    3-D but, as in lm1b, their logical names are 2-D (``("embed", "kv")``): ``DenseGeneral`` calls the
    initializer on the flattened 2-D shape and reshapes the boxed value, so ``len(names) != ndim`` there.
    """
    module = PartitionedLM()
    inputs = {"tokens": tokens(seed)}
    variables = fill_linen_weights(module, inputs, seed)
    dense = ("logits_dense", "embed", *(
        f"decoderblock_{i}/{name}" for i in range(module.num_layers)
        for name in ("attention/key", "attention/out", "attention/query", "attention/value",
                     "mlp/wi", "mlp/wo")))
    return LinenClient("linen_partitioned", module, variables, inputs, _linen_forward, dense)


TUNIX_BUILDERS = {"tunix_llama3": tunix_llama3, "tunix_qwen2": tunix_qwen2, "tunix_qwen3": tunix_qwen3,
                  "tunix_qwen3_moe": lambda: tunix_qwen3(moe=True), "tunix_gemma3": tunix_gemma3,
                  "tunix_gemma3_qkv": lambda: tunix_gemma3(num_kv_heads=4)}
NNX_BUILDERS = {"scanned_nnx": scanned_nnx}
LINEN_BUILDERS = {"flax_gpt2": flax_gpt2, "linen_partitioned": linen_partitioned}
