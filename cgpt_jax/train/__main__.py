"""python -m cgpt_jax.train --config=experiments/cerebras_gpt.py:size=tiny --workdir=DIR [--overwrite]
                            [--init_from=OTHER_RUN_DIR]

Re-running the same command resumes from the workdir's newest complete checkpoint. On SIGTERM/SIGINT the
run saves after the current step and exits 0 with a one-line message.
"""
from __future__ import annotations

import json

from absl import app, flags, logging
from ml_collections import config_flags

from cgpt_jax.train.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. "
                                          "experiments/cerebras_gpt.py:size=tiny", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, metrics.jsonl, TensorBoard, "
                               "checkpoints/).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "If the workdir holds another run's config, move that "
                               "run aside to <workdir>.replaced-<time> and start fresh.")
_INIT_FROM = flags.DEFINE_string("init_from", None, "Another run's directory: start from the parameters of its "
                                 "newest complete checkpoint, with a fresh optimizer at step 0. The workdir's "
                                 "own checkpoint, when there is one, takes precedence.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    summary = train_and_evaluate(_CONFIG.value, _WORKDIR.value, overwrite=_OVERWRITE.value,
                                 init_from=_INIT_FROM.value)
    if summary["status"] == "preempted":
        print(summary["message"], flush=True)  # exit status 0: re-running the command resumes
        return
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    app.run(main)
