"""Deterministic tests of CallBridge: virtual time, in-memory sockets, exact instants.

The Twilio side is :class:`tests.fakes.FakeTwilioCaller` over an in-memory
Media Stream (it emulates Twilio's playback buffer and echoes marks when
their audio has played); the provider is :class:`tests.fakes.FakeLink`.
Every test runs on pytest-trio's ``autojump_clock`` (a ``MockClock`` that
jumps to the next deadline whenever all tasks are blocked), so pacing,
playback and timeouts happen at exact Trio times and take no real time.
"""

from __future__ import annotations

import itertools
import math
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from mediaserver.bridge.call import (
    DIGITS_MARGIN_S,
    SILENT_ITEM_S,
    TOP_UP_S,
    TRANSFER_GRACE_S,
    TRANSFER_REQUEST_S,
    CallBridge,
)
from mediaserver.bridge.stats import CallStats
from mediaserver.codec import Resampler, ulaw_encode
from mediaserver.protocol import RemoteProtocolError, TwilioStream
from mediaserver.protocol.providers import base as pv
from mediaserver.tools import CallContext, ToolSet, tool
from mediaserver.tools.builtins import BUILTINS
from tests.fakes import (
    FakeLink,
    MemoryMessageStream,
    FakeTwilioCaller,
    dominant_frequency_hz,
    fail_after,
    from_ulaw,
    memory_twilio_pair,
    pcm16,
    tone,
    to_ulaw,
)

CHUNK_BYTES = 320  # the bridge's 40 ms downlink chunk
CHUNK_S = 0.040
LEAD_S = 0.160
EXACT = 1e-9  # float rounding of accumulated 40 ms steps; times are otherwise exact


def audio(ms: int, byte: int = 0x55) -> bytes:
    """µ-law audio of ``ms`` milliseconds (a constant non-silent code)."""
    return bytes([byte]) * (8 * ms)


@dataclass
class Call:
    bridge: CallBridge
    caller: FakeTwilioCaller
    link: FakeLink
    started_s: float
    done: trio.Event = field(default_factory=trio.Event)
    ended_s: float | None = None
    stats: CallStats | None = None
    error: BaseException | None = None

    def media_times(self) -> list[float]:
        return [m.at_s - self.started_s for m in self.caller.received]

    def inbound_events(self) -> list[str]:
        return [msg["event"] for _, msg in self.caller.inbound]


@asynccontextmanager
async def bridged(link: FakeLink, *, expect_error: bool = False, **options: Any) -> AsyncIterator[Call]:
    """A started call: caller <-> in-memory stream <-> CallBridge <-> ``link``."""
    stream, transport = memory_twilio_pair()
    caller = FakeTwilioCaller()
    async with trio.open_nursery() as nursery, caller.attached(transport):
        twilio = TwilioStream()
        while twilio.start is None:  # what the call manager does before bridging
            twilio.receive_message(await stream.receive())
            list(twilio.events())
        call = Call(CallBridge(stream, twilio, link, call_sid=caller.call_sid, **options), caller, link,
                    trio.current_time())

        async def run() -> None:
            try:
                call.stats = await call.bridge.run()
            except Exception as exc:  # noqa: BLE001 - recorded, asserted below
                call.error = exc
            finally:
                call.ended_s = trio.current_time()
                stream.close()  # as the app does when the bridge returns
                call.done.set()

        nursery.start_soon(run)
        yield call
        nursery.cancel_scope.cancel()
    if call.error is not None and not expect_error:
        raise call.error


@tool
async def transfer_out(call: CallContext) -> str:
    """Transfer."""
    await call.transfer("+15551234567")
    return "transferred"


