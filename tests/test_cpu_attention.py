"""The C++ CPU attention kernel (cgpt_jax/kernels/cpu_attention.py): values and gradients against the
pure-JAX reference, sharded against unsharded, its use by `fused`, and what happens where it cannot be
built; its decode-step attention over a cache against float64, and which variants decode through it."""
from __future__ import annotations

import functools
import json
import os
import pathlib
import stat
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax.bench.runners import compile_train_step, random_tokens
from cgpt_jax.kernels import build as kernel_build
from cgpt_jax.kernels import cpu_attention
from cgpt_jax.infer.sampling import Sampling
from cgpt_jax.model import attention as attention_registry
from cgpt_jax.model.attention import dense, fused
from cgpt_jax.model.attention.base import attend
from cgpt_jax.parallel.mesh import MESH_AXES
from cgpt_jax.parallel.sharding import DEFAULT_RULES, activation_sharding, map_shards
from tests.helpers import one_device_env, tiny_config, train_steps

REPO = pathlib.Path(__file__).resolve().parents[1]


def reference(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale):
    length = q_BxLxHxK.shape[1]
    causal_1xLxL = (jnp.arange(length)[None, :] <= jnp.arange(length)[:, None])[None]
    return attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal_1xLxL, None, scale)


def random_arrays(shape, seed=0):
    return tuple(jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(seed), 4))


# The kernel is compiled on first use; a machine without a C++ compiler runs `fused` through XLA instead
# (test_fused_falls_back_to_xla_with_a_warning), and the kernel's own tests cannot run there.
needs_compiler = pytest.mark.skipif(cpu_attention.compiler() is None,
                                    reason="no C++ compiler to build the CPU attention kernel")


def float64_attention(q, k, v, do, scale):
    """Causal attention and its q, k, v gradients for the loss Σ out·do, written out in float64 numpy."""
    q, k, v, do = (np.asarray(a, np.float64).transpose(0, 2, 1, 3) for a in (q, k, v, do))  # [B, H, L, K]
    length = q.shape[2]
    logits = scale * q @ k.transpose(0, 1, 3, 2)
    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = do @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    out, dq, dk, dv = p @ v, scale * ds @ k, scale * ds.transpose(0, 1, 3, 2) @ q, p.transpose(0, 1, 3, 2) @ do
    return tuple(a.transpose(0, 2, 1, 3) for a in (out, dq, dk, dv))


# (B, L, H, K), spread of q and k: the ladder's head dim 16 at 128 positions, Cerebras-GPT's 64, odd
# sizes that leave partial 8-row blocks and partial 16-float vectors, and logits spread over tens
# (spread 7) to hundreds (spread 40: nearly one key per query).
CASES = [((2, 128, 4, 16), 1), ((1, 70, 2, 64), 1), ((3, 37, 4, 16), 1), ((2, 33, 3, 24), 1), ((2, 16, 4, 8), 1),
         ((2, 5, 1, 3), 1), ((1, 1, 1, 1), 1), ((1, 255, 1, 33), 1), ((1, 9, 2, 65), 1), ((2, 64, 2, 16), 7),
         ((2, 64, 2, 16), 40)]


def accuracy_errors(cases: list[tuple[tuple[int, ...], int]]) -> list[dict[str, tuple[float, float]]]:
    """Per case, {output name: (kernel's max error, XLA's max error)} against float64."""
    cpu_attention.load()

    @functools.partial(jax.jit, static_argnums=(0, 5))
    def output_and_grads(attention, q, k, v, do, scale):
        def loss(q, k, v):
            out = attention(q, k, v, scale)
            return jnp.sum(out * do), out
        grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    results = []
    for shape, spread in cases:
        q, k, v, do = random_arrays(shape)
        q, k = spread * q, spread * k
        scale = float(1 / np.sqrt(shape[-1]))
        kernel = jax.tree.leaves(output_and_grads(cpu_attention.causal_attention, q, k, v, do, scale))
        xla = jax.tree.leaves(output_and_grads(reference, q, k, v, do, scale))
        truth = float64_attention(q, k, v, do, scale)
        results.append({name: (float(np.max(np.abs(a - t))),
                               float(max(np.max(np.abs(b - t)), 1.2e-7 * np.max(np.abs(t)))))
                        for name, t, a, b in zip(["out", "dq", "dk", "dv"], truth, kernel, xla)})
    return results


