"""Where metrics go: DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events (cgpt_jax/run_dir.py)."""
from __future__ import annotations

import json
from typing import Any

import jax

from cgpt_jax import run_dir


class MetricWriter:
    """Writes from process 0 only; every other process gets a writer that does nothing."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            # Imported here: tensorboardX imports torch when it is installed, a cost every process would pay.
            from tensorboardX import SummaryWriter

            self.jsonl = open(run_dir.path(workdir, run_dir.METRICS), "a")
            self.tensorboard = SummaryWriter(run_dir.path(workdir, run_dir.TENSORBOARD))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if key != "step":
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
