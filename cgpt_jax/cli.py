"""What every `python -m cgpt_jax.…` command shares: absl flags, one logging rule, and user paths resolved.

Logging rule: cgpt_jax's own messages (absl `logging.info` in cgpt_jax's files, or Python loggers named
`cgpt_jax.…`) are shown from INFO up; everyone else's (Orbax, JAX, TFDS, …) from WARNING up, so that a
command's output is not buried under library chatter. Giving absl's `--verbosity` (`-v`) applies that
level to every message instead: `--verbosity=0` shows all INFO lines, `-v=1` DEBUG, `--verbosity=-1`
warnings only. Messages go to stderr; stdout carries only each command's result.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

from absl import app, flags
from absl import logging as absl_logging

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


def run(main: Callable[[list[str]], None]) -> None:
    """`absl.app.run(main)` with `setup_logging()` first: the entry point of every cgpt_jax command."""

    def main_with_logging(argv: list[str]) -> None:
        setup_logging()
        main(argv)

    app.run(main_with_logging)


def resolve_path(path: str) -> str:
    """A path the user gave (flag or argument) as an absolute path: `~` expanded, relative to the current
    directory. Orbax refuses relative paths, and absolute ones stay valid in subprocesses and messages."""
    return os.path.abspath(os.path.expanduser(path))


def resolve_optional_path(path: str | None) -> str | None:
    """`resolve_path`, keeping an unset path flag (None or '') unset."""
    return resolve_path(path) if path else path
