"""A lean client WebSocket for provider links: wsproto on a Trio stream, no background task.

Why not trio-websocket: a provider link sends a message every 20 ms per
call, and trio-websocket pays per message for a reader task and a channel
hop on the way in, and two lock round trips through the scheduler on the
way out (the link's own lock, then the connection's).  Here the one task
that calls :meth:`ClientWebSocket.receive` reads the socket itself, sends
take one lock that does not yield when it is free, and data frames are
built by :func:`data_frame` (wsproto still does the handshake, parsing and
control frames).

The contract is what :mod:`mediaserver.transport.provider_ws` needs:

* :func:`connect` does the opening handshake on an open stream; a refusal
  raises :class:`HandshakeRejected` (with the HTTP status), a dead socket
  :class:`WebSocketClosed`;
* :meth:`~ClientWebSocket.receive` returns whole text or binary messages,
  answers pings, and raises :class:`WebSocketClosed` once the connection is
  closed (a close frame, the TCP connection dropping, a protocol error or a
  message over ``max_message_size``, which is refused with 1009); one task
  at a time may receive;
* :meth:`~ClientWebSocket.send` may be called from any number of tasks;
* :meth:`~ClientWebSocket.aclose` runs the close handshake (bound it with a
  timeout); the caller owns and closes the stream.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

__all__ = ["ClientWebSocket", "HandshakeRejected", "WebSocketClosed", "connect", "data_frame"]

RECEIVE_BYTES = 64 * 1024

Stream = trio.abc.Stream


class WebSocketClosed(Exception):
    """The connection is closed: ``code`` (RFC 6455 status, 1006 without a close frame) and ``reason``."""

    def __init__(self, code: int, reason: str = "") -> None:
        self.code = code
        self.reason = reason
        try:
            name = CloseReason(code).name
        except ValueError:
            name = ""
        super().__init__(" ".join(part for part in (str(code), name, reason) if part))


class HandshakeRejected(Exception):
    """The server answered the upgrade with an HTTP status instead of 101."""

    def __init__(self, status_code: int) -> None:
        self.status_code = status_code
        super().__init__(f"the server refused the WebSocket upgrade with HTTP {status_code}")


class ClientWebSocket:
    """One open client connection (see the module docstring); made by :func:`connect`."""

    def __init__(self, stream: Stream, ws: WSConnection, max_message_size: int) -> None:
        self._stream = stream
        self._ws = ws
        self._max = max_message_size
        self._lock = trio.StrictFIFOLock()
        self._messages: deque[str | bytes] = deque()
        self._parts: list[str] | list[bytes] = []
        self._size = 0
        self._accepted = False
        self._rejected: int | None = None
        self.closed: WebSocketClosed | None = None

    # -- sending ---------------------------------------------------------------

    async def send(self, message: str | bytes) -> None:
        """Send one message; raises :class:`WebSocketClosed` when the connection is closed."""
        if self.closed is not None:
            raise self.closed
        await self._send(message)

    async def _send(self, event: Event | str | bytes) -> None:
        """Send a message (framed here) or a control event (framed by wsproto), in call order."""
        # A free lock is taken without a trip through the scheduler
        # (trio.Lock.acquire always yields); a busy one is waited for in order.
        lock = self._lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            if isinstance(event, (str, bytes)):
                if self._ws.state is not ConnectionState.OPEN:
                    raise self._closed_now(CloseReason.ABNORMAL_CLOSURE, "closing")
                data = self._frame(event)
            else:
                try:
                    data = self._ws.send(event)
                except LocalProtocolError:  # the close handshake has begun
                    raise self._closed_now(CloseReason.ABNORMAL_CLOSURE, "closing") from None
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise self._closed_now(CloseReason.ABNORMAL_CLOSURE) from None
        finally:
            lock.release()

    def _frame(self, message: str | bytes) -> bytes:
        """One whole data frame: masked, as a client's must be (ws_server.py overrides it)."""
        return data_frame(message)

    def _closed_now(self, code: int, reason: str = "") -> WebSocketClosed:
        if self.closed is None:
            self.closed = WebSocketClosed(code, reason)
        return self.closed

    # -- receiving -------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next whole message; raises :class:`WebSocketClosed` once the connection is closed."""
        while not self._messages:
            if self.closed is not None:
                raise self.closed
            await self._read()
        return self._messages.popleft()

    async def _read(self) -> bool:
        """Read once from the socket and handle every event it completes; False once it is gone."""
        try:
            data = await self._stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self._closed_now(CloseReason.ABNORMAL_CLOSURE)
            return False
        try:
            self._ws.receive_data(data if isinstance(data, bytes) else bytes(data))
            events = list(self._ws.events())
        except RemoteProtocolError as exc:
            self._closed_now(CloseReason.PROTOCOL_ERROR, str(exc))
            if exc.event_hint is not None:
                await self._send_quietly(exc.event_hint)
            return False
        for event in events:
            await self._handle(event)
        return True

    async def _handle(self, event: Event) -> None:
        if isinstance(event, Message):
            if self.closed is not None:
                return
            self._size += len(event.data)
            if self._size > self._max:
                self._closed_now(CloseReason.MESSAGE_TOO_BIG, f"message over {self._max} bytes")
                await self._send_quietly(CloseConnection(CloseReason.MESSAGE_TOO_BIG))
                return
            self._parts.append(event.data)  # text and binary never interleave
            if event.message_finished:
                parts, self._parts, self._size = self._parts, [], 0
                if isinstance(event, TextMessage):
                    self._messages.append(parts[0] if len(parts) == 1 else "".join(parts))  # type: ignore[arg-type]
                else:
                    self._messages.append(parts[0] if len(parts) == 1 else b"".join(parts))  # type: ignore[arg-type]
        elif isinstance(event, Ping):
            await self._send_quietly(event.response())
        elif isinstance(event, CloseConnection):
            self._closed_now(event.code, event.reason or "")
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                await self._send_quietly(event.response())
        elif isinstance(event, AcceptConnection):
            self._accepted = True
        elif isinstance(event, RejectConnection):
            self._rejected = event.status_code
        # Pong, RejectData: nothing to do

    async def _send_quietly(self, event: Event) -> None:
        """A control reply; a connection already gone is not an error here."""
        try:
            await self._send(event)
        except WebSocketClosed:
            pass

    # -- closing ---------------------------------------------------------------

    async def aclose(self, code: int = CloseReason.NORMAL_CLOSURE) -> None:
        """Close handshake: send a close frame, read until the server's (bound this with a timeout)."""
        if self._ws.state is ConnectionState.OPEN:
            self._closed_now(code, "closed by us")
            await self._send_quietly(CloseConnection(code))
        while self._ws.state is ConnectionState.LOCAL_CLOSING and await self._read():
            pass
        self._messages.clear()


