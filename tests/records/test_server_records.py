"""Call records end to end: the real server on loopback, SQLite and PostgreSQL.

A call is answered through the webhook and streamed by
:class:`tests.fakes.FakeTwilioCaller` (as in tests/test_app.py); the records
are then read back from the database the server wrote, and over
``GET /calls/<sid>``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import trio
from openai.types.realtime import ResponseAudioTranscriptDoneEvent
from openai.types.realtime.conversation_item_input_audio_transcription_completed_event import (
    ConversationItemInputAudioTranscriptionCompletedEvent,
    UsageTranscriptTextUsageDuration,
)

from mediaserver.config import Settings
from mediaserver.records.model import CallRecord, cut_text
from mediaserver.records.store import open_store, sqlite_path
from tests.fakes import ACCOUNT_SID, FakeRealtimeSession, fail_after, http_request, to_ulaw, tone
from tests.test_app import CALL_A, CALL_B, fake_openai, keep_talking, phone_call, running

KEY = "ms-test-api-key-0123456789"


def stored(settings: Settings, call_sid: str) -> CallRecord | None:
    store = open_store(settings)
    try:
        return store.get(call_sid)
    finally:
        store.close()


async def get_call(url: str, sid: str, key: str | None = KEY, scheme: str = "Bearer") -> tuple[int, dict[str, object]]:
    headers = [("Authorization", f"{scheme} {key}")] if key is not None else []
    response = await http_request(f"{url}/calls/{sid}", headers=headers)
    return response.status, json.loads(response.body) if response.body else {}


@fail_after(20)
async def test_records_echo_call_is_recorded(records_settings: Callable[..., Settings]) -> None:
    settings = records_settings(api_key=KEY)
    burst = to_ulaw(tone(1000, 300, amplitude=0.5))
    async with running(settings) as url:
        if not settings.database_url:
            assert sqlite_path(settings).is_file()  # created (with its directory) at start
        async with phone_call(url) as caller:
            await caller.send_silence(300)
            status, live = await get_call(url, CALL_A)
            assert status == 200 and live["status"] == "in-progress" and live["ended_at"] is None
            await caller.say_and_hear_the_echo(burst)
            await caller.stop()
            await caller.closed.wait()
        callback = [("CallSid", CALL_A), ("CallStatus", "completed"), ("CallDuration", "2")]
        assert (await http_request(url + "/call-status", "POST", form=callback)).status == 204
        status, body = await get_call(url, CALL_A)  # waits for the queued writes
        assert status == 200 and body["status"] == "completed" and body["twilio_status"] == "completed"
    record = stored(settings, CALL_A)
    assert record is not None
    assert record.to_json() == body  # the route serves exactly the stored record
    assert (record.status, record.end_reason, record.provider, record.direction) == (
        "completed", "twilio sent stop", "echo", "inbound")
    assert (record.from_number, record.to_number, record.account_sid) == ("+15550001111", "+15552223333", ACCOUNT_SID)
    assert record.stream_sid is not None and record.stream_sid.startswith("MZ")
    assert record.ended_at is not None and record.started_at < record.ended_at
    assert record.duration_s is not None and 1.0 < record.duration_s < 10.0
    assert record.twilio_duration_s == 2
    assert {"uplink_p50", "uplink_p99", "downlink_p50", "downlink_p99"} <= set(record.latency_ms)
    assert record.latency_ms["uplink_p50"] <= record.latency_ms["uplink_p99"]
    assert record.turns == [] and record.tool_calls == []  # the echo agent says nothing in words


@fail_after(20)
async def test_records_unreachable_model_is_a_failed_call(records_settings: Callable[..., Settings]) -> None:
    async with fake_openai() as model:
        closed = trio.socket.socket()  # a port nobody listens on
        await closed.bind(("127.0.0.1", 0))
        model.port = closed.getsockname()[1]
        closed.close()
        settings = records_settings(provider="openai", openai_api_key="sk-test", openai_realtime_url=model.url)
        async with running(settings) as url:
            async with phone_call(url) as caller:
                await caller.send_silence(100)
                await caller.closed.wait()
    record = stored(settings, CALL_A)
    assert record is not None
    assert (record.status, record.provider, record.from_number) == ("failed", "openai", "+15550001111")
    assert record.end_reason is not None
    assert record.end_reason.startswith("no model session: openai: cannot connect to ws://127.0.0.1")
    assert record.ended_at is not None and record.turns == []


@fail_after(20)
async def test_records_calls_live_at_a_crash_are_interrupted_at_the_next_start(
    records_settings: Callable[..., Settings],
) -> None:
    settings = records_settings(api_key=KEY)
    store = open_store(settings)
    try:
        # in-progress: the server stopped during the call
        store.save(CallRecord(CALL_B, "2026-11-21T08:00:00+00:00", stream_sid="MZ" + "b" * 32, provider="echo"))
    finally:
        store.close()
    async with running(settings) as url:
        status, body = await get_call(url, CALL_B)
    assert status == 200
    assert (body["status"], body["end_reason"]) == ("interrupted", "server stopped during the call")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # HTTP only: one backend is enough
@fail_after(20)
async def test_records_route_needs_the_api_key(records_settings: Callable[..., Settings]) -> None:
    settings = records_settings(api_key=KEY)
    store = open_store(settings)
    try:
        store.save(CallRecord(CALL_A, "2026-11-21T08:00:00+00:00", status="completed"))
    finally:
        store.close()
    async with running(settings) as url:
        assert (await get_call(url, CALL_A))[0] == 200
        for key, scheme in ((None, "Bearer"), ("wrong-key", "Bearer"), (KEY[:-1], "Bearer"), (KEY, "Basic"),
                            ("", "Bearer")):
            response = await http_request(
                f"{url}/calls/{CALL_A}", headers=[("Authorization", f"{scheme} {key}".strip())] if key is not None else []
            )
            assert response.status == 401, (key, scheme)
            assert json.loads(response.body) == {"error": "missing or wrong API key (Authorization: Bearer $MEDIASERVER_API_KEY)"}
            assert response.headers["www-authenticate"] == "Bearer"
            assert CALL_A not in response.text
        assert (await get_call(url, CALL_A, scheme="bearer"))[0] == 200  # the scheme is case-insensitive
        assert (await get_call(url, CALL_B)) == (404, {"error": "no such call"})
        assert (await get_call(url, "CA" + "x" * 100))[0] == 404
    # Without a configured key the route is off: 404, whatever is sent.
    async with running(records_settings(api_key=None)) as url:
        assert (await get_call(url, CALL_A))[0] == 404
        assert (await get_call(url, CALL_A, key=None))[0] == 404


REPLY = "Tomorrow will be cloudy in the morning, then sunny, with a light wind from the west."


@fail_after(20)
async def test_records_openai_barge_in_keeps_only_what_the_caller_heard(
    records_settings: Callable[..., Settings],
) -> None:
    """Transcripts from the (fake) OpenAI server, built from the SDK's own event types."""
    reply_audio = to_ulaw(tone(440, 3000, amplitude=0.3))
    go = trio.Event()
    replies: list[Any] = []

    async def script(session: FakeRealtimeSession) -> None:
        await session.wait_appends(5)
        await session.send(
            ConversationItemInputAudioTranscriptionCompletedEvent(
                type="conversation.item.input_audio_transcription.completed",
                event_id="event_user_1",
                item_id="item_user_1",
                content_index=0,
                transcript="What's the weather tomorrow?",
                usage=UsageTranscriptTextUsageDuration(seconds=1.5, type="duration"),
            )
        )
        reply = await session.respond(reply_audio, chunk_bytes=4000, done=False)
        replies.append(reply)
        await session.send(
            ResponseAudioTranscriptDoneEvent(
                type="response.output_audio_transcript.done",
                event_id="event_reply_1",
                response_id=reply.response_id,
                item_id=reply.item_id,
                output_index=0,
                content_index=0,
                transcript=REPLY,
            )
        )
        await go.wait()
        await session.speech_started()

    async with fake_openai(script) as model:
        settings = records_settings(provider="openai", openai_api_key="sk-test", openai_realtime_url=model.url)
        async with running(settings) as url, phone_call(url) as caller:
            async with trio.open_nursery() as nursery:
                await nursery.start(keep_talking, caller)
                await caller.wait_for(lambda: sum(not e.cleared for e in caller.echoes) >= 15)  # ~600 ms heard
                go.set()
                await caller.wait_for_clear()
                session = await model.session(0)
                await session.wait_for(lambda: bool(session.truncates))
                nursery.cancel_scope.cancel()
            await caller.stop()
            await caller.closed.wait()
    [(_, truncate)] = session.truncates
    record = stored(settings, CALL_A)
    assert record is not None and record.barge_ins == 1 and record.status == "completed"
    user, assistant = record.turns
    assert (user.role, user.text, user.interrupted) == ("user", "What's the weather tomorrow?", False)
    assert (assistant.role, assistant.interrupted, assistant.heard_ms) == ("assistant", True, truncate.audio_end_ms)
    # 3000 ms of audio were generated; the caller heard ~600 ms of it: about a fifth of the words.
    assert 560 <= truncate.audio_end_ms <= 1000
    assert assistant.text == cut_text(REPLY, truncate.audio_end_ms, 3000)
    assert REPLY.startswith(assistant.text) and 2 <= len(assistant.text.split()) < len(REPLY.split()) // 2
    assert user.offset_s < assistant.offset_s < record.duration_s  # type: ignore[operator]
