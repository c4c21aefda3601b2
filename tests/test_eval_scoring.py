"""Scoring API: log-likelihoods equal a direct full forward pass (also with a PEFT prefix's virtual tokens),
batched = one at a time, sharded = one device, one compile per length bucket, rolling windows at the
context's boundaries, bad input."""
from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from flax import nnx

from cgpt_jax import peft
from cgpt_jax.errors import InputError
from cgpt_jax.eval.scorer import Scorer, rolling_windows
from cgpt_jax.model import GPT
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.peft import training
from tests.helpers import tiny_config

MAX_LEN = 32
rng = np.random.default_rng(0)
# Lengths spread over the 8-, 16- and 32-position buckets, and one longer than the context (truncated).
REQUESTS = [(rng.integers(0, 64, c).tolist(), rng.integers(0, 64, k).tolist())
            for c, k in [(1, 1), (5, 3), (9, 1), (3, 12), (20, 4), (30, 2), (1, 31), (40, 6), (12, 12), (2, 2)]]

# Multiple-choice style: choices sharing a context. Contexts of 6 and 14 tokens leave room for their
# continuations (one pass over the context through the KV cache); 20 + 16 and 10 + 32 do not (plain path).
MC_REQUESTS = [(context, rng.integers(0, 64, k).tolist())
               for context, widths in [(rng.integers(0, 64, 6).tolist(), [1, 2, 5, 3]),
                                       (rng.integers(0, 64, 20).tolist(), [2, 9, 4]),
                                       (rng.integers(0, 64, 10).tolist(), [3, 17]),
                                       (rng.integers(0, 64, 14).tolist(), [1, 2])]
               for k in widths]


