"""End-to-end tests of provider ``deepgram`` over real loopback sockets.

The server runs with ``provider="deepgram"`` and ``deepgram_agent_url``
pointing at :class:`tests.deepgram_fake.FakeDeepgramServer`, which validates
every client message with the ``deepgram-sdk`` types and enforces the
Welcome -> Settings -> SettingsApplied -> audio order.  Twilio is
:class:`tests.fakes.FakeTwilioCaller`.  Real clock; each test has a limit.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from deepgram.agent.v1.types import AgentV1KeepAlive, AgentV1Settings

from mediaserver.config import ConfigError, Settings
from mediaserver.protocol.providers import base as pv
from mediaserver.protocol.providers.deepgram import DeepgramAgentConfig, DeepgramAgentSession
from mediaserver.transport.provider_ws import open_provider_link
from tests.deepgram_fake import DeepgramFakeSession, FakeDeepgramServer
from tests.fakes import fail_after, to_ulaw, tone
from tests.test_app import CALL_A, base_settings, call_log, keep_talking, phone_call, running, talk_until_hung_up
from tests.test_tools import LIVE_TOOLS, tools_module  # noqa: F401  (tools_module: a pytest fixture)


_DATA_DIR = "data"


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mediaserver")


@pytest.fixture(autouse=True)
def _private_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Call records go to a per-test directory, not the shared ./data."""
    monkeypatch.setattr(sys.modules[__name__], "_DATA_DIR", str(tmp_path))


def deepgram_settings(server: FakeDeepgramServer, **changes: Any) -> Settings:
    return base_settings(
        provider="deepgram", deepgram_api_key="k", deepgram_agent_url=server.url, data_dir=_DATA_DIR, **changes
    )


@asynccontextmanager
async def fake_deepgram(script: Any = None, **options: Any) -> AsyncIterator[FakeDeepgramServer]:
    async with trio.open_nursery() as nursery:
        server: FakeDeepgramServer = await nursery.start(FakeDeepgramServer(script, **options).run)
        yield server
        nursery.cancel_scope.cancel()


