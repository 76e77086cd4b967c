"""Unit tests of the Deepgram Voice Agent sans-I/O core.

Client messages are validated with the ``deepgram-sdk`` agent types
(:func:`tests.deepgram_fake.validate_client_message`: ``model_validate`` plus
no unknown keys); server messages are SDK models' JSON.
"""

from __future__ import annotations

import json
import typing
import warnings

import pydantic
import pytest
from deepgram.agent.v1.types import (
    AgentV1AgentAudioDone,
    AgentV1AgentStartedSpeaking,
    AgentV1AgentThinking,
    AgentV1ConversationText,
    AgentV1Error,
    AgentV1FunctionCallCancelled,
    AgentV1FunctionCallCancelledFunctionsItem,
    AgentV1FunctionCallRequest,
    AgentV1FunctionCallRequestFunctionsItem,
    AgentV1InjectUserMessage,
    AgentV1KeepAlive,
    AgentV1SendFunctionCallResponse,
    AgentV1Settings,
    AgentV1SettingsApplied,
    AgentV1UserStartedSpeaking,
    AgentV1Warning,
    AgentV1Welcome,
)

from mediaserver.protocol.errors import LocalProtocolError, RemoteProtocolError
from mediaserver.protocol.providers import base as pv
from mediaserver.protocol.providers.deepgram import (
    KNOWN_SERVER_TYPES,
    DeepgramAgentConfig,
    DeepgramAgentSession,
    DeepgramState,
)
from tests.deepgram_fake import validate_client_message

WEATHER = pv.FunctionTool(
    "get_weather",
    "Current weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)

HANG_UP = pv.FunctionTool("end_call", "Hang up", irreversible=True)


def server(model: pydantic.BaseModel) -> str:
    return model.model_dump_json(exclude_none=True)


WELCOME = server(AgentV1Welcome(type="Welcome", request_id="req-1"))
APPLIED = server(AgentV1SettingsApplied(type="SettingsApplied"))
USER_STARTED = server(AgentV1UserStartedSpeaking(type="UserStartedSpeaking"))
AGENT_STARTED = server(
    AgentV1AgentStartedSpeaking(type="AgentStartedSpeaking", total_latency=1.0, tts_latency=0.4, ttt_latency=0.6)
)
AUDIO_DONE = server(AgentV1AgentAudioDone(type="AgentAudioDone"))


def function_call_request(*calls: tuple[str, str, str, bool]) -> str:
    items = [AgentV1FunctionCallRequestFunctionsItem(id=i, name=n, arguments=a, client_side=c) for i, n, a, c in calls]
    return server(AgentV1FunctionCallRequest(type="FunctionCallRequest", functions=items))


def function_call_cancelled(call_id: str, name: str) -> str:
    item = AgentV1FunctionCallCancelledFunctionsItem(id=call_id, name=name)
    return server(AgentV1FunctionCallCancelled(type="FunctionCallCancelled", functions=[item]))


def new_session(**overrides: typing.Any) -> DeepgramAgentSession:
    values: dict[str, typing.Any] = {"instructions": "Be brief."}
    values.update(overrides)
    session = DeepgramAgentSession(DeepgramAgentConfig(**values))
    assert session.initial_messages() == []
    return session


def ready_session(**overrides: typing.Any) -> DeepgramAgentSession:
    session = new_session(**overrides)
    receive(session, WELCOME)
    [settings] = session.pending_messages()
    validate_client_message(typing.cast(str, settings))
    assert receive(session, APPLIED) == [pv.SessionReady("req-1")]
    assert session.state is DeepgramState.READY
    return session


def receive(session: DeepgramAgentSession, *messages: str | bytes) -> list[pv.ProviderEvent]:
    events: list[pv.ProviderEvent] = []
    for message in messages:
        session.receive_message(message)
        events.extend(session.events())
    return events


def assert_dead(session: DeepgramAgentSession) -> None:
    assert session.state is DeepgramState.ERROR
    with pytest.raises(LocalProtocolError):
        session.receive_message(APPLIED)
    with pytest.raises(LocalProtocolError):
        session.send(pv.SendAudio(b"\xff"))


# ------------------------------------------------------------------ handshake


def test_deepgram_settings_go_out_only_after_welcome_and_validate_against_the_sdk() -> None:
    session = new_session(greeting="Hello, how can I help?", tools=(WEATHER, HANG_UP))
    assert session.pending_messages() == []  # nothing owed before Welcome
    assert session.keepalive() == []  # no session to keep alive yet
    assert receive(session, WELCOME) == [pv.Other("Welcome", WELCOME)]
    assert session.state is DeepgramState.AWAITING_APPLIED
    [text] = session.pending_messages()
    assert session.pending_messages() == []  # sent once
    model = validate_client_message(typing.cast(str, text))
    assert isinstance(model, AgentV1Settings)
    assert model.model_dump(mode="json", exclude_unset=True) == json.loads(typing.cast(str, text))
    wire = json.loads(typing.cast(str, text))
    assert wire["audio"] == {
        "input": {"encoding": "mulaw", "sample_rate": 8000},
        "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"},
    }
    agent = wire["agent"]
    assert agent["listen"] == {"provider": {"type": "deepgram", "version": "v1", "model": "nova-3"}}
    assert agent["think"] == {
        "provider": {"type": "open_ai", "model": "gpt-4o-mini"},
        "prompt": "Be brief.",
        # an irreversible function waits for the caller's turn to be confirmed (no speculative hang-up)
        "functions": [WEATHER.to_json(), {**HANG_UP.to_json(), "defer_until_eot": True}],
    }
    functions = model.agent.think.functions  # type: ignore[union-attr]
    assert [f.defer_until_eot for f in functions] == [None, True]  # the SDK's own field, not an unknown extra
    assert agent["speak"] == {"provider": {"type": "deepgram", "model": "aura-2-thalia-en"}}
    assert agent["greeting"] == "Hello, how can I help?"
    assert receive(session, APPLIED) == [pv.SessionReady("req-1")]
    assert session.input_format == session.output_format == pv.AudioFormat("pcmu", 8000)


