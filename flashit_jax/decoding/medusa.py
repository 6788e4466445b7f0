"""Medusa (Cai et al. 2024): extra decoding heads on the frozen base model propose several future
tokens at once; a tree of their top candidates is verified in one forward pass with tree
attention, and the longest accepted branch is kept.

- Head k (k = 0..K-1) maps the base's last hidden state h_t (after the final norm) to the token
  at t + k + 2 (the base's own head predicts t + 1): a residual block h + SiLU(W h + b) followed
  by the base's (frozen, shared) output head, or a head of its own (`own_head=True`, Medusa-1's
  choice, V x d more parameters per head). W starts at zero, so an untrained head copies the base.
- The candidate tree (`MedusaTree`) lists paths of top-k ranks, one rank per depth: (0, 1) is "head
  0's best token, then head 1's second best". Every node sits in the cache at its own slot and
  attends to the committed context plus its ancestors (an explicit mask, served by the XLA
  attention); its rotary position is the committed length + its depth.
- Greedy acceptance keeps a node while its token equals the target's argmax at its parent, so the
  output equals plain greedy decoding. Sampling uses Medusa's typical acceptance: a candidate is
  kept when the target gives it probability above min(eps, delta * exp(-entropy)); the next token
  is sampled from the target at the deepest kept node. Typical acceptance does *not* preserve the
  target's distribution exactly (that is Medusa's trade: more accepted tokens at high temperature).
- The accepted branch's keys/values are moved from their tree slots to consecutive slots
  (`_move_slots`), then the cache is rolled back past the rest of the tree.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax import nn
from flashit_jax.decoding.drafts import check_rollback
from flashit_jax.decoding.speculative import SpecResult
from flashit_jax.errors import FlashitError
from flashit_jax.generate import Sampling, _bucket, _compiled, sample, warp_logits
from flashit_jax.nn.cache import write_slots


# ----------------------------------------------------------------------------- heads
def init_heads(config, n_heads: int, key: jax.Array, *, own_head: bool = False, dtype=jnp.float32,
               base_params=None) -> dict:
    """K residual blocks with W = 0 (each head starts as a copy of the base's prediction).
    With own_head, each head gets its own [dim, vocab] output layer, initialised from the base's."""
    if n_heads < 1:
        raise FlashitError(f"Medusa needs at least one head, got {n_heads}")
    d = config.dim
    heads = {"heads": {k: {"w": jnp.zeros((d, d), dtype), "b": jnp.zeros((d,), dtype)} for k in range(n_heads)}}
    if own_head:
        if base_params is None:
            raise FlashitError("own_head=True initialises each head's output layer from the base: pass base_params")
        w = base_params["embed"]["w"].T if config.tie_embeddings else base_params["lm_head"]["w"]
        heads["out"] = {k: {"w": jnp.asarray(w, dtype)} for k in range(n_heads)}
    del key  # deterministic init (zeros / copies); kept for a uniform signature
    return heads


def n_heads_of(heads) -> int:
    return len(heads["heads"])


def head_logits(heads, params, config, h: jax.Array) -> jax.Array:
    """fp32 logits [K, B, T, V] of every head for final hidden states h [B, T, d]."""
    zs = []
    for k in range(n_heads_of(heads)):
        p = heads["heads"][k]
        zs.append(h + jax.nn.silu(nn.linear(h, p["w"].astype(h.dtype), p["b"].astype(h.dtype))))
    if "out" in heads:
        lg = jnp.stack([nn.linear_logits(z, heads["out"][k]["w"].astype(h.dtype)) for k, z in enumerate(zs)])
    else:
        # all heads through the shared output layer in one matmul: it is read once, not K times
        z = jnp.stack(zs)
        lg = nn.unembed(z, params["embed"]["w"]) if config.tie_embeddings else nn.linear_logits(z, params["lm_head"]["w"])
    if getattr(config, "final_softcap", None) is not None:
        lg = config.final_softcap * jnp.tanh(lg / config.final_softcap)
    return lg


def base_forward(model, params, tokens, cache=None, positions=None, **kw):
    """model.forward plus the final hidden state [B, T', d] (after the final norm; T' = 1 with logits_at)."""
    logits, cache, aux = model.forward(params, tokens, positions, cache, collect=("hidden",), **kw)
    h = aux["hidden"][-1]
    if kw.get("logits_at") is not None:
        h = h[jnp.arange(h.shape[0]), kw["logits_at"]][:, None]
    c = model.config
    h = nn.rms_norm(h, params["final_norm"]["scale"], c.norm_eps, getattr(c, "norm_offset", 0.0))
    return logits, cache, h


# ----------------------------------------------------------------------------- candidate tree
@dataclasses.dataclass(frozen=True)
class MedusaTree:
    """Candidate paths (tuples of top-k ranks, one per depth); missing prefixes are added."""

    paths: tuple

    @staticmethod
    def from_widths(widths) -> MedusaTree:
        """Every path whose rank at depth i is below widths[i]: (4, 2) gives 4 + 8 nodes."""
        paths, level = [], [()]
        for w in widths:
            level = [p + (r,) for p in level for r in range(int(w))]
            paths += level
        return MedusaTree(tuple(paths))

    @staticmethod
    def parse(spec: str) -> MedusaTree:
        """'4x2x1' -> from_widths((4, 2, 1))."""
        try:
            widths = [int(w) for w in spec.lower().split("x")]
        except ValueError:
            raise FlashitError(f"bad Medusa tree {spec!r}: use top-k widths per depth like '4x2x1'") from None
        if not widths or min(widths) < 1:
            raise FlashitError(f"bad Medusa tree {spec!r}: widths must be >= 1")
        return MedusaTree.from_widths(widths)

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def size(self) -> int:
        return len(_tree_arrays(self.paths)["depth"]) - 1


@functools.cache
def _tree_arrays(paths: tuple) -> dict:
    """Static arrays of a tree; node i + 1 is the i-th path in (depth, ranks) order, 0 the root."""
    full = set()
    for p in paths:
        p = tuple(int(r) for r in p)
        if not p or min(p) < 0:
            raise FlashitError(f"bad Medusa tree path {p}: ranks must be >= 0 and paths non-empty")
        for i in range(1, len(p) + 1):
            full.add(p[:i])
    nodes = [()] + sorted(full, key=lambda p: (len(p), p))
    index = {p: i for i, p in enumerate(nodes)}
    t, k = len(nodes), max(len(p) for p in nodes)
    depth = np.array([len(p) for p in nodes], np.int32)
    parent = np.array([index[p[:-1]] if p else 0 for p in nodes], np.int32)
    rank = np.array([p[-1] if p else 0 for p in nodes], np.int32)
    anc = np.zeros((t, t), bool)  # anc[i, j]: j is i or an ancestor of i
    at_depth = np.zeros((t, k + 1), np.int32)  # at_depth[i, d]: i's ancestor at depth d (d <= depth i)
    for i, p in enumerate(nodes):
        for d in range(len(p) + 1):
            anc[i, index[p[:d]]] = True
            at_depth[i, d] = index[p[:d]]
    topk = [int(rank[depth == d].max()) + 1 for d in range(1, k + 1)]
    return {"depth": depth, "parent": parent, "rank": rank, "anc": anc, "at_depth": at_depth, "topk": topk}


def tree_mask(anc: np.ndarray, lengths: jax.Array, max_len: int) -> jax.Array:
    """bool [B, 1, T, max_len]: tree node i (at slot lengths + i) sees every cached slot below
    `lengths` and the slots of its ancestors and itself."""
    t = anc.shape[0]
    rel = jnp.arange(max_len, dtype=jnp.int32)[None, :] - lengths[:, None]  # [B, S]
    in_tree = (rel >= 0) & (rel < t)
    a = jnp.asarray(anc)[:, jnp.clip(rel, 0, t - 1)]  # [T, B, S]
    return ((rel < 0)[:, None, :] | (in_tree[:, None, :] & jnp.transpose(a, (1, 0, 2))))[:, None]


def _move_slots(cache, src: jax.Array, dst: jax.Array):
    """Copy cache slots src[b, m] -> dst[b, m] in every [B, max_len, ...] buffer of the cache
    (all sources are read before any write)."""
    b = src.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]

    def mv(a):
        if a.ndim < 2 or a.shape[:2] != (b, cache.max_len):
            return a
        return a.at[rows, dst].set(a[rows, src], mode="drop")

    return jax.tree.map(mv, cache)


