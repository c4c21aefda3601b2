"""Fine-tune a classifier: backbone → labelled data → config → `train_and_evaluate` with the
classification objective, validation metrics at each evaluation and test metrics in summary.json.

Every input is read and checked (backbone, data files, labels, tokenizer, config) before the run
directory is written or anything compiles.
"""
from __future__ import annotations

import functools

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from cgpt_jax import peft, run_dir
from cgpt_jax.config import resolve, validate
from cgpt_jax.errors import InputError
from cgpt_jax.finetune import backbone as backbones
from cgpt_jax.finetune.data import SPLITS, ClassificationData, Encoded, Task, class_balance, encode, read_task
from cgpt_jax.finetune.metrics import majority_baseline, metrics_from_logits, plot_confusion
from cgpt_jax.finetune.objective import ClassificationObjective, classification_loss
from cgpt_jax.finetune.predict import batched_logits
from cgpt_jax.parallel.mesh import make_mesh
from cgpt_jax.peft import checkpoint as peft_checkpoint
from cgpt_jax.parallel.sharding import activation_sharding, logical_to_spec
from cgpt_jax.train.loop import ADAPTER_DIR, Evaluation, train_and_evaluate
from cgpt_jax.train.setup import Run
from cgpt_jax.train.state import TrainState


def make_predict(run: Run):
    """A jitted forward: (params, inputs [B, L], lengths [B]) → class logits [B, C] (B = the global batch)."""
    def forward(params: nnx.State, inputs_BxL: jax.Array, lengths_B: jax.Array) -> jax.Array:
        with activation_sharding(run.mesh, run.config.mesh.rules):
            return nnx.merge(run.graphdef, params)(inputs_BxL, lengths_B)

    return jax.jit(forward, in_shardings=(run.shardings.params, run.batch_shardings["inputs"],
                                          run.batch_shardings["lengths"]))


def logits_of(predict, params: nnx.State, split: Encoded, batch_size: int) -> np.ndarray:
    """Class logits [N, C] of every row, in batches of one length bucket each (one compile per bucket)."""
    return batched_logits(functools.partial(predict, params), split.tokens_NxL, split.lengths_N, batch_size)


def split_metrics(logits_NxC: np.ndarray, split: Encoded, label_names: list[str], loss: str) -> dict:
    metrics = metrics_from_logits(split.labels_N, logits_NxC, label_names)
    metrics["loss"] = float(np.mean(classification_loss(logits_NxC, split.labels_N, loss)))
    return metrics


def prepare(config: ml_collections.ConfigDict, n_devices: int
            ) -> tuple[ml_collections.ConfigDict, backbones.Backbone, Task, dict[str, Encoded]]:
    """Read and check every input: the config resolved with the backbone's model and the task's labels."""
    validate(config, n_devices)
    ft = config.finetune
    backbone = backbones.load_backbone(ft.init)
    task = read_task(ft, config.data.tfds_data_dir)
    backbones.check_fits(backbone, len(task.label_names))
    if ft.num_labels not in (-1, len(task.label_names)):
        raise InputError(f"finetune.num_labels={ft.num_labels} but the task has {len(task.label_names)} labels "
                         f"{task.label_names}; leave it at -1")
    config = ml_collections.ConfigDict(config.to_dict())
    config.model = backbone.model
    config.finetune.num_labels = len(task.label_names)
    config = resolve(config)
    validate(config, n_devices)  # with the backbone's model (train.seq_len against its position table)
    max_len = config.train.seq_len
    encoded = {split: encode([e.text for e in task.splits[split]], task.label_ids(split), backbone.tokenizer,
                             max_len) for split in SPLITS}
    return config, backbone, task, encoded


