"""The two ends of bench/load.py: simulated Twilio callers and a fake OpenAI Realtime model.

Both run in the bench's own Trio process and share one clock (Trio's), so a
frame's trip through the server is measured directly: the caller notes when
it sends a frame, the model notes when it reached its socket (the kernel's
receive timestamp, see Cost below), and the same for model audio the other
way.

Every audio frame carries a tag in its first bytes: ``MAGIC``, the call
number and the frame number (:func:`tag_audio`, :func:`read_tag`).  The
server passes µ-law through unchanged on the pcmu path (uplink: jitter
buffer, no transcoding; downlink: 40 ms deltas map one-to-one onto its
40 ms Twilio chunks), so each side can tell exactly which frame arrived,
count losses per call, and spot frames the server made up (jitter
concealment) or cut.

The fake model speaks the OpenAI Realtime GA protocol as the SDK's types
describe it (``session.created``, ``session.updated`` echoing the session,
``response.created``, ``response.output_audio.delta``,
``response.output_audio.done``, ``response.done``,
``conversation.item.truncated``); ``tests/test_bench_frame_load.py`` checks
every message builder here against ``openai.types.realtime``.  Replies are
sent in real time (one ``CHUNK_MS`` delta every ``CHUNK_MS``), so the
server's pacer, which keeps ``lead_ms`` of audio buffered at Twilio, never
has to hold a chunk back: the downlink latency measured is the bridge's own.
With ``speed`` above 1 (``bench/load.py --model-speed``) each reply comes
that many times faster than real time, as real models send them; the
server's pacer then sends most of it, and only each reply's first delta is
timed (the others are held back on purpose).

The caller speaks Twilio's side: the voice webhook (a form POST), the
TwiML's ``<Stream url>`` and ``<Parameter>``s, then ``connected``,
``start`` (with the parameters), 20 ms ``media`` frames in real time with
``sequenceNumber``/``chunk``/``timestamp``, mark echoes when the audio
before a mark has "played" (a per-call playout clock; all pending marks at
once on ``clear``), and ``stop``.

Cost.  The generator must stay far cheaper than the server it loads (one
core drives hundreds of calls), so only the setup runs as ordinary Trio
tasks: the webhook POST, the TwiML, and each WebSocket handshake (caller
and model side, RFC 6455 upgrade by hand).  The streaming phase of every
call and every model session then runs in one shared :class:`_Loop`, a
single task that wakes every millisecond while anything is due (a timerfd
Trio waits on): it reads every socket that has data (a private ``epoll``,
polled without blocking; a minimal frame parser), then sends everything
due (each call's 20 ms frames at its own phase, mark echoes, each model
reply's 40 ms deltas) with non-blocking ``socket.send`` of whole frames.
Waking a process costs more than handling a message, so one wake-up per
millisecond instead of one per message is most of the saving.  Reading
on the tick does not delay what is measured: every read carries the
kernel's receive timestamp (``SO_TIMESTAMPNS``), so a latency is the
time the data reached the receiving socket minus the time it was handed
to the sending one, without this process's own scheduling delay.
Callers mask with an all-zero key (valid RFC 6455, masking is a no-op);
the model unmasks its clients' frames with ``websockets``' C helper.  The
hot messages (``media`` and ``mark`` from the server to the caller,
``input_audio_buffer.append`` to the model) are read by exact prefix and
suffix matches on the shapes the servers send, taking only the first
base64 characters (the tag); anything else, including any message that
does not match exactly, goes through ``json.loads``.  The server sees the
same messages at the same rates as from per-call tasks; frames due
within the same millisecond go out back to back, as Trio's own 1 ms
timer resolution batched them before.

TLS.  Given a server ``ssl.SSLContext``, the fake model serves ``wss://``
as real providers do (``bench/load.py --tls``): each session's TLS
handshake runs in the setup phase, before the WebSocket handshake, on an
``SSLObject`` over memory BIOs (:class:`_TLS`), and in the loop its
session decrypts what ``recvmsg`` returns before the frame parser sees it
and encrypts each frame it sends (:class:`_TLSModelSession`), so receive
timestamps and the one-task loop stay as they are.  Plain sessions and
the callers do not go through any of it.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import heapq
import itertools
import json
import math
import os
import secrets
import select
import socket
import ssl
import struct
import time
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any
from urllib.parse import urlencode, urlsplit

import trio

try:
    from websockets.speedups import apply_mask as apply_mask
except ImportError:  # pragma: no cover - websockets is a bench dependency (the peer uses it)

    def apply_mask(data: bytes | bytearray | memoryview, mask: bytes | bytearray) -> bytes:
        n = len(data)
        key = int.from_bytes(mask * (n // 4 + 1), "big") >> (8 * (4 - n % 4) if n % 4 else 32)
        return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


__all__ = [
    "CHUNK_MS",
    "FRAME_BYTES",
    "CallRecord",
    "FakeModel",
    "Recorder",
    "http_post_form",
    "http_request",
    "read_tag",
    "run_call",
    "tag_audio",
]

FRAME_MS = 20  # Twilio media frame
FRAME_BYTES = 160  # 20 ms of µ-law at 8 kHz
CHUNK_MS = 40  # model delta size = the bridge's downlink chunk (CallBridge chunk_ms)
CHUNK_BYTES = CHUNK_MS * 8
MAGIC = b"\x5a\xa5\x3c\xc3"
_TAG = struct.Struct(">4sHI")  # magic, call number, frame number
_TAG_B64 = 16  # base64 characters that carry the tag (12 bytes >= _TAG.size)
SILENCE = b"\xff"  # µ-law zero
_TAG_PAD = SILENCE * (_TAG_B64 * 3 // 4 - _TAG.size)  # the tag padded to whole base64 groups
_FRAME_TAIL_B64 = binascii.b2a_base64(SILENCE * (FRAME_BYTES - _TAG_B64 * 3 // 4), newline=False)
TICK_S = 0.001  # the streaming loop wakes this often while anything is due
IDLE_READ_S = 0.01  # and reads at least this often when nothing is (e.g. after stop, waiting for the close)
HANGUP_WAIT_S = 5.0  # after stop, how long a caller waits for the server to close the stream


def clock() -> float:
    """Trio's clock (``perf_counter`` plus an offset): the one clock both ends and every sleep use."""
    return trio.current_time()


