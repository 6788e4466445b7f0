"""Peer rows: the same model, chunks, prompt and device through the platforms users would
otherwise pick.

- `hf-static`: HF transformers (`LlamaForCausalLM` built from our parameters, so the weights are
  the same numbers) with its static KV cache; fp32 on CPU, bf16 on a GPU.
- `llama.cpp`: llama-cpp-python (the optional `llamacpp` extra; it compiles llama.cpp from
  source) running the GGUF file itself, all CPU threads, or every layer offloaded on a GPU.

Quality is scored on exactly the chunks and positions of `eval.perplexity`; decode speed on the
same prompt and token count as our rows (greedy, no EOS stop).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

import numpy as np

from flashit_jax.errors import FlashitError

PEERS = ("hf-static", "llama.cpp")


def chunks_of(tokenizer, docs, settings) -> tuple[np.ndarray, int]:
    """The perplexity chunks [n, ctx] and the first scored prediction (llama.cpp protocol)."""
    from flashit_jax.data import eval_chunks

    bos = tokenizer.bos_id if tokenizer.add_bos else None
    per_doc = [eval_chunks(tokenizer.encode(d.text), settings["ctx"], bos, settings["chunks_per_doc"]) for d in docs]
    chunks = np.concatenate(per_doc)
    first = settings["ctx"] // 2 if settings["protocol"] == "llamacpp" else 0
    return chunks, first


def _nll_rows(logp_rows: list[np.ndarray], chunks: np.ndarray, first: int) -> tuple[float, int]:
    """Sum of -log p(next token) over scored positions; logp_rows[i] is [ctx, vocab] log-probs."""
    total, n = 0.0, 0
    for lp, c in zip(logp_rows, chunks):
        idx = np.arange(first, len(c) - 1)
        total += float(-lp[idx, c[idx + 1]].sum())
        n += len(idx)
    return total, n


# ----------------------------------------------------------------------------- HF transformers
def hf_unsupported(config) -> str | None:
    from models.llama import LlamaConfig

    if not isinstance(config, LlamaConfig):
        return f"{type(config).__name__}: the HF peer row covers the Llama family only"
    odd = [k for k, bad in (("rope_freq_factors", config.rope_freq_factors is not None),
                            ("activation", config.act != "silu"), ("norm offset", config.norm_offset != 0.0),
                            ("qkv bias", config.qkv_bias), ("sliding window", config.sliding_window is not None),
                            ("softcap", bool(config.attn_softcap or config.final_softcap)),
                            ("embed scale", config.embed_scale),
                            ("rope scaling", config.rope_scaling is not None and config.rope_scaling.kind != "llama3"))
           if bad]
    return f"this config has {', '.join(odd)}; the HF peer maps plain Llama configs" if odd else None


def hf_model(config, params, dtype: str, device: str):
    """transformers.LlamaForCausalLM with our (dense) parameters."""
    import torch
    import transformers

    from flashit_jax import tree

    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        s = config.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position}
    cfg = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.dim, intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.norm_eps, max_position_embeddings=config.max_position,
        tie_word_embeddings=config.tie_embeddings, rope_parameters=rope)
    flat = tree.flatten(params)
    if any(not hasattr(x, "__array__") or type(x).__module__.startswith("flashit_jax") for x in flat.values()):
        raise FlashitError("the HF peer needs dense parameters")
    names = {"embed/w": "model.embed_tokens.weight", "final_norm/scale": "model.norm.weight",
             "lm_head/w": "lm_head.weight"}
    hf_of = {"attn_norm/scale": "input_layernorm.weight", "mlp_norm/scale": "post_attention_layernorm.weight"}
    for n in "qkvo":
        hf_of[f"attn/{n}/w"] = f"self_attn.{n}_proj.weight"
    for n in ("gate", "up", "down"):
        hf_of[f"mlp/{n}/w"] = f"mlp.{n}_proj.weight"
    sd = {}
    for path, x in flat.items():
        a = np.asarray(x, np.float32)
        if path in names:
            key = names[path]
        else:
            _, i, rest = path.split("/", 2)
            key = f"model.layers.{i}.{hf_of[rest]}"
        if a.ndim == 2 and path not in ("embed/w",):
            a = a.T  # ours [in, out]; torch Linear [out, in]
        sd[key] = torch.from_numpy(np.array(a, np.float32, order="C", copy=True))
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_embeddings:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise FlashitError(f"HF peer: no value for {missing[:3]}")
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)  # its buffers were built on meta
    return model.to(device=device, dtype=torch_dtype).eval(), transformers.__version__


def hf_row(loaded, docs, settings, prompt: list[int], prefill_tokens: np.ndarray, new_tokens: int,
           bandwidth: float | None, quality: bool = True) -> dict:
    import torch

    why = hf_unsupported(loaded.config)
    if why:
        raise FlashitError(why)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    dtype = "fp32" if dev == "cpu" else "bf16"
    model, version = hf_model(loaded.config, loaded.params, dtype, dev)
    row = {"what": f"HF transformers {version} LlamaForCausalLM, static KV cache ({dtype}, torch {torch.__version__})"}
    if quality:
        chunks, first = chunks_of(loaded.tokenizer, docs, settings)
        logps = []
        with torch.no_grad():
            for i in range(0, len(chunks), settings["eval_batch"]):
                x = torch.from_numpy(chunks[i: i + settings["eval_batch"]].astype(np.int64)).to(dev)
                logps += list(torch.log_softmax(model(x).logits.float(), -1).cpu().numpy())
        total, n = _nll_rows(logps, chunks, first)
        row.update(ppl=math.exp(total / n), mean_nll=total / n, n_chunks=len(chunks))
    with torch.no_grad():
        x = torch.from_numpy(prefill_tokens.astype(np.int64)).to(dev)
        model(x, logits_to_keep=1)  # warm-up
        times = []
        for _ in range(3):
            sync()
            t0 = time.perf_counter()
            model(x, logits_to_keep=1)
            sync()
            times.append(time.perf_counter() - t0)
    row["prefill_tps"] = prefill_tokens.size / statistics.median(times)
    stamps: list[float] = []

    import transformers

    class Clock(transformers.LogitsProcessor):
        def __call__(self, input_ids, scores):
            sync()
            stamps.append(time.perf_counter())
            return scores

    ids = torch.tensor([prompt], device=dev)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              cache_implementation="static", logits_processor=transformers.LogitsProcessorList([Clock()]))
    best = None
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(3):  # the first call sets the static cache up (and compiles, where HF compiles)
        stamps.clear()
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, **kw)
        tps = (len(stamps) - 1) / (stamps[-1] - stamps[0])
        if best is None or tps > best[0]:
            best = (tps, stamps[0] - t0, out[0, len(prompt):len(prompt) + 16].tolist())
    row.update(decode_tps=best[0], ttft_ms=1e3 * best[1], first_tokens=best[2])
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if dev == "cuda":
        row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 1e6
        row["device"] = torch.cuda.get_device_name()
    if bandwidth:
        c = loaded.config
        kv = 2 * c.n_layers * c.n_kv_heads * c.head_dim * next(model.parameters()).element_size()
        row["mbu"] = (wbytes + kv * (len(prompt) + new_tokens / 2)) * best[0] / bandwidth
    row["size_mb"] = wbytes / 1e6
    del model
    return row


# ----------------------------------------------------------------------------- llama.cpp
def gguf_path(spec: str) -> Path | None:
    from flashit_jax.loading.resolver import KNOWN, fetch_known

    if spec in KNOWN:
        return fetch_known(spec)
    p = Path(spec)
    return p if p.suffix == ".gguf" and p.is_file() else None


def llamacpp_row(spec: str, tokenizer, docs, settings, prompt: list[int], prefill_tokens: np.ndarray,
                 new_tokens: int, bandwidth: float | None, quality: bool = True) -> dict:
    try:
        import llama_cpp
    except ImportError:
        raise FlashitError("llama-cpp-python is not installed (pip install -e '.[llamacpp]'; it compiles "
                           "llama.cpp from source)") from None
    path = gguf_path(spec)
    if path is None:
        raise FlashitError(f"{spec} is not a GGUF file or a known GGUF model: llama.cpp runs GGUF only")
    threads = os.cpu_count() or 1
    gpu_layers = -1 if llama_cpp.llama_supports_gpu_offload() else 0
    row = {"what": f"llama.cpp via llama-cpp-python {llama_cpp.__version__}, {path.name} as stored, "
                   f"{threads} threads" + (", all layers on the GPU" if gpu_layers else ""),
           "size_mb": path.stat().st_size / 1e6}
    n_ctx = max(settings["ctx"], len(prompt) + new_tokens + 8, prefill_tokens.shape[1] + 8)
    if quality:
        chunks, first = chunks_of(tokenizer, docs, settings)
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=settings["ctx"], n_threads=threads,
                              n_gpu_layers=gpu_layers, logits_all=True, verbose=False)
        logps = []
        for c in chunks:
            llm.reset()
            llm.eval(c.tolist())
            lg = np.asarray(llm.scores[: len(c)], np.float64)
            lg -= lg.max(-1, keepdims=True)
            logps.append(lg - np.log(np.exp(lg).sum(-1, keepdims=True)))
        total, n = _nll_rows(logps, chunks, first)
        row.update(ppl=math.exp(total / n), mean_nll=total / n, n_chunks=len(chunks))
        del llm
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=max(512, prefill_tokens.shape[1]), n_threads=threads,
                          n_gpu_layers=gpu_layers, logits_all=False, verbose=False)
    times = []
    for _ in range(3):  # llama.cpp has no batched prefill of independent prompts here: one row at a time
        t0 = time.perf_counter()
        for row_toks in prefill_tokens:
            llm.reset()
            llm.eval(row_toks.tolist())
        times.append(time.perf_counter() - t0)
    row["prefill_tps"] = prefill_tokens.size / statistics.median(times)
    def last_logits():
        # llama-cpp-python >= 0.3 leaves `llm.scores` at zero without logits_all (sampling moved
        # into its sampler): read the last position's logits from the context itself
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))

    best = None
    for _ in range(2):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        tok = int(np.argmax(last_logits()))
        ttft = time.perf_counter() - t0
        toks = [tok]
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([tok])
            tok = int(np.argmax(last_logits()))
            toks.append(tok)
        tps = (new_tokens - 1) / (time.perf_counter() - t0)
        if best is None or tps > best[0]:
            best = (tps, ttft, toks[:16])
    row.update(decode_tps=best[0], ttft_ms=1e3 * best[1], first_tokens=best[2])
    if bandwidth:
        row["mbu"] = path.stat().st_size * best[0] / bandwidth  # weights only: llama.cpp's KV is not counted
    del llm
    return row
