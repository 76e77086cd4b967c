"""Tests for mediaserver.protocol.providers.gemini (GeminiLiveSession).

Every client message the core emits is validated with the ``google-genai``
SDK's ``LiveClientMessage`` (``extra="forbid"`` throughout) through
:func:`tests.gemini_fake.validate_client_message`; every server message fed
to the core is a ``types.LiveServerMessage`` serialised as the service sends
it (:func:`tests.gemini_fake.wire`: binary frame, standard base64).  Only
deliberately malformed input is hand-written.
"""

from __future__ import annotations

import base64
import json
import typing

import numpy as np
import pytest
from google.genai import types

from mediaserver.protocol.errors import LocalProtocolError, RemoteProtocolError
from mediaserver.protocol.providers.base import (
    AudioDelta,
    AudioDone,
    CreateResponse,
    FunctionTool,
    Other,
    ProviderEvent,
    ProviderSession,
    ResponseDone,
    ResponseStarted,
    SendAudio,
    SendText,
    SessionReady,
    SpeechStarted,
    ToolCall,
    ToolCallsCancelled,
    ToolResult,
    Transcript,
    Truncate,
    Unknown,
)
from mediaserver.protocol.providers.gemini import (
    GeminiLiveConfig,
    GeminiLiveSession,
    GoAway,
    ResumptionUpdate,
    SessionState,
)
from mediaserver.records.model import TranscriptLog

from tests.gemini_fake import validate_client_message, wire

