"""Scoring and generation on text, with lm-evaluation-harness's tokenization conventions.

* `loglikelihood([(context, continuation)])`: trailing whitespace of the context moves to the
  continuation; context + continuation is encoded as one string and the continuation's tokens are those
  past the context's own encoding (so a word boundary tokenizes as it does in running text). An empty
  context is the end-of-text token (unless the continuation starts with it, which then becomes the
  context).
* `loglikelihood_rolling([text])`: the whole text, conditioned on the end-of-text token, over sliding
  windows of the model's context (`scorer.rolling_windows`).
* `generate_until([(context, until, max_tokens)])`: greedy continuation on the KV-cache generator, cut
  before the first stop string; a context too long for the room left is truncated from the left.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from jax.sharding import Mesh
from tokenizers import Tokenizer

from cgpt_jax.errors import InputError
from cgpt_jax.eval.scorer import Scorer, TokenRequest
from cgpt_jax.generate import Loaded
from cgpt_jax.infer import Generator, Sampling

log = logging.getLogger(__name__)


class TextTokens:
    """lm-eval's tokenization conventions (see the module docstring) over a tokenizer with an end-of-text
    token, for a model of `model_vocab_size` tokens."""

    def __init__(self, tokenizer: Tokenizer | None, eos_ids: Sequence[int], model_vocab_size: int):
        if tokenizer is None:
            raise InputError("this checkpoint has no tokenizer (a run on synthetic data?) — text tasks need "
                             "one: train on a text source, or use an HF directory with tokenizer files")
        if not eos_ids:
            raise InputError("the tokenizer has no end-of-text token '<|endoftext|>' — lm-eval conditions empty "
                             "contexts and whole documents on it")
        vocab = tokenizer.get_vocab_size(with_added_tokens=True)
        if vocab > model_vocab_size:
            raise InputError(f"the tokenizer has {vocab} tokens but the model only {model_vocab_size} "
                             f"— it is another model's tokenizer")
        self.tokenizer = tokenizer
        self.eot_id = eos_ids[0]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval makes them; see the module docstring."""
        if not context:
            ids = self.encode(continuation)
            if ids and ids[0] == self.eot_id:
                return ids[:1], ids[1:]
            return [self.eot_id], ids
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        context_ids = self.encode(stripped)
        whole_ids = self.encode(stripped + continuation)
        return context_ids, whole_ids[len(context_ids):]

    def requests(self, pairs: Sequence[tuple[str, str]]) -> list[TokenRequest]:
        """The token requests of (context, continuation) text pairs; a continuation that tokenizes to
        nothing is refused."""
        out = []
        for i, (context, continuation) in enumerate(pairs):
            context_ids, continuation_ids = self.encode_pair(context, continuation)
            if not continuation_ids:
                raise InputError(f"request {i}: the continuation {continuation!r} tokenizes to nothing after the "
                                 f"context {context[-40:]!r} — a task must give every choice some text")
            out.append((context_ids, continuation_ids))
        return out


class TextModel:
    """A loaded model with its tokenizer (`cgpt_jax.generate.load`), scoring and generating text."""

    def __init__(self, loaded: Loaded, mesh: Mesh | None = None, *, batch_size: int = 16, progress: bool = False):
        self.tokens = TextTokens(loaded.tokenizer, loaded.eos_ids, loaded.model.cfg.vocab_size)
        self.loaded = loaded
        self.mesh = mesh
        self.tokenizer = loaded.tokenizer
        self.eot_id = self.tokens.eot_id
        self.max_len = loaded.model.context_len  # less a PEFT prompt/prefix's virtual tokens
        self.batch_size = batch_size
        self.scorer = Scorer(loaded.model, mesh=mesh, rules=loaded.rules, batch_size=batch_size, progress=progress)
        self._generator: Generator | None = None  # built on first use: it holds its own copy of the weights

    def encode(self, text: str) -> list[int]:
        return self.tokens.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokens.decode(ids)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        return self.scorer.loglikelihood(self.tokens.requests(requests))

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        return self.scorer.loglikelihood_rolling([self.encode(t) for t in texts], self.eot_id)

    def generate_until(self, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]:
        """Greedy continuations, each cut before the first of its stop strings (end-of-text always stops)."""
        if self._generator is None:
            self._generator = Generator(self.loaded.model, mesh=self.mesh, rules=self.loaded.rules)
        results = [""] * len(requests)
        by_budget: dict[int, list[int]] = {}
        for i, (_, _, max_tokens) in enumerate(requests):
            by_budget.setdefault(max_tokens, []).append(i)
        for max_tokens, indices in by_budget.items():
            for s in range(0, len(indices), self.batch_size):
                batch = indices[s:s + self.batch_size]
                prompts = [self.encode(requests[i][0]) or [self.eot_id] for i in batch]
                room = self.max_len - max_tokens
                too_long = sum(len(p) > room for p in prompts)
                if too_long:
                    log.warning("%d contexts are longer than the %d positions left for %d new tokens; truncated "
                                "from the left (as lm-eval does)", too_long, room, max_tokens)
                texts = self._generate(prompts, [requests[i][1] for i in batch], max_tokens)
                for i, text in zip(batch, texts):
                    results[i] = text
        return results

    def _generate(self, prompts: list[list[int]], untils: list[Sequence[str]], max_tokens: int) -> list[str]:
        new_ids: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in self._generator.stream(prompts, max_new_tokens=max_tokens, sampling=Sampling(temperature=0.0),
                                           stop_tokens=[self.eot_id], truncate_prompt=True):
            for b, token in enumerate(step):
                if token is None or done[b]:
                    continue
                if token == self.eot_id:
                    done[b] = True
                    continue
                new_ids[b].append(token)
                done[b] = any(stop and stop in self.decode(new_ids[b]) for stop in untils[b])
            if all(done):  # every row has met a stop string: no more decode steps
                break
        texts = []
        for ids, until in zip(new_ids, untils):
            text = self.decode(ids)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            texts.append(text)
        return texts
