"""Continuous batching over the KV-cache generator: a fixed number of decode slots, JetStream style.

The engine owns `slots` rows of a per-layer KV cache of `cache_len` positions and one thread that loops:

    admit   while a slot is free and a request waits: prefill its prompt (the Generator's prefill, batch 1,
            the prompt's length bucket, in chunks beyond `prefill_chunk`) and insert its cache row, first token and sampling
            settings into the free slot (one jitted program; the other slots' caches are donated, not copied)
    decode  one jitted step over all slots at once: each slot feeds its last token at its own position and
            chooses its next one with its own settings (`sampling.choose_rows`)
    deliver read the previous step's tokens (the step just queued runs meanwhile) and hand each to its
            request; a request that stops (a stop token, max_tokens, or cancelled) frees its slot.

Shapes never depend on a request: prefill has one program per prompt bucket up to the generator's
`prefill_chunk` and a few per chunk beyond, insert and decode one each; `warm_up` compiles them all at start-up, so nothing compiles on
the request path. A slot's results equal the prompt decoded on its own (`Generator.generate` with the
same seed): rows of a batch never mix, and cache positions past a slot's own are never attended to.

Requests receive events through their `emit` callback, called on the engine thread: (token, logprob,
finish_reason or None); should a program fail, every request gets (-1, 0.0, ERROR) and the engine stops.
`cancel` (a client that went away, a stop string matched by the caller) frees the slot at the next step.
An idle slot keeps decoding whatever it holds (its position kept inside the cache); its outputs are dropped.
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from cgpt_jax.infer import Generator, Sampling
from cgpt_jax.infer.sampling import choose_rows
from cgpt_jax.model.attention.base import Cache
from cgpt_jax.parallel.sharding import constrain

# finish reasons, as the OpenAI API names them; ERROR: the engine failed (token -1)
STOP, LENGTH, ERROR = "stop", "length", "error"

Emit = Callable[[int, float, "str | None"], None]  # (token, logprob, finish reason once finished)


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt to continue; validated by the caller (`Engine.check` says what fits)."""

    prompt: list[int]
    max_tokens: int
    emit: Emit
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_tokens: frozenset[int] = frozenset()
    generated: int = 0
    finished: bool = False
    cancelled: bool = False


SlotState = dict[str, jax.Array]  # per slot: token, position, index, seed, temperature, top_k, top_p


