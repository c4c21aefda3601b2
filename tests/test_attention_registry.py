"""The attention registry: discovery, config strings, bad input, combinations, and variant specifics
that the conformance suite does not cover (ALiBi slopes, RoPE relativity, GQA's dense mapping)."""
from __future__ import annotations

import unittest.mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import flops
from cgpt_jax.config import validate
from cgpt_jax.model import GPT, abstract_model, attention, params_count
from cgpt_jax.model.attention.alibi import alibi_slopes
from cgpt_jax.model.attention.dense import DenseAttention
from cgpt_jax.model.attention.rope import rotate_half
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.train.setup import build_run
from tests.helpers import tiny_config, train_steps

SEVEN = {"dense", "gqa", "mqa", "rope", "alibi", "sliding_window", "blockwise", "fused"}


def model_cfg(spec: str):
    cfg = tiny_config().model
    cfg.attention = spec
    return cfg


def test_every_variant_file_is_discovered():
    assert SEVEN <= set(attention.registered())
    assert attention.registered()["mqa"].fixed == {"kv_heads": 1}


@pytest.mark.parametrize("spec, message", [
    ("gqa(", "does not parse"),
    ("gqa(4)", "must be a name or a call with keyword arguments"),
    ("gqa(kv_heads=four)", "arguments must be literals"),
    ("warp_drive", "unknown attention variant 'warp_drive'"),
    ("gqa(heads=2)", r"'gqa' has no argument\(s\) \['heads'\]"),
    ("gqa", r"needs argument\(s\) \['kv_heads'\], e.g. 'gqa\(kv_heads=...\)'"),
    ("mqa(kv_heads=2)", r"'mqa' has no argument\(s\) \['kv_heads'\]"),
    ("blockwise(block=4)+fused", r"'blockwise' and 'fused' both replace the mix\(\) step"),
    ("sliding_window(window=4)+blockwise", "both replace the mix"),
    ("alibi+alibi", r"both replace the score_bias\(\) step"),
    ("gqa(kv_heads=2)+mqa", "both set option 'kv_heads'"),
])
def test_bad_strings_name_the_problem_and_list_the_variants(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        attention.build(spec)
    if "both" not in message:
        assert "registered attention variants" in str(info.value)
        assert "gqa(kv_heads=?)" in str(info.value) and "rope(theta=10000.0)" in str(info.value)


@pytest.mark.parametrize("spec, message", [
    ("gqa(kv_heads=3)", r"kv_heads=3 does not divide model.n_heads=4; use one of \[1, 2, 4\]"),
    ("gqa(kv_heads=0)", "kv_heads=0 must be a positive integer"),
    ("gqa(kv_heads=2.0)", "kv_heads=2.0 must be a positive integer"),
    ("sliding_window(window=0)", "window=0 must be an integer >= 1"),
    ("blockwise(block=0)", "block=0 must be an integer >= 1"),
    ("rope(theta=-1.0)", "theta=-1.0 must be a number > 1"),
    ("mqa+sliding_window(window=-2)", "window=-2"),
])
def test_bad_arguments_fail_at_config_time(spec, message):
    config = tiny_config()
    config.model.attention = spec
    with pytest.raises(ValueError, match=rf"(?s)invalid config.*config.model.attention=.*{message}"):
        validate(config, 8)
    with pytest.raises(ValueError, match=message):  # and before any trace when a model is built
        GPT(config.model, rngs=nnx.Rngs(0))


def test_rope_needs_an_even_head_dim():
    cfg = model_cfg("rope")
    cfg.d_model, cfg.n_heads = 36, 4  # head dim 9
    with pytest.raises(ValueError, match="head dimension d_model / n_heads = 9 is odd"):
        attention.build("rope").validate(cfg)


def test_decode_unsupported_is_refused_before_tracing():
    class ForwardOnly(DenseAttention):
        supports_decode = False

    attention.register("forward_only")(ForwardOnly)
    try:
        variant = attention.build("forward_only")
        with pytest.raises(ValueError, match=r"'forward_only' does not support KV-cache decoding.*'dense'"):
            variant.check_decode()
        with pytest.raises(ValueError, match="does not support KV-cache decoding"):
            abstract_model(model_cfg("gqa(kv_heads=2)+forward_only")).init_cache(2, 16)
    finally:
        attention.unregister("forward_only")


def test_a_spec_is_parsed_once_and_reparsed_after_the_registry_changes():
    """Config check, model, cache layout and FLOP count all build one spec string: it is parsed once.
    Registering or unregistering a variant forgets the parsed strings, so a re-registered name is seen."""
    class First(DenseAttention):
        pass

    class Second(DenseAttention):
        pass

    attention.register("reregistered")(First)  # also empties the cache: the count below starts from zero
    try:
        config = tiny_config()
        config.model.attention = "gqa(kv_heads=2)+reregistered"
        with unittest.mock.patch.object(attention, "_parse", wraps=attention._parse) as parse:
            validate(config, 1)
            abstract_model(config.model).cache_layout(2, 16)
            flops.Shape.from_model_config(config.model, 16)
            assert attention.build(config.model.attention) is attention.build(config.model.attention)
        assert parse.call_count == 1
        assert attention.build("reregistered").cls is First
        attention.unregister("reregistered")
        with pytest.raises(ValueError, match="unknown attention variant 'reregistered'"):
            attention.build("reregistered")
        attention.register("reregistered")(Second)
        assert attention.build("reregistered").cls is Second
    finally:
        attention.unregister("reregistered")


def test_combination_is_one_cached_class_with_merged_declarations():
    variant = attention.build("gqa(kv_heads=2)+rope(theta=500.0)")
    assert variant.cls is attention.build("gqa(kv_heads=2) + rope(theta=500.0)").cls
    assert variant.options == {"kv_heads": 2, "theta": 500.0}
    assert not variant.learned_positions and variant.supports_decode
    attn = variant.make(model_cfg(variant.spec), rngs=nnx.Rngs(0))
    assert attn.kv_heads == 2 and attn.theta == 500.0 and attn.q_kernel.shape == (32, 4, 8)
    cfg = model_cfg("mqa+sliding_window(window=4)")
    assert attention.build(cfg.attention).fwd_flops_per_token(cfg, 16) == \
        attention.build("sliding_window(window=4)").fwd_flops_per_token(cfg, 16)


def test_positions_and_parameters_follow_the_variant():
    dense, rope, mqa = (tiny_config().model for _ in range(3))
    rope.attention, mqa.attention = "rope", "mqa"
    assert params_count(dense) - params_count(rope) == dense.max_seq_len * dense.d_model  # no wpe
    # MQA: K and V project to one head of 8 instead of four.
    assert params_count(dense) - params_count(mqa) == dense.n_layers * 2 * (32 + 1) * (32 - 8)
    assert abstract_model(rope).wpe is None


def test_flop_count_reads_the_variant():
    cfg = tiny_config().model
    base = flops.Shape.from_model_config(cfg, 16)
    cfg.attention = "sliding_window(window=4)"
    banded = flops.Shape.from_model_config(cfg, 16)
    assert base.attention_fwd_flops_per_token == 4 * 16 * 32
    assert banded.attention_fwd_flops_per_token == 4 * 8 * 32  # 2·window keys per query
    assert flops.flops_per_token(banded, "palm") < flops.flops_per_token(base, "palm")
    # MQA (d 32, 4 heads of 8): K and V project to one head, so 2·32·(32 - 8) fewer weights per layer.
    cfg.attention = "mqa"
    single_kv = flops.Shape.from_model_config(cfg, 16)
    assert base.attention_projection_params == 4 * 32 * 32
    assert base.attention_projection_params - single_kv.attention_projection_params == 2 * 32 * (32 - 8)
    assert flops.flops_per_token(base, "palm") - flops.flops_per_token(single_kv, "palm") == \
        6 * cfg.n_layers * 2 * 32 * (32 - 8)


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -k for k in range(1, 9)])
    # 12 heads: the 8-head slopes, then every other slope of 16 heads: 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5.
    np.testing.assert_allclose(alibi_slopes(12), [2.0 ** -k for k in range(1, 9)] + [2.0 ** -(k + 0.5) for k in range(4)])


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, 8))

    def score(m: int, n: int) -> float:
        rq = rotate_half(q, jnp.array([[m]]), 10000.0)
        rk = rotate_half(k, jnp.array([[n]]), 10000.0)
        return float((rq * rk).sum())

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 5), rel=1e-3)
    np.testing.assert_allclose(rotate_half(q, jnp.array([[0]]), 10000.0), q)


