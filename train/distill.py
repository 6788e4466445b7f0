r"""Distil a teacher into a smaller student.

    python -m train.distill --teacher smollm2-135m --student layers=0,6,12,18,24,29 \\
        --loss mix --kd-loss soft --temperature 2 --data ../shared/data/shakespeare \\
        --steps 300 --batch-size 8 --seq-len 256 --out out/kd

    python -m train.distill --config distill_shakespeare.yaml --loss ce --out out/ce   # the CE baseline

--student: `layers=0,5,10,...` (those teacher layers, re-indexed), a YAML file under
train/configs/ (`layers:`, `config:` for a narrower random student, or `model:`), or any model
spec, or `hybrid=50%` (the teacher with half its attention layers turned into Mamba mixers;
docs/hybrid.md). --loss: ce (data only), hard (teacher labels), soft (T^2-scaled soft targets), fkl, rkl,
topk (teacher top-k logits cached on disk), feature (soft targets + hidden states [+ attention
maps] through learned projections), align (each converted layer alone, fed the teacher's
hidden states, reproduces the teacher layer's output), mix (alpha * CE + (1 - alpha) * --kd-loss).
--trainable REGEX trains only the matching parameters (e.g. the mixers: 'layers/\d+/mixer/.*').
The final student is written to OUT/model (load it with `python -m eval.perplexity --model OUT/model`).
Every flag is a TrainConfig field (train/config.py); --config FILE loads YAML.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from flashit_jax.errors import FlashitError, user_errors
from train.config import parse_args

PROG = "python -m train.distill"


def layer_map(student_layers, n_student: int, n_teacher: int) -> tuple[int, ...]:
    """Teacher layer whose output each student layer should reproduce.

    A student made of teacher layers l_0 < l_1 < ...: student layer j stands in for teacher
    layers l_j .. l_{j+1} - 1, so it matches the teacher's output after l_{j+1} - 1 (the last one
    after the teacher's last layer). Otherwise layers are mapped uniformly (TinyBERT)."""
    if student_layers:
        nxt = list(student_layers[1:]) + [n_teacher]
        return tuple(max(l, n - 1) for l, n in zip(student_layers, nxt))
    return tuple(max(0, round((j + 1) * n_teacher / n_student) - 1) for j in range(n_student))


def projections(n: int, d_student: int, d_teacher: int, seed: int) -> dict:
    """Learned [d_s, d_t] maps from student to teacher hidden states; identity when widths match."""
    if d_student == d_teacher:
        return {j: {"w": jnp.eye(d_student, dtype=jnp.float32)} for j in range(n)}
    keys = jax.random.split(jax.random.key(seed + 1), n)
    return {j: {"w": jax.random.normal(keys[j], (d_student, d_teacher), jnp.float32) / jnp.float32(d_student**0.5)}
            for j in range(n)}


def build_task(cfg):
    from flashit_jax.loading import load_model
    from train.loop import Task
    from train.step import Objective
    from train.student import build_student, check_vocab

    teacher = load_model(cfg.teacher, "float32", seed=cfg.seed)
    if teacher.tokenizer is None:
        raise FlashitError(f"teacher {cfg.teacher!r} has no tokenizer (random weights?); distillation needs one")
    student = build_student(cfg.student, teacher.model, teacher.params, seed=cfg.seed,
                            teacher_tokenizer=teacher.tokenizer)
    check_vocab(student.model, teacher.model)
    n_s, n_t = student.model.config.n_layers, teacher.model.config.n_layers
    lmap = layer_map(student.teacher_layers, n_s, n_t) if cfg.loss == "feature" else ()
    mamba_layers = tuple(getattr(student.model.config, "mamba_layers", ()))
    if mamba_layers and cfg.doc_masking:
        raise FlashitError(f"the student has Mamba layers {list(mamba_layers)}: a recurrent state cannot be split "
                           "between packed documents; pass --doc-masking false")
    align = ()
    if cfg.loss == "align":
        if n_s != n_t:
            raise FlashitError(f"loss 'align' matches student layer i to teacher layer i; the student has {n_s} layers, "
                               f"the teacher {n_t}")
        align = mamba_layers
    obj = Objective(loss=cfg.loss, kd_loss=cfg.kd_loss, alpha=cfg.alpha, temperature=cfg.temperature,
                    hard_sample=cfg.hard_sample, feature_weight=cfg.feature_weight,
                    attention_weight=cfg.attention_weight, layer_map=lmap, align_layers=align)
    extra = {}
    if cfg.loss == "feature":
        extra["proj"] = projections(n_s, student.model.config.dim, teacher.model.config.dim, cfg.seed)
    record = {"transform": "distill", "teacher": cfg.teacher, "student": cfg.student,
              "student_desc": student.description, "loss": cfg.loss,
              **({"kd_loss": cfg.kd_loss, "alpha": cfg.alpha} if cfg.loss == "mix" else {}),
              **({"temperature": cfg.temperature} if obj.kd not in (None, "hard", "align") else {}),
              **({"trainable": cfg.trainable} if cfg.trainable else {})}
    return Task(student.model, student.params, teacher.tokenizer, obj, teacher.model, teacher.params,
                extra_trainable=extra, transforms=list(teacher.transforms), record=record)


def main(argv=None):
    cfg = parse_args(argv, prog=PROG, description=__doc__, defaults={"out": "out/distill"})
    with user_errors("train.distill"):
        from train.loop import init_distributed, run

        init_distributed(cfg)
        task = build_task(cfg)
        summary = run(cfg, task, prog="distill")
        summary.pop("state", None)
        return summary


if __name__ == "__main__":
    main()
