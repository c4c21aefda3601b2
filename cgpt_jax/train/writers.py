"""Where metrics go: DIR/metrics.jsonl (one JSON object per logged step) and TensorBoard events (cgpt_jax/run_dir.py).

On a local disk each record is appended and flushed at once. An object store (gs://, s3://) has no append:
there the file's lines are kept in memory and the whole object is rewritten, in one upload, at most every
`REMOTE_FLUSH_S` seconds, before every checkpoint save and at the end. A kill therefore loses at most the
records since the last flush, never one before the newest checkpoint (which a resume would not log again),
and never leaves a torn line. TensorBoard events are written by tensorboardX's own gs:// / s3:// writers,
which upload their buffer the same way at the same interval.
"""
from __future__ import annotations

import json
import time
from typing import Any

import jax

from cgpt_jax import run_dir, storage

# One rewrite of the whole file per interval: a PUT costs a request and the file's size, not a line's.
REMOTE_FLUSH_S = 30.0


class MetricWriter:
    """Writes from process 0 only; every other process gets a writer that does nothing. Opening it drops
    the records of steps from `first_step` on (a resumed run logs them again)."""

    def __init__(self, workdir: str, first_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        # Imported here: tensorboardX imports torch when it is installed, a cost every process would pay.
        from tensorboardX import SummaryWriter

        self.remote = storage.is_remote(workdir)
        self.path = run_dir.path(workdir, run_dir.METRICS)
        self.lines = run_dir.drop_metrics_from(workdir, first_step)
        self.unflushed = False
        self.last_flush = time.monotonic()
        self.jsonl = None if self.remote else open(self.path, "a")
        self.tensorboard = SummaryWriter(run_dir.path(workdir, run_dir.TENSORBOARD),
                                         flush_secs=int(REMOTE_FLUSH_S) if self.remote else 120)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        line = json.dumps(record) + "\n"
        if self.remote:
            self.lines.append(line)
            self.unflushed = True
            if time.monotonic() - self.last_flush >= REMOTE_FLUSH_S:
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