@pytest.fixture(scope="module")
def errors_at_default_flags() -> list[dict[str, tuple[float, float]]]:
    """`accuracy_errors` of every case, in a process with XLA's default flags: the suite's lower backend level
    (conftest.py) changes the rounding of the code XLA generates around the kernel, and accuracy is measured
    as users compile."""
    script = ("import json, sys; sys.path.insert(0, '.'); from tests.test_cpu_attention import CASES, "
              "accuracy_errors; print(json.dumps(accuracy_errors(CASES)))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=one_device_env(XLA_FLAGS=""))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@needs_compiler
@pytest.mark.parametrize("case", range(len(CASES)),
                         ids=[f"{'x'.join(map(str, shape))}-spread{spread}" for shape, spread in CASES])
def test_values_and_gradients_are_as_accurate_as_xla(case, errors_at_default_flags):
    """Output and q, k, v gradients against float64: the kernel's error is at most 2.5 times XLA's float32
    error on the same inputs (measured ≤ 2.0x, mostly ≈ 1x), with a floor of float32 rounding."""
    for name, (kernel_error, xla_error) in errors_at_default_flags[case].items():
        assert kernel_error <= 2.5 * xla_error, f"{name}: kernel error {kernel_error:.2e}, XLA's {xla_error:.2e}"


@needs_compiler
def test_sharded_gradients_equal_unsharded_and_run_per_shard():
    """Batch over data (4), heads over tensor (2): each device runs the kernel on its own [2, L, 2, K]
    shard, and the values and gradients are bitwise those of one device."""
    cpu_attention.load()
    q, k, v, do = random_arrays((8, 24, 4, 16), seed=1)
    kernel = functools.partial(cpu_attention.causal_attention, scale=0.25)

    def value_and_grads(q, k, v):
        def loss(q, k, v):
            out = map_shards(kernel, (dense.QUERY_AXES,) * 3, dense.QUERY_AXES)(q, k, v)
            return jnp.sum(out * do), out
        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

    mesh = jax.make_mesh((4, 1, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:8])
    with activation_sharding(mesh, DEFAULT_RULES):
        sharded = jax.jit(value_and_grads)
        hlo = sharded.lower(q, k, v).compile().as_text()
        sharded_result = sharded(q, k, v)
    unsharded_result = jax.jit(value_and_grads)(q, k, v)
    custom_calls = [line for line in hlo.splitlines() if "custom_call_target=\"cgpt_causal_attention" in line]
    assert len(custom_calls) == 2 and all("f32[2,24,2,16]" in line for line in custom_calls), custom_calls
    for a, b in zip(jax.tree.leaves(sharded_result), jax.tree.leaves(unsharded_result)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_compiler
def test_fused_trains_like_dense_through_the_kernel():
    """The model's compiled train step with `fused` on CPU calls the kernel's forward and backward, and
    3 steps give dense's losses."""
    config = tiny_config()
    config.model.attention = "fused"
    hlo = compile_train_step(config, random_tokens(config), jax.devices()[:1]).compiled.as_text()
    for target in (cpu_attention.FORWARD_TARGET, cpu_attention.BACKWARD_TARGET):
        assert f'custom_call_target="{target}"' in hlo
    fused_losses, _ = train_steps(config, 3)
    config.model.attention = "dense"
    dense_losses, _ = train_steps(config, 3)
    np.testing.assert_allclose(fused_losses, dense_losses, rtol=2e-6)


def _rules_with(**overrides):
    return tuple((name, overrides.get(name, axes)) for name, axes in DEFAULT_RULES)


@needs_compiler
@pytest.mark.parametrize("batch, rules, kernel", [
    (8, _rules_with(batch="data", length="fsdp"), True),  # length split over fsdp: gathered for the kernel
    (6, DEFAULT_RULES, False),                             # 6 rows over data 2 × fsdp 2: XLA instead
], ids=["length-sharded", "batch-undivided"])
def test_fused_under_a_mesh_equals_the_reference(batch, rules, kernel):
    """On a (2, 2, 2) mesh `fused` gives the reference's values and gradients: through the kernel where
    the mesh divides batch and heads, through XLA where it does not."""
    cpu_attention.load()
    layer = fused_layer()
    q, k, v, do = random_arrays((batch, 16, 4, 8), seed=2)

    def output_and_grads(mix, q, k, v):
        def loss(q, k, v):
            out = mix(q, k, v)
            return jnp.sum(out * do), out
        grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:8])
    with activation_sharding(mesh, rules):
        sharded = jax.jit(functools.partial(output_and_grads, lambda q, k, v: layer.mix(q, k, v, None, None)))
        hlo = sharded.lower(q, k, v).as_text()
        result = sharded(q, k, v)
    assert (cpu_attention.FORWARD_TARGET in hlo) == kernel
    expected = output_and_grads(lambda q, k, v: reference(q, k, v, layer.scale), q, k, v)
    for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6 * float(jnp.max(jnp.abs(b))))


