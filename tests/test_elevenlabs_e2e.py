"""End-to-end: phone calls through the real server to a fake ElevenLabs Agents API.

The server runs on loopback (tests/test_app.py's ``running``/``phone_call``);
ElevenLabs is :class:`tests.elevenlabs_fake.FakeElevenLabsServer`, which
validates the initiation message with the SDK's type and every later
message strictly.  Real sockets, so real Trio time with absolute limits.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
import trio

from mediaserver.config import Settings

from tests.elevenlabs_fake import ElevenLabsConversation, FakeElevenLabsServer, Script
from tests.fakes import LoopLag, fail_after, to_ulaw, tone
from tests.test_app import CALL_A, base_settings, call_log, keep_talking, phone_call, running, talk_until_hung_up


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mediaserver")


@asynccontextmanager
async def fake_elevenlabs(script: Script | None = None, **options: Any) -> AsyncIterator[FakeElevenLabsServer]:
    async with trio.open_nursery() as nursery:
        server: FakeElevenLabsServer = await nursery.start(FakeElevenLabsServer(script, **options).run)
        yield server
        nursery.cancel_scope.cancel()


def el_settings(server: FakeElevenLabsServer, **changes: Any) -> Settings:
    return base_settings(
        provider="elevenlabs", elevenlabs_agent_id=server.agent_id, elevenlabs_agent_url=server.url, **changes
    )


@fail_after(20)
async def test_elevenlabs_call_passes_ulaw_through_and_answers_pings() -> None:
    reply = to_ulaw(tone(440, 800, amplitude=0.3)) + to_ulaw(tone(660, 130, amplitude=0.3))  # not a chunk multiple
    speech = to_ulaw(tone(300, 500, amplitude=0.2))

    async def script(conversation: ElevenLabsConversation) -> None:
        await conversation.wait_for(lambda: len(conversation.chunks) >= 25)
        await conversation.agent_response("Hello!")
        for at in range(0, len(reply), 1234):
            await conversation.audio(reply[at : at + 1234], event_id=1)
        await conversation.response_complete()  # flushes the reply's last partial 40 ms chunk
        await conversation.ping(4242, ping_ms=35)

    lag = LoopLag()
    async with fake_elevenlabs(script) as server, running(el_settings(server, agent_greeting="Hi there")) as url:
        async with phone_call(url) as caller, trio.open_nursery() as watching:
            watching.start_soon(lag.run)
            await caller.send_audio(speech)
            await caller.wait_for_audio(len(reply))
            await caller.send_silence(200)
            await caller.wait_quiet(0.2)
            conversation = await server.conversation(0)
            await conversation.wait_for(lambda: bool(conversation.of_type("pong")))
            await caller.stop()
            await caller.closed.wait()
            watching.cancel_scope.cancel()
        await conversation.closed.wait()

    assert caller.errors == []
    # Uplink: the caller's µ-law frames, byte for byte, one user_audio_chunk each.
    assert conversation.chunks == caller.sent_frames
    # Downlink: the agent's µ-law, byte for byte, in 40 ms chunks plus the remainder.
    assert caller.received_audio == reply
    sizes = [len(m.payload) for m in caller.received]
    if lag.longest_s < 0.02:
        assert sizes == [320] * (len(reply) // 320) + [len(reply) % 320]
    else:
        # The loop stalled (a loaded CI machine) for longer than the pacer waits for a late delta, so a part-chunk
        # may have been played where one delta ended and the next had not come: only there, never mid-delta.
        ends = np.cumsum(sizes)
        assert all(size == 320 or end % 1234 == 0 or end == len(reply) for size, end in zip(sizes, ends))
        assert max(sizes) == 320
    # The pong answered the ping's event_id, exactly as the SDK does.
    assert conversation.of_type("pong") == [{"type": "pong", "event_id": 4242}]
    # The conversation: public agent URL, initiation with the greeting and no prompt override
    # (the instructions are the built-in default, so the agent keeps its own prompt).
    assert conversation.query["agent_id"] == [server.agent_id]
    assert server.signed_url_requests == []
    initiation = conversation.initiation
    assert initiation is not None and initiation.conversation_config_override is not None
    agent = initiation.conversation_config_override.agent
    assert agent is not None and agent.first_message == "Hi there" and agent.prompt is None


@fail_after(20)
async def test_elevenlabs_interruption_clears_twilio_and_drops_late_audio(caplog: pytest.LogCaptureFixture) -> None:
    reply = to_ulaw(tone(440, 3000, amplitude=0.3))
    fresh = to_ulaw(tone(880, 400, amplitude=0.3))
    go = trio.Event()

    async def script(conversation: ElevenLabsConversation) -> None:
        await conversation.wait_for(lambda: len(conversation.chunks) >= 5)
        for at in range(0, len(reply), 4000):
            await conversation.audio(reply[at : at + 4000], event_id=7)
        await go.wait()
        await conversation.interruption(7)
        # Late audio of the interrupted reply (same and older ids) must not be played ...
        await conversation.audio(to_ulaw(tone(440, 300, amplitude=0.3)), event_id=7)
        await conversation.audio(to_ulaw(tone(440, 300, amplitude=0.3)), event_id=6)
        # ... the next reply plays normally.
        await conversation.audio(fresh, event_id=8)

    prompt = "You are the pizza line. Take orders."
    async with fake_elevenlabs(script) as server, running(el_settings(server, agent_instructions=prompt)) as url:
        async with phone_call(url) as caller:
            async with trio.open_nursery() as nursery:
                await nursery.start(keep_talking, caller)
                await caller.wait_for(lambda: sum(not e.cleared for e in caller.echoes) >= 10)
                go.set()
                clear = await caller.wait_for_clear()
                await caller.wait_for(lambda: caller.received_audio.endswith(fresh))
                await caller.wait_quiet(0.2)
                nursery.cancel_scope.cancel()
            await caller.stop()
            await caller.closed.wait()

    assert caller.errors == []
    assert len(caller.clears) == 1 and clear.dropped_bytes > 0
    after = b"".join(m.payload for m in caller.received if m.at_s > clear.at_s)
    assert after == fresh
    conversation = server.conversations[0]
    initiation = conversation.initiation
    assert initiation is not None and initiation.conversation_config_override is not None
    agent = initiation.conversation_config_override.agent
    assert agent is not None and agent.prompt is not None and agent.prompt.prompt == prompt
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "barge-ins 1;" in ended


@fail_after(10)
async def test_elevenlabs_client_tool_call_gets_a_client_tool_result() -> None:
    async def script(conversation: ElevenLabsConversation) -> None:
        await conversation.wait_for(lambda: len(conversation.chunks) >= 3)
        await conversation.client_tool_call("toolu_01", "get_weather", {"city": "Paris"})

    async with fake_elevenlabs(script) as server, running(el_settings(server)) as url:
        async with phone_call(url) as caller, trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            conversation = await server.conversation(0)
            await conversation.wait_for(lambda: bool(conversation.of_type("client_tool_result")))
            nursery.cancel_scope.cancel()
            await caller.stop()
    [result] = conversation.of_type("client_tool_result")
    assert result["tool_call_id"] == "toolu_01"
    assert result["is_error"] is True  # no tools are configured on this server
    assert "error" in json.loads(result["result"])


@fail_after(10)
async def test_elevenlabs_agent_format_mismatch_ends_the_call_with_a_clear_log(caplog: pytest.LogCaptureFixture) -> None:
    async with fake_elevenlabs(output_format="pcm_16000") as server, running(el_settings(server)) as url:
        async with phone_call(url) as caller:
            await talk_until_hung_up(caller, 2)
        conversation = await server.conversation(0)
        await conversation.closed.wait()
    assert caller.close_code == 1011 and caller.received == []  # not served (no model session)
    # The session is refused at pre-open (the transport waits for SessionReady), so
    # the call is hung up before bridging, with the reason in the log.
    messages = [r.getMessage() for r in call_log(caplog, CALL_A)]
    [refused] = [m for m in messages if "could not open the model session" in m]
    assert "elevenlabs refused the session: the ElevenLabs agent's audio format does not fit a phone call" in refused
    assert "agent_output_audio_format is 'pcm_16000'" in refused
    assert "conversation_config.tts.agent_output_audio_format" in refused and "ulaw_8000" in refused
    assert "user_input_audio_format" not in refused  # that one was right
    assert any("no model session" in m and "hanging up" in m for m in messages), messages


@fail_after(10)
async def test_elevenlabs_stop_closes_the_agent_socket_within_a_second() -> None:
    async with fake_elevenlabs() as server, running(el_settings(server)) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(200)
            conversation = await server.conversation(0)
            await conversation.wait_for(lambda: len(conversation.chunks) >= 10)
            await caller.stop()
            await conversation.closed.wait()
            assert caller.stopped_at_s is not None and conversation.closed_at_s is not None
            assert conversation.closed_at_s - caller.stopped_at_s < 1.0
            assert conversation.close_code == 1000
            await caller.closed.wait()


@fail_after(10)
async def test_elevenlabs_private_agent_connects_with_a_signed_url() -> None:
    async with fake_elevenlabs(private=True) as server:
        settings = el_settings(server, elevenlabs_api_key=server.api_key)
        async with running(settings) as url, phone_call(url) as caller:
            await caller.send_silence(200)
            conversation = await server.conversation(0)
            await conversation.wait_for(lambda: len(conversation.chunks) >= 10)
            await caller.stop()
            await caller.closed.wait()
    [(target, headers)] = server.signed_url_requests
    assert target == f"/v1/convai/conversation/get-signed-url?agent_id={server.agent_id}"
    assert headers["xi-api-key"] == server.api_key
    assert conversation.query["conversation_signature"] == ["sig1"]
    assert conversation.chunks == caller.sent_frames


@fail_after(10)
async def test_elevenlabs_private_agent_with_a_wrong_key_hangs_up(caplog: pytest.LogCaptureFixture) -> None:
    wrong = "xi-wrong-key-do-not-log"
    async with fake_elevenlabs(private=True) as server:
        async with running(el_settings(server, elevenlabs_api_key=wrong)) as url, phone_call(url) as caller:
            await caller.send_silence(100)
            await caller.closed.wait()
    assert server.conversations == [] and caller.received == []
    messages = [r.getMessage() for r in call_log(caplog, CALL_A)]
    assert any("could not open the model session: elevenlabs:" in m and "HTTP 401" in m for m in messages), messages
    assert not any(wrong in r.getMessage() for r in caplog.records)


def test_elevenlabs_adapter_urls_and_overrides() -> None:
    from mediaserver.adapters.elevenlabs import elevenlabs_config, public_url, signed_url_endpoint

    settings = Settings(
        provider="elevenlabs",
        elevenlabs_agent_id="agent 1/x",
        elevenlabs_agent_url="wss://api.eu.residency.elevenlabs.io/v1/convai/conversation",
    )
    assert public_url(settings) == "wss://api.eu.residency.elevenlabs.io/v1/convai/conversation?agent_id=agent%201%2Fx"
    assert signed_url_endpoint(settings) == (
        "https://api.eu.residency.elevenlabs.io/v1/convai/conversation/get-signed-url?agent_id=agent%201%2Fx"
    )
    proxied = Settings(provider="elevenlabs", elevenlabs_agent_id="a", elevenlabs_agent_url="wss://proxy.example/convai?token=t")
    assert public_url(proxied) == "wss://proxy.example/convai?token=t&agent_id=a"  # the URL's own query is kept
    assert signed_url_endpoint(proxied) == "https://proxy.example/convai/get-signed-url?token=t&agent_id=a"
    assert elevenlabs_config(settings).prompt is None  # default instructions: the agent keeps its prompt
    custom = elevenlabs_config(Settings(provider="elevenlabs", elevenlabs_agent_id="a", agent_instructions="Sell pizza."))
    assert custom.prompt == "Sell pizza." and custom.first_message is None
