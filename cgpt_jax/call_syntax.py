"""The call syntax of plug-in registries (attention variants, PEFT methods): ``"name"``,
``"name(key=value, ...)"`` and ``"a(...)+b(...)"``, parsed with Python's own parser (values are literals),
and the discovery that imports every module of a plug-in package so that each registers itself."""
from __future__ import annotations

import ast
import importlib
import pkgutil
from typing import Any


def spec_string(name: str, options: dict[str, Any]) -> str:
    """The config string selecting `name` with `options`: ``spec_string("gqa", {"kv_heads": 2})``."""
    args = ", ".join(f"{k}={v!r}" for k, v in options.items())
    return f"{name}({args})" if args else name


def parse_calls(spec: str, field: str, example: str, help_text: str) -> list[tuple[str, dict[str, Any]]]:
    """[(name, given keyword arguments)] of each '+'-joined part of `spec`, the value of config `field`;
    ValueError naming the field, with `example` (valid strings) and `help_text` (the registered names)."""
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"{field}={spec!r} does not parse; write e.g. {example}.\n{help_text}") from None
    parts: list[ast.expr] = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        parts.insert(0, node.right)
        node = node.left
    parts.insert(0, node)
    calls = []
    for part in parts:
        if isinstance(part, ast.Name):
            calls.append((part.id, {}))
        elif isinstance(part, ast.Call) and isinstance(part.func, ast.Name) and not part.args:
            try:
                calls.append((part.func.id, {kw.arg: ast.literal_eval(kw.value) for kw in part.keywords}))
            except ValueError:
                raise ValueError(f"{field}={spec!r}: arguments must be literals (numbers, strings, "
                                 f"booleans).\n{help_text}") from None
        else:
            raise ValueError(f"{field}={spec!r} must be a name or a call with keyword arguments, joined by "
                             f"'+'.\n{help_text}")
    return calls


def import_submodules(package: str, path: list[str], skip: tuple[str, ...]) -> None:
    """Import every module of `package` (its `__path__`) but those in `skip`."""
    for info in pkgutil.iter_modules(path):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")
