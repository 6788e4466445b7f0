"""Faster decoding on the common `generate` API: speculative decoding with a draft model,
prompt lookup (n-gram drafts), self-speculation with a layer-skipped draft, Medusa heads."""
from flashit_jax.decoding.drafts import (
    Draft,
    layer_skip_draft,
    parse_layers,
    search_layers,
)
from flashit_jax.decoding.lookup import Lookup
from flashit_jax.decoding.speculative import SpecResult, speculative_generate

__all__ = ["Draft", "Lookup", "SpecResult", "layer_skip_draft", "parse_layers", "search_layers", "speculative_generate"]
