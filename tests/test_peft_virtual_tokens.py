"""Virtual tokens in generation: the Generator's prefill and decode steps over caches whose first slots hold
a prefix's keys and values give the full forward pass's logits, with trained (non-initial) values, and the
serving engine's slots (each a prefilled row copied into the shared cache) decode what the Generator does.
(`prompt` fills the same slots through the same path; its cache is checked against the full forward pass by
the conformance suite's decode test.)"""
from __future__ import annotations

import threading

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cgpt_jax import peft
from cgpt_jax.infer import Generator, Sampling
from cgpt_jax.model import GPT
from cgpt_jax.peft import training
from cgpt_jax.serve.engine import Engine, Request
from tests.helpers import tiny_config

VOCAB, N_VIRTUAL = 64, 3


@pytest.fixture(scope="module")
def model() -> GPT:
    cfg = tiny_config().model
    cfg.max_seq_len = 16 + N_VIRTUAL  # a cache of 16 real positions fills the context exactly
    model = training.attach(GPT(cfg, rngs=nnx.Rngs(3)), peft.build(f"prefix(tokens={N_VIRTUAL})"), cfg, nnx.Rngs(4))
    rng = np.random.default_rng(0)
    for path, v in nnx.to_flat_state(nnx.state(model.peft, nnx.Param)):  # trained-looking values, not zeros
        v.set_value(jnp.asarray(rng.normal(0, 0.5, v.shape), v[...].dtype))
    assert model.virtual_tokens == N_VIRTUAL and model.context_len == 16
    return model


@pytest.fixture(scope="module")
def generator(model) -> Generator:
    return Generator(model, min_bucket=8)


def test_generator_with_virtual_tokens_equals_the_full_forward_pass(model, generator):
    rng = np.random.default_rng(1)
    sequences = rng.integers(0, VOCAB, (2, 16)).astype(np.int32)
    lengths = np.array([5, 8], np.int32)
    prompts = np.where(np.arange(8) < lengths[:, None], sequences[:, :8], 0).astype(np.int32)
    full = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(sequences)))
    seeds = jnp.zeros((2,), jnp.int32)
    _, logits, caches = generator.prefill(generator.state, generator.layers, jnp.asarray(prompts),
                                          jnp.asarray(lengths), seeds, cache_len=16, sampling=Sampling())
    assert caches[0]["k"].shape[2] == N_VIRTUAL + 16
    np.testing.assert_allclose(logits, full[np.arange(2), lengths - 1], atol=1e-5)
    for i in range(3):
        fed = jnp.asarray(sequences[np.arange(2), lengths + i])
        _, logits, caches = generator.decode(generator.state, generator.layers, caches, fed, jnp.asarray(lengths),
                                             seeds, i, sampling=Sampling())
        np.testing.assert_allclose(logits, full[np.arange(2), lengths + i], atol=1e-5)
    with pytest.raises(ValueError, match="needs 17 positions but the model's context is 16"):
        generator.generate([[1] * 15], max_new_tokens=2)


def test_served_slots_with_virtual_tokens_equal_the_generator(generator):
    """Two requests sampled concurrently in the engine's two slots; the second fills the context exactly."""
    engine = Engine(generator, slots=2, cache_len=64)
    assert engine.cache_len == 16  # capped at context_len, not max_seq_len
    assert "context_len=16: its PEFT method's 3 virtual tokens" in engine.check(10, 7)
    prompts, new, sampling = [[5, 9, 33, 2], [7, 1, 60, 12, 8, 3, 44, 21, 5, 9]], 6, Sampling(temperature=1.0)
    events: list[list[tuple]] = [[], []]
    done = [threading.Event(), threading.Event()]
    engine.start()
    try:
        for b, prompt in enumerate(prompts):
            engine.submit(Request(prompt, new, lambda *e, b=b: (events[b].append(e), e[2] and done[b].set()),
                                  temperature=1.0, seed=b))
        assert all(d.wait(60) for d in done)
    finally:
        engine.stop()
    served = [[token for token, _, _ in row] for row in events]
    # Row b of one generate call samples with seed b, as request b did.
    assert served == generator.generate(prompts, max_new_tokens=new, sampling=sampling, seed=0)
    assert len({t for row in served for t in row}) > 2  # sampled, not one repeated token
