"""Readable names for pytree paths of nnx states ("blocks/attn/qkv_kernel")."""
from __future__ import annotations

import jax


def path_name(path: tuple) -> str:
    """Join the dict keys and indices of a path; the Variable's own `.value` attribute is left out."""
    parts = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            parts.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            parts.append(str(entry.idx))
        elif isinstance(entry, jax.tree_util.GetAttrKey) and entry.name != "value":
            parts.append(entry.name)
    return "/".join(parts)
