"""The native ``media`` scanner and ``TwilioStream.receive_event`` agree with the ordinary parser.

:func:`mediaserver._native._twilio.parse_media` may only take messages whose
meaning it gets exactly right, and must leave everything else (``None``) to
``json.loads`` and the core's checks.  These tests generate media messages
in many shapes -- key orders, whitespace, escapes, extra or repeated keys,
numbers that are JSON numbers or not decimal, non-ASCII -- and check both
halves: what the scanner accepts it reads as ``json.loads`` does, and a
stream fed through ``receive_event`` ends in the same event, error and
counters as one fed through ``receive_message``/``events``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediaserver._native._twilio import parse_mark, parse_media
from mediaserver._native._wsframe import DONE, READ_BYTES, encode_b64_frame, encode_frame, scan, uplink_pass
from mediaserver.codec import JitterBuffer
from mediaserver.transport import ws_client
from mediaserver.transport.ws_client import data_frame
from mediaserver.protocol import ClearAudio, LocalProtocolError, RemoteProtocolError, SendAudio, SendMark, StreamState, TwilioStream
from mediaserver.protocol.twilio_events import Media, Stop

from .test_twilio import STREAM_SID, connected_msg, media_msg, mark_msg, start_msg, stop_msg


def _started(kind: type[TwilioStream] = TwilioStream) -> TwilioStream:
    stream = kind()
    stream.receive_message(connected_msg())
    stream.receive_message(start_msg())
    list(stream.events())
    return stream


def _media_object(seq: Any, chunk: Any, timestamp: Any, payload: Any, track: Any, sid: Any) -> dict[str, Any]:
    return {
        "event": "media",
        "sequenceNumber": seq,
        "media": {"track": track, "chunk": chunk, "timestamp": timestamp, "payload": payload},
        "streamSid": sid,
    }


def _shuffled(obj: dict[str, Any], order: list[int]) -> dict[str, Any]:
    keys = list(obj)
    keys = [keys[i % len(keys)] for i in order if i % len(keys) < len(keys)] + keys
    seen: dict[str, Any] = {}
    for key in keys:
        if key not in seen:
            value = obj[key]
            seen[key] = _shuffled(value, order[::-1]) if isinstance(value, dict) else value
    return seen


_digits = st.one_of(st.integers(min_value=0, max_value=99999), st.integers(min_value=0, max_value=10**20)).map(str)
_odd_number = st.one_of(
    st.integers(min_value=0, max_value=10**6),  # a JSON number, not a string
    st.sampled_from(["", "-1", "1.5", "1e3", " 1", "١٢", "0x10", "007", "1:", "/1", "9:0", "12/"]),
    st.none(),
)
_odd_payload = st.one_of(st.sampled_from(["", "AAA", "A===", "AA==AA==", "****", "AAAA\n", "ÿÿÿÿ"]), st.integers())
_odd_text = st.one_of(st.sampled_from(["", "in\u00e9", 'a"b', "a\\b", "x\ty"]), st.text(max_size=8), st.integers())


def _mostly(draw: st.DrawFn, usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> Any:
    """``usual`` nine times in ten: most messages must be ones the scanner takes."""
    return draw(odd) if draw(st.integers(min_value=0, max_value=9)) == 0 else draw(usual)


def _rarely(draw: st.DrawFn) -> bool:
    return draw(st.integers(min_value=0, max_value=11)) == 0


def _dumps_any_layout(draw: st.DrawFn, obj: object) -> str:
    """``obj`` as JSON text in one of the layouts a sender might use (indents, spacing, escaped or raw non-ASCII)."""
    indent = draw(st.sampled_from([None, None, 0, 2]))
    separators = draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]))
    return json.dumps(obj, indent=indent, separators=separators, ensure_ascii=draw(st.booleans()))


@st.composite
def media_texts(draw: st.DrawFn) -> str:
    """A media message: usually well formed (in a random layout), sometimes with one or more oddities."""
    sid = _mostly(draw, st.just(STREAM_SID), st.one_of(_odd_text, st.just("MZ" + "0" * 32)))
    obj = _media_object(
        _mostly(draw, _digits, _odd_number),
        _mostly(draw, _digits, _odd_number),
        _mostly(draw, _digits, _odd_number),
        _mostly(draw, st.binary(max_size=200).map(lambda b: base64.b64encode(b).decode()), _odd_payload),
        _mostly(draw, st.sampled_from(["inbound", "outbound"]), _odd_text),
        sid,
    )
    obj = _shuffled(obj, draw(st.lists(st.integers(min_value=0, max_value=7), max_size=6)))
    if _rarely(draw):
        obj[draw(st.sampled_from(["extra", "event", "Media", "media"]))] = draw(st.sampled_from(["x", 1, {"a": 1}]))
    if _rarely(draw) and isinstance(obj.get("media"), dict):
        obj["media"][draw(st.sampled_from(["extra", "track", "chunks"]))] = "1"
    if _rarely(draw):
        obj.pop(draw(st.sampled_from(list(obj))))
    text = _dumps_any_layout(draw, obj)
    if _rarely(draw):  # a repeated key: json.loads keeps the last
        text = text[:-1] + ', "sequenceNumber": "1"}'
    if _rarely(draw):
        text = draw(st.sampled_from([text + " x", text[:-1], "\n " + text + " \r\n", text.replace('"media"', '"mark"', 1)]))
    return text


def _outcome(stream: TwilioStream, text: str, *, fast: bool) -> tuple[str, object, StreamState, int, int]:
    try:
        if fast:
            result: object = stream.receive_event(text)
        else:
            stream.receive_message(text)
            (result,) = list(stream.events())
    except (RemoteProtocolError, LocalProtocolError) as exc:
        result = (type(exc).__name__, str(exc))
    return repr(result), result, stream.state, stream.sequence_numbers_missing, stream.chunks_missing


@settings(max_examples=1500, deadline=None)
@given(media_texts())
def test_scanner_reads_what_json_reads_or_declines(text: str) -> None:
    fields = parse_media(text)
    if fields is None:
        return
    msg = json.loads(text)
    media = msg["media"]
    assert set(msg) == {"event", "sequenceNumber", "media", "streamSid"}
    assert set(media) == {"track", "chunk", "timestamp", "payload"}
    assert msg["event"] == "media"
    assert fields == (
        int(msg["sequenceNumber"]),
        msg["streamSid"],
        media["track"],
        int(media["chunk"]),
        int(media["timestamp"]),
        media["payload"],
    )
    for value in (msg["sequenceNumber"], media["chunk"], media["timestamp"]):
        assert isinstance(value, str) and value.isascii() and value.isdigit()


@settings(max_examples=1500, deadline=None)
@given(st.lists(media_texts(), min_size=1, max_size=4))
def test_receive_event_matches_receive_message(texts: list[str]) -> None:
    fast, slow = _started(), _started()
    for text in texts:
        a, b = _outcome(fast, text, fast=True), _outcome(slow, text, fast=False)
        assert a[0] == b[0]
        assert a[2:] == b[2:]
        if fast.state is StreamState.ERROR:
            break


def test_scanner_takes_the_usual_shapes() -> None:
    """Twilio's documented shape and the compact one both take the native path (not a silent fallback)."""
    payload = base64.b64encode(b"\x01\x02\x03").decode()
    documented = media_msg(3, 2, 40, b"\x01\x02\x03")  # json.dumps default separators, doc key order
    compact = json.dumps(
        {"event": "media", "streamSid": STREAM_SID, "sequenceNumber": "3",
         "media": {"track": "inbound", "chunk": "2", "timestamp": "40", "payload": payload}},
        separators=(",", ":"),
    )
    for text in (documented, compact):
        assert parse_media(text) == (3, STREAM_SID, "inbound", 2, 40, payload)


