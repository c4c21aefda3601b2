"""Loader throughput against what a Cerebras-GPT 111M train step consumes.

    python -m cgpt_jax.data.bench --source=stdlib --tokenizer=gpt2 --seq_len=2048 --global_batch_size=120

Any `config.data` field is a flag (as in `cgpt_jax.data.prepare`). Measures, on this host's CPU:
  read       windows of step s gathered from the memory-mapped store (numpy only)
  assembled  `train_batch(s)` as a global jax.Array on the local devices, no prefetch, until ready
and compares them with the tokens/s of a 111M train step at 100% of a peak (an upper bound on what the
model can consume): this CPU's measured f32 matmul rate and the H200's bf16 peak. Target: >= 10x.
"""
from __future__ import annotations

import json
import time

import jax
import numpy as np
from absl import app, flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cgpt_jax import cli, devices, flops
from cgpt_jax.data import make_dataset, prepare


def cerebras_111m_shape(seq_len: int) -> flops.Shape:
    d, n_layers, d_ff, vocab = 768, 10, 3072, 50257
    per_block = 4 * d * d + 4 * d + 2 * d * d_ff + d_ff + d + 4 * d  # attention, MLP, two LayerNorms
    n_params = vocab * d + seq_len * d + n_layers * per_block + 2 * d
    return flops.Shape(vocab_size=vocab, d_model=d, n_layers=n_layers, d_ff=d_ff, seq_len=seq_len,
                       attention_fwd_flops_per_token=4 * seq_len * d, n_params=n_params,
                       attention_projection_params=4 * d * d)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    data_cfg = prepare.config_from_flags(args)
    data_cfg.prefetch = 0  # time the work itself; prefetch only hides it behind the step
    mesh = Mesh(np.array(jax.devices()), ("data",))
    dataset = make_dataset(data_cfg, seq_len=args.seq_len, global_batch_size=args.global_batch_size, seed=0,
                           sharding=NamedSharding(mesh, PartitionSpec("data")))
    tokens_per_step = args.global_batch_size * args.seq_len

    start = time.perf_counter()
    for step in range(args.steps):
        dataset.host_batch(step)
    read = tokens_per_step * args.steps / (time.perf_counter() - start)

    jax.block_until_ready(dataset.train_batch(args.steps))  # first call: warm-up
    start = time.perf_counter()
    for step in range(args.steps + 1, 2 * args.steps + 1):
        jax.block_until_ready(dataset.train_batch(step))
    assembled = tokens_per_step * args.steps / (time.perf_counter() - start)

    flops_per_token = flops.flops_per_token(cerebras_111m_shape(args.seq_len), "palm")
    cpu_peak = devices.measured_cpu_peak_flops()
    step_cpu = cpu_peak / flops_per_token
    step_h200 = devices.kind_by_name("h200").peak_flops / flops_per_token
    print(json.dumps({
        "dataset": dataset.describe(),
        "devices": f"{len(jax.devices())} x {jax.devices()[0].platform}",
        "seq_len": args.seq_len, "global_batch_size": args.global_batch_size, "steps": args.steps,
        "loader_tokens_per_sec": {"read": round(read), "assembled": round(assembled)},
        "train_step_111m": {
            "flops_per_token_palm": flops_per_token,
            "cpu_matmul_flops_per_sec": round(cpu_peak),
            "tokens_per_sec_at_cpu_peak": round(step_cpu, 1),
            "tokens_per_sec_at_h200_peak": round(step_h200),
        },
        "loader_over_step": {"cpu": round(assembled / step_cpu), "h200": round(assembled / step_h200, 2)},
    }, indent=1))


if __name__ == "__main__":
    # Flags are defined only when run as a program, so importing this module defines none.
    flags.DEFINE_integer("seq_len", 2048, "Tokens per sequence.")
    flags.DEFINE_integer("global_batch_size", 120, "Sequences per step.")
    flags.DEFINE_integer("steps", 40, "Steps timed for each measurement.")
    prepare.define_flags(flags.FLAGS)
    cli.run(main)
