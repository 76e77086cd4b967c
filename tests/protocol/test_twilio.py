"""Tests for mediaserver.protocol.twilio (TwilioStream) and its events.

Inbound fixtures follow the message shapes of Twilio's "Media Streams -
WebSocket Messages" page (all counters as JSON strings).  The playback
accounting is checked against ``FakeTwilioPlayer``, an independent model of
Twilio's outbound buffer: audio plays in order, a mark is echoed once the
audio before it has played (at once if nothing is buffered), and ``clear``
drops the buffer and echoes every pending mark.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import FrozenInstanceError
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mediaserver.protocol import (
    ClearAudio,
    Connected,
    Dtmf,
    ItemPlayback,
    LocalProtocolError,
    Mark,
    Media,
    MediaFormat,
    RemoteProtocolError,
    SendAudio,
    SendMark,
    Start,
    Stop,
    StreamState,
    TwilioEvent,
    TwilioStream,
    Unknown,
)

STREAM_SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
ACCOUNT_SID = "AC3f7f6a6a3e2d4b5c8a9b0c1d2e3f4a5b"
CALL_SID = "CA1e2d3c4b5a69788796a5b4c3d2e1f0a9"


# ------------------------------------------------------------------ fixtures


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj)


def connected_msg() -> str:
    return dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def start_msg(seq: int = 1, **start_overrides: Any) -> str:
    start: dict[str, Any] = {
        "streamSid": STREAM_SID,
        "accountSid": ACCOUNT_SID,
        "callSid": CALL_SID,
        "tracks": ["inbound"],
        "customParameters": {"token": "abc123", "FirstName": "Jane"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
    }
    start.update(start_overrides)
    return dumps({"event": "start", "sequenceNumber": str(seq), "start": start, "streamSid": STREAM_SID})


def media_msg(
    seq: int,
    chunk: int,
    timestamp_ms: int,
    payload: bytes = b"\xff" * 160,
    *,
    track: str = "inbound",
    stream_sid: str = STREAM_SID,
) -> str:
    return dumps(
        {
            "event": "media",
            "sequenceNumber": str(seq),
            "media": {
                "track": track,
                "chunk": str(chunk),
                "timestamp": str(timestamp_ms),
                "payload": base64.b64encode(payload).decode(),
            },
            "streamSid": stream_sid,
        }
    )


def mark_msg(seq: int, name: str) -> str:
    return dumps({"event": "mark", "sequenceNumber": str(seq), "streamSid": STREAM_SID, "mark": {"name": name}})


def dtmf_msg(seq: int, digit: str) -> str:
    return dumps(
        {
            "event": "dtmf",
            "streamSid": STREAM_SID,
            "sequenceNumber": str(seq),
            "dtmf": {"track": "inbound_track", "digit": digit},
        }
    )


def stop_msg(seq: int, *, call_sid: str = CALL_SID) -> str:
    return dumps(
        {
            "event": "stop",
            "sequenceNumber": str(seq),
            "stop": {"accountSid": ACCOUNT_SID, "callSid": call_sid},
            "streamSid": STREAM_SID,
        }
    )


def receive(stream: TwilioStream, *messages: str) -> list[TwilioEvent]:
    for message in messages:
        stream.receive_message(message)
    return list(stream.events())


def started_stream(**kwargs: Any) -> TwilioStream:
    stream = TwilioStream(**kwargs)
    receive(stream, connected_msg(), start_msg())
    assert stream.state is StreamState.STREAMING
    return stream


class Sequencer:
    """Hands out Twilio sequence numbers after ``start`` (which used 1)."""

    def __init__(self) -> None:
        self.next = 2

    def __call__(self) -> int:
        self.next += 1
        return self.next - 1


def assert_dead(stream: TwilioStream) -> None:
    assert stream.state is StreamState.ERROR
    with pytest.raises(LocalProtocolError):
        stream.receive_message(media_msg(99, 99, 99))
    with pytest.raises(LocalProtocolError):
        stream.send(SendMark())
    with pytest.raises(LocalProtocolError):
        list(stream.events())


# --------------------------------------------------------------- sans-I/O rule


def test_twilio_protocol_package_imports_no_io_or_event_loop_library() -> None:
    """mediaserver.protocol (including providers) must stay importable without trio & co."""
    code = (
        "import sys, mediaserver.protocol, mediaserver.protocol.providers\n"
        "banned = {'trio', 'quart', 'quart_trio', 'hypercorn', 'trio_websocket', 'wsproto', 'h11',\n"
        "          'asyncio', 'socket', 'ssl', 'httpx', 'websockets', 'pydantic', 'openai', 'twilio'}\n"
        "print(sorted(banned & {name.split('.')[0] for name in sys.modules}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------- lifecycle


def test_twilio_full_lifecycle_events_and_states() -> None:
    stream = TwilioStream()
    assert stream.state is StreamState.AWAITING_CONNECTED
    assert stream.stream_sid is None

    assert receive(stream, connected_msg()) == [Connected(protocol="Call", version="1.0.0")]
    assert stream.state is StreamState.AWAITING_START

    [start] = receive(stream, start_msg())
    assert start == Start(
        sequence_number=1,
        stream_sid=STREAM_SID,
        account_sid=ACCOUNT_SID,
        call_sid=CALL_SID,
        tracks=("inbound",),
        custom_parameters={"token": "abc123", "FirstName": "Jane"},
        media_format=MediaFormat(encoding="audio/x-mulaw", sample_rate_hz=8000, channels=1),
    )
    assert stream.state is StreamState.STREAMING
    assert stream.stream_sid == STREAM_SID
    assert stream.start is start

    audio = bytes(range(160))
    events = receive(stream, media_msg(2, 1, 0, audio), media_msg(3, 2, 20, audio[::-1]), dtmf_msg(4, "7"))
    assert events == [
        Media(sequence_number=2, track="inbound", chunk=1, timestamp_ms=0, payload=audio),
        Media(sequence_number=3, track="inbound", chunk=2, timestamp_ms=20, payload=audio[::-1]),
        Dtmf(sequence_number=4, track="inbound_track", digit="7"),
    ]

    assert stream.send(SendAudio(b"\x00\x01\x02")) == (
        '{"event":"media","streamSid":"MZ18ad3ab5a668481ce02b83e7395059f0","media":{"payload":"AAEC"}}'
    )
    assert stream.send(SendMark()) == (
        '{"event":"mark","streamSid":"MZ18ad3ab5a668481ce02b83e7395059f0","mark":{"name":"1"}}'
    )
    assert receive(stream, mark_msg(5, "1")) == [Mark(sequence_number=5, name="1", cleared=False)]
    assert stream.played_samples == 3

    assert receive(stream, stop_msg(6)) == [Stop(sequence_number=6, account_sid=ACCOUNT_SID, call_sid=CALL_SID)]
    assert stream.state is StreamState.STOPPED
    assert stream.sequence_numbers_missing == 0
    assert stream.chunks_missing == 0


def test_twilio_start_custom_parameters_are_read_only_and_events_frozen() -> None:
    stream = TwilioStream()
    [_, start] = receive(stream, connected_msg(), start_msg())
    assert isinstance(start, Start)
    with pytest.raises(TypeError):
        start.custom_parameters["token"] = "evil"  # type: ignore[index]
    with pytest.raises(FrozenInstanceError):
        start.call_sid = "CAother"  # type: ignore[misc]


def test_twilio_start_without_custom_parameters_gives_empty_mapping() -> None:
    stream = TwilioStream()
    msg = json.loads(start_msg())
    del msg["start"]["customParameters"]
    [_, start] = receive(stream, connected_msg(), json.dumps(msg))
    assert isinstance(start, Start)
    assert dict(start.custom_parameters) == {}


def test_twilio_outbound_json_exact_shape_and_compact() -> None:
    stream = started_stream()
    payload = bytes(range(256))
    media = stream.send(SendAudio(payload, item="item_1"))
    mark = stream.send(SendMark())
    clear = stream.send(ClearAudio())
    assert json.loads(media) == {
        "event": "media",
        "streamSid": STREAM_SID,
        "media": {"payload": base64.b64encode(payload).decode()},
    }
    assert json.loads(mark) == {"event": "mark", "streamSid": STREAM_SID, "mark": {"name": "1"}}
    assert clear == '{"event":"clear","streamSid":"MZ18ad3ab5a668481ce02b83e7395059f0"}'
    for text in (media, mark, clear):
        assert text == json.dumps(json.loads(text), separators=(",", ":"))


@pytest.mark.parametrize(
    ("where", "key"), [("outer", "streamSid"), ("start", "callSid"), ("start", "accountSid")]
)
@pytest.mark.parametrize("bad", ['MZ"\\\u00e9', "CA1\ncall CA2: ended", "", "x" * 65, 7])
def test_twilio_start_ids_must_be_identifiers(where: str, key: str, bad: object) -> None:
    # The ids reach log lines, records and the JSON the stream sends: nothing but an identifier is taken.
    msg = json.loads(start_msg())
    if where == "outer" or key == "streamSid":
        msg["streamSid"] = msg["start"]["streamSid"] = bad
    else:
        msg["start"][key] = bad
    stream = TwilioStream()
    receive(stream, connected_msg())
    with pytest.raises(RemoteProtocolError, match=f"'{key}' must be an identifier"):
        stream.receive_message(json.dumps(msg))


def test_twilio_start_ids_take_any_short_identifier() -> None:
    stream = TwilioStream()
    msg = json.loads(start_msg())
    msg["streamSid"] = msg["start"]["streamSid"] = "MZ_test-1"
    msg["start"]["callSid"] = "CAa"
    [start] = receive(stream, connected_msg(), json.dumps(msg))[1:]
    assert isinstance(start, Start) and (start.stream_sid, start.call_sid) == ("MZ_test-1", "CAa")
    assert json.loads(stream.send(ClearAudio())) == {"event": "clear", "streamSid": "MZ_test-1"}


def test_twilio_empty_media_payload_is_allowed() -> None:
    stream = started_stream()
    [media] = receive(stream, media_msg(2, 1, 0, b""))
    assert media == Media(2, "inbound", 1, 0, b"")


def test_twilio_unknown_event_is_reported_not_dropped() -> None:
    stream = started_stream()
    text = dumps({"event": "futureThing", "sequenceNumber": "2", "streamSid": STREAM_SID, "x": [1, 2]})
    assert receive(stream, text) == [Unknown(event="futureThing", raw=text, sequence_number=2)]
    # Its sequence number counted: the next message must be 3.
    with pytest.raises(RemoteProtocolError, match="repeats or goes backwards"):
        stream.receive_message(media_msg(2, 1, 0))


def test_twilio_unknown_event_before_connected_is_allowed() -> None:
    stream = TwilioStream()
    text = dumps({"event": "hello"})
    assert receive(stream, text) == [Unknown(event="hello", raw=text, sequence_number=None)]
    assert stream.state is StreamState.AWAITING_CONNECTED


def test_twilio_events_are_queued_until_drained() -> None:
    stream = TwilioStream()
    stream.receive_message(connected_msg())
    stream.receive_message(start_msg())
    events = stream.events()
    assert isinstance(next(events), Connected)
    stream.receive_message(media_msg(2, 1, 0, b"\x01"))
    assert [type(e) for e in events] == [Start, Media]
    assert list(stream.events()) == []


# ---------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        '{"event": "media"',
        "[1, 2, 3]",
        '"connected"',
        "null",
        "{}",
        '{"event": 5}',
        '{"event": null}',
        "[" * 50_000 + "]" * 50_000,  # nesting deep enough to hit the recursion limit
    ],
)
def test_twilio_malformed_message_is_remote_error_and_kills_stream(text: str) -> None:
    stream = TwilioStream(max_message_bytes=200_000)
    with pytest.raises(RemoteProtocolError):
        stream.receive_message(text)
    assert_dead(stream)


@pytest.mark.parametrize("digit", ["0", "9", "*", "#", "A", "D"])
def test_twilio_dtmf_takes_one_keypad_key(digit: str) -> None:
    assert receive(started_stream(), dtmf_msg(2, digit)) == [Dtmf(2, "inbound_track", digit)]


@pytest.mark.parametrize("digit", ["", "12", "x", "a", "E", "1\n2026 ERROR forged", "١", "1" * 1500])
def test_twilio_dtmf_that_is_not_one_key_is_remote_error(digit: str) -> None:
    stream = started_stream()
    with pytest.raises(RemoteProtocolError, match="dtmf.digit must be one of|digit. must be a non-empty string"):
        stream.receive_message(dtmf_msg(2, digit))
    assert_dead(stream)


def test_twilio_binary_frame_is_remote_error() -> None:
    stream = TwilioStream()
    with pytest.raises(RemoteProtocolError, match="binary frame"):
        stream.receive_message(connected_msg().encode())
    assert_dead(stream)


@pytest.mark.parametrize(
    "value", [2, 2.0, "", "abc", "-2", "+2", "2.0", " 2", "2 ", "0x2", "\u0662", "²", None, True, "9" * 20]
)
def test_twilio_sequence_number_must_be_decimal_string(value: object) -> None:
    stream = started_stream()
    msg = json.loads(media_msg(2, 1, 0))
    msg["sequenceNumber"] = value
    with pytest.raises(RemoteProtocolError, match="sequenceNumber"):
        stream.receive_message(json.dumps(msg))
    assert_dead(stream)


@pytest.mark.parametrize("field", ["chunk", "timestamp"])
@pytest.mark.parametrize("value", [1, "", "x", "-1", "1e3", None])
def test_twilio_media_counters_must_be_decimal_strings(field: str, value: object) -> None:
    stream = started_stream()
    msg = json.loads(media_msg(2, 1, 0))
    msg["media"][field] = value
    with pytest.raises(RemoteProtocolError, match=f"media.{field}"):
        stream.receive_message(json.dumps(msg))
    assert_dead(stream)


def test_twilio_missing_sequence_number_is_remote_error() -> None:
    stream = started_stream()
    msg = json.loads(media_msg(2, 1, 0))
    del msg["sequenceNumber"]
    with pytest.raises(RemoteProtocolError, match="missing 'sequenceNumber'"):
        stream.receive_message(json.dumps(msg))


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.__setitem__("media", "x"),
        lambda m: m.pop("media"),
        lambda m: m["media"].__setitem__("payload", 5),
        lambda m: m["media"].pop("payload"),
        lambda m: m["media"].__setitem__("payload", "AAE"),  # bad padding
        lambda m: m["media"].__setitem__("payload", "AA=A"),  # padding in the middle
        lambda m: m["media"].__setitem__("payload", "AA\nA"),  # non-alphabet char
        lambda m: m["media"].__setitem__("payload", "AAé="),  # non-ASCII
        lambda m: m["media"].__setitem__("track", 1),
        lambda m: m["media"].pop("track"),
        lambda m: m.pop("streamSid"),
    ],
)
def test_twilio_media_wrong_types_are_remote_errors(mutate: Any) -> None:
    stream = started_stream()
    msg = json.loads(media_msg(2, 1, 0))
    mutate(msg)
    with pytest.raises(RemoteProtocolError):
        stream.receive_message(json.dumps(msg))
    assert_dead(stream)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"tracks": "inbound"}, "tracks"),
        ({"tracks": ["inbound", 1]}, "tracks"),
        ({"customParameters": {"a": 1}}, "customParameters"),
        ({"customParameters": ["a"]}, "customParameters"),
        ({"callSid": ""}, "callSid"),
        ({"accountSid": None}, "accountSid"),
        ({"mediaFormat": {"encoding": "audio/x-alaw", "sampleRate": 8000, "channels": 1}}, "unsupported"),
        ({"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 16000, "channels": 1}}, "unsupported"),
        ({"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2}}, "unsupported"),
        ({"mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000.0, "channels": 1}}, "sampleRate"),
        ({"mediaFormat": {"encoding": "audio/x-mulaw", "channels": 1}}, "sampleRate"),
        ({"mediaFormat": None}, "mediaFormat"),
    ],
)
def test_twilio_start_wrong_fields_are_remote_errors(overrides: dict[str, Any], match: str) -> None:
    stream = TwilioStream()
    receive(stream, connected_msg())
    with pytest.raises(RemoteProtocolError, match=match):
        stream.receive_message(start_msg(**overrides))
    assert_dead(stream)


def test_twilio_start_media_format_numbers_as_strings_are_accepted() -> None:
    stream = TwilioStream()
    fmt = {"encoding": "audio/x-mulaw", "sampleRate": "8000", "channels": "1"}
    [_, start] = receive(stream, connected_msg(), start_msg(mediaFormat=fmt))
    assert isinstance(start, Start)
    assert start.media_format == MediaFormat("audio/x-mulaw", 8000, 1)


def test_twilio_connected_missing_fields_is_remote_error() -> None:
    stream = TwilioStream()
    with pytest.raises(RemoteProtocolError, match="version"):
        stream.receive_message('{"event":"connected","protocol":"Call"}')


# ------------------------------------------------------------------ size limit


def _message_of_size(size: int, filler: str = "x") -> str:
    base = dumps({"event": "padding", "pad": ""})
    pad_chars = (size - len(base.encode())) // len(filler.encode())
    text = dumps({"event": "padding", "pad": filler * pad_chars})
    if filler != "x":
        text = json.dumps({"event": "padding", "pad": filler * pad_chars}, ensure_ascii=False)
    return text


def test_twilio_message_at_limit_accepted_one_byte_over_refused() -> None:
    stream = TwilioStream(max_message_bytes=1000)
    at_limit = _message_of_size(1000)
    assert len(at_limit.encode()) == 1000
    assert [type(e) for e in receive(stream, at_limit)] == [Unknown]

    over = _message_of_size(1001)
    assert len(over.encode()) == 1001
    with pytest.raises(RemoteProtocolError, match="exceeds the 1000-byte limit") as info:
        stream.receive_message(over)
    assert info.value.close_code_hint == 1009
    assert_dead(stream)


def test_twilio_size_limit_counts_utf8_bytes_not_characters() -> None:
    stream = TwilioStream(max_message_bytes=1000)
    text = json.dumps({"event": "padding", "pad": "é" * 495}, ensure_ascii=False)
    assert len(text) < 1000 < len(text.encode())
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        stream.receive_message(text)


def test_twilio_default_limit_is_64_kib() -> None:
    stream = TwilioStream()
    with pytest.raises(RemoteProtocolError, match="65536-byte limit"):
        stream.receive_message(_message_of_size(64 * 1024 + 1))


def test_twilio_invalid_limit_rejected() -> None:
    with pytest.raises(ValueError):
        TwilioStream(max_message_bytes=0)


# --------------------------------------------------------------- state machine


@pytest.mark.parametrize(
    ("prefix", "message", "match"),
    [
        ([], start_msg(), "'start' in state AWAITING_CONNECTED"),
        ([], media_msg(2, 1, 0), "'media' in state AWAITING_CONNECTED"),
        ([connected_msg()], connected_msg(), "'connected' in state AWAITING_START"),
        ([connected_msg()], media_msg(2, 1, 0), "'media' in state AWAITING_START"),
        ([connected_msg()], mark_msg(2, "1"), "'mark' in state AWAITING_START"),
        ([connected_msg()], stop_msg(2), "'stop' in state AWAITING_START"),
        ([connected_msg(), start_msg()], start_msg(2), "'start' in state STREAMING"),
        ([connected_msg(), start_msg()], connected_msg(), "'connected' in state STREAMING"),
        ([connected_msg(), start_msg(), stop_msg(2)], media_msg(3, 1, 0), "'media' in state STOPPED"),
        ([connected_msg(), start_msg(), stop_msg(2)], stop_msg(3), "'stop' in state STOPPED"),
        ([connected_msg(), start_msg(), stop_msg(2)], dumps({"event": "later"}), "'later' in state STOPPED"),
    ],
)
def test_twilio_out_of_place_messages_are_remote_errors(prefix: list[str], message: str, match: str) -> None:
    stream = TwilioStream()
    receive(stream, *prefix)
    with pytest.raises(RemoteProtocolError, match=match):
        stream.receive_message(message)
    assert_dead(stream)


@pytest.mark.parametrize("command", [SendAudio(b"\xff"), SendMark(), ClearAudio()])
@pytest.mark.parametrize("prefix", [[], [connected_msg()], [connected_msg(), start_msg(), stop_msg(2)]])
def test_twilio_send_outside_streaming_is_local_error(command: Any, prefix: list[str]) -> None:
    stream = TwilioStream()
    receive(stream, *prefix)
    with pytest.raises(LocalProtocolError, match="cannot send"):
        stream.send(command)
    assert_dead(stream)


def test_twilio_send_non_command_is_local_error() -> None:
    stream = started_stream()
    with pytest.raises(LocalProtocolError, match="not a Twilio command"):
        stream.send("media")  # type: ignore[arg-type]
    assert_dead(stream)


def test_twilio_empty_send_audio_is_rejected_at_construction_without_killing_stream() -> None:
    stream = started_stream()
    with pytest.raises(LocalProtocolError, match="at least one byte"):
        SendAudio(b"")
    assert stream.state is StreamState.STREAMING


def test_twilio_accounting_survives_stop_for_reading() -> None:
    stream = started_stream()
    stream.send(SendAudio(b"\xff" * 80, item="a"))
    stream.send(SendMark())
    receive(stream, mark_msg(2, "1"), stop_msg(3))
    assert stream.state is StreamState.STOPPED
    assert stream.playback("a") == ItemPlayback("a", 80, 80, 0)


def test_twilio_a_long_call_s_replies_leave_nothing_for_the_garbage_collector() -> None:
    """Per-item accounting grows with every reply of a call; none of it may be objects that full collections walk."""
    import gc

    def replies(stream: TwilioStream, seq: Sequencer, first: int, count: int) -> None:
        for n in range(first, first + count):
            stream.send(SendAudio(b"\xff" * 320, item=f"item_{n}"))
            stream.send(SendMark())
            receive(stream, mark_msg(seq(), str(n)))
            if n % 10 == 0:  # a barge-in now and then: cleared audio is accounted per item too
                stream.send(SendAudio(b"\xff" * 160, item=f"item_{n}"))
                stream.send(ClearAudio())

    stream, seq = started_stream(), Sequencer()
    replies(stream, seq, 1, 50)  # warm up: every container the accounting uses exists now
    gc.collect()
    before = len(gc.get_objects())
    replies(stream, seq, 51, 300)
    gc.collect()
    # CPython does not track a dict whose keys and values are all str/int; one object per item was 300 more.
    assert len(gc.get_objects()) - before < 30
    assert stream.playback("item_300") == ItemPlayback("item_300", 480, 320, 160)
    assert stream.playback("item_999") == ItemPlayback("item_999", 0, 0, 0)  # never sent


def test_twilio_playback_is_kept_for_the_latest_items_only() -> None:
    from mediaserver.protocol.twilio import ITEM_HISTORY

    stream, seq = started_stream(), Sequencer()
    n = ITEM_HISTORY + 10
    for k in range(1, n + 1):
        stream.send(SendAudio(b"\xff" * 80, item=f"item_{k}"))
        stream.send(SendAudio(b"\xff" * 80, item=f"item_{k}"))  # more of the same item keeps its place
        stream.send(SendMark())
        receive(stream, mark_msg(seq(), str(k)))
    stream.send(SendAudio(b"\xff" * 40, item=f"item_{n}"))
    stream.send(ClearAudio())
    assert stream.playback("item_10") == ItemPlayback("item_10", 0, 0, 0)  # forgotten: long played
    assert stream.playback("item_11") == ItemPlayback("item_11", 160, 160, 0)
    assert stream.playback(f"item_{n}") == ItemPlayback(f"item_{n}", 200, 160, 40)
    # The totals are not per item: nothing is forgotten there.
    assert (stream.sent_samples, stream.played_samples, stream.cleared_samples) == (160 * n + 40, 160 * n, 40)


# ------------------------------------------------------------ ordering facts


def test_twilio_sequence_gap_is_counted_not_fatal() -> None:
    stream = started_stream()
    events = receive(stream, media_msg(2, 1, 0), media_msg(5, 2, 20), media_msg(6, 3, 40), media_msg(10, 4, 60))
    assert [e.sequence_number for e in events if isinstance(e, Media)] == [2, 5, 6, 10]
    assert stream.sequence_numbers_missing == 2 + 3
    assert stream.chunks_missing == 0


def test_twilio_start_sequence_number_gap_is_counted() -> None:
    stream = TwilioStream()
    receive(stream, connected_msg(), start_msg(seq=3))
    assert stream.sequence_numbers_missing == 2


@pytest.mark.parametrize("seq", [1, 2])
def test_twilio_sequence_number_repeat_or_backwards_is_fatal(seq: int) -> None:
    stream = started_stream()
    receive(stream, media_msg(2, 1, 0))
    with pytest.raises(RemoteProtocolError, match=f"sequenceNumber {seq} repeats or goes backwards \\(expected 3\\)"):
        stream.receive_message(media_msg(seq, 2, 20))
    assert_dead(stream)


def test_twilio_chunk_gap_reported_on_event_per_track() -> None:
    stream = started_stream()
    events = receive(
        stream,
        media_msg(2, 1, 0),
        media_msg(3, 4, 60),  # chunks 2 and 3 missing on inbound
        media_msg(4, 1, 0, track="outbound"),  # other track counts separately
        media_msg(5, 5, 80),
        media_msg(6, 3, 40, track="outbound"),  # chunk 2 missing on outbound
    )
    assert [(e.track, e.chunk, e.chunks_missing) for e in events if isinstance(e, Media)] == [
        ("inbound", 1, 0),
        ("inbound", 4, 2),
        ("outbound", 1, 0),
        ("inbound", 5, 0),
        ("outbound", 3, 1),
    ]
    assert stream.chunks_missing == 3
    assert stream.sequence_numbers_missing == 0


def test_twilio_first_chunk_above_one_counts_missing() -> None:
    stream = started_stream()
    [media] = receive(stream, media_msg(2, 3, 40))
    assert isinstance(media, Media)
    assert media.chunks_missing == 2


@pytest.mark.parametrize("chunk", [1, 2])
def test_twilio_chunk_repeat_or_backwards_is_fatal(chunk: int) -> None:
    stream = started_stream()
    receive(stream, media_msg(2, 1, 0), media_msg(3, 2, 20))
    with pytest.raises(RemoteProtocolError, match=f"media.chunk {chunk} on track 'inbound'"):
        stream.receive_message(media_msg(4, chunk, 40))
    assert_dead(stream)


def test_twilio_timestamp_is_recorded_not_judged() -> None:
    stream = started_stream()
    events = receive(stream, media_msg(2, 1, 500), media_msg(3, 2, 100))
    assert [e.timestamp_ms for e in events if isinstance(e, Media)] == [500, 100]


# ---------------------------------------------------------------- split brain


@pytest.mark.parametrize("track", ["inbound_track", "both", "x" * 60_000])
def test_twilio_media_on_a_track_twilio_has_not_is_remote_error(track: str) -> None:
    """Only 'inbound' and 'outbound': a counter is kept per track, so new names would be memory a peer grows."""
    stream = started_stream()
    msg = json.loads(media_msg(2, 1, 0))
    msg["media"]["track"] = track
    with pytest.raises(RemoteProtocolError, match="media.track must be 'inbound' or 'outbound'"):
        stream.receive_message(json.dumps(msg))
    assert_dead(stream)


def test_twilio_media_for_another_stream_sid_is_remote_error() -> None:
    stream = started_stream()
    with pytest.raises(RemoteProtocolError, match="streamSid 'MZother'"):
        stream.receive_message(media_msg(2, 1, 0, stream_sid="MZother"))
    assert_dead(stream)


def test_twilio_start_with_mismatched_stream_sids_is_remote_error() -> None:
    stream = TwilioStream()
    receive(stream, connected_msg())
    with pytest.raises(RemoteProtocolError, match="!= start.streamSid"):
        stream.receive_message(start_msg(streamSid="MZdifferent"))


def test_twilio_stop_for_another_call_is_remote_error() -> None:
    stream = started_stream()
    with pytest.raises(RemoteProtocolError, match="stop names call 'CAother'"):
        stream.receive_message(stop_msg(2, call_sid="CAother"))
    assert_dead(stream)


def test_twilio_unknown_event_for_another_stream_is_remote_error() -> None:
    stream = started_stream()
    with pytest.raises(RemoteProtocolError, match="streamSid"):
        stream.receive_message(dumps({"event": "new", "streamSid": "MZother"}))


# -------------------------------------------------------- marks and accounting


def test_twilio_mark_names_are_increasing_integers() -> None:
    stream = started_stream()
    names = [json.loads(stream.send(SendMark()))["mark"]["name"] for _ in range(3)]
    assert names == ["1", "2", "3"]
    stream.send(ClearAudio())
    assert json.loads(stream.send(SendMark()))["mark"]["name"] == "4"


def test_twilio_mark_echo_before_clear_counts_played_exactly() -> None:
    stream = started_stream()
    seq = Sequencer()
    stream.send(SendAudio(b"\xff" * 160, item="resp1"))  # 20 ms
    stream.send(SendAudio(b"\xff" * 160, item="resp1"))  # 20 ms
    stream.send(SendMark())  # "1" covers 320 samples
    stream.send(SendAudio(b"\xff" * 164, item="resp1"))  # 20.5 ms
    stream.send(SendMark())  # "2" covers 164 samples
    stream.send(SendAudio(b"\xff" * 80, item="resp1"))  # unmarked tail, 10 ms
    assert stream.unconfirmed_samples == 564
    assert stream.pending_mark_count == 2

    assert receive(stream, mark_msg(seq(), "1")) == [Mark(2, "1", cleared=False)]
    assert (stream.played_samples, stream.played_ms) == (320, 40)
    assert receive(stream, mark_msg(seq(), "2")) == [Mark(3, "2", cleared=False)]
    assert (stream.played_samples, stream.played_ms) == (484, 60)  # 60.5 ms rounds down
    assert stream.playback("resp1") == ItemPlayback("resp1", 564, 484, 0)
    assert stream.playback("resp1").played_ms == 60
    assert stream.playback("resp1").unconfirmed_samples == 80
    assert stream.unconfirmed_samples == 80
    assert stream.pending_mark_count == 0


def test_twilio_mark_echo_after_clear_is_cleared_and_does_not_advance() -> None:
    stream = started_stream()
    seq = Sequencer()
    stream.send(SendAudio(b"\x01" * 400, item="a"))
    stream.send(SendMark())  # "1"
    stream.send(SendAudio(b"\x01" * 400, item="a"))
    stream.send(SendMark())  # "2"
    stream.send(SendAudio(b"\x01" * 400, item="a"))
    stream.send(SendMark())  # "3"
    stream.send(SendAudio(b"\x01" * 40, item="a"))  # unmarked tail
    assert receive(stream, mark_msg(seq(), "1")) == [Mark(2, "1", cleared=False)]
    assert stream.items_in_flight() == ("a",)

    stream.send(ClearAudio())
    # Discarded at the clear: marks 2 and 3 (800) plus the tail (40).
    assert stream.playback("a") == ItemPlayback("a", 1240, 400, 840)
    assert (stream.played_ms, stream.cleared_samples, stream.unconfirmed_samples) == (50, 840, 0)
    assert stream.items_in_flight() == ()
    assert stream.clear_count == 1

    # Twilio returns the pending marks; nothing changes in the accounting.
    events = receive(stream, mark_msg(seq(), "2"), mark_msg(seq(), "3"))
    assert events == [Mark(3, "2", cleared=True), Mark(4, "3", cleared=True)]
    assert stream.playback("a") == ItemPlayback("a", 1240, 400, 840)
    assert stream.played_samples == 400
    assert stream.pending_mark_count == 0


def test_twilio_played_echo_crossing_clear_counts_as_cleared() -> None:
    """Twilio echoed mark 1 as played, but our clear went out before we read it."""
    stream = started_stream()
    stream.send(SendAudio(b"\x01" * 160, item="a"))
    stream.send(SendMark())
    stream.send(ClearAudio())
    assert receive(stream, mark_msg(2, "1")) == [Mark(2, "1", cleared=True)]
    assert stream.playback("a") == ItemPlayback("a", 160, 0, 160)


def test_twilio_mark_without_audio_echoes_with_zero_played() -> None:
    stream = started_stream()
    stream.send(SendMark())
    assert receive(stream, mark_msg(2, "1")) == [Mark(2, "1", cleared=False)]
    assert stream.played_samples == 0


def test_twilio_cleared_echoes_any_order_and_after_new_live_echo() -> None:
    stream = started_stream()
    for _ in range(3):
        stream.send(SendAudio(b"\x01" * 8, item="old"))
        stream.send(SendMark())  # "1", "2", "3"
    stream.send(ClearAudio())
    stream.send(SendAudio(b"\x02" * 16, item="new"))
    stream.send(SendMark())  # "4", live
    events = receive(stream, mark_msg(2, "3"), mark_msg(3, "4"), mark_msg(4, "1"), mark_msg(5, "2"))
    assert [(e.name, e.cleared) for e in events if isinstance(e, Mark)] == [
        ("3", True),
        ("4", False),
        ("1", True),
        ("2", True),
    ]
    assert stream.playback("old") == ItemPlayback("old", 24, 0, 24)
    assert stream.playback("new") == ItemPlayback("new", 16, 16, 0)
    assert stream.played_samples == 16


@pytest.mark.parametrize("name", ["7", "x", "0", "01"])
def test_twilio_echo_of_never_sent_mark_is_remote_error(name: str) -> None:
    stream = started_stream()
    stream.send(SendMark())
    with pytest.raises(RemoteProtocolError, match="never sent"):
        stream.receive_message(mark_msg(2, name))
    assert_dead(stream)


def test_twilio_duplicate_mark_echo_is_remote_error() -> None:
    stream = started_stream()
    stream.send(SendMark())
    receive(stream, mark_msg(2, "1"))
    with pytest.raises(RemoteProtocolError, match="already echoed"):
        stream.receive_message(mark_msg(3, "1"))
    assert_dead(stream)


def test_twilio_duplicate_cleared_mark_echo_is_remote_error() -> None:
    stream = started_stream()
    stream.send(SendMark())
    stream.send(ClearAudio())
    receive(stream, mark_msg(2, "1"))
    with pytest.raises(RemoteProtocolError, match="expected no live mark"):
        stream.receive_message(mark_msg(3, "1"))


def test_twilio_live_mark_overtaking_older_live_mark_is_remote_error() -> None:
    stream = started_stream()
    stream.send(SendAudio(b"\x01", item="a"))
    stream.send(SendMark())
    stream.send(SendAudio(b"\x01", item="a"))
    stream.send(SendMark())
    with pytest.raises(RemoteProtocolError, match="expected mark '1'"):
        stream.receive_message(mark_msg(2, "2"))
    assert_dead(stream)


def test_twilio_mark_message_without_mark_object_is_remote_error() -> None:
    stream = started_stream()
    with pytest.raises(RemoteProtocolError, match="'mark'"):
        stream.receive_message(dumps({"event": "mark", "sequenceNumber": "2", "streamSid": STREAM_SID}))


def test_twilio_playback_per_item_with_interleaved_items_and_unattributed_audio() -> None:
    stream = started_stream()
    seq = Sequencer()
    stream.send(SendAudio(b"\x01" * 100, item="a"))
    stream.send(SendAudio(b"\x02" * 60))  # no item: counted globally only
    stream.send(SendAudio(b"\x03" * 30, item="b"))
    stream.send(SendMark())  # "1": a100, None60, b30
    stream.send(SendAudio(b"\x03" * 50, item="b"))
    stream.send(SendAudio(b"\x01" * 20, item="a"))
    stream.send(SendMark())  # "2": b50, a20
    stream.send(SendAudio(b"\x03" * 8, item="b"))  # tail
    assert stream.items_in_flight() == ("a", "b")

    receive(stream, mark_msg(seq(), "1"))
    assert stream.items_in_flight() == ("b", "a")
    assert stream.playback("a") == ItemPlayback("a", 120, 100, 0)
    assert stream.playback("b") == ItemPlayback("b", 88, 30, 0)
    assert stream.played_samples == 190

    stream.send(ClearAudio())
    assert stream.playback("a") == ItemPlayback("a", 120, 100, 20)
    assert stream.playback("b") == ItemPlayback("b", 88, 30, 58)
    assert stream.playback("a").played_ms == 12
    assert stream.playback("b").played_ms == 3
    assert stream.playback("never") == ItemPlayback("never", 0, 0, 0)
    assert stream.sent_samples == stream.played_samples + stream.cleared_samples == 268


# ----------------------------------------------- model of Twilio's play buffer


class FakeTwilioPlayer:
    """Independent model of Twilio's outbound buffer, fed with our wire text.

    Audio bytes encode their item: byte value ``k`` belongs to item ``f"i{k}"``.
    """

    def __init__(self) -> None:
        self.queue: deque[tuple[str, Any]] = deque()  # ("audio", bytearray) | ("mark", (name, segment))
        self.outbox: deque[str] = deque()  # echoes on their way to us
        self.heard: dict[str, int] = {}
        self.heard_total = 0
        self.sequence = 2  # start used 1
        # Audio enqueued since the last mark or clear, per item: what the next
        # mark's played-echo proves was heard.
        self.segment: dict[str, int] = {}
        # Sum of the segments of all marks echoed because they played.
        self.confirmed_heard: dict[str, int] = {}
        self.confirmed_total = 0

    def handle(self, text: str) -> None:
        msg = json.loads(text)
        assert msg["streamSid"] == STREAM_SID
        if msg["event"] == "media":
            assert set(msg) == {"event", "streamSid", "media"} and set(msg["media"]) == {"payload"}
            audio = bytearray(base64.b64decode(msg["media"]["payload"]))
            self.queue.append(("audio", audio))
            for byte in audio:
                self.segment[f"i{byte}"] = self.segment.get(f"i{byte}", 0) + 1
        elif msg["event"] == "mark":
            assert set(msg) == {"event", "streamSid", "mark"} and set(msg["mark"]) == {"name"}
            self.queue.append(("mark", (msg["mark"]["name"], self.segment)))
            self.segment = {}
        elif msg["event"] == "clear":
            assert set(msg) == {"event", "streamSid"}
            names = [value[0] for kind, value in self.queue if kind == "mark"]
            self.queue.clear()
            self.segment = {}
            for name in names:
                self._echo(name)
        else:
            raise AssertionError(f"Twilio would reject {text}")
        self._echo_leading_marks(played=True)

    def play(self, samples: int) -> None:
        while samples and self.queue:
            kind, value = self.queue[0]
            if kind == "mark":
                break
            take = min(samples, len(value))
            for byte in value[:take]:
                self.heard[f"i{byte}"] = self.heard.get(f"i{byte}", 0) + 1
            self.heard_total += take
            del value[:take]
            samples -= take
            if not value:
                self.queue.popleft()
            self._echo_leading_marks(played=True)

    def _echo_leading_marks(self, *, played: bool) -> None:
        while self.queue and self.queue[0][0] == "mark":
            name, segment = self.queue.popleft()[1]
            self._echo(name)
            if played:
                for item, samples in segment.items():
                    self.confirmed_heard[item] = self.confirmed_heard.get(item, 0) + samples
                    self.confirmed_total += samples

    def _echo(self, name: str) -> None:
        self.outbox.append(mark_msg(self.sequence, name))
        self.sequence += 1


def deliver(stream: TwilioStream, player: FakeTwilioPlayer, count: int | None = None) -> None:
    n = len(player.outbox) if count is None else min(count, len(player.outbox))
    for _ in range(n):
        receive(stream, player.outbox.popleft())


def check_invariants(stream: TwilioStream, player: FakeTwilioPlayer, items: Iterable[str]) -> None:
    assert stream.played_samples <= player.heard_total
    assert stream.sent_samples == stream.played_samples + stream.cleared_samples + stream.unconfirmed_samples
    for item in items:
        playback = stream.playback(item)
        assert playback.played_samples <= player.heard.get(item, 0)
        assert playback.played_ms * 8 <= player.heard.get(item, 0)
        assert playback.sent_samples == (
            playback.played_samples + playback.cleared_samples + playback.unconfirmed_samples
        )


def test_twilio_accounting_matches_fake_player_barge_in_scenario() -> None:
    stream = started_stream()
    player = FakeTwilioPlayer()
    for _ in range(10):  # 10 frames of 20 ms of item i1, a mark after each
        player.handle(stream.send(SendAudio(bytes([1]) * 160, item="i1")))
        player.handle(stream.send(SendMark()))
    player.play(8 * 70)  # 70 ms play: 3 frames complete, the 4th half played
    deliver(stream, player)
    assert stream.playback("i1").played_ms == 60
    assert player.heard["i1"] == 560

    # Barge-in: which items to truncate, then clear.
    assert stream.items_in_flight() == ("i1",)
    player.handle(stream.send(ClearAudio()))
    deliver(stream, player)
    assert stream.playback("i1") == ItemPlayback("i1", 1600, 480, 1120)
    assert stream.pending_mark_count == 0
    check_invariants(stream, player, ["i1"])


def test_twilio_audio_partly_played_before_clear_is_not_credited() -> None:
    """Audio heard after the last played echo but before a clear stays unconfirmed -> cleared."""
    stream = started_stream()
    player = FakeTwilioPlayer()
    player.handle(stream.send(SendAudio(bytes([1]) * 100, item="i1")))
    player.handle(stream.send(SendMark()))
    player.handle(stream.send(SendAudio(bytes([1]) * 100, item="i1")))
    player.handle(stream.send(SendMark()))
    player.play(150)  # all of mark 1's audio and half of mark 2's
    deliver(stream, player)
    player.handle(stream.send(ClearAudio()))
    player.handle(stream.send(SendAudio(bytes([1]) * 50, item="i1")))
    player.handle(stream.send(SendMark()))
    player.play(50)
    deliver(stream, player)
    assert player.heard["i1"] == 200
    assert stream.playback("i1") == ItemPlayback("i1", 250, 150, 100)
    assert player.confirmed_total == 150
    check_invariants(stream, player, ["i1"])


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("audio"), st.integers(1, 3), st.integers(1, 400)),
        st.tuples(st.just("mark")),
        st.tuples(st.just("clear")),
        st.tuples(st.just("play"), st.integers(0, 800)),
        st.tuples(st.just("deliver"), st.integers(0, 4)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops, immediate=st.booleans())
def test_twilio_accounting_never_exceeds_what_fake_player_played(
    ops: list[tuple[Any, ...]], immediate: bool
) -> None:
    """Property: with any echo latency, played never exceeds heard, per item and overall.

    With immediate echo delivery (no latency, hence no echo crossing a clear)
    it is exact: it equals the audio between consecutive marks (or a clear
    and a mark) whose mark Twilio echoed because it played.
    """
    stream = started_stream()
    player = FakeTwilioPlayer()
    items = ["i1", "i2", "i3"]
    for op in ops:
        if op[0] == "audio":
            player.handle(stream.send(SendAudio(bytes([op[1]]) * op[2], item=f"i{op[1]}")))
        elif op[0] == "mark":
            player.handle(stream.send(SendMark()))
        elif op[0] == "clear":
            player.handle(stream.send(ClearAudio()))
        elif op[0] == "play":
            player.play(op[1])
        else:
            deliver(stream, player, op[1])
        if immediate:
            deliver(stream, player)
            assert stream.played_samples == player.confirmed_total
            for item in items:
                assert stream.playback(item).played_samples == player.confirmed_heard.get(item, 0)
        check_invariants(stream, player, items)
    # Drain: one last mark, play everything, deliver every echo.
    player.handle(stream.send(SendMark()))
    player.play(10**9)
    deliver(stream, player)
    assert stream.pending_mark_count == 0
    assert stream.unconfirmed_samples == 0
    check_invariants(stream, player, items)


# --------------------------------------------------------------------- fuzzing

_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=5))
_field_values = st.one_of(
    _json_scalars,
    st.dictionaries(st.sampled_from(["track", "chunk", "timestamp", "payload", "name", "digit"]), _json_scalars),
)


@settings(max_examples=300, deadline=None)
@given(
    event=st.sampled_from(["connected", "start", "media", "dtmf", "mark", "stop", "other"]),
    fields=st.dictionaries(
        st.sampled_from(["sequenceNumber", "streamSid", "media", "mark", "dtmf", "stop", "start", "protocol"]),
        _field_values,
    ),
)
def test_twilio_fuzzed_messages_raise_only_remote_protocol_error(event: str, fields: dict[str, Any]) -> None:
    for prefix in ([], [connected_msg()], [connected_msg(), start_msg()]):
        stream = TwilioStream()
        receive(stream, *prefix)
        try:
            receive(stream, json.dumps({"event": event, **fields}))
        except RemoteProtocolError:
            assert stream.state is StreamState.ERROR


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_twilio_fuzzed_text_raises_only_remote_protocol_error(text: str) -> None:
    stream = started_stream()
    try:
        receive(stream, text)
    except RemoteProtocolError:
        assert stream.state is StreamState.ERROR