# ----------------------------------------------------------------------------- acceptance
def accept_typical(probs: jax.Array, cand: jax.Array, eps: float, delta: float) -> jax.Array:
    """Medusa's typical acceptance: bool, whether candidates cand [...] are kept under the target's
    probabilities probs [..., V] at their parents: p(cand) > min(eps, delta * exp(-entropy(p)))."""
    ent = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0), axis=-1)
    thresh = jnp.minimum(jnp.float32(eps), jnp.float32(delta) * jnp.exp(-ent))
    p_cand = jnp.take_along_axis(probs, cand[..., None], axis=-1)[..., 0]
    return p_cand > thresh


def _round(state, params, heads, *, model, tree, sampling, eps, delta, eos_id, max_new, attn_impl):
    ta = _tree_arrays(tree.paths)
    depth, parent, rank, anc, at_depth = (ta[k] for k in ("depth", "parent", "rank", "anc", "at_depth"))
    n_tree, k_max = len(depth), at_depth.shape[1] - 1
    tcache, hist, count, done, plen, h = (state[k] for k in ("tcache", "hist", "count", "done", "plen", "h"))
    b = count.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32)
    key = jax.random.fold_in(state["key"], state["round"])
    lengths = tcache.lengths  # = count - 1: the last committed token x0 is fed now, as the tree's root

    hl = head_logits(heads, params, model.config, h[:, None])[:, :, 0]  # [K, B, V]
    cand = [jax.lax.top_k(hl[d], ta["topk"][d])[1].astype(jnp.int32) for d in range(k_max)]
    node_tok = [hist[rows, count - 1]] + [cand[depth[i] - 1][:, rank[i]] for i in range(1, n_tree)]
    tokens = jnp.stack(node_tok, axis=1)  # [B, T]
    positions = lengths[:, None] + jnp.asarray(depth)[None]
    mask = tree_mask(anc, lengths, tcache.max_len)
    logits, tcache, hid = base_forward(model, params, tokens, tcache, positions, attn_mask=mask, attn_impl=attn_impl)

    par = jnp.asarray(parent)
    if sampling.greedy:
        pred = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, T]
        ok = tokens == pred[:, par]
    else:
        probs = jax.nn.softmax(warp_logits(logits, sampling), axis=-1)
        ok = accept_typical(probs[:, par], tokens, eps, delta)
    ok = ok.at[:, 0].set(True)
    # a node is accepted when it and all its ancestors are
    acc = jnp.all(ok[:, None, :] | ~jnp.asarray(anc)[None], axis=-1)  # [B, T]
    best = jnp.argmax(jnp.where(acc, jnp.asarray(depth)[None], -1), axis=1).astype(jnp.int32)
    n = jnp.asarray(depth)[best]
    if sampling.greedy:
        nxt = pred[rows, best]
    else:
        nxt = sample(logits[rows, best], key, sampling)
    path = jnp.asarray(at_depth)[best]  # [B, K+1] tree indices of the branch (root first)
    path_tok = jnp.take_along_axis(tokens, path, axis=1)[:, 1:]  # [B, K]
    j = jnp.arange(k_max + 1, dtype=jnp.int32)[None]
    emitted = jnp.where(j < n[:, None], jnp.pad(path_tok, ((0, 0), (0, 1))), 0)
    emitted = jnp.where(j == n[:, None], nxt[:, None], emitted)

    active = ~done
    d = jnp.arange(1, k_max + 1, dtype=jnp.int32)[None]
    dst = lengths[:, None] + d
    src = jnp.where(d <= n[:, None], lengths[:, None] + path[:, 1:], dst)
    src = jnp.where(active[:, None], src, dst)
    tcache = _move_slots(tcache, src, dst)
    new_count = jnp.where(active, count + n + 1, count)
    tcache = tcache.rollback(new_count - 1)
    start = jnp.where(active, count, hist.shape[1])
    hist = write_slots(hist[:, :, None, None], emitted[:, :, None, None], start)[:, :, 0, 0]
    h = jnp.where(active[:, None], hid[rows, best], h)
    finished = new_count - plen >= max_new
    if eos_id is not None:
        finished = finished | jnp.any((emitted == eos_id) & (j <= n[:, None]), axis=1)
    return dict(state, tcache=tcache, hist=hist, count=new_count, h=h, done=done | finished,
                accepted=state["accepted"] + jnp.where(active, n, 0),
                rounds=state["rounds"] + active.astype(jnp.int32), round=state["round"] + 1)