MODEL = "gemini-3.8-live"
WEATHER = FunctionTool(
    "get_weather",
    "Current weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def feed(session: GeminiLiveSession, message: types.LiveServerMessage) -> list[ProviderEvent]:
    session.receive_message(wire(message))
    return list(session.events())


def content(**fields: object) -> types.LiveServerMessage:
    return types.LiveServerMessage(server_content=types.LiveServerContent(**fields))  # type: ignore[arg-type]


def audio(pcm: bytes) -> types.LiveServerMessage:
    part = types.Part(inline_data=types.Blob(data=pcm, mime_type="audio/pcm;rate=24000"))
    return content(model_turn=types.Content(role="model", parts=[part]))


def ready_session(config: GeminiLiveConfig | None = None) -> GeminiLiveSession:
    session = GeminiLiveSession(config or GeminiLiveConfig(model=MODEL))
    session.initial_messages()
    assert feed(session, types.LiveServerMessage(setup_complete=types.LiveServerSetupComplete(session_id="s1"))) == [
        SessionReady("s1")
    ]
    return session


# ---------------------------------------------------------------------- setup


def test_gemini_setup_is_a_valid_sdk_message_with_everything_configured() -> None:
    config = GeminiLiveConfig(model=MODEL, instructions="Be brief.", voice="Kore", tools=(WEATHER,), greeting="Say hi")
    session = GeminiLiveSession(config)
    assert isinstance(session, ProviderSession)
    [text] = session.initial_messages()
    setup = validate_client_message(text).setup
    assert setup is not None
    assert setup.model == f"models/{MODEL}"
    assert setup.generation_config is not None
    assert setup.generation_config.response_modalities == [types.Modality.AUDIO]
    speech = setup.generation_config.speech_config
    assert speech is not None and speech.voice_config is not None and speech.voice_config.prebuilt_voice_config is not None
    assert speech.voice_config.prebuilt_voice_config.voice_name == "Kore"
    assert setup.system_instruction == types.Content(parts=[types.Part(text="Be brief.")], role="user")
    assert setup.tools is not None
    [tool] = setup.tools
    assert isinstance(tool, types.Tool) and tool.function_declarations is not None
    [declaration] = tool.function_declarations
    assert declaration.name == "get_weather"
    # the model waits for a tool's result (3.8 Live would otherwise talk on while it runs: NON_BLOCKING is its default)
    assert declaration.behavior is types.Behavior.BLOCKING
    # ``parameters`` (Gemini's Schema), not ``parametersJsonSchema``, which the Live API has been reported to ignore
    assert declaration.parameters_json_schema is None
    assert declaration.parameters == types.Schema(
        type=types.Type.OBJECT, properties={"city": types.Schema(type=types.Type.STRING)}, required=["city"]
    )
    assert setup.input_audio_transcription == types.AudioTranscriptionConfig()
    assert setup.output_audio_transcription == types.AudioTranscriptionConfig()
    assert setup.session_resumption == types.SessionResumptionConfig()
    assert setup.context_window_compression == types.ContextWindowCompressionConfig(sliding_window=types.SlidingWindow())
    assert session.state is SessionState.AWAITING_SETUP
    # Nothing but setup may go out before setupComplete.
    with pytest.raises(LocalProtocolError, match="AWAITING_SETUP"):
        session.send(SendAudio(b"\x00\x00"))


def test_gemini_minimal_setup_and_model_prefix_kept() -> None:
    session = GeminiLiveSession(
        GeminiLiveConfig(model="models/x", voice=None, transcribe=False, compress_context=False)
    )
    [text] = session.initial_messages()
    assert json.loads(text) == {
        "setup": {"model": "models/x", "generationConfig": {"responseModalities": ["AUDIO"]}, "sessionResumption": {}}
    }
    validate_client_message(text)


def test_gemini_greeting_is_sent_after_setup_complete() -> None:
    session = GeminiLiveSession(GeminiLiveConfig(model=MODEL, greeting="Greet the caller"))
    session.initial_messages()
    assert session.pending_messages() == []
    feed(session, types.LiveServerMessage(setup_complete=types.LiveServerSetupComplete()))
    [text] = session.pending_messages()
    turn = validate_client_message(text).client_content
    assert turn == types.LiveClientContent(
        turns=[types.Content(role="user", parts=[types.Part(text="Greet the caller")])], turn_complete=True
    )
    assert session.pending_messages() == []  # once


# ---------------------------------------------------------------------- audio


def test_gemini_audio_up_is_base64_pcm16_at_16k() -> None:
    session = ready_session()
    pcm = np.arange(-160, 160, dtype="<i2").tobytes()
    [text] = session.send(SendAudio(pcm))
    message = validate_client_message(text)
    assert message.realtime_input is not None and message.realtime_input.audio is not None
    assert message.realtime_input.audio.mime_type == "audio/pcm;rate=16000"
    assert message.realtime_input.audio.data == pcm
    assert json.loads(text)["realtimeInput"]["audio"]["data"] == base64.b64encode(pcm).decode()  # standard base64
    assert session.input_format.sample_rate_hz == 16000 and session.input_format.encoding == "pcm16"
    with pytest.raises(LocalProtocolError, match="even"):
        ready_session().send(SendAudio(b"\x00"))


def test_gemini_model_turns_get_distinct_item_ids_and_end_cleanly() -> None:
    session = ready_session()
    first = bytes(range(256)) * 4  # '+' and '/' in standard base64
    events = feed(session, audio(first))
    assert events == [ResponseStarted("gemini-turn-1"), AudioDelta("gemini-turn-1", first, "gemini-turn-1")]
    assert feed(session, audio(b"\x01\x02")) == [AudioDelta("gemini-turn-1", b"\x01\x02", "gemini-turn-1")]
    assert feed(session, content(generation_complete=True)) == [AudioDone("gemini-turn-1", "gemini-turn-1")]
    assert feed(session, content(turn_complete=True)) == [ResponseDone("gemini-turn-1", "completed", None)]
    events = feed(session, audio(b"\x03\x04"))
    assert events == [ResponseStarted("gemini-turn-2"), AudioDelta("gemini-turn-2", b"\x03\x04", "gemini-turn-2")]
    assert session.output_format.sample_rate_hz == 24000


def test_gemini_audio_after_generation_complete_is_said_done_again() -> None:
    """Audio can follow generationComplete within the turn: the bridge must hear that it is done again."""
    session = ready_session()
    pcm = b"\x01\x00" * 240
    feed(session, audio(pcm))
    assert feed(session, content(generation_complete=True)) == [AudioDone("gemini-turn-1", "gemini-turn-1")]
    assert feed(session, audio(pcm)) == [AudioDelta("gemini-turn-1", pcm, "gemini-turn-1")]
    assert feed(session, content(turn_complete=True)) == [
        AudioDone("gemini-turn-1", "gemini-turn-1"),
        ResponseDone("gemini-turn-1", "completed", None),
    ]


def test_gemini_url_safe_base64_is_accepted_too() -> None:
    session = ready_session()
    pcm = bytes(range(250, 256)) * 2
    raw = {"serverContent": {"modelTurn": {"parts": [{"inlineData": {"mimeType": "audio/pcm;rate=24000",
                                                                      "data": base64.urlsafe_b64encode(pcm).decode()}}]}}}
    session.receive_message(json.dumps(raw))
    assert [e for e in session.events() if isinstance(e, AudioDelta)] == [AudioDelta("gemini-turn-1", pcm, "gemini-turn-1")]


def test_gemini_wrong_output_rate_is_refused() -> None:
    session = ready_session()
    part = types.Part(inline_data=types.Blob(data=b"\x00\x00", mime_type="audio/pcm;rate=16000"))
    with pytest.raises(RemoteProtocolError, match="24 kHz"):
        feed(session, content(model_turn=types.Content(parts=[part])))
    assert session.state is SessionState.ERROR


# ---------------------------------------------------------------------- barge-in


def test_gemini_interrupted_is_barge_in_and_closes_the_turn() -> None:
    session = ready_session()
    feed(session, audio(b"\x00\x01" * 10))
    events = feed(session, content(interrupted=True))
    assert events == [SpeechStarted(None, None), AudioDone("gemini-turn-1", "gemini-turn-1")]
    assert session.send(Truncate("gemini-turn-1", 120)) == []  # nothing to truncate on Gemini
    assert feed(session, content(turn_complete=True)) == [ResponseDone("gemini-turn-1", "cancelled", "interrupted")]
    # Audio after the interruption belongs to a new turn (the bridge drops the old one's).
    assert feed(session, audio(b"\x05\x06"))[0] == ResponseStarted("gemini-turn-2")


def test_gemini_audio_after_interrupted_before_turn_complete_is_a_new_item() -> None:
    session = ready_session()
    feed(session, audio(b"\x00\x01"))
    feed(session, content(interrupted=True))
    events = feed(session, audio(b"\x02\x03"))
    assert events[-1] == AudioDelta("gemini-turn-2", b"\x02\x03", "gemini-turn-2")


# ---------------------------------------------------------------------- tools


def test_gemini_tool_round_trip() -> None:
    session = ready_session(GeminiLiveConfig(model=MODEL, tools=(WEATHER,)))
    call = types.LiveServerMessage(
        tool_call=types.LiveServerToolCall(
            function_calls=[
                types.FunctionCall(id="call-1", name="get_weather", args={"city": "Zürich"}),
                types.FunctionCall(id="call-2", name="get_weather", args={"city": "Oslo"}),
            ]
        )
    )
    first, second = feed(session, call)
    assert isinstance(first, ToolCall) and first.call_id == "call-1" and first.name == "get_weather"
    assert json.loads(first.arguments) == {"city": "Zürich"}
    assert isinstance(second, ToolCall) and second.call_id == "call-2"
    [text] = session.send(ToolResult("call-1", '{"temp_c": 21}'))
    response = validate_client_message(text).tool_response
    assert response == types.LiveClientToolResponse(
        function_responses=[types.FunctionResponse(id="call-1", name="get_weather", response={"output": {"temp_c": 21}})]
    )
    [text] = session.send(ToolResult("call-2", '{"error": "no tools are configured"}'))
    response = validate_client_message(text).tool_response
    assert response is not None and response.function_responses is not None
    assert response.function_responses[0].response == {"error": "no tools are configured"}
    assert session.send(ToolResult("call-1", "again")) == []  # answered already: dropped, the call goes on
    assert session.state is SessionState.READY


def test_gemini_a_call_id_seen_again_runs_and_is_answered_once() -> None:
    """The same id twice in one toolCall, or the toolCall re-sent (after it was answered, too): one ToolCall."""
    session = ready_session(GeminiLiveConfig(model=MODEL, tools=(WEATHER,)))
    twice = types.LiveServerMessage(
        tool_call=types.LiveServerToolCall(
            function_calls=[
                types.FunctionCall(id="c1", name="get_weather", args={"city": "Oslo"}),
                types.FunctionCall(id="c1", name="get_weather", args={"city": "Oslo"}),
            ]
        )
    )
    [call] = feed(session, twice)
    assert isinstance(call, ToolCall) and call.call_id == "c1"
    assert not [e for e in feed(session, twice) if isinstance(e, ToolCall)]  # re-sent while it runs
    [text] = session.send(ToolResult("c1", '{"temp_c": 3}'))
    assert validate_client_message(text).tool_response is not None
    assert not [e for e in feed(session, twice) if isinstance(e, ToolCall)]  # re-sent after the answer
    assert session.send(ToolResult("c1", '{"temp_c": 3}')) == []
    assert session.state is SessionState.READY
    feed(session, types.LiveServerMessage(
        session_resumption_update=types.LiveServerSessionResumptionUpdate(new_handle="h1", resumable=True)
    ))
    resumed = session.resumed()  # ... and on the resumed connection
    resumed.initial_messages()
    feed(resumed, types.LiveServerMessage(setup_complete=types.LiveServerSetupComplete()))
    assert not [e for e in feed(resumed, twice) if isinstance(e, ToolCall)]


def test_gemini_plain_text_tool_output_and_cancellation() -> None:
    session = ready_session()
    feed(session, types.LiveServerMessage(
        tool_call=types.LiveServerToolCall(function_calls=[types.FunctionCall(id="a", name="f")])
    ))
    [text] = session.send(ToolResult("a", "sunny"))
    assert json.loads(text)["toolResponse"]["functionResponses"][0]["response"] == {"output": "sunny"}
    feed(session, types.LiveServerMessage(
        tool_call=types.LiveServerToolCall(function_calls=[types.FunctionCall(id="b", name="f", args={})])
    ))
    [event] = feed(session, types.LiveServerMessage(tool_call_cancellation=types.LiveServerToolCallCancellation(ids=["b"])))
    assert isinstance(event, ToolCallsCancelled) and event.call_ids == ("b",)
    assert session.send(ToolResult("b", "late")) == []  # dropped, not an error: the tool finished too late
    assert session.state is SessionState.READY
    with pytest.raises(LocalProtocolError, match="nope"):
        session.send(ToolResult("nope", "{}"))  # never asked for: our bug


# ---------------------------------------------------------------------- transcripts


def test_gemini_the_models_words_before_its_audio_belong_to_its_turn() -> None:
    """Transcription is not ordered with modelTurn: words that come first carry the id the turn then gets."""
    session = ready_session()
    assert feed(session, content(output_transcription=types.Transcription(text="Hello, "))) == [
        Transcript("assistant", "Hello, ", False, "gemini-turn-1")
    ]
    started, _ = feed(session, audio(b"\x00\x00"))
    assert started == ResponseStarted("gemini-turn-1")
    feed(session, content(output_transcription=types.Transcription(text="how can I help?")))
    events = feed(session, content(turn_complete=True))
    assert Transcript("assistant", "Hello, how can I help?", True, "gemini-turn-1") in events
    feed(session, audio(b"\x00\x00"))  # the next turn has the next id
    assert feed(session, content(output_transcription=types.Transcription(text="Bye"))) == [
        Transcript("assistant", "Bye", False, "gemini-turn-2")
    ]


def test_gemini_words_of_a_turn_that_never_had_audio_do_not_reach_the_next_turn() -> None:
    session = ready_session()
    [early] = feed(session, content(output_transcription=types.Transcription(text="Sure, let me")))
    assert early.item_id == "gemini-turn-1"
    feed(session, content(interrupted=True))
    assert Transcript("assistant", "Sure, let me", True, "gemini-turn-1") in feed(session, content(turn_complete=True))
    started, _ = feed(session, audio(b"\x00\x00"))
    assert started == ResponseStarted("gemini-turn-2")  # not turn 1 again: its text would replace those words


def test_gemini_transcripts_fragments_then_final() -> None:
    session = ready_session()
    assert feed(session, content(input_transcription=types.Transcription(text="Hello "))) == [
        Transcript("user", "Hello ", False, "gemini-user-1")
    ]
    assert feed(session, content(input_transcription=types.Transcription(text="there", finished=True))) == [
        Transcript("user", "there", False, "gemini-user-1"),
        Transcript("user", "Hello there", True, "gemini-user-1"),
    ]
    feed(session, audio(b"\x00\x00"))
    events = feed(session, content(output_transcription=types.Transcription(text="Hi!")))
    assert events == [Transcript("assistant", "Hi!", False, "gemini-turn-1")]
    events = feed(session, content(turn_complete=True))
    assert Transcript("assistant", "Hi!", True, "gemini-turn-1") in events
    # The user's unfinished words become final when the model starts its turn.
    feed(session, content(input_transcription=types.Transcription(text="Bye")))
    assert feed(session, audio(b"\x00\x00"))[0] == Transcript("user", "Bye", True, "gemini-user-2")


def test_gemini_the_callers_words_across_a_barge_in_are_one_utterance() -> None:
    # The caller talks over the model's turn 1 and finishes during turn 2: pieces and final text share one id
    # (the call record would otherwise keep "Wait," and "Wait, what about Sunday?" as two turns).
    session = ready_session()
    feed(session, audio(b"\x00\x00"))  # the model's turn 1
    first = feed(session, content(input_transcription=types.Transcription(text="Wait,")))
    feed(session, content(interrupted=True))
    feed(session, content(turn_complete=True))
    feed(session, content(input_transcription=types.Transcription(text=" what about Sunday?")))
    last = feed(session, audio(b"\x00\x00"))[0]  # turn 2 begins: the caller's words are final
    assert first == [Transcript("user", "Wait,", False, "gemini-user-1")]
    assert last == Transcript("user", "Wait, what about Sunday?", True, "gemini-user-1")
    log = TranscriptLog()
    for event in (*first, last):
        log.add(event.role, event.text, final=event.final, item_id=event.item_id, offset_s=1.0)
    assert [turn.text for turn in log.turns()] == ["Wait, what about Sunday?"]


# ---------------------------------------------------------------------- resumption


def test_gemini_resumption_handle_and_resumed_core() -> None:
    session = ready_session(GeminiLiveConfig(model=MODEL, greeting="Say hi"))
    session.pending_messages()
    with pytest.raises(LocalProtocolError, match="resumable"):
        session.resumed()
    [event] = feed(session, types.LiveServerMessage(
        session_resumption_update=types.LiveServerSessionResumptionUpdate(new_handle="h1", resumable=True)
    ))
    assert isinstance(event, ResumptionUpdate) and event.handle == "h1"
    # Not resumable (model generating): the handle is not taken.
    [event] = feed(session, types.LiveServerMessage(
        session_resumption_update=types.LiveServerSessionResumptionUpdate(new_handle="h2", resumable=False)
    ))
    assert isinstance(event, ResumptionUpdate) and event.handle is None
    assert session.resumption_handle == "h1"
    feed(session, audio(b"\x00\x00"))  # gemini-turn-1
    feed(session, types.LiveServerMessage(
        tool_call=types.LiveServerToolCall(function_calls=[types.FunctionCall(id="c", name="f", args={})])
    ))
    [event] = feed(session, types.LiveServerMessage(go_away=types.LiveServerGoAway(time_left="50s")))
    assert isinstance(event, GoAway) and event.time_left == "50s" and session.going_away

    nxt = session.resumed()
    [text] = nxt.initial_messages()
    setup = validate_client_message(text).setup
    assert setup is not None and setup.session_resumption == types.SessionResumptionConfig(handle="h1")
    feed(nxt, types.LiveServerMessage(setup_complete=types.LiveServerSetupComplete()))
    assert nxt.pending_messages() == []  # no second greeting
    # Turn numbering continues, and the pending call can be answered on the new connection.
    assert feed(nxt, audio(b"\x00\x00"))[0] == ResponseStarted("gemini-turn-2")
    [text] = nxt.send(ToolResult("c", "{}"))
    validate_client_message(text)
    # The old connection's turn 1 was cut by the switch: the link ends it for the bridge (then nothing more).
    assert session.abandon_turn() == [
        AudioDone("gemini-turn-1", "gemini-turn-1"),
        ResponseDone("gemini-turn-1", "cancelled", "reconnected"),
    ]
    assert session.abandon_turn() == []


def test_gemini_a_result_whose_connection_failed_can_be_sent_once_on_the_next() -> None:
    """The link re-sends, on the resumed connection, a result whose write failed; only that, and only once."""
    session = ready_session()
    feed(session, types.LiveServerMessage(
        session_resumption_update=types.LiveServerSessionResumptionUpdate(new_handle="h1", resumable=True)
    ))
    feed(session, types.LiveServerMessage(
        tool_call=types.LiveServerToolCall(function_calls=[types.FunctionCall(id="c", name="f", args={})])
    ))
    session.send(ToolResult("c", '{"ok": true}'))  # ... and the socket write of it failed
    nxt = session.resumed()
    nxt.initial_messages()
    feed(nxt, types.LiveServerMessage(setup_complete=types.LiveServerSetupComplete()))
    [text] = nxt.send(ToolResult("c", '{"ok": true}'))
    response = validate_client_message(text).tool_response
    assert response == types.LiveClientToolResponse(
        function_responses=[types.FunctionResponse(id="c", name="f", response={"output": {"ok": True}})]
    )
    assert nxt.send(ToolResult("c", "again")) == []  # answered on this connection now: not again


# ---------------------------------------------------------------------- errors and odd input


def test_gemini_bad_json_is_a_remote_protocol_error_and_kills_the_core() -> None:
    session = ready_session()
    with pytest.raises(RemoteProtocolError, match="JSON"):
        session.receive_message(b"{not json")
    with pytest.raises(LocalProtocolError, match="dead"):
        session.send(SendAudio(b"\x00\x00"))


@pytest.mark.parametrize(
    "raw",
    [b"[1, 2]", b"\xff\xfe", b'{"serverContent": 3}', b'{"serverContent": {"interrupted": "yes"}}',
     b'{"toolCall": {"functionCalls": [{"name": "f"}]}}',
     b'{"serverContent": {"modelTurn": {"parts": [{"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": "@@"}}]}}}'],
)
def test_gemini_malformed_messages_are_refused(raw: bytes) -> None:
    session = ready_session()
    with pytest.raises(RemoteProtocolError):
        session.receive_message(raw)
    assert session.state is SessionState.ERROR


def test_gemini_unknown_and_other_messages() -> None:
    session = ready_session()
    [event] = feed(session, types.LiveServerMessage(usage_metadata=types.UsageMetadata(total_token_count=5)))
    assert isinstance(event, Other) and event.type == "usageMetadata"
    session.receive_message('{"somethingNew": {"x": 1}}')
    [event] = list(session.events())
    assert event == Unknown("somethingNew", '{"somethingNew": {"x": 1}}')
    assert session.state is SessionState.READY


def test_gemini_order_of_calls_is_enforced() -> None:
    session = GeminiLiveSession(GeminiLiveConfig(model=MODEL))
    with pytest.raises(LocalProtocolError, match="initial_messages"):
        session.receive_message(wire(types.LiveServerMessage(setup_complete=types.LiveServerSetupComplete())))
    session = GeminiLiveSession(GeminiLiveConfig(model=MODEL))
    session.initial_messages()
    with pytest.raises(RemoteProtocolError, match="AWAITING_SETUP"):
        session.receive_message(wire(audio(b"\x00\x00")))
    with pytest.raises(LocalProtocolError):
        GeminiLiveConfig(model="")
    session = ready_session()
    [text] = session.send(CreateResponse("Say something"))
    assert validate_client_message(text).client_content is not None


def test_gemini_text_turns() -> None:
    session = ready_session()
    [text] = session.send(SendText("The caller pressed 1 on the phone keypad."))
    assert validate_client_message(text).client_content == types.LiveClientContent(
        turns=[types.Content(role="user", parts=[types.Part(text="The caller pressed 1 on the phone keypad.")])],
        turn_complete=True,
    )
    [text] = session.send(SendText("note", respond=False))
    turn = validate_client_message(text).client_content
    assert turn is not None and turn.turn_complete is False


@pytest.mark.parametrize("model", ["gemini-3.1-flash-live-preview", "models/gemini-3.1-flash-live-preview"])
def test_gemini_31_flash_live_gets_text_as_realtime_input(model: str) -> None:
    """Gemini 3.1 Flash Live takes ``clientContent`` only as history seeded at the start: the greeting, keypad
    digits and a response request go as ``realtimeInput.text`` (a ``clientContent`` would close the connection)."""
    session = ready_session(GeminiLiveConfig(model=model, greeting="Greet the caller."))
    assert [validate_client_message(m).realtime_input for m in session.pending_messages()] == [
        types.LiveClientRealtimeInput(text="Greet the caller.")
    ]
    sent = [*session.send(SendText("The caller pressed 1.")), *session.send(CreateResponse("Say something"))]
    assert [validate_client_message(m).realtime_input for m in sent] == [
        types.LiveClientRealtimeInput(text="The caller pressed 1."),
        types.LiveClientRealtimeInput(text="Say something"),
    ]
    assert all(validate_client_message(m).client_content is None for m in sent)


@pytest.mark.parametrize("model", ["gemini-3.8-live", "gemini-2.5-flash-native-audio-preview-12-2025", "gemini-3.1-pro"])
def test_gemini_other_models_get_text_as_client_content(model: str) -> None:
    session = ready_session(GeminiLiveConfig(model=model, greeting="Greet the caller."))
    [greeting] = session.pending_messages()
    [digits] = session.send(SendText("The caller pressed 1."))
    for message in (greeting, digits):
        turn = validate_client_message(message).client_content
        assert turn is not None and turn.turn_complete is True


def test_gemini_tool_schemas_become_gemini_schemas() -> None:
    """Every shape mediaserver.tools makes, as Gemini's Schema (checked by the SDK's own type)."""
    from mediaserver.protocol.providers.gemini import _declaration
    from mediaserver.tools import tool

    @tool
    def book(day: typing.Literal["mon", "tue"], seats: typing.Literal[1, 2], names: list[str], note: str | None = None) -> str:
        """Book a table.

        Args:
            day: which day
            seats: how many
            names: who comes
            note: anything else
        """
        return "ok"

    @tool
    def ping() -> str:
        """No arguments."""
        return "pong"

    declaration = types.FunctionDeclaration.model_validate(_declaration(book.spec))
    assert declaration.parameters == types.Schema(
        type=types.Type.OBJECT,
        properties={
            "day": types.Schema(type=types.Type.STRING, enum=["mon", "tue"], format="enum", description="which day"),
            "seats": types.Schema(type=types.Type.INTEGER, description="how many (one of 1, 2)"),
            "names": types.Schema(type=types.Type.ARRAY, items=types.Schema(type=types.Type.STRING), description="who comes"),
            "note": types.Schema(type=types.Type.STRING, description="anything else"),
        },
        required=["day", "seats", "names"],
    )
    assert _declaration(ping.spec) == {"name": "ping", "description": "No arguments.", "behavior": "BLOCKING"}
