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

from mediaserver.transport.ws_server import (
    StreamHandler,
    parse_upgrade,
    refusal,
    serve_media_stream,
    valid_websocket_key,
)

__all__ = ["HEAD_LIMIT", "ConnectionRouter", "ReplayStream", "read_head", "watch_connection"]

log = logging.getLogger("mediaserver.http")

HEAD_LIMIT = 16 * 1024  # Hypercorn's own h11 limit is 16 KiB too (h11_max_incomplete_size)
RECEIVE_BYTES = 64 * 1024
SEND_PIECE = 64 * 1024  # an HTTP connection's sends, as the watch times them

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
        # For watch_connection: when bytes last moved either way, since when a send waits, and whether a send
        # found the client gone.
        self.active_s = trio.current_time()
        self.sending_since_s: float | None = None
        self.broken = trio.Event()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._buffered:
            size = len(self._buffered) if max_bytes is None else max_bytes
            data, self._buffered = self._buffered[:size], self._buffered[size:]
            await trio.lowlevel.checkpoint()
            return data
        data = await self.transport.receive_some(max_bytes)
        self.active_s = trio.current_time()
        return bytes(data)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            # In pieces: a client that reads, however slowly, makes progress on each, and only one that reads
            # nothing for the watch's send limit is cut off (a long answer is not timed as a whole).
            for start in range(0, max(len(view), 1), SEND_PIECE):
                self.sending_since_s = trio.current_time()
                await self.transport.send_all(view[start : start + SEND_PIECE])
                self.active_s = trio.current_time()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken.set()
            raise
        finally:
            self.sending_since_s = None

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.transport.send_eof()

    async def aclose(self) -> None:
        await self.transport.aclose()


WATCH_EVERY_S = 1.0  # how often watch_connection looks
GONE_GRACE_S = 1.0  # a connection whose client is gone gets this long to end by itself


async def watch_connection(stream: ReplayStream, scope: trio.CancelScope, *, idle_s: float, send_s: float) -> None:
    """Close a Hypercorn connection that makes no progress: run it next to the connection, in ``scope``.

    Hypercorn bounds a connection's head, body and keep-alive idle time, but
    not its sends (they are shielded), and a connection whose client stopped
    reading or went away in the middle of pipelined requests waited for ever,
    its file descriptor with it.  So: a send that has waited ``send_s`` (the
    client reads nothing), nothing received or sent for ``idle_s`` while no
    send waits, or a client found gone and the connection not over
    ``GONE_GRACE_S`` later: the socket is closed (which ends a waiting send)
    and ``scope`` cancelled (which ends what waits for anything else).
    """
    try:
        why = None
        while why is None:
            with trio.move_on_after(WATCH_EVERY_S):
                await stream.broken.wait()
            if stream.broken.is_set():
                await trio.sleep(GONE_GRACE_S)  # (a connection that ends meanwhile cancels this watch)
                why = "the client is gone"
                continue
            now = trio.current_time()
            if stream.sending_since_s is not None:
                if now - stream.sending_since_s >= send_s:
                    why = f"the client read nothing for {send_s:g} s"
            elif now - stream.active_s >= idle_s:
                why = f"nothing sent or received for {idle_s:g} s"
        try:
            peer = "%s:%s" % stream.socket.getpeername()[:2]
        except OSError:
            peer = "a client"
        log.info("HTTP connection from %s closed: %s", peer, why)
        scope.cancel()
    finally:
        # Also when the watch is cancelled: the connection ended (closing again is a no-op), or the server is
        # shutting down, and a send stuck on a client that reads nothing (shielded) would hold its exit for ever.
        await trio.aclose_forcefully(stream.transport)


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
    """A WebSocket upgrade of the Media Streams path (of any HTTP version: an HTTP/1.0 one is refused here)."""
    if request.method != b"GET" or request.target.partition(b"?")[0] != path:
        return False
    return any(name == b"upgrade" and value.lower() == b"websocket" for name, value in request.headers)


_BAD_UPGRADE_BODY = (
    b"not a WebSocket handshake this server takes (RFC 6455: HTTP/1.1, a Sec-WebSocket-Key and "
    b"Sec-WebSocket-Version: 13)\n"
)
BAD_UPGRADE = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(_BAD_UPGRADE_BODY)
) + _BAD_UPGRADE_BODY
ANSWER_LIMIT_S = 5.0  # a refusal that the client does not read in this time is not waited for


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
                parsed = parse_upgrade(head) if request.http_version == b"1.1" and valid_websocket_key(request.headers) else None
                async with stream:
                    if parsed is not None:
                        await self._serve_upgrade(stream, request, parsed[0], early)
                    else:  # (Hypercorn answered these 400 too, and then kept the connection open)
                        with trio.move_on_after(ANSWER_LIMIT_S):
                            try:
                                await stream.send_all(BAD_UPGRADE)
                            except (trio.BrokenResourceError, trio.ClosedResourceError):
                                pass  # (gone already: nothing to tell it)
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
