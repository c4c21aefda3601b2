"""Multi-host start-up with JAX's own runtime, a pre-flight check across hosts, and a watchdog.

`initialize` calls `jax.distributed.initialize` when there is more than one process: with explicit
coordinator / process count / process id, or auto-detected on Cloud TPU pods and SLURM (JAX's own
cluster detection). `preflight` then checks that every process runs the same package versions and
config and sees the expected devices, and that a cross-host collective completes; `check_shared_workdir`
that every process sees the same run directory. `Watchdog` makes a
stalled step, save or collective end the process with a non-zero code instead of hanging.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import socket
import sys
import threading
import time
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from cgpt_jax import storage
from cgpt_jax.errors import InputError

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "cgpt_jax")
_INFO_BYTES = 4096


def _on_cluster() -> bool:
    """True on a multi-process TPU pod or SLURM job step, where JAX can detect its peers itself."""
    slurm_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1")))
    tpu_workers = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return slurm_tasks > 1 or "," in tpu_workers


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, timeout_s: int = 60) -> None:
    """Start the distributed runtime, or do nothing for a single process.

    The timeout bounds how long a process waits for its peers, so a wrong process count or an
    unreachable coordinator fails within `timeout_s` instead of hanging.
    """
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None for v in explicit) and not all(v is not None for v in explicit):
        raise InputError("give all of --coordinator_address, --num_processes and --process_id, or none "
                         "(then TPU pods and SLURM are detected automatically)")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise InputError(f"--process_id={process_id} must be in [0, {num_processes})")
    if num_processes is None and not _on_cluster():
        return
    if num_processes == 1:
        return
    if process_id:  # not the coordinator: fail clearly if process 0 cannot be reached (jax would abort)
        _wait_for_coordinator(coordinator_address, timeout_s)
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=timeout_s)


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Wait until the coordinator's port accepts connections; a clear error after `timeout_s`.

    Without this, a process whose coordinator never comes up is aborted by the distributed runtime's
    C++ client (SIGABRT, 'another task died'), which names neither the address nor the likely cause.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--coordinator_address={address!r}: expected HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"cannot reach the coordinator at {address} after {timeout_s:g} s ({e}): process 0 is not "
                    f"running there yet, has exited, or the port is blocked. Start process 0 first (or together "
                    f"with the others), check --coordinator_address, or raise --startup_timeout_s.") from None
            time.sleep(0.25)


def _versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def config_hash(config_dict: dict) -> str:
    return hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier called `name`; nothing to wait for with one process."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def preflight(config_dict: dict, expected_devices: int) -> None:
    """Stop every process with the same message if the hosts disagree or a collective fails."""

    mine = {"host": socket.gethostname(), "pid": os.getpid(), "process": jax.process_index(),
            "versions": _versions(), "python": sys.version.split()[0], "config": config_hash(config_dict),
            "local_devices": jax.local_device_count(), "global_devices": jax.device_count()}
    encoded = json.dumps(mine).encode()
    if len(encoded) > _INFO_BYTES:
        raise ValueError("pre-flight record too long")
    buffer = np.zeros(_INFO_BYTES, np.uint8)
    buffer[:len(encoded)] = np.frombuffer(encoded, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buffer)).reshape(-1, _INFO_BYTES)
    records = [json.loads(bytes(row).rstrip(b"\0")) for row in gathered]

    problems = []
    reference = records[0]
    for record in records[1:]:
        where = f"process {record['process']} on {record['host']}"
        for key in ("versions", "python", "config", "global_devices"):
            if record[key] != reference[key]:
                problems.append(f"{where}: {key} {record[key]} != process 0's {reference[key]}")
    if reference["global_devices"] != expected_devices:
        problems.append(f"{reference['global_devices']} devices are visible but the mesh needs {expected_devices}")
    if problems:
        raise RuntimeError("pre-flight check failed on all processes:\n  " + "\n  ".join(problems))
    # A small collective across every device: each host contributes its local device count.
    total = multihost_utils.process_allgather(np.array([jax.local_device_count()])).sum()
    if int(total) != jax.device_count():
        raise RuntimeError(f"cross-host collective returned {int(total)} devices, expected {jax.device_count()}")


def check_shared_workdir(workdir: str) -> None:
    """Refuse a run directory that some process cannot see, e.g. a local path on several hosts.

    Process 0 writes a random token into the workdir; every process reads it back. Only process 0 writes
    the run directory's shared files (config, metrics, summary) and every process reads them, so a process
    that saw another directory would resume or evaluate something else."""
    token = uuid.uuid4().hex.encode() if jax.process_index() == 0 else b"\0" * 32
    token = bytes(np.asarray(multihost_utils.broadcast_one_to_all(np.frombuffer(token, np.uint8)))).decode()
    probe = storage.path(workdir, f".cgpt_jax-shared-{token}")
    if jax.process_index() == 0:
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    barrier("cgpt_jax:shared_workdir_written")
    try:
        seen = probe.read_text() == token
    except OSError:
        seen = False
    everyone = np.asarray(multihost_utils.process_allgather(np.array([seen]))).reshape(-1)
    if jax.process_index() == 0:
        probe.unlink()
    blind = [i for i, ok in enumerate(everyone) if not ok]
    if blind:
        raise InputError(f"--workdir={workdir}: process(es) {blind} do not see the file process 0 wrote there, so "
                         f"the processes do not share this run directory — use a bucket (gs://BUCKET/run, "
                         f"s3://BUCKET/run) or a filesystem mounted on every host")


class Watchdog:
    """Ends the process with exit code 3 if `beat()` is not called within `timeout_s` seconds.

    Every step, save and evaluation beats; a peer that died leaves the survivors blocked inside a
    collective, where nothing else would ever wake them.
    """

    def __init__(self, timeout_s: float, what: str = "training"):
        self.timeout_s = timeout_s
        self.what = what
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="cgpt-watchdog")
        if timeout_s > 0:
            self._thread.start()

    def beat(self, what: str | None = None) -> None:
        self._last = time.monotonic()
        if what:
            self.what = what

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            stalled = time.monotonic() - self._last
            if stalled > self.timeout_s:
                print(f"watchdog: no progress in {self.what} for {stalled:.0f} s (limit "
                      f"{self.timeout_s:.0f} s, process {jax.process_index()}); exiting so the scheduler can "
                      f"restart the job", file=sys.stderr, flush=True)
                os._exit(3)
