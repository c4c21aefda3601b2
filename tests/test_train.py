"""The recipe and the loop: accumulation, decay mask, schedule, learning, and clear errors for bad input."""
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cgpt_jax.config import resolve, validate
from cgpt_jax.model import abstract_model
from cgpt_jax.train.loop import train_and_evaluate
from cgpt_jax.train.optimizer import decays, lr_schedule
from flax import nnx

from tests.helpers import tiny_config, train_steps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gradient_accumulation_equals_full_batch():
    full_losses, full_state = train_steps(tiny_config(), 3)
    config = tiny_config()
    config.train.micro_batches = 4
    accum_losses, accum_state = train_steps(config, 3)
    np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-6)
    # Same tolerance as the sharded tests: the key bias has an exactly-zero gradient in exact arithmetic
    # (softmax is shift invariant), so Adam turns its rounding noise into updates of ~1e-7.
    for a, b in zip(jax.tree.leaves(accum_state), jax.tree.leaves(full_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradient_accumulation_on_a_sharded_mesh():
    config = tiny_config(data=2, fsdp=2, tensor=2)
    config.train.micro_batches = 2
    losses, _ = train_steps(config, 2, devices=jax.devices())
    reference, _ = train_steps(tiny_config(), 2)
    np.testing.assert_allclose(losses, reference, rtol=1e-6)


def test_weight_decay_mask_excludes_exactly_biases_and_layernorm():
    params = nnx.state(abstract_model(tiny_config().model), nnx.Param)
    decayed, kept = set(), set()
    for path, param in nnx.to_flat_state(params):
        name = "/".join(path)
        (decayed if decays(name, param) else kept).add(name)
    assert decayed == {"wte", "wpe", "blocks/attn/qkv_kernel", "blocks/attn/out_kernel",
                       "blocks/mlp/up_kernel", "blocks/mlp/down_kernel"}
    assert kept == {"blocks/attn/qkv_bias", "blocks/attn/out_bias", "blocks/mlp/up_bias",
                    "blocks/mlp/down_bias", "blocks/ln_attn/scale", "blocks/ln_attn/bias",
                    "blocks/ln_mlp/scale", "blocks/ln_mlp/bias", "ln_f/scale", "ln_f/bias"}


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_schedule_matches_recipe(decay):
    t = tiny_config().train
    t.steps, t.warmup_steps, t.peak_lr, t.decay = 1000, 100, 6e-4, decay
    schedule = lr_schedule(t)
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(3e-4, rel=1e-6)
    assert float(schedule(100)) == pytest.approx(6e-4, rel=1e-6)
    mid = 100 + 450
    expected_mid = (6e-4 + 6e-5) / 2  # halfway through decay: linear and cosine agree
    assert float(schedule(mid)) == pytest.approx(expected_mid, rel=1e-5)
    quarter = 100 + 225
    if decay == "linear":
        expected = 6e-4 - 0.25 * (6e-4 - 6e-5)
    else:
        expected = 6e-5 + (6e-4 - 6e-5) * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert float(schedule(quarter)) == pytest.approx(expected, rel=1e-5)
    assert float(schedule(1000)) == pytest.approx(6e-5, rel=1e-5)


def test_loss_falls_well_below_initial_on_learnable_task(tmp_path):
    config = tiny_config()
    config.train.steps, config.train.warmup_steps, config.train.peak_lr = 150, 10, 3e-3
    config.train.eval_every = 150
    summary = train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1], show_progress=False)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(64), rel=0.05)
    # Floor of the synthetic task: (1/8)·ln 64 + H(1/8) ≈ 0.90 nats.
    assert summary["final_eval_loss"] < 0.5 * first["loss"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "grad_norm"} <= set(lines[0])
    assert {"tokens_per_sec", "mfu"} <= set(lines[1])
    assert (tmp_path / "run" / "config.json").exists() and (tmp_path / "run" / "summary.json").exists()
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "run" / "tensorboard"))


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.model, "n_heads", 5), "n_heads=5 does not divide"),
    (lambda c: setattr(c.train, "seq_len", 32), "longer than the position table"),
    (lambda c: setattr(c.train, "global_batch_size", 12), "not divisible by mesh data×fsdp"),
    (lambda c: setattr(c.train, "micro_batches", 3), "not divisible by train.micro_batches"),
    (lambda c: setattr(c.mesh, "data", 3), "has 3 devices but 8 are available"),
    (lambda c: (setattr(c.mesh, "data", -1), setattr(c.mesh, "fsdp", -1)), "at most one axis"),
    (lambda c: setattr(c.model, "attention", "warp_drive"), "unknown attention variant"),
    (lambda c: setattr(c.model, "remat", "some"), "model.remat='some'"),
])
def test_bad_config_names_field_and_fix(change, message):
    config = tiny_config()
    change(config)
    with pytest.raises(ValueError, match=message):
        validate(config, 8)


