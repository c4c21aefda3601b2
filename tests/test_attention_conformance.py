"""Conformance suite: every registered attention variant, and a few combinations, passes the same checks.

The specs are read from the registry when the tests are collected, so a new variant file is tested with
no edit here; a variant lists the options to test with in `examples` (this suite's model: d_model 32,
4 heads of 8 dims, 2 layers, 16 positions) and where it equals dense in `dense_equal_options`.
Each check is a plain function that raises AssertionError, so `test_suite_catches_a_broken_variant` can
run all of them on a deliberately broken plug-in and require that the suite fails it, and the worked
example of docs/attention.md is run through all of them too.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap
import types
import unittest.mock
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cgpt_jax.kernels import cpu_attention
from cgpt_jax.model import GPT, attention
from cgpt_jax.model.attention import spec_string
from cgpt_jax.model.attention.dense import DenseAttention
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.config import resolve
from cgpt_jax.parallel.sharding import DEFAULT_RULES, activation_sharding, logical_to_spec, state_shardings
from cgpt_jax.train.param_table import PARAM_TABLE, param_table
from cgpt_jax.train.setup import FAST_COMPILE
from tests.helpers import XLA_DEFAULT_BACKEND, one_device_env, tiny_config, train_steps_from_init

BATCH, SEQ = 2, 16
MESH_BATCH = 4  # one sequence per data shard
COMBINATIONS = ("gqa(kv_heads=2)+rope", "alibi+blockwise(block=4)", "mqa+sliding_window(window=4)+alibi")
RULES = [list(rule) for rule in DEFAULT_RULES]
PARAM_AXES = {name for name, _ in DEFAULT_RULES} - {"batch", "length"} | {None}


def suite_specs() -> list[str]:
    specs: list[str] = []
    for name, entry in sorted(attention.registered().items()):
        for example in entry.cls.examples:
            spec = spec_string(name, {k: v for k, v in example.items() if k in entry.free_options})
            if spec not in specs:
                specs.append(spec)
    return specs + list(COMBINATIONS)


def model_config(spec: str, **changes) -> ml_collections.ConfigDict:
    cfg = tiny_config().model
    cfg.attention = spec
    cfg.update(changes)
    return cfg


def randomized(make: Callable[[], nnx.Module], seed: int = 0) -> nnx.Module:
    """The module with every parameter drawn from N(0, 0.3²) by numpy: larger than the real init, so the
    softmax is far from uniform, and nothing to compile (an eager init compiles once per shape)."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    return nnx.merge(graphdef, jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape)).astype(a.dtype), state))


def make_attention(spec: str, cfg: ml_collections.ConfigDict) -> nnx.Module:
    return randomized(lambda: attention.build(spec).make(cfg, rngs=nnx.Rngs(0)))


# Inputs come from numpy, so making them compiles nothing.

def random_x(cfg: ml_collections.ConfigDict, length: int = SEQ, seed: int = 1, batch: int = BATCH,
             dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, length, cfg.d_model)).astype(dtype)


def random_tokens(batch: int, length: int = SEQ, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 64, (batch, length), dtype=np.int32)


def kernel_sizes(module: nnx.Module) -> int:
    """Projection weights, each used once per token in a matmul: matrices to or from 'embed'."""
    return sum(math.prod(p.shape) for _, p in nnx.to_flat_state(nnx.state(module, nnx.Param))
               if p.ndim >= 2 and "embed" in p.get_metadata()["logical_axes"])