class RecordingRest:
    """Stands in for TwilioRest in transfers: records each redirect's TwiML; Twilio answers after ``delay_s``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.updates: list[str] = []
        self.delay_s = delay_s

    async def update_call(self, call_sid: str, *, twiml: str, timeout_s: float | None = None) -> None:
        self.updates.append(twiml)
        if self.delay_s:
            await trio.sleep(self.delay_s)


# -------------------------------------------------------------------- pacing


@fail_after(60)
@pytest.mark.parametrize("said_done", [True, False])
async def test_call_wait_played_holds_until_the_reply_played_said_done_or_not(
    said_done: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """end_call and transfer wait for the goodbye; a provider that never says an item is done cannot hold them 15 s."""
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.AudioDelta("item_1", audio(400)))  # the goodbye: 400 ms, no ResponseStarted (as ElevenLabs)
        if said_done:
            link.emit(pv.AudioDone("item_1"))
        await trio.sleep(0.001)
        asked_s = trio.current_time()
        assert await call.bridge.wait_played(15.0)
        waited_s = trio.current_time() - asked_s
        assert len(call.caller.echoes) == 10  # all of it played (the fake caller echoes a mark as its chunk ends)
        if said_done:
            assert waited_s == pytest.approx(0.4 - 0.001, abs=EXACT)  # until the last mark came back
        else:
            assert waited_s == pytest.approx(SILENT_ITEM_S - 0.001, abs=EXACT)  # SILENT_ITEM_S after the last audio




@fail_after(60)
@pytest.mark.parametrize(("after_s", "grace_s"), [(0.6, 0.0), (3.0, SILENT_ITEM_S)])
async def test_call_end_call_gives_a_goodbye_time_to_begin_only_when_no_audio_came_lately(
    after_s: float, grace_s: float, autojump_clock: trio.testing.MockClock
) -> None:
    """From a provider that does not frame replies (pcm, ElevenLabs): end_call 0.6 s after a goodbye that has
    played hangs up at once (that was the goodbye); 3 s after the last audio, the goodbye may be yet to come
    (text-to-speech): it gets SILENT_ITEM_S to begin."""
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.AudioDelta("item_1", audio(400)), pv.AudioDone("item_1"))
        await trio.sleep(after_s)
        assert call.bridge._quiet()  # all of it played
        asked_s = trio.current_time()
        await call.bridge.end_call("done")
        await call.done.wait()
        assert call.ended_s - asked_s == pytest.approx(grace_s, abs=EXACT)
        assert call.bridge.end_reason == "agent hung up: done"


@fail_after(60)
async def test_call_pacing_sends_each_chunk_lead_before_it_plays(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        await trio.sleep(1.0)  # the call is up; the model starts talking at t = 1 s
        link.emit(pv.AudioDelta("item_1", audio(400)), pv.AudioDone("item_1"))
        await call.caller.wait_for(lambda: len(call.caller.echoes) == 10)
        # Ten 40 ms chunks: the first 160 ms (+ the chunk due at the lead) leave at
        # once with the TOP_UP_S (80 ms) after them; the pacer wakes again when
        # the next chunk is due, 160 ms before it plays, and sends it with the
        # two after it: one wake-up and one write for 120 ms of audio.
        assert TOP_UP_S == 0.08
        expected = [1.0] * 7 + [1.0 + 7 * CHUNK_S - LEAD_S] * 3
        assert call.media_times() == pytest.approx(expected, abs=EXACT)
        # No chunk left more than the lead + TOP_UP_S before it plays; after the
        # reply's start, none less than the lead.
        ahead = [1.0 + k * CHUNK_S - sent_s for k, sent_s in enumerate(call.media_times())]
        assert max(ahead) == pytest.approx(LEAD_S + TOP_UP_S, abs=EXACT)
        assert min(ahead[7:]) == pytest.approx(LEAD_S, abs=EXACT)
        assert [len(m.payload) for m in call.caller.received] == [CHUNK_BYTES] * 10
        assert call.caller.received_audio == audio(400)
        # Twilio's buffer never ran dry: each chunk arrived before the previous one finished.
        playback_starts = [1.0 + k * CHUNK_S for k in range(10)]
        assert all(t <= start for t, start in zip(call.media_times(), playback_starts, strict=True))
        assert call.bridge.stats.frames_out == 10


@fail_after(60)
async def test_call_pacing_keeps_the_lead_across_late_deltas(autojump_clock: trio.testing.MockClock) -> None:
    # The model produces audio more slowly than real time at first: 40 ms every 80 ms.
    link = FakeLink()
    async with bridged(link) as call:
        for k in range(4):
            link.emit(pv.AudioDelta("item_1", audio(40)))
            await trio.sleep(0.080)
        link.emit(pv.AudioDone("item_1"))
        await call.caller.wait_for_audio(4 * CHUNK_BYTES)
        # Each chunk leaves the moment it arrives: the buffer at Twilio ran dry each time.
        assert call.media_times() == pytest.approx([0.0, 0.08, 0.16, 0.24], abs=EXACT)


@fail_after(60)
async def test_call_marks_follow_every_chunk_and_confirm_playback(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.AudioDelta("item_1", audio(100)), pv.AudioDelta("item_1", audio(100)), pv.AudioDone("item_1"))
        await call.caller.wait_for(lambda: len(call.caller.echoes) == 5)
        # 200 ms = five 40 ms chunks, each followed by its own mark, names in order.
        assert call.inbound_events() == ["media", "mark"] * 5
        marks = [msg["mark"]["name"] for _, msg in call.caller.inbound if msg["event"] == "mark"]
        assert marks == ["1", "2", "3", "4", "5"]
        # Twilio echoes each mark when its chunk has played: at 40, 80, ... 200 ms.
        echoes = call.caller.echoes
        assert [e.name for e in echoes] == marks
        assert [e.at_s - call.started_s for e in echoes] == pytest.approx([0.04, 0.08, 0.12, 0.16, 0.20], abs=EXACT)
        assert not any(e.cleared for e in echoes)
        await trio.testing.wait_all_tasks_blocked()
        twilio = call.bridge.twilio
        assert twilio.played_samples == 1600 and twilio.unconfirmed_samples == 0
        assert twilio.playback("item_1").played_ms == 200


@fail_after(60)
async def test_call_with_marks_awaiting_their_echo_at_the_cap_chunks_go_without_marks_and_nothing_is_lost(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import mediaserver.protocol.twilio as twilio_core

    monkeypatch.setattr(twilio_core, "MAX_PENDING_MARKS", 2)  # (Twilio holds ~4 chunks' marks at the 160 ms lead)
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.AudioDelta("item_1", audio(400)), pv.AudioDone("item_1"))
        await call.caller.wait_for(lambda: len(call.caller.received_audio) == 8 * 400)
        await trio.sleep(1)  # everything played, every mark sent echoed
        events = call.inbound_events()
        assert events.count("media") == 10 and 2 <= events.count("mark") < 10  # no more than 2 ever awaited their echo
        twilio = call.bridge.twilio
        assert twilio.marks_withheld == 10 - events.count("mark")
        assert call.caller.received_audio == audio(400)  # every chunk still went out, in order
        # A mark covers the chunks sent without one before it: played is exactly the audio before the last mark.
        last_mark = max(i for i, e in enumerate(events) if e == "mark")
        assert twilio.played_samples == CHUNK_BYTES * events[:last_mark].count("media") == call.caller.played_marked_bytes
    warnings = [r.getMessage() for r in caplog.records if "await Twilio's echo" in r.getMessage()]
    assert warnings == [f"call {call.caller.call_sid}: 2 marks await Twilio's echo; chunks go without marks until "
                        "echoes catch up (a barge-in meanwhile cuts the reply at the last mark echoed)"]


@fail_after(60)
async def test_call_downlink_rechunks_and_flushes_the_tail(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        reply = bytes(range(256)) * 5  # 1280 bytes in odd-sized deltas, then a new item
        link.emit(*(pv.AudioDelta("item_1", reply[at : at + 111]) for at in range(0, len(reply), 111)))
        link.emit(pv.AudioDelta("item_1", b"\x10" * 50), pv.AudioDone("item_1"))
        link.emit(pv.AudioDelta("item_2", b"\x20" * 100), pv.AudioDone("item_2"))
        await call.caller.wait_for_audio(1280 + 50 + 100)
        assert [len(m.payload) for m in call.caller.received] == [320, 320, 320, 320, 50, 100]
        assert call.caller.received_audio == reply + b"\x10" * 50 + b"\x20" * 100


@fail_after(60)
async def test_call_downlink_plays_a_partial_chunk_when_the_provider_pauses(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # No AudioDone (ElevenLabs, say): the last 30 ms must not wait for the next reply.
    link = FakeLink()
    async with bridged(link) as call:
        await trio.sleep(1.0)
        link.emit(pv.AudioDelta("item_1", audio(110)))
        await call.caller.wait_for_audio(8 * 110)
        assert [len(m.payload) for m in call.caller.received] == [320, 320, 240]
        # the two whole chunks leave at once; the 30 ms tail one chunk (40 ms) later
        assert call.media_times() == pytest.approx([1.0, 1.0, 1.0 + CHUNK_S], abs=EXACT)


@fail_after(60)
async def test_call_downlink_plays_a_short_last_delta_that_finds_the_pacer_idle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A model streaming in real time, no AudioDone: each 50 ms delta leaves a part-chunk that is played on its
    # own; the reply's last 10 ms then arrive when nothing is pending and must wake the idle pacer by themselves
    # (else the tail waits for the next reply, and end_call waits its whole timeout for it).
    link = FakeLink()
    async with bridged(link) as call:
        await trio.sleep(1.0)
        for _ in range(5):
            link.emit(pv.AudioDelta("bye", audio(50)))
            await trio.sleep(0.05)
        last_s = trio.current_time()
        link.emit(pv.AudioDelta("bye", audio(10)))
        assert await call.bridge.wait_played(15.0)
        assert len(call.caller.received_audio) == 8 * 260
        assert call.media_times()[-1] == pytest.approx(last_s + CHUNK_S, abs=EXACT)


@fail_after(60)
async def test_call_downlink_resamples_pcm16_to_ulaw(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink(output_format=pv.AudioFormat("pcm16", 24000))
    async with bridged(link) as call:
        pcm = tone(440, 480, 24000, amplitude=0.3).tobytes()
        for at in range(0, len(pcm), 2400):  # 50 ms deltas
            link.emit(pv.AudioDelta("item_1", pcm[at : at + 2400]))
        link.emit(pv.AudioDone("item_1"))
        await call.caller.wait_for_audio(1)
        await call.caller.wait_quiet(0.5)
        received = from_ulaw(call.caller.received_audio)
        fed = Resampler(24000, 8000)
        fed.process(pcm)
        delay = len(fed.flush()) // 2  # the filter's tail, played with the reply at its end
        assert len(received) == 8 * 480 + delay  # 24 kHz -> 8 kHz, nothing lost
        assert dominant_frequency_hz(received[800:], 8000) == pytest.approx(440, abs=10)


@fail_after(60)
async def test_call_downlink_joins_pcm16_samples_split_across_deltas(autojump_clock: trio.testing.MockClock) -> None:
    # A PCM16 model may cut its stream anywhere (odd-length deltas): the half sample waits for the rest of it;
    # one left over when another item begins was never a whole sample and is dropped.
    link = FakeLink(output_format=pv.AudioFormat("pcm16", 8000))
    async with bridged(link) as call:
        first = tone(440, 100, 8000, amplitude=0.3).tobytes()
        second = tone(660, 40, 8000, amplitude=0.3).tobytes()
        cuts = [0, 3, 160, 161, 801, len(first)]
        link.emit(*(pv.AudioDelta("item_1", first[a:b]) for a, b in itertools.pairwise(cuts)))
        link.emit(pv.AudioDelta("item_1", b"\x7f"))  # half a sample, never completed
        link.emit(pv.AudioDelta("item_2", second), pv.AudioDone("item_2"))
        await call.caller.wait_for_audio(800 + 320)
        await call.caller.wait_quiet(0.5)
        assert call.caller.received_audio == ulaw_encode(first) + ulaw_encode(second)
    assert call.error is None


async def emit_with_the_pacer_held(call: Call, *events: pv.ProviderEvent) -> None:
    """The provider sends ``events`` while the pacer cannot send (it waits for the send lock): what the queue holds
    when they have been handled does not depend on how the scheduler interleaved the pacer with them."""
    async with call.bridge._send_lock:
        call.link.emit(*events)
        await trio.testing.wait_all_tasks_blocked()


@fail_after(60)
async def test_call_audio_queued_past_max_queued_s_is_dropped_and_later_audio_plays(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # A model that sends far faster than real time (hours of audio in seconds) must not grow the server without bound.
    link = FakeLink()
    async with bridged(link, max_queued_s=0.2) as call:
        await trio.sleep(1.0)
        await emit_with_the_pacer_held(call, pv.AudioDelta("item_1", audio(1000, 0x11)),
                                       pv.AudioDelta("item_1", audio(500, 0x12)), pv.AudioDone("item_1"))
        await call.caller.wait_for_audio(1)
        await call.caller.wait_quiet(0.5)
        link.emit(pv.AudioDelta("item_2", audio(100, 0x22)), pv.AudioDone("item_2"))
        await call.caller.wait_for_audio(8 * 300)
        await call.caller.wait_quiet(0.5)
        # 200 ms of the first reply (what the queue holds), none of the rest; the next reply whole
        assert call.caller.received_audio == audio(200, 0x11) + audio(100, 0x22)
        # The model hears where its reply ended for the caller, as for a barge-in; the next reply is not cut.
        assert link.truncates() == [pv.Truncate("item_1", 200)]
        link.emit(pv.Transcript("assistant", "one two three four five six seven eight nine ten", True, "item_1"))
        await trio.sleep(0.1)
        [turn] = [t for t in call.bridge.stats.transcript.turns() if t.role == "assistant"]
        # the record: the share of the text that played, 200 of the 1500 ms the model made (the rest dropped):
        # 49 characters * 200 / 1500 = 6, back to the last whole word
        assert (turn.text, turn.interrupted, turn.heard_ms) == ("one", True, 200)
        assert call.bridge.stats.barge_ins == call.bridge.stats.truncations == 0  # (not a barge-in)
    warnings = [r.getMessage() for r in caplog.records if "ahead of its playback" in r.getMessage()]
    assert len(warnings) == 1 and "more than 0.2 s ahead" in warnings[0] and "the rest of item_1" in warnings[0]
    assert "the model is told its reply ends at 200 ms" in warnings[0]


@fail_after(60)
async def test_call_a_barge_in_after_an_overflow_cuts_at_what_was_heard(autojump_clock: trio.testing.MockClock) -> None:
    """The overflow's truncate (at the end of what was queued) comes first; the barge-in's, at what played, last."""
    link = FakeLink()
    async with bridged(link, max_queued_s=0.2) as call:
        await trio.sleep(1.0)
        await emit_with_the_pacer_held(call, pv.AudioDelta("item_1", audio(1000, 0x11)))
        await trio.sleep(0.1)  # (the caller hears 100 ms of it; Twilio echoes its marks as it plays)
        link.emit(pv.SpeechStarted(item_id="user_1", audio_start_ms=1100))
        await call.caller.wait_for_clear()
        await trio.sleep(0.1)
        truncates = link.truncates()
        assert [t.item_id for t in truncates] == ["item_1", "item_1"] and truncates[0].audio_end_ms == 200
        assert truncates[1].audio_end_ms < 200  # what had played by the barge-in, at the last mark Twilio echoed
        link.emit(pv.Transcript("assistant", "one two three four five six seven eight nine ten", True, "item_1"))
        await trio.sleep(0.1)
        [turn] = [t for t in call.bridge.stats.transcript.turns() if t.role == "assistant"]
        assert turn.heard_ms == truncates[1].audio_end_ms
        # (the share of the whole reply the model made, dropped audio included: less than a fifth of it)
        assert len(turn.text) <= len("one two three four five six seven eight nine ten") * turn.heard_ms // 1000


@fail_after(60)
async def test_call_a_reply_that_begins_while_the_queue_is_full_is_dropped_whole_and_said_so(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    link = FakeLink()
    async with bridged(link, max_queued_s=0.2) as call:
        await trio.sleep(1.0)
        await emit_with_the_pacer_held(call, pv.AudioDelta("item_1", audio(200, 0x11)), pv.AudioDelta("item_2", audio(40, 0x22)))
        await call.caller.wait_for_audio(1600)
        link.emit(pv.AudioDelta("item_2", audio(160, 0x23)), pv.AudioDone("item_2"))  # room again: still dropped
        link.emit(pv.AudioDelta("item_3", audio(100, 0x33)), pv.AudioDone("item_3"))
        await call.caller.wait_for_audio(1600 + 800)
        await call.caller.wait_quiet(0.5)
        assert call.caller.received_audio == audio(200, 0x11) + audio(100, 0x33)
    warnings = [r.getMessage() for r in caplog.records if "ahead of its playback" in r.getMessage()]
    assert len(warnings) == 1 and "the rest of item_2 is dropped" in warnings[0]


@fail_after(60)
async def test_call_a_reply_past_max_queued_s_loses_its_rest_and_the_next_reply_plays_whole(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Once a reply overflows, the rest of it is dropped (resumed when there is room, the caller would hear it jump
    # minutes ahead); its odd-length pieces leave no stray byte in the next reply's samples.
    link = FakeLink(output_format=pv.AudioFormat("pcm16", 8000))
    async with bridged(link, max_queued_s=0.2) as call:
        sig = tone(440, 1500, 8000, amplitude=0.3).tobytes()
        await trio.sleep(1.0)
        await emit_with_the_pacer_held(call, pv.AudioDelta("item_1", sig[:3203]), pv.AudioDelta("item_1", sig[3203:3206]))
        await call.caller.wait_for_audio(1600)
        for at in range(3206, 3206 + 1600 * 3, 1600):  # in real time, with room again: still dropped
            link.emit(pv.AudioDelta("item_1", sig[at : at + 1600]))
            await trio.sleep(0.1)
        link.emit(pv.AudioDone("item_1"))
        await call.caller.wait_quiet(0.5)
        second = tone(660, 150, 8000, amplitude=0.3).tobytes()  # (less than the cap: one message is cut too)
        link.emit(pv.AudioDelta("item_2", second), pv.AudioDone("item_2"))
        await call.caller.wait_for_audio(1600 + len(second) // 2)
        await call.caller.wait_quiet(0.5)
        assert call.caller.received_audio == ulaw_encode(sig[:3200]) + ulaw_encode(second)
    assert call.error is None


# ------------------------------------------------------------------- barge-in


@fail_after(60)
async def test_call_barge_in_clears_at_once_and_truncates_at_the_played_marks(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.AudioDelta("item_1", audio(2000)), pv.AudioDone("item_1"))
        await trio.sleep(0.5)
        link.emit(pv.SpeechStarted(item_id="user_1", audio_start_ms=480))
        clear = await call.caller.wait_for_clear()
        assert clear.at_s - call.started_s == pytest.approx(0.5, abs=EXACT)  # no delay at all
        await trio.testing.wait_all_tasks_blocked()
        # By 0.5 s the caller had played 12 chunks (echoes at 40 ... 480 ms): 480 ms.
        assert clear.played_marked_bytes == 12 * CHUNK_BYTES
        assert link.truncates() == [pv.Truncate("item_1", 480)]
        truncated_s = next(t for t, c in link.commands if isinstance(c, pv.Truncate))
        assert truncated_s - call.started_s == pytest.approx(0.5, abs=EXACT)
        # 19 chunks had been sent (7 at once, then 3 at a time from 0.12 s: the last three at
        # 0.48 s for their 0.64-0.72 s slots); the 7 unplayed ones' marks come back as cleared,
        # and nothing more is sent.
        await trio.sleep(2.0)
        assert len(call.caller.received) == 19
        assert all(m.at_s <= clear.at_s for m in call.caller.received)
        assert [e.name for e in call.caller.echoes if e.cleared] == [str(n) for n in range(13, 20)]
        assert call.inbound_events()[-1] == "clear"
        assert call.bridge.twilio.playback("item_1").cleared_samples == 7 * CHUNK_BYTES
        assert call.bridge.stats.barge_ins == 1


@pytest.mark.parametrize("rate", [16000, 24000])
@fail_after(60)
async def test_call_barge_in_on_resampled_audio_truncates_at_the_model_audio_heard(
    rate: int, autojump_clock: trio.testing.MockClock
) -> None:
    """PCM from the model goes through the downlink resampler, whose filter delay is the first ~2.3 ms of every
    reply: that much of what played was not the model's audio, so it is not counted as heard."""
    link = FakeLink(output_format=pv.AudioFormat("pcm16", rate))
    async with bridged(link) as call:
        link.emit(pv.AudioDelta("item_1", b"\x10\x27" * (rate * 2)), pv.AudioDone("item_1"))  # 2 s of PCM16
        await trio.sleep(0.5)
        link.emit(pv.SpeechStarted(item_id="user_1", audio_start_ms=480))
        await call.caller.wait_for_clear()
        await trio.testing.wait_all_tasks_blocked()
        played = call.bridge.twilio.playback("item_1").played_samples  # 8 kHz µ-law samples the caller heard
        [truncate] = link.truncates()
    delay_ms = Resampler(rate, 8000).delay_ms
    assert played == 480 * 8  # (12 chunks echoed by 0.5 s, as without a resampler)
    assert truncate.audio_end_ms == math.floor(played / 8 - math.ceil(delay_ms * 8) / 8) == 477
    assert truncate.audio_end_ms <= played / 8 - delay_ms


