"""The step-indexed loader: the global batch of step s is a pure function of (seed, s).

The train split (T tokens) is cut into W = (T - 1) // L windows of L+1 tokens with stride L, so
window k holds tokens [kL, kL + L] and every token is an input once and a target once per epoch.
Global row r of step s is the g-th draw, g = s·B + r: epoch e = g // W reads window π_e(g mod W),
where π_e is a pseudo-random permutation of [0, W) keyed by (seed, e). π_e is a keyed Feistel network
(with cycle walking onto [0, W)), so it costs O(1) memory and time per row at any corpus size and
needs no iterator state: resuming needs only the step, on any number of processes.

Each process reads only the rows its devices hold; a background thread prepares the next steps'
global arrays while the current step runs. Validation reads the first windows of the validation
split in order, the same ones at every evaluation.
"""
from __future__ import annotations

import concurrent.futures
import logging
from typing import Iterator

import jax
import numpy as np

from cgpt_jax.data.assemble import Batch, even_rows, global_batch, process_rows
from cgpt_jax.errors import InputError

FEISTEL_ROUNDS = 6

log = logging.getLogger(__name__)


class DataError(InputError):
    """Data that cannot feed the configured run; the message says how to fix it."""


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a cheap, well-mixing bijection of uint64 (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def permute(index: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """π(index) for a pseudo-random permutation π of [0, n) chosen by (seed, epoch)."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)  # the Feistel domain [0, 4^half) covers [0, n)
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    keys = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(FEISTEL_ROUNDS, np.uint64)
    x = np.asarray(index, dtype=np.uint64).copy()
    outside = np.ones(x.shape, dtype=bool)  # apply at least once; repeat where the result is >= n
    while outside.any():
        left, right = x[outside] >> shift, x[outside] & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        x[outside] = (left << shift) | right
        outside = x >= n
    return x.astype(np.int64)


class PackedTokens:
    """The `Dataset` over a packed token store (see the module docstring)."""

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, *, vocab_size: int, seq_len: int,
                 global_batch_size: int, seed: int, sharding: jax.sharding.Sharding, n_eval_batches: int,
                 prefetch: int = 2, description: dict | None = None):
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.vocab_size = vocab_size
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.sharding = sharding
        self.windows_per_epoch = (len(train_tokens) - 1) // seq_len
        if self.windows_per_epoch < global_batch_size:
            raise DataError(
                f"the train split has {len(train_tokens)} tokens, {self.windows_per_epoch} windows of "
                f"seq_len+1={seq_len + 1}, fewer than one global batch of {global_batch_size}: use a larger "
                "corpus or a smaller seq_len or global batch")
        val_windows = max(0, (len(val_tokens) - 1) // seq_len)
        self.n_eval_batches = min(n_eval_batches, val_windows // global_batch_size)
        if n_eval_batches and not self.n_eval_batches:
            raise DataError(
                f"the validation split has {len(val_tokens)} tokens, {val_windows} windows of seq_len+1, "
                f"fewer than one global batch of {global_batch_size}: raise config.data.val_fraction, use a "
                "larger corpus, or set config.data.eval_batches=0")
        if self.n_eval_batches < n_eval_batches:
            log.warning("validation split holds %d full batches, not the %d asked for; evaluating on %d",
                        self.n_eval_batches, n_eval_batches, self.n_eval_batches)
        self._rows = process_rows(sharding, global_batch_size, seq_len)
        self.prefetch = prefetch
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._pending: dict[int, concurrent.futures.Future] = {}
        self._description = description or {}

    def window_ids(self, step: int, rows: np.ndarray) -> np.ndarray:
        """Train-window index of each global `rows` of `step`."""
        draw = np.uint64(step) * np.uint64(self.global_batch_size) + np.asarray(rows, np.uint64)
        epoch, position = draw // np.uint64(self.windows_per_epoch), draw % np.uint64(self.windows_per_epoch)
        ids = np.empty(len(draw), np.int64)
        for e in np.unique(epoch):  # a batch spans at most two epochs
            here = epoch == e
            ids[here] = permute(position[here], self.windows_per_epoch, self.seed, int(e))
        return ids

    def _windows(self, tokens: np.ndarray, window_ids: np.ndarray) -> np.ndarray:
        out_NxW = np.empty((len(window_ids), self.seq_len + 1), np.int32)
        for i, w in enumerate(window_ids):
            out_NxW[i] = tokens[w * self.seq_len:(w + 1) * self.seq_len + 1]
        return out_NxW

    def train_rows(self, step: int, lo: int, hi: int) -> np.ndarray:
        """Windows [hi - lo, seq_len + 1] of global rows lo..hi-1 of `step`."""
        return self._windows(self.train_tokens, self.window_ids(step, np.arange(lo, hi)))

    def host_batch(self, step: int, process_index: int | None = None,
                   process_count: int | None = None) -> np.ndarray:
        """This process's share of step `step` when rows split evenly over processes, as windows [B/P, L+1]."""
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
        return self.train_rows(step, *even_rows(self.global_batch_size, process_index, process_count))

    def _train_global(self, step: int) -> Batch:
        lo, hi = self._rows
        return global_batch(self.train_rows(step, lo, hi), lo, self.global_batch_size, self.sharding)

    def train_batch(self, step: int) -> Batch:
        future = self._pending.pop(step, None)
        batch = future.result() if future is not None else self._train_global(step)
        for s in [s for s in self._pending if not step < s <= step + self.prefetch]:
            self._pending.pop(s).cancel()  # a jump (e.g. a resume) left these behind
        for s in range(step + 1, step + 1 + self.prefetch):
            if s not in self._pending:
                self._pending[s] = self._executor.submit(self._train_global, s)
        return batch

    def eval_batches(self) -> Iterator[Batch]:
        lo, hi = self._rows
        for i in range(self.n_eval_batches):
            window_ids = np.arange(i * self.global_batch_size + lo, i * self.global_batch_size + hi)
            yield global_batch(self._windows(self.val_tokens, window_ids), lo, self.global_batch_size,
                               self.sharding)

    def describe(self) -> dict:
        return {
            **self._description,
            "vocab_size": self.vocab_size,
            "train_tokens": len(self.train_tokens),
            "validation_tokens": len(self.val_tokens),
            "windows_per_epoch": self.windows_per_epoch,
            "steps_per_epoch": self.windows_per_epoch / self.global_batch_size,
            "eval_batches": self.n_eval_batches,
            "eval_tokens": self.n_eval_batches * self.global_batch_size * self.seq_len,
        }
