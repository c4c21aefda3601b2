"""Attention variants as plug-ins.

A variant is one module in this folder that subclasses `Attention` and decorates itself with
`@register("name")`. Modules here are imported automatically, so adding a file is the whole change.
The config selects a variant with call syntax: ``config.model.attention = "dense"`` or
``"gqa(kv_heads=4)"``; `build` parses that string into a `Variant`.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import pkgutil
from typing import Any, Callable

from cgpt_jax.model.attention.base import Attention

_REGISTRY: dict[str, type[Attention]] = {}


def register(name: str) -> Callable[[type[Attention]], type[Attention]]:
    def add(cls: type[Attention]) -> type[Attention]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attention variant {name!r} is registered twice "
                             f"({_REGISTRY[name].__module__} and {cls.__module__})")
        cls.variant_name = name
        _REGISTRY[name] = cls
        return cls
    return add


def registered() -> dict[str, type[Attention]]:
    return dict(_REGISTRY)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A parsed config string: the variant's class plus its keyword arguments."""

    cls: type[Attention]
    kwargs: dict[str, Any]

    @property
    def learned_positions(self) -> bool:
        return self.cls.learned_positions

    def validate(self, model_cfg) -> None:
        self.cls.validate(model_cfg, **self.kwargs)

    def fwd_flops_per_token(self, model_cfg, seq_len: int) -> float:
        return self.cls.fwd_flops_per_token(model_cfg, seq_len, **self.kwargs)

    def make(self, model_cfg, *, rngs) -> Attention:
        return self.cls(model_cfg, rngs=rngs, **self.kwargs)


def _signature_help() -> str:
    lines = []
    for name, cls in sorted(_REGISTRY.items()):
        params = [p for p in inspect.signature(cls.__init__).parameters.values()
                  if p.kind == p.KEYWORD_ONLY and p.name != "rngs"]
        args = ", ".join(f"{p.name}={p.default!r}" if p.default is not p.empty else f"{p.name}=?"
                         for p in params)
        lines.append(f"  {name}({args})" if args else f"  {name}")
    return "registered attention variants:\n" + "\n".join(lines)


def build(spec: str) -> Variant:
    """Parse ``"name"`` or ``"name(key=value, ...)"`` into a `Variant`, with errors that list the options."""
    _discover()
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"config.model.attention={spec!r} does not parse; write e.g. 'dense' or "
                         f"'gqa(kv_heads=4)'.\n{_signature_help()}") from None
    if isinstance(node, ast.Name):
        name, kwargs = node.id, {}
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        name = node.func.id
        try:
            kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords}
        except ValueError:
            raise ValueError(f"config.model.attention={spec!r}: arguments must be literals "
                             f"(numbers, strings, booleans).\n{_signature_help()}") from None
    else:
        raise ValueError(f"config.model.attention={spec!r} must be a name or a call with keyword "
                         f"arguments.\n{_signature_help()}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention variant {name!r} in config.model.attention={spec!r}.\n"
                         f"{_signature_help()}")
    cls = _REGISTRY[name]
    allowed = {p.name for p in inspect.signature(cls.__init__).parameters.values()
               if p.kind == p.KEYWORD_ONLY and p.name != "rngs"}
    unknown = set(kwargs) - allowed
    if unknown:
        raise ValueError(f"attention variant {name!r} has no argument(s) {sorted(unknown)}.\n"
                         f"{_signature_help()}")
    return Variant(cls, kwargs)


_discovered = False


def _discover() -> None:
    """Import every module in this package so that each variant registers itself."""
    global _discovered
    if _discovered:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _discovered = True
