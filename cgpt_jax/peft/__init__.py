"""Parameter-efficient fine-tuning methods as plug-ins.

A method is one module in this folder that subclasses `base.Method` and decorates itself with
`@register("name")`; modules here are imported automatically, so adding a file is the whole change. The
config selects methods with call syntax, ``config.finetune.method = "full"`` (the default),
``"head_only"``, ``"lora(rank=8, alpha=16, targets='qkv|out|up|down')"``, ``"adapter(bottleneck=64)"``,
``"prompt(tokens=20)"``, ``"prefix(tokens=10)"``; methods that change different
places of the model (their `slots`) combine with ``+``. `build` parses the string, with errors that list
the registered methods. `training.py` turns a parsed method into what `train/setup.py:build_run` needs (the
model with the added parameters, the trainable filter, the frozen loss); `checkpoint.py` saves and loads
only the trained parameters with the base's identity; `merge` folds LoRA into the base weights.
See docs/peft.md.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import ml_collections

from cgpt_jax.call_syntax import import_submodules, parse_calls, spec_string
from cgpt_jax.peft.base import HEAD, PEFT, Added, Method

_REGISTRY: dict[str, type[Method]] = {}
_MODULES = ("base", "training", "checkpoint")  # support modules, not methods


def register(name: str) -> Callable[[type[Method]], type[Method]]:
    """Class decorator: select the class with `name` in config.finetune.method."""
    def add(cls: type[Method]) -> type[Method]:
        if _REGISTRY.get(name, cls) is not cls:
            raise ValueError(f"PEFT method {name!r} is registered twice ({_REGISTRY[name].__module__} and "
                             f"{cls.__module__})")
        _REGISTRY[name] = cls
        build.cache_clear()
        return cls
    return add


def unregister(name: str) -> None:
    """Remove a method registered at run time (the conformance suite's broken example)."""
    del _REGISTRY[name]
    build.cache_clear()


def registered() -> dict[str, type[Method]]:
    _discover()
    return dict(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    method: Method


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A parsed config.finetune.method: one or more methods."""

    spec: str
    components: tuple[Component, ...]

    @property
    def is_full(self) -> bool:
        """Nothing added and nothing frozen: the run is set up exactly as without PEFT."""
        return self.trains_base and not self.adds_params

    @property
    def adds_params(self) -> bool:
        return any(type(c.method).make is not Method.make for c in self.components)

    @property
    def trains_base(self) -> bool:
        return any(type(c.method).trains_base for c in self.components)

    @property
    def mergeable(self) -> bool:
        return all(type(c.method).mergeable for c in self.components)

    def virtual_tokens(self) -> int:
        return sum(type(c.method).virtual_tokens(**c.method.opts) for c in self.components)

    def validate(self, model_cfg: ml_collections.ConfigDict, seq_len: int | None = None) -> None:
        """ValueError when a method cannot serve the model, or when `seq_len` input tokens and the virtual
        tokens do not fit the model's context."""
        for c in self.components:
            try:
                type(c.method).validate(model_cfg, **c.method.opts)
            except ValueError as e:
                raise ValueError(f"config.finetune.method={self.spec!r}: {c.name}: {e}") from None
        n = self.virtual_tokens()
        if seq_len is not None and n and seq_len + n > model_cfg.max_seq_len:
            raise ValueError(f"config.finetune.method={self.spec!r} puts {n} virtual tokens before every sequence, "
                             f"so train.seq_len={seq_len} needs {seq_len + n} positions but model.max_seq_len="
                             f"{model_cfg.max_seq_len} — use train.seq_len <= {model_cfg.max_seq_len - n} (max_len "
                             f"for classification) or fewer tokens")


def _help() -> str:
    lines = [f"  {spec_string(name, cls.options)}" for name, cls in sorted(_REGISTRY.items())]
    return "registered PEFT methods (combine with '+' where their slots differ):\n" + "\n".join(lines)


def _component(name: str, given: dict[str, Any], spec: str) -> Component:
    if name not in _REGISTRY:
        raise ValueError(f"unknown PEFT method {name!r} in config.finetune.method={spec!r}.\n{_help()}")
    cls = _REGISTRY[name]
    unknown = set(given) - set(cls.options)
    if unknown:
        raise ValueError(f"PEFT method {name!r} has no argument(s) {sorted(unknown)} "
                         f"(in config.finetune.method={spec!r}).\n{_help()}")
    return Component(name, cls(**{**cls.options, **given}))


@functools.cache
def build(spec: str) -> Recipe:
    """Parse ``"name"``, ``"name(key=value, ...)"`` or ``"a(...)+b(...)"`` (ValueError listing the methods)."""
    _discover()
    calls = parse_calls(spec, "config.finetune.method", "'full' or 'lora(rank=8)'", _help())
    components = tuple(_component(name, given, spec) for name, given in calls)
    owner: dict[str, str] = {}
    for c in components:
        for slot in type(c.method).slots:
            if slot in owner:
                raise ValueError(f"config.finetune.method={spec!r}: {owner[slot]!r} and {c.name!r} both claim "
                                 f"the model's {slot!r}; combine methods that change different places")
            owner[slot] = c.name
    return Recipe(spec, components)


def validate_method(spec: str, model_cfg: ml_collections.ConfigDict, seq_len: int | None = None) -> list[str]:
    """Config-time errors of config.finetune.method against the model and the input length `seq_len`
    (for cgpt_jax/config.py)."""
    try:
        build(spec).validate(model_cfg, seq_len)
    except ValueError as e:
        return [str(e)]
    return []


_discovered = False


def _discover() -> None:
    """Import every module in this package so that each method registers itself."""
    global _discovered
    if _discovered:
        return
    import_submodules(__name__, __path__, skip=_MODULES)
    _discovered = True


__all__ = ["HEAD", "PEFT", "Added", "Method", "Recipe", "build", "register", "registered", "spec_string",
           "unregister", "validate_method"]
