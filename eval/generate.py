"""Generate text with the static KV cache.

    python -m eval.generate --model smollm2-135m --prompt "To be, or not to be" --max-new-tokens 64
    python -m eval.generate --speculative draft=PATH,gamma=4      # a draft model sharing the tokenizer
    python -m eval.generate --speculative layers=0-9+25-29,gamma=3  # self-speculation: target layers as draft
    python -m eval.generate --lookup ngram=3,gamma=8               # prompt lookup (n-gram drafts)
    python -m eval.generate --medusa heads=DIR,tree=4x2x1          # Medusa heads (python -m train.medusa)

With --speculative, --lookup or --medusa, plain decoding runs first on the same prompts, and the report
gives acceptance rate, mean tokens per target step, tokens/s of both and the speedup.
"""
from __future__ import annotations

import argparse

from flashit_jax.errors import FlashitError, user_errors


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokenizer", default=None, help="tokenizer source when the model has none")
    ap.add_argument("--prompt", action="append", help="repeat for a batch (default: a Shakespeare opening)")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--cache-dtype", default=None, help="KV cache dtype (default: the compute dtype)")
    ap.add_argument("--max-len", type=int, default=None, help="cache length (default: prompt + new tokens)")
    ap.add_argument("--attn-impl", default="auto")
    ap.add_argument("--no-eos", action="store_true", help="do not stop at the end-of-sequence token")
    ap.add_argument("--speculative", default=None, metavar="draft=PATH|layers=SEL,gamma=G",
                    help="speculative decoding with a draft model (any model spec) or a layer-skipped copy of the "
                         "target (layers='0-9+25-29' or a slice '0:30:2')")
    ap.add_argument("--lookup", default=None, metavar="ngram=N,gamma=G[,min=M]",
                    help="prompt lookup decoding: drafts copied from n-gram matches in the text so far")
    ap.add_argument("--medusa", default=None, metavar="heads=DIR[,tree=4x2x1]",
                    help="Medusa decoding with heads trained by `python -m train.medusa`; tree = top-k per depth")
    ap.add_argument("--rounds-per-call", type=int, default=8, help="speculative rounds per jitted call")
    ap.add_argument("--steps-per-call", type=int, default=None,
                    help="plain decode steps per jitted call (default 1; 16 for the baseline of --speculative/--lookup)")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs of each decoder; the fastest counts")
    return ap


def parse_options(text: str, allowed: dict, flag: str) -> dict:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'} with the types of `allowed` ({name: type})."""
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, eq, value = item.partition("=")
        if not eq or name not in allowed:
            raise FlashitError(f"{flag}: bad option {item!r}; expected name=value with name in {sorted(allowed)}")
        try:
            out[name] = allowed[name](value)
        except ValueError:
            raise FlashitError(f"{flag}: {name}={value!r} is not a valid {allowed[name].__name__}") from None
    return out


def _chat(tok, text: str) -> str:
    # ChatML, as SmolLM2-Instruct's template writes it; other templates need their own tokenizer_config
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def main(argv=None):
    args = build_parser().parse_args(argv)
    with user_errors("eval.generate"):
        from flashit_jax.generate import Sampling, generate
        from flashit_jax.loading import load_model, load_tokenizer, parse_dtype

        faster = _decoding_options(args)  # checked before the (slow) model load
        loaded = load_model(args.model, args.dtype)
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else loaded.tokenizer
        if tok is None:
            raise FlashitError(f"{args.model} has no tokenizer; pass --tokenizer smollm2-135m")
        texts = args.prompt or ["ROMEO.\nBut soft, what light through yonder window breaks?"]
        if args.chat:
            texts = [_chat(tok, t) for t in texts]
        prompts = [tok.encode(t) for t in texts]
        cache_dtype = parse_dtype(args.cache_dtype) if args.cache_dtype else None
        if faster is not None:
            return _speculative(args, faster, loaded, tok, texts, prompts, cache_dtype)
        res = generate(loaded.model, loaded.params, prompts, max_new_tokens=args.max_new_tokens,
                       sampling=Sampling(args.temperature, args.top_k, args.top_p),
                       eos_id=None if args.no_eos else tok.eos_id, cache_dtype=cache_dtype, seed=args.seed,
                       max_len=args.max_len, attn_impl=args.attn_impl, steps_per_call=args.steps_per_call or 1)
        for text, row, n in zip(texts, res.tokens, res.lengths):
            print("=" * 72)
            print(text + tok.decode(row[:n]))
        print("=" * 72)
        print(f"TTFT {res.ttft_s * 1e3:.1f} ms, decode {res.tokens_per_s:.1f} tokens/s "
              f"({res.steps} steps, batch {len(prompts)}, compile {res.compile_s:.1f} s)")
        return res


