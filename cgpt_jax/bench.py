"""Train-step benchmark: python -m cgpt_jax.bench --config=experiments/cerebras_gpt.py:size=111m

Times the real jitted, sharded train step on the current devices with random tokens (so the input
pipeline is not measured), excluding compilation, and prints tokens/s, the median step time, MFU
(palm FLOP convention, cgpt_jax/flops.py) and peak device memory where the backend reports it.
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from cgpt_jax import flops
from cgpt_jax.devices import device_peak_flops
from cgpt_jax.config import resolve, validate
from cgpt_jax.model import params_count
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.parallel.sharding import logical_to_spec
from cgpt_jax.train.optimizer import lr_schedule, make_optimizer
from cgpt_jax.train.state import create_sharded_state, model_graphdef
from cgpt_jax.train.step import make_train_step

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps after the warm-up step.")
_VOCAB = flags.DEFINE_integer("vocab_size", 50257, "Vocabulary used when config.model.vocab_size is -1.")


def benchmark(config: ml_collections.ConfigDict, steps: int, devices: list[jax.Device] | None = None) -> dict:
    devices = devices if devices is not None else jax.devices()
    config = resolve(config)
    validate(config, len(devices))
    t = config.train
    mesh = make_mesh(config.mesh, devices)
    batch_sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "length"), config.mesh.rules))
    tx = make_optimizer(t, config.model)
    state, shardings = create_sharded_state(config, tx, mesh)
    train_step = make_train_step(config, model_graphdef(config.model), tx, lr_schedule(t), mesh, shardings,
                                 batch_sharding)
    tokens_BxL = jax.random.randint(jax.random.key(0), (t.global_batch_size, t.seq_len + 1), 0,
                                    config.model.vocab_size, jnp.int32)
    batch = {"inputs": jax.device_put(tokens_BxL[:, :-1], batch_sharding),
             "targets": jax.device_put(tokens_BxL[:, 1:], batch_sharding)}

    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    step_times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = train_step(state, batch)
        jax.block_until_ready(metrics)
        step_times.append(time.perf_counter() - start)

    step_s = statistics.median(step_times)
    tokens_per_sec = t.global_batch_size * t.seq_len / step_s
    shape = flops.Shape.from_model_config(config.model, t.seq_len)
    peak = t.device_peak_flops if t.device_peak_flops > 0 else device_peak_flops(devices[0])
    result = {
        "params": params_count(config.model),
        "devices": f"{len(devices)}x {devices[0].device_kind}",
        "mesh": dict(mesh.shape),
        "global_batch": t.global_batch_size,
        "seq_len": t.seq_len,
        "compute_dtype": config.model.compute_dtype,
        "compile_plus_first_step_s": round(compile_s, 2),
        "step_s_median": round(step_s, 4),
        "tokens_per_sec": round(tokens_per_sec, 1),
        "mfu": round(flops.mfu(tokens_per_sec, shape, peak * len(devices)), 4),
        "peak_flops_per_device": peak,
    }
    memory = devices[0].memory_stats() or {}
    if "peak_bytes_in_use" in memory:
        result["peak_memory_gib_device0"] = round(memory["peak_bytes_in_use"] / 2**30, 2)
    return result


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = ml_collections.ConfigDict(_CONFIG.value.to_dict())
    if config.model.vocab_size == -1:
        config.model.vocab_size = _VOCAB.value
    print(json.dumps(benchmark(config, _STEPS.value), indent=2))


if __name__ == "__main__":
    app.run(main)
