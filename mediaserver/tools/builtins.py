"""The built-in tools: ``end_call``, ``transfer_call`` and ``send_digits``.

``end_call`` and ``transfer_call`` act on the call through
:class:`~mediaserver.tools.context.CallContext`; both wait until what the
agent is saying has played to the caller (Twilio's mark echoes) before they
act.  ``send_digits`` is honest about Twilio's limit: a bidirectional Media
Stream cannot carry outbound DTMF, and the only way to play tones (a REST
update with ``<Play digits>``) replaces the TwiML running the stream, which
would cut the agent off.  It is therefore not offered unless asked for, and
then it returns an error result explaining why (docs/tools.md).
"""

from __future__ import annotations

import re

from .context import CallContext, ToolError
from .registry import Tool

__all__ = ["BUILTINS", "DEFAULT_BUILTINS", "DTMF_DIGITS", "END_CALL_DESCRIPTION", "END_CALL_STATUS", "E164", "parse_transfer_numbers", "transfer_tool"]

E164 = re.compile(r"\+[1-9][0-9]{6,14}\Z")  # ITU-T E.164: up to 15 digits after '+'
_E164_PREFIX = re.compile(r"\+[1-9][0-9]{0,13}\*\Z")  # "+44*", "+1555*": every number that starts so
END_CALL_STATUS = (
    "hanging up after your goodbye has played; if the caller speaks over it, the call goes on "
    "(call end_call again when it should end)"
)  # (the model is told in advance: a hang-up called off by a barge-in is not announced to it)
DTMF_DIGITS = re.compile(r"^[0-9*#wW]{1,32}$")  # Twilio SendDigits / <Play digits> alphabet, 32 max


END_CALL_DESCRIPTION = (
    "Hang up the phone call. Say goodbye first, in the same turn: the call ends once your goodbye has played "
    "to the caller. If the caller speaks over the goodbye, the call goes on; call this again when it should "
    "end. Use it when the conversation is over or the caller asks to hang up."
)  # (given whole: a docstring gives the model only its first paragraph)


async def end_call(call: CallContext, reason: str | None = None) -> dict[str, str]:
    """Hang up the phone call (the model reads ``END_CALL_DESCRIPTION``).

    Args:
        reason: Why the call is ending, for the call log.
    """
    await call.end_call(reason or "the agent ended the call")
    return {"status": END_CALL_STATUS}


def parse_transfer_numbers(spec: str) -> tuple[str, ...]:
    """``MEDIASERVER_TRANSFER_NUMBERS``: comma-separated E.164 numbers or ``+prefix*`` patterns.

    Raises ``ValueError`` naming the first entry that is neither (the
    settings turn it into a ``ConfigError``).
    """
    entries = tuple(entry.strip() for entry in spec.split(",") if entry.strip())
    if not entries:
        raise ValueError("no numbers given")
    for entry in entries:
        if not (E164.match(entry) or _E164_PREFIX.match(entry)):
            raise ValueError(f"{entry!r} is neither an E.164 number (+15551234567) nor a prefix such as +1555*")
    return entries


def _allowed(number: str, allowed: tuple[str, ...]) -> bool:
    return any(number.startswith(entry[:-1]) if entry.endswith("*") else number == entry for entry in allowed)


def transfer_tool(allowed: tuple[str, ...]) -> Tool:
    """The ``transfer_call`` built-in, limited to ``allowed`` (see :func:`parse_transfer_numbers`).

    The list is the deployment's guard against toll fraud: a caller can
    talk a model into calling any number, so the tool dials only numbers
    the operator listed; the model is told which ones in the description.
    """
    listed = ", ".join(allowed) if allowed else "none"

    async def transfer_call(call: CallContext, to: str) -> dict[str, str]:
        if not E164.match(to):
            raise ToolError(f"cannot transfer to {to!r}: give an E.164 number such as +15551234567")
        if not _allowed(to, allowed):
            raise ToolError(f"cannot transfer to {to}: transfers may only go to {listed}")
        await call.transfer(to)
        return {"status": f"transferring the caller to {to}"}

    transfer_call.__doc__ = """Transfer the caller to another phone number (a cold transfer: you leave the call).

    Args:
        to: The number to transfer to, in E.164 form such as +15551234567.
    """
    description = (
        "Transfer the caller to another phone number (a cold transfer: you leave the call). "
        "Tell the caller you are transferring them first; the transfer starts once that has played. "
        f"Only these numbers may be dialled (a trailing * stands for any further digits): {listed}."
    )
    return Tool(transfer_call, description=description, irreversible=True)


async def send_digits(digits: str) -> dict[str, str]:
    """Press keypad keys (DTMF) on the call, e.g. to navigate a phone menu.

    Args:
        digits: Keys to press: 0-9, * and #; w waits half a second.
    """
    if not DTMF_DIGITS.match(digits):
        raise ToolError(f"cannot send {digits!r}: use up to 32 of 0-9, *, #, w and W")
    raise ToolError(
        "keypad tones cannot be sent on this call: Twilio Media Streams carry no outbound DTMF, and playing "
        "tones through Twilio would end this conversation; tell the caller you cannot press keys"
    )


BUILTINS: dict[str, Tool] = {
    "end_call": Tool(end_call, description=END_CALL_DESCRIPTION, respond=False, irreversible=True),
    "transfer_call": transfer_tool(()),  # load_toolset substitutes the configured list
    "send_digits": Tool(send_digits),
}
DEFAULT_BUILTINS = ("end_call", "transfer_call")
"""Offered unless the tools module sets ``BUILTIN_TOOLS``; transfer_call needs Twilio REST credentials
and ``MEDIASERVER_TRANSFER_NUMBERS``."""
