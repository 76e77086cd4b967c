"""The simulated caller's Media Stream on a mock clock: pacing, mark and clear emulation, figures.

Every test runs :class:`mediaserver.dial.call.CallSession` against an
in-memory "server" coroutine on pytest-trio's ``autojump_clock``, so times
are exact: a mark is echoed exactly when the audio before it has played, a
clear echoes the pending marks at once, and the report's figures come out
to the millisecond for a server with known delays.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from trio_websocket import CloseReason, ConnectionClosed

from mediaserver.dial import report
from mediaserver.dial.call import CallSession
from mediaserver.dial.caller import MediaStreamCaller
from mediaserver.dial.script import Action, BargeIn, Pause, Speak, Wait
from mediaserver.dial.timeline import MarkEchoed
from mediaserver.protocol.errors import LocalProtocolError

from tests.fakes import to_ulaw, tone

CALL_SID = "CA" + "c" * 32
STREAM_SID = "MZ" + "d" * 32
ACCOUNT_SID = "AC" + "e" * 32
SILENT_FRAME = b"\xff" * 160


class MemoryTransport:
    """The caller's end of an in-memory Media Stream; a server close looks like a 1000 close frame."""

    def __init__(self, up: trio.MemorySendChannel[str], down: trio.MemoryReceiveChannel[str]) -> None:
        self.up = up
        self.down = down

    async def send_message(self, message: str) -> None:
        try:
            await self.up.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise ConnectionClosed(CloseReason(1000, None)) from None

    async def get_message(self) -> str:
        try:
            return await self.down.receive()
        except trio.EndOfChannel:
            raise ConnectionClosed(CloseReason(1000, None)) from None


class FakeServer:
    """The server's end: records every message with its (virtual) arrival time."""

    def __init__(self, down: trio.MemorySendChannel[str], up: trio.MemoryReceiveChannel[str]) -> None:
        self.down = down
        self.up = up
        self.received: list[tuple[float, dict[str, Any]]] = []

    async def media(self, payload: bytes) -> None:
        await self.send({"event": "media", "streamSid": STREAM_SID, "media": {"payload": base64.b64encode(payload).decode()}})

    async def mark(self, name: str) -> None:
        await self.send({"event": "mark", "streamSid": STREAM_SID, "mark": {"name": name}})

    async def clear(self) -> None:
        await self.send({"event": "clear", "streamSid": STREAM_SID})

    async def send(self, message: dict[str, Any]) -> None:
        await self.down.send(json.dumps(message))

    async def next(self) -> dict[str, Any]:
        """The next message from the caller (``stop`` closes our side, like the media server)."""
        msg: dict[str, Any] = json.loads(await self.up.receive())
        self.received.append((trio.current_time(), msg))
        if msg["event"] == "stop":
            await self.down.aclose()
        return msg

    async def until(self, event: str) -> dict[str, Any]:
        while (msg := await self.next())["event"] != event:
            pass
        return msg

    async def drain(self) -> None:
        """Keep reading until the caller hangs up."""
        while (await self.next())["event"] != "stop":
            pass

    def echoes(self) -> list[str]:
        return [m["mark"]["name"] for _, m in self.received if m["event"] == "mark"]


def echo_times(caller: MediaStreamCaller, t0: float) -> list[tuple[float, str]]:
    """(ms after start, name) of every mark echo the caller sent."""
    return [(round((e.at_s - t0) * 1000, 6), e.name) for e in caller.events if isinstance(e, MarkEchoed)]


ServerScript = Callable[[FakeServer], Awaitable[None]]


async def run_call(script: ServerScript, actions: list[Action], *, listen_s: float = 0.5,
                   duration_s: float | None = None) -> tuple[MediaStreamCaller, FakeServer, float]:  # fmt: skip
    """One call; returns the caller, the server and the time ``start`` went out."""
    up_send, up_recv = trio.open_memory_channel[str](math.inf)
    down_send, down_recv = trio.open_memory_channel[str](math.inf)
    caller = MediaStreamCaller(
        call_sid=CALL_SID, stream_sid=STREAM_SID, account_sid=ACCOUNT_SID, custom_parameters={"token": "t0k"}
    )
    server = FakeServer(down_send, up_recv)
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(script, server)
        await CallSession(caller, MemoryTransport(up_send, down_recv)).run(
            actions, duration_s=duration_s, listen_s=listen_s
        )
    return caller, server, t0


