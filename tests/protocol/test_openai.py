"""Tests for mediaserver.protocol.providers.openai (OpenAIRealtimeSession) and providers.base.

Every client event the core emits is validated against the ``openai`` SDK's
own GA types (``openai.types.realtime.RealtimeClientEvent``) in pydantic
strict mode, with no unknown keys anywhere (the SDK models allow extras, so
``model_extra`` is checked recursively) and an exact round trip.  Every
server event fed to the core is built from the SDK's server event classes
and serialised with ``model_dump_json()``; nothing is hand-written JSON
except deliberately malformed input.
"""

from __future__ import annotations

import base64
import json
import typing
from typing import Any

import pydantic
import pytest
from openai.types.realtime import (
    ConversationItemCreateEvent,
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemInputAudioTranscriptionDeltaEvent,
    ConversationItemInputAudioTranscriptionFailedEvent,
    ConversationItemTruncatedEvent,
    ConversationItemTruncateEvent,
    InputAudioBufferAppendEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    RateLimitsUpdatedEvent,
    RealtimeClientEvent,
    RealtimeConversationItemAssistantMessage,
    RealtimeConversationItemFunctionCall,
    RealtimeConversationItemFunctionCallOutput,
    RealtimeError,
    RealtimeErrorEvent,
    RealtimeFunctionTool,
    RealtimeResponse,
    RealtimeServerEvent,
    RealtimeSessionCreateRequest,
    ResponseAudioDeltaEvent,
    ResponseAudioDoneEvent,
    ResponseAudioTranscriptDeltaEvent,
    ResponseAudioTranscriptDoneEvent,
    ResponseCancelEvent,
    ResponseCreatedEvent,
    ResponseCreateEvent,
    ResponseDoneEvent,
    ResponseFunctionCallArgumentsDoneEvent,
    ResponseOutputItemDoneEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
    SessionUpdateEvent,
)
from openai.types.realtime.conversation_item_input_audio_transcription_completed_event import (
    UsageTranscriptTextUsageDuration,
)
from openai.types.realtime.realtime_audio_config import RealtimeAudioConfig
from openai.types.realtime.realtime_audio_config_input import RealtimeAudioConfigInput
from openai.types.realtime.realtime_audio_config_output import RealtimeAudioConfigOutput
from openai.types.realtime.realtime_audio_formats import AudioPCM, AudioPCMU
from openai.types.realtime.realtime_audio_input_turn_detection import SemanticVad as SdkSemanticVad
from openai.types.realtime.realtime_audio_input_turn_detection import ServerVad as SdkServerVad
from openai.types.realtime.conversation_item_input_audio_transcription_failed_event import Error as TranscriptionError
from openai.types.realtime.realtime_response_status import Error as ResponseError
from openai.types.realtime.realtime_response_status import RealtimeResponseStatus

from mediaserver.protocol import ClearAudio, SendMark, StreamState, TwilioStream
from mediaserver.protocol import SendAudio as TwilioSendAudio
from mediaserver.protocol.errors import LocalProtocolError, RemoteProtocolError
from mediaserver.protocol.providers import (
    AudioDelta,
    AudioDone,
    AudioFormat,
    AudioTruncated,
    CancelResponse,
    CreateResponse,
    FunctionTool,
    OpenAIRealtimeConfig,
    OpenAIRealtimeSession,
    Other,
    ProviderError,
    ProviderSession,
    ResponseDone,
    ResponseStarted,
    SemanticVad,
    SendAudio,
    ServerVad,
    SessionReady,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    SendText,
    ToolResult,
    Transcript,
    Truncate,
    Unknown,
)
from mediaserver.protocol.providers import openai as openai_core
from mediaserver.protocol.providers.openai import SessionState

# ------------------------------------------------------------ SDK validation

_CLIENT_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RealtimeClientEvent)


