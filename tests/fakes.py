"""Fakes for both ends of a call: a Twilio caller and an OpenAI Realtime (GA) server.

They are meant to be reused (the end-to-end tests, the bridge unit tests and
a call simulator), so they take their transport as a parameter:

* :class:`FakeTwilioCaller` speaks the Media Streams protocol from Twilio's
  side over anything with ``send_message``/``get_message`` (a trio-websocket
  connection, or the in-memory :func:`memory_twilio_pair`).  It sends
  ``connected``, ``start``, 20 ms µ-law ``media`` frames (numbered like
  Twilio: string ``sequenceNumber``, ``chunk`` and ``timestamp``), ``dtmf``
  and ``stop``; and it emulates Twilio's playback buffer (:class:`TwilioPlayback`):
  audio plays in real time (Trio time), a ``mark`` is echoed when the audio
  before it has played, ``clear`` drops the buffer and echoes every pending
  mark at once.  Everything it receives is recorded.
* :class:`FakeOpenAIServer` is a trio-websocket server on 127.0.0.1:0 that
  answers like the GA Realtime API: ``session.created`` on connect,
  ``session.updated`` echoing the requested session, ``conversation.item.truncated``
  for truncations.  Every client message is validated with the ``openai``
  SDK's ``RealtimeClientEvent`` type adapter (strict, no unknown keys) and
  recorded; every server message is an SDK model's ``model_dump_json()``.
  A per-connection ``script`` coroutine drives the conversation through
  :class:`FakeRealtimeSession` (speech started/stopped, responses, barge-in).
* :class:`FakeLink` is an in-memory ``ProviderLink`` for bridge unit tests.

Everything reads time from Trio only, so the same fakes run under a
``MockClock`` (memory transports) and in real time (loopback sockets).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import json
import math
import ssl
import xml.etree.ElementTree as ET
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar
from urllib.parse import urlencode, urlsplit

import h11
import numpy as np
import numpy.typing as npt
import pydantic
import trio
from openai.types.realtime import (
    ConversationItemTruncatedEvent,
    ConversationItemTruncateEvent,
    InputAudioBufferAppendEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    RealtimeClientEvent,
    RealtimeResponse,
    RealtimeSessionCreateRequest,
    ResponseAudioDeltaEvent,
    ResponseCreateEvent,
    ResponseAudioDoneEvent,
    ResponseCreatedEvent,
    ResponseDoneEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
    SessionUpdateEvent,
)
from openai.types.realtime.realtime_audio_formats import AudioPCM
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    WebSocketRequest,
    wrap_client_stream,
)

from mediaserver.bridge.call import StreamClosed
from mediaserver.bridge.link import ProviderClosed
from mediaserver.codec import ulaw_decode, ulaw_encode
from mediaserver.protocol.providers import base as pv
from tests._ws_server import FakeConnection, LoopbackWsServer, assert_no_extra, serve_session

__all__ = [
    "ACCOUNT_SID",
    "FakeLink",
    "FakeOpenAIServer",
    "FakeRealtimeSession",
    "FakeTwilioCaller",
    "HttpResponse",
    "TwilioPlayback",
    "TwiML",
    "WsClient",
    "answer_call",
    "band_energy_ratio",
    "dominant_frequency_hz",
    "fail_after",
    "http_request",
    "memory_twilio_pair",
    "open_ws_client",
    "tone",
    "turn_script",
    "websocket_upgrade_status",
]

ACCOUNT_SID = "AC" + "0" * 32
FRAME_MS = 20  # Twilio's usual inbound frame (reference/twilio-side.md §1.5)
FRAME_BYTES = 160  # 20 ms of 8 kHz µ-law
MULAW_SILENCE = b"\xff"  # µ-law code of 0

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])


def fail_after(seconds: float) -> Callable[[_F], _F]:
    """Decorator: fail the async test if it takes longer than ``seconds`` of Trio time."""

    def decorate(fn: _F) -> _F:
        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            with trio.fail_after(seconds):
                return await fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


# ----------------------------------------------------------------------- audio


class LoopLag:
    """How late this process's event loop ran (a stalled machine: CI): a gap in playback as long as a stall is the
    machine's, not the server's.  ``run`` it in a nursery for the time to watch."""

    def __init__(self) -> None:
        self.longest_s = 0.0

    async def run(self) -> None:
        while True:
            asked = trio.current_time() + 0.01
            await trio.sleep_until(asked)
            self.longest_s = max(self.longest_s, trio.current_time() - asked)


def tone(freq_hz: float, ms: int, rate_hz: int = 8000, *, amplitude: float = 0.5) -> npt.NDArray[np.int16]:
    """A sine of ``ms`` milliseconds, int16, starting at phase 0."""
    n = rate_hz * ms // 1000
    t = np.arange(n) / rate_hz
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * freq_hz * t)).astype(np.int16)


def to_ulaw(pcm: npt.NDArray[np.int16]) -> bytes:
    return ulaw_encode(np.ascontiguousarray(pcm, dtype="<i2").tobytes())


def from_ulaw(data: bytes) -> npt.NDArray[np.int16]:
    return np.frombuffer(ulaw_decode(data), dtype="<i2")


def pcm16(data: bytes) -> npt.NDArray[np.int16]:
    return np.frombuffer(data, dtype="<i2")


def dominant_frequency_hz(pcm: npt.NDArray[np.int16], rate_hz: int) -> float:
    """Frequency of the strongest bin of a Hann-windowed spectrum (DC excluded)."""
    x = pcm.astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    spectrum[0] = 0.0
    return float(np.argmax(spectrum) * rate_hz / len(x))


def band_energy_ratio(pcm: npt.NDArray[np.int16], rate_hz: int, freq_hz: float, width_hz: float = 100.0) -> float:
    """Share of the signal's energy within ``freq_hz ± width_hz``."""
    x = pcm.astype(np.float64)
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate_hz)
    total = float(power[1:].sum())
    if total == 0.0:
        return 0.0
    return float(power[np.abs(freqs - freq_hz) <= width_hz].sum()) / total


