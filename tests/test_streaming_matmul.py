"""The streaming matmul kernel (cgpt_jax/kernels/streaming_matmul.py) against float64 numpy for float32,
int8 and int4 weights, inside the float and quantized models (against XLA's path, on one device and sharded
over 8), and the fallback where it cannot be built."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import quantize
from cgpt_jax.kernels import streaming_matmul
from cgpt_jax.model import GPT, few_rows
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.parallel.sharding import activation_sharding, state_shardings
from cgpt_jax.quantize.array import pack_int4
from tests.helpers import tiny_config

needs_compiler = pytest.mark.skipif(streaming_matmul.compiler() is None,
                                    reason="no C++ compiler to build the streaming matmul kernel")
U = 2.0**-24  # float32's unit roundoff


def float64_case(m: int, k: int, n: int, bits: int, groups: int, transposed: bool, seed: int):
    """x, the stored weight (and scales: None for float32) and x · W in float64, with Σ|x||W|."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(m, k)).astype(np.float32)
    if bits == 32:
        stored, scale = rng.normal(size=(n, k) if transposed else (k, n)).astype(np.float32), None
        w = stored.astype(np.float64)
    else:
        qmax = 2 ** (bits - 1) - 1
        q = rng.integers(-qmax, qmax + 1, (n, k) if transposed else (k, n)).astype(np.int8)
        scale = rng.uniform(0.01, 0.1, (n, groups) if transposed else (groups, n)).astype(np.float32)
        w = q.astype(np.float64) * np.repeat(scale, k // groups, axis=1 if transposed else 0)
        stored = np.asarray(pack_int4(jnp.asarray(q))) if bits == 4 else q
    w_KxN = w.T if transposed else w
    return x, stored, scale, x.astype(np.float64) @ w_KxN, np.abs(x.astype(np.float64)) @ np.abs(w_KxN)


# (M, K, N, groups): one row and several (NK float32 weights: up to 4 rows read row by row, with an even and
# an odd number of whole vectors; otherwise blocks of 4, 2 and 1 rows), N with a partial last vector and
# several column chunks (the last narrower), K with a partial last vector and split into several parts,
# odd group counts, groups shorter than a vector (element by element), and the 16-input groups of
# int4:group=16 on an 80-wide model. Float32 weights take no groups.
SHAPES = [(1, 64, 96, 1), (2, 96, 50, 3), (4, 96, 70, 3), (2, 48, 50, 3), (17, 80, 40, 5), (5, 48, 130, 3),
          (3, 40, 62, 20), (9, 256, 64, 8), (16, 64, 300, 2), (6, 70, 34, 1)]


@needs_compiler
@pytest.mark.parametrize("transposed", [False, True], ids=["KN", "NK"])
@pytest.mark.parametrize("bits", [32, 8, 4])
def test_kernel_against_float64(bits, transposed):
    """Every output within float32's summation bound, (K + 2)·u·Σ|x||w|, of the float64 product: a wrong
    index, nibble or scale would be off by the size of a term."""
    streaming_matmul.load()
    call = jax.jit(functools.partial(streaming_matmul.matmul, bits=bits, transposed=transposed))
    for seed, (m, k, n, groups) in enumerate(SHAPES):
        x, w, scale, reference, magnitude = float64_case(m, k, n, bits, groups, transposed, seed)
        y = np.asarray(call(x, w, scale), np.float64)
        assert y.shape == (m, n)
        error = np.abs(y - reference)
        assert np.all(error <= (k + 2) * U * magnitude), (m, k, n, groups, float(np.max(error / magnitude)))


# (M, K, N, groups) for panels: N a whole number of 64-column panels; one row and several (blocks of 4, then
# 1-3), K with a partial segment, split into parts where there are few panels, group counts that are not
# powers of two and groups of 65 inputs.
PANEL_SHAPES = [(1, 64, 64, 1), (1, 768, 64, 4), (2, 96, 192, 3), (3, 48, 64, 3), (4, 256, 256, 8),
                (5, 70, 128, 1), (16, 130, 64, 2), (33, 64, 128, 2), (7, 200, 320, 5)]


def panels_of(stored_KxN: np.ndarray) -> np.ndarray:
    """[K, N] (int4: [K, N/2] bytes) → panels [N/64, K, 64] (int4: [N/64, K, 32])."""
    k, width = stored_KxN.shape[0], streaming_matmul.PANEL // (2 if stored_KxN.dtype == np.uint8 else 1)
    return np.ascontiguousarray(stored_KxN.reshape(k, -1, width).transpose(1, 0, 2))


@needs_compiler
@pytest.mark.parametrize("bits", [32, 8, 4])
def test_panel_kernel_against_float64(bits):
    """The panel layout to the same bound as `test_kernel_against_float64`."""
    streaming_matmul.load()
    call = jax.jit(functools.partial(streaming_matmul.panel_matmul, bits=bits))
    for seed, (m, k, n, groups) in enumerate(PANEL_SHAPES):
        x, w, scale, reference, magnitude = float64_case(m, k, n, bits, groups, False, seed)
        y = np.asarray(call(x, panels_of(w), scale), np.float64)
        assert y.shape == (m, n)
        error = np.abs(y - reference)
        assert np.all(error <= (k + 2) * U * magnitude), (m, k, n, groups, float(np.max(error / magnitude)))


def test_kernel_refuses_bad_input():
    x = jnp.zeros((2, 64), jnp.float32)
    with pytest.raises(ValueError, match="does not meet the weight's 32 inputs"):
        streaming_matmul.matmul(x, jnp.zeros((32, 8), jnp.float32), transposed=False)
    with pytest.raises(ValueError, match="a scale goes with quantized weights"):
        streaming_matmul.matmul(x, jnp.zeros((64, 8), jnp.float32), jnp.ones((1, 8)), transposed=False)
    with pytest.raises(ValueError, match="2-D int8 weight for bits=8"):
        streaming_matmul.matmul(x, jnp.zeros((64, 8), jnp.float16), jnp.ones((1, 8)), bits=8, transposed=False)
    with pytest.raises(ValueError, match=r"uint8 panels \[N/64, K, 32\] for bits=4"):
        streaming_matmul.panel_matmul(x, jnp.zeros((2, 64, 64), jnp.uint8), jnp.ones((1, 128)), bits=4)
    with pytest.raises(ValueError, match="does not meet the panels' 32 inputs"):
        streaming_matmul.panel_matmul(x, jnp.zeros((2, 32, 64), jnp.float32))


def _tiny_model(spec: str) -> GPT:
    """The tiny GPT in float32 (spec 'float32') or quantized by `spec`."""
    config = tiny_config()
    config.model.init_std = 0.2  # logits far from flat, so that a wrong weight shows
    model = GPT(config.model, rngs=nnx.Rngs(0))
    return model if spec == "float32" else quantize.apply(model, quantize.parse(spec))


def _kernel_calls(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines()
            if any(f'custom_call_target="{target}"' in line for target in streaming_matmul.TARGETS)]


def _forward_hlo_and_logits(model: GPT, tokens_BxL: jax.Array, mesh=None, rules=None) -> tuple[str, np.ndarray]:
    graphdef, state = nnx.split(model)
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh, rules))
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    hlo = forward.lower(state, tokens_BxL).compile().as_text()
    return hlo, np.asarray(forward(state, tokens_BxL))


