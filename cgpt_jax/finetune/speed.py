"""Tokens/s of the fine-tuning step against the pretraining step of the same backbone at the same shape,
timed in one process, taking turns round by round (so a slow spell of a shared machine hits both alike).

    python -m cgpt_jax.finetune.speed --backbone=runs/cpu_ladder/d80l2 [--batch=32 --seq_len=128 --rounds=9]
    python -m cgpt_jax.finetune.speed --backbone=runs/cpu_ladder/d80l2 --compare=buckets

Both steps come from `build_run` (the language-modelling objective, and the classification objective with
8 labels); batches are random tokens (the classifier's with random lengths and labels). `--compare=buckets`
instead times the fine-tuning step on `stdlib_topics`' training batches in order, padded to their length
buckets against padded to seq_len (finetune.length_buckets), each shape compiled before timing.
"""
from __future__ import annotations

import json
import statistics
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags

from cgpt_jax import cli, run_dir
from cgpt_jax.bench.runners import (
    Stepper,
    median_ratio,
    random_tokens,
    time_alternately,
)
from cgpt_jax.config import base_config, resolve
from cgpt_jax.finetune.data import ClassificationData
from cgpt_jax.finetune.objective import ClassificationObjective
from cgpt_jax.finetune.stepper import stepper
from cgpt_jax.finetune.train import prepare
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.train.objective import LANGUAGE_MODELING
from cgpt_jax.train.setup import Run, build_run

_BACKBONE = flags.DEFINE_string("backbone", None, "A pretraining run directory (its config.json's model).")
_BATCH = flags.DEFINE_integer("batch", 32, "Global batch size of both steps.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Sequence length of both steps.")
_ROUNDS = flags.DEFINE_integer("rounds", 9, "Timed rounds; each times both steps in turn.")
_STEPS = flags.DEFINE_integer("steps_per_round", 10, "Steps per stepper per round.")
_COMPARE = flags.DEFINE_enum("compare", "pretraining", ["pretraining", "buckets"], "What the fine-tuning step "
                             "is timed against: the pretraining step, or itself on unbucketed batches.")
flags.mark_flags_as_required(["backbone"])

NUM_LABELS = 8


def epoch_stepper(name: str, run: Run, data: ClassificationData) -> Stepper:
    """Steps through `data`'s batches in training order, each of its shapes compiled first."""
    state = run.init_state()
    start = time.perf_counter()
    epoch = data.epoch_batches(0)
    for length in sorted({length for _, length in epoch}):
        state, _ = run.train_step(state, data.train_batch(next(k for k, (_, n) in enumerate(epoch) if n == length)))
    jax.block_until_ready(state)
    compile_s, step_index = time.perf_counter() - start, 0

    def step() -> float:
        nonlocal state, step_index
        state, metrics = run.train_step(state, data.train_batch(step_index))
        step_index += 1
        return float(metrics["loss"])  # waits for the step

    return Stepper(name, step, compile_s, 0.0, None, "", 0)


def bucket_steppers(backbone: str) -> list[Stepper]:
    """The fine-tuning step on stdlib_topics' training batches, with and without length buckets."""
    config = base_config()
    config.finetune.init, config.train.global_batch_size, config.train.seq_len = backbone, _BATCH.value, _SEQ_LEN.value
    config, _, task, encoded = prepare(config, jax.device_count())
    run = build_run(config, make_mesh(config.mesh, jax.devices()),
                    objective=ClassificationObjective(len(task.label_names), "softmax"))
    return [epoch_stepper(name, run, ClassificationData(encoded["train"], global_batch_size=_BATCH.value, seed=0,
                                                       shardings=run.batch_shardings,
                                                       vocab_size=config.model.vocab_size, description={},
                                                       length_buckets=length_buckets))
            for name, length_buckets in (("length buckets", True), ("max_len", False))]


def compare_buckets(backbone: str) -> dict:
    steppers = bucket_steppers(backbone)
    times = time_alternately(steppers, _ROUNDS.value, _STEPS.value)
    result = {s.name: {"seconds_per_step": statistics.mean(times[s.name]), "compile_s": s.compile_s}
              for s in steppers}
    result["speed_up"] = statistics.mean(times["max_len"]) / statistics.mean(times["length buckets"])
    return result


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _COMPARE.value == "buckets":
        print(json.dumps(compare_buckets(cli.resolve_path(_BACKBONE.value)), indent=2))
        return
    raw = run_dir.read_json(run_dir.path(cli.resolve_path(_BACKBONE.value), run_dir.CONFIG))  # local or bucket
    config = base_config()  # the defaults of both runs, with the backbone's model
    config.model = ml_collections.ConfigDict(raw["model"])
    config.train.global_batch_size, config.train.seq_len = _BATCH.value, _SEQ_LEN.value
    config = resolve(config)
    b, length = _BATCH.value, _SEQ_LEN.value
    tokens_BxL1 = random_tokens(config)
    rng = np.random.default_rng(1)
    steppers = [
        stepper("pretraining", config, LANGUAGE_MODELING,
                {"inputs": tokens_BxL1[:, :-1], "targets": tokens_BxL1[:, 1:]}),
        stepper("fine-tuning", config, ClassificationObjective(NUM_LABELS, "softmax"),
                {"inputs": tokens_BxL1[:, :-1], "lengths": rng.integers(1, length + 1, b).astype(np.int32),
                 "labels": rng.integers(0, NUM_LABELS, b).astype(np.int32)}),
    ]
    times = time_alternately(steppers, _ROUNDS.value, _STEPS.value)
    result = {s.name: {"tokens_per_sec": b * length / statistics.median(times[s.name]), "compile_s": s.compile_s}
              for s in steppers}
    result["fine_tuning_over_pretraining"] = 1 / median_ratio(times["fine-tuning"], times["pretraining"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    cli.run(main)
