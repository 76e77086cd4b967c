"""End-to-end tests of provider ``gemini``: the real server, a fake Twilio caller, a fake Gemini Live server.

The model is :class:`tests.gemini_fake.FakeGeminiServer`, which validates every
message our server sends with the ``google-genai`` SDK's ``LiveClientMessage``
and answers with SDK-built ``LiveServerMessage``s.  Real loopback sockets, so
Trio's real clock; every test has an absolute Trio-time limit.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import trio

from mediaserver.config import ConfigError, Settings

from tests.fakes import (
    FakeTwilioCaller,
    LoopLag,
    band_energy_ratio,
    dominant_frequency_hz,
    fail_after,
    from_ulaw,
    pcm16,
    to_ulaw,
    tone,
)
from tests.gemini_fake import FakeGeminiServer, FakeGeminiSession, GeminiScript
from tests.test_app import CALL_A, base_settings, call_log, keep_talking, phone_call, running

API_KEY = "test"


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mediaserver")


def gemini_settings(server: FakeGeminiServer, **changes: Any) -> Settings:
    return base_settings(provider="gemini", gemini_api_key=API_KEY, gemini_live_url=server.url, **changes)


@asynccontextmanager
async def fake_gemini(script: GeminiScript | None = None, **options: Any) -> AsyncIterator[FakeGeminiServer]:
    async with trio.open_nursery() as nursery:
        server: FakeGeminiServer = await nursery.start(FakeGeminiServer(script, **options).run)
        yield server
        nursery.cancel_scope.cancel()


def rms(x: npt.NDArray[np.int16]) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def db(ratio: float) -> float:
    return float(20 * np.log10(ratio))


def max_step(x: npt.NDArray[np.int16]) -> int:
    return int(np.max(np.abs(np.diff(x.astype(np.int64)))))


def high_band_share(x: npt.NDArray[np.int16], rate_hz: int, above_hz: float) -> float:
    """Share of the energy above ``above_hz`` (clicks at frame boundaries are broadband)."""
    power = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / rate_hz)
    return float(power[freqs > above_hz].sum() / power[1:].sum())


def continuous_tone(freq_hz: float, start_sample: int, n: int, rate_hz: int, amplitude: float) -> bytes:
    """Samples ``start_sample .. start_sample + n`` of one phase-continuous sine, PCM16 LE."""
    t = (np.arange(n) + start_sample) / rate_hz
    return np.round(amplitude * 32767 * np.sin(2 * np.pi * freq_hz * t)).astype("<i2").tobytes()


async def talk_until(caller: FakeTwilioCaller, done: trio.Event) -> None:
    """Paced 20 ms frames of silence until ``done``; never cancelled mid-frame, so every
    numbered frame is really sent (a skipped number would make the bridge conceal a gap)."""
    while not done.is_set():
        await caller.send_silence(20)


def playback_gaps_s(caller: FakeTwilioCaller) -> list[float]:
    """Where Twilio's playback buffer ran dry between the first and the last chunk received."""
    gaps = []
    end = None
    for media in caller.received:
        if end is not None and media.at_s > end:
            gaps.append(media.at_s - end)
        end = max(end if end is not None else media.at_s, media.at_s) + len(media.payload) / 8000
    return gaps


# ------------------------------------------------------------------ audio path


