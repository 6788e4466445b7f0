"""Batch-1 decode speed and memory-bandwidth utilisation (MBU), ours vs HF transformers.

    python -m eval.bench_decode                       # on the GPU: both shapes, all variants, HF
    python -m eval.bench_decode --models random:llama-3.2-1b --variants fused --no-hf

MBU = bytes a step must read (every weight once, the tied embedding once as the lm_head, KV up
to the current length) / step time / copy bandwidth, where the copy bandwidth is the better of
an XLA elementwise copy and a plain device-to-device copy measured in the same worker. Each
measurement runs in its own process (JAX variants with their own XLA flags; HF with torch),
so that neither framework's memory pool disturbs the other.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SPEC_BW = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # HBM spec sheets, bytes/s
VARIANTS = {
    # name: (fuse_projections, steps_per_call, extra XLA flags, environment)
    "xla": (False, 1, "", {"FLASHIT_JAX_GEMV": "0"}),  # plain jitted step, one call per token
    "fused-xla": (True, 1, "", {"FLASHIT_JAX_GEMV": "0"}),
    "scan16-xla": (True, 16, "", {"FLASHIT_JAX_GEMV": "0"}),  # 16 steps per call, XLA matmuls
    "scan16-gemv": (True, 16, "", {}),  # 16 steps per call, Pallas GEMV (kernels/gemv)
    "scan64-gemv": (True, 64, "", {}),
    "gemv": (True, 1, "", {}),
}


def _spec_bw(kind: str) -> float | None:
    return next((v for k, v in SPEC_BW.items() if k in kind), None)


def _d2d_copy_rate(nbytes: int, reps: int) -> float | None:
    """cudaMemcpy device-to-device through torch, timed with CUDA events (None without torch/CUDA)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    rate = 2 * nbytes * reps / (start.elapsed_time(end) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return rate


def copy_bandwidth(nbytes: int = 1 << 30, reps: int = 20) -> dict:
    """Bytes read + written per second: an XLA elementwise copy (back-to-back calls, one sync)
    and a plain device-to-device copy (cudaMemcpy via torch where present)."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(0), (nbytes // 2,), jnp.bfloat16)
    ew = jax.jit(lambda a: a * jnp.bfloat16(1.0009765625))  # elementwise: read + write once
    ew(x).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        y = ew(x)
    y.block_until_ready()
    out = {"xla_elementwise": 2 * x.nbytes * reps / (time.perf_counter() - t0)}
    del x, y
    d2d = _d2d_copy_rate(nbytes, reps)
    if d2d:
        out["d2d_copy"] = d2d
    out["best"] = max(out.values())
    return out


def jax_worker(model_spec: str, variant: str, prompt_len: int, steps: int) -> dict:
    import jax
    import numpy as np

    from flashit_jax import tree
    from flashit_jax.generate import generate
    from flashit_jax.loading import load_model
    from models.llama import fuse_projections

    fuse, per_call, _, _ = VARIANTS[variant]
    bw = copy_bandwidth()  # before JAX's pool grows, so torch's copy buffers fit
    loaded = load_model(model_spec, "bf16")
    params = fuse_projections(loaded.params, loaded.config) if fuse else loaded.params
    c = loaded.config
    wbytes = sum(int(np.prod(v.shape)) * v.dtype.itemsize for v in tree.flatten(params).values())
    kv_per_pos = 2 * c.n_layers * c.n_kv_heads * c.head_dim * 2
    prompt = np.random.default_rng(0).integers(0, c.vocab_size, prompt_len).tolist()
    runs = []
    for _ in range(3):
        r = generate(loaded.model, params, [prompt], max_new_tokens=steps + 1, steps_per_call=per_call)
        runs.append(r)
    r = sorted(runs, key=lambda r: r.tokens_per_s)[1]
    # the same decode step with XLA matmuls: the variant must compute the same logits
    toks = jax.numpy.asarray(prompt[:1], jax.numpy.int32)[None]
    fast = jax.jit(lambda p, t: loaded.model.forward(p, t)[0])(params, toks)
    os.environ["FLASHIT_JAX_GEMV"] = "0"
    ref = jax.jit(lambda p, t: loaded.model.forward(p, t)[0])(loaded.params, toks)
    rel_err = float(jax.numpy.linalg.norm(fast - ref) / jax.numpy.linalg.norm(ref))
    avg_len = prompt_len + 1 + r.steps / 2
    step_s = 1.0 / r.tokens_per_s
    bytes_step = wbytes + kv_per_pos * avg_len
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    return {"impl": f"jax/{variant}", "model": model_spec, "tokens_per_s": r.tokens_per_s,
            "step_ms": step_s * 1e3, "ttft_ms": r.ttft_s * 1e3, "bytes_per_step": bytes_step,
            "mbu": bytes_step / step_s / bw["best"], "copy_bw": bw, "device": dev.device_kind,
            "peak_mem_gb": stats.get("peak_bytes_in_use", 0) / 1e9, "jax": jax.__version__,
            "rel_err_vs_xla": rel_err}


def hf_worker(model_spec: str, mode: str, prompt_len: int, steps: int) -> dict:
    import torch
    import transformers

    from models.configs import SHAPES

    c = SHAPES[model_spec.split(":", 1)[1]]
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        rope = {"rope_type": c.rope_scaling.kind, "rope_theta": c.rope_theta, "factor": c.rope_scaling.factor,
                "low_freq_factor": c.rope_scaling.low_freq_factor, "high_freq_factor": c.rope_scaling.high_freq_factor,
                "original_max_position_embeddings": c.rope_scaling.original_max_position}
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps, max_position_embeddings=c.max_position, tie_word_embeddings=c.tie_embeddings,
        rope_parameters=rope)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, c.vocab_size, (1, prompt_len), device=dev)
    stamps: list[float] = []

    class Clock(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            sync()
            stamps.append(time.perf_counter())
            return scores

    if mode == "eager":
        steps = min(steps, 64)  # eager decoding is slow; its rate does not depend on the count
    kw = dict(max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
              logits_processor=transformers.LogitsProcessorList([Clock()]), pad_token_id=0)
    if mode == "static":
        kw["cache_implementation"] = "static"
    rates = []
    for _ in range(3 if mode == "static" else 2):  # the first run compiles (static) or warms up
        stamps.clear()
        with torch.no_grad():
            model.generate(ids, **kw)
        rates.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    rate = max(rates[1:])
    return {"impl": f"hf/{mode}", "model": model_spec, "tokens_per_s": rate, "step_ms": 1e3 / rate,
            "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "transformers": transformers.__version__,
            "torch": torch.__version__}


def _run_worker(args: list[str], xla_flags: str = "", extra_env: dict | None = None) -> dict | None:
    env = {**os.environ, **(extra_env or {})}
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")
    if xla_flags:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags).strip()
    proc = subprocess.run([sys.executable, "-m", "eval.bench_decode", *args], capture_output=True, text=True,
                          env=env)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        print(f"worker {' '.join(args)} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.bench_decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="random:smollm2-135m,random:llama-3.2-1b")
    ap.add_argument("--variants", default="xla,scan16-xla,scan16-gemv")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--hf-modes", default="static,eager")
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker", choices=["jax", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "jax":
        print(json.dumps(jax_worker(args.model, args.mode, args.prompt_len, args.steps)))
        return
    if args.worker == "hf":
        print(json.dumps(hf_worker(args.model, args.mode, args.prompt_len, args.steps)))
        return
    common = ["--prompt-len", str(args.prompt_len), "--steps", str(args.steps)]
    rows = []
    for m in args.models.split(","):
        for v in args.variants.split(","):
            if v not in VARIANTS:
                raise SystemExit(f"unknown variant {v!r}; known: {list(VARIANTS)}")
            r = _run_worker(["--worker", "jax", "--model", m, "--mode", v, *common], VARIANTS[v][2], VARIANTS[v][3])
            if r:
                rows.append(r)
                print(f"  {m} jax/{v}: {r['tokens_per_s']:.0f} tok/s, MBU {r['mbu']:.1%}", file=sys.stderr)
        if not args.no_hf:
            for mode in args.hf_modes.split(","):
                r = _run_worker(["--worker", "hf", "--model", m, "--mode", mode, *common])
                if r:
                    rows.append(r)
                    print(f"  {m} hf/{mode}: {r['tokens_per_s']:.0f} tok/s", file=sys.stderr)
    import datetime

    date = datetime.date.today().isoformat()
    print(f"\nbatch-1 bf16 decode, prompt {args.prompt_len}, {args.steps} steps, {date}")
    print(f"{'model':24} {'impl':20} {'tok/s':>8} {'ms/step':>8} {'MBU':>6} {'x HF static':>11} {'rel.err':>9}")
    for r in rows:
        hf = next((h for h in rows if h["model"] == r["model"] and h["impl"] == "hf/static"), None)
        mbu = f"{r['mbu']:.1%}" if "mbu" in r else "-"
        ratio = f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}" if hf else "-"
        err = f"{r['rel_err_vs_xla']:.1e}" if "rel_err_vs_xla" in r else "-"
        print(f"{r['model']:24} {r['impl']:20} {r['tokens_per_s']:8.1f} {r['step_ms']:8.3f} {mbu:>6} {ratio:>11} {err:>9}")
    bw = next((r["copy_bw"] for r in rows if "copy_bw" in r), None)
    if bw:
        kind = next(r["device"] for r in rows if "copy_bw" in r)
        spec = _spec_bw(kind)
        d2d = f"{bw['d2d_copy'] / 1e12:.2f} TB/s" if "d2d_copy" in bw else "n/a"
        print(f"copy bandwidth ({kind}, read + write): XLA elementwise {bw['xla_elementwise'] / 1e12:.2f} TB/s, "
              f"device-to-device {d2d}; MBU is against the better"
              + (f"; spec sheet {spec / 1e12:.2f} TB/s" if spec else ""))
    if args.json:
        from eval.common import write_json

        write_json(args.json, {"date": date, "prompt_len": args.prompt_len, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
