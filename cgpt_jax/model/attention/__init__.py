"""Attention variants as plug-ins.

A variant is one module in this folder that subclasses `Attention` (in practice `DenseAttention`,
overriding the step it changes) and decorates itself with `@register("name")`. Modules here are
imported automatically, so adding a file is the whole change. The config selects a variant with call
syntax: ``config.model.attention = "dense"``, ``"gqa(kv_heads=4)"``; `build` parses that string.

Variants that change different steps of `DenseAttention` combine with ``+``:
``"gqa(kv_heads=4)+rope(theta=10000.0)"`` builds one class that inherits from both, so GQA's
projections feed RoPE's rotation. Two variants that override the same step (e.g. `blockwise` and
`fused`, both replacing the softmax core `mix`) cannot be combined and `build` says so.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from cgpt_jax.call_syntax import import_submodules, parse_calls, spec_string
from cgpt_jax.model.attention.base import REQUIRED, Attention, CacheSpec


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered name: its class and the options the name fixes (``mqa`` is gqa with kv_heads=1)."""

    cls: type[Attention]
    fixed: dict[str, Any]

    @property
    def free_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.cls.options.items() if k not in self.fixed}


_REGISTRY: dict[str, Entry] = {}
_BUILT: dict[str, Variant] = {}  # build's results by spec string; emptied whenever the registry changes


def register(name: str, **fixed: Any) -> Callable[[type[Attention]], type[Attention]]:
    """Class decorator: select the class with ``name`` (and `fixed` options) in config strings."""
    def add(cls: type[Attention]) -> type[Attention]:
        if name in _REGISTRY and _REGISTRY[name] != Entry(cls, fixed):
            raise ValueError(f"attention variant {name!r} is registered twice "
                             f"({_REGISTRY[name].cls.__module__} and {cls.__module__})")
        unknown = set(fixed) - set(cls.options)
        if unknown:
            raise ValueError(f"register({name!r}): {cls.__name__} has no option(s) {sorted(unknown)}")
        _REGISTRY[name] = Entry(cls, dict(fixed))
        _BUILT.clear()
        return cls
    return add


def unregister(name: str) -> None:
    """Remove a variant registered at run time (tests and the documentation example use this)."""
    del _REGISTRY[name]
    _BUILT.clear()


def registered() -> dict[str, Entry]:
    _discover()
    return dict(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Component:
    name: str
    cls: type[Attention]
    options: dict[str, Any]  # the fixed ones included


@dataclasses.dataclass(frozen=True)
class Variant:
    """A parsed config string: one or more components and the class that combines them."""

    spec: str
    components: tuple[Component, ...]

    @property
    def cls(self) -> type[Attention]:
        if len(self.components) == 1:
            return self.components[0].cls
        return _combined_class(tuple(c.cls for c in self.components))

    @property
    def options(self) -> dict[str, Any]:
        return {k: v for c in self.components for k, v in c.options.items()}

    @property
    def learned_positions(self) -> bool:
        return all(c.cls.learned_positions for c in self.components)

    @property
    def supports_decode(self) -> bool:
        return all(c.cls.supports_decode for c in self.components)

    def validate(self, model_cfg) -> None:
        for c in self.components:
            try:
                c.cls.validate(model_cfg, **c.options)
            except ValueError as e:
                raise ValueError(f"config.model.attention={self.spec!r}: {e}") from None

    def check_decode(self) -> None:
        """ValueError (at config time) when this variant cannot decode with a KV cache."""
        if not self.supports_decode:
            able = sorted(n for n, e in registered().items() if e.cls.supports_decode)
            raise ValueError(f"config.model.attention={self.spec!r} does not support KV-cache decoding "
                             f"(generation); variants that do: {able}")

    def fwd_flops_per_token(self, model_cfg, seq_len: int) -> float:
        """Each component's change to the dense count, added up (one component: its own count)."""
        dense = Attention.fwd_flops_per_token(model_cfg, seq_len)
        return dense + sum(c.cls.fwd_flops_per_token(model_cfg, seq_len, **c.options) - dense
                           for c in self.components)

    def make(self, model_cfg, *, rngs) -> Attention:
        self.validate(model_cfg)
        return self.cls(model_cfg, rngs=rngs, **self.options)


def _signature_help() -> str:
    lines = []
    for name, entry in sorted(_REGISTRY.items()):
        args = ", ".join(f"{k}={v!r}" for k, v in entry.free_options.items())
        line = f"  {name}({args})" if args else f"  {name}"
        if entry.fixed:
            line += f"  (= {entry.cls.__name__} with {spec_string('', entry.fixed)[1:-1]})"
        lines.append(line)
    return ("registered attention variants (combine with '+', e.g. 'gqa(kv_heads=2)+rope'):\n"
            + "\n".join(lines))


def _component(name: str, given: dict[str, Any], spec: str) -> Component:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention variant {name!r} in config.model.attention={spec!r}.\n"
                         f"{_signature_help()}")
    entry = _REGISTRY[name]
    unknown = set(given) - set(entry.free_options)
    if unknown:
        raise ValueError(f"attention variant {name!r} has no argument(s) {sorted(unknown)} "
                         f"(in config.model.attention={spec!r}).\n{_signature_help()}")
    options = {**entry.free_options, **given, **entry.fixed}
    missing = [k for k, v in options.items() if v is REQUIRED]
    if missing:
        raise ValueError(f"attention variant {name!r} needs argument(s) {missing}, e.g. "
                         f"'{name}({missing[0]}=...)' (in config.model.attention={spec!r}).\n"
                         f"{_signature_help()}")
    return Component(name, entry.cls, options)