def tag_audio(call_no: int, frame_no: int, size: int) -> bytes:
    """µ-law audio of ``size`` bytes whose first 10 bytes name the call and the frame."""
    return _TAG.pack(MAGIC, call_no, frame_no) + SILENCE * (size - _TAG.size)


def read_tag(audio: bytes) -> tuple[int, int] | None:
    """(call number, frame number) of tagged audio, or None (audio the server made up or cut)."""
    if len(audio) < _TAG.size or audio[:4] != MAGIC:
        return None
    _, call_no, frame_no = _TAG.unpack_from(audio)
    return call_no, frame_no


def _tag_prefix(b64: bytes) -> bytes:
    """The first bytes of base64 audio, enough for :func:`read_tag` (decoding all of it is wasted work)."""
    try:
        return binascii.a2b_base64(b64[:_TAG_B64])
    except binascii.Error:
        return b""


def _b64_size(b64: bytes) -> int:
    """Decoded size of padded base64 text."""
    return len(b64) * 3 // 4 - (2 if b64.endswith(b"==") else 1 if b64.endswith(b"=") else 0)


# --- shared records -------------------------------------------------------------------


@dataclasses.dataclass
class CallRecord:
    """One simulated call, as both ends saw it."""

    call_no: int
    up_sent_s: list[float] = dataclasses.field(default_factory=list)  # by frame number
    up_received: int = 0  # tagged frames the model got for this call
    down_sent_s: list[float] = dataclasses.field(default_factory=list)  # by delta number
    down_received: int = 0  # tagged media the caller got
    down_untagged: int = 0
    failed: str | None = None
    server_closed_early: bool = False


class Recorder:
    """Everything one load step measures; latencies count only inside the measurement window."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything: a new step (the model keeps a reference to this object)."""
        self.calls: dict[int, CallRecord] = {}
        self.window = (math.inf, -math.inf)
        self.replies_until_s = math.inf  # the model starts no reply that would end later
        self.up_latency_s: list[float] = []
        self.down_latency_s: list[float] = []
        self.send_lateness_s: list[float] = []  # caller frames sent after their due time
        self.loop_lag_s: list[float] = []
        self.up_untagged = 0  # frames the model got that no caller sent (concealment, or cut)

    def in_window(self, t: float) -> bool:
        return self.window[0] <= t <= self.window[1]

    def up_arrived(self, audio: bytes, now: float) -> None:
        """A frame reached the model; ``audio`` may be just its first bytes (the tag)."""
        tag = read_tag(audio)
        call = self.calls.get(tag[0]) if tag is not None else None
        if tag is None or call is None or tag[1] >= len(call.up_sent_s):
            self.up_untagged += 1
            return
        call.up_received += 1
        sent = call.up_sent_s[tag[1]]
        if self.in_window(sent):
            self.up_latency_s.append(now - sent)

    def down_arrived(self, call: CallRecord, audio: bytes, now: float) -> None:
        """Model audio reached ``call``'s caller; ``audio`` may be just its first bytes (the tag)."""
        tag = read_tag(audio)
        if tag is None or tag[0] != call.call_no or tag[1] >= len(call.down_sent_s):
            call.down_untagged += 1
            return
        call.down_received += 1
        sent = call.down_sent_s[tag[1]]
        if self.in_window(sent):
            self.down_latency_s.append(now - sent)


async def monitor_loop_lag(recorder: Recorder) -> None:
    """Record, until cancelled, how late the generator wakes to do what is due: its own lag.

    Each tick of the streaming loop (:class:`_Loop`) is compared with the
    time it was scheduled for; a generator short of CPU falls behind its
    schedule, and then sends frames late and in bursts.  (A Trio sleeper
    would mostly measure Trio's rounding of waits up to whole
    milliseconds.)  Only ticks inside the recorder's window count.
    """
    loop = _Loop.current()
    loop.lag_recorder = recorder
    try:
        await trio.sleep_forever()
    finally:
        if loop.lag_recorder is recorder:
            loop.lag_recorder = None


def _leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups: the one worth reporting."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


# --- the fake model: OpenAI Realtime GA messages ------------------------------------


def session_created(event_id: str) -> str:
    return json.dumps(
        # No session "id": the SDK's GA SessionCreatedEvent has none (our core treats it as optional).
        {"type": "session.created", "event_id": event_id, "session": {"type": "realtime", "model": "gpt-realtime"}}
    )


def session_updated(event_id: str, session: dict[str, Any]) -> str:
    return json.dumps({"type": "session.updated", "event_id": event_id, "session": session})


def response_created(event_id: str, response_id: str) -> str:
    response = {"id": response_id, "object": "realtime.response", "status": "in_progress"}
    return json.dumps({"type": "response.created", "event_id": event_id, "response": response})


def audio_delta(event_id: str, response_id: str, item_id: str, audio: bytes) -> str:
    # Built by hand: this is the hot path of the fake (one per 40 ms per call).
    return (
        '{"type":"response.output_audio.delta","event_id":"' + event_id + '","response_id":"' + response_id
        + '","item_id":"' + item_id + '","output_index":0,"content_index":0,"delta":"'
        + binascii.b2a_base64(audio, newline=False).decode("ascii") + '"}'
    )


def audio_done(event_id: str, response_id: str, item_id: str) -> str:
    return json.dumps(
        {"type": "response.output_audio.done", "event_id": event_id, "response_id": response_id,
         "item_id": item_id, "output_index": 0, "content_index": 0}
    )


def response_done(event_id: str, response_id: str, status: str = "completed") -> str:
    response = {"id": response_id, "object": "realtime.response", "status": status}
    return json.dumps({"type": "response.done", "event_id": event_id, "response": response})


def item_truncated(event_id: str, item_id: str, content_index: int, audio_end_ms: int) -> str:
    return json.dumps(
        {"type": "conversation.item.truncated", "event_id": event_id, "item_id": item_id,
         "content_index": content_index, "audio_end_ms": audio_end_ms}
    )


