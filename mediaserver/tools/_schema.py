"""JSON Schema for a tool's parameters, from its type hints and docstring.

Rules (docs/tools.md):

* ``str`` -> ``string``, ``int`` -> ``integer``, ``float`` -> ``number``,
  ``bool`` -> ``boolean``, ``list[X]`` -> ``array`` of X, ``Literal[...]`` ->
  ``enum`` (of one JSON type), ``X | None`` / ``Optional[X]`` -> X, not required;
* a parameter with a default is not required; every other one is;
* a parameter annotated :class:`~mediaserver.tools.context.CallContext` is
  filled in by the runner and left out of the schema;
* the docstring's first paragraph is the tool's description and its Google
  style ``Args:`` section gives each parameter's description.

Anything else (``*args``, ``dict``, ``Any``, a missing annotation) is refused
when the tool is defined, with a one-line :class:`TypeError`.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union

__all__ = ["Signature", "describe", "parse_docstring"]

_SCALARS: dict[type, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}
_ARG_LINE = re.compile(r"^(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns?|Raises|Yields|Examples?|Notes?)\s*:\s*$")


@dataclass(frozen=True, slots=True)
class Signature:
    """What :func:`describe` found: the schema and how to call the function."""

    description: str
    parameters: dict[str, Any]  # a JSON Schema object
    required: tuple[str, ...]
    optional_none: tuple[str, ...]  # Optional parameters without a default: passed None when absent
    context_parameter: str | None  # the CallContext parameter, if any
    nullable: tuple[str, ...] = ()  # parameters whose type takes None (a null from the model is passed as None)


def parse_docstring(doc: str | None) -> tuple[str, dict[str, str]]:
    """(first paragraph, {parameter: description}) of a Google-style docstring."""
    text = inspect.cleandoc(doc or "")
    lines = text.splitlines()
    summary: list[str] = []
    for line in lines:
        if not line.strip() or _SECTION.match(line.strip()):
            break
        summary.append(line.strip())
    args: dict[str, str] = {}
    in_args = False
    current: str | None = None
    base_indent = 0
    for line in lines:
        stripped = line.strip()
        section = _SECTION.match(stripped) if not line.startswith((" ", "\t")) else None
        if section:
            in_args = section.group(1) in ("Args", "Arguments", "Parameters")
            current = None
            continue
        if not in_args or not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        match = _ARG_LINE.match(stripped)
        if match and (current is None or indent <= base_indent):
            current = match.group(1).lstrip("*")
            base_indent = indent
            args[current] = match.group(2).strip()
        elif current is not None:
            args[current] = (args[current] + " " + stripped).strip()
    return " ".join(summary), args


def _schema_of(hint: Any, where: str) -> tuple[dict[str, Any], bool]:
    """(schema, nullable) for one annotation."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(members) != 1 or len(members) == len(typing.get_args(hint)):
            raise TypeError(f"{where}: only X | None unions are supported, not {hint!r}")
        schema, _ = _schema_of(members[0], where)
        return schema, True
    if origin is Literal:
        values = typing.get_args(hint)
        kinds = {type(v) for v in values}
        if len(kinds) != 1 or next(iter(kinds)) not in _SCALARS:
            raise TypeError(f"{where}: Literal values must all be str, int, float or bool, not {values!r}")
        return {"type": _SCALARS[next(iter(kinds))], "enum": list(values)}, False
    if origin is list:
        (item,) = typing.get_args(hint) or (None,)
        if item is None:
            raise TypeError(f"{where}: say what the list holds (list[str], ...)")
        items, _ = _schema_of(item, where)
        return {"type": "array", "items": items}, False
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}, False
    raise TypeError(f"{where}: unsupported type {hint!r} (use str, int, float, bool, Literal, list[...] or X | None)")


def describe(fn: Callable[..., Any], name: str, context_type: type) -> Signature:
    """The schema of ``fn``'s parameters; raises :class:`TypeError` for what it cannot express."""
    description, arg_docs = parse_docstring(fn.__doc__)
    try:
        hints = typing.get_type_hints(fn)
    except Exception as exc:  # a NameError from a forward reference, typically
        raise TypeError(f"tool {name}: cannot resolve its type hints: {exc}") from exc
    properties: dict[str, Any] = {}
    required: list[str] = []
    optional_none: list[str] = []
    nullables: list[str] = []
    context: str | None = None
    for param in inspect.signature(fn).parameters.values():
        where = f"tool {name}, parameter {param.name}"
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"{where}: *args, **kwargs and positional-only parameters are not supported")
        hint = hints.get(param.name, inspect.Parameter.empty)
        if hint is context_type:
            context = param.name
            continue
        if hint is inspect.Parameter.empty:
            raise TypeError(f"{where}: needs a type annotation")
        schema, nullable = _schema_of(hint, where)
        if param.name in arg_docs:
            schema["description"] = arg_docs[param.name]
        properties[param.name] = schema
        if nullable:
            nullables.append(param.name)
        if param.default is inspect.Parameter.empty:
            if nullable:
                optional_none.append(param.name)
            else:
                required.append(param.name)
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    return Signature(description, parameters, tuple(required), tuple(optional_none), context, tuple(nullables))
