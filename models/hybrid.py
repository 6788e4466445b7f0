"""Llama with some attention layers replaced by multi-head Mamba mixers ("The Mamba in the Llama").

A converted layer keeps its norms and MLP; its attention becomes the Mamba-2-layout mixer of
`models.mamba` (H heads of P channels, x and B shared per KV group, C per head), initialised from
the attention weights by `from_llama`: x <- W_V, B <- W_K, C <- W_Q, out <- W_O; the conv, Δ, A,
D, gate and norm are new. Parameters keep the Llama names for everything untouched:

    layers/i/{attn_norm,mlp_norm}/scale, layers/i/mlp/{gate,up,down}/w       every layer
    layers/i/attn/{q,k,v,o}/w                                                attention layers
    layers/i/mixer/{x,B,C,z,dt,out}/w, dt/b, conv/{kernel,bias}, A_log, D,   converted layers
        norm/scale

so a hybrid saves and loads like any family (`flashit_jax.loading.save_model` / `load_model`).

Decoding keeps a `HybridCache`: KV buffers for the attention layers only, the conv inputs and
the [H, P, N] state for the mixers, one `lengths`. With every layer converted, memory per
sequence is constant in the context.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flashit_jax import nn
from flashit_jax.errors import FlashitError
from models import llama
from models.common import init_pure_params
from models.llama import LlamaConfig
from models.mamba import MultiHeadConfig, MultiHeadMixer, from_attention, multihead_mixer


@dataclasses.dataclass(frozen=True)
class HybridConfig(LlamaConfig):
    """A Llama config plus the converted layers and the mixer's hyperparameters."""

    mamba_layers: tuple[int, ...] = ()  # layer indices whose attention is a Mamba mixer
    d_conv: int = 4
    gate: bool = True  # y * silu(z)
    mixer_norm: bool = True  # Mamba-2's per-head RMSNorm before the output projection
    conv_act: str = "silu"  # after the conv; "identity": x, B, C stay linear in the input
    family: str = "hybrid"

    def __post_init__(self):
        super().__post_init__()
        try:
            layers = tuple(int(i) for i in self.mamba_layers)
        except (TypeError, ValueError):
            raise ValueError(f"mamba_layers must be layer indices, got {self.mamba_layers!r}") from None
        bad = [i for i in layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"mamba_layers {bad} out of range: the model has {self.n_layers} layers")
        if len(set(layers)) != len(layers):
            raise ValueError(f"mamba_layers repeat an index: {list(layers)}")
        object.__setattr__(self, "mamba_layers", tuple(sorted(layers)))
        self.mixer  # validates d_conv and conv_act

    @property
    def mixer(self) -> MultiHeadConfig:
        # state size N = head_dim: B and C come from K and Q, whose heads are head_dim wide
        return MultiHeadConfig(dim=self.dim, n_heads=self.n_heads, n_groups=self.n_kv_heads, head_dim=self.head_dim,
                               d_state=self.head_dim, d_conv=self.d_conv, gate=self.gate, conv_act=self.conv_act,
                               bias=self.qkv_bias, norm=self.mixer_norm, norm_eps=self.norm_eps)

    @property
    def attn_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.n_layers) if i not in self.mamba_layers)

    @property
    def llama(self) -> LlamaConfig:
        """The transformer this hybrid was made from (same shapes, every layer attention)."""
        names = {f.name for f in dataclasses.fields(LlamaConfig)} - {"family"}
        return LlamaConfig(**{k: getattr(self, k) for k in names}, family="llama")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["mamba_layers"] = list(self.mamba_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HybridConfig":
        d = dict(d)
        if "mamba_layers" in d:
            d["mamba_layers"] = tuple(d["mamba_layers"])
        return super().from_dict(d)

    @property
    def n_params(self) -> int:
        m = self.mixer
        h, g, p, n = m.n_heads, m.n_groups, m.head_dim, m.d_state
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        if self.qkv_bias:
            attn += self.head_dim * (self.n_heads + 2 * self.n_kv_heads)
        xbc = g * p + g * n + h * n
        mixer = (self.dim * xbc + (xbc if m.bias else 0) + (self.dim * h * p if m.gate else 0)
                 + self.dim * h + h  # dt
                 + (m.d_conv + 1) * m.conv_channels + 2 * h  # conv, A_log, D
                 + (h * p if m.norm else 0) + h * p * self.dim)
        return super().n_params + len(self.mamba_layers) * (mixer - attn)


def convert_layers(n_layers: int, fraction: float) -> tuple[int, ...]:
    """`round(fraction * n_layers)` layers, spread evenly, the attention layers kept at regular
    intervals (0.5 of 30: layers 1, 3, ..., 29; attention stays in layer 0, 2, ...)."""
    if not 0.0 <= fraction <= 1.0:
        raise FlashitError(f"fraction of converted layers must be in [0, 1], got {fraction}")
    k = round(fraction * n_layers)
    if k == 0:
        return ()
    # the i-th converted layer is the last of the i-th of k equal slices of the stack
    return tuple(sorted({math.ceil((i + 1) * n_layers / k) - 1 for i in range(k)}))


PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    *llama.PARAM_AXES,
    (r"layers/\d+/mixer/(x|B|C|z)/w", ("embed", "heads")),
    (r"layers/\d+/mixer/(x|B|C)/b", ("heads",)),
    (r"layers/\d+/mixer/out/w", ("heads", "embed")),
    (r"layers/\d+/mixer/dt/w", ("embed", None)),
    # per-head scalars and the conv over the concatenated x|B|C channels: tiny, replicated
    (r"layers/\d+/mixer/(dt/b|A_log|D)", (None,)),
    (r"layers/\d+/mixer/conv/kernel", (None, None)),
    (r"layers/\d+/mixer/conv/bias", (None,)),
]