@functools.partial(jax.jit, static_argnames=("model", "tree", "sampling", "eps", "delta", "eos_id", "max_new",
                                             "attn_impl", "rounds_per_call", "switches"),
                   donate_argnames=("state",))
def _rounds(state, params, heads, *, rounds_per_call, switches=(), **statics):
    del switches  # a jit cache key only (generate._switches)
    def cond(c):
        return (c[0] < rounds_per_call) & ~jnp.all(c[1]["done"])

    def body(c):
        return c[0] + 1, _round(c[1], params, heads, **statics)

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


@functools.partial(jax.jit, static_argnames=("model", "sampling", "attn_impl", "switches"),
                   donate_argnames=("cache",))
def _prefill(params, tokens, lengths, cache, key, *, model, sampling, attn_impl, switches=()):
    del switches  # a jit cache key only (generate._switches)
    logits, cache, h = base_forward(model, params, tokens, cache, logits_at=lengths - 1, seq_lengths=lengths,
                                    attn_impl=attn_impl)
    return sample(logits[:, 0], key, sampling), cache, h[:, 0]


def check_medusa(model, params, heads) -> None:
    check_rollback(model, "target")
    if "attn_mask" not in inspect.signature(model.family.forward).parameters:
        raise FlashitError(f"{type(model.config).__name__} models take no attention mask; Medusa's tree attention "
                           "needs one")
    d = nn.weight_shape(heads["heads"][0]["w"])
    if d[0] != model.config.dim:
        raise FlashitError(f"the Medusa heads are {d[0]} wide, the model's hidden size is {model.config.dim}")
    if "out" in heads and nn.weight_shape(heads["out"][0]["w"])[1] != nn.weight_shape(params["embed"]["w"])[0]:
        raise FlashitError("the Medusa heads' vocabulary differs from the model's")


