"""Mamba (selective state space model) in one file: HF `MambaForCausalLM` (state-spaces mamba-*),
and a multi-head mixer in the Mamba-2 layout for turning attention layers into SSMs.

Parameters are declared with Flax NNX (`Mamba`) and used as a plain pytree:

    embed/w [V, d]                          layers/i/norm/scale [d]
    layers/i/mixer/in_x/w, in_z/w [d, di]   (+ /b when proj_bias; HF's in_proj, split in two)
    layers/i/mixer/conv/kernel [k, di]      layers/i/mixer/conv/bias [di]
    layers/i/mixer/x_proj/w [di, R + 2N]    layers/i/mixer/dt_proj/w [R, di], dt_proj/b [di]
    layers/i/mixer/A_log [di, N]            layers/i/mixer/D [di]
    layers/i/mixer/out_proj/w [di, d]       final_norm/scale [d]; lm_head/w [d, V] when untied

A layer: x + out_proj(SSM(silu(conv(in_x(h)))) * silu(in_z(h))) with h = rms_norm(x), where the
SSM's Δ = softplus(dt_proj(x_proj(.)[:R])), B, C = x_proj(.)[R:], A = -exp(A_log).
Decoding keeps a `MambaCache`: the last k-1 conv inputs and the [di, N] SSM state per layer,
so a step costs the same at any context length.
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
from kernels.ssm_scan import selective_scan, step as ssm_step
from models.common import config_from_dict, init_pure_params, layer_list
from models.llama import Embed, Linear, RMSNorm, output_logits


@dataclasses.dataclass(frozen=True)
class MambaConfig:
    vocab_size: int
    dim: int  # d_model (HF hidden_size)
    n_layers: int
    d_state: int = 16  # N
    expand: int = 2
    d_inner: int = 0  # 0: expand * dim
    d_conv: int = 4  # causal depthwise conv width
    dt_rank: int = 0  # 0: ceil(dim / 16) (HF "auto")
    norm_eps: float = 1e-5
    conv_bias: bool = True
    proj_bias: bool = False  # bias of in_proj / out_proj (HF use_bias)
    tie_embeddings: bool = True
    residual_in_fp32: bool = True
    family: str = "mamba"
    # read by llama.output_logits, the output head both families share (not fields: Mamba has no
    # (1 + w) norm and no logit soft-cap, and config.json stays HF-compatible)
    norm_offset = 0.0
    final_softcap = None

    def __post_init__(self):
        if self.d_inner == 0:
            object.__setattr__(self, "d_inner", self.expand * self.dim)
        if self.dt_rank == 0:
            object.__setattr__(self, "dt_rank", math.ceil(self.dim / 16))
        if self.d_conv < 1:
            raise ValueError(f"conv width d_conv must be >= 1, got {self.d_conv}")
        if self.d_state < 1 or self.dt_rank < 1 or self.d_inner < 1:
            raise ValueError(f"d_state, dt_rank and d_inner must be >= 1 (got {self.d_state}, {self.dt_rank}, "
                             f"{self.d_inner})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MambaConfig":
        return config_from_dict(cls, d)

    @property
    def n_params(self) -> int:
        di, n, r = self.d_inner, self.d_state, self.dt_rank
        mixer = 2 * self.dim * di + self.d_conv * di + di * (r + 2 * n) + r * di + 3 * di + di * n + di * self.dim
        head = 0 if self.tie_embeddings else self.dim * self.vocab_size
        return self.vocab_size * self.dim + self.n_layers * (mixer + self.dim) + self.dim + head


# state-spaces/mamba-130m (HF: state-spaces/mamba-130m-hf); vocab padded to a multiple of 8 as there
MAMBA_130M = MambaConfig(vocab_size=50280, dim=768, n_layers=24, d_state=16, expand=2, d_conv=4)

PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r"embed/w", ("vocab", "embed")),
    (r"lm_head/w", ("embed", "vocab")),
    (r"layers/\d+/mixer/in_[xz]/w", ("embed", "mlp")),
    (r"layers/\d+/mixer/in_[xz]/b", ("mlp",)),
    (r"layers/\d+/mixer/conv/kernel", (None, "mlp")),
    (r"layers/\d+/mixer/conv/bias", ("mlp",)),
    (r"layers/\d+/mixer/x_proj/w", ("mlp", None)),
    (r"layers/\d+/mixer/dt_proj/w", (None, "mlp")),
    (r"layers/\d+/mixer/dt_proj/b", ("mlp",)),
    (r"layers/\d+/mixer/A_log", ("mlp", None)),
    (r"layers/\d+/mixer/D", ("mlp",)),
    (r"layers/\d+/mixer/out_proj/w", ("mlp", "embed")),
    (r"layers/\d+/mixer/out_proj/b", ("embed",)),
    (r".*norm/scale", ("norm",)),
]


# ----------------------------------------------------------------------------- NNX modules
class Conv(nnx.Module):
    def __init__(self, width: int, channels: int, *, bias: bool, rngs: nnx.Rngs, dtype=jnp.float32):
        bound = width**-0.5  # PyTorch's Conv1d default for a depthwise conv
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (width, channels), jnp.float32, -bound,
                                                   bound).astype(dtype))
        if bias:
            self.bias = nnx.Param(jnp.zeros((channels,), dtype))


class DtProj(nnx.Module):
    """Δ = softplus(x W + b); b starts at softplus⁻¹ of Δ log-uniform in [1e-3, 0.1] (Mamba's init)."""

    def __init__(self, rank: int, channels: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        std = rank**-0.5
        self.w = nnx.Param(jax.random.uniform(rngs.params(), (rank, channels), jnp.float32, -std, std).astype(dtype))
        u = jax.random.uniform(rngs.params(), (channels,), jnp.float32)
        dt = jnp.maximum(jnp.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)), 1e-4)
        self.b = nnx.Param((dt + jnp.log(-jnp.expm1(-dt))).astype(dtype))


