"""A bounded load test of `python -m cgpt_jax.serve` on the loopback address (docs/serving.md).

    python -m cgpt_jax.serve.loadtest --checkpoint=hf:DIR [--config=experiments/cerebras_gpt.py:size=111m]
        [--requests=500] [--concurrency=16,64] [--max_batch=16] [--cache_len=256] [--seed=0]
        [--prompt_tokens=4,160] [--new_tokens=8,64] [--time_limit=900] [--output=FILE.json]

With --config, a randomly initialised model of that shape is first written to DIR (which must not exist).
The requests are greedy completions of random token-id prompts of mixed lengths (uniform in
--prompt_tokens) and lengths (uniform in --new_tokens). The test then

  1. serves each request one at a time with the offline generator (`Generator.generate`, what
     `python -m cgpt_jax.generate` runs) after compiling its shapes: the expected answers, and the
     one-request-at-a-time baseline (output tokens/s);
  2. starts the server as a subprocess on 127.0.0.1 with --max_batch slots and, for each --concurrency C,
     sends all requests from C concurrent streaming clients: none may be lost and every answer must equal
     the offline one. It reports p50/p99 time to first token and total latency, output tokens/s and the
     ratio to the baseline, and samples the server's resident memory;
  3. stops the server with SIGTERM and checks it exits 0.

It prints one JSON object (also written to --output) and exits 1 when a request was lost or wrong.
Everything stays on the loopback address and within --time_limit seconds.
"""
from __future__ import annotations

import asyncio
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

from cgpt_jax import cli, experiment_files
from cgpt_jax.errors import InputError


def define_flags() -> None:
    """Defined only when run as a command, so that importing this module defines no flags."""
    flags.DEFINE_string("checkpoint", None, "hf:DIR or a run directory to serve.")
    experiment_files.define_config_file("config", "Write a random model of this shape to DIR first.")
    flags.DEFINE_integer("requests", 500, "Requests per concurrency level.")
    flags.DEFINE_list("concurrency", ["16", "64"], "Concurrent clients, one run each.")
    flags.DEFINE_integer("max_batch", 16, "The server's decode slots.")
    flags.DEFINE_integer("cache_len", 256, "The server's positions per slot.")
    flags.DEFINE_integer("seed", 0, "Seed of the requests.")
    flags.DEFINE_list("prompt_tokens", ["4", "160"], "Prompt lengths: min,max.")
    flags.DEFINE_list("new_tokens", ["8", "64"], "max_tokens: min,max.")
    flags.DEFINE_float("time_limit", 900.0, "Seconds the whole test may take.")
    flags.DEFINE_string("output", None, "Also write the results to this JSON file.")
    flags.mark_flag_as_required("checkpoint")


def _write_random_model(config, directory: pathlib.Path) -> None:
    from flax import nnx

    from cgpt_jax.interop import hf
    from cgpt_jax.model import GPT

    if directory.exists():
        raise InputError(f"--checkpoint={directory} exists — with --config the load test writes a new random "
                         f"model there; give a new directory or drop --config")
    model_cfg = config.model
    model_cfg.vocab_size = model_cfg.vocab_size if model_cfg.vocab_size > 0 else 50257
    hf.save_pretrained(nnx.jit(lambda: GPT(model_cfg, rngs=nnx.Rngs(0)))(), directory)


def _requests(vocab_size: int, n: int, seed: int, prompt_range: tuple[int, int], new_range: tuple[int, int]
              ) -> list[dict]:
    rng = np.random.RandomState(seed)
    return [{"prompt": rng.randint(0, vocab_size, rng.randint(prompt_range[0], prompt_range[1] + 1)).tolist(),
             "max_tokens": int(rng.randint(new_range[0], new_range[1] + 1)), "temperature": 0}
            for _ in range(n)]


def _offline(generator, eos_ids: tuple[int, ...], bodies: list[dict]) -> tuple[list[list[int]], dict]:
    """Each request alone on the offline generator: (answers, baseline figures)."""
    run = lambda body: generator.generate([body["prompt"]], max_new_tokens=body["max_tokens"],
                                          stop_tokens=eos_ids)[0]
    # (prompt bucket, cache bucket) → the lengths of its request with the most new tokens (one of 2 or more
    # needs the decode step too)
    shapes: dict[tuple[int, int], tuple[int, int]] = {}
    for body in bodies:
        n, max_tokens = len(body["prompt"]), body["max_tokens"]
        shape = (generator.bucket(n), generator.cache_len(n, max_tokens))
        if max_tokens > shapes.get(shape, (0, 0))[1]:
            shapes[shape] = (n, max_tokens)
    for n, max_tokens in shapes.values():  # the baseline times serving, not compiling
        generator.warm_up([1], max_tokens, [n])
    start = time.perf_counter()
    answers = [run(body) for body in bodies]
    seconds = time.perf_counter() - start
    tokens = sum(map(len, answers))
    return answers, {"requests": len(bodies), "seconds": seconds, "output_tokens": tokens,
                     "output_tokens_per_s": tokens / seconds, "compiled_shapes": len(shapes)}


def _rss_mib(pid: int) -> float:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


