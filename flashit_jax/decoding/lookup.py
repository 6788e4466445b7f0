"""Prompt lookup / LLMA drafting: copy the tokens that followed an earlier occurrence of the
latest n-gram (in the prompt or the text generated so far). No draft model; drafts are free, and
where the output repeats its input (summaries, code edits, quoting) most of them are accepted.

Runs on the device over the committed-token buffer, batched: for each row, the longest n-gram
(from `ngram` down to `min_ngram`) ending at the last token that also occurs earlier, at its
most recent earlier occurrence, gives the draft.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from flashit_jax.errors import FlashitError


@dataclasses.dataclass(frozen=True)
class Lookup:
    """Drafter settings; hashable (a static argument of the jitted round)."""

    ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self):
        if self.min_ngram < 1 or self.ngram < self.min_ngram:
            raise FlashitError(f"lookup needs 1 <= min_ngram <= ngram, got ngram={self.ngram}, "
                               f"min_ngram={self.min_ngram}")


def lookup_drafts(hist: jax.Array, count: jax.Array, gamma: int, lookup: Lookup):
    """hist int32 [B, H] (committed tokens in [0, count[b])), count int32 [B] ->
    (drafts int32 [B, gamma], found bool [B]).

    Continuations that run past the end of the text repeat the matched period
    (hist[start:count]), which is what a loop in the output would produce next.
    """
    b, h = hist.shape
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]
    j = jnp.arange(h, dtype=jnp.int32)[None, :]
    start = jnp.full((b,), -1, jnp.int32)
    for n in range(lookup.ngram, lookup.min_ngram - 1, -1):
        # the n-gram ending at the last committed token; rows shorter than n + 1 cannot match
        suffix = hist[rows, jnp.clip(count[:, None] - n + jnp.arange(n, dtype=jnp.int32)[None], 0, h - 1)]
        hit = jnp.ones((b, h), bool)
        for k in range(n):
            shifted = jnp.roll(hist, -k, axis=1)  # shifted[:, j] = hist[:, j + k]; wrap-around is masked below
            hit = hit & (shifted == suffix[:, k:k + 1])
        hit = hit & (j + n < count[:, None])  # an earlier occurrence with at least one token after it
        last = jnp.max(jnp.where(hit, j, -1), axis=1)
        start = jnp.where((start < 0) & (last >= 0), last + n, start)
    found = start >= 0
    start = jnp.where(found, start, count - 1)
    period = jnp.maximum(count - start, 1)
    idx = start[:, None] + jnp.arange(gamma, dtype=jnp.int32)[None] % period[:, None]
    return hist[rows, jnp.clip(idx, 0, h - 1)], found
