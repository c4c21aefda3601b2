"""One training step, ready to time: the JAX step of cgpt_jax and the timing loop that alternates steppers.

A `Stepper` runs one full training step (forward, backward, clipping, AdamW update) on a fixed batch and
returns when it has finished. `time_alternately` gives every stepper the same rounds, interleaved, so
that a slow spell of a shared machine hits all of them alike.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from cgpt_jax.config import resolve
from cgpt_jax.model import params_count
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.train.setup import build_run
from cgpt_jax.train.state import TrainState


@dataclasses.dataclass
class Stepper:
    name: str
    step: Callable[[], float]  # one training step; returns its loss once the step has finished
    compile_s: float  # ahead-of-time compilation (0 for eager frameworks)
    first_step_s: float  # the first call, after compilation
    peak_memory_bytes: int | None  # per device; None where nothing reports it
    peak_memory_source: str
    params: int


def random_tokens(config: ml_collections.ConfigDict, seed: int = 0) -> np.ndarray:
    """[global_batch, seq_len + 1] int32 tokens: inputs are [:, :-1], targets [:, 1:]."""
    t = config.train
    return np.random.default_rng(seed).integers(0, config.model.vocab_size, (t.global_batch_size, t.seq_len + 1),
                                                dtype=np.int32)


@dataclasses.dataclass
class CompiledStep:
    """cgpt_jax's train step over a mesh, compiled ahead of time, with its initial state and one batch."""
    compiled: jax.stages.Compiled  # (state, batch) -> (state, metrics); donates the state
    state: TrainState
    batch: dict[str, jax.Array]
    compile_s: float


def compile_train_step(config: ml_collections.ConfigDict, tokens_BxL1: np.ndarray,
                       devices: list[jax.Device]) -> CompiledStep:
    """The training run's own step (`build_run`): initialise the sharded state, place the batch and compile
    the jitted, donated train step."""
    config = resolve(config)
    run = build_run(config, make_mesh(config.mesh, devices))
    state = run.init_state()
    batch = run.place_batch(tokens_BxL1)
    start = time.perf_counter()
    compiled = run.train_step.lower(state, batch).compile()
    return CompiledStep(compiled, state, batch, time.perf_counter() - start)


def jax_stepper(config: ml_collections.ConfigDict, tokens_BxL1: np.ndarray,
                devices: list[jax.Device] | None = None) -> Stepper:
    """cgpt_jax's jitted, sharded, donated train step over `devices`, compiled ahead of time."""
    devices = devices if devices is not None else jax.devices()
    run = compile_train_step(config, tokens_BxL1, devices)
    compiled, state, batch, compile_s = run.compiled, run.state, run.batch, run.compile_s

    def step() -> float:
        nonlocal state
        state, metrics = compiled(state, batch)
        return float(metrics["loss"])  # waits for the step

    start = time.perf_counter()
    step()
    first_step_s = time.perf_counter() - start
    memory = devices[0].memory_stats() or {}
    if "peak_bytes_in_use" in memory:
        peak, source = memory["peak_bytes_in_use"], "allocator peak (device 0)"
    else:  # XLA:CPU keeps no allocator statistics: what XLA's buffer assignment reserves for the step
        analysis = compiled.memory_analysis()
        peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
        source = "XLA buffer assignment (arguments + outputs + temporaries)"
    return Stepper("cgpt_jax", step, compile_s, first_step_s, peak, source, params_count(resolve(config).model))


def time_alternately(steppers: list[Stepper], rounds: int, steps_per_round: int,
                     warmup_steps: int = 2) -> dict[str, list[float]]:
    """Seconds per step of each stepper in each round; the steppers take turns within every round."""
    for stepper in steppers:
        for _ in range(warmup_steps):
            stepper.step()
    times: dict[str, list[float]] = {s.name: [] for s in steppers}
    for _ in range(rounds):
        for stepper in steppers:
            start = time.perf_counter()
            for _ in range(steps_per_round):
                stepper.step()
            times[stepper.name].append((time.perf_counter() - start) / steps_per_round)
    return times


def median_ratio(numerator_s: list[float], denominator_s: list[float]) -> float:
    """Median over rounds of numerator/denominator, paired round by round."""
    return statistics.median(n / d for n, d in zip(numerator_s, denominator_s))
