"""Tests for mediaserver.protocol.providers.elevenlabs (ElevenLabsSession).

The initiation message is validated against the ``elevenlabs`` SDK's
``ConversationInitiationClientDataRequestInput`` (no unknown keys, exact
round trip, via tests/elevenlabs_fake.validate_initiation).  The SDK has no
typed models for the other events, so server fixtures are hand-written in
the shapes the SDK's ``conversation.py`` reads, and our later client
messages are checked against the exact shapes it sends.
"""

from __future__ import annotations

import base64
import json
import typing
from typing import Any

import pytest
from elevenlabs.types import ClientEvent

from mediaserver.protocol.errors import LocalProtocolError, RemoteProtocolError
from mediaserver.protocol.providers import (
    AudioDelta,
    AudioDone,
    AudioFormat,
    CancelResponse,
    CreateResponse,
    Other,
    ProviderError,
    ProviderSession,
    SendAudio,
    SessionReady,
    SpeechStarted,
    ToolCall,
    ToolResult,
    Transcript,
    Truncate,
    Unknown,
)
from mediaserver.protocol.providers.base import SendText
from mediaserver.protocol.providers.elevenlabs import ElevenLabsConfig, ElevenLabsSession, SessionState

from tests.elevenlabs_fake import _validate_later, validate_initiation


def msg(type_: str, **body: Any) -> str:
    return json.dumps({"type": type_, **body})


def metadata(output: str | None = "ulaw_8000", input_: str | None = "ulaw_8000") -> str:
    event: dict[str, Any] = {"conversation_id": "conv_123"}
    if output is not None:
        event["agent_output_audio_format"] = output
    if input_ is not None:
        event["user_input_audio_format"] = input_
    return msg("conversation_initiation_metadata", conversation_initiation_metadata_event=event)


def audio(chunk: bytes, event_id: int) -> str:
    return msg("audio", audio_event={"audio_base_64": base64.b64encode(chunk).decode(), "event_id": event_id})


def ready_session(config: ElevenLabsConfig | None = None) -> ElevenLabsSession:
    session = ElevenLabsSession(config)
    session.initial_messages()
    session.receive_message(metadata())
    assert list(session.events()) == [SessionReady("conv_123")]
    return session


def feed(session: ElevenLabsSession, *messages: str) -> list[Any]:
    for message in messages:
        session.receive_message(message)
    return list(session.events())


# ------------------------------------------------------------------ outbound


def test_elevenlabs_initiation_carries_prompt_and_first_message() -> None:
    session = ElevenLabsSession(
        ElevenLabsConfig(prompt="Be brief.", first_message="Hello, how can I help?", dynamic_variables={"caller": "+1555"})
    )
    [text] = session.initial_messages()
    model = validate_initiation(text)
    assert model.conversation_config_override is not None
    agent = model.conversation_config_override.agent
    assert agent is not None and agent.prompt is not None
    assert agent.prompt.prompt == "Be brief."
    assert agent.first_message == "Hello, how can I help?"
    assert model.dynamic_variables == {"caller": "+1555"}
    assert session.state is SessionState.AWAITING_METADATA
    with pytest.raises(LocalProtocolError):
        session.initial_messages()


def test_elevenlabs_initiation_without_overrides_keeps_the_agents_settings() -> None:
    [text] = ElevenLabsSession().initial_messages()
    model = validate_initiation(text)
    assert json.loads(text) == {"type": "conversation_initiation_client_data", "conversation_config_override": {}}
    assert model.conversation_config_override is not None and model.conversation_config_override.agent is None


def test_elevenlabs_config_rejects_bad_dynamic_variables() -> None:
    with pytest.raises(LocalProtocolError):
        ElevenLabsConfig(dynamic_variables={"x": [1]})  # type: ignore[dict-item]


def test_elevenlabs_formats_are_ulaw_8k_both_ways() -> None:
    session = ElevenLabsSession()
    assert isinstance(session, ProviderSession)
    assert session.input_format == AudioFormat("pcmu", 8000)
    assert session.output_format == AudioFormat("pcmu", 8000)
    assert session.keepalive_interval_s is None and session.keepalive() == []


def test_elevenlabs_send_audio_is_a_bare_user_audio_chunk_with_exact_bytes() -> None:
    session = ready_session()
    payload = bytes(range(256)) * 2
    [text] = session.send(SendAudio(payload))
    assert _validate_later(text) == {"user_audio_chunk": base64.b64encode(payload).decode()}
    assert base64.b64decode(json.loads(text)["user_audio_chunk"]) == payload


@pytest.mark.parametrize(
    ("output", "is_error"),
    [('{"temperature": 21}', False), ('{"error": "no tools are configured"}', True), ("plain text", False)],
)
def test_elevenlabs_tool_result_is_client_tool_result(output: str, is_error: bool) -> None:
    session = ready_session()
    [text] = session.send(ToolResult("call_7", output))
    assert _validate_later(text) == {
        "type": "client_tool_result",
        "tool_call_id": "call_7",
        "result": output,
        "is_error": is_error,
    }


