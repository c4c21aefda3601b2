"""Generation over a preallocated KV cache: jitted prefill programs and one jitted single-token decode step.

Built on the model's per-layer decode interface (cgpt_jax/model/gpt.py): `layer_blocks`,
`init_layer_caches` and `extend_layers`, which feeds T tokens per sequence at positions start_B + 0..T-1.
The generator holds each layer's weights once, in arrays of their own (`layers`): a step that sliced
them out of the model's layer-stacked arrays would copy them on every call, so the stacked arrays are
dropped from `state` after the copy (kept only for a PEFT prompt/prefix, whose virtual tokens' cache is
computed from them). A decode step reads each weight once, updates the donated per-layer caches in
place, and returns the sampled token ids: the LM head, the sampling and the cache writes are one
program, and the host reads one int32 per sequence per step. Prefill computes the last layer's MLP and
the LM head only at each prompt's last position (`extend_layers`' last_rows_B): nothing reads the last
layer's output elsewhere, while its keys and values of every position go into the cache. On CPU the
weights' buffers are moved onto huge pages (`host_memory`), which the step streams faster, and on one
device the layers' projections and the tied token table are laid out in column panels that the streaming
kernel reads as single runs (`panels`).

Shapes are bucketed so that a session compiles a handful of programs, not one per request or token:
prompts are right-padded to a power-of-two length P (at least `min_bucket`), the cache holds a
power-of-two number of positions C ≥ longest prompt + max_new_tokens (both capped at the context),
and the batch is padded to a power of two that the mesh's batch axes divide (for decode at least the
rows that keep the cache in place: `batch_sizes`). The decode step has one shape for the whole
continuation; its position is a traced argument. `warm_up` compiles every program a request can use
ahead of it.

Prefill: a prompt bucket of at most `prefill_chunk` positions is one program, the variant's
training-pass core over the prompt (the cache is empty). A longer one runs in chunks of
`prefill_chunk` tokens: the first through that core, each later one as `extend` over the cache (its
scores are chunk × cache instead of P × P), then a program that reads the LM head at each prompt's
last position; these compile per (chunk, cache) shape, whatever the prompt's bucket.

Prompts of different lengths share a batch: sequence b's prompt sits at positions 0..n_b-1, its first
new token is read from the prefill's hidden state at n_b - 1 and then fed at position n_b. Cache slots
past a sequence's own position are never attended to, so results equal those of the prompt on its own.

Under a mesh, parameters follow the logical-axis rules, the batch is split over the 'batch' mesh axes,
and the cache is split by heads (its 'kv_heads' axis; 'tensor' with the default rules).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from cgpt_jax import host_memory
from cgpt_jax.infer import panels
from cgpt_jax.infer.sampling import Sampling, choose
from cgpt_jax.model import GPT
from cgpt_jax.model.gpt import Block
from cgpt_jax.model.attention.base import Cache
from cgpt_jax.parallel.sharding import DEFAULT_RULES, Rules, activation_sharding, logical_to_spec, state_shardings


Weights = dict[str, Any]  # nnx.State.to_pure_dict(): nested dicts of arrays


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _is_power_of_two(n: int) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def _pad_rows(tree: Any, rows: int) -> Any:
    """Every array of `tree` zero-padded along its leading (batch) axis to `rows` rows."""
    return jax.tree.map(lambda a: jnp.pad(a, [(0, rows - a.shape[0])] + [(0, 0)] * (a.ndim - 1)), tree)


def _last_rows(lengths_B: jax.Array, start: jax.Array | int, length: int) -> tuple[jax.Array, jax.Array]:
    """For a chunk of positions start..start+length-1 → (the row of each prompt's last position, clipped
    into the chunk, [B]; whether that position lies in the chunk, [B])."""
    index_B = lengths_B - 1 - start
    return jnp.clip(index_B, 0, length - 1), (index_B >= 0) & (index_B < length)


def _compile(program: Any, *args: Any, **static: Any) -> Any:
    """Compile jitted `program` for these arguments into its cache (a later call with arguments of the same
    shapes and layouts runs it without compiling) → its outputs' shapes and layouts, to compile the next."""
    compiled = program.lower(*args, **static).compile()
    # On one device the outputs of a call are uncommitted (no sharding given); on a mesh, laid out as compiled.
    on_mesh = any(isinstance(s, NamedSharding) for s in jax.tree.leaves(compiled.output_shardings))
    return jax.tree.map(lambda out: jax.ShapeDtypeStruct(out.shape, out.dtype, weak_type=out.weak_type,
                                                         sharding=out.sharding if on_mesh else None),
                        compiled.out_info)


