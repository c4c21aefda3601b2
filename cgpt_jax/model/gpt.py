"""The Cerebras-GPT decoder: GPT-2/GPT-3 style, pre-LayerNorm, learned positions, tied LM head.

Written for one logical device. Every parameter names its logical axes and the residual stream is
constrained by logical names, so the same code runs unsharded, data parallel, FSDP or tensor parallel.
Layers are stacked with `nnx.vmap` and applied with `nnx.scan`, so compile time does not grow with depth.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cgpt_jax.model import attention
from cgpt_jax.model.layers import MLP, LayerNorm, trunc_normal_param
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
        self.mlp = MLP(cfg.d_model, cfg.d_ff, init_std=cfg.init_std, output_init_std=cfg.output_init_std,
                       param_dtype=param_dtype, compute_dtype=jnp.dtype(cfg.compute_dtype), rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x_BxLxD = x_BxLxD + self.attn(self.ln_attn(x_BxLxD))
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
        x_BxLxD = x_BxLxD + self.mlp(self.ln_mlp(x_BxLxD))
        return constrain(x_BxLxD, ("batch", "length", "act_embed"))


class GPT(nnx.Module):
    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        self.cfg = cfg
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.compute_dtype = jnp.dtype(cfg.compute_dtype)
        self.wte = trunc_normal_param(rngs, (padded_vocab_size(cfg), cfg.d_model), cfg.init_std,
                                      ("vocab", "embed"), param_dtype)
        self.wpe = (trunc_normal_param(rngs, (cfg.max_seq_len, cfg.d_model), cfg.init_std,
                                       ("position", "embed"), param_dtype)
                    if attention.build(cfg.attention).learned_positions else None)

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers",
                                                                  "logical_axes": "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        self.ln_f = LayerNorm(cfg.d_model, cfg.layer_norm_eps, param_dtype)

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        """Token ids [B, L] → float32 logits [B, L, V_padded] (padding columns are -inf)."""
        dt = self.compute_dtype
        length = tokens_BxL.shape[1]
        x_BxLxD = jnp.take(self.wte[...], tokens_BxL, axis=0).astype(dt)
        if self.wpe is not None:
            x_BxLxD = x_BxLxD + self.wpe[:length].astype(dt)[None]
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))

        def apply_block(x_BxLxD: jax.Array, block: Block) -> jax.Array:
            return block(x_BxLxD)

        if self.cfg.remat != "none":
            apply_block = nnx.remat(apply_block, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
        x_BxLxD = nnx.scan(apply_block, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry,
                           transform_metadata={nnx.PARTITION_NAME: "layers", "logical_axes": "layers"},
                           )(x_BxLxD, self.blocks)

        x_BxLxD = self.ln_f(x_BxLxD)
        logits_BxLxV = jnp.einsum("bld,vd->blv", x_BxLxD, self.wte[...].astype(dt),
                                  preferred_element_type=jnp.float32)
        logits_BxLxV = constrain(logits_BxLxV, ("batch", "length", "act_vocab"))
        if logits_BxLxV.shape[-1] != self.cfg.vocab_size:
            is_real_V = jnp.arange(logits_BxLxV.shape[-1]) < self.cfg.vocab_size
            logits_BxLxV = jnp.where(is_real_V, logits_BxLxV, -jnp.inf)
        return logits_BxLxV
