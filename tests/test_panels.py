"""The decode step's projections and tied token table laid out in column panels (cgpt_jax/infer/panels.py): a
PanelArray reads as the weight it replaces, the generator lays its weights out so on one CPU device and
decodes through the panel kernel without copying a weight, with the tokens of the layout it replaced, float32
and quantized."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import quantize
from cgpt_jax.infer import Generator, Sampling, panels
from cgpt_jax.kernels import streaming_matmul
from cgpt_jax.model import GPT, few_rows
from cgpt_jax.quantize.array import QuantizedArray, quantize as quantize_array
from tests.helpers import tiny_config
from tests.test_generate import SAMPLING, copies_of_size
from tests.test_streaming_matmul import needs_compiler


def _weight(spec: str, shape: tuple[int, ...], inputs: int) -> jax.Array | QuantizedArray:
    w = jax.random.normal(jax.random.key(len(shape)), shape, jnp.float32)
    if spec == "float32":
        return w
    return quantize_array(w, quantize.parse(spec), (0, inputs))


@needs_compiler
@pytest.mark.parametrize("spec", ["float32", "int8", "int4:group=16"])
@pytest.mark.parametrize("shape, inputs", [((32, 3, 2, 32), 1), ((2, 32, 128), 2)], ids=["qkv-like", "out-like"])
def test_panel_array_reads_as_its_weight(spec, shape, inputs):
    """`param[...]` gives the weight (dequantized) exactly; `matmul_rows` gives x @ W through the kernel at a
    decode step's rows and a prefill's, and through XLA's matmul where the kernel does not run."""
    weight = _weight(spec, shape, inputs)
    dense = weight if spec == "float32" else weight.dequantize()
    array = panels.panel_array(weight, inputs)
    assert array.shape == shape and array.panels.shape[0] == np.prod(shape[inputs:]) // streaming_matmul.PANEL
    np.testing.assert_array_equal(array[...], dense)
    k = int(np.prod(shape[:inputs]))
    w_KxN = np.asarray(dense, np.float64).reshape(k, -1)
    for rows in (2, 40):  # a decode step's, a prefill's (more than the kernel's MAX_ROWS for [K, N] weights)
        x_1xRxK = jax.random.normal(jax.random.key(rows), (1, rows, k), jnp.float32)
        reference = np.asarray(x_1xRxK[0], np.float64) @ w_KxN
        hlo = jax.jit(array.matmul_rows).lower(x_1xRxK).compile().as_text()
        assert streaming_matmul.FLOAT_PANEL_TARGET in hlo or streaming_matmul.QUANTIZED_PANEL_TARGET in hlo
        with few_rows.xla_only():
            xla_hlo = jax.jit(array.matmul_rows).lower(x_1xRxK).compile().as_text()
            assert "panel_matmul" not in xla_hlo
            xla = np.asarray(jax.jit(array.matmul_rows)(x_1xRxK))[0]
        for y in (np.asarray(jax.jit(array.matmul_rows)(x_1xRxK))[0], xla):
            np.testing.assert_allclose(y, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


@needs_compiler
@pytest.mark.parametrize("spec", ["float32", "int8", "int4:group=16"])
def test_token_table_reads_as_its_table(spec):
    """The token table [V, D], V = 100 not a multiple of the panel: `[...]` gives the table, `take_rows` its
    rows (an embedding lookup), `matmul_rows` the LM head x @ tableᵀ with V columns, through the kernel and
    through XLA."""
    vocab, d_model = 100, 32
    table = jax.random.normal(jax.random.key(0), (vocab, d_model), jnp.float32)
    if spec != "float32":
        table = quantize_array(table, quantize.parse(spec), (1, 2))
    dense = np.asarray(table if spec == "float32" else table.dequantize())
    array = jax.jit(panels.token_table)(table)
    assert array.table and array.shape == (vocab, d_model) and array.panels.shape[:2] == (2, d_model)
    np.testing.assert_array_equal(array[...], dense)
    ids = jnp.array([[0, 63, 64, 99], [1, 2, 65, 98]])
    np.testing.assert_array_equal(jax.jit(array.take_rows)(ids), dense[np.asarray(ids)])
    for rows in (1, 40):
        x_1xRxD = jax.random.normal(jax.random.key(rows), (1, rows, d_model), jnp.float32)
        reference = np.asarray(x_1xRxD[0], np.float64) @ dense.T.astype(np.float64)
        target = streaming_matmul.FLOAT_PANEL_TARGET if spec == "float32" else streaming_matmul.QUANTIZED_PANEL_TARGET
        assert target in jax.jit(array.matmul_rows).lower(x_1xRxD).as_text()
        with few_rows.xla_only():
            xla = np.asarray(jax.jit(array.matmul_rows)(x_1xRxD))[0]
        for y in (np.asarray(jax.jit(array.matmul_rows)(x_1xRxD))[0], xla):
            assert y.shape == (rows, vocab)
            np.testing.assert_allclose(y, reference, rtol=0, atol=1e-5 * np.abs(reference).max())


def test_panel_array_refuses_a_partial_panel():
    assert panels.panel_array(jnp.zeros((64, 96)), 1) is None  # 96 columns: one and a half panels


def _model(spec: str) -> GPT:
    """A GPT whose every projection has a whole number of panels (d_model 64: qkv 192, out 64, up 128,
    down 64 columns) and whose vocabulary (100) has not, logits far from flat so that a wrong weight shows."""
    config = tiny_config().model
    config.d_model, config.d_ff, config.max_seq_len, config.init_std = 64, 128, 32, 0.2
    config.vocab_size = 100
    model = GPT(config, rngs=nnx.Rngs(3))
    return model if spec == "float32" else quantize.apply(model, quantize.parse(spec))


def _kernels(layer: dict) -> dict:
    return {f"{module}/{name}": value for module, params in layer.items() if isinstance(params, dict)
            for name, value in params.items() if name.endswith("kernel")}


@needs_compiler
@pytest.mark.parametrize("spec", ["float32", "int8", "int4:group=16"])
def test_generator_decodes_through_panels(spec, monkeypatch):
    """Every projection of every layer and the token table are PanelArrays; the compiled decode step calls
    the panel kernel for each (the LM head once) and copies no weight; greedy and sampled continuations
    equal those of the weights in their own layout (the generator built where panels are not laid out)."""
    model = _model(spec)
    generator = Generator(model, min_bucket=8)
    for layer in generator.layers:
        assert {type(v).__name__ for v in _kernels(layer).values()} == {"PanelArray"}, _kernels(layer)
    assert generator.state["wte"].table
    batch, cache_len = generator.batch_sizes(1)[1], 16
    caches = model.init_layer_caches(batch, cache_len)
    token_B = jnp.zeros((batch,), jnp.int32)
    hlo = generator.decode.lower(generator.state, generator.layers, caches, token_B, token_B + 1, token_B, 0,
                                 sampling=SAMPLING).compile().as_text()
    target = streaming_matmul.FLOAT_PANEL_TARGET if spec == "float32" else streaming_matmul.QUANTIZED_PANEL_TARGET
    assert hlo.count(f'custom_call_target="{target}"') == 4 * model.cfg.n_layers + 1
    sizes = {v.panels.size for layer in generator.layers for v in _kernels(layer).values()}
    assert copies_of_size(hlo, sizes | {generator.state["wte"].panels.size}) == []

    prompts = [list(range(5, 17)), [7, 3, 9]]
    with_panels = [generator.generate(prompts, max_new_tokens=6, sampling=s) for s in (Sampling(), SAMPLING)]
    monkeypatch.setattr(panels, "kernel_runs", lambda: False)
    own_layout = Generator(model, min_bucket=8)
    assert not any(isinstance(v, panels.PanelArray) for layer in own_layout.layers for v in _kernels(layer).values())
    assert not isinstance(own_layout.state["wte"], panels.PanelArray)
    assert with_panels == [own_layout.generate(prompts, max_new_tokens=6, sampling=s) for s in (Sampling(), SAMPLING)]
    assert quantize.weight_bytes(generator.layers) == quantize.weight_bytes(own_layout.layers)


@needs_compiler
@pytest.mark.parametrize("attention", ["gqa(kv_heads=2)+rope", "mqa+sliding_window(window=4)+alibi", "fused"])
def test_attention_variants_decode_through_panels(attention, monkeypatch):
    """The variants' own projections (gqa's q and kv kernels; mqa's 32-column kv kernel keeps its layout)
    decode through panels without a copy, with the tokens of the weights in their own layout."""
    config = tiny_config().model
    config.d_model, config.d_ff, config.max_seq_len, config.init_std = 64, 128, 32, 0.2
    config.attention = attention
    model = GPT(config, rngs=nnx.Rngs(3))
    generator = Generator(model, min_bucket=8)
    laid_out = {name for name, v in _kernels(generator.layers[0]).items() if isinstance(v, panels.PanelArray)}
    assert laid_out >= {"attn/out_kernel", "mlp/up_kernel", "mlp/down_kernel"}, laid_out
    batch = generator.batch_sizes(1)[1]
    caches, token_B = model.init_layer_caches(batch, 16), jnp.zeros((batch,), jnp.int32)
    hlo = generator.decode.lower(generator.state, generator.layers, caches, token_B, token_B + 1, token_B, 0,
                                 sampling=SAMPLING).compile().as_text()
    sizes = {v.panels.size for layer in generator.layers for v in _kernels(layer).values()
             if isinstance(v, panels.PanelArray)}
    assert copies_of_size(hlo, sizes) == []
    prompts = [list(range(5, 17)), [7, 3, 9]]
    with_panels = generator.generate(prompts, max_new_tokens=6, sampling=SAMPLING)
    monkeypatch.setattr(panels, "kernel_runs", lambda: False)
    assert with_panels == Generator(model, min_bucket=8).generate(prompts, max_new_tokens=6, sampling=SAMPLING)
