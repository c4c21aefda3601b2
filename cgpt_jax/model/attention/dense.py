"""`dense`: the Cerebras-GPT reference attention (multi-head, causal, f32 softmax). Logits are scaled
by `self.scale`, 1/sqrt(d_head) or 1/d_head under muP (`parameterization.attention_scale`), which every
variant built on these steps inherits.

It is written as a pipeline of small steps, the `hooks`; every other variant subclasses it and
replaces the step it changes (a variant that adds parameters of its own extends `__init__`):

    init_projections, project    Q, K, V and output weights, and x → q, k, v    (gqa)
    rotate(q, k, positions)      position transform before the cache           (rope)
    visible(q_pos, k_pos)        which keys a query sees                       (sliding_window)
    score_bias(q_pos, k_pos)     additive logit bias                           (alibi)
    mix(q, k, v, q_pos, k_pos)   the softmax core                              (blockwise, fused)

Steps address tokens by position, so the same hooks serve training (positions 0..L-1) and decoding
(new tokens at start_B + 0..T-1 against a cache whose slot s holds position s).

A variant whose attention is plain causal softmax (dense's `visible` and `score_bias`, a `mix` declared
`@softmax_core`) runs inference through the CPU kernels where they apply: a prefill's causal core
(`causal_attention_on_cpu`) and a decode step's attention over the cache (`_attends_cache_on_cpu`;
docs/attention.md).
"""
from __future__ import annotations

import functools
import itertools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from cgpt_jax.kernels import build as kernel_build, cpu_attention
from cgpt_jax.model import parameterization
from cgpt_jax.model.attention import register
from cgpt_jax.model.attention.base import Attention, Cache, CacheSpec, attend, softmax_core, write_cache
from cgpt_jax.model.layers import bias_param, project, weight_param
from cgpt_jax.parallel.sharding import constrain, fits_shards, map_shards, mesh_axes

# Queries (and the causal kernel's keys and values) as the CPU kernels run them, per shard of batch and
# heads; the length stays whole on each device, since a query needs every earlier key.
QUERY_AXES = ("batch", None, "act_heads", None)
POSITION_AXES = ("batch", None)


@functools.cache
def _cpu_kernels_loaded() -> bool:
    return kernel_build.loads(cpu_attention.load, "attention runs through XLA on CPU")


def causal_attention_on_cpu(q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array,
                            scale: float) -> jax.Array | None:
    """Plain causal softmax self-attention over positions 0..L-1 through the CPU kernel, per shard of batch
    and heads (differentiable), or None where it does not apply: not CPU float32 with one key/value head
    per query head, a mesh that does not divide batch or heads, or no kernel (no C++ compiler)."""
    if not (cpu_attention.applies(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK) and fits_shards(q_BxLxHxK.shape, QUERY_AXES)
            and _cpu_kernels_loaded()):
        return None
    kernel = functools.partial(cpu_attention.causal_attention, scale=scale)
    return map_shards(kernel, (QUERY_AXES,) * 3, QUERY_AXES)(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)


