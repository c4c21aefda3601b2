"""The run directory's contract: what a training run writes, under which names, and what its summary holds.

    DIR/config.json        the resolved config (plus `data_description`), written before the first step
    DIR/param_table.json   init, learning rate and forward multipliers of every parameter
    DIR/metrics.jsonl      one JSON object per logged step: step, loss, lr, grad_norm, tokens_per_sec, mfu;
                           eval_loss on evaluation steps
    DIR/tensorboard/       the same metrics as TensorBoard events
    DIR/checkpoints/<N>/   Orbax checkpoints after N steps (cgpt_jax/train/checkpoint.py)
    DIR/summary.json       written last, by a finished run only (SUMMARY_KEYS)
    DIR/best/checkpoints/  fine-tuning: the evaluated state with the best validation metric (summary 'best')
    DIR/confusion_<split>.json, .png   fine-tuning: per-class metrics and confusion matrix of a split
    DIR/downstream.json    zero-shot results of the final checkpoint (python -m cgpt_jax.evaluate sweep)

Every reader (the sweep runner, the scaling analysis, generation, the chaos test) takes the names from here.
DIR may be a local directory, gs://BUCKET/... or s3://BUCKET/... (cgpt_jax/storage.py says how each file
stays whole when a process is killed mid-write).
"""
from __future__ import annotations

import datetime
import json

from absl import logging

from cgpt_jax import storage
from cgpt_jax.config import run_differences
from cgpt_jax.errors import InputError
from cgpt_jax.flops import CONVENTIONS as FLOP_CONVENTIONS  # one `flops_<convention>` summary key each

CONFIG = "config.json"
PARAM_TABLE = "param_table.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
BEST = "best"  # fine-tuning: DIR/best/checkpoints/<N>, the state with the best validation metric
SUMMARY = "summary.json"
CONFUSION = "confusion_{split}"  # + .json / .png
DOWNSTREAM = "downstream.json"  # {"tasks", "limit", "results": lm-eval's results by task}

FINISHED = "finished"  # summary.json's status; a preempted run returns status 'preempted' and writes none
PREEMPTED = "preempted"
# What a finished run's summary.json holds (the analysis needs all but the last two).
SUMMARY_KEYS = ("status", "step", "final_eval_loss", "final_train_loss", "skipped_steps", "n_params",
                "n_params_non_embedding", "tokens", *(f"flops_{c}" for c in FLOP_CONVENTIONS),
                "wall_time_s", "tokens_per_sec")


def path(workdir: str, name: str) -> str:
    """DIR/name as a string: a local path, or a gs:// / s3:// URL."""
    return str(storage.path(workdir, name))


def write_json_atomically(file_path: str, data: dict) -> None:
    """A kill mid-write never leaves a truncated file for the next reader (storage.write_atomically)."""
    storage.write_atomically(file_path, json.dumps(data, indent=2))


def read_json(file_path: str) -> dict:
    return json.loads(storage.path(file_path).read_text())


def finished_summary(workdir: str) -> dict | None:
    """The summary of a finished run in `workdir`, else None."""
    file_path = path(workdir, SUMMARY)
    if not storage.path(file_path).is_file():
        return None
    summary = read_json(file_path)
    return summary if summary.get("status") == FINISHED else None


def prepare(workdir: str, config_dict: dict, overwrite: bool, *, writer: bool = True) -> None:
    """Create the workdir, or accept it when it holds this same run; never delete another run.

    With `overwrite`, a workdir holding another config is moved aside to `<workdir>.replaced-<time>`.
    A restart may change the restart-mutable fields; config.json then records the new values.
    Every process of a multi-process run calls this, so all stop with the same error; only the
    `writer` (process 0) changes files, and the others must wait for it before they read the workdir.
    """
    config_path = path(workdir, CONFIG)
    if storage.path(config_path).exists():
        diffs = run_differences(read_json(config_path), config_dict)
        if diffs:
            if not overwrite:
                raise InputError(
                    f"workdir {workdir} holds another run's config; differences:\n" + "\n".join(diffs[:20]) +
                    "\nUse another --workdir, or pass --overwrite to move the old run aside (it is kept).")
            if not writer:
                return
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            aside = f"{workdir.rstrip('/')}.replaced-{stamp}"
            storage.move(workdir, aside)
            logging.warning("moved the previous run in %s aside to %s", workdir, aside)
    if writer:
        storage.path(workdir).mkdir(parents=True, exist_ok=True)
        write_json_atomically(config_path, config_dict)


def is_same_finished_run(workdir: str, config_dict: dict) -> bool:
    """True when `workdir` holds a finished run of this config (re-running it has nothing to do)."""
    return (finished_summary(workdir) is not None and storage.path(workdir, CONFIG).is_file()
            and not run_differences(read_json(path(workdir, CONFIG)), config_dict))


def drop_metrics_from(workdir: str, first_step: int) -> list[str]:
    """Keep only metric lines before `first_step`, so a restarted run logs each step once; returns them."""
    file_path = storage.path(workdir, METRICS)
    if not file_path.exists():
        return []
    lines = [line for line in file_path.read_text().splitlines(keepends=True) if line.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a line torn by a kill mid-write: always after the last checkpoint
                continue
            raise ValueError(f"{file_path}: line {i + 1} is not JSON: {line[:200]!r}") from None
        if record["step"] < first_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    storage.write_atomically(file_path, "".join(kept))
    return kept
