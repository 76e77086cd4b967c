"""The two ends of bench/isolation.py: fake Twilio callers and a fake OpenAI Realtime model, one of them bad.

Every call is a caller (the voice webhook, then the Media Stream: 20 ms
frames in real time, mark echoes when the audio before a mark has "played",
all pending marks echoed at once on ``clear``, ``stop`` at the end) and a
model session.  The model talks as a GA Realtime model does: a reply in
real time, 3 s by default (``response.created``, then a 40 ms
``response.output_audio.delta`` every 40 ms), then the caller "interrupts" it (``input_audio_buffer.speech_started``, the
reply cancelled with ``response.output_audio.done`` and ``response.done``,
``speech_stopped`` 0.3 s later), then the next reply.  It answers
``session.update`` with ``session.updated`` and ``conversation.item.truncate``
with ``conversation.item.truncated``.  The message builders are those of the
load bench's fake model (``bench/_loadgen.py``) plus :func:`speech_started`
and :func:`speech_stopped`; ``tests/test_bench_isolation.py`` checks each
against the OpenAI SDK's ``RealtimeServerEvent``.

Every audio frame is tagged (``_loadgen.tag_audio``: call and frame number)
and the server passes µ-law through on this path, so each end knows which
frame arrived, from which call, when: that gives the latencies, the lost
frames and any audio of one call delivered to another.  Both ends run in
one Trio process and record times on one clock (:class:`Recorder`).

One call is the bad one.  From ``Timeline.bad_at_s`` on, its model session
or its caller runs the scenario's misbehaviour (:data:`SCENARIOS`, named
``m_*`` for the model, ``c_*`` for the caller); the others stay well
behaved, and what the server does to them is what the bench measures.
"""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
import math
import random
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import trio

import _isolation_ws as ws
from _loadgen import (
    CHUNK_BYTES,
    CHUNK_MS,
    FRAME_BYTES,
    FRAME_MS,
    audio_delta,
    audio_done,
    http_post_form,
    item_truncated,
    parse_stream_twiml,
    read_tag,
    response_created,
    response_done,
    session_created,
    session_updated,
    tag_audio,
)

__all__ = [
    "HOST",
    "QUICK",
    "SCENARIOS",
    "CallLog",
    "Caller",
    "FakeModel",
    "Recorder",
    "Scenario",
    "Timeline",
    "speech_started",
    "speech_stopped",
]

HOST = "127.0.0.1"
SPEECH_S = 0.3  # speech_started to speech_stopped
HANGUP_WAIT_S = 5.0  # after stop, how long a caller waits for the server to close the stream
SETUP_TIMEOUT_S = 15.0  # the webhook, and each WebSocket handshake
BIG_FRAME_BYTES = 47_000  # c_bigframe: ~6 s of audio per media message (~63 KiB of JSON)
LARGE_DELTA_BYTES = 6 * 1024 * 1024 - 1024  # m_large: its base64 delta stays just under the server's 8 MiB limit
OVERSIZE_DELTA_BYTES = 7 * 1024 * 1024  # m_oversize: ~9.3 MiB of base64, over it
FAST_DELTA_BYTES = 4000  # m_fast: 0.5 s of audio per delta
FLOOD_BATCH = 32  # m_fast: deltas written per send
TINY_BATCH = 2000  # m_tiny, m_tinyaudio: messages written per send
PING_BATCH = 1000  # m_ping, c_ping: pings written per send
FRAGMENT_BATCH = 20  # m_fragment: messages (of 1-byte fragments) written per send
CALLER_FLOOD_BATCH = 100  # c_flood: frames sent back to back between checkpoints
JUMPS = (2, 63, 64, 65, 10**6, 10**15)  # c_seqjump: how far media.chunk leaps


@dataclasses.dataclass(frozen=True)
class Timeline:
    """When things happen, in seconds from the first call's start."""

    bad_at_s: float = 8.0  # the bad peer starts misbehaving
    bad_len_s: float = 10.0  # the "during" window, from bad_at_s
    after_s: float = 7.0  # the calls go on this long after it, then send stop
    flood_s: float = 5.0  # a flood (or any misbehaviour with a length) lasts this long
    settle_s: float = 3.0  # m_fast: from the end of its flood to its barge-in
    reply_s: float = 3.0  # each reply of a well-behaved model, then the caller interrupts it
    warm_s: float = 2.0  # the "before" window starts here (every call has started)
    tail_s: float = 2.0  # after the last call ended, this long before counting what is still open

    @property
    def end_s(self) -> float:
        """When the callers send stop."""
        return self.bad_at_s + self.bad_len_s + self.after_s

    def windows(self) -> dict[str, tuple[float, float]]:
        """The measured windows by send time: before, during and after the misbehaviour."""
        bad_end = self.bad_at_s + self.bad_len_s
        return {
            "before": (self.warm_s, self.bad_at_s),
            "during": (self.bad_at_s, bad_end),
            "after": (bad_end, self.end_s - 0.5),
        }


