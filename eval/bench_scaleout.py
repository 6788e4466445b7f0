"""Scale-out on several devices, each figure against 1 device in the same run.

    python -m eval.bench_scaleout --devices 1,2 --out out/scaleout            # 2 GPUs (eval/run_scaleout.sh)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
        python -m eval.bench_scaleout --tiny --devices 1,2,8 --out /tmp/so    # correctness on fake CPU devices

Parts (each in its own process with a time limit, all devices visible; "1 device" is a mesh of the
first device, "N devices" one of the first N):

train   the `train.distill` step (train.loop.build_state / compile_step: fp32 master weights, bf16
        compute, AdamW, `mix` objective = 0.5 CE + 0.5 T^2 soft targets with the teacher inside the
        step) of a random Llama-shaped teacher (326M parameters) and a student of every second
        teacher layer, with the same per-device batch on a `data` mesh and on an `fsdp` mesh.
        Tokens/s per device and scaling efficiency (per-device tokens/s on N / on 1). Check: the
        first step's loss on N devices (N x the rows) equals the mean of the 1-device first-step
        losses of those row blocks from the same initial state.
moe     the Mixtral MoE layer (models.mixtral.moe_layer, 8 experts of d=4096, ffn=14336, top-2) with
        the expert stacks placed by mixtral.PARAM_AXES on an `expert` mesh axis (expert parallelism
        inside `jax.set_mesh`): tokens/s, and the output's max relative difference from 1 device.
decode  batch-1 greedy decoding of the Llama-3.2-1B shape (random bf16 weights): 1 device with the
        default kernels (Pallas GEMV + flash-decoding on GPUs), 1 device with XLA ops, and tensor
        parallel on N devices (`generate(..., mesh=make_mesh(data=1, tensor=N))`: weights by
        llama.PARAM_AXES, KV cache by sharding.CACHE_AXES), with XLA's matmuls (the default under a
        mesh) and with our GEMV kernel per weight block (FLASHIT_JAX_GEMV=partitioned). Tokens/s;
        checks: the greedy tokens and the prompt's logits against 1 device (XLA), and the
        collectives in the compiled decode step.

Results: OUT/results.json, OUT/results.md (markdown tables), OUT/<part>.json (rows as they come).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

PARTS = ("train", "moe", "decode")
# seconds each later part is guaranteed when an earlier one runs long (--budget is shared)
RESERVE = {"train": 100.0, "moe": 40.0, "decode": 120.0}
TINY_RESERVE = {"train": 60.0, "moe": 30.0, "decode": 45.0}


# ----------------------------------------------------------------------------- shapes
def train_shape(tiny: bool):
    from models.llama import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                           tie_embeddings=True)
    # 326M parameters (8 layers of d=1536, 12 heads of 128, 4 KV heads, ffn 6144, 32k vocab, tied):
    # big enough that a step is compute-bound at 8 x 1024 tokens per GPU, few layers to compile
    return LlamaConfig(vocab_size=32000, dim=1536, n_layers=8, n_heads=12, n_kv_heads=4, ffn_dim=6144,
                       rope_theta=500000.0, tie_embeddings=True)


def moe_shape(tiny: bool):
    from models.mixtral import MixtralConfig

    if tiny:
        return MixtralConfig(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, n_experts=8,
                             top_k=2)
    return MixtralConfig(vocab_size=32000, dim=4096, n_layers=1, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                         n_experts=8, top_k=2)


def decode_shape(tiny: bool):
    from models.configs import SHAPES
    from models.llama import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=16, n_kv_heads=8, ffn_dim=256,
                           tie_embeddings=True)
    return SHAPES["llama-3.2-1b"]


# ----------------------------------------------------------------------------- helpers
T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


class Rows:
    """Rows of one part, rewritten to OUT/<part>.json after each one (a killed part keeps them)."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header, self.rows = path, header, []
        self.write()

    def add(self, row: dict) -> None:
        self.rows.append(row)
        log("row", json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}))
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps({"header": self.header, "rows": self.rows}, indent=2))