def test_deepgram_settings_from_config_models_and_flux_listen() -> None:
    session = new_session(
        listen_model="flux-general-en", think_provider="anthropic", think_model="claude-sonnet-4-5",
        speak_model="aura-2-andromeda-en",
    )
    receive(session, WELCOME)
    [text] = session.pending_messages()
    model = validate_client_message(typing.cast(str, text))
    wire = json.loads(typing.cast(str, text))
    assert wire["agent"]["listen"]["provider"] == {"type": "deepgram", "version": "v2", "model": "flux-general-en"}
    assert wire["agent"]["think"] == {"provider": {"type": "anthropic", "model": "claude-sonnet-4-5"}, "prompt": "Be brief."}
    assert wire["agent"]["speak"]["provider"]["model"] == "aura-2-andromeda-en"
    assert "greeting" not in wire["agent"] and isinstance(model, AgentV1Settings)


def test_deepgram_config_validation() -> None:
    with pytest.raises(LocalProtocolError, match="think_model"):
        DeepgramAgentConfig(instructions="x", think_model="")
    with pytest.raises(LocalProtocolError, match="keepalive_interval_s"):
        DeepgramAgentConfig(instructions="x", keepalive_interval_s=0)
    with pytest.raises(LocalProtocolError, match="max_buffered_audio_ms"):
        DeepgramAgentConfig(instructions="x", max_buffered_audio_ms=-1)


# ------------------------------------------------------------------- early audio


