"""Running a sweep: locally, one subprocess per run, or as one launch script per run for a cluster.

Layout of a sweep workdir DIR:
  DIR/sweep.json            status table of the sweep (experiment spec, run statuses)
  DIR/<name>/sweep_run.json which experiment, config and overrides made this run (written before it starts)
  DIR/<name>/summary.json   written last by the trainer: the run finished
  DIR/<name>/failure.json   written by the local runner when the trainer exited without finishing
  DIR/<name>/train.log/.err the trainer's stdout and stderr, appended across attempts

Each run is a subprocess, so a crash (or an OOM kill) is recorded as a failure and the sweep goes on.
Re-running the sweep skips finished runs and re-launches the rest with the same command, which the
trainer resumes from its own checkpoint.

DIR may be a bucket (gs://, s3://; cgpt_jax/storage.py). An object store has no append, so there a run's
train.log/.err are written to local temporary files while it runs and appended to the bucket's copies
(one upload each) when it exits; launch scripts, which the cluster's submit command runs, need a local DIR.
"""
from __future__ import annotations

import datetime
import importlib.resources
import json
import os
import re
import shlex
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm

from cgpt_jax import storage
from cgpt_jax.config import run_differences
from cgpt_jax.errors import InputError
from cgpt_jax.run_dir import SUMMARY, finished_summary
from cgpt_jax.scaling.experiment import Experiment, RunSpec, train_command

SWEEP_TABLE = "sweep.json"
RUN_RECORD = "sweep_run.json"
FAILURE = "failure.json"
STDOUT_LOG = "train.log"
STDERR_LOG = "train.err"
# Launch-script templates are package data, so an installed cgpt_jax writes them without the repository.
TEMPLATES = importlib.resources.files("cgpt_jax.scaling") / "templates"
_STDERR_TAIL_LINES = 60

# Per launcher: its template and the options --launcher_opts may set, with their defaults.
LAUNCHERS: dict[str, dict[str, Any]] = {
    "tpu": {
        "template": "sweep_tpu.sh.tmpl",
        "script": "launch_tpu.sh",
        "opts": {"repo": "~/cgpt_jax", "python": "python3", "workdir": ""},
    },
    "slurm": {
        "template": "sweep_slurm.sbatch.tmpl",
        "script": "launch_slurm.sbatch",
        "opts": {"repo": "", "python": "python", "workdir": "", "nodes": "1", "gpus_per_node": "8",
                 "time": "24:00:00", "partition": "", "account": ""},
    },
}


def read_json(path: storage.Path) -> dict:
    return json.loads(storage.path(path).read_text())


