"""What every `python -m cgpt_jax.…` command shares: absl flags, one logging rule, and user paths resolved.

Logging rule: cgpt_jax's own messages (absl `logging.info` in cgpt_jax's files, or Python loggers named
`cgpt_jax.…`) are shown from INFO up; everyone else's (Orbax, JAX, TFDS, …) from WARNING up, so that a
command's output is not buried under library chatter. Giving absl's `--verbosity` (`-v`) applies that
level to every message instead: `--verbosity=0` shows all INFO lines, `-v=1` DEBUG, `--verbosity=-1`
warnings only. Messages go to stderr; stdout carries only each command's result.

Error rule: refused input (`cgpt_jax.errors.InputError` and its subclasses, absl's `app.UsageError`, a flag
absl or ml_collections cannot parse, an unknown config field) prints `error: <what> — <fix>` lines to
stderr without a traceback and exits with status 2, before any work starts. Any other exception is an
internal error: its traceback is printed and the status is 1. `--debug` (or CGPT_JAX_DEBUG=1, which also
covers flag-parsing errors) shows the traceback of refused input too. docs/errors.md lists the catalogue.
"""
from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags
from absl import logging as absl_logging

from cgpt_jax import storage
from cgpt_jax.errors import InputError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _OwnInfoOthersWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # absl records carry the calling file as pathname and 'absl' as name: both are checked.
        ours = record.name.startswith("cgpt_jax") or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)
        return ours or record.levelno >= logging.WARNING


def setup_logging() -> None:
    """Apply the rule above to absl's handler, which app.run puts on the root logger at INFO when
    --verbosity is not given. Call once per process, after app.run parsed the flags."""
    if not flags.FLAGS["verbosity"].present:  # else the user chose one level for everything
        absl_logging.get_absl_handler().addFilter(_OwnInfoOthersWarnings())


REFUSED_EXIT_STATUS = 2
DEBUG_ENV = "CGPT_JAX_DEBUG"
_DEBUG = flags.DEFINE_bool("debug", False, f"Show the traceback of refused input too (also: {DEBUG_ENV}=1).")


def _debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or (flags.FLAGS.is_parsed() and _DEBUG.value)


def refuse(problems: list[str], error: BaseException) -> NoReturn:
    """Print `error: <line>` for each problem and exit with status 2 (with the traceback when debugging)."""
    if _debugging():
        traceback.print_exception(error)
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    sys.stderr.flush()
    sys.exit(REFUSED_EXIT_STATUS)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, refusing a bad flag (or config override) in the error style above."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        # absl wraps a parser's ValueError (an InputError's lines included) in its own message.
        refuse([*str(e).splitlines(), "see --helpshort for the flags"], e)


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with `setup_logging()` first and the error rule above: the entry point of
    every cgpt_jax command."""

    def main_with_logging(argv: list[str]) -> None:
        setup_logging()
        try:
            main(argv)
        except InputError as e:
            refuse(e.problems, e)
        except app.UsageError as e:
            refuse([f"{e} — see --helpshort for the usage"], e)

    app.run(main_with_logging, flags_parser=_parse_flags)


def resolve_path(path: str) -> str:
    """A path the user gave (flag or argument) as an absolute path: `~` expanded, relative to the current
    directory. Orbax refuses relative paths, and absolute ones stay valid in subprocesses and messages.
    A gs:// or s3:// URL stays as given; a scheme no installed filesystem serves is refused."""
    return str(storage.path(path))


def resolve_optional_path(path: str | None) -> str | None:
    """`resolve_path`, keeping an unset path flag (None or '') unset."""
    return resolve_path(path) if path else path