def finetune(config: ml_collections.ConfigDict, workdir: str, *, overwrite: bool = False,
             devices: list[jax.Device] | None = None, show_progress: bool = True, watchdog_s: float = 0.0) -> dict:
    """Fine-tune `config.finetune.init` on `config.finetune.task` in `workdir`; returns the summary."""
    devices = devices if devices is not None else jax.devices()
    config, backbone, task, encoded = prepare(config, len(devices))
    ft, t = config.finetune, config.train
    balance = class_balance(task)
    for split in SPLITS:
        logging.info("%s: %d examples, %d truncated to %d tokens; per label %s", split, len(task.splits[split]),
                     encoded[split].truncated, t.seq_len, balance[split])
    mesh = make_mesh(config.mesh, devices)
    objective = ClassificationObjective(ft.num_labels, ft.loss, multi_label=task.multi_label)
    shardings = {name: jax.sharding.NamedSharding(mesh, logical_to_spec(array.logical_axes, config.mesh.rules))
                 for name, array in objective.batch_layout(config).items()}
    description = {"task": ft.task, "label_names": task.label_names, "multi_label": task.multi_label,
                   "backbone": ft.init,
                   "tokenizer": backbone.tokenizer.describe(), "max_len": t.seq_len,
                   "examples": {s: len(task.splits[s]) for s in SPLITS},
                   "truncated": {s: encoded[s].truncated for s in SPLITS}, "class_balance": balance}
    dataset = ClassificationData(encoded["train"], global_batch_size=t.global_batch_size, seed=t.seed,
                                 shardings=shardings, vocab_size=backbone.tokenizer.vocab_size,
                                 description=description, length_buckets=ft.length_buckets)
    init = None
    if not ft.from_scratch:
        abstract = nnx.state(nnx.eval_shape(lambda: objective.make_model(config, nnx.Rngs(0))), nnx.Param)
        init = backbones.init_params(backbone, abstract, mesh, list(config.mesh.rules))

    predictors = {}  # one jitted forward per run (the loop builds one run)

    def predictor(run: Run):
        if id(run) not in predictors:
            predictors[id(run)] = make_predict(run)
        return predictors[id(run)]

    def evaluate(run: Run, state: TrainState) -> dict[str, float]:
        logits = logits_of(predictor(run), state.params, encoded["validation"], t.global_batch_size)
        m = split_metrics(logits, encoded["validation"], task.label_names, ft.loss)
        return {"eval_loss": m["loss"], "eval_accuracy": m["accuracy"], "eval_macro_f1": m["macro_f1"]}

    def summarize(run: Run, state: TrainState) -> dict:
        out = {}
        for split in ("validation", "test"):
            logits = logits_of(predictor(run), state.params, encoded[split], t.global_batch_size)
            metrics = split_metrics(logits, encoded[split], task.label_names, ft.loss)
            if jax.process_index() == 0:
                name = run_dir.path(workdir, run_dir.CONFUSION.format(split=split))
                run_dir.write_json_atomically(name + ".json", {"label_names": task.label_names, **metrics})
                plot_confusion(metrics["confusion"], task.label_names,
                               f"{split}: accuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}",
                               name + ".png")
            out[split] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}  # the scalars
        baseline = majority_baseline(encoded["train"].labels_N, encoded["test"].labels_N, task.label_names)
        out["majority_baseline_test"] = {k: baseline[k] for k in ("accuracy", "macro_f1")}
        if not peft.build(ft.method).trains_base and jax.process_index() == 0:
            # the best state's trained parameters alone, with the base's identity (cgpt_jax/peft/checkpoint.py)
            meta = peft_checkpoint.save(run_dir.path(workdir, ADAPTER_DIR), ft.method, state.params, ft.init)
            out["adapter"] = {"directory": ADAPTER_DIR, "tensors": len(meta["tensors"])}
        return out

    return train_and_evaluate(config, workdir, overwrite=overwrite, devices=devices, show_progress=show_progress,
                              watchdog_s=watchdog_s, objective=objective, dataset=dataset, init_params=init,
                              evaluation=Evaluation(evaluate, f"eval_{ft.best_metric}", summarize))

