"""The training loop, top to bottom: config → mesh → data → run (state, steps) → resume → loop → summary.

`train_and_evaluate` reads in order: resolve the config against the data, set the run up
(`train/setup.py:build_run`), prepare the run directory (`cgpt_jax/run_dir.py`), resume, then iterate:
dispatch step t, read step t-1's metrics, evaluate, save. The pieces around the loop are small and named:
`NonFiniteSteps` (the NaN policy), `Throughput` (timing without compile, evaluations and saves),
`PreemptionWatch` and `distributed.Watchdog`.

Pretraining's evaluation is the mean loss of the dataset's fixed validation batches, plus the zero-shot
tasks of `config.eval.tasks` scored with the current parameters (cgpt_jax/eval/during_training.py).
Fine-tuning (cgpt_jax/finetune/) runs through the same loop with its own `objective`, `dataset`, initial
parameters (`init_params`) and `Evaluation` (validation metrics at each evaluation, the best state kept in
DIR/best/, summary fields such as test metrics computed from it). A finished run with a frozen-base PEFT method
(config.finetune.method; a classifier's from its best state, a language model's from its last) also writes
DIR/adapter/: the trained parameters alone with the base's identity (cgpt_jax/peft/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from typing import TYPE_CHECKING, Callable, Iterator

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from flax import nnx

from cgpt_jax import flops, peft, run_dir, storage
from cgpt_jax.config import resolve, validate
from cgpt_jax.data import Dataset, make_dataset
from cgpt_jax.devices import device_peak_flops
from cgpt_jax.errors import InputError
from cgpt_jax.model import params_count
from cgpt_jax.parallel import distributed
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.peft import checkpoint as peft_checkpoint
from cgpt_jax.peft import training as peft_training
from cgpt_jax.train import checkpoint
from cgpt_jax.train.objective import LANGUAGE_MODELING, Objective
from cgpt_jax.train.faults import NonFiniteError, PreemptionWatch, diagnose_nonfinite, nonfinite_tensors
from cgpt_jax.train.param_table import format_param_table, param_table
from cgpt_jax.train.setup import Run, batch_sharding, build_run
from cgpt_jax.train.state import TrainState
from cgpt_jax.train.writers import MetricWriter

if TYPE_CHECKING:
    from cgpt_jax.eval.during_training import TaskScores

ADAPTER_DIR = "adapter"  # a frozen-base method's trained parameters and the base's identity


def resolve_with_data(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                      ) -> tuple[ml_collections.ConfigDict, Dataset]:
    """The dataset, and the config resolved against it (the model's vocabulary follows the tokenizer)."""
    t = config.train
    dataset = make_dataset(config.data, seq_len=t.seq_len, global_batch_size=t.global_batch_size, seed=t.seed,
                           sharding=batch_sharding(mesh, config.mesh.rules))
    config = ml_collections.ConfigDict(config.to_dict())
    if config.model.vocab_size == -1:
        config.model.vocab_size = dataset.vocab_size
    elif dataset.vocab_size > config.model.vocab_size:
        raise ValueError(f"the tokenizer has {dataset.vocab_size} tokens but model.vocab_size="
                         f"{config.model.vocab_size}; set model.vocab_size=-1 to follow the tokenizer.")
    return resolve(config), dataset


InitParams = Callable[[nnx.State], nnx.State]  # params as initialised from the seed → the params to start from


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """An objective's own evaluation, in place of the mean loss of `dataset.eval_batches()`."""

    evaluate: Callable[[Run, TrainState], dict[str, float]]  # → {'eval_loss': ..., other scalars}
    best_metric: str  # a key of evaluate's result, higher is better: the best state is kept in DIR/best/
    summarize: Callable[[Run, TrainState], dict]  # extra summary fields, computed from the best state


def language_model_tasks(config: ml_collections.ConfigDict, dataset: Dataset, mesh: jax.sharding.Mesh,
                         evaluation: Evaluation | None) -> TaskScores | None:
    """The zero-shot tasks of config.eval.tasks, checked and tokenized (None when there are none)."""
    if not config.eval.tasks.strip():
        return None
    if evaluation is not None:
        raise InputError(f"eval.tasks={config.eval.tasks!r} scores a language model's zero-shot tasks, but this "
                         f"run trains another objective with its own evaluation — leave eval.tasks empty")
    if jax.process_count() > 1:
        raise InputError(f"eval.tasks={config.eval.tasks!r} is scored in one process only — leave it empty and "
                         f"score the checkpoints afterwards with python -m cgpt_jax.evaluate")
    # Imported here: only runs that score tasks load the evaluation stack (the standard library's text).
    from cgpt_jax.eval.during_training import TaskScores
    from cgpt_jax.generate import store_tokenizer

    tokenizer, eos_ids = store_tokenizer(dataset.describe())
    return TaskScores(config.eval, tokenizer=tokenizer, eos_ids=eos_ids, model=config.model,
                      mesh=mesh, rules=config.mesh.rules)


def evaluate_language_model(run: Run, state: TrainState, dataset: Dataset, tasks: TaskScores | None
                            ) -> dict[str, float]:
    """Pretraining's evaluation: the mean loss of the fixed validation batches, and the zero-shot tasks."""
    out = {"eval_loss": float(np.mean([float(run.eval_step(state.params, batch))
                                       for batch in dataset.eval_batches()]))}
    if tasks is not None:
        out.update(tasks(run.graphdef, state.params))
    return out


def restore(run: Run, checkpoints: checkpoint.RunCheckpoints, init_params: InitParams | None, init_name: str
            ) -> tuple[TrainState, dict]:
    """The state to start from, in this order: the workdir's own newest complete checkpoint (an exact
    resume), else `init_params` (another run's parameters, named `init_name`) with a fresh optimizer, else
    scratch. Also returns the loop's counters saved with the checkpoint (empty unless resuming)."""
    state = run.init_state()
    restored = checkpoints.restore_latest(like=state)
    if restored is not None:
        state, counters = restored
        logging.info("resuming from checkpoint %s/%d", checkpoints.directory, counters["step"])
        if init_params is not None:
            logging.info("ignoring %s: the workdir's own checkpoint takes precedence", init_name)
        return state, counters
    if init_params is not None:
        state = state.replace(params=init_params(state.params))
        logging.info("initialised the parameters from %s; fresh optimizer at step 0", init_name)
    else:
        logging.info("starting from scratch (seed %d)", run.config.train.seed)
    return state, {}


class NonFiniteSteps:
    """config.checkpoint.nan_policy: 'halt' stops at the first step with a non-finite loss or gradient;
    'skip' counts steps whose update the optimizer's guard rejected, up to max_consecutive_skips in a row."""

    def __init__(self, ck: ml_collections.ConfigDict, skipped: int):
        self.ck = ck
        self.skipped = skipped
        self.in_a_row = 0

    def accept(self, step: int, values: dict[str, float]) -> bool:
        """True when the loop goes on after `step` (with its update applied, or skipped)."""
        if math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"]):
            self.in_a_row = 0
            return True
        if (self.ck.nan_policy == "skip" and not math.isfinite(values["grad_norm"])
                and self.in_a_row < self.ck.max_consecutive_skips):
            self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
            logging.warning("step %d: non-finite loss or gradients (loss=%s, grad_norm=%s); update skipped "
                            "(%d skipped so far)", step, values["loss"], values["grad_norm"], self.skipped)
            return True
        return False

    def reason(self) -> str:
        if self.ck.nan_policy == "skip":
            return f"more than checkpoint.max_consecutive_skips={self.ck.max_consecutive_skips} non-finite steps in a row"
        return "checkpoint.nan_policy='halt'"


class Throughput:
    """Tokens per second of the train steps alone: the first step (it compiles), evaluations and
    checkpoint saves are not timed. A step's tokens are its batch's padded [batch, length] (a fine-tuning
    batch may be padded to a length bucket shorter than train.seq_len)."""

    def __init__(self):
        self.interval_start: float | None = None
        self.interval_tokens = 0
        self.total_s, self.total_tokens = 0.0, 0

    def start(self, metrics) -> None:
        jax.block_until_ready(metrics)
        self.interval_start = time.time()

    def count_step(self, tokens: int) -> None:
        self.interval_tokens += tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        start = time.time()
        yield
        if self.interval_start is not None:
            self.interval_start += time.time() - start

    def close_interval(self) -> float | None:
        """Tokens/s since the last call (None if no timed step), and start the next interval."""
        rate = None
        if self.interval_start is not None and self.interval_tokens:
            elapsed = time.time() - self.interval_start
            self.total_s, self.total_tokens = self.total_s + elapsed, self.total_tokens + self.interval_tokens
            rate = self.interval_tokens / elapsed
        self.interval_start, self.interval_tokens = time.time(), 0
        return rate

    def mean(self) -> float:
        return self.total_tokens / self.total_s if self.total_s else float("nan")


def _float_or_nan(x: float | None) -> float:
    return float("nan") if x is None else x


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
                       init_from: str | None = None, devices: list[jax.Device] | None = None,
                       show_progress: bool = True, watchdog_s: float = 0.0,
                       objective: Objective = LANGUAGE_MODELING, dataset: Dataset | None = None,
                       init_params: tuple[str, InitParams] | None = None,
                       evaluation: Evaluation | None = None) -> dict:
    """Train `config` in `workdir` and return the run summary (also written to summary.json).

    Pretraining needs only the config. Another objective comes with its `dataset` (the config already
    resolved against it), optionally `init_params` = (name, function) instead of `init_from`, and its
    `evaluation`.

    Where the train state comes from: see `restore` (own checkpoint > init_from > scratch); re-run the same
    command after any stop. On SIGTERM/SIGINT the loop finishes the current step, saves synchronously and
    returns a summary with status 'preempted' (summary.json is written only by a finished run).
    """
    # --- set-up: every check before anything is written or compiled ---
    devices = devices if devices is not None else jax.devices()
    validate(config, len(devices))
    storage.check_workdir(workdir)  # a bucket that is missing or refuses these credentials: before any work
    checkpoint.validate_checkpoint_config(config.checkpoint)
    mesh = make_mesh(config.mesh, devices)
    if dataset is None:
        config, dataset = resolve_with_data(config, mesh)
    config_dict = {**config.to_dict(), "data_description": dataset.describe()}
    tasks = language_model_tasks(config, dataset, mesh, evaluation)
    if jax.process_count() > 1:
        distributed.preflight(config_dict, expected_devices=len(devices))
        distributed.check_shared_workdir(workdir)
    if not overwrite and run_dir.is_same_finished_run(workdir, config_dict):
        logging.info("run in %s already finished; nothing to do", workdir)
        return run_dir.read_json(run_dir.path(workdir, run_dir.SUMMARY))
    run = build_run(config, mesh, objective=objective)
    t, ck = config.train, config.checkpoint
    checkpoint.check_storage(workdir, checkpoint.state_nbytes(run.abstract_state))
    if init_from:
        # the base's parameters; a PEFT method's added ones (config.finetune.method) keep their init
        source = checkpoint.find_init_source(init_from, checkpoint.tensor_specs(
            peft_training.base_params(run.abstract_state.params), "params/"))
        logging.info("--init_from: checkpoint %s/%d", source.directory, source.step)
        init_params = ("--init_from", peft_training.keeping_added(
            lambda like: checkpoint.load_init_params(source, like_params=like)))
    # Process 0 alone writes the run directory; the others wait for it (a second writer raced it).
    run_dir.prepare(workdir, config_dict, overwrite, writer=jax.process_index() == 0)
    table = param_table(config, objective)  # init, learning rate and forward multipliers of every parameter, to audit
    logging.info("parameters:\n%s", format_param_table(table))
    if jax.process_index() == 0:
        run_dir.write_json_atomically(run_dir.path(workdir, run_dir.PARAM_TABLE), table)
    distributed.barrier("cgpt_jax:workdir_prepared")

    checkpoints = checkpoint.RunCheckpoints(workdir, ck)
    best_ck = ml_collections.ConfigDict({**ck.to_dict(), "keep_last": 1, "keep_every": 0})  # the best one only
    best_checkpoints = checkpoint.RunCheckpoints(run_dir.path(workdir, run_dir.BEST), best_ck) if evaluation else None
    init_name, init_fn = init_params or ("", None)
    state, counters = restore(run, checkpoints, init_fn, init_name)
    start_step = int(state.step)
    if best_checkpoints is not None:
        best_checkpoints.set_aside_after(start_step)
    shape = flops.Shape.from_model_config(config.model, t.seq_len)
    peak = t.device_peak_flops if t.device_peak_flops > 0 else device_peak_flops(devices[0])
    tokens_per_step = t.global_batch_size * t.seq_len
    logging.info("model: %s parameters (%s non-embedding); %d steps of %d tokens; mesh %s",
                 f"{params_count(config.model):,}", f"{params_count(config.model, non_embedding=True):,}",
                 t.steps, tokens_per_step, dict(mesh.shape))

    # --- the loop ---
    writer = MetricWriter(workdir, first_step=start_step, remote_flush_s=ck.remote_metrics_flush_s)
    nonfinite = NonFiniteSteps(ck, skipped=counters.get("skipped_steps", 0))
    throughput = Throughput()
    train_loss = _float_or_nan(counters.get("train_loss"))
    eval_loss = _float_or_nan(counters.get("eval_loss"))
    best_value = _float_or_nan(counters.get("best_value"))
    run_start = time.time()

    def read_metrics(step: int, metrics: dict) -> None:
        """Host-side work for a dispatched step: the NaN policy, then the log line every log_every steps."""
        nonlocal train_loss
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        train_loss = values["loss"]
        if not nonfinite.accept(step, values):
            writer.write(step, values)
            checkpoints.wait()  # let an in-flight (good) save commit, so the message names it
            last = checkpoints.latest_step()
            raise NonFiniteError(
                diagnose_nonfinite(step, values, state, dataset.train_batch(step), run.objective, run.graphdef,
                                   config) +
                f"\nStopped ({nonfinite.reason()}) without saving; the last checkpoint is "
                f"{'none' if last is None else f'{checkpoints.directory}/{last}'}. "
                "To drop such updates and go on, set --config.checkpoint.nan_policy=skip.")
        if step % t.log_every == 0 or step == t.steps - 1:
            rate = throughput.close_interval()
            if rate is not None:
                values["tokens_per_sec"] = rate
                values["mfu"] = flops.mfu(rate, shape, peak * len(devices))
            writer.write(step, values)

    def save(steps_done: int, wait: bool) -> None:
        # Only after every step up to here was read and found finite, and never a non-finite state.
        bad = nonfinite_tensors(state)
        if bad:
            raise NonFiniteError(f"not saving checkpoint {steps_done}: non-finite tensors {bad[:12]}")
        writer.flush()  # every step before a checkpoint is in metrics.jsonl before the checkpoint exists
        checkpoints.save(steps_done, state, {"config": config_dict, "mesh": dict(mesh.shape),
                                             "skipped_steps": nonfinite.skipped, "train_loss": train_loss,
                                             "eval_loss": eval_loss, "best_value": best_value}, wait=wait)

    progress = tqdm.tqdm(total=t.steps, initial=start_step, disable=not show_progress or jax.process_index() != 0,
                         desc=os.path.basename(workdir.rstrip("/")), unit="step")
    preemption = PreemptionWatch()
    watchdog = distributed.Watchdog(0.0)  # disarmed until the first step has compiled
    pending: tuple[int, dict] | None = None  # step t-1's metrics are read only after step t is dispatched
    stopped_at = None
    try:
        for step in range(start_step, t.steps):
            batch = dataset.train_batch(step)
            state, metrics = run.train_step(state, batch)
            if pending is not None:
                read_metrics(*pending)
            if step == start_step:
                throughput.start(metrics)
                watchdog = distributed.Watchdog(watchdog_s)  # compiling may take long; a stalled step may not
            else:
                throughput.count_step(batch["inputs"].size)
            pending = (step, metrics)
            is_last = step == t.steps - 1
            if (step + 1) % t.eval_every == 0 or is_last:
                read_metrics(*pending)
                pending = None
                watchdog.beat("evaluating")
                with throughput.paused():
                    evaluated = (evaluation.evaluate(run, state) if evaluation is not None else
                                 evaluate_language_model(run, state, dataset, tasks))
                    eval_loss = evaluated["eval_loss"]
                    if evaluation is not None and not evaluated[evaluation.best_metric] <= best_value:  # NaN: first
                        best_value = evaluated[evaluation.best_metric]
                        best_checkpoints.save(step + 1, state, {"config": config_dict,
                                                                evaluation.best_metric: best_value}, wait=True)
                writer.write(step, evaluated)
                progress.set_postfix(loss=f"{train_loss:.3f}", eval=f"{eval_loss:.3f}")
            stop = preemption.should_stop(step) and not is_last
            if is_last or stop or (ck.every_steps and (step + 1) % ck.every_steps == 0):
                if pending is not None:
                    read_metrics(*pending)
                    pending = None
                watchdog.beat("saving a checkpoint")
                with throughput.paused():
                    save(step + 1, wait=is_last or stop)
            checkpoints.check_background()  # a failed background save stops the run at the next step
            watchdog.beat("training")
            progress.update(1)
            if stop:
                stopped_at = step + 1
                break
        if pending is not None:
            read_metrics(*pending)
    finally:
        watchdog.stop()
        preemption.close()
        progress.close()
        writer.close()
        checkpoints.close()
        if best_checkpoints is not None:
            best_checkpoints.close()

    if stopped_at is not None:
        message = (f"stopped by {preemption.signal_name} after step {stopped_at - 1}: saved checkpoint "
                   f"{checkpoints.directory}/{stopped_at}; re-run the same command to resume")
        logging.warning(message)
        return {"status": run_dir.PREEMPTED, "step": stopped_at, "message": message}

    tokens = t.steps * tokens_per_step
    summary = {
        "status": run_dir.FINISHED,
        "step": t.steps,
        "final_eval_loss": eval_loss,
        "final_train_loss": train_loss,
        "skipped_steps": nonfinite.skipped,
        "n_params": params_count(config.model),
        "n_params_non_embedding": params_count(config.model, non_embedding=True),
        "tokens": tokens,
        **{f"flops_{c}": flops.training_flops(shape, tokens, c) for c in run_dir.FLOP_CONVENTIONS},
        "wall_time_s": time.time() - run_start,
        "tokens_per_sec": throughput.mean(),
    }
    if evaluation is not None:
        best_state, best_meta = best_checkpoints.restore_latest(like=state)
        summary["best"] = {"step": best_meta["step"], evaluation.best_metric: best_meta[evaluation.best_metric]}
        summary.update(evaluation.summarize(run, best_state))
    elif not peft.build(config.finetune.method).trains_base and jax.process_index() == 0:
        # A language model fine-tuned with a frozen-base method: its trained parameters alone, with the base's
        # identity, as a classification run's summarize writes them (cgpt_jax/peft/checkpoint.py).
        meta = peft_checkpoint.save(run_dir.path(workdir, ADAPTER_DIR), config.finetune.method, state.params,
                                    init_from or "(the seed's initialisation: no --init_from)")
        summary["adapter"] = {"directory": ADAPTER_DIR, "tensors": len(meta["tensors"])}
    if jax.process_index() == 0:
        run_dir.write_json_atomically(run_dir.path(workdir, run_dir.SUMMARY), summary)
    return summary