def matmul_flops(jaxpr) -> float:
    """FLOPs of every dot_general in a jaxpr, scan bodies counted once per iteration."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[i] for i in contracting)
            continue
        assert eqn.primitive.name != "while", "a while loop's trip count is unknown; use scan"
        repeat = eqn.params["length"] if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns"):
                    total += repeat * matmul_flops(sub)
                elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                    total += repeat * matmul_flops(sub.jaxpr)
    return total


# Compiled functions are cached per (spec, class), so the checks of one spec share compilations, the
# dense reference is compiled once, and a name re-registered by a test gets fresh ones.

class Compiled(NamedTuple):
    cfg: ml_collections.ConfigDict
    module: nnx.Module
    state: nnx.State
    forward: Callable  # (state, x_BxLxD) -> y_BxLxD
    extend: Callable  # (state, x_BxTxD, cache, start_B) -> (y_BxTxD, cache)


def _key(spec: str) -> tuple[str, type]:
    return spec, attention.build(spec).cls


@functools.cache
def _compiled(key: tuple[str, type], dtype: str, model_level: bool) -> Compiled:
    spec = key[0]
    cfg = model_config(spec, param_dtype=dtype, compute_dtype=dtype)
    module = randomized(lambda: GPT(cfg, rngs=nnx.Rngs(0))) if model_level else make_attention(spec, cfg)
    graphdef, state = nnx.split(module)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    extend = jax.jit(lambda s, x, cache, start: nnx.merge(graphdef, s).extend(x, cache, start))
    return Compiled(cfg, module, state, forward, extend)


def compiled_attention(spec: str, dtype: str = "float32") -> Compiled:
    """One attention layer of the suite's model, with jitted forward and extend."""
    return _compiled(_key(spec), dtype, False)


def compiled_model(spec: str) -> Compiled:
    """The whole GPT, with jitted forward (tokens → logits) and extend."""
    return _compiled(_key(spec), "float32", True)


def abstract_call(module: nnx.Module, method: str, *args):
    """Output shapes of `module.method(*args)` for an abstract module (from nnx.eval_shape)."""
    graphdef, state = nnx.split(module)
    return jax.eval_shape(lambda s, *a: getattr(nnx.merge(graphdef, s), method)(*a), state, *args)


def empty_cache(module: nnx.Module, batch: int) -> dict[str, np.ndarray]:
    return {name: np.zeros(spec.shape, spec.dtype) for name, spec in module.cache_layout(batch, SEQ).items()}


def mesh_axes(spec: PartitionSpec) -> set[str]:
    return {a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)}


def assert_decode_equals_forward(c: Compiled, inputs: np.ndarray) -> None:
    """Prefill right-padded prompts of lengths 5 and 3, then decode one position at a time, each
    sequence at its own position: every output equals the full forward pass's at that position."""
    full = np.asarray(c.forward(c.state, inputs))
    lengths = np.array([5, 3])
    is_prompt = (np.arange(5)[None] < lengths[:, None]).reshape(BATCH, 5, *([1] * (inputs.ndim - 2)))
    prompts = np.where(is_prompt, inputs[:, :5], 0)  # padding: zeros
    out, cache = c.extend(c.state, prompts, empty_cache(c.module, BATCH), np.zeros(BATCH, np.int32))
    for b, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(out[b, :n]), full[b, :n], rtol=1e-5, atol=1e-5,
                                   err_msg=f"decode: prefill of sequence {b} differs from the forward pass")
    for step in range(SEQ - lengths.max()):
        positions = lengths + step
        out, cache = c.extend(c.state, inputs[np.arange(BATCH), positions][:, None], cache, positions.astype(np.int32))
        for b, p in enumerate(positions):
            np.testing.assert_allclose(np.asarray(out[b, 0]), full[b, p], rtol=1e-5, atol=1e-5,
                                       err_msg=f"decode: sequence {b} at position {p} differs from the forward pass")


