"""Checkpointing and fault tolerance: exact resume, preemption, damage, resharding, non-finite steps, chaos.

Crashes and bad batches are injected in-process by wrapping the dataset the loop builds; kills and signals
go to `python -m cgpt_jax.train` subprocesses.
"""
import errno
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.experimental.compilation_cache import compilation_cache
from orbax.checkpoint._src.path import atomicity

from cgpt_jax.tools.chaos import run_chaos
from cgpt_jax.train import checkpoint, loop
from cgpt_jax.train.checkpoint import CheckpointError
from cgpt_jax.train.faults import NonFiniteError
from cgpt_jax.train.loop import train_and_evaluate
from tests.helpers import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPARED = ("loss", "grad_norm", "lr", "eval_loss")
# A model of a few thousand parameters for the subprocess tests (one CPU device each).
TINY_CLI = ("--config=experiments/cerebras_gpt.py:size=tiny", "--config.model.d_model=32",
            "--config.model.n_layers=1", "--config.model.n_heads=2", "--config.model.d_ff=64",
            "--config.model.max_seq_len=32", "--config.train.seq_len=32", "--config.train.global_batch_size=8",
            "--config.data.synthetic_vocab_size=64", "--config.train.warmup_steps=5", "--config.train.log_every=1",
            "--config.train.steps=60", "--config.train.eval_every=20", "--config.checkpoint.every_steps=4")
CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                 "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="module", autouse=True)
def subprocess_env(tmp_path_factory):
    """These tests compile the same tiny model many times, in this process and in subprocesses: share a
    persistent compilation cache (~10x faster here). Yields the environment for `python -m` subprocesses."""
    previous = {name: getattr(jax.config, name) for name in CACHE_OPTIONS}
    values = dict(zip(CACHE_OPTIONS, (str(tmp_path_factory.mktemp("jax_cache")), 0, 0)))
    for name, value in values.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    yield {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO,
           **{name.upper(): str(value) for name, value in values.items()}}
    for name, value in previous.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


class Crash(Exception):
    """Stands in for a process dying at a given step."""


class FaultyDataset:
    """The loop's dataset, crashing at step `crash_at` and with out-of-vocabulary tokens at `poison` steps
    (the embedding lookup then yields NaN, so those steps have a non-finite loss and gradients)."""

    def __init__(self, inner, crash_at: int | None, poison: tuple[int, ...]):
        self.inner, self.crash_at, self.poison = inner, crash_at, poison
        self.vocab_size = inner.vocab_size

    def train_batch(self, step: int):
        if step == self.crash_at:
            raise Crash(f"crash at step {step}")
        batch = self.inner.train_batch(step)
        if step in self.poison:
            inputs = np.asarray(batch["inputs"]).copy()
            inputs[0, 0] = 10_000
            batch = {**batch, "inputs": jax.device_put(inputs, batch["inputs"].sharding)}
        return batch

    def eval_batches(self):
        return self.inner.eval_batches()

    def describe(self):
        return self.inner.describe()


def faults(monkeypatch, crash_at: int | None = None, poison: tuple[int, ...] = ()) -> None:
    real = loop.make_dataset
    monkeypatch.setattr(loop, "make_dataset", lambda *a, **k: FaultyDataset(real(*a, **k), crash_at, poison))


def config(every: int = 2, **mesh):
    """8 steps of the tiny model, a metrics line per step; one schedule for all, so compiles are shared."""
    c = tiny_config(**mesh)
    c.train.steps, c.train.log_every, c.train.eval_every = 8, 1, 4
    c.checkpoint.every_steps = every
    return c


def train(c, workdir, n_devices: int = 1, **kwargs) -> dict:
    return train_and_evaluate(c, str(workdir), devices=jax.devices()[:n_devices], show_progress=False, **kwargs)


def curve(workdir) -> list[tuple]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [(r["step"], {k: r[k] for k in COMPARED if k in r}) for r in records]


def steps_on_disk(workdir) -> list[int]:
    return sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())


def test_resume_after_crashes_is_bit_exact_with_each_step_logged_once(tmp_path, monkeypatch):
    c = config(every=2)
    c.checkpoint.keep_last, c.checkpoint.keep_every = 1, 4
    reference = train(c, tmp_path / "reference")
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        faults(m, crash_at=5)
        with pytest.raises(Crash):
            train(c, run)
    assert steps_on_disk(run) == [4]  # 2 was pruned (keep_last=1) only after 4 was committed
    with monkeypatch.context() as m:
        faults(m, crash_at=7)  # resumes at 4; steps 4-6 are logged again, once
        with pytest.raises(Crash):
            train(c, run)
    summary = train(c, run)
    assert curve(run) == curve(tmp_path / "reference")
    assert [step for step, values in curve(run) if "loss" in values] == list(range(8))
    assert summary["final_train_loss"] == reference["final_train_loss"]
    assert summary["final_eval_loss"] == reference["final_eval_loss"]
    assert steps_on_disk(run) == [4, 8]  # keep_every=4 kept 4; keep_last=1 kept the newest
    meta = json.loads((run / "checkpoints" / "8" / "meta" / "metadata").read_text())
    assert meta["step"] == 8 and meta["config"]["model"]["d_model"] == 32


