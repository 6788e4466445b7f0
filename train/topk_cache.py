"""The teacher's top-k logits per token, computed once and kept on disk (tensorstore, zarr).

Sparse-logit distillation (SLIM-style) needs only the teacher's k largest logits and their
indices. Running the teacher over the corpus once and reading the cache each epoch removes
the teacher from the training step. Layout under DIR:

    values/   zarr [N, L, k] float32 or bfloat16   (N packed rows of L tokens)
    indices/  zarr [N, L, k] int32
    done/     zarr [N] uint8: rows written (a killed build resumes where it stopped)
    meta.json teacher, data fingerprint, k: a cache built for other rows or another teacher is refused
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flashit_jax.errors import FlashitError


_ZARR_DTYPES = {"float32": "<f4", "bfloat16": "bfloat16", "int32": "<i4", "uint8": "|u1"}


def _spec(path: Path, name: str, dtype: str | None = None, shape=None, chunks=None) -> dict:
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": str(path / name)}}
    if dtype is not None:
        spec["metadata"] = {"dtype": _ZARR_DTYPES[dtype], "shape": list(shape), "chunks": list(chunks),
                            "compressor": {"id": "zstd", "level": 1}}
    return spec


class TopKCache:
    def __init__(self, path: Path, values, indices, done, meta: dict):
        self.path, self.values, self.indices, self.done, self.meta = path, values, indices, done, meta

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @classmethod
    def open_or_create(cls, path, *, n_rows: int, seq_len: int, k: int, meta: dict,
                       dtype: str = "float32", rows_per_chunk: int = 16) -> "TopKCache":
        """Open the cache at `path` if its meta matches `meta`, else create it (an existing cache for
        other rows / another teacher is an error, never overwritten)."""
        import tensorstore as ts

        path = Path(path)
        if dtype not in ("float32", "bfloat16"):
            raise FlashitError(f"top-k cache values are float32 or bfloat16, not {dtype!r}")
        full = {**meta, "k": k, "n_rows": n_rows, "seq_len": seq_len, "dtype": dtype}
        mpath = path / "meta.json"
        if mpath.exists():
            old = json.loads(mpath.read_text())
            diff = sorted(key for key in set(old) | set(full) if old.get(key) != full.get(key))
            if diff:
                raise FlashitError(f"{path}: this top-k cache was built for other settings ({', '.join(diff)} "
                                   "differ); choose another --topk-cache directory or delete this one")
            create = False
        else:
            if path.exists() and any(path.iterdir()):
                raise FlashitError(f"{path}: exists and is not a top-k cache (no meta.json); refusing to write there")
            create = True
        shape, chunks = (n_rows, seq_len, k), (min(rows_per_chunk, n_rows), seq_len, k)
        opened = []
        for name, dt, shp, ch in (("values", dtype, shape, chunks), ("indices", "int32", shape, chunks),
                                  ("done", "uint8", (n_rows,), (n_rows,))):
            opened.append(ts.open(_spec(path, name, dt if create else None, shp, ch), create=create,
                                  open=not create).result())
        if create:
            path.mkdir(parents=True, exist_ok=True)
            mpath.write_text(json.dumps(full, indent=2))
        return cls(path, *opened, full)

    def missing_rows(self) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.done.read().result()) == 0)

    def write(self, row_ids: np.ndarray, values: np.ndarray, indices: np.ndarray) -> None:
        row_ids = np.asarray(row_ids)
        vals = np.asarray(values).astype(self.values.dtype.numpy_dtype)
        self.values.oindex[row_ids].write(vals).result()
        self.indices.oindex[row_ids].write(np.asarray(indices, np.int32)).result()
        # `done` last: a row is marked only once both of its arrays are on disk
        self.done.oindex[row_ids].write(np.ones(len(row_ids), np.uint8)).result()

    def read(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        row_ids = np.asarray(row_ids)
        v = self.values.oindex[row_ids].read()
        i = self.indices.oindex[row_ids].read()
        return np.asarray(v.result(), np.float32), np.asarray(i.result())


def build(cache: TopKCache, topk_fn, rows, *, batch_size: int = 8, progress: bool = True,
          only: np.ndarray | None = None) -> None:
    """Fill the missing rows (of `only`, when given): topk_fn(batch dict) -> (values, indices) [b, L, k]."""
    from tqdm.auto import tqdm

    todo = cache.missing_rows()
    if only is not None:
        todo = np.intersect1d(todo, only)
    for s in tqdm(range(0, len(todo), batch_size), desc="teacher top-k", unit="batch", disable=not progress):
        ids = todo[s: s + batch_size]
        b = rows.rows(ids)
        pad = batch_size - len(ids)  # keep one compiled shape
        if pad:
            b = {key: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for key, v in b.items()}
        vals, idx = topk_fn(b)
        cache.write(ids, np.asarray(vals)[: len(ids)], np.asarray(idx)[: len(ids)])