def medusa_generate(model, params, heads, prompts, *, tree: MedusaTree | str = "4x2x1", max_new_tokens: int,
                    sampling: Sampling = Sampling(), eos_id: int | None = None, cache_dtype=None, seed: int = 0,
                    max_len: int | None = None, attn_impl: str = "auto", pad_multiple: int = 64,
                    rounds_per_call: int = 8, typical_eps: float = 0.09, typical_delta: float = 0.3) -> SpecResult:
    """Decode with Medusa heads and tree attention. `SpecResult.gamma` is the tree depth (heads used)."""
    tree = MedusaTree.parse(tree) if isinstance(tree, str) else tree
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise FlashitError("Medusa decoding needs at least one prompt, and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise FlashitError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    check_medusa(model, params, heads)
    if tree.depth > n_heads_of(heads):
        raise FlashitError(f"the tree is {tree.depth} deep but there are only {n_heads_of(heads)} Medusa heads")
    if attn_impl == "cudnn":
        raise FlashitError("Medusa's tree attention needs an explicit mask, which the cudnn path does not take")
    b = len(prompts)
    lens = np.array([len(p) for p in prompts], np.int32)
    longest = int(lens.max())
    n_tree = tree.size + 1
    need = longest + max_new_tokens + n_tree + 1
    max_len = max_len or _bucket(need, 128)
    if need > max_len:
        raise FlashitError(f"prompt of {longest} tokens + {max_new_tokens} new tokens + {n_tree} tree slots does "
                           f"not fit the cache of {max_len} positions")
    width = min(_bucket(longest, pad_multiple), max_len)
    tokens = np.zeros((b, width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    if cache_dtype is None:
        cache_dtype = jax.tree.leaves(params["embed"])[0].dtype
    key = jax.random.key(seed)
    cache = model.init_cache(b, max_len, cache_dtype, params=params)
    tokens_d, lens_d = jnp.asarray(tokens), jnp.asarray(lens)
    t0 = time.perf_counter()
    prefill = _compiled(_prefill, params, tokens_d, lens_d, cache, key, model=model, sampling=sampling,
                        attn_impl=attn_impl)
    hdim = jnp.zeros((b, model.config.dim), jax.tree.leaves(params["embed"])[0].dtype)
    state = dict(tcache=cache, hist=jnp.zeros((b, max_len), jnp.int32), count=lens_d + 1, plen=lens_d,
                 done=jnp.zeros((b,), bool), h=hdim, accepted=jnp.zeros((b,), jnp.int32),
                 rounds=jnp.zeros((b,), jnp.int32), round=jnp.int32(0), key=jax.random.fold_in(key, 1))
    statics = dict(model=model, tree=tree, sampling=sampling, eps=float(typical_eps), delta=float(typical_delta),
                   eos_id=eos_id, max_new=max_new_tokens, attn_impl=attn_impl)
    step = _compiled(_rounds, state, params, heads, rounds_per_call=rounds_per_call, **statics)
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    first, cache, h = prefill(params, tokens_d, lens_d, cache, jax.random.fold_in(key, 0))
    hist = np.zeros((b, max_len), np.int32)
    hist[:, :width] = tokens
    hist = jnp.asarray(hist).at[jnp.arange(b), lens_d].set(first)
    done = jnp.zeros((b,), bool) if eos_id is None else first == eos_id
    if max_new_tokens == 1:
        done = jnp.ones((b,), bool)
    state = dict(state, tcache=cache, hist=hist, done=done, h=h.astype(hdim.dtype))
    jax.block_until_ready(state["hist"])
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    while not bool(state["done"].all()):
        state = step(state, params, heads)
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
                      rounds=np.asarray(state["rounds"]), gamma=tree.depth, ttft_s=ttft, decode_s=decode_s,
                      compile_s=compile_s)


# ----------------------------------------------------------------------------- training
def medusa_loss(heads, params, config, h: jax.Array, tokens: jax.Array, valid: jax.Array, decay: float = 0.8):
    """Sum over heads of decay^k x the mean cross-entropy of head k predicting tokens[t + k + 2] from h[t].

    h [B, T, d] the frozen base's final hidden states, tokens int32 [B, T], valid bool [B, T].
    Returns (loss, per-head top-1 accuracy [K])."""
    total, accs = jnp.float32(0.0), []
    t = tokens.shape[1]
    for k in range(n_heads_of(heads)):
        s = k + 2
        sub = {"heads": {0: heads["heads"][k]}, **({"out": {0: heads["out"][k]}} if "out" in heads else {})}
        lg = head_logits(sub, params, config, h[:, : t - s])[0]
        tgt = tokens[:, s:]
        m = (valid[:, s:] & valid[:, : t - s]).astype(jnp.float32)
        logp = jax.nn.log_softmax(lg, axis=-1)
        nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
        denom = jnp.maximum(jnp.sum(m), 1.0)
        total = total + jnp.float32(decay**k) * jnp.sum(nll * m) / denom
        accs.append(jnp.sum((jnp.argmax(lg, axis=-1) == tgt).astype(jnp.float32) * m) / denom)
    return total, jnp.stack(accs)


def make_train_step(model, optimizer, decay: float = 0.8, labels: str = "base"):
    """A jitted step (heads, opt_state, params, tokens, valid) -> (heads, opt_state, loss, accs);
    the base runs forward only (its parameters get no gradient).

    labels "data": heads learn the text's tokens; "base" (self-distillation): the base's greedy
    prediction at every position, which is what greedy decoding will accept."""
    import optax

    if labels not in ("base", "data"):
        raise FlashitError(f"labels must be 'base' or 'data', got {labels!r}")

    @jax.jit
    def step(heads, opt_state, params, tokens, valid):
        logits, _, h = base_forward(model, params, tokens)
        h = jax.lax.stop_gradient(h)
        if labels == "base":
            pred = jnp.argmax(logits[:, :-1], axis=-1).astype(jnp.int32)
            tokens = jnp.concatenate([tokens[:, :1], pred], axis=1)
        loss_fn = lambda hd: medusa_loss(hd, params, model.config, h, tokens, valid, decay)
        (loss, accs), g = jax.value_and_grad(loss_fn, has_aux=True)(heads)
        with jax.numpy_dtype_promotion("standard"):  # optax computes b1 ** count (float ** int32)
            updates, opt_state = optimizer.update(g, opt_state, heads)
        return optax.apply_updates(heads, updates), opt_state, loss, accs

    return step


def save_heads(path, heads, meta: dict) -> Path:
    from safetensors.numpy import save_file

    from flashit_jax import tree as ftree

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {k: np.asarray(jnp.asarray(v, jnp.float32)) for k, v in ftree.flatten(heads).items()}
    save_file(flat, str(path / "medusa_heads.safetensors"))
    (path / "medusa.json").write_text(json.dumps({"n_heads": n_heads_of(heads), "own_head": "out" in heads,
                                                  **meta}, indent=2))
    return path


def load_heads(path, dtype=jnp.float32) -> tuple[dict, dict]:
    """(heads, meta) from a directory written by `save_heads`."""
    from safetensors.numpy import load_file

    from flashit_jax import tree as ftree

    path = Path(path)
    f, m = path / "medusa_heads.safetensors", path / "medusa.json"
    if not f.exists() or not m.exists():
        raise FlashitError(f"{path}: no Medusa heads here (expected medusa_heads.safetensors and medusa.json)")
    flat = {k: jnp.asarray(v, dtype) for k, v in load_file(str(f)).items()}
    return ftree.unflatten(flat), json.loads(m.read_text())
