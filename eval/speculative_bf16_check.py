"""Where greedy speculative decoding and prompt lookup leave plain greedy decoding in bf16, and how
close the target's top two logits are there (real SmolLM2-135M weights, 3 prompts x 64 tokens).

    python -m eval.speculative_bf16_check        # CPU, about 5 minutes
"""
import jax.numpy as jnp
import numpy as np

from flashit_jax.loading import load_model
from flashit_jax.generate import generate
from flashit_jax.decoding import speculative_generate, layer_skip_draft
from flashit_jax.decoding.speculative import Lookup
from eval.bench_speculative import PROMPTS


def main():
    L = load_model("smollm2-135m", "bf16")
    m, p, tok = L.model, L.params, L.tokenizer
    draft = layer_skip_draft(m, p, list(range(12)) + list(range(18, 30)))
    for i, text in enumerate(PROMPTS[:3]):
        ids = tok.encode(text)
        plain = generate(m, p, [ids], max_new_tokens=64).tokens[0].tolist()
        for name, d, g in (("self-spec", draft, 3), ("lookup", Lookup(ngram=3), 8)):
            spec = speculative_generate(m, p, [ids], draft=d, gamma=g, max_new_tokens=64).tokens[0].tolist()
            first = next((j for j in range(min(len(plain), len(spec))) if plain[j] != spec[j]), None)
            if first is None:
                print(i, name, "identical")
                continue
            # the target's logits (bf16 compute, fp32 out) at the divergence point, from a full forward of the common prefix
            prefix = ids + plain[:first]
            lg, _, _ = m.forward(p, jnp.asarray([prefix]), jnp.arange(len(prefix))[None])
            top = np.sort(np.asarray(lg[0, -1], np.float32))[::-1]
            print(i, name, f"diverges at new token {first}: plain {plain[first]} spec {spec[first]}; bf16 logit gap top1-top2 {top[0]-top[1]:.4f} (top1 {top[0]:.2f})", flush=True)


if __name__ == "__main__":
    from flashit_jax.errors import user_errors

    with user_errors("eval.speculative_bf16_check"):
        main()
