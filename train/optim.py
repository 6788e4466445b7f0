"""AdamW with linear warmup then cosine decay, global-norm clipping, decay on matrices only."""
from __future__ import annotations

import jax
import optax


def schedule(cfg) -> optax.Schedule:
    warmup = max(0, min(cfg.warmup_steps, cfg.steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.lr, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def _decay_mask(params):
    # No weight decay on norms, biases and other vectors (GPT-2 / nanoGPT convention).
    return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
    chain = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))
    chain.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=_decay_mask))
    return optax.chain(*chain)
