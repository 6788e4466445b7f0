"""Speculative decoding speed: component times, the speedup they imply, and real-weight runs.

    python -m eval.bench_speculative                 # on the GPU: both parts, bf16
    python -m eval.bench_speculative --small         # CPU smoke run: tiny shapes, fp32

Part 1 (random weights; times do not depend on weight values): target `random:llama-3.2-1b`,
draft of the SmolLM2-135M shape with the target's vocabulary (128256). At batch 1, with the
caches filled to the prompt length, it times
  - a plain decode step (T = 1 target forward), a draft step (T = 1) and the draft's two-token
    resync step (T = 2), and a verify pass (T = gamma + 1 target forward), each as a `lax.scan`
    of forwards in one call (no per-step dispatch, as the decoders run);
  - a whole speculative round as `speculative_generate` runs it (decode time / rounds).
At acceptance rate a, a round commits E = (1 - a^(g+1)) / (1 - a) tokens on average
(g + 1 at a = 1), so the implied speedup is E * t_plain / t_round; it is given from the
components (t_draft2 + (g - 1) t_draft + t_verify) and from the measured round.

Part 2 (real weights): the target (SmolLM2-135M) with a layer-skipped copy as draft, and prompt
lookup: greedy speculative vs plain decoding of the same prompts in the same process, with
acceptance, tokens per step, tokens/s, speedup and whether the tokens are identical. Acceptance
depends only on the weights, not the device; speed does. Skipped (with a note) when the weights
cannot be loaded (the GPU machine has no `gguf` package and no network).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time

import jax

PROMPTS = [
    "ROMEO.\nBut soft, what light through yonder window breaks?",
    "To be, or not to be, that is the question:",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The history of the Roman Empire begins with",
]


def expected_tokens(alpha: float, gamma: int) -> float:
    """Mean tokens per round when each draft is accepted with probability alpha (independently)."""
    return gamma + 1.0 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)


@functools.partial(jax.jit, static_argnames=("model", "t", "n"), donate_argnames=("cache",))
def _forward_loop(params, cache, tokens, *, model, t, n):
    """n forwards of t tokens on a cache of constant length (each rolled back after)."""
    def body(c, _):
        logits, c2, _ = model.forward(params, tokens[:, :t], cache=c)
        return c2.rollback(c.lengths), logits[:, -1, :8]

    cache, out = jax.lax.scan(body, cache, None, length=n)
    return cache, out


def time_forward(model, params, prompt_len: int, t: int, n: int, dtype, reps: int = 3) -> float:
    """Seconds per forward of t tokens at batch 1 after a prompt of prompt_len (best of reps)."""
    import jax.numpy as jnp

    cache = model.init_cache(1, prompt_len + 64, dtype, params=params)
    cache = cache.rollback(prompt_len)  # attention reads prompt_len keys; their values do not matter
    toks = jnp.ones((1, t), jnp.int32)
    cache, out = _forward_loop(params, cache, toks, model=model, t=t, n=n)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        cache, out = _forward_loop(params, cache, toks, model=model, t=t, n=n)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def _pair(spec: str, small: bool):
    """'random:TARGET=shape:DRAFT' (a draft of that shape with the target's vocabulary) or
    'random:TARGET=layers:K' (self-speculation: the target's first K layers; which K layers does not
    change the time). --small replaces the shapes by tiny ones of the same kind."""
    from flashit_jax.errors import FlashitError
    from models.configs import SHAPES
    from models.llama import LlamaConfig

    target, _, draft = spec.partition("=")
    kind, _, arg = draft.partition(":")
    if not target.startswith("random:") or kind not in ("shape", "layers") or not arg:
        raise FlashitError(f"bad pair {spec!r}: use random:TARGET=shape:DRAFT or random:TARGET=layers:K")
    if small:
        tcfg = LlamaConfig(vocab_size=32000, dim=256, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=768,
                           tie_embeddings=True)
        dcfg = LlamaConfig(vocab_size=32000, dim=64, n_layers=4, n_heads=4, n_kv_heads=1, ffn_dim=192,
                           tie_embeddings=True)
        tname = "tiny target (dim 256, 8 layers, vocab 32000)"
        if kind == "layers":
            arg = str(min(int(arg), 4))
    else:
        tcfg = SHAPES[target.split(":", 1)[1]]
        dcfg = dataclasses.replace(SHAPES[arg], vocab_size=tcfg.vocab_size) if kind == "shape" else None
        tname = target
    if kind == "shape":
        dname = f"{arg} shape, vocab {tcfg.vocab_size}" if not small else "tiny draft (dim 64, 4 layers)"
    else:
        dname = f"{arg} of the target's {tcfg.n_layers} layers"
    return tcfg, (kind, dcfg if kind == "shape" else int(arg)), tname, dname


def part1(args, dtype) -> list[dict]:
    import numpy as np

    from flashit_jax.decoding import Draft, layer_skip_draft, speculative_generate
    from flashit_jax.generate import generate
    from models import Model

    out = []
    for spec in args.pairs:
        tcfg, (kind, dsel), tname, dname = _pair(spec, args.small)
        target = Model(tcfg)
        tp = target.init_params(jax.random.key(0), dtype)
        if kind == "shape":
            draft = Draft(Model(dsel), Model(dsel).init_params(jax.random.key(1), dtype))
        else:
            draft = layer_skip_draft(target, tp, list(range(dsel)))
        n, pl = args.loop, args.prompt_len
        times = {"plain": time_forward(target, tp, pl, 1, n, dtype),
                 "draft": time_forward(draft.model, draft.params, pl, 1, n, dtype),
                 "draft2": time_forward(draft.model, draft.params, pl, 2, n, dtype)}
        for g in args.gammas:
            times[f"verify{g}"] = time_forward(target, tp, pl, g + 1, n, dtype)
        print(f"  {tname} / {dname}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in times.items()),
              file=sys.stderr)
        prompt = [np.random.default_rng(0).integers(0, tcfg.vocab_size, pl).tolist()]
        plain = min((generate(target, tp, prompt, max_new_tokens=args.new_tokens + 1, steps_per_call=16)
                     for _ in range(2)), key=lambda r: r.decode_s)
        rows = []
        for g in args.gammas:
            r = min((speculative_generate(target, tp, prompt, draft=draft, gamma=g, max_new_tokens=args.new_tokens + 1,
                                          rounds_per_call=8) for _ in range(2)), key=lambda r: r.decode_s)
            t_round = r.decode_s / int(r.rounds[0])
            t_comp = times["draft2"] + (g - 1) * times["draft"] + times[f"verify{g}"]
            for a in args.alphas:
                e = expected_tokens(a, g)
                rows.append({"gamma": g, "alpha": a, "tokens_per_round": e, "t_round_ms": t_round * 1e3,
                             "t_components_ms": t_comp * 1e3, "speedup_components": e * times["plain"] / t_comp,
                             "speedup_measured_round": e * times["plain"] / t_round,
                             "speedup_vs_plain_generate": e / t_round / plain.tokens_per_s})
        out.append({"pair": spec, "target": tname, "draft": dname, "times_ms": {k: v * 1e3 for k, v in times.items()},
                    "plain_generate_tokens_per_s": plain.tokens_per_s, "rows": rows})
    return out


def part_medusa(args, dtype) -> dict:
    """Medusa round time (random heads: acceptance does not change the time) -> speedup at given
    mean tokens per step."""
    import numpy as np

    from flashit_jax.decoding.medusa import MedusaTree, init_heads, medusa_generate
    from flashit_jax.generate import generate
    from models import Model

    tcfg, _, tname, _ = _pair(args.medusa_target + "=layers:1", args.small)
    target = Model(tcfg)
    tp = target.init_params(jax.random.key(0), dtype)
    tree = MedusaTree.parse(args.medusa_tree)
    heads = init_heads(tcfg, tree.depth, jax.random.key(1), dtype=dtype)
    prompt = [np.random.default_rng(0).integers(0, tcfg.vocab_size, args.prompt_len).tolist()]
    plain = min((generate(target, tp, prompt, max_new_tokens=args.new_tokens + 1, steps_per_call=16)
                 for _ in range(2)), key=lambda r: r.decode_s)
    r = min((medusa_generate(target, tp, heads, prompt, tree=tree, max_new_tokens=args.new_tokens + 1)
             for _ in range(2)), key=lambda r: r.decode_s)
    t_round = r.decode_s / int(r.rounds[0])
    t_plain = 1.0 / plain.tokens_per_s
    rows = [{"tokens_per_step": k, "speedup": k * t_plain / t_round} for k in args.medusa_tokens_per_step]
    return {"target": tname, "tree": args.medusa_tree, "candidates": tree.size, "t_round_ms": t_round * 1e3,
            "t_plain_ms": t_plain * 1e3, "rows": rows}


def part2(args, dtype) -> dict:
    from flashit_jax.decoding import (
        Lookup,
        layer_skip_draft,
        search_layers,
        speculative_generate,
    )
    from flashit_jax.decoding.medusa import medusa_generate
    from flashit_jax.errors import FlashitError
    from flashit_jax.generate import generate
    from flashit_jax.loading import load_model

    try:
        loaded = load_model(args.real, dtype)
    except (FlashitError, ImportError, OSError) as e:
        return {"skipped": f"{args.real} could not be loaded here: {e}"}
    tok = loaded.tokenizer
    prompts = [tok.encode(p) for p in PROMPTS[: args.real_prompts]]
    searched, drops = {}, []
    autos = [int(s[5:]) for s in args.real_layers if s.startswith("auto:")]
    if autos:  # one greedy layer search on calibration text (bundled valid split) serves every auto:N
        drops = layer_drop_order(loaded.model, loaded.params, calibration_tokens(tok, args), min(autos),
                                 protect=(0,))
        n = len(loaded.params["layers"])
        for k in autos:
            gone = {d for d, _ in drops[: n - k]}
            searched[f"auto:{k}"] = [i for i in range(n) if i not in gone]
            print(f"  auto:{k}: keep layers {searched[f'auto:{k}']} (calibration agreement "
                  f"{drops[n - k - 1][1] if n > k else 1.0:.3f})", file=sys.stderr)
    drafters = [(f"layers {s}" + (f" {'+'.join(map(str, searched[s]))}" if s in searched else ""),
                 layer_skip_draft(loaded.model, loaded.params, searched.get(s, s)), g)
                for s in args.real_layers for g in args.real_gammas]
    drafters += [(f"lookup ngram={args.lookup_ngram}", Lookup(args.lookup_ngram), args.lookup_gamma)]
    if args.real_medusa:
        from flashit_jax.decoding.medusa import MedusaTree, load_heads

        heads, _ = load_heads(args.real_medusa, loaded.params["embed"]["w"].dtype)
        for t in args.real_medusa_trees.split(";"):
            tree = MedusaTree.parse(t)
            drafters.append((f"medusa {t}", (heads, tree), tree.depth))
    plain = {}
    for i, p in enumerate(prompts):  # batch 1, one prompt at a time
        plain[i] = min((generate(loaded.model, loaded.params, [p], max_new_tokens=args.real_new_tokens,
                                 steps_per_call=16) for _ in range(2)), key=lambda r: r.decode_s)
    plain_s = sum(r.decode_s for r in plain.values())
    plain_n = sum(r.tokens.shape[1] - 1 for r in plain.values())
    rows = []
    for name, d, g in drafters:
        acc = rounds = n_tok = 0
        spec_s, same = 0.0, 0
        for i, p in enumerate(prompts):
            runs = []
            for _ in range(2):
                if isinstance(d, tuple):  # Medusa heads and tree
                    runs.append(medusa_generate(loaded.model, loaded.params, d[0], [p], tree=d[1],
                                                max_new_tokens=args.real_new_tokens))
                else:
                    runs.append(speculative_generate(loaded.model, loaded.params, [p], draft=d, gamma=g,
                                                     max_new_tokens=args.real_new_tokens))
            r = min(runs, key=lambda r: r.decode_s)
            acc, rounds, n_tok, spec_s = acc + int(r.accepted[0]), rounds + int(r.rounds[0]), n_tok + r.new_tokens, \
                spec_s + r.decode_s
            same += int((r.tokens[0] == plain[i].tokens[0]).all())
        rows.append({"drafter": name, "gamma": g, "acceptance": acc / max(1, g * rounds),
                     "tokens_per_step": (acc + rounds) / max(1, rounds), "tokens_per_s": n_tok / spec_s,
                     "plain_tokens_per_s": plain_n / plain_s, "speedup": (n_tok / spec_s) / (plain_n / plain_s),
                     "identical": f"{same}/{len(prompts)}"})
        print(f"  {name} gamma {g}: acceptance {rows[-1]['acceptance']:.3f}, speedup {rows[-1]['speedup']:.2f}x",
              file=sys.stderr)
    return {"model": args.real, "prompts": len(prompts), "new_tokens": args.real_new_tokens, "rows": rows,
            "searched_layers": searched, "drop_order": drops}


def calibration_tokens(tok, args):
    import jax.numpy as jnp

    from flashit_jax.data import load_documents

    ids = [tok.encode(d.text) for d in load_documents("bundled", "valid")]
    rows = [i[: args.calib_len] for i in ids if len(i) >= args.calib_len][: args.calib_rows]
    return jnp.asarray(rows, jnp.int32)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.bench_speculative", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny shapes and fp32 (CPU smoke run)")
    ap.add_argument("--pairs", default="random:llama-3.2-1b=shape:smollm2-135m;random:smollm2-135m=layers:20",
                    help="';'-separated target=draft pairs: random:T=shape:D or random:T=layers:K")
    ap.add_argument("--medusa-target", default="random:smollm2-135m", help="'' to skip the Medusa timing")
    ap.add_argument("--medusa-tree", default="4x2x1")
    ap.add_argument("--medusa-tokens-per-step", default="1.5,2.0,2.5,3.0")
    ap.add_argument("--dtype", default=None, help="default bf16 (fp32 with --small)")
    ap.add_argument("--gammas", default="3,4,5")
    ap.add_argument("--alphas", default="0.6,0.8,1.0")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--loop", type=int, default=32, help="forwards per timed call")
    ap.add_argument("--real", default="smollm2-135m", help="real-weight target ('' to skip part 2)")
    ap.add_argument("--real-layers", default="0-11+18-29;auto:20",
                    help="';'-separated layer selections for the draft; auto:N searches N layers to keep")
    ap.add_argument("--calib-rows", type=int, default=4, help="calibration rows for auto:N layer search")
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--real-gammas", default="2,3")
    ap.add_argument("--real-prompts", type=int, default=4)
    ap.add_argument("--real-new-tokens", type=int, default=128)
    ap.add_argument("--real-medusa", default=None, help="Medusa heads directory (python -m train.medusa) for part 2")
    ap.add_argument("--real-medusa-trees", default="4x2x1;8x4x2", help="';'-separated trees for --real-medusa")
    ap.add_argument("--lookup-ngram", type=int, default=3)
    ap.add_argument("--lookup-gamma", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.gammas = [int(g) for g in args.gammas.split(",")]
    args.pairs = [p for p in args.pairs.split(";") if p]
    args.medusa_tokens_per_step = [float(k) for k in args.medusa_tokens_per_step.split(",")]
    args.alphas = [float(a) for a in args.alphas.split(",")]
    args.real_layers = [s for s in args.real_layers.split(";") if s]
    args.real_gammas = [int(g) for g in args.real_gammas.split(",")]
    from flashit_jax.errors import user_errors

    with user_errors("eval.bench_speculative"):
        from eval.common import device_info, write_json
        from flashit_jax.loading import parse_dtype

        dtype = parse_dtype(args.dtype or ("fp32" if args.small else "bf16"))
        info = device_info()
        res = {"info": info, "part1": part1(args, dtype)}
        if args.medusa_target:
            res["medusa"] = part_medusa(args, dtype)
        if args.real:
            res["part2"] = part2(args, dtype)
        print(f"\n{info['device']}, jax {info['jax_version']}, {info['date']}, dtype {dtype.__name__}, batch 1, "
              f"prompt {args.prompt_len}")
        for p1 in res["part1"]:
            print(f"part 1: target {p1['target']}, draft {p1['draft']}")
            print("  " + ", ".join(f"{k} {v:.3f} ms" for k, v in p1["times_ms"].items())
                  + f"; plain generate {p1['plain_generate_tokens_per_s']:.1f} tokens/s")
            print(f"  {'gamma':>5} {'alpha':>5} {'tok/round':>9} {'round ms':>9} {'parts ms':>9} {'x (parts)':>9} "
                  f"{'x (round)':>9} {'x (vs generate)':>15}")
            for r in p1["rows"]:
                print(f"  {r['gamma']:5d} {r['alpha']:5.2f} {r['tokens_per_round']:9.2f} {r['t_round_ms']:9.3f} "
                      f"{r['t_components_ms']:9.3f} {r['speedup_components']:9.2f} {r['speedup_measured_round']:9.2f} "
                      f"{r['speedup_vs_plain_generate']:15.2f}")
        if "medusa" in res:
            md = res["medusa"]
            print(f"medusa: target {md['target']}, tree {md['tree']} ({md['candidates']} candidates): round "
                  f"{md['t_round_ms']:.3f} ms, plain step {md['t_plain_ms']:.3f} ms; speedup at tokens/step "
                  + ", ".join(f"{r['tokens_per_step']:.1f}: {r['speedup']:.2f}x" for r in md["rows"]))
        if "part2" in res:
            p2 = res["part2"]
            if "skipped" in p2:
                print(f"part 2: skipped: {p2['skipped']}")
            else:
                print(f"part 2: {p2['model']} (real weights), greedy, {p2['prompts']} prompts at batch 1, "
                      f"{p2['new_tokens']} new tokens each")
                print(f"  {'drafter':24} {'gamma':>5} {'accept':>7} {'tok/step':>8} {'tok/s':>8} {'plain':>8} "
                      f"{'speedup':>8} {'identical':>9}")
                for r in p2["rows"]:
                    print(f"  {r['drafter']:24} {r['gamma']:5d} {r['acceptance']:7.3f} {r['tokens_per_step']:8.2f} "
                          f"{r['tokens_per_s']:8.1f} {r['plain_tokens_per_s']:8.1f} {r['speedup']:8.2f} "
                          f"{r['identical']:>9}")
        write_json(args.json, res)
        return res


if __name__ == "__main__":
    main()
