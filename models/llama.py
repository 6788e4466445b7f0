"""The Llama family in one file: Llama 2/3, Mistral, Qwen2, Gemma and SmolLM2.

Parameters are declared with Flax NNX (`Llama`), then used as a plain pytree:

    graphdef, state = nnx.split(Llama(config, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(state)
    logits, cache, aux = forward(params, tokens, positions, cache, config=config)

Linear weights are `[in, out]`. Per-layer head counts and widths are read off the weights,
so structurally pruned layers (fewer heads, narrower MLP, fewer layers) run unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flashit_jax import nn
from flashit_jax.sharding import constrain_batch
from flashit_jax.nn.rope import RopeScaling
from models.common import config_from_dict, init_pure_params, layer_list


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None  # llama.cpp's rope_freqs tensor
    max_position: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    act: str = "silu"  # "silu": SwiGLU; "gelu_tanh": GeGLU (Gemma)
    norm_offset: float = 0.0  # Gemma scales by (1 + w)
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(dim)
    sliding_window: int | None = None  # Mistral
    attn_softcap: float | None = None
    final_softcap: float | None = None
    family: str = "llama"  # llama | mistral | qwen2 | gemma | smollm2: which HF class this mirrors
    # structured pruning: per-layer (n_heads, n_kv_heads) and FFN widths (None: every layer is uniform);
    # n_heads / n_kv_heads / ffn_dim then describe the widest layer
    layer_heads: tuple[tuple[int, int], ...] | None = None
    layer_ffn_dims: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.act not in ("silu", "gelu_tanh"):
            raise ValueError(f"unsupported activation {self.act!r} (silu, gelu_tanh)")
        if self.layer_heads is not None:  # JSON gives lists; the config must stay hashable
            heads = tuple((int(q), int(kv)) for q, kv in self.layer_heads)
            object.__setattr__(self, "layer_heads", heads)
            if len(heads) != self.n_layers:
                raise ValueError(f"layer_heads has {len(heads)} entries for {self.n_layers} layers")
            for i, (q, kv) in enumerate(heads):
                if q < 1 or kv < 1 or q % kv:
                    raise ValueError(f"layer {i}: {q} query heads and {kv} KV heads (need q >= kv >= 1, q % kv == 0)")
        if self.layer_ffn_dims is not None:
            ffn = tuple(int(f) for f in self.layer_ffn_dims)
            object.__setattr__(self, "layer_ffn_dims", ffn)
            if len(ffn) != self.n_layers or min(ffn, default=1) < 1:
                raise ValueError(f"layer_ffn_dims {ffn} must hold {self.n_layers} positive widths")

    def heads_at(self, layer: int) -> tuple[int, int]:
        """(query heads, KV heads) of one layer."""
        return (self.n_heads, self.n_kv_heads) if self.layer_heads is None else self.layer_heads[layer]

    def ffn_dim_at(self, layer: int) -> int:
        return self.ffn_dim if self.layer_ffn_dims is None else self.layer_ffn_dims[layer]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.rope_freq_factors is not None:
            d["rope_freq_factors"] = list(self.rope_freq_factors)
        for name in ("layer_heads", "layer_ffn_dims"):
            if d[name] is None:
                del d[name]  # uniform models keep the config.json older readers know
            else:
                d[name] = [list(h) if isinstance(h, tuple) else h for h in d[name]]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        return config_from_dict(cls, d)

    @property
    def n_params(self) -> int:
        layers = 0
        for i in range(self.n_layers):
            q, kv = self.heads_at(i)
            layers += self.dim * self.head_dim * (2 * q + 2 * kv) + 3 * self.dim * self.ffn_dim_at(i) + 2 * self.dim
        head = 0 if self.tie_embeddings else self.dim * self.vocab_size
        return self.vocab_size * self.dim + layers + self.dim + head


# Logical axis names of every parameter, matched on '/'-joined paths; `flashit_jax.sharding`
# maps them onto mesh axes with one rules table.
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"embed/w", ("vocab", "embed")),
    (r"lm_head/w", ("embed", "vocab")),
    (r"layers/\d+/attn/[qkv]/w", ("embed", "heads")),
    (r"layers/\d+/attn/[qkv]/b", ("heads",)),
    (r"layers/\d+/attn/o/w", ("heads", "embed")),
    (r"layers/\d+/mlp/(gate|up)/w", ("embed", "mlp")),
    (r"layers/\d+/mlp/down/w", ("mlp", "embed")),
    (r".*norm/scale", ("norm",)),
]


# ----------------------------------------------------------------------------- NNX modules
_INIT_STD = 0.02


class Linear(nnx.Module):
    def __init__(self, din: int, dout: int, *, bias: bool = False, rngs: nnx.Rngs, dtype=jnp.float32):
        self.w = nnx.Param((_INIT_STD * jax.random.normal(rngs.params(), (din, dout), jnp.float32)).astype(dtype))
        if bias:
            self.b = nnx.Param(jnp.zeros((dout,), dtype))


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.w = nnx.Param((_INIT_STD * jax.random.normal(rngs.params(), (vocab, dim), jnp.float32)).astype(dtype))


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, offset: float, dtype=jnp.float32):
        # Gemma's (1 + w) starts at w = 0 so that the initial scale is 1 either way.
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, dtype))


def heads_at(c, layer: int) -> tuple[int, int]:
    """(query heads, KV heads) of a layer, for any config of the decoder stack (Mixtral has no per-layer heads)."""
    return c.heads_at(layer) if hasattr(c, "heads_at") else (c.n_heads, c.n_kv_heads)


class Attention(nnx.Module):
    def __init__(self, c: LlamaConfig, layer: int = 0, *, rngs: nnx.Rngs, dtype):
        q_heads, kv_heads = heads_at(c, layer)
        qd, kd = q_heads * c.head_dim, kv_heads * c.head_dim
        self.q = Linear(c.dim, qd, bias=c.qkv_bias, rngs=rngs, dtype=dtype)
        self.k = Linear(c.dim, kd, bias=c.qkv_bias, rngs=rngs, dtype=dtype)
        self.v = Linear(c.dim, kd, bias=c.qkv_bias, rngs=rngs, dtype=dtype)
        self.o = Linear(qd, c.dim, rngs=rngs, dtype=dtype)


class MLP(nnx.Module):
    def __init__(self, c: LlamaConfig, layer: int = 0, *, rngs: nnx.Rngs, dtype):
        f = c.ffn_dim_at(layer)
        self.gate = Linear(c.dim, f, rngs=rngs, dtype=dtype)
        self.up = Linear(c.dim, f, rngs=rngs, dtype=dtype)
        self.down = Linear(f, c.dim, rngs=rngs, dtype=dtype)


class Block(nnx.Module):
    def __init__(self, c: LlamaConfig, layer: int = 0, *, rngs: nnx.Rngs, dtype):
        self.attn_norm = RMSNorm(c.dim, offset=c.norm_offset, dtype=dtype)
        self.attn = Attention(c, layer, rngs=rngs, dtype=dtype)
        self.mlp_norm = RMSNorm(c.dim, offset=c.norm_offset, dtype=dtype)
        self.mlp = MLP(c, layer, rngs=rngs, dtype=dtype)


class Llama(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        c = self.config = config
        self.embed = Embed(c.vocab_size, c.dim, rngs=rngs, dtype=dtype)
        self.layers = layer_list([Block(c, i, rngs=rngs, dtype=dtype) for i in range(c.n_layers)])
        self.final_norm = RMSNorm(c.dim, offset=c.norm_offset, dtype=dtype)
        if not c.tie_embeddings:
            self.lm_head = Linear(c.dim, c.vocab_size, rngs=rngs, dtype=dtype)

    def __call__(self, tokens, positions=None, cache=None, **kw):
        params = nnx.to_pure_dict(nnx.state(self, nnx.Param))
        return forward(params, tokens, positions, cache, config=self.config, **kw)


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    return init_pure_params(Llama, config, key, dtype)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=jnp.bfloat16, params=None) -> nn.KVCache:
    """Empty cache; pass `params` when layers differ in KV heads (structured pruning)."""
    if params is None:
        heads = [heads_at(config, i)[1] for i in range(config.n_layers)]
    else:
        attns = [params["layers"][i]["attn"] for i in range(len(params["layers"]))]
        heads = [_heads(a["k"]["w"], config.head_dim) if "k" in a else config.n_kv_heads for a in attns]
    return nn.init_kv_cache(batch, max_len, heads, config.head_dim, dtype)


def fuse_projections(params, config: LlamaConfig) -> dict:
    """Decode layout: q|k|v and gate|up concatenated along `out`, so a decode step reads each
    layer's input projections in two matmuls instead of five (fewer, larger GEMVs). Plain
    (unquantized) weights of the config's full shape only; `forward` runs either layout."""
    layers = {}
    for i in range(len(params["layers"])):
        lp = dict(params["layers"][i])
        attn, mlp = dict(lp["attn"]), dict(lp["mlp"])
        ws = [attn[n]["w"] for n in ("q", "k", "v")]
        q_heads, kv_heads = heads_at(config, i)
        if ws[0].shape[-1] != q_heads * config.head_dim or ws[1].shape[-1] != kv_heads * config.head_dim:
            raise ValueError(f"layer {i}: head counts differ from the config; fuse_projections needs full layers")
        qkv = {"w": jnp.concatenate(ws, axis=-1)}
        if "b" in attn["q"]:
            qkv["b"] = jnp.concatenate([attn[n]["b"] for n in ("q", "k", "v")], axis=-1)
        lp["attn"] = {"qkv": qkv, "o": attn["o"]}
        lp["mlp"] = {"gate_up": {"w": jnp.concatenate([mlp["gate"]["w"], mlp["up"]["w"]], axis=-1)},
                     "down": mlp["down"]}
        layers[i] = lp
    return {**params, "layers": layers}


