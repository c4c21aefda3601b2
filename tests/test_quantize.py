"""Weight-only quantization: the arithmetic against a float64 numpy reference, quantized logits against
float logits on a trained tiny model, decoding, sharding, checkpoints and bad input."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import generate, quantize
from cgpt_jax.errors import InputError
from cgpt_jax.finetune.model import SequenceClassifier
from cgpt_jax.infer import Generator
from cgpt_jax.model import GPT
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.quantize.array import pack_int4, unpack_int4
from cgpt_jax.quantize.checkpoint import source_identity
from tests.helpers import tiny_config, train_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMES = ["int8", "int4", "int4:group=8"]  # the arithmetic's; the model tests use the first two
MODEL_SCHEMES = SCHEMES[:2]
PROMPTS = [[5, 17, 3, 40, 22, 9, 1], [60, 2], [7, 7, 31, 12, 50]]


def reference_quantize(w: np.ndarray, a: int, b: int, bits: int, group: int | None):
    """Codes and dequantized weights in float64: absmax / qmax per output channel and input group."""
    qmax = 2 ** (bits - 1) - 1
    inputs = int(np.prod(w.shape[a:b]))
    g = inputs if group is None else group
    w_grouped = w.astype(np.float64).reshape(*w.shape[:a], inputs // g, g, *w.shape[b:])
    scale = np.abs(w_grouped).max(axis=a + 1, keepdims=True) / qmax
    ratio = w_grouped / scale
    codes = np.clip(np.round(ratio), -qmax, qmax)
    return codes.reshape(w.shape), (codes * scale).reshape(w.shape), np.broadcast_to(scale, w_grouped.shape).reshape(
        w.shape), ratio.reshape(w.shape)


@pytest.mark.parametrize("spec", SCHEMES)
@pytest.mark.parametrize("shape, contract", [((2, 32, 3, 4, 8), (1, 2)),  # stacked qkv: [layers, D, 3, H, K]
                                             ((4, 8, 32), (0, 2)),  # attention output: [H, K, D]
                                             ((64, 32), (1, 2))])  # tied head: [V, D]
def test_quantize_dequantize_against_float64_reference(spec, shape, contract):
    scheme = quantize.parse(spec)
    w = np.asarray(jax.random.normal(jax.random.key(0), shape, jnp.float32)) * 0.02
    q = jax.jit(quantize.array.quantize, static_argnums=(1, 2))(jnp.asarray(w), scheme, contract)
    codes, dequantized, scale, ratio = reference_quantize(w, *contract, scheme.bits, scheme.group)
    got = np.asarray(jax.jit(quantize.dequantize)(q), np.float64)
    got_codes = np.asarray(unpack_int4(q.qvalue) if scheme.bits == 4 else q.qvalue)
    # The codes are the reference's except where w/scale sits within float32 rounding of a .5 tie.
    near_tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-4
    assert np.array_equal(got_codes[~near_tie], codes[~near_tie])
    # The error bound of the scheme: |w - q·scale| <= scale/2, scale = absmax/qmax of the weight's group,
    # up to float32 rounding of the scale and the product.
    assert np.all(np.abs(got - w) <= scale / 2 * (1 + 1e-5) + 1e-9)
    np.testing.assert_allclose(got[~near_tie], dequantized[~near_tie], rtol=1e-6, atol=0)
    assert q.qvalue.dtype == (jnp.uint8 if scheme.bits == 4 else jnp.int8)
    assert q.shape == shape and got.shape == shape
    if contract[0] > 0:  # slicing off a leading 'layers' axis (what the per-layer blocks do) keeps it right
        np.testing.assert_array_equal(np.asarray(jax.jit(quantize.dequantize)(jax.tree.map(lambda x: x[1], q))),
                                      got[1])


def test_int4_packing_round_trips_every_value():
    q = jnp.asarray(np.arange(-8, 8, dtype=np.int8).reshape(2, 8))
    packed = pack_int4(q)
    assert packed.shape == (2, 4) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(unpack_int4(packed)), np.asarray(q))


# --- a trained tiny model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    config = tiny_config()
    config.model.max_seq_len = 32
    losses, state = train_steps(config, 30)
    assert losses[-5:].mean() < losses[:5].mean() - 0.3  # it learned something
    graphdef = nnx.graphdef(GPT(config.model, rngs=nnx.Rngs(0)))
    return config, nnx.merge(graphdef, jax.tree.map(jnp.asarray, state.params))


@pytest.fixture(scope="module")
def quantized(trained):
    return {spec: quantize.apply(trained[1], quantize.parse(spec)) for spec in MODEL_SCHEMES}


_forward = nnx.jit(lambda model, tokens_BxL: model(tokens_BxL))  # one compile per model structure and shape
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (4, 32)), jnp.int32)


def _logits(model, tokens):
    return np.asarray(_forward(model, tokens))[..., :model.cfg.vocab_size]


def _relative_weight_error(float_model, quantized_model) -> float:
    """max over quantized weights of ||deq(W) - W||_F / ||W||_F."""
    worst = 0.0
    qflat = dict(nnx.to_flat_state(nnx.state(quantized_model)))
    for path, var in nnx.to_flat_state(nnx.state(float_model)):
        value = qflat[path].get_value()
        if isinstance(value, quantize.QuantizedArray):
            w = np.asarray(var.get_value(), np.float64)
            worst = max(worst, float(np.linalg.norm(np.asarray(quantize.dequantize(value)) - w) / np.linalg.norm(w)))
    return worst


@pytest.fixture(scope="module")
def float_logits(trained):
    return _logits(trained[1], TOKENS)


@pytest.mark.parametrize("spec", MODEL_SCHEMES)
def test_quantized_logits_close_to_float_logits(trained, quantized, float_logits, spec):
    config, model = trained
    qmodel = quantized[spec]
    q_logits = _logits(qmodel, TOKENS)
    # Plumbing: the quantized model computes exactly the float model with W replaced by deq(W).
    dequantized = nnx.merge(nnx.graphdef(model), jax.tree.map(
        lambda v: v.get_value().dequantize() if isinstance(v.get_value(), quantize.QuantizedArray) else v.get_value(),
        nnx.state(qmodel), is_leaf=lambda x: isinstance(x, nnx.Variable)))
    np.testing.assert_allclose(q_logits, _logits(dequantized, TOKENS), rtol=1e-5, atol=1e-5)
    # Tolerance from the scheme: each quantized matmul perturbs its output by at most eps relative (eps the
    # largest relative Frobenius error of a quantized weight, first order), and a token's logits pass
    # through 4 per layer (QKV, output, MLP up and down) plus the embedding lookup and the tied head;
    # through the residual stream the first-order relative errors add up.
    eps = _relative_weight_error(model, qmodel)
    assert eps < {8: 0.01, 4: 0.2}[quantize.parse(spec).bits]  # rounding error <= absmax/(2·qmax) per group
    centered = float_logits - float_logits.mean(-1, keepdims=True)
    error = (q_logits - float_logits) - (q_logits - float_logits).mean(-1, keepdims=True)
    relative = np.linalg.norm(error) / np.linalg.norm(centered)
    assert relative <= (4 * config.model.n_layers + 2) * eps, (relative, eps)
    if spec == "int8":
        assert np.mean(q_logits.argmax(-1) == float_logits.argmax(-1)) > 0.97


def test_sharded_decode_equals_full_forward(trained, quantized):
    """The KV-cache generator on 8 devices (data, fsdp, tensor = 2) gives the greedy tokens of full forward
    passes on one device: decode = full forward and sharded = unsharded at once."""
    config, _ = trained
    qmodel = quantized["int4"]
    mesh = make_mesh(tiny_config(data=2, fsdp=2, tensor=2).mesh, jax.devices())
    sharded = Generator(qmodel, mesh=mesh, rules=config.mesh.rules, min_bucket=8)
    up = sharded.layers[0]["mlp"]["up_kernel"]  # the Generator holds the layers one by one, as pure dicts
    assert tuple(up.qvalue.sharding.spec) == ("fsdp", "tensor")  # [embed, mlp] by the rules
    tokens = sharded.generate(PROMPTS, max_new_tokens=6)
    context = np.zeros(TOKENS.shape, np.int32)
    for row, prompt in enumerate(PROMPTS):
        context[row, :len(prompt)] = prompt
    for i in range(6):
        next_ids = _logits(qmodel, jnp.asarray(context)).argmax(-1)
        for row, prompt in enumerate(PROMPTS):
            assert next_ids[row, len(prompt) + i - 1] == tokens[row][i]
            context[row, len(prompt) + i] = tokens[row][i]


def test_weight_bytes(trained, quantized):
    float_bytes = quantize.weight_bytes(nnx.state(trained[1]))
    assert float_bytes["quantized"] == 0
    matrices = sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(quantized["int8"]))
                   if isinstance(v.get_value(), quantize.QuantizedArray))
    assert matrices == quantize.weight_bytes(nnx.state(quantized["int8"]))["quantized"]
    # wte [64, 32]: int8 codes + one float32 scale per row; int4: half a byte per weight + a scale per 32.
    wte = {spec: nnx.state(quantized[spec])["wte"].get_value() for spec in MODEL_SCHEMES}
    assert wte["int8"].nbytes == 64 * 32 + 64 * 4
    assert wte["int4"].nbytes == 64 * 16 + 64 * 4


def test_checkpoint_round_trip_and_refusals(trained, quantized, tmp_path):
    config, model = trained
    scheme = quantize.parse("int4")
    source = source_identity(tmp_path / "float", nnx.state(model))
    quantize.save(tmp_path / "q", quantized["int4"], scheme, source=source, rules=config.mesh.rules)
    manifest = json.loads((tmp_path / "q" / "quantized.json").read_text())
    assert manifest["scheme"] == "int4" and manifest["source"] == source
    loaded = quantize.load(tmp_path / "q")
    saved_leaves = jax.tree_util.tree_leaves_with_path(nnx.state(quantized["int4"]))
    loaded_leaves = jax.tree_util.tree_leaves_with_path(nnx.state(loaded.model))
    assert [p for p, _ in saved_leaves] == [p for p, _ in loaded_leaves]
    for (_, a), (_, b) in zip(saved_leaves, loaded_leaves):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    # Restored straight into integers and scales: no float32 array of a quantized weight's shape exists.
    assert {str(x.dtype) for x in jax.tree.leaves(nnx.state(loaded.model)["blocks"]["mlp"])} == {"uint8", "float32"}
    assert nnx.state(loaded.model)["blocks"]["mlp"]["up_kernel"].get_value().qvalue.dtype == jnp.uint8
    # The generate command's loader takes the directory as it is.
    via_generate, _ = generate.load(str(tmp_path / "q"))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), nnx.state(via_generate.model),
                                     nnx.state(loaded.model)))
    with pytest.raises(InputError, match="quantized with int4; int8 was asked for"):
        quantize.load(tmp_path / "q", scheme=quantize.parse("int8"))
    with pytest.raises(InputError, match="quantized with int4; int8 was asked for"):
        generate.load(str(tmp_path / "q"), scheme="int8")
    other = tiny_config().model
    other.d_model = 64
    with pytest.raises(InputError, match=r"another model \(model.d_model, model.d_ff|another model \(model.d_model"):
        quantize.load(tmp_path / "q", model_cfg=other)
    with pytest.raises(InputError, match="is not empty"):
        quantize.save(tmp_path / "q", quantized["int4"], scheme, source=source, rules=config.mesh.rules)
    with pytest.raises(InputError, match="already quantized"):
        quantize.apply(quantized["int8"], quantize.parse("int8"))


def test_a_classifier_quantizes_its_head_and_backbone():
    """What `classify --quantize` runs: the classifier's score head and backbone are quantized (its forward
    reads them as GPT's does, tested above)."""
    classifier = nnx.eval_shape(lambda: SequenceClassifier(tiny_config().model, 3, rngs=nnx.Rngs(0)))
    state = jax.eval_shape(functools.partial(quantize.quantize_state, scheme=quantize.parse("int8")),
                           nnx.state(classifier))
    kinds = {"/".join(map(str, path)): isinstance(var.get_value(), quantize.QuantizedArray)
             for path, var in nnx.to_flat_state(state)}
    assert kinds["score"] and kinds["wte"] and kinds["wpe"] and kinds["blocks/mlp/down_kernel"]
    assert not kinds["blocks/mlp/down_bias"] and not kinds["ln_f/scale"]