def _assert_no_extra(value: object, path: str = "$") -> None:
    if isinstance(value, pydantic.BaseModel):
        assert not value.model_extra, f"unknown keys at {path}: {sorted(value.model_extra)}"
        for name in type(value).model_fields:
            _assert_no_extra(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for index, element in enumerate(value):
            _assert_no_extra(element, f"{path}[{index}]")


def client_event(text: str) -> Any:
    """Validate one message we send against the SDK's GA client event union."""
    data = json.loads(text)
    model = _CLIENT_EVENT.validate_json(text, strict=True)
    assert model.type == data["type"]
    _assert_no_extra(model)
    assert model.model_dump(mode="json", exclude_unset=True) == data
    assert text == json.dumps(data, separators=(",", ":"), ensure_ascii=False), "not compact JSON"
    return model


def server(event: pydantic.BaseModel, *, exclude_none: bool = False) -> str:
    """Wire text of an SDK server event model."""
    return event.model_dump_json(exclude_none=exclude_none)


# ------------------------------------------------------- server event fixtures

PCMU = AudioPCMU(type="audio/pcmu")
PCM24K = AudioPCM(type="audio/pcm", rate=24000)


def session_created(session_id: str | None = "sess_1") -> SessionCreatedEvent:
    session = RealtimeSessionCreateRequest(type="realtime", instructions="default")
    if session_id is not None:
        session = RealtimeSessionCreateRequest.model_validate({"type": "realtime", "id": session_id})
    return SessionCreatedEvent(type="session.created", event_id="event_1", session=session)


def session_updated(fmt: AudioPCM | AudioPCMU = PCMU) -> SessionUpdatedEvent:
    return SessionUpdatedEvent(
        type="session.updated",
        event_id="event_2",
        session=RealtimeSessionCreateRequest(
            type="realtime",
            audio=RealtimeAudioConfig(
                input=RealtimeAudioConfigInput(format=fmt, turn_detection=SdkServerVad(type="server_vad")),
                output=RealtimeAudioConfigOutput(format=fmt, voice="marin"),
            ),
        ),
    )


def audio_delta(item_id: str, audio: bytes, response_id: str = "resp_1") -> ResponseAudioDeltaEvent:
    return ResponseAudioDeltaEvent(
        type="response.output_audio.delta",
        event_id="event_d",
        response_id=response_id,
        item_id=item_id,
        output_index=0,
        content_index=0,
        delta=base64.b64encode(audio).decode(),
    )


def audio_done(item_id: str) -> ResponseAudioDoneEvent:
    return ResponseAudioDoneEvent(
        type="response.output_audio.done",
        event_id="event_ad",
        response_id="resp_1",
        item_id=item_id,
        output_index=0,
        content_index=0,
    )


def speech_started(item_id: str = "item_user", audio_start_ms: int = 1200) -> InputAudioBufferSpeechStartedEvent:
    return InputAudioBufferSpeechStartedEvent(
        type="input_audio_buffer.speech_started", event_id="event_s", item_id=item_id, audio_start_ms=audio_start_ms
    )


def error_event(message: str, *, code: str | None = None, event_id: str | None = None) -> RealtimeErrorEvent:
    return RealtimeErrorEvent(
        type="error",
        event_id="event_e",
        error=RealtimeError(type="invalid_request_error", message=message, code=code, event_id=event_id),
    )


def config(**overrides: Any) -> OpenAIRealtimeConfig:
    return OpenAIRealtimeConfig(**{"model": "gpt-realtime", **overrides})


def ready_session(**overrides: Any) -> OpenAIRealtimeSession:
    session = OpenAIRealtimeSession(config(**overrides))
    session.initial_messages()
    fmt = PCM24K if overrides.get("audio_format") == "pcm24k" else PCMU
    events = receive(session, server(session_created()), server(session_updated(fmt)))
    assert events == [Other("session.created", server(session_created())), SessionReady("sess_1")]
    assert session.state is SessionState.READY
    return session


def receive(session: OpenAIRealtimeSession, *messages: str) -> list[Any]:
    for message in messages:
        session.receive_message(message)
    return list(session.events())


def assert_dead(session: OpenAIRealtimeSession) -> None:
    assert session.state is SessionState.ERROR
    with pytest.raises(LocalProtocolError):
        session.receive_message(server(session_updated()))
    with pytest.raises(LocalProtocolError):
        session.send(SendAudio(b"\xff"))
    with pytest.raises(LocalProtocolError):
        list(session.events())


# ---------------------------------------------------------- initial messages


def test_openai_initial_messages_default_config_is_valid_session_update() -> None:
    session = OpenAIRealtimeSession(config())
    [text] = session.initial_messages()
    event = client_event(text)
    assert isinstance(event, SessionUpdateEvent)
    assert isinstance(event.session, RealtimeSessionCreateRequest)
    assert event.event_id == "mediaserver-1"
    assert json.loads(text)["session"] == {
        "type": "realtime",
        "output_modalities": ["audio"],
        "audio": {
            "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "server_vad"}},
            "output": {"format": {"type": "audio/pcmu"}},
        },
    }
    assert event.session.audio is not None and event.session.audio.input is not None
    assert isinstance(event.session.audio.input.format, AudioPCMU)
    assert isinstance(event.session.audio.input.turn_detection, SdkServerVad)
    assert session.state is SessionState.AWAITING_CREATED


@pytest.mark.parametrize("effort", ["minimal", "low", "xhigh"])
def test_openai_reasoning_effort_goes_in_session_update(effort: str) -> None:
    [text] = OpenAIRealtimeSession(config(reasoning_effort=effort)).initial_messages()
    event = client_event(text)
    assert isinstance(event, SessionUpdateEvent) and isinstance(event.session, RealtimeSessionCreateRequest)
    assert event.session.reasoning is not None and event.session.reasoning.effort == effort  # (the SDK's own type)
    with pytest.raises(LocalProtocolError, match="reasoning_effort must be one of minimal, low, medium, high, xhigh"):
        config(reasoning_effort="max")


def test_openai_initial_messages_full_config() -> None:
    tool = FunctionTool(
        name="lookup_order",
        description="Find an order by number.",
        parameters={"type": "object", "properties": {"number": {"type": "string"}}, "required": ["number"]},
    )
    session = OpenAIRealtimeSession(
        config(
            instructions="You are a helpful agent.",
            voice="marin",
            audio_format="pcm24k",
            turn_detection=ServerVad(
                threshold=0.6,
                prefix_padding_ms=200,
                silence_duration_ms=400,
                idle_timeout_ms=6000,
                create_response=True,
                interrupt_response=False,
            ),
            transcription_model="gpt-4o-transcribe",
            greeting_instructions="Greet the caller and ask how you can help.",
            tools=(tool,),
        )
    )
    update_text, greeting_text = session.initial_messages()
    update = client_event(update_text)
    assert isinstance(update, SessionUpdateEvent)
    assert json.loads(update_text)["session"] == {
        "type": "realtime",
        "output_modalities": ["audio"],
        "instructions": "You are a helpful agent.",
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "turn_detection": {
                    "type": "server_vad",
                    "threshold": 0.6,
                    "prefix_padding_ms": 200,
                    "silence_duration_ms": 400,
                    "idle_timeout_ms": 6000,
                    "create_response": True,
                    "interrupt_response": False,
                },
                "transcription": {"model": "gpt-4o-transcribe"},
            },
            "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"},
        },
        "tools": [
            {
                "type": "function",
                "name": "lookup_order",
                "description": "Find an order by number.",
                "parameters": {"type": "object", "properties": {"number": {"type": "string"}}, "required": ["number"]},
            }
        ],
        "tool_choice": "auto",
    }
    assert isinstance(update.session, RealtimeSessionCreateRequest)
    assert update.session.tools is not None and isinstance(update.session.tools[0], RealtimeFunctionTool)
    assert update.session.audio is not None and update.session.audio.output is not None
    assert update.session.audio.output.format == AudioPCM(type="audio/pcm", rate=24000)

    greeting = client_event(greeting_text)
    assert isinstance(greeting, ResponseCreateEvent)
    assert greeting.response is not None
    # A response's instructions replace the session's for that response: the greeting keeps the agent's own.
    assert greeting.response.instructions == "You are a helpful agent.\n\nGreet the caller and ask how you can help."
    assert greeting.event_id == "mediaserver-2"
    # Without session instructions, the greeting's alone.
    [_, alone] = OpenAIRealtimeSession(
        config(instructions=None, greeting_instructions="Say hello.")
    ).initial_messages()
    assert client_event(alone).response.instructions == "Say hello."


