"""Distillation and data losses: pure functions of logits (or hidden states) and a token mask.

Every loss returns the mean over the tokens where `mask` is true; `token_*` variants return the
per-token loss [B, T] so a training step can normalize over a whole accumulated batch.
Logits are [B, T, V] (any float dtype; computed in fp32), the mask [B, T] bool. The student
predicts at the same positions as the teacher (teacher logits at t predict token t+1).

- `cross_entropy`: data loss on the next tokens.
- `hard_label`: cross-entropy on the teacher's samples (argmax, or sampled at a temperature).
- `soft_target`: Hinton's soft targets, -sum p_t^T log p_s^T scaled by T^2 so that gradients keep
  their size as T changes (Hinton et al. 2015, sec. 2). Same gradient as forward KL at temperature T.
- `forward_kl`: KL(p_t || p_s) (mode covering). `reverse_kl`: KL(p_s || p_t) (mode seeking,
  MiniLLM's token-level objective, without its policy-gradient training).
- `topk_kl`: the teacher's distribution kept on its top-k logits only (SLIM-style sparse targets),
  renormalized, against the student's full softmax gathered at those indices.
- `mix`: weighted sum, e.g. alpha * data CE + (1 - alpha) * a KD loss.
- `hidden_mse` / `attention_mse`: feature losses (FitNets, TinyBERT) through learned projections.
- `token_layer_alignment`: layer-wise hidden-state alignment (MOHAWK stage 2, Bick et al. 2024):
  each replaced layer, fed the teacher's input, should reproduce the teacher layer's output.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    m = mask.astype(jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * m) / jnp.maximum(jnp.sum(m), 1.0)


def _log_softmax(logits, temperature: float = 1.0):
    z = logits.astype(jnp.float32)
    if temperature != 1.0:
        z = z / jnp.float32(temperature)
    return jax.nn.log_softmax(z, axis=-1)


# ----------------------------------------------------------------------------- per-token losses
def token_cross_entropy(logits, targets):
    """-log p(target) [B, T] = logsumexp(logits) - logits[target], computed in fp32."""
    return _token_ce(logits, targets.astype(jnp.int32))


# Autodiff of -log_softmax(z)[target] builds the one-hot cotangent as a dense [tokens, vocab] fp32 tensor
# (zeros, then a scatter) and reads it back in log_softmax's VJP: for a 1B model's 16k-token step at a 128k
# vocabulary that is 8.4 GB written and read (most likely the 2.6 ms broadcast fusion of train.bench --profile
# on an H200, 2026-12-05).
# The backward here is one elementwise pass, softmax(z) - (iota == target), the comparison never stored.
@jax.custom_vjp
def _token_ce(logits, targets):
    return _token_ce_fwd(logits, targets)[0]


def _token_ce_fwd(logits, targets):
    z = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    return lse - jnp.take_along_axis(z, targets[..., None], axis=-1)[..., 0], (logits, lse, targets)


def _token_ce_bwd(res, g):
    logits, lse, targets = res
    z = logits.astype(jnp.float32)
    hit = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1) == targets[..., None]
    d = (jnp.exp(z - lse[..., None]) - hit.astype(jnp.float32)) * g[..., None]
    return d.astype(logits.dtype), None


_token_ce.defvjp(_token_ce_fwd, _token_ce_bwd)


def teacher_labels(teacher_logits, key=None, temperature: float = 1.0):
    """The teacher's hard labels: argmax, or samples at `temperature` when a key is given."""
    if key is None:
        return jnp.argmax(teacher_logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, teacher_logits.astype(jnp.float32) / jnp.float32(temperature)).astype(jnp.int32)


def token_soft_target(student_logits, teacher_logits, temperature: float = 1.0):
    """T^2 * cross-entropy(p_t^T, p_s^T) per token."""
    p_t = jax.nn.softmax(teacher_logits.astype(jnp.float32) / jnp.float32(temperature), axis=-1)
    logp_s = _log_softmax(student_logits, temperature)
    return -jnp.float32(temperature) ** 2 * jnp.sum(p_t * logp_s, axis=-1)


def token_forward_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """KL(p_t^T || p_s^T) per token (times T^2 when T != 1, as the soft target loss)."""
    logp_t = _log_softmax(teacher_logits, temperature)
    logp_s = _log_softmax(student_logits, temperature)
    kl = jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=-1)
    return jnp.float32(temperature) ** 2 * kl


def token_reverse_kl(student_logits, teacher_logits, temperature: float = 1.0):
    """KL(p_s^T || p_t^T) per token (times T^2)."""
    logp_t = _log_softmax(teacher_logits, temperature)
    logp_s = _log_softmax(student_logits, temperature)
    kl = jnp.sum(jnp.exp(logp_s) * (logp_s - logp_t), axis=-1)
    return jnp.float32(temperature) ** 2 * kl


