"""A lean client WebSocket for provider links: wsproto on a Trio stream, no background task.

Why not trio-websocket: a provider link sends a message every 20 ms per
call, and trio-websocket pays per message for a reader task and a channel
hop on the way in, and two lock round trips through the scheduler on the
way out (the link's own lock, then the connection's).  Here the one task
that calls :meth:`ClientWebSocket.receive` reads the socket itself, sends
take one lock that does not yield when it is free, and data frames are
built by :func:`data_frame` (wsproto still does the handshake and control
frames).

Parsing has a native fast path (:func:`mediaserver._native._wsframe.scan`):
while wsproto holds no bytes and is not inside a message, plain whole data
frames (FIN, text/binary, no RSV bits, expected masking, minimal length,
within ``max_message_size``, valid UTF-8 for text) are unmasked and decoded
in C; at the first frame that is anything else the rest of the bytes goes to
wsproto, which then handles every unusual case as before and is left to
drain before the fast path resumes.  A frame cut off at the end of a read is
kept here (up to ``RECEIVE_BYTES``) until the rest arrives.

The contract is what :mod:`mediaserver.transport.provider_ws` needs:

* :func:`connect` does the opening handshake on an open stream; a refusal
  raises :class:`HandshakeRejected` (with the HTTP status), a dead socket
  :class:`WebSocketClosed`;
* :meth:`~ClientWebSocket.receive` returns whole text or binary messages,
  answers pings, and raises :class:`WebSocketClosed` once the connection is
  closed (a close frame, the TCP connection dropping, a protocol error or a
  message over ``max_message_size``, which is refused with 1009); one task
  at a time may receive;
* :meth:`~ClientWebSocket.send` may be called from any number of tasks; a
  write the socket refuses (the peer reset the connection) raises
  :class:`WebSocketClosed` (1006) and so does every later send, but
  receiving goes on: what the peer sent before it went (a goodbye, its
  close frame) is still read, then the end of the connection;
* :meth:`~ClientWebSocket.aclose` runs the close handshake (bound it with a
  timeout); the caller owns and closes the stream;
* on plain TCP or our TLS stream (:meth:`~ClientWebSocket.poll_socket` is
  the socket to watch), code
  that must not await -- a :mod:`~mediaserver.transport.reactor` handler --
  uses :meth:`~ClientWebSocket.read_nowait` (one non-blocking read through
  the native parser; messages land in :attr:`~ClientWebSocket.inbox`; False
  hands over to :meth:`~ClientWebSocket.receive` for anything unusual) and
  :meth:`~ClientWebSocket.send_many_nowait` (what the socket cannot take at
  once waits in a backlog that the next send, or
  :meth:`~ClientWebSocket.flush`, writes first).
"""

from __future__ import annotations

import json
import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Literal

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.frame_protocol import CloseReason
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from mediaserver._locks import acquire
from mediaserver._native._wsframe import DONE, INCOMPLETE, encode_frame, scan
from mediaserver.transport.tls import TLSStream

__all__ = ["ClientWebSocket", "HandshakeRejected", "WebSocketClosed", "connect", "data_frame"]

RECEIVE_BYTES = 64 * 1024
SLOW_EVENTS_PER_TURN = 64  # wsproto events handled between checkpoints (other calls run between them)

Stream = trio.abc.Stream


CLOSED_BY_US = "closed by us"  # the reason of a close our side started (aclose)


class WebSocketClosed(Exception):
    """The connection is closed: ``code`` (RFC 6455 status, 1006 without a close frame) and ``reason``.

    ``violation``: we closed it because the peer broke the protocol (bad
    framing or UTF-8, a message over the size limit), not the peer.
    """

    def __init__(self, code: int, reason: str = "", *, violation: bool = False) -> None:
        self.code = code
        self.reason = reason
        self.violation = violation
        try:
            name = CloseReason(code).name
        except ValueError:
            name = ""
        super().__init__(" ".join(part for part in (str(code), name, reason) if part))


# How much of a refusal's body is kept (its start says why: "Incorrect API key provided", "model not found")
REJECT_BODY_BYTES = 1024
REJECT_BODY_WAIT_S = 1.0  # the body is waited for this long at most


