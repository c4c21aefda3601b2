"""Conformance suite: every registered PEFT method (each of its `examples`) passes the same checks.

The specs are read from the registry when the tests are collected, so a new method file is tested with no
edit here. Each spec trains once (module-scoped fixture: a few steps of the classification objective on a
tiny model through `build_run`, on one device and on the 8 fake devices), and the checks read that run:
the documented effect at init (none, or the base reading the virtual tokens' initial ids first), only the trainable parameters move (the base bit-identical) and only they hold optimizer
state, sharded = unsharded with logical axes on every added parameter, KV-cache decoding = the full forward
pass, merging gives the same logits, and the adapter checkpoint holds only the trained parameters and
refuses another base.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import peft
from cgpt_jax.config import base_config, resolve
from cgpt_jax.finetune.objective import ClassificationObjective
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.peft import checkpoint as peft_checkpoint
from cgpt_jax.peft import training
from cgpt_jax.train.setup import FAST_COMPILE, build_run

LABELS, STEPS = 3, 3


def suite_specs() -> list[str]:
    specs = []
    for name, cls in sorted(peft.registered().items()):
        for example in cls.examples:
            specs.append(peft.spec_string(name, example))
    return specs


def config_for(spec: str, **mesh) -> ml_collections.ConfigDict:
    c = base_config()
    m, t = c.model, c.train
    # max_seq_len: room for the examples' virtual tokens (prompt, prefix) before 16 input tokens
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 64, 32, 2, 4, 128, 24
    m.scan_layers = False
    t.seq_len, t.global_batch_size, t.steps, t.warmup_steps, t.peak_lr = 16, 8, 10, 1, 1e-2
    c.finetune.method = spec
    c.finetune.num_labels = LABELS
    c.mesh.update(mesh)
    return resolve(c)


def batch(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"inputs": rng.integers(0, 64, (8, 16)).astype(np.int32),
            "lengths": rng.integers(4, 17, 8).astype(np.int32),
            "labels": rng.integers(0, LABELS, 8).astype(np.int32)}


@dataclasses.dataclass
class Trained:
    spec: str
    config: ml_collections.ConfigDict
    run: object
    initial: nnx.State  # params at step 0 (host arrays)
    final: nnx.State
    opt_state: object
    losses: list[float]
    sharded_final: nnx.State  # the same steps on 8 devices (data 2, fsdp 2, tensor 2)
    sharded_losses: list[float]
    sharded_abstract: nnx.State


def build(spec: str, devices: list, **mesh):
    config = config_for(spec, **mesh)
    return config, build_run(config, make_mesh(config.mesh, devices),
                             objective=ClassificationObjective(LABELS, "softmax"), compiler_options=FAST_COMPILE)


def train(run, state) -> tuple[object, list[float]]:
    losses = []
    for step in range(STEPS):
        placed = {k: jax.device_put(v, run.batch_shardings[k]) for k, v in batch(step).items()}
        state, metrics = run.train_step(state, placed)
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module", params=suite_specs())
def trained(request) -> Trained:
    spec = request.param
    config, run = build(spec, jax.devices()[:1])
    state = run.init_state()
    initial = jax.device_get(state)
    state, losses = train(run, state)
    _, sharded_run = build(spec, jax.devices()[:8], data=2, fsdp=2, tensor=2)
    sharded, sharded_losses = train(sharded_run, jax.device_put(initial, sharded_run.shardings))
    return Trained(spec, config, run, initial.params, jax.device_get(state.params), jax.device_get(state.opt_state),
                   losses, jax.device_get(sharded.params), sharded_losses, sharded_run.abstract_state.params)


def flat(params: nnx.State) -> dict[tuple, np.ndarray]:
    return {tuple(str(p) for p in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(params)}


def model_of(t: Trained, params: nnx.State) -> nnx.Module:
    return nnx.merge(t.run.graphdef, jax.tree.map(jnp.asarray, params))


TOKENS = jnp.asarray(np.random.default_rng(7).integers(0, 64, (2, 16)), jnp.int32)
LENGTHS = jnp.asarray([16, 9], jnp.int32)


def eager_outputs(model: nnx.Module) -> tuple[jax.Array, jax.Array]:
    """(class logits [2, C], the LM head's logits [2, 16, V]) of TOKENS."""
    return model(TOKENS, LENGTHS), model.head(model.features(TOKENS))


outputs = nnx.jit(eager_outputs)


@nnx.jit
def prefixed_outputs(model: nnx.Module, prefixed_BxL: jax.Array, lengths_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`eager_outputs` of inputs that start with extra tokens, at TOKENS' positions."""
    n = prefixed_BxL.shape[1] - TOKENS.shape[1]
    return model(prefixed_BxL, lengths_B), model.head(model.features(prefixed_BxL))[:, n:]


@nnx.jit
def extend(model: nnx.Module, tokens_BxT: jax.Array, cache: dict, start_B: jax.Array) -> tuple[jax.Array, dict]:
    return model.extend(tokens_BxT, cache, start_B)


def test_documented_effect_at_init(trained):
    with_method = model_of(trained, trained.initial)
    base = model_of(trained, trained.initial)
    base.peft = None  # the base alone
    ids = with_method.peft.virtual_ids if with_method.peft is not None else ()
    if ids:
        # Virtual tokens: the base reading their initial ids first, at the input's positions n.. (another
        # order of operations than the cache path the method runs, so equal to float rounding).
        prefixed = jnp.concatenate([jnp.tile(jnp.asarray(ids, jnp.int32), (TOKENS.shape[0], 1)), TOKENS], 1)
        for a, b in zip(outputs(with_method), prefixed_outputs(base, prefixed, LENGTHS + len(ids))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
        return
    # Op by op: two compiled programs may round differently wherever XLA fuses them differently (an
    # adapter's branch changes the fusion around it), while each op alone computes the same numbers.
    with jax.disable_jit():
        pairs = list(zip(eager_outputs(with_method), eager_outputs(base)))
    for ours, reference in pairs:
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def test_only_trainable_parameters_move_and_hold_optimizer_state(trained):
    recipe = peft.build(trained.spec)
    before, after = flat(trained.initial), flat(trained.final)
    trainable = {p for p in before if training.is_trainable(recipe, p)}
    assert trainable, "the method trains nothing"
    for path in before:
        if path in trainable:
            assert not np.array_equal(before[path], after[path]) or path[-1].endswith("_a"), \
                f"{path} is trainable but did not move"
        else:
            assert np.array_equal(before[path].view(np.uint8), after[path].view(np.uint8)), f"frozen {path} changed"
    if any(path[-1].endswith("_b") for path in trainable):  # LoRA's A moves once B is non-zero
        assert any(not np.array_equal(before[p], after[p]) for p in trainable if p[-1].endswith("_a"))
    trainable_bytes = sum(before[p].nbytes for p in trainable)
    moment_bytes = sum(x.nbytes for x in jax.tree.leaves(trained.opt_state) if np.ndim(x) > 0)
    assert moment_bytes == 2 * trainable_bytes  # Adam's two moments, of the trainable parameters only
    assert trained.losses[-1] < trained.losses[0]


def test_sharded_equals_unsharded_and_added_parameters_carry_logical_axes(trained):
    np.testing.assert_allclose(trained.sharded_losses, trained.losses, rtol=1e-5)
    a, b = flat(trained.sharded_final), flat(trained.final)
    for path in a:
        # atol: Adam divides by sqrt(v), so a gradient entry near zero turns reduction-order rounding into
        # a visible fraction of one step (peak_lr 1e-2); every other entry agrees to rtol.
        np.testing.assert_allclose(a[path], b[path], rtol=1e-4, atol=1e-5, err_msg=str(path))
    for path, v in nnx.to_flat_state(trained.sharded_abstract):
        if str(path[0]) == peft.PEFT:
            axes = v.get_metadata().get("logical_axes")
            assert axes is not None and len(axes) == v.ndim and any(axes), path


def test_kv_cache_decoding_equals_the_full_forward_pass(trained):
    model = model_of(trained, trained.final)
    _, full = outputs(model)
    cache = model.init_cache(2, 16)
    first, cache = extend(model, TOKENS[:, :13], cache, jnp.zeros(2, jnp.int32))
    rest = [first]
    for i in range(13, 16):  # one compiled decode step for all three
        logits, cache = extend(model, TOKENS[:, i:i + 1], cache, jnp.full(2, i, jnp.int32))
        rest.append(logits)
    np.testing.assert_allclose(np.concatenate(rest, 1), full, rtol=1e-5, atol=1e-5)


def test_merged_weights_give_the_same_logits(trained):
    if not peft.build(trained.spec).mergeable:
        pytest.skip(f"{trained.spec} is not mergeable")
    before = outputs(model_of(trained, trained.final))
    merged = training.merge(model_of(trained, trained.final))
    assert merged.peft is None  # the base's own forward pass, at its speed
    for ours, reference in zip(outputs(merged), before):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-5, rtol=0)


def test_adapter_checkpoint_holds_only_trained_parameters_and_refuses_another_base(trained, tmp_path):
    recipe = peft.build(trained.spec)
    if recipe.trains_base:
        pytest.skip(f"{trained.spec} trains the base: its checkpoint is the whole model")
    meta = peft_checkpoint.save(str(tmp_path), trained.spec, trained.final, "runs/base")
    names = {"/".join(p) for p in flat(trained.final) if training.is_trainable(recipe, p)}
    assert set(meta["tensors"]) == names
    assert meta["base"]["path"] == "runs/base" and len(meta["base"]["sha256"]) == 64
    restored = peft_checkpoint.load(str(tmp_path), trained.initial)  # the same base, fresh added parameters
    for path, value in flat(trained.final).items():
        np.testing.assert_array_equal(flat(restored)[path], value)
    other = nnx.from_flat_state([(p, v.replace(v[...] + 1e-3) if p == ("wte",) else v)
                                 for p, v in nnx.to_flat_state(trained.initial)])
    with pytest.raises(peft_checkpoint.AdapterError, match="trained on the base runs/base"):
        peft_checkpoint.load(str(tmp_path), other)


def test_every_registered_method_is_in_the_suite():
    names = {spec.split("(")[0] for spec in suite_specs()}
    assert names == set(peft.registered()) and {"full", "head_only", "lora"} <= names