# ----------------------------------------------------------------------------- forward pass
def _heads(w, head_dim: int) -> int:
    return nn.weight_shape(w)[-1] // head_dim


def _proj(p: dict, x, tap: dict | None, path: str, norm=None, glu=None, residual=None):
    """nn.linear; norm=(scale, eps, offset) means x is the raw residual and the projection's
    input is rms_norm(x); glu="silu" means x is gate | up and the input silu(gate) * up; residual is
    added to the result (all three fused into the decode GEMV where it runs)."""
    if tap is not None:  # the layer's actual input is recorded
        if norm is not None:
            x, norm = nn.rms_norm(x, *norm), None
        if glu is not None:
            x, glu = nn.glu_input(x, glu), None
        tap[path] = x
    return nn.linear(x, p["w"], p.get("b"), norm=norm, glu=glu, residual=residual)


def _attention(p, x, positions, q_slots, kv_lengths, cache, layer: int, c: LlamaConfig, tap, pre, attn_impl,
               segment_ids=None, attn_mask=None, norm=None, residual=None):
    """Self-attention of one layer; with a cache, also returns the layer's new cache entry.
    norm: (scale, eps, offset) when x is the un-normalised residual (see `_proj`); residual: added to the
    output (residual + attention, the decode GEMV's epilogue where it runs)."""
    b, t, _ = x.shape
    hd = c.head_dim
    if "qkv" in p:  # the fused decode layout of `fuse_projections`
        q_heads, kv_heads = heads_at(c, layer)
        nq, nkv = q_heads * hd, kv_heads * hd
        q, k, v = jnp.split(_proj(p["qkv"], x, tap, pre + "qkv", norm), [nq, nq + nkv], axis=-1)
    else:
        if norm is not None:  # three projections: normalise once
            x, norm = nn.rms_norm(x, *norm), None
        q, k, v = (_proj(p[n], x, tap, pre + n) for n in ("q", "k", "v"))
    q, k, v = (a.reshape(b, t, -1, hd) for a in (q, k, v))
    inv_freq = nn.inv_frequencies(hd, c.rope_theta, c.rope_scaling, c.rope_freq_factors)
    # a decode step's rotation and cache write as one kernel, where it applies (opt-in, nn.KVCache)
    fused = None if cache is None else cache.rope_update_layer(layer, q, k, v, positions, inv_freq)
    entry = None
    if fused is not None:
        q, k, v, entry = fused
    else:
        q = nn.apply_rope(q, positions, inv_freq)
        k = nn.apply_rope(k, positions, inv_freq)
        if cache is not None:
            k, v, entry = cache.update_layer(layer, k, v)
        else:  # query i at slot i, every key valid: the layout cuDNN / Mosaic GPU kernels serve
            q_slots, kv_lengths = None, None
    o = nn.attention(q, k, v, q_positions=q_slots, kv_lengths=kv_lengths, causal=True, window=c.sliding_window,
                     segment_ids=segment_ids, softcap=c.attn_softcap, mask=attn_mask, impl=attn_impl)
    return _proj(p["o"], o.reshape(b, t, -1), tap, pre + "o", residual=residual), entry


