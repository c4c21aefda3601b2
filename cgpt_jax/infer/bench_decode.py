"""Decode and prefill speed of our KV-cache generation against transformers' `generate`, same weights.

    python -m cgpt_jax.infer.bench_decode [--shape=111m|d256l4] [--batch=1,4,16] [--prompt_len=128]
        [--new_tokens=64] [--repeats=3] [--torch_compile] [--torch_threads=1,2]

`--shape=111m` is Cerebras-GPT-111M (d 768, 10 layers, 12 heads, d_ff 3072), `d256l4` a 4-layer d 256
model (4 heads, d_ff 1024); both with vocabulary 50257 and context 2048, random weights. The model is
exported with `save_pretrained` and loaded by transformers' GPT2LMHeadModel, so both run the same
float32 weights. Every implementation decodes greedily from the same random prompts for exactly
`new_tokens` tokens (no stop token): cgpt_jax's Generator, transformers eager, and with
`--torch_compile` transformers with a static cache and `torch.compile`d forward (inductor), each
transformers run once per `--torch_threads` count. The baseline a ratio is taken against is the fastest
of them: on a machine whose cores other processes share, torch's multi-threaded operators wait at every
parallel region for a thread the scheduler has not yet run, and one thread can be several times faster
than two (docs/performance.md). Decode rate
= batch · (new_tokens − 1) / (t(new_tokens) − t(1)): t(1) is the time to the first token (prefill plus
one token), so the difference is the cached single-token steps only; prefill rate = batch ·
prompt_len / t(1). Each of `repeats` rounds times every implementation's two runs back to back, after
a warm-up (cgpt_jax's `Generator.warm_up` compiles its programs first), the implementations
alternating so that load from other processes hits all alike; t(1) is the median over the rounds, and
so is the difference, taken within each round.

The same process measures the machine's memory read bandwidth, a streaming sum over a float32 array far
larger than the caches: up front the best of several (numpy on one thread, torch on the most threads),
and torch's sum once more in each of the alternating runs, timed like them. It also counts the bytes a
cgpt_jax decode step must read (every weight once, the position table's row aside, and the K/V cache
of the cache bucket). `fraction_of_bandwidth` is the step's read rate over the sum's in the same
alternation, median against median: this machine's read bandwidth moves by tens of percent within
seconds, so a best-of figure taken apart from the steps says more about the moment than about the step
(`fraction_of_best_read` is the same rate over the higher up-front figure). Prints one JSON object per
batch size.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
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

# d_model, n_layers, n_heads, d_ff of each --shape.
SHAPES = {"111m": (768, 10, 12, 3072), "d256l4": (256, 4, 4, 1024)}


def model_config(shape: str):
    m = base_config().model
    m.d_model, m.n_layers, m.n_heads, m.d_ff = SHAPES[shape]
    m.vocab_size, m.max_seq_len = 50257, 2048
    m.output_init_std = m.init_std / (2 * m.n_layers) ** 0.5
    return m


def interleaved_times(runs: dict[str, Callable[[int], object]], lengths: tuple[int, ...],
                      repeats: int) -> dict[tuple[str, int], list[float]]:
    """Seconds of run(n) in each of `repeats` rounds, for every run and length, after a warm-up of each
    (compilation). Runs alternate within each round, each run's lengths back to back, so that a change in
    the machine's load hits all of them alike."""
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
    return times


def first_and_decode_seconds(times: dict[tuple[str, int], list[float]], name: str, n: int) -> tuple[float, float]:
    """(The median time to the first token, t(1); the median over the rounds of t(n) − t(1), the time of the
    n − 1 cached steps.) A round's two runs are back to back, so a change of the machine's speed between
    rounds (its read bandwidth moves within seconds) does not fall on one side of the difference only."""
    decode = statistics.median(full - first for first, full in zip(times[name, 1], times[name, n]))
    return statistics.median(times[name, 1]), decode


class StreamingRead:
    """A streaming sum over `mib` MiB of float32 ones, with torch on `threads` intra-op threads; called with
    any argument, so that it takes turns with the decode runs (`interleaved_times`)."""

    def __init__(self, threads: int, mib: int = 1024):
        import torch

        self.threads = threads
        self.array = np.ones(mib * 2**18, np.float32)
        self.tensor = torch.from_numpy(self.array)
        self._set_threads = torch.set_num_threads

    def __call__(self, _: int = 0) -> None:
        self._set_threads(self.threads)  # transformers' runs between the reads set their own
        self.tensor.sum()

    def bytes_per_s_alongside(self, times: dict[tuple[str, int], list[float]], lengths: tuple[int, ...]) -> float:
        """The read's rate from `interleaved_times` run with it as "read": its median time at each length."""
        return self.array.nbytes / statistics.mean(statistics.median(times["read", n]) for n in lengths)

    def best_gb_per_s(self, repeats: int = 5) -> dict[str, float]:
        """GB/s of the best of `repeats` sums: numpy on one thread, torch on `threads`."""
        result = {}
        for name, read in (("numpy_1_thread", self.array.sum), (f"torch_{self.threads}_threads", self)):
            read()
            best = min(_seconds(read) for _ in range(repeats))
            result[f"read_gb_per_s_{name}"] = round(self.array.nbytes / best / 1e9, 2)
        return result


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def decode_step_bytes(model: GPT, batch: int, cache_len: int) -> int:
    """Bytes one decode step reads: every parameter but the position table, one row of it, and the cache."""
    params = nnx.state(model, nnx.Param)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params)) - model.wpe[...].nbytes
    cfg = model.cfg
    cache_bytes = 2 * cfg.n_layers * batch * cache_len * cfg.d_model * 4
    return weight_bytes + cfg.d_model * 4 + cache_bytes


