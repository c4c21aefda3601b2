"""Generation over a preallocated KV cache: one jitted prefill, one jitted single-token decode step.

Built on the model's decode interface (cgpt_jax/model/gpt.py): `init_cache`, and `extend(tokens_BxT,
cache, start_B)`, which feeds T tokens per sequence at positions start_B + 0..T-1.

Shapes are bucketed so that a session compiles a handful of programs, not one per request or token:
prompts are right-padded to a power-of-two length P (at least `min_bucket`), the cache holds a
power-of-two number of positions C ≥ longest prompt + max_new_tokens (both capped at the context),
and the batch is padded to a power of two that the mesh's batch axes divide. The decode step has one
shape for the whole continuation; its position is a traced argument.

Prompts of different lengths share a batch: sequence b's prompt sits at positions 0..n_b-1, its first
new token is read from the prefill logits at n_b - 1 and then fed at position n_b. Cache slots past a
sequence's own position are never attended to, so results equal those of the prompt on its own.

Under a mesh, parameters follow the logical-axis rules, the batch is split over the 'batch' mesh axes,
and the cache is split by heads (its 'kv_heads' axis; 'tensor' with the default rules).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from cgpt_jax.infer.sampling import Sampling, choose
from cgpt_jax.model import GPT
from cgpt_jax.model.attention.base import Cache
from cgpt_jax.parallel.sharding import DEFAULT_RULES, Rules, activation_sharding, logical_to_spec, state_shardings


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


class Generator:
    """Generates continuations of token-id prompts with `model`; see the module docstring."""

    def __init__(self, model: GPT, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                 min_bucket: int = 16):
        self.vocab_size = model.cfg.vocab_size
        self.max_len = model.cfg.max_seq_len
        self.min_bucket = min_bucket
        model.cache_layout(1, min(min_bucket, self.max_len))  # raises now for variants that cannot decode
        self.mesh = mesh
        self.rules = tuple((name, axes) for name, axes in rules)
        self.graphdef, state = nnx.split(model)
        if mesh is not None:
            state = jax.device_put(state, state_shardings(state, mesh, self.rules))
            batch_axes = logical_to_spec(("batch",), self.rules)[0]
            batch_axes = (batch_axes,) if isinstance(batch_axes, str) else (batch_axes or ())
            self.batch_shards = math.prod(mesh.shape[a] for a in batch_axes)
        else:
            self.batch_shards = 1
        self.state = state
        self.prefill = jax.jit(self._prefill, static_argnames=("cache_len", "sampling"))
        self.decode = jax.jit(self._decode, static_argnames=("sampling",), donate_argnames=("cache",))

    # --- the two compiled programs -----------------------------------------------------------------

    def _sharding_context(self) -> contextlib.AbstractContextManager:
        return activation_sharding(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def _prefill(self, state: nnx.State, prompts_BxP: jax.Array, lengths_B: jax.Array, seeds_B: jax.Array, *,
                 cache_len: int, sampling: Sampling) -> tuple[jax.Array, jax.Array, Cache]:
        """Right-padded prompts → (first new token [B], the logits it was chosen from [B, V], cache)."""
        model = nnx.merge(self.graphdef, state)
        batch = prompts_BxP.shape[0]
        with self._sharding_context():
            cache = model.init_cache(batch, cache_len)
            logits_BxPxV, cache = model.extend(prompts_BxP, cache, jnp.zeros((batch,), jnp.int32))
        last_BxV = jnp.take_along_axis(logits_BxPxV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
        return choose(last_BxV, seeds_B, jnp.int32(0), sampling), last_BxV, cache

    def _decode(self, state: nnx.State, cache: Cache, tokens_B: jax.Array, lengths_B: jax.Array,
                seeds_B: jax.Array, index: jax.Array, *, sampling: Sampling
                ) -> tuple[jax.Array, jax.Array, Cache]:
        """Feed each sequence's new token number `index` (at position lengths_B + index) → (token number
        index + 1 [B], its logits [B, V], cache)."""
        model = nnx.merge(self.graphdef, state)
        with self._sharding_context():
            logits_Bx1xV, cache = model.extend(tokens_B[:, None], cache, lengths_B + index)
        return choose(logits_Bx1xV[:, 0], seeds_B, index + 1, sampling), logits_Bx1xV[:, 0], cache

    # --- requests ----------------------------------------------------------------------------------

    def check_prompts(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                      truncate_prompt: bool = False) -> list[list[int]]:
        """Validated prompts; with `truncate_prompt`, too-long prompts keep their last tokens."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be a positive integer")
        if max_new_tokens >= self.max_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                             f"context of {self.max_len} positions")
        if not prompts:
            raise ValueError("no prompts given")
        room = self.max_len - max_new_tokens
        checked = []
        for b, prompt in enumerate(prompts):
            prompt = [int(t) for t in prompt]
            if not prompt:
                raise ValueError(f"prompt {b} is empty; generation needs at least one token to start from")
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt {b} has token ids outside [0, {self.vocab_size}): {bad[:5]}")
            if len(prompt) > room:
                if not truncate_prompt:
                    raise ValueError(
                        f"prompt {b} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} it needs "
                        f"{len(prompt) + max_new_tokens} positions but the model's context is {self.max_len}. "
                        f"Shorten the prompt, lower max_new_tokens, or truncate the prompt explicitly "
                        f"(truncate_prompt=True keeps its last {room} tokens).")
                prompt = prompt[-room:]
            checked.append(prompt)
        return checked

    def _bucket(self, n: int) -> int:
        return min(self.max_len, max(self.min_bucket, _next_power_of_two(n)))

    def _place(self, array: np.ndarray, axes: tuple[str, ...]) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(array)
        return jax.device_put(array, NamedSharding(self.mesh, logical_to_spec(axes, self.rules)))

    def stream(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0, stop_tokens: Sequence[int] = (), truncate_prompt: bool = False
               ) -> Iterator[list[int | None]]:
        """Yield, after each decode step, every prompt's new token (None once that prompt has stopped).

        A prompt stops after a token in `stop_tokens` (which is yielded) or after `max_new_tokens`.
        Prompt b samples with seed `seed + b`, so its continuation equals that of the same prompt alone
        with that seed.
        """
        prompts = self.check_prompts(prompts, max_new_tokens, truncate_prompt)
        sampling.check(self.vocab_size)
        stop = {int(t) for t in stop_tokens}
        batch = len(prompts)
        padded_batch = -(-_next_power_of_two(batch) // self.batch_shards) * self.batch_shards
        if not 0 <= seed < 2**31 - padded_batch:
            raise ValueError(f"seed={seed} must be in [0, {2**31 - padded_batch}) (row b uses seed + b, an int32)")
        longest = max(len(p) for p in prompts)
        prompt_len = self._bucket(longest)
        cache_len = max(prompt_len, self._bucket(longest + max_new_tokens))

        prompts_BxP = np.zeros((padded_batch, prompt_len), np.int32)
        lengths_B = np.ones((padded_batch,), np.int32)  # padding rows: a one-token prompt, never read
        for b, prompt in enumerate(prompts):
            prompts_BxP[b, :len(prompt)] = prompt
            lengths_B[b] = len(prompt)
        seeds_B = (seed + np.arange(padded_batch)).astype(np.int32)
        lengths = self._place(lengths_B, ("batch",))
        seeds = self._place(seeds_B, ("batch",))

        next_B, _, cache = self.prefill(self.state, self._place(prompts_BxP, ("batch", "length")), lengths, seeds,
                                        cache_len=cache_len, sampling=sampling)
        active = [True] * batch
        for index in range(max_new_tokens):
            tokens_B = next_B
            if index + 1 < max_new_tokens:
                # Queue the next step before reading this one, so the device never waits for the host.
                next_B, _, cache = self.decode(self.state, cache, tokens_B, lengths, seeds, index,
                                               sampling=sampling)
            host_B = np.asarray(tokens_B)[:batch]
            yield [int(t) if a else None for t, a in zip(host_B, active)]
            active = [a and int(t) not in stop for t, a in zip(host_B, active)]
            if not any(active):
                return

    def generate(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 sampling: Sampling = Sampling(), seed: int = 0, stop_tokens: Sequence[int] = (),
                 truncate_prompt: bool = False) -> list[list[int]]:
        """Every prompt's new tokens (a stop token, when reached, is the last one). See `stream`."""
        outputs: list[list[int]] = [[] for _ in prompts]
        for step in self.stream(prompts, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                                stop_tokens=stop_tokens, truncate_prompt=truncate_prompt):
            for out, token in zip(outputs, step):
                if token is not None:
                    out.append(token)
        return outputs