def test_deepgram_audio_before_settings_applied_is_buffered_then_flushed_in_order() -> None:
    session = new_session()
    frames = [bytes([n]) * 160 for n in range(1, 6)]
    assert session.send(pv.SendAudio(frames[0])) == []  # before Welcome
    receive(session, WELCOME)
    assert session.send(pv.SendAudio(frames[1])) == []  # Settings not applied yet
    settings = session.pending_messages()
    assert len(settings) == 1 and isinstance(settings[0], str)  # Settings only, no audio yet
    assert session.send(pv.SendAudio(frames[2])) == []
    assert session.buffered_audio_bytes == 480
    receive(session, APPLIED)
    assert session.pending_messages() == frames[:3]  # flushed after SettingsApplied, in order
    assert session.buffered_audio_bytes == 0
    assert session.send(pv.SendAudio(frames[3])) == [frames[3]]
    assert session.dropped_early_bytes == 0


def test_deepgram_early_audio_flushes_with_the_next_send_if_that_comes_first() -> None:
    session = new_session()
    receive(session, WELCOME)
    session.pending_messages()
    session.send(pv.SendAudio(b"\x01" * 160))
    session.receive_message(APPLIED)
    assert session.send(pv.SendAudio(b"\x02" * 160)) == [b"\x01" * 160, b"\x02" * 160]
    assert session.pending_messages() == []  # nothing sent twice


def test_deepgram_early_audio_buffer_is_bounded_and_keeps_the_newest() -> None:
    session = new_session(max_buffered_audio_ms=40)  # 320 bytes of µ-law
    frames = [bytes([n]) * 160 for n in range(1, 5)]
    for frame in frames:
        session.send(pv.SendAudio(frame))
    assert session.buffered_audio_bytes == 320
    assert session.dropped_early_bytes == 320
    receive(session, WELCOME, APPLIED)
    assert session.pending_messages()[1:] == frames[2:]  # after the Settings message


# ------------------------------------------------------------------------ audio


def test_deepgram_audio_both_ways_is_raw_binary_frames() -> None:
    session = ready_session()
    payload = bytes(range(256))
    assert session.send(pv.SendAudio(payload)) == [payload]
    events = receive(session, AGENT_STARTED, b"\x10" * 320, b"\x20" * 100, AUDIO_DONE)
    assert events == [
        pv.ResponseStarted("dg-reply-1"),
        pv.AudioDelta("dg-reply-1", b"\x10" * 320),
        pv.AudioDelta("dg-reply-1", b"\x20" * 100),
        pv.AudioDone("dg-reply-1"),
        pv.ResponseDone("dg-reply-1", "completed", None),
    ]


def test_deepgram_each_turn_and_each_barge_in_gets_a_fresh_item_id() -> None:
    session = ready_session()
    events = receive(
        session,
        b"\x01" * 10,  # audio without AgentStartedSpeaking (e.g. the greeting)
        AUDIO_DONE,
        b"\x02" * 10,  # after AgentAudioDone
        USER_STARTED,
        b"\x03" * 10,  # after a barge-in
        AGENT_STARTED,
        b"\x04" * 10,
        AUDIO_DONE,
        AUDIO_DONE,  # a second done without audio in between
    )
    assert events == [
        pv.AudioDelta("dg-reply-1", b"\x01" * 10),
        pv.AudioDone("dg-reply-1"),
        pv.AudioDelta("dg-reply-2", b"\x02" * 10),
        pv.SpeechStarted(None, None),
        pv.AudioDelta("dg-reply-3", b"\x03" * 10),
        pv.ResponseStarted("dg-reply-4"),
        pv.AudioDelta("dg-reply-4", b"\x04" * 10),
        pv.AudioDone("dg-reply-4"),
        pv.ResponseDone("dg-reply-4", "completed", None),
        pv.Other("AgentAudioDone", AUDIO_DONE),
    ]