def build(spec: str) -> Variant:
    """Parse ``"name"``, ``"name(key=value, ...)"`` or ``"a(...)+b(...)"`` into a `Variant`, with
    errors that list the registered variants and their arguments. Parsed once per spec string: the model,
    the config check and the FLOP count all call this, and get the same Variant."""
    _discover()
    if spec not in _BUILT:
        _BUILT[spec] = _parse(spec)
    return _BUILT[spec]


def _parse(spec: str) -> Variant:
    calls = parse_calls(spec, "config.model.attention", "'dense' or 'gqa(kv_heads=4)'", _signature_help())
    components = tuple(_component(name, given, spec) for name, given in calls)
    if len(components) > 1:
        _check_combinable(components, spec)
    return Variant(spec, components)


def _overridden_hooks(cls: type[Attention]) -> set[str]:
    from cgpt_jax.model.attention.dense import DenseAttention

    return {hook for hook in DenseAttention.hooks if getattr(cls, hook) is not getattr(DenseAttention, hook)}


def _check_combinable(components: tuple[Component, ...], spec: str) -> None:
    from cgpt_jax.model.attention.dense import DenseAttention

    seen_options: dict[str, str] = {}
    owner: dict[str, str] = {}
    for c in components:
        if not issubclass(c.cls, DenseAttention):
            raise ValueError(f"config.model.attention={spec!r}: {c.name!r} is not built on DenseAttention's "
                             f"steps, so it cannot be combined with other variants")
        for option in c.options:
            if option in seen_options:
                raise ValueError(f"config.model.attention={spec!r}: {seen_options[option]!r} and {c.name!r} "
                                 f"both set option {option!r}; combine variants with distinct options")
            seen_options[option] = c.name
        for hook in _overridden_hooks(c.cls):
            if hook in owner:
                raise ValueError(f"config.model.attention={spec!r}: {owner[hook]!r} and {c.name!r} both "
                                 f"replace the {hook}() step, so they cannot be combined")
            owner[hook] = c.name


@functools.cache
def _combined_class(classes: tuple[type[Attention], ...]) -> type[Attention]:
    """One class per combination (cached: equal config strings give equal graph definitions)."""
    namespace = {
        "options": {k: v for cls in classes for k, v in cls.options.items()},
        "learned_positions": all(cls.learned_positions for cls in classes),
        "supports_decode": all(cls.supports_decode for cls in classes),
        "__module__": __name__,
    }
    return type("+".join(cls.__name__ for cls in classes), classes, namespace)


_discovered = False


def _discover() -> None:
    """Import every module in this package so that each variant registers itself."""
    global _discovered
    if _discovered:
        return
    import_submodules(__name__, __path__, skip=("base",))
    _discovered = True


__all__ = ["REQUIRED", "Attention", "CacheSpec", "Entry", "Variant", "build", "register", "registered",
           "spec_string", "unregister"]
