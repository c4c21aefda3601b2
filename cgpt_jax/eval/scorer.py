"""Token-level log-likelihood scoring, batched and bucketed by length, sharded like training.

A request is (context ids, continuation ids). Its input is (context + continuation)[:-1], left-truncated
to the model's context as lm-evaluation-harness does; the continuation's tokens are scored at the
last len(continuation) positions: the sum of their log-probabilities, and whether greedy decoding
(argmax at every one of those positions) would produce exactly them. The context is `model.context_len`
real tokens: a PEFT prompt/prefix's virtual tokens take the first positions, and both paths below run
from a KV cache whose first slots hold them, one copy per row (`model.features`, `model.init_cache`).

Requests are sorted longest first and cut into batches of `batch_size` rows; each batch is
right-padded to a power-of-two length (at least `min_bucket`, at most the context), and the last batch
of a length is padded with empty rows. Right padding changes nothing before it in a causal model. The LM
head runs only at the scored positions: each row's last K, K the batch's longest continuation rounded
up to a power of two (at least `min_bucket`), so one program is compiled per (length, K) bucket.
Results come back in request order.

Requests with the same (truncated) context, such as the choices of a multiple-choice question, share
one pass over it: the contexts are prefilled into a KV cache once, each request's row of the cache is
gathered, and its continuation is fed through `model.extend` from there. Such a batch is compiled per
(contexts, context length, continuation width, cache length) bucket; a context whose continuations would
run past the model's positions is scored the plain way.

`rolling_windows` splits a document into the (context, continuation) requests whose scores sum to its
log-likelihood under a sliding window of the model's context (lm-eval's `loglikelihood_rolling`).
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from cgpt_jax.errors import InputError
from cgpt_jax.model import GPT
from cgpt_jax.parallel.sharding import (
    DEFAULT_RULES,
    Rules,
    activation_sharding,
    logical_to_spec,
    state_shardings,
)

log = logging.getLogger(__name__)

TokenRequest = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)
SharedGroup = tuple[tuple[int, ...], list[int], int]  # (context ids, its requests, continuation width)


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _sum_and_greedy(logits_BxKxV: jax.Array, targets_BxK: jax.Array, scored_BxK: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """(sum of the scored targets' log-probabilities [B], whether all of them are the argmax [B])."""
    # log p(target) = logit(target) - logsumexp(logits), without a second [B, K, V] array.
    target_BxK = jnp.take_along_axis(logits_BxKxV, targets_BxK[..., None], axis=-1)[..., 0]
    logp_BxK = target_BxK - jax.nn.logsumexp(logits_BxKxV, axis=-1)
    greedy_BxK = jnp.argmax(logits_BxKxV, axis=-1) == targets_BxK
    return (jnp.sum(jnp.where(scored_BxK, logp_BxK, 0.0), axis=-1),
            jnp.all(greedy_BxK | ~scored_BxK, axis=-1))


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
        # The real tokens' room: a PEFT prompt/prefix's virtual tokens take the cache's first slots.
        self.max_len = model.context_len
        self.room = (f"{self.max_len} tokens (model.context_len: max_seq_len={model.cfg.max_seq_len} less the PEFT "
                     f"method's {model.virtual_tokens} virtual tokens)" if model.virtual_tokens
                     else f"{self.max_len} positions")
        self.min_bucket = min_bucket
        self.progress = progress
        self.mesh = mesh
        self.rules = tuple((name, axes) for name, axes in rules)
        self.graphdef, state = nnx.split(model)
        self.batch_shards = 1
        if mesh is not None:
            state = jax.device_put(state, state_shardings(state, mesh, self.rules))
            batch_axes = logical_to_spec(("batch",), self.rules)[0]
            batch_axes = (batch_axes,) if isinstance(batch_axes, str) else (batch_axes or ())
            self.batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
        # Every batch splits evenly over the mesh's batch axes.
        self.batch_size = -(-batch_size // self.batch_shards) * self.batch_shards
        self.state = state
        self.score_batch = jax.jit(self._score_batch)
        self.score_shared = jax.jit(self._score_shared, static_argnames=("cache_len",))
        self.truncated = 0  # requests whose context was cut on the left, over this scorer's life

    def use_params(self, state: nnx.State) -> None:
        """Score with `state` from now on: parameters of the same model, already placed on this scorer's
        mesh (a training run's current parameters); the compiled programs are reused."""
        self.state = state

    def _score_batch(self, state: nnx.State, inputs_BxL: jax.Array, first_B: jax.Array, targets_BxK: jax.Array,
                     scored_BxK: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Row b's continuation is predicted at positions first_B[b] + 0..K-1 (those with scored_BxK) →
        (sum of its tokens' log-probabilities [B], whether all of them are the argmax [B])."""
        model = nnx.merge(self.graphdef, state)
        context = (activation_sharding(self.mesh, self.rules) if self.mesh is not None
                   else contextlib.nullcontext())
        with context:
            hidden_BxLxD = model.features(inputs_BxL)
            positions_BxK = jnp.minimum(first_B[:, None] + jnp.arange(targets_BxK.shape[1]), inputs_BxL.shape[1] - 1)
            # The head (d x V per position) only where a continuation token is predicted.
            logits_BxKxV = model.head(jnp.take_along_axis(hidden_BxLxD, positions_BxK[..., None], axis=1))
        return _sum_and_greedy(logits_BxKxV, targets_BxK, scored_BxK)

    def _score_shared(self, state: nnx.State, contexts_CxP: jax.Array, context_lengths_C: jax.Array,
                      owner_R: jax.Array, continuations_RxK: jax.Array, scored_RxK: jax.Array, *, cache_len: int
                      ) -> tuple[jax.Array, jax.Array]:
        """Row r's continuation follows context owner_R[r] → (sum of log-probabilities [R], is_greedy [R])."""
        model = nnx.merge(self.graphdef, state)
        n_contexts = contexts_CxP.shape[0]
        context = (activation_sharding(self.mesh, self.rules) if self.mesh is not None
                   else contextlib.nullcontext())
        with context:
            cache = model.init_cache(n_contexts, cache_len)
            logits_CxPxV, cache = model.extend(contexts_CxP, cache, jnp.zeros((n_contexts,), jnp.int32))
            last_CxV = jnp.take_along_axis(logits_CxPxV, (context_lengths_C - 1)[:, None, None], axis=1)[:, 0]
            layout = model.cache_layout(n_contexts, cache_len)
            cache_R = {name: jnp.take(array, owner_R, axis=layout[name].logical_axes.index("batch"))
                       for name, array in cache.items()}
            logits_RxKxV, _ = model.extend(continuations_RxK, cache_R, context_lengths_C[owner_R])
        # Token 0 is predicted by the context's last position, token j by the continuation's token j - 1.
        predicted_RxKxV = jnp.concatenate([last_CxV[owner_R][:, None], logits_RxKxV[:, :-1]], axis=1)
        return _sum_and_greedy(predicted_RxKxV, continuations_RxK, scored_RxK)

    def _bucket(self, n: int) -> int:
        return min(self.max_len, max(self.min_bucket, _next_power_of_two(n)))

    def _place(self, array: np.ndarray, axes: tuple[str, ...] = ("batch", "length")) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, NamedSharding(self.mesh, logical_to_spec(axes, self.rules)))

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
                             f"{self.room} — score it with loglikelihood_rolling instead")
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
            log.warning("%d of %d requests are longer than the model's %s; their contexts were "
                        "truncated from the left (as lm-eval does)", self.truncated - truncated_before,
                        len(requests), self.room)
        widths = [len(r[1]) for r in requests]
        batches = self._plan(wholes, widths)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for kind, batch in tqdm(batches, desc="scoring", unit="batch", disable=not self.progress):
            if kind == "plain":
                rows, (logp_B, greedy_B) = batch, self._run_plain(batch, wholes, widths)
            else:
                rows, (logp_B, greedy_B) = [i for g in batch for i in g[1]], self._run_shared(batch, wholes, widths)
            logp_B, greedy_B = np.asarray(logp_B), np.asarray(greedy_B)
            for row, i in enumerate(rows):
                results[i] = (float(logp_B[row]), bool(greedy_B[row]))
        return results

    def _plan(self, wholes: list[list[int]], widths: list[int]) -> list[tuple[str, list]]:
        """Batches: ("plain", request indices), longest first; ("grouped", [SharedGroup]), one width each."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (whole, k) in enumerate(zip(wholes, widths)):
            groups.setdefault(tuple(whole[:-k]), []).append(i)
        shared: list[SharedGroup] = []
        plain: list[int] = []
        for context, members in groups.items():
            width = self._bucket(max(widths[i] for i in members))
            # The continuations are fed at positions len(context) .. len(context) + width - 1.
            if len(members) > 1 and len(context) + width <= self.max_len:
                shared += [(context, members[s:s + self.batch_size], width)
                           for s in range(0, len(members), self.batch_size)]
            else:
                plain += members
        plain.sort(key=lambda i: -len(wholes[i]))
        batches = [("plain", plain[s:s + self.batch_size]) for s in range(0, len(plain), self.batch_size)]
        shared.sort(key=lambda group: (group[2], -len(group[0])))
        current: list[SharedGroup] = []
        for group in shared:
            if current and (sum(len(g[1]) for g in current) + len(group[1]) > self.batch_size
                            or group[2] != current[0][2]):
                batches.append(("grouped", current))
                current = []
            current.append(group)
        if current:
            batches.append(("grouped", current))
        return batches

    def _run_plain(self, batch: list[int], wholes: list[list[int]], widths: list[int]
                   ) -> tuple[jax.Array, jax.Array]:
        length = self._bucket(len(wholes[batch[0]]) - 1)
        width = self._bucket(max(widths[i] for i in batch))
        inputs_BxL = np.zeros((self.batch_size, length), np.int32)
        first_B = np.zeros((self.batch_size,), np.int32)
        targets_BxK = np.zeros((self.batch_size, width), np.int32)
        scored_BxK = np.zeros((self.batch_size, width), bool)
        for row, i in enumerate(batch):
            whole, k = wholes[i], widths[i]
            n = len(whole) - 1
            inputs_BxL[row, :n] = whole[:-1]
            first_B[row] = n - k
            targets_BxK[row, :k] = whole[-k:]
            scored_BxK[row, :k] = True
        return self.score_batch(self.state, self._place(inputs_BxL), self._place(first_B, ("batch",)),
                                self._place(targets_BxK), self._place(scored_BxK))

    def _run_shared(self, batch: list[SharedGroup], wholes: list[list[int]],
                    widths: list[int]) -> tuple[jax.Array, jax.Array]:
        """One batch of (context, its requests, continuation width) groups, all of one width."""
        width = batch[0][2]
        longest = max(len(context) for context, _, _ in batch)
        n_contexts = -(-_next_power_of_two(len(batch)) // self.batch_shards) * self.batch_shards
        contexts_CxP = np.zeros((n_contexts, self._bucket(longest)), np.int32)
        context_lengths_C = np.ones((n_contexts,), np.int32)  # padding contexts: one token, never read
        owner_R = np.zeros((self.batch_size,), np.int32)
        continuations_RxK = np.zeros((self.batch_size, width), np.int32)
        scored_RxK = np.zeros((self.batch_size, width), bool)
        row = 0
        for c, (context, members, _) in enumerate(batch):
            contexts_CxP[c, :len(context)] = context
            context_lengths_C[c] = len(context)
            for i in members:
                owner_R[row] = c
                continuations_RxK[row, :widths[i]] = wholes[i][-widths[i]:]
                scored_RxK[row, :widths[i]] = True
                row += 1
        return self.score_shared(self.state, self._place(contexts_CxP), self._place(context_lengths_C, ("batch",)),
                                 self._place(owner_R, ("batch",)), self._place(continuations_RxK),
                                 self._place(scored_RxK), cache_len=self._bucket(longest + width))

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
