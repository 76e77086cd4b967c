"""Running a tool call: arguments JSON in, a JSON result for the model out.

:meth:`ToolSet.run` never raises for anything the tool or the model did
wrong: bad arguments, an unknown tool, an exception or a timeout all become
``{"error": "..."}``, so the model can tell the caller and the call goes on.
Sync tools run in a worker thread (``trio.to_thread.run_sync``); when one
times out its thread is abandoned (it cannot be interrupted) and its result
is ignored.  Cancellation (the call ending) passes through.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from mediaserver._urls import redact
from mediaserver.config import ConfigError
from mediaserver.protocol.providers.base import FunctionTool

from .context import CallContext, CallControl, ToolError
from .registry import Tool

__all__ = ["ToolOutcome", "ToolSet"]

log = logging.getLogger("mediaserver.tools")

MAX_OUTPUT_CHARS = 16_000  # keep a runaway result from flooding the model's context
MAX_ERROR_CHARS = 2_000  # an error's text for the model (a library's message can quote a whole response)


@dataclass(frozen=True, slots=True)
class ToolOutcome:
    """The result to send back: ``output`` (JSON text), whether the model should speak next."""

    output: str
    respond: bool
    ok: bool


def _error(message: str) -> ToolOutcome:
    if len(message) > MAX_ERROR_CHARS:
        message = f"{message[:MAX_ERROR_CHARS]}... (cut: {len(message)} characters)"
    return ToolOutcome(json.dumps({"error": message}), True, False)


class ToolSet:
    """The tools offered on a call, by name."""

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        self._tools: dict[str, Tool] = {}
        for t in tools:
            if t.name in self._tools:
                raise ConfigError(f"two tools are named {t.name!r}; tool names must be unique")
            self._tools[t.name] = t

    def __len__(self) -> int:
        return len(self._tools)

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._tools)

    def specs(self) -> tuple[FunctionTool, ...]:
        """The declarations for the model's session (``AgentOptions.tools``)."""
        return tuple(t.spec for t in self._tools.values())

    async def run(
        self, name: str, arguments: str, *, control: CallControl | None = None, timeout_s: float = 10.0
    ) -> ToolOutcome:
        """Run tool ``name`` with ``arguments`` (JSON text from the model); never raises but Cancelled."""
        t = self._tools.get(name)
        if t is None:
            return _error(f"unknown tool {name!r}; available: {', '.join(self._tools) or 'none'}")
        try:
            kwargs = _arguments(t, arguments)
        except ValueError as exc:
            return _error(f"bad arguments for {name}: {exc}")
        except RecursionError:  # (JSON nested deeper than Python recurses: the model's text, not ours to crash on)
            return _error(f"bad arguments for {name}: nested too deeply")
        if t.context_parameter is not None:
            if control is None:
                return _error(f"{name} needs a live call")
            kwargs[t.context_parameter] = CallContext(control)
        result: Any = None
        try:
            with trio.move_on_after(timeout_s) as scope:
                if t.is_async:
                    result = await t.fn(**kwargs)
                else:
                    result = await trio.to_thread.run_sync(
                        functools.partial(t.fn, **kwargs), abandon_on_cancel=True, limiter=_sync_tool_threads()
                    )
        except ToolError as exc:
            return _error(str(exc) or f"{name} failed")
        except (Exception, SystemExit, KeyboardInterrupt) as exc:
            # SystemExit too: a tool's sys.exit() must not stop the server and every call on it.  KeyboardInterrupt
            # only from a plain-function tool's worker thread (signals go to the main thread: that one is the
            # tool's own); in an async tool it may be a real Ctrl-C that Trio delivered there, so it goes on.
            if isinstance(exc, KeyboardInterrupt) and t.is_async:
                raise
            log.warning("tool %s failed", name, exc_info=True)
            return _error(f"{name} failed: {type(exc).__name__}: {_without_secrets(str(exc))}")
        except BaseExceptionGroup as group:  # (a tool's own nursery: SystemExit among what it raised)
            if group.split((Exception, SystemExit))[1] is not None:
                raise  # a cancellation or a real Ctrl-C among them: not the tool's to answer
            log.warning("tool %s failed", name, exc_info=True)
            return _error(f"{name} failed: {type(group).__name__}: {_without_secrets(str(group))}")
        if scope.cancelled_caught:
            log.warning("tool %s timed out after %g s", name, timeout_s)
            return _error(f"{name} timed out after {timeout_s:g} s")
        try:
            output = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return _error(f"{name} returned a value that is not JSON: {exc}")
        except RecursionError:
            return _error(f"{name} returned a value nested too deeply for JSON")
        if len(output) > MAX_OUTPUT_CHARS:
            return _error(f"{name} returned {len(output)} characters; the limit is {MAX_OUTPUT_CHARS}")
        return ToolOutcome(output, t.respond, True)