def test_openai_semantic_vad_and_disabled_turn_detection() -> None:
    [semantic] = OpenAIRealtimeSession(
        config(turn_detection=SemanticVad(eagerness="low", interrupt_response=True))
    ).initial_messages()
    event = client_event(semantic)
    assert isinstance(event.session.audio.input.turn_detection, SdkSemanticVad)
    assert json.loads(semantic)["session"]["audio"]["input"]["turn_detection"] == {
        "type": "semantic_vad",
        "eagerness": "low",
        "interrupt_response": True,
    }

    [disabled] = OpenAIRealtimeSession(config(turn_detection=None)).initial_messages()
    event = client_event(disabled)
    assert "turn_detection" in event.session.audio.input.model_fields_set
    assert event.session.audio.input.turn_detection is None


def test_openai_config_validation() -> None:
    with pytest.raises(LocalProtocolError):
        OpenAIRealtimeConfig(model="")
    with pytest.raises(LocalProtocolError):
        config(audio_format="pcm16k")
    with pytest.raises(LocalProtocolError):
        ServerVad(threshold=1.5)
    with pytest.raises(LocalProtocolError):
        ServerVad(silence_duration_ms=-1)
    assert config().url == "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert config(model="a b/c").url == "wss://api.openai.com/v1/realtime?model=a%20b%2Fc"
    # a URL with a query of its own (Azure's api-version and deployment, a proxy's token) keeps it
    azure = config(base_url="wss://x.openai.azure.com/openai/realtime?api-version=2025-04-01-preview&deployment=rt")
    assert azure.url == "wss://x.openai.azure.com/openai/realtime?api-version=2025-04-01-preview&deployment=rt&model=gpt-realtime"
    # one that names the model itself (Azure's GA form: the deployment) is left as it is, not given a second model=
    ga = config(base_url="wss://x.openai.azure.com/openai/v1/realtime?model=my-deployment")
    assert ga.url == "wss://x.openai.azure.com/openai/v1/realtime?model=my-deployment"


def test_openai_formats_exposed_for_the_bridge() -> None:
    pcmu = OpenAIRealtimeSession(config())
    assert pcmu.input_format == pcmu.output_format == AudioFormat("pcmu", 8000)
    assert pcmu.output_format.bytes_per_ms == 8
    pcm = OpenAIRealtimeSession(config(audio_format="pcm24k"))
    assert pcm.output_format == AudioFormat("pcm16", 24000)
    assert pcm.output_format.bytes_per_ms == 48
    assert isinstance(pcm, ProviderSession)


# ------------------------------------------------------------------ commands


def test_openai_send_audio_is_valid_append_with_exact_payload() -> None:
    session = ready_session()
    payload = bytes(range(256)) * 3
    [text] = session.send(SendAudio(payload))
    event = client_event(text)
    assert isinstance(event, InputAudioBufferAppendEvent)
    assert base64.b64decode(event.audio, validate=True) == payload
    assert event.event_id is None  # audio appends carry no event id


def test_openai_audio_envelope_is_exactly_what_send_audio_sends_in_every_state() -> None:
    """The link frames audio from audio_envelope(): it must be send(SendAudio)'s one message, or None where send raises."""
    payload = bytes(range(256)) * 3
    fresh = OpenAIRealtimeSession(config())
    assert fresh.audio_envelope() is None  # NEW: send raises
    awaiting = OpenAIRealtimeSession(config())
    awaiting.initial_messages()
    created = OpenAIRealtimeSession(config())
    created.initial_messages()
    receive(created, server(session_created()))
    for session in (awaiting, created, ready_session(), ready_session(audio_format="pcm24k")):
        state = session.state
        envelope = session.audio_envelope()
        assert envelope is not None, state
        prefix, suffix = envelope
        [text] = session.send(SendAudio(payload))
        assert text == prefix.decode() + base64.b64encode(payload).decode() + suffix.decode()
        assert isinstance(client_event(text), InputAudioBufferAppendEvent)
        assert session.state is state  # sending audio moves nothing
    dead = ready_session()
    with pytest.raises(RemoteProtocolError):
        dead.receive_message("not json")
    assert dead.audio_envelope() is None


def test_openai_cancel_and_create_response_are_valid() -> None:
    session = ready_session()
    [cancel] = session.send(CancelResponse())
    [cancel_one] = session.send(CancelResponse(response_id="resp_9"))
    [create] = session.send(CreateResponse())
    [create_with] = session.send(CreateResponse(instructions="Say goodbye."))
    assert isinstance(client_event(cancel), ResponseCancelEvent)
    event = client_event(cancel_one)
    assert isinstance(event, ResponseCancelEvent) and event.response_id == "resp_9"
    event = client_event(create)
    assert isinstance(event, ResponseCreateEvent) and event.response is None
    event = client_event(create_with)
    assert isinstance(event, ResponseCreateEvent) and event.response is not None
    assert event.response.instructions == "Say goodbye."
    assert [json.loads(t)["event_id"] for t in (cancel, cancel_one, create, create_with)] == [
        "mediaserver-2",
        "mediaserver-3",
        "mediaserver-4",
        "mediaserver-5",
    ]


