"""Medusa heads: tree attention equals sequential decoding, greedy output equals plain greedy,
training improves the heads, checkpoints resume, bad input errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flashit_jax import FlashitError
from flashit_jax.decoding.medusa import (
    MedusaTree,
    _move_slots,
    _tree_arrays,
    accept_typical,
    base_forward,
    head_logits,
    init_heads,
    load_heads,
    make_train_step,
    medusa_generate,
    medusa_loss,
    save_heads,
    tree_mask,
)
from flashit_jax.generate import generate
from models import Model
from models.llama import LlamaConfig

CFG = LlamaConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=True)
F32 = dict(cache_dtype=jnp.float32)


@pytest.fixture(scope="module")
def tiny():
    m = Model(CFG)
    p = m.init_params(jax.random.key(1))
    return m, jax.tree.map(lambda x: x * 12 if x.ndim == 2 else x, p)


def _random_heads(n, seed=0, scale=0.5):
    h = init_heads(CFG, n, jax.random.key(seed))
    leaves, tdef = jax.tree.flatten(h)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tdef, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, int(rng.integers(1, 16))).tolist() for _ in range(n)]


def test_tree_structure():
    ta = _tree_arrays(MedusaTree.from_widths((2, 2)).paths)
    # nodes: (), (0,), (1,), (0,0), (0,1), (1,0), (1,1)
    assert ta["depth"].tolist() == [0, 1, 1, 2, 2, 2, 2]
    assert ta["parent"].tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert ta["rank"].tolist() == [0, 0, 1, 0, 1, 0, 1]
    assert np.flatnonzero(ta["anc"][5]).tolist() == [0, 2, 5]
    assert ta["at_depth"][6].tolist() == [0, 2, 6]
    assert ta["topk"] == [2, 2]
    # missing prefixes are added
    assert MedusaTree(((0, 1, 0),)).size == 3
    assert MedusaTree.parse("4x2x1").size == 4 + 8 + 8


def test_tree_attention_equals_sequential(tiny):
    """Every node's logits equal those of plainly decoding its branch after the prefix."""
    m, p = tiny
    tree = MedusaTree.from_widths((3, 2, 2))
    ta = _tree_arrays(tree.paths)
    prefix = jnp.asarray([[3, 9, 4, 1, 7], [2, 8, 8, 5, 0]], jnp.int32)
    lens = jnp.asarray([5, 3], jnp.int32)  # ragged: row 1 has 3 real tokens
    cache = m.init_cache(2, 64, jnp.float32)
    _, cache, _ = jax.jit(lambda c: m.forward(p, prefix, cache=c, seq_lengths=lens))(cache)
    t = len(ta["depth"])
    rng = np.random.default_rng(0)
    toks = jnp.asarray(rng.integers(0, CFG.vocab_size, (2, t)), jnp.int32)
    pos = cache.lengths[:, None] + jnp.asarray(ta["depth"])[None]
    mask = tree_mask(ta["anc"], cache.lengths, cache.max_len)
    logits, _, _ = jax.jit(lambda c: m.forward(p, toks, pos, c, attn_mask=mask))(cache)
    full = jax.jit(lambda x: m.forward(p, x)[0])
    for b in range(2):
        for i in range(t):
            branch = np.flatnonzero(ta["anc"][i])  # ancestors and i, in depth order
            seq = np.concatenate([np.asarray(prefix[b, : int(lens[b])]), np.asarray(toks[b])[branch]])
            want = full(jnp.asarray(seq[None], jnp.int32))[0, -1]
            np.testing.assert_allclose(np.asarray(logits[b, i]), np.asarray(want), rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize("tree", ["1", "3x2", "6x3x2"])
def test_greedy_medusa_equals_plain_greedy(tiny, tree):
    m, p = tiny
    prompts = _prompts(8, seed=len(tree))
    want = generate(m, p, prompts, max_new_tokens=24, **F32).tokens
    assert len(np.unique(want)) > 12
    r = medusa_generate(m, p, _random_heads(3), prompts, tree=tree, max_new_tokens=24, **F32)
    np.testing.assert_array_equal(r.tokens, want)
    if tree == "6x3x2":
        assert r.tokens_per_step > 1.2  # a wide tree over 32 tokens gets some candidates right
        assert len(set(r.accepted.tolist())) > 1  # rows advance by different amounts


def test_move_slots():
    from flashit_jax.nn.cache import init_kv_cache

    c = init_kv_cache(2, 8, [1], 1, jnp.float32)
    vals = jnp.arange(16, dtype=jnp.float32).reshape(2, 8, 1, 1)
    c = type(c)(k=[vals], v=[vals + 100], lengths=c.lengths)
    # row 0: slots 5, 3 -> 1, 2 (reads before writes); row 1: identity
    moved = _move_slots(c, jnp.asarray([[5, 3], [1, 2]]), jnp.asarray([[1, 2], [1, 2]]))
    assert np.asarray(moved.k[0][:, :, 0, 0]).tolist() == [[0, 5, 3, 3, 4, 5, 6, 7], list(range(8, 16))]
    assert np.asarray(moved.v[0][0, :3, 0, 0]).tolist() == [100, 105, 103]


def test_typical_acceptance():
    probs = jnp.asarray([[0.7, 0.2, 0.05, 0.05], [0.25, 0.25, 0.25, 0.25]], jnp.float32)
    cand = jnp.asarray([[1, 2], [3, 3]], jnp.int32)  # [B, candidates]
    ok = accept_typical(jnp.broadcast_to(probs[:, None], (2, 2, 4)), cand, eps=0.09, delta=0.3)
    # row 0: entropy 0.87 -> threshold min(0.09, 0.3 * 0.42) = 0.09: 0.2 kept, 0.05 not
    # row 1: entropy ln 4 -> threshold min(0.09, 0.075) = 0.075: 0.25 kept
    assert np.asarray(ok).tolist() == [[True, False], [True, True]]


def test_sampling_runs_and_is_seeded(tiny):
    from flashit_jax.generate import Sampling

    m, p = tiny
    s = Sampling(temperature=0.8, top_k=8)
    a = medusa_generate(m, p, _random_heads(2), _prompts(3), tree="4x2", max_new_tokens=12, sampling=s, seed=3, **F32)
    b = medusa_generate(m, p, _random_heads(2), _prompts(3), tree="4x2", max_new_tokens=12, sampling=s, seed=3, **F32)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.lengths == 12).all() and a.rounds.min() >= 1


