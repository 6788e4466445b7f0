"""The primitives models call. Weight types (QArray, sparse) register with `linear` here."""
from flashit_jax.nn.attention import attention
from flashit_jax.nn.cache import Int8KVCache, KVCache, init_kv_cache, write_slots
from flashit_jax.nn.linear import (
    WeightOps, embed, glu_input, linear, linear_logits, register_weight_type, silu_mul, unembed, weight_shape,
)
from flashit_jax.nn.norms import rms_norm
from flashit_jax.nn.qarray import QArray
from flashit_jax.nn.rope import RopeScaling, apply_rope, inv_frequencies
from flashit_jax.nn.sparse import ActSparse, MaskedArray, NMArray, sparse_impl

__all__ = [
    "attention", "Int8KVCache", "KVCache", "QArray", "init_kv_cache", "write_slots", "WeightOps", "embed", "glu_input", "silu_mul", "linear",
    "linear_logits", "register_weight_type", "unembed", "weight_shape", "rms_norm",
    "RopeScaling", "apply_rope", "inv_frequencies", "MaskedArray", "NMArray", "ActSparse", "sparse_impl",
]
