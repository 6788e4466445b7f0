"""Batch-1 decode speed of quantized weights through our kernels, vs bf16, in one run.

    python -m eval.quant_speed --model random:llama-3.2-1b               # GPU
    python -m eval.quant_speed --kernels --model random:llama-3.2-1b     # + kernel check & bench first
    python -m eval.quant_speed --smoke                                   # CPU, tiny model (tests the script)

Variants: `bf16` (all weights bf16), `RECIPE` (quantized, each product on what `auto` picks:
kernels/qmatmul/api.py), `RECIPE@xla` (the same weights, dequantized before each dot by XLA),
`RECIPE@pallas` (our kernels for every quantized product); suffixes set switches for the row: `:fixup`
FLASHIT_JAX_GEMV_FIXUP=1 (the decode GEMVs sum their K splits in the kernel, kernels/gemv/gpu.py Blocks.fixup),
`:nofixup` =0, `:rope` FLASHIT_JAX_ROPE_KERNEL=1 (rotary + KV write in one kernel,
kernels/attention/rope_cache.py), e.g. `w8+emb8:fixup:rope`. Speed recipes quantize the tied
embedding / lm_head to int8 (`+emb8`); norms and the KV cache stay bf16. Quantization here is
RTN: speed does not depend on how the codes were chosen. Every variant runs the decode layout
(`--layout fused`, as eval.bench_decode: q|k|v and gate|up concatenated before quantizing, two
input projections per layer instead of five); `--layout plain` keeps the separate matrices.
"""
from __future__ import annotations

import argparse
import functools
import json
import time
from pathlib import Path

DEFAULT_VARIANTS = "bf16,w8+emb8,w8+emb8@xla,w4g128+emb8,w4g128+emb8@xla"
# VARIANT:SUFFIX[:SUFFIX...] -> environment switches for that row (generate keys its programs on FLASHIT_JAX_*)
SUFFIXES = {"fixup": ("FLASHIT_JAX_GEMV_FIXUP", "1"), "nofixup": ("FLASHIT_JAX_GEMV_FIXUP", "0"),
            "rope": ("FLASHIT_JAX_ROPE_KERNEL", "1")}


def parse_variant(variant: str) -> tuple[str, str | None, dict[str, str]]:
    """'w8+emb8@xla:fixup:rope' -> ('w8+emb8', 'xla', {switch: value}): recipe, '@' implementation, env switches."""
    rest, *suffixes = variant.split(":")
    recipe, _, impl = rest.partition("@")
    if impl and impl not in ("xla", "pallas"):
        raise ValueError(f"variant {variant!r} ends in an unknown '@{impl}'; use RECIPE, RECIPE@xla or RECIPE@pallas")
    bad = [f":{x}" for x in suffixes if x not in SUFFIXES]
    if bad:
        raise ValueError(f"variant {variant!r} has an unknown {', '.join(bad)}; known: {sorted(SUFFIXES)}")
    return recipe, impl or None, dict(SUFFIXES[x] for x in suffixes)


def weight_bytes(params) -> int:
    from flashit_jax.quant import size_bytes

    return size_bytes(params, float_bytes=None)


