"""Accepting drafted tokens against the target's logits.

Every drafter (a draft model, n-gram lookup) proposes `gamma` tokens d_1..d_gamma per row; the
target scores [x_0, d_1..d_gamma] in one forward pass, giving logits for gamma + 1 positions.
A rule returns, per row, how many drafts are accepted (n) and the token that follows them (from
the target at position n: the correction after a rejection, or the bonus token when all pass).

- greedy: d_i is accepted while it equals the target's argmax; the output is exactly the
  target's greedy continuation.
- rejection sampling (Leviathan et al. 2023, Chen et al. 2023): accept d_i with probability
  min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from norm(max(0, p_i - q_i)).
  Both p and q are the *warped* distributions (temperature, top-k, top-p of
  `flashit_jax.generate.warp_logits`), so the output follows the target's warped distribution
  exactly. A deterministic drafter (lookup) has q = one-hot(d_i): accept with probability p_i(d_i)
  and, on rejection, sample p_i with d_i removed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flashit_jax.generate import Sampling, warp_logits


def leading_true(ok: jax.Array) -> jax.Array:
    """int32 [B]: how many leading entries of bool [B, G] are True."""
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=-1), axis=-1).astype(jnp.int32)


def accept_greedy(target_logits: jax.Array, drafts: jax.Array):
    """target_logits [B, G+1, V], drafts int32 [B, G] -> (n [B], next token [B])."""
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, G+1]
    n = leading_true(drafts == best[:, :-1])
    return n, jnp.take_along_axis(best, n[:, None], axis=1)[:, 0]


def accept_rejection(target_logits: jax.Array, drafts: jax.Array, draft_probs: jax.Array | None, key: jax.Array,
                     sampling: Sampling):
    """Modified rejection sampling.

    target_logits [B, G+1, V] (raw), drafts int32 [B, G], draft_probs [B, G, V] (the warped draft
    distribution each d_i was sampled from) or None for a deterministic drafter.
    Returns (n [B], next token [B]).
    """
    b, g = drafts.shape
    p = jax.nn.softmax(warp_logits(target_logits, sampling), axis=-1)  # [B, G+1, V]
    p_d = jnp.take_along_axis(p[:, :g], drafts[..., None], axis=-1)[..., 0]  # [B, G]
    if draft_probs is None:
        q_d = jnp.ones_like(p_d)
        q = jax.nn.one_hot(drafts, p.shape[-1], dtype=p.dtype)
    else:
        q_d = jnp.take_along_axis(draft_probs, drafts[..., None], axis=-1)[..., 0]
        q = draft_probs
    k_accept, k_next = jax.random.split(key)
    u = jax.random.uniform(k_accept, (b, g), jnp.float32)
    # u < p/q without dividing (q_d > 0: d_i was drawn from q_i)
    n = leading_true(u * q_d < p_d)
    # residual at every position (none for the bonus position, where q counts as 0), then pick row n
    q_full = jnp.concatenate([q, jnp.zeros_like(p[:, :1])], axis=1)
    resid = jnp.maximum(p - q_full, 0.0)
    resid_n = jnp.take_along_axis(resid, n[:, None, None], axis=1)[:, 0]  # [B, V]
    p_n = jnp.take_along_axis(p, n[:, None, None], axis=1)[:, 0]
    # p == q makes the residual vanish, and then a rejection has probability 0; guard rounding
    resid_n = jnp.where(jnp.sum(resid_n, axis=-1, keepdims=True) > 0, resid_n, p_n)
    nxt = jax.random.categorical(k_next, jnp.log(resid_n), axis=-1).astype(jnp.int32)
    return n, nxt


def accept(target_logits, drafts, draft_probs, key, sampling: Sampling):
    if sampling.greedy:
        return accept_greedy(target_logits, drafts)
    return accept_rejection(target_logits, drafts, draft_probs, key, sampling)