def _mlp(p, x, c: LlamaConfig, tap, pre, norm=None, residual=None):
    """The gated MLP; residual, when given, is added to its output (see `_proj`)."""
    if "gate_up" in p:
        gu = _proj(p["gate_up"], x, tap, pre + "gate_up", norm)
        if c.act == "silu":  # the down projection takes gate | up and applies the activation itself
            return _proj(p["down"], gu, tap, pre + "down", glu="silu", residual=residual)
        g, u = jnp.split(gu, 2, axis=-1)
    else:
        if norm is not None:
            x = nn.rms_norm(x, *norm)
        g = _proj(p["gate"], x, tap, pre + "gate")
        u = _proj(p["up"], x, tap, pre + "up")
    h = nn.silu_mul(g, u) if c.act == "silu" else jax.nn.gelu(g, approximate=True) * u
    return _proj(p["down"], h, tap, pre + "down", residual=residual)


def forward(params, tokens, positions=None, cache: nn.KVCache | None = None, *, config: LlamaConfig,
            collect=(), segment_ids=None, logits_at=None, seq_lengths=None, attn_impl: str = "auto", dtype=None,
            attn_mask=None):
    """Logits for `tokens` [B, T].

    positions int32 [B, T]: rotary positions (default: continue from the cache, else 0..T-1).
    cache: a KVCache; the T new keys are written at slots lengths[b] + t and lengths grow by T,
      or by seq_lengths[b] when given (right-padded rows: only the first seq_lengths[b] are real).
    collect: "hidden" (residual stream after each layer) and/or "inputs" (the input of every
      linear, keyed by its parameter path without the trailing "/w") into `aux`.
    segment_ids int32 [B, T]: packed sequences attend within their own segment (no cache).
    logits_at int32 [B]: compute logits only at these positions (prefill), shape [B, 1, V].
    dtype: compute dtype, default the embedding's. Logits are fp32.
    attn_mask: bool [B, 1, T, Tk], ANDed with the causal mask (tree attention over draft candidates).
    Returns (logits, cache, aux).
    """
    def ffn(lp, h, layer, tap, pre, norm=None, residual=None):
        return _mlp(lp["mlp"], h, config, tap, pre + "mlp/", norm, residual), None

    ffn.takes_norm = True  # gets the raw residual and the norm (fused into its first GEMV)
    ffn.takes_residual = True  # returns residual + its output (the add fused into its last GEMV)

    logits, new_cache, aux, _ = decoder_forward(
        params, tokens, positions, cache, config=config, ffn=ffn, collect=collect, segment_ids=segment_ids,
        logits_at=logits_at, seq_lengths=seq_lengths, attn_impl=attn_impl, dtype=dtype, attn_mask=attn_mask)
    return logits, new_cache, aux


