"""The training step: a per-token objective (data CE or a distillation loss), gradient
accumulation over micro-batches, AdamW on fp32 master weights, computed in bf16.

Everything here is a pure function of (state, teacher params, batch); `jax.jit` with shardings
(train/loop.py) turns it into the data/fsdp/tensor-parallel step, with no sharding code here.

State: {"step": int32, "params": {"model": student params, ["proj": feature projections]},
"opt_state": optax state, "rng": uint32[2], ["frozen": the frozen part of the model (LoRA base)]}.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from flashit_jax.errors import FlashitError
from train import losses as L
from train import qat as qat_lib

TEACHER_LOSSES = ("hard", "soft", "fkl", "rkl", "feature", "align")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the step minimizes (hashable: a static part of the jitted step)."""

    loss: str = "ce"  # ce | hard | soft | fkl | rkl | topk | feature | mix
    kd_loss: str = "soft"  # the KD term of mix
    alpha: float = 0.5
    temperature: float = 1.0
    hard_sample: bool = False
    feature_weight: float = 1.0
    attention_weight: float = 0.0
    layer_map: tuple[int, ...] = ()  # feature: teacher layer matched by each student layer
    align_layers: tuple[int, ...] = ()  # align: student layers trained to reproduce the teacher's, one by one
    qat: tuple = ()  # ((regex, FakeQuant), ...)

    def __post_init__(self):
        if self.loss not in L.ALL_LOSSES:
            raise FlashitError(f"unknown loss {self.loss!r}; use one of {L.ALL_LOSSES}")
        if self.loss == "mix" and self.kd_loss not in L.KD_LOSSES:
            raise FlashitError(f"unknown kd_loss {self.kd_loss!r} for mix; use one of {L.KD_LOSSES}")
        if not 0.0 <= self.alpha <= 1.0:
            raise FlashitError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise FlashitError(f"temperature must be positive, got {self.temperature}")
        if self.loss == "align" and not self.align_layers:
            raise FlashitError("loss 'align' needs the layers to align (a hybrid student's converted layers); "
                               "this student has none")

    @property
    def kd(self) -> str | None:
        """The distillation term, if any."""
        if self.loss == "mix":
            return self.kd_loss
        return None if self.loss == "ce" else self.loss

    @property
    def needs_teacher(self) -> bool:
        """The teacher runs inside the step (top-k reads its logits from a cache instead)."""
        return self.kd in TEACHER_LOSSES

    @property
    def needs_topk(self) -> bool:
        return self.kd == "topk"