def _cli(*args, cwd=REPO):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "cgpt_jax.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_rejects_unknown_size_and_unknown_key(tmp_path):
    result = _cli("--config=experiments/cerebras_gpt.py:size=7b", f"--workdir={tmp_path}/a")
    assert result.returncode != 0 and "unknown size '7b'" in result.stderr
    result = _cli("--config=experiments/cerebras_gpt.py:size=tiny", "--config.model.d_modle=8",
                  f"--workdir={tmp_path}/b")
    assert result.returncode != 0 and "d_modle" in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_workdir_of_another_run_is_refused_then_moved_aside(tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config()
    config.train.steps, config.train.eval_every = 3, 3
    train_and_evaluate(config, workdir, devices=jax.devices()[:1], show_progress=False)
    other = tiny_config()
    other.model.d_model = 48
    other.train.steps, other.train.eval_every = 3, 3
    with pytest.raises(ValueError, match=r"(?s)another run's config.*model.d_model: 32 → 48.*--overwrite"):
        train_and_evaluate(other, workdir, devices=jax.devices()[:1], show_progress=False)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["d_model"] == 32
    train_and_evaluate(other, workdir, overwrite=True, devices=jax.devices()[:1], show_progress=False)
    aside = [p for p in os.listdir(tmp_path) if p.startswith("run.replaced-")]
    assert len(aside) == 1 and (tmp_path / aside[0] / "summary.json").exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["d_model"] == 48


def test_how_a_run_executes_does_not_make_it_another_run():
    """Restart-mutable fields (layer loop, remat, mesh, logging) and fields an older cgpt_jax did not record
    do not count as differences, for restarts and for sweeps alike; the model's shape does."""
    from cgpt_jax.config import run_differences

    recorded = json.loads(json.dumps(tiny_config().to_dict()))  # as config.json holds it
    del recorded["model"]["scan_layers"], recorded["model"]["parameterization"]  # fields added since
    current = tiny_config()
    current.model.scan_layers, current.model.remat, current.mesh.fsdp = False, "full", 2
    assert run_differences(recorded, current.to_dict()) == []
    current.model.d_model, current.model.parameterization = 48, "mup"  # not the default: another run
    assert run_differences(recorded, current.to_dict()) == [
        "  model.d_model: 32 → 48", "  model.parameterization: '<absent>' → 'mup'"]


def test_resolve_derives_steps_from_tokens_per_param():
    config = tiny_config()
    config.train.steps, config.train.tokens_per_param = -1, 20.0
    resolved = resolve(config)
    from cgpt_jax.model import params_count
    assert resolved.train.steps == int(20 * params_count(config.model) // (16 * 16))


def test_weight_decay_update_touches_only_decayed_parameters():
    from cgpt_jax.model import GPT
    from cgpt_jax.train.optimizer import make_optimizer

    config = tiny_config()
    config.train.warmup_steps, config.train.peak_lr = 0, 1e-2
    params = nnx.state(GPT(config.model, rngs=nnx.Rngs(0)), nnx.Param)
    params = jax.tree.map(lambda x: x + 1.0, params)  # biases non-zero, so decay would show
    tx = make_optimizer(config.train)
    zero_grads = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    by_name = {"/".join(path): param[...] for path, param in nnx.to_flat_state(params)}
    for path, update in nnx.to_flat_state(updates):
        name = "/".join(path)
        expected_scale = -1e-2 * 0.1 if decays(name, update) else 0.0  # -lr · weight_decay · p, or nothing
        np.testing.assert_allclose(np.asarray(update[...]), expected_scale * np.asarray(by_name[name]), rtol=1e-6)
