"""Checkpoints: Orbax saves of the whole train state, exact resume, damage detection, resharding on restore.

Layout: ``<workdir>/checkpoints/<N>/{state, meta}`` where N counts completed train steps, so a run resumed
from N continues with ``dataset.train_batch(N)``. `state` is the whole TrainState (step, params, optimizer
state). `meta` (JSON) holds the resolved config, every tensor's shape and dtype, a per-tensor fingerprint of
the state and the loop's counters. Nothing else is needed for the next step: the model has no stochastic
layers and the data order is a pure function of (seed, step).

A checkpoint is *complete* when Orbax committed it (its ``commit_success.txt`` marker is present and the
directory carries no temporary suffix), its files read back, and the restored state matches the fingerprint
taken when it was saved. Restoring walks back from the newest step past damaged ones, warning for each and
moving it to ``<workdir>/checkpoints_rejected/``: a checkpoint is never deleted for being unreadable.
Restoring goes through the target shardings, so a checkpoint written on one mesh restores onto another.

On an object store (gs://, s3://) there is no rename: a step is written in place and Orbax writes its commit
marker last (Orbax's commit-file mode), so the marker alone says the step is complete; a killed save leaves
a step without it, which is moved aside like any damaged one.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging as std_logging
import math
import os
import shutil
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from cgpt_jax import run_dir, storage
from cgpt_jax.config import field_errors
from cgpt_jax.errors import InputError
from cgpt_jax.parallel import distributed
from cgpt_jax.train import orbax_s3
from cgpt_jax.train.state import TrainState
from cgpt_jax.treepath import path_name

CHECKPOINT_DIR = run_dir.CHECKPOINTS
REJECTED_DIR = "checkpoints_rejected"
COMMIT_MARKER = "commit_success.txt"  # Orbax writes it last, just before the step becomes visible
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax writes a step under this name, then renames it


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or no checkpoint in a directory could be read back."""


class _Damaged(Exception):
    """This step's files are incomplete or corrupted; the caller moves on to an older step."""


def validate_checkpoint_config(ck: ml_collections.ConfigDict) -> None:
    """Raise InputError naming each bad `config.checkpoint` field and its fix (the rules: config.RULES)."""
    errors = field_errors(ck, "checkpoint")
    if errors:
        raise InputError("invalid config:", *errors)


# --- what a checkpoint records about the state -----------------------------------------------------

