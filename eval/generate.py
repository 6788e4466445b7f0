"""Generate text with the static KV cache.

    python -m eval.generate --model smollm2-135m --prompt "To be, or not to be" --max-new-tokens 64
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
    return ap


def _chat(tok, text: str) -> str:
    # ChatML, as SmolLM2-Instruct's template writes it; other templates need their own tokenizer_config
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def main(argv=None):
    args = build_parser().parse_args(argv)
    with user_errors("eval.generate"):
        from flashit_jax.generate import Sampling, generate
        from flashit_jax.loading import load_model, load_tokenizer, parse_dtype

        loaded = load_model(args.model, args.dtype)
        tok = load_tokenizer(args.tokenizer) if args.tokenizer else loaded.tokenizer
        if tok is None:
            raise FlashitError(f"{args.model} has no tokenizer; pass --tokenizer smollm2-135m")
        texts = args.prompt or ["ROMEO.\nBut soft, what light through yonder window breaks?"]
        if args.chat:
            texts = [_chat(tok, t) for t in texts]
        prompts = [tok.encode(t) for t in texts]
        cache_dtype = parse_dtype(args.cache_dtype) if args.cache_dtype else None
        res = generate(loaded.model, loaded.params, prompts, max_new_tokens=args.max_new_tokens,
                       sampling=Sampling(args.temperature, args.top_k, args.top_p),
                       eos_id=None if args.no_eos else tok.eos_id, cache_dtype=cache_dtype, seed=args.seed,
                       max_len=args.max_len, attn_impl=args.attn_impl)
        for text, row, n in zip(texts, res.tokens, res.lengths):
            print("=" * 72)
            print(text + tok.decode(row[:n]))
        print("=" * 72)
        print(f"TTFT {res.ttft_s * 1e3:.1f} ms, decode {res.tokens_per_s:.1f} tokens/s "
              f"({res.steps} steps, batch {len(prompts)}, compile {res.compile_s:.1f} s)")
        return res


if __name__ == "__main__":
    main()