# ------------------------------------------------------------------ transports


class TransportClosed(Exception):
    """The in-memory transport's other end has gone."""


class CallerTransport(Protocol):
    """The caller's side of the Media Stream socket (a trio-websocket connection fits)."""

    async def send_message(self, message: str) -> None: ...

    async def get_message(self) -> str | bytes: ...


class MemoryMessageStream:
    """The bridge's side of an in-memory Media Stream (a ``MessageStream``)."""

    def __init__(self, incoming: trio.MemoryReceiveChannel[str | bytes], outgoing: trio.MemorySendChannel[str]) -> None:
        self._incoming = incoming
        self._outgoing = outgoing

    async def receive(self) -> str | bytes:
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StreamClosed("caller closed the stream") from None

    async def send(self, text: str) -> None:
        try:
            await self._outgoing.send(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise StreamClosed("caller closed the stream") from None

    async def send_many(self, texts: Sequence[str]) -> None:
        for text in texts:
            await self.send(text)

    def close(self) -> None:
        """What the app does when the bridge returns: the caller sees the socket close."""
        self._outgoing.close()


class MemoryCallerTransport:
    """The caller's side of an in-memory Media Stream."""

    def __init__(self, incoming: trio.MemoryReceiveChannel[str], outgoing: trio.MemorySendChannel[str | bytes]) -> None:
        self._incoming = incoming
        self._outgoing = outgoing

    async def send_message(self, message: str | bytes) -> None:
        try:
            await self._outgoing.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise TransportClosed from None

    async def get_message(self) -> str:
        try:
            return await self._incoming.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise TransportClosed from None

    def close(self) -> None:
        self._outgoing.close()


def memory_twilio_pair() -> tuple[MemoryMessageStream, MemoryCallerTransport]:
    """A Media Stream in memory: (bridge side, caller side); unbounded both ways, like a socket buffer."""
    up_send, up_recv = trio.open_memory_channel[str | bytes](math.inf)
    down_send, down_recv = trio.open_memory_channel[str](math.inf)
    return MemoryMessageStream(up_recv, down_send), MemoryCallerTransport(down_recv, up_send)


# ----------------------------------------------------------------- HTTP client


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


async def http_request(
    url: str,
    method: str = "GET",
    *,
    form: Sequence[tuple[str, str]] | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> HttpResponse:
    """One HTTP/1.1 request over a fresh loopback connection (h11, no pooling)."""
    parts = urlsplit(url)
    assert parts.scheme == "http" and parts.hostname is not None and parts.port is not None
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    body = urlencode(list(form)).encode() if form is not None else b""
    request_headers = [("Host", parts.netloc), ("Connection", "close"), *headers]
    if form is not None:
        request_headers += [("Content-Type", "application/x-www-form-urlencoded"), ("Content-Length", str(len(body)))]
    conn = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=request_headers)))
        if body:
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return await read_response(conn, stream)


async def read_response(conn: h11.Connection, stream: trio.abc.Stream) -> HttpResponse:
    """The answer to the request sent on ``conn`` over ``stream``, read whole."""
    status = 0
    response_headers: dict[str, str] = {}
    chunks: list[bytes] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
            response_headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        elif isinstance(event, h11.Data):
            chunks.append(bytes(event.data))
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return HttpResponse(status, response_headers, b"".join(chunks))


async def websocket_upgrade_status(url: str, headers: Iterable[tuple[str, str]] = ()) -> int:
    """Status of a WebSocket upgrade request to ``ws://`` ``url``: 101 if accepted.

    Done with h11 on a socket we own, because trio-websocket's client does not
    close its socket when the server refuses the upgrade.
    """
    parts = urlsplit(url)
    assert parts.scheme == "ws" and parts.hostname is not None and parts.port is not None
    request_headers = [
        ("Host", parts.netloc),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", base64.b64encode(b"0123456789abcdef").decode()),
        ("Sec-WebSocket-Version", "13"),
        *headers,
    ]
    conn = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    async with stream:
        await stream.send_all(conn.send(h11.Request(method="GET", target=parts.path, headers=request_headers)))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, (h11.InformationalResponse, h11.Response)):
                return int(event.status_code)
            else:
                raise AssertionError(f"unexpected {event!r}")


