"""The Cerebras-GPT decoder: GPT-2/GPT-3 style, pre-LayerNorm, learned positions, tied LM head.

Written for one logical device. Every parameter names its logical axes and the residual stream is
constrained by logical names, so the same code runs unsharded, data parallel, FSDP or tensor parallel.
Layers are stacked with `nnx.vmap` and applied with `nnx.scan`, so compile time does not grow with depth
(`config.model.scan_layers=False` applies them unrolled: faster on CPU for a few layers).
The attention step is the plug-in selected by `config.model.attention` (cgpt_jax/model/attention/);
variants that encode positions themselves (RoPE, ALiBi) leave out the position table `wpe`.
Init stds and the forward multipliers (embeddings, logits, attention scale) follow
`config.model.parameterization`, SP or muP (cgpt_jax/model/parameterization.py).

Decoding with a KV cache (any attention variant that supports it; `Variant.check_decode` says):

    model.cache_layout(batch_size, max_len) -> {name: CacheSpec}
        Layer-stacked cache arrays, leading axis 'layers'. `spec.sharding(mesh, rules)` gives each
        array's NamedSharding (batch on data/fsdp, KV heads on tensor, with the default rules).
    model.init_cache(batch_size, max_len) -> cache
        Zeros; a dict of arrays (a pytree: pass it through jit, donate it). Sharded:
        ``jax.jit(lambda: model.init_cache(b, n), out_shardings={k: s.sharding(mesh, rules) for k, s in
        model.cache_layout(b, n).items()})()``.
    model.extend(tokens_BxT, cache, start_B) -> (logits_BxTxV, cache)
        Feeds T new tokens per sequence at positions start_B[b] .. start_B[b] + T - 1 (start_B: int32
        [B], the tokens sequence b already holds in the cache) and returns their float32 logits and
        the updated cache. Prefill: extend(prompts_BxT, init_cache(...), zeros); one decode step:
        extend(next_Bx1, cache, lengths_B). Prompts of different lengths: right-pad them to one T,
        prefill, read sequence b's next-token logits at T_b - 1, then decode with start_B = T_b; a
        sequence's padding slots are never attended to and get overwritten as it advances.
        extend's logits equal the full forward pass `model(tokens)` at the same positions.

The bandwidth-bound form of the same interface (what `cgpt_jax.infer.Generator` runs):

    model.layer_blocks() -> [Block] * n_layers
        Each layer's block with parameters of its own, copied once out of the stacked arrays: a step
        that slices the stacked arrays copies every layer's weights out of them again on each call.
    model.init_layer_caches(batch_size, max_len) -> [cache] * n_layers
        One cache per layer (`attn.cache_layout`), updated in place when donated.
    model.extend_layers(blocks, tokens_BxT, caches, start_B, prefill=False, last_rows_B=None)
            -> (hidden_BxTxD, caches)
        `extend` with the layers unrolled over those, returning the final hidden states (after ln_f);
        `model.head(hidden)` gives the logits of the rows asked for. prefill=True: the caches are
        empty and start_B is 0, so the new tokens attend only to each other, through the variant's
        training-pass core (the fused CPU kernel where it applies). last_rows_B: only one row per
        sequence is wanted (a prompt's last), so the last layer's MLP runs on that row alone.

`max_len` must not exceed `config.model.max_seq_len` with learned positions.

Virtual tokens (the general hook of PEFT methods that add keys/values or input positions: `prompt`,
`prefix`; cgpt_jax/peft/base.py). A method may put n = `model.virtual_tokens` positions before every
sequence, as HF PEFT does: they hold positions 0..n-1 and a sequence's real token i sits at position n + i.
Their keys and values in every layer are a function of the parameters alone (causal attention: they never
see the input), `model.peft.virtual_cache(model)`, so they live in the KV cache: `init_cache` and
`init_layer_caches` return caches of n + max_len slots whose first n hold them, `extend`'s start_B keeps
counting real tokens, and the full forward pass runs as `extend` of the tokens over such a cache. Callers
see real tokens only (features, logits, lengths); `model.context_len` is the room left for them.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cgpt_jax.model import attention, parameterization
from cgpt_jax.model.attention.base import Cache, CacheSpec
from cgpt_jax.model.layers import MLP, LayerNorm, take_rows, tied_logits, weight_param
from cgpt_jax.parallel.sharding import constrain

# jax.checkpoint policies selectable by config.model.remat ('none' = keep every activation).
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def padded_vocab_size(cfg: ml_collections.ConfigDict) -> int:
    m = cfg.vocab_pad_multiple
    return -(-cfg.vocab_size // m) * m


class Block(nnx.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.ln_attn = LayerNorm(cfg.d_model, cfg.layer_norm_eps, param_dtype)
        self.attn = attention.build(cfg.attention).make(cfg, rngs=rngs)
        self.ln_mlp = LayerNorm(cfg.d_model, cfg.layer_norm_eps, param_dtype)
        self.mlp = MLP(cfg, rngs=rngs)
        # A PEFT method's module on the residual branches (cgpt_jax/peft/adapter.py): branch(site, y) → y'
        # for site 'attn' or 'mlp'. Set only on the copy `GPT.active_blocks` returns; None otherwise.
        self.branch = nnx.data(None)

    def _branch(self, site: str, y_BxTxD: jax.Array) -> jax.Array:
        return y_BxTxD if self.branch is None else self.branch(site, y_BxTxD)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self._add_branches(x_BxLxD, self.attn(self.ln_attn(x_BxLxD)), None)

    def extend(self, x_BxTxD: jax.Array, cache: Cache, start_B: jax.Array, rows_B: jax.Array | None = None
               ) -> tuple[jax.Array, Cache]:
        """The same block over T new tokens, reading and updating this layer's KV cache. With rows_B (int32
        [B], each in 0..T-1) only row rows_B[b] of sequence b is returned, [B, 1, D]: the MLP runs on those
        rows alone, while every row's keys and values still go into the cache."""
        y_BxTxD, cache = self.attn.extend(self.ln_attn(x_BxTxD), cache, start_B)
        return self._add_branches(x_BxTxD, y_BxTxD, rows_B), cache

    def prefill(self, x_BxTxD: jax.Array, cache: Cache, rows_B: jax.Array | None = None) -> tuple[jax.Array, Cache]:
        """`extend` from an empty cache at positions 0..T-1."""
        y_BxTxD, cache = self.attn.prefill(self.ln_attn(x_BxTxD), cache)
        return self._add_branches(x_BxTxD, y_BxTxD, rows_B), cache

    def _add_branches(self, x_BxTxD: jax.Array, attn_BxTxD: jax.Array, rows_B: jax.Array | None) -> jax.Array:
        """x + the attention branch, then + the MLP branch: at rows_B only where given (see `extend`)."""
        x_BxTxD = constrain(x_BxTxD + self._branch("attn", attn_BxTxD), ("batch", "length", "act_embed"))
        if rows_B is not None:
            x_BxTxD = jnp.take_along_axis(x_BxTxD, rows_B[:, None, None], axis=1)
        x_BxTxD = x_BxTxD + self._branch("mlp", self.mlp(self.ln_mlp(x_BxTxD)))
        return constrain(x_BxTxD, ("batch", "length", "act_embed"))