@fail_after(60)
async def test_call_barge_in_wakes_the_pacer_for_the_next_reply(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.AudioDelta("item_1", audio(2000)), pv.AudioDone("item_1"))
        await trio.sleep(0.5)  # the pacer sleeps until 0.52 s for chunk 17
        link.emit(pv.SpeechStarted(None, None), pv.AudioDelta("item_2", audio(80, 0x33)), pv.AudioDone("item_2"))
        await call.caller.wait_for(lambda: call.caller.received_audio.endswith(audio(80, 0x33)))
        first_new = next(m for m in call.caller.received if m.payload[0] == 0x33)
        # The next reply goes out at 0.5 s, not when the cancelled sleep would have ended.
        assert first_new.at_s - call.started_s == pytest.approx(0.5, abs=EXACT)
        assert call.inbound_events()[call.inbound_events().index("clear") + 1] == "media"


@fail_after(60)
async def test_call_interrupted_item_late_deltas_are_dropped(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.AudioDelta("item_1", audio(400)))  # no AudioDone: still generating
        await trio.sleep(0.3)
        link.emit(pv.SpeechStarted(None, None))
        await call.caller.wait_for_clear()
        sent_before = len(call.caller.received)
        link.emit(pv.AudioDelta("item_1", audio(400)), pv.AudioDelta("item_1", audio(30)), pv.AudioDone("item_1"))
        await trio.sleep(1.0)
        assert len(call.caller.received) == sent_before  # none of item_1's late audio
        link.emit(pv.AudioDelta("item_2", audio(40, 0x44)), pv.AudioDone("item_2"))
        await call.caller.wait_for_audio((sent_before + 1) * CHUNK_BYTES)
        assert call.caller.received[-1].payload == audio(40, 0x44)
        assert link.truncates() == [pv.Truncate("item_1", 280)]  # 7 marks echoed by 0.3 s