class WsClient:
    """A client WebSocket whose TCP socket we own (a ``CallerTransport``)."""

    def __init__(self, ws: WebSocketConnection, stream: trio.SocketStream) -> None:
        self.ws = ws
        self.stream = stream

    async def send_message(self, message: str | bytes) -> None:
        await self.ws.send_message(message)

    async def get_message(self) -> str | bytes:
        return await self.ws.get_message()

    async def abort(self) -> None:
        """Drop the TCP connection, no close handshake (a network failure)."""
        await trio.aclose_forcefully(self.stream)


@asynccontextmanager
async def open_ws_client(url: str, headers: Iterable[tuple[str, str]] = ()) -> AsyncIterator[WsClient]:
    """A trio-websocket client connection to ``ws://`` ``url`` whose TCP socket we own.

    (``open_websocket_url`` leaves the socket open when the server closes the
    WebSocket first, which is what the media server does when a call ends.)
    """
    parts = urlsplit(url)
    assert parts.scheme == "ws" and parts.hostname is not None and parts.port is not None
    stream = await trio.open_tcp_stream(parts.hostname, parts.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await wrap_client_stream(
                nursery,
                stream,
                parts.netloc,
                parts.path + (f"?{parts.query}" if parts.query else ""),
                extra_headers=[(k.encode(), v.encode()) for k, v in headers],
            )
            try:
                yield WsClient(ws, stream)
            finally:
                with trio.move_on_after(1):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


@dataclass(frozen=True)
class TwiML:
    """What a ``<Connect><Stream>`` answer says: where to stream and with which parameters."""

    stream_url: str
    parameters: dict[str, str]
    hangup_after: bool
    xml: str


def parse_twiml(text: str) -> TwiML:
    root = ET.fromstring(text)
    assert root.tag == "Response", text
    stream = root.find("./Connect/Stream")
    assert stream is not None, f"no <Connect><Stream> in {text}"
    parameters = {p.attrib["name"]: p.attrib["value"] for p in stream.findall("Parameter")}
    children = [child.tag for child in root]
    return TwiML(stream.attrib["url"], parameters, children[-1] == "Hangup", text)


async def answer_call(
    base_url: str,
    call_sid: str,
    *,
    auth_token: str | None = None,
    extra_form: Sequence[tuple[str, str]] = (),
) -> TwiML:
    """Do what Twilio does when a call comes in: POST the voice webhook (signed if
    ``auth_token``), and parse the TwiML answer."""
    form = [("CallSid", call_sid), ("AccountSid", ACCOUNT_SID), ("From", "+15550001111"), ("To", "+15552223333"),
            ("CallStatus", "ringing"), ("Direction", "inbound"), *extra_form]
    url = base_url.rstrip("/") + "/twiml"
    headers = []
    if auth_token is not None:
        headers.append(("X-Twilio-Signature", twilio_signature(auth_token, url, form)))
    response = await http_request(url, "POST", form=form, headers=headers)
    assert response.status == 200, (response.status, response.body)
    assert response.headers["content-type"].startswith("text/xml"), response.headers
    return parse_twiml(response.text)


def twilio_signature(auth_token: str, url: str, form: Sequence[tuple[str, str]] = ()) -> str:
    """``X-Twilio-Signature`` as Twilio computes it (the official helper library)."""
    from twilio.request_validator import RequestValidator

    from werkzeug.datastructures import MultiDict

    # (a MultiDict: the library reads every value of a repeated name through its getlist)
    return str(RequestValidator(auth_token).compute_signature(url, MultiDict(list(form))))


# ------------------------------------------------------------ Twilio's side


class TwilioMessages:
    """Builds the messages Twilio sends on a Media Stream, numbered as Twilio numbers them."""

    def __init__(self, *, stream_sid: str, call_sid: str, account_sid: str = ACCOUNT_SID) -> None:
        self.stream_sid = stream_sid
        self.call_sid = call_sid
        self.account_sid = account_sid
        self._sequence = itertools.count(1)
        self._chunk = itertools.count(1)
        self.timestamp_ms = 0

    def _base(self, event: str) -> dict[str, Any]:
        return {"event": event, "sequenceNumber": str(next(self._sequence)), "streamSid": self.stream_sid}

    def connected(self) -> str:
        return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(self, custom_parameters: dict[str, str]) -> str:
        msg = self._base("start")
        msg["start"] = {
            "streamSid": self.stream_sid,
            "accountSid": self.account_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": custom_parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        return json.dumps(msg)

    def media(self, payload: bytes) -> str:
        msg = self._base("media")
        msg["media"] = {
            "track": "inbound",
            "chunk": str(next(self._chunk)),
            "timestamp": str(self.timestamp_ms),
            "payload": base64.b64encode(payload).decode("ascii"),
        }
        self.timestamp_ms += len(payload) // 8
        return json.dumps(msg)

    def mark(self, name: str) -> str:
        msg = self._base("mark")
        msg["mark"] = {"name": name}
        return json.dumps(msg)

    def dtmf(self, digit: str) -> str:
        msg = self._base("dtmf")
        msg["dtmf"] = {"track": "inbound_track", "digit": digit}
        return json.dumps(msg)

    def stop(self) -> str:
        msg = self._base("stop")
        msg["stop"] = {"accountSid": self.account_sid, "callSid": self.call_sid}
        return json.dumps(msg)


@dataclass
class _BufferedMark:
    name: str
    due_s: float  # when the audio before it will have played
    audio_bytes: int  # µ-law bytes sent between the previous mark and this one


@dataclass(frozen=True)
class MarkEcho:
    name: str
    at_s: float
    cleared: bool  # echoed because of a clear, not because its audio played
    audio_bytes: int


@dataclass(frozen=True)
class ClearSeen:
    at_s: float
    played_marked_bytes: int  # audio covered by marks echoed as played before this clear
    dropped_bytes: int  # buffered audio the clear discarded (not yet played)


class TwilioPlayback:
    """Twilio's outbound buffer, sans I/O: audio plays in order in real time.

    ``media(payload, now)`` queues audio, ``mark(name, now)`` queues a mark
    that falls due when everything before it has played (at once if the
    buffer is empty), ``due(now)`` pops the marks due by ``now``, ``clear(now)``
    empties the buffer and returns every pending mark (all to be echoed now).
    """

    def __init__(self) -> None:
        self.buffer_end_s = -math.inf  # when everything queued will have played
        self._marks: deque[_BufferedMark] = deque()
        self._bytes_since_mark = 0
        self._segments: deque[tuple[float, float, int]] = deque()  # (start, end, bytes) not yet played

    def media(self, payload: bytes, now: float) -> None:
        start = max(self.buffer_end_s, now)
        self.buffer_end_s = start + len(payload) / 8000
        self._bytes_since_mark += len(payload)
        self._segments.append((start, self.buffer_end_s, len(payload)))

    def mark(self, name: str, now: float) -> None:
        due = max(self.buffer_end_s, now)
        self._marks.append(_BufferedMark(name, due, self._bytes_since_mark))
        self._bytes_since_mark = 0

    def next_due_s(self) -> float | None:
        return self._marks[0].due_s if self._marks else None

    def due(self, now: float) -> list[_BufferedMark]:
        out = []
        while self._marks and self._marks[0].due_s <= now:
            out.append(self._marks.popleft())
        return out

    def clear(self, now: float) -> tuple[list[_BufferedMark], int]:
        """Drop what has not played; returns the pending marks and the bytes dropped."""
        dropped = 0
        for start, end, size in self._segments:
            if end > now:
                unplayed = min(1.0, (end - max(start, now)) / (end - start))
                dropped += round(size * unplayed)
        self._segments.clear()
        marks = list(self._marks)
        self._marks.clear()
        self._bytes_since_mark = 0
        self.buffer_end_s = now
        return marks, dropped


@dataclass(frozen=True)
class ReceivedMedia:
    at_s: float
    payload: bytes


class FakeTwilioCaller:
    """Twilio's side of one bidirectional Media Stream (see the module docstring).

    Use ``async with caller.attached(transport):`` -- it sends ``connected`` and
    ``start`` (unless ``start=False``) and runs the receive/playback task until
    the block ends.  Then ``send_audio``, ``send_silence``, ``dtmf``, ``stop``.
    """

    def __init__(
        self,
        *,
        call_sid: str = "CA" + "1" * 32,
        stream_sid: str = "MZ" + "2" * 32,
        account_sid: str = ACCOUNT_SID,
        custom_parameters: dict[str, str] | None = None,
    ) -> None:
        self.messages = TwilioMessages(stream_sid=stream_sid, call_sid=call_sid, account_sid=account_sid)
        self.custom_parameters = dict(custom_parameters or {})
        self.playback = TwilioPlayback()
        # records
        self.sent_frames: list[bytes] = []
        self.received: list[ReceivedMedia] = []
        self.inbound: list[tuple[float, dict[str, Any]]] = []  # every message from the server, parsed
        self.echoes: list[MarkEcho] = []
        self.clears: list[ClearSeen] = []
        self.errors: list[str] = []
        self.closed = trio.Event()
        self.closed_at_s: float | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.played_marked_bytes = 0
        self.stopped_at_s: float | None = None
        self._transport: CallerTransport | None = None
        self._send_lock = trio.StrictFIFOLock()  # message numbering == wire order
        self._next_frame_s: float | None = None
        self._arrived = trio.Event()
        self._echoes_held = False  # hold_echoes(): marks fall due but are not echoed as played
        self._withheld: list[_BufferedMark] = []  # played marks not echoed because of the hold (echoed on release)
        self._echoes_sending = 0  # echoes counted as played whose message is not on the wire yet
        self._waiting: trio.CancelScope | None = None  # the receive loop's wait (release_echoes wakes it)

    @property
    def stream_sid(self) -> str:
        return self.messages.stream_sid

    @property
    def call_sid(self) -> str:
        return self.messages.call_sid

    @property
    def received_audio(self) -> bytes:
        return b"".join(m.payload for m in self.received)

    # -- lifecycle ------------------------------------------------------------

    @asynccontextmanager
    async def attached(self, transport: CallerTransport, *, start: bool = True) -> AsyncIterator[FakeTwilioCaller]:
        self._transport = transport
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_loop)
            if start:
                await self.send_raw(self.messages.connected())
                await self.send_raw(self.messages.start(self.custom_parameters))
            yield self
            nursery.cancel_scope.cancel()

    async def send_raw(self, message: str | bytes) -> bool:
        """Send one message as is; False if the socket is closed (as for Twilio, not an error)."""
        return await self._send_built(lambda: message)  # type: ignore[arg-type,return-value]

    async def _send_built(self, build: Callable[[], str]) -> bool:
        # Build under the lock: sequence numbers must reach the wire in order.
        assert self._transport is not None
        async with self._send_lock:
            if self.closed.is_set():
                return False
            try:
                await self._transport.send_message(build())
            except (ConnectionClosed, TransportClosed):
                return False
        return True

    # -- uplink ---------------------------------------------------------------

    async def send_audio(self, ulaw: bytes, *, paced: bool = True) -> None:
        """Send ``ulaw`` as 20 ms frames; ``paced`` keeps Twilio's real-time cadence
        on an absolute schedule that continues across calls."""
        for at in range(0, len(ulaw), FRAME_BYTES):
            frame = ulaw[at : at + FRAME_BYTES]
            if paced:
                if self._next_frame_s is None:
                    self._next_frame_s = trio.current_time()
                await trio.sleep_until(self._next_frame_s)
                self._next_frame_s += FRAME_MS / 1000
            if not await self._send_built(functools.partial(self.messages.media, frame)):
                return
            self.sent_frames.append(frame)

    async def send_silence(self, ms: int, *, paced: bool = True) -> None:
        await self.send_audio(MULAW_SILENCE * (8 * ms), paced=paced)

    async def dtmf(self, digit: str) -> None:
        await self._send_built(functools.partial(self.messages.dtmf, digit))

    async def stop(self) -> None:
        self.stopped_at_s = trio.current_time()
        await self._send_built(self.messages.stop)

    async def abort(self) -> None:
        """Drop the connection without ``stop`` (the transport must have ``abort``)."""
        self.stopped_at_s = trio.current_time()
        await self._transport.abort()  # type: ignore[union-attr]

    # -- downlink and playback ------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; it is checked after every message in or echo out."""
        while not predicate():
            await self._wait_arrival()

    async def wait_for_audio(self, n_bytes: int) -> None:
        """Wait until at least ``n_bytes`` of agent audio have arrived."""
        await self.wait_for(lambda: sum(len(m.payload) for m in self.received) >= n_bytes)

    async def hold_echoes(self) -> None:
        """Echo no mark as played until :meth:`release_echoes` (as over a slow network); a ``clear`` still echoes
        every pending mark at once.  A test that barges in while they are held knows exactly which marks the
        server saw before its clear, however late the clear comes.

        Returns once every echo counted as played before the hold is on the wire (one may be waiting for the
        send lock behind a media frame, on a stalled machine): from then on ``played_marked_bytes`` is what the
        server has been sent, and no echo is on its way.
        """
        self._echoes_held = True
        await self.wait_for(lambda: self._echoes_sending == 0)

    def release_echoes(self) -> None:
        self._echoes_held = False
        if self._waiting is not None:
            self._waiting.cancel()  # (the loop echoes what fell due meanwhile)

    async def wait_for_clear(self) -> ClearSeen:
        await self.wait_for(lambda: bool(self.clears))
        return self.clears[0]

    async def say_and_hear_the_echo(self, ulaw: bytes) -> float:
        """Say ``ulaw``, then 600 ms of silence (the echo agent's cue), and wait until its echo has played out.

        Returns when the words were sent (Trio time).
        """
        await self.send_audio(ulaw)
        said_s = trio.current_time()
        await self.send_silence(600)
        await self.wait_for_audio(len(ulaw))
        await self.wait_quiet(0.3)
        return said_s

    async def wait_quiet(self, quiet_s: float) -> None:
        """Wait until no agent audio has arrived for ``quiet_s`` and the playback buffer is empty."""
        while True:
            last = self.received[-1].at_s if self.received else -math.inf
            until = max(last + quiet_s, self.playback.buffer_end_s)
            if trio.current_time() >= until:
                return
            with trio.move_on_at(until):
                await self._wait_arrival()

    async def _wait_arrival(self) -> None:
        await self._arrived.wait()

    def _notify(self) -> None:
        self._arrived.set()
        self._arrived = trio.Event()

    async def _receive_loop(self) -> None:
        assert self._transport is not None
        while True:
            message: str | bytes | None = None
            due = None if self._echoes_held else -math.inf if self._withheld else self.playback.next_due_s()
            with trio.move_on_at(math.inf if due is None else due) as self._waiting:
                try:
                    message = await self._transport.get_message()
                except (ConnectionClosed, TransportClosed) as exc:
                    self.closed_at_s = trio.current_time()
                    reason = getattr(exc, "reason", None)
                    self.close_code = getattr(reason, "code", None)
                    self.close_reason = getattr(reason, "reason", None) or ""
                    self.closed.set()
                    self._notify()
                    return
            self._waiting = None
            now = trio.current_time()
            if not self._echoes_held:
                withheld, self._withheld = self._withheld, []
                for mark in withheld + self.playback.due(now):  # audio that played before this message
                    await self._echo(mark, now, cleared=False)
            if message is not None:
                await self._handle(message, now)
                self._notify()

    async def _echo(self, mark: _BufferedMark, now: float, *, cleared: bool) -> None:
        if not cleared:
            if self._echoes_held:  # (held while this loop echoed a run of marks: the rest wait for the release)
                self._withheld.append(mark)
                return
            self.played_marked_bytes += mark.audio_bytes
        self.echoes.append(MarkEcho(mark.name, now, cleared, mark.audio_bytes))
        self._echoes_sending += 1
        try:
            await self._send_built(functools.partial(self.messages.mark, mark.name))
        finally:
            self._echoes_sending -= 1
        self._notify()

    async def _handle(self, message: str | bytes, now: float) -> None:
        # Validate as Twilio does (reference/twilio-side.md §1.3): text JSON,
        # only media/mark/clear, the right streamSid, no missing or extra fields.
        if not isinstance(message, str):
            self.errors.append("binary frame (Twilio warning 31950)")
            return
        msg = json.loads(message)
        self.inbound.append((now, msg))
        event = msg.get("event")
        if msg.get("streamSid") != self.stream_sid:
            self.errors.append(f"wrong streamSid in {message[:80]}")
        if event == "media":
            if set(msg) != {"event", "streamSid", "media"} or set(msg["media"]) != {"payload"}:
                self.errors.append(f"bad media message {message[:80]}")
            payload = base64.b64decode(msg["media"]["payload"], validate=True)
            self.received.append(ReceivedMedia(now, payload))
            self.playback.media(payload, now)
        elif event == "mark":
            if set(msg) != {"event", "streamSid", "mark"} or set(msg["mark"]) != {"name"}:
                self.errors.append(f"bad mark message {message[:80]}")
            self.playback.mark(msg["mark"]["name"], now)
            for mark in [] if self._echoes_held else self.playback.due(now):  # nothing buffered: echo at once
                await self._echo(mark, now, cleared=False)
        elif event == "clear":
            if set(msg) != {"event", "streamSid"}:
                self.errors.append(f"bad clear message {message[:80]}")
            marks, dropped = self.playback.clear(now)
            self.clears.append(ClearSeen(now, self.played_marked_bytes, dropped))
            for mark in marks:
                await self._echo(mark, now, cleared=True)
        else:
            self.errors.append(f"invalid event (Twilio error 31951): {message[:80]}")


# ------------------------------------------------------------ OpenAI's side

_CLIENT_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RealtimeClientEvent)


