"""Faults the loop survives or reports: preemption signals and non-finite steps."""
from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from cgpt_jax.train.objective import Objective
from cgpt_jax.train.state import TrainState
from cgpt_jax.train.step import loss_and_grads
from cgpt_jax.treepath import path_name


class NonFiniteError(FloatingPointError):
    """A train step produced a non-finite loss or gradient, and the config says to stop."""


# --- preemption ----------------------------------------------------------------------------------------

class PreemptionWatch:
    """Turns SIGTERM/SIGINT into "stop after the current step" (the loop then saves and exits).

    One process: Python signal handlers; a second signal acts as usual (Ctrl-C twice aborts at once).
    Several processes: JAX's preemption sync point, so that every host stops after the same step (JAX's
    coordination service catches SIGTERM itself there, and Python handlers would override it).
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}
        self._multiprocess = jax.process_count() > 1
        if not self._multiprocess and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def should_stop(self, step: int) -> bool:
        """Called once per step, on every process."""
        if self._multiprocess:
            try:
                reached = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # JAX's preemption service is disabled
                return False
            if reached:
                self.signal_name = "preemption notice"
            return reached
        return self.signal_name is not None

    def close(self) -> None:
        self._restore_handlers()


# --- non-finite steps ------------------------------------------------------------------------------------

def reject_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """Leave params and optimizer state unchanged on a step whose gradient norm is not finite.

    The loop decides what such a step means (config.checkpoint.nan_policy); either way the state stays
    finite. Written with selects, not lax.cond: finite steps then compute bit for bit what `inner` alone
    computes (a cond changed the last bits on CPU). The optimizer's own count, and with it its learning-rate
    schedule, does not advance on a rejected step.
    """

    def update(grads, state, params=None):
        finite = jnp.isfinite(optax.tree.norm(grads))
        updates, new_state = inner.update(grads, state, params)
        updates = jax.tree.map(lambda u: jnp.where(finite, u, jnp.zeros_like(u)), updates)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        return updates, new_state

    return optax.GradientTransformation(inner.init, update)


@jax.jit
def _finite_flags(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
                        else jnp.array(True), tree)


def nonfinite_tensors(tree: Any) -> list[str]:
    """Names of the tensors of `tree` that hold a NaN or an infinity."""
    flags = jax.device_get(_finite_flags(tree))
    return [path_name(path) for path, ok in jax.tree_util.tree_leaves_with_path(flags) if not ok]


def _rows_with_bad_tokens(tokens: jax.Array, vocab_size: int) -> list[int]:
    rows = set()
    for shard in tokens.addressable_shards:  # this process's rows only; enough to point at the data
        data = np.asarray(shard.data)
        first_row = shard.index[0].start or 0
        rows.update(first_row + int(r) for r in np.nonzero(((data < 0) | (data >= vocab_size)).any(axis=1))[0])
    return sorted(rows)


def _names(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "") or "none"


def diagnose_nonfinite(step: int, values: dict[str, float], state: TrainState, batch: dict[str, jax.Array],
                       objective: Objective, graphdef: nnx.GraphDef, config: ml_collections.ConfigDict) -> str:
    """A multi-line account of a non-finite step: where, on which data, and which tensors."""
    lines = [(f"non-finite training step {step}: loss={values['loss']}, grad_norm={values['grad_norm']}, "
              f"lr={values.get('lr')}"),
             (f"  data: dataset.train_batch({step}) of config.data.source={config.data.source!r} with "
              f"train.seed={config.train.seed} ({config.train.global_batch_size} sequences of "
              f"{config.train.seq_len} tokens)")]
    bad_rows = _rows_with_bad_tokens(batch["inputs"], config.model.vocab_size)
    if bad_rows:
        lines.append(f"  token ids outside [0, {config.model.vocab_size}) in rows {bad_rows[:20]}")
    lines.append(f"  non-finite in the state now (after step {int(state.step) - 1}; updates of non-finite steps "
                 f"are rejected): params: {_names(nonfinite_tensors(state.params))}; optimizer state: "
                 f"{_names(nonfinite_tensors(state.opt_state))}")
    grads_fn = jax.jit(lambda p, b: loss_and_grads(objective, graphdef, p, b, config.train.micro_batches))
    loss, grads = grads_fn(state.params, batch)
    lines.append(f"  recomputed on that batch with these parameters: loss={float(loss)}; non-finite gradients: "
                 f"{_names(nonfinite_tensors(grads))}")
    return "\n".join(lines)
