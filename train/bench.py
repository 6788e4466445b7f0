"""Training-step throughput and MFU: our stack vs a plain jitted step, against the matmul peak
measured in the same run (and the datasheet peak).

    python -m train.bench --model random:llama-3.2-1b --seq 2048 --batch 8 --attn-impl cudnn

Rows: `peak` (bf16 8192^3 matmul), `plain` (a minimal jitted step: bf16 forward of the same
model, mean CE, optax.adamw on fp32 master weights, donated), `ours` (train.step: fp32 master
weights cast to bf16, masked CE, clipping, decay mask, metrics, jitted with the sharding rules on a
1-device mesh; its forward runs q, k, v, gate and up as separate products, `ours-fused` as two),
`distill` (ours with a soft-target KD objective: the teacher is the model itself in
bf16, the student every second of its layers; FLOPs count the teacher's forward).
Model FLOPs per token: 6 N (N: matmul weights, the tied head included) + 6 L T d_attn / 2 * 2 (causal
attention, forward and backward); a teacher's forward adds 2 N_t + 2 L_t T d_attn.
Sections past --deadline seconds are skipped, so one short device call always reports something.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - T0:6.1f}s]", *a, flush=True)


def matmul_peak(n: int = 8192, reps: int = 20, warmup_s: float = 2.0, per_sync: int = 5) -> float:
    """bf16 TFLOP/s of an n^3 matmul on random data (two input sets alternated): the median over groups of
    `per_sync` back-to-back calls, after `warmup_s` seconds of the same matmul. Session 11's H200 runs measured
    633 and 686 TFLOP/s first thing in a fresh process, one sync per call, while the training steps that
    followed ran within 2.5% of each other: a GPU timed cold and call by call understates its peak."""
    ks = jax.random.split(jax.random.key(0), 4)
    xs = [jax.random.normal(k, (n, n), jnp.bfloat16) for k in ks]
    f = jax.jit(lambda a, b: a @ b)
    f(xs[0], xs[1]).block_until_ready()
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        f(xs[0], xs[1]).block_until_ready()
    times = []
    for g in range(max(1, reps // per_sync)):
        t = time.perf_counter()
        outs = [f(xs[(2 * (g + r)) % 4], xs[(2 * (g + r) + 1) % 4]) for r in range(per_sync)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t) / per_sync)
    return 2 * n**3 / statistics.median(times) / 1e12


def matmul_params(config) -> int:
    c = config
    per_layer = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads) + 3 * c.dim * c.ffn_dim
    return c.n_layers * per_layer + c.vocab_size * c.dim  # the head (tied or not) is a matmul


def train_flops_per_token(config, seq: int) -> float:
    return 6 * matmul_params(config) + 6 * config.n_layers * seq * config.n_heads * config.head_dim


def fwd_flops_per_token(config, seq: int) -> float:
    return 2 * matmul_params(config) + 2 * config.n_layers * seq * config.n_heads * config.head_dim


def time_steps(step, state, args_fn, n: int):
    """Median seconds per step (each timed step synchronised), after one warm-up step."""
    state, m = step(state, *args_fn())
    jax.block_until_ready(m)
    times = []
    for _ in range(n):
        a = args_fn()
        t = time.perf_counter()
        state, m = step(state, *a)
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    return statistics.median(times), state, m


def batch(key, b: int, t: int, vocab: int):
    tok = np.asarray(jax.random.randint(key, (b, t), 0, vocab, jnp.int32))
    tgt = np.roll(tok, -1, axis=1)
    mask = np.ones((b, t), bool)
    mask[:, -1] = False
    return {"tokens": tok, "targets": tgt, "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(), "loss_mask": mask}


def bench_ours(model, params, args, objective=None, teacher=None, label="ours", fuse=False):
    from flashit_jax import sharding as shd
    from train.config import TrainConfig
    from train.loop import build_state, compile_step, place_teacher
    from train.optim import make_optimizer
    from train.step import Objective, make_token_loss

    cfg = TrainConfig(steps=1000, batch_size=args.batch, seq_len=args.seq, compute_dtype="bf16",
                      attn_impl=args.attn_impl, doc_masking=False, loss="ce", warmup_steps=10)
    obj = objective or Objective("ce")
    mesh = shd.make_mesh()
    opt = make_optimizer(cfg)
    state, state_sh = build_state(model, params, {}, opt, mesh, 0)
    t_params, t_sh = (None, None)
    if teacher is not None:
        t_params, t_sh = place_teacher(teacher[0], teacher[1], mesh, jnp.bfloat16)
    loss = make_token_loss(obj, model, None if teacher is None else teacher[0], compute_dtype=jnp.bfloat16,
                           attn_impl=args.attn_impl, doc_masking=False, fuse_projections=fuse)
    keys = ["tokens", "targets", "segment_ids", "positions", "loss_mask"]
    step = compile_step(loss, opt, mesh, state_sh, t_sh, keys, args.accum)
    b = batch(jax.random.key(1), args.batch, args.seq, model.config.vocab_size)
    placed = shd.shard_batch(b, mesh)
    t = time.perf_counter()
    compiled = step.lower(state, t_params, placed).compile()
    log(f"{label}: compiled in {time.perf_counter() - t:.1f}s")
    dt, state, m = time_steps(compiled, state, lambda: (t_params, placed), args.steps)
    log(f"{label}: loss {float(m['loss']):.4f}, {dt * 1e3:.1f} ms/step")
    if getattr(args, "profile", False) and label == "ours":
        profile_steps(compiled, state, lambda: (t_params, placed), label)
    return dt


def profile_steps(step, state, args_fn, label: str, n: int = 2):
    """The step's kernels under jax.profiler: where the time beyond the matmul peak goes."""
    import tempfile

    from eval.profile_decode import summarize

    trace_dir = tempfile.mkdtemp(prefix="flashit_train_trace_")
    with jax.profiler.trace(trace_dir):
        for _ in range(n):
            state, m = step(state, *args_fn())
        jax.block_until_ready((state, m))
    try:
        kinds = ("loop_add_fusion", "loop_multiply_fusion", "loop_convert_fusion", "input_reduce_fusion",
                 "input_add_reduce_fusion", "wrapped_concatenate", "wrapped_convert", "input_concatenate_fusion",
                 "loop_select_fusion", "loop_broadcast_fusion")
        summary = summarize(trace_dir, n, top=25, hlo_text=step.as_text(), origin_kinds=kinds)
        log(f"{label} profile: {summary}")
    except Exception as e:  # a missing plane must not lose the timings
        log(f"{label} profile failed: {type(e).__name__}: {e}")


