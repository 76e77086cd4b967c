"""TwiML answers for the voice webhook: pure functions from values to XML text.

The output is the same document ``twilio.twiml.voice_response.VoiceResponse``
builds (the tests compare the two), written directly so that the server does
not depend on the twilio package.  Serve it as :data:`CONTENT_TYPE`, encoded
as UTF-8 (the declaration says so).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit
from xml.etree import ElementTree
from xml.sax.saxutils import escape

__all__ = ["CONTENT_TYPE", "MAX_PARAMETER_CHARS", "connect_stream", "failure", "say_and_hangup"]

CONTENT_TYPE = "text/xml; charset=utf-8"

# "The combined length of each <Parameter>'s name and value must be under 500
# characters" (Twilio <Stream> docs, quoted in reference/twilio-side.md §2.2).
MAX_PARAMETER_CHARS = 500

_DECLARATION = '<?xml version="1.0" encoding="UTF-8"?>'

# Characters XML 1.0 cannot carry at all (not even as &#...;): C0 controls
# other than tab/LF/CR, lone surrogates, U+FFFE and U+FFFF.
_NOT_XML_CHAR = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")

# In attribute values a literal tab/LF/CR is normalised to a space by the
# parser, so they are written as character references to survive.
_ATTR_ENTITIES = {'"': "&quot;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}


def connect_stream(
    stream_url: str,
    parameters: Mapping[str, str],
    *,
    status_callback: str | None = None,
    hangup_after: bool = True,
) -> str:
    """``<Connect><Stream>`` to ``stream_url`` with ``<Parameter>`` children.

    ``stream_url`` must be an absolute ``wss://`` (or ``ws://``, for local
    tests) URL without query string or fragment: Twilio drops the query, so
    per-call data goes in ``parameters`` (they arrive as
    ``start.customParameters``).  Each parameter's name plus value must be
    under :data:`MAX_PARAMETER_CHARS` characters.  ``status_callback`` gets
    ``stream-started``/``stream-stopped``/``stream-error`` events.  With
    ``hangup_after`` a ``<Hangup/>`` follows, so the call ends when the
    server closes the stream (it would also end with no next verb; the
    explicit verb documents it).

    Raises :class:`ValueError` for any value Twilio would reject or XML cannot carry.
    """
    _check_stream_url(stream_url)
    stream_attrs = {"url": stream_url}
    if status_callback is not None:
        if not status_callback:
            raise ValueError("status_callback must not be empty")
        stream_attrs["statusCallback"] = status_callback
    children: list[str] = []
    for name, value in parameters.items():
        if not name:
            raise ValueError("<Parameter> name must not be empty")
        if len(name) + len(value) >= MAX_PARAMETER_CHARS:
            raise ValueError(
                f"<Parameter> {name[:40]!r}: name + value is {len(name) + len(value)} characters,"
                f" Twilio allows fewer than {MAX_PARAMETER_CHARS}"
            )
        children.append(_element("Parameter", {"name": name, "value": value}))
    stream = _element("Stream", stream_attrs, "".join(children))
    return _response(_element("Connect", {}, stream) + ("<Hangup/>" if hangup_after else ""))


def say_and_hangup(text: str, *, voice: str | None = None, language: str | None = None) -> str:
    """``<Say>text</Say><Hangup/>``: the answer when a call cannot be bridged.

    For example when the server is at capacity, shutting down, or the model
    cannot be reached.  ``voice`` and ``language`` (``en-US``) are passed
    through as Twilio ``<Say>`` attributes.
    """
    if not text.strip():
        raise ValueError("<Say> text must not be empty")
    attrs: dict[str, str] = {}
    if voice is not None:
        attrs["voice"] = voice
    if language is not None:
        attrs["language"] = language
    return _response(_element("Say", attrs, _text(text)) + "<Hangup/>")


def failure(message: str) -> str | None:
    """``MEDIASERVER_FAILURE_MESSAGE`` as TwiML, then ``<Hangup/>``; None when it is ``off`` (or empty).

    Text is said (``<Say>``); a message that starts with ``<`` is TwiML verbs
    (``<Say language="fr-FR">…</Say>``, ``<Play>URL</Play>``), taken as they
    are.  ValueError for verbs that are not well-formed XML, or text XML
    cannot carry.
    """
    message = message.strip()
    if message.lower() in ("", "off"):
        return None
    if not message.startswith("<"):
        return say_and_hangup(message)
    twiml = _response(message + "<Hangup/>")
    try:
        ElementTree.fromstring(twiml)
    except ElementTree.ParseError as exc:
        raise ValueError(f"not well-formed TwiML verbs ({exc}): {message[:80]!r}") from None
    return twiml


def hangup() -> str:
    """``<Hangup/>`` alone: end the call at once, saying nothing."""
    return _response("<Hangup/>")


def _check_stream_url(url: str) -> None:
    _check_chars(url)
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError as exc:
        raise ValueError(f"<Stream> url is malformed: {url!r}") from exc
    if parts.scheme not in ("wss", "ws") or not parts.hostname:
        raise ValueError(f"<Stream> url must be an absolute wss:// URL, not {url!r}")
    if "?" in url or "#" in url:
        raise ValueError(f"<Stream> url must not have a query string or fragment (Twilio drops it): {url!r}")


def _response(body: str) -> str:
    return f"{_DECLARATION}<Response>{body}</Response>"


def _element(tag: str, attrs: Mapping[str, str], content: str = "") -> str:
    attr_text = "".join(f' {name}="{_attr(value)}"' for name, value in attrs.items())
    if not content:
        return f"<{tag}{attr_text}/>"
    return f"<{tag}{attr_text}>{content}</{tag}>"


def _attr(value: str) -> str:
    _check_chars(value)
    return escape(value, _ATTR_ENTITIES)


def _text(value: str) -> str:
    _check_chars(value)
    # "\r" would be read back as "\n" (end-of-line normalisation).
    return escape(value, {"\r": "&#13;"})


def _check_chars(value: str) -> None:
    bad = _NOT_XML_CHAR.search(value)
    if bad is not None:
        raise ValueError(f"character U+{ord(bad.group()):04X} cannot be written in XML")
