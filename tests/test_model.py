"""The decoder: published parameter counts, init statistics, causality, vocabulary padding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import reference
from cgpt_jax.config import resolve
from cgpt_jax.model import GPT, layers, params_count
from experiments import cerebras_gpt
from tests.helpers import tiny_config

REFERENCE = reference.load()
SIZE_KEYS = {"111m": "111M", "256m": "256M", "590m": "590M", "1.3b": "1.3B", "2.7b": "2.7B",
             "6.7b": "6.7B", "13b": "13B"}


@pytest.mark.parametrize("size", list(SIZE_KEYS))
def test_parameter_counts_match_reference(size):
    published = REFERENCE["models"][SIZE_KEYS[size]]
    model_cfg = cerebras_gpt.get_config(f"size={size}").model
    assert params_count(model_cfg) == published["total_params"]
    assert params_count(model_cfg, non_embedding=True) == published["non_embedding_params"]


@pytest.mark.parametrize("size", list(SIZE_KEYS))
def test_derived_recipe_matches_published(size):
    published = REFERENCE["models"][SIZE_KEYS[size]]
    t = resolve(cerebras_gpt.get_config(f"size={size}")).train
    m = resolve(cerebras_gpt.get_config(f"size={size}")).model
    steps = published["steps"] if size != "13b" else published["batch_size_seqs"]["bs720_equivalent_total_steps"]
    assert abs(t.steps - steps) <= 2  # published step counts round 20 tokens/param down, one of them by 2
    assert t.warmup_steps == published["warmup"]["steps"]
    assert t.peak_lr == published["peak_lr"] and t.adam_eps == published["adam_eps"]
    assert t.decay == published["lr_schedule"]["decay_type"]
    assert m.d_model // m.n_heads == published["d_head"]
    assert m.d_ff == published["d_ff"]
    assert m.output_init_std == pytest.approx(published["init"]["residual_output_layers_std_config"], rel=1e-9)


def test_init_statistics_follow_truncated_normal():
    cfg = tiny_config().model
    cfg.d_model, cfg.d_ff, cfg.vocab_size = 256, 1024, 512
    model = GPT(cfg, rngs=nnx.Rngs(0))
    wte = np.asarray(model.wte[...])
    # torch trunc_normal_(std, ±2std): values within ±2·0.02 and std 0.02·0.8796
    assert np.abs(wte).max() <= 2 * 0.02 + 1e-7
    assert wte.std() == pytest.approx(0.02 * 0.87962566, rel=0.02)
    down = np.asarray(model.blocks.mlp.down_kernel[...])
    assert down.std() == pytest.approx(cfg.output_init_std * 0.87962566, rel=0.02)
    assert np.all(np.asarray(model.blocks.attn.qkv_bias[...]) == 0)
    assert np.all(np.asarray(model.ln_f.scale[...]) == 1)


def test_causal_future_tokens_do_not_change_past_logits():
    model = GPT(tiny_config().model, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    changed = tokens.at[:, 10:].set((tokens[:, 10:] + 7) % 64)
    a, b = model(tokens), model(changed)
    np.testing.assert_array_equal(np.asarray(a[:, :10]), np.asarray(b[:, :10]))
    assert not np.allclose(np.asarray(a[:, 10:]), np.asarray(b[:, 10:]))


def test_vocab_padding_does_not_change_logits():
    cfg = tiny_config().model
    cfg.vocab_size = 60
    plain = GPT(cfg, rngs=nnx.Rngs(0))
    cfg.vocab_pad_multiple = 16
    padded = GPT(cfg, rngs=nnx.Rngs(0))
    assert padded.wte.shape == (64, cfg.d_model)
    padded.wte[...] = jnp.concatenate([plain.wte[...], padded.wte[...][60:]])
    padded.blocks = plain.blocks
    padded.wpe, padded.ln_f = plain.wpe, plain.ln_f
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 60)
    logits_plain, logits_padded = plain(tokens), padded(tokens)
    np.testing.assert_allclose(np.asarray(logits_padded[..., :60]), np.asarray(logits_plain[..., :60]), rtol=1e-6)
    assert np.all(np.isneginf(np.asarray(logits_padded[..., 60:])))


def test_bf16_compute_keeps_f32_params_and_logits():
    cfg = tiny_config().model
    cfg.compute_dtype = "bfloat16"
    model = GPT(cfg, rngs=nnx.Rngs(0))
    logits = model(jnp.zeros((1, 8), jnp.int32))
    assert model.wte[...].dtype == jnp.float32 and logits.dtype == jnp.float32


def test_layer_norm_gradient_equals_autodiff_of_the_formula():
    """layers.layer_norm's written-out backward against jax.grad of the plain formula, in float32."""
    rng = np.random.default_rng(0)
    x, g = (jnp.asarray(rng.normal(2.0, 3.0, (4, 16, 48)), jnp.float32) for _ in range(2))
    scale, bias = (jnp.asarray(rng.normal(size=48), jnp.float32) for _ in range(2))

    def formula(x, scale, bias):
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias

    ours = jax.jit(lambda *a: layers.layer_norm(*a, 1e-5))
    np.testing.assert_allclose(ours(x, scale, bias), formula(x, scale, bias), rtol=1e-6, atol=1e-6)
    grads = jax.jit(jax.grad(lambda *a: (layers.layer_norm(*a, 1e-5) * g).sum(), argnums=(0, 1, 2)))(x, scale, bias)
    expected = jax.jit(jax.grad(lambda *a: (formula(*a) * g).sum(), argnums=(0, 1, 2)))(x, scale, bias)
    for name, got, want in zip(("x", "scale", "bias"), grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()), err_msg=name)
