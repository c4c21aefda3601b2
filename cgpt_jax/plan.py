"""Ahead-of-time planner: will this config fit the target, and how fast will it run?

    python -m cgpt_jax.plan --config=experiments/cerebras_gpt.py:size=13b --mesh=fsdp=64 --device=tpu_v5p

Lowers and compiles the real train step for the target device count on fake CPU devices, with
abstract shapes only (nothing is allocated), then reports per-device memory (parameters, optimizer
state and batch from their shardings; activations and workspace from the compiled program), FLOPs per
step from the one FLOP count, and the step time and tokens/s predicted at a stated MFU.
The compile is XLA:CPU's, so activation memory is an estimate of what the target's compiler will need.
"""
from __future__ import annotations

import math
import os
import re
import sys
import time

# The fake device count must be set before jax is imported: the planner re-executes itself with it.
_DEVICES_ENV = "CGPT_PLAN_DEVICES"

from absl import app, flags  # noqa: E402

from cgpt_jax import cli, experiment_files  # noqa: E402  (imports no jax)

_CONFIG = experiment_files.define_config_file("config", "Experiment config file.")
_MESH = flags.DEFINE_string("mesh", None, "Target mesh, e.g. 'fsdp=64' or 'data=4,fsdp=8,tensor=2' "
                            "(axes not named are 1). Default: the config's mesh with --devices.")
_DEVICES = flags.DEFINE_integer("devices", None, "Target device count (default: the --mesh product).")
_DEVICE = flags.DEFINE_string("device", "tpu_v5p", "Target device kind (see cgpt_jax/devices.py).")
_MFU = flags.DEFINE_float("mfu", 0.45, "Assumed MFU for the step-time prediction.")
_COMPUTE_DTYPE = flags.DEFINE_string("compute_dtype", "bfloat16", "Compute dtype on the target.")
HEADROOM = 0.9  # plan to use at most this share of device memory (runtime, fragmentation)


def parse_mesh(text: str) -> dict[str, int]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for item in text.split(","):
        axis, sep, size = item.partition("=")
        if not sep or axis not in sizes or not size.isdigit() or int(size) < 1:
            raise ValueError(f"--mesh={text!r}: expected axis=size items with axes data, fsdp, tensor")
        sizes[axis] = int(size)
    return sizes


def lowered_train_step(config, n_devices: int):
    """The training run's own step (`build_run`) for `n_devices`, lowered on abstract shapes only (nothing is
    allocated); returns (run, lowered)."""
    import jax

    from cgpt_jax.config import resolve
    from cgpt_jax.parallel.mesh import make_mesh
    from cgpt_jax.train.setup import build_run

    config = resolve(config)
    run = build_run(config, make_mesh(config.mesh, jax.devices()[:n_devices]))
    return run, run.train_step.lower(run.abstract_state, run.abstract_batch())


def plan(config, n_devices: int, device_kind: str, mfu: float) -> dict:
    import jax

    from cgpt_jax import flops
    from cgpt_jax.devices import kind_by_name
    from cgpt_jax.model import params_count

    kind = kind_by_name(device_kind)
    run, lowered = lowered_train_step(config, n_devices)
    config, mesh, abstract, shardings = run.config, run.mesh, run.abstract_state, run.shardings
    t = config.train
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()

    def bytes_per_device(tree, tree_shardings) -> float:
        leaves = jax.tree.leaves(tree)
        shards = jax.tree.leaves(tree_shardings)
        return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, shards))

    params_b = bytes_per_device(abstract.params, shardings.params)
    opt_b = bytes_per_device(abstract.opt_state, shardings.opt_state)
    temp_b = float(memory.temp_size_in_bytes)
    argument_b = float(memory.argument_size_in_bytes)
    total_b = argument_b + temp_b  # outputs alias the donated state
    shape = flops.Shape.from_model_config(config.model, t.seq_len)
    tokens_per_step = t.global_batch_size * t.seq_len
    step_flops = flops.flops_per_token(shape, "palm") * tokens_per_step
    step_s = step_flops / (n_devices * kind.peak_flops * mfu)
    fits = total_b <= HEADROOM * kind.memory_bytes
    suggestions = []
    if not fits:
        if config.model.remat != "full":
            suggestions.append("--config.model.remat=full (recompute activations in the backward pass)")
        suggestions.append(f"--config.train.micro_batches={2 * t.micro_batches} (smaller activations per pass)")
        if mesh.shape["fsdp"] < n_devices:
            suggestions.append("a larger fsdp axis (shards parameters and optimizer state further)")
    gib = 2**30
    return {
        "config": {"params": params_count(config.model), "global_batch": t.global_batch_size,
                   "seq_len": t.seq_len, "micro_batches": t.micro_batches, "remat": config.model.remat,
                   "compute_dtype": config.model.compute_dtype},
        "target": {"device": kind.name, "devices": n_devices, "mesh": dict(mesh.shape),
                   "memory_per_device_gib": round(kind.memory_bytes / gib, 1)},
        "memory_per_device_gib": {"parameters": round(params_b / gib, 3), "optimizer_state": round(opt_b / gib, 3),
                                  "arguments_total": round(argument_b / gib, 3),
                                  "activations_and_workspace": round(temp_b / gib, 3),
                                  "total": round(total_b / gib, 3)},
        "fits": fits,
        "suggestions": suggestions,
        "flops_per_step_palm": step_flops,
        "assumed_mfu": mfu,
        "predicted_step_s": float(f"{step_s:.4g}"),
        "predicted_tokens_per_sec": float(f"{tokens_per_step / step_s:.4g}"),
        "cpu_compile_s": round(compile_s, 1),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import ml_collections

    config = ml_collections.ConfigDict(_CONFIG.value.to_dict())
    if _MESH.value:
        for axis, size in parse_mesh(_MESH.value).items():
            config.mesh[axis] = size
    n_devices = _DEVICES.value or (math.prod(parse_mesh(_MESH.value).values()) if _MESH.value else None)
    if n_devices is None:
        raise app.UsageError("give the target with --mesh=... or --devices=N")
    if os.environ.get(_DEVICES_ENV) != str(n_devices):
        # Re-run with n fake CPU devices; jax reads XLA_FLAGS only when it starts.
        other_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
        env = {**os.environ, _DEVICES_ENV: str(n_devices), "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"{other_flags.strip()} --xla_force_host_platform_device_count={n_devices}".strip()}
        os.execve(sys.executable, [sys.executable, "-m", "cgpt_jax.plan", *sys.argv[1:]], env)
    import json

    from cgpt_jax.devices import kind_by_name

    kind_by_name(_DEVICE.value)  # fail fast on an unknown kind, before the compile
    config.model.compute_dtype = _COMPUTE_DTYPE.value
    if config.model.vocab_size == -1:
        raise app.UsageError("the config's vocabulary follows its tokenizer; set --config.model.vocab_size")
    start = time.perf_counter()
    result = plan(config, n_devices, _DEVICE.value, _MFU.value)
    result["planner_wall_s"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli.run(main)