class Generator:
    """Generates continuations of token-id prompts with `model`; see the module docstring."""

    def __init__(self, model: GPT, *, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES,
                 min_bucket: int = 16, prefill_chunk: int = 256):
        if not _is_power_of_two(prefill_chunk) or prefill_chunk < min_bucket:
            raise ValueError(f"prefill_chunk={prefill_chunk!r} must be a power of two >= min_bucket={min_bucket}")
        self.vocab_size = model.cfg.vocab_size
        self.max_len = model.context_len  # the real tokens' room: a PEFT prompt/prefix takes the first positions
        self.min_bucket = min_bucket
        self.prefill_chunk = prefill_chunk
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
        with self.sharding_context():
            self.decode_rows = model.blocks.attn.decode_rows(min(min_bucket, self.max_len))
        self.block_graphdef = nnx.graphdef(model.blocks)
        # The weights as plain nested dicts of arrays, which a call flattens in C++ where an nnx.State's
        # Variables are flattened in Python, on the host thread that shares the cores with the step.
        layers = jax.jit(self._unstack)(state)
        in_panels = (mesh is None or mesh.size == 1) and panels.kernel_runs()
        if in_panels:  # the step's projections as panels
            layers = [jax.jit(panels.to_panels)(layer) for layer in layers]
        self.layers = [layer.to_pure_dict() for layer in layers]
        # The programs read the layers from `layers`; only a PEFT prompt/prefix still needs the stack.
        self._stacked_shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                                            state["blocks"].to_pure_dict())
        self.state = {name: sub for name, sub in state.to_pure_dict().items()
                      if name != "blocks" or model.virtual_tokens}
        table = jax.jit(panels.token_table)(self.state["wte"]) if in_panels else None
        if table is not None:  # the LM head as panels too; the embedding lookup reads them
            self.state["wte"] = table
        self.state, self.layers = host_memory.on_huge_pages((self.state, self.layers))  # a step streams them all
        self.prefill = jax.jit(self._prefill, static_argnames=("cache_len",))
        self.prefill_first = jax.jit(self._prefill_first, static_argnames=("cache_len",))
        self.prefill_next = jax.jit(self._prefill_next, donate_argnames=("caches", "last_BxD"))
        self.prefill_finish = jax.jit(self._prefill_finish)
        self.pad_rows = jax.jit(_pad_rows, static_argnames=("rows",))
        self.decode = jax.jit(self._decode, donate_argnames=("caches",))

    # --- the compiled programs ---------------------------------------------------------------------

    def sharding_context(self) -> contextlib.AbstractContextManager:
        """The mesh's activation-sharding rules, under which the model's programs are traced."""
        return activation_sharding(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def _unstack(self, state: nnx.State) -> list[nnx.State]:
        return [nnx.state(block) for block in nnx.merge(self.graphdef, state).layer_blocks()]

    def merge(self, state: Weights, layers: list[Weights]) -> tuple[GPT, list[Block]]:
        """The model and its per-layer blocks from the weights the programs take as arguments. Without its
        stacked layer arrays (dropped from `state`), the model's `blocks` hold shapes only: run the layers
        through the returned blocks (`extend_layers`)."""
        if "blocks" not in state:
            state = {**state, "blocks": self._stacked_shapes}
        return nnx.merge(self.graphdef, state), [nnx.merge(self.block_graphdef, layer) for layer in layers]

    def _prefill(self, state: Weights, layers: list[Weights], prompts_BxP: jax.Array, lengths_D: jax.Array,
                 seeds_D: jax.Array, *, cache_len: int, sampling: Sampling
                 ) -> tuple[jax.Array, jax.Array, list[Cache]]:
        """Right-padded prompts, B rows, in one program → (first new token [D], the logits it was chosen
        from [B, V], caches of D ≥ B rows). D is the decode batch (`batch_sizes`); rows B.. are padding,
        zeros in the cache."""
        caches, last_BxD = self._prefill_first(state, layers, prompts_BxP, lengths_D, cache_len=cache_len)
        next_D, last_BxV = self._prefill_finish(state, last_BxD, seeds_D, sampling=sampling)
        return next_D, last_BxV, _pad_rows(caches, lengths_D.shape[0])

    def _prefill_first(self, state: Weights, layers: list[Weights], prompts_BxT: jax.Array,
                       lengths_D: jax.Array, *, cache_len: int) -> tuple[list[Cache], jax.Array]:
        """The prompts' first T tokens into empty caches of B rows, through the variant's training-pass core
        → (caches, the hidden state at each prompt's last position [B, D] where it is among them)."""
        model, blocks = self.merge(state, layers)
        batch = prompts_BxT.shape[0]
        rows_B, here_B = _last_rows(lengths_D[:batch], 0, prompts_BxT.shape[1])
        with self.sharding_context():
            caches = model.init_layer_caches(batch, cache_len)
            x_Bx1xD, caches = model.extend_layers(blocks, prompts_BxT, caches, jnp.zeros((batch,), jnp.int32),
                                                  prefill=True, last_rows_B=rows_B)
        return caches, jnp.where(here_B[:, None], x_Bx1xD[:, 0], 0)

    def _prefill_next(self, state: Weights, layers: list[Weights], caches: list[Cache], chunk_BxT: jax.Array,
                      start: jax.Array, lengths_D: jax.Array, last_BxD: jax.Array) -> tuple[list[Cache], jax.Array]:
        """The prompts' tokens at positions start..start+T-1 over the caches (donated) → (caches, last_BxD
        updated where a prompt ends among them)."""
        model, blocks = self.merge(state, layers)
        batch = chunk_BxT.shape[0]
        rows_B, here_B = _last_rows(lengths_D[:batch], start, chunk_BxT.shape[1])
        with self.sharding_context():
            x_Bx1xD, caches = model.extend_layers(blocks, chunk_BxT, caches, jnp.full((batch,), start, jnp.int32),
                                                  last_rows_B=rows_B)
        return caches, jnp.where(here_B[:, None], x_Bx1xD[:, 0], last_BxD)

    def _prefill_finish(self, state: Weights, last_BxD: jax.Array, seeds_D: jax.Array, *, sampling: Sampling
                        ) -> tuple[jax.Array, jax.Array]:
        """Each prompt's last hidden state → (its first new token, padded to D rows, and its logits [B, V])."""
        model, _ = self.merge(state, [])
        batch = last_BxD.shape[0]
        with self.sharding_context():
            last_BxV = model.head(last_BxD[:, None])[:, 0]
        next_B = choose(last_BxV, seeds_D[:batch], jnp.int32(0), sampling)
        return _pad_rows(next_B, seeds_D.shape[0]), last_BxV

    def _decode(self, state: Weights, layers: list[Weights], caches: list[Cache], tokens_B: jax.Array,
                lengths_B: jax.Array, seeds_B: jax.Array, index: jax.Array, *, sampling: Sampling
                ) -> tuple[jax.Array, jax.Array, list[Cache]]:
        """Feed each sequence's new token number `index` (at position lengths_B + index) → (token number
        index + 1 [B], its logits [B, V], caches)."""
        model, blocks = self.merge(state, layers)
        with self.sharding_context():
            x_Bx1xD, caches = model.extend_layers(blocks, tokens_B[:, None], caches, lengths_B + index)
            logits_BxV = model.head(x_Bx1xD)[:, 0]
        return choose(logits_BxV, seeds_B, index + 1, sampling), logits_BxV, caches

    def prefill_prompts(self, prompts_BxP: np.ndarray, lengths_D: jax.Array, seeds_D: jax.Array, *, cache_len: int,
                        sampling: Sampling) -> tuple[jax.Array, jax.Array, list[Cache]]:
        """`prefill`'s result for right-padded prompts [B, P] of any bucket: one program up to
        `prefill_chunk` positions, chunks beyond (see the module docstring)."""
        batch, prompt_len = prompts_BxP.shape
        sampling = sampling.traced()
        if prompt_len <= self.prefill_chunk:
            return self.prefill(self.state, self.layers, self.place(prompts_BxP, ("batch", "length")), lengths_D,
                                seeds_D, cache_len=cache_len, sampling=sampling)
        bounds = self._chunk_bounds(prompt_len)
        chunk = lambda start, end: self.place(prompts_BxP[:, start:end], ("batch", "length"))
        caches, last_BxD = self.prefill_first(self.state, self.layers, chunk(0, bounds[1]), lengths_D,
                                              cache_len=cache_len)
        for start, end in itertools.pairwise(bounds[1:]):
            caches, last_BxD = self.prefill_next(self.state, self.layers, caches, chunk(start, end), start,
                                                 lengths_D, last_BxD)
        next_D, last_BxV = self.prefill_finish(self.state, last_BxD, seeds_D, sampling=sampling)
        if lengths_D.shape[0] > batch:
            caches = self.pad_rows(caches, rows=lengths_D.shape[0])
        return next_D, last_BxV, caches

    def _chunk_bounds(self, prompt_len: int) -> list[int]:
        # The last chunk is shorter only where the context caps the bucket below a multiple of the chunk.
        return [*range(0, prompt_len, self.prefill_chunk), prompt_len]

    # --- compiling ahead ---------------------------------------------------------------------------

    def warm_up(self, batch_sizes: Sequence[int], max_new_tokens: int,
                prompt_lengths: Sequence[int] | None = None) -> None:
        """Compile, without running them, the programs that `stream`/`generate` of b prompts (b in
        `batch_sizes`) with this `max_new_tokens` use when the longest prompt has any of `prompt_lengths`
        tokens (default: every length that fits the context), so that no such request compiles, whatever
        its sampling settings (traced): each (prompt bucket, cache bucket) pair's prefill and the decode
        step of each cache bucket.
        """
        self.check_prompts([[0]], max_new_tokens)
        room = self.max_len - max_new_tokens
        lengths = range(1, room + 1) if prompt_lengths is None else list(prompt_lengths)
        bad = [n for n in lengths if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= room]
        if bad:
            raise ValueError(f"prompt_lengths {bad[:5]} must be in [1, {room}] (the context of {self.max_len} "
                             f"positions less max_new_tokens={max_new_tokens})")
        bad = [b for b in batch_sizes if isinstance(b, bool) or not isinstance(b, int) or b < 1]
        if bad or not batch_sizes:
            raise ValueError(f"batch_sizes={list(batch_sizes)!r} must be positive integers")
        shapes = {(*self.batch_sizes(b), self.bucket(n), self.cache_len(n, max_new_tokens))
                  for b in batch_sizes for n in lengths}
        for batch, decode_batch, prompt_len, cache_len in sorted(shapes):
            self._compile_request(batch, decode_batch, prompt_len, cache_len, max_new_tokens > 1)

    def _compile_request(self, batch: int, decode_batch: int, prompt_len: int, cache_len: int, decode: bool) -> None:
        """The programs of one request shape, compiled with arguments laid out as `stream` passes them."""
        zeros = lambda shape, axes: self.place(np.zeros(shape, np.int32), axes)
        sampling = Sampling().traced()
        lengths_D, seeds_D = zeros((decode_batch,), ("batch",)), zeros((decode_batch,), ("batch",))
        if prompt_len <= self.prefill_chunk:
            next_D, _, caches = _compile(self.prefill, self.state, self.layers,
                                         zeros((batch, prompt_len), ("batch", "length")), lengths_D, seeds_D,
                                         cache_len=cache_len, sampling=sampling)
        else:
            bounds = self._chunk_bounds(prompt_len)
            caches, last_BxD = _compile(self.prefill_first, self.state, self.layers,
                                        zeros((batch, bounds[1]), ("batch", "length")), lengths_D, cache_len=cache_len)
            for length in sorted({end - start for start, end in itertools.pairwise(bounds[1:])}):
                caches, last_BxD = _compile(self.prefill_next, self.state, self.layers, caches,
                                            zeros((batch, length), ("batch", "length")), bounds[1], lengths_D,
                                            last_BxD)
            next_D, _ = _compile(self.prefill_finish, self.state, last_BxD, seeds_D, sampling=sampling)
            if decode_batch > batch:
                caches = _compile(self.pad_rows, caches, rows=decode_batch)
        if decode:
            _compile(self.decode, self.state, self.layers, caches, next_D, lengths_D, seeds_D, 0, sampling=sampling)

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

    def bucket(self, n: int) -> int:
        """The compiled length for `n` positions: the next power of two, within [min_bucket, max_len]."""
        return min(self.max_len, max(self.min_bucket, _next_power_of_two(n)))

    def batch_sizes(self, batch: int) -> tuple[int, int]:
        """(prefill, decode) batch of a request of `batch` prompts: a power of two that the mesh's batch
        axes divide, and for decode at least the attention's `decode_rows` (2 where one row would make
        XLA:CPU copy each layer's cache every step, 1 where the step reads the cache in place)."""
        padded = -(-_next_power_of_two(batch) // self.batch_shards) * self.batch_shards
        return padded, max(self.decode_rows, padded)

    def cache_len(self, longest_prompt: int, max_new_tokens: int) -> int:
        """Cache positions of a request whose longest prompt has `longest_prompt` tokens."""
        return max(self.bucket(longest_prompt), self.bucket(longest_prompt + max_new_tokens))

    def place(self, array: np.ndarray, axes: tuple[str, ...]) -> jax.Array:
        """`array` on the mesh, laid out by its logical `axes`."""
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
        sampling = sampling.traced()
        stop = {int(t) for t in stop_tokens}
        batch = len(prompts)
        padded_batch, decode_batch = self.batch_sizes(batch)
        if not 0 <= seed < 2**31 - decode_batch:
            raise ValueError(f"seed={seed} must be in [0, {2**31 - decode_batch}) (row b uses seed + b, an int32)")
        longest = max(len(p) for p in prompts)
        prompt_len = self.bucket(longest)
        cache_len = self.cache_len(longest, max_new_tokens)

        prompts_BxP = np.zeros((padded_batch, prompt_len), np.int32)
        lengths_B = np.ones((decode_batch,), np.int32)  # padding rows: a one-token prompt, never read
        for b, prompt in enumerate(prompts):
            prompts_BxP[b, :len(prompt)] = prompt
            lengths_B[b] = len(prompt)
        seeds_B = (seed + np.arange(decode_batch)).astype(np.int32)
        lengths = self.place(lengths_B, ("batch",))
        seeds = self.place(seeds_B, ("batch",))

        next_B, _, caches = self.prefill_prompts(prompts_BxP, lengths, seeds, cache_len=cache_len, sampling=sampling)
        active = [True] * batch
        for index in range(max_new_tokens):
            tokens_B = next_B
            if index + 1 < max_new_tokens:
                # Queue the next step before reading this one, so the device never waits for the host.
                next_B, _, caches = self.decode(self.state, self.layers, caches, tokens_B, lengths, seeds, index,
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
