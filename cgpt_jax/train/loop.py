"""The training loop, top to bottom: config → mesh → data → state → step → evals → summary.

Start-up order: validate the config, build the mesh and the dataset (the model's vocabulary follows
the tokenizer), resolve derived fields, check the workdir, then create the sharded state.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging

from cgpt_jax import flops
from cgpt_jax.devices import device_peak_flops
from cgpt_jax.config import resolve, validate
from cgpt_jax.data import make_dataset
from cgpt_jax.model import params_count
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.parallel.sharding import logical_to_spec
from cgpt_jax.train.optimizer import lr_schedule, make_optimizer
from cgpt_jax.train.state import create_sharded_state, model_graphdef
from cgpt_jax.train.step import make_eval_step, make_train_step
from cgpt_jax.train.writers import MetricWriter


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def prepare_workdir(workdir: str, config_dict: dict, overwrite: bool) -> None:
    """Create the workdir, or accept it when it holds this same config; never delete another run.

    With `overwrite`, a workdir holding another config is moved aside to `<workdir>.replaced-<time>`.
    """
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != json.loads(json.dumps(config_dict)):
            if not overwrite:
                old, new = _flat(previous), _flat(json.loads(json.dumps(config_dict)))
                diffs = [f"  {k}: {old.get(k, '<absent>')!r} → {new.get(k, '<absent>')!r}"
                         for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
                raise ValueError(
                    f"workdir {workdir} holds another run's config; differences:\n" + "\n".join(diffs[:20]) +
                    "\nUse another --workdir, or pass --overwrite to move the old run aside (it is kept).")
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            aside = f"{workdir.rstrip('/')}.replaced-{stamp}"
            shutil.move(workdir, aside)
            logging.warning("moved the previous run in %s aside to %s", workdir, aside)
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        json.dump(config_dict, f, indent=2)


def _drop_metrics_from(workdir: str, first_step: int) -> None:
    """Keep only metric lines before `first_step`, so a restarted run logs each step once."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] < first_step]
    with open(path, "w") as f:
        f.writelines(kept)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
                       devices: list[jax.Device] | None = None, show_progress: bool = True) -> dict:
    """Train `config` in `workdir` and return the run summary (also written to summary.json)."""
    devices = devices if devices is not None else jax.devices()
    validate(config, len(devices))
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
    if os.path.exists(summary_path) and not overwrite:
        with open(os.path.join(workdir, "config.json")) as f:
            if json.load(f) == json.loads(json.dumps(config_dict)):
                logging.info("run in %s already finished; nothing to do", workdir)
                with open(summary_path) as f:
                    return json.load(f)
    prepare_workdir(workdir, config_dict, overwrite)

    t = config.train
    tx = make_optimizer(t)
    schedule = lr_schedule(t)
    state, shardings = create_sharded_state(config, tx, mesh)
    graphdef = model_graphdef(config.model)
    train_step = make_train_step(config, graphdef, tx, schedule, mesh, shardings, batch_sharding)
    eval_step = make_eval_step(config, graphdef, mesh, shardings.params, batch_sharding)

    shape = flops.Shape.from_model_config(config.model, t.seq_len)
    peak = t.device_peak_flops if t.device_peak_flops > 0 else device_peak_flops(devices[0])
    tokens_per_step = t.global_batch_size * t.seq_len
    logging.info("model: %s parameters (%s non-embedding); %d steps of %d tokens; mesh %s",
                 f"{params_count(config.model):,}", f"{params_count(config.model, non_embedding=True):,}",
                 t.steps, tokens_per_step, dict(mesh.shape))

    def evaluate() -> float:
        return float(np.mean([float(eval_step(state.params, batch)) for batch in dataset.eval_batches()]))

    start_step = int(state.step)
    _drop_metrics_from(workdir, start_step)
    writer = MetricWriter(workdir)
    run_start = time.time()
    interval_start, interval_steps, compute_time, compute_steps = None, 0, 0.0, 0
    pending: tuple[int, dict] | None = None  # read step t-1's metrics only after dispatching step t
    last_train_loss = eval_loss = float("nan")

    def flush(pending_step: int, metrics: dict) -> None:
        nonlocal last_train_loss, interval_start, interval_steps, compute_time, compute_steps
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last_train_loss = values["loss"]
        if pending_step % t.log_every == 0 or pending_step == t.steps - 1:
            if interval_start is not None and interval_steps:
                elapsed = time.time() - interval_start
                compute_time, compute_steps = compute_time + elapsed, compute_steps + interval_steps
                tokens_per_sec = interval_steps * tokens_per_step / elapsed
                values["tokens_per_sec"] = tokens_per_sec
                values["mfu"] = flops.mfu(tokens_per_sec, shape, peak * len(devices))
            writer.write(pending_step, values)
            interval_start, interval_steps = time.time(), 0

    progress = tqdm.tqdm(total=t.steps, initial=start_step, disable=not show_progress or jax.process_index() != 0,
                         desc=os.path.basename(workdir.rstrip("/")), unit="step")
    for step in range(start_step, t.steps):
        state, metrics = train_step(state, dataset.train_batch(step))
        if pending is not None:
            flush(*pending)
        if step == start_step:
            # The first step includes compilation: time from its end.
            jax.block_until_ready(metrics)
            interval_start = time.time()
        else:
            interval_steps += 1
        pending = (step, metrics)
        is_last = step == t.steps - 1
        if (step + 1) % t.eval_every == 0 or is_last:
            flush(*pending)
            pending = None
            eval_start = time.time()
            eval_loss = evaluate()
            writer.write(step, {"eval_loss": eval_loss})
            progress.set_postfix(loss=f"{last_train_loss:.3f}", eval=f"{eval_loss:.3f}")
            interval_start = (interval_start or eval_start) + (time.time() - eval_start)
        progress.update(1)
    if pending is not None:
        flush(*pending)
    progress.close()
    writer.close()

    tokens = t.steps * tokens_per_step
    summary = {
        "status": "finished",
        "step": t.steps,
        "final_eval_loss": eval_loss,
        "final_train_loss": last_train_loss,
        "n_params": params_count(config.model),
        "n_params_non_embedding": params_count(config.model, non_embedding=True),
        "tokens": tokens,
        **{f"flops_{c}": flops.training_flops(shape, tokens, c) for c in flops.CONVENTIONS},
        "wall_time_s": time.time() - run_start,
        "tokens_per_sec": compute_steps * tokens_per_step / compute_time if compute_time else float("nan"),
    }
    if jax.process_index() == 0:
        with open(summary_path, "w") as f:
            json.dump(summary, f, indent=2)
    return summary