@pytest.mark.parametrize(
    "text",
    [
        mark_msg(3, "m1"),
        stop_msg(3),
        media_msg(3, 1, 0).replace('"inbound"', '"in\\u0062ound"'),  # an escape: json.loads's job
        media_msg(3, 1, 0).replace('"3"', "3"),  # a JSON number
        media_msg(3, 1, 0).replace('"3"', '"1234567890123456789"'),  # 19 digits: more than the scanner converts (and the core refuses)
        media_msg(3, 1, 0)[:-1] + ', "extra": 1}',
        media_msg(3, 1, 0).replace("inbound", "inbound\u00e9"),
        "",
        "[]",
    ],
)
def test_scanner_declines_what_it_does_not_fully_understand(text: str) -> None:
    assert parse_media(text) is None


def test_receive_event_counts_gaps_and_refuses_repeats_like_the_ordinary_path() -> None:
    stream = _started()
    first = stream.receive_event(media_msg(2, 1, 0, b"\x10" * 160))
    assert first == Media(2, "inbound", 1, 0, b"\x10" * 160, 0)
    jumped = stream.receive_event(media_msg(5, 4, 60))
    assert isinstance(jumped, Media) and jumped.chunks_missing == 2
    assert (stream.sequence_numbers_missing, stream.chunks_missing) == (2, 2)
    with pytest.raises(RemoteProtocolError, match="sequenceNumber 5 repeats or goes backwards"):
        stream.receive_event(media_msg(5, 5, 80))
    assert stream.state is StreamState.ERROR
    with pytest.raises(LocalProtocolError):
        stream.receive_event(media_msg(6, 5, 80))