def cpu_model() -> str:
    for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    if args.new_tokens < 2:
        raise app.UsageError("--new_tokens must be at least 2 (the rate is measured between 1 and new_tokens)")

    import torch
    import transformers

    if not args.torch_threads or not all(t.isdigit() and int(t) >= 1 for t in args.torch_threads):
        raise app.UsageError(f"--torch_threads={','.join(args.torch_threads)} must list positive thread counts")
    torch_threads = sorted({int(t) for t in args.torch_threads})
    model = nnx.jit(lambda: GPT(model_config(args.shape), rngs=nnx.Rngs(0)))()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(model, directory)
        eager = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
        compiled = transformers.GPT2LMHeadModel.from_pretrained(directory).eval() if args.torch_compile else None
    if compiled is not None:
        compiled.forward = torch.compile(compiled.forward)
    generator = Generator(model)
    batches = [int(b) for b in args.batch]
    generator.warm_up(batch_sizes=batches, prompt_lengths=[args.prompt_len], max_new_tokens=args.new_tokens)
    read = StreamingRead(max(torch_threads))
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_start": os.getloadavg(),
               **read.best_gb_per_s()}
    best_read = max(v for k, v in machine.items() if k.startswith("read_gb_per_s")) * 1e9

    for batch in batches:
        prompts = np.random.RandomState(0).randint(0, 50257, (batch, args.prompt_len))

        def ours(n: int) -> list[list[int]]:
            return generator.generate(prompts.tolist(), max_new_tokens=n)

        def transformers_run(reference, threads: int, **options) -> Callable[[int], list[list[int]]]:
            def run(n: int) -> list[list[int]]:
                torch.set_num_threads(threads)
                with torch.no_grad():
                    out = reference.generate(torch.tensor(prompts), max_new_tokens=n, min_new_tokens=n,
                                             do_sample=False, pad_token_id=0,
                                             attention_mask=torch.ones(prompts.shape, dtype=torch.long), **options)
                return out[:, args.prompt_len:].tolist()
            return run

        runs = {"cgpt_jax": ours}
        for threads in torch_threads:
            runs[f"transformers_{threads}t"] = transformers_run(eager, threads)
            if compiled is not None:
                runs[f"transformers_compile_{threads}t"] = transformers_run(compiled, threads,
                                                                            cache_implementation="static")
        n = args.new_tokens
        result = {"shape": args.shape, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": n,
                  "repeats": args.repeats,
                  "transformers": transformers.__version__, "torch": torch.__version__, "jax": jax.__version__,
                  **machine}
        times = interleaved_times({**runs, "read": read}, (1, n), args.repeats)
        bandwidth = read.bytes_per_s_alongside(times, (1, n))
        result["read_gb_per_s_alongside"] = round(bandwidth / 1e9, 2)
        for name in runs:
            first, decode = first_and_decode_seconds(times, name, n)
            result[f"{name}_first_token_s"] = round(first, 4)
            result[f"{name}_prefill_tokens_per_s"] = round(batch * args.prompt_len / first, 1)
            result[f"{name}_decode_tokens_per_s"] = round(batch * (n - 1) / decode, 2)
        expected = ours(n)
        result["same_greedy_tokens"] = {name: run(n) == expected for name, run in runs.items() if name != "cgpt_jax"}
        baselines = [name for name in runs if name != "cgpt_jax"]
        best = max(baselines, key=lambda name: result[f"{name}_decode_tokens_per_s"])
        best_first = min(baselines, key=lambda name: result[f"{name}_first_token_s"])
        result["fastest_transformers_decode"], result["fastest_transformers_first_token"] = best, best_first
        result["decode_ratio_over_fastest_transformers"] = round(
            result["cgpt_jax_decode_tokens_per_s"] / result[f"{best}_decode_tokens_per_s"], 3)
        result["first_token_ratio_fastest_transformers_over_cgpt_jax"] = round(
            result[f"{best_first}_first_token_s"] / result["cgpt_jax_first_token_s"], 3)
        cache_len = generator.cache_len(args.prompt_len, n)
        step_bytes = decode_step_bytes(model, batch, cache_len)
        steps_per_s = result["cgpt_jax_decode_tokens_per_s"] / batch
        result["decode_step_mb"] = round(step_bytes / 1e6, 1)
        result["bandwidth_limit_tokens_per_s"] = round(batch * bandwidth / step_bytes, 2)
        result["fraction_of_bandwidth"] = round(step_bytes * steps_per_s / bandwidth, 3)
        result["fraction_of_best_read"] = round(step_bytes * steps_per_s / best_read, 3)
        result["load_average_end"] = os.getloadavg()
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    # Flags are defined only when run as a program, so importing this module defines none.
    flags.DEFINE_enum("shape", "111m", list(SHAPES), "Model shape.")
    flags.DEFINE_list("batch", ["1"], "Batch sizes: prompts decoded together (comma-separated).")
    flags.DEFINE_integer("prompt_len", 128, "Tokens per prompt.")
    flags.DEFINE_integer("new_tokens", 64, "Tokens generated per prompt (at least 2).")
    flags.DEFINE_integer("repeats", 3, "Timed runs per implementation and length; the median is kept.")
    flags.DEFINE_list("torch_threads", ["1", str(os.cpu_count() or 1)],
                      "torch intra-op thread counts to time transformers at (comma-separated); the ratios are "
                      "taken against the fastest.")
    flags.DEFINE_bool("torch_compile", False, "Also time transformers with a static cache and torch.compile.")
    cli.run(main)
