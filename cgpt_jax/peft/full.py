"""`full`: every parameter trains (the default; nothing is added or frozen)."""
from __future__ import annotations

from typing import ClassVar

from cgpt_jax.peft import register
from cgpt_jax.peft.base import Method


@register("full")
class Full(Method):
    slots: ClassVar[tuple[str, ...]] = ("base",)
    trains_base: ClassVar[bool] = True
