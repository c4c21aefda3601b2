"""Weight bytes and KV-cache decode speed of a model in float32 and quantized, in one process.

    python -m cgpt_jax.quantize.bench [--shape=111m|d256l4] [--schemes=int8,int4] [--batch=1,16]
        [--prompt_len=128] [--new_tokens=32] [--repeats=3] [--xla_baseline]

The model is `cgpt_jax.infer.bench_decode`'s shape with random weights; each scheme quantizes the same
float model. Each model runs as the package runs it (on CPU, its few-row matmuls through the streaming
kernel, `cgpt_jax/model/few_rows.py`) and, with `--xla_baseline`, also as `NAME-xla`: every matmul through
XLA (`few_rows.xla_only`; for a quantized model XLA's dequantize-then-matmul). For each batch size every
variant decodes greedily from the same random prompts with the `Generator`, the variants alternating
(`bench_decode.interleaved_times`); decode rate = batch · (new_tokens − 1) / (t(new_tokens) − t(1)), the
difference taken within each round, as in bench_decode. `decode_step_weight_mb` is what a decode step must
read of the weights: all of them but the position table, of which one row; `weight_fraction_of_bandwidth`
is that times the steps per second over the machine's read bandwidth, measured as bench_decode does: a
streaming sum timed in turn with the variants (`bench_decode.StreamingRead`; its best-of figures up front
are printed as well). Prints one JSON object per batch size."""
from __future__ import annotations

import contextlib
import functools
import json
import os

import jax
import numpy as np
from absl import app, flags
from flax import nnx

from cgpt_jax import cli, quantize
from cgpt_jax.infer import Generator
from cgpt_jax.infer.bench_decode import (
    SHAPES,
    StreamingRead,
    cpu_model,
    first_and_decode_seconds,
    interleaved_times,
    model_config,
)
from cgpt_jax.model import GPT, few_rows


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    args = flags.FLAGS
    schemes = {spec: quantize.parse(spec) for spec in args.schemes}
    model = nnx.jit(lambda: GPT(model_config(args.shape), rngs=nnx.Rngs(0)))()
    models = {"float32": model, **{spec: quantize.apply(model, scheme) for spec, scheme in schemes.items()}}
    if args.xla_baseline:
        models.update({f"{name}-xla": models[name] for name in list(models)})
    generators = {name: Generator(m) for name, m in models.items()}
    weight_bytes = {name: quantize.weight_bytes(nnx.state(m))["total"] for name, m in models.items()}
    step_bytes = {name: weight_bytes[name] - m.wpe.get_value().nbytes for name, m in models.items()}
    machine = {"cpu": cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__, "backend": jax.default_backend()}
    read = StreamingRead(os.cpu_count() or 1)
    for batch in (int(b) for b in args.batch):
        prompts = np.random.RandomState(0).randint(0, 50257, (batch, args.prompt_len)).tolist()
        runs = {name: functools.partial(_generate, g, prompts, name.endswith("-xla")) for name, g in generators.items()}
        load_start = os.getloadavg()
        best = read.best_gb_per_s()
        times = interleaved_times({**runs, "read": read}, (1, args.new_tokens), args.repeats)
        bytes_per_s = read.bytes_per_s_alongside(times, (1, args.new_tokens))
        result = {"shape": args.shape, "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                  "repeats": args.repeats, **machine, "load_average_start": load_start, **best,
                  "read_gb_per_s_alongside": round(bytes_per_s / 1e9, 2)}
        reference = runs["float32"](args.new_tokens)
        for name, run in runs.items():
            first, decode = first_and_decode_seconds(times, name, args.new_tokens)
            result[name] = {
                "weight_mb": round(weight_bytes[name] / 1e6, 2),
                "smaller_than_float32": round(weight_bytes["float32"] / weight_bytes[name], 2),
                "decode_step_weight_mb": round(step_bytes[name] / 1e6, 2),
                "prefill_tokens_per_s": round(batch * args.prompt_len / first, 1),
                "decode_tokens_per_s": round(batch * (args.new_tokens - 1) / decode, 2),
                "weight_fraction_of_bandwidth": round(step_bytes[name] * (args.new_tokens - 1) / decode
                                                      / bytes_per_s, 3),
                "greedy_tokens_equal_to_float32": float(np.mean(np.asarray(run(args.new_tokens)) ==
                                                                np.asarray(reference)))}
        result["load_average_end"] = os.getloadavg()
        print(json.dumps(result), flush=True)


def _generate(generator: Generator, prompts: list[list[int]], xla_only: bool, n: int) -> list[list[int]]:
    with few_rows.xla_only() if xla_only else contextlib.nullcontext():  # decides only while tracing
        return generator.generate(prompts, max_new_tokens=n)


if __name__ == "__main__":
    flags.DEFINE_enum("shape", "111m", list(SHAPES), "Model shape.")
    flags.DEFINE_list("schemes", ["int8", "int4"], "Quantization schemes to compare with float32.")
    flags.DEFINE_list("batch", ["1", "16"], "Batch sizes (comma-separated).")
    flags.DEFINE_integer("prompt_len", 128, "Tokens per prompt.")
    flags.DEFINE_integer("new_tokens", 32, "Tokens generated per prompt (the rate is measured between 1 and this).",
                         lower_bound=2)
    flags.DEFINE_bool("xla_baseline", False, "Also run each model with every matmul through XLA (quantized: XLA's "
                      "dequantization).")
    flags.DEFINE_integer("repeats", 3, "Timed runs per variant and length; the median is kept.")
    cli.run(main)
