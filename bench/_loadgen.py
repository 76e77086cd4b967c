"""The two ends of bench/load.py: simulated Twilio callers and a fake OpenAI Realtime model.

Both run in the bench's own Trio process and share one clock
(``time.perf_counter``), so a frame's trip through the server is measured
directly: the caller notes when it sends a frame, the model notes when it
receives it, and the same for model audio the other way.

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

The caller speaks Twilio's side: the voice webhook (a form POST), the
TwiML's ``<Stream url>`` and ``<Parameter>``s, then ``connected``,
``start`` (with the parameters), 20 ms ``media`` frames in real time with
``sequenceNumber``/``chunk``/``timestamp``, mark echoes when the audio
before a mark has "played" (a per-call playout clock; all pending marks at
once on ``clear``), and ``stop``.
"""

from __future__ import annotations

import binascii
import dataclasses
import functools
import itertools
import json
import math
import struct
import xml.etree.ElementTree as ET
from collections import Counter, deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, wrap_client_stream, wrap_server_stream

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
SILENCE = b"\xff"  # µ-law zero


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
        tag = read_tag(audio)
        if tag is None or tag[0] != call.call_no or tag[1] >= len(call.down_sent_s):
            call.down_untagged += 1
            return
        call.down_received += 1
        sent = call.down_sent_s[tag[1]]
        if self.in_window(sent):
            self.down_latency_s.append(now - sent)


async def monitor_loop_lag(recorder: Recorder, interval_s: float = 0.005) -> None:
    """How late this process's event loop wakes a sleeper: the generator's own lag."""
    while True:
        t0 = clock()
        await trio.sleep(interval_s)
        t1 = clock()
        if recorder.in_window(t1):
            recorder.loop_lag_s.append(max(t1 - t0 - interval_s, 0.0))


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