def test_receive_event_handles_every_other_event_and_the_wrong_stream() -> None:
    stream = _started()
    assert isinstance(stream.receive_event(stop_msg(2)), Stop)
    assert stream.state is StreamState.STOPPED
    other = _started()
    with pytest.raises(RemoteProtocolError, match="streamSid"):
        other.receive_event(media_msg(2, 1, 0, stream_sid="MZ" + "0" * 32))


def test_receive_event_before_start_is_refused_as_before() -> None:
    stream = TwilioStream()
    stream.receive_event(connected_msg())
    with pytest.raises(RemoteProtocolError, match="'media' in state AWAITING_START"):
        stream.receive_event(media_msg(1, 1, 0))


# -- take_media: the bridge's per-frame path ------------------------------------------------


def _taken_outcome(stream: TwilioStream, text: str) -> tuple[str, object, StreamState, int, int]:
    """What the bridge makes of ``text``: take_media, or receive_event when it declines (as CallBridge does)."""
    taken = stream.take_media(text)
    if taken is None:
        return _outcome(stream, text, fast=True)
    chunk, payload = taken
    return repr(("taken", chunk, payload)), taken, stream.state, stream.sequence_numbers_missing, stream.chunks_missing


def _as_taken(outcome: tuple[str, object, StreamState, int, int]) -> tuple[object, ...]:
    """An outcome as take_media reports it: a Media on the inbound track becomes (chunk, payload)."""
    result = outcome[1]
    if isinstance(result, Media) and result.track == "inbound":
        return (repr(("taken", result.chunk, result.payload)), *outcome[2:])
    return (outcome[0], *outcome[2:])


@settings(max_examples=1500, deadline=None)
@given(st.lists(media_texts(), min_size=1, max_size=4))
def test_take_media_matches_receive_message(texts: list[str]) -> None:
    """take_media (falling back to receive_event) ends in the same payloads, errors, state and counters."""
    fast, slow = _started(), _started()
    for text in texts:
        a, b = _taken_outcome(fast, text), _outcome(slow, text, fast=False)
        assert _as_taken(a) == _as_taken(b)
        if fast.state is StreamState.ERROR:
            break


def test_take_media_takes_the_usual_message_and_counts_gaps() -> None:
    stream = _started()
    assert stream.take_media(media_msg(2, 1, 0, b"\x10" * 160)) == (1, b"\x10" * 160)
    assert stream.take_media(media_msg(5, 4, 60, b"\xff\x00\x7f")) == (4, b"\xff\x00\x7f")
    assert (stream.sequence_numbers_missing, stream.chunks_missing) == (2, 2)
    # the ordinary path continues from the counters take_media moved
    with pytest.raises(RemoteProtocolError, match="sequenceNumber 5 repeats or goes backwards"):
        stream.receive_event(media_msg(5, 5, 80))


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ("", "empty"),
        ("AAA", "not a multiple of 4"),
        ("AB==", "leftover bits set: binascii accepts it, take_media leaves it to binascii"),
        ("AAB=", "leftover bits set"),
        ("A===", "three pad characters"),
        ("AA=A", "padding inside the last group"),
        ("AA==AAAA", "padding before the end"),
        ("AA-_", "the URL-safe alphabet"),
    ],
)
def test_take_media_declines_base64_that_is_not_canonical(payload: str, why: str) -> None:
    stream = _started()
    text = json.dumps(
        {"event": "media", "sequenceNumber": "2", "media": {"track": "inbound", "chunk": "1", "timestamp": "0", "payload": payload},
         "streamSid": STREAM_SID}
    )
    assert stream.take_media(text) is None, why
    assert (stream.sequence_numbers_missing, stream.chunks_missing, stream.state) == (0, 0, StreamState.STREAMING)
    reference = _started()
    assert _outcome(stream, text, fast=True)[2:] == _outcome(reference, text, fast=False)[2:]


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 159, 160, 161, 320])
def test_take_media_decodes_every_length_as_binascii_does(size: int) -> None:
    stream = _started()
    payload = bytes((7 * i + 3) % 256 for i in range(size))
    assert stream.take_media(media_msg(2, 1, 0, payload)) == (1, payload)


