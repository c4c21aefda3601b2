"""Experiment files: load `file.py:arg`, expand its sweep, apply a run's overrides, build its command.

An experiment file (big_vision style) defines `get_config(arg) -> ConfigDict` for one run and
`sweep(arg) -> list[dict]`, each dict ``{'name': run_name, 'model.d_model': 64, ...}`` naming the
dotted fields that run overrides; the optional key ``'config_arg'`` replaces `arg` for that run (the
Cerebras-GPT sweep picks its sizes with ``'config_arg': 'size=111m'``). The training CLI reads the
same file through absl's `config_flags`, so a run is launched as
``--config=file.py:arg --config.model.d_model=64 ...``.

The trainer is `python -m cgpt_jax.train` unless the file names another module with a constant
``TRAINER = "cgpt_jax.finetune"`` (any module with the same `--config`/`--workdir` command line and the
run directory's contract, cgpt_jax/run_dir.py).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

from cgpt_jax import experiment_files

# Run names become directory names and SLURM job names.
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Types that absl's config_flags can parse back from one command-line value.
_FLAG_TYPES = (bool, int, float, str, tuple)
DEFAULT_TRAINER = "cgpt_jax.train"


_RESERVED_KEYS = ("name", "config_arg")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    name: str
    overrides: dict[str, Any]  # dotted config field -> value
    config_arg: str | None = None  # get_config's argument for this run; None: the experiment's own


@dataclasses.dataclass(frozen=True)
class Experiment:
    path: Path  # as given (relative paths stay relative, so launch scripts can run from another checkout)
    arg: str | None
    module: ModuleType

    @property
    def spec(self) -> str:
        """The sweep's `--config` value; it names the sweep in sweep.json and in the analysis."""
        return str(self.path) if self.arg is None else f"{self.path}:{self.arg}"

    def base_config(self, arg: str | None = None) -> ml_collections.ConfigDict:
        """get_config(arg), or get_config(experiment arg) when arg is None."""
        arg = self.arg if arg is None else arg
        # Same call convention as config_flags: no argument when the spec has no ':'.
        config = self.module.get_config() if arg is None else self.module.get_config(arg)
        if not isinstance(config, ml_collections.ConfigDict):
            raise TypeError(f"{self.path}: get_config({arg!r}) returned {type(config).__name__}, "
                            f"not an ml_collections.ConfigDict")
        return config

    @property
    def trainer(self) -> str:
        """The module that trains a run (`python -m TRAINER`): the file's TRAINER, else cgpt_jax.train."""
        return getattr(self.module, "TRAINER", DEFAULT_TRAINER)

    def trainer_argv(self, python: str = sys.executable) -> tuple[str, ...]:
        return (python, "-m", self.trainer)

    def run_arg(self, run: RunSpec) -> str | None:
        return self.arg if run.config_arg is None else run.config_arg

    def run_spec(self, run: RunSpec) -> str:
        """The `--config` value that trains `run` (before its overrides)."""
        arg = self.run_arg(run)
        return str(self.path) if arg is None else f"{self.path}:{arg}"

    def run_config(self, run: RunSpec) -> ml_collections.ConfigDict:
        return apply_overrides(self.base_config(self.run_arg(run)), run)

    def config_record(self, run: RunSpec) -> dict:
        """The config `run` trains with, as plain JSON data (what sweep_run.json keeps)."""
        return json.loads(self.run_config(run).to_json_best_effort(sort_keys=True))

    def runs(self) -> list[RunSpec]:
        """The sweep's runs, checked: unique valid names, and overrides that exist in the config and
        survive the trip through the command line."""
        entries = self.module.sweep() if self.arg is None else self.module.sweep(self.arg)
        if not isinstance(entries, (list, tuple)) or not entries:
            raise ValueError(f"{self.spec}: sweep() must return a non-empty list of dicts, got {entries!r}")
        runs: list[RunSpec] = []
        seen: set[str] = set()
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "name" not in entry:
                raise ValueError(f"{self.spec}: sweep() entry {i} must be a dict with a 'name' key, got {entry!r}")
            name, config_arg = entry["name"], entry.get("config_arg")
            if not isinstance(name, str) or not _RUN_NAME.match(name):
                raise ValueError(f"{self.spec}: run name {name!r} must match {_RUN_NAME.pattern} "
                                 f"(it becomes a directory and job name)")
            if name in seen:
                raise ValueError(f"{self.spec}: run name {name!r} appears twice in sweep(); names must be unique")
            if config_arg is not None and not isinstance(config_arg, str):
                raise ValueError(f"{self.spec}: run {name!r} has config_arg={config_arg!r}; it must be a string "
                                 f"like 'size=111m'")
            seen.add(name)
            run = RunSpec(name=name, overrides={k: v for k, v in entry.items() if k not in _RESERVED_KEYS},
                          config_arg=config_arg)
            self.run_config(run)  # fail here, before anything is launched
            override_flags(run)
            runs.append(run)
        return runs


