"""Decode speed of our KV-cache generation against transformers' `generate`, same weights and settings.

    python -m cgpt_jax.infer.bench_decode [--batch=1] [--prompt_len=128] [--new_tokens=128] [--repeats=3]

A Cerebras-GPT-111M-shaped model (d 768, 10 layers, 12 heads, d_ff 3072, vocab 50257, context 2048)
with random weights is exported with `save_pretrained` and loaded by transformers' GPT2LMHeadModel, so
both run the same float32 weights. Both decode greedily from the same random prompts for exactly
`new_tokens` tokens (no stop token). Decode rate = batch · (new_tokens − 1) / (t(new_tokens) − t(1)):
t(1) is prefill plus the first token, so the difference is the cached single-token steps only. Each
time is the median of `repeats` runs after a warm-up (compilation excluded), the two implementations
alternating so that load from other processes hits both alike. Prints one JSON object.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Callable

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from cgpt_jax import cli
from cgpt_jax.config import base_config
from cgpt_jax.infer import Generator
from cgpt_jax.interop import hf
from cgpt_jax.model import GPT


def model_config_111m():
    m = base_config().model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 50257, 768, 10, 12, 3072, 2048
    m.output_init_std = m.init_std / (2 * m.n_layers) ** 0.5
    return m


def interleaved_medians(runs: dict[str, Callable[[int], object]], lengths: tuple[int, ...],
                        repeats: int) -> dict[tuple[str, int], float]:
    """Median seconds of run(n) for every run and length, after a warm-up of each (compilation).

    Runs alternate within each repeat, so a change in the machine's load hits all of them alike.
    """
    for run in runs.values():
        for n in lengths:
            run(n)
    times: dict[tuple[str, int], list[float]] = {(name, n): [] for name in runs for n in lengths}
    for _ in range(repeats):
        for name, run in runs.items():
            for n in lengths:
                start = time.perf_counter()
                run(n)
                times[name, n].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    if args.new_tokens < 2:
        raise app.UsageError("--new_tokens must be at least 2 (the rate is measured between 1 and new_tokens)")

    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    model = nnx.jit(lambda: GPT(model_config_111m(), rngs=nnx.Rngs(0)))()
    prompts = np.random.RandomState(0).randint(0, 50257, (args.batch, args.prompt_len))

    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(model, directory)
        reference = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()

    generator = Generator(model)

    def ours(n: int) -> list[list[int]]:
        return generator.generate(prompts.tolist(), max_new_tokens=n)

    def theirs(n: int) -> list[list[int]]:
        with torch.no_grad():
            out = reference.generate(torch.tensor(prompts), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                     pad_token_id=0, attention_mask=torch.ones(prompts.shape, dtype=torch.long))
        return out[:, args.prompt_len:].tolist()

    n = args.new_tokens
    result = {"model": "111M-shaped (random weights)", "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": n, "device": str(jax.devices()[0].device_kind), "torch_threads": torch.get_num_threads(),
              "transformers": transformers.__version__, "torch": torch.__version__, "jax": jax.__version__}
    medians = interleaved_medians({"ours": ours, "transformers": theirs}, (1, n), args.repeats)
    for name in ("ours", "transformers"):
        first, full = medians[name, 1], medians[name, n]
        result[f"{name}_first_token_s"] = round(first, 4)
        result[f"{name}_total_s"] = round(full, 4)
        result[f"{name}_decode_tokens_per_s"] = round(args.batch * (n - 1) / (full - first), 2)
    result["same_greedy_tokens"] = ours(n) == theirs(n)
    result["decode_speed_ratio_ours_over_transformers"] = round(
        result["ours_decode_tokens_per_s"] / result["transformers_decode_tokens_per_s"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    # Flags are defined only when run as a program, so importing this module defines none.
    flags.DEFINE_integer("batch", 1, "Prompts decoded together.")
    flags.DEFINE_integer("prompt_len", 128, "Tokens per prompt.")
    flags.DEFINE_integer("new_tokens", 128, "Tokens generated per prompt (at least 2).")
    flags.DEFINE_integer("repeats", 3, "Timed runs per implementation and length; the median is kept.")
    cli.run(main)