def data_frame(message: str | bytes) -> bytes:
    """One whole client message as a masked RFC 6455 frame (FIN, text or binary opcode).

    Equivalent to what wsproto builds for ``TextMessage``/``BytesMessage``
    with no extension negotiated (we offer none), at a quarter of the cost:
    this runs for every 20 ms audio frame of every call.
    """
    if isinstance(message, str):
        payload, opcode = message.encode(), 0x81
    else:
        payload, opcode = message, 0x82
    size = len(payload)
    if size < 126:
        head = bytes((opcode, 0x80 | size))
    elif size < 1 << 16:
        head = bytes((opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    key = os.urandom(4)
    mask = int.from_bytes((key * (size // 4 + 1))[:size], "little")
    return head + key + (int.from_bytes(payload, "little") ^ mask).to_bytes(size, "little")


async def connect(
    stream: Stream,
    host: str,
    resource: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    max_message_size: int,
) -> ClientWebSocket:
    """Run the opening handshake on ``stream`` (``host`` is the Host header) and return the connection."""
    ws = WSConnection(ConnectionType.CLIENT)
    conn = ClientWebSocket(stream, ws, max_message_size)
    request = Request(host=host, target=resource, extra_headers=[(k.encode(), v.encode()) for k, v in headers])
    try:
        await stream.send_all(ws.send(request))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise WebSocketClosed(CloseReason.ABNORMAL_CLOSURE, "closed during the handshake") from None
    while not conn._accepted:
        if conn._rejected is not None:
            raise HandshakeRejected(conn._rejected)
        if conn.closed is not None:
            raise WebSocketClosed(conn.closed.code, "closed during the handshake")
        await conn._read()
    return conn
