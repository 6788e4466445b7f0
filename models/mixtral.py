"""Mixtral: the Llama decoder with a dropless top-k mixture of SwiGLU experts as its MLP.

Attention, norms, rotary embeddings, the KV cache and the decoder loop are Llama's
(models.llama); only the feed-forward block differs:

    probs = softmax(h @ router)                      # fp32, [tokens, experts]
    w, e = top_k(probs); w /= sum(w)                 # Mixtral renormalises the k weights
    rows = tokens repeated k times, sorted by expert  # no capacity factor, nothing dropped
    y = grouped_matmul(silu(rows @ gate_e) * (rows @ up_e), down_e)   # one matmul per expert group
    out = sum_k w_k * y[unsort]

A batch-1 decoding step reads only the k chosen experts' weights: our Pallas grouped matmul
never touches an expert that got no rows; with XLA's ragged_dot (CPU) and few rows (rows <=
experts) the chosen experts' matrices are gathered instead. Under a mesh with an `expert`
axis (`jax.set_mesh`), each device runs its own experts' groups and the partial outputs are
summed (expert parallelism). `aux["aux_loss"]` is the load-balancing loss of HF transformers.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from flashit_jax import nn
from flashit_jax.errors import FlashitError
from flashit_jax.nn.rope import RopeScaling
from kernels import under_split_mesh
from kernels.grouped_matmul.api import default_impl, grouped_matmul
from models import llama
from models.common import config_from_dict, init_pure_params, layer_list
from models.configs import register_shape


@dataclasses.dataclass(frozen=True)
class MixtralConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int  # width of each expert
    n_experts: int = 8
    top_k: int = 2
    head_dim: int = 0  # 0: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: RopeScaling | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    max_position: int = 32768
    tie_embeddings: bool = False
    sliding_window: int | None = None
    router_aux_loss_coef: float = 0.001  # HF's default
    family: str = "mixtral"

    # Llama options Mixtral does not use; the shared attention and decoder code reads them.
    qkv_bias: ClassVar[bool] = False
    act: ClassVar[str] = "silu"
    norm_offset: ClassVar[float] = 0.0
    embed_scale: ClassVar[bool] = False
    attn_softcap: ClassVar[float | None] = None
    final_softcap: ClassVar[float | None] = None

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise FlashitError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.n_experts < 1 or self.top_k < 1:
            raise FlashitError(f"need at least one expert and top_k >= 1, got n_experts={self.n_experts}, "
                               f"top_k={self.top_k}")
        if self.top_k > self.n_experts:
            raise FlashitError(f"top_k ({self.top_k}) exceeds the number of experts ({self.n_experts}): each "
                               "token is routed to top_k distinct experts")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.rope_freq_factors is not None:
            d["rope_freq_factors"] = list(self.rope_freq_factors)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MixtralConfig":
        return config_from_dict(cls, d)

    @property
    def n_params(self) -> int:
        qkvo = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        moe = self.dim * self.n_experts + self.n_experts * 3 * self.dim * self.ffn_dim
        head = 0 if self.tie_embeddings else self.dim * self.vocab_size
        return self.vocab_size * self.dim + self.n_layers * (qkvo + moe + 2 * self.dim) + self.dim + head

    @property
    def n_active_params(self) -> int:
        """Parameters a token goes through (top_k experts of each layer)."""
        return self.n_params - self.n_layers * (self.n_experts - self.top_k) * 3 * self.dim * self.ffn_dim


# Logical axis names (see models.llama.PARAM_AXES); expert stacks lead with `experts`.
PARAM_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    *[(pattern, axes) for pattern, axes in llama.PARAM_AXES if "/mlp/" not in pattern],
    (r"layers/\d+/moe/router/w", ("embed", None)),
    (r"layers/\d+/moe/experts/(gate|up)/w", ("experts", "embed", "mlp")),
    (r"layers/\d+/moe/experts/down/w", ("experts", "mlp", "embed")),
]


register_shape("mixtral-8x7b", MixtralConfig(
    vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, n_experts=8, top_k=2,
    norm_eps=1e-5, rope_theta=1e6, max_position=32768))
# a small Mixtral for CPU experiments (0.14B parameters, 64M active per token)
register_shape("mixtral-mini", MixtralConfig(
    vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1024, n_experts=8, top_k=2,
    norm_eps=1e-5, rope_theta=1e6, max_position=4096))


# ----------------------------------------------------------------------------- NNX modules
class ExpertWeights(nnx.Module):
    def __init__(self, n: int, din: int, dout: int, *, rngs: nnx.Rngs, dtype):
        self.w = nnx.Param((llama._INIT_STD * jax.random.normal(rngs.params(), (n, din, dout), jnp.float32)
                            ).astype(dtype))


class Experts(nnx.Module):
    def __init__(self, c: MixtralConfig, *, rngs: nnx.Rngs, dtype):
        self.gate = ExpertWeights(c.n_experts, c.dim, c.ffn_dim, rngs=rngs, dtype=dtype)
        self.up = ExpertWeights(c.n_experts, c.dim, c.ffn_dim, rngs=rngs, dtype=dtype)
        self.down = ExpertWeights(c.n_experts, c.ffn_dim, c.dim, rngs=rngs, dtype=dtype)


class MoE(nnx.Module):
    def __init__(self, c: MixtralConfig, *, rngs: nnx.Rngs, dtype):
        self.router = llama.Linear(c.dim, c.n_experts, rngs=rngs, dtype=dtype)
        self.experts = Experts(c, rngs=rngs, dtype=dtype)


class Block(nnx.Module):
    def __init__(self, c: MixtralConfig, *, rngs: nnx.Rngs, dtype):
        self.attn_norm = llama.RMSNorm(c.dim, offset=c.norm_offset, dtype=dtype)
        self.attn = llama.Attention(c, rngs=rngs, dtype=dtype)
        self.mlp_norm = llama.RMSNorm(c.dim, offset=c.norm_offset, dtype=dtype)
        self.moe = MoE(c, rngs=rngs, dtype=dtype)


class Mixtral(nnx.Module):
    def __init__(self, config: MixtralConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        c = self.config = config
        self.embed = llama.Embed(c.vocab_size, c.dim, rngs=rngs, dtype=dtype)
        self.layers = layer_list([Block(c, rngs=rngs, dtype=dtype) for _ in range(c.n_layers)])
        self.final_norm = llama.RMSNorm(c.dim, offset=c.norm_offset, dtype=dtype)
        if not c.tie_embeddings:
            self.lm_head = llama.Linear(c.dim, c.vocab_size, rngs=rngs, dtype=dtype)


def init_params(config: MixtralConfig, key: jax.Array, dtype=jnp.float32) -> dict:
    return init_pure_params(Mixtral, config, key, dtype)


def init_cache(config: MixtralConfig, batch: int, max_len: int, dtype=jnp.bfloat16, params=None) -> nn.KVCache:
    return llama.init_cache(config, batch, max_len, dtype, params)


# ----------------------------------------------------------------------------- the MoE block
def route(router_logits: jax.Array, top_k: int):
    """(weights fp32 [N, k] renormalised over the k, expert ids int32 [N, k]) as Mixtral routes."""
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
    top_p, top_i = jax.lax.top_k(probs, top_k)
    return top_p / jnp.sum(top_p, axis=-1, keepdims=True), top_i.astype(jnp.int32)


def _swiglu_experts(x, gate, up, down, group_sizes, impl, interpret: bool):
    """Rows of x sorted by expert (group_sizes) through their experts' SwiGLU MLPs. `impl`: a
    kernels.grouped_matmul implementation name, or a callable (lhs, rhs, group_sizes) -> out."""
    mm = impl if callable(impl) else functools.partial(grouped_matmul, impl=impl, interpret=interpret)
    a = jax.nn.silu(mm(x, gate, group_sizes)) * mm(x, up, group_sizes)
    return mm(a, down, group_sizes)


def _pallas(impl, dim: int, ffn: int, dtype, interpret: bool) -> bool:
    """Whether the grouped matmul is one of our Pallas kernels: they skip experts that got no
    rows, so they read only the chosen experts even when decoding (no gather copies)."""
    if callable(impl):
        return False
    if impl == "auto":
        impl = "triton" if interpret else default_impl(dim, ffn, dtype)
    return impl in ("triton", "tpu")


# Rows (tokens x top_k) up to which a Pallas-Triton MoE layer runs the expert GEMV (kernels/gemv/experts.py:
# each row streams its expert's weights straight from the stack) instead of sort + grouped matmul.
GEMV_MAX_ROWS = 4


def _use_gemv(gemv, impl, rows: int, dtype, dim: int, ffn: int, interpret: bool) -> bool:
    if gemv is not None:
        return gemv is not False
    if callable(impl) or rows > GEMV_MAX_ROWS or jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16, jnp.float32):
        return False
    if under_split_mesh():  # the kernel has no partitioning rule: a split mesh keeps the grouped path
        return False
    return (impl == "triton" or (impl == "auto" and (interpret or default_impl(dim, ffn, dtype) == "triton")))


def expert_axis_size(n_experts: int) -> int:
    """Devices on the `expert` axis of the current mesh (1 without one); checks divisibility."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names:
        return 1
    ep = mesh.shape["expert"]
    if n_experts % ep:
        raise FlashitError(f"{n_experts} experts cannot be split evenly over the mesh's `expert` axis of size "
                           f"{ep}; use an expert axis size that divides {n_experts}")
    return ep


