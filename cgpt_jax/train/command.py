"""What the two training commands share (python -m cgpt_jax.train, python -m cgpt_jax.finetune): the flags
that name a run and how its result is printed."""
from __future__ import annotations

import dataclasses
import json

from absl import flags

from cgpt_jax import experiment_files, run_dir


@dataclasses.dataclass(frozen=True)
class RunFlags:
    config: flags.FlagHolder
    workdir: flags.FlagHolder
    overwrite: flags.FlagHolder
    watchdog_s: flags.FlagHolder


def define_run_flags(config_example: str, workdir_contents: str) -> RunFlags:
    """--config (required), --workdir (required), --overwrite and --watchdog_s; --quantize is refused."""
    holders = RunFlags(
        config=experiment_files.define_config_file("config", f"Experiment config file, e.g. {config_example}"),
        workdir=flags.DEFINE_string("workdir", None, f"Run directory ({workdir_contents})."),
        overwrite=flags.DEFINE_bool("overwrite", False, "If the workdir holds another run's config, move that "
                                    "run aside to <workdir>.replaced-<time> and start fresh."),
        watchdog_s=flags.DEFINE_float("watchdog_s", 0.0, "Exit with status 3 when no step, save or evaluation "
                                      "finishes for this many seconds (after the first step compiled); 0 = off."))
    flags.mark_flags_as_required(["config", "workdir"])
    # Quantization is post-training and inference-only (cgpt_jax/quantize): refused here, with the way to it.
    flags.DEFINE_string("quantize", None, "Not for training: quantize a finished run with python -m cgpt_jax.quantize.")
    flags.register_validator("quantize", lambda value: value is None, message=(
        "quantization is for inference only (weight-only, after training) — train without --quantize, then "
        "python -m cgpt_jax.quantize --checkpoint=WORKDIR --scheme=int8 --output=DIR"))
    return holders


def print_result(summary: dict) -> None:
    """A preempted run's one-line message (the exit status stays 0: re-running the command resumes), else
    the summary as JSON."""
    if summary["status"] == run_dir.PREEMPTED:
        print(summary["message"], flush=True)
        return
    print(json.dumps(summary, indent=2))
