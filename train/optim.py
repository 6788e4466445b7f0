"""AdamW with linear warmup then cosine decay, global-norm clipping, decay on matrices only;
optionally only the parameters matching `cfg.trainable` are updated (the others stay bit-exact)."""
from __future__ import annotations

import re

import jax
import optax

from flashit_jax import tree
from flashit_jax.errors import FlashitError


def schedule(cfg) -> optax.Schedule:
    warmup = max(0, min(cfg.warmup_steps, cfg.steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else cfg.lr, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def _decay_mask(params):
    # No weight decay on norms, biases and other vectors (GPT-2 / nanoGPT convention).
    return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def trainable_mask(pattern: str):
    """params -> bool tree: True where the parameter is trained. `pattern` is a regex over the
    student's '/'-joined parameter paths (re.fullmatch); "" trains everything. Trainables outside
    the model (feature projections) are always trained."""
    if not pattern:
        return lambda params: jax.tree.map(lambda _: True, params)
    try:
        rx = re.compile(pattern)
    except re.error as e:
        raise FlashitError(f"--trainable {pattern!r} is not a valid regex: {e}") from None

    def mask(params):
        return tree.map_with_path(lambda path, _: not path.startswith("model/") or bool(rx.fullmatch(path[6:])),
                                  params)

    return mask


def make_optimizer(cfg) -> optax.GradientTransformation:
    chain = []
    pattern = getattr(cfg, "trainable", "")
    train_mask = trainable_mask(pattern)
    if pattern:  # frozen: zero gradient before clipping (their norm must not count) and no weight decay
        chain.append(optax.masked(optax.set_to_zero(), lambda p: jax.tree.map(lambda t: not t, train_mask(p))))
    if cfg.grad_clip and cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(cfg.grad_clip))

    def decay_mask(params):
        return jax.tree.map(lambda d, t: d and t, _decay_mask(params), train_mask(params))

    chain.append(optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                             mask=decay_mask))
    return optax.chain(*chain)