class Mixer(nnx.Module):
    def __init__(self, c: MambaConfig, *, rngs: nnx.Rngs, dtype):
        di, n = c.d_inner, c.d_state
        self.in_x = Linear(c.dim, di, bias=c.proj_bias, rngs=rngs, dtype=dtype)
        self.in_z = Linear(c.dim, di, bias=c.proj_bias, rngs=rngs, dtype=dtype)
        self.conv = Conv(c.d_conv, di, bias=c.conv_bias, rngs=rngs, dtype=dtype)
        self.x_proj = Linear(di, c.dt_rank + 2 * n, rngs=rngs, dtype=dtype)
        self.dt_proj = DtProj(c.dt_rank, di, rngs=rngs, dtype=dtype)
        self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (di, n))).astype(dtype))
        self.D = nnx.Param(jnp.ones((di,), dtype))
        self.out_proj = Linear(di, c.dim, bias=c.proj_bias, rngs=rngs, dtype=dtype)


class Block(nnx.Module):
    def __init__(self, c: MambaConfig, *, rngs: nnx.Rngs, dtype):
        self.norm = RMSNorm(c.dim, offset=0.0, dtype=dtype)
        self.mixer = Mixer(c, rngs=rngs, dtype=dtype)


class Mamba(nnx.Module):
    def __init__(self, config: MambaConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        c = self.config = config
        self.embed = Embed(c.vocab_size, c.dim, rngs=rngs, dtype=dtype)
        self.layers = layer_list([Block(c, rngs=rngs, dtype=dtype) for _ in range(c.n_layers)])
        self.final_norm = RMSNorm(c.dim, offset=0.0, dtype=dtype)
        if not c.tie_embeddings:
            self.lm_head = Linear(c.dim, c.vocab_size, rngs=rngs, dtype=dtype)

    def __call__(self, tokens, positions=None, cache=None, **kw):
        params = nnx.to_pure_dict(nnx.state(self, nnx.Param))
        return forward(params, tokens, positions, cache, config=self.config, **kw)


def init_params(config: MambaConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    return init_pure_params(Mamba, config, key, dtype)


# ----------------------------------------------------------------------------- cache
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MambaCache:
    """Per layer: conv [B, k-1, di] (the last k-1 conv inputs) and ssm [B, di, N] fp32."""

    conv: list
    ssm: list
    lengths: jax.Array  # int32 [B]: tokens consumed

    @property
    def batch(self) -> int:
        return self.lengths.shape[0]

    def rollback(self, lengths):
        raise FlashitError("a Mamba cache cannot roll back: its state is a summary of every token consumed; "
                           "keep a copy of the cache from before the tokens you may reject")

    def nbytes_per_sequence(self) -> int:
        return sum(a[0].size * a.dtype.itemsize for a in (*self.conv, *self.ssm))


def init_cache(config: MambaConfig, batch: int, max_len: int, dtype=jnp.bfloat16, params=None) -> MambaCache:
    """Constant-size state; `max_len` is accepted for the common interface and not needed."""
    del max_len
    if params is None:
        widths = [config.d_inner] * config.n_layers
    else:
        widths = [nn.weight_shape(params["layers"][i]["mixer"]["in_x"]["w"])[-1] for i in range(len(params["layers"]))]
    k = config.d_conv
    return MambaCache(conv=[jnp.zeros((batch, k - 1, w), dtype) for w in widths],
                      ssm=[jnp.zeros((batch, w, config.d_state), jnp.float32) for w in widths],
                      lengths=jnp.zeros((batch,), jnp.int32))


# ----------------------------------------------------------------------------- forward pass
def _proj(p: dict, x, tap: dict | None, path: str):
    if tap is not None:
        tap[path] = x
    return nn.linear(x, p["w"], p.get("b"))


def causal_conv(x, kernel, bias, prev=None):
    """Depthwise causal conv: y_t = sum_j kernel[j] * x_{t-k+1+j} (+ bias).

    x [B, T, C]; kernel [k, C]; prev [B, k-1, C]: the inputs before x (zeros when None).
    Returns (y [B, T, C], the padded input [B, k-1+T, C]).
    """
    b, t, ch = x.shape
    k = kernel.shape[0]
    if prev is None:
        prev = jnp.zeros((b, k - 1, ch), x.dtype)
    xp = jnp.concatenate([prev.astype(x.dtype), x], axis=1)
    w = kernel.astype(jnp.float32)
    y = sum(xp[:, j:j + t].astype(jnp.float32) * w[j] for j in range(k))
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(x.dtype), xp


def _last_inputs(xp, k: int, seq_lengths):
    """The k-1 conv inputs before the next token: xp[:, len : len + k-1] per row."""
    if k == 1:
        return xp[:, :0]
    if seq_lengths is None:
        return xp[:, xp.shape[1] - (k - 1):]
    idx = seq_lengths[:, None] + jnp.arange(k - 1, dtype=jnp.int32)[None, :]
    return jnp.take_along_axis(xp, idx[:, :, None], axis=1)


def _mixer(p, h, c: MambaConfig, tap, pre, *, conv_prev=None, ssm_prev=None, valid=None, seq_lengths=None,
           scan_impl="auto", decode=False):
    """Returns (output [B, T, d], new conv state or None, new ssm state or None)."""
    n, r = c.d_state, c.dt_rank
    x = _proj(p["in_x"], h, tap, pre + "in_x")
    z = _proj(p["in_z"], h, tap, pre + "in_z")
    conv = p["conv"]
    x, xp = causal_conv(x, conv["kernel"], conv.get("bias"), conv_prev)
    x = jax.nn.silu(x)
    dbc = _proj(p["x_proj"], x, tap, pre + "x_proj")
    dt = _proj(p["dt_proj"], dbc[..., :r], tap, pre + "dt_proj")
    dt = jax.nn.softplus(dt.astype(jnp.float32))
    if valid is not None:  # right padding: Δ = 0 freezes the state past each row's length
        dt = jnp.where(valid[..., None], dt, 0.0)
    Bm, Cm = dbc[..., r:r + n], dbc[..., r + n:]
    A = -jnp.exp(p["A_log"].astype(jnp.float32))
    D = p["D"].astype(jnp.float32)
    new_conv = new_ssm = None
    if decode:
        y, new_ssm = ssm_step(ssm_prev, x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D)
        y = y[:, None]
    elif ssm_prev is not None:
        y, new_ssm = selective_scan(x, dt, A, Bm, Cm, D, initial_state=ssm_prev, return_final_state=True,
                                    impl=scan_impl)
    else:
        y = selective_scan(x, dt, A, Bm, Cm, D, impl=scan_impl)
    if conv_prev is not None:
        new_conv = _last_inputs(xp, c.d_conv, seq_lengths).astype(conv_prev.dtype)
    y = y * jax.nn.silu(z)
    return _proj(p["out_proj"], y, tap, pre + "out_proj"), new_conv, new_ssm


def forward(params, tokens, positions=None, cache: MambaCache | None = None, *, config: MambaConfig, collect=(),
            segment_ids=None, logits_at=None, seq_lengths=None, attn_impl: str = "auto", dtype=None,
            scan_impl: str = "auto"):
    """Logits for `tokens` [B, T] (the family contract of models/__init__.py).

    positions and attn_impl are accepted for the common signature and unused (no attention).
    cache: a MambaCache; T tokens continue from its state (T == 1 takes the recurrent step).
    seq_lengths int32 [B]: right-padded rows; the state is frozen past seq_lengths[b].
    scan_impl: `kernels.ssm_scan.selective_scan` impl ("auto": the Pallas kernel on GPU/TPU).
    Returns (fp32 logits, new cache or None, aux).
    """
    del positions, attn_impl
    c = config
    if segment_ids is not None:
        raise FlashitError("Mamba does not support segment_ids (packed sequences would leak state across "
                           "documents); pass one document per row")
    t = tokens.shape[1]
    collect = set(collect)
    tap = {} if "inputs" in collect else None
    x = nn.embed(tokens, params["embed"]["w"], dtype)
    cdtype = x.dtype
    resid = x.astype(jnp.float32) if c.residual_in_fp32 else x
    valid = None
    if seq_lengths is not None:
        valid = jnp.arange(t, dtype=jnp.int32)[None, :] < seq_lengths[:, None]
    decode = cache is not None and t == 1
    hidden, convs, ssms = [], [], []
    layers = params["layers"]
    for i in range(len(layers)):
        lp = layers[i]
        h = nn.rms_norm(resid.astype(cdtype), lp["norm"]["scale"], c.norm_eps)
        out, conv_s, ssm_s = _mixer(
            lp["mixer"], h, c, tap, f"layers/{i}/mixer/",
            conv_prev=None if cache is None else cache.conv[i], ssm_prev=None if cache is None else cache.ssm[i],
            valid=valid, seq_lengths=seq_lengths, scan_impl=scan_impl, decode=decode)
        resid = resid + out.astype(resid.dtype)
        convs.append(conv_s), ssms.append(ssm_s)
        if "hidden" in collect:
            hidden.append(resid)
    logits = output_logits(params, resid.astype(cdtype), c, tap, logits_at)
    aux = {}
    if "hidden" in collect:
        aux["hidden"] = hidden
    if tap is not None:
        aux["inputs"] = tap
    new_cache = None
    if cache is not None:
        new_cache = MambaCache(conv=convs, ssm=ssms,
                               lengths=cache.lengths + (t if seq_lengths is None else seq_lengths))
    return logits, new_cache, aux


# ----------------------------------------------------------------------------- multi-head mixer (Mamba-2 layout)
@dataclasses.dataclass(frozen=True)
class MultiHeadConfig:
    """An SSM mixer laid out like grouped-query attention, to be initialised from one.

    H heads of P channels; x and B are shared by the H/G heads of a group (like V and K),
    C is per head (like Q); A and Δ are one scalar per head. Attention weights map onto it
    as x <- W_V, B <- W_K, C <- W_Q, out <- W_O (`from_attention`).
    """

    dim: int
    n_heads: int  # H
    n_groups: int  # G
    head_dim: int  # P
    d_state: int  # N (head_dim of the attention it replaces)
    d_conv: int = 4
    gate: bool = True  # y * silu(z) before out (Mamba); False: no z projection
    conv_act: str = "silu"  # after the conv (Mamba); "identity" keeps x, B, C linear in the input
    bias: bool = False  # biases on x, B, C (from an attention with q/k/v biases, Qwen2)
    norm: bool = False  # Mamba-2's RMSNorm per head of (y * silu(z)) before out (scale-free output)
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.n_heads % self.n_groups:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_groups ({self.n_groups})")
        if self.d_conv < 1:
            raise ValueError(f"conv width d_conv must be >= 1, got {self.d_conv}")
        if self.conv_act not in ("silu", "identity"):
            raise ValueError(f"conv_act must be 'silu' or 'identity', got {self.conv_act!r}")

    @property
    def conv_channels(self) -> int:  # conv over [x | B | C] as in Mamba-2
        return self.n_groups * (self.head_dim + self.d_state) + self.n_heads * self.d_state


class MultiHeadMixer(nnx.Module):
    def __init__(self, c: MultiHeadConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        h, g, p, n = c.n_heads, c.n_groups, c.head_dim, c.d_state
        self.x = Linear(c.dim, g * p, bias=c.bias, rngs=rngs, dtype=dtype)
        self.B = Linear(c.dim, g * n, bias=c.bias, rngs=rngs, dtype=dtype)
        self.C = Linear(c.dim, h * n, bias=c.bias, rngs=rngs, dtype=dtype)
        if c.gate:
            self.z = Linear(c.dim, h * p, rngs=rngs, dtype=dtype)
        self.dt = Linear(c.dim, h, bias=True, rngs=rngs, dtype=dtype)
        self.conv = Conv(c.d_conv, c.conv_channels, bias=True, rngs=rngs, dtype=dtype)
        self.A_log = nnx.Param(jnp.log(jnp.arange(1, h + 1, dtype=jnp.float32)).astype(dtype))
        self.D = nnx.Param(jnp.ones((h,), dtype))
        if c.norm:
            self.norm = RMSNorm(h * p, offset=0.0, dtype=dtype)
        self.out = Linear(h * p, c.dim, rngs=rngs, dtype=dtype)


def init_multihead(c: MultiHeadConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    return jax.jit(lambda k: nnx.to_pure_dict(nnx.state(MultiHeadMixer(c, rngs=nnx.Rngs(k), dtype=dtype),
                                                        nnx.Param)))(key)


def from_attention(attn: dict, c: MultiHeadConfig, key: jax.Array, *, dt: float = 0.01, decay: float = 1.0) -> dict:
    """Mixer params from Llama attention params {q, k, v, o}/w (heads and groups must match c).

    The conv starts as the identity (last tap 1), Δ = `dt` everywhere and A = -`decay`, so the
    initial mixer is gated linear attention with a slow exponential decay; z is random (as Mamba's).
    """
    p = init_multihead(c, key, jax.tree.leaves(attn["q"])[0].dtype)
    if c.bias != ("b" in attn["q"]):
        raise FlashitError(f"from_attention: the attention {'has' if 'b' in attn['q'] else 'has no'} q/k/v biases "
                           f"but the mixer config says bias={c.bias}")
    for ours, theirs in (("x", "v"), ("B", "k"), ("C", "q"), ("out", "o")):
        want, got = nn.weight_shape(p[ours]["w"]), nn.weight_shape(attn[theirs]["w"])
        if want != got:
            raise FlashitError(f"from_attention: {theirs}/w is {got} but the mixer's {ours}/w needs {want}")
        p[ours] = dict(attn[theirs])
    kern = jnp.zeros_like(p["conv"]["kernel"])
    p["conv"] = {"kernel": kern.at[-1].set(1), "bias": jnp.zeros_like(p["conv"]["bias"])}
    p["dt"]["w"] = jnp.zeros_like(p["dt"]["w"])
    p["dt"]["b"] = jnp.full_like(p["dt"]["b"], math.log(math.expm1(dt)))
    p["A_log"] = jnp.full_like(p["A_log"], math.log(decay))
    return p


def multihead_mixer(p: dict, h, c: MultiHeadConfig, *, conv_prev=None, ssm_prev=None, seq_lengths=None,
                    scan_impl: str = "auto", tap=None, pre: str = ""):
    """h [B, T, d] -> (out [B, T, d], new conv state, new ssm state [B, H, P, N]).

    With conv_prev [B, k-1, conv_channels] and ssm_prev the mixer continues a sequence (decoding);
    seq_lengths freezes the state past each right-padded row's length, as in `forward`.
    """
    b, t, _ = h.shape
    H, G, P, N = c.n_heads, c.n_groups, c.head_dim, c.d_state
    xbc = jnp.concatenate([_proj(p[k], h, tap, pre + k) for k in ("x", "B", "C")], axis=-1)
    xbc, xp = causal_conv(xbc, p["conv"]["kernel"], p["conv"].get("bias"), conv_prev)
    if c.conv_act == "silu":
        xbc = jax.nn.silu(xbc)
    xs, Bm, Cm = jnp.split(xbc, [G * P, G * (P + N)], axis=-1)
    rep = H // G
    xs = jnp.repeat(xs.reshape(b, t, G, P), rep, axis=2)
    Bm = jnp.repeat(Bm.reshape(b, t, G, N), rep, axis=2)  # C is per head, so B goes per head too
    Cm = Cm.reshape(b, t, H, N)
    dt = jax.nn.softplus(_proj(p["dt"], h, tap, pre + "dt").astype(jnp.float32))
    if seq_lengths is not None:
        dt = jnp.where((jnp.arange(t, dtype=jnp.int32)[None, :] < seq_lengths[:, None])[..., None], dt, 0.0)
    A = -jnp.exp(p["A_log"].astype(jnp.float32))
    D = p["D"].astype(jnp.float32)
    new_conv = new_ssm = None
    if ssm_prev is not None and t == 1:
        y, new_ssm = ssm_step(ssm_prev, xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D)
        y = y[:, None]
    elif ssm_prev is not None:
        y, new_ssm = selective_scan(xs, dt, A, Bm, Cm, D, initial_state=ssm_prev, return_final_state=True,
                                    impl=scan_impl)
    else:
        y = selective_scan(xs, dt, A, Bm, Cm, D, impl=scan_impl)
    if conv_prev is not None:
        new_conv = _last_inputs(xp, c.d_conv, seq_lengths).astype(conv_prev.dtype)
    y = y.reshape(b, t, H * P)
    if c.gate:
        y = y * jax.nn.silu(_proj(p["z"], h, tap, pre + "z"))
    if c.norm:  # per head, as Mamba-2's grouped RMSNorm: each head's output scale is learned, not summed up
        y = nn.rms_norm(y.reshape(b, t, H, P), p["norm"]["scale"].reshape(H, P), c.norm_eps).reshape(b, t, H * P)
    return _proj(p["out"], y, tap, pre + "out"), new_conv, new_ssm