def test_sigterm_finishes_the_step_saves_and_exits_zero(tmp_path, subprocess_env):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "cgpt_jax.train", *TINY_CLI, f"--workdir={workdir}"]
    proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text()) and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was signalled"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    [message] = stdout.strip().splitlines()
    stopped_at = curve(workdir)[-1][0] + 1  # the stopped step was logged before the save
    assert message.startswith(f"stopped by SIGTERM after step {stopped_at - 1}: saved checkpoint")
    assert stopped_at in steps_on_disk(workdir) and stopped_at < 60
    assert "re-run the same command to resume" in message
    assert (workdir / "checkpoints" / str(stopped_at) / checkpoint.COMMIT_MARKER).exists()
    assert not (workdir / "summary.json").exists()


def _damage(step_dir, how: str) -> None:
    data_files = [os.path.join(root, name) for root, _, names in os.walk(step_dir / "state")
                  for name in names if os.path.basename(root) == "d"]  # TensorStore's array data
    largest = max(data_files, key=os.path.getsize)
    if how == "truncate":
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
    elif how == "silent":
        # Data that reads back cleanly but is not what was saved. (A flipped bit in the compressed array
        # files fails decoding or not depending on the values, so the test changes the other side: the
        # fingerprint recorded beside the data.)
        meta_file = step_dir / "meta" / "metadata"
        meta = json.loads(meta_file.read_text())
        name = next(iter(meta["fingerprint"]))
        meta["fingerprint"][name] += 1
        meta_file.write_text(json.dumps(meta))
    else:
        os.remove(step_dir / checkpoint.COMMIT_MARKER)


# Orbax leaves the other reads of a truncated checkpoint unawaited when one fails: noise, not an error.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_checkpoints_are_skipped_with_a_warning_and_kept(tmp_path, monkeypatch, caplog):
    c = config(every=1)
    c.checkpoint.keep_last = 4
    train(c, tmp_path / "reference")
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        faults(m, crash_at=7)
        with pytest.raises(Crash):
            train(c, run)
    assert steps_on_disk(run) == [4, 5, 6, 7]
    _damage(run / "checkpoints" / "7", "truncate")
    _damage(run / "checkpoints" / "6", "silent")
    _damage(run / "checkpoints" / "5", "no commit marker")
    os.makedirs(run / "checkpoints" / "8.orbax-checkpoint-tmp-1234" / "state")  # a save killed mid-write
    caplog.set_level("WARNING")
    train(c, run)
    warnings = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    for name, reason in (("7", "cannot be read back"), ("6", "differ from the fingerprint"),
                         ("5", "no commit marker"), ("8.orbax-checkpoint-tmp-1234", "unfinished save")):
        assert f"skipping checkpoint {run / 'checkpoints' / name}: " in warnings and reason in warnings
    assert curve(run) == curve(tmp_path / "reference")  # resumed from 4, exactly
    assert len(os.listdir(run / "checkpoints_rejected")) == 3  # moved aside, not deleted


def test_checkpoint_from_one_mesh_restores_onto_another(tmp_path, monkeypatch):
    reference = train(config(), tmp_path / "reference", n_devices=8)  # data=8
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        faults(m, crash_at=3)
        with pytest.raises(Crash):
            train(config(), run, n_devices=8)
    summary = train(config(fsdp=2, tensor=2), run, n_devices=4)  # half the devices, sharded params; resumes at 2
    got, want = curve(run), curve(tmp_path / "reference")
    assert [step for step, _ in got] == [step for step, _ in want]
    for (_, a), (_, b) in zip(got, want):
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=key)
    assert summary["final_eval_loss"] == pytest.approx(reference["final_eval_loss"], rel=2e-5)


