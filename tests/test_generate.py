import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashit_jax import FlashitError
from flashit_jax.generate import Sampling, generate, warp_logits
from models import Model
from models.llama import LlamaConfig

CFG = LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, tie_embeddings=True)


@pytest.fixture(scope="module")
def tiny():
    m = Model(CFG)
    p = m.init_params(jax.random.key(1))
    # larger weights than the 0.02 init so greedy paths are not all one token
    return m, jax.tree.map(lambda x: x * 20 if x.ndim == 2 else x, p)


def _recompute(m, p, prompt, n):
    """Greedy tokens from a full forward pass over the whole sequence at every step (no cache). The
    sequence is right-padded to one length so that one compiled forward serves every step: under
    the causal mask the padding cannot reach the positions read."""
    total = len(prompt) + n
    fwd = jax.jit(lambda p, toks: m.forward(p, toks)[0])
    seq = list(prompt)
    for _ in range(n):
        logits = fwd(p, jnp.asarray([seq + [0] * (total - len(seq))], jnp.int32))
        seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_cached_greedy_equals_recompute(tiny):
    m, p = tiny
    prompt = [5, 17, 3, 44, 9]
    r = generate(m, p, [prompt], max_new_tokens=12, cache_dtype=jnp.float32)
    want = _recompute(m, p, prompt, 12)
    assert r.tokens[0].tolist() == want
    assert len(set(want)) > 2


def test_batch_of_ragged_prompts_equals_single(tiny):
    m, p = tiny
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12], [13], [14, 15]]
    batch = generate(m, p, prompts, max_new_tokens=8, cache_dtype=jnp.float32)
    for i, pr in enumerate(prompts):
        single = generate(m, p, [pr], max_new_tokens=8, cache_dtype=jnp.float32)
        assert batch.tokens[i].tolist() == single.tokens[0].tolist(), i


def test_eos_stops_and_pads(tiny):
    m, p = tiny
    prompt = [5, 17, 3]
    free = generate(m, p, [prompt], max_new_tokens=10, cache_dtype=jnp.float32).tokens[0].tolist()
    eos = free[3]
    r = generate(m, p, [prompt], max_new_tokens=10, cache_dtype=jnp.float32, eos_id=eos)
    k = free.index(eos)
    assert r.lengths[0] == k + 1
    assert r.tokens[0, : k + 1].tolist() == free[: k + 1]
    assert (r.tokens[0, k + 1:] == eos).all()


def test_sampling_is_seeded_and_respects_top_k(tiny):
    m, p = tiny
    s = Sampling(temperature=1.0, top_k=3)
    a = generate(m, p, [[1, 2, 3]], max_new_tokens=6, sampling=s, seed=7, cache_dtype=jnp.float32)
    b = generate(m, p, [[1, 2, 3]], max_new_tokens=6, sampling=s, seed=7, cache_dtype=jnp.float32)
    assert a.tokens.tolist() == b.tokens.tolist()


def test_warpers():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    k2 = warp_logits(logits, Sampling(temperature=1.0, top_k=2))
    assert np.isfinite(np.asarray(k2)).tolist() == [[True, True, False, False]]
    p = warp_logits(logits, Sampling(temperature=1.0, top_p=0.7))  # 0.5 < 0.7 <= 0.8: two tokens
    assert np.isfinite(np.asarray(p)).tolist() == [[True, True, False, False]]
    p1 = warp_logits(logits, Sampling(temperature=1.0, top_p=0.4))  # the top token always stays
    assert np.isfinite(np.asarray(p1)).tolist() == [[True, False, False, False]]
    t = warp_logits(logits, Sampling(temperature=0.5))
    assert np.allclose(np.asarray(t), np.asarray(logits) / 0.5)


def test_prompt_longer_than_cache(tiny):
    m, p = tiny
    with pytest.raises(FlashitError, match="does not fit the cache"):
        generate(m, p, [list(range(20))], max_new_tokens=20, max_len=32)
    with pytest.raises(FlashitError, match="at least one token"):
        generate(m, p, [[]], max_new_tokens=2)


def test_fused_layout_and_multi_step_calls_give_the_same_tokens(tiny):
    from models.llama import fuse_projections

    m, p = tiny
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    base = generate(m, p, prompts, max_new_tokens=11, cache_dtype=jnp.float32)
    fused = fuse_projections(p, m.config)
    assert "qkv" in fused["layers"][0]["attn"] and "gate_up" in fused["layers"][1]["mlp"]
    for params, k in ((fused, 1), (p, 4), (fused, 3)):
        r = generate(m, params, prompts, max_new_tokens=11, cache_dtype=jnp.float32, steps_per_call=k)
        assert r.tokens.tolist() == base.tokens.tolist(), k
