"""Which parameters of a model are quantized, and quantizing them in an nnx model or state.

Quantized: every projection matrix (the parameterization groups attn_input, attn_output, mlp_input,
mlp_output), a classifier's `head`, the token embedding `wte`, which is also the tied LM head, and the
position table `wpe` (group embedding). Lookups into wte and wpe gather integer rows and dequantize only
those (`layers.take_rows`). Kept in float32: biases, LayerNorm gains and any other vector.

A weight's input axes are named by its logical axes: `embed` for the input projections, the head, the
LM head (which contracts the hidden state with each vocabulary row) and the position table (grouped like
the token table), `heads, head_dim` for the attention output, `mlp` for the MLP output; the scales are per
output channel (row) and per group along those axes.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
from flax import nnx

from cgpt_jax.errors import InputError
from cgpt_jax.model.parameterization import GROUP_KEY
from cgpt_jax.quantize.array import QuantizedArray, quantize
from cgpt_jax.quantize.scheme import Scheme
from cgpt_jax.treepath import path_name

INPUT_AXES = {"attn_input": ("embed",), "mlp_input": ("embed",), "attn_output": ("heads", "head_dim"),
              "mlp_output": ("mlp",), "head": ("embed",), "embedding": ("embed",)}


def input_span(name: str, var: nnx.Variable) -> tuple[int, int] | None:
    """Axes a..b-1 of the weight that a matmul contracts, or None for a parameter that stays float."""
    metadata = var.get_metadata()
    group, axes = metadata.get(GROUP_KEY), tuple(metadata.get("logical_axes") or ())
    if group not in INPUT_AXES:
        return None
    inputs = INPUT_AXES[group]
    for a in range(len(axes) - len(inputs) + 1):
        if axes[a:a + len(inputs)] == inputs:
            return a, a + len(inputs)
    raise ValueError(f"parameter {name!r} (group {group}, logical axes {axes}) has no consecutive input axes "
                     f"{inputs}: quantization does not know which axes its matmul contracts")


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def check(state: nnx.State, scheme: Scheme) -> None:
    """Raise InputError before any work when `scheme` cannot quantize a weight of `state` (abstract is fine):
    a group that does not divide a weight's input size, or an odd last axis for 4-bit packing."""
    problems, input_sizes = [], []
    for path, var in jax.tree_util.tree_leaves_with_path(state, is_leaf=_is_var):
        name = path_name(path)
        span = input_span(name, var) if isinstance(var, nnx.Param) else None
        if span is None or isinstance(var.get_value(), QuantizedArray):
            continue
        shape = tuple(var.get_value().shape)
        inputs = math.prod(shape[span[0]:span[1]])
        input_sizes.append(inputs)
        if scheme.group is not None and inputs % scheme.group:
            problems.append(f"{name}: input size {inputs}")
        if scheme.bits == 4 and shape[-1] % 2:
            raise InputError(f"{scheme}: {name} of shape {shape} has an odd last axis, which 4-bit packing "
                             f"needs even — use int8")
    if problems:
        common = functools.reduce(math.gcd, input_sizes)
        divisors = [g for g in range(1, common + 1) if common % g == 0]
        raise InputError(f"{scheme}: group size {scheme.group} does not divide "
                         f"{', '.join(problems[:4])}{' ...' if len(problems) > 4 else ''} — "
                         f"use {scheme.kind}:group=G with G one of {divisors}")


def quantize_state(state: nnx.State, scheme: Scheme) -> nnx.State:
    """The state with each quantized weight's value replaced by a QuantizedArray (jit it; works on
    abstract states under jax.eval_shape). Already quantized weights are refused: quantize once."""
    def one(path, var):
        span = input_span(path_name(path), var) if isinstance(var, nnx.Param) else None
        if span is None:
            return var
        value = var.get_value()
        if isinstance(value, QuantizedArray):
            raise InputError(f"{path_name(path)} is already quantized — quantize the float model")
        return var.replace(quantize(value, scheme, span))
    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


def apply(model: nnx.Module, scheme: Scheme) -> nnx.Module:
    """A copy of `model` with its weights quantized (see the module docstring); `model` is left float.
    Works on any model of this package (GPT, SequenceClassifier); shardings follow the input's."""
    graphdef, state = nnx.split(model)
    check(state, scheme)
    return nnx.merge(graphdef, jax.jit(functools.partial(quantize_state, scheme=scheme))(state))


def weight_bytes(state: nnx.State | dict[str, Any]) -> dict[str, int]:
    """Bytes of the parameters (an nnx.State, or its pure dict as the generator holds it, where a weight may
    be laid out in panels, `cgpt_jax/infer/panels.py`): `quantized` (integers and scales of the quantized
    weights), `float` (the rest) and `total`."""
    def is_weight(x: Any) -> bool:  # a Variable, or a weight held as arrays of its own (quantized, panels)
        return _is_var(x) or hasattr(x, "matmul_rows")
    quantized = floating = 0
    for leaf in jax.tree.leaves(state, is_leaf=is_weight):
        value = leaf.get_value() if _is_var(leaf) else leaf
        nbytes = value.nbytes if hasattr(value, "matmul_rows") else math.prod(value.shape) * value.dtype.itemsize
        if getattr(value, "bits", 32) < 32:
            quantized += nbytes
        else:
            floating += nbytes
    return {"quantized": quantized, "float": floating, "total": quantized + floating}