def _expert_parallel(x, group_sizes, gate, up, down, ep: int, impl: str, interpret: bool):
    """Each device on the `expert` axis runs the rows of its own experts; partial outputs are summed."""
    from jax.sharding import PartitionSpec as P

    n_experts = gate.shape[0]
    local = n_experts // ep

    def body(x, group_sizes, gate, up, down):
        first = jax.lax.axis_index("expert") * local
        local_sizes = jax.lax.dynamic_slice_in_dim(group_sizes, first, local)
        start = jnp.sum(jnp.where(jnp.arange(n_experts) < first, group_sizes, 0))
        # our groups start at row `start`: rotate them to row 0, where the grouped matmul wants them
        y = _swiglu_experts(jnp.roll(x, -start, axis=0), gate, up, down, local_sizes, impl, interpret)
        return jax.lax.psum(jnp.roll(y, start, axis=0), "expert")

    spec = P("expert")
    return jax.shard_map(body, in_specs=(P(), P(), spec, spec, spec), out_specs=P(), axis_names={"expert"},
                         check_vma=False)(x, group_sizes, gate, up, down)


def moe_layer(p: dict, x: jax.Array, config: MixtralConfig, *, impl: str = "auto", interpret: bool = False,
              tap: dict | None = None, pre: str = "", dispatch: bool | None = None, gemv=None):
    """Mixture-of-experts SwiGLU on x [B, T, D] -> (y [B, T, D], router logits [B*T, E]).

    gemv: run each row against its expert's weights with the expert GEMV kernel (default for up to
    GEMV_MAX_ROWS rows when the grouped matmul would be the Triton one, without an expert mesh axis);
    a kernels.gemv.Blocks runs it with those blocks (benchmarks).
    dispatch: sort rows by expert and use the grouped matmul (default when B*T*k > E or when the
    grouped matmul is a Pallas kernel), else gather the chosen experts' matrices per row."""
    c = config
    b, t, d = x.shape
    xs = x.reshape(b * t, d)
    if tap is not None:
        tap[pre + "router"] = x
    router_logits = nn.linear(xs, p["router"]["w"])
    weights, experts = route(router_logits, c.top_k)
    ex = p["experts"]
    gate, up, down = (ex[name]["w"] for name in ("gate", "up", "down"))
    if gate.shape[0] != c.n_experts:
        raise FlashitError(f"expert weights hold {gate.shape[0]} experts, the config says {c.n_experts}")
    rows = b * t * c.top_k
    if dispatch is None:
        dispatch = rows > c.n_experts or _pallas(impl, d, c.ffn_dim, x.dtype, interpret)
    flat = experts.reshape(-1)  # row r = token r // k, slot r % k
    if _use_gemv(gemv, impl, rows, x.dtype, d, c.ffn_dim, interpret) and expert_axis_size(c.n_experts) == 1:
        from kernels.gemv.experts import swiglu_experts

        xr = jnp.repeat(xs, c.top_k, axis=0)
        if tap is not None:
            tap[pre + "experts/gate"] = tap[pre + "experts/up"] = xr
        y = swiglu_experts(xr, gate, up, down, flat, blocks=None if isinstance(gemv, bool) else gemv,
                           interpret=interpret or jax.default_backend() == "cpu")
    elif dispatch:
        order = jnp.argsort(flat, stable=True)
        group_sizes = jnp.bincount(flat, length=c.n_experts).astype(jnp.int32)
        x_sorted = xs[order // c.top_k]
        if tap is not None:
            tap[pre + "experts/gate"] = tap[pre + "experts/up"] = x_sorted
        ep = expert_axis_size(c.n_experts)
        if ep > 1:
            y_sorted = _expert_parallel(x_sorted, group_sizes, gate, up, down, ep, impl, interpret)
        else:
            y_sorted = _swiglu_experts(x_sorted, gate, up, down, group_sizes, impl, interpret)
        inverse = jnp.zeros_like(order).at[order].set(jnp.arange(rows, dtype=order.dtype))
        y = y_sorted[inverse]
    else:
        # read only the chosen experts' matrices: [rows, D, F] gathers instead of all E experts
        xr = jnp.repeat(xs, c.top_k, axis=0)
        if tap is not None:
            tap[pre + "experts/gate"] = tap[pre + "experts/up"] = xr

        def mm(v, w):
            return jnp.einsum("rd,rdf->rf", v, jnp.take(w, flat, axis=0).astype(v.dtype),
                              preferred_element_type=jnp.float32).astype(v.dtype)

        y = mm(jax.nn.silu(mm(xr, gate)) * mm(xr, up), down)
    out = jnp.einsum("nkd,nk->nd", y.reshape(b * t, c.top_k, d).astype(jnp.float32), weights)
    return out.astype(x.dtype).reshape(b, t, d), router_logits


def load_balancing_loss(router_logits: list[jax.Array], n_experts: int, top_k: int,
                        mask: jax.Array | None = None) -> jax.Array:
    """HF transformers' Switch-style auxiliary loss over all layers' router logits [N, E]:
    E * sum_e (fraction of top-k assignments to e) * (mean router probability of e).
    `mask` [N] (1 real token, 0 padding) excludes padding as HF's attention_mask does."""
    counts = jnp.zeros((n_experts,), jnp.float32)
    prob_sum = jnp.zeros((n_experts,), jnp.float32)
    rows = jnp.float32(0.0)
    for logits in router_logits:
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        chosen = jax.nn.one_hot(jax.lax.top_k(probs, top_k)[1], n_experts, dtype=jnp.float32)  # [N, k, E]
        m = jnp.ones((probs.shape[0],), jnp.float32) if mask is None else mask.astype(jnp.float32)
        counts = counts + jnp.einsum("nke,n->e", chosen, m)
        prob_sum = prob_sum + jnp.einsum("ne,n->e", probs, m)
        rows = rows + jnp.sum(m)
    return jnp.float32(n_experts) * jnp.sum((counts / rows) * (prob_sum / rows))


# ----------------------------------------------------------------------------- forward pass
def forward(params, tokens, positions=None, cache: nn.KVCache | None = None, *, config: MixtralConfig,
            collect=(), segment_ids=None, logits_at=None, seq_lengths=None, attn_impl: str = "auto", dtype=None,
            moe_impl: str = "auto"):
    """As models.llama.forward; `aux` also holds `router_logits` (per layer, [B*T, E]) and
    `aux_loss` (load balancing, to be scaled by config.router_aux_loss_coef for training).
    moe_impl: the grouped matmul implementation (kernels.grouped_matmul.api.IMPLS)."""

    def ffn(lp, h, layer, tap, pre):
        return moe_layer(lp["moe"], h, config, impl=moe_impl, tap=tap, pre=pre + "moe/")

    logits, new_cache, aux, router_logits = llama.decoder_forward(
        params, tokens, positions, cache, config=config, ffn=ffn, collect=collect, segment_ids=segment_ids,
        logits_at=logits_at, seq_lengths=seq_lengths, attn_impl=attn_impl, dtype=dtype)
    mask = None
    if seq_lengths is not None:
        t = tokens.shape[1]
        mask = (jnp.arange(t, dtype=jnp.int32)[None, :] < seq_lengths[:, None]).reshape(-1)
    aux["router_logits"] = router_logits
    aux["aux_loss"] = load_balancing_loss(router_logits, config.n_experts, config.top_k, mask)
    return logits, new_cache, aux