def test_openai_tool_result_is_item_create_then_response_create() -> None:
    session = ready_session()
    item_text, response_text = session.send(ToolResult(call_id="call_1", output='{"status":"shipped"}'))
    item = client_event(item_text)
    assert isinstance(item, ConversationItemCreateEvent)
    assert item.item == RealtimeConversationItemFunctionCallOutput(
        type="function_call_output", call_id="call_1", output='{"status":"shipped"}'
    )
    assert isinstance(client_event(response_text), ResponseCreateEvent)

    [only_item] = session.send(ToolResult(call_id="call_2", output="", respond=False))
    assert isinstance(client_event(only_item), ConversationItemCreateEvent)


def response_created(response_id: str) -> str:
    return server(
        ResponseCreatedEvent(
            type="response.created", event_id="ev", response=RealtimeResponse(id=response_id, status="in_progress")
        )
    )


def response_done(response_id: str, status: str = "completed") -> str:
    return server(
        ResponseDoneEvent(type="response.done", event_id="ev", response=RealtimeResponse(id=response_id, status=status))  # type: ignore[arg-type]
    )


def creates(messages: list[str]) -> int:
    return sum(isinstance(client_event(m), ResponseCreateEvent) for m in messages)


def test_openai_an_answer_asked_for_while_a_response_is_active_waits_for_response_done() -> None:
    """The server refuses response.create while one is active (conversation_already_has_active_response)."""
    session = ready_session()
    receive(session, response_created("resp_1"))  # the model is answering (server VAD, or a tool call's response)
    [item] = session.send(ToolResult(call_id="call_1", output="1"))
    [text] = session.send(SendText("caller pressed 5"))  # (SendText asks for an answer too)
    assert isinstance(client_event(item), ConversationItemCreateEvent) and creates([item, text]) == 0
    assert session.pending_messages() == []
    receive(session, response_done("resp_1"))
    [owed] = session.pending_messages()  # one answer for both
    assert isinstance(client_event(owed), ResponseCreateEvent)
    assert session.pending_messages() == []
    # That answer is now the active response: a result in between waits for it too.
    receive(session, response_created("resp_2"))
    assert creates(session.send(ToolResult(call_id="call_2", output="2"))) == 0
    receive(session, response_done("resp_2"))
    assert creates(session.pending_messages()) == 1
    receive(session, response_created("resp_3"), response_done("resp_3"))
    assert session.pending_messages() == []
    # Idle: at once; and a second one before the server created the first waits for it.
    assert creates(session.send(ToolResult(call_id="call_3", output="3"))) == 1
    assert creates(session.send(ToolResult(call_id="call_4", output="4"))) == 0
    receive(session, response_created("resp_4"), response_done("resp_4"))
    assert creates(session.pending_messages()) == 1


def function_call(call_id: str, response_id: str = "resp_1", status: str | None = "completed") -> str:
    """The model's function call as the GA server ends it: its item done (with its status; None: without one)."""
    return server(
        ResponseOutputItemDoneEvent(
            type="response.output_item.done", event_id="ev", response_id=response_id, output_index=0,
            item=RealtimeConversationItemFunctionCall(
                type="function_call", id=f"item_{call_id}", call_id=call_id, name="lookup", arguments="{}",
                status=status,  # type: ignore[arg-type]
            ),
        ),
        exclude_none=status is None,
    )  # fmt: skip


def arguments_done(call_id: str, arguments: str, response_id: str = "resp_1") -> str:
    """``response.function_call_arguments.done``: sent before the item is done, and for an interrupted call too."""
    return server(
        ResponseFunctionCallArgumentsDoneEvent(
            type="response.function_call_arguments.done", event_id="ev", response_id=response_id,
            item_id=f"item_{call_id}", output_index=0, call_id=call_id, name="end_call", arguments=arguments,
        )
    )  # fmt: skip


def test_openai_a_function_call_runs_only_once_its_item_is_done_and_completed() -> None:
    """A call the caller cut off mid-arguments is never run: arguments.done comes for it too (SDK docstring)."""
    session = ready_session()
    [early] = receive(session, response_created("resp_1"), arguments_done("call_cut", '{"reason": "th'))[1:]
    assert isinstance(early, Other)  # not a ToolCall: the item may still be cut
    [cut] = receive(session, function_call("call_cut", status="incomplete"))
    assert isinstance(cut, Other)
    [done] = receive(session, response_done("resp_1", status="cancelled"))
    assert isinstance(done, ResponseDone) and done.status == "cancelled"
    # the unfinished call owes no answer: the next response's result asks for its own at once
    receive(session, response_created("resp_2"), arguments_done("call_ok", "{}", "resp_2"))
    [call] = receive(session, function_call("call_ok", "resp_2"))
    assert call == ToolCall("call_ok", "lookup", "{}", "item_call_ok", "resp_2")
    receive(session, response_done("resp_2"))
    assert creates(session.send(ToolResult(call_id="call_ok", output="1"))) == 1
    # an item done with no status (older servers) is taken as finished; other item types are not calls
    assert "status" not in function_call("call_plain", "resp_3", status=None)
    [call] = receive(session, function_call("call_plain", "resp_3", status=None))
    assert isinstance(call, ToolCall) and call.call_id == "call_plain"
    message = ResponseOutputItemDoneEvent(
        type="response.output_item.done", event_id="ev", response_id="resp_3", output_index=0,
        item=RealtimeConversationItemAssistantMessage(type="message", role="assistant", content=[]),
    )  # fmt: skip
    assert isinstance(receive(session, server(message))[0], Other)