@fail_after(20)
async def test_gemini_sample_rates_levels_and_no_clicks_both_ways() -> None:
    amplitude = 0.3
    reply = tone(440, 1000, 24000, amplitude=amplitude).tobytes()
    started = trio.Event()

    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        await session.wait_audio_ms(1200)  # the caller's whole tone has arrived
        await session.model_audio(reply, chunk_bytes=4802)  # chunks not aligned to anything
        await session.finish_turn()
        started.set()

    async with fake_gemini(script) as model, running(gemini_settings(model, agent_greeting="Hello!")) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(100, paced=False)
            await caller.send_audio(to_ulaw(tone(1000, 1000, amplitude=amplitude)), paced=False)
            await caller.send_silence(100, paced=False)
            await started.wait()
            await caller.wait_for_audio(7900)
            await caller.wait_quiet(0.2)
            await caller.stop()
        session = await model.session(0)
        await session.closed.wait()

    assert caller.errors == []
    assert session.api_key == API_KEY
    assert session.path is not None and session.path.endswith("GenerativeService.BidiGenerateContent")
    assert session.setup is not None and session.setup.model == "models/gemini-3.8-live"
    [greeting] = session.client_contents  # the greeting turn, after setupComplete
    assert greeting.turns is not None and "Hello!" in str(greeting.turns[0].parts)

    # Uplink: µ-law 8 kHz became PCM16 16 kHz, 1 kHz tone still at 1 kHz, no sample lost or added.
    uplink = pcm16(bytes(session.audio_in))
    assert len(uplink) == 16 * 1200
    middle = uplink[16 * 300 : 16 * 1000]  # 200..900 ms of the tone: the resampler has settled
    assert dominant_frequency_hz(middle, 16000) == pytest.approx(1000, abs=5)
    assert band_energy_ratio(middle, 16000, 1000) > 0.98
    sent = from_ulaw(to_ulaw(tone(1000, 1000, amplitude=amplitude)))  # what the phone line carried
    assert abs(db(rms(middle) / rms(sent[1600:7200]))) < 0.5
    ideal_step = amplitude * 32767 * 2 * np.pi * 1000 / 16000
    assert max_step(middle) < 1.25 * ideal_step  # no clicks at 20 ms frame boundaries
    assert high_band_share(middle, 16000, 3000) < 1e-3

    # Downlink: PCM16 24 kHz became µ-law 8 kHz, 440 Hz tone still at 440 Hz, same level.
    downlink = from_ulaw(caller.received_audio)
    assert 0 <= len(downlink) - 8000 <= 20  # and the resampler's delay (19 samples): its tail plays with the turn
    settled = downlink[1600:6400]
    assert dominant_frequency_hz(settled, 8000) == pytest.approx(440, abs=5)
    assert band_energy_ratio(settled, 8000, 440) > 0.98
    assert abs(db(rms(settled) / (amplitude * 32767 / np.sqrt(2)))) < 0.5
    ideal_step = amplitude * 32767 * 2 * np.pi * 440 / 8000
    assert max_step(settled) < 1.25 * ideal_step  # no clicks at model chunk or 40 ms boundaries
    assert high_band_share(settled, 8000, 2000) < 2e-3


# ------------------------------------------------------------------ barge-in


@fail_after(20)
async def test_gemini_interrupted_clears_and_drops_the_rest_of_the_turn(caplog: pytest.LogCaptureFixture) -> None:
    first = tone(440, 3000, 24000, amplitude=0.3).tobytes()
    fresh = tone(880, 400, 24000, amplitude=0.3).tobytes()
    go = trio.Event()

    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        await session.model_audio(first)  # 3 s, faster than real time, as Gemini does
        await go.wait()
        await session.interrupted()
        await session.content(turn_complete=True)
        await session.model_audio(fresh)
        await session.finish_turn()

    async with fake_gemini(script) as model, running(gemini_settings(model)) as url, phone_call(url) as caller:
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            await caller.wait_for(lambda: len(caller.echoes) >= 10)  # about 400 ms played
            go.set()
            clear = await caller.wait_for_clear()
            await caller.wait_for(lambda: len(from_ulaw(b"".join(m.payload for m in caller.received if m.at_s > clear.at_s))) >= 3180)
            await caller.wait_quiet(0.2)
            nursery.cancel_scope.cancel()
        await caller.stop()

    assert caller.errors == []
    assert len(caller.clears) == 1
    before = from_ulaw(b"".join(m.payload for m in caller.received if m.at_s <= clear.at_s))
    after = from_ulaw(b"".join(m.payload for m in caller.received if m.at_s > clear.at_s))
    assert len(before) < 8000 * 3 // 2  # most of the interrupted turn was never sent to the caller
    assert 0 <= len(after) - 3200 <= 20  # only the fresh turn after the clear ...
    assert dominant_frequency_hz(after[400:2800], 8000) == pytest.approx(880, abs=10)  # ... and it is the new one
    assert band_energy_ratio(after[400:2800], 8000, 440, 50) < 0.01  # no 440 Hz left over
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "barge-ins 1;" in ended


