"""Tools the agent may call during a phone call (docs/tools.md).

Write them in a module of your own and name it in ``MEDIASERVER_TOOLS``::

    from mediaserver.tools import CallContext, tool

    @tool
    async def order_status(order_id: str, call: CallContext) -> dict[str, str]:
        \"\"\"Look up an order's status.

        Args:
            order_id: The order number the caller reads out.
        \"\"\"
        ...

:func:`load_toolset` builds the call's :class:`ToolSet`: that module's tools
plus the built-ins (``end_call``, ``transfer_call``; ``send_digits`` on request).
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Iterable, Sequence

from mediaserver.config import ConfigError, Settings

from .builtins import BUILTINS, DEFAULT_BUILTINS, parse_transfer_numbers, transfer_tool
from .context import CallContext, CallControl, ToolError
from .registry import Tool, load_module_tools, tool
from .runner import ToolOutcome, ToolSet

log = logging.getLogger("mediaserver.tools")

__all__ = [
    "CallContext",
    "CallControl",
    "Tool",
    "ToolError",
    "ToolOutcome",
    "ToolSet",
    "load_module_tools",
    "load_toolset",
    "tool",
]


_WARNED: set[str] = set()


def _log_once(message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` once per process (the toolset is loaded to check it at start, then by the server)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.log(level, "%s", message)


def load_toolset(settings: Settings) -> ToolSet:
    """The tools for every call: ``MEDIASERVER_TOOLS``'s, then the built-ins.

    The tools module may set ``BUILTIN_TOOLS = ("end_call", ...)`` to choose
    the built-ins (``()`` for none).  ``transfer_call`` is left out when no
    Twilio REST credentials are configured (it could not work) or no
    ``MEDIASERVER_TRANSFER_NUMBERS`` (it dials only listed numbers); a
    tools module that asks for it by name without them is a configuration
    error.  Raises :class:`~mediaserver.config.ConfigError` for a module
    that cannot be loaded or a bad ``BUILTIN_TOOLS``.
    """
    from mediaserver.twilio_rest import TwilioCredentials

    tools: list[Tool] = []
    wanted: Sequence[str] = DEFAULT_BUILTINS
    explicit = False  # the tools module chose the built-ins by name
    if settings.tools_module:
        tools.extend(load_module_tools(settings.tools_module))
        chosen = getattr(importlib.import_module(settings.tools_module), "BUILTIN_TOOLS", None)
        if chosen is not None and not isinstance(chosen, (str, bytes)) and isinstance(chosen, Iterable):
            chosen = tuple(chosen)  # (a generator is used up by one look: the check below, not the loop after it)
        if chosen is not None:
            if (
                isinstance(chosen, (str, bytes))
                or not isinstance(chosen, Iterable)
                or not all(isinstance(n, str) and n in BUILTINS for n in chosen)
            ):
                raise ConfigError(
                    f"MEDIASERVER_TOOLS={settings.tools_module}: BUILTIN_TOOLS must be a list of "
                    f"{', '.join(BUILTINS)}, not {chosen!r}"
                )
            wanted, explicit = tuple(chosen), True
    has_rest = TwilioCredentials.from_settings(settings) is not None
    own = {t.name for t in tools}
    for name in wanted:
        if name in own:  # a module's own tool of the same name wins; said, as the built-in's guards go with it
            guard = " (MEDIASERVER_TRANSFER_NUMBERS does not limit it)" if name == "transfer_call" else ""
            _log_once(f"MEDIASERVER_TOOLS={settings.tools_module}: its own {name} replaces the built-in one{guard}")
            continue
        if name == "transfer_call":
            missing = [
                what
                for what, ok in (
                    ("Twilio REST credentials (TWILIO_ACCOUNT_SID with TWILIO_AUTH_TOKEN or an API key)", has_rest),
                    ("MEDIASERVER_TRANSFER_NUMBERS", bool(settings.transfer_numbers)),
                )
                if not ok
            ]
            if missing:
                if explicit:
                    raise ConfigError(
                        f"MEDIASERVER_TOOLS={settings.tools_module}: BUILTIN_TOOLS asks for transfer_call, "
                        f"which needs {' and '.join(missing)}"
                    )
                if has_rest:  # (information: the credentials sign webhooks and place calls; transfers are a choice)
                    _log_once(
                        "transfer_call is not offered: set MEDIASERVER_TRANSFER_NUMBERS to the numbers it may dial",
                        logging.INFO,
                    )
                elif settings.transfer_numbers:
                    _log_once(
                        "transfer_call is not offered: MEDIASERVER_TRANSFER_NUMBERS is set, but transfers need Twilio "
                        "REST credentials (TWILIO_ACCOUNT_SID with TWILIO_AUTH_TOKEN or an API key)"
                    )
                continue
            assert settings.transfer_numbers is not None
            tools.append(transfer_tool(parse_transfer_numbers(settings.transfer_numbers)))
            continue
        tools.append(BUILTINS[name])
    return ToolSet(tools)
