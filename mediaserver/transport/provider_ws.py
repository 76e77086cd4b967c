"""A provider's sans-I/O core over a trio-websocket connection.

``open_provider_link`` connects (with a timeout), sends the core's
configuration and hands back a :class:`~mediaserver.bridge.link.ProviderLink`.
Leaving the ``async with`` block closes the socket: gracefully within
``disconnect_timeout_s`` when possible, at once (TCP close) when the call is
being cancelled.  Either way nothing is left open.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    ConnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    open_websocket_url,
)

from mediaserver.bridge.link import ProviderClosed
from mediaserver.protocol.errors import ProtocolError
from mediaserver.protocol.providers.base import AudioFormat, ProviderCommand, ProviderEvent, ProviderSession

__all__ = ["WebSocketLink", "open_provider_link"]

log = logging.getLogger("mediaserver.provider")

# A provider message is at most a few hundred ms of base64 audio; 8 MiB also
# leaves room for session echoes with long instructions and tool schemas.
MAX_PROVIDER_MESSAGE_BYTES = 8 * 1024 * 1024


class WebSocketLink:
    """A :class:`ProviderLink` backed by a sans-I/O core and a WebSocket."""

    def __init__(self, name: str, session: ProviderSession, ws: WebSocketConnection) -> None:
        self.name = name
        self.session = session
        self._ws = ws
        self._pending: deque[ProviderEvent] = deque()

    @property
    def input_format(self) -> AudioFormat:
        return self.session.input_format

    @property
    def output_format(self) -> AudioFormat:
        return self.session.output_format

    async def _send_all(self, messages: Sequence[str | bytes]) -> None:
        try:
            for message in messages:
                await self._ws.send_message(message)
        except ConnectionClosed as exc:
            raise ProviderClosed(f"{self.name} connection closed: {_reason(exc)}") from None

    async def send(self, command: ProviderCommand) -> None:
        await self._send_all(self.session.send(command))

    async def receive(self) -> ProviderEvent:
        while not self._pending:
            try:
                message = await self._ws.get_message()
            except ConnectionClosed as exc:
                raise ProviderClosed(f"{self.name} connection closed: {_reason(exc)}") from None
            try:
                self.session.receive_message(message)
            except ProtocolError as exc:
                raise ProviderClosed(f"{self.name} protocol error: {exc}") from None
            self._pending.extend(self.session.events())
        return self._pending.popleft()


def _reason(exc: ConnectionClosed) -> str:
    reason = exc.reason
    if reason is None:
        return "no close frame"
    return f"{reason.code} {reason.name} {reason.reason or ''}".strip()


@asynccontextmanager
async def open_provider_link(
    name: str,
    session: ProviderSession,
    url: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    connect_timeout_s: float = 10.0,
    disconnect_timeout_s: float = 1.0,
) -> AsyncIterator[WebSocketLink]:
    """Connect to ``url``, send the session's configuration, yield the link."""
    try:
        async with open_websocket_url(
            url,
            extra_headers=[(k.encode(), v.encode()) for k, v in headers],
            max_message_size=MAX_PROVIDER_MESSAGE_BYTES,
            connect_timeout=connect_timeout_s,
            disconnect_timeout=disconnect_timeout_s,
        ) as ws:
            link = WebSocketLink(name, session, ws)
            await link._send_all(session.initial_messages())
            yield link
    except ConnectionTimeout:
        raise ProviderClosed(f"{name}: no connection to {_safe(url)} within {connect_timeout_s:g} s") from None
    except ConnectionRejected as exc:
        raise ProviderClosed(f"{name}: {_safe(url)} rejected the connection with HTTP {exc.status_code}") from None
    except HandshakeError as exc:
        raise ProviderClosed(f"{name}: cannot connect to {_safe(url)}: {exc.__cause__ or exc}") from None


def _safe(url: str) -> str:
    """The URL without its query string (which may carry keys)."""
    return url.split("?", 1)[0]
