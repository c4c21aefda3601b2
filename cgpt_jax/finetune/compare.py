"""Fine-tuning methods side by side: the table and plot `python -m cgpt_jax.analyze DIR` writes for a sweep
of classification runs that differ in config.finetune.method (experiments/peft_compare.py).

    DIR/report.md           one row per run, most trainable parameters first: method, trainable parameters (count and % of the model with the
                            method), test accuracy and macro-F1 (the best validation state's, summary.json's
                            `test`), step time and peak memory relative to `full`, wall time of the run
    DIR/peft_compare.json   the same rows, with the measurement's settings
    DIR/peft_compare.png    test accuracy against trainable parameters (log x)

Step time and peak memory are measured here, not read from the runs: the runs of a sweep train one after
another on a machine whose load changes, so their own throughputs are not comparable. Every run's train step
is rebuilt from its config.json (`build_run`, one device, the run's batch at its full max_len, the longest
length bucket), compiled, and timed taking turns round by round (`bench.runners.time_alternately`), so a slow
spell hits every method alike; the step time is the median over rounds of the ratio to `full`'s step in the
same round. Peak memory is what XLA's buffer assignment reserves for the compiled step (arguments + outputs
+ temporaries: parameters, optimizer state, activations); XLA:CPU keeps no allocator statistics.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from cgpt_jax import peft, storage
from cgpt_jax.bench.runners import median_ratio, time_alternately
from cgpt_jax.config import base_config, resolve
from cgpt_jax.finetune.objective import ClassificationObjective
from cgpt_jax.finetune.stepper import stepper
from cgpt_jax.peft import training
from cgpt_jax.run_dir import SUMMARY, finished_summary
from cgpt_jax.scaling.results import collect_runs

REPORT, TABLE, PLOT = "report.md", "peft_compare.json", "peft_compare.png"
REFERENCE = "full"  # the method the step time and memory are relative to


@dataclasses.dataclass
class Row:
    name: str
    method: str
    params: int  # the model with the method's parameters
    trainable: int
    test_accuracy: float
    test_macro_f1: float
    wall_time_s: float
    step_time_rel: float | None = None  # to `full`'s step; None without a `full` run
    peak_memory_rel: float | None = None
    seconds_per_step: float = 0.0
    peak_memory_bytes: int = 0

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable / self.params


def is_comparison(workdir: Path) -> bool:
    """Whether `workdir` is a sweep of classification fine-tuning runs (summary.json with test metrics)."""
    try:
        runs = collect_runs(workdir)
    except (FileNotFoundError, ValueError):  # not a sweep: the caller's own analysis says why
        return False
    summaries = [finished_summary(str(run.path)) for run in runs if run.status == "finished"]
    return bool(summaries) and all("test" in s for s in summaries)


def run_config(raw: dict) -> ml_collections.ConfigDict:
    """The run's config from its config.json, on one device."""
    config = base_config()
    for section in ("model", "train", "finetune"):
        config[section].update(raw[section])
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
    return resolve(config)