TOKENS = jnp.asarray(np.random.default_rng(1).integers(0, 64, (8, 4)), jnp.int32)


@needs_compiler
@pytest.mark.parametrize("spec", ["float32", "int8", "int4"])
def test_model_through_the_kernel_equals_xla_and_shards(spec):
    """The model's forward pass on the kernel's most rows (16 float32, 32 quantized) calls the kernel for
    its 4 projections per layer and the tied head, and gives XLA's logits to float32 rounding; on 8 devices
    (data, fsdp, tensor = 2, the weights sharded by the rules; float32 and int4) each device runs it on its
    own quarter of the rows and the logits are the one-device ones. With more rows (a prefill, training)
    the matmuls are XLA's."""
    model = _tiny_model(spec)
    rows = few_rows.MAX_ROWS["float" if spec == "float32" else "quantized"]
    tokens_BxL = TOKENS[:rows // TOKENS.shape[1]]
    hlo, logits = _forward_hlo_and_logits(model, tokens_BxL)
    assert model.cfg.scan_layers and len(_kernel_calls(hlo)) == 4 + 1, _kernel_calls(hlo)  # the layer body's, the head's
    with few_rows.xla_only():
        xla_hlo, xla_logits = _forward_hlo_and_logits(model, tokens_BxL)
    assert not _kernel_calls(xla_hlo)
    scale = np.max(np.abs(xla_logits))
    np.testing.assert_allclose(logits, xla_logits, rtol=0, atol=2e-6 * scale)
    assert not _kernel_calls(_forward_hlo_and_logits(model, jnp.concatenate([tokens_BxL, tokens_BxL]))[0])
    if spec == "int8":
        return  # int8 and int4 run the same code under a mesh

    config = tiny_config(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(config.mesh, jax.devices())
    with activation_sharding(mesh, config.mesh.rules):
        sharded_hlo, sharded_logits = _forward_hlo_and_logits(model, tokens_BxL, mesh, config.mesh.rules)
    calls = _kernel_calls(sharded_hlo)
    assert calls and all(f"f32[{rows // 4}," in line.split("custom-call(")[0] for line in calls), calls[:2]
    np.testing.assert_allclose(sharded_logits, logits, rtol=0, atol=2e-6 * scale)


@needs_compiler
@pytest.mark.parametrize("transposed", [False, True], ids=["KN", "NK"])
def test_float_route_is_differentiable(transposed):
    """The float kernel's gradient is XLA's matmuls' (the kernel has none of its own), so a few-row
    training step runs too."""
    rng = np.random.default_rng(0)
    x_BxLxK = jnp.asarray(rng.normal(size=(2, 3, 40)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(24, 40) if transposed else (40, 24)), jnp.float32)
    g_BxLxN = jnp.asarray(rng.normal(size=(2, 3, 24)), jnp.float32)

    def loss(x, w):
        return jnp.sum(few_rows.matmul(x, w, transposed=transposed) * g_BxLxN)

    def reference(x, w):
        return jnp.sum(jnp.einsum("blk,nk->bln" if transposed else "blk,kn->bln", x, w) * g_BxLxN)

    for grad, expected in zip(jax.grad(loss, (0, 1))(x_BxLxK, w), jax.grad(reference, (0, 1))(x_BxLxK, w)):
        np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)


def test_falls_back_to_xla_with_a_warning(monkeypatch):
    def unavailable():
        raise streaming_matmul.KernelUnavailable("no C++ compiler (test)")

    monkeypatch.setattr(streaming_matmul, "load", unavailable)
    few_rows.kernel_loaded.cache_clear()
    try:
        model = _tiny_model("int4")
        with pytest.warns(UserWarning, match=r"few-row matmuls run through XLA on CPU: no C\+\+ compiler \(test\)"):
            hlo, logits = _forward_hlo_and_logits(model, TOKENS)
        assert not _kernel_calls(hlo)
        with few_rows.xla_only():
            np.testing.assert_array_equal(logits, _forward_hlo_and_logits(model, TOKENS)[1])
    finally:
        few_rows.kernel_loaded.cache_clear()