QUICK = Timeline(bad_at_s=2.5, bad_len_s=2.5, after_s=1.5, flood_s=1.5, settle_s=0.5, reply_s=1.0, warm_s=1.0, tail_s=1.0)


# --- records ------------------------------------------------------------------------------


@dataclasses.dataclass
class CallLog:
    """One call as both ends saw it; times are :meth:`Recorder.now` seconds."""

    number: int
    bad: bool
    call_sid: str = ""
    up_sent_s: list[float] = dataclasses.field(default_factory=list)  # by frame number
    up_arrived_s: dict[int, float] = dataclasses.field(default_factory=dict)
    down_sent_s: list[float] = dataclasses.field(default_factory=list)  # by delta number
    down_reply: list[int] = dataclasses.field(default_factory=list)  # by delta number: the reply it is part of
    barged: set[int] = dataclasses.field(default_factory=set)  # replies the caller interrupted
    down_arrived_s: dict[int, float] = dataclasses.field(default_factory=dict)
    barge_s: list[float] = dataclasses.field(default_factory=list)  # speech_started sent
    clears: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (its barge-in, clear latency)
    misrouted: int = 0  # tagged audio of another call that reached this one (either way)
    up_made_up: int = 0  # untagged frames the model got (the jitter buffer's concealment)
    failed: str | None = None  # the call could not start
    misbehaved_s: float | None = None  # the bad call's misbehaviour began
    stop_s: float | None = None  # the caller sent stop, or hung up (c_vanish)
    closed_s: float | None = None  # the caller saw its stream end
    close: str = ""  # how: a close frame's code and reason, or the socket's end
    model_closed_s: float | None = None  # the model saw the server end its session
    model_close: str = ""


class Recorder:
    """What one scenario run records: every call's log, notes, the harness's own lag."""

    def __init__(self, calls: int) -> None:
        self.calls = [CallLog(n, bad=n == calls - 1) for n in range(calls)]  # the last call is the bad one
        self.notes: list[str] = []
        self.lag_s: list[tuple[float, float]] = []  # (when, how late) of the harness's 10 ms ticks
        self.t0 = trio.current_time()

    @property
    def bad(self) -> CallLog:
        return self.calls[-1]

    def start(self) -> None:
        """Time zero: the first call starts now."""
        self.t0 = trio.current_time()

    def now(self) -> float:
        return trio.current_time() - self.t0

    def at(self, t_s: float) -> float:
        """Trio's clock at ``t_s`` seconds from time zero (for sleep_until)."""
        return self.t0 + t_s

    def note(self, text: str) -> None:
        self.notes.append(f"{self.now():7.2f} s  {text}")


# --- the fake model ---------------------------------------------------------------------


def speech_started(event_id: str, item_id: str, audio_start_ms: int) -> str:
    return json.dumps(
        {"type": "input_audio_buffer.speech_started", "event_id": event_id, "item_id": item_id,
         "audio_start_ms": audio_start_ms}
    )


def speech_stopped(event_id: str, item_id: str, audio_end_ms: int) -> str:
    return json.dumps(
        {"type": "input_audio_buffer.speech_stopped", "event_id": event_id, "item_id": item_id,
         "audio_end_ms": audio_end_ms}
    )


