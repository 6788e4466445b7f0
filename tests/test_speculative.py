"""Speculative decoding and prompt lookup: exact greedy output, the target's sampling
distribution, per-row acceptance in a batch, cache rollback, bad input."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError
from flashit_jax.decoding import (
    Draft,
    Lookup,
    layer_skip_draft,
    parse_layers,
    speculative_generate,
)
from flashit_jax.generate import Sampling, generate, warp_logits
from models import Model
from models.llama import LlamaConfig

CFG = LlamaConfig(vocab_size=97, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=True)
F32 = dict(cache_dtype=jnp.float32)


def _scaled(params, s=20.0):
    # larger weights than the 0.02 init, so that greedy paths are diverse rather than one repeated token
    return jax.tree.map(lambda x: x * s if x.ndim == 2 else x, params)


@pytest.fixture(scope="module")
def tiny():
    m = Model(CFG)
    return m, _scaled(m.init_params(jax.random.key(1)))


@pytest.fixture(scope="module")
def other_draft():
    """An unrelated small model of the same vocabulary: most drafts get rejected."""
    m = Model(LlamaConfig(vocab_size=97, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32))
    return Draft(m, _scaled(m.init_params(jax.random.key(7))))


def _prompts(n, seed=0, vocab=97):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p = rng.integers(0, vocab, int(rng.integers(1, 24))).tolist()
        if i % 3 == 0:  # some repetition, so that lookup finds n-grams in the prompt
            p = (p[:5] * 4)[: max(len(p), 6)]
        out.append(p)
    return out


@pytest.mark.parametrize("gamma", [1, pytest.param(4, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow),
                                   pytest.param(7, marks=pytest.mark.slow)])
def test_greedy_draft_models_equal_plain_greedy(tiny, other_draft, gamma):
    m, p = tiny
    prompts = _prompts(12, seed=gamma)
    want = generate(m, p, prompts, max_new_tokens=24, **F32).tokens
    assert len(np.unique(want)) > 30  # diverse paths, not one repeated token
    drafts = {"other": other_draft, "skip": layer_skip_draft(m, p, "0+3"), "self": Draft(m, p)}
    rates = {}
    for name, d in drafts.items():
        r = speculative_generate(m, p, prompts, draft=d, gamma=gamma, max_new_tokens=24, **F32)
        np.testing.assert_array_equal(r.tokens, want, err_msg=f"{name} gamma={gamma}")
        assert (r.lengths == 24).all()
        rates[name] = r.acceptance_rate
    assert rates["self"] == 1.0  # the target drafting for itself: every draft accepted
    assert rates["other"] < 0.5


def test_greedy_lookup_equals_plain_greedy(tiny):
    m, p = tiny
    for gamma in (1, 2, 5, 8):
        prompts = _prompts(12, seed=10 + gamma)
        want = generate(m, p, prompts, max_new_tokens=24, **F32).tokens
        r = speculative_generate(m, p, prompts, draft=Lookup(ngram=3), gamma=gamma, max_new_tokens=24, **F32)
        np.testing.assert_array_equal(r.tokens, want, err_msg=f"gamma={gamma}")
        assert 0.0 < r.acceptance_rate < 1.0


def test_batch_rows_accept_independently(tiny):
    m, p = tiny
    prompts = _prompts(6, seed=11)
    draft = layer_skip_draft(m, p, [0, 1, 3])
    batch = speculative_generate(m, p, prompts, draft=draft, gamma=3, max_new_tokens=20, **F32)
    assert len(set(batch.accepted.tolist())) > 1  # rows accepted different numbers of drafts
    for i, pr in enumerate(prompts):
        one = speculative_generate(m, p, [pr], draft=draft, gamma=3, max_new_tokens=20, **F32)
        np.testing.assert_array_equal(one.tokens[0], batch.tokens[i])
        assert one.accepted[0] == batch.accepted[i] and one.rounds[0] == batch.rounds[i]


@pytest.mark.slow  # 15 s on 2 cores (2026-12-05): plain decoding's EOS stays (tests/test_generate.py)
def test_eos_stops_each_row(tiny):
    m, p = tiny
    prompts = _prompts(5, seed=3)
    free = generate(m, p, prompts, max_new_tokens=16, **F32).tokens
    eos = int(free[0, 4])
    want = generate(m, p, prompts, max_new_tokens=16, eos_id=eos, **F32)
    for d in (layer_skip_draft(m, p, "0-1"), Lookup(2)):
        r = speculative_generate(m, p, prompts, draft=d, gamma=3, max_new_tokens=16, eos_id=eos, **F32)
        np.testing.assert_array_equal(r.tokens, want.tokens)
        np.testing.assert_array_equal(r.lengths, want.lengths)


def test_lookup_accepts_a_repeating_continuation(tiny):
    m = tiny[0]
    p = _scaled(m.init_params(jax.random.key(1)), 8.0)  # smaller weights: some continuations loop
    # find prompts whose greedy continuation falls into a loop; there lookup should accept most drafts
    prompts = _prompts(20, seed=5)
    out = generate(m, p, prompts, max_new_tokens=48, **F32).tokens
    tail_period = [min((k for k in range(1, 9) if (row[-16:] == np.roll(row, k)[-16:]).all()), default=0)
                   for row in out]
    loopers = [pr for pr, k in zip(prompts, tail_period) if k]
    assert loopers, "no looping continuation among the prompts"
    r = speculative_generate(m, p, loopers, draft=Lookup(ngram=2), gamma=6, max_new_tokens=48, **F32)
    want = generate(m, p, loopers, max_new_tokens=48, **F32).tokens
    np.testing.assert_array_equal(r.tokens, want)
    assert r.tokens_per_step > 2.0


def test_lookup_drafts_copy_the_latest_longest_match():
    from flashit_jax.decoding.lookup import lookup_drafts

    hist = np.zeros((4, 16), np.int32)
    rows = [
        [7, 1, 2, 3, 9, 1, 2, 4, 5, 1, 2],  # "1 2" last seen followed by 4 5 (most recent match wins)
        [7, 5, 6, 8, 2, 5, 6, 9, 9, 3, 5, 6, 8],  # "5 6 8" (trigram) beats the later bigram "5 6 9"
        [3, 4, 3, 4, 3],  # "4 3" at 1..2: copy "4 3 4 3 ..." by repeating the period past the end
        [1, 2, 3],  # no earlier occurrence of anything
    ]
    for i, r in enumerate(rows):
        hist[i, : len(r)] = r
    count = jnp.asarray([len(r) for r in rows], jnp.int32)
    d, found = lookup_drafts(jnp.asarray(hist), count, 4, Lookup(ngram=3))
    assert found.tolist() == [True, True, True, False]
    assert np.asarray(d[:3]).tolist() == [[4, 5, 1, 2], [2, 5, 6, 9], [4, 3, 4, 3]]
    d1, _ = lookup_drafts(jnp.asarray(hist), count, 3, Lookup(ngram=3, min_ngram=3))
    assert np.asarray(d1[1]).tolist() == [2, 5, 6]


def _exact_joint(m, params, prompt, n, sampling):
    """P(t_1..t_n | prompt) for every continuation, from full forward passes over all of them."""
    v = m.config.vocab_size
    seqs = np.array(list(itertools.product(range(v), repeat=n)), np.int32)
    toks = np.concatenate([np.tile(np.asarray(prompt, np.int32), (len(seqs), 1)), seqs], axis=1)
    logits, _, _ = m.forward(params, jnp.asarray(toks))
    logp = jax.nn.log_softmax(warp_logits(logits, sampling), axis=-1)
    lp = np.asarray(logp)[:, len(prompt) - 1: -1]  # the distribution of each t_i
    return np.exp(np.take_along_axis(lp, seqs[..., None], axis=-1)[..., 0].sum(1))


def _chi2_pvalue(counts, probs, min_expected=5.0):
    """Pearson chi-square with the cells expected below `min_expected` pooled into one."""
    from scipy.stats import chi2

    n = counts.sum()
    probs = probs.astype(np.float64) / probs.sum()
    big = probs * n >= min_expected
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(probs[big], probs[~big].sum()) * n
    stat = np.sum((obs - exp) ** 2 / np.maximum(exp, 1e-300))
    return float(chi2.sf(stat, len(obs) - 1))


# the draft-model case (57 s on the 2-core CI machine) in the slow set; the lookup drafter keeps the check here
@pytest.mark.parametrize("drafter", [pytest.param("model", marks=pytest.mark.slow), "lookup"])
def test_sampling_matches_the_target_distribution(drafter):
    """Joint distribution of 3 sampled tokens over an 8-token vocabulary, 20000 samples.

    Tolerance (fixed seed, so deterministic): a chi-square goodness-of-fit p-value above 1e-3,
    and a total variation no larger than the 99.9th percentile of the TV of 20000 exact draws
    from the target's distribution (about 0.045 here: 216 cells are possible under top-k 6).
    The same test rejects the draft's own distribution (p < 1e-12), so it has the power to
    catch a wrong acceptance rule."""
    cfg = LlamaConfig(vocab_size=8, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, tie_embeddings=True)
    m = Model(cfg)
    target = _scaled(m.init_params(jax.random.key(3)), 8.0)
    s = Sampling(temperature=0.9, top_k=6)
    prompt = [1, 2, 1, 2, 1]
    n, nsamp = 3, 20000
    if drafter == "model":
        dm = Model(dataclasses_replace(cfg, n_layers=1))
        draft = Draft(dm, _scaled(dm.init_params(jax.random.key(4)), 8.0))
    else:
        draft = Lookup(ngram=2)
    r = speculative_generate(m, target, [prompt] * nsamp, draft=draft, gamma=2, max_new_tokens=n, sampling=s,
                             seed=0, max_len=16, **F32)
    assert 0.05 < r.acceptance_rate < 0.95  # both accept and reject paths ran
    codes = (r.tokens * np.array([64, 8, 1])).sum(1)
    counts = np.bincount(codes, minlength=8**n).astype(np.float64)
    probs = _exact_joint(m, target, prompt, n, s)
    assert abs(probs.sum() - 1) < 1e-4
    assert counts[probs == 0].sum() == 0  # top-k excluded tokens never appear
    tv = 0.5 * np.abs(counts / nsamp - probs).sum()
    pn = probs.astype(np.float64) / probs.sum()
    sims = np.random.default_rng(0).multinomial(nsamp, pn, size=2000) / nsamp
    tv_tol = float(np.quantile(0.5 * np.abs(sims - pn).sum(1), 0.999))
    pval = _chi2_pvalue(counts, probs)
    print(f"{drafter}: acceptance {r.acceptance_rate:.3f}, TV {tv:.4f} (tolerance {tv_tol:.4f}), "
          f"chi-square p {pval:.3g}")
    assert tv <= tv_tol, (tv, tv_tol)
    assert pval > 1e-3
    if drafter == "model":
        q = _exact_joint(draft.model, draft.params, prompt, n, s)
        print(f"TV(samples, draft) {0.5 * np.abs(counts / nsamp - q).sum():.4f}")
        assert _chi2_pvalue(counts, q) < 1e-12


def dataclasses_replace(c, **kw):
    import dataclasses

    return dataclasses.replace(c, **kw)


def test_rollback_leaves_no_stale_entries(tiny):
    """Tokens written past `lengths` (rejected drafts), then rolled back and overwritten by other
    tokens, leave the logits exactly as a cache that never saw them; so do poisoned slots."""
    m, p = tiny
    prompt = jnp.asarray([[5, 17, 3, 44, 9, 2]], jnp.int32)
    committed = jnp.asarray([[8, 60, 1]], jnp.int32)

    fwd = jax.jit(lambda p, t, c: m.forward(p, t, cache=c)[:2])
    clean = m.init_cache(1, 32, jnp.float32)
    _, clean = fwd(p, prompt, clean)
    want, _ = fwd(p, committed, clean)

    dirty = m.init_cache(1, 32, jnp.float32)
    # poison every slot first: large finite values that would dominate any softmax they entered
    noise = lambda a, i: 50.0 * jax.random.normal(jax.random.key(i), a.shape, a.dtype)
    dirty = type(dirty)(k=[noise(a, i) for i, a in enumerate(dirty.k)],
                        v=[noise(a, 10 + i) for i, a in enumerate(dirty.v)], lengths=dirty.lengths)
    _, dirty = fwd(p, prompt, dirty)
    _, dirty = fwd(p, jnp.asarray([[90, 91, 92, 93, 94, 95, 96]], jnp.int32), dirty)  # rejected drafts
    assert int(dirty.lengths[0]) == 13
    dirty = dirty.rollback(6)
    got, dirty = fwd(p, committed, dirty)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    # the stale slots 9..12 are still there, and still do not matter one step later
    assert not np.allclose(np.asarray(dirty.k[0][0, 9:13]), 0.0)
    nxt = jnp.asarray([[int(jnp.argmax(want[0, -1]))]], jnp.int32)
    a, _ = fwd(p, nxt, dirty)
    _, clean2 = fwd(p, committed, clean)
    b, _ = fwd(p, nxt, clean2)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_bad_input(tiny, other_draft):
    m, p = tiny
    wrong = Model(LlamaConfig(vocab_size=50, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32))
    with pytest.raises(FlashitError, match=r"vocabulary \(50 tokens\) differs from the target's \(97\)"):
        speculative_generate(m, p, [[1, 2]], draft=Draft(wrong, wrong.init_params(jax.random.key(0))),
                             max_new_tokens=4)
    for g in (0, -2):
        with pytest.raises(FlashitError, match="gamma .* must be an integer >= 1"):
            speculative_generate(m, p, [[1, 2]], draft=other_draft, gamma=g, max_new_tokens=4)
    with pytest.raises(FlashitError, match="does not fit the cache of 32 positions"):
        speculative_generate(m, p, [list(range(30))], draft=Lookup(), gamma=4, max_new_tokens=8, max_len=32)
    with pytest.raises(FlashitError, match="at least one token"):
        speculative_generate(m, p, [[1], []], draft=Lookup(), max_new_tokens=4)
    with pytest.raises(FlashitError, match="min_ngram <= ngram"):
        Lookup(ngram=0)
    with pytest.raises(FlashitError, match=r"outside 0\.\.3"):
        layer_skip_draft(m, p, "0-4")
    with pytest.raises(FlashitError, match="bad layer selection"):
        parse_layers("first-half", 4)


def test_recurrent_target_is_refused():
    from models.mamba import MambaConfig

    mc = MambaConfig(vocab_size=97, dim=16, n_layers=1)
    mm = Model(mc)
    mp = mm.init_params(jax.random.key(0))
    with pytest.raises(FlashitError, match="cannot roll back"):
        speculative_generate(mm, mp, [[1, 2]], draft=Lookup(), max_new_tokens=4)


def test_parse_layers():
    assert parse_layers("0-2+7", 8) == [0, 1, 2, 7]
    assert parse_layers("0:8:3", 8) == [0, 3, 6]
    assert parse_layers("::-1", 3) == [0, 1, 2]


def test_layer_search_drops_the_least_harmful_layer(tiny):
    from flashit_jax.decoding import search_layers

    m, p = tiny
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 97, (2, 24)), jnp.int32)
    want = jnp.argmax(m.forward(p, toks)[0], -1)
    agreement = {}
    for drop in range(1, 4):
        d = layer_skip_draft(m, p, [i for i in range(4) if i != drop])
        agreement[drop] = float(jnp.mean((jnp.argmax(d.model.forward(d.params, toks)[0], -1) == want)
                                         .astype(jnp.float32)))
    keep = search_layers(m, p, toks, 3, progress=False)
    assert keep == [i for i in range(4) if i != max(agreement, key=agreement.get)]
    keep2 = search_layers(m, p, toks, 2, protect=(0, 3), progress=False)
    assert keep2[0] == 0 and keep2[-1] == 3 and len(keep2) == 2


@pytest.mark.slow
def test_real_smollm2_layer_skipped_draft_is_exact(smollm2):
    """Real weights: greedy self-speculation (and lookup) reproduce plain greedy decoding."""
    tok = smollm2.tokenizer
    prompts = [tok.encode(t) for t in ("ROMEO.\nBut soft, what light through yonder window breaks?",
                                       "To be, or not to be, that is the question:",
                                       "The history of the Roman Empire")]
    want = generate(smollm2.model, smollm2.params, prompts, max_new_tokens=32, **F32).tokens
    draft = layer_skip_draft(smollm2.model, smollm2.params, "0-11+18-29")
    r = speculative_generate(smollm2.model, smollm2.params, prompts, draft=draft, gamma=3, max_new_tokens=32, **F32)
    np.testing.assert_array_equal(r.tokens, want)
    assert 0.2 < r.acceptance_rate < 1.0
    r = speculative_generate(smollm2.model, smollm2.params, prompts, draft=Lookup(3), gamma=6, max_new_tokens=32,
                             **F32)
    np.testing.assert_array_equal(r.tokens, want)