def assert_sharded_equals_unsharded(c: Compiled, inputs: np.ndarray, mesh: jax.sharding.Mesh,
                                    input_axes: tuple[str, ...], decode: bool) -> None:
    """Forward pass and a prefill into a cache sharded by heads, on `mesh`, equal one device's."""
    reference = np.asarray(c.forward(c.state, inputs))
    sharded_state = jax.device_put(c.state, state_shardings(c.state, mesh, RULES))
    for path, param in nnx.to_flat_state(sharded_state):
        if "heads" in (param.get_metadata().get("logical_axes") or ()):
            assert "tensor" in mesh_axes(param.get_value().sharding.spec), f"sharded: {path} is not split by heads"
    sharded_inputs = jax.device_put(inputs, NamedSharding(mesh, logical_to_spec(input_axes, RULES)))
    with activation_sharding(mesh, RULES):
        out = c.forward(sharded_state, sharded_inputs)
    np.testing.assert_allclose(np.asarray(out), reference, rtol=1e-5, atol=1e-5, err_msg="sharded forward")
    if not decode:
        return
    layout = c.module.cache_layout(MESH_BATCH, SEQ)
    cache = jax.device_put(empty_cache(c.module, MESH_BATCH), {n: s.sharding(mesh, RULES) for n, s in layout.items()})
    starts = jax.device_put(np.zeros(MESH_BATCH, np.int32), NamedSharding(mesh, logical_to_spec(("batch",), RULES)))
    with activation_sharding(mesh, RULES):
        out, cache = c.extend(sharded_state, sharded_inputs[:, :8], cache, starts)
    np.testing.assert_allclose(np.asarray(out), reference[:, :8], rtol=1e-5, atol=1e-5, err_msg="sharded prefill")
    for name, spec_ in layout.items():
        sharding = cache[name].sharding
        assert sharding.is_equivalent_to(spec_.sharding(mesh, RULES), len(spec_.shape)), f"cache {name}: {sharding}"
        if "kv_heads" in spec_.logical_axes:
            axes = tuple(sharding.spec) + (None,) * (len(spec_.shape) - len(sharding.spec))
            assert axes[spec_.logical_axes.index("kv_heads")] == "tensor", f"cache {name} not split by heads"


# --- the checks ---------------------------------------------------------------------------------------

def check_shapes_and_dtypes(spec: str) -> None:
    """Shapes and dtypes of outputs (float32 and bfloat16 compute), parameters and the cache of the
    layer and of the model, traced abstractly (nothing is compiled)."""
    variant = attention.build(spec)
    for dtype in ("float32", "bfloat16"):
        cfg = model_config(spec, compute_dtype=dtype)
        attn = nnx.eval_shape(lambda: attention.build(spec).make(cfg, rngs=nnx.Rngs(0)))
        y = abstract_call(attn, "__call__", jax.ShapeDtypeStruct((BATCH, SEQ, cfg.d_model), jnp.float32))
        assert y.shape == (BATCH, SEQ, cfg.d_model) and y.dtype == jnp.dtype(dtype), f"output {y}"
    for path, param in nnx.to_flat_state(nnx.state(attn, nnx.Param)):
        axes = param.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == len(param.shape), f"{path}: axes {axes}, shape {param.shape}"
        assert set(axes) <= PARAM_AXES, f"{path}: unknown logical axes {set(axes) - PARAM_AXES}"
        assert param.dtype == jnp.float32

    cfg = model_config(spec)
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    assert (model.wpe is not None) == variant.learned_positions
    logits = abstract_call(model, "__call__", jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32))
    assert logits.shape == (BATCH, SEQ, cfg.vocab_size) and logits.dtype == jnp.float32
    if not variant.supports_decode:
        return
    layout = model.cache_layout(BATCH, SEQ)
    for name, spec_ in layout.items():
        assert spec_.logical_axes[0] == "layers" and len(spec_.logical_axes) == len(spec_.shape)
        assert spec_.shape[:2] == (cfg.n_layers, BATCH) and spec_.dtype == jnp.float32
        assert spec_.shape[spec_.logical_axes.index("length")] == SEQ
    cache = jax.eval_shape(lambda: model.init_cache(BATCH, SEQ))
    assert {n: (c.shape, c.dtype) for n, c in cache.items()} == {n: (s.shape, s.dtype) for n, s in layout.items()}
    logits, new_cache = abstract_call(model, "extend", jax.ShapeDtypeStruct((BATCH, 3), jnp.int32), cache,
                                      jax.ShapeDtypeStruct((BATCH,), jnp.int32))
    assert logits.shape == (BATCH, 3, cfg.vocab_size) and logits.dtype == jnp.float32
    assert new_cache == cache