# ------------------------------------------------------------------ resumption


@fail_after(20)
async def test_gemini_call_across_go_away_keeps_audio_continuous() -> None:
    rate, amplitude = 24000, 0.3
    part_samples = rate * 800 // 1000  # 800 ms per connection
    handles: list[str] = []

    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        if session.number == 1:
            await session.wait_audio_ms(300)
            await session.model_audio(continuous_tone(440, 0, part_samples, rate, amplitude), chunk_bytes=4800)
            await session.finish_turn()
            handles.append(await session.resumption_update())
            await session.go_away("10s")
            # Keep the old connection open (as the service does until timeLeft runs
            # out); the client must close it once the new one is ready.
        else:
            await session.model_audio(continuous_tone(440, part_samples, part_samples, rate, amplitude), chunk_bytes=4800)
            await session.finish_turn()

    # The resumed setup takes 300 ms to answer: caller audio meanwhile must be held, not lost.
    lag = LoopLag()
    async with fake_gemini(script, resume_delay_s=0.3) as model, running(gemini_settings(model)) as url, \
            phone_call(url) as caller, trio.open_nursery() as watching:
        watching.start_soon(lag.run)
        switched = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(talk_until, caller, switched)  # the caller talks through the switch
            second = await model.session(1)
            first = await model.session(0)
            await second.ready.wait()
            await first.closed.wait()
            switched.set()
        # ... and keeps talking after it.
        await caller.send_audio(to_ulaw(tone(1000, 400, amplitude=0.3)))
        sent = 4 * sum(len(frame) for frame in caller.sent_frames)  # µ-law 8k bytes -> PCM16 16k bytes
        await caller.wait_for_audio(2 * 8 * 800 - 32)
        await caller.wait_quiet(0.2)
        await second.wait_for(lambda: len(first.audio_in) + len(second.audio_in) >= sent)
        await caller.stop()
        await second.closed.wait()
        watching.cancel_scope.cancel()

    assert caller.errors == []
    assert len(model.sessions) == 2
    assert second.resumed_with == handles[0]  # the second connection carries the handle
    assert first.resumed_with is None
    assert first.close_code == 1000  # the first socket was closed by us (close handshake) ...
    assert first.closed_at_s is not None and second.closed_at_s is not None
    assert first.closed_at_s < second.closed_at_s  # ... during the call, not at its end
    assert second.client_contents == []  # no second greeting
    # Uplink: every sample the caller sent reached the model, across both connections, none twice.
    assert len(first.audio_in) + len(second.audio_in) == sent
    assert len(second.audio_in) >= 32 * 400
    tail = pcm16(bytes(second.audio_in))[-16 * 300 : -16 * 50]
    assert dominant_frequency_hz(tail, 16000) == pytest.approx(1000, abs=5)
    # Downlink: one continuous 440 Hz tone at the caller, no gap in playback, no click at the switch.
    downlink = from_ulaw(caller.received_audio)
    assert 0 <= len(downlink) - 2 * 8 * 800 <= 40  # two turns, each with the resampler's tail (19 samples)
    assert [gap for gap in playback_gaps_s(caller) if gap > lag.longest_s] == []  # (none, but where the machine stalled)
    settled = downlink[800:-800]
    assert dominant_frequency_hz(settled, 8000) == pytest.approx(440, abs=5)
    assert band_energy_ratio(settled, 8000, 440) > 0.98
    assert max_step(settled) < 1.25 * amplitude * 32767 * 2 * np.pi * 440 / 8000
    assert high_band_share(settled, 8000, 2000) < 2e-3


