"""``@tool``: plain or async functions the model may call, and loading them.

A decorated function stays callable as before; the decorator returns a
:class:`Tool` that also knows its name, description and JSON schema.
:func:`load_module_tools` imports the module named in ``MEDIASERVER_TOOLS``
and collects every :class:`Tool` defined at its top level.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import re
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, overload

from mediaserver.config import ConfigError
from mediaserver.protocol.providers.base import FunctionTool

from ._schema import describe
from .context import CallContext

log = logging.getLogger("mediaserver.tools")

__all__ = ["Tool", "load_module_tools", "tool"]

# OpenAI function names: ^[a-zA-Z0-9_-]{1,64}$ (the strictest of the providers).
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Tool:
    """A function the model may call (see :func:`tool`)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        respond: bool = True,
        irreversible: bool = False,
    ) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        if not _NAME.match(self.name):
            raise TypeError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        signature = describe(fn, self.name, CallContext)
        self.description = description or signature.description
        if not self.description:
            raise TypeError(f"tool {self.name}: give it a docstring (the model reads it) or description=")
        self.parameters = signature.parameters
        self.required = signature.required
        self.optional_none = signature.optional_none
        self.nullable = signature.nullable
        self.context_parameter = signature.context_parameter
        self.respond = respond
        self.irreversible = irreversible
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Tool {self.name}>"

    @property
    def spec(self) -> FunctionTool:
        """The provider-neutral declaration sent to the model."""
        return FunctionTool(self.name, self.description, self.parameters, irreversible=self.irreversible)


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...


@overload
def tool(
    *, name: str | None = None, description: str | None = None, irreversible: bool = False
) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    irreversible: bool = False,
) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make ``fn`` a tool: ``@tool`` or ``@tool(name=..., description=..., irreversible=...)``.

    The schema comes from the type hints and the docstring (docs/tools.md);
    an unsupported signature raises :class:`TypeError` at once.
    ``irreversible=True``: what the tool does cannot be undone, so a
    provider that calls tools speculatively must wait for the caller's turn
    to be confirmed first (docs/tools.md).
    """
    if fn is not None:
        if isinstance(fn, Tool):
            raise TypeError(f"tool {fn.name}: @tool is applied twice")
        if not callable(fn):  # @tool("lookup"): the name is a keyword, name="lookup"
            raise TypeError(f"@tool takes a function, not {fn!r}; to name the tool: @tool(name=...)")
        return Tool(fn)

    def decorate(f: Callable[..., Any]) -> Tool:
        return Tool(f, name=name, description=description, irreversible=irreversible)

    return decorate


def _import_here_too(module_name: str) -> ModuleType:
    """Import ``module_name``; one not on the import path is looked for in the working directory as well.

    (As ``python -m`` and uvicorn do: the console script's path holds only
    its own directory.)  It is searched last, so it shadows nothing
    installed, and it stays on the path: a tool that imports a module beside
    it when it runs, mid-call, must find it too.
    """
    top = module_name.partition(".")[0]
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        if exc.name != top or here in sys.path or "" in sys.path:
            raise
    sys.path.append(here)
    module = importlib.import_module(module_name)
    log.info("MEDIASERVER_TOOLS=%s: loaded %s", module_name, getattr(module, "__file__", None) or here)
    return module


def load_module_tools(module_name: str) -> tuple[Tool, ...]:
    """Every :class:`Tool` at the top level of ``module_name``, in definition order.

    Raises :class:`~mediaserver.config.ConfigError` (naming ``MEDIASERVER_TOOLS``)
    when the module cannot be imported or defines no tool.
    """
    if module_name.endswith(".py") or "/" in module_name or "\\" in module_name:
        raise ConfigError(
            f"MEDIASERVER_TOOLS={module_name}: give the module's name, not a file's "
            f"(my_tools for my_tools.py, in the directory the server starts in or on PYTHONPATH)"
        )
    try:
        module = _import_here_too(module_name)
    except (Exception, SystemExit) as exc:  # (SystemExit: a module that calls sys.exit() as it is imported)
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and exc.name == module_name.partition(".")[0]:
            hint = " (the module must be importable: in the working directory, installed, or on PYTHONPATH)"
        raise ConfigError(f"MEDIASERVER_TOOLS={module_name}: cannot import it: {type(exc).__name__}: {exc}{hint}") from exc
    # (once each: a second name for a tool, lookup = order_status, is not a second tool)
    found = tuple(dict.fromkeys(value for value in vars(module).values() if isinstance(value, Tool)))
    if not found:
        raise ConfigError(f"MEDIASERVER_TOOLS={module_name}: the module defines no @tool functions")
    return found