def check_causality(spec: str) -> None:
    """Changing inputs from position 9 on leaves outputs before 9 unchanged (and does change later ones)."""
    c = compiled_attention(spec)
    x = random_x(c.cfg)
    changed = np.concatenate([x[:, :9], random_x(c.cfg, seed=7)[:, 9:]], axis=1)
    y, y_changed = np.asarray(c.forward(c.state, x)), np.asarray(c.forward(c.state, changed))
    np.testing.assert_allclose(y_changed[:, :9], y[:, :9], rtol=1e-6, atol=1e-6,
                               err_msg="causality: outputs before position 9 depend on later inputs")
    assert not np.allclose(y_changed[:, 9:], y[:, 9:])


def dense_equal_spec(spec: str) -> str | None:
    """`spec` with every component at its dense-equal options, or None where it never equals dense."""
    cfg = model_config(spec)
    parts = []
    for c in attention.build(spec).components:
        equal = c.cls.dense_equal_options(cfg, SEQ)
        entry = attention.registered()[c.name]
        if equal is None or any(entry.fixed.get(k, v) != v for k, v in equal.items()):
            return None
        free = {k: v for k, v in {**c.options, **equal}.items() if k in entry.free_options}
        parts.append(spec_string(c.name, free))
    return "+".join(parts)


def check_equals_dense(spec: str) -> None:
    equal_spec = dense_equal_spec(spec)
    if equal_spec is None:
        pytest.skip(f"{spec} is not mathematically equal to dense")
    dense = compiled_attention("dense")
    variant = make_attention(equal_spec, dense.cfg)
    dense_params = {path[0]: p[...] for path, p in nnx.to_flat_state(dense.state)}
    for name, value in variant.params_from_dense(dense_params).items():
        getattr(variant, name)[...] = value
    x = random_x(dense.cfg)
    y = compiled_attention(equal_spec).forward(nnx.state(variant), x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(dense.forward(dense.state, x)), rtol=1e-5, atol=1e-6,
                               err_msg=f"equals_dense: {equal_spec} differs from dense")


def check_gradients(spec: str) -> None:
    """Gradients are finite, and in float64 equal central finite differences along a random direction."""
    with jax.enable_x64(True):
        c = compiled_attention(spec, "float64")
        graphdef = nnx.graphdef(c.module)
        x = random_x(c.cfg, dtype=np.float64)
        rng = np.random.default_rng(3)
        weights = rng.standard_normal(x.shape)
        direction = jax.tree.map(lambda a: rng.standard_normal(a.shape), (c.state, x))
        eps = 1e-3  # not smaller: fused keeps its softmax in float32 even for float64 inputs

        @jax.jit
        def loss(state, x):
            return (nnx.merge(graphdef, state)(x) * weights).sum()

        # At XLA's default level: level 0 (conftest.py) gives NaN in the float64 gradient of alibi+blockwise
        # (only with its scan's checkpoint recomputation) that the same program computes finite, and equal to
        # finite differences, at 3 (docs/performance.md).
        grads = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=XLA_DEFAULT_BACKEND)(c.state, x)
        assert all(bool(np.isfinite(g).all()) for g in jax.tree.leaves(grads)), "gradients: not finite"
        analytic = sum(float((np.asarray(g) * d).sum()) for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))

        point = jax.tree.map(np.asarray, (c.state, x))  # shifted in numpy: no eager jax ops to compile

        def central(h: float) -> float:
            plus, minus = (float(loss(*jax.tree.map(lambda a, d: a + sign * h * d, point, direction)))
                           for sign in (1.0, -1.0))
            return (plus - minus) / (2 * h)

        numeric = (4 * central(eps / 2) - central(eps)) / 3  # Richardson: cancels the h² error term
        assert numeric == pytest.approx(analytic, rel=1e-4, abs=1e-8), "gradients: differ from finite differences"


def check_sharded_equals_unsharded(spec: str, mesh: jax.sharding.Mesh) -> None:
    """data 4 × tensor 2, heads on 'tensor': the layer's forward pass and a prefill into a cache sharded by
    heads equal one device's."""
    c = compiled_attention(spec)
    x = random_x(c.cfg, seed=5, batch=MESH_BATCH)
    assert_sharded_equals_unsharded(c, x, mesh, ("batch", "length", "act_embed"),
                                    decode=attention.build(spec).supports_decode)