def count_parameters(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """(all parameters, trainable ones) of the classifier with config.finetune.method attached."""
    recipe = peft.build(config.finetune.method)
    objective = training.with_method(ClassificationObjective(config.finetune.num_labels, config.finetune.loss),
                                     recipe, config)
    params = nnx.state(nnx.eval_shape(lambda: objective.make_model(config, nnx.Rngs(0))), nnx.Param)
    sizes = [(int(np.prod(v.shape)), training.is_trainable(recipe, path)) for path, v in nnx.to_flat_state(params)]
    return sum(n for n, _ in sizes), sum(n for n, trains in sizes if trains)


def read_rows(workdir: Path) -> tuple[list[Row], dict[str, ml_collections.ConfigDict], dict]:
    """The finished runs' rows (step costs not yet measured; most trainable parameters first), their configs,
    and the majority-class baseline on test (the same task for every run)."""
    rows, configs, baseline = [], {}, {}
    for run in collect_runs(workdir):
        summary = finished_summary(str(run.path))
        if summary is None:
            continue
        if "test" not in summary:
            raise ValueError(f"{run.path / SUMMARY} has no test metrics: not a classification fine-tuning run")
        config = run_config(run.config)
        total, trainable = count_parameters(config)
        rows.append(Row(run.name, config.finetune.method, total, trainable, summary["test"]["accuracy"],
                        summary["test"]["macro_f1"], summary["wall_time_s"]))
        configs[run.name] = config
        baseline = summary.get("majority_baseline_test", baseline)
    if not rows:
        raise ValueError(f"{workdir} holds no finished run; finish the sweep first")
    return sorted(rows, key=lambda r: -r.trainable), configs, baseline


def measure_steps(rows: list[Row], configs: dict[str, ml_collections.ConfigDict], rounds: int,
                  steps_per_round: int) -> None:
    """Fill each row's seconds per step and peak memory, and both relative to the `full` run's."""
    steppers = []
    for row in rows:
        config = configs[row.name]
        b, length, labels = config.train.global_batch_size, config.train.seq_len, config.finetune.num_labels
        rng = np.random.default_rng(0)  # the same batch for every method
        batch = {"inputs": rng.integers(0, config.model.vocab_size, (b, length)).astype(np.int32),
                 "lengths": np.full((b,), length, np.int32),
                 "labels": rng.integers(0, labels, b).astype(np.int32)}
        objective = ClassificationObjective(labels, config.finetune.loss)
        steppers.append(stepper(row.name, config, objective, batch, jax.devices()[:1]))
    times = time_alternately(steppers, rounds, steps_per_round)
    reference = next((r for r in rows if r.method == REFERENCE), None)
    for row, s in zip(rows, steppers):
        row.seconds_per_step = statistics.median(times[row.name])
        row.peak_memory_bytes = s.peak_memory_bytes
    if reference is not None:
        for row in rows:
            row.step_time_rel = median_ratio(times[row.name], times[reference.name])
            row.peak_memory_rel = row.peak_memory_bytes / reference.peak_memory_bytes


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def markdown(rows: list[Row], title: str, baseline: dict) -> str:
    lines = [f"# {title}", "",
             ("| run | method | trainable | trainable % | test accuracy | test macro-F1 | step time vs full "
              "| peak memory vs full | wall time (s) |"),
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        method = r.method.replace("|", "\\|")  # a '|' in a LoRA target list would end the cell
        lines.append(f"| {r.name} | `{method}` | {r.trainable:,} | {r.trainable_percent:.2f}% | "
                     f"{r.test_accuracy:.3f} | {r.test_macro_f1:.3f} | {_cell(r.step_time_rel, '.2f')} | "
                     f"{_cell(r.peak_memory_rel, '.2f')} | {r.wall_time_s:.0f} |")
    if baseline:
        lines += ["", f"Majority class on test: accuracy {baseline['accuracy']:.3f}, macro-F1 {baseline['macro_f1']:.3f}."]
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: str | os.PathLike) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for r in rows:
        ax.scatter(r.trainable, r.test_accuracy, color="C0")
        ax.annotate(r.name, (r.trainable, r.test_accuracy), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.15)  # room for the labels of the outermost points
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("test accuracy")
    ax.set_title("fine-tuning methods: test accuracy against trainable parameters")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    storage.write_figure(fig, path, dpi=120)


def write_outputs(workdir: Path, out_dir: str | os.PathLike, *, rounds: int = 5,
                  steps_per_round: int = 3) -> dict[str, storage.Path]:
    """Read the runs, measure their steps side by side, and write the report, the table and the plot
    (`out_dir` may be local, gs:// or s3://)."""
    rows, configs, baseline = read_rows(workdir)
    measure_steps(rows, configs, rounds, steps_per_round)
    out = storage.path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"report": out / REPORT, "table": out / TABLE, "plot": out / PLOT}
    storage.write_atomically(paths["report"], markdown(rows, f"Fine-tuning methods compared: {workdir}", baseline))
    storage.write_atomically(paths["table"], json.dumps({
        "device": jax.devices()[0].device_kind, "rounds": rounds, "steps_per_round": steps_per_round,
        "rows": [{**dataclasses.asdict(r), "trainable_percent": r.trainable_percent} for r in rows]}, indent=1))
    plot(rows, paths["plot"])
    return paths