def test_deepgram_a_response_ends_at_its_audio_done_or_a_barge_in() -> None:
    """Every ResponseStarted gets one ResponseDone, so the bridge knows when the agent has stopped talking."""
    session = ready_session()
    events = receive(
        session,
        AGENT_STARTED,
        b"\x01" * 10,
        USER_STARTED,  # barge-in: that response is over
        USER_STARTED,  # again, with no response open: nothing more
        AGENT_STARTED,
        AGENT_STARTED,  # a new one while the last was never said done: the last is over
        AUDIO_DONE,
    )
    assert events == [
        pv.ResponseStarted("dg-reply-1"),
        pv.AudioDelta("dg-reply-1", b"\x01" * 10),
        pv.SpeechStarted(None, None),
        pv.ResponseDone("dg-reply-1", "cancelled", "interrupted"),
        pv.SpeechStarted(None, None),
        pv.ResponseStarted("dg-reply-2"),
        pv.ResponseDone("dg-reply-2", "completed", None),
        pv.ResponseStarted("dg-reply-3"),
        pv.AudioDone("dg-reply-3"),
        pv.ResponseDone("dg-reply-3", "completed", None),
    ]


def assistant_text(content: str) -> str:
    return server(AgentV1ConversationText(type="ConversationText", role="assistant", content=content))


def test_deepgram_the_agents_text_is_the_transcript_of_the_reply_it_is_spoken_in() -> None:
    """Its item id is the reply's, whichever comes first, so a barge-in's cut of the reply cuts its text."""
    session = ready_session()
    events = receive(
        session,
        assistant_text("Hello!"),  # the greeting: text, then audio, with no AgentStartedSpeaking
        b"\x01" * 10,
        assistant_text("How can I help?"),  # a second text of the same reply
        AUDIO_DONE,
        assistant_text("It is sunny."),  # text before its reply's start and audio: the reply keeps its name
        AGENT_STARTED,
        b"\x02" * 10,
        USER_STARTED,
        AGENT_STARTED,  # start before text
        assistant_text("Sure."),
        b"\x03" * 10,
    )
    assert events == [
        pv.Transcript("assistant", "Hello!", True, "dg-reply-1"),
        pv.AudioDelta("dg-reply-1", b"\x01" * 10),
        pv.Transcript("assistant", "Hello! How can I help?", True, "dg-reply-1"),
        pv.AudioDone("dg-reply-1"),
        pv.Transcript("assistant", "It is sunny.", True, "dg-reply-2"),
        pv.ResponseStarted("dg-reply-2"),
        pv.AudioDelta("dg-reply-2", b"\x02" * 10),
        pv.SpeechStarted(None, None),
        pv.ResponseDone("dg-reply-2", "cancelled", "interrupted"),
        pv.ResponseStarted("dg-reply-3"),
        pv.Transcript("assistant", "Sure.", True, "dg-reply-3"),
        pv.AudioDelta("dg-reply-3", b"\x03" * 10),
    ]


def test_deepgram_a_text_named_reply_is_not_taken_over_once_its_audio_has_begun() -> None:
    session = ready_session()
    events = receive(session, assistant_text("Hi."), b"\x01" * 10, AGENT_STARTED, b"\x02" * 10)
    assert events == [
        pv.Transcript("assistant", "Hi.", True, "dg-reply-1"),
        pv.AudioDelta("dg-reply-1", b"\x01" * 10),
        pv.ResponseStarted("dg-reply-2"),  # a start after audio began is a new reply, as before
        pv.AudioDelta("dg-reply-2", b"\x02" * 10),
    ]


def test_deepgram_truncate_and_cancel_need_no_message_create_response_is_refused() -> None:
    session = ready_session()
    receive(session, AGENT_STARTED, b"\x01" * 800, USER_STARTED)
    assert session.send(pv.Truncate("dg-reply-1", 40)) == []
    assert session.send(pv.CancelResponse()) == []
    with pytest.raises(LocalProtocolError, match="no way to ask for a response"):
        session.send(pv.CreateResponse("say hi"))
    assert_dead(session)


# ------------------------------------------------------------------- other events