def rel_l2(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_rel(a, b) -> float:
    """max |a - b| / max |b|: the largest elementwise difference, on the output's scale."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "f64": 8}
_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)(?:-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")


def collectives(hlo: str) -> dict:
    """Collective ops of a compiled module: {op: [count, bytes of the largest array it returns]}.
    XLA merges small collectives into one op on tuples; an async start op counts once."""
    out: dict = {}
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if not m:
            continue
        largest = 0
        for dtype, dims in _ARRAY.findall(m.group(1)):
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            largest = max(largest, n * _DTYPE_BYTES.get(dtype, 4))
        c = out.setdefault(m.group(2), [0, 0])
        c[0] += 1
        c[1] = max(c[1], largest)
    return out


def error_text(e: BaseException, tail: int = 1500, head: int = 300) -> str:
    """`Type: message` for results.json, keeping the message's tail (where XLA and custom
    partitioners put the cause; their head is a Python traceback) and a short head."""
    msg = f"{type(e).__name__}: {e}"
    if len(msg) <= head + tail + 40:
        return msg
    return f"{msg[:head]} [... {len(msg) - head - tail} chars ...] {msg[-tail:]}"


def time_calls(fn, *args, calls: int = 10, reps: int = 3) -> float:
    """Median over `reps` of the mean seconds of `calls` back-to-back calls."""
    from kernels.timing import time_calls as timed  # jax imports late here: XLA_FLAGS are set first

    return timed(fn, *args, calls=calls, reps=reps)


def device_counts(spec: str, available: int) -> list[int]:
    from flashit_jax.errors import FlashitError

    counts = sorted({int(s) for s in spec.split(",") if s.strip()})
    if not counts or counts[0] < 1:
        raise FlashitError(f"--devices wants positive device counts, got {spec!r}")
    if counts[-1] > available:
        raise FlashitError(f"--devices {spec}: only {available} devices are visible")
    return counts if counts[0] == 1 else [1, *counts]


# ----------------------------------------------------------------------------- part 1: training step
def part_train(args, rows: Rows, deadline: float):
    import jax
    import jax.numpy as jnp

    from flashit_jax import sharding as shd
    from models import Model
    from train.bench import batch as make_batch
    from train.bench import fwd_flops_per_token, matmul_params, train_flops_per_token
    from train.config import TrainConfig
    from train.loop import build_state, compile_step, place_teacher, teacher_replicated
    from train.optim import make_optimizer
    from train.step import Objective, make_token_loss
    from train.student import from_teacher_layers

    devs = jax.devices()
    counts = device_counts(args.devices, len(devs))
    gpu = jax.default_backend() == "gpu"
    dtype = jnp.float32 if args.tiny else jnp.bfloat16  # fp32 on fake CPU devices: the check is to ~1e-6
    attn = args.attn_impl or ("cudnn" if gpu else "xla")
    b, t = args.train_batch, args.train_seq
    teacher = Model(train_shape(args.tiny))
    t_params = teacher.init_params(jax.random.key(0))
    student, s_params = from_teacher_layers(teacher, t_params, tuple(range(0, teacher.config.n_layers, 2)))
    sc, tc = student.config, teacher.config
    flops_tok = train_flops_per_token(sc, t) + fwd_flops_per_token(tc, t)
    log(f"train: teacher {matmul_params(tc) / 1e6:.0f}M matmul params ({tc.n_layers} layers), student "
        f"{matmul_params(sc) / 1e6:.0f}M ({sc.n_layers} layers), {b} x {t} tokens per device, {jnp.dtype(dtype).name}, "
        f"attention {attn}, {flops_tok / 1e9:.2f} GFLOP/token")
    obj = Objective("mix", kd_loss="soft", alpha=0.5, temperature=2.0)
    keys = ["tokens", "targets", "segment_ids", "positions", "loss_mask"]
    full = make_batch(jax.random.key(1), b * counts[-1], t, tc.vocab_size)
    chunk_loss: list[float] = []  # first-step loss of each per-device row block on 1 device
    base = None
    configs = [(1, "data", attn)] + [(n, m, attn) for n in counts if n > 1 for m in ("data", "fsdp")]
    for n, axis, impl in configs:  # a failed cuDNN configuration is retried with XLA attention (appended)
        name = (f"{axis}={n}" if n > 1 else "1 device") + ("" if impl == attn else f", {impl} attention")
        if time.perf_counter() > deadline:
            rows.add({"part": "train", "config": name, "devices": n, "error": "skipped: part deadline"})
            continue
        try:
            mesh = shd.make_mesh(data=n if axis == "data" else 1, fsdp=n if axis == "fsdp" else 1, devices=devs[:n])
            cfg = TrainConfig(steps=1000, batch_size=b * n, seq_len=t, warmup_steps=2, loss="mix",
                              compute_dtype="fp32" if args.tiny else "bf16", attn_impl=impl, doc_masking=False)
            opt = make_optimizer(cfg)
            state, state_sh = build_state(student, s_params, {}, opt, mesh, 0)
            tp, t_sh = place_teacher(teacher, t_params, mesh, dtype, args.teacher_sharding)
            loss = make_token_loss(obj, student, teacher, compute_dtype=dtype, attn_impl=impl, doc_masking=False)
            step = compile_step(loss, opt, mesh, state_sh, t_sh, keys)
            placed = [shd.shard_batch({k: v[i * b * n:(i + 1) * b * n] for k, v in full.items()}, mesh)
                      for i in range(counts[-1] if n == 1 else 1)]
            tc0 = time.perf_counter()
            compiled = step.lower(state, tp, placed[0]).compile()
            compile_s = time.perf_counter() - tc0
            row = {"part": "train", "config": name, "devices": n, "mesh": {k: int(v) for k, v in mesh.shape.items()},
                   "per_device_batch": b, "seq": t, "compile_s": compile_s, "attention": impl,
                   "teacher": "replicated" if (teacher_replicated(t_params, mesh, dtype, args.teacher_sharding)
                                               or mesh.shape["fsdp"] * mesh.shape["tensor"] == 1)
                   else "split by the rules"}
            if n == 1:  # the first-step loss of every row block, each from the initial state
                for blk in placed[1:]:
                    _, m = compiled(jax.tree.map(jnp.copy, state), tp, blk)
                    chunk_loss.append(float(m["loss"]))
                state, m = compiled(state, tp, placed[0])
                chunk_loss.insert(0, float(m["loss"]))
                row["loss_step1"] = chunk_loss[0]
            else:
                state, m = compiled(state, tp, placed[0])
                want = statistics.fmean(chunk_loss[:n]) if len(chunk_loss) >= n else float("nan")
                row.update(loss_step1=float(m["loss"]), loss_expected=want,
                           loss_rel_diff=abs(float(m["loss"]) - want) / abs(want))
            state, m = compiled(state, tp, placed[0])  # warm
            jax.block_until_ready(m)
            t1 = time.perf_counter()
            for _ in range(args.train_steps):
                state, m = compiled(state, tp, placed[0])
            jax.block_until_ready((state, m))
            dt = (time.perf_counter() - t1) / args.train_steps
            tps = b * n * t / dt
            row.update(step_ms=dt * 1e3, tokens_per_s=tps, tokens_per_s_per_device=tps / n,
                       tflops_per_device=flops_tok * tps / n / 1e12, loss_last=float(m["loss"]))
            if n == 1:
                base = row["tokens_per_s_per_device"]
            elif base:
                row["scaling_efficiency"] = row["tokens_per_s_per_device"] / base
            row["collectives"] = collectives(compiled.as_text()) if n > 1 else {}
            stats = devs[0].memory_stats() or {}
            row["peak_gb_device0"] = stats.get("peak_bytes_in_use", 0) / 1e9  # whole process so far
            rows.add(row)
            del state, tp, compiled, placed
        except Exception as e:  # OOM, a kernel that does not partition: report, go on
            rows.add({"part": "train", "config": name, "devices": n, "attention": impl, "error": error_text(e)})
            if impl == "cudnn" and n > 1:
                configs.append((n, axis, "xla"))
        gc.collect()


# ----------------------------------------------------------------------------- part 2: MoE layer
def part_moe(args, rows: Rows, deadline: float):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from eval.bench_moe import _layer_params
    from flashit_jax import sharding as shd
    from models import mixtral

    devs = jax.devices()
    counts = device_counts(args.devices, len(devs))
    c = moe_shape(args.tiny)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    p = _layer_params(c, dtype, jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, args.moe_tokens, c.dim), dtype)
    flops = 2 * args.moe_tokens * c.top_k * 3 * c.dim * c.ffn_dim
    log(f"moe: {args.moe_tokens} tokens, d={c.dim}, ffn={c.ffn_dim}, {c.n_experts} experts, top-{c.top_k}, "
        f"{jnp.dtype(dtype).name}")
    ref = None
    base = None
    for n in counts:
        if time.perf_counter() > deadline:
            rows.add({"part": "moe", "devices": n, "error": "skipped: part deadline"})
            continue
        try:
            f = jax.jit(lambda p, x: mixtral.moe_layer(p, x, c)[0])  # a fresh jit per mesh
            if n == 1:
                pl, xl = jax.device_put((p, x), devs[0])
                y = f(pl, xl)
                hlo = ""
                t = time_calls(f, pl, xl, calls=args.moe_calls)
            else:
                mesh = shd.make_mesh(data=1, expert=n, devices=devs[:n])
                pl = shd.shard_params({"layers": {0: {"moe": p}}}, mesh, mixtral.PARAM_AXES)["layers"][0]["moe"]
                xl = jax.device_put(x, NamedSharding(mesh, P()))
                with jax.set_mesh(mesh):
                    y = f(pl, xl)
                    hlo = f.lower(pl, xl).compile().as_text()
                    t = time_calls(f, pl, xl, calls=args.moe_calls)
            local = {s.data.shape[0] for s in pl["experts"]["gate"]["w"].addressable_shards}
            row = {"part": "moe", "devices": n, "experts_per_device": sorted(local), "ms": t * 1e3,
                   "tokens_per_s": args.moe_tokens / t, "tflops_total": flops / t / 1e12,
                   "collectives": collectives(hlo) if hlo else {}}
            if n == 1:
                ref, base = jax.device_get(y), t
            else:
                yn = jax.device_get(y)
                row.update(max_rel_diff=max_rel(yn, ref), rel_l2_diff=rel_l2(yn, ref), speedup=base / t,
                           scaling_efficiency=base / t / n)
            rows.add(row)
            del pl, xl, y
        except Exception as e:
            rows.add({"part": "moe", "devices": n, "error": error_text(e)})
        gc.collect()


# ----------------------------------------------------------------------------- part 3: decode
def _restore(saved: dict) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def part_decode(args, rows: Rows, deadline: float):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flashit_jax import generate as gen
    from flashit_jax import sharding as shd
    from flashit_jax import tree
    from models import Model

    devs = jax.devices()
    counts = device_counts(args.devices, len(devs))
    gpu = jax.default_backend() == "gpu"
    c = decode_shape(args.tiny)
    model = Model(c)
    dtype = jnp.float32 if args.tiny else jnp.bfloat16
    # matrices x8 (std 0.16): at the init's std of 0.02 greedy decoding repeats one token, and the
    # token check below would prove nothing; the speed does not depend on the values
    scale = jax.jit(lambda p: jax.tree.map(lambda w: w * jnp.asarray(8, w.dtype) if w.ndim == 2 else w, p))
    # jitted init: eager init of the 1B shape took 50 s of the 2-GPU run's budget (2026-11-23)
    init = jax.jit(lambda k: model.init_params(k, dtype))
    params = jax.device_put(scale(init(jax.random.key(0))), devs[0])
    wbytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in tree.flatten(params).values())
    prompt = np.random.default_rng(0).integers(0, c.vocab_size, args.decode_prompt).tolist()
    steps = args.decode_steps
    per_call = 4 if args.tiny else 16
    log(f"decode: {c.n_layers} layers d={c.dim} {c.n_heads}/{c.n_kv_heads} heads vocab {c.vocab_size}, "
        f"{wbytes / 1e9:.2f} GB of weights, prompt {len(prompt)}, {steps} steps, {per_call} steps per call")
    fwd_tokens = jnp.asarray(prompt, jnp.int32)[None]
    # tensor=N: the default under a mesh (XLA matmuls and attention); "+ GEMV": our Pallas GEMV on
    # each device's block of the weights (custom_partitioning; interpreted on CPU, as a check)
    gemv_mode = "partitioned" if gpu else "interpret"
    variants = ([("1 device, default kernels", 1, "auto", {})] if gpu else []) + [
        ("1 device, XLA", 1, "xla", {"FLASHIT_JAX_GEMV": "0"})]
    for n in counts[1:]:
        variants += [(f"tensor={n}", n, "auto", {}), (f"tensor={n} + GEMV", n, "auto", {"FLASHIT_JAX_GEMV": gemv_mode})]
    # Correctness beyond bf16 noise. bf16 decoding on N devices sums in another order than on 1 and
    # greedy tokens of x8-scaled random weights flip at near-ties (2x H200, 2026-11-23: from token
    # 10, prompt logits 4e-2 apart, as far as 1-device bf16 is from fp32). So: (a) every row's
    # prompt logits against an fp32 1-device forward, passing when within 2x (+1e-4) of the
    # 1-device bf16 row's own error; (b) greedy tokens of the fp32 weights (matmuls at "highest")
    # for `check_steps` steps, which must equal 1 device's; a wrong shard or a missing all-reduce
    # moves logits by O(1) and fails both.
    params32 = jax.jit(lambda p: jax.tree.map(lambda w: w.astype(jnp.float32) if w.ndim == 2 else w, p))(params)
    f32fwd = jax.jit(lambda p, t: model.forward(p, t, attn_impl="xla")[0])
    check_steps = 16 if not args.tiny else 8
    with jax.default_matmul_precision("highest"):
        truth = np.asarray(jax.device_get(f32fwd(params32, fwd_tokens)), np.float32)
        env32 = {"FLASHIT_JAX_GEMV": "0"}
        saved32 = {k: os.environ.get(k) for k in env32}
        os.environ.update(env32)
        try:
            tokens32 = np.asarray(gen.generate(model, params32, [prompt], max_new_tokens=check_steps,
                                               steps_per_call=per_call, attn_impl="xla").tokens[0])
        finally:
            _restore(saved32)
    # the largest collective a tensor-parallel step may hold: activations, logit maxima, token ids;
    # half the smallest weight matrix (2048 x 512 bf16 for Llama-3.2-1B) and at most 1 MiB
    smallest_w = min(int(np.prod(v.shape)) * v.dtype.itemsize for v in tree.flatten(params).values() if v.ndim == 2)
    coll_limit = min(1 << 20, smallest_w // 2)
    ref_tokens = ref_logits = base = ref_err = None
    for name, n, attn, env in variants:
        if time.perf_counter() > deadline:
            rows.add({"part": "decode", "config": name, "devices": n, "error": "skipped: part deadline"})
            continue
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            mesh = None
            p = params
            if n > 1:
                mesh = shd.make_mesh(data=1, tensor=n, devices=devs[:n])
                p = shd.shard_params(params, mesh, shd.family_axes(model))
            before = set(gen._EXECUTABLES)
            runs = [gen.generate(model, p, [prompt], max_new_tokens=steps + 1, steps_per_call=per_call, attn_impl=attn,
                                 mesh=mesh) for _ in range(3)]
            r = sorted(runs, key=lambda r: r.tokens_per_s)[1]
            new = [k for k in gen._EXECUTABLES if k not in before and k[0] is gen._decode]
            hlo = gen._EXECUTABLES[new[-1]].as_text() if new else ""
            f = jax.jit(lambda p, t: model.forward(p, t, attn_impl="xla")[0])
            if mesh is None:
                logits = f(p, fwd_tokens)
            else:
                with jax.set_mesh(mesh):
                    logits = f(p, fwd_tokens)
            logits = np.asarray(jax.device_get(logits), np.float32)
            toks = np.asarray(r.tokens[0])
            row = {"part": "decode", "config": name, "devices": n, "tokens_per_s": r.tokens_per_s,
                   "distinct_tokens": len(set(toks.tolist())), "logits_finite": bool(np.isfinite(logits).all()),
                   "ms_per_token": 1e3 / r.tokens_per_s, "ttft_ms": r.ttft_s * 1e3, "compile_s": runs[0].compile_s,
                   "weight_bytes": wbytes, "weight_GBps": wbytes * r.tokens_per_s / 1e9,
                   "all_runs_tokens_per_s": [x.tokens_per_s for x in runs],
                   "collectives_per_call": collectives(hlo) if n > 1 else {}, "steps_per_call": per_call}
            row["logits_rel_err_fp32"] = rel_l2(logits, truth)
            if n > 1:
                coll = row["collectives_per_call"]
                row["max_collective_bytes"] = max((v[1] for v in coll.values()), default=0)
                row["collective_limit_bytes"] = coll_limit
                row["collectives_ok"] = row["max_collective_bytes"] <= coll_limit
                with jax.default_matmul_precision("highest"):
                    p32 = shd.shard_params(params32, mesh, shd.family_axes(model))
                    t32 = np.asarray(gen.generate(model, p32, [prompt], max_new_tokens=check_steps,
                                                  steps_per_call=per_call, attn_impl="xla", mesh=mesh).tokens[0])
                del p32
                same32 = t32 == tokens32
                row.update(fp32_tokens_equal=bool(same32.all()), fp32_check_steps=check_steps,
                           fp32_first_mismatch=None if same32.all() else int(np.argmin(same32)))
            if name == "1 device, XLA":
                ref_tokens, ref_logits, base, ref_err = toks, logits, r.tokens_per_s, row["logits_rel_err_fp32"]
            elif ref_tokens is not None:
                same = toks == ref_tokens
                row.update(tokens_equal=bool(same.all()),
                           first_token_mismatch=None if same.all() else int(np.argmin(same)),
                           logits_rel_diff=rel_l2(logits, ref_logits), speedup_vs_1_xla=r.tokens_per_s / base)
                if n > 1:
                    row["logits_ok"] = row["logits_rel_err_fp32"] <= 2 * ref_err + 1e-4
                    row["check_ok"] = bool(row["logits_ok"] and row["fp32_tokens_equal"] and row["collectives_ok"])
            rows.add(row)
            del p
        except Exception as e:
            rows.add({"part": "decode", "config": name, "devices": n, "error": error_text(e)})
        finally:
            _restore(saved)
        gc.collect()
    # the 1-device default-kernel row ran before the reference existed: compare it now
    first = next((r for r in rows.rows if r.get("config") == "1 device, default kernels" and "error" not in r), None)
    if first and base:
        first["speedup_vs_1_xla"] = first["tokens_per_s"] / base
    best1 = max((r["tokens_per_s"] for r in rows.rows if r["devices"] == 1 and "error" not in r), default=None)
    for r in rows.rows:
        if best1 and "error" not in r:
            r["speedup_vs_best_1"] = r["tokens_per_s"] / best1
    rows.write()


# ----------------------------------------------------------------------------- report
def _cell(text: str, n: int = 240) -> str:
    """An error for a table cell: its type and its last characters (the cause; the head is a traceback)."""
    text = " ".join(text.replace("|", "/").split())
    if len(text) <= n:
        return text
    kind = text.split(":", 1)[0][:40]
    return f"{kind}: ... {text[-(n - len(kind) - 6):]}"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(report: dict) -> str:
    h = report["header"]
    out = [f"# Scale-out: {h['device']}, jax {h['jax_version']}, {h['date']}", "",
           f"`{h['command']}`", ""]
    parts = report["parts"]
    tr = [r for r in parts.get("train", {}).get("rows", [])]
    if tr:
        out += ["## train.distill step (data / fsdp), same per-device batch", "",
                "| config | devices | batch/device x seq | ms/step | tokens/s | tokens/s/device | TFLOP/s/device | "
                "scaling eff. | step-1 loss rel. diff | compile s | teacher |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in tr:
            if "error" in r:
                out.append(f"| {r['config']} | {r['devices']} | ERROR: {_cell(r['error'])} | | | | | | | | |")
                continue
            out.append(f"| {r['config']} | {r['devices']} | {r['per_device_batch']} x {r['seq']} | {r['step_ms']:.1f} | "
                       f"{r['tokens_per_s']:.0f} | {r['tokens_per_s_per_device']:.0f} | {r['tflops_per_device']:.1f} | "
                       f"{_fmt(r.get('scaling_efficiency'), '.1%')} | {_fmt(r.get('loss_rel_diff'), '.1e')} | "
                       f"{r['compile_s']:.1f} | {r.get('teacher', '-')} |")
        out.append("")
    mo = parts.get("moe", {}).get("rows", [])
    if mo:
        out += ["## Mixtral MoE layer, experts on the `expert` axis", "",
                "| devices | experts/device | ms/layer | tokens/s | speedup | scaling eff. | max rel. diff vs 1 | "
                "rel. L2 diff |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in mo:
            if "error" in r:
                out.append(f"| {r['devices']} | ERROR: {_cell(r['error'])} | | | | | | |")
                continue
            out.append(f"| {r['devices']} | {r['experts_per_device']} | {r['ms']:.3f} | {r['tokens_per_s']:.0f} | "
                       f"{_fmt(r.get('speedup'), '.2f')} | {_fmt(r.get('scaling_efficiency'), '.1%')} | "
                       f"{_fmt(r.get('max_rel_diff'), '.1e')} | {_fmt(r.get('rel_l2_diff'), '.1e')} |")
        out.append("")
    de = parts.get("decode", {}).get("rows", [])
    if de:
        out += ["## Batch-1 greedy decode, tensor parallel", "",
                "| config | devices | tokens/s | ms/token | x 1 device XLA | x best 1 device | weights GB/s | "
                "tokens equal | logits rel. err vs fp32 | fp32 tokens equal | largest collective | check | "
                "collectives per call |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | --- | --- |"]
        for r in de:
            if "error" in r:
                out.append(f"| {r['config']} | {r['devices']} | ERROR: {_cell(r['error'])} | | | | | | | | | | |")
                continue
            coll = ", ".join(f"{k} x{v[0]} (max {v[1]} B)" for k, v in r.get("collectives_per_call", {}).items())
            eq = r.get("tokens_equal")
            eq = "-" if eq is None else ("yes" if eq else f"no (from token {r.get('first_token_mismatch')})")
            eq += f", {r['distinct_tokens']} distinct"
            eq32 = r.get("fp32_tokens_equal")
            eq32 = "-" if eq32 is None else ("yes" if eq32 else f"no (from token {r.get('fp32_first_mismatch')})")
            if eq32 != "-":
                eq32 += f", {r.get('fp32_check_steps')} steps"
            big = r.get("max_collective_bytes")
            big = "-" if big is None else f"{big / 1e3:.1f} KB (limit {r['collective_limit_bytes'] / 1e3:.0f})"
            ok = r.get("check_ok")
            ok = "-" if ok is None else ("ok" if ok else "FAIL")
            out.append(f"| {r['config']} | {r['devices']} | {r['tokens_per_s']:.0f} | {r['ms_per_token']:.3f} | "
                       f"{_fmt(r.get('speedup_vs_1_xla'), '.2f')} | {_fmt(r.get('speedup_vs_best_1'), '.2f')} | "
                       f"{r['weight_GBps']:.0f} | {eq} | {_fmt(r.get('logits_rel_err_fp32'), '.1e')} | {eq32} | "
                       f"{big} | {ok} | {coll or '-'} |")
        out.append("")
    for name, p in parts.items():
        if p.get("status") != "ok":
            out.append(f"- part `{name}`: {p.get('status')}")
    out.append("")
    out.append("Full error messages and every field: results.json; progress: log.txt.")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- driver
def build_parser():
    ap = argparse.ArgumentParser(prog="python -m eval.bench_scaleout", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="1,2", help="device counts (1 is always included)")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, fp32: a correctness run on fake CPU devices")
    ap.add_argument("--out", default="out/scaleout")
    ap.add_argument("--budget", type=float, default=400.0, help="seconds for all parts together")
    ap.add_argument("--teacher-sharding", default="auto", choices=("auto", "fsdp", "replicated"),
                    help="the frozen teacher's placement (train.distill's teacher_sharding)")
    ap.add_argument("--attn-impl", default="", help="training attention (default: cudnn on GPUs, else xla)")
    ap.add_argument("--train-batch", type=int, default=None, help="sequences per device (default 8; tiny 2)")
    ap.add_argument("--train-seq", type=int, default=None, help="default 1024; tiny 16")
    ap.add_argument("--train-steps", type=int, default=None, help="timed steps (default 20; tiny 2)")
    ap.add_argument("--moe-tokens", type=int, default=None, help="default 8192; tiny 64")
    ap.add_argument("--moe-calls", type=int, default=None, help="default 10; tiny 2")
    ap.add_argument("--decode-prompt", type=int, default=None, help="default 128; tiny 12")
    ap.add_argument("--decode-steps", type=int, default=None, help="default 256; tiny 16")
    ap.add_argument("--worker", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    return ap


def _defaults(args):
    tiny = {"train_batch": 2, "train_seq": 16, "train_steps": 2, "moe_tokens": 64, "moe_calls": 2,
            "decode_prompt": 12, "decode_steps": 16}
    full = {"train_batch": 8, "train_seq": 1024, "train_steps": 20, "moe_tokens": 8192, "moe_calls": 10,
            "decode_prompt": 128, "decode_steps": 256}
    for k, v in (tiny if args.tiny else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def worker(args):
    import jax

    if args.tiny:
        jax.config.update("jax_default_matmul_precision", "highest")
    d = jax.devices()[0]
    header = {"device": f"{d.platform}:{getattr(d, 'device_kind', d.platform)} x{jax.device_count()}",
              "jax_version": jax.__version__}
    rows = Rows(Path(args.out) / f"{args.worker}.json", header)
    log(f"{args.worker}: jax {jax.__version__}, {jax.device_count()} x {getattr(d, 'device_kind', d.platform)}")
    deadline = T0 + (args.deadline if args.deadline is not None else 1e9)
    {"train": part_train, "moe": part_moe, "decode": part_decode}[args.worker](args, rows, deadline)
    log(f"{args.worker}: done")


def main(argv=None):
    args = _defaults(build_parser().parse_args(argv))
    from flashit_jax.errors import FlashitError, user_errors

    with user_errors("eval.bench_scaleout"):
        if args.worker:
            return worker(args)
        parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        bad = [p for p in parts if p not in PARTS]
        if bad:
            raise FlashitError(f"unknown parts {bad}; known: {list(PARTS)}")
        return drive(args, parts, argv)


def drive(args, parts, argv):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reserve = TINY_RESERVE if args.tiny else RESERVE
    passthrough = [a for a in (sys.argv[1:] if argv is None else list(argv))]
    report = {"header": {"command": "python -m eval.bench_scaleout " + " ".join(passthrough),
                         "date": datetime.date.today().isoformat(), "args": vars(args)}, "parts": {}}
    md = ""
    for i, part in enumerate(parts):
        left = args.budget - (time.perf_counter() - T0)
        limit = left - sum(reserve[p] for p in parts[i + 1:])
        (out / f"{part}.json").unlink(missing_ok=True)
        if limit < 10:
            report["parts"][part] = {"status": "skipped: no time left", "rows": []}
            log(f"{part}: skipped (no time left)")
            md = _write(out, report)
            continue
        # the worker stops starting new configurations 15% before its hard limit
        cmd = [sys.executable, "-m", "eval.bench_scaleout", *passthrough, "--worker", part,
               "--deadline", f"{0.85 * limit:.0f}"]
        log(f"{part}: start, limit {limit:.0f}s")
        t = time.perf_counter()
        proc = subprocess.Popen(cmd)
        try:
            rc = proc.wait(timeout=limit)
            status = "ok" if rc == 0 else f"exit code {rc}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = f"killed after its {limit:.0f}s limit"
        p = out / f"{part}.json"
        got = json.loads(p.read_text()) if p.exists() else {"rows": []}
        for k, v in got.get("header", {}).items():
            report["header"].setdefault(k, v)
        report["parts"][part] = {"status": status, "wall_s": time.perf_counter() - t, "rows": got["rows"]}
        log(f"{part}: {status} in {time.perf_counter() - t:.0f}s")
        md = _write(out, report)  # after every part: an outer time limit still leaves the finished ones
    print("\n" + md, flush=True)
    return report


def _write(out: Path, report: dict) -> str:
    report["header"].setdefault("device", "unknown (no part started)")
    report["header"].setdefault("jax_version", "?")
    (out / "results.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / "results.md").write_text(md)
    return md


if __name__ == "__main__":
    main()
