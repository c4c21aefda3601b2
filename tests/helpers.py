"""Shared test fixtures: a tiny model config and a one-call trainer for N steps on a given mesh."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np

from cgpt_jax.config import base_config, resolve
from cgpt_jax.data import make_dataset
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.train.setup import build_run


# XLA's default backend optimisation level, which conftest.py lowers for the suite: for the few checks whose
# subject is the numerics of XLA's own code at a user's settings.
XLA_DEFAULT_BACKEND = {"xla_backend_optimization_level": 3}


def one_device_env(**extra: str) -> dict[str, str]:
    """The environment for a `python -m cgpt_jax...` subprocess that runs as a user's would, on one CPU
    device: the 8 fake devices of conftest.py would only make it compile and run sharded, slower."""
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "").strip()
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", **extra}


def tiny_config(**mesh) -> ml_collections.ConfigDict:
    c = base_config()
    m, t = c.model, c.train
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.d_ff, m.max_seq_len = 64, 32, 2, 4, 64, 16
    t.seq_len, t.global_batch_size, t.steps, t.warmup_steps, t.peak_lr = 16, 16, 20, 2, 1e-3
    c.data.synthetic_vocab_size = 64
    for axis, size in mesh.items():
        c.mesh[axis] = size
    return resolve(c)


def train_steps(config: ml_collections.ConfigDict, n_steps: int, devices=None, compiler_options=None):
    """Run `n_steps` of the training run's own step (`build_run`); returns (losses, final state as host
    numpy arrays)."""
    losses, _, final = train_steps_from_init(config, n_steps, devices, compiler_options)
    return losses, final


def train_steps_from_init(config: ml_collections.ConfigDict, n_steps: int, devices=None, compiler_options=None):
    """`train_steps` that also returns the initial state: (losses, initial, final), states as host numpy
    arrays, from one run (one compile of each program)."""
    devices = devices if devices is not None else jax.devices()[:1]
    run = build_run(config, make_mesh(config.mesh, devices), compiler_options=compiler_options)
    state = run.init_state()
    initial = jax.tree.map(np.asarray, state)
    dataset = make_dataset(config.data, seq_len=config.train.seq_len,
                           global_batch_size=config.train.global_batch_size, seed=0, sharding=run.batch_sharding)
    losses = []
    for s in range(n_steps):
        state, metrics = run.train_step(state, dataset.train_batch(s))
        losses.append(float(metrics["loss"]))
    return np.array(losses), initial, jax.tree.map(np.asarray, state)


def byte_bpe_tokenizer(vocab_size: int, text: str, repeats: int):
    """A small byte-level BPE (HF tokenizers) trained on `text` × `repeats`, with <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.train_from_iterator([text] * repeats, trainer=trainer)
    return tokenizer


@contextlib.contextmanager
def s3_emulator(*buckets: str):
    """A local S3 server (moto) on 127.0.0.1 with `buckets`, stopped on exit; yields the environment that
    points the AWS SDKs (boto3, s3fs, and TensorStore through cgpt_jax) at it with dummy credentials, and
    applies it to this process while it runs."""
    import boto3
    import pytest

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "the S3 emulator did not start"
                time.sleep(0.1)
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="test",
                              aws_secret_access_key="test", region_name="us-east-1")
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        with pytest.MonkeyPatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            forget_s3_clients()
            yield env
    finally:
        forget_s3_clients()
        server.terminate()
        server.wait(timeout=30)


def forget_s3_clients() -> None:
    """Drop s3fs's cached clients, which keep the endpoint and credentials they were created with."""
    import s3fs
    from etils import epath

    s3fs.S3FileSystem.clear_instance_cache()
    epath.backend.fsspec_backend._get_filesystem.cache_clear()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