def parse_spec(spec: str) -> tuple[Path, str | None]:
    """'experiments/x.py:size=111m' -> (Path('experiments/x.py'), 'size=111m'); no ':' -> arg None."""
    path, sep, arg = spec.partition(".py:")
    if sep:
        return Path(path + ".py"), arg
    if not spec.endswith(".py"):
        raise ValueError(f"--config={spec!r}: expected an experiment file like experiments/cpu_ladder.py "
                         f"or experiments/cpu_ladder.py:ARG")
    return Path(spec), None


def load_experiment(spec: str) -> Experiment:
    path, arg = parse_spec(spec)
    # The trainers get `path` as given and resolve it by the same rule (cgpt_jax/experiment_files.py).
    file = experiment_files.resolve(path)
    module_name = "cgpt_experiment_" + re.sub(r"\W", "_", path.stem)
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    for fn in ("get_config", "sweep"):
        if not callable(getattr(module, fn, None)):
            raise TypeError(f"{path} defines no {fn}(arg); an experiment file for cgpt_jax.sweep needs "
                            f"get_config(arg) -> ConfigDict and sweep(arg) -> list[dict]")
    trainer = getattr(module, "TRAINER", DEFAULT_TRAINER)
    if not isinstance(trainer, str) or importlib.util.find_spec(trainer) is None:
        raise ValueError(f"{path}: TRAINER={trainer!r} is not an importable module; name the trainer's module, "
                         f"e.g. TRAINER = 'cgpt_jax.finetune'")
    return Experiment(path=path, arg=arg, module=module)


def apply_overrides(base: ml_collections.ConfigDict, run: RunSpec) -> ml_collections.ConfigDict:
    """A copy of `base` with the run's dotted overrides set; unknown fields and wrong types are errors."""
    config = base.copy_and_resolve_references()
    for key, value in run.overrides.items():
        parts = key.split(".")
        node = config
        for depth, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                where = ".".join(parts[:depth]) or "the config"
                raise ValueError(f"run {run.name!r} overrides {key!r}, but {where} has no field {part!r}; "
                                 f"its fields are {known}")
            if depth < len(parts) - 1:
                node = node[part]
        try:
            setattr(node, parts[-1], value)
        except TypeError as e:
            raise TypeError(f"run {run.name!r}: cannot set {key}={value!r}: {e}") from None
    return config


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "True" if value else "False"
    if isinstance(value, (int, float, tuple)):
        return repr(value)
    return value


def override_flags(run: RunSpec) -> list[str]:
    """The run's overrides as config_flags arguments: ['--config.model.d_model=64', ...]."""
    flags = []
    for key, value in run.overrides.items():
        if not isinstance(value, _FLAG_TYPES):
            raise TypeError(f"run {run.name!r}: override {key}={value!r} is a {type(value).__name__}; "
                            f"the command line carries only {[t.__name__ for t in _FLAG_TYPES]}")
        flags.append(f"--config.{key}={_flag_value(value)}")
    return flags


def train_command(experiment: Experiment, run: RunSpec, run_workdir: str,
                  train_argv: tuple[str, ...] | None = None) -> list[str]:
    """The argv that trains one run: the experiment's trainer (`train_argv` replaces it: a cluster's
    interpreter, or a test double)."""
    argv = experiment.trainer_argv() if train_argv is None else train_argv
    return [*argv, f"--config={experiment.run_spec(run)}", *override_flags(run), f"--workdir={run_workdir}"]
