"""The compiled fsdp train step moves weights, not logits: with the embedding split over `fsdp`,
XLA's partitioner once chose to contract the unembedding over the split dim, all-gathering and
reduce-scattering full-batch fp32 logits (2.1 GB per step on 2 H200s: 46% scaling). The model now
pins the residual stream and the logits to the batch axes (`sharding.constrain_batch`); this checks
the collectives of the compiled step on 2 fake CPU devices (a subprocess: the device count is fixed
when jax starts)."""
import math
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import re
    import jax, jax.numpy as jnp
    from flashit_jax import sharding as shd
    from models import Model
    from models.llama import LlamaConfig
    from train.bench import batch as make_batch
    from train.config import TrainConfig
    from train.loop import build_state, compile_step, place_teacher
    from train.optim import make_optimizer
    from train.step import Objective, make_token_loss
    from train.student import from_teacher_layers

    # vocab 384 and d 48: no weight has a dim equal to the logits' [4, 16, 384]
    teacher = Model(LlamaConfig(vocab_size=384, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                tie_embeddings=True))
    tp0 = teacher.init_params(jax.random.key(0))
    student, sp = from_teacher_layers(teacher, tp0, (0,))
    mesh = shd.make_mesh(data=1, fsdp=2, devices=jax.devices()[:2])
    cfg = TrainConfig(steps=10, batch_size=4, seq_len=16, warmup_steps=2, loss="mix", compute_dtype="fp32",
                      attn_impl="xla", doc_masking=False)
    opt = make_optimizer(cfg)
    state, ssh = build_state(student, sp, {}, opt, mesh, 0)
    tp, tsh = place_teacher(teacher, tp0, mesh, jnp.float32)
    loss = make_token_loss(Objective("mix", kd_loss="soft", alpha=0.5, temperature=2.0), student, teacher,
                           compute_dtype=jnp.float32, attn_impl="xla", doc_masking=False)
    keys = ["tokens", "targets", "segment_ids", "positions", "loss_mask"]
    step = compile_step(loss, opt, mesh, ssh, tsh, keys)
    batch = shd.shard_batch(make_batch(jax.random.key(1), 4, 16, 384), mesh)
    for line in step.lower(state, tp, batch).compile().as_text().splitlines():
        if re.search(r"= .*(all-gather|all-to-all|all-reduce|reduce-scatter)(-start)?\\(", line):
            print("COLLECTIVE", line.split(" = ", 1)[1].split("(")[0])
""")


@pytest.mark.slow  # 24 s on 2 cores (2026-12-05): the sharded step's values stay in tests/test_train_multidevice.py
def test_fsdp_step_gathers_weights_not_logits():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("COLLECTIVE")]
    assert any("all-gather" in ln for ln in lines), lines  # fsdp: the weights are gathered
    shapes = [tuple(int(d) for d in dims.split(",") if d) for ln in lines
              for dims in re.findall(r"\[([\d,]*)\]", ln)]
    logits = [s for s in shapes if s[-1:] == (384,) and len(s) == 3]
    assert not logits, lines  # no [batch, seq, vocab] array crosses devices
    # activations that do cross (the embedding lookup's all-to-all) are per-device slices at most
    moved = max((s for s in shapes if len(s) >= 3), key=math.prod, default=())
    assert math.prod(moved) <= 4 * 16 * 48, lines


def test_teacher_placement_choice():
    import jax
    import jax.numpy as jnp
    import pytest

    from flashit_jax import sharding as shd
    from flashit_jax.errors import FlashitError
    from train.loop import teacher_replicated

    mesh = shd.make_mesh(data=1, fsdp=1, devices=jax.devices()[:1])
    params = {"w": jnp.zeros((4, 4), jnp.float32), "ids": jnp.zeros((3,), jnp.int32)}
    assert teacher_replicated(params, mesh, jnp.bfloat16, "replicated")
    assert not teacher_replicated(params, mesh, jnp.bfloat16, "fsdp")
    assert not teacher_replicated(params, mesh, jnp.bfloat16, "auto")  # nothing split on this mesh
    with pytest.raises(FlashitError, match="teacher_sharding must be one of"):
        teacher_replicated(params, mesh, jnp.bfloat16, "zero3")
