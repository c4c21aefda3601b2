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

import difflib
import importlib.resources
import re
from pathlib import Path

import ml_collections
from absl import flags
from ml_collections import config_flags

from cgpt_jax.errors import InputError

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
        self.loaded = None  # the config the experiment file returned, once it has

    def parse(self, argument: str):
        self.loaded = None
        try:
            spec = resolve_spec(argument)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None  # absl reports a ValueError as a bad flag value, without a trace
        try:
            self.loaded = self._inner.parse(spec)
        except ValueError as e:
            # ml_collections re-raises the file's ValueError as the same type with its traceback as text;
            # the original is the context. Refused input (InputError) is reported as its message alone.
            if isinstance(e.__context__, InputError):
                raise e.__context__ from None
            raise RuntimeError(f"experiment file {spec.partition(':')[0]} failed; only "
                               f"cgpt_jax.errors.InputError is refused input") from e.__context__
        return self.loaded

    def flag_type(self) -> str:
        return self._inner.flag_type()


def unknown_fields(config: ml_collections.ConfigDict, paths: list[str], flag_name: str) -> list[str]:
    """A `<what> — <fix>` line for each dotted path that names no field of `config`, with the closest names."""
    problems = []
    for path in paths:
        holder, walked = config, flag_name
        for key in path.split("."):
            if isinstance(holder, ml_collections.ConfigDict) and key in holder:
                holder, walked = holder[key], f"{walked}.{key}"
                continue
            fields = list(holder.keys()) if isinstance(holder, ml_collections.ConfigDict) else []
            close = difflib.get_close_matches(key, fields, n=3)
            hint = f"did you mean {' or '.join(f'--{walked}.{c}' for c in close)}?" if close else \
                f"{walked} has the fields {', '.join(fields)}" if fields else f"{walked} is not a section"
            problems.append(f"--{flag_name}.{path}: {walked} has no field {key!r} — {hint}")
            break
    return problems


def define_config_file(name: str, help_string: str) -> flags.FlagHolder:
    """`config_flags.DEFINE_config_file` (locked config, `--NAME.FIELD=VALUE` overrides) whose file
    is found by the rule above, and whose unknown override fields are refused as bad flags."""
    holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
    flag = flags.FLAGS[name]
    parser = flag.parser = _ResolvingParser(flag.parser)
    parse_with_overrides = flag._parse

    def parse(argument: str):
        try:
            return parse_with_overrides(argument)
        except (AttributeError, KeyError) as e:
            # After the file loaded, ml_collections raises these for an override path that names no field;
            # before, they come from the experiment file itself (a bug: its traceback stays).
            if parser.loaded is None:
                raise
            # ml_collections reads the overrides from this argv too (sys.argv, --flagfile expanded).
            paths = [m.group(1) for arg in flag._GetArgv()
                     if (m := re.match(rf"-{{1,2}}(?:no)?{re.escape(name)}\.([^=]+)", arg))]
            problems = unknown_fields(parser.loaded, paths, name)
            if not problems:
                raise
            raise flags.IllegalFlagValueError("\n".join(problems)) from e

    flag._parse = parse
    return holder
