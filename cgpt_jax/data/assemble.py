"""Global batches as sharded `jax.Array`s, each process materialising only the rows its devices hold."""
from __future__ import annotations

import jax
import numpy as np

Batch = dict[str, jax.Array]  # {'inputs': int32 [B, L], 'targets': int32 [B, L]}, global arrays


def even_rows(global_batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """Rows [lo, hi) of process `process_index` when the batch is split evenly over processes in order."""
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} does not split over {process_count} processes; "
                         "use a batch size divisible by the process count")
    per_process = global_batch_size // process_count
    return process_index * per_process, (process_index + 1) * per_process


def process_rows(sharding: jax.sharding.Sharding, global_batch_size: int, seq_len: int) -> tuple[int, int]:
    """Rows [lo, hi): the span of batch rows held by this process's devices under `sharding`."""
    spans = [range(*index[0].indices(global_batch_size))
             for index in sharding.addressable_devices_indices_map((global_batch_size, seq_len)).values()]
    return min(r.start for r in spans), max(r.stop for r in spans)


def global_batch(windows_NxW: np.ndarray, lo: int, global_batch_size: int,
                 sharding: jax.sharding.Sharding) -> Batch:
    """Inputs and targets from windows of seq_len+1 tokens that are rows lo.. of the global batch.

    `windows_NxW` must cover `process_rows(sharding, ...)`; each device's shard is cut from it.
    """
    shape = (global_batch_size, windows_NxW.shape[1] - 1)

    def shard(index: tuple[slice, slice], first_column: int) -> np.ndarray:
        rows = range(*index[0].indices(global_batch_size))
        return windows_NxW[rows.start - lo:rows.stop - lo, first_column:first_column + shape[1]][:, index[1]]

    return {
        "inputs": jax.make_array_from_callback(shape, sharding, lambda index: shard(index, 0)),
        "targets": jax.make_array_from_callback(shape, sharding, lambda index: shard(index, 1)),
    }