class GPT(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.cfg = cfg
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.wte = weight_param(rngs, cfg, "embedding", (padded_vocab_size(cfg), cfg.d_model), ("vocab", "embed"))
        self.wpe = (weight_param(rngs, cfg, "embedding", (cfg.max_seq_len, cfg.d_model), ("position", "embed"))
                    if attention.build(cfg.attention).learned_positions else None)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers",
                                                                  "logical_axes": "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.ln_f = LayerNorm(cfg.d_model, cfg.layer_norm_eps, param_dtype)
        # A parameter-efficient fine-tuning method's added parameters (cgpt_jax/peft/), attached after the
        # base is built so that the base's init does not change; None for a plain model.
        self.peft = nnx.data(None)

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        """Token ids [B, L] → float32 logits [B, L, V_padded] (padding columns are -inf)."""
        return self._logits(self.features(tokens_BxL))

    @property
    def virtual_tokens(self) -> int:
        """Positions an attached PEFT method puts before every sequence (see the module docstring); 0 without."""
        return 0 if self.peft is None else self.peft.virtual_tokens

    @property
    def context_len(self) -> int:
        """Real tokens a sequence may hold: the context less the virtual tokens."""
        return self.cfg.max_seq_len - self.virtual_tokens

    def features(self, tokens_BxL: jax.Array) -> jax.Array:
        """Token ids [B, L] → the final hidden states [B, L, D] after ln_f (what heads other than the LM
        head read, e.g. a sequence classifier)."""
        x_BxLxD = self._embed(tokens_BxL, None)
        if self.virtual_tokens:
            # The virtual tokens' keys and values are a cache's first slots: the tokens extend it.
            batch, length = tokens_BxL.shape
            x_BxLxD, _ = self._run_cached(x_BxLxD, self.init_cache(batch, length),
                                          jnp.full((batch,), self.virtual_tokens, jnp.int32))
            return self.ln_f(x_BxLxD)

        def apply_block(x_BxLxD: jax.Array, block: Block) -> jax.Array:
            return block(x_BxLxD)

        if self.cfg.remat != "none":
            apply_block = nnx.remat(apply_block, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        if self.cfg.scan_layers:
            x_BxLxD = nnx.scan(apply_block, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                               transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"},
                               )(x_BxLxD, self.active_blocks())
        else:
            # Unrolled: each layer's slice of the stacked parameters, applied in turn. No loop-carried
            # buffers, so on backends where a scan's stacked activations cost copies (CPU) it is faster,
            # at a compile time that grows with depth.
            graphdef, stacked = nnx.split(self.active_blocks())
            for layer in range(self.cfg.n_layers):
                block = nnx.merge(graphdef, jax.tree.map(lambda p: p[layer], stacked))
                x_BxLxD = apply_block(x_BxLxD, block)
        return self.ln_f(x_BxLxD)

    def active_blocks(self) -> Block:
        """The layer stack every forward pass runs: `blocks`, with an attached PEFT method's weight
        changes applied (LoRA's W + s·AB, computed on the fly; `cgpt_jax.peft.merge` makes them permanent)."""
        return self.blocks if self.peft is None else self.peft.adapt_blocks(self.blocks)

    def cache_layout(self, batch_size: int, max_len: int) -> dict[str, CacheSpec]:
        """The decode cache of all layers for `max_len` real tokens (plus the virtual tokens' slots): each
        layer's arrays stacked on a leading 'layers' axis."""
        attention.build(self.cfg.attention).check_decode()
        slots = self.virtual_tokens + max_len
        if self.wpe is not None and slots > self.cfg.max_seq_len:
            virtual = f" after {self.virtual_tokens} virtual tokens" if self.virtual_tokens else ""
            raise ValueError(f"a cache of {max_len} positions{virtual} is longer than the position table "
                             f"model.max_seq_len={self.cfg.max_seq_len}")
        return self._stacked_layout(batch_size, slots)

    def _stacked_layout(self, batch_size: int, slots: int) -> dict[str, CacheSpec]:
        layer = self.blocks.attn.cache_layout(batch_size, slots)
        return {name: CacheSpec((self.cfg.n_layers, *spec.shape), spec.dtype, ("layers", *spec.logical_axes))
                for name, spec in layer.items()}

    def init_cache(self, batch_size: int, max_len: int) -> Cache:
        """Zeros, except the virtual tokens' keys and values in the first slots."""
        layout = self.cache_layout(batch_size, max_len)
        if not self.virtual_tokens:
            return {name: spec.zeros() for name, spec in layout.items()}
        virtual = self.peft.virtual_cache(self)
        cache = {}
        for name, spec in layout.items():
            batch_axis, length_axis = spec.logical_axes.index("batch"), spec.logical_axes.index("length")
            head_shape = list(virtual[name].shape)
            head_shape[batch_axis] = batch_size
            tail_shape = list(spec.shape)
            tail_shape[length_axis] = max_len
            head = jnp.broadcast_to(virtual[name].astype(spec.dtype), head_shape)
            cache[name] = constrain(jnp.concatenate([head, jnp.zeros(tail_shape, spec.dtype)], length_axis),
                                    spec.logical_axes)
        return cache

    def encode_virtual(self, vectors_NxD: jax.Array) -> Cache:
        """The stacked cache (batch 1, N slots) that N vectors fed in place of token embeddings, at positions
        0..N-1, leave in every layer: what a PEFT method's virtual tokens hold (cgpt_jax/peft/prompt.py)."""
        n = vectors_NxD.shape[0]
        x_1xNxD = self._embed_vectors(vectors_NxD[None].astype(self.compute_dtype), None, 0)
        cache = {name: spec.zeros() for name, spec in self._stacked_layout(1, n).items()}
        _, cache = self._run_cached(x_1xNxD, cache, jnp.zeros((1,), jnp.int32))
        return cache

    def extend(self, tokens_BxT: jax.Array, cache: Cache, start_B: jax.Array) -> tuple[jax.Array, Cache]:
        """T new tokens per sequence at positions start_B + 0..T-1 → (float32 logits [B, T, V_padded],
        updated cache). See the module docstring."""
        slot_B = start_B.astype(jnp.int32) + self.virtual_tokens
        x_BxTxD = self._embed(tokens_BxT, slot_B[:, None] + jnp.arange(tokens_BxT.shape[1]))
        x_BxTxD, cache = self._run_cached(x_BxTxD, cache, slot_B)
        return self._logits(self.ln_f(x_BxTxD)), cache

    def _run_cached(self, x_BxTxD: jax.Array, cache: Cache, slot_B: jax.Array) -> tuple[jax.Array, Cache]:
        """The layers over embedded inputs written at cache slots (= positions) slot_B + 0..T-1, before ln_f."""
        def extend_block(x_BxTxD: jax.Array, block: Block, layer_cache: Cache) -> tuple[jax.Array, Cache]:
            return block.extend(x_BxTxD, layer_cache, slot_B)

        return nnx.scan(extend_block, in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0),
                        transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"},
                        )(x_BxTxD, self.active_blocks(), cache)

    def layer_blocks(self) -> list[Block]:
        """Each layer's Block with its own parameter arrays (a copy); see the module docstring."""
        graphdef, stacked = nnx.split(self.active_blocks())
        return [nnx.merge(graphdef, jax.tree.map(lambda p: p[layer], stacked)) for layer in range(self.cfg.n_layers)]

    def init_layer_caches(self, batch_size: int, max_len: int) -> list[Cache]:
        if self.virtual_tokens:
            stacked = self.init_cache(batch_size, max_len)
            return [{name: c[layer] for name, c in stacked.items()} for layer in range(self.cfg.n_layers)]
        self.cache_layout(batch_size, max_len)  # the same checks as the stacked cache
        layout = self.blocks.attn.cache_layout(batch_size, max_len)
        return [{name: spec.zeros() for name, spec in layout.items()} for _ in range(self.cfg.n_layers)]

    def extend_layers(self, blocks: list[Block], tokens_BxT: jax.Array, caches: list[Cache], start_B: jax.Array,
                      prefill: bool = False, last_rows_B: jax.Array | None = None) -> tuple[jax.Array, list[Cache]]:
        """`extend` over per-layer blocks and caches → (hidden states after ln_f [B, T, D], caches). With
        last_rows_B (int32 [B], each in 0..T-1) the hidden states are row last_rows_B[b] of sequence b only,
        [B, 1, D], and the last layer's MLP runs on those rows alone (`Block.extend`): what a prefill needs."""
        start_B = start_B.astype(jnp.int32) + self.virtual_tokens
        prefill = prefill and not self.virtual_tokens  # the virtual tokens fill the cache's first slots
        x_BxTxD = self._embed(tokens_BxT, None if prefill else start_B[:, None] + jnp.arange(tokens_BxT.shape[1]))
        new_caches = []
        for layer, (block, cache) in enumerate(zip(blocks, caches, strict=True)):
            rows_B = last_rows_B if layer == len(blocks) - 1 else None
            x_BxTxD, cache = (block.prefill(x_BxTxD, cache, rows_B) if prefill
                              else block.extend(x_BxTxD, cache, start_B, rows_B))
            new_caches.append(cache)
        return self.ln_f(x_BxTxD), new_caches

    def head(self, x_BxTxD: jax.Array) -> jax.Array:
        """Final hidden states (after ln_f) → float32 logits [B, T, V_padded] of the tied LM head."""
        return self._logits(x_BxTxD)

    def _embed(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None) -> jax.Array:
        """(Token + position embeddings) · embedding multiplier; positions None: n..n+T-1 for every sequence
        (n: the virtual tokens)."""
        return self._embed_vectors(take_rows(self.wte, tokens_BxT).astype(self.compute_dtype), positions_BxT,
                                   self.virtual_tokens)

    def _embed_vectors(self, x_BxTxD: jax.Array, positions_BxT: jax.Array | None, first: int) -> jax.Array:
        """(Input vectors + position embeddings) · embedding multiplier; positions None: first..first+T-1."""
        dt = self.compute_dtype
        if self.wpe is not None and positions_BxT is None:
            x_BxTxD = x_BxTxD + self.wpe[first:first + x_BxTxD.shape[1]].astype(dt)[None]
        elif self.wpe is not None:
            x_BxTxD = x_BxTxD + take_rows(self.wpe, positions_BxT).astype(dt)
        x_BxTxD = x_BxTxD * parameterization.embedding_multiplier(self.cfg)
        return constrain(x_BxTxD, ("batch", "length", "act_embed"))

    def _logits(self, x_BxTxD: jax.Array) -> jax.Array:
        """Final hidden states (after ln_f) → the tied LM head's logits."""
        logits_BxTxV = tied_logits(x_BxTxD, self.wte, self.compute_dtype)
        logits_BxTxV = logits_BxTxV * parameterization.output_logits_multiplier(self.cfg)
        logits_BxTxV = constrain(logits_BxTxV, ("batch", "length", "act_vocab"))
        if logits_BxTxV.shape[-1] != self.cfg.vocab_size:
            is_real_V = jnp.arange(logits_BxTxV.shape[-1]) < self.cfg.vocab_size
            logits_BxTxV = jnp.where(is_real_V, logits_BxTxV, -jnp.inf)
        return logits_BxTxV