def test_take_media_declines_outside_streaming_and_other_tracks() -> None:
    before = TwilioStream()
    before.receive_event(connected_msg())
    assert before.take_media(media_msg(1, 1, 0)) is None
    stream = _started()
    assert stream.take_media(media_msg(2, 1, 0).replace('"inbound"', '"outbound"')) is None
    assert stream.take_media(mark_msg(2, "m1")) is None
    assert stream.take_media(media_msg(2, 1, 0).encode()) is None  # bytes: a binary frame, the ordinary path's error
    small = TwilioStream(max_message_bytes=len(start_msg()))
    small.receive_message(connected_msg())
    small.receive_message(start_msg())
    list(small.events())
    assert small.take_media(media_msg(2, 1, 0, b"\x00" * 400)) is None  # oversized: refused by the ordinary path
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        small.receive_event(media_msg(2, 1, 0, b"\x00" * 400))
    stream.receive_event(stop_msg(2))
    assert stream.take_media(media_msg(3, 1, 0)) is None


# -- mark echoes -------------------------------------------------------------------------------


@st.composite
def mark_texts(draw: st.DrawFn) -> str:
    """Twilio's echo of a mark: usually well formed (names of marks sent or not), sometimes odd."""
    obj: dict[str, Any] = {
        "event": "mark",
        "sequenceNumber": _mostly(draw, _digits, _odd_number),
        "streamSid": _mostly(draw, st.just(STREAM_SID), st.one_of(_odd_text, st.just("MZ" + "0" * 32))),
        "mark": {"name": _mostly(draw, st.sampled_from(["1", "2", "3", "4", "9"]), _odd_text)},
    }
    obj = _shuffled(obj, draw(st.lists(st.integers(min_value=0, max_value=7), max_size=6)))
    if _rarely(draw):
        obj[draw(st.sampled_from(["extra", "event", "media", "mark"]))] = draw(st.sampled_from(["x", 1, {"name": "1"}]))
    if _rarely(draw) and isinstance(obj.get("mark"), dict):
        obj["mark"][draw(st.sampled_from(["extra", "name", "names"]))] = draw(st.sampled_from(["1", 2]))
    if _rarely(draw):
        obj.pop(draw(st.sampled_from(list(obj))))
    text = _dumps_any_layout(draw, obj)
    if _rarely(draw):
        text = text[:-1] + ', "sequenceNumber": "1"}'
    if _rarely(draw):
        text = draw(st.sampled_from([text + " x", text[:-1], "\n " + text + " \r\n", text.replace('"mark"', '"media"', 1)]))
    return text


@settings(max_examples=1500, deadline=None)
@given(mark_texts())
def test_mark_scanner_reads_what_json_reads_or_declines(text: str) -> None:
    fields = parse_mark(text)
    if fields is None:
        return
    msg = json.loads(text)
    assert set(msg) == {"event", "sequenceNumber", "mark", "streamSid"}
    assert set(msg["mark"]) == {"name"}
    assert msg["event"] == "mark"
    assert fields == (int(msg["sequenceNumber"]), msg["streamSid"], msg["mark"]["name"])
    assert isinstance(msg["sequenceNumber"], str) and msg["sequenceNumber"].isascii() and msg["sequenceNumber"].isdigit()


def _playing() -> TwilioStream:
    """A started stream that has sent audio and marks "1".."3", and cleared after "2" (so "1", "2" are cleared)."""
    stream = _started()
    for n in range(3):
        stream.send(SendAudio(b"\xff" * (80 * (n + 1)), item=f"item_{n}"))
        stream.send(SendMark())
        if n == 1:
            stream.send(ClearAudio())
    return stream


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.one_of(mark_texts(), media_texts()), min_size=1, max_size=5))
def test_receive_event_matches_receive_message_for_mark_echoes(texts: list[str]) -> None:
    """Marks through the scanner end in the same events, errors, state and playback counts."""
    fast, slow = _playing(), _playing()
    for text in texts:
        a, b = _outcome(fast, text, fast=True), _outcome(slow, text, fast=False)
        assert a[0] == b[0]
        assert a[2:] == b[2:]
        assert (fast.played_samples, fast.pending_mark_count, fast.playback("item_2")) == (
            slow.played_samples, slow.pending_mark_count, slow.playback("item_2")
        )
        if fast.state is StreamState.ERROR:
            break


