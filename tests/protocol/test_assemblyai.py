"""Unit tests of the AssemblyAI Voice Agent sans-I/O core.

Client messages are checked with the strict hand-written schemas of
:mod:`tests.assemblyai_fake` (no SDK schema exists for this protocol).
"""

from __future__ import annotations

import base64
import json
import typing

import pytest

from mediaserver.protocol.errors import LocalProtocolError, RemoteProtocolError
from mediaserver.protocol.providers import base as pv
from mediaserver.protocol.providers.assemblyai import (
    NON_FATAL_SESSION_ERRORS,
    AssemblyAIAgentConfig,
    AssemblyAIAgentSession,
    AssemblyAIState,
)
from tests.assemblyai_fake import validate_client_message

WEATHER = pv.FunctionTool(
    "get_weather",
    "Current weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def ev(type_: str, **fields: typing.Any) -> str:
    return json.dumps({"type": type_, **fields})


READY = ev("session.ready", session_id="sess-1", expires_at=1_900_000_000, config={})


def audio(reply_id: str, data: bytes) -> str:
    return ev("reply.audio", reply_id=reply_id, data=base64.b64encode(data).decode())


def done(reply_id: str, status: str = "completed") -> str:
    return ev("reply.done", reply_id=reply_id, status=status)


def started(reply_id: str) -> str:
    return ev("reply.started", reply_id=reply_id, item_id=f"item-{reply_id}")


def tool_call(call_id: str, arguments: object = None) -> str:
    return ev("tool.call", call_id=call_id, name="get_weather", arguments=arguments or {"city": "Paris"})


def new_session(**overrides: typing.Any) -> AssemblyAIAgentSession:
    values: dict[str, typing.Any] = {"instructions": "Be brief."}
    values.update(overrides)
    return AssemblyAIAgentSession(AssemblyAIAgentConfig(**values))


def ready_session(**overrides: typing.Any) -> AssemblyAIAgentSession:
    session = new_session(**overrides)
    for message in session.initial_messages():
        validate_client_message(message)
    assert receive(session, READY) == [pv.SessionReady("sess-1")]
    return session


def receive(session: AssemblyAIAgentSession, *messages: str | bytes) -> list[pv.ProviderEvent]:
    events: list[pv.ProviderEvent] = []
    for message in messages:
        session.receive_message(message)
        events.extend(session.events())
    return events


def sent(messages: typing.Sequence[str | bytes]) -> list[dict[str, typing.Any]]:
    """Validate every message against the strict schemas; return them parsed."""
    return [validate_client_message(m) for m in messages]


def assert_dead(session: AssemblyAIAgentSession) -> None:
    assert session.state is AssemblyAIState.ERROR
    with pytest.raises(LocalProtocolError):
        session.receive_message(READY)
    with pytest.raises(LocalProtocolError):
        session.send(pv.SendAudio(b"\xff"))


# ------------------------------------------------------------------ handshake


def test_assemblyai_session_update_full_config() -> None:
    session = new_session(voice="ivy", greeting="Hi there!", tools=(WEATHER,))
    [update] = sent(session.initial_messages())
    assert update == {
        "type": "session.update",
        "session": {
            "system_prompt": "Be brief.",
            "greeting": "Hi there!",
            "input": {"format": {"encoding": "audio/pcmu"}},
            "output": {"format": {"encoding": "audio/pcmu"}, "voice": "ivy"},
            "tools": [{"type": "function", **WEATHER.to_json()}],
        },
    }
    assert session.state is AssemblyAIState.AWAITING_READY
    assert receive(session, READY) == [pv.SessionReady("sess-1")]
    assert session.session_id == "sess-1"
    assert session.input_format == session.output_format == pv.AudioFormat("pcmu", 8000)
    assert session.keepalive_interval_s is None and session.keepalive() == []


def test_assemblyai_session_update_minimal_config_omits_optional_fields() -> None:
    [update] = sent(new_session().initial_messages())
    assert update["session"] == {
        "system_prompt": "Be brief.",
        "input": {"format": {"encoding": "audio/pcmu"}},
        "output": {"format": {"encoding": "audio/pcmu"}},
    }


def test_assemblyai_config_validation() -> None:
    with pytest.raises(LocalProtocolError, match="max_buffered_audio_ms"):
        AssemblyAIAgentConfig(instructions="x", max_buffered_audio_ms=-5)


# ---------------------------------------------------------------------- audio


def test_assemblyai_audio_is_base64_input_audio_with_exact_bytes() -> None:
    session = ready_session()
    payload = bytes(range(256))
    [message] = sent(session.send(pv.SendAudio(payload)))
    assert message == {"type": "input.audio", "audio": base64.b64encode(payload).decode()}


def test_assemblyai_audio_before_ready_is_buffered_bounded_and_flushed_in_order() -> None:
    session = new_session(max_buffered_audio_ms=40)  # 320 bytes
    session.initial_messages()
    frames = [bytes([n]) * 160 for n in range(1, 5)]
    for frame in frames:
        assert session.send(pv.SendAudio(frame)) == []
    assert session.buffered_audio_bytes == 320 and session.dropped_early_bytes == 320
    receive(session, READY)
    flushed = sent(session.pending_messages())
    assert [base64.b64decode(m["audio"]) for m in flushed] == frames[2:]
    assert session.pending_messages() == []


def test_assemblyai_early_audio_flushes_with_the_next_send_if_that_comes_first() -> None:
    session = new_session()
    session.initial_messages()
    session.send(pv.SendAudio(b"\x01" * 160))
    session.receive_message(READY)
    out = sent(session.send(pv.SendAudio(b"\x02" * 160)))
    assert [base64.b64decode(m["audio"]) for m in out] == [b"\x01" * 160, b"\x02" * 160]
    assert session.pending_messages() == []


def test_assemblyai_reply_maps_to_response_audio_and_done() -> None:
    session = ready_session()
    events = receive(session, started("r1"), audio("r1", b"\x10" * 320), audio("r1", b"\x20" * 7), done("r1"))
    assert events == [
        pv.ResponseStarted("r1"),
        pv.AudioDelta("r1", b"\x10" * 320, "r1"),
        pv.AudioDelta("r1", b"\x20" * 7, "r1"),
        pv.AudioDone("r1", "r1"),
        pv.ResponseDone("r1", "completed", None),
    ]


# -------------------------------------------------------------------- barge-in


def test_assemblyai_the_barge_in_is_the_interrupted_reply_done_not_the_callers_speech_start() -> None:
    session = ready_session()
    speech = ev("input.speech.started", timestamp=1.5)
    events = receive(session, started("r1"), audio("r1", b"\x01" * 100), speech,
                     audio("r1", b"\x02" * 50), done("r1", "interrupted"), ev("input.speech.stopped"))
    assert events == [
        pv.ResponseStarted("r1"),
        pv.AudioDelta("r1", b"\x01" * 100, "r1"),
        pv.Other("input.speech.started", speech),  # maybe a back-channel: the server decides
        pv.AudioDelta("r1", b"\x02" * 50, "r1"),
        pv.SpeechStarted(None, None, speech_began=False),  # the server's barge-in
        pv.AudioDone("r1", "r1"),
        pv.ResponseDone("r1", "interrupted", None),
        pv.SpeechStopped(None, None),
    ]
    assert session.send(pv.Truncate("r1", 10)) == [] and session.send(pv.CancelResponse()) == []


def test_assemblyai_a_back_channel_does_not_cut_the_reply() -> None:
    """The docs: a back-channel ("uh-huh") gets no interruption, the agent keeps speaking and the reply completes."""
    session = ready_session()
    events = receive(session, started("r1"), audio("r1", b"\x01" * 100), ev("input.speech.started"),
                     ev("input.speech.stopped"), audio("r1", b"\x02" * 100), done("r1"))
    assert not any(isinstance(e, pv.SpeechStarted) for e in events)
    assert [e.payload for e in events if isinstance(e, pv.AudioDelta)] == [b"\x01" * 100, b"\x02" * 100]
    assert events[-1] == pv.ResponseDone("r1", "completed", None)


def test_assemblyai_a_reply_to_speech_after_a_finished_reply_cuts_what_still_plays_of_it() -> None:
    """The server cannot interrupt a reply it has finished (sent faster than real time, still playing here):
    the reply that answers the caller's speech after it is the cut (a no-op for the bridge if all has played)."""
    session = ready_session()
    speech = ev("input.speech.started")
    events = receive(session, started("r1"), audio("r1", b"\x01" * 100), done("r1"), speech, ev("input.speech.stopped"),
                     started("r2"), audio("r2", b"\x02" * 10))
    assert events[4:] == [
        pv.Other("input.speech.started", speech),
        pv.SpeechStopped(None, None),
        pv.SpeechStarted(None, None, speech_began=False),  # before r2: the rest of r1 is stale
        pv.ResponseStarted("r2"),
        pv.AudioDelta("r2", b"\x02" * 10, "r2"),
    ]
    # Once only; and not for a reply that follows no speech (a tool's result), nor for speech during a reply.
    events = receive(session, done("r2"), started("r3"), speech, done("r3"), started("r4"))
    assert not any(isinstance(e, pv.SpeechStarted) for e in events)


def test_assemblyai_reply_audio_without_a_reply_id_is_the_reply_in_progress() -> None:
    """The API reference's example of reply.audio has only ``data``."""
    session = ready_session()
    events = receive(session, started("r1"), ev("reply.audio", data=base64.b64encode(b"\x05" * 8).decode()), done("r1"))
    assert events[1] == pv.AudioDelta("r1", b"\x05" * 8, "r1")
    with pytest.raises(RemoteProtocolError, match="no reply in progress"):
        receive(session, ev("reply.audio", data="AAAA"))


def test_assemblyai_a_bare_reply_done_ends_the_reply_in_progress_as_completed() -> None:
    session = ready_session()
    events = receive(session, started("r1"), ev("reply.done"))
    assert events[1:] == [pv.AudioDone("r1", "r1"), pv.ResponseDone("r1", "completed", None)]
    events = receive(session, started("r2"), ev("reply.done", status="interrupted"))
    assert events[1:] == [pv.SpeechStarted(None, None, speech_began=False), pv.AudioDone("r2", "r2"), pv.ResponseDone("r2", "interrupted", None)]
    with pytest.raises(RemoteProtocolError, match="no reply in progress"):
        receive(session, ev("reply.done"))


def test_assemblyai_an_interrupted_reply_withdraws_its_tool_calls_answered_or_not() -> None:
    """end_call in a goodbye the caller talked over: the bridge must not hang up (ToolCallsCancelled)."""
    session = ready_session()
    receive(session, started("r0"), tool_call("call-0"), done("r0"))  # a completed reply's call stays
    receive(session, started("r1"), tool_call("call-1"), tool_call("call-2"))
    assert session.send(pv.ToolResult("call-1", "held")) == []  # answered (held), call-2 not yet
    events = receive(session, ev("input.speech.started"), done("r1", "interrupted"))
    withdrawn = [e for e in events if isinstance(e, pv.ToolCallsCancelled)]
    assert [e.call_ids for e in withdrawn] == [("call-1", "call-2")]
    assert events.index(withdrawn[0]) == events.index(pv.SpeechStarted(None, None, speech_began=False)) + 1
    assert session.send(pv.ToolResult("call-2", "late")) == []  # dropped, as the docs say
    assert not any(isinstance(e, pv.ToolCallsCancelled) for e in receive(session, started("r2"), done("r2", "interrupted")))


def test_assemblyai_closing_sends_session_end_once_ready() -> None:
    session = new_session()
    assert session.closing_messages() == []  # nothing to end before the handshake
    session.initial_messages()
    assert session.closing_messages() == []  # (nor before session.ready)
    receive(session, READY)
    assert sent(session.closing_messages()) == [{"type": "session.end"}]


def test_assemblyai_create_response_is_reply_create() -> None:
    session = ready_session()
    assert sent(session.send(pv.CreateResponse())) == [{"type": "reply.create"}]
    assert sent(session.send(pv.CreateResponse("Say goodbye."))) == [{"type": "reply.create", "instructions": "Say goodbye."}]


# ----------------------------------------------------------------------- tools


def test_assemblyai_tool_result_is_held_until_the_reply_is_done() -> None:
    session = ready_session(tools=(WEATHER,))
    events = receive(session, started("r1"), tool_call("call-1", {"city": "Paris"}))
    assert events[1] == pv.ToolCall("call-1", "get_weather", '{"city":"Paris"}', "r1")
    assert session.send(pv.ToolResult("call-1", '{"temp_c": 21}')) == []  # reply still in progress
    receive(session, audio("r1", b"\x01" * 10))
    assert session.pending_messages() == []  # not yet: reply.done is not the latest event
    receive(session, done("r1"))
    assert sent(session.pending_messages()) == [{"type": "tool.result", "call_id": "call-1", "result": '{"temp_c": 21}'}]
    assert session.pending_messages() == []


def test_assemblyai_tool_result_after_the_reply_is_done_goes_out_at_once() -> None:
    session = ready_session()
    receive(session, started("r1"), tool_call("call-1"), done("r1"))
    assert sent(session.send(pv.ToolResult("call-1", "ok"))) == [{"type": "tool.result", "call_id": "call-1", "result": "ok"}]
    with pytest.raises(LocalProtocolError, match="call-1"):  # answered already
        session.send(pv.ToolResult("call-1", "again"))


def test_assemblyai_tool_result_waits_while_the_caller_talks_after_the_reply() -> None:
    # reply.done, then the caller speaks: reply.done is no longer the latest event, so a result finishing now
    # waits for the next completed reply.done (not for the end of a reply: there may be none under way).
    session = ready_session()
    receive(session, started("r1"), tool_call("call-1"), done("r1"), ev("input.speech.started"))
    assert session.send(pv.ToolResult("call-1", "ok")) == []
    assert session.pending_messages() == []
    receive(session, ev("input.speech.stopped"), started("r2"))
    assert session.pending_messages() == []
    receive(session, done("r2"))
    assert sent(session.pending_messages()) == [{"type": "tool.result", "call_id": "call-1", "result": "ok"}]


def test_assemblyai_results_of_an_interrupted_reply_are_discarded() -> None:
    session = ready_session()
    receive(session, started("r1"), tool_call("call-1"), tool_call("call-2"))
    assert session.send(pv.ToolResult("call-1", "held")) == []
    receive(session, ev("input.speech.started"), done("r1", "interrupted"))
    assert session.pending_messages() == []  # the held result was dropped
    assert session.send(pv.ToolResult("call-2", "late")) == []  # and a late one too
    assert session.state is AssemblyAIState.READY


def test_assemblyai_tool_call_with_string_arguments_passes_through() -> None:
    session = ready_session()
    [event] = receive(session, ev("tool.call", call_id="c", name="f", arguments='{"a": 1}'))
    assert event == pv.ToolCall("c", "f", '{"a": 1}', None)


# ------------------------------------------------------------- transcripts, errors


def test_assemblyai_transcripts() -> None:
    session = ready_session()
    events = receive(
        session,
        ev("transcript.user.delta", item_id="u1", text="What's the"),
        ev("transcript.user", item_id="u1", text="What's the weather?"),
        ev("transcript.agent.delta", reply_id="r1", item_id="i1", delta="Sun", start_ms=0, end_ms=200),
        ev("transcript.agent", reply_id="r1", item_id="i1", text="Sunny.", interrupted=False),
    )
    assert events == [
        pv.Transcript("user", "What's the", False, "u1", cumulative=True),  # the text so far, not a fragment
        pv.Transcript("user", "What's the weather?", True, "u1"),
        pv.Transcript("assistant", "Sun", False, "r1"),
        pv.Transcript("assistant", "Sunny.", True, "r1"),
    ]
    [cut] = receive(session, ev("transcript.agent", reply_id="r2", item_id="i2", text="It is", interrupted=True))
    assert cut == pv.Transcript("assistant", "It is", True, "r2", cut=True)  # already what the caller heard


@pytest.mark.parametrize("code", sorted(NON_FATAL_SESSION_ERRORS))
def test_assemblyai_message_level_session_errors_are_not_fatal_once_ready(code: str) -> None:
    session = ready_session()
    assert receive(session, ev("session.error", code=code, message="m")) == [pv.ProviderError("m", False, code)]


@pytest.mark.parametrize("code", ["unauthorized", "session_expired", "internal_error", "at_capacity", "brand_new"])
def test_assemblyai_session_level_errors_are_fatal(code: str) -> None:
    session = ready_session()
    assert receive(session, ev("session.error", code=code, message="m")) == [pv.ProviderError("m", True, code)]


def test_assemblyai_any_error_before_ready_is_fatal_and_reply_error_never() -> None:
    session = new_session()
    session.initial_messages()
    assert receive(session, ev("session.error", code="invalid_value", message="bad voice")) == [
        pv.ProviderError("bad voice", True, "invalid_value")
    ]
    session = ready_session()
    error = ev("reply.error", reply_id="r1", code="llm_timeout", message="slow", retryable=True)
    assert receive(session, error) == [pv.ProviderError("slow", False, "llm_timeout")]


def test_assemblyai_known_unmapped_and_unknown_types() -> None:
    session = ready_session()
    updated = ev("session.updated", config={})
    ended = ev("session.ended", session_duration_seconds=12.5)
    novel = ev("reply.something_new", x=1)
    assert receive(session, updated, ended, novel) == [
        pv.Other("session.updated", updated),
        pv.Other("session.ended", ended),
        pv.Unknown("reply.something_new", novel),
    ]


# ------------------------------------------------------------------ protocol errors


@pytest.mark.parametrize(
    "text",
    ["not json", "[]", '{"x": 1}', '{"type": null}', ev("reply.audio", reply_id="r", data="***"),
     ev("reply.audio", data="AAAA"), ev("reply.done", reply_id="r", status="weird"), ev("tool.call", call_id="c"),
     ev("tool.call", call_id="c", name="f", arguments=[1]), ev("transcript.user", item_id="u"),
     ev("session.error", code="x"), ev("session.ready", session_id="again")],
)
def test_assemblyai_malformed_server_messages_are_remote_errors(text: str) -> None:
    session = ready_session()
    with pytest.raises(RemoteProtocolError):
        session.receive_message(text)
    assert_dead(session)


@pytest.mark.parametrize("message", [audio("r1", b"\x00"), started("r1"), tool_call("c"), b"\x00\x01"])
def test_assemblyai_events_before_ready_or_binary_are_remote_errors(message: str | bytes) -> None:
    session = new_session()
    session.initial_messages()
    with pytest.raises(RemoteProtocolError):
        session.receive_message(message)
    assert_dead(session)


def test_assemblyai_misuse_is_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        new_session().receive_message(READY)
    with pytest.raises(LocalProtocolError):
        new_session().send(pv.SendAudio(b"\xff"))
    session = ready_session()
    with pytest.raises(LocalProtocolError, match="no open tool call"):
        session.send(pv.ToolResult("nope", "x"))
    assert_dead(session)
    session = new_session()
    session.initial_messages()
    with pytest.raises(LocalProtocolError):
        session.initial_messages()
    assert_dead(session)


def test_assemblyai_send_text_is_dropped_without_harm() -> None:
    session = ready_session()
    assert session.send(pv.SendText("The caller pressed 1.")) == []
    assert session.state is AssemblyAIState.READY


@pytest.mark.parametrize(
    "message",
    [
        {"type": "input.audio", "audio": "!!"},  # not base64
        {"type": "input.audio", "audio": "AAAA", "extra": 1},  # unknown key
        {"type": "tool.result", "call_id": "c"},  # result missing
        {"type": "tool.result", "call_id": "c", "result": {"a": 1}},  # result must be a string
        {"type": "session.update", "session": {"input": {"format": {"encoding": "audio/mulaw"}}}},
        {"type": "session.update", "session": {"system_prompt": "x", "voice": "ivy"}},  # voice belongs in output
        {"type": "reply.cancel", "reply_id": "r"},  # not a documented client event
    ],
)
def test_assemblyai_fake_schema_rejects_what_the_real_server_would(message: dict[str, typing.Any]) -> None:
    """The fake's strict schemas (used by every test here) catch typos, wrong types and unknown events."""
    with pytest.raises(AssertionError):
        validate_client_message(json.dumps(message))