def decode_row(model, params, variant: str, *, prompt_len: int, new_tokens: int, log, kernel_impl="auto",
               steps_per_call: int = 16) -> dict:
    import numpy as np

    from eval.common import env_switches
    from flashit_jax.generate import generate
    from flashit_jax.nn.qarray import matmul_impl

    _, impl, switches = parse_variant(variant)
    impl = impl or kernel_impl
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, prompt_len).tolist()
    with matmul_impl(impl), env_switches(switches):
        # an untimed run first, of the same program (the same arguments: another max_new_tokens sizes another
        # cache, so another executable): its first calls cost more (on an H200 the second run of a program
        # decoded 12-14% faster than its first, 2026-12-05), and every row gets the same treatment
        run = functools.partial(generate, model, params, [prompt], max_new_tokens=new_tokens,
                                cache_dtype="bfloat16", steps_per_call=steps_per_call)
        compile_s = run().compile_s  # the warm-up compiles; the timed run reuses its executables
        res = run()
    wb = weight_bytes(params)
    row = {"variant": variant, "tokens_per_s": res.tokens_per_s, "ms_per_token": 1e3 / res.tokens_per_s,
           "weights_MB": wb / 1e6, "weight_GBps": wb * res.tokens_per_s / 1e9, "compile_s": compile_s,
           "ttft_ms": res.ttft_s * 1e3, "first_tokens": res.tokens[0, :8].tolist(), "steps_per_call": steps_per_call}
    log(f"decode {variant}: {row['tokens_per_s']:.0f} tokens/s ({row['ms_per_token']:.2f} ms/token), weights "
        f"{row['weights_MB']:.0f} MB -> {row['weight_GBps']:.0f} GB/s, compile {row['compile_s']:.0f} s")
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.quant_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="random:llama-3.2-1b")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kernels", action="store_true", help="run kernels.qmatmul.bench (check + timings) first")
    ap.add_argument("--smoke", action="store_true", help="CPU: tiny model, kernels in the Pallas interpreter")
    ap.add_argument("--steps-per-call", type=int, default=16,
                    help="decode steps per jitted call (as eval.bench_decode's scan16 rows; 1 = one call per token, "
                         "where host dispatch hides the weights' bytes)")
    ap.add_argument("--layout", choices=("fused", "plain"), default="fused",
                    help="fused: q|k|v and gate|up concatenated (the decode layout, as eval.bench_decode)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip remaining variants after this many seconds")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    for v in args.variants.split(","):
        try:
            parse_variant(v.strip())
        except ValueError as e:
            ap.error(f"--variants: {e}")
    from flashit_jax.errors import user_errors

    with user_errors("eval.quant_speed"):
        import jax
        import jax.numpy as jnp

        from eval.common import device_info
        from flashit_jax.quant import quantize

        t_start = time.perf_counter()
        lines: list[str] = []

        def log(s):
            print(s, flush=True)
            lines.append(s)

        log(json.dumps(device_info()))
        report = {"device": device_info(), "model": args.model}
        if args.kernels or args.smoke:
            from kernels.qmatmul import bench

            ok, rows = bench.main(["--smoke"] if args.smoke else [], log=log)
            report["kernel_check_ok"], report["kernel_bench"] = ok, rows
        if args.smoke:
            from models import Model
            from models.llama import LlamaConfig

            model = Model(LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256,
                                      tie_embeddings=True))
            base = model.init_params(jax.random.key(0), jnp.bfloat16)
            variants = ["bf16", "w8+emb8", "w4g128+emb8@xla"]
        else:
            from flashit_jax.loading import load_model

            loaded = load_model(args.model, "bf16")
            model, base = loaded.model, loaded.params
            variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        fuse = getattr(model.family, "fuse_projections", None)
        if args.layout == "fused" and fuse is not None:
            base = fuse(base, model.config)
        report["layout"] = args.layout if fuse is not None else "plain"
        log(f"layout: {report['layout']}")
        decode = []
        cache: dict[str, object] = {}
        for v in variants:
            if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                log(f"decode {v}: skipped (time budget {args.budget_s:.0f} s spent)")
                continue
            recipe = parse_variant(v)[0]
            if recipe == "bf16":
                params = base
            else:
                if recipe not in cache:
                    cache.clear()  # keep one quantized copy on the device at a time
                    cache[recipe] = jax.block_until_ready(quantize(base, recipe))
                params = cache[recipe]
            decode.append(decode_row(model, params, v, prompt_len=args.prompt_len,
                                     new_tokens=8 if args.smoke else args.new_tokens, log=log,
                                     kernel_impl="interpret" if args.smoke else "auto",
                                     steps_per_call=min(args.steps_per_call, 4) if args.smoke else args.steps_per_call))
        report["decode"] = decode
        bf16 = next((r for r in decode if r["variant"] == "bf16"), None)
        log("")
        log("| variant | tokens/s | ms/token | vs bf16 | weights MB | weight GB/s |")
        log("|---|---:|---:|---:|---:|---:|")
        for r in decode:
            ratio = f"{r['tokens_per_s'] / bf16['tokens_per_s']:.2f}x" if bf16 else "-"
            log(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['ms_per_token']:.2f} | {ratio} | "
                f"{r['weights_MB']:.0f} | {r['weight_GBps']:.0f} |")
        kb = report.get("kernel_bench") or []
        if kb:
            log("")
            log("| M | K x N | bf16 us | W8A16 us (x) | W4A16 us (x) | W4 XLA dequant+dot (x) |")
            log("|---:|---|---:|---:|---:|---:|")
            for r in kb:
                log(f"| {r['m']} | {r['k']}x{r['n']} | {r['bf16_us']:.1f} | {r['w8_us']:.1f} ({r['w8_speedup']:.2f}x) "
                    f"| {r['w4_us']:.1f} ({r['w4_speedup']:.2f}x) | {r['w4_xla_us']:.1f} ({r['w4_xla_speedup']:.2f}x) |")
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({**report, "log": lines}, indent=1))
        return report


if __name__ == "__main__":
    main()