def check_decode_equals_forward(spec: str) -> None:
    """The layer's `extend` (ragged prefill, then one position at a time) reproduces its forward pass."""
    if not attention.build(spec).supports_decode:
        with pytest.raises(ValueError, match="does not support KV-cache decoding"):
            nnx.eval_shape(lambda: GPT(model_config(spec), rngs=nnx.Rngs(0))).cache_layout(BATCH, SEQ)
        return
    c = compiled_attention(spec)
    assert_decode_equals_forward(c, random_x(c.cfg))


def check_flops(spec: str) -> None:
    """Declared mixing FLOPs are positive and equal the matmul FLOPs the forward pass traces, less
    2 FLOPs per projection weight and token, at two sequence lengths. Traced in one query chunk: dense's
    causal_mix skips the masked entries the declared (model) count includes; and without fused's CPU
    kernel, a custom call whose FLOPs the jaxpr does not show."""
    with (unittest.mock.patch.object(DenseAttention, "CAUSAL_QUERY_CHUNKS", 1),
          unittest.mock.patch.object(cpu_attention, "applies", lambda *arrays: False)):
        _check_flops_unchunked(spec)


def _check_flops_unchunked(spec: str) -> None:
    for length in (SEQ, 2 * SEQ):
        cfg = model_config(spec, max_seq_len=2 * SEQ)
        declared = attention.build(spec).fwd_flops_per_token(cfg, length)
        assert math.isfinite(declared) and declared > 0
        attn = nnx.eval_shape(lambda: attention.build(spec).make(cfg, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(attn)
        jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, random_x(cfg, length))
        traced = matmul_flops(jaxpr.jaxpr) / (BATCH * length) - 2 * kernel_sizes(attn)
        assert declared == traced, (
            f"{spec} declares {declared:.0f} mixing FLOPs per token at length {length}; its forward pass "
            f"does {traced:.0f}")


def train_config(spec: str, parameterization: str) -> ml_collections.ConfigDict:
    """The suite's model as a training run; muP with base widths 8 / 16 (m = m_ff = 4), so that every
    multiplier differs from SP's. Layers unrolled: the compile takes half as long as a scan's."""
    config = tiny_config()
    config.model.update({"attention": spec, "scan_layers": False, "parameterization": parameterization,
                         "mup_base_d_model": 8, "mup_base_d_ff": 16})
    return resolve(config)


def check_trains(spec: str) -> None:
    """Under SP and under muP: the parameter table builds, with a row for every parameter, and two steps of
    the training run's own train step (tests.helpers.train_steps) give finite losses and change every
    parameter (the first step has learning rate 0: warmup)."""
    for parameterization in ("sp", "mup"):
        config = train_config(spec, parameterization)
        rows = {row["param"] for row in param_table(config)["params"]}
        # The program that trains, compiled without XLA's slow backend passes: the suite compiles it per variant.
        losses, initial, final = train_steps_from_init(config, 2, compiler_options=FAST_COMPILE)
        assert losses.shape == (2,) and np.all(np.isfinite(losses)), f"{parameterization}: losses {losses}"
        before = {"/".join(map(str, path)): p[...] for path, p in nnx.to_flat_state(initial.params)}
        after = {"/".join(map(str, path)): p[...] for path, p in nnx.to_flat_state(final.params)}
        assert rows == set(after), f"{parameterization}: table rows {sorted(rows ^ set(after))} differ from the state's"
        unchanged = [name for name in after if np.array_equal(after[name], before[name])]
        assert not unchanged, f"{parameterization}: two train steps left {unchanged} unchanged"


CHECKS = {
    "shapes_and_dtypes": check_shapes_and_dtypes,
    "causality": check_causality,
    "equals_dense": check_equals_dense,
    "gradients": check_gradients,
    "sharded": check_sharded_equals_unsharded,
    "decode": check_decode_equals_forward,
    "flops": check_flops,
    "trains": check_trains,
}


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    return make_mesh(ml_collections.ConfigDict({"data": 4, "fsdp": 1, "tensor": 2}), jax.devices())


def run_suite(spec: str, mesh: jax.sharding.Mesh, checks: tuple[str, ...] = tuple(CHECKS)) -> dict[str, str]:
    """The `checks` (default: all) on `spec` → {check name: 'passed' | 'skipped' | the failure message}."""
    results = {}
    for name in checks:
        check = CHECKS[name]
        try:
            check(spec, mesh) if name == "sharded" else check(spec)
            results[name] = "passed"
        except pytest.skip.Exception:
            results[name] = "skipped"
        except AssertionError as e:
            results[name] = f"failed: {e}"
    return results


# --- the suite over the registry ------------------------------------------------------------------------

SPECS = suite_specs()


@pytest.mark.parametrize("spec", SPECS)
def test_shapes_and_dtypes(spec):
    check_shapes_and_dtypes(spec)


@pytest.mark.parametrize("spec", SPECS)
def test_causality(spec):
    check_causality(spec)


@pytest.mark.parametrize("spec", SPECS)
def test_equals_dense(spec):
    check_equals_dense(spec)


@pytest.mark.parametrize("spec", SPECS)
def test_gradients(spec):
    check_gradients(spec)


@pytest.mark.parametrize("spec", SPECS)
def test_sharded_equals_unsharded(spec, mesh):
    check_sharded_equals_unsharded(spec, mesh)


@pytest.mark.parametrize("spec", SPECS)
def test_decode_equals_forward(spec):
    check_decode_equals_forward(spec)


@pytest.mark.parametrize("spec", SPECS)
def test_flops(spec):
    check_flops(spec)


@pytest.mark.parametrize("spec", [spec for spec in SPECS if spec not in COMBINATIONS])
def test_trains(spec):
    check_trains(spec)


def test_suite_covers_every_registered_variant():
    names = {c.name for spec in SPECS for c in attention.build(spec).components}
    assert names == set(attention.registered())
    assert {"dense", "gqa", "mqa", "rope", "alibi", "sliding_window", "blockwise", "fused"} <= names


# --- the model-level decode path (variant independent: checked on both position schemes) ---------

@pytest.mark.parametrize("spec", ["dense", "gqa(kv_heads=2)+rope"])
def test_model_decode_equals_forward(spec):
    """GPT.extend: layer-stacked cache scanned with the blocks, learned positions (or none) at start_B."""
    assert_decode_equals_forward(compiled_model(spec), random_tokens(BATCH))


def test_model_sharded_equals_unsharded(mesh):
    assert_sharded_equals_unsharded(compiled_model("gqa(kv_heads=2)+rope"), random_tokens(MESH_BATCH), mesh,
                                    ("batch", "length"), decode=True)


# --- the suite fails a bad plug-in -------------------------------------------------------------------

def test_suite_catches_a_broken_variant(mesh):
    """A dense copy that forgot the causal mask, registered only here, claiming to equal dense."""

    class Bidirectional(DenseAttention):
        @classmethod
        def dense_equal_options(cls, model_cfg, seq_len):
            return {}

        def visible(self, q_pos_BxT, k_pos_S):
            return jnp.ones((q_pos_BxT.shape[0], q_pos_BxT.shape[1], k_pos_S.shape[0]), bool)

    attention.register("broken_bidirectional")(Bidirectional)
    try:  # not "trains": a layer without its mask trains, and the two compilations would show nothing
        results = run_suite("broken_bidirectional", mesh, checks=tuple(c for c in CHECKS if c != "trains"))
    finally:
        attention.unregister("broken_bidirectional")
    failed = {name for name, result in results.items() if result not in ("passed", "skipped")}
    assert {"causality", "equals_dense", "decode"} <= failed, results
    assert "depend on later inputs" in results["causality"]


# --- docs/attention.md: its worked example is a working plug-in --------------------------------------

REPO = pathlib.Path(__file__).parents[1]
DOC = REPO / "docs" / "attention.md"


def documented_example() -> str:
    return re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)


