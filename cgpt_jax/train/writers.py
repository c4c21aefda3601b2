"""Where metrics go: DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events (cgpt_jax/run_dir.py).

On a local disk each record is appended and flushed at once. An object store (gs://, s3://) has no append:
there the file's lines are kept in memory and the whole object is rewritten, in one upload, at most every
`remote_flush_s` seconds (config.checkpoint.remote_metrics_flush_s), before every checkpoint save and at the
end. A kill therefore loses at most the records since the last flush, never one before the newest checkpoint
(which a resume would not log again), and never leaves a torn line. TensorBoard events are written by tensorboardX's own gs:// / s3:// writers,
which upload their buffer the same way at the same interval.
"""
from __future__ import annotations

import json
import sys
import time
from typing import Any

import jax

from cgpt_jax import run_dir, storage


def _tensorboardx_summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it is installed,
    only to accept torch tensors (we pass floats), and that import costs seconds at every run's start."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter
        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """Writes from process 0 only; every other process gets a writer that does nothing. Opening it drops
    the records of steps from `first_step` on (a resumed run logs them again)."""

    def __init__(self, workdir: str, first_step: int, remote_flush_s: float):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        SummaryWriter = _tensorboardx_summary_writer()
        self.remote = storage.is_remote(workdir)
        # One rewrite of the whole file per interval: a PUT costs a request and the file's size, not a line's.
        self.remote_flush_s = remote_flush_s
        self.path = run_dir.path(workdir, run_dir.METRICS)
        self.lines = run_dir.drop_metrics_from(workdir, first_step)
        self.unflushed = False
        self.last_flush = time.monotonic()
        self.jsonl = None if self.remote else open(self.path, "a")
        self.tensorboard = SummaryWriter(run_dir.path(workdir, run_dir.TENSORBOARD),
                                         flush_secs=max(1, int(remote_flush_s)) if self.remote else 120)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self.remote:
            self.lines.append(line)
            self.unflushed = True
            if time.monotonic() - self.last_flush >= self.remote_flush_s:
                self.flush()
        else:
            self.jsonl.write(line)
            self.jsonl.flush()
        for key, value in record.items():
            if key != "step":
                self.tensorboard.add_scalar(key, value, step)

    def flush(self) -> None:
        """Make every record written so far durable (call before a checkpoint is saved)."""
        if not self.enabled:
            return
        if self.remote and self.unflushed:
            storage.write_atomically(self.path, "".join(self.lines))
            self.unflushed = False
            self.last_flush = time.monotonic()
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if self.jsonl is not None:
                self.jsonl.close()
            self.tensorboard.close()
