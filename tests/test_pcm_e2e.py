"""End-to-end: phone calls through the real server to a fake model on the generic ``pcm`` protocol.

The sample-rate proof covers every PCM path: input and output rates are
each 8000, 16000 and 24000 Hz.  A 1 kHz tone from the caller (µ-law 8 kHz)
must reach the model as 1 kHz PCM16 at the input rate, and a 440 Hz tone
from the model at its output rate must reach the caller as 440 Hz, both at
the same level (RMS within 0.5 dB, measured well inside the tone so the
resampler's delay and edges are excluded) and without clicks (the largest
sample-to-sample step stays within what the sine itself can make, and
almost all energy stays in the tone's band).
"""

from __future__ import annotations

import logging
from functools import partial
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import trio

from mediaserver.codec import Resampler, ulaw_decode

from mediaserver.config import ConfigError, Settings

from tests.fakes import band_energy_ratio, dominant_frequency_hz, fail_after, from_ulaw, pcm16, to_ulaw, tone
from tests.pcm_fake import FakePcmModel, PcmModelSession, Script
from mediaserver.records.model import cut_text
from tests.records.test_server_records import stored
from tests.test_app import CALL_A, base_settings, call_log, keep_talking, phone_call, running, talk_until_hung_up

RATES = (8000, 16000, 24000)
AMPLITUDE = 0.3


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mediaserver")


@asynccontextmanager
async def fake_model(script: Script | None = None, **options: Any) -> AsyncIterator[FakePcmModel]:
    async with trio.open_nursery() as nursery:
        server: FakePcmModel = await nursery.start(FakePcmModel(script, **options).run)
        yield server
        nursery.cancel_scope.cancel()


def pcm_settings(model: FakePcmModel, input_rate: int = 16000, output_rate: int = 16000, **changes: Any) -> Settings:
    return base_settings(
        provider="pcm",
        pcm_provider_url=model.url,
        pcm_provider_input_rate=input_rate,
        pcm_provider_output_rate=output_rate,
        **changes,
    )


def rms(x: npt.NDArray[np.int16]) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


def level_db(measured: npt.NDArray[np.int16], reference: npt.NDArray[np.int16]) -> float:
    return 20 * math.log10(rms(measured) / rms(reference))


def max_step(x: npt.NDArray[np.int16]) -> int:
    return int(np.max(np.abs(np.diff(x.astype(np.int32)))))


def sine_step_bound(freq_hz: float, rate_hz: int, amplitude: float, slack: int) -> float:
    """Largest step a clean sine makes between samples, plus quantisation ``slack``."""
    return 2 * amplitude * 32767 * math.sin(math.pi * freq_hz / rate_hz) * 1.1 + slack


