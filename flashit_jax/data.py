"""Corpora for evaluation and training.

`--data` accepts: `bundled` (default; a slice of public-domain Shakespeare plays shipped with
the package), a .jsonl file (one document per line, field `text`), a .txt file (one document),
a .parquet file (column `text`), a directory holding {train,valid,test}.jsonl (choose with
`split`), or `hf:NAME[:CONFIG]` (a `datasets` dataset; `split` as there).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from flashit_jax.errors import FlashitError

BUNDLED_DIR = Path(__file__).parent / "data_files" / "shakespeare"
SPLITS = ("train", "valid", "test")


@dataclasses.dataclass(frozen=True)
class Document:
    title: str
    text: str


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FlashitError(f"{path}:{n}: invalid JSON: {e}") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise FlashitError(f"{path}:{n}: each line needs a string field 'text'")
            docs.append(Document(str(row.get("title", f"{path.stem}-{n}")), row["text"]))
    return docs


def _read_parquet(path: Path) -> list[Document]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:
        raise FlashitError(f"{path}: cannot read parquet: {e}") from None
    if "text" not in table.column_names:
        raise FlashitError(f"{path}: parquet file has no 'text' column (columns: {table.column_names})")
    titles = table.column("title").to_pylist() if "title" in table.column_names else None
    return [Document(str(titles[i]) if titles else f"{path.stem}-{i}", t)
            for i, t in enumerate(table.column("text").to_pylist()) if t is not None]


def _read_hf(spec: str, split: str) -> list[Document]:
    import datasets

    name, _, config = spec[3:].partition(":")
    hf_split = {"valid": "validation"}.get(split, split)
    try:
        ds = datasets.load_dataset(name, config or None, split=hf_split)
    except Exception as e:
        raise FlashitError(f"cannot load dataset {spec!r} split {hf_split!r}: {e}") from None
    if "text" not in ds.column_names:
        raise FlashitError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    return [Document(f"{name}-{i}", t) for i, t in enumerate(ds["text"]) if t]


def load_documents(spec: str = "bundled", split: str = "valid") -> list[Document]:
    """Documents of a corpus; raises FlashitError if the source is missing or empty."""
    if split not in SPLITS and not spec.startswith("hf:"):
        raise FlashitError(f"unknown split {split!r}; use one of {SPLITS}")
    if spec == "bundled":
        docs = _read_jsonl(BUNDLED_DIR / f"{split}.jsonl")
    elif spec.startswith("hf:"):
        docs = _read_hf(spec, split)
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            raise FlashitError(f"data {spec!r}: no such file or directory (or use 'bundled' / 'hf:NAME')")
        if path.is_dir():
            f = path / f"{split}.jsonl"
            if not f.exists():
                raise FlashitError(f"{path}: no {split}.jsonl in this directory")
            docs = _read_jsonl(f)
        elif path.suffix == ".jsonl":
            docs = _read_jsonl(path)
        elif path.suffix == ".txt":
            docs = [Document(path.stem, path.read_text(encoding="utf-8"))]
        elif path.suffix == ".parquet":
            docs = _read_parquet(path)
        else:
            raise FlashitError(f"{path}: unsupported data file type {path.suffix!r} (.jsonl, .txt, .parquet)")
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise FlashitError(f"data {spec!r} (split {split!r}) holds no non-empty documents")
    return docs


def eval_chunks(tokens: list[int], ctx: int, bos_id: int | None, max_chunks: int | None = None) -> np.ndarray:
    """llama.cpp's perplexity chunks of one document: [n, ctx], the short tail dropped; position 0
    of each chunk becomes BOS when `bos_id` is given (the tokenizer adds BOS)."""
    n = len(tokens) // ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    chunks = np.asarray(tokens[: n * ctx], np.int32).reshape(n, ctx)
    if bos_id is not None and n:
        chunks[:, 0] = bos_id
    return chunks


@dataclasses.dataclass
class PackedBatch:
    tokens: np.ndarray  # int32 [N, L]
    segment_ids: np.ndarray  # int32 [N, L]; 0 marks padding
    positions: np.ndarray  # int32 [N, L], restarting at 0 in each segment
    loss_mask: np.ndarray  # bool [N, L]: predict token t+1 from t within one segment


def pack(docs_tokens: list[list[int]], seq_len: int, *, seed: int | None = 0, eos_id: int | None = None) -> PackedBatch:
    """Pack tokenized documents into fixed-length rows with segment ids, deterministically.

    Documents longer than a row are split into row-sized pieces; pieces are shuffled with
    `seed` (None keeps order) and placed greedily, so the same inputs give the same batch.
    """
    pieces = []
    for toks in docs_tokens:
        toks = list(toks) + ([eos_id] if eos_id is not None else [])
        for i in range(0, len(toks), seq_len):
            if len(toks[i: i + seq_len]) >= 2:
                pieces.append(toks[i: i + seq_len])
    if not pieces:
        raise FlashitError("nothing to pack: every document is shorter than 2 tokens")
    if seed is not None:
        order = np.random.default_rng(seed).permutation(len(pieces))
        pieces = [pieces[i] for i in order]
    rows: list[list[list[int]]] = []
    fill: list[int] = []
    for p in pieces:  # first fit keeps rows dense without reordering much
        for r, used in enumerate(fill):
            if used + len(p) <= seq_len:
                rows[r].append(p)
                fill[r] += len(p)
                break
        else:
            rows.append([p])
            fill.append(len(p))
    n = len(rows)
    tokens = np.zeros((n, seq_len), np.int32)
    seg = np.zeros((n, seq_len), np.int32)
    pos = np.zeros((n, seq_len), np.int32)
    for r, row in enumerate(rows):
        off = 0
        for s, p in enumerate(row, 1):
            tokens[r, off: off + len(p)] = p
            seg[r, off: off + len(p)] = s
            pos[r, off: off + len(p)] = np.arange(len(p))
            off += len(p)
    loss_mask = np.zeros((n, seq_len), bool)
    loss_mask[:, :-1] = (seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)
    return PackedBatch(tokens, seg, pos, loss_mask)