def test_openai_an_answer_waits_for_every_call_of_the_response() -> None:
    """A result that came before another call of the same response was made must not get its answer alone.

    Before: response.create went out at response.done, the model answered without the slow tool's result,
    then again with it.
    """
    session = ready_session()
    receive(session, response_created("resp_1"), function_call("call_fast"))
    assert creates(session.send(ToolResult(call_id="call_fast", output="1"))) == 0  # (a response is active)
    receive(session, function_call("call_slow"), response_done("resp_1"))
    assert session.pending_messages() == []  # call_slow has no result yet: no answer
    assert creates(session.send(ToolResult(call_id="call_slow", output="2"))) == 1  # the last result asks for it
    receive(session, response_created("resp_2"), response_done("resp_2"))
    assert session.pending_messages() == []


def test_openai_an_answer_held_for_a_later_call_goes_with_its_result_even_one_that_asks_for_none() -> None:
    # The later call is a tool that answers without a reply (end_call, respond=False): the answer the quick
    # tool's result asked for must still go out then, not be lost.
    session = ready_session()
    receive(session, response_created("resp_1"), function_call("call_fast"))
    assert creates(session.send(ToolResult(call_id="call_fast", output="1"))) == 0
    receive(session, function_call("call_quiet"), response_done("resp_1"))
    assert session.pending_messages() == []
    assert creates(session.send(ToolResult(call_id="call_quiet", output="{}", respond=False))) == 1


def test_openai_a_refused_response_create_does_not_block_later_answers() -> None:
    session = ready_session()
    [_, create] = session.send(ToolResult(call_id="call_1", output="1"))
    event_id = json.loads(create)["event_id"]
    # Another response was active after all: the answer comes once it is done.
    receive(session, server(error_event("busy", code="conversation_already_has_active_response", event_id=event_id)))
    assert session.pending_messages() == []
    receive(session, response_done("resp_0"))
    [owed] = session.pending_messages()
    # Refused for another reason: nothing is active, so the next answer goes at once.
    receive(session, server(error_event("bad", code="invalid_value", event_id=json.loads(owed)["event_id"])))
    assert creates(session.send(ToolResult(call_id="call_2", output="2"))) == 1


def test_openai_active_response_refusals_without_an_event_id_are_understood() -> None:
    """The real server sends conversation_already_has_active_response with event_id null."""
    session = ready_session()
    assert creates(session.send(ToolResult(call_id="call_1", output="1"))) == 1
    receive(session, server(error_event("busy", code="conversation_already_has_active_response")))
    receive(session, response_created("resp_vad"))  # the server-VAD response it met
    assert creates(session.send(ToolResult(call_id="call_2", output="2"))) == 0
    receive(session, response_done("resp_vad"))
    assert creates(session.pending_messages()) == 1  # one answer, for both results
    # Another error with no event_id while our create is unanswered: it may have been refused, so the next
    # answer is not held back waiting for a response that may never come.
    receive(session, server(error_event("something failed")))
    assert creates(session.send(ToolResult(call_id="call_3", output="3"))) == 1


def test_openai_commands_validate_on_construction() -> None:
    with pytest.raises(LocalProtocolError):
        SendAudio(b"")
    with pytest.raises(LocalProtocolError):
        Truncate("item_1", -1)
    with pytest.raises(LocalProtocolError):
        Truncate("item_1", 1.5)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        Truncate("item_1", True)
    with pytest.raises(LocalProtocolError):
        Truncate("", 10)
    with pytest.raises(LocalProtocolError):
        ToolResult("", "x")
    with pytest.raises(LocalProtocolError):
        AudioFormat("pcm16", 22050)


def test_openai_send_unknown_command_is_local_error() -> None:
    session = ready_session()
    with pytest.raises(LocalProtocolError, match="not a provider command"):
        session.send(ClearAudio())  # type: ignore[arg-type]
    assert_dead(session)


# ---------------------------------------------------------------- truncation


def test_openai_truncate_clamps_to_received_pcmu_audio() -> None:
    session = ready_session()
    receive(
        session,
        server(audio_delta("item_a", b"\xff" * 800)),
        server(audio_delta("item_a", b"\xff" * 1200)),
        server(audio_delta("item_a", b"\xff" * 5)),  # 2005 bytes = 250.625 ms
    )
    assert session.audio_received_ms("item_a") == 250
    [text] = session.send(Truncate("item_a", 10_000))
    event = client_event(text)
    assert isinstance(event, ConversationItemTruncateEvent)
    assert (event.item_id, event.content_index, event.audio_end_ms) == ("item_a", 0, 250)
    assert type(json.loads(text)["audio_end_ms"]) is int


def test_openai_truncate_below_received_is_sent_unchanged() -> None:
    session = ready_session()
    receive(session, server(audio_delta("item_a", b"\xff" * 8000)))
    [text] = session.send(Truncate("item_a", 437))
    assert client_event(text).audio_end_ms == 437
    # The item is now 437 ms long on the server; a later, larger truncate clamps there.
    assert session.audio_received_ms("item_a") == 437
    [again] = session.send(Truncate("item_a", 900))
    assert client_event(again).audio_end_ms == 437


def test_openai_truncate_clamps_to_received_pcm24k_audio() -> None:
    session = ready_session(audio_format="pcm24k")
    receive(session, server(audio_delta("item_p", b"\x00" * (48 * 100 + 47))))  # 100.98 ms
    [text] = session.send(Truncate("item_p", 101))
    assert client_event(text).audio_end_ms == 100
    [text] = session.send(Truncate("item_p", 0))
    assert client_event(text).audio_end_ms == 0


def test_openai_truncate_skipped_when_complete_item_was_fully_heard() -> None:
    session = ready_session()
    receive(session, server(audio_delta("item_a", b"\xff" * 1600)), server(audio_done("item_a")))
    assert session.send(Truncate("item_a", 200)) == []
    assert session.send(Truncate("item_a", 5000)) == []
    [text] = session.send(Truncate("item_a", 199))
    assert client_event(text).audio_end_ms == 199


def test_openai_truncate_not_skipped_while_audio_still_streaming() -> None:
    session = ready_session()
    receive(session, server(audio_delta("item_a", b"\xff" * 1600)))
    [text] = session.send(Truncate("item_a", 200))
    assert client_event(text).audio_end_ms == 200