def output_logits(params, x, c, tap: dict | None = None, logits_at=None):
    """The final norm and the output head (tied embedding or lm_head): fp32 logits [B, T, V], only
    at `logits_at` [B] when given ([B, 1, V]), soft-capped where the config says."""
    x = nn.rms_norm(x, params["final_norm"]["scale"], c.norm_eps, c.norm_offset)
    if logits_at is not None:
        x = x[jnp.arange(x.shape[0]), logits_at][:, None]
    if c.tie_embeddings:
        logits = nn.unembed(x, params["embed"]["w"])
    else:
        if tap is not None:
            tap["lm_head"] = x
        logits = nn.linear_logits(x, params["lm_head"]["w"])
    if c.final_softcap is not None:
        logits = c.final_softcap * jnp.tanh(logits / c.final_softcap)
    return constrain_batch(logits)


def decoder_forward(params, tokens, positions, cache, *, config, ffn, collect=(), segment_ids=None,
                    logits_at=None, seq_lengths=None, attn_impl: str = "auto", dtype=None, attn_mask=None):
    """The decoder stack shared by families that differ only in the feed-forward block (Mixtral).

    ffn(layer_params, h, layer_index, tap, path_prefix) -> (output, ffn_aux); returns
    (logits, cache, aux, [ffn_aux of each layer]). An ffn with `takes_norm = True` is called with
    the raw residual and `norm=(scale, eps, offset)` instead of h; one with `takes_residual = True` gets
    `residual=` (the stream before it) and returns residual + its output.
    """
    c = config
    b, t = tokens.shape
    steps = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    if cache is None:
        q_slots, kv_lengths = steps, jnp.full((b,), t, jnp.int32)
    else:
        if segment_ids is not None:
            raise ValueError("segment_ids are for packed training batches, not cached decoding")
        q_slots = cache.lengths[:, None] + steps
        kv_lengths = cache.lengths + t
    if positions is None:
        positions = q_slots
    collect = set(collect)
    tap = {} if "inputs" in collect else None
    x = nn.embed(tokens, params["embed"]["w"], dtype)
    if c.embed_scale:
        x = x * jnp.asarray(c.dim**0.5, x.dtype)
    # under a mesh the residual stream keeps its rows on the batch axes: without this, XLA's
    # partitioner may reshard activations (all-to-alls) to meet fsdp-split weights instead of
    # gathering the weights (2x slower fsdp steps on 2 H200s)
    x = constrain_batch(x)
    hidden, entries, ffn_aux = [], [], []
    layers = params["layers"]
    for i in range(len(layers)):
        lp = layers[i]
        pre = f"layers/{i}/"
        norm = (lp["attn_norm"]["scale"], c.norm_eps, c.norm_offset)
        # x + attention(x): the add is the o projection's epilogue (in the decode GEMV where it runs)
        x, entry = _attention(lp["attn"], x, positions, q_slots, kv_lengths, cache, i, c, tap, pre + "attn/",
                              attn_impl, segment_ids, attn_mask, norm=norm, residual=x)
        entries.append(entry)
        norm = (lp["mlp_norm"]["scale"], c.norm_eps, c.norm_offset)
        kw = {"residual": x} if getattr(ffn, "takes_residual", False) else {}
        if getattr(ffn, "takes_norm", False):
            y, extra = ffn(lp, x, i, tap, pre, norm=norm, **kw)
        else:
            y, extra = ffn(lp, nn.rms_norm(x, *norm), i, tap, pre, **kw)
        ffn_aux.append(extra)
        x = constrain_batch(y if kw else x + y)
        if "hidden" in collect:
            hidden.append(x)
    logits = output_logits(params, x, c, tap, logits_at)
    aux = {}
    if "hidden" in collect:
        aux["hidden"] = hidden
    if tap is not None:
        aux["inputs"] = tap
    new_cache = None
    if cache is not None:
        new_cache = cache.advance(entries, cache.lengths + (t if seq_lengths is None else seq_lengths))
    return logits, new_cache, aux, ffn_aux