@fail_after(20)
async def test_gemini_unexpected_close_after_a_handle_resumes() -> None:
    # The caller pauses while the server closes: audio in flight when a server closes is lost on any real
    # socket (the fake, like Gemini, drops what it reads after its close), so the figures below are exact
    # only when none is.  Everything sent after the close must reach the new connection, once.
    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        if session.number == 1:
            await session.resumption_update()
            await session.wait_audio_ms(200)
            await session.close(1011, "Internal error")

    async with fake_gemini(script, resume_delay_s=0.2) as model, running(gemini_settings(model)) as url, phone_call(url) as caller:
        await caller.send_silence(200)
        second = await model.session(1)  # the server saw the close: what the caller says now waits for it
        first = model.sessions[0]
        await caller.send_silence(400)
        await second.wait_for(lambda: len(second.audio_in) >= 32 * 400)
        await caller.stop()
        await second.closed.wait()
    assert caller.errors == []
    assert second.resumed_with is not None and second.resumed_with.startswith("handle-1-")
    assert (len(first.audio_in), len(second.audio_in)) == (32 * 200, 32 * 400)


@fail_after(20)
async def test_gemini_close_without_a_handle_ends_the_call(caplog: pytest.LogCaptureFixture) -> None:
    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        await session.wait_audio_ms(100)
        await session.close(1011, "Deadline expired before operation could complete.")

    async with fake_gemini(script) as model, running(gemini_settings(model)) as url, phone_call(url) as caller:
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            await caller.closed.wait()  # the server hangs up
            nursery.cancel_scope.cancel()
    assert len(model.sessions) == 1
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "1011" in ended and "Deadline expired" in ended


