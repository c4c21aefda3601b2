"""Token-level log-likelihood scoring, batched and bucketed by length, sharded like training.

A request is (context ids, continuation ids). Its input is (context + continuation)[:-1], left-truncated
to the model's positions as lm-evaluation-harness does; the continuation's tokens are scored at the
last len(continuation) positions: the sum of their log-probabilities, and whether greedy decoding
(argmax at every one of those positions) would produce exactly them.

Requests are sorted longest first and cut into batches of `batch_size` rows; each batch is
right-padded to a power-of-two length (at least `min_bucket`, at most the context), and the last batch
of a length is padded with empty rows, so one program is compiled per length bucket. Right padding
changes nothing before it in a causal model. Results come back in request order.

`rolling_windows` splits a document into the (context, continuation) requests whose scores sum to its
log-likelihood under a sliding window of the model's context (lm-eval's `loglikelihood_rolling`).
"""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from cgpt_jax.errors import InputError
from cgpt_jax.model import GPT
from cgpt_jax.parallel.sharding import DEFAULT_RULES, Rules, activation_sharding, logical_to_spec, state_shardings

log = logging.getLogger(__name__)

TokenRequest = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def rolling_windows(tokens: Sequence[int], prefix_token: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) requests that predict every token of `tokens` exactly once.

    The sequence [prefix_token] + tokens is cut into target spans of `max_len` tokens; the span ending at
    token e is scored with the input (prefix + tokens)[max(0, e - max_len) : e], i.e. as much context as
    the model's positions allow (so the last, shorter span gets a full window of context too).
    """
    if max_len < 1:
        raise ValueError(f"max_len={max_len} must be at least 1")
    sequence = [prefix_token, *tokens]
    requests = []
    for start in range(0, len(tokens), max_len):
        end = min(start + max_len, len(tokens))
        first_input = max(0, end - max_len)
        # Target token i (of `tokens`) is sequence[i + 1], predicted from sequence[:i + 1].
        requests.append((sequence[first_input:start + 1], list(tokens[start:end])))
    return requests


class Scorer:
    """Scores token requests with `model`; see the module docstring."""

    def __init__(self, model: GPT, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                 batch_size: int = 16, min_bucket: int = 16, progress: bool = False):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size={batch_size!r} must be a positive integer")
        self.vocab_size = model.cfg.vocab_size
        self.max_len = model.cfg.max_seq_len
        self.min_bucket = min_bucket
        self.progress = progress
        self.mesh = mesh
        self.rules = tuple((name, axes) for name, axes in rules)
        self.graphdef, state = nnx.split(model)
        batch_shards = 1
        if mesh is not None:
            state = jax.device_put(state, state_shardings(state, mesh, self.rules))
            batch_axes = logical_to_spec(("batch",), self.rules)[0]
            batch_axes = (batch_axes,) if isinstance(batch_axes, str) else (batch_axes or ())
            batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
        # Every batch splits evenly over the mesh's batch axes.
        self.batch_size = -(-batch_size // batch_shards) * batch_shards
        self.state = state
        self.score_batch = jax.jit(self._score_batch)
        self.truncated = 0  # requests whose context was cut on the left, over this scorer's life

    def _score_batch(self, state: nnx.State, inputs_BxL: jax.Array, targets_BxL: jax.Array,
                     scored_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
        """→ (sum of the scored targets' log-probabilities [B], whether all of them are the argmax [B])."""
        model = nnx.merge(self.graphdef, state)
        context = (activation_sharding(self.mesh, self.rules) if self.mesh is not None
                   else contextlib.nullcontext())
        with context:
            logits_BxLxV = model(inputs_BxL)
        # log p(target) = logit(target) - logsumexp(logits), without a second [B, L, V] array.
        target_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
        logp_BxL = target_BxL - jax.nn.logsumexp(logits_BxLxV, axis=-1)
        greedy_BxL = jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL
        return (jnp.sum(jnp.where(scored_BxL, logp_BxL, 0.0), axis=-1),
                jnp.all(greedy_BxL | ~scored_BxL, axis=-1))

    def _bucket(self, n: int) -> int:
        return min(self.max_len, max(self.min_bucket, _next_power_of_two(n)))

    def _place(self, array: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, NamedSharding(self.mesh, logical_to_spec(("batch", "length"), self.rules)))

    def _check(self, index: int, request: TokenRequest) -> list[int]:
        """The request's model input + its last target: (context + continuation), left-truncated."""
        context, continuation = [int(t) for t in request[0]], [int(t) for t in request[1]]
        if not context:
            raise InputError(f"request {index} has an empty context — the first continuation token needs one "
                             f"before it (lm-eval uses the end-of-text token)")
        if not continuation:
            raise InputError(f"request {index}: the continuation is empty (tokenizes to nothing) — give it at "
                             f"least one token")
        if len(continuation) > self.max_len:
            raise InputError(f"request {index}: the continuation has {len(continuation)} tokens but the model has "
                             f"{self.max_len} positions — score it with loglikelihood_rolling instead")
        bad = [t for t in context + continuation if not 0 <= t < self.vocab_size]
        if bad:
            raise InputError(f"request {index} has token ids outside [0, {self.vocab_size}): {bad[:5]} — the "
                             f"tokenizer does not belong to this model")
        whole = context + continuation
        if len(whole) > self.max_len + 1:
            self.truncated += 1
            whole = whole[-(self.max_len + 1):]
        return whole

    def loglikelihood(self, requests: Sequence[TokenRequest]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), is_greedy) per request, in request order."""
        truncated_before = self.truncated
        wholes = [self._check(i, r) for i, r in enumerate(requests)]
        if self.truncated > truncated_before:
            log.warning("%d of %d requests are longer than the model's %d positions; their contexts were "
                        "truncated from the left (as lm-eval does)", self.truncated - truncated_before,
                        len(requests), self.max_len)
        order = sorted(range(len(requests)), key=lambda i: -len(wholes[i]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        for batch in tqdm(batches, desc="scoring", unit="batch", disable=not self.progress):
            length = self._bucket(len(wholes[batch[0]]) - 1)
            inputs_BxL = np.zeros((self.batch_size, length), np.int32)
            targets_BxL = np.zeros((self.batch_size, length), np.int32)
            scored_BxL = np.zeros((self.batch_size, length), bool)
            for row, i in enumerate(batch):
                whole, n_scored = wholes[i], len(requests[i][1])
                n = len(whole) - 1
                inputs_BxL[row, :n] = whole[:-1]
                targets_BxL[row, :n] = whole[1:]
                scored_BxL[row, n - n_scored:n] = True
            logp_B, greedy_B = self.score_batch(self.state, self._place(inputs_BxL), self._place(targets_BxL),
                                                self._place(scored_BxL))
            logp_B, greedy_B = np.asarray(logp_B), np.asarray(greedy_B)
            for row, i in enumerate(batch):
                results[i] = (float(logp_B[row]), bool(greedy_B[row]))
        return results

    def loglikelihood_rolling(self, documents: Sequence[Sequence[int]], prefix_token: int) -> list[float]:
        """Each document's log-likelihood, conditioned on `prefix_token`, over sliding windows; all windows
        of all documents are scored in one `loglikelihood` call."""
        windows: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        for d, tokens in enumerate(documents):
            if not tokens:
                raise InputError(f"document {d} is empty (tokenizes to nothing) — there is nothing to score")
            for window in rolling_windows(tokens, prefix_token, self.max_len):
                windows.append(window)
                owners.append(d)
        totals = [0.0] * len(documents)
        for d, (logp, _) in zip(owners, self.loglikelihood(windows)):
            totals[d] += logp
        return totals