def _bits_as_u32(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _bit_sums(tree: Any) -> Any:
    # Integer sums wrap modulo 2^32 and do not depend on the order of addition, so the fingerprint is the
    # same on every mesh; any change to a single value changes it.
    return jax.tree.map(lambda x: jnp.sum(_bits_as_u32(x), dtype=jnp.uint32), tree)


def fingerprint(tree: Any) -> dict[str, int]:
    """Per-tensor sum of the raw bits, by tensor name."""
    sums = jax.device_get(_bit_sums(tree))
    return {path_name(path): int(value) for path, value in jax.tree_util.tree_leaves_with_path(sums)}


def tensor_specs(tree: Any, prefix: str = "") -> dict[str, list]:
    """[shape, dtype] of every tensor, by name (JSON-ready)."""
    return {prefix + path_name(path): [list(x.shape), str(x.dtype)]
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _spec_differences(saved: dict[str, list], expected: dict[str, list]) -> list[str]:
    def describe(spec: list | None) -> str:
        return "<absent>" if spec is None else f"{tuple(spec[0])} {spec[1]}"

    diffs = [f"  {name}: checkpoint {describe(saved.get(name))}, this run {describe(expected.get(name))}"
             for name in sorted(set(saved) | set(expected)) if saved.get(name) != expected.get(name)]
    return diffs[:12] + ([f"  ... and {len(diffs) - 12} more"] if len(diffs) > 12 else [])


def _abstract(tree: Any) -> Any:
    """Shapes, dtypes and the *target* shardings of `tree`: what a restore onto this mesh needs."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _json_number(x: float) -> float | None:
    return x if math.isfinite(x) else None  # strict JSON has no NaN


# --- storage checks ----------------------------------------------------------------------------------

def state_nbytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def check_storage(workdir: str, checkpoint_nbytes: int) -> None:
    """Fail before any write when the workdir cannot be created or written, or cannot hold a checkpoint
    (a bucket was probed by storage.check_workdir, and has no free-space limit to check)."""
    if storage.is_remote(workdir):
        return
    existing = os.path.abspath(workdir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"workdir {workdir}: {existing} is a file, not a directory; choose another --workdir.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"workdir {workdir}: {existing} is not writable; choose another --workdir.")
    free = shutil.disk_usage(existing).free
    if free < checkpoint_nbytes:
        raise ValueError(f"workdir {workdir}: one checkpoint needs about {checkpoint_nbytes / 2**20:.1f} MiB but "
                         f"only {free / 2**20:.1f} MiB are free on {existing}; free some space or choose another "
                         f"--workdir.")


def _probe_write(directory: storage.Path) -> None:
    probe = directory / f".write-probe-{jax.process_index()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text("probe")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints to {directory}: {e}") from e


# --- the directory of committed steps -----------------------------------------------------------------

def scan(directory: str) -> tuple[list[int], list[tuple[str, str]]]:
    """The committed steps in `directory`, and (path, reason) for each entry left by an unfinished save."""
    steps, unfinished = [], []
    root = storage.path(directory)
    if not root.is_dir():
        return steps, unfinished
    for entry in root.iterdir():
        name, path = entry.name, str(entry)
        if _TMP_SUFFIX in name:
            unfinished.append((path, "an unfinished save (Orbax temporary directory)"))
        elif name.isdigit() and entry.is_dir():
            if (entry / COMMIT_MARKER).exists():
                steps.append(int(name))
            else:
                unfinished.append((path, f"incomplete: it has no commit marker {COMMIT_MARKER}"))
    return sorted(steps), unfinished


class RunCheckpoints:
    """This run's checkpoints in <workdir>/checkpoints, written and pruned by an Orbax CheckpointManager."""

    def __init__(self, workdir: str, ck: ml_collections.ConfigDict):
        self.directory = str(storage.path(workdir, CHECKPOINT_DIR))
        self.rejected_directory = str(storage.path(workdir, REJECTED_DIR))
        if jax.process_index() == 0:
            storage.path(self.directory).mkdir(parents=True, exist_ok=True)
            _probe_write(storage.path(self.directory))
            for path, reason in scan(self.directory)[1]:
                if _TMP_SUFFIX in storage.path(path).name:
                    logging.warning("skipping checkpoint %s: %s; Orbax removes it", path, reason)
                else:
                    self._reject(path, reason)
        distributed.barrier("cgpt_jax:checkpoints_scanned")
        keep: list[Any] = [ocp.checkpoint_managers.LatestN(ck.keep_last)]
        if ck.keep_every:
            keep.append(ocp.checkpoint_managers.EveryNSteps(ck.keep_every))
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=ck.async_save,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
            cleanup_tmp_directories=True, atomicity_options=orbax_atomicity(self.directory))
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._in_flight: int | None = None  # step of a save whose outcome has not been checked yet

    def _reject(self, path: str, reason: str) -> None:
        """Move a damaged step out of the way (so Orbax neither lists nor prunes it), keeping its files."""
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        target = str(storage.path(self.rejected_directory, f"{storage.path(path).name}-{stamp}"))
        storage.move(path, target)
        logging.warning("skipping checkpoint %s: %s; moved it to %s", path, reason, target)

    def _last_good(self) -> str:
        step = self.latest_step()
        return (f"the last complete checkpoint is {self.directory}/{step}" if step is not None
                else f"there is no complete checkpoint in {self.directory}")

    # restore -----------------------------------------------------------------------------------------

    def restore_latest(self, like: TrainState) -> tuple[TrainState, dict] | None:
        """The newest complete checkpoint restored onto the shardings of `like`, with its meta; None when
        there is none. Damaged steps are skipped (moved aside, with a warning); a checkpoint written for
        another model or optimizer is an error, not damage."""
        expected = tensor_specs(like)
        rejected = []
        for step in reversed(self.manager.all_steps()):
            path = str(storage.path(self.directory, str(step)))
            try:
                meta = _read_meta(self.manager, step)
                differences = _spec_differences(meta["tensors"], expected)
                if differences:
                    raise ValueError(f"checkpoint {path} holds another model or optimizer state than this "
                                     f"config builds:\n" + "\n".join(differences) +
                                     "\nUse another --workdir, or --overwrite to move the old run aside.")
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(_abstract(like))))["state"]
                except Exception as e:  # Orbax/TensorStore raise many types for unreadable files
                    raise _Damaged(f"its files cannot be read back ({type(e).__name__}: {str(e)[:300]})") from e
                if fingerprint(restored) != meta["fingerprint"]:
                    raise _Damaged("its contents differ from the fingerprint taken when it was saved")
                return restored, meta
            except _Damaged as e:
                rejected.append(path)
                if jax.process_index() == 0:
                    self._reject(path, str(e))
                distributed.barrier(f"cgpt_jax:rejected_{step}")
                self.manager.reload()
        if rejected:
            raise CheckpointError(
                f"none of the checkpoints in {self.directory} could be restored ({', '.join(rejected)} were "
                f"damaged and moved to {self.rejected_directory}). Inspect them; to start this run from "
                f"scratch, move {self.directory} away and re-run.")
        return None

    # save --------------------------------------------------------------------------------------------

    def save(self, step: int, state: TrainState, info: dict, *, wait: bool) -> None:
        """Save `state` (after `step` completed steps) with `info` in its meta; `wait` blocks until it is
        committed. An asynchronous save's outcome is checked by `check_background` or the next save."""
        self.wait()
        meta = {**{k: _json_number(v) if isinstance(v, float) else v for k, v in info.items()},
                "step": step, "tensors": tensor_specs(state), "fingerprint": fingerprint(state),
                "saved_at": datetime.datetime.now().isoformat(timespec="seconds")}
        try:
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                            meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:
            raise CheckpointError(f"saving checkpoint {self.directory}/{step} failed: {type(e).__name__}: {e}. "
                                  f"Nothing was deleted; {self._last_good()}.") from e
        self._in_flight = step
        if wait:
            self.wait()

    def wait(self) -> None:
        """Wait for the in-flight save, if any; raise CheckpointError if it failed."""
        if self._in_flight is None:
            return
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise CheckpointError(f"the background save of checkpoint {self.directory}/{step} failed: "
                                  f"{type(e).__name__}: {e}. Nothing was deleted; {self._last_good()}.") from e

    def check_background(self) -> None:
        """Raise CheckpointError if the in-flight asynchronous save has finished with an error."""
        if self._in_flight is not None and not self.manager.is_saving_in_progress():
            self.wait()  # returns at once

    def set_aside_after(self, step: int) -> None:
        """Move committed steps newer than `step` to checkpoints_rejected/ (kept): on a resume from `step`,
        DIR/best/ may hold a state of the lost steps after it, which the resumed run will evaluate again."""
        for newer in [s for s in scan(self.directory)[0] if s > step]:
            if jax.process_index() == 0:
                self._reject(str(storage.path(self.directory, str(newer))), f"newer than the resumed step {step}")
            distributed.barrier(f"cgpt_jax:set_aside_{newer}")
        self.manager.reload()

    def latest_step(self) -> int | None:
        """The newest committed step on disk (the manager's own list drops steps it is about to prune)."""
        steps = scan(self.directory)[0]
        return steps[-1] if steps else None

    def close(self) -> None:
        """Wait for an in-flight save, then release Orbax's threads; raises if that save failed."""
        try:
            self.wait()
        finally:
            self.manager.close()