def test_mark_scanner_takes_the_usual_shape_and_declines_others() -> None:
    assert parse_mark(mark_msg(7, "12")) == (7, STREAM_SID, "12")
    compact = json.dumps({"event": "mark", "streamSid": STREAM_SID, "sequenceNumber": "7", "mark": {"name": "1"}}, separators=(",", ":"))
    assert parse_mark(compact) == (7, STREAM_SID, "1")
    for text in (media_msg(3, 1, 0), stop_msg(3), mark_msg(3, "a\\b"), mark_msg(3, "né"), mark_msg(3, "1")[:-1] + ', "x": 1}'):
        assert parse_mark(text) is None, text


_PLAIN_STOPS = [" ", "!", "#", "[", "]", "~", "\x7f", "/"]
_ENDING_STOPS = ['"', "\\", '\\"', "\\n", "\\u0041", *map(chr, range(0x20))]


@pytest.mark.parametrize("at", range(26))
def test_the_string_scan_finds_every_quote_backslash_and_control_character_at_every_offset(at: int) -> None:
    """Strings are scanned eight bytes at a time: a byte that ends or escapes one is seen wherever it falls in a word.

    A mark name with ``at`` plain characters, then one character under test,
    then more plain ones, written raw into the message (not through
    ``json.dumps``): a plain character is taken as part of the name; a quote
    ends the string early (the message is then not one the scanner knows), a
    backslash starts an escape, and a raw control character is not JSON --
    all three are declined, as ``json.loads`` reads them differently or not
    at all.  The offsets cover every position in a word.
    """
    for stop in _PLAIN_STOPS + _ENDING_STOPS:
        name = "n" * at + stop + "x" * 19
        text = '{"event": "mark", "sequenceNumber": "4", "streamSid": "%s", "mark": {"name": "%s"}}' % (STREAM_SID, name)
        fields = parse_mark(text)
        if stop in _PLAIN_STOPS:
            assert fields == (4, STREAM_SID, name) == (4, STREAM_SID, json.loads(text)["mark"]["name"]), repr(stop)
        else:
            assert fields is None, (at, repr(stop))


@settings(max_examples=200, deadline=None)
@given(st.one_of(media_texts(), mark_texts()))
def test_every_cut_of_a_message_is_declined(text: str) -> None:
    """A message cut anywhere is taken by no scanner unless the cut is itself a whole message (no partial event)."""
    for end in range(len(text.rstrip())):
        cut = text[:end]
        stream = _started()
        for result in (parse_media(cut), parse_mark(cut), stream.take_media(cut)):
            if result is not None:
                assert isinstance(json.loads(cut), dict), cut


@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes_the_twilio_scanners(text: str) -> None:
    stream = _started()
    for result in (parse_media(text), parse_mark(text), stream.take_media(text)):
        assert result is None or isinstance(json.loads(text), dict)


# -- send_chunk: the downlink's SendAudio + SendMark in one step -------------------------------------

chunk_steps = st.lists(
    st.one_of(
        st.tuples(st.just("chunk"), st.binary(min_size=1, max_size=400), st.sampled_from([None, "item_a", "item_b"])),
        st.tuples(st.just("echo"), st.none(), st.none()),
        st.tuples(st.just("clear"), st.none(), st.none()),
    ),
    max_size=40,
)


def _accounting(stream: TwilioStream) -> tuple[object, ...]:
    items = ("item_a", "item_b")
    return (
        stream.unconfirmed_samples,
        list(stream.items_in_flight()),
        [stream.playback(item) for item in items],
    )


@settings(max_examples=150, deadline=None)
@given(chunk_steps)
def test_send_chunk_is_send_audio_then_send_mark(steps: list[tuple[str, bytes | None, str | None]]) -> None:
    """Same messages (the media text from its envelope), same marks, same playback accounting, echo after echo."""
    two, one = TwilioStream(), TwilioStream()  # two sends / one send_chunk
    for stream in (two, one):
        stream.receive_message(connected_msg())
        stream.receive_message(start_msg())
        list(stream.events())
    marks: list[str] = []
    seq = 2
    for kind, payload, item in steps:
        if kind == "chunk":
            assert payload is not None
            media = two.send(SendAudio(payload, item=item))
            mark = two.send(SendMark())
            prefix, suffix, mark_one = one.send_chunk(payload, item)
            assert (prefix + base64.b64encode(payload) + suffix).decode() == media
            assert mark_one == mark
            marks.append(json.loads(mark)["mark"]["name"])
        elif kind == "echo" and marks:
            name = marks.pop(0)
            for stream in (two, one):
                stream.receive_message(mark_msg(seq, name))
                list(stream.events())
            seq += 1
        elif kind == "clear":
            assert two.send(ClearAudio()) == one.send(ClearAudio())
            marks.clear()  # (their echoes would come back as cleared; the accounting is already final)
        assert _accounting(one) == _accounting(two)


