"""Logical axis names → mesh axes.

Parameters carry `logical_axes` metadata (e.g. ``("embed", "mlp")``) and activations are constrained
with `constrain(x, ("batch", "length", "act_embed"))`. An ordered list of rules in the config maps each
logical name to mesh axes; the first rule whose mesh axes are still free in that array wins (so a rule
list can give fallbacks, as in MaxText). The model never names a mesh axis itself.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cgpt_jax.treepath import path_name

LogicalAxes = tuple[str | None, ...]
Rules = Sequence[tuple[str, str | Sequence[str] | None]]

DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("position", None),
    ("norm", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class LogicalArray:
    """An array that is not a parameter (a decode cache, a batch): its shape, dtype and logical axes."""

    shape: tuple[int, ...]
    dtype: jnp.dtype
    logical_axes: LogicalAxes

    def zeros(self) -> jax.Array:
        return jnp.zeros(self.shape, self.dtype)

    def sharding(self, mesh: jax.sharding.Mesh, rules: Rules) -> NamedSharding:
        return NamedSharding(mesh, logical_to_spec(self.logical_axes, rules))


def _as_tuple(mesh_axes: str | Sequence[str] | None) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


def logical_to_spec(axes: LogicalAxes, rules: Rules) -> PartitionSpec:
    """Map logical names to a PartitionSpec; a mesh axis is used at most once per array."""
    used: set[str] = set()
    spec = []
    for name in axes:
        chosen: tuple[str, ...] = ()
        if name is not None:
            for rule_name, mesh_axes in rules:
                candidate = _as_tuple(mesh_axes)
                if rule_name == name and not used & set(candidate):
                    chosen = candidate
                    break
        used |= set(chosen)
        spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
    return PartitionSpec(*spec)


def _axis_product(mesh: jax.sharding.Mesh, entry) -> int:
    return math.prod(mesh.shape[a] for a in _as_tuple(entry))


# --- activations ---------------------------------------------------------------------------------

_context = threading.local()


@contextlib.contextmanager
def activation_sharding(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to the mesh via the rules."""
    previous = getattr(_context, "value", None)
    _context.value = (mesh, tuple((n, a) for n, a in rules))
    try:
        yield
    finally:
        _context.value = previous


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Sharding constraint by logical names; the identity outside `activation_sharding`."""
    current = getattr(_context, "value", None)
    if current is None:
        return x
    mesh, rules = current
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))


def fits_shards(shape: Sequence[int], axes: LogicalAxes) -> bool:
    """Whether every dimension divides evenly over the mesh axes its logical name maps to under the
    current `activation_sharding` (always true outside it), as `map_shards` needs."""
    current = getattr(_context, "value", None)
    if current is None:
        return True
    mesh, rules = current
    return all(size % _axis_product(mesh, entry) == 0 for size, entry in zip(shape, logical_to_spec(axes, rules)))


def mesh_axes(axes: LogicalAxes) -> PartitionSpec | None:
    """The mesh axes these logical names map to under the current `activation_sharding`; None outside it."""
    current = getattr(_context, "value", None)
    return None if current is None else logical_to_spec(axes, current[1])


def map_shards(fn: Callable[..., jax.Array], in_axes: Sequence[LogicalAxes],
               out_axes: LogicalAxes) -> Callable[..., jax.Array]:
    """`fn` run on each device's shard of its arguments, split by logical names as `constrain` would,
    for code that XLA cannot partition itself (a custom call); `fn` unchanged outside
    `activation_sharding`."""
    current = getattr(_context, "value", None)
    if current is None:
        return fn
    mesh, rules = current
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(logical_to_spec(axes, rules) for axes in in_axes),
                         out_specs=logical_to_spec(out_axes, rules), check_vma=False)


# --- parameters and optimizer state ---------------------------------------------------------------

def _variable_spec(var: nnx.Variable, rules: Rules) -> PartitionSpec:
    axes = var.get_metadata().get("logical_axes")
    return PartitionSpec() if axes is None else logical_to_spec(tuple(axes), rules)


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
    """NamedShardings for an (abstract) nnx state; checks each sharded dimension divides evenly."""

    def one(path, var):
        if not isinstance(var, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        spec = _variable_spec(var, rules)
        value = var.get_value()
        if hasattr(value, "shardings"):  # a quantized weight (cgpt_jax/quantize): integers and scales
            return var.replace(value.shardings(mesh, spec))
        shape = value.shape
        for dim, entry in zip(shape, spec):
            if entry is not None and dim % _axis_product(mesh, entry):
                name = path_name(path)
                raise ValueError(
                    f"parameter {name} of shape {shape} (logical axes {var.get_metadata()['logical_axes']}) "
                    f"cannot be split over mesh axes {entry} of size {_axis_product(mesh, entry)}: "
                    f"{dim} is not divisible. Change the mesh, the model shape, or the rule for that "
                    f"logical axis in config.mesh.rules (for the vocabulary, config.model.vocab_pad_multiple).")
        return var.replace(NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def replicated_report(params: Any, shardings: Any, mesh: jax.sharding.Mesh) -> tuple[float, list[tuple[str, int]]]:
    """Share of parameter bytes not split over any fsdp/tensor axis, and those parameters by size."""
    model_axes = {a for a in ("fsdp", "tensor") if mesh.shape[a] > 1}
    total = 0
    offenders: list[tuple[str, int]] = []
    flat_params = jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    flat_shardings = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))
    for (path, var), sharding in zip(flat_params, flat_shardings):
        value = var.get_value()
        nbytes = math.prod(value.shape) * value.dtype.itemsize
        total += nbytes
        spec = sharding.get_value().spec if isinstance(sharding, nnx.Variable) else sharding.spec
        used = {a for entry in spec for a in _as_tuple(entry)}
        if not used & model_axes:
            offenders.append((path_name(path), nbytes))
    offenders.sort(key=lambda item: -item[1])
    return (sum(b for _, b in offenders) / total if total else 0.0), offenders


def check_replication(params: Any, shardings: Any, mesh: jax.sharding.Mesh, max_fraction: float) -> None:
    """Refuse a mesh with fsdp or tensor > 1 that leaves too many parameter bytes replicated."""
    if mesh.shape["fsdp"] == 1 and mesh.shape["tensor"] == 1:
        return
    fraction, offenders = replicated_report(params, shardings, mesh)
    if fraction > max_fraction:
        listing = "\n".join(f"  {name}: {nbytes / 2**20:.2f} MiB" for name, nbytes in offenders[:20])
        raise ValueError(
            f"{fraction:.1%} of parameter bytes stay replicated on mesh {dict(mesh.shape)} "
            f"(limit config.mesh.max_replicated_fraction={max_fraction}). Largest replicated parameters:\n"
            f"{listing}\nAdd rules for their logical axes in config.mesh.rules, or raise the limit.")
