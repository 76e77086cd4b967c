"""Tests for mediaserver.protocol.providers.pcm (PcmSession), the generic PCM16 protocol.

What the core sends is checked with the same strict validators the fake
model uses (tests/pcm_fake.py), which follow docs/pcm-protocol.md field by
field; model messages are the documented JSON shapes and raw binary PCM.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from mediaserver.protocol.errors import LocalProtocolError, RemoteProtocolError
from mediaserver.protocol.providers import (
    AudioDelta,
    AudioDone,
    AudioFormat,
    CancelResponse,
    CreateResponse,
    FunctionTool,
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
from mediaserver.protocol.providers.pcm import PcmConfig, PcmSession, SessionState

from tests.pcm_fake import _validate_control, validate_start


def msg(type_: str, **body: Any) -> str:
    return json.dumps({"type": type_, **body})


def open_session(**config: Any) -> PcmSession:
    session = PcmSession(PcmConfig(**config))
    validate_start(session.initial_messages()[0])
    return session


def feed(session: PcmSession, *messages: str | bytes) -> list[Any]:
    for message in messages:
        session.receive_message(message)
    return list(session.events())


@pytest.mark.parametrize("input_rate", [8000, 16000, 24000])
@pytest.mark.parametrize("output_rate", [8000, 24000])
def test_pcm_start_message_declares_both_rates(input_rate: int, output_rate: int) -> None:
    session = PcmSession(PcmConfig(input_rate_hz=input_rate, output_rate_hz=output_rate))
    assert isinstance(session, ProviderSession)
    [text] = session.initial_messages()
    start = validate_start(text)
    assert start == {
        "type": "start",
        "version": 1,
        "input": {"encoding": "pcm16", "sample_rate": input_rate, "channels": 1},
        "output": {"encoding": "pcm16", "sample_rate": output_rate, "channels": 1},
    }
    assert session.input_format == AudioFormat("pcm16", input_rate)
    assert session.output_format == AudioFormat("pcm16", output_rate)
    with pytest.raises(LocalProtocolError):
        session.initial_messages()


def test_pcm_start_message_carries_agent_options() -> None:
    tool = FunctionTool("lookup", "Find an order", {"type": "object", "properties": {"id": {"type": "string"}}})
    session = PcmSession(
        PcmConfig(instructions="Be brief.", greeting="Hello!", tools=(tool,), call={"call_sid": "CA1"})
    )
    start = validate_start(session.initial_messages()[0])
    assert start["instructions"] == "Be brief." and start["greeting"] == "Hello!"
    assert start["tools"] == [tool.to_json()]
    assert start["call"] == {"call_sid": "CA1"}


@pytest.mark.parametrize("rate", [0, 11025, 44100, 16001])
def test_pcm_config_rejects_unsupported_rates(rate: int) -> None:
    with pytest.raises(LocalProtocolError, match="8000, 16000 or 24000"):
        PcmConfig(input_rate_hz=rate)
    with pytest.raises(LocalProtocolError):
        PcmConfig(output_rate_hz=rate)


def test_pcm_send_audio_is_the_raw_bytes_in_a_binary_frame() -> None:
    session = open_session()
    payload = bytes(range(256)) * 3
    assert session.send(SendAudio(payload)) == [payload]
    with pytest.raises(LocalProtocolError, match="2-byte"):
        session.send(SendAudio(b"\x01\x02\x03"))
    assert session.state is SessionState.ERROR


def test_pcm_commands_before_start_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        PcmSession().send(SendAudio(b"\x00\x00"))
    with pytest.raises(LocalProtocolError):
        PcmSession().receive_message(msg("ready"))


def test_pcm_tool_result_text_cancel_and_create() -> None:
    session = open_session()
    [digits] = session.send(SendText("The caller pressed 5 on the phone keypad."))
    assert _validate_control(digits) == {
        "type": "text",
        "text": "The caller pressed 5 on the phone keypad.",
        "respond": True,
    }
    [text] = session.send(ToolResult("call_1", '{"ok": true}'))
    assert _validate_control(text) == {"type": "tool_result", "call_id": "call_1", "output": '{"ok": true}'}
    assert session.send(CancelResponse()) == [] and session.send(CreateResponse()) == []
    with pytest.raises(LocalProtocolError):
        session.send(42)  # type: ignore[arg-type]


def test_pcm_replies_are_numbered_by_their_boundaries() -> None:
    session = open_session()
    events = feed(
        session,
        msg("ready"),
        b"\x01\x00" * 100,
        b"\x02\x00" * 50,
        msg("reply_done"),
        msg("reply_done"),  # no audio since: nothing ends
        b"\x03\x00" * 10,
        msg("speech_started"),
        msg("clear"),  # nothing new to cut: still the same next reply
        b"\x04\x00" * 10,
        msg("clear"),
        b"\x05\x00",
    )
    assert events[0] == SessionReady(None)
    assert events[1:4] == [
        AudioDelta("reply-1", b"\x01\x00" * 100),
        AudioDelta("reply-1", b"\x02\x00" * 50),
        AudioDone("reply-1"),
    ]
    assert isinstance(events[4], Other)
    assert events[5:] == [
        AudioDelta("reply-2", b"\x03\x00" * 10),
        SpeechStarted(None, None),
        SpeechStarted(None, None, by_caller=False),  # (the model's own clear: not a barge-in)
        AudioDelta("reply-3", b"\x04\x00" * 10),
        SpeechStarted(None, None, by_caller=False),
        AudioDelta("reply-4", b"\x05\x00"),
    ]
    assert session.audio_received_ms("reply-1") == (200 + 100) // 32


def test_pcm_an_empty_audio_frame_starts_a_reply_too() -> None:
    # "The next audio frame after one of those starts the next reply": an empty one too, or the two sides
    # would number the replies differently and a playback would name the wrong one.
    session = open_session(output_rate_hz=8000)
    events = feed(session, msg("ready"), b"", msg("reply_done"), b"\x00\x00" * 800, msg("speech_started"))
    assert events[1:3] == [Other("audio", ""), AudioDone("reply-1")]
    assert events[3] == AudioDelta("reply-2", b"\x00\x00" * 800)
    [text] = session.send(Truncate("reply-2", 40))
    assert _validate_control(text) == {"type": "playback", "reply": 2, "heard_ms": 40}


@pytest.mark.parametrize("rate", [8000, 16000, 24000])
def test_pcm_truncate_is_playback_clamped_to_received_audio(rate: int) -> None:
    session = open_session(output_rate_hz=rate)
    bytes_per_ms = rate // 1000 * 2
    feed(session, b"\x00" * (300 * bytes_per_ms))  # 300 ms of reply 1, still open
    [text] = session.send(Truncate("reply-1", 120))
    assert _validate_control(text) == {"type": "playback", "reply": 1, "heard_ms": 120}
    assert session.audio_received_ms("reply-1") == 120
    [clamped] = session.send(Truncate("reply-1", 5000))
    assert json.loads(clamped)["heard_ms"] == 120


def test_pcm_truncate_of_a_finished_reply_heard_in_full_sends_nothing() -> None:
    session = open_session(output_rate_hz=8000)
    feed(session, b"\x00" * 1600, msg("reply_done"))  # 100 ms, complete
    assert session.send(Truncate("reply-1", 100)) == []
    [text] = session.send(Truncate("reply-1", 40))
    assert json.loads(text)["heard_ms"] == 40


@pytest.mark.parametrize("item", ["reply-9", "el-reply-1", "reply-x"])
def test_pcm_truncate_of_unknown_reply_is_local_error(item: str) -> None:
    session = open_session()
    with pytest.raises(LocalProtocolError):
        session.send(Truncate(item, 10))


def test_pcm_transcript_tool_call_and_error() -> None:
    session = open_session()
    events = feed(
        session,
        msg("transcript", role="user", text="where is my order"),
        msg("transcript", role="assistant", text="Let me look.", extra_field=True),
        msg("tool_call", call_id="c1", name="lookup", arguments={"id": "42"}),
        msg("tool_call", call_id="c2", name="hang_up"),
        msg("error", message="GPU on fire", fatal=True, code="oom"),
        msg("error", message="slow", fatal=False),
    )
    assert events == [
        Transcript("user", "where is my order", final=True),
        Transcript("assistant", "Let me look.", final=True, item_id="reply-1"),
        ToolCall("c1", "lookup", '{"id":"42"}'),
        ToolCall("c2", "hang_up", "{}"),
        ProviderError("GPU on fire", fatal=True, code="oom"),
        ProviderError("slow", fatal=False),
    ]


def test_pcm_the_agents_transcripts_belong_to_their_reply() -> None:
    """To the reply they name, else to the reply whose audio is arriving, else (between replies) to the next one:
    a barge-in's cut applies to them; several texts for one reply are one turn."""
    session = open_session()
    events = feed(
        session,
        msg("transcript", role="assistant", text="Hello,"),  # before its audio (text-to-speech)
        b"\x00\x01" * 80,
        msg("transcript", role="assistant", text="how can I help?"),
        msg("reply_done"),
        msg("transcript", role="assistant", text="Your order"),  # the next reply's, before its audio
        b"\x00\x01" * 80,
        msg("speech_started"),
        msg("transcript", role="assistant", text="has shipped.", reply=2),  # late, after the cut: named
    )
    transcripts = [e for e in events if isinstance(e, Transcript)]
    assert transcripts == [
        Transcript("assistant", "Hello,", final=True, item_id="reply-1"),
        Transcript("assistant", "Hello, how can I help?", final=True, item_id="reply-1"),
        Transcript("assistant", "Your order", final=True, item_id="reply-2"),
        Transcript("assistant", "Your order has shipped.", final=True, item_id="reply-2"),
    ]