@pytest.mark.parametrize("prefix", [[], [connected_msg()], [connected_msg(), start_msg(), stop_msg(2)]])
def test_send_chunk_outside_streaming_is_a_local_error_that_kills_the_stream(prefix: list[str]) -> None:
    stream = TwilioStream()
    for message in prefix:
        stream.receive_message(message)
    with pytest.raises(LocalProtocolError, match="cannot send"):
        stream.send_chunk(b"\xff" * 160, "item_a")
    assert stream.state is StreamState.ERROR
    with pytest.raises(LocalProtocolError):
        stream.send_chunk(b"\xff", None)


def test_send_chunk_refuses_empty_audio_as_send_audio_does_and_the_stream_goes_on() -> None:
    stream = TwilioStream()
    stream.receive_message(connected_msg())
    stream.receive_message(start_msg())
    with pytest.raises(LocalProtocolError, match="at least one byte"):
        stream.send_chunk(b"", "item_a")
    assert stream.state is StreamState.STREAMING and list(stream.items_in_flight()) == []
    prefix, suffix, mark = stream.send_chunk(b"\xff", "item_a")
    assert json.loads(mark)["mark"]["name"] == "1" and list(stream.items_in_flight()) == ["item_a"]


# -- a carrier that stops echoing marks: the accounting stays bounded ---------------------------------


def _echo(stream: TwilioStream, seq: int, name: str) -> list[object]:
    stream.receive_message(mark_msg(seq, name))
    return list(stream.events())


def test_send_chunk_withholds_marks_past_the_cap_and_the_next_mark_covers_the_withheld_audio() -> None:
    from mediaserver.protocol.twilio import MAX_PENDING_MARKS

    stream = _started()
    names = [json.loads(stream.send_chunk(b"\xff" * 160, "item_a")[2])["mark"]["name"] for _ in range(MAX_PENDING_MARKS)]
    assert names == [str(n) for n in range(1, MAX_PENDING_MARKS + 1)]
    for _ in range(3):  # nothing echoed: three chunks go without a mark
        prefix, suffix, mark = stream.send_chunk(b"\xff" * 80, "item_b")
        assert mark == "" and prefix and suffix  # (the media message itself is whole)
    assert (stream.marks_withheld, stream.pending_mark_count) == (3, MAX_PENDING_MARKS)

    (echo,) = _echo(stream, 2, "1")  # one echo: room for one mark, which closes the withheld chunks and this one
    assert echo.cleared is False and stream.played_samples == 160
    mark = stream.send_chunk(b"\xff" * 40, "item_b")[2]
    assert json.loads(mark)["mark"]["name"] == str(MAX_PENDING_MARKS + 1)
    assert stream.send_chunk(b"\xff" * 8, "item_b")[2] == ""  # full again
    assert stream.marks_withheld == 4

    seq = 3
    for name in range(2, MAX_PENDING_MARKS + 2):  # every echo, in order
        _echo(stream, seq, str(name))
        seq += 1
    # Each sample is counted once: the last mark covers the 3 withheld chunks and its own; 8 samples stay unconfirmed.
    assert stream.playback("item_b").played_samples == 3 * 80 + 40
    assert stream.playback("item_a").played_samples == MAX_PENDING_MARKS * 160
    assert (stream.unconfirmed_samples, stream.pending_mark_count) == (8, 0)


