"""`head_only`: a linear probe. The backbone is frozen and only the task head ('score') trains, so it
needs a model with a head (classification fine-tuning, not language modelling)."""
from __future__ import annotations

from typing import ClassVar

from cgpt_jax.peft import register
from cgpt_jax.peft.base import Method


@register("head_only")
class HeadOnly(Method):
    slots: ClassVar[tuple[str, ...]] = ("base",)