class FakeModel:
    """A GA Realtime server on 127.0.0.1:0 that answers every caller with tagged µ-law audio.

    Every ``reply_every_s`` (first one at a per-call offset) it sends a
    reply of ``reply_ms`` in real time, if that reply would end before
    ``recorder.replies_until_s``.  ``open_sessions`` counts WebSockets not
    yet closed by the server under test: after a step's calls have ended,
    what remains is leaked.  Each session is counted under the ``label``
    current when it opened (:meth:`open_for`), so when two servers take
    turns, one's leaks are not blamed on the other.
    """

    def __init__(self, recorder: Recorder, *, reply_every_s: float = 2.0, reply_ms: int = 1000) -> None:
        self.recorder = recorder
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
        async with trio.open_nursery() as nursery:
            serve = functools.partial(trio.serve_tcp, self._serve_connection, 0, host="127.0.0.1")
            listeners = await nursery.start(serve)
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self.port)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        try:
            async with trio.open_nursery() as nursery:
                request: WebSocketRequest = await wrap_server_stream(nursery, stream)
                ws = await request.accept()
                label = self.label
                self.open_sessions += 1
                self._open_by_label[label] += 1
                try:
                    await self._session(ws, next(self._numbers))
                finally:
                    self.open_sessions -= 1
                    self._open_by_label[label] -= 1
                    nursery.cancel_scope.cancel()  # trio.serve_tcp closes the stream
        except* (ConnectionClosed, trio.BrokenResourceError):
            pass  # the server hung up (e.g. while we were answering): its session is over
        except* Exception as group:  # one bad session must not stop the bench
            self.errors.append(f"fake model failed: {_leaf(group)!r}"[:200])

    def open_for(self, label: str) -> int:
        """Sessions opened while ``label`` was current that are still open."""
        return self._open_by_label[label]

    async def _session(self, ws: WebSocketConnection, number: int) -> None:
        self.sessions += 1
        ids = itertools.count(1)
        lock = trio.StrictFIFOLock()
        call_known = trio.Event()
        state: dict[str, Any] = {}

        async def send(text: str) -> None:
            async with lock:
                await ws.send_message(text)

        def event_id() -> str:
            return f"event_{number}_{next(ids)}"

        async def reader() -> None:
            recorder = self.recorder
            while True:
                try:
                    message = await ws.get_message()
                except ConnectionClosed:
                    return
                now = clock()
                try:
                    msg = json.loads(message)
                except ValueError:
                    self.errors.append(f"client message is not JSON: {message!r:.80}")
                    continue
                kind = msg.get("type")
                if kind == "input_audio_buffer.append":
                    audio = binascii.a2b_base64(msg["audio"])
                    recorder.up_arrived(audio, now)
                    if not call_known.is_set():
                        tag = read_tag(audio)
                        if tag is not None and tag[0] in recorder.calls:
                            state["call"] = recorder.calls[tag[0]]
                            call_known.set()
                elif kind == "session.update":
                    await send(session_updated(event_id(), msg["session"]))
                elif kind == "conversation.item.truncate":
                    await send(item_truncated(event_id(), msg["item_id"], msg["content_index"], msg["audio_end_ms"]))
                elif kind not in ("response.create", "response.cancel", "conversation.item.create"):
                    self.errors.append(f"unexpected client event {kind!r}")

        async def replier() -> None:
            await call_known.wait()
            call: CallRecord = state["call"]
            reply_s = self.reply_chunks * CHUNK_MS / 1000
            next_s = clock() + (call.call_no % 20) / 20 * self.reply_every_s
            replies = itertools.count(1)
            while True:
                await trio.sleep_until(next_s)
                next_s += self.reply_every_s
                if clock() + reply_s + 0.3 > self.recorder.replies_until_s:
                    continue
                n = next(replies)
                response_id, item_id = f"resp_{number}_{n}", f"item_{number}_{n}"
                await send(response_created(event_id(), response_id))
                t0 = clock()
                for k in range(self.reply_chunks):
                    await trio.sleep_until(t0 + k * CHUNK_MS / 1000)
                    frame_no = len(call.down_sent_s)
                    text = audio_delta(event_id(), response_id, item_id, tag_audio(call.call_no, frame_no, CHUNK_BYTES))
                    call.down_sent_s.append(clock())
                    await send(text)
                await send(audio_done(event_id(), response_id, item_id))
                await send(response_done(event_id(), response_id))

        await send(session_created(event_id()))
        async with trio.open_nursery() as nursery:

            async def read_then_stop() -> None:
                await reader()
                nursery.cancel_scope.cancel()

            nursery.start_soon(read_then_stop)
            nursery.start_soon(self._guard, replier)

    async def _guard(self, task: Callable[[], Any]) -> None:
        """Run ``task``; the server closing the session under it is not an error."""
        try:
            await task()
        except ConnectionClosed:
            pass  # the server closed the session mid-reply: the reader ends the session


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
        self.changed = trio.Event()

    def media(self, n_bytes: int, now: float) -> None:
        self.playing_until_s = max(self.playing_until_s, now) + n_bytes / 8000

    def mark(self, name: str, now: float) -> None:
        self.marks.append((max(self.playing_until_s, now), name))
        self.changed.set()

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