def test_openai_truncate_unknown_item_is_local_error() -> None:
    session = ready_session()
    with pytest.raises(LocalProtocolError, match="no audio was received for item 'item_x'"):
        session.send(Truncate("item_x", 10))
    assert_dead(session)


def test_openai_truncate_from_twilio_playback_is_exact_and_bounded() -> None:
    """The two cores together, as the bridge will drive them on barge-in."""
    session = ready_session()
    twilio = TwilioStream()
    twilio.receive_message('{"event":"connected","protocol":"Call","version":"1.0.0"}')
    twilio.receive_message(
        json.dumps(
            {
                "event": "start",
                "sequenceNumber": "1",
                "streamSid": "MZ1",
                "start": {
                    "streamSid": "MZ1",
                    "accountSid": "AC1",
                    "callSid": "CA1",
                    "tracks": ["inbound"],
                    "customParameters": {},
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )
    )
    list(twilio.events())
    assert twilio.state is StreamState.STREAMING

    # The model sends 1 s of audio in 100 ms deltas; we forward it in 20 ms frames with a mark after each.
    for _ in range(10):
        [delta] = receive(session, server(audio_delta("item_a", b"\x7f" * 800)))
        assert isinstance(delta, AudioDelta)
        for offset in range(0, 800, 160):
            twilio.send(TwilioSendAudio(delta.payload[offset : offset + 160], item=delta.item_id))
            twilio.send(SendMark())
    # Twilio has played 7 frames and is in the middle of the 8th.
    for sequence, name in enumerate(["1", "2", "3", "4", "5", "6", "7"], start=2):
        echo = {"event": "mark", "sequenceNumber": str(sequence), "streamSid": "MZ1", "mark": {"name": name}}
        twilio.receive_message(json.dumps(echo))
    list(twilio.events())

    [barge_in] = receive(session, server(speech_started()))
    assert barge_in == SpeechStarted(item_id="item_user", audio_start_ms=1200)
    assert twilio.items_in_flight() == ("item_a",)
    twilio.send(ClearAudio())
    heard_ms = twilio.playback("item_a").played_ms
    assert heard_ms == 140
    assert session.audio_received_ms("item_a") == 1000
    [text] = session.send(Truncate("item_a", heard_ms))
    event = client_event(text)
    assert event.audio_end_ms == 140
    assert session.audio_received_ms("item_a") == 140  # the server's item is now 140 ms long


# --------------------------------------------------------- server event mapping


@pytest.mark.parametrize("exclude_none", [False, True])
def test_openai_server_events_map_to_provider_events(exclude_none: bool) -> None:
    session = ready_session()
    pairs: list[tuple[pydantic.BaseModel, Any]] = [
        (
            ResponseCreatedEvent(
                type="response.created", event_id="e1", response=RealtimeResponse(id="resp_1", status="in_progress")
            ),
            ResponseStarted("resp_1"),
        ),
        (audio_delta("item_a", b"\x01\x02\x03"), AudioDelta("item_a", b"\x01\x02\x03", "resp_1")),
        (audio_done("item_a"), AudioDone("item_a", "resp_1")),
        (speech_started("item_u", 3500), SpeechStarted("item_u", 3500)),
        (
            InputAudioBufferSpeechStoppedEvent(
                type="input_audio_buffer.speech_stopped", event_id="e2", item_id="item_u", audio_end_ms=4200
            ),
            SpeechStopped("item_u", 4200),
        ),
        (
            ResponseOutputItemDoneEvent(
                type="response.output_item.done",
                event_id="e3",
                response_id="resp_1",
                output_index=1,
                item=RealtimeConversationItemFunctionCall(
                    type="function_call",
                    id="item_f",
                    call_id="call_7",
                    name="lookup_order",
                    arguments='{"number":"42"}',
                    status="completed",
                ),
            ),
            ToolCall("call_7", "lookup_order", '{"number":"42"}', "item_f", "resp_1"),
        ),
        (
            ConversationItemInputAudioTranscriptionDeltaEvent(
                type="conversation.item.input_audio_transcription.delta", event_id="e4", item_id="item_u", delta="Hel"
            ),
            Transcript("user", "Hel", False, "item_u"),
        ),
        (
            ConversationItemInputAudioTranscriptionCompletedEvent(
                type="conversation.item.input_audio_transcription.completed",
                event_id="e5",
                item_id="item_u",
                content_index=0,
                transcript="Hello there",
                usage=UsageTranscriptTextUsageDuration(type="duration", seconds=1.5),
            ),
            Transcript("user", "Hello there", True, "item_u"),
        ),
        (
            ResponseAudioTranscriptDeltaEvent(
                type="response.output_audio_transcript.delta",
                event_id="e6",
                response_id="resp_1",
                item_id="item_a",
                output_index=0,
                content_index=0,
                delta="Hi",
            ),
            Transcript("assistant", "Hi", False, "item_a"),
        ),
        (
            ResponseAudioTranscriptDoneEvent(
                type="response.output_audio_transcript.done",
                event_id="e7",
                response_id="resp_1",
                item_id="item_a",
                output_index=0,
                content_index=0,
                transcript="Hi, how can I help?",
            ),
            Transcript("assistant", "Hi, how can I help?", True, "item_a"),
        ),
        (
            ConversationItemTruncatedEvent(
                type="conversation.item.truncated", event_id="e8", item_id="item_a", content_index=0, audio_end_ms=140
            ),
            AudioTruncated("item_a", 140),
        ),
        (
            ResponseDoneEvent(
                type="response.done",
                event_id="e9",
                response=RealtimeResponse(
                    id="resp_1",
                    status="cancelled",
                    status_details=RealtimeResponseStatus(type="cancelled", reason="turn_detected"),
                ),
            ),
            ResponseDone("resp_1", "cancelled", "turn_detected"),
        ),
        (
            ResponseDoneEvent(type="response.done", event_id="e10", response=RealtimeResponse()),
            ResponseDone(None, None, None),
        ),
        (  # a failed response says why in its status details, with no error event
            ResponseDoneEvent(
                type="response.done",
                event_id="e11",
                response=RealtimeResponse(
                    id="resp_2",
                    status="failed",
                    status_details=RealtimeResponseStatus(
                        type="failed",
                        error=ResponseError(type="insufficient_quota", code="insufficient_quota", message="You exceeded your quota."),
                    ),
                ),
            ),
            ResponseDone("resp_2", "failed", None, "You exceeded your quota."),
        ),
        (
            ConversationItemInputAudioTranscriptionFailedEvent(
                type="conversation.item.input_audio_transcription.failed",
                event_id="e12",
                item_id="item_u",
                content_index=0,
                error=TranscriptionError(type="transcription_error", code="audio_unintelligible", message="Could not transcribe."),
            ),
            ProviderError("the caller's speech (item_u) was not transcribed: Could not transcribe.", False, "audio_unintelligible"),
        ),
        (
            error_event("Cancellation failed", code="response_cancel_not_active"),
            ProviderError("Cancellation failed", False, "response_cancel_not_active", None),
        ),
    ]
    for model, expected in pairs:
        assert receive(session, server(model, exclude_none=exclude_none)) == [expected], type(model).__name__
    assert session.state is SessionState.READY


def test_openai_user_transcript_delta_without_text_is_empty_fragment() -> None:
    session = ready_session()
    event = ConversationItemInputAudioTranscriptionDeltaEvent(
        type="conversation.item.input_audio_transcription.delta", event_id="e", item_id="item_u"
    )
    assert receive(session, server(event)) == [Transcript("user", "", False, "item_u")]


def test_openai_known_unmapped_event_is_other_with_raw_text() -> None:
    session = ready_session()
    text = server(RateLimitsUpdatedEvent(type="rate_limits.updated", event_id="e", rate_limits=[]))
    assert receive(session, text) == [Other("rate_limits.updated", text)]


def test_openai_unknown_event_type_is_unknown_with_raw_text() -> None:
    session = ready_session()
    text = json.dumps({"type": "response.output_hologram.delta", "event_id": "e", "delta": "x"})
    assert receive(session, text) == [Unknown("response.output_hologram.delta", text)]
    assert session.state is SessionState.READY


def test_openai_every_sdk_server_event_type_is_known() -> None:
    """The dispatch table covers exactly the SDK's RealtimeServerEvent union."""
    union = typing.get_args(RealtimeServerEvent)[0]
    sdk_types = set()
    for member in typing.get_args(union):
        sdk_types.update(typing.get_args(member.model_fields["type"].annotation))
    assert len(sdk_types) == len(typing.get_args(union))
    assert set(openai_core._SERVER_EVENTS) == sdk_types


def test_openai_error_caused_by_session_update_is_fatal_and_attributed() -> None:
    session = OpenAIRealtimeSession(config())
    [update] = session.initial_messages()
    update_id = json.loads(update)["event_id"]
    events = receive(
        session,
        server(session_created()),
        server(error_event("Invalid value: 'audio/pcm'", code="invalid_value", event_id=update_id)),
    )
    assert events[1] == ProviderError("Invalid value: 'audio/pcm'", True, "invalid_value", "session.update")


def test_openai_error_caused_by_other_command_is_not_fatal() -> None:
    session = ready_session()
    [cancel] = session.send(CancelResponse())
    [event] = receive(session, server(error_event("no active response", event_id=json.loads(cancel)["event_id"])))
    assert event == ProviderError("no active response", False, None, "response.cancel")
    [event] = receive(session, server(error_event("who knows", event_id="evt_not_ours")))
    assert event == ProviderError("who knows", False, None, None)
    # An error with no text (the SDK's type allows "") is still a recoverable error, not a broken session.
    [event] = receive(session, server(error_event("", code="server_error")))
    assert event == ProviderError("server_error", False, "server_error", None)
    [event] = receive(session, server(error_event("")))
    assert event == ProviderError("unknown error", False, None, None)
    [event] = receive(session, '{"type": "error", "event_id": "e", "error": {"type": "x"}}')  # no message at all
    assert event == ProviderError("unknown error", False, None, None)
    assert session.state is SessionState.READY


def test_openai_session_id_taken_from_session_created() -> None:
    session = ready_session()
    assert session.session_id == "sess_1"


def test_openai_later_session_updated_is_other_not_second_ready() -> None:
    session = ready_session()
    text = server(session_updated())
    assert receive(session, text) == [Other("session.updated", text)]


def test_openai_session_updated_with_other_audio_format_is_remote_error() -> None:
    session = OpenAIRealtimeSession(config())
    session.initial_messages()
    receive(session, server(session_created()))
    with pytest.raises(RemoteProtocolError, match="format"):
        session.receive_message(server(session_updated(PCM24K)))
    assert_dead(session)


def test_openai_events_before_session_updated_are_allowed() -> None:
    session = OpenAIRealtimeSession(config())
    session.initial_messages()
    text = server(RateLimitsUpdatedEvent(type="rate_limits.updated", event_id="e", rate_limits=[]))
    events = receive(session, server(session_created()), text, server(session_updated()))
    assert events[1:] == [Other("rate_limits.updated", text), SessionReady("sess_1")]


# -------------------------------------------------------------- state machine


def test_openai_send_or_receive_before_initial_messages_is_local_error() -> None:
    session = OpenAIRealtimeSession(config())
    with pytest.raises(LocalProtocolError, match="command before initial_messages"):
        session.send(SendAudio(b"\xff"))
    assert session.state is SessionState.ERROR

    session = OpenAIRealtimeSession(config())
    with pytest.raises(LocalProtocolError, match="session.created before initial_messages"):
        session.receive_message(server(session_created()))
    assert session.state is SessionState.ERROR


def test_openai_initial_messages_twice_is_local_error() -> None:
    session = OpenAIRealtimeSession(config())
    session.initial_messages()
    with pytest.raises(LocalProtocolError):
        session.initial_messages()
    assert_dead(session)


def test_openai_commands_allowed_before_session_is_ready() -> None:
    session = OpenAIRealtimeSession(config())
    session.initial_messages()
    [text] = session.send(SendAudio(b"\xff" * 160))
    assert isinstance(client_event(text), InputAudioBufferAppendEvent)
    assert session.state is SessionState.AWAITING_CREATED


@pytest.mark.parametrize(
    ("prefix", "message", "match"),
    [
        ([], server(audio_delta("item_a", b"\x00")), "server event in state AWAITING_CREATED"),
        ([], server(session_updated()), "session.updated in state AWAITING_CREATED"),
        ([server(session_created())], server(session_created()), "session.created in state AWAITING_UPDATED"),
        (
            [server(session_created()), server(session_updated())],
            server(session_created()),
            "session.created in state READY",
        ),
    ],
)
def test_openai_out_of_place_server_events_are_remote_errors(prefix: list[str], message: str, match: str) -> None:
    session = OpenAIRealtimeSession(config())
    session.initial_messages()
    receive(session, *prefix)
    with pytest.raises(RemoteProtocolError, match=match):
        session.receive_message(message)
    assert_dead(session)


def test_openai_error_and_unknown_allowed_before_session_created() -> None:
    session = OpenAIRealtimeSession(config())
    session.initial_messages()
    unknown = json.dumps({"type": "hello"})
    events = receive(session, server(error_event("boom")), unknown)
    assert events == [ProviderError("boom", False, None, None), Unknown("hello", unknown)]
    assert session.state is SessionState.AWAITING_CREATED


@pytest.mark.parametrize(
    "text",
    [
        "",
        "nope",
        "[]",
        "{}",
        '{"type": 1}',
        '{"type": "response.output_audio.delta", "item_id": "i", "delta": "A"}',  # bad base64
        '{"type": "response.output_audio.delta", "item_id": "i", "delta": 5}',
        '{"type": "response.output_audio.delta", "delta": "AAAA"}',
        '{"type": "input_audio_buffer.speech_started", "item_id": "i", "audio_start_ms": "5"}',
        '{"type": "input_audio_buffer.speech_started", "item_id": "i", "audio_start_ms": -5}',
        '{"type": "response.output_item.done", "item": {"type": "function_call", "call_id": "c", "name": "n", "arguments": {}}}',
        '{"type": "response.output_item.done", "item": {"type": "function_call", "name": "n", "arguments": ""}}',
        '{"type": "response.done", "response": null}',
        '{"type": "response.done", "response": {"id": 5}}',
        '{"type": "conversation.item.truncated", "item_id": "i", "audio_end_ms": 1.5}',
        '{"type": "response.output_audio_transcript.done", "item_id": "i"}',
    ],
)
def test_openai_malformed_server_messages_are_remote_errors(text: str) -> None:
    session = ready_session()
    with pytest.raises(RemoteProtocolError):
        session.receive_message(text)
    assert_dead(session)


def test_openai_binary_frame_is_remote_error() -> None:
    session = ready_session()
    with pytest.raises(RemoteProtocolError, match="binary frame"):
        session.receive_message(b"\x00\x01")
    assert_dead(session)


@pytest.mark.parametrize(("rate", "ok"), [(8000, True), (16000, False)])
def test_openai_pcmu_echoed_with_its_rate_is_still_pcmu(rate: int, ok: bool) -> None:
    """The SDK's AudioPCMU has no rate; a server that echoes one says 8000 (anything else is not what we asked for)."""
    session = OpenAIRealtimeSession(config())
    session.initial_messages()
    updated = json.loads(server(session_updated(PCMU)))
    for side in ("input", "output"):
        updated["session"]["audio"][side]["format"]["rate"] = rate
    receive(session, server(session_created()))
    if ok:
        assert receive(session, json.dumps(updated)) == [SessionReady("sess_1")]
    else:
        with pytest.raises(RemoteProtocolError, match="we configured"):
            receive(session, json.dumps(updated))


def _speech_stopped() -> str:
    return server(
        InputAudioBufferSpeechStoppedEvent(
            type="input_audio_buffer.speech_stopped", event_id="e", item_id="item_user", audio_end_ms=2000
        )
    )


@pytest.mark.parametrize(
    ("turn_detection", "waits"),
    [(ServerVad(), True), (SemanticVad(), True), (ServerVad(create_response=False), False), (None, False)],
    ids=["server_vad", "semantic_vad", "no_auto_response", "no_vad"],
)
def test_openai_an_answer_asked_for_while_the_caller_talks_is_left_to_the_vad(turn_detection: Any, waits: bool) -> None:
    """A tool result (or keypad text) that comes while the caller is talking asks for no response: one now would
    talk over them, and the server's VAD answers when they stop anyway (with the result in the conversation).
    Without a VAD that answers, nothing else would: then it asks, as always."""
    session = ready_session(turn_detection=turn_detection)
    receive(session, server(speech_started()))
    [item, *create] = session.send(ToolResult(call_id="call_1", output="1"))
    assert isinstance(client_event(item), ConversationItemCreateEvent)
    assert creates(create) == (0 if waits else 1)
    # (talking: left to the VAD; without one, a response is now active and this answer waits for its end)
    assert creates(session.send(SendText("The caller pressed 4."))) == 0
    receive(session, _speech_stopped())
    assert session.pending_messages() == []  # (nothing owed: the VAD's response covers it)
    if waits:
        assert creates(session.send(ToolResult(call_id="call_2", output="2"))) == 1  # the caller is done: asks now
