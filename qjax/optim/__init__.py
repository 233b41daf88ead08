"""8-bit block-wise optimizer states for any optax optimizer (Dettmers et al., ICLR 2022).

``quantize_state(inner)`` wraps any optax GradientTransformation; ``adam8bit``, ``adamw8bit``, ``lion8bit``
and
``momentum8bit`` are ready optimizers; ``StableEmbedding`` (Linen) and ``StableEmbeddingNNX`` are the
embedding with a LayerNorm after the lookup whose state stays 32-bit; ``state_nbytes`` / ``state_formats``
report what a state holds; ``state_shardings`` lays a state out like its parameters.
"""

from qjax.optim.optimizers import adam8bit, adamw8bit, lion8bit, momentum8bit
from qjax.optim.quantized_state import (
    PARAMETER_COPY_FIELDS,
    SECOND_MOMENT_FIELDS,
    STABLE_EMBEDDING_PATTERN,
    STATE_FORMATS,
    encode_state,
    leaf_format,
    match_params,
    path_str,
    quantize_state,
)
from qjax.optim.report import state_formats, state_nbytes
from qjax.optim.sharding import state_shardings
from qjax.optim.stable_embedding import StableEmbedding, StableEmbeddingNNX

__all__ = [
    "PARAMETER_COPY_FIELDS",
    "SECOND_MOMENT_FIELDS",
    "STABLE_EMBEDDING_PATTERN",
    "STATE_FORMATS",
    "StableEmbedding",
    "StableEmbeddingNNX",
    "adam8bit",
    "adamw8bit",
    "encode_state",
    "leaf_format",
    "lion8bit",
    "match_params",
    "momentum8bit",
    "path_str",
    "quantize_state",
    "state_formats",
    "state_nbytes",
    "state_shardings",
]