def orbax_atomicity(directory: str) -> ocp.options.AtomicityOptions | None:
    """On a filesystem, Orbax's own choice (a finished step is renamed into place); on an object store, which
    has no rename, a step is written in place with its commit marker last. Orbax cannot write arrays to
    s3:// by itself (orbax_s3)."""
    if not storage.is_remote(directory):
        return None
    if storage.scheme(directory) == "s3":
        orbax_s3.enable()
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:
        raise _Damaged(f"its meta cannot be read ({type(e).__name__}: {str(e)[:300]})") from e
    if not isinstance(meta, dict) or not {"tensors", "fingerprint", "step"} <= set(meta):
        raise _Damaged("its meta lacks the tensor list or the fingerprint")
    return meta


# --- another run's parameters (--init_from) -------------------------------------------------------------

class _NotReadOnlyNotice(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
    """A manager that only reads another run's checkpoints. The options read_only implies are given, and
    Orbax's notice that the directory is read-only is dropped: both would only tell the user what we asked."""
    options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False,
                                           atomicity_options=orbax_atomicity(directory))
    notice = _NotReadOnlyNotice()
    absl_logger = std_logging.getLogger("absl")  # Orbax logs through absl
    absl_logger.addFilter(notice)
    try:
        return ocp.CheckpointManager(directory, options=options)
    finally:
        absl_logger.removeFilter(notice)


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Another run's newest complete checkpoint whose parameters fit this model."""
    directory: str
    step: int
    fingerprint: dict[str, int]  # of its params, by name
    flag: str  # the command-line flag that named it, for messages