# ----------------------------------------------------------------- the stream


async def test_stream_messages_are_numbered_and_paced_like_twilio(autojump_clock: trio.testing.MockClock) -> None:
    speech = to_ulaw(tone(1000, 50))  # 2.5 frames: padded to 3 with silence

    async def script(server: FakeServer) -> None:
        await server.drain()

    caller, server, t0 = await run_call(script, [Pause(40), Speak(speech, "tone")], listen_s=0.06)
    messages = [m for _, m in server.received]
    assert messages[0] == {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    assert messages[1] == {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "streamSid": STREAM_SID,
            "accountSid": ACCOUNT_SID,
            "callSid": CALL_SID,
            "tracks": ["inbound"],
            "customParameters": {"token": "t0k"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
        "streamSid": STREAM_SID,
    }
    media = messages[2:-1]
    assert [m["event"] for m in media] == ["media"] * 8  # 40 ms + 60 ms + 60 ms of listening
    assert [m["sequenceNumber"] for m in media] == [str(n) for n in range(2, 10)]
    assert [m["media"]["chunk"] for m in media] == [str(n) for n in range(1, 9)]
    assert [m["media"]["timestamp"] for m in media] == [str(20 * n) for n in range(8)]
    assert all(m["media"]["track"] == "inbound" for m in media)
    payloads = [base64.b64decode(m["media"]["payload"]) for m in media]
    assert all(len(p) == 160 for p in payloads)
    assert payloads[:2] == [SILENT_FRAME] * 2 and payloads[5:] == [SILENT_FRAME] * 3
    assert b"".join(payloads[2:5]) == speech + b"\xff" * 80
    # Real-time pacing: one frame every 20 ms from the start message on.
    times = [at - t0 for at, m in server.received if m["event"] == "media"]
    assert times == pytest.approx([0.02 * n for n in range(8)], abs=1e-9)
    assert messages[-1] == {
        "event": "stop",
        "sequenceNumber": "10",
        "stop": {"accountSid": ACCOUNT_SID, "callSid": CALL_SID},
        "streamSid": STREAM_SID,
    }
    assert report.call_figures(caller.events).ended == "caller hung up (stop sent)"


async def test_mark_is_echoed_when_the_audio_before_it_has_played(autojump_clock: trio.testing.MockClock) -> None:
    async def script(server: FakeServer) -> None:
        await server.until("start")
        await server.mark("empty")  # nothing buffered: echoed at once
        await server.media(b"\x00" * 400)  # 50 ms
        await server.mark("a")
        await trio.sleep(0.01)
        await server.media(b"\x00" * 800)  # 100 ms, queued after the first: ends at 150 ms
        await server.mark("b")
        await server.drain()

    caller, server, t0 = await run_call(script, [], listen_s=0.3)
    assert echo_times(caller, t0) == [(0.0, "empty"), (50.0, "a"), (150.0, "b")]
    assert server.echoes() == ["empty", "a", "b"]
    mark_messages = [m for _, m in server.received if m["event"] == "mark"]
    assert mark_messages[1] == {
        "event": "mark",
        "sequenceNumber": mark_messages[1]["sequenceNumber"],
        "mark": {"name": "a"},
        "streamSid": STREAM_SID,
    }
    sequence = [int(m["sequenceNumber"]) for _, m in server.received if "sequenceNumber" in m]
    assert sequence == list(range(1, len(sequence) + 1))  # echoes are numbered in wire order
    assert [e.cleared for e in caller.events if isinstance(e, MarkEchoed)] == [False] * 3


async def test_clear_drops_the_buffer_and_echoes_pending_marks_at_once(autojump_clock: trio.testing.MockClock) -> None:
    async def script(server: FakeServer) -> None:
        await server.until("start")
        for name in ("a", "b", "c"):
            await server.media(b"\x00" * 1600)  # 200 ms each
            await server.mark(name)
        await trio.sleep(0.3)  # "a" has played, "b" is playing
        await server.clear()
        await server.mark("after")  # nothing buffered any more: echoed at once
        await server.drain()

    caller, server, t0 = await run_call(script, [], listen_s=0.5)
    assert echo_times(caller, t0) == [(200.0, "a"), (300.0, "b"), (300.0, "c"), (300.0, "after")]
    assert server.echoes() == ["a", "b", "c", "after"]
    cleared = [(e.name, e.cleared) for e in caller.events if isinstance(e, MarkEchoed)]
    assert cleared == [("a", False), ("b", True), ("c", True), ("after", False)]
    heard = report.heard(caller.events)
    assert sum(len(p.payload) for p in heard) == 2400  # 300 ms played, 300 ms dropped
    figures = report.call_figures(caller.events)
    assert (figures.agent_received_ms, figures.agent_played_ms, figures.clears) == (600.0, 300.0, 1)
    assert (figures.marks_received, figures.marks_played, figures.marks_cleared) == (4, 2, 2)


async def test_hanging_up_stops_playback_and_server_close_ends_the_call(autojump_clock: trio.testing.MockClock) -> None:
    async def script(server: FakeServer) -> None:
        await server.until("start")
        await server.media(b"\x00" * 8000)  # 1 s, but the server hangs up after 400 ms
        await server.mark("never")
        await trio.sleep(0.4)
        await server.down.aclose()  # the media server hangs up

    caller, server, t0 = await run_call(script, [Pause(2000)], listen_s=0)
    figures = report.call_figures(caller.events)
    assert figures.ended == "the server closed the stream (1000 NORMAL_CLOSURE)"
    assert not figures.error
    assert figures.duration_ms == 400.0
    assert figures.agent_played_ms == 400.0
    assert server.echoes() == []  # the call ended before the mark's audio played
    with pytest.raises(LocalProtocolError):
        caller.media(SILENT_FRAME, trio.current_time(), speech=False)


async def test_server_protocol_mistakes_become_warnings(autojump_clock: trio.testing.MockClock) -> None:
    async def script(server: FakeServer) -> None:
        await server.until("start")
        await server.send({"event": "media", "streamSid": "MZ" + "0" * 32, "media": {"payload": "AAAA"}})
        await server.send({"event": "media", "streamSid": STREAM_SID, "media": {"payload": "AAAA", "track": "x"}})
        await server.send({"event": "hangup", "streamSid": STREAM_SID})
        await server.down.send("not json")
        await server.drain()

    caller, _, _ = await run_call(script, [], listen_s=0.1)
    warnings = report.call_figures(caller.events).warnings
    assert len(warnings) == 4
    assert "wrong streamSid" in warnings[0] and "malformed media" in warnings[1]
    assert "31951" in warnings[2] and "not JSON" in warnings[3]
    assert report.heard(caller.events) == []


# ----------------------------------------------------------------- figures


def _is_speech(msg: dict[str, Any]) -> bool:
    return msg["event"] == "media" and base64.b64decode(msg["media"]["payload"]) != SILENT_FRAME


async def test_figures_of_a_scripted_server_with_known_delays(autojump_clock: trio.testing.MockClock) -> None:
    """A server that answers every utterance 250 ms after it ended, with one
    100 ms underrun in its first answer, and clears 60 ms after the caller
    talks over its second answer (times in the comments are from ``start``)."""
    answers: list[list[bytes | float]] = [
        [b"\x00" * 1600, 0.3, b"\x00" * 1600],  # 200 ms, a 100 ms hole, 200 ms
        [b"\x00" * 8000],  # 1 s, interrupted
        [b"\x00" * 800],  # 100 ms
    ]

    async def script(server: FakeServer) -> None:
        await server.until("start")
        speaking = False
        playing_until = -math.inf
        turn = 0
        while True:
            msg = await server.next()
            if msg["event"] == "stop":
                return
            if msg["event"] != "media":
                continue
            now = trio.current_time()
            if _is_speech(msg):
                if not speaking and now < playing_until:  # barge-in
                    await trio.sleep(0.06)
                    await server.clear()
                    playing_until = -math.inf
                speaking = True
            elif speaking:  # the first silent frame: the utterance has ended
                speaking = False
                await trio.sleep(0.25)
                for part in answers[turn]:
                    if isinstance(part, float):
                        await trio.sleep(part)
                    else:
                        await server.media(part)
                        await server.mark(f"turn{turn}")
                        playing_until = max(playing_until, trio.current_time()) + len(part) / 8000
                turn += 1

    actions: list[Action] = [
        Pause(100),
        Speak(to_ulaw(tone(1000, 200)), "one"),  # 100-300 ms; answer 550-750 and 850-1050
        Wait(timeout_ms=3000),  # quiet for 500 ms after 1050: the next frame slot is 1560
        Speak(to_ulaw(tone(1000, 200)), "two"),  # 1560-1760; answer from 2010
        BargeIn(100),  # 100 ms into the answer: the slot at 2120
        Speak(to_ulaw(tone(1000, 100)), "three"),  # 2120-2220; clear at 2180; answer 2470-2570
    ]
    caller, _, _ = await run_call(script, actions, listen_s=0.5)
    f = report.call_figures(caller.events)
    assert f.first_audio_ms == 550.0
    assert f.turns == (
        report.Turn(100.0, 300.0, 250.0),
        report.Turn(1560.0, 1760.0, 250.0),
        report.Turn(2120.0, 2220.0, 250.0),
    )
    assert f.barge_ins == (report.BargeIn(2120.0, 60.0, cleared=True),)
    assert (f.underruns, f.underrun_ms) == (1, 100.0)
    assert f.duration_ms == 2720.0
    assert (f.agent_received_ms, f.agent_played_ms) == (1500.0, 670.0)
    assert (f.marks_received, f.marks_played, f.marks_cleared, f.clears) == (4, 3, 1, 1)
    assert f.speech_sent_ms == 500.0
    assert f.warnings == () and not f.error
    text = report.format_call(CALL_SID, f)
    assert "first agent audio     550 ms" in text
    assert "agent stopped 60 ms after the caller spoke (clear received)" in text
    assert "underruns (gaps)      1 (100 ms)" in text
    assert (f.caller_late_frames, f.caller_late_max_ms) == (0, 0.0) and "caller behind" not in text


async def test_a_caller_that_falls_behind_its_schedule_says_so(autojump_clock: trio.testing.MockClock) -> None:
    """A stall of the caller's own process (an overloaded machine) is in its figures and its report."""

    async def script(server: FakeServer) -> None:
        await server.until("start")
        for _ in range(5):
            await server.until("media")
        autojump_clock.jump(0.15)  # 150 ms pass with no task running: the caller wakes 130 ms after frame 6 was due
        await server.drain()

    caller, server, t0 = await run_call(script, [Pause(100)], listen_s=0.2)
    times = [round((at - t0) * 1000, 6) for at, m in server.received if m["event"] == "media"]
    # The frames due at 100 to 220 ms leave at 230 ms, then the schedule goes on.
    assert times == [0.0, 20.0, 40.0, 60.0, 80.0, *[230.0] * 7, 240.0, 260.0, 280.0]
    f = report.call_figures(caller.events)
    assert (f.caller_late_frames, f.caller_late_max_ms) == (5, 130.0)  # 130, 110, 90, 70 and 50 ms late (not 30, 10)
    assert "caller behind         5 frame(s) sent 50+ ms late, up to 130 ms: this machine stalled or was overloaded" in (
        report.format_call(CALL_SID, f)
    )
    summary = report.summarize([f, report.call_figures(caller.events[:3])])
    assert summary.calls_caller_late == 1
    assert "1 call(s) fell behind the caller's schedule by 50+ ms" in report.format_summary(summary)


async def test_duration_hangs_up_in_the_middle_of_the_script(autojump_clock: trio.testing.MockClock) -> None:
    async def script(server: FakeServer) -> None:
        await server.drain()

    caller, server, t0 = await run_call(script, [Speak(to_ulaw(tone(500, 2000)), "long")], duration_s=0.5)
    assert report.call_figures(caller.events).duration_ms == 500.0
    assert report.call_figures(caller.events).speech_sent_ms == 500.0
    assert server.received[-1][1]["event"] == "stop"
