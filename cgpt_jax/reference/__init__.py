"""The published Cerebras-GPT facts, shipped with the package: `load()` returns cerebras_gpt.json.

The file gathers what the Cerebras-GPT paper (arXiv 2304.03208) and the Cerebras modelzoo configs
publish: the seven shapes and training recipes (`models`), muP settings (`mup`), Eq. 1
(`scaling_laws`), the FLOP convention, Pile test losses and the downstream zero-shot / five-shot
tables. Every value names its source in `sources` (URLs and commits); `schema_note` says how to read
the fields and `errata` where the primary sources disagree. It is package data, so an installed
cgpt_jax reads it without the repository.
"""
from __future__ import annotations

import functools
import importlib.resources
import json

FILENAME = "cerebras_gpt.json"


@functools.cache
def _text() -> str:
    # Read once per process: the model tests look up sizes many times.
    return importlib.resources.files(__name__).joinpath(FILENAME).read_text(encoding="utf-8")


def load() -> dict:
    """The reference as a fresh dict (callers may mutate their copy)."""
    return json.loads(_text())
