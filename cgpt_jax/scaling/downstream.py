"""Downstream scaling: zero-shot results of a sweep's runs (RUN/downstream.json, written by
`python -m cgpt_jax.evaluate sweep`) against training compute, beside the loss; optionally the published
Cerebras-GPT zero-shot table against the paper's FLOPs.

Writes DIR/downstream.md (a table: run, compute, loss, every task metric) and DIR/downstream.png (loss,
accuracies and bits per byte against compute; with the reference, a panel of the published accuracies).
"""
from __future__ import annotations

import dataclasses
import json
import math

from matplotlib.figure import Figure

from cgpt_jax import reference, storage
from cgpt_jax.run_dir import DOWNSTREAM
from cgpt_jax.scaling.results import Run
from cgpt_jax.storage import Path

# lm-eval's metric keys are "<metric>,<filter>"; these are plotted (stderr and perplexities are tabled only).
ACCURACY_METRICS = ("acc", "acc_norm")
BPB_METRIC = "bits_per_byte"


@dataclasses.dataclass(frozen=True)
class DownstreamPoint:
    name: str
    flops: float
    loss: float
    metrics: dict[str, float]  # "<task>/<metric>" -> value (filter 'none')


def collect(runs: list[Run], flops: str) -> list[DownstreamPoint]:
    """The usable runs that have a downstream.json, in compute order."""
    points = []
    for run in runs:
        file = run.path / DOWNSTREAM
        if not run.usable or not file.is_file():
            continue
        results = json.loads(file.read_text())["results"]
        metrics = {f"{task}/{key.split(',')[0]}": float(value) for task, values in results.items()
                   for key, value in values.items()
                   if key.endswith(",none") and "_stderr" not in key and isinstance(value, (int, float))}
        points.append(DownstreamPoint(run.name, run.flops[flops], run.loss, metrics))
    return sorted(points, key=lambda p: p.flops)


def _metric_names(points: list[DownstreamPoint]) -> list[str]:
    return sorted({name for p in points for name in p.metrics})


def report_md(points: list[DownstreamPoint], flops: str) -> str:
    names = _metric_names(points)
    lines = ["# Downstream (zero-shot) results", "",
             f"| run | training FLOPs ({flops}) | val loss | " + " | ".join(names) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in names) + " |"]
    for p in points:
        cells = [f"{p.metrics[n]:.4g}" if n in p.metrics else "" for n in names]
        lines.append(f"| {p.name} | {p.flops:.3g} | {p.loss:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def published_zero_shot() -> tuple[list[float], dict[str, list[float]]]:
    """The paper's training FLOPs of 111M-13B and each task's zero-shot accuracy (SP models)."""
    data = reference.load()
    table = data["downstream"]["zero_shot"]["SP"]
    sizes = list(table)
    flops = [float(data["models"][size]["training_flops_reported"]) for size in sizes]
    tasks = [t for t in data["downstream"]["tasks"]]
    return flops, {task: [float(table[size][task]) for size in sizes] for task in tasks}


def plot(points: list[DownstreamPoint], flops: str, path: Path, with_reference: bool) -> None:
    names = _metric_names(points)
    accuracy = [n for n in names if n.split("/")[1] in ACCURACY_METRICS]
    bpb = [n for n in names if n.split("/")[1] == BPB_METRIC]
    panels = 3 + with_reference
    fig = Figure(figsize=(4.2 * panels, 4.2))
    axes = fig.subplots(1, panels)
    xs = [p.flops for p in points]
    axes[0].plot(xs, [p.loss for p in points], "o-", color="C0")
    axes[0].set_ylabel("final validation loss (nats/token)")
    for i, name in enumerate(accuracy):
        axes[1].plot(xs, [p.metrics.get(name, math.nan) for p in points], "o-", color=f"C{i}", label=name)
    axes[1].set_ylabel("accuracy")
    axes[1].legend(fontsize=7)
    for i, name in enumerate(bpb):
        axes[2].plot(xs, [p.metrics.get(name, math.nan) for p in points], "o-", color=f"C{i}", label=name)
    axes[2].set_ylabel("bits per byte")
    if bpb:
        axes[2].legend(fontsize=7)
    for ax in axes[:3]:
        ax.set_xscale("log")
        ax.set_xlabel(f"training FLOPs ({flops})")
        ax.grid(True, which="both", alpha=0.3)
    if with_reference:
        ref_flops, table = published_zero_shot()
        ax = axes[3]
        for i, (task, values) in enumerate(table.items()):
            ax.plot(ref_flops, values, "s-" if task == "average" else ".-", color=f"C{i}", label=task,
                    linewidth=2.5 if task == "average" else 1)
        ax.set_xscale("log")
        ax.set_xlabel("Cerebras-GPT training FLOPs (paper's convention)")
        ax.set_ylabel("published zero-shot accuracy (SP, 111M-13B)")
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    storage.write_figure(fig, path, dpi=110)


def write_outputs(runs: list[Run], flops: str, out_dir: Path, with_reference: bool) -> dict[str, Path] | None:
    """downstream.md and downstream.png when some run has been evaluated; None when none has."""
    points = collect(runs, flops)
    if not points:
        return None
    paths = {"downstream_report": out_dir / "downstream.md", "downstream_plot": out_dir / "downstream.png"}
    storage.write_atomically(paths["downstream_report"], report_md(points, flops))
    plot(points, flops, paths["downstream_plot"], with_reference)
    return paths
