"""The step-indexed loader: pure function of (seed, step), exact epochs, process slicing, sharded assembly."""
from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cgpt_jax.data.assemble import even_rows
from cgpt_jax.data.loader import DataError, PackedTokens, permute

SEQ_LEN, BATCH = 8, 16


def mesh_sharding() -> NamedSharding:
    """Rows over ('data', 'fsdp'), replicated over 'tensor': 8 devices (tests/conftest.py) as 2x2x2."""
    devices = np.array(jax.devices())
    mesh = Mesh(devices.reshape(2, 2, 2) if devices.size == 8 else devices.reshape(-1, 1, 1),
                ("data", "fsdp", "tensor"))
    return NamedSharding(mesh, P(("data", "fsdp"), None))


def make_loader(n_train: int = 4001, n_val: int = 600, *, seed: int = 0, prefetch: int = 0,
                n_eval_batches: int = 2, sharding: NamedSharding | None = None) -> PackedTokens:
    # Token value == position, so a window's tokens say exactly where it came from.
    return PackedTokens(np.arange(n_train, dtype=np.uint32), np.arange(n_val, dtype=np.uint32) + 10**6,
                        vocab_size=2**31 - 1, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=seed,
                        sharding=sharding or mesh_sharding(), n_eval_batches=n_eval_batches, prefetch=prefetch)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 100, 1000, 4097])
def test_permute_is_a_bijection_that_depends_on_seed_and_epoch(n):
    index = np.arange(n)
    perms = [permute(index, n, seed, epoch) for seed, epoch in [(0, 0), (0, 1), (1, 0)]]
    for perm in perms:
        assert np.array_equal(np.sort(perm), index)
    if n >= 64:
        assert not np.array_equal(perms[0], perms[1]) and not np.array_equal(perms[0], perms[2])


def test_no_token_lost_or_duplicated_across_an_epoch():
    loader = make_loader()
    windows = loader.windows_per_epoch  # (4001 - 1) // 8 = 500: 31.25 steps, so epochs end mid-step
    assert windows == 500
    rows = np.concatenate([loader.host_batch(step, 0, 1) for step in range(2 * windows // BATCH + 1)])
    epochs = [rows[:windows], rows[windows:2 * windows]]
    for epoch_rows in epochs:
        assert np.all(np.diff(epoch_rows, axis=1) == 1) and np.all(epoch_rows[:, 0] % SEQ_LEN == 0)
        assert np.array_equal(np.sort(epoch_rows[:, :-1].ravel()), np.arange(windows * SEQ_LEN))
        assert np.array_equal(np.sort(epoch_rows[:, 1:].ravel()), np.arange(1, windows * SEQ_LEN + 1))
    assert not np.array_equal(epochs[0][:, 0], epochs[1][:, 0])  # each epoch has its own order


def test_batches_are_a_pure_function_of_seed_and_step():
    a, b = make_loader(prefetch=2), make_loader()
    forward = [np.asarray(a.train_batch(s)["inputs"]) for s in range(5)]
    backward = [np.asarray(b.train_batch(s)["inputs"]) for s in reversed(range(5))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert np.array_equal(x, y)
    # A jump (a resume) gives the same batch as reaching the step in order.
    assert np.array_equal(np.asarray(a.train_batch(3)["inputs"]), forward[3])
    assert not np.array_equal(np.asarray(make_loader(seed=1).train_batch(0)["inputs"]), forward[0])


@pytest.mark.parametrize("process_count", [2, 4])
def test_simulated_processes_assemble_the_same_global_batch(process_count):
    loader = make_loader()
    for step in (0, 7, 31, 32, 1000):  # steps 31/32 straddle the first epoch boundary
        whole = loader.host_batch(step, 0, 1)
        parts = [loader.host_batch(step, p, process_count) for p in range(process_count)]
        assert np.array_equal(np.concatenate(parts), whole)
        # A run resumed on another process count reads the same rows: the split is only by row.
        lo, hi = even_rows(BATCH, 1, process_count)
        assert np.array_equal(parts[1], whole[lo:hi])


def test_global_batch_is_sharded_and_equals_the_host_rows():
    sharding = mesh_sharding()
    loader = make_loader(sharding=sharding)
    batch = loader.train_batch(5)
    rows = loader.host_batch(5, 0, 1)
    for array in batch.values():
        assert array.shape == (BATCH, SEQ_LEN) and array.dtype == np.int32
        assert array.sharding == sharding
    assert np.array_equal(np.asarray(batch["inputs"]), rows[:, :-1])
    assert np.array_equal(np.asarray(batch["targets"]), rows[:, 1:])
    # Each device holds its own rows.
    for shard in batch["inputs"].addressable_shards:
        assert np.array_equal(np.asarray(shard.data), rows[shard.index[0], :-1])


def test_eval_batches_are_fixed_validation_windows():
    loader = make_loader()
    first = [np.asarray(b["inputs"]) for b in loader.eval_batches()]
    again = [np.asarray(b["inputs"]) for b in loader.eval_batches()]
    assert len(first) == 2
    for x, y in zip(first, again, strict=True):
        assert np.array_equal(x, y)
    assert np.array_equal(first[0][:, 0], 10**6 + np.arange(BATCH) * SEQ_LEN)  # in order, from the start


def test_a_corpus_too_small_for_one_batch_is_an_error():
    with pytest.raises(DataError, match="fewer than one global batch"):
        make_loader(n_train=BATCH * SEQ_LEN)  # one token short of BATCH windows
    make_loader(n_train=BATCH * SEQ_LEN + 1)
    with pytest.raises(DataError, match="validation split"):
        make_loader(n_val=BATCH * SEQ_LEN)
    make_loader(n_val=10, n_eval_batches=0)


def test_a_small_validation_split_evaluates_fewer_batches_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        loader = make_loader(n_val=BATCH * SEQ_LEN * 2 + 1, n_eval_batches=5)
    assert loader.n_eval_batches == 2 and len(list(loader.eval_batches())) == 2
    assert "not the 5 asked for" in caplog.text


def test_synthetic_source_assembles_its_rows_on_the_mesh():
    from cgpt_jax.data.synthetic import SyntheticMarkov

    sharding = mesh_sharding()
    source = SyntheticMarkov(vocab_size=32, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0, sharding=sharding,
                             n_eval_batches=1)
    batch = source.train_batch(2)
    rows = np.stack([source._row(2, r) for r in range(BATCH)])
    assert batch["inputs"].sharding == sharding
    assert np.array_equal(np.asarray(batch["inputs"]), rows[:, :-1])
    assert np.array_equal(np.asarray(batch["targets"]), rows[:, 1:])