@needs_compiler
def test_vmap_runs_the_kernel_per_element():
    cpu_attention.load()
    q, k, v, _ = random_arrays((3, 2, 16, 2, 8), seed=3)
    batched = jax.vmap(lambda q, k, v: cpu_attention.causal_attention(q, k, v, 0.3))(q, k, v)
    np.testing.assert_allclose(batched, jax.vmap(lambda q, k, v: reference(q, k, v, 0.3))(q, k, v), atol=2e-6)


def fused_layer() -> fused.FusedAttention:
    return fused.FusedAttention(tiny_config().model, rngs=nnx.Rngs(0))


def test_missing_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("CGPT_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(cpu_attention.KernelUnavailable, match="no C.. compiler: 'no-such-compiler' is not on PATH"):
        cpu_attention.build()


def fake_compiler(directory, script: str):
    compiler = directory / "bin" / "fake-c++"
    compiler.parent.mkdir()
    compiler.write_text(f"#!/bin/sh\n{script}\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    return compiler


def test_compile_error_is_reported_and_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setenv("CGPT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, "echo 'error: this compiler refuses' >&2; exit 1")))
    with pytest.raises(cpu_attention.KernelUnavailable, match="(?s)compiling cpu_attention.cc failed.*this compiler refuses"):
        cpu_attention.build()
    assert os.listdir(tmp_path / "cache" / "kernels") == []


def test_unwritable_cache_is_reported(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CGPT_JAX_CACHE", str(blocker))
    monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, "exit 1")))  # never reached: the cache fails first
    with pytest.raises(cpu_attention.KernelUnavailable, match="cannot write the kernel cache .*set .CGPT_JAX_CACHE"):
        cpu_attention.build()
    assert blocker.read_text() == "not a directory"


def make_kernel_unavailable(monkeypatch) -> None:
    """`cpu_attention.load` fails as on a machine without a C++ compiler."""
    def unavailable():
        raise cpu_attention.KernelUnavailable("no C++ compiler (test)")

    monkeypatch.setattr(cpu_attention, "load", unavailable)


def test_fused_falls_back_to_xla_with_a_warning(monkeypatch):
    make_kernel_unavailable(monkeypatch)
    dense._cpu_kernels_loaded.cache_clear()
    try:
        layer = fused_layer()
        q, k, v, _ = random_arrays((2, 16, 4, 8))
        with pytest.warns(UserWarning, match=r"attention runs through XLA on CPU: no C\+\+ compiler \(test\)"):
            hlo = jax.jit(layer.mix, static_argnums=(3, 4)).lower(q, k, v, None, None).as_text()
        assert "cgpt_causal_attention" not in hlo
        np.testing.assert_allclose(layer.mix(q, k, v, None, None), reference(q, k, v, layer.scale), atol=1e-6)
    finally:
        dense._cpu_kernels_loaded.cache_clear()


@needs_compiler
def test_a_built_kernel_is_reused(monkeypatch, tmp_path):
    """The second build finds the cached library and does not compile again."""
    monkeypatch.setenv("CGPT_JAX_CACHE", str(tmp_path))
    first = cpu_attention.build()
    assert first.parent == tmp_path / "kernels"
    built = first.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(kernel_build, "_compile", lambda *args: calls.append(args))
    assert cpu_attention.build() == first and first.stat().st_mtime_ns == built and calls == []


# --- a decode step's queries over a cache -------------------------------------------------------------

# (B, T, H, G, S, K): multi-head, grouped (GQA) and one key/value head (MQA), a decode step's one query and
# several, odd head dims (partial vectors), a cache longer than the positions in use.
CACHED_CASES = [(2, 1, 4, 4, 16, 8), (3, 2, 8, 2, 37, 20), (2, 1, 12, 12, 256, 64), (1, 16, 4, 1, 70, 33),
                (2, 3, 6, 3, 9, 1)]


def float64_cached_attention(q, k, v, positions, scale):
    """softmax over the cache slots 0..position of each query, in float64 numpy; [B, T, H, K]."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    heads, kv_heads = q.shape[2], k.shape[1]
    k, v = (np.repeat(a, heads // kv_heads, axis=1) for a in (k, v))  # [B, H, S, K]
    logits = scale * np.einsum("bthk,bhsk->bhts", q, k)
    visible = np.arange(k.shape[2])[None, None, None, :] <= positions[:, None, :, None]
    logits = np.where(visible, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsk->bthk", p, v)


@needs_compiler
@pytest.mark.parametrize("shape", CACHED_CASES, ids=["x".join(map(str, s)) for s in CACHED_CASES])
def test_cached_attention_is_as_accurate_as_xla(shape):
    """Against float64, each query seeing the slots up to its position (the first slot, the last, in
    between): the kernel's error is at most 2.5 times XLA's float32 error on the same inputs."""
    cpu_attention.load()
    batch, queries, heads, kv_heads, slots, head_dim = shape
    keys = jax.random.split(jax.random.key(sum(shape)), 3)
    q = 3 * jax.random.normal(keys[0], (batch, queries, heads, head_dim))
    k, v = (3 * jax.random.normal(key, (batch, kv_heads, slots, head_dim)) for key in keys[1:])
    last = np.linspace(queries - 1, slots - 1, batch).astype(np.int32)  # sequence b's last query's position
    positions = last[:, None] - np.arange(queries)[::-1]
    scale = float(1 / np.sqrt(head_dim))
    got = jax.jit(functools.partial(cpu_attention.cached_attention, scale=scale))(q, k, v, positions)
    visible = jnp.arange(slots)[None, None, :] <= positions[:, :, None]
    xla = attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), visible, None, scale)
    truth = float64_cached_attention(q, k, v, positions, scale)
    kernel_error = np.max(np.abs(np.asarray(got) - truth))
    xla_error = max(np.max(np.abs(np.asarray(xla) - truth)), 1.2e-7 * np.max(np.abs(truth)))
    assert kernel_error <= 2.5 * xla_error, (kernel_error, xla_error)


@needs_compiler
def test_cached_attention_positions_outside_the_cache():
    """A negative position sees no key (zeros); one past the cache sees all of it."""
    cpu_attention.load()
    q = jax.random.normal(jax.random.key(0), (2, 1, 2, 8))
    k, v = (jax.random.normal(jax.random.key(i), (2, 2, 5, 8)) for i in (1, 2))
    got = np.asarray(cpu_attention.cached_attention(q, k, v, jnp.array([[-1], [9]]), 0.5))
    np.testing.assert_array_equal(got[0], 0)
    np.testing.assert_allclose(got[1], float64_cached_attention(q, k, v, np.array([[0], [4]]), 0.5)[1], atol=1e-6)


def inference_hlo(attention: str) -> tuple[str, str]:
    """The HLO of a Generator's (prefill, decode step) for a tiny model with `attention`."""
    from cgpt_jax.infer import Generator
    from cgpt_jax.model import GPT

    cfg = tiny_config().model
    cfg.attention = attention
    generator = Generator(GPT(cfg, rngs=nnx.Rngs(0)), min_bucket=8)
    caches = generator.merge(generator.state, generator.layers)[0].init_layer_caches(2, 16)
    tokens = jnp.zeros((2,), jnp.int32)
    prefill = generator.prefill.lower(generator.state, generator.layers, jnp.zeros((2, 8), jnp.int32), tokens + 8,
                                      tokens, cache_len=16, sampling=Sampling()).as_text()
    decode = generator.decode.lower(generator.state, generator.layers, caches, tokens, tokens + 1, tokens, 0,
                                    sampling=Sampling()).as_text()
    return prefill, decode


@needs_compiler
@pytest.mark.parametrize("attention, causal_kernel, cache_kernel", [
    ("dense", True, True), ("gqa(kv_heads=2)+rope", False, True), ("rope", True, True), ("mqa", False, True),
    ("fused", True, True), ("blockwise(block=4)", True, True), ("alibi", False, False),
    ("sliding_window(window=4)", False, False)])
def test_inference_attends_through_the_kernels_where_attention_is_plain_causal(attention, causal_kernel,
                                                                              cache_kernel):
    """Variants whose attention is plain causal softmax prefill through the causal kernel (where each query
    head has its own key/value head) and decode through the cache kernel; one with a logit bias (alibi) or
    another mask (sliding_window) through its own steps. Their prefill and decoding equal the full
    forward pass either way (tests/test_attention_conformance.py)."""
    prefill, decode = inference_hlo(attention)
    assert (cpu_attention.FORWARD_TARGET in prefill) == causal_kernel
    assert (cpu_attention.CACHED_TARGET in decode) == cache_kernel


def test_inference_falls_back_to_xla_with_a_warning(monkeypatch):
    make_kernel_unavailable(monkeypatch)
    dense._cpu_kernels_loaded.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"attention runs through XLA on CPU: no C\+\+ compiler \(test\)"):
            prefill, decode = inference_hlo("dense")
        assert cpu_attention.FORWARD_TARGET not in prefill and cpu_attention.CACHED_TARGET not in decode
    finally:
        dense._cpu_kernels_loaded.cache_clear()


