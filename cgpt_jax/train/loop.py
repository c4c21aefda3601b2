"""The training loop, top to bottom: config → mesh → data → state → step → checkpoint → evals → summary.

Start-up order: validate the config, build the mesh and the dataset (the model's vocabulary follows
the tokenizer), resolve derived fields, check storage and `init_from`, check the workdir, then create the
sharded state and resume it. Resume order (own checkpoint > init_from > scratch): see `train_and_evaluate`.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import time

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from flax import nnx

from cgpt_jax import flops
from cgpt_jax.config import resolve, run_differences, validate
from cgpt_jax.data import make_dataset
from cgpt_jax.devices import device_peak_flops
from cgpt_jax.model import abstract_model, params_count
from cgpt_jax.parallel import distributed
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.parallel.sharding import logical_to_spec
from cgpt_jax.train import checkpoint
from cgpt_jax.train.faults import (
    NonFiniteError,
    PreemptionWatch,
    diagnose_nonfinite,
    nonfinite_tensors,
    reject_nonfinite,
)
from cgpt_jax.train.optimizer import lr_schedule, make_optimizer
from cgpt_jax.train.param_table import PARAM_TABLE, format_param_table, param_table
from cgpt_jax.train.state import create_sharded_state, model_graphdef
from cgpt_jax.train.step import make_eval_step, make_train_step
from cgpt_jax.train.writers import MetricWriter

def _write_atomically(path: str, text: str) -> None:
    """Write then rename, so a kill mid-write never leaves a truncated file for the next start."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def prepare_workdir(workdir: str, config_dict: dict, overwrite: bool) -> None:
    """Create the workdir, or accept it when it holds this same run; never delete another run.

    With `overwrite`, a workdir holding another config is moved aside to `<workdir>.replaced-<time>`.
    A restart may change the restart-mutable fields; config.json then records the new values.
    """
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        diffs = run_differences(previous, config_dict)
        if diffs:
            if not overwrite:
                raise ValueError(
                    f"workdir {workdir} holds another run's config; differences:\n" + "\n".join(diffs[:20]) +
                    "\nUse another --workdir, or pass --overwrite to move the old run aside (it is kept).")
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            aside = f"{workdir.rstrip('/')}.replaced-{stamp}"
            shutil.move(workdir, aside)
            logging.warning("moved the previous run in %s aside to %s", workdir, aside)
    os.makedirs(workdir, exist_ok=True)
    _write_atomically(path, json.dumps(config_dict, indent=2))


