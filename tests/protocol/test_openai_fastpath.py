"""The native ``response.output_audio.delta`` scanner agrees with ``json.loads`` and the OpenAI core's checks.

:func:`mediaserver._native._realtime.parse_audio_delta` may only take
messages whose meaning it gets exactly right, and must leave everything
else (``None``) to the ordinary parser.  Generated deltas -- the SDK's own
wire form, then key orders, layouts, extra keys of every JSON type, escapes,
odd values, repeated keys -- check both halves: what the scanner accepts it
reads as ``json.loads`` does, and a session fed with the scanner ends in the
same events, errors, state and audio ledger as one without it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediaserver._native._realtime import parse_audio_delta
from mediaserver.protocol.errors import LocalProtocolError, RemoteProtocolError
from mediaserver.protocol.providers import AudioDelta
from mediaserver.protocol.providers import openai as openai_core
from mediaserver.protocol.providers.openai import OpenAIRealtimeSession

from .test_openai import audio_delta, config, ready_session, server
from .test_twilio_fastpath import _dumps_any_layout, _mostly, _rarely

_payload = st.binary(max_size=400).map(lambda b: base64.b64encode(b).decode())
_odd_payload = st.sampled_from(["", "AAA", "AB==", "A===", "AA==AA==", "AA-_", "****", "AAAA\n", "ÿÿÿÿ"])
_id = st.text(alphabet="abcdefghij_0123456789", min_size=1, max_size=12)
_odd_id = st.one_of(st.sampled_from(["", "a\"b", "a\\b", "é", "x\ty"]), st.integers(), st.none(), st.just([1]))
_extra_value = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**20),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.just({"a": 1}),
    st.just([1, "x"]),
)


@st.composite
def delta_texts(draw: st.DrawFn) -> str:
    if draw(st.integers(min_value=0, max_value=4)) == 0:  # the SDK's own serialisation
        return server(audio_delta(draw(_id), draw(st.binary(max_size=300)), response_id=draw(_id)))
    obj: dict[str, Any] = {
        "type": _mostly(draw, st.just("response.output_audio.delta"), st.sampled_from(["response.output_audio.done", "x", 1])),
        "event_id": draw(_id),
        "response_id": _mostly(draw, _id, st.one_of(st.none(), st.integers())),
        "item_id": _mostly(draw, _id, _odd_id),
        "output_index": _mostly(draw, st.integers(min_value=0, max_value=3), _extra_value),
        "content_index": 0,
        "delta": _mostly(draw, _payload, st.one_of(_odd_payload, st.integers(), st.none())),
    }
    keys = list(obj)
    order = draw(st.permutations(keys))
    obj = {key: obj[key] for key in order}
    if _rarely(draw):
        obj.pop(draw(st.sampled_from(list(obj))))
    if _rarely(draw):
        obj[draw(st.sampled_from(["extra", "obfuscation", "x_y"]))] = draw(_extra_value)
    text = _dumps_any_layout(draw, obj)
    if _rarely(draw):  # a repeated key: json.loads keeps the last
        key = draw(st.sampled_from(["type", "item_id", "response_id", "delta", "event_id"]))
        text = text[:-1] + f', "{key}": "AAAA"}}'
    if _rarely(draw):
        text = draw(st.sampled_from([text + " x", text[:-1], "\n " + text + " \r\n", "[" + text + "]", text + ",", "{}"]))
    return text


@settings(max_examples=2000, deadline=None)
@given(delta_texts())
def test_delta_scanner_reads_what_json_reads_or_declines(text: str) -> None:
    fields = parse_audio_delta(text)
    if fields is None:
        return
    msg = json.loads(text)
    assert msg["type"] == "response.output_audio.delta"
    response_id = msg.get("response_id")
    assert fields == (msg["item_id"], response_id, base64.b64decode(msg["delta"], validate=True))
    assert isinstance(msg["item_id"], str) and msg["item_id"]
    assert response_id is None or isinstance(response_id, str)


def _outcome(session: OpenAIRealtimeSession, text: str) -> tuple[str, object]:
    try:
        session.receive_message(text)
        result: object = repr(list(session.events()))
    except (RemoteProtocolError, LocalProtocolError) as exc:
        result = (type(exc).__name__, str(exc))
    return repr(result), session.state


def _ledger(session: OpenAIRealtimeSession) -> dict[str, int]:
    return dict(session._audio._received)  # the bytes per reply a truncation is clamped to


@settings(max_examples=1500, deadline=None)
@given(st.lists(delta_texts(), min_size=1, max_size=4))
def test_session_with_the_scanner_matches_the_session_without(texts: list[str]) -> None:
    fast, slow = ready_session(), ready_session()
    for text in texts:
        a = _outcome(fast, text)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(openai_core, "parse_audio_delta", lambda _text: None)
            b = _outcome(slow, text)
        assert a == b
        assert _ledger(fast) == _ledger(slow)


def test_the_sdk_delta_takes_the_native_path() -> None:
    """The server's own serialisation (pydantic's compact JSON) is read natively, not left to the fallback."""
    audio = bytes(range(256))
    text = server(audio_delta("item_1", audio))
    assert parse_audio_delta(text) == ("item_1", "resp_1", audio)
    session = ready_session()
    session.receive_message(text)
    assert list(session.events()) == [AudioDelta("item_1", audio, "resp_1")]
    assert _ledger(session) == {"item_1": 256}


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"response.output_audio.delta","item_id":"i","delta":"AAAA","output_index":1.0}',
        '{"type":"response.output_audio.delta","item_id":"i","delta":"AAAA","x":{"a":1}}',
        '{"type":"response.output_audio.delta","item_id":"i","delta":"AAAA","x":01}',
        '{"type":"response.output_audio.delta","item_id":"i","delta":"AAAA","x":-}',
        '{"type":"response.output_audio.delta","item_id":"i\\u0031","delta":"AAAA"}',
        '{"type":"response.output_audio.delta","item_id":"i","delta":"AAAA","response_id":7}',
        '{"type":"response.output_audio.delta","item_id":"i","delta":"AAAA","type":"response.output_audio.delta"}',
        '{"type":"response.output_audio.delta","item_id":"","delta":"AAAA"}',
        '{"type":"response.output_audio.delta","delta":"AAAA"}',
        '{"type":"response.output_audio.delta","item_id":"i","delta":""}',
        '{"type":"response.output_audio.delta","item_id":"i","delta":"AAAA",}',
        '{"type":"response.output_audio.done","item_id":"i","delta":"AAAA"}',
        # more digits than json.loads takes (4300 by default; 19+ here): its error, not ours to skip
        '{"type":"response.output_audio.delta","item_id":"i","delta":"AAAA","content_index":' + "9" * 4301 + "}",
        '{"type":"response.output_audio.delta","item_id":"i","delta":"AAAA","content_index":' + "9" * 19 + "}",
    ],
)
def test_delta_scanner_declines_what_it_does_not_fully_understand(text: str) -> None:
    assert parse_audio_delta(text) is None


def test_a_delta_before_initial_messages_is_refused_as_before() -> None:
    session = OpenAIRealtimeSession(config())
    with pytest.raises(LocalProtocolError, match="before initial_messages"):
        session.receive_message(server(audio_delta("item_1", b"\x00\x01")))


@settings(max_examples=300, deadline=None)
@given(delta_texts())
def test_every_cut_of_a_delta_is_declined_not_misread(text: str) -> None:
    """A message cut anywhere (a read that ended early) is never taken: no read past the end, no partial event."""
    for end in range(len(text.rstrip())):
        assert parse_audio_delta(text[:end]) is None or json.loads(text[:end])["type"] == "response.output_audio.delta"


@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes_the_delta_scanner(text: str) -> None:
    fields = parse_audio_delta(text)
    assert fields is None or json.loads(text)["type"] == "response.output_audio.delta"