@register("dense")
class DenseAttention(Attention):
    hooks: ClassVar[tuple[str, ...]] = ("init_projections", "project", "params_from_dense", "rotate", "visible",
                                        "score_bias", "mix", "__call__", "extend", "prefill", "cache_layout")

    CAUSAL_QUERY_CHUNKS: ClassVar[int] = 4  # see causal_mix

    def __init__(self, cfg, *, rngs: nnx.Rngs, **options: Any):
        self.n_heads = cfg.n_heads
        self.kv_heads = cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        self.scale = parameterization.attention_scale(cfg)  # 1/√d_head (SP) or 1/d_head (muP)
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        for name, value in options.items():  # a variant's options override the defaults above
            setattr(self, name, value)
        self.init_projections(cfg, rngs)

    @classmethod
    def dense_equal_options(cls, model_cfg, seq_len: int) -> dict[str, Any] | None:
        # A subclass changes the computation unless it says where it does not (gqa, blockwise, ...).
        return {} if cls is DenseAttention else None

    # --- steps -----------------------------------------------------------------------------------

    def init_projections(self, cfg, rngs: nnx.Rngs) -> None:
        d, h, k = cfg.d_model, self.n_heads, self.head_dim
        param_dtype = jnp.dtype(cfg.param_dtype)
        # Q, K and V in one kernel: the same layout as GPT-2's c_attn (d → [q | k | v]).
        self.qkv_kernel = weight_param(rngs, cfg, "attn_input", (d, 3, h, k), ("embed", None, "heads", "head_dim"))
        self.qkv_bias = bias_param((3, h, k), (None, "heads", "head_dim"), param_dtype)
        self.out_kernel = weight_param(rngs, cfg, "attn_output", (h, k, d), ("heads", "head_dim", "embed"))
        self.out_bias = bias_param((d,), ("embed",), param_dtype)

    def project(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x → q [B, T, H, K], k and v [B, T, G, K] (G = kv_heads)."""
        dt = self.compute_dtype
        batch, length, _ = x_BxTxD.shape
        qkv_BxTx3HK = project(x_BxTxD, self.qkv_kernel, dt) + self.qkv_bias[...].astype(dt).reshape(-1)
        qkv_BxTx3xHxK = qkv_BxTx3HK.reshape(batch, length, 3, self.n_heads, self.head_dim)
        q, k, v = (constrain(qkv_BxTx3xHxK[:, :, i], ("batch", "length", "act_heads", None)) for i in range(3))
        return q, k, v

    def params_from_dense(self, dense: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """This variant's parameters from a dense layer's ({name: array}; leading axes allowed)."""
        return dict(dense)

    def rotate(self, q_BxTxHxK: jax.Array, k_BxTxGxK: jax.Array,
               positions_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
        return q_BxTxHxK, k_BxTxGxK

    def visible(self, q_pos_BxT: jax.Array, k_pos_S: jax.Array) -> jax.Array:
        """Causal: query at position p sees keys at positions <= p. [B, T, S] bool (B may be 1)."""
        return k_pos_S[None, None, :] <= q_pos_BxT[:, :, None]

    def score_bias(self, q_pos_BxT: jax.Array, k_pos_S: jax.Array) -> jax.Array | None:
        """Additive logit bias [B, H, T, S] (B, H may be 1), or None."""
        return None

    @softmax_core
    def mix(self, q_BxTxHxK: jax.Array, k_BxSxGxK: jax.Array, v_BxSxGxK: jax.Array,
            q_pos_BxT: jax.Array | None, k_pos_S: jax.Array | None) -> jax.Array:
        """Attention of q over k, v → [B, T, H, K]. Positions None: self-attention over 0..L-1
        (training), which a core may treat as plain causal attention."""
        if q_pos_BxT is None and type(self).visible is DenseAttention.visible:
            return self.causal_mix(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK)
        if q_pos_BxT is None:
            q_pos_BxT, k_pos_S = jnp.arange(q_BxTxHxK.shape[1])[None], jnp.arange(k_BxSxGxK.shape[1])
        return attend(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, self.visible(q_pos_BxT, k_pos_S),
                      self.score_bias(q_pos_BxT, k_pos_S), self.scale)

    def causal_mix(self, q_BxLxHxK: jax.Array, k_BxLxGxK: jax.Array, v_BxLxGxK: jax.Array) -> jax.Array:
        """Causal self-attention over 0..L-1 in CAUSAL_QUERY_CHUNKS chunks of queries, each reading only the
        keys up to its last query: the keys after it are invisible anyway, so the result is the same, and
        about (n+1)/2n of the logits are computed (62.5% for 4 chunks). Measured on the CPU ladder (d64,
        seq 128), the step is 20% faster than one [L, L] block."""
        length = q_BxLxHxK.shape[1]
        n = min(self.CAUSAL_QUERY_CHUNKS, length)
        bounds = [length * i // n for i in range(n + 1)]
        outputs = []
        for start, end in itertools.pairwise(bounds):
            q_pos_1xC, k_pos_E = jnp.arange(start, end)[None], jnp.arange(end)
            outputs.append(attend(q_BxLxHxK[:, start:end], k_BxLxGxK[:, :end], v_BxLxGxK[:, :end],
                                  self.visible(q_pos_1xC, k_pos_E), self.score_bias(q_pos_1xC, k_pos_E),
                                  self.scale))
        return jnp.concatenate(outputs, axis=1)

    def output(self, y_BxTxHxK: jax.Array) -> jax.Array:
        dt = self.compute_dtype
        batch, length, heads, head_dim = y_BxTxHxK.shape
        y_BxTxD = project(y_BxTxHxK.reshape(batch, length, heads * head_dim), self.out_kernel, dt)
        return y_BxTxD + self.out_bias[...].astype(dt)

    # --- the interface ---------------------------------------------------------------------------

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        q, k, v = self.project(x_BxLxD)
        q, k = self.rotate(q, k, jnp.arange(x_BxLxD.shape[1])[None])
        return self.output(self.mix(q, k, v, None, None))

    def cache_layout(self, batch_size: int, max_len: int) -> dict[str, CacheSpec]:
        # Head-major, [B, G, S, K]: each (sequence, head)'s keys are contiguous, the layout of the batched
        # score and value products, so a decode step reads the cache where it lies instead of a transposed
        # copy. A single KV head cannot be split over a tensor axis; it stays replicated.
        axes = ("batch", "kv_heads" if self.kv_heads > 1 else None, "length", "head_dim")
        spec = CacheSpec((batch_size, self.kv_heads, max_len, self.head_dim), self.compute_dtype, axes)
        return {"k": spec, "v": spec}

    def extend(self, x_BxTxD: jax.Array, cache: Cache, start_B: jax.Array) -> tuple[jax.Array, Cache]:
        batch, length, _ = x_BxTxD.shape
        max_len = cache["k"].shape[2]
        if length > max_len:
            raise ValueError(f"extend: {length} new tokens do not fit a cache of {max_len} positions")
        q_pos_BxT = start_B[:, None] + jnp.arange(length)
        q, k, v = self.project(x_BxTxD)
        q, k = self.rotate(q, k, q_pos_BxT)
        layout = self.cache_layout(batch, max_len)
        cache = {"k": constrain(write_cache(cache["k"], k, start_B), layout["k"].logical_axes),
                 "v": constrain(write_cache(cache["v"], v, start_B), layout["v"].logical_axes)}
        if self._attends_cache_on_cpu(q, cache):
            y = self._attend_cache_on_cpu(q, cache["k"], cache["v"], q_pos_BxT)
        else:
            y = self._attend_cache(q, cache["k"], cache["v"], q_pos_BxT)
        return self.output(y), cache

    def _attend_cache(self, q_BxTxHxK: jax.Array, k_BxGxSxK: jax.Array, v_BxGxSxK: jax.Array,
                      q_pos_BxT: jax.Array) -> jax.Array:
        """The queries over the whole cache, through the variant's own steps."""
        k_BxSxGxK, v_BxSxGxK = jnp.swapaxes(k_BxGxSxK, 1, 2), jnp.swapaxes(v_BxGxSxK, 1, 2)
        return self.mix(q_BxTxHxK, k_BxSxGxK, v_BxSxGxK, q_pos_BxT, jnp.arange(k_BxGxSxK.shape[2]))

    def _attend_cache_on_cpu(self, q_BxTxHxK: jax.Array, k_BxGxSxK: jax.Array, v_BxGxSxK: jax.Array,
                             q_pos_BxT: jax.Array) -> jax.Array:
        """`_attend_cache` through the CPU kernel, with `_attend_cache`'s gradient (a prefix or prompt being
        trained attends over a cache); reverse mode only (a custom VJP)."""
        cache_axes = self._cache_kernel_axes()
        kernel = functools.partial(cpu_attention.cached_attention, scale=self.scale)
        kernel = map_shards(kernel, (QUERY_AXES, cache_axes, cache_axes, POSITION_AXES), QUERY_AXES)

        @jax.custom_vjp
        def attend_cache(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, q_pos_BxT):
            return kernel(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, q_pos_BxT)

        def forward(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, q_pos_BxT):
            residuals = (q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, q_pos_BxT)
            return attend_cache(*residuals), residuals

        def backward(residuals, dy_BxTxHxK):
            *floats, q_pos_BxT = residuals
            _, pullback = jax.vjp(lambda q_BxTxHxK, k_BxGxSxK, v_BxGxSxK: self._attend_cache(
                q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, q_pos_BxT), *floats)
            return (*pullback(dy_BxTxHxK), None)  # positions are integers: no cotangent

        attend_cache.defvjp(forward, backward)
        return attend_cache(q_BxTxHxK, k_BxGxSxK, v_BxGxSxK, q_pos_BxT)

    def _cache_kernel_axes(self) -> tuple[str | None, ...]:
        return ("batch", "kv_heads" if self.kv_heads > 1 else None, None, None)

    def _attends_cache_on_cpu(self, q_BxTxHxK: jax.Array, cache: Cache) -> bool:
        """Whether `extend` attends over the cache through the CPU kernel, which reads each query's keys up to
        its position only: the variant's attention is plain causal softmax (`visible` and `score_bias` as
        here, a `softmax_core` mix), on the kernel's domain (a decode step's few queries, float32) and a
        mesh that divides it as the kernel runs: query and cache heads split alike (so that each shard's
        query heads read its own cache heads), the cache's length whole (or it would be gathered)."""
        # One name at a time: a spec names each mesh axis once, so the second use of 'tensor' would read None.
        heads, kv_heads, length = (mesh_axes((name,)) for name in ("act_heads", "kv_heads", "length"))
        return (self._plain_causal_softmax() and cpu_attention.applies_cached(q_BxTxHxK, cache["k"], cache["v"])
                and (heads is None or (length[0] is None and (self.kv_heads == 1 or heads == kv_heads)))
                and fits_shards(q_BxTxHxK.shape, QUERY_AXES)
                and fits_shards(cache["k"].shape, self._cache_kernel_axes()) and _cpu_kernels_loaded())

    @classmethod
    def _plain_causal_softmax(cls) -> bool:
        """Whether the variant's attention is plain causal softmax: dense's `visible` and `score_bias`, a
        `softmax_core` mix, so that the CPU kernels compute it."""
        return (getattr(cls.mix, "softmax_core", False) and cls.visible is DenseAttention.visible
                and cls.score_bias is DenseAttention.score_bias)

    def decode_rows(self, cache_len: int) -> int:
        # One row where the step attends through the CPU kernel, which reads the cache where it lies (call
        # under the mesh's activation-sharding rules, as the step is traced).
        q = jax.ShapeDtypeStruct((1, 1, self.n_heads, self.head_dim), self.compute_dtype)
        cache = {name: jax.ShapeDtypeStruct(spec.shape, spec.dtype)
                 for name, spec in self.cache_layout(1, cache_len).items()}
        return 1 if self._attends_cache_on_cpu(q, cache) else super().decode_rows(cache_len)

    def prefill(self, x_BxTxD: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        # The cache is empty, so the new tokens see only each other: a causal core over T keys (the CPU
        # kernel where it applies, else the variant's training-pass core) instead of a masked pass over the
        # whole cache.
        batch, length, _ = x_BxTxD.shape
        q, k, v = self.project(x_BxTxD)
        q, k = self.rotate(q, k, jnp.arange(length)[None])
        layout = self.cache_layout(batch, cache["k"].shape[2])
        cache = {"k": constrain(write_cache(cache["k"], k, 0), layout["k"].logical_axes),
                 "v": constrain(write_cache(cache["v"], v, 0), layout["v"].logical_axes)}
        y = causal_attention_on_cpu(q, k, v, self.scale) if self._plain_causal_softmax() else None
        return self.output(self.mix(q, k, v, None, None) if y is None else y), cache