def test_gqa_from_dense_mean_pools_key_value_groups():
    cfg = model_cfg("gqa(kv_heads=2)")
    dense = DenseAttention(cfg, rngs=nnx.Rngs(0))
    gqa = attention.build(cfg.attention).make(cfg, rngs=nnx.Rngs(1))
    params = {name: getattr(dense, name)[...] for name in ("qkv_kernel", "qkv_bias", "out_kernel", "out_bias")}
    mapped = gqa.params_from_dense(params)
    qkv = np.asarray(params["qkv_kernel"])
    np.testing.assert_allclose(mapped["q_kernel"], qkv[:, 0])
    np.testing.assert_allclose(mapped["kv_kernel"][:, :, 1], qkv[:, 1:, 2:4].mean(2), rtol=1e-6)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in nnx.state(gqa, nnx.Param).items()}


def test_kv_heads_not_divisible_by_the_tensor_axis_names_the_parameter():
    config = tiny_config(data=2, tensor=4)
    config.model.attention = "gqa(kv_heads=2)"
    mesh = make_mesh(config.mesh, jax.devices())
    with pytest.raises(ValueError, match=r"attn/kv_(kernel|bias) .*'kv_heads'.*cannot be split over mesh axes tensor"):
        build_run(config, mesh)


def test_a_combined_variant_trains_on_a_tensor_parallel_mesh():
    config = tiny_config(data=4, tensor=2)
    config.model.attention = "gqa(kv_heads=2)+rope"
    losses, state = train_steps(config, 3, devices=jax.devices())
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert "wpe" not in state.params and "q_kernel" in state.params["blocks"]["attn"]


def test_variant_sweep_expands_every_variant_on_every_rung():
    from cgpt_jax.scaling.experiment import load_experiment
    from experiments import attention_variants, cpu_ladder

    runs = attention_variants.sweep()
    assert len(runs) == len(attention_variants.VARIANTS) * len(cpu_ladder.SIZES)
    experiment = load_experiment("experiments/attention_variants.py:variants=dense/window32,sizes=d32l2")
    configs = {run.name: experiment.run_config(run) for run in experiment.runs()}
    assert set(configs) == {"dense-d32l2", "window32-d32l2"}
    assert configs["window32-d32l2"].model.attention == "sliding_window(window=32)"
    assert configs["window32-d32l2"].train.steps == configs["dense-d32l2"].train.steps  # same tokens
    for config in configs.values():
        validate(config, 1)
    with pytest.raises(ValueError, match="choose '/'-separated names"):
        attention_variants.sweep("variants=dense/warp")
    with pytest.raises(ValueError, match="unknown variant 'warp'"):
        attention_variants.get_config("variant=warp")
