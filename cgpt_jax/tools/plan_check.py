"""Check the planner against a real run: python -m cgpt_jax.tools.plan_check --config=... --devices=8

Plans the config's train step for N fake CPU devices (cgpt_jax/plan.py: abstract shapes, nothing
allocated), then really runs it on the same N devices and measures what the run allocates per device:

  state      bytes of the parameter and optimizer-state shards that live on device 0 after init (exact)
  step       the real executable's buffer assignment: arguments (state + batch shards) + temporaries
  process    the growth of the process's peak resident memory (VmHWM) over init and two steps, / N:
             an operating-system measurement, independent of XLA's own accounting

and prints each beside the planner's figure with their ratio. XLA:CPU keeps no allocator statistics
(`memory_stats()` is None), so on CPU these are the measurements there are; on an accelerator the
planner's figure can also be compared with `memory_stats()['peak_bytes_in_use']`.
"""
from __future__ import annotations

import os
import re
import sys

_DEVICES_ENV = "CGPT_PLAN_CHECK_DEVICES"

from absl import app, flags

# The planner's own flags (--config, --devices, ...): this tool plans exactly as `python -m cgpt_jax.plan`.
from cgpt_jax import cli, plan as planner

flags.FLAGS.set_default("devices", 8)
flags.mark_flag_as_required("config")


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def check(config, n_devices: int) -> dict:
    import jax

    from cgpt_jax.bench.runners import compile_train_step, random_tokens
    from cgpt_jax.config import resolve

    config = resolve(config)
    predicted = planner.plan(config, n_devices, "tpu_v5p", 0.45)["memory_per_device_gib"]
    gib = 2**30
    devices = jax.devices()[:n_devices]
    rss_before_kib = _vm_kib("VmRSS")
    run = compile_train_step(config, random_tokens(config), devices)
    state_b = sum(shard.data.nbytes for leaf in jax.tree.leaves(run.state) for shard in leaf.addressable_shards
                  if shard.device == devices[0])
    state = run.state
    for _ in range(2):
        state, metrics = run.compiled(state, run.batch)
    jax.block_until_ready(metrics)
    process_b = (_vm_kib("VmHWM") - rss_before_kib) * 1024 / n_devices
    analysis = run.compiled.memory_analysis()
    step_b = analysis.argument_size_in_bytes + analysis.temp_size_in_bytes  # outputs alias the donated state
    measured = {"state": state_b, "step": step_b, "process": process_b}
    planned = {"state": predicted["parameters"] + predicted["optimizer_state"], "step": predicted["total"],
               "process": predicted["total"]}
    return {name: {"measured_gib": round(measured[name] / gib, 3), "planned_gib": planned[name],
                   "planned_over_measured": round(planned[name] * gib / measured[name], 3)}
            for name in measured}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    n_devices = flags.FLAGS.devices
    if os.environ.get(_DEVICES_ENV) != str(n_devices):  # jax reads XLA_FLAGS only when it starts
        other_flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
        env = {**os.environ, _DEVICES_ENV: str(n_devices), "JAX_PLATFORMS": "cpu", "CGPT_HOST_MALLOC": "default",
               "XLA_FLAGS": f"{other_flags.strip()} --xla_force_host_platform_device_count={n_devices}".strip()}
        os.execve(sys.executable, [sys.executable, "-m", "cgpt_jax.tools.plan_check", *sys.argv[1:]], env)
    import json

    import ml_collections

    config = ml_collections.ConfigDict(flags.FLAGS.config.to_dict())
    if config.model.vocab_size == -1:
        raise app.UsageError("the config's vocabulary follows its tokenizer; set --config.model.vocab_size")
    print(json.dumps(check(config, n_devices), indent=2))


if __name__ == "__main__":
    cli.run(main)