def cast_floats(params, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def _attention_maps(model, params, inputs, positions, segment_ids, layers):
    """Attention probabilities [B, H, T, T] of `layers`, recomputed from their collected q/k inputs
    (Llama family: q/k projections with RoPE)."""
    from flashit_jax import nn

    c = model.config
    if not hasattr(c, "head_dim") or not hasattr(c, "rope_theta"):
        raise FlashitError(f"attention-map distillation supports attention models with RoPE, not {type(c).__name__}")
    inv_freq = nn.inv_frequencies(c.head_dim, c.rope_theta, c.rope_scaling, c.rope_freq_factors)
    maps = []
    for i in layers:
        p = params["layers"][i]["attn"]
        b, t, _ = inputs[f"layers/{i}/attn/q"].shape
        q = nn.linear(inputs[f"layers/{i}/attn/q"], p["q"]["w"], p["q"].get("b")).reshape(b, t, -1, c.head_dim)
        k = nn.linear(inputs[f"layers/{i}/attn/k"], p["k"]["w"], p["k"].get("b")).reshape(b, t, -1, c.head_dim)
        maps.append(L.attention_probs(nn.apply_rope(q, positions, inv_freq), nn.apply_rope(k, positions, inv_freq),
                                      segment_ids))
    return maps


def _layer_alignment(obj: Objective, student, teacher, p, teacher_params, batch, run, compute_dtype):
    """Layer-wise alignment: the teacher's residual stream enters each aligned student layer alone;
    its output is compared with the teacher's (no student forward through the whole stack)."""
    from flashit_jax import nn

    layer_outputs = getattr(student.family, "layer_outputs", None)
    if layer_outputs is None:
        raise FlashitError(f"loss 'align' needs a family with layer_outputs (a hybrid); got {type(student.config).__name__}")
    _, _, t_aux = run(teacher, teacher_params, batch, ("hidden",))
    hid = t_aux["hidden"]
    tc = teacher.config
    x0 = nn.embed(batch["tokens"], teacher_params["embed"]["w"], compute_dtype)
    if getattr(tc, "embed_scale", False):
        x0 = x0 * jnp.asarray(tc.dim**0.5, x0.dtype)
    ins = {i: jax.lax.stop_gradient(x0 if i == 0 else hid[i - 1]).astype(compute_dtype) for i in obj.align_layers}
    positions = None if "positions" not in batch else batch["positions"]
    outs = layer_outputs(p, ins, positions, config=student.config, layers=obj.align_layers)
    err = sum(L.token_layer_alignment(outs[i], hid[i], ins[i]) for i in obj.align_layers)
    return err / len(obj.align_layers)


def _fused_for_training(student, p, collect):
    """q|k|v and gate|up concatenated (the model's `fuse_projections` layout) for the differentiated
    forward: one GEMM for each group, and in the backward one dX product instead of three (two) plus
    the adds that sum them. Left as is where it would not pay or not apply: a family without that
    layout, quantized (QArray) projections, a split `tensor` mesh axis (the concatenation of
    column-split weights would reshard them), or when the loss reads each projection's input."""
    fuse = getattr(getattr(student, "family", None), "fuse_projections", None)
    if fuse is None or "inputs" in collect:
        return p
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and dict(mesh.shape).get("tensor", 1) > 1:
        return p
    layers = p["layers"]
    for lp in layers.values() if isinstance(layers, dict) else layers:
        ws = [lp["attn"].get(n, {}).get("w") for n in ("q", "k", "v")] + \
             [lp.get("mlp", {}).get(n, {}).get("w") for n in ("gate", "up")]
        if not all(isinstance(w, jax.Array) for w in ws):
            return p
    return fuse(p, student.config)


def make_token_loss(obj: Objective, student, teacher=None, *, compute_dtype=jnp.bfloat16, attn_impl="auto",
                    doc_masking: bool = True, combine: Callable | None = None, fuse_projections: bool = False):
    """(trainable, teacher_params, batch, key) -> (per-token loss [B, T] fp32, {metric: [B, T]}).

    doc_masking=False: the documents packed in a row attend to each other, positions run 0..T-1
    (GPT-2 / nanoGPT practice); what fused kernels without segment masks (cuDNN) can run.
    combine: (trained, frozen) -> model params, when only part of the model is trained and the
    rest is a frozen input (`trainable["frozen"]`, e.g. LoRA adapters on a frozen, maybe quantized, base).
    fuse_projections: run the student's forward in its fused q|k|v, gate|up layout where it can. Off by
    default: on an H100 (2026-12-05, train.bench) concatenating the weights every step cost more than the
    fewer, larger GEMMs gained (259.8 against 249.4 ms a Llama-3.2-1B step; 112 concatenates, 14 ms)
    (`_fused_for_training`); the parameters and their gradients keep the unfused names."""
    if obj.needs_teacher and teacher is None:
        raise FlashitError(f"loss {obj.loss!r} needs a teacher")
    want_hidden = obj.kd == "feature"
    want_attn = want_hidden and obj.attention_weight > 0

    def run(model, params, batch, collect):
        if not doc_masking:
            return model.forward(params, batch["tokens"], collect=collect, attn_impl=attn_impl)
        return model.forward(params, batch["tokens"], batch["positions"], segment_ids=batch["segment_ids"],
                             collect=collect, attn_impl=attn_impl)

    def token_loss(trainable, teacher_params, batch, key):
        p = trainable["model"]
        if combine is not None:
            p = combine(p, trainable["frozen"])
        if obj.qat:
            p = qat_lib.apply(p, list(obj.qat))
        p = cast_floats(p, compute_dtype)
        if obj.loss == "align":
            if doc_masking:
                raise FlashitError("loss 'align' runs without document masking (a Mamba state cannot be split by "
                                   "segment_ids); pass --doc-masking false")
            b = {k: v for k, v in batch.items() if k != "positions"}
            err = _layer_alignment(obj, student, teacher, p, teacher_params, b, run, compute_dtype)
            return err, {"align": err}
        collect = (("hidden",) if want_hidden else ()) + (("inputs",) if want_attn else ())
        if fuse_projections:
            p = _fused_for_training(student, p, collect)
        s_logits, _, s_aux = run(student, p, batch, collect)
        ce = L.token_cross_entropy(s_logits, batch["targets"])
        mets = {"ce": ce}
        kd_name = obj.kd
        if kd_name is None:
            return ce, mets
        t_logits = t_aux = None
        if obj.needs_teacher:
            t_logits, _, t_aux = run(teacher, teacher_params, batch, collect)
            t_logits = jax.lax.stop_gradient(t_logits)
        T = obj.temperature
        if kd_name == "hard":
            kd = L.token_cross_entropy(s_logits, L.teacher_labels(t_logits, key if obj.hard_sample else None, T))
        elif kd_name in ("soft", "feature"):
            kd = L.token_soft_target(s_logits, t_logits, T)
        elif kd_name == "fkl":
            kd = L.token_forward_kl(s_logits, t_logits, T)
        elif kd_name == "rkl":
            kd = L.token_reverse_kl(s_logits, t_logits, T)
        elif kd_name == "topk":
            kd = L.token_topk_kl(s_logits, batch["topk_values"], batch["topk_indices"], T)
        else:  # pragma: no cover - Objective validates names
            raise AssertionError(kd_name)
        mets["kd"] = kd
        if kd_name == "feature":
            hid = 0.0
            for j, ti in enumerate(obj.layer_map):
                hs = s_aux["hidden"][j].astype(jnp.float32)
                ht = jax.lax.stop_gradient(t_aux["hidden"][ti]).astype(jnp.float32)
                proj = trainable["proj"][j]["w"]
                hid = hid + jnp.mean(jnp.square(hs @ proj - ht), axis=-1)
            hid = hid / len(obj.layer_map)
            mets["hidden"] = hid
            kd = kd + jnp.float32(obj.feature_weight) * hid
            if want_attn:
                pos, seg = (batch["positions"], batch["segment_ids"]) if doc_masking else (
                    jnp.broadcast_to(jnp.arange(batch["tokens"].shape[1], dtype=jnp.int32), batch["tokens"].shape), None)
                s_maps = _attention_maps(student, p, s_aux["inputs"], pos, seg, range(len(obj.layer_map)))
                t_maps = _attention_maps(teacher, teacher_params, t_aux["inputs"], pos, seg, obj.layer_map)
                att = 0.0
                for sm, tm in zip(s_maps, t_maps):
                    if sm.shape[1] != tm.shape[1]:
                        sm, tm = jnp.mean(sm, axis=1, keepdims=True), jnp.mean(tm, axis=1, keepdims=True)
                    att = att + jnp.mean(jnp.square(sm - jax.lax.stop_gradient(tm)), axis=(1, 3))
                att = att / len(obj.layer_map)
                mets["attention"] = att
                kd = kd + jnp.float32(obj.attention_weight) * att
        if obj.loss == "mix":
            return jnp.float32(obj.alpha) * ce + jnp.float32(1 - obj.alpha) * kd, mets
        return kd, mets

    return token_loss


def make_train_step(token_loss: Callable, optimizer: optax.GradientTransformation, accum_steps: int = 1,
                    batch_sharding=None):
    """(state, teacher_params, batch) -> (state, metrics). The loss is the mean over every masked
    token of the global batch, so accumulating A micro-batches equals one batch A times larger."""

    def step(state, teacher_params, batch):
        rng, key = jax.random.split(state["rng"])
        mask_total = jnp.maximum(jnp.sum(batch["loss_mask"].astype(jnp.float32)), 1.0)
        frozen = state.get("frozen")  # an input of the loss that is not differentiated (a frozen base)

        def micro(trainable, mb, k):
            if frozen is not None:
                trainable = {**trainable, "frozen": frozen}
            tl, mets = token_loss(trainable, teacher_params, mb, k)
            m = mb["loss_mask"].astype(jnp.float32)
            return jnp.sum(tl * m) / mask_total, {n: jnp.sum(v * m) / mask_total for n, v in mets.items()}

        grad_fn = jax.value_and_grad(micro, has_aux=True)
        params = state["params"]
        if accum_steps == 1:
            (loss, mets), grads = grad_fn(params, batch, key)
        else:
            b = batch["tokens"].shape[0]
            if b % accum_steps:
                raise FlashitError(f"batch {b} is not a multiple of accum_steps {accum_steps}")

            # micro-batch a takes rows a, a + A, a + 2A, ...: every data shard keeps feeding its own rows
            def split(x):
                y = x.reshape(b // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
                return y

            mbs = jax.tree.map(split, batch)
            keys = jax.random.split(key, accum_steps)

            def body(carry, xs):
                mb, k = xs
                if batch_sharding is not None:
                    mb = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, batch_sharding(x.ndim)), mb)
                (l, m), g = grad_fn(params, mb, k)
                acc_g, acc_l, acc_m = carry
                return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, jax.tree.map(jnp.add, acc_m, m)), None

            zeros_g = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), params)
            _, m0 = jax.eval_shape(lambda: micro(params, jax.tree.map(lambda x: x[0], mbs), keys[0]))
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m0)
            (grads, loss, mets), _ = jax.lax.scan(body, (zeros_g, jnp.float32(0.0), zeros_m), (mbs, keys))
        masks = state.get("masks")
        if masks is not None:  # pruned weights get no gradient (so no Adam moments either)
            grads = {**grads, "model": apply_masks(grads["model"], masks)}
        with jax.numpy_dtype_promotion("standard"):  # optax computes b1 ** count (float ** int32)
            updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        if masks is not None:  # and stay exactly 0
            new_params = {**new_params, "model": apply_masks(new_params["model"], masks)}
        metrics = {"loss": loss, **mets, "grad_norm": _global_norm(grads), "tokens": mask_total}
        new_state = {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state, "rng": rng}
        if frozen is not None:
            new_state["frozen"] = frozen
        if masks is not None:
            new_state["masks"] = masks
        return new_state, metrics

    return step


def _global_norm(tree):
    # optax's own norm, the expression clip_by_global_norm computes on the same gradients, so that XLA's
    # CSE computes it once (on CPU it already merged the older jnp.square form: one reduction per leaf)
    tree_norm = getattr(getattr(optax, "tree", None), "norm", None)
    if tree_norm is not None:
        return tree_norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def apply_masks(params, masks):
    """Zero the entries of `params` where `masks` (bool, a sub-tree of params: pruned matrices) is False."""
    from flashit_jax import tree

    flat = tree.flatten(masks)
    return tree.map_with_path(lambda p, x: jnp.where(flat[p], x, jnp.zeros((), x.dtype)) if p in flat else x, params)


def init_state(trainable, optimizer, seed: int, masks=None):
    """masks: keep-masks of pruned weights (sparse re-fine-tuning): they stay 0 through training."""
    if masks is not None:
        trainable = {**trainable, "model": apply_masks(trainable["model"], masks)}
    state = {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": optimizer.init(trainable),
             "rng": jax.random.PRNGKey(seed)}
    if masks is not None:
        state["masks"] = masks
    return state
