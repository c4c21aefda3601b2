"""The quantized matmul kernel (cgpt_jax/kernels/quantized_matmul.py) against float64 numpy, inside the
quantized model (against XLA's dequantize-then-matmul path, on one device and sharded over 8), and the
fallback where it cannot be built."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import quantize
from cgpt_jax.kernels import quantized_matmul
from cgpt_jax.model import GPT
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.parallel.sharding import activation_sharding, state_shardings
from cgpt_jax.quantize import matmul
from cgpt_jax.quantize.array import pack_int4
from tests.helpers import tiny_config

needs_compiler = pytest.mark.skipif(quantized_matmul.compiler() is None,
                                    reason="no C++ compiler to build the quantized matmul kernel")
U = 2.0**-24  # float32's unit roundoff


def float64_case(m: int, k: int, n: int, bits: int, groups: int, transposed: bool, seed: int):
    """x, the stored integers and scales, and x · dequantize(W) in float64."""
    rng = np.random.default_rng(seed)
    qmax = 2 ** (bits - 1) - 1
    q = rng.integers(-qmax, qmax + 1, (n, k) if transposed else (k, n)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, (n, groups) if transposed else (groups, n)).astype(np.float32)
    w_KxN = q.astype(np.float64) * np.repeat(scale, k // groups, axis=1 if transposed else 0)
    w_KxN = w_KxN.T if transposed else w_KxN
    x = rng.normal(size=(m, k)).astype(np.float32)
    stored = np.asarray(pack_int4(jnp.asarray(q))) if bits == 4 else q
    return x, stored, scale, x.astype(np.float64) @ w_KxN, np.abs(x.astype(np.float64)) @ np.abs(w_KxN)


# (M, K, N, groups): one row and several (8-row blocks and a remainder), N with a partial last strip of
# 32 columns, K with a partial last vector, odd group counts, groups shorter than a vector (element by
# element), and the 16-input groups of int4:group=16 on an 80-wide model.
SHAPES = [(1, 64, 96, 1), (2, 96, 50, 3), (17, 80, 40, 5), (5, 48, 130, 3), (3, 40, 62, 20), (9, 256, 64, 8)]


@needs_compiler
@pytest.mark.parametrize("transposed", [False, True], ids=["KN", "NK"])
@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_against_float64(bits, transposed):
    """Every output within float32's summation bound, (K + 2)·u·Σ|x||w|, of the float64 product: a wrong
    index, nibble or scale would be off by the size of a term."""
    quantized_matmul.load()
    call = jax.jit(functools.partial(quantized_matmul.matmul, bits=bits, transposed=transposed))
    for seed, (m, k, n, groups) in enumerate(SHAPES):
        x, q, scale, reference, magnitude = float64_case(m, k, n, bits, groups, transposed, seed)
        y = np.asarray(call(x, q, scale), np.float64)
        assert y.shape == (m, n)
        error = np.abs(y - reference)
        assert np.all(error <= (k + 2) * U * magnitude), (m, k, n, groups, float(np.max(error / magnitude)))


def _tiny_quantized(spec: str) -> GPT:
    config = tiny_config()
    config.model.init_std = 0.2  # logits far from flat, so that a wrong weight shows
    return quantize.apply(GPT(config.model, rngs=nnx.Rngs(0)), quantize.parse(spec))


def _forward_hlo_and_logits(model: GPT, tokens_BxL: jax.Array, mesh=None, rules=None) -> tuple[str, np.ndarray]:
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh, rules))
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    hlo = forward.lower(state, tokens_BxL).compile().as_text()
    return hlo, np.asarray(forward(state, tokens_BxL))


TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 64, (8, 4)), jnp.int32)  # 32 rows: the kernel's


@needs_compiler
@pytest.mark.parametrize("spec", ["int8", "int4"])
def test_model_through_the_kernel_equals_xla_and_shards(spec):
    """The quantized model's forward pass on 32 rows calls the kernel for its 4 projections per layer and
    the tied head, and gives XLA's dequantize-then-matmul logits to float32 rounding; on 8 devices (data,
    fsdp, tensor = 2, the weights sharded by the rules) each device runs it on its own 8 rows and the
    logits are the one-device ones."""
    model = _tiny_quantized(spec)
    hlo, logits = _forward_hlo_and_logits(model, TOKENS)
    calls = [line for line in hlo.splitlines() if f'custom_call_target="{quantized_matmul.TARGET}"' in line]
    assert model.cfg.scan_layers and len(calls) == 4 + 1, len(calls)  # the scanned layer body's and the head's
    with matmul.xla_only():
        xla_hlo, xla_logits = _forward_hlo_and_logits(model, TOKENS)
    assert quantized_matmul.TARGET not in xla_hlo
    scale = np.max(np.abs(xla_logits))
    np.testing.assert_allclose(logits, xla_logits, rtol=0, atol=2e-6 * scale)

    config = tiny_config(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(config.mesh, jax.devices())
    with activation_sharding(mesh, config.mesh.rules):
        sharded_hlo, sharded_logits = _forward_hlo_and_logits(model, TOKENS, mesh, config.mesh.rules)
    calls = [line for line in sharded_hlo.splitlines() if f'custom_call_target="{quantized_matmul.TARGET}"' in line]
    assert calls and all("f32[8," in line.split("custom-call(")[0] for line in calls), calls[:2]
    np.testing.assert_allclose(sharded_logits, logits, rtol=0, atol=2e-6 * scale)


def test_falls_back_to_xla_with_a_warning(monkeypatch):
    def unavailable():
        raise quantized_matmul.KernelUnavailable("no C++ compiler (test)")

    monkeypatch.setattr(quantized_matmul, "load", unavailable)
    matmul._kernel_loaded.cache_clear()
    try:
        model = _tiny_quantized("int4")
        with pytest.warns(UserWarning, match=r"dequantize through XLA on CPU: no C\+\+ compiler \(test\)"):
            hlo, logits = _forward_hlo_and_logits(model, TOKENS)
        assert quantized_matmul.TARGET not in hlo
        with matmul.xla_only():
            np.testing.assert_array_equal(logits, _forward_hlo_and_logits(model, TOKENS)[1])
    finally:
        matmul._kernel_loaded.cache_clear()
