"""python -m cgpt_jax.finetune --config=experiments/classify.py:task=stdlib_topics,init=RUN_DIR --workdir=DIR
                               [--overwrite] [--watchdog_s=SECONDS]

Re-running the same command resumes from the workdir's newest complete checkpoint; SIGTERM/SIGINT saves
after the current step and exits 0. Prints the summary (test metrics under "test").
"""
from __future__ import annotations

from cgpt_jax.host_memory import retain_freed_memory

retain_freed_memory()  # before JAX starts its CPU client (cgpt_jax/host_memory.py)

from absl import app, flags

from cgpt_jax import cli
from cgpt_jax.finetune.backbone import HF_PREFIX
from cgpt_jax.finetune.train import finetune
from cgpt_jax.train import command
from cgpt_jax.train.command import define_run_flags, print_result

_RUN = define_run_flags("experiments/classify.py:task=stdlib_topics,init=runs/cpu_ladder/d80l2",
                        "config.json, metrics.jsonl, TensorBoard, checkpoints/, best/, confusion_*.json/png, "
                        "summary.json")

flags.adopt_module_key_flags(command)  # --helpshort lists the shared flags too

def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _RUN.config.value
    init = config.finetune.init
    # paths as given on this command line, made absolute (config.json records them)
    config.finetune.init = (HF_PREFIX + cli.resolve_path(init[len(HF_PREFIX):]) if init.startswith(HF_PREFIX)
                            else cli.resolve_optional_path(init))
    print_result(finetune(config, cli.resolve_path(_RUN.workdir.value), overwrite=_RUN.overwrite.value,
                          watchdog_s=_RUN.watchdog_s.value))


if __name__ == "__main__":
    cli.run(main)