def _drop_metrics_from(workdir: str, first_step: int) -> None:
    """Keep only metric lines before `first_step`, so a restarted run logs each step once."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    kept = []
    for i, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a line torn by a kill mid-write: always after the last checkpoint
                continue
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:200]!r}") from None
        if record["step"] < first_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    _write_atomically(path, "".join(kept))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
                       init_from: str | None = None, devices: list[jax.Device] | None = None,
                       show_progress: bool = True, watchdog_s: float = 0.0) -> dict:
    """Train `config` in `workdir` and return the run summary (also written to summary.json).

    Where the train state comes from, in this order:
      1. the workdir's own newest complete checkpoint: an exact resume (re-run the same command after
         any stop; damaged checkpoints are skipped with a warning);
      2. else `init_from`, another run's directory: the parameters of its newest complete checkpoint, with
         a fresh optimizer at step 0;
      3. else a fresh initialisation from config.train.seed.
    On SIGTERM/SIGINT the loop finishes the current step, saves synchronously and returns a summary with
    status 'preempted' (summary.json is written only by a finished run).
    """
    devices = devices if devices is not None else jax.devices()
    validate(config, len(devices))
    checkpoint.validate_checkpoint_config(config.checkpoint)
    summary_path = os.path.join(workdir, "summary.json")

    mesh = make_mesh(config.mesh, devices)
    batch_sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "length"), config.mesh.rules))
    dataset = make_dataset(config.data, seq_len=config.train.seq_len,
                           global_batch_size=config.train.global_batch_size, seed=config.train.seed,
                           sharding=batch_sharding)
    config = ml_collections.ConfigDict(config.to_dict())
    if config.model.vocab_size == -1:
        config.model.vocab_size = dataset.vocab_size
    elif dataset.vocab_size > config.model.vocab_size:
        raise ValueError(f"the tokenizer has {dataset.vocab_size} tokens but model.vocab_size="
                         f"{config.model.vocab_size}; set model.vocab_size=-1 to follow the tokenizer.")
    config = resolve(config)
    validate(config, len(devices))
    config_dict = {**config.to_dict(), "data_description": dataset.describe()}
    if jax.process_count() > 1:
        distributed.preflight(config_dict, expected_devices=len(devices))
    if os.path.exists(summary_path) and not overwrite:
        with open(os.path.join(workdir, "config.json")) as f:
            if not run_differences(json.load(f), config_dict):
                logging.info("run in %s already finished; nothing to do", workdir)
                with open(summary_path) as f:
                    return json.load(f)

    t, ck = config.train, config.checkpoint
    tx = reject_nonfinite(make_optimizer(t, config.model))
    schedule = lr_schedule(t)
    abstract_params = nnx.state(abstract_model(config.model), nnx.Param)
    checkpoint.check_storage(workdir, checkpoint.state_nbytes((abstract_params, jax.eval_shape(tx.init,
                                                                                               abstract_params))))
    init_source = (checkpoint.find_init_source(init_from, checkpoint.tensor_specs(abstract_params, "params/"))
                   if init_from else None)
    prepare_workdir(workdir, config_dict, overwrite)
    table = param_table(config)  # init, learning rate and forward multipliers of every parameter, to audit
    logging.info("parameters:\n%s", format_param_table(table))
    if jax.process_index() == 0:
        _write_atomically(os.path.join(workdir, PARAM_TABLE), json.dumps(table, indent=2))

    state, shardings = create_sharded_state(config, tx, mesh)
    graphdef = model_graphdef(config.model)
    train_step = make_train_step(config, graphdef, tx, schedule, mesh, shardings, batch_sharding)
    eval_step = make_eval_step(config, graphdef, mesh, shardings.params, batch_sharding)

    # Resume order: own checkpoint > init_from > scratch.
    checkpoints = checkpoint.RunCheckpoints(workdir, ck)
    restored = checkpoints.restore_latest(like=state)
    resumed: dict = {}
    if restored is not None:
        state, resumed = restored
        logging.info("resuming from checkpoint %s/%d", checkpoints.directory, resumed["step"])
        if init_source is not None:
            logging.info("ignoring --init_from: the workdir's own checkpoint takes precedence")
    elif init_source is not None:
        state = state.replace(params=checkpoint.load_init_params(init_source, like_params=state.params))
        logging.info("initialised the parameters from %s/%d; fresh optimizer at step 0",
                     init_source.directory, init_source.step)
    else:
        logging.info("starting from scratch (seed %d)", t.seed)

    shape = flops.Shape.from_model_config(config.model, t.seq_len)
    peak = t.device_peak_flops if t.device_peak_flops > 0 else device_peak_flops(devices[0])
    tokens_per_step = t.global_batch_size * t.seq_len
    logging.info("model: %s parameters (%s non-embedding); %d steps of %d tokens; mesh %s",
                 f"{params_count(config.model):,}", f"{params_count(config.model, non_embedding=True):,}",
                 t.steps, tokens_per_step, dict(mesh.shape))

    def evaluate() -> float:
        return float(np.mean([float(eval_step(state.params, batch)) for batch in dataset.eval_batches()]))

    def as_float(x: float | None) -> float:
        return float("nan") if x is None else x

    start_step = int(state.step)
    _drop_metrics_from(workdir, start_step)
    writer = MetricWriter(workdir)
    run_start = time.time()
    interval_start, interval_steps, compute_time, compute_steps = None, 0, 0.0, 0
    pending: tuple[int, dict] | None = None  # read step t-1's metrics only after dispatching step t
    # Counters a resumed run continues from its checkpoint.
    last_train_loss = as_float(resumed.get("train_loss"))
    eval_loss = as_float(resumed.get("eval_loss"))
    skipped, skipped_in_a_row = resumed.get("skipped_steps", 0), 0

    def on_nonfinite(bad_step: int, values: dict) -> None:
        """nan_policy 'skip': count a step whose update the optimizer rejected; otherwise stop, diagnosed."""
        nonlocal skipped, skipped_in_a_row
        if ck.nan_policy == "skip" and not math.isfinite(values["grad_norm"]) \
                and skipped_in_a_row < ck.max_consecutive_skips:
            skipped, skipped_in_a_row = skipped + 1, skipped_in_a_row + 1
            logging.warning("step %d: non-finite loss or gradients (loss=%s, grad_norm=%s); update skipped "
                            "(%d skipped so far)", bad_step, values["loss"], values["grad_norm"], skipped)
            return
        writer.write(bad_step, values)
        reason = ("more than checkpoint.max_consecutive_skips="
                  f"{ck.max_consecutive_skips} non-finite steps in a row" if ck.nan_policy == "skip"
                  else "checkpoint.nan_policy='halt'")
        checkpoints.wait()  # let an in-flight (good) save commit, so the message names it
        last = checkpoints.latest_step()
        raise NonFiniteError(
            diagnose_nonfinite(bad_step, values, state, dataset.train_batch(bad_step), graphdef, config) +
            f"\nStopped ({reason}) without saving; the last checkpoint is "
            f"{'none' if last is None else f'{checkpoints.directory}/{last}'}. "
            "To drop such updates and go on, set --config.checkpoint.nan_policy=skip.")

    def flush(pending_step: int, metrics: dict) -> None:
        nonlocal last_train_loss, interval_start, interval_steps, compute_time, compute_steps, skipped_in_a_row
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last_train_loss = values["loss"]
        if math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"]):
            skipped_in_a_row = 0
        else:
            on_nonfinite(pending_step, values)
        if pending_step % t.log_every == 0 or pending_step == t.steps - 1:
            if interval_start is not None and interval_steps:
                elapsed = time.time() - interval_start
                compute_time, compute_steps = compute_time + elapsed, compute_steps + interval_steps
                tokens_per_sec = interval_steps * tokens_per_step / elapsed
                values["tokens_per_sec"] = tokens_per_sec
                values["mfu"] = flops.mfu(tokens_per_sec, shape, peak * len(devices))
            writer.write(pending_step, values)
            interval_start, interval_steps = time.time(), 0

    def save(steps_done: int, wait: bool) -> None:
        # Only after every step up to here was read and found finite (flush), and never a non-finite state.
        bad = nonfinite_tensors(state)
        if bad:
            raise NonFiniteError(f"not saving checkpoint {steps_done}: non-finite tensors {bad[:12]}")
        checkpoints.save(steps_done, state, {"config": config_dict, "mesh": dict(mesh.shape),
                                             "skipped_steps": skipped, "train_loss": last_train_loss,
                                             "eval_loss": eval_loss}, wait=wait)

    progress = tqdm.tqdm(total=t.steps, initial=start_step, disable=not show_progress or jax.process_index() != 0,
                         desc=os.path.basename(workdir.rstrip("/")), unit="step")
    preemption = PreemptionWatch()
    watchdog: distributed.Watchdog | None = None
    stopped_at = None
    try:
        for step in range(start_step, t.steps):
            state, metrics = train_step(state, dataset.train_batch(step))
            if pending is not None:
                flush(*pending)
            if step == start_step:
                # The first step includes compilation: time from its end.
                jax.block_until_ready(metrics)
                interval_start = time.time()
                # Armed only now: compilation may take long, a stalled step or collective must not.
                watchdog = distributed.Watchdog(watchdog_s)
            else:
                interval_steps += 1
            pending = (step, metrics)
            is_last = step == t.steps - 1
            if (step + 1) % t.eval_every == 0 or is_last:
                flush(*pending)
                pending = None
                eval_start = time.time()
                if watchdog:
                    watchdog.beat("evaluating")
                eval_loss = evaluate()
                writer.write(step, {"eval_loss": eval_loss})
                progress.set_postfix(loss=f"{last_train_loss:.3f}", eval=f"{eval_loss:.3f}")
                interval_start = (interval_start or eval_start) + (time.time() - eval_start)
            stop = preemption.should_stop(step) and not is_last
            if is_last or stop or (ck.every_steps and (step + 1) % ck.every_steps == 0):
                if pending is not None:
                    flush(*pending)
                    pending = None
                pause_start = time.time()
                if watchdog:
                    watchdog.beat("saving a checkpoint")
                save(step + 1, wait=is_last or stop)
                interval_start = (interval_start or pause_start) + (time.time() - pause_start)
            checkpoints.check_background()  # a failed background save stops the run at the next step
            if watchdog:
                watchdog.beat("training")
            progress.update(1)
            if stop:
                stopped_at = step + 1
                break
        if pending is not None:
            flush(*pending)
    finally:
        if watchdog:
            watchdog.stop()
        preemption.close()
        progress.close()
        writer.close()
        checkpoints.close()

    if stopped_at is not None:
        message = (f"stopped by {preemption.signal_name} after step {stopped_at - 1}: saved checkpoint "
                   f"{checkpoints.directory}/{stopped_at}; re-run the same command to resume")
        logging.warning(message)
        return {"status": "preempted", "step": stopped_at, "message": message}

    tokens = t.steps * tokens_per_step
    summary = {
        "status": "finished",
        "step": t.steps,
        "final_eval_loss": eval_loss,
        "final_train_loss": last_train_loss,
        "skipped_steps": skipped,
        "n_params": params_count(config.model),
        "n_params_non_embedding": params_count(config.model, non_embedding=True),
        "tokens": tokens,
        **{f"flops_{c}": flops.training_flops(shape, tokens, c) for c in flops.CONVENTIONS},
        "wall_time_s": time.time() - run_start,
        "tokens_per_sec": compute_steps * tokens_per_step / compute_time if compute_time else float("nan"),
    }
    if jax.process_index() == 0:
        _write_atomically(summary_path, json.dumps(summary, indent=2))
    return summary