# --- WebSocket wire: frames, handshakes, the shared loop -------------------------------

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ZERO_KEY = b"\x00\x00\x00\x00"
_OP_CONT, _OP_TEXT, _OP_BINARY, _OP_CLOSE, _OP_PING, _OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_MESSAGE = 1 << 22  # a bigger message is a broken peer, not a load
_RECV_BYTES = 65536  # below glibc's mmap threshold: recv's buffer stays a cheap heap allocation
_SO_TIMESTAMPNS: int = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; Python names it only from 3.13 on some builds
_TIMESPEC = struct.Struct("@qq")  # struct timespec on 64-bit Linux
_ANCILLARY_BYTES = socket.CMSG_SPACE(_TIMESPEC.size)


def ws_frame(opcode: int, payload: bytes, masked: bool, *, fin: bool = True) -> bytes:
    """One frame (final unless ``fin`` is False); a client's is masked with the all-zero key, so its payload goes
    out as is.  (bench/_isolation_ws.py builds its frames with it too.)"""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    mask = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, mask | n))
    elif n < 65536:
        head = bytes((first, mask | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((first, mask | 127)) + n.to_bytes(8, "big")
    return head + ZERO_KEY + payload if masked else head + payload


def ws_accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())


def _close_socket(sock: socket.socket) -> None:
    trio.lowlevel.notify_closing(sock)
    sock.close()


async def _recv_some(sock: socket.socket, closed: str) -> bytes:
    """The next bytes on a non-blocking socket (setup phase: waits through Trio); ``closed`` if it ends."""
    while True:
        try:
            chunk = sock.recv(_RECV_BYTES)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not chunk:
            raise ConnectionError(closed)
        return chunk


async def _send_all(sock: socket.socket, data: bytes, tls: _TLS | None = None) -> None:
    """All of ``data`` on a non-blocking socket (encrypted first on a TLS connection)."""
    if tls is not None:
        data = tls.encrypt(data)
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def _read_head(sock: socket.socket, what: str, tls: _TLS | None = None) -> tuple[list[bytes], bytes]:
    """An HTTP head's lines (request or status line first) and the bytes after it (decrypted on TLS)."""
    data = b"" if tls is None else await _tls_drain(sock, tls, b"")  # records read with the handshake
    while b"\r\n\r\n" not in data:
        if len(data) > 65536:
            raise ValueError(f"{what}: HTTP head over 64 KiB")
        chunk = await _recv_some(sock, f"{what}: connection closed during the WebSocket handshake")
        data += chunk if tls is None else await _tls_drain(sock, tls, chunk)
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n"), rest


def http_header(lines: list[bytes], name: bytes) -> bytes | None:
    for line in lines[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _prepare(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Trio's SocketStream: no Nagle delay
    sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)  # receive times from the kernel (see _Loop)


async def _ws_connect(host: str, port: int, target: str) -> tuple[socket.socket, bytes]:
    """A client WebSocket handshake on a fresh TCP connection: (non-blocking socket, bytes after the 101)."""
    family, kind, proto, _, addr = (await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
    sock = socket.socket(family, kind, proto)
    try:
        _prepare(sock)
        err = sock.connect_ex(addr)
        if err == errno.EINPROGRESS:
            await trio.lowlevel.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, f"connect to {host}:{port}: {os.strerror(err)}")
        key = base64.b64encode(os.urandom(16))
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await _send_all(sock, request.encode("latin-1"))
        lines, rest = await _read_head(sock, f"ws://{host}:{port}{target}")
        status = lines[0].split()
        if len(status) < 2 or status[1] != b"101":
            raise ValueError(f"WebSocket upgrade refused: {lines[0][:80]!r}")
        if http_header(lines, b"sec-websocket-accept") != ws_accept_key(key):
            raise ValueError("WebSocket upgrade: wrong Sec-WebSocket-Accept")
        return sock, rest
    except BaseException:
        _close_socket(sock)
        raise


async def _ws_accept(sock: socket.socket, tls: _TLS | None = None) -> bytes:
    """The server side of a WebSocket handshake; the bytes after the request (no extension accepted).

    On a TLS connection (``tls``, handshake done) the request is decrypted and
    the answer encrypted, and the bytes returned are plaintext.
    """
    lines, rest = await _read_head(sock, "model session", tls)
    key = http_header(lines, b"sec-websocket-key")
    if not lines[0].startswith(b"GET ") or key is None:
        await _send_all(sock, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", tls)
        raise ValueError(f"not a WebSocket upgrade: {lines[0][:80]!r}")
    await _send_all(
        sock,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + ws_accept_key(key) + b"\r\n\r\n",
        tls,
    )
    return rest


class _TLS:
    """The server side of one TLS connection on memory BIOs: the socket I/O stays the caller's.

    ``ssl.SSLContext.wrap_bio`` with ``server_side=True``: what the socket
    receives goes in through :meth:`decrypt`, what the application sends
    comes out of :meth:`encrypt` as bytes for the socket, so the model's
    sessions stay plain non-blocking sockets in the shared loop (an
    ``SSLSocket`` would add a read per record and hide the kernel's receive
    timestamps).  ``closed`` turns true on the peer's ``close_notify``.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.closed = False

    def encrypt(self, data: bytes) -> bytes:
        """``data`` as TLS records (after anything the TLS layer had pending, e.g. a session ticket)."""
        self.obj.write(data)
        return self.outgoing.read()

    def decrypt(self, data: bytes) -> bytes:
        """The plaintext of every whole record received so far, ``data`` included (a partial record waits).

        Reads until the BIO and the TLS layer hold no whole record: a check
        of both buffers, so the common case (whole records) raises nothing.
        ``ssl.SSLError`` (a corrupt record) is the caller's to handle.
        """
        incoming, read = self.incoming, self.obj.read
        if data:
            incoming.write(data)
        parts = []
        while True:
            try:
                part = read(_RECV_BYTES)
            except ssl.SSLWantReadError:  # a partial record: the rest comes with a later read
                break
            except ssl.SSLZeroReturnError:  # close_notify (as some OpenSSL paths report it)
                self.closed = True
                break
            if not part:  # close_notify: the ssl module answers a clean shutdown with b""
                self.closed = True
                break
            parts.append(part)
            if not incoming.pending and not self.obj.pending():
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)


async def _tls_accept(sock: socket.socket, context: ssl.SSLContext) -> _TLS:
    """The server side of a TLS handshake on a fresh non-blocking socket (in the setup phase, as a Trio task)."""
    tls = _TLS(context)
    while True:
        try:
            tls.obj.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        out = tls.outgoing.read()  # the server's flight, and after the last step its session tickets
        if out:
            await _send_all(sock, out)
        if done:
            return tls
        tls.incoming.write(await _recv_some(sock, "model session: connection closed during the TLS handshake"))


async def _tls_drain(sock: socket.socket, tls: _TLS, chunk: bytes) -> bytes:
    """Decrypt ``chunk`` (plus records already buffered) in the setup phase, sending what TLS has to say back."""
    plain = tls.decrypt(chunk)
    if tls.outgoing.pending:
        await _send_all(sock, tls.outgoing.read())
    if tls.closed:
        raise ConnectionError("model session: TLS closed during the WebSocket handshake")
    return plain


class _Conn:
    """One WebSocket in the shared loop: frame parsing, buffered non-blocking writes, close handling.

    Subclasses say what a message means (:meth:`on_message`) and what the
    end of the connection means (:meth:`on_end`).  ``masked`` is whether
    this end masks its frames (a client does, with the all-zero key).
    """

    masked = False

    def __init__(self, loop: _Loop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.fd = sock.fileno()
        self.open = True
        self._in = b""  # an incomplete frame
        self._out = bytearray()  # what the socket did not take yet
        self._parts: list[bytes] | None = None  # a fragmented message so far

    def send_text(self, text: bytes) -> None:
        self._write(ws_frame(_OP_TEXT, text, self.masked))

    def _write(self, data: bytes) -> None:
        if not self.open:
            return
        if self._out:
            self._out += data
            return
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.end(f"send failed: {exc}")
            return
        if sent < len(data):
            self._out += data[sent:]
            self.loop.want_write(self, True)

    def on_writable(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end(f"send failed: {exc}")
            return
        del self._out[:sent]
        if not self._out:
            self.loop.want_write(self, False)

    def on_readable(self, fallback: float) -> None:
        """Read what the socket has; messages are stamped with the kernel's receive time (else ``fallback``)."""
        try:
            data, ancillary, _, _ = self.sock.recvmsg(_RECV_BYTES, _ANCILLARY_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self.end(f"receive failed: {exc}")
            return
        if not data:
            self.end("connection closed without a close frame")
            return
        received = fallback
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS and len(value) >= _TIMESPEC.size:
                sec, nsec = _TIMESPEC.unpack_from(value)
                received = sec + nsec * 1e-9 + self.loop.realtime_to_clock
        self.feed(data, received)

    def feed(self, data: bytes, now: float) -> None:
        """Parse every whole frame in the buffered bytes plus ``data``; keep the rest for the next read."""
        if self._in:
            data = self._in + data
        pos, size = 0, len(data)
        while size - pos >= 2 and self.open:
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            p = pos + 2
            if length == 126:
                if size - p < 2:
                    break
                length = (data[p] << 8) | data[p + 1]
                p += 2
            elif length == 127:
                if size - p < 8:
                    break
                length = int.from_bytes(data[p:p + 8], "big")
                p += 8
            key = None
            if b1 & 0x80:
                if size - p < 4:
                    break
                key = data[p:p + 4]
                p += 4
            if length > _MAX_MESSAGE:
                self.end(f"frame of {length} bytes")
                return
            end = p + length
            if end > size:
                break
            payload = data[p:end]
            if key is not None and key != ZERO_KEY:
                payload = apply_mask(payload, key)
            pos = end
            self._frame_in(b0, payload, now)
        self._in = data[pos:] if self.open else b""

    def _frame_in(self, b0: int, payload: bytes, now: float) -> None:
        opcode = b0 & 0x0F
        if opcode in (_OP_TEXT, _OP_BINARY):
            if b0 & 0x80:
                self.on_message(payload, now)
            else:
                self._parts = [payload]
        elif opcode == _OP_CONT and self._parts is not None:
            self._parts.append(payload)
            if b0 & 0x80:
                message, self._parts = b"".join(self._parts), None
                self.on_message(message, now)
        elif opcode == _OP_PING:
            self._write(ws_frame(_OP_PONG, payload, self.masked))
        elif opcode == _OP_CLOSE:
            self._write(ws_frame(_OP_CLOSE, payload[:2], self.masked))  # echo the code, as RFC 6455 asks
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.end(f"close frame {code}", clean=True)
        elif opcode != _OP_PONG:
            self.end(f"unexpected frame opcode {opcode}")

    def fail(self, exc: Exception) -> None:
        """A handler or callback of this connection raised: a bug in the generator, or a message it cannot read."""
        self.end(f"generator error: {_leaf(exc)!r}"[:200])

    def end(self, why: str, clean: bool = False) -> None:
        """Close the socket (once) and tell the subclass why the connection ended."""
        if not self.open:
            return
        self.open = False
        self.loop.remove(self)
        _close_socket(self.sock)
        self.on_end(why, clean)

    def on_message(self, message: bytes, now: float) -> None:
        raise NotImplementedError

    def on_end(self, why: str, clean: bool) -> None:
        raise NotImplementedError


_Entry = tuple[float, int, _Conn, Callable[[float], None]]


class _Loop:
    """The streaming phase of every call and model session: one task, woken every ``TICK_S``.

    Each tick reads every socket that has data (its private epoll, polled
    without blocking), then runs every callback due by then (:meth:`at`:
    frames, mark echoes, reply deltas), in order, so frames due within one
    tick go out back to back.  One wake-up per tick, whatever the load,
    instead of one per message: waking a process costs more than handling a
    message.  Reading late does not skew latencies: each read carries the
    kernel's receive timestamp (``SO_TIMESTAMPNS``, the moment the data
    reached the socket), converted to Trio's clock.  A callback or handler
    that raises ends only its own connection.
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self._heap: list[_Entry] = []
        self._seq = itertools.count()
        self._idle = trio.Event()  # set when there is work again after a pause
        self.realtime_to_clock = 0.0  # add to a kernel (CLOCK_REALTIME) timestamp to get Trio's clock
        self.lag_recorder: Recorder | None = None  # where tick lateness goes (monitor_loop_lag)

    @classmethod
    def current(cls) -> _Loop:
        """This Trio run's loop, started (as a system task) on first use."""
        try:
            return _LOOP.get()
        except LookupError:
            loop = cls()
            _LOOP.set(loop)
            trio.lowlevel.spawn_system_task(loop._run, name="loadgen loop")
            return loop

    def add(self, conn: _Conn) -> None:
        self.conns[conn.fd] = conn
        self.epoll.register(conn.fd, select.EPOLLIN)
        self._idle.set()

    def remove(self, conn: _Conn) -> None:
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]
            self.epoll.unregister(conn.fd)

    def want_write(self, conn: _Conn, on: bool) -> None:
        if self.conns.get(conn.fd) is conn:
            self.epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT if on else select.EPOLLIN)

    def at(self, due: float, conn: _Conn, callback: Callable[[float], None]) -> None:
        """Run ``callback(due)`` at the first tick at or after ``due`` (if ``conn`` is still open)."""
        heapq.heappush(self._heap, (due, next(self._seq), conn, callback))
        if not self._idle.is_set():
            self._idle.set()

    async def _run(self) -> None:
        heap, conns, poll = self._heap, self.conns, self.epoll.poll
        timer = _Timer()
        tick = clock()
        try:
            while True:
                if not conns and not heap:
                    self._idle = trio.Event()
                    await self._idle.wait()  # between steps: no ticks
                    tick = clock()
                # The next tick: TICK_S on, or the next due callback if that is later (but still read
                # every IDLE_READ_S); after an overrun, at once (no burst of ticks to catch up).
                tick = max(tick + TICK_S, min(heap[0][0] if heap else math.inf, tick + IDLE_READ_S), clock() - TICK_S)
                await timer.sleep_until(tick)
                before = clock()
                lag = self.lag_recorder
                if lag is not None and lag.in_window(before):
                    lag.loop_lag_s.append(max(before - tick, 0.0))
                realtime = time.time()
                self.realtime_to_clock = (before + clock()) / 2 - realtime
                for fd, events in poll(0):
                    conn = conns.get(fd)
                    if conn is None:
                        continue
                    try:
                        if events & select.EPOLLOUT:
                            conn.on_writable()
                        if events & ~select.EPOLLOUT and conn.open:
                            conn.on_readable(before)
                    except Exception as exc:  # noqa: BLE001 - one broken connection must not stop the others
                        conn.fail(exc)
                now = clock()
                while heap and heap[0][0] <= now:
                    due, _, conn, callback = heapq.heappop(heap)
                    if conn.open:
                        try:
                            callback(due)
                        except Exception as exc:  # noqa: BLE001 - one broken connection must not stop the others
                            conn.fail(exc)
        finally:
            timer.close()
            self.epoll.close()


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class _Timer:
    """Sleep until a time on Trio's clock, cheaply: a Linux timerfd that Trio waits on.

    ``trio.sleep_until`` costs a cancel scope and an exception per wake-up
    (about 60 µs of CPU here, against 40 µs for a readable fd), and Trio
    rounds its waits up to whole milliseconds; the streaming loop wakes
    1000 times a second, so the difference is a few % of a core.  Falls
    back to ``trio.sleep_until`` where timerfd is not available.
    """

    _CLOCK_MONOTONIC = 1

    def __init__(self) -> None:
        self.fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self._settime = libc.timerfd_settime
            self.fd = libc.timerfd_create(self._CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            self.fd = -1
        self._spec = _Itimerspec()

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - clock()
        if self.fd < 0 or delay <= 0:
            await trio.sleep_until(deadline)
            return
        ns = max(int(delay * 1e9), 1)
        self._spec.it_value.tv_sec, self._spec.it_value.tv_nsec = divmod(ns, 1_000_000_000)
        if self._settime(self.fd, 0, ctypes.byref(self._spec), None) != 0:
            await trio.sleep_until(deadline)
            return
        await trio.lowlevel.wait_readable(self.fd)
        with contextlib.suppress(BlockingIOError):
            os.read(self.fd, 8)  # the expiry count: reading it re-arms readiness

    def close(self) -> None:
        if self.fd >= 0:
            trio.lowlevel.notify_closing(self.fd)
            os.close(self.fd)
            self.fd = -1


_LOOP: trio.lowlevel.RunVar[_Loop] = trio.lowlevel.RunVar("loadgen_loop")


# --- the fake model -------------------------------------------------------------------

# input_audio_buffer.append as our server sends it (compact) and as the peer's json.dumps does.
_APPENDS = (b'{"type":"input_audio_buffer.append","audio":"', b'{"type": "input_audio_buffer.append", "audio": "')
_IGNORED_CLIENT_EVENTS = ("response.create", "response.cancel", "conversation.item.create")


class FakeModel:
    """A GA Realtime server on 127.0.0.1:0 that answers every caller with tagged µ-law audio.

    With ``ssl_context`` (a server context with its certificate loaded) it
    serves ``wss://``, as real providers do: each session's TLS handshake
    runs in the setup phase next to the WebSocket handshake, and in the
    shared loop its records are decrypted as read and encrypted as sent
    (:class:`_TLSModelSession`); without it, plain ``ws://``.

    Every ``reply_every_s`` (first one at a per-call offset) it sends a
    reply of ``reply_ms`` in real time, if that reply would end before
    ``recorder.replies_until_s``.  ``open_sessions`` counts WebSockets not
    yet closed by the server under test: after a step's calls have ended,
    what remains is leaked.  Each session is counted under the ``label``
    current when it opened (:meth:`open_for`), so when two servers take
    turns, one's leaks are not blamed on the other.
    """

    def __init__(
        self,
        recorder: Recorder,
        *,
        reply_every_s: float = 2.0,
        reply_ms: int = 1000,
        speed: float = 1.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not speed >= 1.0:
            raise ValueError(f"speed must be at least 1 (real time), not {speed!r}")
        self.recorder = recorder
        self.speed = speed  # the replies' deltas come this many times faster than real time
        self.ssl_context = ssl_context  # serve wss:// (the server side of TLS) instead of ws://
        self.tls_version: str | None = None  # as negotiated by the first TLS session
        self.tls_cipher: str | None = None
        self.reply_every_s = reply_every_s
        self.reply_chunks = max(reply_ms // CHUNK_MS, 1)
        self.port = 0
        self.open_sessions = 0
        self.sessions = 0
        self.label = ""  # who the sessions opening now belong to (e.g. "ours 10", "peer 10")
        self._open_by_label: Counter[str] = Counter()
        self.errors: list[str] = []  # protocol violations by the server under test
        self._numbers = itertools.count(1)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen, then accept sessions until cancelled (their handshakes run as tasks here)."""
        listener = socket.socket()
        try:
            listener.setblocking(False)
            listener.bind(("127.0.0.1", 0))
            listener.listen(4096)
            self.port = listener.getsockname()[1]
            loop = _Loop.current()
            async with trio.open_nursery() as nursery:
                task_status.started(self.port)
                while True:
                    await trio.lowlevel.wait_readable(listener)
                    while True:
                        try:
                            sock, _ = listener.accept()
                        except BlockingIOError:
                            break
                        except OSError as exc:  # e.g. out of file descriptors: that session fails
                            self.errors.append(f"fake model accept failed: {exc}"[:200])
                            break
                        nursery.start_soon(self._open_session, loop, sock)
        finally:
            _close_socket(listener)

    async def _open_session(self, loop: _Loop, sock: socket.socket) -> None:
        tls: _TLS | None = None
        try:
            _prepare(sock)
            with trio.fail_after(15):
                if self.ssl_context is not None:
                    tls = await _tls_accept(sock, self.ssl_context)
                rest = await _ws_accept(sock, tls)
        except ssl.SSLError as exc:  # e.g. the server under test did not trust our certificate: say so
            self.errors.append(f"fake model TLS handshake failed: {exc}"[:200])
            _close_socket(sock)
            return
        except (OSError, trio.TooSlowError):
            _close_socket(sock)  # the server gave up on the handshake: no session
            return
        except Exception as exc:  # noqa: BLE001 - one bad session must not stop the bench
            self.errors.append(f"fake model failed: {exc!r}"[:200])
            _close_socket(sock)
            return
        session: _ModelSession
        if tls is None:
            session = _ModelSession(self, loop, sock, next(self._numbers), self.label)
        else:
            session = _TLSModelSession(self, loop, sock, next(self._numbers), self.label, tls)
            if self.tls_version is None:
                self.tls_version, cipher = tls.obj.version(), tls.obj.cipher()
                self.tls_cipher = cipher[0] if cipher else None
        self.sessions += 1
        self.open_sessions += 1
        self._open_by_label[session.label] += 1
        loop.add(session)
        session.send_json(session_created(session.event_id()))
        if rest:
            session.feed_plain(rest, clock())

    def open_for(self, label: str) -> int:
        """Sessions opened while ``label`` was current that are still open."""
        return self._open_by_label[label]

    def _closed(self, session: _ModelSession) -> None:
        self.open_sessions -= 1
        self._open_by_label[session.label] -= 1


class _ModelSession(_Conn):
    """One Realtime session: records uplink frames, echoes session.update and truncations, sends replies."""

    def __init__(self, model: FakeModel, loop: _Loop, sock: socket.socket, number: int, label: str) -> None:
        super().__init__(loop, sock)
        self.model = model
        self.number = number
        self.label = label
        self._ids = itertools.count(1)
        self.call: CallRecord | None = None  # known from the first tagged frame
        self._replies = itertools.count(1)
        self._next_reply_s = 0.0
        self._response_id = self._item_id = ""
        self._t0 = 0.0
        self._k = 0

    def event_id(self) -> str:
        return f"event_{self.number}_{next(self._ids)}"

    def send_json(self, text: str) -> None:
        self.send_text(text.encode())

    def on_message(self, message: bytes, now: float) -> None:
        recorder = self.model.recorder
        for prefix in _APPENDS:
            if message.startswith(prefix) and message.endswith(b'"}'):
                b64 = message[len(prefix):-2]
                if b"\\" not in b64 and b'"' not in b64:
                    self._append(recorder, _tag_prefix(b64), now)
                    return
        try:
            msg = json.loads(message)
            kind = msg.get("type")
        except (ValueError, AttributeError):
            self.model.errors.append(f"client message is not a JSON object: {message!r:.80}")
            return
        if kind == "input_audio_buffer.append":
            self._append(recorder, binascii.a2b_base64(msg["audio"]), now)
        elif kind == "session.update":
            self.send_json(session_updated(self.event_id(), msg["session"]))
        elif kind == "conversation.item.truncate":
            self.send_json(item_truncated(self.event_id(), msg["item_id"], msg["content_index"], msg["audio_end_ms"]))
        elif kind not in _IGNORED_CLIENT_EVENTS:
            self.model.errors.append(f"unexpected client event {kind!r}")

    def _append(self, recorder: Recorder, audio: bytes, now: float) -> None:
        recorder.up_arrived(audio, now)
        if self.call is None:
            tag = read_tag(audio)
            if tag is not None and tag[0] in recorder.calls:
                self.call = recorder.calls[tag[0]]
                first = now + (self.call.call_no % 20) / 20 * self.model.reply_every_s
                self.loop.at(first, self, self._start_reply)

    def _start_reply(self, due: float) -> None:
        self._next_reply_s = due + self.model.reply_every_s
        if clock() + self.model.reply_chunks * CHUNK_MS / 1000 + 0.3 > self.model.recorder.replies_until_s:  # (played in real time)
            self.loop.at(self._next_reply_s, self, self._start_reply)
            return
        n = next(self._replies)
        self._response_id, self._item_id = f"resp_{self.number}_{n}", f"item_{self.number}_{n}"
        self.send_json(response_created(self.event_id(), self._response_id))
        self._t0, self._k = clock(), 0
        self._delta(self._t0)

    def _delta(self, due: float) -> None:
        call = self.call
        assert call is not None
        text = audio_delta(
            self.event_id(), self._response_id, self._item_id, tag_audio(call.call_no, len(call.down_sent_s), CHUNK_BYTES)
        ).encode()
        # Faster than real time, only a reply's first delta is timed: the server holds the others back on purpose
        # (it keeps a lead of audio at Twilio, not the whole reply), so their wait is not the bridge's latency.
        call.down_sent_s.append(clock() if self._k == 0 or self.model.speed == 1.0 else math.nan)
        self.send_text(text)
        self._k += 1
        if self._k < self.model.reply_chunks:
            self.loop.at(self._t0 + self._k * CHUNK_MS / 1000 / self.model.speed, self, self._delta)
            return
        self.send_json(audio_done(self.event_id(), self._response_id, self._item_id))
        self.send_json(response_done(self.event_id(), self._response_id))
        self.loop.at(self._next_reply_s, self, self._start_reply)  # at once if this reply overran the period

    def fail(self, exc: Exception) -> None:
        self.model.errors.append(f"fake model failed: {_leaf(exc)!r}"[:200])
        super().fail(exc)

    def on_end(self, why: str, clean: bool) -> None:
        self.model._closed(self)  # the server hung up: its session is over

    def feed_plain(self, data: bytes, now: float) -> None:
        """Parse plaintext WebSocket bytes (what followed the handshake)."""
        _Conn.feed(self, data, now)


class _TLSModelSession(_ModelSession):
    """A model session over TLS: what the socket receives is decrypted before the frame parser sees it,
    and every frame sent is encrypted first (one ``SSLObject.write`` and one ``outgoing.read`` per frame).

    Only this class pays for TLS: plain sessions and the callers keep the
    plain :class:`_Conn` paths.
    """

    def __init__(self, model: FakeModel, loop: _Loop, sock: socket.socket, number: int, label: str, tls: _TLS) -> None:
        super().__init__(model, loop, sock, number, label)
        self.tls = tls

    def _write(self, data: bytes) -> None:
        if self.open:
            _Conn._write(self, self.tls.encrypt(data))

    def feed(self, data: bytes, now: float) -> None:
        """Ciphertext from the socket: decrypt every whole record, then parse the plaintext's frames."""
        tls = self.tls
        try:
            plain = tls.decrypt(data)
        except ssl.SSLError as exc:
            self.end(f"TLS error: {exc}")
            return
        if tls.outgoing.pending:  # e.g. an alert or a key update answer
            _Conn._write(self, tls.outgoing.read())
        if plain:
            _Conn.feed(self, plain, now)
        if tls.closed:
            self.end("TLS close_notify without a close frame")


# --- the caller: Twilio's side ----------------------------------------------------------


async def http_request(host: str, port: int, method: str, path: str, body: bytes = b"", content_type: str = "") -> tuple[int, str]:
    """One HTTP/1.1 request over a fresh connection; (status, body).

    The body is read by its ``Content-Length``: Hypercorn answers
    ``Connection: close`` but leaves closing the socket to the client.
    """
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
    if body or method == "POST":
        head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
    stream = await trio.open_tcp_stream(host, port)
    async with stream:
        await stream.send_all(head.encode("latin-1") + b"\r\n" + body)
        data = bytearray()
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ValueError(f"{method} {path}: connection closed before the response headers")
            data += chunk
        head_bytes, _, rest = bytes(data).partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) < 2 or not parts[1].isdigit():
            raise ValueError(f"bad HTTP status line {lines[0]!r}")
        length = None
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        payload = bytearray(rest)
        while length is None or len(payload) < length:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            payload += chunk
    return int(parts[1]), bytes(payload).decode("utf-8", "replace")


async def http_post_form(host: str, port: int, path: str, form: dict[str, str]) -> tuple[int, str]:
    """A form POST, as Twilio sends its voice webhook; (status, body)."""
    return await http_request(host, port, "POST", path, urlencode(form).encode(), "application/x-www-form-urlencoded")


def parse_stream_twiml(text: str) -> tuple[str, dict[str, str]]:
    """``<Connect><Stream url>`` and its ``<Parameter>``s from a TwiML answer."""
    root = ET.fromstring(text)
    stream = root.find("./Connect/Stream")
    if stream is None:
        raise ValueError(f"no <Connect><Stream> in the TwiML: {text[:120]!r}")
    params = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    return stream.get("url", ""), params


class _Playout:
    """Twilio's outbound buffer, as far as mark echoes go: a mark is echoed when the audio before it has played."""

    def __init__(self) -> None:
        self.playing_until_s = 0.0
        self.marks: deque[tuple[float, str]] = deque()

    def media(self, n_bytes: int, now: float) -> None:
        self.playing_until_s = max(self.playing_until_s, now) + n_bytes / 8000

    def mark(self, name: str, now: float) -> float:
        """Queue a mark; when it is due."""
        due = max(self.playing_until_s, now)
        self.marks.append((due, name))
        return due

    def due(self, now: float) -> list[str]:
        """Marks whose audio has played by ``now``, oldest first."""
        names = []
        while self.marks and self.marks[0][0] <= now:
            names.append(self.marks.popleft()[1])
        return names

    def clear(self, now: float) -> list[str]:
        names = [name for _, name in self.marks]
        self.marks.clear()
        self.playing_until_s = now
        return names


async def run_call(
    recorder: Recorder,
    call_no: int,
    host: str,
    port: int,
    end_s: float,
    webhook_path: str = "/twiml",
) -> None:
    """One simulated call until ``end_s`` (Trio clock); failures are recorded, never raised.

    ``webhook_path`` is the server's voice webhook (ours: ``/twiml``; the
    peer sample's: ``/incoming-call``).
    """
    call = recorder.calls[call_no]
    try:
        await _call(recorder, call, host, port, end_s, webhook_path)
    except Exception as exc:  # noqa: BLE001 - a failed call is a measurement, not a bench failure
        leaf = _leaf(exc)
        call.failed = f"{type(leaf).__name__}: {leaf}"[:200]


async def _call(recorder: Recorder, call: CallRecord, host: str, port: int, end_s: float, webhook_path: str) -> None:
    # Unique per call and step: the server refuses a webhook for a call SID whose stream already ran (a replay).
    call_sid = f"CA{secrets.token_hex(8)}{call.call_no:016x}"
    account_sid = "AC" + "b" * 32
    with trio.fail_after(15):
        status, body = await http_post_form(
            host,
            port,
            webhook_path,
            {"CallSid": call_sid, "AccountSid": account_sid, "From": "+15550000000", "To": "+15551111111",
             "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01"},
        )
    if status != 200:
        raise ValueError(f"webhook answered HTTP {status}: {body[:120]!r}")
    url, params = parse_stream_twiml(body)
    parts = urlsplit(url)
    if parts.scheme != "ws" or not parts.hostname:
        raise ValueError(f"unexpected stream URL {url!r}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    with trio.fail_after(15):
        sock, rest = await _ws_connect(parts.hostname, parts.port or 80, target)
    loop = _Loop.current()
    caller = _Caller(loop, sock, recorder, call, end_s)
    loop.add(caller)
    try:
        caller.start(call_sid, account_sid, params)
        if rest:
            caller.feed(rest, clock())
        await caller.finished.wait()
    finally:
        caller.end("the call task was cancelled")  # no-op once the call has ended
    if caller.error is not None:
        raise caller.error
    if call.server_closed_early:
        raise ValueError(f"the server closed the media stream before stop ({caller.why})")


class _Caller(_Conn):
    """One call's Media Stream: 20 ms frames on the shared schedule, playout and mark echoes, stop."""

    masked = True

    def __init__(self, loop: _Loop, sock: socket.socket, recorder: Recorder, call: CallRecord, end_s: float) -> None:
        super().__init__(loop, sock)
        self.recorder = recorder
        self.call = call
        self.end_s = end_s
        self.finished = trio.Event()
        self.why = ""
        self.error: Exception | None = None  # the generator could not handle this call (see fail)
        self.done = False  # stop was sent
        self.playout = _Playout()
        self._sequence = itertools.count(1)
        self._k = 0
        self._t0 = 0.0
        sid = f"MZ{call.call_no:032x}"
        self.stream_sid = sid
        self._media_head = ('{"event":"media","streamSid":"' + sid + '","sequenceNumber":"').encode()
        self._mark_head = '{"event":"mark","streamSid":"' + sid + '","sequenceNumber":"'
        self._stop: Callable[[int], str] = lambda n: ""
        # What the server sends, compact (ours, and Starlette's send_json): read without json.loads.
        self._in_media = ('{"event":"media","streamSid":"' + sid + '","media":{"payload":"').encode()
        self._in_mark = ('{"event":"mark","streamSid":"' + sid + '","mark":{"name":"').encode()

    def start(self, call_sid: str, account_sid: str, params: dict[str, str]) -> None:
        """``connected`` and ``start``, then frame 0 at once and the rest on the schedule."""
        sid = self.stream_sid
        self.send_json(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        start = {
            "streamSid": sid, "accountSid": account_sid, "callSid": call_sid, "tracks": ["inbound"],
            "customParameters": params, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        self.send_json(json.dumps({"event": "start", "sequenceNumber": str(next(self._sequence)), "streamSid": sid, "start": start}))
        self._stop = lambda n: json.dumps(
            {"event": "stop", "sequenceNumber": str(n), "streamSid": sid, "stop": {"accountSid": account_sid, "callSid": call_sid}}
        )
        self._t0 = clock()
        self._send_frame(self._t0)

    def send_json(self, text: str) -> None:
        self.send_text(text.encode())

    def _send_frame(self, due: float) -> None:
        """Frame k (due now), then schedule frame k + 1, or send stop if that would be due at the end."""
        if self.done or not self.open:
            return
        k = self._k
        # = b2a_base64(tag_audio(call_no, k, FRAME_BYTES)): the tag plus 2 bytes of silence is a whole
        # number of base64 groups, and the rest of the frame is the same silence every time.
        payload = binascii.b2a_base64(_TAG.pack(MAGIC, self.call.call_no, k) + _TAG_PAD, newline=False)
        text = b'%s%d","media":{"track":"inbound","chunk":"%d","timestamp":"%d","payload":"%s%s"}}' % (
            self._media_head, next(self._sequence), k + 1, k * FRAME_MS, payload, _FRAME_TAIL_B64
        )
        frame = ws_frame(_OP_TEXT, text, True)
        t = clock()
        self.call.up_sent_s.append(t)  # before the send: the model may have the frame before send() returns
        self._write(frame)
        if self.recorder.in_window(t):
            self.recorder.send_lateness_s.append(max(t - due, 0.0))
        self._k = k = k + 1
        due = self._t0 + k * FRAME_MS / 1000
        if due < self.end_s:
            self.loop.at(due, self, self._send_frame)
            return
        self.done = True  # before the send: the server may hang up at once
        self.send_json(self._stop(next(self._sequence)))
        self.loop.at(clock() + HANGUP_WAIT_S, self, self._hang_up)

    def _hang_up(self, due: float) -> None:
        self.end("we hung up after stop")  # the server never closed the stream: not a failure of the call

    def on_message(self, message: bytes, now: float) -> None:
        if message.startswith(self._in_media) and message.endswith(b'"}}'):
            b64 = message[len(self._in_media):-3]
            if b"\\" not in b64 and b'"' not in b64:
                self._media(_tag_prefix(b64), _b64_size(b64), now)
                return
        elif message.startswith(self._in_mark) and message.endswith(b'"}}'):
            raw = message[len(self._in_mark):-3]
            if b"\\" not in raw and b'"' not in raw:
                self._mark(raw.decode("utf-8", "replace"), now)
                return
        msg = json.loads(message)
        event = msg.get("event")
        if event == "media":
            audio = binascii.a2b_base64(msg["media"]["payload"])
            self._media(audio, len(audio), now)
        elif event == "mark":
            self._mark(msg["mark"]["name"], now)
        elif event == "clear":
            for name in self.playout.clear(now):
                self._echo(name)

    def _media(self, audio: bytes, n_bytes: int, now: float) -> None:
        self.recorder.down_arrived(self.call, audio, now)
        self.playout.media(n_bytes, now)

    def _mark(self, name: str, now: float) -> None:
        due = self.playout.mark(name, now)
        if due <= now:
            self._echo_due(now)
        else:
            self.loop.at(due, self, self._echo_due)

    def _echo_due(self, due: float) -> None:
        for name in self.playout.due(clock()):
            self._echo(name)

    def _echo(self, name: str) -> None:
        self.send_json(self._mark_head + str(next(self._sequence)) + '","mark":{"name":' + encode_basestring_ascii(name) + "}}")

    def fail(self, exc: Exception) -> None:
        self.error = exc
        super().fail(exc)

    def on_end(self, why: str, clean: bool) -> None:
        if not self.done and self.error is None:
            self.call.server_closed_early = True
        self.why = why
        self.finished.set()
