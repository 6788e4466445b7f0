"""Training batches: a corpus tokenized once, packed into fixed-length rows, read in an order that
is a pure function of (seed, step), so a resumed run sees exactly the batches it would have seen.

Row r of the stream is row `perm_e[r % N]` of the packed set, e = r // N the epoch and perm_e a
permutation drawn from (seed, e). Step s uses stream rows [s * B, (s + 1) * B).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from flashit_jax.data import PackedBatch, load_documents, pack
from flashit_jax.errors import FlashitError


@dataclasses.dataclass
class TokenRows:
    packed: PackedBatch
    seed: int
    fingerprint: str  # of the corpus, tokenizer and packing: names the rows (top-k cache key)

    @property
    def n_rows(self) -> int:
        return len(self.packed.tokens)

    @property
    def seq_len(self) -> int:
        return self.packed.tokens.shape[1]

    @property
    def n_tokens(self) -> int:
        return int(self.packed.loss_mask.sum())

    def permutation(self, epoch: int) -> np.ndarray:
        if getattr(self, "_perm_epoch", None) != epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_rows)
            self._perm_epoch = epoch
        return self._perm

    def stream_ids(self, start: int, stop: int) -> np.ndarray:
        """Packed-row indices of stream positions [start, stop)."""
        r = np.arange(start, stop, dtype=np.int64)
        epochs, within = r // self.n_rows, r % self.n_rows
        out = np.empty_like(r)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[within[sel]]
        return out

    def row_ids(self, step: int, batch_size: int) -> np.ndarray:
        """Packed-row indices of the global batch of `step`."""
        return self.stream_ids(step * batch_size, (step + 1) * batch_size)

    def rows(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        p = self.packed
        tokens = p.tokens[ids]
        targets = np.zeros_like(tokens)
        targets[:, :-1] = tokens[:, 1:]
        return {"tokens": tokens, "targets": targets, "segment_ids": p.segment_ids[ids],
                "positions": p.positions[ids], "loss_mask": p.loss_mask[ids], "row_ids": ids.astype(np.int32)}


def _tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.tok.to_str().encode()).hexdigest()[:16]


def load_rows(spec: str, split: str, tokenizer, seq_len: int, seed: int, cache_dir: Path | None = None) -> TokenRows:
    """Tokenize and pack a corpus (cached as .npz under cache_dir, keyed by everything that shapes it)."""
    if tokenizer is None:
        raise FlashitError("training needs a tokenizer: the model has none (random weights?)")
    if seq_len < 8:
        raise FlashitError(f"seq_len must be at least 8, got {seq_len}")
    docs = load_documents(spec, split)
    h = hashlib.sha256()
    for d in docs:
        h.update(d.text.encode())
        h.update(b"\0")
    key = json.dumps({"corpus": h.hexdigest(), "tok": _tokenizer_hash(tokenizer), "seq_len": seq_len, "seed": seed,
                      "add_bos": tokenizer.add_bos, "eos": tokenizer.eos_id, "v": 1}, sort_keys=True)
    fp = hashlib.sha256(key.encode()).hexdigest()[:20]
    path = None if cache_dir is None else Path(cache_dir) / f"packed-{fp}.npz"
    if path is not None and path.exists():
        z = np.load(path)
        packed = PackedBatch(z["tokens"], z["segment_ids"], z["positions"], z["loss_mask"])
    else:
        toks = tokenizer.encode_batch([d.text for d in docs])
        if sum(len(t) for t in toks) < 2:
            raise FlashitError(f"data {spec!r} (split {split!r}) tokenizes to fewer than 2 tokens")
        packed = pack(toks, seq_len, seed=seed, eos_id=tokenizer.eos_id)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, tokens=packed.tokens, segment_ids=packed.segment_ids, positions=packed.positions,
                     loss_mask=packed.loss_mask)
            tmp.replace(path)
    if not packed.loss_mask.any():
        raise FlashitError(f"data {spec!r} (split {split!r}) has no token to predict")
    return TokenRows(packed, seed, fp)
