"""python -m cgpt_jax.finetune --config=experiments/classify.py:task=stdlib_topics,init=RUN_DIR --workdir=DIR
                               [--overwrite] [--watchdog_s=SECONDS]

Re-running the same command resumes from the workdir's newest complete checkpoint; SIGTERM/SIGINT saves
after the current step and exits 0. Prints the summary (test metrics under "test").
"""
from __future__ import annotations

from cgpt_jax.host_memory import retain_freed_memory

retain_freed_memory()  # before JAX starts its CPU client (cgpt_jax/host_memory.py)

import json

from absl import app, flags

from cgpt_jax import cli, experiment_files
from cgpt_jax.finetune.train import finetune

_CONFIG = experiment_files.define_config_file("config", "Experiment config file, e.g. "
                                             "experiments/classify.py:task=stdlib_topics,init=runs/cpu_ladder/d80l2")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, metrics.jsonl, TensorBoard, "
                               "checkpoints/, best/, confusion_*.json/png, summary.json).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "If the workdir holds another run's config, move that "
                               "run aside to <workdir>.replaced-<time> and start fresh.")
_WATCHDOG = flags.DEFINE_float("watchdog_s", 0.0, "Exit with status 3 when no step, save or evaluation "
                               "finishes for this many seconds (after the first step compiled); 0 = off.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    config.finetune.init = cli.resolve_optional_path(config.finetune.init) if not config.finetune.init.startswith(
        "hf:") else "hf:" + cli.resolve_path(config.finetune.init[3:])
    summary = finetune(config, cli.resolve_path(_WORKDIR.value), overwrite=_OVERWRITE.value,
                       watchdog_s=_WATCHDOG.value)
    if summary["status"] == "preempted":
        print(summary["message"], flush=True)  # exit status 0: re-running the command resumes
        return
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    cli.run(main)
