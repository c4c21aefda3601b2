"""python -m cgpt_jax.bench --config=experiments/cpu_bench.py:size=d64l2 [--compare=torch] [--out=FILE.jsonl]

Times cgpt_jax's real train step (jitted, sharded, donated; random tokens, so the input pipeline is not
measured) and, with --compare=torch, the same architecture and step in eager PyTorch
(cgpt_jax/bench/torch_gpt.py), taking turns in every round after warm-up. Prints one JSON object: for
each framework tokens/s, median step time, compile time, peak memory and MFU (palm FLOP convention,
cgpt_jax/flops.py) against the theoretical and the measured (`jnp.dot`) peak on CPU, or the vendor peak
on accelerators; with --compare, the median over rounds of the tokens/s ratio cgpt_jax / PyTorch.
"""
from __future__ import annotations

from cgpt_jax.host_memory import retain_freed_memory

retain_freed_memory()  # before JAX starts its CPU client (cgpt_jax/host_memory.py)

import json
import statistics

import jax
import ml_collections
from absl import app, flags

from cgpt_jax import cli, experiment_files, flops
from cgpt_jax.bench.runners import jax_stepper, median_ratio, random_tokens, time_alternately
from cgpt_jax.config import resolve
from cgpt_jax.devices import cpu_peak_flops, device_peak_flops

_CONFIG = experiment_files.define_config_file("config", "Experiment config file.")
_COMPARE = flags.DEFINE_enum("compare", None, ["torch"], "Also time the PyTorch eager reference.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds; the frameworks take turns in each.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per framework per round.")
_VOCAB = flags.DEFINE_integer("vocab_size", 50257, "Vocabulary used when config.model.vocab_size is -1.")
_LABEL = flags.DEFINE_string("label", None, "Name of this configuration in the output (default: its shape).")
_OUT = flags.DEFINE_string("out", None, "Append the JSON result as one line to this file.")
flags.mark_flag_as_required("config")


def peak_flops(devices: list[jax.Device]) -> dict[str, dict]:
    """The peaks MFU is reported against: {name: {'flops': total over devices or None if unknown, 'how': ...}}."""
    if devices[0].platform != "cpu":
        per_device = device_peak_flops(devices[0])
        return {"vendor": {"flops": per_device * len(devices), "how": f"{len(devices)}x {devices[0].device_kind}"}}
    return cpu_peak_flops()


def run(config: ml_collections.ConfigDict, compare: str | None, rounds: int, steps: int,
        label: str | None = None) -> dict:
    config = resolve(config)
    m, t = config.model, config.train
    devices = jax.devices()
    tokens = random_tokens(config)
    steppers = [jax_stepper(config, tokens, devices)]
    if compare == "torch":
        from cgpt_jax.bench.torch_gpt import torch_stepper  # torch is an optional extra

        steppers.append(torch_stepper(config, tokens))
    times = time_alternately(steppers, rounds, steps)
    shape = flops.Shape.from_model_config(m, t.seq_len)
    peaks = peak_flops(devices)
    tokens_per_step = t.global_batch_size * t.seq_len
    result = {
        "label": label or f"d{m.d_model}l{m.n_layers} v{m.vocab_size} s{t.seq_len} b{t.global_batch_size}",
        "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "vocab_size": m.vocab_size,
        "seq_len": t.seq_len, "global_batch": t.global_batch_size, "attention": m.attention,
        "compute_dtype": m.compute_dtype, "devices": f"{len(devices)}x {devices[0].device_kind}",
        "flops_per_token": flops.flops_per_token(shape, "palm"), "peaks": peaks,
        "rounds": rounds, "steps_per_round": steps, "frameworks": {},
    }
    for stepper in steppers:
        step_s = statistics.median(times[stepper.name])
        tokens_per_sec = tokens_per_step / step_s
        result["frameworks"][stepper.name] = {
            "params": stepper.params,
            "tokens_per_sec": round(tokens_per_sec, 1),
            "step_s_median": round(step_s, 7),
            "step_s_rounds": [round(s, 7) for s in times[stepper.name]],  # 0.1 µs: ms-long steps keep their ratio
            "compile_s": round(stepper.compile_s, 2),
            "first_step_s": round(stepper.first_step_s, 3),
            "peak_memory_mib": None if stepper.peak_memory_bytes is None
            else round(stepper.peak_memory_bytes / 2**20, 1),
            "peak_memory_source": stepper.peak_memory_source,
            "mfu": {name: None if peak["flops"] is None else round(flops.mfu(tokens_per_sec, shape, peak["flops"]), 4)
                    for name, peak in peaks.items()},
        }
    if compare:
        other = steppers[1].name
        result["ratio_tokens_per_sec"] = round(median_ratio(times[other], times["cgpt_jax"]), 3)
    return result


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = ml_collections.ConfigDict(_CONFIG.value.to_dict())
    if config.model.vocab_size == -1:
        config.model.vocab_size = _VOCAB.value
    result = run(config, _COMPARE.value, _ROUNDS.value, _STEPS.value, _LABEL.value)
    if _OUT.value:
        with open(cli.resolve_path(_OUT.value), "a") as f:
            f.write(json.dumps(result) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli.run(main)