@pytest.mark.parametrize("spec, message", [
    ("int5", "quantization scheme 'int5' is unknown — use one of int8, int4"),
    ("fp8", "is unknown"),
    ("int4:group=0", "group='0' is not a positive integer"),
    ("int4:group=x", "group='x' is not a positive integer"),
    ("int4:groups=32", "is unknown"),
])
def test_bad_schemes(spec, message):
    with pytest.raises(InputError, match=message):
        quantize.parse(spec)


def test_a_group_that_does_not_divide_an_input_dimension():
    model = GPT(tiny_config().model, rngs=nnx.Rngs(0))
    with pytest.raises(InputError, match=r"int4:group=24: group size 24 does not divide .*input size 32.*"
                                         r"use int4:group=G with G one of \[1, 2, 4, 8, 16, 32\]"):
        quantize.apply(model, quantize.parse("int4:group=24"))


def test_bad_quantize_flags_are_refused_before_any_work(tmp_path):
    with pytest.raises(InputError, match="quantization scheme 'int3' is unknown"):
        generate.load(str(tmp_path / "nothing"), scheme="int3")  # before the path is looked at
    result = subprocess.run([sys.executable, "-m", "cgpt_jax.train", "--config=experiments/cerebras_gpt.py:size=tiny",
                             f"--workdir={tmp_path / 'run'}", "--quantize=int8"], check=False, cwd=REPO,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: flag --quantize=int8: quantization is for inference only" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