def bench_plain(model, params, args):
    import optax

    opt = optax.adamw(3e-4, b1=0.9, b2=0.95, weight_decay=0.01)

    def step(state, tokens, targets):
        p, o = state

        def loss_fn(p):
            pb = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
            logits, _, _ = model.forward(pb, tokens, attn_impl=args.attn_impl)
            logp = jax.nn.log_softmax(logits, axis=-1)
            return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))

        loss, g = jax.value_and_grad(loss_fn)(p)
        with jax.numpy_dtype_promotion("standard"):
            u, o = opt.update(g, o, p)
        return (optax.apply_updates(p, u), o), loss

    state = (params, jax.jit(opt.init)(params))  # params are donated: the caller passes a fresh set
    b = batch(jax.random.key(1), args.batch, args.seq, model.config.vocab_size)
    tok, tgt = jnp.asarray(b["tokens"]), jnp.asarray(b["targets"])
    t = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, tok, tgt).compile()
    log(f"plain: compiled in {time.perf_counter() - t:.1f}s")
    dt, state, loss = time_steps(compiled, state, lambda: (tok, tgt), args.steps)
    log(f"plain: loss {float(loss):.4f}, {dt * 1e3:.1f} ms/step")
    return dt


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--distill-batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--attn-impl", default="cudnn")
    ap.add_argument("--spec-tflops", type=float, default=989.0, help="datasheet dense bf16 peak (H100 SXM: 989)")
    ap.add_argument("--peak-n", type=int, default=8192)
    ap.add_argument("--deadline", type=float, default=1e9, help="skip sections that start after this many seconds")
    ap.add_argument("--only", default="peak,plain,ours,distill",
                    help="sections to run (also ours-fused); plain and ours run in this order (peak first, "
                         "distill last)")
    ap.add_argument("--profile", action="store_true", help="after timing ours: its kernels over 2 steps (top 25)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    unknown = set(args.only.split(",")) - {"peak", "plain", "ours", "ours-fused", "distill"}
    if unknown:
        ap.error(f"--only: unknown sections {sorted(unknown)}; use peak, plain, ours, ours-fused, distill")

    from flashit_jax.loading import load_model
    from train.step import Objective
    from train.student import from_teacher_layers

    dev = jax.devices()[0]
    log(f"jax {jax.__version__} on {dev.platform}:{getattr(dev, 'device_kind', '')} x{jax.device_count()}")
    only = set(args.only.split(","))
    res: dict = {"model": args.model, "seq": args.seq, "batch": args.batch, "device": getattr(dev, "device_kind", ""),
                 "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    if "peak" in only:
        res["peak_tflops"] = matmul_peak(args.peak_n)
        log(f"peak: bf16 {args.peak_n}^3 matmul {res['peak_tflops']:.0f} TFLOP/s")
    model = load_model(args.model, "float32").model
    c = model.config

    def fresh():  # each section starts from its own copy (the steps donate their state)
        return load_model(args.model, "float32").params

    tokens = args.batch * args.seq
    fpt = train_flops_per_token(c, args.seq)
    log(f"{args.model}: {matmul_params(c) / 1e9:.3f}B matmul params, {fpt / 1e9:.2f} GFLOP/token (train)")
    rows = []
    for name in [n for n in args.only.split(",") if n in ("plain", "ours", "ours-fused")]:  # in --only's order
        if time.perf_counter() - T0 > args.deadline:
            log(f"{name}: skipped (past --deadline)")
            continue
        try:
            if name == "plain":
                dt = bench_plain(model, fresh(), args)
            else:  # ours-fused: the step with q|k|v and gate|up as one product each (train.step's option)
                dt = bench_ours(model, fresh(), args, label=name, fuse=name == "ours-fused")
        except Exception as e:  # OOM or a missing kernel: report, keep going
            log(f"{name}: FAILED {type(e).__name__}: {str(e)[:300]}")
            continue
        rows.append((name, args.batch, dt, tokens / dt, fpt * tokens / dt / 1e12))
    if "distill" in only and time.perf_counter() - T0 <= args.deadline:
        try:
            layers = tuple(range(0, c.n_layers, 2))
            params = fresh()
            s_model, s_params = from_teacher_layers(model, params, layers)
            b = args.distill_batch
            dargs = argparse.Namespace(**{**vars(args), "batch": b})
            dt = bench_ours(s_model, s_params, dargs, Objective("soft", temperature=2.0), (model, params), "distill")
            f = train_flops_per_token(s_model.config, args.seq) + fwd_flops_per_token(c, args.seq)
            rows.append(("distill", b, dt, b * args.seq / dt, f * b * args.seq / dt / 1e12))
        except Exception as e:
            log(f"distill: FAILED {type(e).__name__}: {str(e)[:300]}")
    elif "distill" in only:
        log("distill: skipped (past --deadline)")
    peak = res.get("peak_tflops")
    plain = next((r for r in rows if r[0] == "plain"), None)
    print(f"\n{args.model} seq {args.seq} bf16 on {res['device']} ({res['date']}), "
          f"measured peak {peak or float('nan'):.0f} TFLOP/s, spec {args.spec_tflops:.0f}")
    print(f"{'step':12} {'batch':>5} {'ms/step':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'%peak':>6} {'%spec':>6} {'vs plain':>8}")
    for name, bsz, dt, tps, tf in rows:
        vs = f"{tps / plain[3]:.3f}" if plain and name.startswith("ours") else "-"
        print(f"{name:12} {bsz:5d} {dt * 1e3:9.1f} {tps:10.0f} {tf:8.1f} {100 * tf / peak if peak else float('nan'):6.1f} "
              f"{100 * tf / args.spec_tflops:6.1f} {vs:>8}")
        res[name] = {"batch": bsz, "step_s": dt, "tokens_per_s": tps, "tflops": tf}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)


if __name__ == "__main__":
    main()