def table_rows(config: ml_collections.ConfigDict) -> dict[str, dict]:
    return {row["param"]: row for row in param_table(config)["params"]}


def test_documented_example_passes_the_suite(mesh):
    module = types.ModuleType("cgpt_jax.model.attention.kerple_log")
    before = set(attention.registered())
    exec(compile(documented_example(), str(DOC), "exec"), module.__dict__)
    added = set(attention.registered()) - before
    try:
        assert added == {"kerple_log"}
        for example in attention.registered()["kerple_log"].cls.examples:
            results = run_suite(spec_string("kerple_log", example), mesh)
            assert set(results.values()) <= {"passed", "skipped"}, results
            assert results["causality"] == results["decode"] == results["sharded"] == results["trains"] == "passed"
        check_decode_equals_forward("gqa(kv_heads=2)+kerple_log")
        rows = table_rows(train_config("kerple_log", "mup"))
        for name in ("blocks/attn/log_r1", "blocks/attn/log_r2"):  # as declared: LR η, no decay
            assert (rows[name]["group"], rows[name]["lr_multiplier"], rows[name]["weight_decay"]) == ("vector", 1.0, 0.0)
    finally:
        for name in added:
            attention.unregister(name)


# The doc's training command, run as written (`python -m cgpt_jax.train` and its flags) with the variant file
# saved to a temporary folder and registered before the trainer starts, as importing it from
# cgpt_jax/model/attention/ would.
RUN_TRAINER_WITH_VARIANT = textwrap.dedent("""
    import runpy, sys, types
    path = sys.argv[1]
    module = types.ModuleType("cgpt_jax.model.attention." + path.rsplit("/", 1)[-1].removesuffix(".py"))
    exec(compile(open(path).read(), path, "exec"), module.__dict__)
    sys.argv = ["cgpt_jax.train", *sys.argv[2:]]
    runpy.run_module("cgpt_jax.train", run_name="__main__", alter_sys=True)
""")