def test_elevenlabs_send_text_is_a_user_message() -> None:
    session = ready_session()
    [text] = session.send(SendText("The caller pressed 1, 2 on the phone keypad.", respond=False))
    assert _validate_later(text) == {"type": "user_message", "text": "The caller pressed 1, 2 on the phone keypad."}


def test_elevenlabs_truncate_cancel_and_create_send_nothing() -> None:
    session = ready_session()
    feed(session, audio(b"\x7f" * 160, 1))
    assert session.send(Truncate("el-reply-1", 10)) == []
    assert session.send(CancelResponse()) == []
    assert session.send(CreateResponse("say hi")) == []
    assert session.state is SessionState.READY


def test_elevenlabs_commands_before_initiation_are_local_errors() -> None:
    session = ElevenLabsSession()
    with pytest.raises(LocalProtocolError):
        session.send(SendAudio(b"\xff"))
    with pytest.raises(LocalProtocolError):
        session.initial_messages()  # dead now


def test_elevenlabs_unknown_command_is_local_error() -> None:
    session = ready_session()
    with pytest.raises(LocalProtocolError):
        session.send("not a command")  # type: ignore[arg-type]
    assert session.state is SessionState.ERROR


# ------------------------------------------------------------------- inbound


def test_elevenlabs_metadata_with_ulaw_formats_is_session_ready() -> None:
    session = ElevenLabsSession()
    session.initial_messages()
    assert feed(session, metadata()) == [SessionReady("conv_123")]
    assert session.state is SessionState.READY and session.conversation_id == "conv_123"
    with pytest.raises(RemoteProtocolError):
        feed(session, metadata())  # only once


@pytest.mark.parametrize(
    ("output", "input_", "names"),
    [
        ("pcm_16000", "ulaw_8000", ["agent_output_audio_format", "tts.agent_output_audio_format"]),
        ("ulaw_8000", "pcm_16000", ["user_input_audio_format", "asr.user_input_audio_format"]),
        ("pcm_44100", "pcm_16000", ["agent_output_audio_format", "user_input_audio_format"]),
    ],
)
def test_elevenlabs_format_mismatch_is_fatal_and_names_the_agent_setting(
    output: str, input_: str, names: list[str]
) -> None:
    session = ElevenLabsSession()
    session.initial_messages()
    [error] = feed(session, metadata(output, input_))
    assert isinstance(error, ProviderError) and error.fatal and error.code == "audio_format_mismatch"
    for name in names:
        assert name in error.message
    assert "ulaw_8000" in error.message
    assert session.state is SessionState.REFUSED
    assert session.send(SendAudio(b"\xff" * 160)) == []  # no µ-law to a PCM agent
    assert feed(session, msg("ping", ping_event={"event_id": 3})) == [Other("ping", msg("ping", ping_event={"event_id": 3}))]


def test_elevenlabs_metadata_without_formats_is_accepted() -> None:
    session = ElevenLabsSession()
    session.initial_messages()
    assert feed(session, metadata(None, None)) == [SessionReady("conv_123")]


def test_elevenlabs_audio_is_one_item_per_reply_keeping_the_event_id() -> None:
    session = ready_session()
    events = feed(
        session,
        audio(b"a" * 160, 1),
        audio(b"b" * 100, 1),
        msg("agent_response", agent_response_event={"agent_response": " Second reply. "}),
        audio(b"c" * 50, 2),
        msg("user_transcript", user_transcription_event={"user_transcript": "thanks"}),
        audio(b"d" * 20, 3),
    )
    assert events == [
        AudioDelta("el-reply-1", b"a" * 160, "1"),
        AudioDelta("el-reply-1", b"b" * 100, "1"),
        AudioDone("el-reply-1"),  # a new reply closes the last (agent_response_complete is optional)
        Transcript("assistant", "Second reply.", final=True, item_id="el-reply-2"),  # the text of the reply it opens
        AudioDelta("el-reply-2", b"c" * 50, "2"),
        AudioDone("el-reply-2"),
        Transcript("user", "thanks", final=True),
        AudioDelta("el-reply-3", b"d" * 20, "3"),
    ]
    # With nothing arriving for a reply, nothing is closed.
    assert feed(ready_session(), msg("user_transcript", user_transcription_event={"user_transcript": "hi"})) == [
        Transcript("user", "hi", final=True)
    ]


def test_elevenlabs_interruption_drops_audio_up_to_its_event_id() -> None:
    session = ready_session()
    late_same, late_older = audio(b"x" * 160, 5), audio(b"y" * 160, 4)
    events = feed(
        session,
        audio(b"a" * 160, 5),
        msg("interruption", interruption_event={"event_id": 5}),
        late_same,
        late_older,
        audio(b"z" * 80, 6),
    )
    assert events == [
        AudioDelta("el-reply-1", b"a" * 160, "5"),
        SpeechStarted(item_id=None, audio_start_ms=None),
        Other("audio", late_same),
        Other("audio", late_older),
        AudioDelta("el-reply-2", b"z" * 80, "6"),  # a new reply, never confused with the cut one
    ]
    # A lower interruption id never re-admits dropped audio.
    assert feed(session, msg("interruption", interruption_event={"event_id": 2}), audio(b"q", 5))[1] == Other(
        "audio", audio(b"q", 5)
    )


