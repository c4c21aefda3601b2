"""`mqa`: multi-query attention (Shazeer 2019): `gqa` with one key/value head shared by every head."""
from __future__ import annotations

from cgpt_jax.model.attention import register
from cgpt_jax.model.attention.gqa import GroupedQueryAttention

register("mqa", kv_heads=1)(GroupedQueryAttention)
