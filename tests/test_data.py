import json

import numpy as np
import pytest

from flashit_jax import FlashitError
from flashit_jax.data import eval_chunks, load_documents, pack


def test_bundled_splits_exist_and_differ():
    titles = {s: [d.title for d in load_documents("bundled", s)] for s in ("train", "valid", "test")}
    assert titles["valid"] == ["hamlet", "macbeth", "twelfth_night"]
    assert len(titles["train"]) == 36
    assert not set(titles["train"]) & set(titles["valid"])


def test_bundled_valid_is_the_reference_text(reference_llamacpp):
    from conftest import SHARED

    src = SHARED / "data" / "shakespeare" / "valid.jsonl"
    if not src.exists():
        pytest.skip("../shared not present")
    full = {json.loads(l)["title"]: json.loads(l)["text"] for l in src.read_text().splitlines()}
    for d in load_documents("bundled", "valid"):
        assert full[d.title].startswith(d.text) and 0.05 < len(d.text) / len(full[d.title]) < 0.5


def test_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert load_documents(str(tmp_path / "a.txt"))[0].text == "hello world"
    (tmp_path / "valid.jsonl").write_text('{"text": "x y"}\n\n{"title": "t", "text": "z"}\n')
    docs = load_documents(str(tmp_path), "valid")
    assert [d.text for d in docs] == ["x y", "z"] and docs[1].title == "t"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p", "q"]}), tmp_path / "d.parquet")
    assert [d.text for d in load_documents(str(tmp_path / "d.parquet"))] == ["p", "q"]
    with pytest.raises(FlashitError, match="unsupported data file type"):
        (tmp_path / "x.csv").write_text("a")
        load_documents(str(tmp_path / "x.csv"))
    with pytest.raises(FlashitError, match="unknown split"):
        load_documents("bundled", "dev")


def test_eval_chunks_drop_tail_and_set_bos():
    toks = list(range(10, 35))  # 25 tokens
    c = eval_chunks(toks, 8, None)
    assert c.shape == (3, 8) and c[1, 0] == 18 and c[-1, -1] == 33
    b = eval_chunks(toks, 8, bos_id=1, max_chunks=2)
    assert b.shape == (2, 8) and (b[:, 0] == 1).all() and b[1, 1] == 19


def test_pack_is_deterministic_and_segmented():
    docs = [list(range(1, 6)), list(range(10, 13)), list(range(20, 31))]
    a = pack(docs, 8, seed=0, eos_id=99)
    b = pack(docs, 8, seed=0, eos_id=99)
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.segment_ids, b.segment_ids)
    # every real token appears exactly once, eos after each doc
    real = a.tokens[a.segment_ids > 0].tolist()
    assert sorted(real) == sorted(sum(docs, []) + [99] * 3)
    # positions restart per segment; the loss never crosses a segment boundary
    for r in range(a.tokens.shape[0]):
        for s in set(a.segment_ids[r]) - {0}:
            idx = np.where(a.segment_ids[r] == s)[0]
            assert a.positions[r, idx].tolist() == list(range(len(idx)))
            assert not a.loss_mask[r, idx[-1]]
    c = pack(docs, 8, seed=1, eos_id=99)
    assert sorted(c.tokens[c.segment_ids > 0].tolist()) == sorted(real)