# ----------------------------------------------------------------------------- NNX modules
class MixerBlock(nnx.Module):
    def __init__(self, c: HybridConfig, layer: int = 0, *, rngs: nnx.Rngs, dtype):
        self.attn_norm = llama.RMSNorm(c.dim, offset=c.norm_offset, dtype=dtype)
        self.mixer = MultiHeadMixer(c.mixer, rngs=rngs, dtype=dtype)
        self.mlp_norm = llama.RMSNorm(c.dim, offset=c.norm_offset, dtype=dtype)
        self.mlp = llama.MLP(c, layer, rngs=rngs, dtype=dtype)


class Hybrid(nnx.Module):
    def __init__(self, config: HybridConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        c = self.config = config
        self.embed = llama.Embed(c.vocab_size, c.dim, rngs=rngs, dtype=dtype)
        self.layers = nnx.List([MixerBlock(c, i, rngs=rngs, dtype=dtype) if i in c.mamba_layers
                                else llama.Block(c, i, rngs=rngs, dtype=dtype) for i in range(c.n_layers)])
        self.final_norm = llama.RMSNorm(c.dim, offset=c.norm_offset, dtype=dtype)
        if not c.tie_embeddings:
            self.lm_head = llama.Linear(c.dim, c.vocab_size, rngs=rngs, dtype=dtype)


def init_params(config: HybridConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    return init_pure_params(Hybrid, config, key, dtype)


def hybrid_config(config: LlamaConfig, mamba_layers, **mixer) -> HybridConfig:
    """`config` with `mamba_layers` converted; `mixer`: d_conv, gate, mixer_norm, conv_act."""
    names = {f.name for f in dataclasses.fields(LlamaConfig)} - {"family"}
    try:
        return HybridConfig(**{k: getattr(config, k) for k in names}, mamba_layers=tuple(mamba_layers), **mixer)
    except (TypeError, ValueError) as e:
        raise FlashitError(f"hybrid config: {e}") from None


def hybrid_shape(config: LlamaConfig, fraction: float, **mixer) -> HybridConfig:
    """The hybrid of `config` with `convert_layers(n_layers, fraction)` converted (`random:` shapes)."""
    return hybrid_config(config, convert_layers(config.n_layers, fraction), **mixer)


def from_llama(config: LlamaConfig, params: dict, mamba_layers, *, key: jax.Array | None = None, d_conv: int = 4,
               gate: bool = True, mixer_norm: bool = True, conv_act: str = "silu",
               dt_range: tuple[float, float] = (1e-3, 0.1), a_range: tuple[float, float] = (1.0, 16.0),
               norm_init: float = 1.0):
    """(HybridConfig, params) with `mamba_layers` of a Llama converted to mixers.

    x/B/C/out come from V/K/Q/O (`models.mamba.from_attention`); the conv starts as the identity;
    Δ's bias and A are drawn as Mamba-2 draws them (Δ log-uniform in `dt_range`, A uniform in
    `a_range`, per head; Δ's input weight starts at 0, so Δ starts input-independent); D = 1;
    the gate z is random. Every other parameter is the Llama's, shared, not copied.
    """
    if type(config) is not LlamaConfig:
        raise FlashitError(f"from_llama converts a Llama-family model, not a {type(config).__name__}")
    layers = params["layers"]
    if len(layers) != config.n_layers:
        raise FlashitError(f"params have {len(layers)} layers but the config {config.n_layers}")
    hc = hybrid_config(config, mamba_layers, d_conv=d_conv, gate=gate, mixer_norm=mixer_norm, conv_act=conv_act)
    lo, hi = dt_range
    if not 0 < lo <= hi or not 0 < a_range[0] <= a_range[1]:
        raise FlashitError(f"dt_range {dt_range} and a_range {a_range} must be positive, low <= high")
    key = jax.random.key(0) if key is None else key
    new_layers = {}
    for i in range(config.n_layers):
        lp = layers[i]
        if i not in hc.mamba_layers:
            new_layers[i] = lp
            continue
        attn = lp["attn"]
        if "qkv" in attn:
            raise FlashitError("from_llama needs separate q/k/v weights (not the fused decode layout)")
        k_mix, k_dt, k_a = jax.random.split(jax.random.fold_in(key, i), 3)
        mp = from_attention(attn, hc.mixer, k_mix)
        h = hc.n_heads
        dt = jnp.exp(jax.random.uniform(k_dt, (h,), jnp.float32, math.log(lo), math.log(hi)))
        dtype = mp["dt"]["b"].dtype
        mp["dt"]["b"] = (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # softplus^-1
        mp["A_log"] = jnp.log(jax.random.uniform(k_a, (h,), jnp.float32, a_range[0], a_range[1])).astype(dtype)
        if hc.mixer_norm:
            mp["norm"]["scale"] = jnp.full_like(mp["norm"]["scale"], norm_init)
        new_layers[i] = {"attn_norm": lp["attn_norm"], "mixer": mp, "mlp_norm": lp["mlp_norm"], "mlp": lp["mlp"]}
    return hc, {**{k: v for k, v in params.items() if k != "layers"}, "layers": new_layers}


# ----------------------------------------------------------------------------- cache
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HybridCache:
    """KV for the attention layers ([B, max_len, Hkv, D] each, in `attn_layers` order), the last
    k-1 conv inputs [B, k-1, channels] and the fp32 state [B, H, P, N] for the mixers (in
    `mamba_layers` order), and the tokens consumed per row."""

    attn_k: list
    attn_v: list
    conv: list
    ssm: list
    lengths: jax.Array  # int32 [B]

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    @property
    def max_len(self) -> int | None:
        """KV capacity; None when no attention layer is left (the state has no capacity limit)."""
        return self.attn_k[0].shape[1] if self.attn_k else None

    def kv(self) -> nn.KVCache:
        return nn.KVCache(k=self.attn_k, v=self.attn_v, lengths=self.lengths)

    def rollback(self, lengths) -> "HybridCache":
        if self.ssm:
            raise FlashitError("a hybrid cache with Mamba layers cannot roll back: their state summarises every "
                               "token consumed; keep a copy of the cache from before the tokens you may reject")
        return dataclasses.replace(self, lengths=self.kv().rollback(lengths).lengths)

    def nbytes_at(self, context: int) -> int:
        """Bytes one sequence holds after `context` tokens: KV slots grow, the mixer state does not."""
        per_slot = sum(a[0, 0].size * a.dtype.itemsize for a in (*self.attn_k, *self.attn_v))
        state = sum(a[0].size * a.dtype.itemsize for a in (*self.conv, *self.ssm))
        return per_slot * context + state


def init_cache(config: HybridConfig, batch: int, max_len: int, dtype=jnp.bfloat16, params=None) -> HybridCache:
    m = config.mixer
    kv = nn.init_kv_cache(batch, max_len, [config.n_kv_heads] * len(config.attn_layers), config.head_dim, dtype)
    return HybridCache(
        attn_k=kv.k, attn_v=kv.v,
        conv=[jnp.zeros((batch, m.d_conv - 1, m.conv_channels), dtype) for _ in config.mamba_layers],
        ssm=[jnp.zeros((batch, m.n_heads, m.head_dim, m.d_state), jnp.float32) for _ in config.mamba_layers],
        lengths=jnp.zeros((batch,), jnp.int32))


# ----------------------------------------------------------------------------- forward pass
def _check_segments(c: HybridConfig, segment_ids):
    if segment_ids is not None and c.mamba_layers:
        raise FlashitError("a hybrid with Mamba layers cannot separate packed documents (segment_ids): the state "
                           "would carry over from one document to the next. Train with --doc-masking false, or "
                           "pass one document per row")


def _block(lp, x, i: int, c: HybridConfig, *, positions, q_slots, kv_lengths, kv, slot, conv_prev, ssm_prev,
           seq_lengths, tap, segment_ids, attn_impl, scan_impl):
    """One layer: x + mixer-or-attention(norm(x)), then + mlp(norm(.)). Returns (x, new cache entry)."""
    pre = f"layers/{i}/"
    norm = (lp["attn_norm"]["scale"], c.norm_eps, c.norm_offset)
    if "mixer" in lp:
        h = nn.rms_norm(x, *norm)
        a, conv_s, ssm_s = multihead_mixer(lp["mixer"], h, c.mixer, conv_prev=conv_prev, ssm_prev=ssm_prev,
                                           seq_lengths=seq_lengths, scan_impl=scan_impl, tap=tap, pre=pre + "mixer/")
        entry = (conv_s, ssm_s)
    else:  # the raw residual and its norm, as Llama passes them: the decode GEMV fuses the norm
        a, entry = llama._attention(lp["attn"], x, positions, q_slots, kv_lengths, kv, slot, c, tap, pre + "attn/",
                                    attn_impl, segment_ids, norm=norm)
    x = x + a.astype(x.dtype)
    norm = (lp["mlp_norm"]["scale"], c.norm_eps, c.norm_offset)
    return x + llama._mlp(lp["mlp"], x, c, tap, pre + "mlp/", norm=norm), entry


def _check_layers(params, c: HybridConfig):
    layers = params["layers"]
    if len(layers) != c.n_layers:
        raise FlashitError(f"params have {len(layers)} layers but the hybrid config {c.n_layers}")
    for i in range(c.n_layers):
        want = "mixer" if i in c.mamba_layers else "attn"
        if want not in layers[i]:
            raise FlashitError(f"layer {i}: the config says {want!r} but the params hold {sorted(layers[i])}")


def forward(params, tokens, positions=None, cache: HybridCache | None = None, *, config: HybridConfig, collect=(),
            segment_ids=None, logits_at=None, seq_lengths=None, attn_impl: str = "auto", dtype=None,
            scan_impl: str = "ssd"):
    """Logits for `tokens` [B, T]: the family contract (docs/DEVELOPING.md), as `models.llama.forward`.

    cache: a HybridCache; T tokens continue from it (mixers: T == 1 takes the recurrent step).
    seq_lengths: right-padded rows; KV lengths grow by them and the mixer state freezes past them.
    segment_ids: only without Mamba layers (packed documents would share the state).
    scan_impl: the mixers' `selective_scan` impl for T > 1 ("ssd": chunked matmuls, any backend).
    """
    c = config
    _check_segments(c, segment_ids)
    _check_layers(params, c)
    b, t = tokens.shape
    steps = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    if cache is None:
        q_slots, kv_lengths, kv = steps, jnp.full((b,), t, jnp.int32), None
    else:
        q_slots, kv_lengths, kv = cache.lengths[:, None] + steps, cache.lengths + t, cache.kv()
    if positions is None:
        positions = q_slots
    collect = set(collect)
    tap = {} if "inputs" in collect else None
    x = nn.embed(tokens, params["embed"]["w"], dtype)
    if c.embed_scale:
        x = x * jnp.asarray(c.dim**0.5, x.dtype)
    hidden, kv_entries, convs, ssms = [], [], [], []
    for i in range(c.n_layers):
        is_mixer = i in c.mamba_layers
        slot = len(ssms) if is_mixer else len(kv_entries)
        x, entry = _block(
            params["layers"][i], x, i, c, positions=positions, q_slots=q_slots, kv_lengths=kv_lengths, kv=kv, slot=slot,
            conv_prev=cache.conv[slot] if cache is not None and is_mixer else None,
            ssm_prev=cache.ssm[slot] if cache is not None and is_mixer else None,
            seq_lengths=seq_lengths, tap=tap, segment_ids=segment_ids, attn_impl=attn_impl, scan_impl=scan_impl)
        if is_mixer:
            convs.append(entry[0]), ssms.append(entry[1])
        else:
            kv_entries.append(entry)
        if "hidden" in collect:
            hidden.append(x)
    logits = llama.output_logits(params, x, c, tap, logits_at)
    aux = {}
    if "hidden" in collect:
        aux["hidden"] = hidden
    if tap is not None:
        aux["inputs"] = tap
    new_cache = None
    if cache is not None:
        lengths = cache.lengths + (t if seq_lengths is None else seq_lengths)
        new_cache = HybridCache(attn_k=[e[0] for e in kv_entries], attn_v=[e[1] for e in kv_entries], conv=convs,
                                ssm=ssms, lengths=lengths)
    return logits, new_cache, aux


def layer_outputs(params, inputs: dict, positions=None, *, config: HybridConfig, layers=None, segment_ids=None,
                  attn_impl: str = "auto", scan_impl: str = "ssd") -> dict:
    """Each layer i in `layers` (default: the converted ones) applied alone to `inputs[i]` [B, T, d]
    (the residual stream entering layer i, e.g. the teacher's): the layer-wise alignment of
    `train.distill --loss align`. Returns {i: output [B, T, d]}."""
    c = config
    _check_segments(c, segment_ids)
    layers = c.mamba_layers if layers is None else tuple(layers)
    out = {}
    for i in layers:
        x = inputs[i]
        b, t, _ = x.shape
        steps = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
        out[i], _ = _block(params["layers"][i], x, i, c, positions=steps if positions is None else positions,
                           q_slots=steps, kv_lengths=jnp.full((b,), t, jnp.int32), kv=None, slot=0, conv_prev=None,
                           ssm_prev=None, seq_lengths=None, tap=None, segment_ids=segment_ids, attn_impl=attn_impl,
                           scan_impl=scan_impl)
    return out

