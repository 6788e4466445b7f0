"""Q4_K and Q6_K tensors decode as ggml's dequantize_row_q4_K / _q6_K define them.

The gguf package cannot quantize k-quants, so random blocks are written raw and decoded by an
independent transcription of ggml's C reference below.
"""
import numpy as np
import pytest

from flashit_jax.loading.gguf_file import dequantize, open_reader

ROWS = 3


def _q4k_ref(block: bytes) -> np.ndarray:
    d, dmin = np.frombuffer(block[:4], np.float16).astype(np.float32)
    sc, qs = block[4:16], block[16:144]

    def scale_min(j):
        if j < 4:
            return sc[j] & 63, sc[j + 4] & 63
        return (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

    out, q, is_ = [], 0, 0
    for _ in range(4):
        s1, m1 = scale_min(is_)
        s2, m2 = scale_min(is_ + 1)
        out += [d * s1 * (qs[q + l] & 0xF) - dmin * m1 for l in range(32)]
        out += [d * s2 * (qs[q + l] >> 4) - dmin * m2 for l in range(32)]
        q += 32
        is_ += 2
    return np.asarray(out, np.float32)


def _q6k_ref(block: bytes) -> np.ndarray:
    ql, qh = block[:128], block[128:192]
    sc = np.frombuffer(block[192:208], np.int8).astype(np.float32)
    d = np.frombuffer(block[208:210], np.float16).astype(np.float32)[0]
    y = np.zeros(256, np.float32)
    for half in range(2):
        o, lo, ho, so = 128 * half, 64 * half, 32 * half, 8 * half
        for l in range(32):
            i = l // 16
            q1 = ((ql[lo + l] & 0xF) | (((qh[ho + l] >> 0) & 3) << 4)) - 32
            q2 = ((ql[lo + l + 32] & 0xF) | (((qh[ho + l] >> 2) & 3) << 4)) - 32
            q3 = ((ql[lo + l] >> 4) | (((qh[ho + l] >> 4) & 3) << 4)) - 32
            q4 = ((ql[lo + l + 32] >> 4) | (((qh[ho + l] >> 6) & 3) << 4)) - 32
            y[o + l] = d * sc[so + i] * q1
            y[o + l + 32] = d * sc[so + i + 2] * q2
            y[o + l + 64] = d * sc[so + i + 4] * q3
            y[o + l + 96] = d * sc[so + i + 6] * q4
    return y


def _blocks(kind: str, rng) -> np.ndarray:
    size = {"Q4_K": 144, "Q6_K": 210}[kind]
    raw = rng.integers(0, 256, size=(ROWS, size), dtype=np.uint8)
    scale = np.asarray(rng.uniform(0.01, 0.1, size=(ROWS, 2)), np.float16).view(np.uint8)
    if kind == "Q4_K":
        raw[:, :4] = scale
    else:
        raw[:, 208:210] = scale[:, :2]
    return raw


@pytest.mark.parametrize("kind,ref", [("Q4_K", _q4k_ref), ("Q6_K", _q6k_ref)])
def test_kquant_dequantize(kind, ref, tmp_path):
    import gguf

    raw = _blocks(kind, np.random.default_rng(0))
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.ffn_down.weight", raw, raw_dtype=getattr(gguf.GGMLQuantizationType, kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = open_reader(path).tensors[0]
    got = dequantize(t)
    want = np.stack([ref(bytes(row)) for row in raw])
    assert got.shape == (ROWS, 256)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert np.abs(want).max() > 0.1
