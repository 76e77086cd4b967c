"""End-to-end tests of provider ``assemblyai`` over real loopback sockets.

The server runs with ``provider="assemblyai"`` and ``assemblyai_agent_url``
pointing at :class:`tests.assemblyai_fake.FakeAssemblyAIServer`, which checks
every client message against strict hand-written schemas and enforces the
order rules (session.update first, audio after session.ready, tool.result
only right after a completed reply.done).  Real clock; each test has a limit.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from mediaserver.config import ConfigError, Settings
from tests.assemblyai_fake import AssemblyAIFakeSession, FakeAssemblyAIServer
from tests.fakes import fail_after, to_ulaw, tone
from tests.test_app import CALL_A, base_settings, call_log, keep_talking, phone_call, running, talk_until_hung_up


_DATA_DIR = "data"


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mediaserver")


@pytest.fixture(autouse=True)
def _private_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Call records go to a per-test directory, not the shared ./data."""
    monkeypatch.setattr(sys.modules[__name__], "_DATA_DIR", str(tmp_path))


def assemblyai_settings(server: FakeAssemblyAIServer, **changes: Any) -> Settings:
    return base_settings(
        provider="assemblyai", assemblyai_api_key="k", assemblyai_agent_url=server.url, data_dir=_DATA_DIR, **changes
    )


@asynccontextmanager
async def fake_assemblyai(script: Any = None, **options: Any) -> AsyncIterator[FakeAssemblyAIServer]:
    async with trio.open_nursery() as nursery:
        server: FakeAssemblyAIServer = await nursery.start(FakeAssemblyAIServer(script, **options).run)
        yield server
        nursery.cancel_scope.cancel()


