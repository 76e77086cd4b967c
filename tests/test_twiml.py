"""Tests for mediaserver.twiml against twilio-python's VoiceResponse as the oracle.

Both documents are parsed with ElementTree and compared as trees (tag,
attributes as a dict, text, children), so attribute order and the
``<x />`` / ``<x/>`` spelling do not matter.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twilio.twiml.voice_response import VoiceResponse

from mediaserver.twiml import CONTENT_TYPE, MAX_PARAMETER_CHARS, connect_stream, say_and_hangup

STREAM = "wss://voice.example.com/media-stream"
DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'


def tree(document: str) -> tuple[Any, ...]:
    assert document.startswith(DECLARATION)
    return _shape(ET.fromstring(document.encode("utf-8")))


def _shape(element: ET.Element) -> tuple[Any, ...]:
    return (element.tag, dict(element.attrib), element.text or "", [_shape(child) for child in element])


def twilio_connect_stream(
    url: str, parameters: Mapping[str, str], *, status_callback: str | None = None, hangup_after: bool = True
) -> str:
    response = VoiceResponse()
    connect = response.connect()
    stream = connect.stream(url=url, status_callback=status_callback)
    for name, value in parameters.items():
        stream.parameter(name=name, value=value)
    if hangup_after:
        response.hangup()
    return str(response)


# --------------------------------------------------------------------------
# connect_stream


def test_connect_stream_exact_text() -> None:
    assert connect_stream(STREAM, {"token": "abc", "callSid": "CA1"}) == (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
        '<Stream url="wss://voice.example.com/media-stream">'
        '<Parameter name="token" value="abc"/><Parameter name="callSid" value="CA1"/>'
        "</Stream></Connect><Hangup/></Response>"
    )


@pytest.mark.parametrize(
    ("parameters", "status_callback", "hangup_after"),
    [
        ({}, None, True),
        ({"token": "x7Yq-_"}, None, True),
        ({"token": "t", "CallSid": "CA" + "1" * 32, "From": "+14158675309"}, None, True),
        ({"token": "t"}, "https://voice.example.com/stream-status", True),
        ({"token": "t"}, None, False),
        ({"a&b": "<c>", 'q"uote': "it's", "amp": "&amp;"}, "https://h.example/s?x=1&y=2", True),
        ({"unicode": "Zoë ☎ 日本語 🙂"}, None, True),
        ({"ws": "line1\nline2\ttab\rcr  double  space"}, None, True),
        ({"empty": ""}, None, True),
    ],
    ids=["none", "token", "several", "status-callback", "no-hangup", "escaping", "unicode", "whitespace", "empty"],
)
def test_connect_stream_matches_twilio(
    parameters: dict[str, str], status_callback: str | None, hangup_after: bool
) -> None:
    ours = connect_stream(STREAM, parameters, status_callback=status_callback, hangup_after=hangup_after)
    theirs = twilio_connect_stream(STREAM, parameters, status_callback=status_callback, hangup_after=hangup_after)
    assert tree(ours) == tree(theirs)


def test_connect_stream_escapes_markup_characters() -> None:
    nasty = "&<>\"'"
    url = "wss://h.example/a&b'\"<>"
    document = connect_stream(url, {nasty: nasty}, status_callback=nasty)
    assert tree(document) == tree(twilio_connect_stream(url, {nasty: nasty}, status_callback=nasty))
    stream = ET.fromstring(document.encode())[0][0]
    assert stream.attrib == {"url": url, "statusCallback": nasty}
    assert stream[0].attrib == {"name": nasty, "value": nasty}
    # Nothing was smuggled in as markup.
    assert [e.tag for e in ET.fromstring(document.encode()).iter()] == [
        "Response", "Connect", "Stream", "Parameter", "Hangup",
    ]


_XML_TEXT = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="\ufffe\uffff").filter(
        lambda c: c in "\t\n\r" or c >= " "
    ),
    max_size=30,
)


@given(parameters=st.dictionaries(_XML_TEXT.filter(bool), _XML_TEXT, max_size=5))
def test_connect_stream_round_trips_parameters(parameters: dict[str, str]) -> None:
    stream = ET.fromstring(connect_stream(STREAM, parameters).encode("utf-8"))[0][0]
    assert [(p.attrib["name"], p.attrib["value"]) for p in stream] == list(parameters.items())


def test_connect_stream_accepts_ws_and_ports() -> None:
    for url in ("ws://localhost:8080/media-stream", "wss://h.example:8443/x/y", "wss://[::1]/m"):
        assert ET.fromstring(connect_stream(url, {}).encode())[0][0].attrib["url"] == url


@pytest.mark.parametrize(
    "url",
    [
        "wss://h.example/media-stream?token=abc",
        "wss://h.example/media-stream?",
        "wss://h.example/media-stream#frag",
        "https://h.example/media-stream",
        "http://h.example/media-stream",
        "/media-stream",
        "wss:///media-stream",
        "wss://h.example:port/x",
        "",
    ],
)
def test_connect_stream_rejects_bad_stream_url(url: str) -> None:
    with pytest.raises(ValueError, match="url"):
        connect_stream(url, {})


def test_connect_stream_parameter_length_limit() -> None:
    longest = {"n": "v" * (MAX_PARAMETER_CHARS - 2)}  # 499 characters together
    assert "v" * (MAX_PARAMETER_CHARS - 2) in connect_stream(STREAM, longest)
    with pytest.raises(ValueError, match="500"):
        connect_stream(STREAM, {"n": "v" * (MAX_PARAMETER_CHARS - 1)})
    with pytest.raises(ValueError, match="500"):
        connect_stream(STREAM, {"n" * 250: "v" * 250})


@pytest.mark.parametrize(
    ("parameters", "status_callback", "match"),
    [
        ({"": "v"}, None, "name"),
        ({"n": "nul\x00"}, None, "U\\+0000"),
        ({"bell\x07": "v"}, None, "U\\+0007"),
        ({"n": "\ud800"}, None, "U\\+D800"),
        ({"n": "\uffff"}, None, "U\\+FFFF"),
        ({}, "", "status_callback"),
        ({}, "https://h.example/\x1b", "U\\+001B"),
    ],
)
def test_connect_stream_rejects_unrepresentable_values(
    parameters: dict[str, str], status_callback: str | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        connect_stream(STREAM, parameters, status_callback=status_callback)


# --------------------------------------------------------------------------
# say_and_hangup


def twilio_say_and_hangup(text: str, **attrs: str) -> str:
    response = VoiceResponse()
    response.say(text, **attrs)
    response.hangup()
    return str(response)


@pytest.mark.parametrize(
    ("text", "attrs"),
    [
        ("Sorry, all our lines are busy. Please call again later.", {}),
        ("Tom & Jerry <say> \"hi\" 'there'", {}),
        ("Désolé, réessayez plus tard.", {"voice": "Polly.Celine", "language": "fr-FR"}),
        ("We could not connect your call.", {"voice": "alice"}),
    ],
)
def test_say_and_hangup_matches_twilio(text: str, attrs: dict[str, str]) -> None:
    assert tree(say_and_hangup(text, **attrs)) == tree(twilio_say_and_hangup(text, **attrs))


def test_say_and_hangup_exact_text() -> None:
    assert say_and_hangup("Busy & sorry.") == (
        '<?xml version="1.0" encoding="UTF-8"?><Response><Say>Busy &amp; sorry.</Say><Hangup/></Response>'
    )


@given(text=_XML_TEXT.filter(str.strip))
def test_say_and_hangup_round_trips_text(text: str) -> None:
    say = ET.fromstring(say_and_hangup(text).encode("utf-8"))[0]
    assert say.text == text


@pytest.mark.parametrize("text", ["", "   ", "ok\x00"])
def test_say_and_hangup_rejects_empty_or_unrepresentable(text: str) -> None:
    with pytest.raises(ValueError):
        say_and_hangup(text)


def test_content_type_is_xml() -> None:
    assert CONTENT_TYPE.startswith("text/xml")
