"""A bare WebSocket (RFC 6455) over Trio streams, both ends, for bench/isolation.py.

The isolation bench needs what a WebSocket library will not let a peer do:
send raw frames (fragments, pings, binary, a message larger than any limit)
as fast as the socket takes them, stop reading, reset the connection.  So
this is the wire only: :func:`frame` builds a frame, :class:`WebSocket`
sends bytes as given and reads whole messages (answering pings and closes
itself), :func:`accept` and :func:`connect` do the HTTP upgrade by hand.
No extension is offered or accepted.  A client masks with the all-zero key
(valid, and masking is then a no-op); what a client sends us is unmasked.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import os
import socket
import struct

import trio

from _loadgen import ZERO_KEY, apply_mask, http_header, ws_accept_key, ws_frame

__all__ = [
    "OP_BINARY",
    "OP_CLOSE",
    "OP_CONT",
    "OP_PING",
    "OP_TEXT",
    "Closed",
    "Message",
    "WebSocket",
    "accept",
    "connect",
    "frame",
]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA  # RFC 6455 5.2
_RECV_BYTES = 1 << 20
_MAX_HEAD_BYTES = 65536
_TCP_ESTABLISHED = 1  # linux/tcp_states.h; tcpi_state is the first byte of struct tcp_info
_NO_STATUS = 1005  # RFC 6455 7.4.1: a close frame without a code


def frame(opcode: int, payload: bytes, *, masked: bool, fin: bool = True) -> bytes:
    """One frame; ``masked`` (a client's) with the all-zero key, so the payload goes out as is."""
    return ws_frame(opcode, payload, masked, fin=fin)


class Closed(Exception):
    """The connection is over: a close frame (``code``, ``reason``), or the socket ended (``code`` None)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(reason if code is None else f"close {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Message:
    """A whole data message: its first frame's opcode (text or binary) and the payload of all its frames."""

    opcode: int
    payload: bytes


@dataclasses.dataclass
class _Frame:
    fin: bool
    opcode: int
    payload: bytes


class WebSocket:
    """One end of an open WebSocket; every write goes through one lock, so frames never interleave."""

    def __init__(self, stream: trio.SocketStream, *, client: bool, buffered: bytes = b"") -> None:
        self.stream = stream
        self.client = client  # a client masks what it sends
        self._buffer = bytearray(buffered)
        self._pos = 0  # where the next frame starts in _buffer (what is before it is consumed)
        self._lock = trio.StrictFIFOLock()

    def frame(self, opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
        """A frame as this end must send it (masked from a client)."""
        return frame(opcode, payload, masked=self.client, fin=fin)

    async def send_raw(self, data: bytes) -> None:
        """Bytes exactly as given (whole frames, or anything else); Closed if the socket is gone."""
        async with self._lock:
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise Closed(None, f"send failed: {exc.__cause__ or exc}") from None

    async def send_text(self, text: str) -> None:
        await self.send_raw(self.frame(OP_TEXT, text.encode()))

    async def receive(self) -> Message:
        """The next data message; pings are answered and pongs skipped on the way; Closed at a close or the end."""
        parts: list[bytes] = []
        opcode = OP_TEXT
        while True:
            got = self._next_frame()
            if got is None:
                await self._fill()
                continue
            if got.opcode == OP_PING:
                await self._answer(OP_PONG, got.payload)
            elif got.opcode == OP_PONG:
                await trio.lowlevel.checkpoint()  # (a flood of them must not hold up every other task)
            elif got.opcode == OP_CLOSE:
                code = struct.unpack(">H", got.payload[:2])[0] if len(got.payload) >= 2 else _NO_STATUS
                await self._answer(OP_CLOSE, got.payload[:2])
                raise Closed(code, got.payload[2:].decode("utf-8", "replace"))
            else:
                if got.opcode != OP_CONT:
                    opcode = got.opcode
                parts.append(got.payload)
                if got.fin:
                    return Message(opcode, b"".join(parts))

    async def reset(self) -> None:
        """Drop the connection with a TCP reset (SO_LINGER 0), no close frame."""
        with contextlib.suppress(OSError):  # (already closed: nothing to reset)
            self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()

    def established(self) -> bool:
        """The TCP connection is still open both ways (Linux TCP_INFO): the peer has neither closed nor reset it.

        True on a socket this end no longer reads: the kernel knows when the
        peer closes even when the application does not look.
        """
        try:
            info = self.stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
        except OSError:  # closed here
            return False
        return info[0] == _TCP_ESTABLISHED

    async def _answer(self, opcode: int, payload: bytes) -> None:
        with contextlib.suppress(Closed):  # (the read that follows says how it ended)
            await self.send_raw(self.frame(opcode, payload))

    async def _fill(self) -> None:
        del self._buffer[:self._pos]  # (once per read, not per frame: a read may hold thousands of frames)
        self._pos = 0
        try:
            data = await self.stream.receive_some(_RECV_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Closed(None, f"receive failed: {exc.__cause__ or exc}") from None
        if not data:
            raise Closed(None, "the peer closed the TCP connection without a close frame")
        self._buffer += data

    def _next_frame(self) -> _Frame | None:
        """The next whole frame in the buffer (consumed), or None until more bytes come."""
        b, start = self._buffer, self._pos
        if len(b) < start + 2:
            return None
        first, second = b[start], b[start + 1]
        n = second & 0x7F
        i = start + 2
        if n == 126:
            if len(b) < i + 2:
                return None
            n, i = struct.unpack_from(">H", b, i)[0], i + 2
        elif n == 127:
            if len(b) < i + 8:
                return None
            n, i = struct.unpack_from(">Q", b, i)[0], i + 8
        key = ZERO_KEY
        if second & 0x80:
            if len(b) < i + 4:
                return None
            key, i = bytes(b[i:i + 4]), i + 4
        if len(b) < i + n:
            return None
        self._pos = i + n
        return _Frame(bool(first & 0x80), first & 0x0F, bytes(b[i:i + n]) if key == ZERO_KEY else apply_mask(b[i:i + n], key))


async def _read_head(stream: trio.SocketStream) -> tuple[list[bytes], bytes]:
    """An HTTP head's lines (request or status line first) and the bytes after it."""
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > _MAX_HEAD_BYTES:
            raise Closed(None, "HTTP head over 64 KiB")
        chunk = await stream.receive_some(_MAX_HEAD_BYTES)
        if not chunk:
            raise Closed(None, "the connection closed during the WebSocket handshake")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), rest


async def accept(stream: trio.SocketStream) -> WebSocket:
    """The server side of the upgrade on an accepted connection."""
    lines, rest = await _read_head(stream)
    accept_key = ws_accept_key(http_header(lines, b"sec-websocket-key") or b"")
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept_key + b"\r\n\r\n"
    )
    return WebSocket(stream, client=False, buffered=rest)


async def connect(host: str, port: int, target: str) -> WebSocket:
    """The client side: a fresh TCP connection to ``host:port`` and the upgrade for ``target`` (path and query)."""
    stream = await trio.open_tcp_stream(host, port)
    try:
        key = base64.b64encode(os.urandom(16))
        await stream.send_all(
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode("latin-1")
        )
        lines, rest = await _read_head(stream)
        status = lines[0].split()
        if len(status) < 2 or status[1] != b"101":
            raise Closed(None, f"WebSocket upgrade refused: {lines[0][:80]!r}")
        if http_header(lines, b"sec-websocket-accept") != ws_accept_key(key):
            raise Closed(None, "WebSocket upgrade: wrong Sec-WebSocket-Accept")
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return WebSocket(stream, client=True, buffered=rest)