class Engine:
    """Serves `Request`s on `slots` decode rows of `cache_len` positions each; see the module docstring."""

    def __init__(self, generator: Generator, *, slots: int, cache_len: int):
        if slots < 1 or slots % generator.batch_shards:
            raise ValueError(f"slots={slots} must be a positive multiple of the mesh's batch shards "
                             f"({generator.batch_shards})")
        # A power of two (or the whole context), so that every prompt bucket fits the cache. The context is the
        # real tokens' (model.context_len): each slot's cache also holds a PEFT prompt/prefix's virtual tokens
        # in its first slots, copied with the prefilled row (`_insert_program`).
        self.cache_len = min(generator.max_len, 1 << max(cache_len - 1, 0).bit_length())
        if self.cache_len < 2:
            raise ValueError(f"cache_len={cache_len} leaves no room for a prompt and a new token")
        self.generator = generator
        self.slots = slots
        self.prefill_batch = generator.batch_sizes(1)[0]
        self.buckets = sorted({generator.bucket(n) for n in range(1, self.cache_len)})
        model = generator.merge(generator.state, [])[0]
        self.virtual_tokens = model.virtual_tokens
        self._cache_axes = {name: spec.logical_axes for name, spec in model.blocks.attn.cache_layout(1, 1).items()}
        self._insert = jax.jit(self._insert_program, donate_argnames=("caches", "state"))
        self._step = jax.jit(self._step_program, donate_argnames=("caches", "state"))
        self._caches, self._state = jax.jit(self._empty)(generator.state, generator.layers)
        self._owners: list[Request | None] = [None] * slots
        self._pending: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run, for tests and metrics
        self.failure: Exception | None = None

    # --- the compiled programs ---------------------------------------------------------------------

    # The weights are arguments, never captured: a captured array would be compiled into the program.
    def _empty(self, weights: nnx.State, layers: list[nnx.State]) -> tuple[list[Cache], SlotState]:
        model = self.generator.merge(weights, layers)[0]
        with self.generator.sharding_context():
            caches = model.init_layer_caches(self.slots, self.cache_len)
        zeros = jnp.zeros((self.slots,), jnp.int32)
        state = {"token": zeros, "position": zeros, "index": zeros, "seed": zeros, "top_k": zeros,
                 "temperature": jnp.zeros((self.slots,), jnp.float32), "top_p": jnp.ones((self.slots,), jnp.float32)}
        return caches, state

    def _insert_program(self, caches: list[Cache], state: SlotState, new_caches: list[Cache], logits_BxV: jax.Array,
                        slot: jax.Array, settings: SlotState) -> tuple[list[Cache], SlotState, jax.Array, jax.Array]:
        """Row 0 of a prefill (caches, last-position logits) into `slot` → (caches, state, first token, its
        logprob). `settings` holds the request's prompt length as 'position' and its sampling settings."""
        token_1, logprob_1 = choose_rows(logits_BxV[:1], settings["temperature"][None], settings["top_k"][None],
                                         settings["top_p"][None], settings["seed"][None], jnp.zeros((1,), jnp.int32))
        with self.generator.sharding_context():
            caches = [{name: constrain(jax.lax.dynamic_update_slice_in_dim(cache[name], new[name][:1], slot, axis=0),
                                       self._cache_axes[name]) for name in cache}
                      for cache, new in zip(caches, new_caches)]
        row = {**settings, "token": token_1[0], "index": jnp.int32(0)}
        state = {name: state[name].at[slot].set(row[name]) for name in state}
        return caches, state, token_1[0], logprob_1[0]

    def _step_program(self, weights: nnx.State, layers: list[nnx.State], caches: list[Cache], state: SlotState
                      ) -> tuple[list[Cache], SlotState, jax.Array, jax.Array]:
        """Every slot feeds its token at its position → (caches, state, next tokens [S], their logprobs [S])."""
        model, blocks = self.generator.merge(weights, layers)
        with self.generator.sharding_context():
            x_Sx1xD, caches = model.extend_layers(blocks, state["token"][:, None], caches, state["position"])
            logits_SxV = model.head(x_Sx1xD)[:, 0]
        index_S = state["index"] + 1
        token_S, logprob_S = choose_rows(logits_SxV, state["temperature"], state["top_k"], state["top_p"],
                                         state["seed"], index_S)
        # A finished slot may run one step past its last position before the host sees it: stay in the cache.
        position_S = jnp.minimum(state["position"] + 1, self.cache_len - 1)
        return caches, {**state, "token": token_S, "position": position_S, "index": index_S}, token_S, logprob_S

    # --- requests ----------------------------------------------------------------------------------

    def check(self, prompt_len: int, max_tokens: int) -> str | None:
        """Why a request does not fit the slots' cache (None when it does)."""
        if prompt_len + max_tokens > self.cache_len:
            virtual = (f" (at most the model's context_len={self.generator.max_len}: its PEFT method's "
                       f"{self.virtual_tokens} virtual tokens take the first positions)" if self.virtual_tokens else "")
            return (f"the prompt's {prompt_len} tokens plus max_tokens={max_tokens} need {prompt_len + max_tokens} "
                    f"positions but a slot holds {self.cache_len}{virtual}")
        return None

    def submit(self, request: Request) -> None:
        problem = self.check(len(request.prompt), request.max_tokens)
        if problem is not None or request.max_tokens < 1:
            raise ValueError(problem or f"max_tokens={request.max_tokens} must be at least 1")
        with self._wake:
            if self._stopping:
                raise RuntimeError("the engine is stopping")
            self._pending.append(request)
            self._wake.notify()

    def cancel(self, request: Request) -> None:
        """Stop generating for `request`; its slot is freed at the next step (no event follows)."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def busy_slots(self) -> int:
        return sum(owner is not None for owner in self._owners)

    # --- the loop ------------------------------------------------------------------------------------

    def warm_up(self) -> None:
        """Compile every program (each prompt bucket's prefill, insert, decode) by running it once."""
        for bucket in self.buckets:
            self._admit(Request([1] * min(bucket, self.cache_len - 1), 2, lambda *event: None), 0)
            while any(self._owners):
                self._deliver(*self._dispatch())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cgpt_jax-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop; requests still waiting or decoding are cancelled (callers drain before this)."""
        with self._wake:
            self._stopping = True
            for request in [*self._pending, *filter(None, self._owners)]:
                request.cancelled = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception as e:  # a failed program: fail every request instead of leaving it waiting
            logging.exception("the engine failed")
            self.failure = e
            with self._wake:
                self._stopping = True
                failed = [*self._pending, *filter(None, self._owners)]
                self._pending.clear()
                self._owners = [None] * self.slots
            for request in failed:
                request.emit(-1, 0.0, ERROR)

    def _serve(self) -> None:
        inflight: collections.deque = collections.deque()
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not any(self._owners):
                    self._wake.wait()
                if self._stopping and not any(self._owners) and not inflight:
                    return
                admitted = []
                while self._pending and None in self._owners:
                    request = self._pending.popleft()
                    if not request.cancelled:
                        admitted.append((request, self._owners.index(None)))
                        self._owners[admitted[-1][1]] = request
            for request, slot in admitted:
                self._admit(request, slot)
            self._free_cancelled()
            if any(self._owners):
                inflight.append(self._dispatch())
            if inflight and (len(inflight) > 1 or not any(self._owners)):
                self._deliver(*inflight.popleft())
            if self._stopping and not any(self._owners):
                while inflight:
                    self._deliver(*inflight.popleft())

    def _admit(self, request: Request, slot: int) -> None:
        generator = self.generator
        n = len(request.prompt)
        prompts_BxP = np.zeros((self.prefill_batch, generator.bucket(n)), np.int32)
        prompts_BxP[0, :n] = request.prompt
        lengths_B = np.full((self.prefill_batch,), n, np.int32)
        _, logits_BxV, new_caches = generator.prefill_prompts(
            prompts_BxP, generator.place(lengths_B, ("batch",)), generator.place(np.zeros_like(lengths_B), ("batch",)),
            cache_len=self.cache_len, sampling=Sampling())
        settings = {"position": np.int32(n), "seed": np.int32(request.seed), "top_k": np.int32(request.top_k),
                    "temperature": np.float32(request.temperature), "top_p": np.float32(request.top_p)}
        self._caches, self._state, token, logprob = self._insert(self._caches, self._state, new_caches, logits_BxV,
                                                                 np.int32(slot), settings)
        self._owners[slot] = request
        self._hand(request, slot, int(token), float(logprob))

    def _dispatch(self) -> tuple[jax.Array, jax.Array, list[Request | None]]:
        self._caches, self._state, token_S, logprob_S = self._step(self.generator.state, self.generator.layers,
                                                                   self._caches, self._state)
        self.steps += 1
        return token_S, logprob_S, list(self._owners)

    def _deliver(self, token_S: jax.Array, logprob_S: jax.Array, owners: list[Request | None]) -> None:
        tokens, logprobs = np.asarray(token_S), np.asarray(logprob_S)
        for slot, request in enumerate(owners):
            if request is not None and self._owners[slot] is request:
                self._hand(request, slot, int(tokens[slot]), float(logprobs[slot]))

    def _hand(self, request: Request, slot: int, token: int, logprob: float) -> None:
        """One new token of `request`; frees the slot when it was the last."""
        if request.cancelled:
            self._free(request, slot)
            return
        request.generated += 1
        reason = (STOP if token in request.stop_tokens else LENGTH if request.generated >= request.max_tokens
                  else None)
        if reason is not None:
            self._free(request, slot)
        request.emit(token, logprob, reason)

    def _free(self, request: Request, slot: int) -> None:
        request.finished = True
        self._owners[slot] = None

    def _free_cancelled(self) -> None:
        for slot, request in enumerate(self._owners):
            if request is not None and request.cancelled:
                self._free(request, slot)
