"""Speculative decoding: a drafter proposes `gamma` tokens, the target checks them in one forward
pass of gamma + 1 tokens, and a rule (`verify.py`) keeps the longest acceptable prefix plus one
token of the target's own. Greedy output equals the target's greedy output; sampled output
follows the target's (warped) distribution.

Drafters: a draft model (`Draft`: a smaller model, a distilled student, a layer-skipped copy of
the target) or prompt lookup (`Lookup`: n-gram matches in the text so far).

Bookkeeping per row b, with C[b] committed tokens (prompt + generated) in `hist`:
- the target cache holds C - 1 of them: the last committed token x0 is fed at the next verify;
- the draft cache holds C - 2: each round feeds it the last two committed tokens (one forward of
  two tokens), which re-syncs it whatever the previous round accepted without per-row branches.
A round with n accepted drafts commits n + 1 tokens and rolls both caches back to the new C - 1
and C - 2; KV written for rejected drafts stays in slots beyond `lengths`, masked, and is
overwritten later. Rows finish independently (EOS or max_new_tokens) and are frozen.
Several rounds run per jitted call (a `lax.while_loop`), so the host does not dispatch per token.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.decoding.drafts import Draft, check_draft, check_rollback
from flashit_jax.decoding.lookup import Lookup, lookup_drafts
from flashit_jax.decoding.verify import accept
from flashit_jax.errors import FlashitError
from flashit_jax.generate import (
    Sampling,
    _bucket,
    _compiled,
    _prefill,
    sample,
    warp_logits,
)
from flashit_jax.nn.cache import write_slots


@dataclasses.dataclass
class SpecResult:
    tokens: np.ndarray  # int32 [B, max_new_tokens]; after EOS, filled with EOS
    lengths: np.ndarray  # int32 [B]: generated tokens, EOS included
    accepted: np.ndarray  # int32 [B]: draft tokens accepted
    rounds: np.ndarray  # int32 [B]: verify passes while the row was active
    gamma: int
    ttft_s: float
    decode_s: float
    compile_s: float

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens / drafted tokens, over all rows."""
        return float(self.accepted.sum() / max(1, self.gamma * self.rounds.sum()))

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens committed per target forward pass (accepted drafts + 1)."""
        return float((self.accepted.sum() + self.rounds.sum()) / max(1, self.rounds.sum()))

    @property
    def new_tokens(self) -> int:
        """Tokens produced by the decode loop (the first one comes from the prefill)."""
        return int(np.maximum(self.lengths - 1, 0).sum())

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0


def _draft_prefill_impl(params, tokens, lengths, cache, *, model, attn_impl, switches=()):
    """Feed each prompt but its last token to the draft (right-padded; rows may feed 0 tokens)."""
    del switches  # a jit cache key only (generate._switches)
    _, cache, _ = model.forward(params, tokens, cache=cache, logits_at=jnp.zeros_like(lengths),
                                seq_lengths=lengths, attn_impl=attn_impl)
    return cache


_draft_prefill = jax.jit(_draft_prefill_impl, static_argnames=("model", "attn_impl", "switches"),
                         donate_argnames=("cache",))


def _draft_tokens(dparams, dcache, last2, key, *, draft_model, gamma, sampling, attn_impl):
    """gamma tokens from the draft model: one forward of [prev, cur], then gamma - 1 single steps.
    Returns (drafts [B, G], warped draft probabilities [B, G, V] or None when greedy, cache)."""
    keys = jax.random.split(key, gamma)
    logits, dcache, _ = draft_model.forward(dparams, last2, cache=dcache, logits_at=jnp.ones((last2.shape[0],),
                                                                                           jnp.int32),
                                            attn_impl=attn_impl)
    toks, probs = [], []
    for i in range(gamma):
        if i:
            logits, dcache, _ = draft_model.forward(dparams, toks[-1][:, None], cache=dcache, attn_impl=attn_impl)
        lg = logits[:, 0]
        toks.append(sample(lg, keys[i], sampling))
        if not sampling.greedy:
            probs.append(jax.nn.softmax(warp_logits(lg, sampling), axis=-1))
    drafts = jnp.stack(toks, axis=1)
    return drafts, (jnp.stack(probs, axis=1) if probs else None), dcache


def _round(state, params, dparams, *, model, draft_model, lookup, gamma, sampling, eos_id, max_new, attn_impl):
    """One draft + verify + accept round for every row; finished rows are left unchanged."""
    tcache, dcache, hist = state["tcache"], state["dcache"], state["hist"]
    count, done, plen = state["count"], state["done"], state["plen"]
    b = count.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32)
    key = jax.random.fold_in(state["key"], state["round"])
    k_draft, k_accept = jax.random.split(key)
    last2 = jnp.stack([hist[rows, jnp.maximum(count - 2, 0)], hist[rows, count - 1]], axis=1)
    if lookup is not None:
        drafts, _ = lookup_drafts(hist, count, gamma, lookup)
        qprobs = None
    else:
        drafts, qprobs, dcache = _draft_tokens(dparams, dcache, last2, k_draft, draft_model=draft_model, gamma=gamma,
                                               sampling=sampling, attn_impl=attn_impl)
    verify_in = jnp.concatenate([last2[:, 1:], drafts], axis=1)  # [x0, d_1..d_G]
    logits, tcache, _ = model.forward(params, verify_in, cache=tcache, attn_impl=attn_impl)
    n, nxt = accept(logits, drafts, qprobs, k_accept, sampling)
    emitted = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
    emitted = jnp.where(jnp.arange(gamma + 1)[None] == n[:, None], nxt[:, None], emitted)  # [d_1..d_n, next, ...]
    active = ~done
    # finished rows write nowhere (slots past the buffer are dropped)
    start = jnp.where(active, count, hist.shape[1])
    hist = write_slots(hist[:, :, None, None], emitted[:, :, None, None], start)[:, :, 0, 0]
    new_count = jnp.where(active, count + n + 1, count)
    tcache = tcache.rollback(new_count - 1)
    if dcache is not None:
        dcache = dcache.rollback(new_count - 2)
    finished = new_count - plen >= max_new
    if eos_id is not None:
        is_eos = (emitted == eos_id) & (jnp.arange(gamma + 1)[None] <= n[:, None])
        finished = finished | jnp.any(is_eos, axis=1)
    return dict(state, tcache=tcache, dcache=dcache, hist=hist, count=new_count, done=done | finished,
                accepted=state["accepted"] + jnp.where(active, n, 0),
                rounds=state["rounds"] + active.astype(jnp.int32), round=state["round"] + 1)


@functools.partial(jax.jit, static_argnames=("model", "draft_model", "lookup", "gamma", "sampling", "eos_id",
                                             "max_new", "attn_impl", "rounds_per_call", "switches"),
                   donate_argnames=("state",))
def _rounds(state, params, dparams, *, rounds_per_call, switches=(), **statics):
    """Up to `rounds_per_call` rounds, stopping early once every row is finished."""
    del switches  # a jit cache key only (generate._switches)

    def cond(c):
        i, s = c
        return (i < rounds_per_call) & ~jnp.all(s["done"])

    def body(c):
        i, s = c
        return i + 1, _round(s, params, dparams, **statics)

    _, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return state


def speculative_generate(model, params, prompts, *, draft: Draft | Lookup, gamma: int = 4, max_new_tokens: int,
                         sampling: Sampling = Sampling(), eos_id: int | None = None, cache_dtype=None, seed: int = 0,
                         max_len: int | None = None, attn_impl: str = "auto", pad_multiple: int = 64,
                         rounds_per_call: int = 8) -> SpecResult:
    """`flashit_jax.generate.generate` with drafted tokens verified gamma at a time.

    draft: `Draft(model, params)` (see `drafts.layer_skip_draft`) or `Lookup(ngram=3)`.
    rounds_per_call: draft/verify rounds per jitted call (EOS and length are checked between calls).
    """
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise FlashitError("speculative decoding needs at least one prompt, and every prompt needs at least one token")
    if not isinstance(gamma, (int, np.integer)) or gamma < 1:
        raise FlashitError(f"gamma (draft tokens per step) must be an integer >= 1, got {gamma!r}")
    if max_new_tokens < 1:
        raise FlashitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if rounds_per_call < 1:
        raise FlashitError(f"rounds_per_call must be >= 1, got {rounds_per_call}")
    check_rollback(model, "target")
    if isinstance(draft, Draft):
        check_draft(model, params, draft)
        lookup, draft_model, dparams = None, draft.model, draft.params
    elif isinstance(draft, Lookup):
        lookup, draft_model, dparams = draft, None, None
    else:
        raise FlashitError(f"draft must be a Draft (a model) or a Lookup, got {type(draft).__name__}")
    gamma = int(gamma)
    b = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    longest = int(lens.max())
    # the last verify of a row writes gamma + 1 slots after its C - 1 cached tokens
    need = longest + max_new_tokens + gamma + 1
    max_len = max_len or _bucket(need, 128)
    if need > max_len:
        raise FlashitError(f"prompt of {longest} tokens + {max_new_tokens} new tokens + {gamma + 1} verify slots "
                           f"does not fit the cache of {max_len} positions")
    width = min(_bucket(longest, pad_multiple), max_len)
    tokens = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    if cache_dtype is None:
        cache_dtype = jax.tree.leaves(params["embed"])[0].dtype
    key = jax.random.key(seed)
    tcache = model.init_cache(b, max_len, cache_dtype, params=params)
    dcache = None if draft_model is None else draft_model.init_cache(b, max_len, cache_dtype, params=dparams)
    tokens_d, lens_d = jnp.asarray(tokens), jnp.asarray(lens)

    t0 = time.perf_counter()
    prefill = _compiled(_prefill, params, tokens_d, lens_d, tcache, key, model=model, sampling=sampling,
                        attn_impl=attn_impl)
    dprefill = None
    if dcache is not None:
        dprefill = _compiled(_draft_prefill, dparams, tokens_d, lens_d - 1, dcache, model=draft_model,
                             attn_impl=attn_impl)
    hist0 = jnp.zeros((b, max_len), jnp.int32)
    state = dict(tcache=tcache, dcache=dcache, hist=hist0, count=jnp.zeros((b,), jnp.int32),
                 plen=lens_d, done=jnp.zeros((b,), bool), accepted=jnp.zeros((b,), jnp.int32),
                 rounds=jnp.zeros((b,), jnp.int32), round=jnp.int32(0), key=jax.random.fold_in(key, 1))
    statics = dict(model=model, draft_model=draft_model, lookup=lookup, gamma=gamma, sampling=sampling,
                   eos_id=eos_id, max_new=max_new_tokens, attn_impl=attn_impl)
    step = _compiled(_rounds, state, params, dparams, rounds_per_call=rounds_per_call, **statics)
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    first, tcache = prefill(params, tokens_d, lens_d, tcache, jax.random.fold_in(key, 0))
    if dcache is not None:
        dcache = dprefill(dparams, tokens_d, lens_d - 1, dcache)
    hist = np.zeros((b, max_len), np.int32)
    hist[:, :width] = tokens
    hist = jnp.asarray(hist).at[jnp.arange(b), lens_d].set(first)
    done = jnp.zeros((b,), bool) if eos_id is None else first == eos_id
    if max_new_tokens == 1:
        done = jnp.ones((b,), bool)
    state = dict(state, tcache=tcache, dcache=dcache, hist=hist, count=lens_d + 1, done=done)
    jax.block_until_ready(state["hist"])
    ttft = time.perf_counter() - t0

    t0 = time.perf_counter()
    while not bool(state["done"].all()):
        state = step(state, params, dparams)
    hist, count = np.asarray(state["hist"]), np.asarray(state["count"])
    decode_s = time.perf_counter() - t0

    out = np.zeros((b, max_new_tokens), np.int32)
    lengths = np.zeros((b,), np.int32)
    for i in range(b):
        row = hist[i, lens[i]:min(count[i], lens[i] + max_new_tokens)]
        if eos_id is not None and (row == eos_id).any():
            row = row[: int(np.argmax(row == eos_id)) + 1]
        lengths[i] = len(row)
        out[i, : len(row)] = row
        if eos_id is not None:
            out[i, len(row):] = eos_id
    return SpecResult(tokens=out, lengths=lengths, accepted=np.asarray(state["accepted"]),
                      rounds=np.asarray(state["rounds"]), gamma=gamma, ttft_s=ttft, decode_s=decode_s,
                      compile_s=compile_s)
