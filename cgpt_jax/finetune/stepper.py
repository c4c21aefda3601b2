"""A run's train step compiled on a fixed batch, ready to time (`bench.runners.time_alternately`): what
`python -m cgpt_jax.finetune.speed` and the methods' comparison (compare.py) measure."""
from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from cgpt_jax.bench.runners import Stepper
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.train.objective import Objective
from cgpt_jax.train.setup import build_run


def stepper(name: str, config: ml_collections.ConfigDict, objective: Objective, batch: dict[str, np.ndarray],
            devices: list[jax.Device] | None = None) -> Stepper:
    """The run's jitted train step on `batch`, compiled, with the memory XLA's buffer assignment reserves for it
    (arguments + outputs + temporaries; XLA:CPU keeps no allocator statistics)."""
    run = build_run(config, make_mesh(config.mesh, devices or jax.devices()), objective=objective)
    state = run.init_state()
    placed = {k: jax.device_put(v, run.batch_shardings[k]) for k, v in batch.items()}
    start = time.perf_counter()
    compiled = run.train_step.lower(state, placed).compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)

    def step() -> float:
        nonlocal state
        state, metrics = compiled(state, placed)
        return float(metrics["loss"])  # waits for the step

    return Stepper(name, step, compile_s, 0.0, peak, "XLA buffer assignment", 0)
