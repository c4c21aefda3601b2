"""The one exception type for refused input: what the user gave cannot be used, and the message says why.

Raise `InputError` (or a subclass) for a bad config value, flag, path or file, before any work starts; its
message is one or more lines of the form `<what> — <fix>`. Every command (cgpt_jax/cli.py) prints such an
error as `error: <line>` lines without a traceback and exits with status 2; any other exception is an
internal error and keeps its traceback (exit 1). It subclasses ValueError so that callers that catch
ValueError keep working.
"""
from __future__ import annotations


class InputError(ValueError):
    """Refused input; `problems` are the message's lines, each `<what> — <fix>`."""

    def __init__(self, *problems: str):
        super().__init__("\n".join(problems))
        self.problems = [line for p in problems for line in p.splitlines()]
