"""muP as Cerebras implemented it: the published per-size values, every multiplier where it belongs (init,
forward, optimizer), every attention variant on the shared scale, SP untouched, and the start-up table."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import reference
from cgpt_jax.config import resolve, validate
from cgpt_jax.model import GPT, attention, parameterization
from cgpt_jax.train.loop import train_and_evaluate
from cgpt_jax.train.optimizer import make_optimizer
from cgpt_jax.train.param_table import PARAM_TABLE, format_param_table, param_table
from cgpt_jax.treepath import path_name
from experiments import cerebras_gpt
from tests.helpers import tiny_config
from tests.test_attention_conformance import randomized

REFERENCE = reference.load()
MUP_SIZES = {"111m": "111M", "256m": "256M", "590m": "590M", "1.3b": "1.3B", "2.7b": "2.7B"}
TRUNCATED_STD = 0.87962566  # std of N(0, 1) truncated at ±2: what trunc_normal(std) gives, times std


def mup_config(**model):
    """tiny_config (d_model 32, d_ff 64) under muP with base widths 8 / 16: m = m_ff = 4."""
    config = tiny_config()
    config.model.update({"parameterization": "mup", "mup_base_d_model": 8, "mup_base_d_ff": 16, **model})
    return resolve(config)


def rows_by_group(table: dict) -> dict[str, dict]:
    return {row["group"]: row for row in table["params"]}


@pytest.mark.parametrize("size", list(MUP_SIZES))
def test_published_mup_configs(size):
    published = REFERENCE["mup"]["models"][MUP_SIZES[size]]
    config = resolve(cerebras_gpt.get_config(f"size={size},mup=True"))
    m, t = config.model, config.train
    table = param_table(config)
    groups = rows_by_group(table)
    approx = lambda x: pytest.approx(x, rel=1e-9)  # noqa: E731
    assert table["width_multiplier"] == approx(published["width_multiplier_m_width"])
    assert groups["embedding"]["init_std"] == approx(published["embedding_init_std"])
    for group in ("attn_input", "mlp_input"):
        assert groups[group]["init_std"] == approx(published["hidden_init_std"])
    for group in ("attn_output", "mlp_output"):
        assert groups[group]["init_std"] == approx(published["residual_output_init_std"])
    for group in ("attn_input", "mlp_input", "attn_output", "mlp_output"):
        assert groups[group]["lr_multiplier"] == approx(published["hidden_weight_lr_multiplier"])
        assert groups[group]["peak_lr"] == approx(published["hidden_weight_peak_lr"])
    for group in ("embedding", "layernorm", "bias"):
        assert groups[group]["peak_lr"] == approx(published["embedding_ln_bias_peak_lr"])
    assert t.peak_lr == published["base_lr"]
    assert groups["embedding"]["forward"] == {"embedding_output": published["embeddings_scale_m_emb"],
                                              "output_logits": approx(published["output_logits_scale"])}
    assert table["attention_scale"] == 1 / (m.d_model // m.n_heads)  # 1/d_head
    assert published["attention_scale"].startswith("1/d_head")
    assert t.warmup_steps == published["warmup_steps"] and t.global_batch_size == published["batch_size_seqs"]
    assert abs(t.steps - published["steps"]) <= 2  # as for SP: 20 tokens/param rounded down
    assert (t.adam_eps, t.weight_decay, t.final_lr_fraction, t.decay) == (
        published["adam_eps"], published["weight_decay"], published["final_lr_fraction"],
        published["lr_decay_in_modelzoo_config"])
    tuned = REFERENCE["mup"]["tuned_values"]
    assert (m.mup_base_d_model, m.mup_base_d_ff, m.mup_embedding_multiplier) == (
        tuned["d_base"], tuned["d_ff_base"], tuned["m_emb"])


def test_mup_flag_and_fields_are_checked():
    with pytest.raises(ValueError, match="muP models only for"):
        cerebras_gpt.get_config("size=6.7b,mup=True")
    assert [run["config_arg"] for run in cerebras_gpt.sweep("mup=True")][0] == "size=111m,mup=True"
    for change, message in ((dict(parameterization="mu_p"), "model.parameterization='mu_p' — use one of 'sp', 'mup'"),
                            (dict(mup_base_d_model=0), "model.mup_base_d_model=0 — use an integer >= 1")):
        config = tiny_config()
        config.model.update(change)
        with pytest.raises(ValueError, match=message):
            validate(config, 8)


def test_sp_table_is_the_identity_and_sp_optimizer_is_plain_adamw():
    config = tiny_config()
    table = param_table(config)
    m = config.model
    assert (table["width_multiplier"], table["embedding_multiplier"], table["output_logits_multiplier"]) == (1, 1, 1)
    assert table["attention_scale"] == 1 / math.sqrt(m.d_model // m.n_heads)
    for row in table["params"]:
        assert row["lr_multiplier"] == 1.0
        if row["init"] == "trunc_normal":
            assert row["init_std"] == (m.output_init_std if row["group"].endswith("output") else m.init_std)
    params = nnx.state(randomized(lambda: GPT(m, rngs=nnx.Rngs(0))), nnx.Param)
    grads = nnx.state(randomized(lambda: GPT(m, rngs=nnx.Rngs(0)), seed=1), nnx.Param)
    plain, with_model = make_optimizer(config.train), make_optimizer(config.train, m)
    a, _ = jax.jit(plain.update)(grads, plain.init(params), params)
    b, _ = jax.jit(with_model.update)(grads, with_model.init(params), params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_mup_optimizer_scales_each_update_by_its_group_lr():
    """Adam step and decoupled decay together times the group's LR multiplier (Cerebras's AdamBase)."""
    config = mup_config()
    config.train.warmup_steps = 0
    params = nnx.state(randomized(lambda: GPT(config.model, rngs=nnx.Rngs(0))), nnx.Param)  # non-zero: decay shows
    grads = nnx.state(randomized(lambda: GPT(config.model, rngs=nnx.Rngs(0)), seed=1), nnx.Param)
    base_tx, mup_tx = make_optimizer(config.train), make_optimizer(config.train, config.model)
    base, _ = jax.jit(base_tx.update)(grads, base_tx.init(params), params)
    scaled, _ = jax.jit(mup_tx.update)(grads, mup_tx.init(params), params)
    expected = {"embedding": 1.0, "attn_input": 0.25, "mlp_input": 0.25, "attn_output": 0.25, "mlp_output": 0.25,
                "layernorm": 1.0, "bias": 1.0}
    for (path, b), (_, s) in zip(nnx.to_flat_state(base), nnx.to_flat_state(scaled)):
        factor = expected[parameterization.param_group("/".join(path), b)]  # updates keep the declarations
        np.testing.assert_allclose(np.asarray(s[...]), factor * np.asarray(b[...]), rtol=1e-6)


def test_existing_parameters_keep_their_groups_and_rules():
    """The table of a muP model with every kind of parameter (gqa: q/kv kernels; rope: no wpe; m = m_ff = 4),
    as it was when groups were looked up by parameter name: (group, init, init std, LR multiplier, decay)."""
    config = mup_config(attention="gqa(kv_heads=2)+rope")
    m = config.model
    sigma, sigma_out = m.init_std, m.output_init_std
    hidden = ("trunc_normal", pytest.approx(sigma / 2), 0.25, 0.1)
    layernorm = {"scale": ("layernorm", "ones", None, 1.0, 0.0), "bias": ("layernorm", "zeros", None, 1.0, 0.0)}
    bias = ("bias", "zeros", None, 1.0, 0.0)
    expected = {
        "wte": ("embedding", "trunc_normal", sigma, 1.0, 0.1),
        "blocks/attn/q_kernel": ("attn_input", *hidden), "blocks/attn/kv_kernel": ("attn_input", *hidden),
        "blocks/mlp/up_kernel": ("mlp_input", *hidden),
        "blocks/attn/out_kernel": ("attn_output", "trunc_normal", pytest.approx(sigma_out / 2), 0.25, 0.1),
        "blocks/mlp/down_kernel": ("mlp_output", "trunc_normal", pytest.approx(sigma_out / 2), 0.25, 0.1),
        **{f"{ln}/{p}": layernorm[p] for ln in ("blocks/ln_attn", "blocks/ln_mlp", "ln_f") for p in ("scale", "bias")},
        **{f"blocks/{name}": bias for name in ("attn/q_bias", "attn/kv_bias", "attn/out_bias", "mlp/up_bias",
                                               "mlp/down_bias")},
    }
    rows = param_table(config)["params"]
    assert {row["param"]: (row["group"], row["init"], row["init_std"], row["lr_multiplier"], row["weight_decay"])
            for row in rows} == expected
    assert [row["group"] for row in rows] == sorted((row["group"] for row in rows), key=list(parameterization.GROUPS).index)


def test_declarations_defaults_and_errors():
    """A parameter's group and decay come from its metadata; one undeclared dimension (per layer) makes a
    vector; an undeclared matrix, an unknown group or a non-boolean decay is an error naming the parameter."""
    def param(shape, axes, **declaration):
        return nnx.Param(jnp.zeros(shape), logical_axes=axes, **declaration)

    gain, stacked_gain = param((8,), ("head_dim",)), param((2, 8), ("layers", "head_dim"))
    assert parameterization.param_group("a/gain", gain) == parameterization.param_group("a/g", stacked_gain) == "vector"
    assert not parameterization.decays("a/gain", gain)
    assert parameterization.decays("a/gain", param((8,), ("head_dim",), weight_decay=True))
    gate = param((8, 4), ("embed", "heads"), param_group="attn_input")
    assert parameterization.param_group("a/gate", gate) == "attn_input" and parameterization.decays("a/gate", gate)
    assert not parameterization.decays("a/gate", param((8, 4), ("embed", "heads"), param_group="attn_input",
                                                       weight_decay=False))
    with pytest.raises(ValueError, match=r"'blocks/attn/gate' of shape \(2, 8, 4\) declares no parameterization "
                                         r"group.*nnx.Param\(\.\.\., param_group=\.\.\.\)"):
        parameterization.param_group("blocks/attn/gate", param((2, 8, 4), ("layers", "embed", "heads")))
    with pytest.raises(ValueError, match="'a/gate' declares param_group='attention_input'; the groups are"):
        parameterization.param_group("a/gate", param((8, 4), ("embed", "heads"), param_group="attention_input"))
    with pytest.raises(ValueError, match="'a/gain' declares weight_decay='no'; use True or False"):
        parameterization.decays("a/gain", param((8,), ("head_dim",), weight_decay="no"))


def test_mup_init_matches_the_table():
    config = mup_config(d_model=128, n_heads=4, d_ff=512, vocab_size=256)  # m = 16, m_ff = 32
    params = jax.jit(lambda: nnx.state(GPT(config.model, rngs=nnx.Rngs(0)), nnx.Param))()
    table = {row["param"]: row for row in param_table(config)["params"]}
    assert table["blocks/mlp/down_kernel"]["init_std"] == pytest.approx(config.model.output_init_std / math.sqrt(32))
    for path, value in jax.tree_util.tree_leaves_with_path(params):
        row, value = table[path_name(path)], np.asarray(value)
        if row["init"] == "trunc_normal":
            assert value.std() == pytest.approx(row["init_std"] * TRUNCATED_STD, rel=0.05), row["param"]
            assert np.abs(value).max() <= 2 * row["init_std"] * (1 + 1e-6)
        else:
            assert np.all(value == (1.0 if row["init"] == "ones" else 0.0)), row["param"]


def test_mup_forward_multipliers_and_decoding():
    sp_cfg, mup_cfg = resolve(tiny_config()).model, mup_config().model
    sp = randomized(lambda: GPT(sp_cfg, rngs=nnx.Rngs(0)))
    mup = randomized(lambda: GPT(mup_cfg, rngs=nnx.Rngs(0)))  # the same parameters
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    x = sp._embed(tokens, None)
    np.testing.assert_allclose(np.asarray(mup._embed(tokens, None)), 10.0 * np.asarray(x), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mup._logits(x)), np.asarray(sp._logits(x)) / 4.0, rtol=1e-5, atol=1e-6)
    # The KV-cache path applies the same multipliers: prefill then two decode steps equal the forward pass.
    logits, cache = mup.extend(tokens[:, :14], mup.init_cache(2, 16), jnp.zeros(2, jnp.int32))
    for t in (14, 15):
        step, cache = mup.extend(tokens[:, t:t + 1], cache, jnp.full(2, t, jnp.int32))
        logits = jnp.concatenate([logits, step], axis=1)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(mup(tokens)), rtol=1e-5, atol=1e-5)


def _variant_specs() -> list[str]:
    specs = []
    for name, entry in sorted(attention.registered().items()):
        example = {k: v for k, v in entry.cls.examples[0].items() if k in entry.free_options}
        specs.append(attention.spec_string(name, example))
    return specs


@pytest.mark.parametrize("spec", _variant_specs())
def test_every_attention_variant_scales_logits_by_one_over_d_head(spec):
    """muP attention = SP attention with queries divided by sqrt(d_head): q·k/d = (q/sqrt(d))·k/sqrt(d)."""
    sp_cfg, mup_cfg = tiny_config().model, mup_config().model
    sp_cfg.attention = mup_cfg.attention = spec
    sp = randomized(lambda: attention.build(spec).make(sp_cfg, rngs=nnx.Rngs(0)))
    mup = randomized(lambda: attention.build(spec).make(mup_cfg, rngs=nnx.Rngs(0)))
    x = np.random.default_rng(1).standard_normal((2, 16, sp_cfg.d_model)).astype(np.float32)
    y_sp, y_mup = np.asarray(sp(x)), np.asarray(mup(x))
    assert np.abs(y_sp - y_mup).max() > 1e-3  # the scale differs at all
    project, root = sp.project, math.sqrt(sp_cfg.d_model // sp_cfg.n_heads)
    sp.project = lambda x_BxTxD: (lambda q, k, v: (q / root, k, v))(*project(x_BxTxD))
    np.testing.assert_allclose(y_mup, np.asarray(sp(x)), rtol=1e-5, atol=1e-5)


def test_loop_logs_and_saves_the_param_table(tmp_path):
    config = mup_config()
    config.train.steps, config.train.eval_every = 2, 2
    train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:1], show_progress=False)
    saved = json.loads((tmp_path / PARAM_TABLE).read_text())
    assert saved == json.loads(json.dumps(param_table(config)))
    assert [row["param"] for row in saved["params"]][:2] == ["wpe", "wte"]
    text = format_param_table(saved)
    assert text.splitlines()[0].startswith("parameterization mup: width multiplier 4 (d_ff 4)")
    assert "blocks/attn/qkv_kernel  attn_input" in text and "attention_logits x0.125" in text