def validate_client_event(text: str | bytes) -> Any:
    """One client message, validated against the SDK's GA client event union (strict)."""
    assert isinstance(text, str), "OpenAI Realtime takes text frames only"
    model = _CLIENT_EVENT.validate_json(text, strict=True)
    assert_no_extra(model)  # the SDK models accept unknown keys; the real server does not
    assert model.model_dump(mode="json", exclude_unset=True) == json.loads(text), text[:200]
    return model


@dataclass
class ResponseRecord:
    response_id: str
    item_id: str
    audio: bytes  # everything we sent in output_audio.delta (session format)
    sent_bytes: int = 0
    done: bool = False


class FakeRealtimeSession(FakeConnection):
    """One connection to :class:`FakeOpenAIServer`, from the server's side."""

    server: FakeOpenAIServer

    def __init__(self, server: FakeOpenAIServer, ws: WebSocketConnection, stream: trio.abc.Stream, number: int) -> None:
        super().__init__(server, ws)
        self._stream = stream
        self.number = number
        self.path = ws.path
        self.received: list[tuple[float, Any]] = []  # (time, SDK model), every client message
        self.audio_in = bytearray()  # decoded input_audio_buffer.append payloads, in order
        self.appends: list[bytes] = []
        self.session_update: SessionUpdateEvent | None = None
        self.audio_format: str | None = None  # "pcmu" | "pcm24k", from session.update
        self.truncates: list[tuple[float, ConversationItemTruncateEvent]] = []
        self.responses: dict[str, ResponseRecord] = {}
        self.ready = trio.Event()  # session.updated sent
        self.opened_at_s = trio.current_time()
        self._event_ids = itertools.count(1)
        self._ids = itertools.count(1)

    # -- helpers for scripts and tests ---------------------------------------

    def types(self) -> list[str]:
        return [model.type for _, model in self.received]

    async def wait_appends(self, n: int) -> None:
        await self.wait_for(lambda: len(self.appends) >= n)

    def _event_id(self) -> str:
        return f"event_fake_{next(self._event_ids)}"

    async def send(self, event: pydantic.BaseModel) -> None:
        await self.send_message(event.model_dump_json())

    async def speech_started(self, *, audio_start_ms: int | None = None, item_id: str = "item_user") -> None:
        ms = self.input_ms() if audio_start_ms is None else audio_start_ms
        await self.send(
            InputAudioBufferSpeechStartedEvent(
                type="input_audio_buffer.speech_started", event_id=self._event_id(), item_id=item_id, audio_start_ms=ms
            )
        )

    async def speech_stopped(self, *, item_id: str = "item_user") -> None:
        await self.send(
            InputAudioBufferSpeechStoppedEvent(
                type="input_audio_buffer.speech_stopped",
                event_id=self._event_id(),
                item_id=item_id,
                audio_end_ms=self.input_ms(),
            )
        )

    def input_ms(self) -> int:
        rate_bytes = 8 if self.audio_format == "pcmu" else 48
        return len(self.audio_in) // rate_bytes

    async def respond(
        self,
        audio: bytes,
        *,
        chunk_bytes: int = 4000,
        interval_s: float = 0.0,
        done: bool = True,
    ) -> ResponseRecord:
        """One assistant audio response: response.created, output_audio.delta chunks
        (every ``interval_s``), then (if ``done``) output_audio.done and response.done."""
        n = next(self._ids)
        record = ResponseRecord(response_id=f"resp_{n}", item_id=f"item_{n}", audio=audio)
        self.responses[record.item_id] = record
        await self.send(
            ResponseCreatedEvent(
                type="response.created",
                event_id=self._event_id(),
                response=RealtimeResponse(id=record.response_id, object="realtime.response", status="in_progress"),
            )
        )
        for at in range(0, len(audio), chunk_bytes):
            if at and interval_s:
                await trio.sleep(interval_s)
            await self.audio_delta(record, audio[at : at + chunk_bytes])
        if done:
            await self.finish(record)
        return record

    async def audio_delta(self, record: ResponseRecord, chunk: bytes) -> None:
        record.sent_bytes += len(chunk)
        await self.send(
            ResponseAudioDeltaEvent(
                type="response.output_audio.delta",
                event_id=self._event_id(),
                response_id=record.response_id,
                item_id=record.item_id,
                output_index=0,
                content_index=0,
                delta=base64.b64encode(chunk).decode("ascii"),
            )
        )

    async def finish(self, record: ResponseRecord, *, status: str = "completed") -> None:
        record.done = True
        await self.send(
            ResponseAudioDoneEvent(
                type="response.output_audio.done",
                event_id=self._event_id(),
                response_id=record.response_id,
                item_id=record.item_id,
                output_index=0,
                content_index=0,
            )
        )
        await self.send(
            ResponseDoneEvent(
                type="response.done",
                event_id=self._event_id(),
                response=RealtimeResponse(id=record.response_id, object="realtime.response", status=status),  # type: ignore[arg-type]
            )
        )

    async def abort(self) -> None:
        """Drop the TCP connection without a close handshake (a crashed server)."""
        await trio.aclose_forcefully(self._stream)

    # -- the server side of the protocol -------------------------------------

    async def _run(self) -> None:
        await self.send(
            SessionCreatedEvent(
                type="session.created",
                event_id=self._event_id(),
                session=RealtimeSessionCreateRequest.model_validate(
                    {"type": "realtime", "id": f"sess_fake_{self.number}", "model": "gpt-realtime"}
                ),
            )
        )
        await self.receive_until_closed(self._handle)

    async def _handle(self, text: str | bytes) -> None:
        model = validate_client_event(text)
        self.received.append((trio.current_time(), model))
        await self._answer(model)

    async def _answer(self, model: Any) -> None:
        if isinstance(model, SessionUpdateEvent):
            session = model.session
            assert isinstance(session, RealtimeSessionCreateRequest), session
            fmt = session.audio.input.format if session.audio and session.audio.input else None
            self.audio_format = "pcm24k" if isinstance(fmt, AudioPCM) else "pcmu"
            self.session_update = model
            # Echo the requested session back, as the real server does (plus its own defaults).
            await self.send(
                SessionUpdatedEvent(type="session.updated", event_id=self._event_id(), session=session)
            )
            self.ready.set()
        elif isinstance(model, InputAudioBufferAppendEvent):
            audio = base64.b64decode(model.audio, validate=True)
            self.appends.append(audio)
            self.audio_in += audio
        elif isinstance(model, ResponseCreateEvent):
            # The real server answers every response.create with a response (created ... done), or refuses it
            # while one is active.  Scripts send audio responses themselves (respond()); this one is empty.
            n = next(self._ids)
            response = RealtimeResponse(id=f"resp_empty_{n}", object="realtime.response", status="in_progress")
            with contextlib.suppress(ConnectionClosed):  # (the call may be over already)
                await self.send(ResponseCreatedEvent(type="response.created", event_id=self._event_id(), response=response))
                done = response.model_copy(update={"status": "completed"})
                await self.send(ResponseDoneEvent(type="response.done", event_id=self._event_id(), response=done))
        elif isinstance(model, ConversationItemTruncateEvent):
            self.truncates.append((trio.current_time(), model))
            record = self.responses.get(model.item_id)
            assert record is not None, f"truncate of an unknown item {model.item_id}"
            bytes_per_ms = 8 if self.audio_format == "pcmu" else 48
            # The real server rejects audio_end_ms beyond the audio it produced.
            assert model.audio_end_ms * bytes_per_ms <= record.sent_bytes, (model, record.sent_bytes)
            await self.send(
                ConversationItemTruncatedEvent(
                    type="conversation.item.truncated",
                    event_id=self._event_id(),
                    item_id=model.item_id,
                    content_index=model.content_index,
                    audio_end_ms=model.audio_end_ms,
                )
            )