class FakeModel:
    """The Realtime side: one :class:`ModelSession` per connection the server opens."""

    def __init__(self, recorder: Recorder, scenario: Scenario, timeline: Timeline) -> None:
        self.recorder = recorder
        self.scenario = scenario
        self.timeline = timeline
        self.sessions: list[ModelSession] = []

    async def serve(self, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on ``port`` (0: any free one), report the port, serve sessions until cancelled."""
        listeners = await trio.open_tcp_listeners(port, host=HOST)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._session, listeners)

    def open_sessions(self) -> int:
        """Sessions whose TCP connection the server has not closed (including those the model stopped reading)."""
        return sum(1 for s in self.sessions if s.running and s.socket.established())

    async def _session(self, stream: trio.SocketStream) -> None:
        try:
            with trio.fail_after(SETUP_TIMEOUT_S):
                socket = await ws.accept(stream)
        except (ws.Closed, trio.BrokenResourceError, trio.TooSlowError):
            return  # the server gave up on the handshake: no session
        session = ModelSession(self, socket, len(self.sessions) + 1)
        self.sessions.append(session)
        await session.run()


class ModelSession:
    """One Realtime session: records the uplink, talks, and misbehaves if its call is the bad one."""

    def __init__(self, model: FakeModel, socket: ws.WebSocket, number: int) -> None:
        self.model = model
        self.recorder = model.recorder
        self.timeline = model.timeline
        self.socket = socket
        self.number = number
        self.call: CallLog | None = None  # known from the first tagged frame
        self.reading = True  # False: it stops reading (m_noread, m_frozen)
        self.talking = True  # False: its replies stop (most m_* scenarios)
        self.running = True  # its task is live: the socket is still open at our end
        self.closed_by_us = False  # m_close, m_rst: the end of the session is the model's doing
        self._heard_ms = 0  # caller audio appended so far
        self.reply = 0  # the reply being said (numbered from 1)
        self._ids = itertools.count(1)

    def event_id(self) -> str:
        return f"event_{self.number}_{next(self._ids)}"

    async def send(self, text: str) -> None:
        await self.socket.send_text(text)

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                await self.send(session_created(self.event_id()))
                await self._read(nursery)
        except* ws.Closed as group:
            if self.call is not None and not self.closed_by_us:
                self.call.model_closed_s = self.recorder.now()
                self.call.model_close = str(group.exceptions[0])
        finally:
            self.running = False

    async def _read(self, nursery: trio.Nursery) -> None:
        while self.reading:
            message = await self.socket.receive()
            if message.opcode == ws.OP_TEXT and self.reading:
                await self._on_message(json.loads(message.payload), nursery)
        self.recorder.note(f"model session of call {self.call.number if self.call else '?'} stopped reading")
        await trio.sleep_forever()

    async def _on_message(self, msg: dict[str, Any], nursery: trio.Nursery) -> None:
        kind = msg.get("type")
        if kind == "input_audio_buffer.append":
            self._append(base64.b64decode(msg["audio"]), nursery)
        elif kind == "session.update":
            await self.send(session_updated(self.event_id(), msg["session"]))
        elif kind == "conversation.item.truncate":
            await self.send(item_truncated(self.event_id(), msg["item_id"], msg["content_index"], msg["audio_end_ms"]))

    def _append(self, audio: bytes, nursery: trio.Nursery) -> None:
        self._heard_ms += len(audio) // 8
        tag = read_tag(audio)
        if tag is None:
            if self.call is not None:
                self.call.up_made_up += 1
            return
        number, frame_no = tag
        if self.call is None:
            if number >= len(self.recorder.calls):
                return
            self.call = self.recorder.calls[number]
            nursery.start_soon(self._talk)
            if self.call.bad and self.model.scenario.model_act is not None:
                nursery.start_soon(self.model.scenario.model_act, self, self.timeline)
        if number != self.call.number:
            self.call.misrouted += 1
        elif frame_no < len(self.call.up_sent_s):
            self.call.up_arrived_s.setdefault(frame_no, self.recorder.now())

    async def _talk(self) -> None:
        """Replies in real time, each interrupted at its end by the caller, until the calls near their end."""
        assert self.call is not None
        chunks = round(self.timeline.reply_s * 1000 / CHUNK_MS)
        last_start_s = self.timeline.end_s - self.timeline.reply_s - 1.0  # (a reply ends before the calls do)
        for n in itertools.count(1):
            if not self.talking or self.recorder.now() > last_start_s:
                return
            self.reply = n
            response_id, item_id = f"resp_{self.call.number}_{n}", f"item_{self.call.number}_{n}"
            await self.send(response_created(self.event_id(), response_id))
            due = trio.current_time()
            for _ in range(chunks):
                await trio.sleep_until(due)
                due += CHUNK_MS / 1000
                if not self.talking:
                    return
                await self._delta(response_id, item_id)
            await self.barge_in(response_id, item_id, f"user_{self.call.number}_{n}")

    async def _delta(self, response_id: str, item_id: str) -> None:
        assert self.call is not None
        audio = tag_audio(self.call.number, len(self.call.down_sent_s), CHUNK_BYTES)
        self.call.down_sent_s.append(self.recorder.now())  # (before the send: the caller may have it before it returns)
        self.call.down_reply.append(self.reply)
        await self.send(audio_delta(self.event_id(), response_id, item_id, audio))

    async def barge_in(self, response_id: str, item_id: str, user_item: str) -> None:
        """The caller starts talking: speech_started, the reply cancelled, speech_stopped a moment later."""
        assert self.call is not None
        self.call.barge_s.append(self.recorder.now())
        self.call.barged.add(self.reply)
        await self.send(speech_started(self.event_id(), user_item, self._heard_ms))
        await self.send(audio_done(self.event_id(), response_id, item_id))
        await self.send(response_done(self.event_id(), response_id, "cancelled"))
        await trio.sleep(SPEECH_S)
        await self.send(speech_stopped(self.event_id(), user_item, self._heard_ms))

    async def bad_window(self) -> None:
        """Sleep until the misbehaviour is due (``Timeline.bad_at_s``), then note that it begins."""
        assert self.call is not None
        await trio.sleep_until(self.recorder.at(self.timeline.bad_at_s))
        self.call.misbehaved_s = self.recorder.now()
        self.recorder.note(f"the bad model starts: {self.model.scenario.name}")


# --- the caller ---------------------------------------------------------------------------


class Caller:
    """One Twilio call: the webhook, then the Media Stream until ``stop``; the bad call's may misbehave."""

    def __init__(self, recorder: Recorder, call: CallLog, port: int, scenario: Scenario, timeline: Timeline) -> None:
        self.recorder = recorder
        self.call = call
        self.port = port
        self.scenario = scenario
        self.timeline = timeline
        self.echo: Literal["normal", "none", "twice"] = "normal"  # how marks are echoed
        self.chunk = 0  # media.chunk of the last frame sent
        self._timestamp_ms = 0
        self._sequence = 0
        self._playing_until = 0.0  # (Trio clock) the audio received so far has "played" by then
        self._marks: deque[tuple[float, str]] = deque()  # (due, name): echoed when the audio before them has played
        self._marks_changed = trio.Event()
        self._reading = trio.Event()
        self._reading.set()
        self.call.call_sid = f"CA{secrets.token_hex(12)}{call.number:08x}"
        self._account_sid = "AC" + "b" * 32
        self._stream_sid = f"MZ{secrets.token_hex(16)}"
        self.socket: ws.WebSocket | None = None

    async def run(self) -> None:
        """The whole call; what happens to it is recorded, never raised."""
        try:
            await self._call()
        finally:
            if self.socket is not None:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(self.socket.stream)

    async def _call(self) -> None:
        try:
            with trio.fail_after(SETUP_TIMEOUT_S):
                await self._answer()
        except (OSError, ValueError, ws.Closed, trio.BrokenResourceError, trio.TooSlowError) as exc:
            self.call.failed = f"{type(exc).__name__}: {exc}"[:200]
            self.recorder.note(f"call {self.call.number} failed to start: {self.call.failed}")
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._receive)
                nursery.start_soon(self._echo_marks)
                if await self._stream():
                    await trio.sleep(HANGUP_WAIT_S)  # (the server closing the stream ends this at once)
                    self.recorder.note(f"call {self.call.number}: the server did not close the stream after stop")
                nursery.cancel_scope.cancel()
        except* ws.Closed as group:
            self.call.closed_s = self.recorder.now()
            self.call.close = str(group.exceptions[0])

    async def _answer(self) -> None:
        """The voice webhook, the TwiML's stream, ``connected`` and ``start``."""
        form = {"CallSid": self.call.call_sid, "AccountSid": self._account_sid, "From": "+15550000000",
                "To": "+15551111111", "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01"}
        status, body = await http_post_form(HOST, self.port, "/twiml", form)
        if status != 200:
            raise ValueError(f"webhook answered HTTP {status}: {body[:120]!r}")
        url, params = parse_stream_twiml(body)
        parts = urlsplit(url)
        self.socket = await ws.connect(HOST, self.port, (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        await self.socket.send_text(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await self.send_event("start", {
            "streamSid": self._stream_sid, "accountSid": self._account_sid, "callSid": self.call.call_sid,
            "tracks": ["inbound"], "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        })

    # -- sending ------------------------------------------------------------------------

    async def send_event(self, event: str, body: dict[str, Any], *, repeat_sequence: bool = False) -> None:
        """A Twilio message: ``event``, the next ``sequenceNumber`` (or the last one again), ``streamSid``, the body."""
        assert self.socket is not None
        if not repeat_sequence:
            self._sequence += 1
        await self.socket.send_text(json.dumps(
            {"event": event, "sequenceNumber": str(self._sequence), "streamSid": self._stream_sid, event: body}
        ))

    async def send_frame(
        self, *, size: int = FRAME_BYTES, chunk: int | None = None, timestamp_ms: int | None = None,
        repeat_sequence: bool = False,
    ) -> None:
        """The next tagged media frame; ``chunk`` and ``timestamp_ms`` default to the next in order."""
        self.chunk = self.chunk + 1 if chunk is None else chunk
        body = {
            "track": "inbound", "chunk": str(self.chunk),
            "timestamp": str(self._timestamp_ms if timestamp_ms is None else timestamp_ms),
            "payload": base64.b64encode(tag_audio(self.call.number, len(self.call.up_sent_s), size)).decode(),
        }
        self._timestamp_ms += FRAME_MS
        self.call.up_sent_s.append(self.recorder.now())
        await self.send_event("media", body, repeat_sequence=repeat_sequence)

    async def _stream(self) -> bool:
        """Frames in real time (the bad caller misbehaving on the way) until the end, then stop; False: hung up."""
        act = self.scenario.caller_act if self.call.bad else None
        bad_at = self.recorder.at(self.timeline.bad_at_s) if act is not None else math.inf
        end = self.recorder.at(self.timeline.end_s)
        due = trio.current_time()
        while due < end:
            await trio.sleep_until(due)
            if act is not None and due >= bad_at:
                self.call.misbehaved_s = self.recorder.now()
                self.recorder.note(f"the bad caller starts: {self.scenario.name}")
                if await act(self, self.timeline):
                    self.call.stop_s = self.recorder.now()
                    self.recorder.note(f"call {self.call.number} hung up without stop")
                    return False
                act, due = None, trio.current_time()
                continue
            await self.send_frame()
            due += FRAME_MS / 1000
        self.call.stop_s = self.recorder.now()
        await self.send_event("stop", {"accountSid": self._account_sid, "callSid": self.call.call_sid})
        self._reading.set()  # (a caller that stopped reading reads again, to see the stream close)
        return True

    # -- receiving ----------------------------------------------------------------------

    def pause_reading(self) -> None:
        """Read nothing more from the stream (until stop, when it reads again to see the server close it)."""
        self._reading = trio.Event()

    async def _receive(self) -> None:
        assert self.socket is not None
        while True:
            await self._reading.wait()
            message = await self.socket.receive()
            msg = json.loads(message.payload)
            event = msg.get("event")
            if event == "media":
                self._media(base64.b64decode(msg["media"]["payload"]))
            elif event == "mark":
                self._marks.append((max(self._playing_until, trio.current_time()), msg["mark"]["name"]))
                self._marks_changed.set()
            elif event == "clear":
                await self._clear()

    def _media(self, audio: bytes) -> None:
        now = trio.current_time()
        self._playing_until = max(self._playing_until, now) + len(audio) / 8000
        tag = read_tag(audio)
        if tag is None:
            return  # (the bad model's untagged audio)
        number, k = tag
        if number != self.call.number:
            self.call.misrouted += 1
        elif k < len(self.call.down_sent_s):
            self.call.down_arrived_s.setdefault(k, self.recorder.now())

    async def _clear(self) -> None:
        """Twilio drops what it buffered and echoes every pending mark at once."""
        now = self.recorder.now()
        if self.call.barge_s and (not self.call.clears or self.call.clears[-1][0] != self.call.barge_s[-1]):
            self.call.clears.append((self.call.barge_s[-1], now - self.call.barge_s[-1]))
        self._playing_until = trio.current_time()
        names = [name for _, name in self._marks]
        self._marks.clear()
        for name in names:
            await self._echo(name)

    async def _echo_marks(self) -> None:
        while True:
            if not self._marks:
                self._marks_changed = trio.Event()
                await self._marks_changed.wait()
                continue
            due, name = self._marks[0]
            if trio.current_time() < due:
                self._marks_changed = trio.Event()
                with trio.move_on_at(due):
                    await self._marks_changed.wait()  # (a clear empties the queue meanwhile)
                continue
            self._marks.popleft()
            await self._echo(name)

    async def _echo(self, name: str) -> None:
        for _ in range({"normal": 1, "none": 0, "twice": 2}[self.echo]):
            await self.send_event("mark", {"name": name})


# --- misbehaviours ------------------------------------------------------------------------

# Started as soon as a session knows it serves the bad call: it waits for the bad window itself (ModelSession.bad_window),
# after building anything costly, so that this process does not stall inside the window.
ModelAct = Callable[[ModelSession, Timeline], Awaitable[None]]
CallerAct = Callable[[Caller, Timeline], Awaitable[bool]]  # True: the caller hangs up (no stop)


async def _until(s_from_now: float) -> float:
    """The Trio time ``s_from_now`` seconds ahead (a flood's end), after a checkpoint."""
    await trio.lowlevel.checkpoint()
    return trio.current_time() + s_from_now


async def _flood(s: ModelSession, batch: bytes, per_batch: int, until: float) -> int:
    """``batch`` written again and again until ``until``; how many messages that was."""
    sent = 0
    while trio.current_time() < until:
        await s.socket.send_raw(batch)
        sent += per_batch
    return sent


async def m_noread(s: ModelSession, t: Timeline) -> None:
    await s.bad_window()
    s.reading = False


async def m_frozen(s: ModelSession, t: Timeline) -> None:
    await s.bad_window()
    s.reading = s.talking = False


async def m_hang(s: ModelSession, t: Timeline) -> None:
    await s.bad_window()
    s.talking = False


async def m_fast(s: ModelSession, t: Timeline) -> None:
    await s.bad_window()
    s.talking = False
    s.reply += 1
    response_id, item_id = "resp_fast", "item_fast"
    await s.send(response_created(s.event_id(), response_id))
    delta = audio_delta(s.event_id(), response_id, item_id, b"\x7f" * FAST_DELTA_BYTES)
    sent = await _flood(s, s.socket.frame(ws.OP_TEXT, delta.encode()) * FLOOD_BATCH, FLOOD_BATCH, await _until(t.flood_s))
    await s.send(audio_done(s.event_id(), response_id, item_id))
    await s.send(response_done(s.event_id(), response_id))
    s.recorder.note(f"the fast model sent {sent} deltas, {sent * FAST_DELTA_BYTES / 8000:.0f} s of audio")
    await trio.sleep(t.settle_s)
    s.recorder.note("the fast model's caller barges in")
    await s.barge_in(response_id, item_id, "user_fast")
    await trio.sleep_forever()


async def m_tiny(s: ModelSession, t: Timeline) -> None:
    await s.bad_window()
    s.talking = False
    # Deliberately not a Realtime event: an unknown type (the server logs a few and skips them all).
    batch = s.socket.frame(ws.OP_TEXT, b'{"type":"x.y"}') * TINY_BATCH
    sent = await _flood(s, batch, TINY_BATCH, await _until(t.flood_s))
    s.recorder.note(f"the tiny model sent {sent} messages")
    await trio.sleep_forever()


async def m_tinyaudio(s: ModelSession, t: Timeline) -> None:
    await s.bad_window()
    s.talking = False
    response_id, item_id = "resp_tiny", "item_tiny"
    await s.send(response_created(s.event_id(), response_id))
    batch = s.socket.frame(ws.OP_TEXT, audio_delta(s.event_id(), response_id, item_id, b"\x7f").encode()) * TINY_BATCH
    sent = await _flood(s, batch, TINY_BATCH, await _until(t.flood_s))
    s.recorder.note(f"the tiny-audio model sent {sent} one-byte deltas")
    await trio.sleep_forever()


async def m_large(s: ModelSession, t: Timeline) -> None:
    response_id, item_id = "resp_large", "item_large"
    message = s.socket.frame(ws.OP_TEXT, audio_delta(s.event_id(), response_id, item_id, b"\x7f" * LARGE_DELTA_BYTES).encode())
    await s.bad_window()
    s.talking = False
    await s.send(response_created(s.event_id(), response_id))
    for k in range(max(int(t.flood_s), 1)):  # one a second
        started = trio.current_time()
        await s.socket.send_raw(message)
        s.recorder.note(f"large delta {k} ({len(message) / 2**20:.2f} MiB) written in {trio.current_time() - started:.3f} s")
        await trio.sleep(1.0)
    await trio.sleep_forever()


async def m_oversize(s: ModelSession, t: Timeline) -> None:
    delta = audio_delta(s.event_id(), "resp_over", "item_over", b"\x7f" * OVERSIZE_DELTA_BYTES)
    message = s.socket.frame(ws.OP_TEXT, delta.encode())
    await s.bad_window()
    s.talking = False
    await s.socket.send_raw(message)
    await trio.sleep_forever()


async def m_close(s: ModelSession, t: Timeline) -> None:
    await s.bad_window()
    s.talking = False
    s.closed_by_us = True
    await s.socket.send_raw(s.socket.frame(ws.OP_CLOSE, (1000).to_bytes(2, "big") + b"bye"))
    await trio.sleep(2.0)
    await s.socket.stream.aclose()


async def m_rst(s: ModelSession, t: Timeline) -> None:
    await s.bad_window()
    s.talking = False
    s.closed_by_us = True
    await s.socket.reset()


async def m_badjson(s: ModelSession, t: Timeline) -> None:
    await s.bad_window()
    s.talking = False
    await s.send('{"type": "response.output_audio.delta", broken')  # deliberately not JSON
    await trio.sleep_forever()


async def m_binary(s: ModelSession, t: Timeline) -> None:
    await s.bad_window()
    s.talking = False
    await s.socket.send_raw(s.socket.frame(ws.OP_BINARY, b"\x00\x01binary"))  # deliberately binary
    await trio.sleep_forever()


async def m_ping(s: ModelSession, t: Timeline) -> None:
    await s.bad_window()
    sent = await _flood(s, s.socket.frame(ws.OP_PING, b"p" * 16) * PING_BATCH, PING_BATCH, await _until(t.flood_s))
    s.recorder.note(f"the model sent {sent} pings")
    await trio.sleep_forever()


async def m_fragment(s: ModelSession, t: Timeline) -> None:
    await s.bad_window()
    s.talking = False
    response_id, item_id = "resp_frag", "item_frag"
    await s.send(response_created(s.event_id(), response_id))
    body = audio_delta(s.event_id(), response_id, item_id, b"\x7f" * CHUNK_BYTES).encode()
    one = (
        s.socket.frame(ws.OP_TEXT, body[:1], fin=False)
        + b"".join(s.socket.frame(ws.OP_CONT, body[i:i + 1], fin=False) for i in range(1, len(body) - 1))
        + s.socket.frame(ws.OP_CONT, body[-1:])
    )
    sent = await _flood(s, one * FRAGMENT_BATCH, FRAGMENT_BATCH, await _until(t.flood_s))
    s.recorder.note(f"the model sent {sent} deltas in 1-byte fragments")
    await trio.sleep_forever()


async def c_noread(c: Caller, t: Timeline) -> bool:
    c.pause_reading()
    return False


async def c_silent(c: Caller, t: Timeline) -> bool:
    await trio.sleep(t.flood_s)
    return False


async def c_vanish(c: Caller, t: Timeline) -> bool:
    c.pause_reading()
    await trio.sleep(t.bad_len_s)
    return True


async def c_burst(c: Caller, t: Timeline) -> bool:
    hold_s = t.bad_len_s * 0.3
    for _ in range(3):
        await trio.sleep(hold_s)
        for _ in range(round(hold_s * 1000 / FRAME_MS)):
            await c.send_frame()
    return False


async def c_seqjump(c: Caller, t: Timeline) -> bool:
    rng = random.Random(c.call.number)
    for _ in range(round(t.bad_len_s * 1000 / FRAME_MS)):
        await c.send_frame(chunk=c.chunk + rng.choice(JUMPS), timestamp_ms=rng.randrange(10**17))
        await trio.sleep(FRAME_MS / 1000)
    return False


async def c_seqjump63(c: Caller, t: Timeline) -> bool:
    for _ in range(round(t.bad_len_s * 1000 / FRAME_MS)):  # each frame 63 chunks on: 62 frames of concealment each
        await c.send_frame(chunk=c.chunk + 63)
        await trio.sleep(FRAME_MS / 1000)
    return False


async def c_seqback(c: Caller, t: Timeline) -> bool:
    await c.send_frame(chunk=1)
    return False


async def c_seqnum(c: Caller, t: Timeline) -> bool:
    await c.send_frame(repeat_sequence=True)
    return False


async def c_markbogus(c: Caller, t: Timeline) -> bool:
    await c.send_event("mark", {"name": "never-sent"})
    return False


async def c_marktwice(c: Caller, t: Timeline) -> bool:
    c.echo = "twice"
    return False


async def c_noecho(c: Caller, t: Timeline) -> bool:
    c.echo = "none"
    return False


async def c_ping(c: Caller, t: Timeline) -> bool:
    assert c.socket is not None
    batch = c.socket.frame(ws.OP_PING, b"p" * 16) * PING_BATCH
    until = await _until(t.flood_s)
    sent = 0
    due = trio.current_time()
    while trio.current_time() < until:
        await c.socket.send_raw(batch)
        sent += PING_BATCH
        if trio.current_time() >= due:  # its frames keep coming too
            due += FRAME_MS / 1000
            await c.send_frame()
    c.recorder.note(f"the caller sent {sent} pings")
    return False


async def c_bigframe(c: Caller, t: Timeline) -> bool:
    until = await _until(t.flood_s)
    while trio.current_time() < until:
        await c.send_frame(size=BIG_FRAME_BYTES)
        await trio.sleep(FRAME_MS / 1000)
    return False


async def c_flood(c: Caller, t: Timeline) -> bool:
    until = await _until(t.flood_s)
    sent = 0
    while trio.current_time() < until:
        for _ in range(CALLER_FLOOD_BATCH):
            await c.send_frame()
        sent += CALLER_FLOOD_BATCH
        await trio.lowlevel.checkpoint()
    c.recorder.note(f"the caller flooded {sent} frames")
    return False


# --- scenarios ----------------------------------------------------------------------------

IDLE_TIMEOUT_S = 30.0  # MEDIASERVER_IDLE_TIMEOUT_S's default
# MEDIASERVER_MODEL_PING_S's default: a ping after this long silent, the cut as long again later; the check looks
# once a period, so a model that froze mid-period is cut 20-30 s after its last message
MODEL_PING_S = 10.0


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One way for the bad call to misbehave (or none), and what the server should do about it."""

    name: str
    summary: str
    ends: bool  # the server should end the bad call within the bad window (else it lives on to its stop)
    model_act: ModelAct | None = None
    caller_act: CallerAct | None = None
    min_bad_len_s: float = 0.0  # the bad window needs at least this long (the server's timeouts)

    @property
    def side(self) -> str:
        return "model" if self.model_act is not None else "caller" if self.caller_act is not None else "-"


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("none", "baseline: every call behaves", ends=False),
    Scenario("m_fast", "the model sends audio as fast as the socket takes it (0.5 s deltas), then barges in",
             ends=False, model_act=m_fast),
    Scenario("m_tiny", "the model floods tiny messages of an unknown type ({\"type\":\"x.y\"})", ends=False, model_act=m_tiny),
    Scenario("m_tinyaudio", "the model floods one-byte audio deltas", ends=False, model_act=m_tinyaudio),
    Scenario("m_large", "the model sends a ~8 MiB delta (just under the limit) every second", ends=False, model_act=m_large),
    Scenario("m_oversize", "the model sends one ~9.3 MiB delta (over the 8 MiB limit)", ends=True, model_act=m_oversize),
    Scenario("m_fragment", "the model sends deltas in 1-byte WebSocket fragments, continuously", ends=False,
             model_act=m_fragment),
    Scenario("m_ping", "the model floods WebSocket pings (and goes on talking)", ends=False, model_act=m_ping),
    Scenario("m_close", "the model closes its WebSocket (1000) mid-reply", ends=True, model_act=m_close),
    Scenario("m_rst", "the model resets its TCP connection mid-reply", ends=True, model_act=m_rst),
    Scenario("m_badjson", "the model sends a message that is not JSON", ends=True, model_act=m_badjson),
    Scenario("m_binary", "the model sends a binary frame", ends=True, model_act=m_binary),
    Scenario("m_hang", "the model stops talking but reads on", ends=False, model_act=m_hang),
    Scenario("m_noread", "the model stops reading but talks on (its socket fills only after minutes)", ends=False,
             model_act=m_noread),
    Scenario("m_frozen", "the model stops reading and talking, its socket open: the ping check must end it",
             ends=True, model_act=m_frozen, min_bad_len_s=3 * MODEL_PING_S + 5),
    Scenario("c_noread", "the caller sends on but stops reading: it lives on until the kernel's buffers are full "
             "(minutes of audio; a known limit, README: MEDIASERVER_IDLE_TIMEOUT_S)",
             ends=False, caller_act=c_noread, min_bad_len_s=IDLE_TIMEOUT_S + 10),
    Scenario("c_vanish", "the caller stops sending and reading, then drops the connection without stop", ends=True,
             caller_act=c_vanish, min_bad_len_s=IDLE_TIMEOUT_S + 5),
    Scenario("c_silent", "the caller sends nothing for a while, reading on", ends=False, caller_act=c_silent),
    Scenario("c_burst", "the caller holds its frames back and sends them in bursts", ends=False, caller_act=c_burst),
    Scenario("c_flood", "the caller sends frames as fast as it can", ends=False, caller_act=c_flood),
    Scenario("c_bigframe", "the caller sends 47 KB media frames (6 s of audio each), 50 a second", ends=False,
             caller_act=c_bigframe),
    Scenario("c_ping", "the caller floods WebSocket pings (its frames go on)", ends=False, caller_act=c_ping),
    Scenario("c_seqjump", "media.chunk leaps far ahead, timestamps at random", ends=False, caller_act=c_seqjump),
    Scenario("c_seqjump63", "media.chunk leaps 63 ahead on every frame (62 frames to conceal each)", ends=False,
             caller_act=c_seqjump63),
    Scenario("c_seqback", "media.chunk goes back to 1", ends=True, caller_act=c_seqback),
    Scenario("c_seqnum", "a sequenceNumber repeats", ends=True, caller_act=c_seqnum),
    Scenario("c_markbogus", "the caller echoes a mark that was never sent", ends=True, caller_act=c_markbogus),
    Scenario("c_marktwice", "the caller echoes every mark twice", ends=True, caller_act=c_marktwice),
    Scenario("c_noecho", "the caller never echoes a mark", ends=False, caller_act=c_noecho),
)}
