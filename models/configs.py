"""Shapes of known models, for `random:NAME` (random weights of the real shapes)."""
from __future__ import annotations

from flashit_jax.nn.rope import RopeScaling
from models.llama import LlamaConfig

SHAPES: dict[str, object] = {
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536, norm_eps=1e-5,
        rope_theta=100000.0, max_position=8192, tie_embeddings=True, family="smollm2"),
    "smollm2-360m": LlamaConfig(
        vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_dim=2560, norm_eps=1e-5,
        rope_theta=100000.0, max_position=8192, tie_embeddings=True, family="smollm2"),
    "llama-3.2-1b": LlamaConfig(
        vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, norm_eps=1e-5,
        rope_theta=500000.0, max_position=131072, tie_embeddings=True, family="llama",
        rope_scaling=RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position=8192)),
    "llama-2-7b": LlamaConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, ffn_dim=11008, norm_eps=1e-5,
        rope_theta=10000.0, max_position=4096, family="llama"),
    "mistral-7b": LlamaConfig(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, norm_eps=1e-5,
        rope_theta=10000.0, max_position=32768, sliding_window=4096, family="mistral"),
    "qwen2-0.5b": LlamaConfig(
        vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, ffn_dim=4864, norm_eps=1e-6,
        rope_theta=1000000.0, max_position=32768, tie_embeddings=True, qkv_bias=True, family="qwen2"),
    "gemma-2b": LlamaConfig(
        vocab_size=256000, dim=2048, n_layers=18, n_heads=8, n_kv_heads=1, ffn_dim=16384, head_dim=256,
        norm_eps=1e-6, rope_theta=10000.0, max_position=8192, tie_embeddings=True, act="gelu_tanh",
        norm_offset=1.0, embed_scale=True, family="gemma"),
}


def register_shape(name: str, config) -> None:
    """Later model families (Mixtral, Mamba) add their shapes here."""
    SHAPES[name] = config
