"""Where `--config=FILE.py[:ARG]` finds its experiment file, in a checkout and after `pip install`.

The rule, the same for every command (train, sweep, plan, bench, and the trainers a sweep starts):
  1. FILE.py that exists (relative to the current directory, or absolute) is used as given;
  2. otherwise a bare `NAME.py` or `experiments/NAME.py` is the experiment NAME shipped with cgpt_jax:
     the repository's experiments/ folder, installed as the package `cgpt_jax.experiments`;
  3. anything else is an error that lists the shipped experiments.
So `--config=experiments/cpu_ladder.py` means the same run from the repository root and, after
`pip install .`, from any directory.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

from absl import flags
from ml_collections import config_flags

SHIPPED_FOLDER = "experiments"  # the folder name a command line may put before a shipped NAME.py


def shipped_dir() -> Path:
    """The installed experiments (a plain folder: ml_collections and the sweep load them by file path)."""
    return Path(str(importlib.resources.files("cgpt_jax.experiments")))


def shipped() -> list[str]:
    return sorted(p.name for p in shipped_dir().glob("*.py") if p.name != "__init__.py")


def resolve(path: Path) -> Path:
    """The experiment file `path` names, by the rule above; FileNotFoundError when there is none."""
    if path.is_file():
        return path
    if not path.is_absolute() and path.suffix == ".py" and path.parent in (Path("."), Path(SHIPPED_FOLDER)):
        candidate = shipped_dir() / path.name
        if path.name != "__init__.py" and candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"experiment file {path} not found (relative to {Path.cwd()}); the experiments shipped with cgpt_jax, "
        f"usable from any directory as {SHIPPED_FOLDER}/NAME.py[:ARG]: {', '.join(shipped())}")


def resolve_spec(spec: str) -> str:
    """'FILE.py:ARG' with FILE.py resolved; split at the first ':' as ml_collections' config_flags does."""
    path, sep, arg = spec.partition(":")
    return f"{resolve(Path(path))}{sep}{arg}"


class _ResolvingParser(flags.ArgumentParser):
    """Wraps ml_collections' config-file parser: resolves the file by the rule above, then loads it."""

    def __init__(self, inner: flags.ArgumentParser):
        self._inner = inner

    def parse(self, argument: str):
        try:
            spec = resolve_spec(argument)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None  # absl reports a ValueError as a bad flag value, without a trace
        return self._inner.parse(spec)

    def flag_type(self) -> str:
        return self._inner.flag_type()


def define_config_file(name: str, help_string: str) -> flags.FlagHolder:
    """`config_flags.DEFINE_config_file` (locked config, `--NAME.FIELD=VALUE` overrides) whose file
    is found by the rule above."""
    holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
    flag = flags.FLAGS[name]
    flag.parser = _ResolvingParser(flag.parser)
    return holder