@fail_after(60)
async def test_call_barge_in_after_playout_still_stops_a_generating_item(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Twilio has played everything sent so far, but the model is still producing
    # item_1: the barge-in must cut it (and drop what comes later) all the same.
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.AudioDelta("item_1", audio(80)))
        await trio.sleep(1.0)
        assert call.bridge.twilio.unconfirmed_samples == 0
        link.emit(pv.SpeechStarted(None, None))
        await call.caller.wait_for_clear()
        assert link.truncates() == [pv.Truncate("item_1", 80)]
        link.emit(pv.AudioDelta("item_1", audio(200)), pv.AudioDone("item_1"))
        await trio.sleep(1.0)
        assert call.caller.received_audio == audio(80)


@fail_after(60)
async def test_call_speech_while_silent_is_not_a_barge_in(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.AudioDelta("item_1", audio(80)), pv.AudioDone("item_1"))
        await trio.sleep(1.0)
        link.emit(pv.SpeechStarted(None, None))
        await trio.sleep(0.1)
        assert call.caller.clears == []
        assert link.truncates() == []
        assert call.bridge.stats.barge_ins == 0


@fail_after(60)
async def test_call_a_response_cut_before_its_first_audio_plays_none_of_it(autojump_clock: trio.testing.MockClock) -> None:
    """The caller speaks while the model prepares its answer: that response is over, its late audio is dropped."""
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.ResponseStarted("resp_1"))
        await trio.sleep(0.2)
        link.emit(pv.SpeechStarted("user_1", 100))  # before any audio of resp_1
        link.emit(pv.AudioDelta("item_1", audio(200), "resp_1"))  # in flight when the model cancelled it
        link.emit(pv.AudioDone("item_1"), pv.ResponseDone("resp_1", "cancelled", "turn_detected"))
        link.emit(pv.ResponseStarted("resp_2"), pv.AudioDelta("item_2", audio(120), "resp_2"), pv.AudioDone("item_2"))
        link.emit(pv.Transcript("assistant", "Hello there, how can I help", True, "item_1"))
        await trio.sleep(1.0)
        assert call.caller.received_audio == audio(120)  # only the next response
        assert call.caller.clears == []  # nothing was playing: no clear
        assert [(t.item_id, t.audio_end_ms) for t in link.truncates()] == [("item_1", 0)]  # the model: nothing heard
        assert call.bridge._generating == {}
        assert call.bridge.stats.barge_ins == 0
        [turn] = [t for t in call.bridge.stats.transcript.turns() if t.role == "assistant"]
        assert (turn.text, turn.interrupted, turn.heard_ms) == ("", True, 0)  # the record: nothing heard