def documented_train_command() -> list[str]:
    """The arguments of the doc's `python -m cgpt_jax.train ...` command, continuation lines joined."""
    command = re.search(r"^python -m cgpt_jax\.train .*$", DOC.read_text().replace("\\\n", ""), re.M).group(0)
    return shlex.split(command)[3:]


@pytest.mark.parametrize("mup", [False, True], ids=["sp", "mup"])
def test_documented_training_command_trains(tmp_path, mup):
    """The command docs/attention.md gives for its example, a few steps, under SP and (with the documented
    `size=tiny,mup=True`) muP: it finishes, and its parameter table lists the example's parameters."""
    variant_file = tmp_path / "kerple_log.py"
    variant_file.write_text(documented_example())
    args = documented_train_command()
    assert any(a.startswith("--config=experiments/cerebras_gpt.py:size=tiny") for a in args), args
    assert "size=tiny,mup=True" in DOC.read_text()
    workdir = tmp_path / "run"
    args = [f"--workdir={workdir}" if a.startswith("--workdir=") else
            a.replace("size=tiny", "size=tiny,mup=True") if mup and a.startswith("--config=") else a for a in args]
    process = subprocess.run([sys.executable, "-c", RUN_TRAINER_WITH_VARIANT, str(variant_file), *args,
                              "--config.train.steps=3"], cwd=REPO, capture_output=True, text=True, timeout=600,
                             env=one_device_env())
    assert process.returncode == 0, process.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["step"] == 3
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["final_eval_loss"])
    table = json.loads((workdir / PARAM_TABLE).read_text())
    assert table["parameterization"] == ("mup" if mup else "sp")
    groups = {row["param"]: row["group"] for row in table["params"]}
    assert groups["blocks/attn/log_r1"] == groups["blocks/attn/log_r2"] == "vector"


# --- a variant file this project has never seen, with parameters of its own --------------------------