def test_nonfinite_step_halts_without_saving_then_skip_mode_goes_on(tmp_path, monkeypatch):
    c = config(every=2)
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        faults(m, poison=(5,))
        with pytest.raises(NonFiniteError) as error:
            train(c, run)
    report = str(error.value)
    assert "non-finite training step 5: loss=nan" in report and "dataset.train_batch(5)" in report
    assert "token ids outside [0, 64) in rows [0]" in report
    assert "non-finite gradients: blocks/attn/out_bias" in report and "(16 in all)" in report  # all of them
    assert "params: none" in report  # the rejected update left the parameters finite
    assert f"the last checkpoint is {run / 'checkpoints' / '4'}" in report
    assert steps_on_disk(run) == [2, 4]  # no checkpoint after the bad step

    c.checkpoint.nan_policy = "skip"  # a restart may change it; resumes from 4
    with monkeypatch.context() as m:
        faults(m, poison=(5,))
        summary = train(c, run)
    assert summary["skipped_steps"] == 1 and np.isfinite(summary["final_train_loss"])
    losses = {step: values["loss"] for step, values in curve(run) if "loss" in values}
    assert sorted(losses) == list(range(8)) and np.isnan(losses[5])
    assert all(np.isfinite(v) for step, v in losses.items() if step != 5)


def test_skip_mode_still_halts_on_a_run_of_bad_steps(tmp_path, monkeypatch):
    c = config(every=0)
    c.checkpoint.nan_policy, c.checkpoint.max_consecutive_skips = "skip", 1
    faults(monkeypatch, poison=(1, 2))
    with pytest.raises(NonFiniteError, match="more than checkpoint.max_consecutive_skips=1"):
        train(c, tmp_path / "run")


def test_failed_background_save_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def disk_full_at_4(self):
        if self.get_final().name == "4":
            raise OSError(errno.ENOSPC, "No space left on device")
        await finalize(self)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full_at_4)
    c = config(every=2)
    c.checkpoint.keep_last = 1  # saving 4 would prune 2, but only once 4 is committed
    run = tmp_path / "run"
    with pytest.raises(CheckpointError, match=r"(?s)background save of checkpoint .*4 failed.*No space left"
                                              r".*Nothing was deleted; the last complete checkpoint is .*2"):
        train(c, run)
    assert steps_on_disk(run) == [2]
    assert curve(run)[-1][0] < 6  # stopped before the next save


def test_init_from_loads_params_with_a_fresh_optimizer_and_own_checkpoint_wins(tmp_path, monkeypatch, caplog):
    c = config(every=2)
    train(c, tmp_path / "source")
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        faults(m, crash_at=3)
        with pytest.raises(Crash):
            train(c, run, init_from=str(tmp_path / "source"))
    first, scratch_first = curve(run)[0][1], curve(tmp_path / "source")[0][1]
    assert first["lr"] == 0.0  # a fresh schedule at step 0
    assert first["loss"] < scratch_first["loss"] - 0.05  # the source's trained parameters
    caplog.set_level("INFO")
    summary = train(c, run, init_from=str(tmp_path / "source"))
    assert "ignoring --init_from: the workdir's own checkpoint takes precedence" in caplog.text
    assert [step for step, values in curve(run) if "loss" in values] == list(range(8))
    assert curve(run)[0][1] == first and np.isfinite(summary["final_train_loss"])


def test_bad_init_from_fails_before_anything_is_written(tmp_path):
    c = config(every=4)
    train(c, tmp_path / "source")
    (tmp_path / "empty" / "checkpoints" / "5").mkdir(parents=True)  # no commit marker
    wider = config()
    wider.model.d_model = 48
    mismatch = r"(?s)do not fit this model.*params/ln_f/bias: checkpoint \(32,\) float32, this run \(48,\)"
    for init_from, cfg, message in ((tmp_path / "nowhere", c, "no such directory"),
                                    (tmp_path / "empty", c, "no complete checkpoint"),
                                    (tmp_path / "source", wider, mismatch)):
        with pytest.raises(ValueError, match=message):
            train(cfg, tmp_path / "run", init_from=str(init_from))
        assert not (tmp_path / "run").exists()


def test_storage_and_config_problems_fail_before_anything_is_written(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        train(config(), tmp_path / "a_file" / "run")
    bad = config()
    bad.checkpoint.nan_policy, bad.checkpoint.keep_last = "explode", 0
    with pytest.raises(ValueError, match=r"(?s)checkpoint.keep_last=0.*checkpoint.nan_policy='explode'"):
        train(bad, tmp_path / "run")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: SimpleNamespace(total=0, used=0, free=1000))
    with pytest.raises(ValueError, match="MiB are free"):
        train(config(), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_chaos_script_resumes_exactly_after_sigkills(tmp_path, subprocess_env):
    overrides = [flag for flag in TINY_CLI if not flag.startswith("--config=")]
    result = run_chaos(2, str(tmp_path), config=f"{REPO}/experiments/cerebras_gpt.py:size=tiny", overrides=overrides,
                       seed=1, env=subprocess_env, log=lambda line: None)
    assert result.lines[-1] == "2/2 resumes exact", result.lines