def test_pcm_the_next_replys_words_may_come_while_this_reply_still_plays() -> None:
    """As the protocol says: ``reply`` from 1 to the next reply's, also while the current one's audio arrives."""
    session = open_session()
    events = feed(
        session,
        b"\x00\x01" * 80,  # reply 1 arriving
        msg("transcript", role="assistant", text="Next: the weather.", reply=2),
        msg("reply_done"),
        b"\x00\x01" * 80,  # reply 2's audio
    )
    assert [e for e in events if isinstance(e, Transcript)] == [
        Transcript("assistant", "Next: the weather.", final=True, item_id="reply-2")
    ]
    assert session.state is SessionState.OPEN
    with pytest.raises(RemoteProtocolError, match="from 1 to 3, got 4"):  # (reply 2 arriving: 3 is the next)
        feed(session, msg("transcript", role="assistant", text="x", reply=4))


@pytest.mark.parametrize("reply", [0, 4, "2", True, 1.0])
def test_pcm_a_transcript_naming_no_such_reply_is_a_protocol_error(reply: object) -> None:
    session = open_session()
    feed(session, b"\x00\x01" * 80, msg("reply_done"))  # reply 1 done; the next is 2
    with pytest.raises(RemoteProtocolError, match="transcript 'reply' must be a reply number from 1 to 2"):
        feed(session, msg("transcript", role="assistant", text="x", reply=reply))


def test_pcm_unknown_messages_are_ignorable() -> None:
    session = open_session()
    raw = msg("metrics", gpu=0.5)
    assert feed(session, raw) == [Unknown("metrics", raw)]
    assert session.state is SessionState.OPEN


@pytest.mark.parametrize(
    "bad",
    [
        b"\x00\x01\x02",
        "not json",
        "[1]",
        '{"type": 7}',
        msg("transcript", role="system", text="x"),
        msg("tool_call", call_id="", name="x"),
        msg("tool_call", call_id="c", name="x", arguments="{}"),
        msg("error", message="x", fatal="yes"),
    ],
)
def test_pcm_malformed_messages_are_remote_errors_and_kill_the_core(bad: str | bytes) -> None:
    session = open_session()
    with pytest.raises(RemoteProtocolError):
        session.receive_message(bad)
    assert session.state is SessionState.ERROR
    with pytest.raises(LocalProtocolError):
        session.send(SendAudio(b"\x00\x00"))