@fail_after(20)
async def test_deepgram_call_passes_mulaw_through_both_ways_without_losing_early_audio() -> None:
    reply = to_ulaw(tone(440, 1000, amplitude=0.3)) + to_ulaw(tone(660, 220, amplitude=0.3))  # not a chunk multiple

    async def script(session: DeepgramFakeSession) -> None:
        await session.wait_for(lambda: len(session.audio_frames) >= 25)  # 500 ms of caller audio
        await session.reply(reply, chunk_bytes=1234)

    speech = to_ulaw(tone(300, 500, amplitude=0.2))
    # SettingsApplied comes 0.4 s late: the caller's first words wait in the core's buffer.
    async with fake_deepgram(script, settings_delay_s=0.4) as model, running(deepgram_settings(model)) as url:
        async with phone_call(url) as caller:
            await caller.send_audio(speech)
            await caller.wait_for_audio(len(reply))
            await caller.send_silence(200)
            await caller.wait_quiet(0.2)
            await caller.stop()
            await caller.closed.wait()
        session = await model.session(0)
        await session.closed.wait()

    assert caller.errors == []
    # Uplink: every caller frame, byte for byte and in order, as binary frames (none lost while waiting).
    assert session.audio_frames == caller.sent_frames
    # Downlink: Deepgram's µ-law, byte for byte, in 40 ms chunks plus the remainder.
    assert caller.received_audio == reply
    assert [len(m.payload) for m in caller.received] == [320] * (len(reply) // 320) + [len(reply) % 320]
    # Connected to the agent endpoint with our key; Settings first, then only audio.
    assert session.path == "/v1/agent/converse"
    assert session.headers["authorization"] == "Token k"
    assert set(session.types()) == {"Settings", "<audio>"} and session.types()[0] == "Settings"
    settings = session.settings
    assert isinstance(settings, AgentV1Settings) and settings.audio.input and settings.audio.output
    assert (settings.audio.input.encoding, settings.audio.input.sample_rate) == ("mulaw", 8000)
    assert (settings.audio.output.encoding, settings.audio.output.sample_rate, settings.audio.output.container) == (
        "mulaw", 8000, "none"
    )
    wire = settings.model_dump(mode="json", exclude_unset=True)
    assert wire["agent"]["think"]["prompt"] == base_settings().agent_instructions
    assert wire["agent"]["listen"]["provider"]["model"] == "nova-3"


@fail_after(20)
async def test_deepgram_barge_in_clears_twilio_and_drops_the_rest_of_the_reply(caplog: pytest.LogCaptureFixture) -> None:
    reply = to_ulaw(tone(440, 3000, amplitude=0.3))
    fresh = to_ulaw(tone(880, 400, amplitude=0.3))
    go = trio.Event()

    async def script(session: DeepgramFakeSession) -> None:
        await session.wait_for(lambda: len(session.audio_frames) >= 5)
        await session.reply(reply, chunk_bytes=4000, done=False)  # all sent, still "speaking"
        await go.wait()
        await session.user_started_speaking()
        await session.reply(fresh)  # the next turn plays normally

    async with fake_deepgram(script) as model, running(deepgram_settings(model)) as url, phone_call(url) as caller:
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            await caller.wait_for(lambda: sum(not e.cleared for e in caller.echoes) >= 10)  # ~400 ms played
            barge_in_s = trio.current_time()
            go.set()
            clear = await caller.wait_for_clear()
            await caller.wait_for(lambda: caller.received_audio.endswith(fresh))
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        await caller.stop()
        await caller.closed.wait()
        session = await model.session(0)

    assert caller.errors == []
    assert len(caller.clears) == 1 and clear.at_s >= barge_in_s
    assert clear.dropped_bytes > 0  # the clear cut audio buffered at Twilio
    before = sum(len(m.payload) for m in caller.received if m.at_s <= clear.at_s)
    assert before < len(reply)  # the rest of the 3 s reply never went out ...
    after = b"".join(m.payload for m in caller.received if m.at_s > clear.at_s)
    assert after == fresh  # ... only the next turn did
    assert set(session.types()) == {"Settings", "<audio>"}  # Deepgram needs no truncate message
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "barge-ins 1;" in ended


@fail_after(15)
async def test_deepgram_tool_call_round_trip_answers_only_the_client_side_call() -> None:
    async def script(session: DeepgramFakeSession) -> None:
        await session.wait_for(lambda: len(session.audio_frames) >= 5)
        await session.function_call_request(
            ("call-srv", "lookup_order", '{"order": 7}', False),
            ("call-1", "get_weather", '{"city": "Paris"}', True),
        )

    async with fake_deepgram(script) as model, running(deepgram_settings(model)) as url:
        async with phone_call(url) as caller, trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            session = await model.session(0)
            await session.wait_for(lambda: bool(session.function_responses))
            await trio.sleep(0.2)  # room for a wrong second answer to arrive
            nursery.cancel_scope.cancel()
        await session.closed.wait()

    [response] = session.function_responses
    assert (response.id, response.name) == ("call-1", "get_weather")
    # The bridge's tool runner answered: get_weather is not one of the call's tools.
    assert "get_weather" in json.loads(response.content)["error"]
    # The call's tools (the built-ins at least) were offered as client-side functions.
    assert session.settings is not None
    functions = session.settings.model_dump(mode="json", exclude_unset=True)["agent"]["think"]["functions"]
    assert "end_call" in [f["name"] for f in functions]
    assert all("endpoint" not in f for f in functions)  # no endpoint = called client-side
    assert session.types().count("FunctionCallResponse") == 1  # never the server-side call


@fail_after(10)
async def test_deepgram_end_call_hangs_up_once_the_goodbye_has_played(caplog: pytest.LogCaptureFixture) -> None:
    """A reply ends at AgentAudioDone, so end_call waits for the goodbye to play, not its 15 s limit."""
    goodbye = to_ulaw(tone(440, 300, amplitude=0.3))

    async def script(session: DeepgramFakeSession) -> None:
        await session.wait_for(lambda: len(session.audio_frames) >= 5)
        await session.reply(goodbye)
        await session.function_call_request(("call-1", "end_call", '{"reason": "caller said bye"}', True))

    async with fake_deepgram(script) as model, running(deepgram_settings(model)) as url:
        async with phone_call(url) as caller, trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            session = await model.session(0)
            await session.wait_for(lambda: bool(session.function_responses))
            asked_s = trio.current_time()
            await caller.closed.wait()
            nursery.cancel_scope.cancel()
    assert trio.current_time() - asked_s < 2.0  # the goodbye (300 ms) played, then the hang-up
    assert caller.received_audio == goodbye
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "ended (agent hung up: caller said bye)" in ended
    assert not any("goodbye still playing" in r.getMessage() for r in caplog.records)


@fail_after(10)
async def test_deepgram_a_withdrawn_function_call_is_stopped_and_never_answered(
    tools_module: Callable[[str], str], caplog: pytest.LogCaptureFixture  # noqa: F811
) -> None:
    """FunctionCallCancelled while the tool runs: it is cancelled, and no FunctionCallResponse goes out for it."""

    async def script(session: DeepgramFakeSession) -> None:
        await session.wait_for(lambda: len(session.audio_frames) >= 5)
        await session.function_call_request(("call-1", "slow", "{}", True))
        await trio.sleep(0.3)
        await session.function_call_cancelled("call-1")  # (the fake fails the call if it is answered after this)
        await session.function_call_request(("call-2", "add", '{"a": 2, "b": 3}', True))

    async with fake_deepgram(script) as model:
        settings = deepgram_settings(model, tools_module=tools_module(LIVE_TOOLS))
        async with running(settings) as url, phone_call(url) as caller, trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            session = await model.session(0)
            await session.wait_for(lambda: bool(session.function_responses))
            await trio.sleep(0.3)
            await caller.stop()
            await caller.closed.wait()
            nursery.cancel_scope.cancel()
        await session.closed.wait()
    assert [response.id for response in session.function_responses] == ["call-2"]
    messages = [r.getMessage() for r in call_log(caplog, CALL_A)]
    assert any("tool slow withdrawn by the model; cancelled, not answered" in m for m in messages)
    [ended] = [m for m in messages if " ended (" in m]
    assert "ended (twilio sent stop)" in ended


@fail_after(10)
async def test_deepgram_stop_closes_the_agent_socket_within_a_second() -> None:
    async with fake_deepgram() as model, running(deepgram_settings(model)) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(200)
            session = await model.session(0)
            await session.wait_for(lambda: len(session.audio_frames) >= 5)
            await caller.stop()
            await session.closed.wait()
            assert caller.stopped_at_s is not None and session.closed_at_s is not None
            assert session.closed_at_s - caller.stopped_at_s < 1.0
            assert session.close_code == 1000
            await caller.closed.wait()
            assert caller.close_code == 1000


@fail_after(10)
async def test_deepgram_fatal_error_ends_the_call_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    async def script(session: DeepgramFakeSession) -> None:
        await session.wait_for(lambda: len(session.audio_frames) >= 10)
        await session.error("INVALID_SETTINGS", "think provider rejected")  # and the socket stays open

    async with fake_deepgram(script) as model, running(deepgram_settings(model)) as url:
        async with phone_call(url) as caller:
            await talk_until_hung_up(caller, 2)
        session = await model.session(0)
        await session.closed.wait()
        # the failed call's stream says so (1011); the model gets a clean close from us
        assert caller.close_code == 1011 and session.close_code == 1000
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "ended (provider error: think provider rejected (code INVALID_SETTINGS))" in ended


def test_deepgram_without_api_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="DEEPGRAM_API_KEY"):
        Settings.from_env({"MEDIASERVER_PROVIDER": "deepgram"})
    with pytest.raises(ConfigError, match="DEEPGRAM_API_KEY"):
        Settings(provider="deepgram", deepgram_api_key="").validated()
    assert Settings.from_env({"MEDIASERVER_PROVIDER": "deepgram", "DEEPGRAM_API_KEY": "k"}).deepgram_api_key == "k"


