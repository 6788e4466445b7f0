"""Every loss against its closed form (numpy, float64) and its gradient against the analytic one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import losses as L

B, T, V = 2, 3, 7


def _logits(seed, scale=2.0):
    return np.random.default_rng(seed).normal(0, scale, (B, T, V)).astype(np.float32)


def _softmax(z, t=1.0):
    z = z.astype(np.float64) / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


MASK = np.array([[1, 1, 0], [1, 0, 1]], bool)
N = MASK.sum()


def _mean(x):
    return (x * MASK).sum() / N


def close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=rtol, atol=atol)


def test_cross_entropy_value_and_grad():
    z = _logits(0)
    y = np.random.default_rng(1).integers(0, V, (B, T))
    p = _softmax(z)
    ref = _mean(-np.log(np.take_along_axis(p, y[..., None], -1)[..., 0]))
    close(L.cross_entropy(jnp.asarray(z), jnp.asarray(y), jnp.asarray(MASK)), ref)
    g = jax.grad(lambda z: L.cross_entropy(z, jnp.asarray(y), jnp.asarray(MASK)))(jnp.asarray(z))
    ref_g = (p - np.eye(V)[y]) * MASK[..., None] / N
    close(g, ref_g)


def test_cross_entropy_backward_is_one_pass_and_keeps_the_dtype():
    """No dense one-hot cotangent (a scatter into a [tokens, vocab] buffer) in the gradient; bf16 logits get
    a bf16 gradient equal to the fp32 one rounded."""
    z = _logits(4)
    y = jnp.asarray(np.random.default_rng(5).integers(0, V, (B, T)))
    f = lambda z: L.cross_entropy(z, y, jnp.asarray(MASK))  # noqa: E731
    prims = {e.primitive.name for e in jax.make_jaxpr(jax.grad(f))(jnp.asarray(z)).jaxpr.eqns}
    assert not any(p.startswith("scatter") for p in prims), prims
    g32 = jax.grad(f)(jnp.asarray(z))
    g16 = jax.grad(f)(jnp.asarray(z, jnp.bfloat16))
    assert g16.dtype == jnp.bfloat16
    close(g16.astype(jnp.float32), g32, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("temp", [1.0, 2.0, 4.0])
def test_soft_target_value_and_grad(temp):
    zs, zt = _logits(2), _logits(3)
    ps, pt = _softmax(zs, temp), _softmax(zt, temp)
    ref = _mean(-temp**2 * (pt * np.log(ps)).sum(-1))
    f = lambda zs, zt: L.soft_target(zs, zt, jnp.asarray(MASK), temperature=temp)  # noqa: E731
    close(f(jnp.asarray(zs), jnp.asarray(zt)), ref)
    gs, gt = jax.grad(f, argnums=(0, 1))(jnp.asarray(zs), jnp.asarray(zt))
    # d/dz_s T^2 CE(p_t^T, p_s^T) = T (p_s^T - p_t^T); the teacher gets no gradient
    close(gs, temp * (ps - pt) * MASK[..., None] / N)
    assert not np.any(np.asarray(gt))


def test_t_squared_scaling_keeps_gradient_size():
    """Hinton et al. 2015: for zero-mean logits and large T, d/dz_s of the T^2-scaled soft loss tends to
    (z_s - z_t) / V per token, independent of T; without the T^2 factor it would shrink like 1/T^2."""
    zs, zt = _logits(4), _logits(5)
    zs, zt = zs - zs.mean(-1, keepdims=True), zt - zt.mean(-1, keepdims=True)
    limit = (zs - zt) / V * MASK[..., None] / N
    for temp, tol in ((100.0, 5e-2), (1000.0, 1e-2)):  # error O(|z| / T) plus fp32 rounding of p_s - p_t
        g = jax.grad(lambda z: L.soft_target(z, jnp.asarray(zt), jnp.asarray(MASK), temperature=temp))(jnp.asarray(zs))
        assert np.linalg.norm(np.asarray(g) - limit) / np.linalg.norm(limit) < tol
    g1 = jax.grad(lambda z: L.soft_target(z, jnp.asarray(zt), jnp.asarray(MASK), temperature=10.0))(jnp.asarray(zs))
    g2 = jax.grad(lambda z: L.soft_target(z, jnp.asarray(zt), jnp.asarray(MASK), temperature=20.0))(jnp.asarray(zs))
    ratio = np.linalg.norm(g2) / np.linalg.norm(g1)
    assert 0.8 < ratio < 1.2, ratio  # unscaled, the ratio would be ~1/4


@pytest.mark.parametrize("temp", [1.0, 3.0])
def test_forward_kl_value_and_grad(temp):
    zs, zt = _logits(6), _logits(7)
    ps, pt = _softmax(zs, temp), _softmax(zt, temp)
    ref = _mean(temp**2 * (pt * (np.log(pt) - np.log(ps))).sum(-1))
    f = lambda zs: L.forward_kl(zs, jnp.asarray(zt), jnp.asarray(MASK), temperature=temp)  # noqa: E731
    close(f(jnp.asarray(zs)), ref)
    close(jax.grad(f)(jnp.asarray(zs)), temp * (ps - pt) * MASK[..., None] / N)
    # same gradient as the soft-target loss (they differ by the teacher's entropy)
    g_soft = jax.grad(lambda z: L.soft_target(z, jnp.asarray(zt), jnp.asarray(MASK), temperature=temp))(jnp.asarray(zs))
    close(jax.grad(f)(jnp.asarray(zs)), g_soft)
    assert float(L.forward_kl(jnp.asarray(zt), jnp.asarray(zt), jnp.asarray(MASK))) == pytest.approx(0.0, abs=1e-6)


def test_reverse_kl_value_and_grad():
    zs, zt = _logits(8), _logits(9)
    ps, pt = _softmax(zs), _softmax(zt)
    kl = (ps * (np.log(ps) - np.log(pt))).sum(-1)
    f = lambda zs: L.reverse_kl(zs, jnp.asarray(zt), jnp.asarray(MASK))  # noqa: E731
    close(f(jnp.asarray(zs)), _mean(kl))
    ref_g = ps * (np.log(ps) - np.log(pt) - kl[..., None]) * MASK[..., None] / N
    close(jax.grad(f)(jnp.asarray(zs)), ref_g, atol=1e-6)
    # reverse != forward in general
    assert abs(float(f(jnp.asarray(zs))) - float(L.forward_kl(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(MASK)))) > 1e-3


@pytest.mark.parametrize("k,temp", [(3, 1.0), (3, 2.0), (V, 2.0)])
def test_topk_value_and_grad(k, temp):
    zs, zt = _logits(10), _logits(11)
    idx = np.argsort(-zt, -1)[..., :k]
    vals = np.take_along_axis(zt, idx, -1)
    q = _softmax(vals, temp)
    ps = _softmax(zs, temp)
    ref = _mean(-temp**2 * (q * np.log(np.take_along_axis(ps, idx, -1))).sum(-1))
    f = lambda zs: L.topk_kl(zs, jnp.asarray(vals), jnp.asarray(idx), jnp.asarray(MASK), temperature=temp)  # noqa
    close(f(jnp.asarray(zs)), ref)
    q_full = np.zeros_like(ps)
    np.put_along_axis(q_full, idx, q, -1)
    close(jax.grad(f)(jnp.asarray(zs)), temp * (ps - q_full) * MASK[..., None] / N)
    if k == V:  # the whole distribution: the soft-target loss
        close(f(jnp.asarray(zs)), L.soft_target(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(MASK), temperature=temp))


def test_hard_label_is_ce_on_teacher_argmax_or_samples():
    zs, zt = _logits(12), _logits(13)
    m = jnp.asarray(MASK)
    y = np.argmax(zt, -1)
    close(L.hard_label(jnp.asarray(zs), jnp.asarray(zt), m), L.cross_entropy(jnp.asarray(zs), jnp.asarray(y), m))
    key = jax.random.key(0)
    ys = jax.random.categorical(key, jnp.asarray(zt) / 2.0)
    close(L.hard_label(jnp.asarray(zs), jnp.asarray(zt), m, key=key, temperature=2.0), L.cross_entropy(jnp.asarray(zs), ys, m))
    gt = jax.grad(lambda zt: L.hard_label(jnp.asarray(zs), zt, m))(jnp.asarray(zt))
    assert not np.any(np.asarray(gt))


def test_mix_and_mask():
    zs, zt = _logits(14), _logits(15)
    y = np.random.default_rng(16).integers(0, V, (B, T))
    m = jnp.asarray(MASK)
    ce = L.cross_entropy(jnp.asarray(zs), jnp.asarray(y), m)
    kd = L.soft_target(jnp.asarray(zs), jnp.asarray(zt), m, temperature=2.0)
    close(L.mix({"ce": ce, "kd": kd}, {"ce": 0.3, "kd": 0.7}), 0.3 * float(ce) + 0.7 * float(kd))
    with pytest.raises(ValueError):
        L.mix({"ce": ce}, {"kd": 1.0})
    # masked-out positions do not matter
    zs2 = zs.copy()
    zs2[~MASK] += 100.0
    close(L.soft_target(jnp.asarray(zs2), jnp.asarray(zt), m, temperature=2.0), kd)


def test_hidden_mse_value_and_grad():
    rng = np.random.default_rng(17)
    hs, ht = rng.normal(size=(B, T, 4)).astype(np.float32), rng.normal(size=(B, T, 5)).astype(np.float32)
    w = rng.normal(size=(4, 5)).astype(np.float32)
    err = hs.astype(np.float64) @ w - ht
    ref = _mean((err**2).mean(-1))
    f = lambda w: L.hidden_mse(jnp.asarray(hs), jnp.asarray(ht), w, jnp.asarray(MASK))  # noqa: E731
    close(f(jnp.asarray(w)), ref)
    ref_g = np.einsum("btd,bte->de", hs * MASK[..., None], 2 * err / 5) / N
    close(jax.grad(f)(jnp.asarray(w)), ref_g, rtol=1e-4)


def test_attention_probs_and_mse():
    rng = np.random.default_rng(18)
    q = rng.normal(size=(1, 4, 2, 3)).astype(np.float32)
    k = rng.normal(size=(1, 4, 1, 3)).astype(np.float32)
    seg = np.array([[1, 1, 2, 2]], np.int32)
    p = np.asarray(L.attention_probs(jnp.asarray(q), jnp.asarray(k), jnp.asarray(seg)))
    for h in range(2):
        s = q[0, :, h] @ k[0, :, 0].T / np.sqrt(3)
        allowed = np.tril(np.ones((4, 4), bool)) & (seg[0][:, None] == seg[0][None, :])
        s = np.where(allowed, s, -np.inf)
        ref = np.exp(s - s.max(-1, keepdims=True))
        close(p[0, h], ref / ref.sum(-1, keepdims=True))
    p2 = np.asarray(L.attention_probs(jnp.asarray(q[:, :, ::-1].copy()), jnp.asarray(k), jnp.asarray(seg)))
    mask = np.array([[1, 0, 1, 1]], bool)
    ref = ((p - p2) ** 2).mean(axis=(1, 3))
    close(L.attention_mse(jnp.asarray(p), jnp.asarray(p2), jnp.asarray(mask)), (ref * mask).sum() / mask.sum())
