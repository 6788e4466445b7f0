"""SentencePiece-style GGUF vocabularies (tokenizer.ggml.model = llama) tokenize like sentencepiece."""
import numpy as np
import pytest

spm = pytest.importorskip("sentencepiece")

from flashit_jax.data import load_documents  # noqa: E402
from flashit_jax.loading.tokenizer import (  # noqa: E402
    _BYTE, _CONTROL, _NORMAL, _UNKNOWN, _UNUSED, Tokenizer, _spm_from_gguf,
)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    text = load_documents("bundled", "train")[0].text[:60000]
    (d / "corpus.txt").write_text(text)
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "m"), vocab_size=600,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   num_threads=1, minloglevel=2)
    return spm.SentencePieceProcessor(model_file=str(d / "m.model"))


def _gguf_fields(sp):
    """What llama.cpp's converter writes for a sentencepiece vocabulary."""
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(_UNKNOWN if sp.is_unknown(i) else _CONTROL if sp.is_control(i) else
                     _UNUSED if sp.is_unused(i) else _BYTE if sp.is_byte(i) else _NORMAL)
    return tokens, types, scores


def test_spm_vocab_matches_sentencepiece(sp_model):
    tokens, types, scores = _gguf_fields(sp_model)
    tok = Tokenizer(_spm_from_gguf(tokens, types, scores, add_space_prefix=True), bos_id=sp_model.bos_id(),
                    eos_id=sp_model.eos_id(), add_bos=True)
    lines = [l for l in load_documents("bundled", "valid")[0].text.splitlines() if l.strip()][:300]
    lines += ["Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich ✓ 42"]  # byte fallback
    mism = 0
    for line in lines:
        want = sp_model.encode(line)
        got = tok.encode(line, add_bos=False)
        mism += got != want
        assert tok.decode(got) == line
    assert mism == 0, f"{mism}/{len(lines)} lines tokenized differently"
    assert tok.encode("a")[0] == sp_model.bos_id()
    assert np.mean([len(sp_model.encode(l)) for l in lines]) > 2