def test_cleared_marks_past_the_cap_are_forgotten_and_their_late_echoes_still_read_as_cleared() -> None:
    from mediaserver.protocol.twilio import MAX_PENDING_MARKS

    stream = _started()
    for _ in range(MAX_PENDING_MARKS):
        stream.send_chunk(b"\xff" * 160, "item_a")
    stream.send(ClearAudio())  # marks 1..MAX cleared, none echoed
    for _ in range(10):
        stream.send_chunk(b"\xff" * 160, "item_b")
    stream.send(ClearAudio())  # 10 more: the 10 oldest cleared marks are forgotten
    assert stream.pending_mark_count == MAX_PENDING_MARKS
    mark = stream.send_chunk(b"\xff" * 160, "item_c")[2]  # a live mark after both clears
    live = json.loads(mark)["mark"]["name"]

    [forgotten] = _echo(stream, 2, "5")
    [kept] = _echo(stream, 3, str(MAX_PENDING_MARKS + 10))
    assert (forgotten.cleared, kept.cleared) == (True, True)
    assert stream.played_samples == 0
    with pytest.raises(RemoteProtocolError, match="never sent"):  # a name never sent is still refused
        _echo(stream, 4, str(int(live) + 5))

    fresh = _started()  # and with nothing forgotten, an unknown old name is refused as before
    fresh.send_chunk(b"\xff" * 160, "item_a")
    fresh.send(ClearAudio())
    with pytest.raises(RemoteProtocolError, match="never sent"):
        _echo(fresh, 2, "0")


# -- uplink_pass: one read of a caller's socket, its plain media messages framed for the model, natively ----------

_ENVELOPE = (b'{"type":"input_audio_buffer.append","audio":"', b'"}')
_KEY = b"\x01\x02\x03\x04"  # (a fixed masking key for the model's frames: the output can be compared byte for byte)


def _frame_length(data: bytes, pos: int) -> int | None:
    """The length of the WebSocket frame at ``pos`` (header, key and payload), or None if its header is not all there."""
    if len(data) - pos < 2:
        return None
    n, at = data[pos + 1] & 0x7F, pos + 2
    if n == 126:
        if len(data) - at < 2:
            return None
        n, at = int.from_bytes(data[at : at + 2], "big"), at + 2
    elif n == 127:
        if len(data) - at < 8:
            return None
        n, at = int.from_bytes(data[at : at + 8], "big"), at + 8
    return at - pos + (4 if data[pos + 1] & 0x80 else 0) + n


def _uplink_by_message(
    data: bytes, limit: int, stream: TwilioStream, jitter: JitterBuffer, budget: int
) -> tuple[bytes | None, int, int, bytes, str | None]:
    """What uplink_pass must do with ``data``, one frame at a time through the ordinary calls (scan, take_media,
    the jitter buffer, encode_b64_frame): ``(rest, taken, framed, frames, error)``."""
    pos, taken, frames = 0, 0, []
    try:
        while pos < len(data) and taken < budget:
            size = _frame_length(data, pos)
            if size is None or pos + size > len(data) or data[pos] != 0x81 or data[pos + 1] & 0x7F == 127:
                break
            messages, used, why = scan(data[pos : pos + size], limit, True)
            if why != DONE or len(messages) != 1 or stream.take_media(messages[0]) is None:
                break
            fields = stream.take_media_last  # (set below: take_media is called once per message)
            pos += size
            taken += 1
            jitter.push(*fields)
            frame = jitter.pop()
            while frame is not None:
                if frame:
                    frames.append(encode_b64_frame(_ENVELOPE[0], frame, _ENVELOPE[1], _KEY))
                frame = jitter.pop()
    except Exception as exc:  # noqa: BLE001 - compared with what uplink_pass returns
        return None, taken, len(frames), b"".join(frames), repr(exc)
    return (data[pos:] or None), taken, len(frames), b"".join(frames), None


class _Remembering(TwilioStream):
    """take_media, remembering its last result (the reference path needs it after the check that called it)."""

    take_media_last: tuple[int, bytes] | None = None

    def take_media(self, message: str | bytes) -> tuple[int, bytes] | None:
        self.take_media_last = super().take_media(message)
        return self.take_media_last


def _remembering_started() -> _Remembering:
    stream = _started(_Remembering)
    assert isinstance(stream, _Remembering)
    return stream


@contextlib.contextmanager
def _socketpairs() -> Iterator[tuple[socket.socket, socket.socket, socket.socket, socket.socket]]:
    """(caller, ours) and (model's end, ours to the model), non-blocking on our side."""
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    for s in (b, d):
        s.setblocking(False)
    c.setblocking(False)
    try:
        yield a, b, c, d
    finally:
        for s in (a, b, c, d):
            s.close()


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