def test_deepgram_transcripts_errors_and_warnings() -> None:
    session = ready_session()
    user = server(AgentV1ConversationText(type="ConversationText", role="user", content="What's the weather?"))
    agent = server(AgentV1ConversationText(type="ConversationText", role="assistant", content="Sunny."))
    warning = server(AgentV1Warning(type="Warning", code="SLOW_THINK", description="LLM is slow"))
    error = server(AgentV1Error(type="Error", code="INVALID_SETTINGS", description="bad think provider"))
    thinking = server(AgentV1AgentThinking(type="AgentThinking", content="hmm"))
    assert receive(session, user, agent, warning, thinking, error) == [
        pv.Transcript("user", "What's the weather?", True),
        pv.Transcript("assistant", "Sunny.", True, "dg-reply-1"),
        pv.ProviderError("LLM is slow", fatal=False, code="SLOW_THINK"),
        pv.Other("AgentThinking", thinking),
        pv.ProviderError("bad think provider", fatal=True, code="INVALID_SETTINGS"),
    ]


def test_deepgram_error_before_settings_applied_is_reported() -> None:
    session = new_session()
    error = server(AgentV1Error(type="Error", code="UNAUTHORIZED", description="bad key"))
    assert receive(session, WELCOME, error) == [pv.Other("Welcome", WELCOME), pv.ProviderError("bad key", True, "UNAUTHORIZED")]


def test_deepgram_unknown_type_is_unknown_with_raw_text() -> None:
    session = ready_session()
    text = '{"type":"SomethingNew","x":1}'
    assert receive(session, text) == [pv.Unknown("SomethingNew", text)]


def test_deepgram_every_sdk_server_message_type_is_known() -> None:
    with warnings.catch_warnings():  # the SDK's socket client imports websockets.legacy
        warnings.simplefilter("ignore", DeprecationWarning)
        from deepgram.agent.v1 import socket_client
    union = typing.get_args(socket_client.V1SocketClientResponse)
    sdk_types = set()
    for member in union:
        if isinstance(member, type) and issubclass(member, pydantic.BaseModel):
            sdk_types.add(member.model_fields["type"].default)
    assert sdk_types and sdk_types <= KNOWN_SERVER_TYPES, sorted(sdk_types - KNOWN_SERVER_TYPES)


# ------------------------------------------------------------------ function calls


def test_deepgram_function_call_round_trip_client_side_only() -> None:
    session = ready_session(tools=(WEATHER,))
    request = function_call_request(
        ("call-1", "get_weather", '{"city":"Paris"}', True),
        ("call-2", "server_lookup", "{}", False),
        ("call-3", "get_weather", '{"city":"Rome"}', True),
    )
    assert receive(session, request) == [
        pv.ToolCall("call-1", "get_weather", '{"city":"Paris"}'),
        pv.ToolCall("call-3", "get_weather", '{"city":"Rome"}'),
    ]
    [text] = session.send(pv.ToolResult("call-3", '{"temp_c": 21}'))
    model = validate_client_message(typing.cast(str, text))
    assert isinstance(model, AgentV1SendFunctionCallResponse)
    assert json.loads(typing.cast(str, text)) == {
        "type": "FunctionCallResponse", "id": "call-3", "name": "get_weather", "content": '{"temp_c": 21}',
    }
    [text] = session.send(pv.ToolResult("call-1", "cloudy"))
    assert json.loads(typing.cast(str, text))["id"] == "call-1"
    with pytest.raises(LocalProtocolError, match="call-1"):  # answered already
        session.send(pv.ToolResult("call-1", "again"))


def test_deepgram_server_side_only_request_is_other_and_never_answered() -> None:
    session = ready_session()
    request = function_call_request(("call-9", "lookup", "{}", False))
    assert receive(session, request) == [pv.Other("FunctionCallRequest", request)]
    with pytest.raises(LocalProtocolError, match="call-9"):
        session.send(pv.ToolResult("call-9", "x"))


def test_deepgram_cancelled_call_is_never_answered() -> None:
    session = ready_session()
    receive(session, function_call_request(("call-1", "get_weather", "{}", True), ("call-2", "get_weather", "{}", True)))
    cancelled = function_call_cancelled("call-1", "get_weather")
    assert receive(session, cancelled) == [pv.ToolCallsCancelled(("call-1",), cancelled)]
    assert session.send(pv.ToolResult("call-1", "late")) == []  # dropped, nothing sent
    assert len(session.send(pv.ToolResult("call-2", "fine"))) == 1
    assert session.state is DeepgramState.READY


