"""The C++ CPU attention kernel (cgpt_jax/kernels/cpu_attention.py): values and gradients against the
pure-JAX reference, sharded against unsharded, its use by `fused`, and what happens where it cannot be
built."""
from __future__ import annotations

import functools
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax.kernels import cpu_attention
from cgpt_jax.model.attention import fused
from cgpt_jax.model.attention.base import attend
from cgpt_jax.parallel.mesh import MESH_AXES
from cgpt_jax.parallel.sharding import DEFAULT_RULES, activation_sharding, map_shards
from tests.helpers import tiny_config, train_steps

QKV_AXES = ("batch", "length", "act_heads", None)


def reference(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, scale):
    length = q_BxLxHxK.shape[1]
    causal_1xLxL = (jnp.arange(length)[None, :] <= jnp.arange(length)[:, None])[None]
    return attend(q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, causal_1xLxL, None, scale)


def random_arrays(shape, seed=0):
    return tuple(jax.random.normal(key, shape) for key in jax.random.split(jax.random.key(seed), 4))


# (B, L, H, K): the ladder's head dim 16 at 128 positions, Cerebras-GPT's 64, and odd sizes that leave
# partial 4-row blocks and partial 16-float vectors.
SHAPES = [(2, 128, 4, 16), (1, 70, 2, 64), (3, 37, 4, 16), (2, 33, 3, 24), (2, 16, 4, 8), (2, 5, 1, 3), (1, 1, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_and_gradients_equal_the_reference(shape):
    cpu_attention.load()
    q, k, v, do = random_arrays(shape)
    scale = 1 / np.sqrt(shape[-1])

    @functools.partial(jax.jit, static_argnums=0)
    def output_and_grads(attention, q, k, v):
        def loss(q, k, v):
            out = attention(q, k, v, scale)
            return jnp.sum(out * do), out
        grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    for kernel_value, reference_value in zip(jax.tree.leaves(output_and_grads(cpu_attention.causal_attention, q, k, v)),
                                             jax.tree.leaves(output_and_grads(reference, q, k, v))):
        # float32 rounding of different summation orders: measured at most 3.3e-7 of the largest entry
        error = float(jnp.max(jnp.abs(kernel_value - reference_value)))
        assert error <= 2e-6 * float(jnp.max(jnp.abs(reference_value))), error


def test_sharded_gradients_equal_unsharded_and_run_per_shard():
    """Batch over data (4), heads over tensor (2): each device runs the kernel on its own [2, L, 2, K]
    shard, and the values and gradients are bitwise those of one device."""
    cpu_attention.load()
    q, k, v, do = random_arrays((8, 24, 4, 16), seed=1)
    kernel = functools.partial(cpu_attention.causal_attention, scale=0.25)

    def value_and_grads(q, k, v):
        def loss(q, k, v):
            out = map_shards(kernel, (QKV_AXES,) * 3, QKV_AXES)(q, k, v)
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


def test_fused_trains_like_dense_through_the_kernel():
    """The model's train step with `fused` on CPU calls the kernel, and 3 steps give dense's losses."""
    config = tiny_config()
    config.model.attention = "fused"
    fused_losses, _ = train_steps(config, 3)
    config.model.attention = "dense"
    dense_losses, _ = train_steps(config, 3)
    np.testing.assert_allclose(fused_losses, dense_losses, rtol=2e-6)

    x = jnp.ones((2, 16, 4, 8))
    layer = fused_layer()
    hlo = jax.jit(layer.mix, static_argnums=(3, 4)).lower(x, x, x, None, None).as_text()
    assert "cgpt_causal_attention_forward" in hlo


def fused_layer() -> fused.FusedAttention:
    return fused.FusedAttention(tiny_config().model, rngs=nnx.Rngs(0))


def test_missing_compiler_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("CGPT_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(cpu_attention.KernelUnavailable, match="no C.. compiler: 'no-such-compiler' is not on PATH"):
        cpu_attention.build()


def test_compile_error_is_reported_and_leaves_nothing_behind(monkeypatch, tmp_path):
    failing = tmp_path / "bin" / "failing-c++"
    failing.parent.mkdir()
    failing.write_text("#!/bin/sh\necho 'error: this compiler refuses' >&2\nexit 1\n")
    failing.chmod(failing.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CGPT_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(failing))
    with pytest.raises(cpu_attention.KernelUnavailable, match="(?s)compiling cpu_attention.cc failed.*this compiler refuses"):
        cpu_attention.build()
    assert os.listdir(tmp_path / "cache" / "kernels") == []


def test_unwritable_cache_is_reported(monkeypatch, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("CGPT_JAX_CACHE", str(blocker))
    with pytest.raises(cpu_attention.KernelUnavailable, match="cannot write the kernel cache .*set .CGPT_JAX_CACHE"):
        cpu_attention.build()
    assert blocker.read_text() == "not a directory"


def test_fused_falls_back_to_xla_with_a_warning(monkeypatch):
    def unavailable():
        raise cpu_attention.KernelUnavailable("no C++ compiler (test)")

    monkeypatch.setattr(cpu_attention, "load", unavailable)
    fused._cpu_kernel_loaded.cache_clear()
    try:
        layer = fused_layer()
        q, k, v, _ = random_arrays((2, 16, 4, 8))
        with pytest.warns(UserWarning, match=r"XLA implementation on CPU: no C\+\+ compiler \(test\)"):
            hlo = jax.jit(layer.mix, static_argnums=(3, 4)).lower(q, k, v, None, None).as_text()
        assert "cgpt_causal_attention" not in hlo
        np.testing.assert_allclose(layer.mix(q, k, v, None, None), reference(q, k, v, layer.scale), atol=1e-6)
    finally:
        fused._cpu_kernel_loaded.cache_clear()


def test_a_built_kernel_is_reused(monkeypatch, tmp_path):
    """The second build finds the cached library and does not compile again."""
    monkeypatch.setenv("CGPT_JAX_CACHE", str(tmp_path))
    first = cpu_attention.build()
    assert first.parent == tmp_path / "kernels"
    built = first.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(cpu_attention, "_compile", lambda *args: calls.append(args))
    assert cpu_attention.build() == first and first.stat().st_mtime_ns == built and calls == []