def _permutation_base(perm):
    """A base whose greedy continuation follows a fixed permutation (x -> perm[x]): orthogonal
    embeddings, an output head mapping e(x) to perm[x], and small attention/MLP outputs that
    keep the context in play without changing the argmax."""
    cfg = LlamaConfig(vocab_size=32, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64)
    m = Model(cfg)
    p = m.init_params(jax.random.key(2))
    e = jnp.asarray(np.linalg.qr(np.random.default_rng(0).normal(size=(32, 32)))[0] * np.sqrt(32), jnp.float32)
    inv = np.argsort(perm)
    p = {**p, "embed": {"w": e}, "lm_head": {"w": e[inv].T}}
    layers = {i: {**lp, "attn": {**lp["attn"], "o": {"w": lp["attn"]["o"]["w"] * 5}},
                  "mlp": {**lp["mlp"], "down": {"w": lp["mlp"]["down"]["w"] * 5}}} for i, lp in p["layers"].items()}
    return m, {**p, "layers": layers}


def _cycles(perm, n, length, seed):
    x = np.random.default_rng(seed).integers(0, len(perm), n)
    out = [x]
    for _ in range(length - 1):
        x = perm[x]
        out.append(x)
    return jnp.asarray(np.stack(out, 1), jnp.int32)