@fail_after(15)
async def test_deepgram_keepalive_goes_out_only_while_no_audio_flows() -> None:
    """The real transport sends KeepAlive after ``keepalive_interval_s`` without sending (0.25 s here)."""
    async with fake_deepgram() as model:
        session = DeepgramAgentSession(DeepgramAgentConfig(instructions="x", keepalive_interval_s=0.25, url=model.url))
        async with open_provider_link("deepgram", session, model.url, [("Authorization", "Token k")]) as link:
            async with trio.open_nursery() as nursery:
                ready = trio.Event()

                async def read() -> None:
                    while True:
                        if isinstance(await link.receive(), pv.SessionReady):
                            ready.set()

                nursery.start_soon(read)
                await ready.wait()
                fake = await model.session(0)
                await trio.sleep(1.0)  # idle: keepalives
                idle = len(fake.keepalives)
                assert idle >= 2
                sent_at: list[float] = []
                for _ in range(50):  # audio every 20 ms: no keepalive between
                    await link.send(pv.SendAudio(b"\xff" * 160))
                    sent_at.append(trio.current_time())
                    await trio.sleep(0.02)
                await trio.sleep(0.7)  # idle again: they resume
                await fake.wait_for(lambda: len(fake.audio_frames) >= 50)
                nursery.cancel_scope.cancel()
    # Judged by the gaps in what was sent, not by wall-clock windows: a stalled machine makes a real gap, and a
    # keepalive in it is right.  Every keepalive that came between two audio frames (in the order the fake got
    # them: a keepalive sent just before the first frame may be read after that frame was stamped as sent) came
    # the interval (less a margin for the test's own clock readings) after the frame before it was sent; the
    # streaming itself had no such gap.
    frames = 0
    after_streaming = 0
    for t, message in fake.received:
        if isinstance(message, bytes):
            frames += 1
        elif isinstance(message, AgentV1KeepAlive) and 0 < frames < 50:
            assert t - sent_at[frames - 1] >= 0.2, (t, frames, sent_at)
        elif isinstance(message, AgentV1KeepAlive) and frames == 50:
            after_streaming += 1
    assert after_streaming >= 1
    assert len(fake.audio_frames) == 50