@st.composite
def caller_bytes(draw: st.DrawFn) -> bytes:
    """A caller's socket as the server reads it: media (mostly in order), marks, other frames, maybe a part-frame."""
    parts = []
    seq = 2
    for _ in range(draw(st.integers(0, 14))):
        kind = draw(st.sampled_from(["media"] * 12 + ["odd", "mark", "binary", "ping", "long", "not utf-8"]))
        if kind == "media":
            parts.append(data_frame(media_msg(seq, seq - 1, 20 * (seq - 2), bytes([seq % 256]) * 160)))
        elif kind == "odd":
            parts.append(data_frame(draw(media_texts())))
        elif kind == "mark":
            parts.append(data_frame(draw(mark_texts())))
        elif kind == "binary":
            parts.append(data_frame(b"\x00\x01"))
        elif kind == "not utf-8":
            parts.append(encode_frame(True, b'{"event":"\xff"}', True))  # (the ordinary path closes with 1007)
        elif kind == "ping":
            parts.append(b"\x89\x80" + b"\x00\x00\x00\x00")  # (a masked, empty ping)
        else:
            parts.append(data_frame(media_msg(seq, seq - 1, 20 * (seq - 2), b"\x7f" * 2000)))  # over the limit below
        seq += draw(st.sampled_from([1] * 12 + [0, 2, -1]))
    data = b"".join(parts)
    return data[: draw(st.integers(0, len(data)))] if draw(st.booleans()) else data


@settings(max_examples=600, deadline=None)
@given(caller_bytes(), st.integers(1, 12), st.booleans())
def test_uplink_pass_does_what_the_ordinary_path_does(data: bytes, budget: int, send: bool) -> None:
    """The same messages taken, frames made and written, bytes left, stream and jitter state: byte for byte."""
    limit = 1500
    native, ordinary = _remembering_started(), _remembering_started()
    jitters = [JitterBuffer(depth=2, frame_bytes=160, fill="fade") for _ in range(2)]
    with _socketpairs() as (caller, ours, model, to_model):
        if data:
            caller.sendall(data)
        taker = native.media_taker()
        assert taker is not None
        read, rest, taken, framed, unsent, error = uplink_pass(
            ours.fileno(), limit, True, *taker, jitters[0].push, jitters[0].pop, *_ENVELOPE, _KEY,
            to_model.fileno() if send else -1, budget,
        )  # fmt: skip
        written = _read_all(model)
    if not data:
        assert (read, rest, taken, framed, unsent, error) == (-1, None, 0, 0, b"", None)  # nothing to read
        return
    expected = _uplink_by_message(data, limit, ordinary, jitters[1], budget)
    assert read == len(data)
    assert (rest, taken, framed, None if error is None else repr(error)) == (*expected[:3], expected[4])
    assert written + unsent == expected[3] and (written if send else unsent) == expected[3]
    assert (native.state, native.sequence_numbers_missing, native.chunks_missing) == (
        ordinary.state, ordinary.sequence_numbers_missing, ordinary.chunks_missing)  # fmt: skip
    assert (jitters[0].stats, jitters[0].pop()) == (jitters[1].stats, jitters[1].pop())


def test_uplink_pass_says_when_the_peer_closed_and_leaves_a_full_socket_s_rest_to_the_ordinary_send() -> None:
    assert READ_BYTES == ws_client.RECEIVE_BYTES  # (a read is the size the ordinary path reads)
    with _socketpairs() as (caller, ours, model, to_model):
        to_model.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stream, jitter = _started(), JitterBuffer(depth=1, frame_bytes=160, fill="silence")
        taker = stream.media_taker()
        assert taker is not None
        frames = [media_msg(2 + n, 1 + n, 20 * n, bytes([n]) * 160) for n in range(150)]
        caller.sendall(b"".join(data_frame(f) for f in frames))
        read, rest, taken, framed, unsent, error = uplink_pass(
            ours.fileno(), 1500, True, *taker, jitter.push, jitter.pop, *_ENVELOPE, _KEY, to_model.fileno(), 1000
        )
        assert (rest, taken, framed, error) == (None, 150, 150, None)
        expected = b"".join(encode_b64_frame(_ENVELOPE[0], bytes([n]) * 160, _ENVELOPE[1], _KEY) for n in range(150))
        assert 0 < len(unsent) < len(expected) and expected.endswith(unsent)  # (a partial write: the rest is ours)
        assert _read_all(model) + unsent == expected
        caller.close()
        assert uplink_pass(
            ours.fileno(), 1500, True, *taker, jitter.push, jitter.pop, *_ENVELOPE, _KEY, -1, 10
        ) == (0, None, 0, 0, b"", None)
