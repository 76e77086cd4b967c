"""Errors raised by the sans-I/O protocol cores, split by whose fault they are.

Same split as h11 (``h11/_util.py``):

* :class:`LocalProtocolError`: *we* misused a core (sent a command that is
  illegal in the current state, called into a dead core, built an invalid
  command).
* :class:`RemoteProtocolError`: the *peer* sent something malformed or out of
  place.

After either one is raised by a core's ``receive_message`` or ``send``, that core
is in its ``ERROR`` state and every further call raises
:class:`LocalProtocolError`.  Errors raised while *building* a command (before
any core sees it) leave all cores untouched.
"""

from __future__ import annotations

__all__ = [
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_PROTOCOL_ERROR",
    "LocalProtocolError",
    "ProtocolError",
    "RemoteProtocolError",
]

# WebSocket close codes (RFC 6455 §7.4.1) offered as hints to the transport layer,
# the way h11 offers ``error_status_hint`` for HTTP.
CLOSE_PROTOCOL_ERROR = 1002  # RFC 6455 §7.4.1: "terminating the connection due to a protocol error"
CLOSE_MESSAGE_TOO_BIG = 1009  # RFC 6455 §7.4.1: "received a message that is too big for it to process"
CLOSE_INTERNAL_ERROR = 1011  # RFC 6455 §7.4.1 / IANA registry: "unexpected condition"


class ProtocolError(Exception):
    """Base class of both protocol errors.

    ``close_code_hint`` is the WebSocket close code the transport may use when
    it tears the connection down because of this error.
    """

    def __init__(self, message: str, *, close_code_hint: int = CLOSE_PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.close_code_hint = close_code_hint


class LocalProtocolError(ProtocolError):
    """We misused the API: illegal command for the state, dead core, bad command."""

    def __init__(self, message: str, *, close_code_hint: int = CLOSE_INTERNAL_ERROR) -> None:
        super().__init__(message, close_code_hint=close_code_hint)


class RemoteProtocolError(ProtocolError):
    """The peer sent malformed, oversized or out-of-place data."""
