"""The CPU performance table (docs/performance.md): the main job's ladder shapes and two d256 shapes.

    bash launch/cpu_bench.sh                   (every size below, cgpt_jax vs PyTorch eager)
    python -m cgpt_jax.bench --config=experiments/cpu_bench.py:size=d64l2 --compare=torch

Ladder sizes are the main job's rungs exactly (experiments/cpu_ladder.py: vocab 512, seq 128, batch 32,
2 layers), plus d128 with 4 layers at vocab 1024; d256l4_v4096 and d256l4_v50257 are d256, 4 layers,
seq 256, batch 8.
"""
from __future__ import annotations

import ml_collections

from cgpt_jax.config import parse_arg
from cgpt_jax.errors import InputError
from cgpt_jax.experiments.cpu_ladder import SIZES as LADDER_SIZES
from cgpt_jax.experiments.cpu_ladder import cpu_base_config

# name: (d_model, n_layers, n_heads, vocab, seq_len, batch)
EXTRA_SIZES = {
    "d128l4_v1024": (128, 4, 4, 1024, 128, 32),
    "d256l4_v4096": (256, 4, 4, 4096, 256, 8),
    "d256l4_v50257": (256, 4, 4, 50257, 256, 8),
}
SIZES = [*LADDER_SIZES, *EXTRA_SIZES]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    size = parse_arg(arg, size="d64l2").size
    if size in LADDER_SIZES:
        config = cpu_base_config(size)
    elif size in EXTRA_SIZES:
        d_model, n_layers, n_heads, vocab, seq_len, batch = EXTRA_SIZES[size]
        config = cpu_base_config("d64l2")
        m, t = config.model, config.train
        m.d_model, m.n_layers, m.n_heads, m.d_ff, m.vocab_size = d_model, n_layers, n_heads, 4 * d_model, vocab
        m.max_seq_len = t.seq_len = seq_len
        t.global_batch_size = batch
    else:
        raise InputError(f"unknown size {size!r}; choose one of {SIZES}")
    config.train.steps, config.train.warmup_steps = 1000, 100  # only the schedule's shape; nothing trains
    return config


def sweep(arg: str | None = None) -> list[dict]:
    return [{"name": size, "config_arg": f"size={size}"} for size in SIZES]