@fail_after(20)
async def test_assemblyai_call_passes_mulaw_through_both_ways_without_losing_early_audio() -> None:
    reply = to_ulaw(tone(440, 1000, amplitude=0.3)) + to_ulaw(tone(660, 220, amplitude=0.3))  # not a chunk multiple

    async def script(session: AssemblyAIFakeSession) -> None:
        await session.wait_for(lambda: len(session.audio_chunks) >= 25)  # 500 ms of caller audio
        await session.reply(reply, chunk_bytes=1234)

    speech = to_ulaw(tone(300, 500, amplitude=0.2))
    # session.ready comes 0.4 s late: the caller's first words wait in the core's buffer.
    async with fake_assemblyai(script, ready_delay_s=0.4) as model:
        async with running(assemblyai_settings(model, assemblyai_voice="ivy")) as url:
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
    # Uplink: every caller frame, byte for byte and in order (none lost while waiting for session.ready).
    assert session.audio_chunks == caller.sent_frames
    # Downlink: the agent's µ-law, byte for byte, in 40 ms chunks plus the remainder.
    assert caller.received_audio == reply
    assert [len(m.payload) for m in caller.received] == [320] * (len(reply) // 320) + [len(reply) % 320]
    assert session.path == "/v1/ws"
    assert session.headers["authorization"] == "Bearer k"
    types = session.types()
    assert (types[0], set(types[1:-1]), types[-1]) == ("session.update", {"input.audio"}, "session.end")
    assert session.session_update is not None
    update = session.session_update["session"]
    assert update["input"] == {"format": {"encoding": "audio/pcmu"}}
    assert update["output"] == {"format": {"encoding": "audio/pcmu"}, "voice": "ivy"}
    assert update["system_prompt"] == base_settings().agent_instructions
    assert "end_call" in [tool["name"] for tool in update["tools"]]  # the call's tools are offered


@fail_after(20)
async def test_assemblyai_barge_in_clears_twilio_and_drops_the_rest_of_the_reply(caplog: pytest.LogCaptureFixture) -> None:
    reply = to_ulaw(tone(440, 3000, amplitude=0.3))
    late = to_ulaw(tone(440, 500, amplitude=0.3))
    fresh = to_ulaw(tone(880, 400, amplitude=0.3))
    go = trio.Event()

    async def script(session: AssemblyAIFakeSession) -> None:
        await session.wait_for(lambda: len(session.audio_chunks) >= 5)
        reply_id = await session.reply(reply, chunk_bytes=4000, done=False)  # still generating
        await go.wait()
        await session.speech_started()  # (not yet the barge-in: the server decides whether it interrupts)
        await session.reply_audio(reply_id, late)  # sent before its decision: queued, then dropped by the clear
        await session.reply_done(reply_id, "interrupted")
        await session.transcript_agent(reply_id, "It is sun", interrupted=True)
        await session.reply(fresh)

    async with fake_assemblyai(script) as model, running(assemblyai_settings(model)) as url, phone_call(url) as caller:
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
    assert clear.dropped_bytes > 0
    before = sum(len(m.payload) for m in caller.received if m.at_s <= clear.at_s)
    assert before < len(reply)
    after = b"".join(m.payload for m in caller.received if m.at_s > clear.at_s)
    assert after == fresh  # neither the rest of the reply nor its late audio
    assert set(session.types()) == {"session.update", "input.audio", "session.end"}  # no truncate/cancel needed
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "barge-ins 1;" in ended


@fail_after(20)
async def test_assemblyai_a_back_channel_does_not_cut_the_agent(caplog: pytest.LogCaptureFixture) -> None:
    """The caller says "uh-huh" mid-reply: input.speech.started, but the server keeps the reply going and completes it."""
    first = to_ulaw(tone(440, 600, amplitude=0.3))
    rest = to_ulaw(tone(660, 600, amplitude=0.3))

    async def script(session: AssemblyAIFakeSession) -> None:
        await session.wait_for(lambda: len(session.audio_chunks) >= 5)
        reply_id = await session.reply(first, done=False)
        await trio.sleep(0.2)
        await session.speech_started()
        await session.speech_stopped()
        await session.reply_audio(reply_id, rest)
        await session.reply_done(reply_id)

    async with fake_assemblyai(script) as model, running(assemblyai_settings(model)) as url, phone_call(url) as caller:
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            await caller.wait_for(lambda: len(caller.received_audio) >= len(first + rest))
            nursery.cancel_scope.cancel()
        await caller.stop()
        await caller.closed.wait()
    assert caller.clears == [] and caller.received_audio == first + rest  # the whole reply, not cut
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "barge-ins 0;" in ended


@fail_after(20)
async def test_assemblyai_a_reply_sent_faster_than_real_time_is_cut_by_the_next_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """3 s of reply at once, done ``completed``: the caller then talks over it, and AssemblyAI (nothing of its
    own to interrupt) answers with a new reply.  The rest of the first one must not play before it."""
    reply = to_ulaw(tone(440, 3000, amplitude=0.3))
    fresh = to_ulaw(tone(880, 400, amplitude=0.3))
    go = trio.Event()

    async def script(session: AssemblyAIFakeSession) -> None:
        await session.wait_for(lambda: len(session.audio_chunks) >= 5)
        await session.reply(reply, chunk_bytes=8000)  # all of it, then reply.done completed
        await go.wait()
        await session.speech_started()
        await session.speech_stopped()
        await session.reply(fresh)

    async with fake_assemblyai(script) as model, running(assemblyai_settings(model)) as url, phone_call(url) as caller:
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            await caller.wait_for(lambda: sum(not e.cleared for e in caller.echoes) >= 10)  # ~400 ms played
            go.set()
            clear = await caller.wait_for_clear()
            await caller.wait_for(lambda: caller.received_audio.endswith(fresh))
            await trio.sleep(0.2)
            nursery.cancel_scope.cancel()
        await caller.stop()
        await caller.closed.wait()

    assert caller.errors == [] and len(caller.clears) == 1
    assert sum(len(m.payload) for m in caller.received if m.at_s <= clear.at_s) < len(reply) / 2
    assert b"".join(m.payload for m in caller.received if m.at_s > clear.at_s) == fresh
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "barge-ins 1;" in ended


@fail_after(15)
async def test_assemblyai_tool_result_waits_for_reply_done_and_answers_the_right_call() -> None:
    answered_early: list[bool] = []

    async def script(session: AssemblyAIFakeSession) -> None:
        await session.wait_for(lambda: len(session.audio_chunks) >= 5)
        reply_id = session.new_reply_id()
        await session.reply_started(reply_id)
        await session.tool_call("call-7", "get_weather", {"city": "Paris"}, reply_id)
        await session.reply_audio(reply_id, to_ulaw(tone(500, 300, amplitude=0.3)))
        await trio.sleep(0.3)  # the bridge has its answer by now; it must be held
        answered_early.append(bool(session.tool_results))
        await session.reply_done(reply_id)

    async with fake_assemblyai(script) as model, running(assemblyai_settings(model)) as url:
        async with phone_call(url) as caller, trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            session = await model.session(0)
            await session.wait_for(lambda: bool(session.tool_results))
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        await session.closed.wait()

    assert answered_early == [False]
    [result] = session.tool_results
    assert result["call_id"] == "call-7" and set(result) == {"type", "call_id", "result"}
    assert "get_weather" in json.loads(result["result"])["error"]  # the bridge's answer for an unknown tool


@fail_after(10)
async def test_assemblyai_stop_closes_the_agent_socket_within_a_second() -> None:
    async with fake_assemblyai() as model, running(assemblyai_settings(model)) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(200)
            session = await model.session(0)
            await session.wait_for(lambda: len(session.audio_chunks) >= 5)
            await caller.stop()
            await session.closed.wait()
            assert caller.stopped_at_s is not None and session.closed_at_s is not None
            assert session.closed_at_s - caller.stopped_at_s < 1.0
            assert session.close_code == 1000
            assert session.types()[-1] == "session.end"  # ended now, not kept (and billed) for the 30 s resume window
            await caller.closed.wait()
            assert caller.close_code == 1000


@fail_after(10)
async def test_assemblyai_fatal_session_error_ends_the_call_cleanly(caplog: pytest.LogCaptureFixture) -> None:
    async def script(session: AssemblyAIFakeSession) -> None:
        await session.wait_for(lambda: len(session.audio_chunks) >= 10)
        await session.session_error("internal_error", "agent crashed")  # and the socket stays open

    async with fake_assemblyai(script) as model, running(assemblyai_settings(model)) as url:
        async with phone_call(url) as caller:
            await talk_until_hung_up(caller, 2)
        session = await model.session(0)
        await session.closed.wait()
        # the failed call's stream says so (1011); the model gets a clean close from us
        assert caller.close_code == 1011 and session.close_code == 1000
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "ended (provider error: agent crashed (code internal_error))" in ended


def test_assemblyai_without_api_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="ASSEMBLYAI_API_KEY"):
        Settings.from_env({"MEDIASERVER_PROVIDER": "assemblyai"})
    with pytest.raises(ConfigError, match="ASSEMBLYAI_API_KEY"):
        Settings(provider="assemblyai", assemblyai_api_key=None).validated()
    assert Settings.from_env({"MEDIASERVER_PROVIDER": "assemblyai", "ASSEMBLYAI_API_KEY": "k"}).assemblyai_api_key == "k"