# ------------------------------------------------------------------------ keepalive


def test_deepgram_keepalive_is_valid_and_interval_configurable() -> None:
    session = new_session(keepalive_interval_s=2.5)
    assert session.keepalive_interval_s == 2.5
    receive(session, WELCOME)
    [text] = session.keepalive()
    assert isinstance(validate_client_message(typing.cast(str, text)), AgentV1KeepAlive)
    assert DeepgramAgentSession(DeepgramAgentConfig(instructions="x")).keepalive_interval_s == 8.0


# ------------------------------------------------------------------ protocol errors


@pytest.mark.parametrize(
    "text",
    ["not json", "[1, 2]", '{"no_type": 1}', '{"type": 7}', "{", '{"type":"ConversationText","role":"robot","content":"x"}',
     '{"type":"ConversationText","role":"user"}', '{"type":"FunctionCallRequest","functions":"x"}',
     '{"type":"FunctionCallRequest","functions":[{"id":"a","name":"f","arguments":{},"client_side":true}]}',
     '{"type":"Error","code":"X"}'],
)
def test_deepgram_malformed_server_messages_are_remote_errors(text: str) -> None:
    session = ready_session()
    with pytest.raises(RemoteProtocolError):
        session.receive_message(text)
    assert_dead(session)


@pytest.mark.parametrize(
    ("prefix", "message"),
    [([], APPLIED), ([], b"\x00" * 10), ([WELCOME], WELCOME), ([WELCOME], b"\x00" * 10), ([WELCOME, APPLIED], APPLIED)],
)
def test_deepgram_out_of_order_server_messages_are_remote_errors(prefix: list[str], message: str | bytes) -> None:
    session = new_session()
    receive(session, *prefix)
    with pytest.raises(RemoteProtocolError):
        session.receive_message(message)
    assert_dead(session)


def test_deepgram_use_before_initial_messages_or_twice_is_local_error() -> None:
    fresh = DeepgramAgentSession(DeepgramAgentConfig(instructions="x"))
    with pytest.raises(LocalProtocolError):
        fresh.receive_message(WELCOME)
    fresh = DeepgramAgentSession(DeepgramAgentConfig(instructions="x"))
    with pytest.raises(LocalProtocolError):
        fresh.send(pv.SendAudio(b"\xff"))
    session = new_session()
    with pytest.raises(LocalProtocolError):
        session.initial_messages()
    assert_dead(session)


def test_deepgram_unknown_command_is_local_error() -> None:
    session = ready_session()
    with pytest.raises(LocalProtocolError, match="not a provider command"):
        session.send("audio")  # type: ignore[arg-type]
    assert_dead(session)


def test_deepgram_send_text_is_inject_user_message_once_ready() -> None:
    session = new_session()
    assert session.send(pv.SendText("The caller pressed 1.")) == []  # no agent yet
    receive(session, WELCOME, APPLIED)
    [text] = session.send(pv.SendText("The caller pressed 1."))
    model = validate_client_message(typing.cast(str, text))
    assert isinstance(model, AgentV1InjectUserMessage) and model.content == "The caller pressed 1."


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"KeepAlive","extra":1}',  # unknown key
        '{"type":"Settings","audio":{"input":{"encoding":"mulaw","sample_rate":"8000"}},"agent":{}}',  # coerced
        '{"type":"Settings","audio":{},"agent":{"think":{"provider":{"type":"open_ai","model":"m"},"promt":"x"}}}',
        '{"type":"FunctionCallResponse","id":"a","content":"x"}',  # name missing
        '{"type":"Bogus"}',
    ],
)
def test_deepgram_fake_rejects_what_the_real_server_would(text: str) -> None:
    """The fake's validator (used by every test here) is strict: typos, coercions, missing fields."""
    with pytest.raises((AssertionError, pydantic.ValidationError)):
        validate_client_message(text)