def token_topk_kl(student_logits, topk_values, topk_indices, temperature: float = 1.0):
    """T^2 * -sum_k q_k log p_s^T[idx_k], q = softmax(topk_values / T) over the k kept logits.

    topk_values [B, T, k] (the teacher's largest logits), topk_indices [B, T, k] int32.
    """
    q = jax.nn.softmax(topk_values.astype(jnp.float32) / jnp.float32(temperature), axis=-1)
    logp_s = _log_softmax(student_logits, temperature)
    picked = jnp.take_along_axis(logp_s, topk_indices.astype(jnp.int32), axis=-1)
    return -jnp.float32(temperature) ** 2 * jnp.sum(q * picked, axis=-1)


# ----------------------------------------------------------------------------- mean losses
def cross_entropy(logits, targets, mask):
    return masked_mean(token_cross_entropy(logits, targets), mask)


def hard_label(student_logits, teacher_logits, mask, *, key=None, temperature: float = 1.0):
    """Cross-entropy on the teacher's labels (argmax, or sampled when `key` is given)."""
    labels = jax.lax.stop_gradient(teacher_labels(teacher_logits, key, temperature))
    return masked_mean(token_cross_entropy(student_logits, labels), mask)


def soft_target(student_logits, teacher_logits, mask, *, temperature: float = 1.0):
    return masked_mean(token_soft_target(student_logits, jax.lax.stop_gradient(teacher_logits), temperature), mask)


def forward_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0):
    return masked_mean(token_forward_kl(student_logits, jax.lax.stop_gradient(teacher_logits), temperature), mask)


def reverse_kl(student_logits, teacher_logits, mask, *, temperature: float = 1.0):
    return masked_mean(token_reverse_kl(student_logits, jax.lax.stop_gradient(teacher_logits), temperature), mask)


def topk_kl(student_logits, topk_values, topk_indices, mask, *, temperature: float = 1.0):
    return masked_mean(token_topk_kl(student_logits, jax.lax.stop_gradient(topk_values), topk_indices,
                                     temperature), mask)


def mix(losses: dict[str, jax.Array], weights: dict[str, float]) -> jax.Array:
    """sum_i w_i * loss_i, e.g. mix({"ce": ce, "kd": kd}, {"ce": alpha, "kd": 1 - alpha})."""
    missing = set(weights) - set(losses)
    if missing:
        raise ValueError(f"mix: weights name losses that were not given: {sorted(missing)}")
    return sum(jnp.float32(w) * losses[k] for k, w in weights.items())


# ----------------------------------------------------------------------------- feature losses
def hidden_mse(student_hidden, teacher_hidden, proj_w, mask):
    """FitNets hint loss: mean over tokens of ||h_s W - h_t||^2 / d_t.

    student_hidden [B, T, d_s], teacher_hidden [B, T, d_t], proj_w [d_s, d_t] (learned).
    """
    hs = jnp.einsum("btd,de->bte", student_hidden.astype(jnp.float32), proj_w.astype(jnp.float32))
    err = jnp.mean(jnp.square(hs - jax.lax.stop_gradient(teacher_hidden).astype(jnp.float32)), axis=-1)
    return masked_mean(err, mask)


def attention_probs(q, k, segment_ids=None):
    """Causal softmax(q k^T / sqrt(d)) per head: q [B, T, H, D], k [B, T, Hkv, D] -> [B, H, T, T] fp32.

    Grouped KV heads are repeated to the query heads.
    """
    h, hkv = q.shape[2], k.shape[2]
    if h != hkv:
        k = jnp.repeat(k, h // hkv, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32)) * jnp.float32(q.shape[-1] ** -0.5)
    t = q.shape[1]
    allowed = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    s = jnp.where(allowed, s, jnp.float32(-1e30))
    return jax.nn.softmax(s, axis=-1)


def attention_mse(student_probs, teacher_probs, mask):
    """TinyBERT attention transfer: MSE between attention maps [B, H, T, T], averaged over heads
    and keys, over query tokens where `mask` holds. Head counts must match, or one side has a
    single (head-averaged) map."""
    if student_probs.shape[1] != teacher_probs.shape[1]:
        student_probs = jnp.mean(student_probs, axis=1, keepdims=True)
        teacher_probs = jnp.mean(teacher_probs, axis=1, keepdims=True)
    err = jnp.mean(jnp.square(student_probs - jax.lax.stop_gradient(teacher_probs)), axis=(1, 3))  # [B, T]
    return masked_mean(err, mask)


def token_layer_alignment(student_out, teacher_out, teacher_in):
    """Per-token squared error of a layer's output [B, T, d], relative to the teacher layer's update.

    err[b, t] = mean_d (s - t_out)^2 / mean_{b,t,d} (t_out - t_in)^2. Normalizing by the layer's
    own update (not its output, which carries the whole residual stream) makes 1.0 mean "as far
    off as skipping the layer" in every layer, so layers of any scale weigh the same.
    """
    t_out = jax.lax.stop_gradient(teacher_out).astype(jnp.float32)
    upd = t_out - jax.lax.stop_gradient(teacher_in).astype(jnp.float32)
    scale = jnp.maximum(jnp.mean(jnp.square(upd)), jnp.float32(1e-12))
    return jnp.mean(jnp.square(student_out.astype(jnp.float32) - t_out), axis=-1) / scale


KD_LOSSES = ("hard", "soft", "fkl", "rkl", "topk")
ALL_LOSSES = ("ce", *KD_LOSSES, "feature", "mix", "align")