def find_init_source(run_dir: str, params_specs: dict[str, list], flag: str = "--init_from") -> InitSource:
    """Check `--init_from` (or the caller's `flag`) before anything is written: the directory exists, holds a
    complete checkpoint, and its parameters have this model's names, shapes and dtypes. `params_specs` come
    from `tensor_specs(params, prefix="params/")`."""
    storage.check_scheme(run_dir, flag)
    if not storage.path(run_dir).is_dir():
        raise ValueError(f"{flag}={run_dir}: no such directory.")
    directory = str(storage.path(run_dir, CHECKPOINT_DIR))  # absolute: Orbax takes absolute paths only
    if not storage.path(directory).is_dir():
        directory = str(storage.path(run_dir))  # a checkpoints directory given directly
    steps, _ = scan(directory)
    if not steps:
        raise ValueError(f"{flag}={run_dir}: no complete checkpoint in {directory}; point it at a run "
                         f"directory that holds {CHECKPOINT_DIR}/<step>/{COMMIT_MARKER}.")
    manager = _read_only_manager(directory)
    try:
        for step in reversed(steps):
            try:
                meta = _read_meta(manager, step)
            except _Damaged as e:
                logging.warning("%s: skipping checkpoint %s/%d: %s", flag, directory, step, e)
                continue
            saved = {k: v for k, v in meta["tensors"].items() if k.startswith("params/")}
            differences = _spec_differences(saved, params_specs)
            if differences:
                raise ValueError(f"{flag}={run_dir}: the parameters in {directory}/{step} do not fit this "
                                 f"model:\n" + "\n".join(differences) +
                                 "\nInitialise from a run with the same model shape.")
            return InitSource(directory, step, {k: v for k, v in meta["fingerprint"].items()
                                                if k.startswith("params/")}, flag)
    finally:
        manager.close()
    raise ValueError(f"{flag}={run_dir}: no checkpoint in {directory} has a readable meta.")


def load_init_params(source: InitSource, like_params: Any) -> Any:
    """The source checkpoint's parameters, restored onto the shardings of `like_params`."""
    item = {"params": _abstract(like_params)}
    manager = _read_only_manager(source.directory)
    try:
        restored = manager.restore(source.step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
    except Exception as e:
        raise CheckpointError(f"{source.flag}: cannot read the parameters of {source.directory}/{source.step}: "
                              f"{type(e).__name__}: {str(e)[:300]}") from e
    finally:
        manager.close()
    params = restored["state"]["params"]
    if {"params/" + k: v for k, v in fingerprint(params).items()} != source.fingerprint:
        raise CheckpointError(f"{source.flag}: the parameters in {source.directory}/{source.step} differ from "
                              f"the fingerprint taken when they were saved; the checkpoint is damaged.")
    return params