@fail_after(60)
async def test_call_reply_latency_runs_from_speech_stopped_to_the_reply_s_first_chunk(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.AudioDelta("greeting", audio(80)), pv.AudioDone("greeting"))  # no stop before it: not a reply
        await trio.sleep(1.0)
        link.emit(pv.SpeechStarted(None, None), pv.SpeechStopped(None, None))
        await trio.sleep(0.7)  # the model thinks for 700 ms
        link.emit(pv.AudioDelta("reply_1", audio(200)), pv.AudioDone("reply_1"))
        await trio.sleep(1.0)
        # The caller speaks, stops, speaks again and stops: only the last stop counts.
        link.emit(pv.SpeechStarted(None, None), pv.SpeechStopped(None, None))
        await trio.sleep(0.3)
        link.emit(pv.SpeechStarted(None, None))
        await trio.sleep(0.5)
        link.emit(pv.SpeechStopped(None, None))
        await trio.sleep(1.25)
        link.emit(pv.AudioDelta("reply_2", audio(80)), pv.AudioDone("reply_2"))
        await call.caller.wait_for_audio(len(audio(80)) + len(audio(200)) + len(audio(80)))
        await trio.testing.wait_all_tasks_blocked()  # (reply_2's chunks are counted once their write is done)
        # A stop followed by more speech, and audio before the next stop: no reply to time.
        link.emit(pv.SpeechStopped(None, None), pv.SpeechStarted(None, None))
        await trio.sleep(0.4)
        link.emit(pv.AudioDelta("reply_3", audio(40)), pv.AudioDone("reply_3"))
        await call.caller.wait_for_audio(len(audio(80)) + len(audio(200)) + len(audio(80)) + len(audio(40)))
        await trio.testing.wait_all_tasks_blocked()
        reply = call.bridge.stats.reply
        assert reply.count == 2  # one sample per reply, not per chunk
        assert reply.total_s == pytest.approx(0.7 + 1.25, abs=EXACT)
        assert reply.cumulative()[:4] == [0, 0, 1, 1]  # 0.7 s at or below 0.75; 1.25 s above 1.0


@fail_after(60)
async def test_call_reply_latency_counts_on_through_a_cut_decided_after_the_caller_stopped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """AssemblyAI: the caller stops, then the server cuts its reply (speech_began False): the answer is still timed."""
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.ResponseStarted("r1"), pv.AudioDelta("r1", audio(2000), "r1"))
        await trio.sleep(0.5)
        link.emit(pv.SpeechStopped(None, None))
        await trio.sleep(0.1)
        link.emit(pv.SpeechStarted(None, None, speech_began=False), pv.AudioDone("r1"), pv.ResponseDone("r1", "interrupted", None))
        await trio.sleep(0.3)
        link.emit(pv.ResponseStarted("r2"), pv.AudioDelta("r2", audio(200), "r2"), pv.AudioDone("r2"))
        await trio.sleep(1.0)
        assert call.bridge.stats.barge_ins == 1 and call.bridge.stats.reply.count == 1
        assert call.bridge.stats.reply.max_s == pytest.approx(0.4, abs=0.01)  # the stop to r2's first chunk


