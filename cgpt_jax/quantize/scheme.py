"""Quantization schemes by name: `int8` (one scale per output channel), `int4` (one scale per group of 32
input elements), with an optional `:group=G` on either (`int4:group=128`, `int8:group=64`)."""
from __future__ import annotations

import dataclasses
import re

from cgpt_jax.errors import InputError

BITS = {"int8": 8, "int4": 4}
DEFAULT_GROUP = {"int8": None, "int4": 32}  # None: the whole input dimension, one scale per output channel
_SPEC = re.compile(r"(?P<kind>[a-z0-9]+)(:group=(?P<group>[^,]*))?")


@dataclasses.dataclass(frozen=True)
class Scheme:
    """Symmetric weight-only quantization to `bits`-bit integers in [-qmax, qmax], one float32 scale
    (absmax / qmax) per output channel and per `group` consecutive input elements (None: all of them)."""

    bits: int
    group: int | None

    @property
    def kind(self) -> str:
        return f"int{self.bits}"

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1  # symmetric: int4 uses [-7, 7], int8 [-127, 127]

    @property
    def name(self) -> str:
        return self.kind if self.group == DEFAULT_GROUP[self.kind] else f"{self.kind}:group={self.group}"

    def __str__(self) -> str:
        return self.name


def parse(spec: str) -> Scheme:
    """`int8`, `int4`, `int4:group=128`, ... → Scheme; anything else is an InputError."""
    match = _SPEC.fullmatch(spec.strip())
    if match is None or match["kind"] not in BITS:
        raise InputError(f"quantization scheme {spec!r} is unknown — use one of int8, int4, int4:group=G "
                         f"(G a positive integer that divides every weight's input dimension)")
    kind, group = match["kind"], match["group"]
    if group is None:
        return Scheme(BITS[kind], DEFAULT_GROUP[kind])
    if not group.isdigit() or int(group) < 1:
        raise InputError(f"quantization scheme {spec!r}: group={group!r} is not a positive integer — "
                         f"write e.g. {kind}:group=32")
    return Scheme(BITS[kind], int(group))