def _leaf(exc: BaseException) -> BaseException:
    """The first exception inside (nested) exception groups: the one worth reporting."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


async def _call(recorder: Recorder, call: CallRecord, host: str, port: int, end_s: float, webhook_path: str) -> None:
    call_sid = f"CA{call.call_no:032x}"
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
    stream = await trio.open_tcp_stream(parts.hostname, parts.port or 80)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(15):
                ws = await wrap_client_stream(nursery, stream, f"{parts.hostname}:{parts.port}", parts.path or "/")
            await _stream(recorder, call, ws, call_sid, account_sid, params, end_s)
            nursery.cancel_scope.cancel()
    finally:
        await trio.aclose_forcefully(stream)


async def _stream(
    recorder: Recorder,
    call: CallRecord,
    ws: WebSocketConnection,
    call_sid: str,
    account_sid: str,
    params: dict[str, str],
    end_s: float,
) -> None:
    stream_sid = f"MZ{call.call_no:032x}"
    sequence = itertools.count(1)
    lock = trio.StrictFIFOLock()  # sequence numbers go out in order
    playout = _Playout()
    done = trio.Event()

    async def send(build: Callable[[int], str], sent_at: Callable[[float], None] | None = None) -> float:
        async with lock:
            text = build(next(sequence))
            t = clock()
            if sent_at is not None:
                sent_at(t)  # before the await: the model may have the frame before send_message returns
            await ws.send_message(text)
            return t

    await ws.send_message(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    start = {
        "streamSid": stream_sid, "accountSid": account_sid, "callSid": call_sid, "tracks": ["inbound"],
        "customParameters": params, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    await send(lambda n: json.dumps({"event": "start", "sequenceNumber": str(n), "streamSid": stream_sid, "start": start}))
    media_head = '{"event":"media","streamSid":"' + stream_sid + '","sequenceNumber":"'
    mark_head = '{"event":"mark","streamSid":"' + stream_sid + '","sequenceNumber":"'

    def mark_echo(name: str) -> Callable[[int], str]:
        return lambda n: mark_head + str(n) + '","mark":{"name":' + json.dumps(name) + "}}"

    async def sender() -> None:
        t0 = clock()
        k = 0
        while True:
            due = t0 + k * FRAME_MS / 1000
            if due >= end_s:
                break
            await trio.sleep_until(due)
            payload = binascii.b2a_base64(tag_audio(call.call_no, k, FRAME_BYTES), newline=False).decode("ascii")
            chunk, stamp = str(k + 1), str(k * FRAME_MS)
            t = await send(
                lambda n: media_head + str(n) + '","media":{"track":"inbound","chunk":"' + chunk
                + '","timestamp":"' + stamp + '","payload":"' + payload + '"}}',
                call.up_sent_s.append,
            )
            if recorder.in_window(t):
                recorder.send_lateness_s.append(max(t - due, 0.0))
            k += 1
        done.set()  # before the await: the server may hang up before send() returns
        await send(
            lambda n: json.dumps({"event": "stop", "sequenceNumber": str(n), "streamSid": stream_sid,
                                  "stop": {"accountSid": account_sid, "callSid": call_sid}})
        )

    async def receiver() -> None:
        while True:
            try:
                message = await ws.get_message()
            except ConnectionClosed:
                if not done.is_set():
                    call.server_closed_early = True
                return
            now = clock()
            msg = json.loads(message)
            event = msg.get("event")
            if event == "media":
                audio = binascii.a2b_base64(msg["media"]["payload"])
                recorder.down_arrived(call, audio, now)
                playout.media(len(audio), now)
            elif event == "mark":
                playout.mark(msg["mark"]["name"], now)
            elif event == "clear":
                for name in playout.clear(now):
                    await send(mark_echo(name))

    async def echoer() -> None:
        while True:
            while not playout.marks:
                playout.changed = trio.Event()
                await playout.changed.wait()
            due, name = playout.marks[0]
            await trio.sleep_until(due)
            if playout.marks and playout.marks[0] == (due, name):
                playout.marks.popleft()
                try:
                    await send(mark_echo(name))
                except ConnectionClosed:
                    if done.is_set():
                        return  # the server hung up after our stop
                    raise

    async with trio.open_nursery() as nursery:

        async def receive_then_stop() -> None:
            await receiver()
            nursery.cancel_scope.cancel()  # the server hung up: the call is over

        nursery.start_soon(receive_then_stop)
        nursery.start_soon(echoer)
        await sender()
        # After stop the server ends the call and closes the socket; then we hang up.
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    if call.server_closed_early:
        raise ValueError("the server closed the media stream before stop")