@fail_after(60)
async def test_call_reply_latency_skips_a_reply_already_under_way_and_a_cancelled_response(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        # The caller talks while a tool's answer starts (after the barge-in, so it is not interrupted) ...
        link.emit(pv.SpeechStarted(None, None))
        await trio.sleep(0.2)
        link.emit(pv.AudioDelta("tool_answer", audio(400)))
        await trio.sleep(0.3)
        link.emit(pv.SpeechStopped(None, None))  # ... and stops: that answer was under way, not the reply
        await trio.sleep(0.2)
        link.emit(pv.AudioDelta("tool_answer", audio(400)), pv.AudioDone("tool_answer"))
        await trio.sleep(0.6)
        link.emit(pv.AudioDelta("reply", audio(80)), pv.AudioDone("reply"))
        await call.caller.wait_for_audio(len(audio(880)))
        await trio.testing.wait_all_tasks_blocked()  # (a chunk is counted once its write, marks and all, is done)
        assert call.bridge.stats.reply.count == 1
        assert call.bridge.stats.reply.total_s == pytest.approx(0.8, abs=EXACT)  # from the stop to "reply"
        # A stop whose response is cancelled leaves nothing to time: later audio is not its reply.
        link.emit(pv.SpeechStarted(None, None), pv.SpeechStopped(None, None))
        link.emit(pv.ResponseStarted("resp_x"), pv.ResponseDone("resp_x", "cancelled", "turn_detected"))
        await trio.sleep(2.0)
        link.emit(pv.AudioDelta("later", audio(80)), pv.AudioDone("later"))
        await call.caller.wait_for_audio(len(audio(960)))
        await trio.testing.wait_all_tasks_blocked()
        assert call.bridge.stats.reply.count == 1


# --------------------------------------------------------------------- uplink


@fail_after(60)
async def test_call_uplink_passes_ulaw_through(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        speech = to_ulaw(tone(700, 400))
        await call.caller.send_audio(speech)
        await trio.testing.wait_all_tasks_blocked()
        sends = [(t, c) for t, c in link.commands if isinstance(c, pv.SendAudio)]
        assert [c.payload for _, c in sends] == call.caller.sent_frames
        assert bytes(link.audio_in) == speech
        # Forwarded the moment each 20 ms frame arrived.
        assert [t - call.started_s for t, _ in sends] == pytest.approx([k * 0.02 for k in range(20)], abs=EXACT)


@fail_after(60)
async def test_call_uplink_decodes_and_resamples_for_pcm16(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink(input_format=pv.AudioFormat("pcm16", 16000))
    async with bridged(link) as call:
        await call.caller.send_audio(to_ulaw(tone(1000, 500)))
        await trio.testing.wait_all_tasks_blocked()
        assert len(link.audio_in) == 16 * 500 * 2
        pcm = pcm16(bytes(link.audio_in))
        assert dominant_frequency_hz(pcm[1600:], 16000) == pytest.approx(1000, abs=10)


# ------------------------------------------------------------------ call ends


@fail_after(60)
async def test_call_idle_timeout_ends_the_call(autojump_clock: trio.testing.MockClock) -> None:
    async with bridged(FakeLink(), idle_timeout_s=5.0) as call:
        await call.caller.send_silence(1000)  # 1 s of audio, the last frame at 0.98 s
        last_frame_s = trio.current_time()
        assert last_frame_s - call.started_s == pytest.approx(0.98, abs=EXACT)
        await call.done.wait()
        assert call.ended_s == pytest.approx(last_frame_s + 5.0, abs=EXACT)
        assert call.bridge.end_reason == "idle: nothing from Twilio for 5 s"
        await call.caller.closed.wait()


@fail_after(60)
async def test_call_a_caller_that_sends_but_reads_nothing_is_ended_by_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Its frames keep coming, so "nothing from Twilio" never fires; our writes wait for ever, the model session
    with them.  A write stuck for the idle timeout ends the call."""
    stuck = trio.Event()

    class Stalled(MemoryMessageStream):
        async def send(self, text: str) -> None:
            if stuck.is_set():
                await trio.sleep_forever()
            await super().send(text)

    stream, transport = memory_twilio_pair()
    stream = Stalled(stream._incoming, stream._outgoing)
    caller = FakeTwilioCaller()
    link = FakeLink()
    async with trio.open_nursery() as nursery, caller.attached(transport):
        twilio = TwilioStream()
        while twilio.start is None:
            twilio.receive_message(await stream.receive())
            list(twilio.events())
        bridge = CallBridge(stream, twilio, link, call_sid=caller.call_sid, idle_timeout_s=5.0)
        ended = trio.Event()

        async def run() -> None:
            await bridge.run()
            ended.set()

        async def talk() -> None:
            while True:
                await caller.send_silence(100)

        nursery.start_soon(run)
        nursery.start_soon(talk)
        await trio.sleep(1.0)
        stuck.set()
        stuck_s = trio.current_time()
        link.emit(pv.AudioDelta("item_1", audio(400)))
        with trio.fail_after(30):
            await ended.wait()
        assert bridge.end_reason == "idle: Twilio took none of our audio for 5 s (it is not reading)"
        assert stuck_s + 5.0 <= trio.current_time() <= stuck_s + 2 * 5.0 + EXACT
        nursery.cancel_scope.cancel()


@fail_after(120)
async def test_call_max_duration_ends_a_busy_call(autojump_clock: trio.testing.MockClock) -> None:
    async with bridged(FakeLink(), idle_timeout_s=1.0, max_call_s=10.01) as call, trio.open_nursery() as nursery:

        async def talk() -> None:
            while True:
                await call.caller.send_silence(200)

        nursery.start_soon(talk)
        await call.done.wait()
        nursery.cancel_scope.cancel()
        assert call.ended_s is not None
        assert call.ended_s - call.started_s == pytest.approx(10.01, abs=EXACT)
        assert call.bridge.end_reason == "maximum call length 10.01 s"
        assert call.bridge.stats.frames_in == 501  # frames at 0, 20, ... 10 000 ms


@fail_after(60)
async def test_call_stop_ends_the_call_at_once(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.AudioDelta("item_1", audio(2000)))  # the agent is mid-sentence
        await trio.sleep(0.3)
        await call.caller.stop()
        await call.done.wait()
        assert call.ended_s == pytest.approx(call.started_s + 0.3, abs=EXACT)
        assert call.bridge.end_reason == "twilio sent stop"
        assert call.stats is call.bridge.stats


@fail_after(60)
async def test_call_a_model_that_closes_after_its_goodbye_has_it_played_first(autojump_clock: trio.testing.MockClock) -> None:
    """A goodbye streamed faster than real time, then the model closes (ElevenLabs' end_call, a session limit):
    the caller hears all of it, then the call ends; their audio meanwhile goes nowhere and breaks nothing."""
    link = FakeLink()
    async with bridged(link) as call:
        await trio.sleep(0.2)
        goodbye = audio(3000) + audio(10, 0x66)  # (a part-chunk tail, never said done)
        link.emit(pv.ResponseStarted("resp_1"), pv.AudioDelta("item_1", goodbye))
        await trio.sleep(0.01)
        link.close("fake model went away")
        await call.caller.send_audio(audio(1000))  # the caller talks on while the goodbye plays
        await call.done.wait()
        assert call.caller.received_audio == goodbye
        assert call.ended_s == pytest.approx(call.started_s + 0.2 + 3.01, abs=0.05)  # once its last mark came back
        assert call.bridge.end_reason == "provider ended: fake model went away"
        assert len(link.audio_in) < 8 * 1000  # (what reached the model before it closed, not a second of it)
        await call.caller.closed.wait()


@fail_after(60)
@pytest.mark.parametrize("run", range(10))
async def test_call_the_goodbye_plays_out_whichever_task_finds_the_model_gone(
    run: int, autojump_clock: trio.testing.MockClock
) -> None:
    """A caller frame in the same step as the close: the uplink's send may find out before the provider reader
    (Trio's scheduling order varies, hence the runs); the goodbye plays out all the same."""
    link = FakeLink()
    async with bridged(link) as call:
        await call.caller.send_audio(audio(200))
        goodbye = audio(3000)
        link.emit(pv.ResponseStarted("resp_1"), pv.AudioDelta("item_1", goodbye))
        await trio.sleep(0.05)
        call.caller._transport._outgoing.send_nowait(call.caller.messages.media(audio(20)))  # type: ignore[union-attr]
        link.close("model went away")
        await call.done.wait()
        assert call.caller.received_audio == goodbye
        assert call.bridge.end_reason == "provider ended: model went away"


@fail_after(60)
async def test_call_a_send_that_meets_the_models_reset_first_still_ends_as_the_model_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The model streams its goodbye, closes (1000) and drops the socket; the uplink's next write fails before
    the reader gets there: the reader reads on to the close, the goodbye plays, and the call ends as the model's
    own close (completed), not as the failed write."""
    link = FakeLink()
    async with bridged(link) as call:
        await trio.sleep(0.2)
        link.emit(pv.ResponseStarted("resp_1"), pv.AudioDelta("item_1", audio(2000)))
        link.fail_sends("connection failed while sending")
        await call.caller.send_audio(audio(20))  # this frame's send finds out first
        await trio.sleep(0.5)  # (the reader is given up to PLAY_OUT_READ_S to get to the close)
        link.emit(pv.AudioDelta("item_1", audio(1000, 0x55)))  # what came before the close frame
        link.close("1000 bye", orderly=True)
        await call.done.wait()
        assert call.caller.received_audio == audio(2000) + audio(1000, 0x55)
        assert call.bridge.end_reason == "model closed: 1000 bye"


@fail_after(60)
@pytest.mark.parametrize("how", ["orderly", "broken"])
async def test_call_a_model_that_ends_the_session_or_breaks_the_protocol(
    how: str, autojump_clock: trio.testing.MockClock
) -> None:
    """A normal close is the model ending the call (not a failure; its goodbye plays); after a protocol error
    nothing more of it plays and the call ends at once."""
    link = FakeLink()
    async with bridged(link) as call:
        await trio.sleep(0.2)
        link.emit(pv.ResponseStarted("resp_1"), pv.AudioDelta("item_1", audio(3000)))
        await trio.sleep(0.01)
        link.close("bye", orderly=how == "orderly", broken=how == "broken")
        await call.done.wait()
        if how == "orderly":
            assert call.bridge.end_reason == "model closed: bye"
            assert call.caller.received_audio == audio(3000)
        else:
            assert call.bridge.end_reason == "provider ended: bye"
            assert call.ended_s == pytest.approx(call.started_s + 0.21, abs=EXACT)
            assert len(call.caller.received_audio) < len(audio(3000))


@fail_after(60)
async def test_call_provider_closing_ends_the_call(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        await trio.sleep(0.2)
        link.close("fake model went away")
        await call.done.wait()
        assert call.ended_s == pytest.approx(call.started_s + 0.2, abs=EXACT)
        assert call.bridge.end_reason == "provider ended: fake model went away"
        await call.caller.closed.wait()


@fail_after(60)
async def test_call_fatal_provider_error_ends_the_call(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.ProviderError("rate limited", fatal=False))
        await trio.sleep(0.1)
        assert not call.done.is_set()
        link.emit(pv.ProviderError("session.update rejected", fatal=True))
        await call.done.wait()
        assert call.bridge.end_reason == "provider error: session.update rejected"


@fail_after(60)
async def test_call_malformed_twilio_message_fails_the_call(autojump_clock: trio.testing.MockClock) -> None:
    async with bridged(FakeLink(), expect_error=True) as call:
        await call.caller.send_silence(100)
        await call.caller.send_raw('{"event": "media", "sequenceNumber": "9"')
        await call.done.wait()
    assert isinstance(call.error, ExceptionGroup)
    assert call.error.subgroup(RemoteProtocolError) is not None


@fail_after(60)
async def test_call_next_digits_returns_what_arrived_before_the_tool_times_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """next_digits' timeout as long as the tool's (both 10 s by default): the tool still answers with "12"."""

    @tool
    async def read_pin(call: CallContext) -> dict[str, str]:
        """Read a PIN."""
        return {"pin": await call.next_digits(4, timeout_s=10)}

    tools = ToolSet([read_pin])
    link = FakeLink()
    async with bridged(link, tools=tools, tool_timeout_s=10.0) as call:
        link.emit(pv.ToolCall("call_1", "read_pin", "{}"))
        await trio.sleep(0.5)
        await call.caller.dtmf("1")
        await call.caller.dtmf("2")  # and no more
        await trio.sleep(11)
        [(sent_s, result)] = [(t, c) for t, c in link.commands if isinstance(c, pv.ToolResult)]
        assert json.loads(result.output) == {"pin": "12"}
        assert sent_s - call.started_s == pytest.approx(10.0 - DIGITS_MARGIN_S, abs=0.01)


@fail_after(60)
async def test_call_transfer_keeps_time_for_its_request_when_the_goodbye_is_long(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A goodbye longer than the tool's time limit: the transfer still happens, within the limit."""

    class Rest:
        def __init__(self) -> None:
            self.updates: list[tuple[float, str, str]] = []
            self.timeouts: list[float | None] = []

        async def update_call(self, call_sid: str, *, twiml: str, timeout_s: float | None = None) -> None:
            self.timeouts.append(timeout_s)
            await trio.sleep(0.3)  # Twilio's answer
            self.updates.append((trio.current_time(), call_sid, twiml))

    rest = Rest()
    link = FakeLink()
    async with bridged(link, tools=ToolSet([transfer_out]), tool_timeout_s=10.0, rest=rest) as call:
        link.emit(pv.AudioDelta("item_1", audio(12_000)))  # a 12 s goodbye, still arriving
        link.emit(pv.ToolCall("call_1", "transfer_out", "{}"))
        await call.done.wait()
        [(at_s, sid, twiml)] = rest.updates
        assert at_s - call.started_s == pytest.approx(10.0 - TRANSFER_REQUEST_S + 0.3, abs=0.01)
        assert sid == call.bridge.call_sid and "+15551234567" in twiml
        assert rest.timeouts == [pytest.approx(TRANSFER_REQUEST_S)]  # what is left of the tool's time, not 15 s
        [result] = [c for _, c in link.commands if isinstance(c, pv.ToolResult)]
        assert result.output == "transferred"
        assert call.bridge.end_reason == "transferred to +15551234567"


@fail_after(60)
@pytest.mark.parametrize("ending", ["stop", "max_call"])
async def test_call_a_transfer_still_awaiting_twilio_does_not_hold_the_ending_call_open(
    autojump_clock: trio.testing.MockClock, ending: str,
) -> None:
    """The transfer makes Twilio stop the stream; if its REST answer is slow, the call still ends (and its model
    socket closes) within TRANSFER_GRACE_S, not when the answer comes 10 s later."""
    asked = trio.Event()

    class Rest:
        async def update_call(self, call_sid: str, *, twiml: str, timeout_s: float | None = None) -> None:
            asked.set()
            await trio.sleep(10)  # Twilio slow to answer

    link = FakeLink()
    options: dict[str, Any] = {"max_call_s": 3.0} if ending == "max_call" else {}
    async with bridged(link, tools=ToolSet([transfer_out]), tool_timeout_s=30.0, rest=Rest(), **options) as call:
        link.emit(pv.ToolCall("c1", "transfer_out", "{}"))
        await asked.wait()
        if ending == "stop":
            await trio.sleep(0.5)
            await call.caller.stop()
        ending_s = trio.current_time() if ending == "stop" else call.started_s + 3.0
        await call.done.wait()
        assert call.ended_s is not None and call.ended_s - ending_s == pytest.approx(TRANSFER_GRACE_S, abs=0.01)
        assert call.bridge.end_reason == ("twilio sent stop" if ending == "stop" else "maximum call length 3 s")


@fail_after(60)
async def test_call_a_transfer_asked_for_as_the_call_ends_is_not_made(autojump_clock: trio.testing.MockClock) -> None:
    """A transfer whose tool starts in a call already ending (its nursery cancelled, nothing playing, so the goodbye
    waits return at once): Twilio is asked nothing."""
    rest = RecordingRest(delay_s=10)
    link = FakeLink()
    async with bridged(link, rest=rest) as call:
        link.emit(pv.ResponseStarted("resp_1"), pv.ResponseDone("resp_1", "completed", None))  # (framed, quiet)
        await trio.sleep(0.5)
        nursery = call.bridge._nursery
        assert nursery is not None
        ending_s = trio.current_time()
        call.bridge._end("provider error: boom")  # the call ends; a tool task of the same batch starts after that
        nursery.start_soon(call.bridge.transfer, "+15551234567")
        await call.done.wait()
        assert rest.updates == []
        assert call.ended_s == pytest.approx(ending_s)


@fail_after(60)
async def test_call_a_transfer_whose_request_is_out_as_the_call_ends_gets_the_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The tool reached Twilio first, then the call ended (a fatal error read next): TRANSFER_GRACE_S, not 10 s."""
    rest = RecordingRest(delay_s=10)
    link = FakeLink()
    async with bridged(link, tools=ToolSet([transfer_out]), tool_timeout_s=30.0, rest=rest) as call:
        link.emit(pv.ResponseStarted("resp_1"), pv.ResponseDone("resp_1", "completed", None))
        await trio.sleep(0.5)
        link.emit(pv.ToolCall("c1", "transfer_out", "{}"))
        while not rest.updates:
            await trio.sleep(0.01)
        ending_s = trio.current_time()
        link.emit(pv.ProviderError("boom", fatal=True))
        await call.done.wait()
        assert call.ended_s is not None and call.ended_s - ending_s == pytest.approx(TRANSFER_GRACE_S, abs=1e-6)
        assert call.bridge.end_reason == "provider error: boom"


@fail_after(60)
async def test_call_a_tool_call_the_model_withdraws_is_stopped_and_never_acted_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Gemini's toolCallCancellation, Deepgram's FunctionCallCancelled: the tool stops, no answer, no transfer."""

    @tool
    async def slow() -> str:
        """Takes a while."""
        await trio.sleep(5)
        return "done"

    rest = RecordingRest()
    link = FakeLink()
    async with bridged(link, tools=ToolSet([slow, transfer_out]), rest=rest) as call:
        link.emit(pv.AudioDelta("item_1", audio(2000)))  # the agent still talking: the transfer waits for it
        link.emit(pv.ToolCall("call_1", "slow", "{}"), pv.ToolCall("call_2", "transfer_out", "{}"))
        link.emit(pv.ToolCall("call_3", "slow", "{}"))
        await trio.sleep(0.5)
        link.emit(pv.ToolCallsCancelled(("call_1", "call_2", "call_unknown")))
        await trio.sleep(10)
        assert call.bridge.end_reason == "running" and rest.updates == []
        assert [c for _, c in link.commands if isinstance(c, pv.ToolResult)] == [pv.ToolResult("call_3", "done")]
        assert call.bridge.stats.tool_calls == ["slow", "transfer_out", "slow"]


@fail_after(60)
@pytest.mark.parametrize("withdrawn", ["call_end", "call_other"])
async def test_call_an_end_call_the_model_withdraws_while_its_goodbye_plays_does_not_hang_up(
    withdrawn: str, autojump_clock: trio.testing.MockClock
) -> None:
    """end_call returns at once and hangs up after the goodbye: withdrawing it then (Deepgram's speculative
    dispatch, a barge-in on the goodbye) keeps the caller on the line; withdrawing another call does not."""
    link = FakeLink()
    async with bridged(link, tools=ToolSet([BUILTINS["end_call"]])) as call:
        link.emit(pv.AudioDelta("item_1", audio(2000)))  # the goodbye, 2 s of it
        link.emit(pv.ToolCall("call_end", "end_call", '{"reason": "bye"}'))
        await trio.sleep(0.5)
        assert [c for _, c in link.commands if isinstance(c, pv.ToolResult)]  # (answered at once)
        link.emit(pv.ToolCallsCancelled((withdrawn,)))
        await trio.sleep(5)
        if withdrawn == "call_end":
            assert call.bridge.end_reason == "running"
            # a later end_call still works
            link.emit(pv.ToolCall("call_end_2", "end_call", '{"reason": "really"}'))
            await call.done.wait()
            assert call.bridge.end_reason == "agent hung up: really"
        else:
            await call.done.wait()
            assert call.bridge.end_reason == "agent hung up: bye"


@fail_after(60)
@pytest.mark.parametrize("by_caller", [True, False])
async def test_call_a_caller_who_speaks_over_the_goodbye_is_not_hung_up_on(
    by_caller: bool, autojump_clock: trio.testing.MockClock
) -> None:
    """OpenAI's response (goodbye and end_call) is done long before the goodbye has played, so no provider withdraws
    the call: a barge-in on the goodbye keeps the caller on the line ("wait, one more thing").  The model cutting
    its own reply (the pcm protocol's clear) is not the caller speaking: the hang-up goes on."""
    link = FakeLink()
    async with bridged(link, tools=ToolSet([BUILTINS["end_call"]])) as call:
        link.emit(
            pv.ResponseStarted("resp_1"),
            pv.AudioDelta("item_1", audio(2000), "resp_1"),  # the goodbye, 2 s of it, all here at once
            pv.ToolCall("call_end", "end_call", '{"reason": "bye"}', response_id="resp_1"),
            pv.AudioDone("item_1", "resp_1"),
            pv.ResponseDone("resp_1", "completed", None),
        )
        await trio.sleep(0.5)
        link.emit(pv.SpeechStarted("user_1", 900, by_caller=by_caller))
        await call.caller.wait_for_clear()
        await trio.sleep(5)
        if not by_caller:
            await call.done.wait()
            assert call.bridge.end_reason == "agent hung up: bye"
            return
        assert call.bridge.end_reason == "running" and call.bridge.stats.barge_ins == 1
        # the model can still end the call, and then the goodbye plays out
        link.emit(pv.AudioDelta("item_2", audio(400)), pv.ToolCall("call_end_2", "end_call", '{"reason": "really"}'))
        await call.done.wait()
        assert call.bridge.end_reason == "agent hung up: really"
        assert call.ended_s is not None and call.ended_s - call.started_s >= 5.5 + 0.4 - EXACT


@fail_after(60)
async def test_call_a_failed_response_says_why_in_the_log(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenAI fails a response (quota, rate limit) with a response.done and no error event: the caller hears
    nothing, so the log must say why."""
    link = FakeLink()
    with caplog.at_level(logging.WARNING, logger="mediaserver"):
        async with bridged(link) as call:
            link.emit(pv.ResponseStarted("resp_1"), pv.ResponseDone("resp_1", "failed", None, "You exceeded your quota."))
            await trio.sleep(0.5)
            assert call.bridge.end_reason == "running"  # (not fatal: the next turn may work)
    [line] = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert "the model's response failed: You exceeded your quota." in line and call.caller.call_sid in line


@fail_after(60)
async def test_call_a_caller_who_speaks_over_a_transfers_announcement_is_not_transferred(
    autojump_clock: trio.testing.MockClock,
) -> None:
    rest = RecordingRest()
    link = FakeLink()
    async with bridged(link, tools=ToolSet([transfer_out]), tool_timeout_s=30.0, rest=rest) as call:
        link.emit(pv.AudioDelta("item_1", audio(3000)), pv.ToolCall("call_1", "transfer_out", "{}"))
        await trio.sleep(1.0)
        link.emit(pv.SpeechStarted("user_1", 900))
        await trio.sleep(5)
        assert rest.updates == [] and call.bridge.end_reason == "running"
        [result] = [c for _, c in link.commands if isinstance(c, pv.ToolResult)]
        assert "it was not made" in result.output and "+15551234567" in result.output
        assert result.respond is False  # the caller is talking: their turn brings the next response
        assert call.bridge._spoken_over == set()
        # asked again, once the caller is done, it goes through
        link.emit(pv.ToolCall("call_2", "transfer_out", "{}"))
        await call.done.wait()
        assert len(rest.updates) == 1 and call.bridge.end_reason == "transferred to +15551234567"


@fail_after(60)
async def test_call_a_withdrawn_last_call_of_a_response_leaves_no_owed_answer_behind(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @tool
    async def slow(seconds: float) -> str:
        """Takes a while."""
        await trio.sleep(seconds)
        return "done"

    link = FakeLink()
    async with bridged(link, tools=ToolSet([slow])) as call:
        for n in range(50):  # a fast call answered (its answer owed to the end of the response), the slow one withdrawn
            link.emit(
                pv.ToolCall(f"fast_{n}", "slow", '{"seconds": 0.1}', response_id=f"resp_{n}"),
                pv.ToolCall(f"slow_{n}", "slow", '{"seconds": 5}', response_id=f"resp_{n}"),
            )
            await trio.sleep(0.5)
            link.emit(pv.ToolCallsCancelled((f"slow_{n}",)))
            await trio.sleep(0.1)
        assert call.bridge._answer_owed == set() and call.bridge._tool_groups == {}
        results = [c for _, c in link.commands if isinstance(c, pv.ToolResult)]
        assert [r.call_id for r in results] == [f"fast_{n}" for n in range(50)]


@fail_after(60)
async def test_call_parallel_tool_calls_ask_for_one_answer_with_the_last_result(
    autojump_clock: trio.testing.MockClock,
) -> None:
    @tool
    async def slow(seconds: float) -> str:
        """Takes a while."""
        await trio.sleep(seconds)
        return f"after {seconds:g} s"

    link = FakeLink()
    async with bridged(link, tools=ToolSet([slow])) as call:
        link.emit(
            pv.ToolCall("call_1", "slow", '{"seconds": 2}', response_id="resp_1"),
            pv.ToolCall("call_2", "slow", '{"seconds": 1}', response_id="resp_1"),
            pv.ToolCall("call_3", "slow", '{"seconds": 3}', response_id="resp_1"),
            pv.ToolCall("call_4", "slow", '{"seconds": 1.5}', response_id="resp_2"),  # another response's: its own
        )
        await trio.sleep(4)
        results = [(t - call.started_s, c) for t, c in link.commands if isinstance(c, pv.ToolResult)]
        assert results == [
            (pytest.approx(1), pv.ToolResult("call_2", "after 1 s", respond=False)),
            (pytest.approx(1.5), pv.ToolResult("call_4", "after 1.5 s", respond=True)),
            (pytest.approx(2), pv.ToolResult("call_1", "after 2 s", respond=False)),
            (pytest.approx(3), pv.ToolResult("call_3", "after 3 s", respond=True)),  # the last: one answer for all
        ]
        link.emit(pv.ToolCall("call_5", "slow", '{"seconds": 1}'))  # no response id: it asks for its answer itself
        await trio.sleep(2)
        assert [c for _, c in link.commands if isinstance(c, pv.ToolResult)][-1].respond


@fail_after(60)
async def test_call_transcript_orders_the_callers_turn_from_their_speech_start(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        await trio.sleep(1)
        link.emit(pv.SpeechStarted(item_id="u1", audio_start_ms=900))
        await trio.sleep(1)
        link.emit(pv.Transcript("assistant", "Sure.", True, "a1"))
        await trio.sleep(1)
        link.emit(pv.Transcript("user", "Can you help?", True, "u1"))  # transcribed after the reply
        await trio.sleep(0.1)
        turns = call.bridge.stats.transcript.turns()
        assert [(t.role, t.text) for t in turns] == [("user", "Can you help?"), ("assistant", "Sure.")]
        assert turns[0].offset_s == pytest.approx(1.0, abs=0.01)


@fail_after(60)
async def test_call_an_earlier_responses_late_end_does_not_end_the_current_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """(Gemini, after a connection switch, ends the cut turn when the next may have begun.)"""
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.ResponseStarted("turn-1"), pv.ResponseStarted("turn-2"))
        link.emit(pv.ResponseDone("turn-1", "cancelled", "reconnected"))
        await trio.sleep(0.1)
        assert not await call.bridge.wait_played(0.5)  # turn 2 is still open
        link.emit(pv.ResponseDone("turn-2", "completed", None))
        await trio.sleep(0.1)
        assert await call.bridge.wait_played(0.5)


@fail_after(60)
async def test_call_tool_calls_are_answered(autojump_clock: trio.testing.MockClock) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.ToolCall("call_1", "lookup", "{}"))
        await trio.testing.wait_all_tasks_blocked()
        assert [c for _, c in link.commands if isinstance(c, pv.ToolResult)] == [
            pv.ToolResult("call_1", '{"error": "no tools are configured"}')
        ]
        assert not call.done.is_set()