def write_json(path: storage.Path, data: dict) -> None:
    # Atomically, so an interrupted sweep never leaves half a status file.
    storage.write_atomically(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def is_finished(run_path: storage.Path) -> bool:
    return finished_summary(str(run_path)) is not None


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _jsonable(overrides: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(overrides))  # tuples become lists, as they will be when read back


def open_sweep(experiment: Experiment, runs: list[RunSpec], workdir: storage.Path, launcher: str) -> dict:
    """Check that `workdir` holds nothing of another sweep or config, record each run's provenance, and
    return the sweep table. Fails before any run starts, naming the directory that conflicts."""
    workdir.mkdir(parents=True, exist_ok=True)
    table_path = workdir / SWEEP_TABLE
    table = read_json(table_path) if table_path.exists() else {"runs": {}}
    if table.get("experiment", experiment.spec) != experiment.spec:
        raise ValueError(f"{workdir} holds the sweep {table['experiment']!r}, not {experiment.spec!r}; runs of "
                         f"different sweeps must not share one fit. Use a new --workdir.")
    table.update(experiment=experiment.spec, launcher=launcher)

    for run in runs:
        run_dir = workdir / run.name
        record = {"experiment": experiment.spec, "name": run.name, "config_arg": experiment.run_arg(run),
                  "overrides": _jsonable(run.overrides), "config": experiment.config_record(run)}
        record_path = run_dir / RUN_RECORD
        if record_path.exists():
            old = read_json(record_path)
            diffs = run_differences(old.get("config") or {}, record["config"])
            if diffs:
                raise ValueError(
                    f"{run_dir} was trained with another config than the sweep now defines for {run.name!r}:\n"
                    + "\n".join(diffs[:20]) + f"\nUse a new --workdir, or delete {run_dir} to retrain it.")
        elif run_dir.exists() and any(run_dir.iterdir()):
            raise ValueError(f"{run_dir} exists and has files but no {RUN_RECORD}: it was not made by this "
                             f"sweep. Use a new --workdir, or move that directory away.")
        run_dir.mkdir(exist_ok=True)
        write_json(record_path, record)
        entry = table["runs"].setdefault(run.name, {})
        entry["overrides"] = record["overrides"]
        entry["config_arg"] = record["config_arg"]
        entry["status"] = "finished" if is_finished(run_dir) else entry.get("status", "pending")
    write_json(table_path, table)
    return table


def _tail(path: str, offset: int, lines: int) -> str:
    with open(path, errors="replace") as f:
        f.seek(offset)
        return "".join(f.read().splitlines(keepends=True)[-lines:])


class _Logs:
    """A run's stdout and stderr files for one attempt: the run directory's own train.log/.err, appended to
    as the trainer writes; in a bucket, local temporary files appended to the bucket's copies on `close`."""

    def __init__(self, run_dir: storage.Path):
        self.targets = (run_dir / STDOUT_LOG, run_dir / STDERR_LOG)
        self.remote = storage.is_remote(run_dir)
        if self.remote:
            self.local = tuple(tempfile.mkstemp(prefix=f"cgpt_jax-{name.name}-")[1] for name in self.targets)
        else:
            self.local = tuple(str(target) for target in self.targets)
        err = self.local[1]
        self.err_offset = os.path.getsize(err) if os.path.exists(err) and not self.remote else 0
        self.files: tuple[IO, IO] = tuple(open(path, "a") for path in self.local)

    def close(self) -> None:
        """Close the files, keeping the end of this attempt's stderr in `stderr_tail`."""
        for f in self.files:
            f.close()
        self.stderr_tail = _tail(self.local[1], self.err_offset, _STDERR_TAIL_LINES)
        if self.remote:
            for path, target in zip(self.local, self.targets):
                with open(path, "rb") as f:
                    new = f.read()
                old = target.read_bytes() if target.exists() else b""
                storage.write_atomically(target, old + new)
                os.remove(path)


def run_local(experiment: Experiment, runs: list[RunSpec], workdir: storage.Path, *,
              train_argv: tuple[str, ...] | None = None, skip_failed: bool = False,
              progress: bool = True) -> dict[str, str]:
    """Run every unfinished run one after another; returns {name: status} with status one of
    'finished', 'failed' (see its failure.json) or 'skipped_failed'."""
    table = open_sweep(experiment, runs, workdir, "local")
    statuses: dict[str, str] = {}
    bar = tqdm(runs, desc="sweep", unit="run", disable=not progress)
    for run in bar:
        bar.set_postfix_str(run.name)
        run_dir = workdir / run.name
        entry = table["runs"][run.name]
        if is_finished(run_dir):
            statuses[run.name] = entry["status"] = "finished"
            bar.write(f"{run.name}: finished already, skipped")
            continue
        if skip_failed and (run_dir / FAILURE).exists():
            statuses[run.name] = "skipped_failed"
            bar.write(f"{run.name}: failed before, skipped (--skip_failed)")
            continue
        (run_dir / FAILURE).unlink(missing_ok=True)
        command = train_command(experiment, run, str(run_dir), train_argv)
        entry.update(status="running", command=command, started=_now())
        write_json(workdir / SWEEP_TABLE, table)

        logs = _Logs(run_dir)
        start = time.monotonic()
        try:
            process = subprocess.Popen(command, stdout=logs.files[0], stderr=logs.files[1])
            try:
                returncode = process.wait()
            except KeyboardInterrupt:
                # The trainer got the same Ctrl-C and is saving a checkpoint; let it finish (a second
                # Ctrl-C kills it), so that the next sweep resumes this run instead of restarting it.
                bar.write(f"{run.name}: interrupted; waiting for the trainer to save (Ctrl-C again to kill it)")
                try:
                    process.wait()
                except KeyboardInterrupt:
                    process.kill()
                    process.wait()
                entry["status"] = "interrupted"
                write_json(workdir / SWEEP_TABLE, table)
                raise
        finally:
            logs.close()
        wall = time.monotonic() - start
        entry.update(wall_time_s=round(wall, 1), returncode=returncode)

        if returncode == 0 and is_finished(run_dir):
            statuses[run.name] = entry["status"] = "finished"
            bar.write(f"{run.name}: finished in {wall:.0f} s")
        else:
            reason = (f"exited with code {returncode}" if returncode != 0
                      else f"exited with code 0 but wrote no finished {SUMMARY}")
            write_json(run_dir / FAILURE, {
                "returncode": returncode, "reason": reason, "command": command, "wall_time_s": round(wall, 1),
                "time": _now(), "stderr_tail": logs.stderr_tail})
            statuses[run.name] = entry["status"] = "failed"
            bar.write(f"{run.name}: FAILED ({reason}); see {run_dir / FAILURE} and {run_dir / STDERR_LOG}")
        write_json(workdir / SWEEP_TABLE, table)
    return statuses


def parse_launcher_opts(launcher: str, text: str) -> dict[str, str]:
    """'nodes=2,time=4:00:00' -> the launcher's defaults updated with these values."""
    known = LAUNCHERS[launcher]["opts"]
    opts = dict(known)
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            raise ValueError(f"--launcher_opts item {item!r}: expected KEY=VALUE with KEY one of "
                             f"{sorted(known)} for --launcher={launcher}")
        opts[key] = value
    return opts


def fill_template(text: str, values: dict[str, str]) -> str:
    """Replace {{key}} placeholders; the shell's own ${VAR} syntax passes through untouched."""
    def value(match: re.Match) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template placeholder {{{{{key}}}}} has no value; known: {sorted(values)}")
        return values[key]

    return re.sub(r"\{\{(\w+)\}\}", value, text)


def write_launch_scripts(experiment: Experiment, runs: list[RunSpec], workdir: Path, launcher: str,
                         opts: dict[str, str]) -> list[Path]:
    """One script per unfinished run plus DIR/submit_all.sh; returns the per-run scripts."""
    if storage.is_remote(workdir):
        raise InputError(f"--workdir={workdir}: launch scripts are run by the cluster's submit command, so they "
                         f"are written to a local --workdir — give the bucket the runs write to as "
                         f"--launcher_opts=workdir={workdir}")
    workdir = Path(workdir)
    spec = LAUNCHERS[launcher]
    template = (TEMPLATES / spec["template"]).read_text()
    table = open_sweep(experiment, runs, workdir, launcher)
    repo = opts["repo"] or str(Path.cwd())
    remote_root = (opts["workdir"] or str(workdir.resolve())).rstrip("/")
    scripts = []
    for run in runs:
        run_dir = workdir / run.name
        if is_finished(run_dir):
            continue
        argv = train_command(experiment, run, f"{remote_root}/{run.name}", experiment.trainer_argv(opts["python"]))
        command = shlex.join(argv)
        sbatch_extra = "\n".join(f"#SBATCH --{key}={opts[key]}" for key in ("partition", "account")
                                 if opts.get(key))
        values = {**opts, "name": run.name, "experiment": experiment.spec, "repo": repo,
                  "train_command": command, "log_dir": str(run_dir.resolve()), "sbatch_extra": sbatch_extra,
                  "remote_command": shlex.quote(f"cd {repo} && {command}")}
        script = run_dir / spec["script"]
        script.write_text(fill_template(template, values))
        script.chmod(0o755)
        table["runs"][run.name].update(status="script_written", command=argv)
        scripts.append(script)
    submit = "sbatch" if launcher == "slurm" else "bash"
    lines = ["#!/usr/bin/env bash",
             f"# Submit the unfinished runs of {experiment.spec} ({launcher}); written by cgpt_jax.sweep.",
             "set -u"]
    # A TPU pod runs one job at a time, so its scripts run one after another; SLURM queues them.
    lines += [f"{submit} {shlex.quote(str(s.resolve()))} || echo 'failed: {s.parent.name}'" for s in scripts]
    submit_all = workdir / "submit_all.sh"
    submit_all.write_text("\n".join(lines) + "\n")
    submit_all.chmod(0o755)
    write_json(workdir / SWEEP_TABLE, table)
    return scripts