# (A scheme starts where no scheme character precedes it: each run of them is tried once, so a long message costs
# linear time, not quadratic -- this runs in the server's event loop.)
_URL = re.compile(r"(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def _without_secrets(text: str) -> str:
    """An exception's text for the model: URLs in it lose their user name, password and query (a library's
    message may quote the request it made, key and all).  The log keeps the whole text."""
    return _URL.sub(lambda m: redact(m.group()), text)


SYNC_TOOL_THREADS = 40  # plain-function tools running at once (each in a worker thread)
_SYNC_LIMITER: trio.lowlevel.RunVar[trio.CapacityLimiter] = trio.lowlevel.RunVar("mediaserver_sync_tools")


def _sync_tool_threads() -> trio.CapacityLimiter:
    """The threads of plain-function tools: a limiter of their own, not Trio's default one.

    A tool that hangs (a backend with no timeout) keeps its thread after the
    call gives up on it.  With Trio's default limiter, 40 of those would
    stop every other thread call in the server -- DNS lookups for new model
    sessions, the call-records writer -- so tools wait only for each other.
    """
    try:
        return _SYNC_LIMITER.get()
    except LookupError:
        limiter = trio.CapacityLimiter(SYNC_TOOL_THREADS)
        _SYNC_LIMITER.set(limiter)
        return limiter


def _arguments(t: Tool, text: str) -> dict[str, Any]:
    """Parse and check the model's arguments against the tool's schema."""
    if not text.strip():
        values: Any = {}
    else:
        try:
            values = json.loads(text, parse_constant=_not_json)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON ({exc.msg})") from None
    if not isinstance(values, dict):
        raise ValueError("expected a JSON object")
    properties: Mapping[str, Any] = t.parameters["properties"]
    unknown = sorted(set(values) - set(properties))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}")
    missing = [p for p in t.required if p not in values]
    if missing:
        raise ValueError(f"missing required argument(s) {', '.join(missing)}")
    for key, value in list(values.items()):
        if value is None and key in t.nullable:
            continue
        if value is None and key not in t.required:
            del values[key]  # null for an argument with a default: the default (models send null for "not given")
            continue
        values[key] = _checked(value, properties[key], key)
    for key in t.optional_none:
        values.setdefault(key, None)
    return values


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "array": (list,),
}


def _not_json(name: str) -> None:
    """json.loads' hook for NaN, Infinity and -Infinity: Python's extensions, not JSON."""
    raise ValueError(f"not valid JSON ({name} is not a JSON number)")


def _checked(value: Any, schema: Mapping[str, Any], where: str) -> Any:
    """``value`` if it fits ``schema``, as the tool's type takes it (an integral number for an integer: 1.0 is 1)."""
    kind = schema["type"]
    if kind == "integer" and type(value) is float and value.is_integer():
        value = int(value)  # (JSON has one number type: 1.0 is the integer 1, as JSON Schema says)
    elif kind == "number" and type(value) is int:
        try:
            value = float(value)  # (a float parameter gets a float: Literal[0.5, 1.0] given 1 is 1.0)
        except OverflowError:
            value = math.inf  # (refused below: past a double)
    ok = isinstance(value, _JSON_TYPES[kind]) and (kind == "boolean" or not isinstance(value, bool))
    if ok and type(value) is float and not math.isfinite(value):  # (1e400: past a double)
        ok = False
    if not ok:
        shown = json.dumps(value)[:40] if not isinstance(value, float) or math.isfinite(value) else "out of range"
        raise ValueError(f"{where} must be {'an' if kind[0] in 'aei' else 'a'} {kind}, not {shown}")
    if "enum" in schema and value not in schema["enum"]:
        raise ValueError(f"{where} must be one of {', '.join(map(json.dumps, schema['enum']))}")
    if kind == "array":
        return [_checked(element, schema["items"], f"{where}[{index}]") for index, element in enumerate(value)]
    return value