async def _one(client, body: dict) -> dict:
    """One streamed completion: its token ids, finish reason, time to first token and latency."""
    start = time.perf_counter()
    first, ids, finish = None, [], None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        if response.status_code != 200:
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            if choice["token_ids"] and first is None:
                first = time.perf_counter() - start
            ids += choice["token_ids"]
            finish = choice["finish_reason"] or finish
    return {"status": 200, "ids": ids, "finish": finish, "ttft": first, "latency": time.perf_counter() - start}


async def _load(url: str, bodies: list[dict], concurrency: int, deadline: float) -> tuple[list[dict], float]:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)
    results: list[dict] = [{"status": None}] * len(bodies)
    timeout = httpx.Timeout(max(deadline - time.monotonic(), 1.0))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def worker() -> None:
            while not queue.empty() and time.monotonic() < deadline:
                i = queue.get_nowait()
                try:
                    results[i] = await _one(client, bodies[i])
                except httpx.HTTPError as e:
                    results[i] = {"status": f"{type(e).__name__}: {e}"}

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def _percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99))}


def _serve(checkpoint: str) -> tuple[subprocess.Popen, str]:
    given = flags.FLAGS
    command = [sys.executable, "-m", "cgpt_jax.serve", f"--checkpoint={checkpoint}", "--host=127.0.0.1", "--port=0",
               f"--max_batch={given.max_batch}", f"--cache_len={given.cache_len}",
               f"--max_queue={given.requests}"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = server.stdout.readline()
    found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    if not found:
        server.kill()
        raise RuntimeError(f"the server did not start (exit {server.wait()}): {line!r}")
    return server, found.group(1)


def run(checkpoint: str) -> dict:
    given = flags.FLAGS
    deadline = time.monotonic() + given.time_limit
    prompt_range = tuple(int(v) for v in given.prompt_tokens)
    new_range = tuple(int(v) for v in given.new_tokens)
    if prompt_range[1] + new_range[1] > given.cache_len:
        raise InputError(f"--prompt_tokens up to {prompt_range[1]} plus --new_tokens up to {new_range[1]} do not "
                         f"fit --cache_len={given.cache_len} — raise --cache_len or lower them")
    from cgpt_jax import generate
    from cgpt_jax.infer import Generator

    loaded, mesh = generate.load(cli.resolve_path(checkpoint.removeprefix("hf:")))
    generator = Generator(loaded.model, mesh=mesh, rules=loaded.rules)
    bodies = _requests(generator.vocab_size, given.requests, given.seed, prompt_range, new_range)
    expected, baseline = _offline(generator, loaded.eos_ids, bodies)
    cfg = loaded.model.cfg
    del loaded, generator  # the server is a process of its own
    results = {"cpu": _cpu(), "model": {k: cfg[k] for k in ("d_model", "n_layers", "n_heads", "vocab_size")},
               "max_batch": given.max_batch, "cache_len": given.cache_len, "one_at_a_time": baseline,
               "runs": []}
    server, url = _serve(checkpoint)
    memory: list[float] = []
    sampling = threading.Event()

    def sample_memory() -> None:
        while not sampling.wait(0.5):
            memory.append(_rss_mib(server.pid))

    sampler = threading.Thread(target=sample_memory, daemon=True)
    try:
        memory.append(_rss_mib(server.pid))
        sampler.start()
        for concurrency in (int(c) for c in given.concurrency):
            before = len(memory)
            outcomes, seconds = asyncio.run(_load(url, bodies, concurrency, deadline))
            done = [o for o in outcomes if o["status"] == 200 and o["finish"] is not None]
            wrong = sum(o["ids"] != e for o, e in zip(outcomes, expected) if o in done)
            tokens = sum(len(o["ids"]) for o in done)
            results["runs"].append({
                "concurrency": concurrency, "requests": len(bodies), "completed": len(done),
                "lost": len(bodies) - len(done), "wrong": wrong, "seconds": seconds, "output_tokens": tokens,
                "output_tokens_per_s": tokens / seconds,
                "speedup_vs_one_at_a_time": tokens / seconds / baseline["output_tokens_per_s"],
                "ttft_s": _percentiles([o["ttft"] for o in done]),
                "latency_s": _percentiles([o["latency"] for o in done]),
                "server_rss_mib": {"start": memory[before - 1], "end": memory[-1], "max": max(memory[before - 1:])},
                "errors": sorted({str(o["status"]) for o in outcomes if o["status"] != 200})[:5]})
    finally:
        sampling.set()
        server.send_signal(signal.SIGTERM)
        results["server_exit_status"] = server.wait(timeout=60)
    return results


def _cpu() -> str:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return f"{os.cpu_count()} cores"


def main(argv: list[str]) -> None:
    given = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    checkpoint = given.checkpoint
    if given.config is not None:
        from cgpt_jax.config import resolve
        directory = pathlib.Path(cli.resolve_path(checkpoint.removeprefix("hf:")))
        _write_random_model(resolve(given.config), directory)
    results = run(checkpoint)
    text = json.dumps(results, indent=1)
    print(text)
    if given.output:
        pathlib.Path(cli.resolve_path(given.output)).write_text(text + "\n", encoding="utf-8")
    if any(r["lost"] or r["wrong"] for r in results["runs"]) or results["server_exit_status"] != 0:
        sys.exit(1)


if __name__ == "__main__":
    define_flags()
    cli.run(main)