def test_elevenlabs_ping_queues_a_pong_with_the_same_event_id() -> None:
    session = ready_session()
    ping = msg("ping", ping_event={"event_id": 123456, "ping_ms": 50})
    assert feed(session, ping) == [Other("ping", ping)]
    [pong] = session.pending_messages()
    assert _validate_later(pong) == {"type": "pong", "event_id": 123456}
    assert session.pending_messages() == []
    feed(session, msg("ping", ping_event={"event_id": 1, "ping_ms": None}), msg("ping", ping_event={"event_id": 2}))
    assert [json.loads(p)["event_id"] for p in session.pending_messages()] == [1, 2]


def test_elevenlabs_client_tool_call_is_tool_call_with_json_parameters() -> None:
    session = ready_session()
    [call] = feed(
        session,
        msg(
            "client_tool_call",
            client_tool_call={"tool_name": "get_weather", "tool_call_id": "tc_1", "parameters": {"city": "Zürich"}},
        ),
    )
    assert call == ToolCall("tc_1", "get_weather", '{"city":"Zürich"}')
    [no_params] = feed(session, msg("client_tool_call", client_tool_call={"tool_name": "hang_up", "tool_call_id": "tc_2"}))
    assert no_params == ToolCall("tc_2", "hang_up", "{}")


def test_elevenlabs_correction_and_complete() -> None:
    session = ready_session()
    events = feed(
        session,
        audio(b"a" * 10, 1),
        msg(
            "agent_response_correction",
            agent_response_correction_event={"original_agent_response": "Hello there friend", "corrected_agent_response": "Hello"},
        ),
        msg("agent_response_complete"),
        msg("agent_response_complete"),
    )
    assert isinstance(events[1], Other)  # (the bridge cuts the reply's text at what Twilio played)
    assert events[2] == AudioDone("el-reply-1")
    assert isinstance(events[3], Other)  # nothing open any more


def test_elevenlabs_client_error_is_a_non_fatal_provider_error() -> None:
    session = ready_session()
    [error] = feed(session, msg("client_error", client_error_event={"message": "Override for field prompt is not allowed"}))
    assert error == ProviderError("Override for field prompt is not allowed", fatal=False, code="client_error")
    [opaque] = feed(session, msg("client_error"))
    assert isinstance(opaque, ProviderError) and "client_error" in opaque.message


def test_elevenlabs_every_sdk_event_name_is_known() -> None:
    names = typing.get_args(typing.get_args(ClientEvent)[0])
    assert "audio" in names and "interruption" in names
    session = ready_session()
    for name in names:
        if name in ("conversation_initiation_metadata", "audio", "interruption", "ping", "user_transcript",
                    "agent_response", "agent_response_correction", "client_tool_call", "client_error"):
            continue  # need a payload; covered above
        [event] = feed(session, msg(name))
        assert not isinstance(event, Unknown), name


def test_elevenlabs_unknown_type_is_unknown_with_raw_text() -> None:
    session = ready_session()
    raw = msg("brand_new_event", x=1)
    assert feed(session, raw) == [Unknown("brand_new_event", raw)]


@pytest.mark.parametrize(
    "bad",
    [
        b"\x00\x01",
        "not json",
        "[1, 2]",
        '{"no_type": 1}',
        msg("audio", audio_event={"audio_base_64": "!!!", "event_id": 1}),
        msg("audio", audio_event={"audio_base_64": "AAAA", "event_id": -1}),
        msg("audio", audio_event={"audio_base_64": "AAAA"}),
        msg("audio"),
        msg("ping", ping_event={"event_id": "x"}),
        msg("interruption", interruption_event={}),
        msg("client_tool_call", client_tool_call={"tool_name": "x"}),
        msg("client_tool_call", client_tool_call={"tool_name": "x", "tool_call_id": "1", "parameters": [1]}),
        msg("user_transcript", user_transcription_event={"user_transcript": 5}),
    ],
)
def test_elevenlabs_malformed_messages_are_remote_errors_and_kill_the_core(bad: str | bytes) -> None:
    session = ready_session()
    with pytest.raises(RemoteProtocolError):
        session.receive_message(bad)
    assert session.state is SessionState.ERROR
    with pytest.raises(LocalProtocolError):
        session.send(SendAudio(b"\xff"))


def test_elevenlabs_message_before_initiation_is_local_error() -> None:
    session = ElevenLabsSession()
    with pytest.raises(LocalProtocolError):
        session.receive_message(metadata())