@pytest.mark.slow  # ~20 s on 2 cores: CI's slow phase keeps the default run under 15 min
def test_training_learns_the_base_and_raises_acceptance(tmp_path):
    perm = np.random.default_rng(0).permutation(32)
    m, p = _permutation_base(perm)
    prompts = [[int(t)] for t in np.random.default_rng(9).integers(0, 32, 6)]
    want = generate(m, p, prompts, max_new_tokens=24, **F32).tokens
    np.testing.assert_array_equal(want[:, 1:], perm[want[:, :-1]])  # the base does follow the permutation

    train, held = _cycles(perm, 64, 32, seed=1), _cycles(perm, 32, 32, seed=2)
    ones = jnp.ones(train.shape, bool)
    opt = optax.adam(2e-2)
    heads = init_heads(m.config, 2, jax.random.key(0))
    state = opt.init(heads)
    step = make_train_step(m, opt, labels="base")
    _, _, h_held = base_forward(m, p, held)
    acc0 = np.asarray(medusa_loss(heads, p, m.config, h_held, held, ones[:32])[1])
    losses = []
    for _ in range(150):
        heads, state, loss, _ = step(heads, state, p, train, ones)
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], (losses[0], losses[-1])
    acc = np.asarray(medusa_loss(heads, p, m.config, h_held, held, ones[:32])[1])
    assert (acc0 < 0.2).all() and (acc > 0.8).all(), (acc0, acc)  # held-out top-1 of heads 0 and 1

    untrained = medusa_generate(m, p, init_heads(m.config, 2, jax.random.key(0)), prompts, tree="2x2",
                                max_new_tokens=24, **F32)
    trained = medusa_generate(m, p, heads, prompts, tree="2x2", max_new_tokens=24, **F32)
    np.testing.assert_array_equal(untrained.tokens, want)
    np.testing.assert_array_equal(trained.tokens, want)
    assert untrained.tokens_per_step < 1.3 and trained.tokens_per_step > 2.5  # at most 3 with two heads

    save_heads(tmp_path, heads, {"note": "test"})
    back, meta = load_heads(tmp_path)
    assert meta["n_heads"] == 2 and meta["note"] == "test"
    np.testing.assert_array_equal(np.asarray(head_logits(back, p, m.config, h_held)),
                                  np.asarray(head_logits(heads, p, m.config, h_held)))


def test_untrained_heads_copy_the_base(tiny):
    m, p = tiny
    toks = jnp.asarray([[1, 5, 9, 2]], jnp.int32)
    logits, _, h = base_forward(m, p, toks)
    hl = head_logits(init_heads(CFG, 2, jax.random.key(0)), p, CFG, h)
    np.testing.assert_allclose(np.asarray(hl[1]), np.asarray(logits), rtol=1e-5, atol=1e-4)
    own = init_heads(CFG, 1, jax.random.key(0), own_head=True, base_params=p)
    np.testing.assert_allclose(np.asarray(head_logits(own, p, CFG, h)[0]), np.asarray(logits), rtol=1e-5, atol=1e-4)


def test_bad_input(tiny):
    from models.mamba import MambaConfig

    m, p = tiny
    with pytest.raises(FlashitError, match="tree is 3 deep but there are only 2 Medusa heads"):
        medusa_generate(m, p, _random_heads(2), [[1, 2]], tree="2x2x2", max_new_tokens=4)
    wide = init_heads(LlamaConfig(vocab_size=32, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64), 2,
                      jax.random.key(0))
    with pytest.raises(FlashitError, match="heads are 64 wide, the model's hidden size is 32"):
        medusa_generate(m, p, wide, [[1, 2]], max_new_tokens=4)
    with pytest.raises(FlashitError, match="bad Medusa tree"):
        MedusaTree.parse("4xfoo")
    with pytest.raises(FlashitError, match="does not fit the cache of 32 positions"):
        medusa_generate(m, p, _random_heads(3), [list(range(20))], tree="4x2x1", max_new_tokens=4, max_len=32)
    with pytest.raises(FlashitError, match="cudnn"):
        medusa_generate(m, p, _random_heads(3), [[1]], max_new_tokens=4, attn_impl="cudnn")
    mm = Model(MambaConfig(vocab_size=32, dim=16, n_layers=1))
    with pytest.raises(FlashitError, match="cannot roll back"):
        medusa_generate(mm, mm.init_params(jax.random.key(0)), _random_heads(1), [[1]], tree="2", max_new_tokens=4)
