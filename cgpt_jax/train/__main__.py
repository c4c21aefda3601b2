"""python -m cgpt_jax.train --config=experiments/cerebras_gpt.py:size=tiny --workdir=DIR [--overwrite]
                            [--init_from=OTHER_RUN_DIR] [--watchdog_s=SECONDS]
                            [--coordinator_address=HOST:PORT --num_processes=N --process_id=I]

Re-running the same command resumes from the workdir's newest complete checkpoint. On SIGTERM/SIGINT the
run saves after the current step and exits 0 with a one-line message.
"""
from __future__ import annotations

from cgpt_jax.host_memory import retain_freed_memory

retain_freed_memory()  # before JAX starts its CPU client (cgpt_jax/host_memory.py)

from absl import app, flags

from cgpt_jax import cli
from cgpt_jax.parallel import distributed
from cgpt_jax.train import command
from cgpt_jax.train.command import define_run_flags, print_result
from cgpt_jax.train.loop import train_and_evaluate

_RUN = define_run_flags("experiments/cerebras_gpt.py:size=tiny", "config.json, metrics.jsonl, TensorBoard, checkpoints/")
flags.adopt_module_key_flags(command)  # --helpshort lists the shared flags too
_INIT_FROM = flags.DEFINE_string("init_from", None, "Another run's directory: start from the parameters of its "
                                 "newest complete checkpoint, with a fresh optimizer at step 0. The workdir's "
                                 "own checkpoint, when there is one, takes precedence.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process "
                                   "runs outside TPU pods and SLURM (which are detected automatically).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
_STARTUP_TIMEOUT = flags.DEFINE_integer("startup_timeout_s", 120, "How long a process waits for its peers.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           timeout_s=_STARTUP_TIMEOUT.value)
    print_result(train_and_evaluate(_RUN.config.value, cli.resolve_path(_RUN.workdir.value),
                                    overwrite=_RUN.overwrite.value,
                                    init_from=cli.resolve_optional_path(_INIT_FROM.value),
                                    watchdog_s=_RUN.watchdog_s.value))


if __name__ == "__main__":
    cli.run(main)