Script = Callable[[FakeRealtimeSession], Awaitable[None]]


def turn_script(
    reply: bytes,
    *,
    after_appends: int,
    chunk_bytes: int = 4000,
    barge_in_after_s: float | None = None,
) -> Script:
    """A one-turn conversation: after ``after_appends`` audio appends the caller
    "speaks" (speech_started/stopped) and the model answers with ``reply`` (in
    the session's format).  With ``barge_in_after_s`` the caller talks over
    the answer that long after it was sent (the response is left open, as a
    model still generating)."""

    async def script(session: FakeRealtimeSession) -> None:
        await session.wait_appends(after_appends)
        await session.speech_started()
        await session.speech_stopped()
        await session.respond(reply, chunk_bytes=chunk_bytes, done=barge_in_after_s is None)
        if barge_in_after_s is not None:
            await trio.sleep(barge_in_after_s)
            await session.speech_started()

    return script


class FakeOpenAIServer(LoopbackWsServer):
    """A GA Realtime server on 127.0.0.1:0; ``script`` runs once per connection.

    A failing handler (e.g. a client message the SDK rejects) fails the test.
    """

    def __init__(
        self, script: Script | None = None, *, reject_with: int | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        super().__init__()
        self.tls = tls  # serve wss:// with this server context
        self.script = script
        self.reject_with = reject_with  # answer every upgrade with this HTTP status (e.g. 401)
        self.rejected = 0
        self.sessions: list[FakeRealtimeSession] = []

    @property
    def url(self) -> str:
        assert self.port is not None, "start the server first: await nursery.start(server.run)"
        return f"{'wss' if self.tls else 'ws'}://127.0.0.1:{self.port}/v1/realtime"

    async def session(self, index: int = 0) -> FakeRealtimeSession:
        """The ``index``-th connection (waits for it)."""
        await self.wait_for(lambda: len(self.sessions) > index)
        return self.sessions[index]

    async def _handle(self, request: WebSocketRequest, stream: trio.SocketStream) -> None:
        if self.reject_with is not None:
            self.rejected += 1
            self.touch()
            # (the shape of OpenAI's 401: the key in it masked but for its last characters)
            await request.reject(self.reject_with, body=json.dumps({"error": {
                "message": "Incorrect API key provided: sk-***ey. You can find your API key at https://platform.openai.com/account/api-keys.",
                "type": "invalid_request_error", "code": "invalid_api_key", "param": None,
            }}).encode())  # fmt: skip
            return
        ws = await request.accept()
        session = FakeRealtimeSession(self, ws, stream, len(self.sessions) + 1)
        self.sessions.append(session)
        self.touch()
        script = None if self.script is None else functools.partial(self.script, session)
        await serve_session(ws, session._run, script)


# ------------------------------------------------------------ in-memory link


@dataclass
class FakeLink:
    """An in-memory ``ProviderLink``: the test emits provider events and reads the commands."""

    input_format: pv.AudioFormat = field(default_factory=lambda: pv.AudioFormat("pcmu", 8000))
    output_format: pv.AudioFormat = field(default_factory=lambda: pv.AudioFormat("pcmu", 8000))
    name: str = "fake"

    def __post_init__(self) -> None:
        self.commands: list[tuple[float, pv.ProviderCommand]] = []
        self.audio_in = bytearray()
        self._send, self._receive = trio.open_memory_channel[pv.ProviderEvent](math.inf)
        self._closed_reason: str | None = None
        self._closed_how: dict[str, bool] = {}
        self._send_failure: str | None = None

    def emit(self, *events: pv.ProviderEvent) -> None:
        for event in events:
            self._send.send_nowait(event)

    def close(self, reason: str = "fake provider closed", *, orderly: bool = False, broken: bool = False) -> None:
        """The model's side ends: ``send`` and (after the events emitted so far) ``receive`` raise ProviderClosed."""
        self._closed_reason = reason
        self._closed_how = {"orderly": orderly, "broken": broken}
        self._send.close()

    def fail_sends(self, reason: str) -> None:
        """Sends raise ProviderClosed(reason) from now on (a write that met the model's reset); receive goes on."""
        self._send_failure = reason

    def truncates(self) -> list[pv.Truncate]:
        return [c for _, c in self.commands if isinstance(c, pv.Truncate)]

    async def send(self, command: pv.ProviderCommand) -> None:
        if self._send_failure is not None:
            raise ProviderClosed(self._send_failure)
        if self._closed_reason is not None:
            raise ProviderClosed(self._closed_reason, **self._closed_how)
        self.commands.append((trio.current_time(), command))
        if isinstance(command, pv.SendAudio):
            self.audio_in += command.payload
        await trio.sleep(0)

    async def receive(self) -> pv.ProviderEvent:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ProviderClosed(self._closed_reason or "fake provider closed", **self._closed_how) from None