@pytest.mark.parametrize("output_rate", RATES)
@pytest.mark.parametrize("input_rate", RATES)
@fail_after(15)
async def test_pcm_rates_keep_frequency_level_and_continuity(input_rate: int, output_rate: int) -> None:
    caller_tone = to_ulaw(tone(1000, 500, amplitude=AMPLITUDE))
    model_tone = tone(440, 500, output_rate, amplitude=AMPLITUDE)

    async def script(session: PcmModelSession) -> None:
        # Odd-sized frames (whole samples): the bridge must not care where frames end.
        await session.audio(model_tone.tobytes(), frame_bytes=2 * (output_rate // 1000 * 20 + 7))
        await session.reply_done()

    async with fake_model(script) as model, running(pcm_settings(model, input_rate, output_rate)) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(100, paced=False)
            await caller.send_audio(caller_tone, paced=False)
            await caller.send_silence(200, paced=False)
            session = await model.session(0)
            await session.wait_for(lambda: len(session.audio_in) >= input_rate * 2 * 800 // 1000)
            await caller.wait_for_audio(len(model_tone) * 8000 // output_rate - 16)
            await caller.wait_quiet(0.1)
            await caller.stop()
            await caller.closed.wait()
    assert caller.errors == []
    assert session.start is not None and session.input_rate == input_rate and session.output_rate == output_rate

    # Uplink: 8 kHz µ-law -> PCM16 at the input rate, tone at 100..600 ms.
    uplink = pcm16(bytes(session.audio_in))
    assert len(uplink) == input_rate * 800 // 1000  # no samples lost or added
    steady = uplink[input_rate * 200 // 1000 : input_rate * 500 // 1000]
    sent = from_ulaw(caller_tone)
    assert dominant_frequency_hz(steady, input_rate) == pytest.approx(1000, abs=5)
    assert band_energy_ratio(steady, input_rate, 1000) > 0.998
    assert abs(level_db(steady, sent[800:3200])) < 0.5
    whole = uplink[input_rate * 110 // 1000 : input_rate * 590 // 1000]
    assert max_step(whole) <= sine_step_bound(1000, input_rate, AMPLITUDE, slack=1100)

    # Downlink: PCM16 at the output rate -> 8 kHz µ-law, tone of 500 ms.
    downlink = from_ulaw(caller.received_audio)
    assert 0 <= len(downlink) - 4000 <= 20  # and the resampler's delay (19 samples): its tail plays with the reply
    steady = downlink[800:3200]
    assert dominant_frequency_hz(steady, 8000) == pytest.approx(440, abs=5)
    assert band_energy_ratio(steady, 8000, 440) > 0.998
    assert abs(level_db(steady, model_tone)) < 0.5
    whole = downlink[80:3920]
    assert max_step(whole) <= sine_step_bound(440, 8000, AMPLITUDE, slack=1100)


@fail_after(20)
@pytest.mark.parametrize("cut", ["speech_started", "clear"])
async def test_pcm_speech_started_barges_in_and_reports_playback(cut: str, caplog: pytest.LogCaptureFixture) -> None:
    """The caller's barge-in, or the model stopping its own reply (clear): the same cut; only the first counts."""
    reply = tone(440, 3000, 16000, amplitude=AMPLITUDE).tobytes()
    fresh = tone(880, 400, 16000, amplitude=AMPLITUDE).tobytes()
    go = trio.Event()

    async def script(session: PcmModelSession) -> None:
        await session.wait_for(lambda: session.frames_in >= 5)
        await session.audio(reply, frame_bytes=6400)  # 3 s, still "generating"
        await go.wait()
        if cut == "clear":
            await session.send_json({"type": "clear"})
        else:
            await session.speech_started()
        await session.wait_for(lambda: bool(session.of_type("playback")))
        await session.audio(fresh)
        await session.reply_done()

    async with fake_model(script) as model, running(pcm_settings(model)) as url:
        async with phone_call(url) as caller:
            async with trio.open_nursery() as nursery:
                await nursery.start(keep_talking, caller)
                # Barge in with the caller's echoes held, so no echo crosses the clear however late it comes.
                await caller.wait_for(lambda: sum(not e.cleared for e in caller.echoes) >= 12)
                await caller.hold_echoes()
                go.set()
                clear = await caller.wait_for_clear()
                caller.release_echoes()
                await caller.wait_for(lambda: sum(len(m.payload) for m in caller.received if m.at_s > clear.at_s) >= 3200)
                await caller.wait_quiet(0.2)  # (and whatever else would come)
                nursery.cancel_scope.cancel()
            await caller.stop()
            await caller.closed.wait()
        session = model.sessions[0]

    assert caller.errors == []
    assert len(caller.clears) == 1 and clear.dropped_bytes > 0
    # The model learnt how much of reply 1 the caller heard: what Twilio confirmed before the clear.
    [playback] = session.of_type("playback")
    assert playback["reply"] == 1
    assert clear.played_marked_bytes > 0
    # (less the 16->8 kHz resampler's filter delay, rounded up to a sample: that much of what played was the filter
    # filling, not the model's audio)
    delay = math.ceil(Resampler(16000, 8000).delay_ms * 8)
    assert playback["heard_ms"] == (clear.played_marked_bytes - delay) // 8
    assert playback["heard_ms"] < 3000
    # After the clear only the new reply (number 2) played.
    after = from_ulaw(b"".join(m.payload for m in caller.received if m.at_s > clear.at_s))
    assert 0 <= len(after) - 3200 <= 20  # (and the resampler's delay)
    assert dominant_frequency_hz(after[400:2800], 8000) == pytest.approx(880, abs=5)
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert ("barge-ins 0;" if cut == "clear" else "barge-ins 1;") in ended
    [said] = [r.getMessage() for r in call_log(caplog, CALL_A) if ", cut reply-1 at " in r.getMessage()]
    assert (": the model stopped its reply, cut" if cut == "clear" else ": barge-in, cut") in said


@fail_after(10)
async def test_pcm_stop_closes_the_model_socket_within_a_second(caplog: pytest.LogCaptureFixture) -> None:
    async with fake_model() as model, running(pcm_settings(model, 24000, 8000)) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(200)
            session = await model.session(0)
            await session.wait_for(lambda: session.frames_in >= 10)
            await caller.stop()
            await session.closed.wait()
            assert caller.stopped_at_s is not None and session.closed_at_s is not None
            assert session.closed_at_s - caller.stopped_at_s < 1.0
            assert session.close_code == 1000
            await caller.closed.wait()
    assert not any("not-logged" in r.getMessage() for r in caplog.records)  # the URL's query string


@fail_after(10)
async def test_pcm_model_that_never_sends_ready_is_hung_up(caplog: pytest.LogCaptureFixture) -> None:
    async with fake_model(send_ready=False) as model, running(pcm_settings(model, connect_timeout_s=0.5)) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(100)
            await caller.closed.wait()
        session = await model.session(0)
        await session.closed.wait()
    assert session.frames_in == 0 and caller.received == []  # no audio before ready
    messages = [r.getMessage() for r in call_log(caplog, CALL_A)]
    assert any("pcm: the session was not ready within 0.5 s" in m for m in messages), messages


@fail_after(10)
async def test_pcm_model_error_ends_the_call(caplog: pytest.LogCaptureFixture) -> None:
    async def script(session: PcmModelSession) -> None:
        await session.wait_for(lambda: session.frames_in >= 3)
        await session.send_json({"type": "error", "message": "GPU busy", "code": "busy"})  # (not fatal: logged)
        await session.send_json({"type": "error", "message": "model weights missing", "fatal": True, "code": "oom"})

    async with fake_model(script) as model, running(pcm_settings(model)) as url:
        async with phone_call(url) as caller:
            await talk_until_hung_up(caller, 2)
    messages = [r.getMessage() for r in call_log(caplog, CALL_A)]
    assert any("pcm error: GPU busy (code busy)" in m for m in messages), messages
    assert any("ended (provider error: model weights missing (code oom))" in m for m in messages), messages


@fail_after(10)
async def test_pcm_a_refusal_that_echoes_our_token_does_not_put_it_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """The token in PCM_PROVIDER_URL's query is ours to keep: a refusal whose body echoes the request has it taken out."""
    async def refuse(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        target = request.split(b" ", 2)[1]
        body = b"invalid token for " + target
        await stream.send_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, refuse, 0, host="127.0.0.1"))
        url = f"ws://127.0.0.1:{listener.socket.getsockname()[1]}/model?token=s3cr3t-T0KEN&v=1"
        async with running(base_settings(provider="pcm", pcm_provider_url=url)) as server:
            async with phone_call(server) as caller:
                await caller.closed.wait()
        nursery.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records]
    assert any("rejected the connection with HTTP 403: invalid token for /model?token=…&v=1" in m for m in messages)
    assert not any("s3cr3t-T0KEN" in m for m in messages)


def test_pcm_settings_need_the_url_and_valid_rates() -> None:
    with pytest.raises(ConfigError, match="PCM_PROVIDER_URL"):
        Settings.from_env({"MEDIASERVER_PROVIDER": "pcm"})
    with pytest.raises(ConfigError, match="PCM_PROVIDER_INPUT_RATE"):
        Settings.from_env({"MEDIASERVER_PROVIDER": "pcm", "PCM_PROVIDER_URL": "ws://model", "PCM_PROVIDER_INPUT_RATE": "44100"})
    ok = Settings.from_env({"MEDIASERVER_PROVIDER": "pcm", "PCM_PROVIDER_URL": "ws://model:9000/v1"})
    assert ok.pcm_provider_url == "ws://model:9000/v1"


@pytest.mark.parametrize("rate", [16000, 24000])
@fail_after(20)
async def test_pcm_the_end_of_a_reply_plays_with_it_not_at_the_start_of_the_next(rate: int) -> None:
    # Before: the last ~2.3 ms of a reply stayed in the downlink resampler's filter after reply_done and played
    # at the start of the next reply, seconds later: a click (here, non-zero samples in a reply of silence).
    reply1 = tone(440, 500, rate, amplitude=AMPLITUDE).tobytes()  # ends mid-waveform
    reply2 = b"\x00\x00" * (rate // 5)  # 200 ms of digital silence

    async def script(session: PcmModelSession) -> None:
        await session.wait_for(lambda: session.frames_in >= 5)
        await session.audio(reply1)
        await session.reply_done()
        await trio.sleep(1.5)
        await session.audio(reply2)
        await session.reply_done()

    async with fake_model(script) as model, running(pcm_settings(model, 16000, rate)) as url:
        async with phone_call(url) as caller, trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            await caller.wait_for_audio(4000 + 1600)
            await caller.wait_quiet(0.3)
            nursery.cancel_scope.cancel()
    # The replies are split at the longest pause between two media messages (about 1 s; not any pause over a
    # threshold: a loaded machine can stall the caller for half a second within a reply).
    arrivals = [m.at_s for m in caller.received]
    gap = max(range(1, len(arrivals)), key=lambda i: arrivals[i] - arrivals[i - 1])
    assert arrivals[gap] - arrivals[gap - 1] > 0.5
    first = from_ulaw(b"".join(m.payload for m in caller.received[:gap]))
    second = from_ulaw(b"".join(m.payload for m in caller.received[gap:]))
    assert not np.any(second)  # silence, as sent
    fed = Resampler(rate, 8000)
    fed.process(bytes(2 * (rate // 8000)))  # (whole input periods: the tail is as long as after each reply)
    delay = len(fed.flush()) // 2  # the filter's delay: each reply ends that much later
    assert (len(first), len(second)) == (4000 + delay, 1600 + delay)  # each reply whole, at 8 kHz


@fail_after(30)
async def test_pcm_a_caller_who_hangs_up_while_the_model_loads_closes_it_at_once(caplog: pytest.LogCaptureFixture) -> None:
    # Before: the stream was not read until the session was ready, so the hang-up went unseen for as long as
    # the model took to load (or the connect timeout), with its socket open, and the caller's audio was then
    # sent to it in one burst.
    caplog.set_level(logging.INFO, logger="mediaserver")

    async def script(session: PcmModelSession) -> None:
        await trio.sleep(4.0)  # loading (docs/pcm-protocol.md: "ready" may take a few seconds)
        await session.send_json({"type": "ready"})

    async with fake_model(script, send_ready=False) as model, running(settings := pcm_settings(model)) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(1000)
            await caller.stop()
            stopped_s = trio.current_time()
            session = await model.session(0)
            await session.closed.wait()
            closed_after_s = trio.current_time() - stopped_s
            await caller.closed.wait()
    assert closed_after_s < 1.0
    assert session.frames_in == 0  # nothing was sent to a model on its way out
    assert any("hung up before the model session was ready" in r.getMessage() for r in call_log(caplog, CALL_A))
    record = stored(settings, CALL_A)  # the caller's choice, not a failure
    assert record is not None and record.status == "completed"
    assert record.end_reason == "caller hung up before the model session was ready"


@fail_after(30)
async def test_pcm_caller_audio_while_the_model_loads_reaches_it_in_order() -> None:
    async def script(session: PcmModelSession) -> None:
        await trio.sleep(1.0)
        await session.send_json({"type": "ready"})

    async with fake_model(script, send_ready=False) as model, running(pcm_settings(model, 8000, 8000)) as url:
        async with phone_call(url) as caller:
            speech = to_ulaw(tone(1000, 2000, amplitude=0.3))
            await caller.send_audio(speech)  # 2 s, half of it before the model is ready
            session = await model.session(0)
            await session.wait_for(lambda: len(session.audio_in) >= 2 * len(speech))
            await caller.stop()
    assert bytes(session.audio_in[: 2 * len(speech)]) == ulaw_decode(speech)  # every frame, in order, none twice


@pytest.mark.parametrize("order", ["audio, then end_call", "end_call, then audio", "end_call, 0.3 s, then audio"])
@fail_after(20)
async def test_pcm_end_call_waits_for_the_goodbye_sent_after_it(order: str, caplog: pytest.LogCaptureFixture) -> None:
    """A text-to-speech pipeline may send end_call before the goodbye's audio is ready: the caller hears it all."""
    goodbye = tone(440, 1500, 16000, amplitude=0.3).tobytes()
    end_call = {"type": "tool_call", "call_id": "c1", "name": "end_call", "arguments": {}}

    async def script(session: PcmModelSession) -> None:
        await session.wait_for(lambda: session.frames_in >= 3)
        if order == "audio, then end_call":
            await session.audio(goodbye)
            await session.send_json(end_call)
        else:
            await session.send_json(end_call)
            if order == "end_call, 0.3 s, then audio":
                await trio.sleep(0.3)  # (the speech being synthesized)
            await session.audio(goodbye)
        await session.reply_done()
        await trio.sleep(10)

    async with fake_model(script) as model, running(pcm_settings(model)) as url:
        async with phone_call(url) as caller:
            await talk_until_hung_up(caller)
    down = Resampler(16000, 8000)
    assert len(caller.received_audio) == len(down.process(goodbye) + down.flush()) // 2  # all of it, tail included
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert " ended (agent hung up" in ended


@fail_after(20)
async def test_pcm_the_call_record_keeps_what_the_caller_heard_of_a_cut_reply() -> None:
    """4 s of reply and its transcript, cut by a barge-in after about 1 s: the record keeps the words heard."""
    reply = tone(440, 4000, 16000, amplitude=0.3).tobytes()
    words = "one two three four five six seven eight nine ten eleven twelve"

    async def script(session: PcmModelSession) -> None:
        await session.wait_for(lambda: session.frames_in >= 3)
        await session.audio(reply)
        await session.send_json({"type": "transcript", "role": "assistant", "text": words})
        await session.reply_done()
        await trio.sleep(1.0)
        await session.speech_started()
        await trio.sleep(10)

    async with fake_model(script) as model, running(settings := pcm_settings(model)) as url:
        async with phone_call(url) as caller, trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            await caller.wait_for_clear()
            await trio.sleep(0.3)
            nursery.cancel_scope.cancel()
            await caller.stop()
            await caller.closed.wait()
    [playback] = model.sessions[0].of_type("playback")
    record = stored(settings, CALL_A)
    assert record is not None
    [turn] = [t for t in record.turns if t.role == "assistant"]
    assert turn.interrupted and 0 < playback["heard_ms"] < 4000
    assert turn.text == cut_text(words, playback["heard_ms"], 4000) and turn.text != words


@fail_after(20)
async def test_pcm_a_message_of_unknown_type_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """A mistyped boundary ("replyDone") would silently lose a reply's end: the log says so, once per type."""

    async def script(session: PcmModelSession) -> None:
        await session.wait_for(lambda: session.frames_in >= 3)
        for _ in range(3):
            await session.send_json({"type": "replyDone"})
        await session.send_json({"type": "speech-started"})
        await trio.sleep(10)

    async with fake_model(script) as model, running(pcm_settings(model)) as url:
        async with phone_call(url) as caller, trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            await trio.sleep(1.0)
            nursery.cancel_scope.cancel()
            await caller.stop()
            await caller.closed.wait()
    unknown = [r for r in call_log(caplog, CALL_A) if "unknown type" in r.getMessage()]
    assert [r.getMessage().split(": ", 1)[1] for r in unknown] == [
        "pcm sent a message of unknown type 'replyDone'; ignored",
        "pcm sent a message of unknown type 'speech-started'; ignored",
    ]
    assert all(r.levelno == logging.WARNING for r in unknown)


@fail_after(20)
async def test_pcm_a_model_that_breaks_the_protocol_is_told_why_in_the_close(caplog: pytest.LogCaptureFixture) -> None:
    """An odd-length audio frame ends the call; the model's developer sees 1002 and the reason, not a plain 1000."""

    async def script(session: PcmModelSession) -> None:
        await session.wait_for(lambda: session.frames_in >= 3)
        await session.send_message(b"\x00\x01\x02")
        await trio.sleep(10)

    async with fake_model(script) as model, running(pcm_settings(model)) as url:
        async with phone_call(url) as caller:
            await talk_until_hung_up(caller)
    connection = model.sessions[0]
    await connection.closed.wait()
    assert connection.close_code == 1002
    assert connection.close_reason == "audio frame of 3 bytes is not whole PCM16 samples"


@fail_after(30)
async def test_pcm_what_is_held_while_the_model_loads_is_bounded_and_nothing_is_lost(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Past MAX_HELD_BYTES the stream is not read until the session is ready (its socket holds the sender back,
    not the server's memory); then every frame still reaches the model, in order."""
    import mediaserver.bridge.registry as registry

    monkeypatch.setattr(registry, "MAX_HELD_BYTES", 4000)  # ~10 media messages

    async def script(session: PcmModelSession) -> None:
        await trio.sleep(1.0)
        await session.send_json({"type": "ready"})

    async with fake_model(script, send_ready=False) as model, running(pcm_settings(model, 8000, 8000)) as url:
        async with phone_call(url) as caller:
            speech = to_ulaw(tone(1000, 2000, amplitude=0.3))
            await caller.send_audio(speech)
            session = await model.session(0)
            await session.wait_for(lambda: len(session.audio_in) >= 2 * len(speech))
            await caller.stop()
    assert bytes(session.audio_in[: 2 * len(speech)]) == ulaw_decode(speech)
    assert any("over 4000 bytes from Twilio before the model session was ready" in r.getMessage()
               for r in call_log(caplog, CALL_A))