QK_RMS_NORM_FILE = '''"""`qk_rms_norm`: queries and keys RMS-normalised per head, then scaled by learned per-dimension gains."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cgpt_jax.model.attention import register
from cgpt_jax.model.attention.dense import DenseAttention


def rms_normalized(x_BxTxNxK: jax.Array, gain_K: jax.Array) -> jax.Array:
    x = x_BxTxNxK.astype(jnp.promote_types(x_BxTxNxK.dtype, jnp.float32))
    normed = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return (normed * gain_K).astype(x_BxTxNxK.dtype)


@register("qk_rms_norm")
class QKRMSNormAttention(DenseAttention):
    def __init__(self, cfg, *, rngs: nnx.Rngs, **options: Any):
        super().__init__(cfg, rngs=rngs, **options)
        ones_K = jnp.ones((self.head_dim,), jnp.dtype(cfg.param_dtype))
        # q's gain is declared a norm scale; k's declares nothing and, being a vector, gets the default.
        self.q_gain = nnx.Param(ones_K, logical_axes=("head_dim",), param_group="layernorm", init="ones")
        self.k_gain = nnx.Param(ones_K, logical_axes=("head_dim",))

    def project(self, x_BxTxD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        q, k, v = super().project(x_BxTxD)
        return rms_normalized(q, self.q_gain[...]), rms_normalized(k, self.k_gain[...]), v
'''


def test_a_new_variant_with_new_parameters_passes_the_suite_and_trains(tmp_path, mesh):
    """Written to a file outside the package and imported: every check (training under SP and muP
    included) passes, and the table shows each gain's group, declared or default, with no other edit."""
    path = tmp_path / "qk_rms_norm.py"
    path.write_text(QK_RMS_NORM_FILE)
    spec = importlib.util.spec_from_file_location("cgpt_jax.model.attention.qk_rms_norm", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    try:
        results = run_suite("qk_rms_norm", mesh)
        assert set(results.values()) <= {"passed", "skipped"}, results
        assert results["trains"] == results["gradients"] == results["decode"] == "passed"
        for parameterization in ("sp", "mup"):
            rows = table_rows(train_config("qk_rms_norm", parameterization))
            q_gain, k_gain = rows["blocks/attn/q_gain"], rows["blocks/attn/k_gain"]
            assert (q_gain["group"], q_gain["init"], q_gain["weight_decay"]) == ("layernorm", "ones", 0.0)
            assert (k_gain["group"], k_gain["init"], k_gain["weight_decay"]) == ("vector", "module", 0.0)
            assert q_gain["lr_multiplier"] == k_gain["lr_multiplier"] == 1.0
            assert rows["blocks/attn/qkv_kernel"]["lr_multiplier"] == (0.25 if parameterization == "mup" else 1.0)
    finally:
        attention.unregister("qk_rms_norm")


@pytest.mark.parametrize("spec", ["dense", "alibi", "gqa(kv_heads=2)"])
def test_causal_query_chunks_equal_one_block_and_skip_masked_work(spec):
    """dense's causal_mix (4 query chunks, each reading keys up to its last query) gives the outputs and
    gradients of one [L, L] block, at a length 4 does not divide, and traces (n+1)/2n of its score FLOPs."""
    length = 18
    cfg = model_config(spec, max_seq_len=length)
    attn = attention.build(spec).make(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(attn)
    x = jnp.asarray(random_x(cfg, length))

    def loss(s, x):
        y = nnx.merge(graphdef, s)(x)
        return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=y.dtype).reshape(y.shape)))

    def run(chunks: int):
        with unittest.mock.patch.object(DenseAttention, "CAUSAL_QUERY_CHUNKS", chunks):
            flops = matmul_flops(jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, x).jaxpr)
            return (jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x),
                    jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x), flops)

    y1, grads1, flops1 = run(1)
    y4, grads4, flops4 = run(4)
    np.testing.assert_allclose(y4, y1, rtol=1e-6, atol=1e-6)
    for g4, g1 in zip(jax.tree.leaves(grads4), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(g4, g1, rtol=1e-5, atol=1e-6)
    projections = 2 * kernel_sizes(attn) * BATCH * length
    bounds = [length * i // 4 for i in range(5)]
    scores_per_head_dim = sum((end - start) * end for start, end in zip(bounds[:-1], bounds[1:]))
    assert (flops4 - projections) / (flops1 - projections) == pytest.approx(scores_per_head_dim / length**2)
