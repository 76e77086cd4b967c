"""Our own TCP connections: Media Streams upgrades served here, every other connection by Hypercorn.

:class:`ConnectionRouter` is the per-connection handler of the server's
listener (:mod:`mediaserver.server`).  It reads the first request head with
h11 (at most :data:`HEAD_LIMIT` bytes, within ``head_timeout_s``).  A
``GET`` of the Media Streams path with ``Upgrade: websocket`` that wsproto
accepts as a handshake is served by
:func:`mediaserver.transport.ws_server.serve_media_stream` on this very
socket.  Any other connection (including a malformed or slow head) is given
to Hypercorn as it would have been, through a :class:`ReplayStream` that
hands Hypercorn the bytes already read before reading the socket again; a
later upgrade on a kept-alive HTTP connection still reaches the ASGI route
(:mod:`mediaserver.transport.twilio_ws`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import h11
import trio
from wsproto import WSConnection

from mediaserver.transport.ws_server import StreamHandler, parse_upgrade, refusal, serve_media_stream

__all__ = ["HEAD_LIMIT", "ConnectionRouter", "ReplayStream", "read_head"]

log = logging.getLogger("mediaserver.http")

HEAD_LIMIT = 16 * 1024  # Hypercorn's own h11 limit is 16 KiB too (h11_max_incomplete_size)
RECEIVE_BYTES = 64 * 1024

OtherHandler = Callable[["ReplayStream"], Awaitable[None]]


class ReplayStream(trio.abc.HalfCloseableStream):
    """A socket stream whose first reads return ``buffered``: bytes already read off it.

    Hypercorn's ``TCPServer`` reads ``.socket`` for the addresses and finds
    no ``do_handshake`` (so: plain TCP), as with the stream it would have had.
    """

    def __init__(self, stream: trio.SocketStream, buffered: bytes) -> None:
        self.transport = stream
        self.socket = stream.socket
        self._buffered = buffered

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._buffered:
            size = len(self._buffered) if max_bytes is None else max_bytes
            data, self._buffered = self._buffered[:size], self._buffered[size:]
            await trio.lowlevel.checkpoint()
            return data
        data = await self.transport.receive_some(max_bytes)
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.transport.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport.send_eof()

    async def aclose(self) -> None:
        await self.transport.aclose()


async def read_head(stream: trio.abc.ReceiveStream, timeout_s: float) -> tuple[bytes, h11.Request | None, bytes]:
    """Every byte read, the first request head if it came whole and well-formed in time, and the bytes after it.

    (The bytes after the head: what a client sent before our answer, such
    as WebSocket frames pipelined with its upgrade request.)
    """
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
    buffered = bytearray()
    with trio.move_on_after(timeout_s):
        while True:
            try:
                data = await stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            buffered += data
            try:
                parser.receive_data(bytes(data))
                event = parser.next_event()
            except h11.RemoteProtocolError:
                break
            if isinstance(event, h11.Request):
                return bytes(buffered), event, parser.trailing_data[0]
            if event is not h11.NEED_DATA or not data:
                break
    return bytes(buffered), None, b""


def _is_media_upgrade(request: h11.Request, path: bytes) -> bool:
    if request.method != b"GET" or request.target.partition(b"?")[0] != path or request.http_version != b"1.1":
        return False  # (an HTTP/1.0 upgrade goes to Hypercorn, which refuses it: RFC 6455 needs HTTP/1.1)
    return any(name == b"upgrade" and value.lower() == b"websocket" for name, value in request.headers)


class ConnectionRouter:
    """Serve one accepted connection: a Media Stream here, anything else via ``other`` (Hypercorn)."""

    def __init__(
        self,
        other: OtherHandler,
        handle_stream: StreamHandler,
        *,
        path: str,
        auth_token: str | None,
        public_url: str | None,
        max_message_size: int,
        head_timeout_s: float,
        instance_url: str | None = None,
    ) -> None:
        self.other = other
        self.handle_stream = handle_stream
        self.path = path
        self._path = path.encode()
        self.auth_token = auth_token
        self.public_url = public_url
        self.instance_url = instance_url
        self.max_message_size = max_message_size
        self.head_timeout_s = head_timeout_s

    async def __call__(self, stream: trio.SocketStream) -> None:
        try:
            head, request, early = await read_head(stream, self.head_timeout_s)
            if request is not None and _is_media_upgrade(request, self._path):
                parsed = parse_upgrade(head)
                if parsed is not None:
                    async with stream:
                        await self._serve_upgrade(stream, request, parsed[0], early)
                    return
            if not head:  # closed (or silent) before sending anything
                await stream.aclose()
                return
            await self.other(ReplayStream(stream, head))
        except Exception:  # one connection's failure never takes the listener down
            log.exception("connection failed")
            await trio.aclose_forcefully(stream)

    async def _serve_upgrade(self, stream: trio.SocketStream, request: h11.Request, ws: WSConnection, early: bytes) -> None:
        try:
            host, port = stream.socket.getsockname()[:2]
            server_host = f"{host}:{port}"
        except OSError:
            server_host = ""
        status = refusal(
            request.headers,
            request.target,
            auth_token=self.auth_token,
            public_url=self.public_url,
            path=self.path,
            server_host=server_host,
            instance_url=self.instance_url,
        )
        await serve_media_stream(
            stream, ws, status, self.handle_stream, max_message_size=self.max_message_size, early=early
        )