class HandshakeRejected(Exception):
    """The server answered the upgrade with an HTTP status instead of 101; ``body``: the start of its body."""

    def __init__(self, status_code: int, body: bytes = b"") -> None:
        self.status_code = status_code
        self.body = body
        super().__init__(f"the server refused the WebSocket upgrade with HTTP {status_code}")

    @property
    def reason(self) -> str:
        """Why, from the body, on one line: a JSON error's message (``{"error": {"message": …}}``, ``{"message":
        …}``, ``{"error": "…"}``, ``{"detail": …}``) or else the text itself; "" when there was none."""
        text = self.body.decode("utf-8", "replace")
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            for found in (doc.get("error"), doc):
                if isinstance(found, dict):
                    found = found.get("message") or found.get("detail")
                if isinstance(found, str) and found.strip():
                    text = found
                    break
        return " ".join(text.split())[:300]


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
        self._reject_body = bytearray()
        self._reject_done = False  # the whole body of a refusal is here (or there is none)
        self._masked_in = not ws.client  # a server receives masked frames, a client unmasked ones
        self._tail = b""  # the start of a plain frame cut off by the last read (fast path only)
        self._sock = raw_socket(stream)  # plain TCP: read and write the socket directly
        self._tls = stream if isinstance(stream, TLSStream) else None  # our TLS: its non-blocking calls
        self._wsproto_fed = True  # wsproto was given bytes since it was last seen idle (the handshake, to start)
        self._stash: bytes | None = None  # bytes read_nowait left for wsproto (b"": the peer closed)
        self._backlog = bytearray()  # frames send_many_nowait could not write at once, oldest first
        # wsproto failed on the peer's bytes: nothing more is read or written, the close handshake
        # cannot complete, the caller just closes the socket.
        self._broken = False
        self.closed: WebSocketClosed | None = None
        # Set with closed, or alone when a write failed: the peer has gone (a reset), but what it sent before
        # is still in the socket and is read on, to the end (a goodbye, its close frame).
        self._unsendable: WebSocketClosed | None = None
        self.received_bytes = 0  # read from the peer so far (a liveness watch compares it)
        self._abort_reason: str | None = None  # why abort() cut the connection (the end's reason)

    # -- sending ---------------------------------------------------------------

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping (the peer's pong, like anything it sends, adds to :attr:`received_bytes`)."""
        await self._send(Ping(payload))

    def abort(self, reason: str) -> None:
        """Cut the connection (both ways) without closing the socket: a reader sees its end, with ``reason``.

        For a peer that has stopped answering: no close frame is sent (it
        would not be read), and the socket stays open for its owner to
        unregister and close as usual.
        """
        if self._abort_reason is not None or self.closed is not None:
            return
        self._abort_reason = reason
        sock = self.poll_socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    async def send(self, message: str | bytes) -> None:
        """Send one message; raises :class:`WebSocketClosed` when the connection is closed (or a write failed)."""
        if self._unsendable is not None:
            raise self._unsendable
        await self._send(message)

    async def send_many(self, messages: Sequence[str | bytes]) -> None:
        """Send several messages in order as one write (one system call); as :meth:`send`.

        The messages are framed before the send lock is taken, and the lock
        is taken in call order (FIFO), so messages from concurrent callers
        never interleave and go out in the order the calls were made.
        """
        if self._unsendable is not None:
            raise self._unsendable
        if len(messages) == 1:  # the usual case (an audio append): no list, no join, no copy
            await self._send_frames(self._frame(messages[0]))
        elif messages:
            frame = self._frame
            await self._send_frames(b"".join([frame(message) for message in messages]))

    def send_many_nowait(self, messages: Sequence[str | bytes]) -> bool:
        """Send several messages without waiting: True if they are on the socket, False if queued.

        For plain-TCP connections (:meth:`poll_socket` is not None), from code
        that must not block (a :mod:`~mediaserver.transport.reactor`
        handler).  The frames go out in one write at once when no other
        send holds the connection and the kernel takes them whole; otherwise
        (what is left of) them joins a backlog, behind anything already
        there, and the caller must make sure :meth:`flush` runs.  Messages
        sent this way keep their order among themselves and relative to
        sends made after them; raises :class:`WebSocketClosed` as :meth:`send`.
        """
        if self._unsendable is not None:
            raise self._unsendable
        frame = self._frame
        return self._write_nowait(frame(messages[0]) if len(messages) == 1 else b"".join([frame(message) for message in messages]))

    def _write_nowait(self, data: bytes) -> bool:
        """Whole frames ``data`` out at once, or into the backlog (see :meth:`send_many_nowait`)."""
        sock = self._sock
        assert sock is not None or self._tls is not None, "send_many_nowait needs poll_socket()"
        if self._backlog or self._lock.locked():
            self._backlog += data
            return False
        # (no wsproto state check: every way out of OPEN sets self.closed first, checked above)
        if sock is None:  # TLS: encrypted now; ciphertext the socket did not take waits in the TLS stream
            try:
                return self._tls.send_nowait(data)  # type: ignore[union-attr]
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise self._write_failed() from None
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            raise self._write_failed() from None
        if sent == len(data):
            return True
        self._backlog += memoryview(data)[sent:]
        return False

    @property
    def backlogged(self) -> bool:
        """True while frames :meth:`send_many_nowait` queued wait for :meth:`flush` (never once a write failed)."""
        if self._unsendable is not None and self.closed is None:
            return False
        return bool(self._backlog) or (self._tls is not None and self._tls.unsent)

    @property
    def backlog_bytes(self) -> int:
        """How much of what :meth:`send_many_nowait` queued waits for the socket (frames, or their ciphertext)."""
        return len(self._backlog) + (self._tls.unsent_bytes if self._tls is not None else 0)

    async def flush(self) -> None:
        """Write the backlog :meth:`send_many_nowait` left (under the send lock); as :meth:`send`."""
        while self.backlogged:  # frames queued while this write waited are written too
            await self._send_frames(b"")

    async def _send(self, event: Event | str | bytes) -> None:
        """Send a message (framed here) or a control event (framed by wsproto), in call order."""
        if isinstance(event, (str, bytes)):
            await self._send_frames(self._frame(event))
        else:
            await self._send_frames(None, event)

    async def _send_frames(self, data: bytes | None, event: Event | None = None) -> None:
        """Write whole data frames ``data`` (or wsproto's bytes for ``event``) under the send lock."""
        lock = self._lock
        if data and (self._backlog or lock.locked()):
            # Take a place in the queue now: send_many_nowait calls made while
            # this waits for the lock must go out after it, not before.
            self._backlog += data
            data = b""
        await acquire(lock)
        try:
            if self._broken:
                raise self._closed_now(CloseReason.ABNORMAL_CLOSURE, "broken")
            if self._unsendable is not None and self.closed is None:  # a write failed (see _unsendable)
                raise self._unsendable
            if event is not None:
                self._wsproto_fed = True  # (a close changes its state: the fast path re-checks)
                try:
                    data = self._ws.send(event)
                except LocalProtocolError:  # the close handshake has begun
                    raise self._closed_now(CloseReason.ABNORMAL_CLOSURE, "closing") from None
            elif self._ws.state is not ConnectionState.OPEN:
                raise self._closed_now(CloseReason.ABNORMAL_CLOSURE, "closing")
            assert data is not None
            if self._backlog:  # what send_many_nowait queued was sent before this
                data, self._backlog = bytes(self._backlog) + data, bytearray()
            try:
                if self._sock is not None:
                    await _send_raw(self._sock, data, self._requeue)
                else:
                    await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise self._write_failed() from None
        finally:
            lock.release()

    def _frame(self, message: str | bytes) -> bytes:
        """One whole data frame: masked, as a client's must be (ws_server.py overrides it)."""
        return data_frame(message)

    def _requeue(self, unsent: memoryview) -> None:
        """A write was cancelled: what it did not send goes back to the front of the backlog.

        It may begin inside a frame whose start is on the wire already (the
        cancelled write's own, or one ``send_many_nowait`` left half-sent), so
        it must go out before anything else: frames stay whole and in order,
        and a later close frame follows them (or, if the peer never reads
        again, the close times out and the socket is dropped).
        """
        if unsent:
            self._backlog[:0] = unsent

    def _closed_now(self, code: int, reason: str = "", *, violation: bool = False) -> WebSocketClosed:
        if self.closed is None:
            self.closed = WebSocketClosed(code, reason, violation=violation)
            if self._unsendable is None:
                self._unsendable = self.closed
        return self.closed

    def _write_failed(self) -> WebSocketClosed:
        """A write failed: nothing more can be sent, but reading goes on (see ``_unsendable``)."""
        if self._unsendable is None:
            self._unsendable = WebSocketClosed(
                CloseReason.ABNORMAL_CLOSURE, self._abort_reason or "the connection failed while sending"
            )
        self._backlog = bytearray()  # (it can never go: nothing is left to flush)
        return self._unsendable

    @property
    def write_failed(self) -> bool:
        """True once a write failed while the connection was not yet closed: only reading is left."""
        return self._unsendable is not None and self.closed is None

    # -- receiving -------------------------------------------------------------

    async def receive(self) -> str | bytes:
        """The next whole message; raises :class:`WebSocketClosed` once the connection is closed."""
        while not self._messages:
            if self.closed is not None:
                raise self.closed
            await self._read()
        return self._messages.popleft()

    def poll_socket(self) -> socket.socket | None:
        """The socket to watch for :meth:`read_nowait` (plain TCP, or under our TLS); None for other streams."""
        if self._sock is not None:
            return self._sock
        return self._tls.raw_socket if self._tls is not None else None

    def input_waiting(self) -> bool:
        """Bytes from the peer wait, not read yet: in the socket, or (ciphertext) in our TLS stream."""
        if self._tls is not None and self._tls.buffered_in:
            return True
        sock = self.poll_socket()
        if sock is None:
            return False
        try:
            return bool(sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except OSError:  # (BlockingIOError: nothing there)
            return False

    @property
    def inbox(self) -> deque[str | bytes]:
        """The whole messages read and not yet received, oldest first: a reactor handler pops them from the left."""
        return self._messages

    def read_first(self, data: bytes) -> None:
        """Take ``data`` as read before the socket's next bytes (what came with the handshake, after its head).

        Only before anything was read: :meth:`receive` parses it first
        (and :meth:`read_nowait` hands over to it for that).
        """
        if data:
            assert self._stash is None and not self._messages, "read_first after reading"
            self._stash = data

    def read_nowait(self) -> bool:
        """Read once without blocking, parse with the fast path only; False when :meth:`receive` must take over.

        For a reader driven by socket readiness (:mod:`mediaserver.transport.reactor`):
        the messages land in :attr:`inbox`.  While the inbox holds messages
        it reads nothing from the socket (True: go on taking them), so a
        flood waits in the socket, not in memory.  False
        means the peer closed, or the bytes need wsproto (a control frame, a
        fragment, anything unusual): they are kept, and the next
        :meth:`receive` handles them before reading again.
        """
        sock = self._sock
        if self._stash is not None or self.closed is not None:
            return False
        if self._messages and (self._tls is None or not self._tls.buffered_in):
            # What was read is taken first (a handler takes MESSAGES_PER_TURN at a time); the socket's readiness
            # will report the rest.  Not what our TLS stream holds already (the awaiting path decrypts one record
            # per read and leaves the others there): readiness never reports that, so it is decrypted now.
            return True
        data: bytes | None
        if sock is not None:
            try:
                data = sock.recv(RECEIVE_BYTES)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                data = b""
        elif self._tls is not None:
            try:
                data = self._tls.receive_nowait()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if data is None:  # nothing whole yet
                return True
        else:
            return False
        if not data:
            self._stash = b""
            return False
        self.received_bytes += len(data)
        rest = self._scan_fast(data)
        if self._tls is not None and (self._tls.at_eof or self._tls.failed):
            # The peer's close_notify (or a record that broke the TLS stream)
            # came with this data: the socket may stay open and quiet, so no
            # readiness will follow; the awaiting path takes over now and sees
            # the end of the stream.
            self._stash = rest or b""
            return False
        if rest is None:
            return True
        self._stash = rest
        return False

    def native_read(self) -> tuple[int, int, bool] | None:
        """``(fd, limit, masked)`` when the socket's next read may be parsed natively, else None (use :meth:`read_nowait`).

        For :func:`~mediaserver._native._wsframe.uplink_pass`, which reads
        the socket itself and parses whole plain frames from the start of
        what it read: so only on plain TCP, with nothing read and kept
        (a part-frame, a fragmented message, what wsproto holds, messages
        not yet taken) and the connection open.  Give its result to
        :meth:`after_native_read`.
        """
        if (
            self._sock is None
            or self._stash is not None
            or self.closed is not None
            or self._messages
            or self._tail
            or self._parts
            or self._wsproto_fed
        ):
            return None
        fd = self._sock.fileno()  # (-1 once the socket is closed: never a number the fd may have been given again)
        return (fd, self._max, self._masked_in) if fd >= 0 else None

    def after_native_read(self, read: int, rest: bytes | None) -> bool:
        """What :meth:`read_nowait` does after its read, for one ``uplink_pass`` made (its ``read`` and ``rest``); as it returns.

        The frames it took are gone; ``rest`` (the bytes from the first
        frame it did not take) is parsed as any read is, its messages into
        :attr:`inbox`.
        """
        if read < 0:  # (nothing was there)
            return True
        if read == 0:  # the peer closed (or the read failed): the awaiting path sees it
            self._stash = b""
            return False
        self.received_bytes += read
        if rest is None:
            return True
        rest = self._scan_fast(rest)
        if rest is None:
            return True
        self._stash = rest
        return False

    def native_send_fd(self) -> int:
        """The socket's fd when whole frames may be written to it natively now (plain TCP, nothing queued or being sent); else -1.

        What such a write does not take must go to :meth:`write_frames_nowait`
        at once (it queues it, or raises the failure), before anything else is sent.
        """
        if self._sock is None or self._backlog or self._unsendable is not None or self._lock.locked():
            return -1
        return self._sock.fileno()

    def write_frames_nowait(self, frames: bytes) -> bool:
        """Send whole frames already built (masked as :attr:`frame_key` says); as :meth:`send_many_nowait`."""
        if self._unsendable is not None:
            raise self._unsendable
        return self._write_nowait(frames)

    @property
    def frame_key(self) -> Literal[True] | None:
        """The ``key`` the native framers (:mod:`mediaserver._native._wsframe`) take for this end's frames.

        True for a client's (masked, with a fresh key each, as RFC 6455
        requires), None for a server's (:class:`ServerStream`: unmasked).
        """
        return None if self._masked_in else True

    def _scan_fast(self, data: bytes) -> bytes | None:
        """Parse ``data`` with the native scanner where it may; None if it took it all, else the bytes for wsproto."""
        if self._tail:
            data, self._tail = self._tail + data, b""
        if not self._parts and (not self._wsproto_fed or self._wsproto_drained()):
            messages, used, why = scan(data, self._max, self._masked_in)
            if messages and self.closed is None:
                self._messages.extend(messages)
            if why == DONE:
                return None
            if why == INCOMPLETE and len(data) - used <= RECEIVE_BYTES:
                self._tail = data[used:]
                return None
            data = data[used:]  # an unusual frame (or a huge one): wsproto takes over from here
        return data

    async def _read(self) -> bool:
        """Read once from the socket and handle every event it completes; False once it is gone."""
        data: bytes | bytearray
        if self._stash is not None:  # left by read_nowait: past the fast path already (or b"": closed)
            data, self._stash = self._stash, None
            if not data:
                self._closed_now(CloseReason.ABNORMAL_CLOSURE, self._abort_reason or "")
                return False
            return await self._read_slow(data)
        try:
            if self._sock is not None:
                data = await _receive_raw(self._sock)
            else:
                data = await self._stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            self._closed_now(CloseReason.ABNORMAL_CLOSURE, self._abort_reason or "")
            return False
        if not isinstance(data, bytes):
            data = bytes(data)
        self.received_bytes += len(data)
        rest = self._scan_fast(data)
        if rest is None:
            return True
        return await self._read_slow(rest)

    def _wsproto_drained(self) -> bool:
        """wsproto, fed since we last looked, holds nothing now (then the fast path may parse again)."""
        if _wsproto_idle(self._ws.connection):
            self._wsproto_fed = False
            return True
        return False

    async def _read_slow(self, data: bytes) -> bool:
        """wsproto parses ``data`` (what the fast path left) and every event it completes is handled.

        A read can hold thousands of control frames or tiny fragments (64 KiB
        of pings took 140 ms to handle, 1-byte fragments 380 ms, every other
        call waiting): the events are parsed as they are handled, with a
        checkpoint every ``SLOW_EVENTS_PER_TURN``, and only the last of a
        read's pings is answered (RFC 6455 §5.5.3 allows it).
        """
        self._wsproto_fed = True
        pong: Ping | None = None
        try:
            self._ws.receive_data(data)
            for count, event in enumerate(self._ws.events(), 1):
                if isinstance(event, Ping):
                    pong = event
                else:
                    if pong is not None:  # (before what follows it; none once the peer's close is here)
                        if self._ws.state is ConnectionState.OPEN:
                            await self._send_quietly(pong.response())
                        pong = None
                    await self._handle(event)
                if count % SLOW_EVENTS_PER_TURN == 0:
                    # (a turn for the others, not a new place to be cancelled: what is parsed is never lost)
                    await trio.lowlevel.cancel_shielded_checkpoint()
        except RemoteProtocolError as exc:
            self._closed_now(CloseReason.PROTOCOL_ERROR, str(exc), violation=True)
            if isinstance(exc.event_hint, CloseConnection):  # (a handshake's hint is an HTTP answer: not ours to send)
                await self._send_quietly(exc.event_hint)
            self._broken = True
            return False
        if pong is not None and self._ws.state is ConnectionState.OPEN:
            await self._send_quietly(pong.response())
        return True

    async def _handle(self, event: Event) -> None:
        if isinstance(event, Message):
            if self.closed is not None:
                return
            self._size += len(event.data.encode()) if isinstance(event.data, str) else len(event.data)  # bytes, as the fast path
            if self._size > self._max:
                self._closed_now(CloseReason.MESSAGE_TOO_BIG, f"message over {self._max} bytes", violation=True)
                await self._send_quietly(CloseConnection(CloseReason.MESSAGE_TOO_BIG))
                return
            # Text and binary never interleave.  An empty fragment counts nothing against the size limit, so it is
            # kept only as the first part (a message in progress: the fast path stays off until it ends).
            if event.data or not self._parts:
                self._parts.append(event.data)
            if event.message_finished:
                parts, self._parts, self._size = self._parts, [], 0
                if isinstance(event, TextMessage):
                    self._messages.append(parts[0] if len(parts) == 1 else "".join(parts))  # type: ignore[arg-type]
                else:
                    self._messages.append(parts[0] if len(parts) == 1 else b"".join(parts))  # type: ignore[arg-type]
        elif isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.OPEN:
                # Not the peer's close: wsproto's verdict on its bytes (1002 bad framing, 1007 bad UTF-8).
                # Say so to the peer now; wsproto reads nothing after them, so no close reply can be awaited.
                self._closed_now(event.code, f"the peer broke the protocol: {event.reason or event.code}", violation=True)
                await self._send_quietly(CloseConnection(event.code))  # (the code says it; wsproto's text is for our log)
                self._broken = True
                return
            self._closed_now(event.code, event.reason or "")
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                await self._send_quietly(event.response())
        elif isinstance(event, AcceptConnection):
            self._accepted = True
        elif isinstance(event, RejectConnection):
            self._rejected = event.status_code
            self._reject_done = not event.has_body
        elif isinstance(event, RejectData):
            self._reject_body += event.data[: REJECT_BODY_BYTES - len(self._reject_body)]
            self._reject_done = event.body_finished or len(self._reject_body) >= REJECT_BODY_BYTES
        # Ping (answered by _read_slow), Pong: nothing to do

    async def _send_quietly(self, event: Event) -> None:
        """A control reply; a connection already gone is not an error here."""
        try:
            await self._send(event)
        except WebSocketClosed:
            pass

    # -- closing ---------------------------------------------------------------

    async def aclose(self, code: int = CloseReason.NORMAL_CLOSURE, reason: str | None = None) -> None:
        """Close handshake: send a close frame (with ``reason``, if any), read until the peer's (bound this with a timeout)."""
        if self._unsendable is not None and self.closed is None:  # a write failed: no close frame can go, none will come back
            self._closed_now(code, CLOSED_BY_US)
            self._broken = True
        if self._ws.state is ConnectionState.OPEN and not self._broken:
            self._closed_now(code, CLOSED_BY_US)
            await self._send_quietly(CloseConnection(code, reason))
        while self._ws.state is ConnectionState.LOCAL_CLOSING and not self._broken and await self._read():
            pass
        self._messages.clear()


def _wsproto_idle(conn: Connection | None) -> bool:
    """True when wsproto holds no unparsed bytes, no partial frame or message and no pending event.

    Only then may the fast path parse: the two parsers must never both own
    part of the byte stream.  This reads wsproto internals (1.x); if they
    are not there the answer is False and wsproto parses everything.
    """
    if conn is None or conn.state is not ConnectionState.OPEN:
        return False
    try:
        proto = conn._proto
        decoder = proto._frame_decoder
        return (
            not decoder.buffer.buffer
            and decoder.header is None
            and proto._message_decoder.opcode is None
            and not conn._events
            and not proto.extensions
        )
    except AttributeError:  # pragma: no cover - another wsproto version
        return False


def raw_socket(stream: Stream) -> socket.socket | None:
    """The stdlib socket under a plain-TCP :class:`trio.SocketStream`; None for anything else (TLS, test streams).

    Reads Trio's private ``_sock`` (stable since Trio 0.2); without it the
    connection uses the stream's own methods, which behave the same.
    """
    if type(stream) is not trio.SocketStream:
        return None
    sock = getattr(stream.socket, "_sock", None)
    return sock if isinstance(sock, socket.socket) and sock.type == socket.SOCK_STREAM else None


async def _receive_raw(sock: socket.socket) -> bytes:
    """Wait until ``sock`` is readable, then read what is there (b"" once the peer has closed).

    What ``SocketStream.receive_some`` does, in the other order: Trio's
    version tries the read first, which for a stream of 20 ms frames fails
    (``EAGAIN``) on nearly every call -- one wasted system call and an
    exception per message.  Waiting first costs nothing when data is
    already there (epoll reports it at once).  ``wait_readable`` is the
    checkpoint: cancellation is honoured, and closing the stream from
    another task (Trio's ``notify_closing``) raises ``ClosedResourceError``.
    """
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return sock.recv(RECEIVE_BYTES)
        except (BlockingIOError, InterruptedError):
            continue


async def _send_raw(sock: socket.socket, data: bytes, unsent: Callable[[memoryview], None] | None = None) -> None:
    """Write all of ``data`` to ``sock``; no scheduler trip when the kernel takes it at once.

    ``SocketStream.send_all`` always ends in a checkpoint, a full trip
    through Trio's scheduler, for every message.  Here a send the kernel
    accepts whole (nearly always: 20 ms of audio is a few hundred bytes)
    returns without yielding; only a full send buffer waits for the
    socket.  Callers hold the connection's send lock, so writes never
    interleave, and every loop that sends also reads or sleeps, so no task
    runs without checkpoints.  A dead peer raises ``OSError``.  If the
    wait is cancelled, ``unsent(rest)`` gets what was not written.
    """
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except (BlockingIOError, InterruptedError):
            sent = 0
        view = view[sent:]
        if view:
            try:
                await trio.lowlevel.wait_writable(sock)
            except BaseException:
                if unsent is not None:
                    unsent(view)
                raise


def data_frame(message: str | bytes) -> bytes:
    """One whole client message as a masked RFC 6455 frame (FIN, text or binary opcode).

    Equivalent to what wsproto builds for ``TextMessage``/``BytesMessage``
    with no extension negotiated (we offer none), built natively: this runs
    for every 20 ms audio frame of every call.
    """
    # key=True: a fresh masking key from the native pool of OS randomness (_wsframe.MaskKeys)
    if isinstance(message, str):
        try:
            return encode_frame(True, message.encode(), True)
        except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud83d" decoded): "?", not an end to the call
            return encode_frame(True, message.encode("utf-8", "replace"), True)
    return encode_frame(False, bytes(message), True)


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
            with trio.move_on_after(REJECT_BODY_WAIT_S):  # its body says why; a server slow to send it is not waited for
                while not conn._reject_done and conn.closed is None:
                    await conn._read()
            raise HandshakeRejected(conn._rejected, bytes(conn._reject_body))
        if conn.closed is not None:
            raise WebSocketClosed(conn.closed.code, "closed during the handshake")
        await conn._read()
    return conn