@fail_after(20)
async def test_gemini_a_normal_close_without_a_handle_is_the_model_ending_the_call(caplog: pytest.LogCaptureFixture) -> None:
    """As for every provider: its reply plays out, and the call is completed (1000), not failed."""
    reply = tone(440, 1000, 24000, amplitude=0.3).tobytes()

    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        await session.wait_audio_ms(200)
        await session.model_audio(reply)
        await session.close(1000, "session over")

    async with fake_gemini(script) as model, running(gemini_settings(model)) as url, phone_call(url) as caller:
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            await caller.closed.wait()
            nursery.cancel_scope.cancel()
    assert caller.close_code == 1000
    assert len(caller.received_audio) >= 7900  # the whole second of reply (8000 samples, less the filter's edge)
    [ended] = [r for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert ended.levelno == logging.INFO
    assert " ended (model closed: gemini connection closed: 1000 NORMAL_CLOSURE session over)" in ended.getMessage()


@fail_after(20)
async def test_gemini_refused_resumption_ends_the_call_and_closes_both_sockets(caplog: pytest.LogCaptureFixture) -> None:
    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        if session.number == 1:
            await session.resumption_update()
            session.server.issued_handles.clear()  # the handle has expired
            await session.go_away("5s")

    async with fake_gemini(script) as model, running(gemini_settings(model)) as url, phone_call(url) as caller:
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            await caller.closed.wait()  # the server hangs up
            nursery.cancel_scope.cancel()
        first, second = model.sessions
        with trio.fail_after(1):
            await first.closed.wait()
            await second.closed.wait()
    assert second.close_code == 1007
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "gemini: resumption failed: gemini connection closed: 1007" in ended
    assert "Invalid session resumption handle" in ended


@fail_after(20)
async def test_gemini_malformed_message_ends_the_call_without_resuming(caplog: pytest.LogCaptureFixture) -> None:
    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        await session.resumption_update()
        await session.wait_audio_ms(100)
        await session.ws.send_message(b'{"serverContent": {"interrupted": "yes"}}')  # deliberately invalid

    async with fake_gemini(script) as model, running(gemini_settings(model)) as url, phone_call(url) as caller:
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            await caller.closed.wait()
            nursery.cancel_scope.cancel()
        with trio.fail_after(1):
            await model.sessions[0].closed.wait()
    assert len(model.sessions) == 1
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "gemini protocol error" in ended and "interrupted" in ended


@fail_after(20)
async def test_gemini_refused_setup_hangs_up_the_call(caplog: pytest.LogCaptureFixture) -> None:
    refusal = (1007, "Request contains an invalid argument.")
    async with fake_gemini(refuse_setup=refusal) as model, running(gemini_settings(model)) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(100)
            await caller.closed.wait()  # hung up: there is no model session
        with trio.fail_after(1):
            await model.sessions[0].closed.wait()
    assert model.sessions[0].close_code == 1007
    messages = [r.getMessage() for r in call_log(caplog, CALL_A)]
    assert any("gemini connection closed: 1007" in m and "invalid argument" in m for m in messages), messages


# ------------------------------------------------------------------ tools, teardown, config


@fail_after(10)
async def test_gemini_tool_call_is_answered_with_id_and_name() -> None:
    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        await session.tool_call("call-7", "lookup", {"q": "x"})

    async with fake_gemini(script) as model, running(gemini_settings(model)) as url, phone_call(url) as caller:
        await caller.send_silence(100)
        session = await model.session(0)
        await session.wait_for(lambda: bool(session.tool_responses))
        await caller.stop()
    [response] = session.tool_responses
    assert response.function_responses is not None
    [answer] = response.function_responses
    assert answer.id == "call-7" and answer.name == "lookup"
    assert answer.response is not None and set(answer.response) == {"error"}


@fail_after(10)
async def test_gemini_stop_closes_the_model_socket_within_a_second() -> None:
    async with fake_gemini() as model, running(gemini_settings(model)) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(200)
            session = await model.session(0)
            await session.wait_audio_ms(100)
            await caller.stop()
            await session.closed.wait()
            assert caller.stopped_at_s is not None and session.closed_at_s is not None
            assert session.closed_at_s - caller.stopped_at_s < 1.0
            assert session.close_code == 1000


def test_gemini_needs_its_api_key() -> None:
    with pytest.raises(ConfigError, match="GEMINI_API_KEY"):
        Settings.from_env({"MEDIASERVER_PROVIDER": "gemini"})
    settings = Settings.from_env({"MEDIASERVER_PROVIDER": "gemini", "GEMINI_API_KEY": "k"})
    assert settings.gemini_api_key == "k"


@pytest.mark.parametrize("frozen", [False, True])
@fail_after(15)
async def test_gemini_liveness_pings_watch_a_bridged_connection_not_a_pre_opened_one(
    frozen: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Gemini's own reader reads each connection as soon as it opens, and waits for the bridge with an event in
    hand: until the stream comes, a pong would go unread.  Once bridged, a frozen connection is found."""
    from tests.fakes import answer_call, open_ws_client
    from tests.test_app import Relay

    async with fake_gemini() as model, trio.open_nursery() as nursery:
        relay = Relay(model.port or 0)
        await nursery.start(relay.run)
        model.port = relay.port
        async with running(gemini_settings(model, model_ping_s=0.3)) as url:
            twiml = await answer_call(url, CALL_A)
            await trio.sleep(2.0)  # the stream comes late: three quiet windows and their pings, unread
            caller = FakeTwilioCaller(call_sid=CALL_A, custom_parameters=dict(twiml.parameters))
            async with open_ws_client(twiml.stream_url, []) as ws, caller.attached(ws):
                async with trio.open_nursery() as talking:
                    await talking.start(keep_talking, caller)
                    await trio.sleep(1.0)
                    assert not caller.closed.is_set()
                    if frozen:
                        relay.freeze()
                        with trio.fail_after(0.3 * 3 + 3.0):
                            await caller.closed.wait()
                    talking.cancel_scope.cancel()
                if not frozen:
                    await caller.stop()
        nursery.cancel_scope.cancel()
    ended = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    if frozen:
        assert "nor answered a ping" in ended[0], ended
    else:
        assert not any("nor answered" in r.getMessage() for r in caplog.records)
