"""What a tool can do to the call it runs in: :class:`CallContext`.

A tool that declares a parameter annotated ``CallContext`` gets one (the
parameter is not part of the schema the model sees).  The context is a thin
view of a :class:`CallControl`, which the call's bridge implements; tests
and the simulator can implement it too.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["CallContext", "CallControl", "ToolError"]


class ToolError(Exception):
    """Raise from a tool to give the model a clean ``{"error": message}`` result."""


class CallControl(Protocol):
    """The call-side operations behind :class:`CallContext` (implemented by ``CallBridge``)."""

    @property
    def call_sid(self) -> str: ...

    async def next_digits(self, count: int, timeout_s: float, finish_on: str | None) -> str: ...

    async def end_call(self, reason: str) -> None: ...

    async def transfer(self, to: str) -> None: ...


class CallContext:
    """The call a tool runs in.

    ``call_sid`` is Twilio's call SID.  The methods are awaitable from async
    tools only (a sync tool runs in a worker thread).
    """

    __slots__ = ("_control",)

    def __init__(self, control: CallControl) -> None:
        self._control = control

    @property
    def call_sid(self) -> str:
        return self._control.call_sid

    async def next_digits(self, count: int = 1, *, timeout_s: float = 10.0, finish_on: str | None = "#") -> str:
        """Keypad digits the caller presses from now on.

        Returns when ``count`` digits have arrived, when the caller presses
        ``finish_on`` (not included in the result), or after ``timeout_s``
        (with what arrived so far, possibly ``""``).  While a tool waits here
        the digits go to it only, not to the model as text.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, not {count}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, not {timeout_s}")
        return await self._control.next_digits(count, timeout_s, finish_on)

    async def end_call(self, reason: str = "the agent ended the call") -> None:
        """Hang up once what the agent is saying has played to the caller."""
        await self._control.end_call(reason)

    async def transfer(self, to: str) -> None:
        """Cold-transfer the caller to ``to`` (E.164) once the agent's words have played.

        Raises :class:`ToolError` when the transfer cannot be made.
        """
        await self._control.transfer(to)
