"""Calibration: statistics of the input of every linear layer, from a forward pass over a corpus.

`forward(..., collect=("inputs",))` hands back each linear's input; they are reduced inside
the jitted step to what the methods need, so activations never pile up in memory:

    h       sum_t x_t x_t^T [K, K]   GPTQ's Hessian; AWQ's output-error metric
    absmax  max_t |x_t| [K]          SmoothQuant
    abssum  sum_t |x_t| [K]          AWQ's activation salience (mean |x|)

Linears that read the same tensor (q/k/v, gate/up) share one entry. Statistics come from the
unquantized model in one pass (no layer-by-layer re-collection).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashit_jax.errors import FlashitError


@dataclasses.dataclass
class InputStats:
    h: Any
    absmax: Any
    abssum: Any
    count: int

    def scaled(self, s) -> "InputStats":
        """Statistics of x / s (after a per-channel scale s was folded into the producer)."""
        s = jnp.asarray(s, jnp.float32)
        return InputStats(self.h / (s[:, None] * s[None, :]), self.absmax / s, self.abssum / s, self.count)

    @property
    def absmean(self):
        return self.abssum / max(self.count, 1)


@dataclasses.dataclass
class Calibration:
    stats: dict[str, InputStats]  # keyed by the linear's path without "/w" (e.g. "layers/0/attn/q")
    n_tokens: int
    source: dict = dataclasses.field(default_factory=dict)
    config: Any = None  # the model's config (smoothing needs head_dim and the norm's offset)

    def get(self, path: str) -> InputStats:
        key = path[:-2] if path.endswith("/w") else path
        if key not in self.stats:
            raise FlashitError(f"no calibration statistics for {key!r} (calibrated: {len(self.stats)} linears)")
        return self.stats[key]

    def describe(self) -> dict:
        return {"n_tokens": self.n_tokens, **self.source}


def _reduce(x):
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    ax = jnp.abs(x)
    h = jnp.einsum("tk,tj->kj", x, x, precision=jax.lax.Precision.HIGHEST)
    return h, jnp.max(ax, axis=0), jnp.sum(ax, axis=0)


def _step_fn(model):
    aliases: dict[str, str] = {}

    @jax.jit
    def step(params, tokens):
        _, _, aux = model.forward(params, tokens, collect=("inputs",))
        out, first_of = {}, {}
        for name, x in aux["inputs"].items():
            owner = first_of.setdefault(id(x), name)
            aliases[name] = owner
            if owner == name:
                out[name] = _reduce(x)
        return out

    return step, aliases


def calibrate(model, params, tokens, *, batch_size: int = 4, progress: bool = True, source: dict | None = None
              ) -> Calibration:
    """Statistics over `tokens` int32 [S, T] (S sequences of T tokens)."""
    from tqdm.auto import tqdm

    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise FlashitError(f"calibration tokens must be a non-empty [sequences, length] array, got {tokens.shape}")
    step, aliases = _step_fn(model)
    bs = min(batch_size, len(tokens))
    total = None
    n = 0
    for i in tqdm(range(0, len(tokens) - len(tokens) % bs, bs), desc="calibration", unit="batch", disable=not progress):
        out = step(params, jnp.asarray(tokens[i: i + bs]))
        if total is None:
            total = out
        else:
            total = {k: (a[0] + out[k][0], jnp.maximum(a[1], out[k][1]), a[2] + out[k][2]) for k, a in total.items()}
        n += bs * tokens.shape[1]
    stats = {}
    shared = {}
    for name, owner in aliases.items():
        if owner not in shared:
            h, amax, asum = total[owner]
            shared[owner] = InputStats(h, amax, asum, n)
        stats[name] = shared[owner]
    return Calibration(stats, n, dict(source or {}, sequences=int(len(tokens) - len(tokens) % bs),
                                      seq_len=int(tokens.shape[1])), config=model.config)


def calibration_tokens(tokenizer, docs, *, n_seqs: int, seq_len: int, seed: int = 0) -> np.ndarray:
    """`n_seqs` random windows of `seq_len` tokens from the documents (BOS first if the tokenizer adds it)."""
    from flashit_jax.data import eval_chunks

    bos = tokenizer.bos_id if tokenizer.add_bos else None
    chunks = [eval_chunks(tokenizer.encode(d.text), seq_len, bos) for d in docs]
    chunks = np.concatenate([c for c in chunks if len(c)]) if any(len(c) for c in chunks) else np.zeros((0, seq_len))
    if len(chunks) == 0:
        raise FlashitError(f"no calibration document is at least {seq_len} tokens long")
    if len(chunks) < n_seqs:
        raise FlashitError(f"asked for {n_seqs} calibration sequences of {seq_len} tokens; the data holds {len(chunks)}")
    pick = np.random.default_rng(seed).choice(len(chunks), n_seqs, replace=False)
    return chunks[np.sort(pick)].astype(np.int32)
