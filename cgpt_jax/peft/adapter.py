"""`adapter(bottleneck=64)`: bottleneck adapters (Houlsby et al., 2019) on both residual branches of every
block: y → y + up(gelu(down(y))) applied to the attention output and to the MLP output before each is
added to the residual stream. `up` starts at zero, so the model starts as the base.

Each adapter is d_model → bottleneck → d_model with biases; its parameters are stacked over the layers
([layers, d_model, bottleneck], ...) and reach each layer the way the block's own do: `adapt_blocks` gives
a copy of the stacked blocks whose `branch` is this module, so the scan (or the unrolled loop, or the
per-layer blocks of KV-cache decoding) hands every layer its own slice. Not mergeable: the adapter is a
nonlinear function of the activations, so it costs two small matmuls per branch at inference.
"""
from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cgpt_jax.model import parameterization
from cgpt_jax.model.layers import gelu, matmul_rows
from cgpt_jax.peft import register
from cgpt_jax.peft.base import Added, Method

SITES = ("attn", "mlp")
_INIT_STD = 0.01  # near-identity start for `down` (Houlsby's small init); `up` is zero


def _param(value: jax.Array, axes: tuple, group: str, init: str) -> nnx.Param:
    return nnx.Param(value, logical_axes=axes, **{parameterization.GROUP_KEY: group, parameterization.INIT_KEY: init})


class Bottleneck(Added):
    def __init__(self, model_cfg: ml_collections.ConfigDict, bottleneck: int, rngs: nnx.Rngs):
        n, d, b = model_cfg.n_layers, model_cfg.d_model, bottleneck
        dtype = jnp.dtype(model_cfg.param_dtype)
        self.compute_dtype = jnp.dtype(model_cfg.compute_dtype)
        for site in SITES:
            down = _INIT_STD * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, (n, d, b), jnp.float32)
            setattr(self, f"{site}_down", _param(down.astype(dtype), ("layers", "embed", None), "vector", "module"))
            setattr(self, f"{site}_down_bias", _param(jnp.zeros((n, b), dtype), ("layers", None), "bias", "zeros"))
            setattr(self, f"{site}_up", _param(jnp.zeros((n, b, d), dtype), ("layers", None, "embed"), "vector",
                                               "zeros"))
            setattr(self, f"{site}_up_bias", _param(jnp.zeros((n, d), dtype), ("layers", "embed"), "bias", "zeros"))

    def __call__(self, site: str, y_BxTxD: jax.Array) -> jax.Array:
        """One layer's adapter (called inside the layer loop, where the parameters are that layer's slice)."""
        dt = self.compute_dtype
        h_BxTxR = matmul_rows(y_BxTxD.astype(dt), getattr(self, f"{site}_down")[...].astype(dt))
        h_BxTxR = gelu(h_BxTxR + getattr(self, f"{site}_down_bias")[...].astype(dt))
        out_BxTxD = matmul_rows(h_BxTxR, getattr(self, f"{site}_up")[...].astype(dt))
        return y_BxTxD + (out_BxTxD + getattr(self, f"{site}_up_bias")[...].astype(dt)).astype(y_BxTxD.dtype)

    def adapt_blocks(self, blocks: nnx.Module) -> nnx.Module:
        adapted = nnx.merge(*nnx.split(blocks))  # a new Block object: the model's own stays without a branch
        adapted.branch = self
        return adapted


@register("adapter")
class Adapter(Method):
    options: ClassVar[dict[str, Any]] = {"bottleneck": 64}
    slots: ClassVar[tuple[str, ...]] = ("residual",)
    examples: ClassVar[tuple[dict[str, Any], ...]] = ({"bottleneck": 8},)

    @classmethod
    def validate(cls, model_cfg: ml_collections.ConfigDict, **options: Any) -> None:
        b = options["bottleneck"]
        if not isinstance(b, int) or isinstance(b, bool) or b <= 0:
            raise ValueError(f"bottleneck={b!r} must be a positive integer, e.g. bottleneck=64")

    def make(self, model_cfg: ml_collections.ConfigDict, rngs: nnx.Rngs) -> Bottleneck:
        return Bottleneck(model_cfg, self.opts["bottleneck"], rngs)
