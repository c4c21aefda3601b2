"""Serve a checkpoint over an OpenAI-compatible HTTP API (see cgpt_jax/serve/__init__.py).

    python -m cgpt_jax.serve --checkpoint=RUN_DIR|hf:DIR [--host=127.0.0.1] [--port=8000] [--max_batch=16]
        [--cache_len=N] [--api_key=KEY (or env CGPT_JAX_API_KEY)] [--insecure] [--max_queue=256]
        [--drain_timeout=30] [--tensor_parallel=N] [--quantize=int8|int4|int4:group=G] [--model_name=NAME]

A language model (a training run or an HF GPT2LMHeadModel directory) serves /v1/completions; a
classifier (a fine-tuning run or an HF GPT2ForSequenceClassification directory) serves /v1/classify.
Every program is compiled before the port opens. The server binds the loopback address unless --host
says otherwise, and refuses another address without an API key unless --insecure is given. SIGTERM (or
Ctrl-C) stops accepting connections, lets requests in flight finish for up to --drain_timeout seconds,
then exits 0.
"""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import socket
import sys

from absl import app, flags, logging

from cgpt_jax import cli, storage
from cgpt_jax.errors import InputError

API_KEY_ENV = "CGPT_JAX_API_KEY"
HF_PREFIX = "hf:"


def define_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "Training/fine-tuning run directory, or hf:DIR (a Hugging Face "
                        "directory).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind; another than loopback needs --api_key or "
                        "--insecure.")
    flags.DEFINE_integer("port", 8000, "Port to bind (0: any free port, printed at start).")
    flags.DEFINE_integer("max_batch", 16, "Decode slots: requests decoded together.")
    flags.DEFINE_integer("cache_len", None, "Positions per slot, prompt + max_tokens (rounded up to a power of "
                         "two; default: the model's context). The KV cache holds max_batch of them.")
    flags.DEFINE_string("api_key", None, f"Require 'Authorization: Bearer KEY' (default: env {API_KEY_ENV}).")
    flags.DEFINE_bool("insecure", False, "Allow a non-loopback --host without an API key.")
    flags.DEFINE_integer("max_queue", 256, "Requests waiting for a slot beyond which new ones get 429.")
    flags.DEFINE_integer("max_body_bytes", 1 << 20, "Largest request body (413 beyond).")
    flags.DEFINE_float("drain_timeout", 30.0, "Seconds in-flight requests get to finish after SIGTERM.")
    flags.DEFINE_integer("tensor_parallel", 1, "Devices to split heads, MLP and vocabulary over.")
    flags.DEFINE_string("quantize", None, "Weight-only quantization after loading: int8, int4 or int4:group=G "
                        "(cgpt_jax/quantize); a quantized checkpoint directory is served as it is.")
    flags.DEFINE_string("model_name", None, "The model id of the API (default: the checkpoint's directory name).")
    flags.mark_flags_as_required(["checkpoint"])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_security(host: str, api_key: str | None, insecure: bool) -> None:
    if not _is_loopback(host) and not api_key and not insecure:
        raise InputError(f"--host={host} is reachable from other machines and no API key is set — give "
                         f"--api_key (or {API_KEY_ENV}), or --insecure to serve without one")


def _is_classifier(directory: storage.Path) -> bool:
    from cgpt_jax import quantize

    if quantize.is_checkpoint(directory):
        return False
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise InputError(f"--checkpoint={directory}: no config.json there — give a training or fine-tuning run "
                         f"directory, or hf:DIR for a Hugging Face directory")
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    if "model_type" in raw:
        return any(a.endswith("ForSequenceClassification") for a in raw.get("architectures") or [])
    return raw.get("finetune", {}).get("num_labels", -1) != -1


def build(checkpoint: str, *, max_batch: int, cache_len: int | None, tensor_parallel: int,
          scheme: str | None = None):
    """What `create_app` serves: a `LanguageModel` on a warmed-up engine, or a `Classifier`."""
    from cgpt_jax import generate, quantize
    from cgpt_jax.finetune.predict import load_classifier
    from cgpt_jax.infer import Generator
    from cgpt_jax.serve.app import LanguageModel
    from cgpt_jax.serve.engine import Engine
    from cgpt_jax.train.checkpoint import CheckpointError

    directory = storage.path(cli.resolve_path(checkpoint.removeprefix(HF_PREFIX)))  # local, gs:// or s3://
    if _is_classifier(directory):
        return load_classifier(str(directory), None if scheme is None else quantize.parse(scheme))
    try:
        loaded, mesh = generate.load(str(directory), tensor_parallel, scheme)
        generator = Generator(loaded.model, mesh=mesh, rules=loaded.rules)
        engine = Engine(generator, slots=max_batch, cache_len=cache_len or generator.max_len)
    except (ValueError, CheckpointError) as e:  # the message says what to change
        raise InputError(str(e)) from e
    engine.warm_up()
    return LanguageModel(engine, loaded.tokenizer, loaded.eos_ids, generator.vocab_size)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import uvicorn

    from cgpt_jax.serve.app import Settings, create_app

    given = flags.FLAGS
    api_key = given.api_key or os.environ.get(API_KEY_ENV) or None
    check_security(given.host, api_key, given.insecure)
    for name in ("max_batch", "max_queue", "max_body_bytes"):
        if given[name].value < 1:
            raise InputError(f"--{name}={given[name].value} must be at least 1")
    if not 0 <= given.port < 65536:
        raise InputError(f"--port={given.port} must be in [0, 65536)")
    # Bind before loading the model, so a taken port is refused input, not a crash after minutes of compiling.
    try:
        sock = socket.create_server((given.host, given.port))
    except OSError as e:
        raise InputError(f"cannot listen on {given.host}:{given.port} ({e.strerror}) — pick another --port or "
                         f"--host") from None
    served = build(given.checkpoint, max_batch=given.max_batch, cache_len=given.cache_len,
                   tensor_parallel=given.tensor_parallel, scheme=given.quantize)
    name = given.model_name or given.checkpoint.removeprefix(HF_PREFIX).rstrip("/").rsplit("/", 1)[-1]
    application = create_app(served, Settings(name, api_key, given.max_body_bytes, given.max_queue))
    server = uvicorn.Server(uvicorn.Config(application, log_level="warning",
                                           timeout_graceful_shutdown=given.drain_timeout))
    # uvicorn re-raises the signal it shut down on; a drained shutdown is a success.
    for handled in (signal.SIGTERM, signal.SIGINT):
        signal.signal(handled, lambda *_: sys.exit(0))
    host, port = sock.getsockname()[:2]
    print(f"serving {name} on http://{host}:{port}", flush=True)
    logging.info("serving %s on http://%s:%d", name, host, port)
    server.run(sockets=[sock])


if __name__ == "__main__":
    define_flags()
    cli.run(main)