def _decoding_options(args) -> dict | None:
    """The --speculative / --lookup / --medusa choice, parsed and checked (None: plain decoding)."""
    chosen = [f for f in ("speculative", "lookup", "medusa") if getattr(args, f)]
    if not chosen:
        return None
    if len(chosen) > 1:
        raise FlashitError("choose one of --speculative, --lookup and --medusa")
    if args.repeat < 1:
        raise FlashitError(f"--repeat must be >= 1, got {args.repeat}")
    kind = chosen[0]
    if kind == "medusa":
        from flashit_jax.decoding.medusa import MedusaTree

        o = parse_options(args.medusa, {"heads": str, "tree": str}, "--medusa")
        if "heads" not in o:
            raise FlashitError("--medusa needs heads=DIR (written by python -m train.medusa)")
        from pathlib import Path

        if not (Path(o["heads"]) / "medusa.json").exists():
            raise FlashitError(f"{o['heads']}: no Medusa heads here (expected medusa_heads.safetensors and medusa.json)")
        o["tree_spec"] = o.get("tree", "4x2x1")
        o["tree"] = MedusaTree.parse(o["tree_spec"])
    elif kind == "lookup":
        from flashit_jax.decoding import Lookup

        o = parse_options(args.lookup, {"ngram": int, "gamma": int, "min": int}, "--lookup")
        o["lookup"] = Lookup(ngram=o.get("ngram", 3), min_ngram=o.get("min", 1))
        o.setdefault("gamma", 8)
    else:
        o = parse_options(args.speculative, {"draft": str, "layers": str, "gamma": int}, "--speculative")
        if ("draft" in o) == ("layers" in o):
            raise FlashitError("--speculative needs exactly one of draft=PATH (a model) or layers=SEL (self-speculation)")
        o.setdefault("gamma", 4)
    if kind != "medusa" and o["gamma"] < 1:
        raise FlashitError(f"gamma (draft tokens per step) must be an integer >= 1, got {o['gamma']}")
    return {"kind": kind, **o}


def _speculative(args, o, loaded, tok, texts, prompts, cache_dtype):
    from flashit_jax.decoding import Draft, layer_skip_draft, speculative_generate
    from flashit_jax.generate import Sampling, generate
    from flashit_jax.loading import load_model

    kind = o["kind"]
    if kind == "medusa":
        from flashit_jax.decoding.medusa import load_heads, medusa_generate

        heads, meta = load_heads(o["heads"], loaded.params["embed"]["w"].dtype)
        drafter, gamma = (heads, o["tree"]), o["tree"].depth
        what = (f"Medusa, {meta['n_heads']} heads from {o['heads']} (trained on {meta.get('base', '?')}), "
                f"tree {o['tree_spec']} ({o['tree'].size} candidates)")
    elif kind == "lookup":
        drafter, gamma = o["lookup"], o["gamma"]
        what = f"prompt lookup (ngram {drafter.ngram}..{drafter.min_ngram})"
    else:
        if "layers" in o:
            drafter = layer_skip_draft(loaded.model, loaded.params, o["layers"])
            what = f"self-speculation, draft = {drafter.note}"
        else:
            d = load_model(o["draft"], args.dtype)
            drafter = Draft(d.model, d.params, note=d.source)
            what = f"draft model {d.source}"
        gamma = o["gamma"]
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    common = dict(max_new_tokens=args.max_new_tokens, sampling=sampling, eos_id=None if args.no_eos else tok.eos_id,
                  cache_dtype=cache_dtype, seed=args.seed, max_len=args.max_len, attn_impl=args.attn_impl)
    plain = min((generate(loaded.model, loaded.params, prompts, steps_per_call=args.steps_per_call or 16, **common)
                 for _ in range(args.repeat)), key=lambda r: r.decode_s)
    if kind == "medusa":
        run = lambda: medusa_generate(loaded.model, loaded.params, drafter[0], prompts, tree=drafter[1],
                                      rounds_per_call=args.rounds_per_call, **common)
    else:
        run = lambda: speculative_generate(loaded.model, loaded.params, prompts, draft=drafter, gamma=gamma,
                                           rounds_per_call=args.rounds_per_call, **common)
    spec = min((run() for _ in range(args.repeat)), key=lambda r: r.decode_s)
    for text, row, n in zip(texts, spec.tokens, spec.lengths):
        print("=" * 72)
        print(text + tok.decode(row[:n]))
    print("=" * 72)
    plain_new = int(sum(max(int(n) - 1, 0) for n in plain.lengths))
    plain_tps = plain_new / plain.decode_s if plain.decode_s > 0 else 0.0
    same = [bool((a[:n] == b[:n]).all()) and n == m for a, b, n, m in
            zip(plain.tokens, spec.tokens, plain.lengths, spec.lengths)]
    print(f"{what}, gamma {gamma}, batch {len(prompts)}")
    print(f"acceptance rate {spec.acceptance_rate:.3f} (accepted / {'tree depth' if kind == 'medusa' else 'gamma'} per "
          f"step), mean tokens per target step {spec.tokens_per_step:.2f} "
          f"(accepted drafts + 1; at most {gamma + 1})")
    print(f"plain decoding  {plain_tps:8.1f} tokens/s ({plain_new} tokens in {plain.decode_s:.3f} s)")
    print(f"{kind:15} {spec.tokens_per_s:8.1f} tokens/s ({spec.new_tokens} tokens in {spec.decode_s:.3f} s)")
    print(f"speedup {spec.tokens_per_s / plain_tps if plain_tps else float('nan'):.2f}x over plain decoding "
          f"(same run, compile excluded)")
    if sampling.greedy:
        print(f"greedy output identical to plain decoding: {sum(same)}/{len(same)} rows")
    elif kind == "medusa":
        print("sampled with typical acceptance: close to, not exactly, the target's distribution")
    else:
        print("sampled: distributed as the target's samples, not token-identical to the plain run")
    return {"plain": plain, "spec": spec, "identical": same, "plain_tokens_per_s": plain_tps}


if __name__ == "__main__":
    main()