@needs_compiler
def test_extend_through_the_kernel_has_the_xla_path_gradient(monkeypatch):
    """A prefix or prompt being trained attends over a cache: `extend`'s values and gradients (in x, the
    cache and the weights) through the kernel equal those of the variant's own steps."""
    layer = dense.DenseAttention(tiny_config().model, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 3, 32))
    cache = {name: jax.random.normal(jax.random.key(i), (2, 4, 16, 8)) for i, name in ((2, "k"), (3, "v"))}
    start = jnp.array([5, 9])

    def value_and_grads() -> tuple[str, list[jax.Array]]:
        def loss(weights, x, cache):  # a new function each time: JAX caches traces by function
            y, new_cache = nnx.merge(graphdef, weights).extend(x, cache, start)
            return jnp.sum(jnp.sin(y)) + jnp.sum(new_cache["k"] * new_cache["v"])
        program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        return program.lower(weights, x, cache).as_text(), jax.tree.leaves(program(weights, x, cache))

    graphdef, weights = nnx.split(layer)
    hlo, through_kernel = value_and_grads()
    assert cpu_attention.CACHED_TARGET in hlo
    monkeypatch.setattr(dense, "_cpu_kernels_loaded", lambda: False)
    hlo, through_xla = value_and_grads()
    assert cpu_attention.CACHED_TARGET not in hlo
    for got, want in zip(through_kernel, through_xla):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("attention, rules, kernel", [
    ("dense", DEFAULT_RULES, True),                                   # heads and cache heads over 'tensor'
    ("mqa", DEFAULT_RULES, True),                                     # one cache head, whole on each device
    ("dense", _rules_with(act_heads=None), False),                    # query heads whole, cache heads split
    ("dense", _rules_with(length="fsdp"), False),                     # the cache's length split
], ids=["heads-alike", "mqa", "heads-unlike", "length-split"])
def test_decode_under_a_mesh_uses_the_kernel_only_where_shards_line_up(attention, rules, kernel):
    """On a (2, 2, 2) mesh `extend` of a decode step gives the unsharded values, through the kernel where
    each shard's query heads read its own cache heads and the cache's length is whole, else through XLA."""
    cpu_attention.load()
    cfg = tiny_config().model
    cfg.attention = attention
    layer = attention_registry.build(attention).make(cfg, rngs=nnx.Rngs(0))
    cache = {name: jax.random.normal(jax.random.key(i), (4, layer.kv_heads, 16, 8)) for i, name in ((2, "k"), (3, "v"))}
    x, start = jax.random.normal(jax.random.key(1), (4, 1, 32)), jnp.array([3, 15, 0, 9])
    graphdef, weights = nnx.split(layer)

    def extend(weights, x, cache):
        return nnx.merge(graphdef, weights).extend(x, cache, start)

    expected = jax.jit(extend)(weights, x, cache)
    mesh = jax.make_mesh((2, 2, 2), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:8])
    with activation_sharding(mesh, rules):
        sharded = jax.jit(lambda weights, x, cache: extend(weights, x, cache))
        hlo = sharded.lower(weights, x, cache).as_text()
        result = sharded(weights, x, cache)
    assert (cpu_attention.CACHED_TARGET in hlo) == kernel
    for a, b in zip(jax.tree.leaves(result), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