@pytest.fixture(scope="module")
def model() -> GPT:
    cfg = tiny_config().model
    cfg.max_seq_len = MAX_LEN
    return GPT(cfg, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def scorer(model) -> Scorer:
    return Scorer(model, batch_size=4, min_bucket=8)


@pytest.fixture(scope="module")
def prefix_model() -> GPT:
    """A prefix of 3 virtual tokens with trained-looking (random) values; its context holds MAX_LEN real tokens."""
    cfg = tiny_config().model
    cfg.max_seq_len = MAX_LEN + 3
    model = training.attach(GPT(cfg, rngs=nnx.Rngs(3)), peft.build("prefix(tokens=3)"), cfg, nnx.Rngs(4))
    draw = np.random.default_rng(1)
    for path, v in nnx.to_flat_state(nnx.state(model.peft, nnx.Param)):
        v.set_value(jnp.asarray(draw.normal(0, 0.5, v.shape), v[...].dtype))
    assert model.context_len == MAX_LEN
    return model


_forward = nnx.jit(lambda model, tokens_1xL: model(tokens_1xL))


def direct(model: GPT, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """One forward pass over the whole context window holding the (left-truncated) request, log-softmax in
    float64 on the host."""
    whole = (context + continuation)[-(MAX_LEN + 1):]
    tokens_1xL = np.zeros((1, MAX_LEN), np.int32)
    tokens_1xL[0, :len(whole) - 1] = whole[:-1]
    logits = np.asarray(_forward(model, tokens_1xL)[0], np.float64)[:len(whole) - 1, :model.cfg.vocab_size]
    logp = scipy.special.log_softmax(logits, axis=-1)
    k = len(continuation)
    rows, targets = np.arange(len(whole) - 1 - k, len(whole) - 1), np.asarray(whole[-k:])
    return float(logp[rows, targets].sum()), bool(np.all(logits[rows].argmax(-1) == targets))


def test_loglikelihood_equals_direct_forward_and_batching(model, scorer):
    requests = REQUESTS + MC_REQUESTS
    batched = scorer.loglikelihood(requests)
    assert scorer.score_shared._cache_size() >= 1  # the shared contexts went through the KV cache
    single = [scorer.loglikelihood([request])[0] for request in requests]  # alone: no context to share
    for request, got, alone in zip(requests, batched, single):
        want_logp, want_greedy = direct(model, *request)
        assert got[0] == pytest.approx(want_logp, abs=1e-4)
        assert got[1] == want_greedy
        assert got[0] == pytest.approx(alone[0], abs=1e-5) and got[1] == alone[1]
    # The argmax token is greedy, another is not.
    best = int(np.argmax(np.asarray(_forward(model, np.full((1, MAX_LEN), 5, np.int32)))[0, 0, :64]))
    greedy, other = scorer.loglikelihood([([5], [best]), ([5], [(best + 1) % 64])])
    assert greedy[1] and not other[1]


def test_virtual_tokens_loglikelihood_equals_direct_forward(prefix_model):
    """Both paths (plain, shared context through the KV cache) start from the prefix's slots in every row; the
    context is MAX_LEN real tokens (model.context_len), not max_seq_len."""
    scorer = Scorer(prefix_model, batch_size=4, min_bucket=8)
    requests = MC_REQUESTS + REQUESTS[6:8]  # both paths; 1 + 31 fills the context, 40 + 6 is truncated
    for request, got in zip(requests, scorer.loglikelihood(requests)):
        want_logp, want_greedy = direct(prefix_model, *request)
        assert got[0] == pytest.approx(want_logp, abs=1e-4) and got[1] == want_greedy
    assert scorer.score_shared._cache_size() >= 1 and scorer.truncated == 1
    with pytest.raises(InputError, match=r"has 32 tokens \(model.context_len: max_seq_len=35 less the PEFT method's 3 "):
        scorer.loglikelihood([([1], list(range(MAX_LEN + 1)))])


def test_one_compile_per_bucket(model):
    scorer = Scorer(model, batch_size=4, min_bucket=8)
    scorer.loglikelihood(REQUESTS)
    compiled = scorer.score_batch._cache_size()
    # Inputs of lengths 1..32 fall into length buckets 8, 16 and 32, continuations into widths 8, 16, 32.
    assert 3 <= compiled <= 9
    scorer.loglikelihood(REQUESTS)  # the same buckets: every program is reused
    scorer.loglikelihood(REQUESTS[:2])  # lengths 2 and 8, continuations 1 and 3: bucket (8, 8), seen above
    assert scorer.score_batch._cache_size() == compiled


def test_sharded_equals_one_device(model, scorer):
    mesh = make_mesh(tiny_config(data=2, tensor=4).mesh, jax.devices())
    sharded = Scorer(model, mesh=mesh, batch_size=3, min_bucket=32)
    assert sharded.batch_size == 4  # rounded up to what the data axis divides
    requests = REQUESTS + MC_REQUESTS
    for got, want in zip(sharded.loglikelihood(requests), scorer.loglikelihood(requests)):
        # Sums of up to ~130 in float32, reduced in another order across devices: up to 2 units in the last
        # place of the sum (one is 1.5e-5 at 130, more than the 1e-5 floor).
        assert got[0] == pytest.approx(want[0], rel=2.4e-7, abs=1e-5) and got[1] == want[1]


def test_rolling_windows_match_lm_eval_example():
    # lm-eval's documented example: tokens 0..9, prefix BOS, context 4.
    bos = 99
    assert rolling_windows(list(range(10)), bos, 4) == [
        ([bos], [0, 1, 2, 3]), ([3], [4, 5, 6, 7]), ([5, 6, 7], [8, 9])]


@pytest.mark.parametrize("n", [1, MAX_LEN - 1, MAX_LEN, MAX_LEN + 1, 2 * MAX_LEN, 2 * MAX_LEN + 1, 3 * MAX_LEN - 5])
def test_rolling_windows_at_boundaries(n):
    tokens = list(range(100, 100 + n))
    windows = rolling_windows(tokens, 0, MAX_LEN)
    assert [t for _, continuation in windows for t in continuation] == tokens  # each predicted exactly once
    sequence = [0, *tokens]
    for context, continuation in windows:
        inputs = (context + continuation)[:-1]
        assert len(inputs) == min(MAX_LEN, n)  # as much context as the positions allow
        end = sequence.index(continuation[-1])
        assert context + continuation == sequence[end - len(inputs):end + 1]  # contiguous, ends at the target
    try:
        from lm_eval import utils
    except ImportError:
        return
    theirs = [utils.make_disjoint_window(w) for w in
              utils.get_rolling_token_windows(token_list=tokens, prefix_token=0, max_seq_len=MAX_LEN, context_len=1)]
    assert [(list(c), list(k)) for c, k in theirs] == windows


def test_rolling_loglikelihood_sums_windows(model, scorer):
    short, long = list(range(1, 20)), rng.integers(0, 64, 2 * MAX_LEN + 7).tolist()
    got_short, got_long = scorer.loglikelihood_rolling([short, long], prefix_token=0)
    assert got_short == pytest.approx(direct(model, [0], short)[0], abs=1e-4)  # one window: the whole text
    assert got_long == pytest.approx(sum(direct(model, c, k)[0] for c, k in rolling_windows(long, 0, MAX_LEN)),
                                     abs=1e-4)


def test_truncation_is_reported_and_bad_requests_refused(scorer, caplog):
    long_context, continuation = list(range(1, 41)), [3, 4]
    with caplog.at_level(logging.WARNING):
        got = scorer.loglikelihood([(long_context, continuation)])
    assert "truncated from the left" in caplog.text
    assert got[0][0] == pytest.approx(scorer.loglikelihood([(long_context[-(MAX_LEN - 1):], continuation)])[0][0],
                                      abs=1e-6)
    with pytest.raises(InputError, match="request 1: the continuation is empty"):
        scorer.loglikelihood([([1], [2]), ([1], [])])
    with pytest.raises(InputError, match="empty context"):
        scorer.loglikelihood([([], [2])])
    with pytest.raises(InputError, match="loglikelihood_rolling"):
        scorer.loglikelihood([([1], list(range(MAX_LEN + 1)))])
    with pytest.raises(InputError, match="outside"):
        scorer.loglikelihood([([1], [64])])
