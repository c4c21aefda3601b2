"""Sharded equals unsharded: the same model code on 8 fake devices under several meshes."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from cgpt_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec
from cgpt_jax.train.setup import build_run
from cgpt_jax.parallel.mesh import make_mesh
from tests.helpers import tiny_config, train_steps

N_STEPS = 4


@pytest.fixture(scope="module")
def single_device_run():
    return train_steps(tiny_config(), N_STEPS)


@pytest.mark.parametrize("mesh", [dict(data=8), dict(data=1, fsdp=8), dict(data=2, fsdp=2, tensor=2),
                                  dict(data=2, tensor=4)], ids=str)
def test_sharded_training_equals_single_device(mesh, single_device_run):
    reference_losses, reference_state = single_device_run
    losses, state = train_steps(tiny_config(**mesh), N_STEPS, devices=jax.devices())
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-6)
    for ref, got in zip(jax.tree.leaves(reference_state), jax.tree.leaves(state)):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_parameters_are_actually_sharded():
    config = tiny_config(data=2, fsdp=2, tensor=2)
    mesh = make_mesh(config.mesh, jax.devices())
    state = build_run(config, mesh).init_state()
    qkv = state.params["blocks"]["attn"]["qkv_kernel"].get_value()
    assert qkv.sharding.spec == P(None, "fsdp", None, "tensor", None)
    assert qkv.addressable_shards[0].data.shape == (2, 16, 3, 2, 8)
    mu = state.opt_state[1][0].mu["blocks"]["attn"]["qkv_kernel"].get_value()
    assert mu.sharding.spec == qkv.sharding.spec  # Adam moments follow their parameters


def test_rules_use_each_mesh_axis_once_and_fall_back_in_order():
    assert logical_to_spec(("batch", "length", "act_embed"), DEFAULT_RULES) == P(("data", "fsdp"), None, None)
    rules = [("embed", "fsdp"), ("mlp", "fsdp"), ("mlp", "tensor")]
    assert logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")


def test_replication_guard_lists_offenders():
    config = tiny_config(data=1, fsdp=8)
    config.mesh.rules = [r for r in config.mesh.rules if r[0] != "embed"]
    mesh = make_mesh(config.mesh, jax.devices())
    with pytest.raises(ValueError, match=r"(?s)stay replicated.*wte"):
        build_run(config, mesh)


def test_undivisible_parameter_names_the_fix():
    config = tiny_config(data=2, tensor=4)
    config.model.vocab_size = 62
    config.data.synthetic_vocab_size = 62
    mesh = make_mesh(config.mesh, jax.devices())
    with pytest.raises(ValueError, match="wte.*vocab_pad_multiple"):
        build_run(config, mesh)
