"""Multi-host on one machine: N local processes × M fake CPU devices through jax.distributed."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cgpt_jax import storage
from tests.helpers import free_port, s3_emulator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=experiments/cerebras_gpt.py:size=tiny", "--config.model.d_model=32",
        "--config.model.n_layers=1", "--config.model.d_ff=64", "--config.train.seq_len=32",
        "--config.model.max_seq_len=32", "--config.train.global_batch_size=16", "--config.train.warmup_steps=2",
        "--config.data.synthetic_vocab_size=64", "--config.train.log_every=1"]


def _start(args: list[str], devices: int, process_id: int | None = None, n_processes: int | None = None,
           port: int | None = None, env: dict | None = None) -> subprocess.Popen:
    flags = (f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0 "
             "--xla_cpu_use_fusion_emitters=false")  # as conftest.py sets them
    env = {**os.environ, **(env or {}), "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    cluster = ([f"--coordinator_address=localhost:{port}", f"--num_processes={n_processes}",
                f"--process_id={process_id}"] if n_processes else [])
    return subprocess.Popen([sys.executable, "-m", "cgpt_jax.train", *TINY, *args, *cluster], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run_processes(args: list[str], n_processes: int, devices_each: int, timeout: float = 240,
                   env: dict | None = None) -> list[str]:
    port = free_port()
    procs = [_start(args, devices_each, i, n_processes, port, env) for i in range(n_processes)]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]
        errors.append(err)
    return errors


def _losses(workdir) -> dict[int, float]:
    lines = [json.loads(line) for line in storage.path(workdir, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_two_processes_match_one_and_checkpoints_cross_layouts(tmp_path):
    """The 2-process run writes to a bucket (a local S3 server): the multi-host set-up of TPU pods."""
    common = ["--config.train.steps=6", "--config.checkpoint.every_steps=3", "--config.train.eval_every=6"]
    with s3_emulator("bkt"):
        _run_processes([*common, f"--workdir={tmp_path}/single"], n_processes=1, devices_each=8)
        _run_processes([*common, "--workdir=s3://bkt/multi"], n_processes=2, devices_each=4)
        single, multi = _losses(tmp_path / "single"), _losses("s3://bkt/multi")
        assert sorted(multi) == list(range(6))
        for step in single:  # different collective implementations (gloo vs in-process): f32 rounding only
            assert multi[step] == pytest.approx(single[step], rel=1e-6)
        assert not list(storage.path("s3://bkt/multi").glob(".cgpt_jax-shared-*"))  # the pre-flight token

        # Roll the 2-process run back to its step-3 checkpoint and finish it as 1 process x 8 devices.
        resumed = "s3://bkt/resumed"
        storage.move("s3://bkt/multi", resumed)
        storage.move(f"{resumed}/checkpoints/6", "s3://bkt/aside/6")
        storage.move(f"{resumed}/summary.json", "s3://bkt/aside/summary.json")
        _run_processes([*common, f"--workdir={resumed}"], n_processes=1, devices_each=8)
        after = _losses(resumed)
    assert sorted(after) == list(range(6))
    for step in range(3, 6):
        assert after[step] == pytest.approx(single[step], rel=1e-6)


def test_a_workdir_that_the_processes_do_not_share_is_refused(tmp_path):
    """Each process given its own local directory, as on hosts with their own disks: refused before training."""
    port = free_port()
    procs = [_start([f"--workdir={tmp_path}/host{i}"], 4, i, 2, port) for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 2, err[-3000:]
        assert "process(es) [1] do not see the file process 0 wrote there" in err
        assert "use a bucket (gs://BUCKET/run, s3://BUCKET/run) or a filesystem mounted on every host" in err
    assert os.listdir(tmp_path / "host0") == []  # the token was removed; nothing else was written
    assert not (tmp_path / "host1").exists()


def test_killing_one_process_makes_the_other_exit_nonzero(tmp_path):
    port = free_port()
    args = ["--config.train.steps=100000", "--config.checkpoint.every_steps=0", "--watchdog_s=10",
            f"--workdir={tmp_path}/run"]
    procs = [_start(args, 4, i, 2, port) for i in range(2)]
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) > 3):
        assert time.time() < deadline and procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        _, err = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
    assert procs[0].returncode != 0
    assert time.time() - killed_at < 35  # the watchdog limit (10 s) plus its polling and process exit


def test_missing_peer_fails_within_the_startup_timeout(tmp_path):
    start = time.time()
    proc = _start([f"--workdir={tmp_path}/run", "--startup_timeout_s=5"], 4, 0, 2, free_port())
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert time.time() - start < 60
    assert not (tmp_path / "run").exists()


def test_partial_cluster_flags_are_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "cgpt_jax.train", *TINY, f"--workdir={tmp_path}/run",
                           "--num_processes=2"], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0 and "give all of --coordinator_address" in proc.stderr


def test_unreachable_coordinator_is_a_clear_error_within_the_startup_timeout(tmp_path):
    """Process 1 of 2 with nobody listening at the coordinator address: a message naming the address,
    not the runtime's abort, and nothing written."""
    port = free_port()
    start = time.time()
    proc = _start([f"--workdir={tmp_path}/run", "--startup_timeout_s=3"], 4, 1, 2, port)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    assert f"cannot reach the coordinator at localhost:{port} after 3 s" in err
    assert time.time() - start < 30
    assert not (tmp_path / "run").exists()
