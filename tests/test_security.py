"""Tests for mediaserver.security: Twilio signatures, public URLs, one-time stream tokens.

Signatures are checked against twilio-python's ``RequestValidator`` as an
independent oracle, in both directions: what Twilio's helper signs we accept,
and what we sign Twilio's helper accepts.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twilio.request_validator import RequestValidator
from werkzeug.datastructures import Headers, MultiDict

from mediaserver.security import (
    MEDIA_STREAM_PATH,
    body_sha256,
    compute_signature,
    public_url,
    stream_url,
    upgrade_signature_url,
    validate_body_signature,
    validate_signature,
)

TOKEN = "12345678901234567890123456789012"
OTHER_TOKEN = "abcdefabcdefabcdefabcdefabcdefab"
VOICE_URL = "https://mycompany.example.com/voice"
# A realistic inbound voice webhook body (form fields from Twilio's voice request docs).
VOICE_PARAMS = {
    "AccountSid": "AC" + "0" * 32,
    "ApiVersion": "2010-04-01",
    "CallSid": "CA" + "1" * 32,
    "CallStatus": "ringing",
    "Called": "+15005550006",
    "Caller": "+14158675309",
    "Direction": "inbound",
    "From": "+14158675309",
    "To": "+15005550006",
}

Params = Mapping[str, str | Sequence[str]]


class GetAll:
    """A multi-valued mapping in the shape twilio-python reads (``getall``), for the oracle."""

    def __init__(self, params: Params) -> None:
        self._params = params

    def __iter__(self) -> Iterator[str]:
        return iter(self._params)

    def __bool__(self) -> bool:
        return bool(self._params)

    def getall(self, name: str) -> list[str]:
        value = self._params[name]
        return [value] if isinstance(value, str) else list(value)


def twilio_sign(url: str, params: Params, token: str = TOKEN) -> str:
    return str(RequestValidator(token).compute_signature(url, GetAll(params)))


def twilio_validates(url: str, params: Params, signature: str, token: str = TOKEN) -> bool:
    return bool(RequestValidator(token).validate(url, GetAll(params), signature))


# --------------------------------------------------------------------------
# compute_signature


def test_compute_signature_known_answer() -> None:
    # Spelled out: URL, then name+value pairs in sorted order, HMAC-SHA1, base64.
    signed = "https://h.example/voice?x=1" + "Az" + "Ba" + "bc" + "bd"
    expected = base64.b64encode(hmac.new(TOKEN.encode(), signed.encode(), hashlib.sha1).digest()).decode()
    params: Params = {"b": ["d", "c"], "B": "a", "A": "z"}
    assert compute_signature(TOKEN, "https://h.example/voice?x=1", params) == expected


@pytest.mark.parametrize(
    ("url", "params"),
    [
        (VOICE_URL, VOICE_PARAMS),
        (VOICE_URL, {}),
        ("https://h.example/voice?foo=bar&a=1", {"Digits": "1234"}),
        (VOICE_URL, {"Caller": "Zoë Ünïcødé ☎", "Name": "日本語", "Emoji": "🙂"}),
        ("https://h.example/vöice", {"a": "é"}),
        (VOICE_URL, {"Multi": ["3", "1", "2"], "single": "x", "Empty": ""}),
        (VOICE_URL, {"Dup": ["x", "x", "y"]}),
        (VOICE_URL, {"Z": "1", "a": "2", "_": "3", "0": "4"}),  # code-point order, not case-folded
    ],
    ids=["voice", "no-params", "query", "unicode", "unicode-url", "multi", "dup-values", "key-order"],
)
def test_compute_signature_matches_twilio(url: str, params: Params) -> None:
    assert compute_signature(TOKEN, url, params) == twilio_sign(url, params)


_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)


@given(
    url=_TEXT.map(lambda path: "https://h.example/" + path),
    params=st.dictionaries(_TEXT, _TEXT | st.lists(_TEXT, max_size=4), max_size=6),
)
def test_compute_signature_matches_twilio_any_input(url: str, params: Params) -> None:
    assert compute_signature(TOKEN, url, params) == twilio_sign(url, params)


def test_compute_signature_reads_every_value_of_a_multidict() -> None:
    # request.form is a werkzeug MultiDict; form["k"] alone would drop "b".
    form = MultiDict([("k", "b"), ("k", "a"), ("x", "1")])
    as_lists: Params = {"k": ["a", "b"], "x": "1"}
    assert compute_signature(TOKEN, VOICE_URL, form) == compute_signature(TOKEN, VOICE_URL, as_lists)
    assert compute_signature(TOKEN, VOICE_URL, form) == RequestValidator(TOKEN).compute_signature(VOICE_URL, form)


def test_compute_signature_value_order_and_duplicates_do_not_matter() -> None:
    # twilio-python signs sorted(set(values)).
    a = compute_signature(TOKEN, VOICE_URL, {"k": ["b", "a", "b"]})
    assert a == compute_signature(TOKEN, VOICE_URL, {"k": ("a", "b")})


def test_compute_signature_rejects_empty_token() -> None:
    with pytest.raises(ValueError, match="auth_token"):
        compute_signature("", VOICE_URL, {})


# --------------------------------------------------------------------------
# validate_signature: interop


def test_validate_accepts_twilio_signature() -> None:
    assert validate_signature(TOKEN, VOICE_URL, VOICE_PARAMS, twilio_sign(VOICE_URL, VOICE_PARAMS))


def test_twilio_accepts_our_signature() -> None:
    signature = compute_signature(TOKEN, VOICE_URL, VOICE_PARAMS)
    assert RequestValidator(TOKEN).validate(VOICE_URL, VOICE_PARAMS, signature)


@given(params=st.dictionaries(_TEXT, _TEXT | st.lists(_TEXT, min_size=1, max_size=3), max_size=5))
def test_validate_interop_both_ways_any_params(params: Params) -> None:
    assert validate_signature(TOKEN, VOICE_URL, params, twilio_sign(VOICE_URL, params))
    assert twilio_validates(VOICE_URL, params, compute_signature(TOKEN, VOICE_URL, params))


def test_validate_multi_valued_and_unicode_params() -> None:
    params: Params = {"To": "+15005550006", "Tags": ["β", "α", "ω"], "Name": "Zoë ☎"}
    signature = twilio_sign(VOICE_URL, params)
    assert validate_signature(TOKEN, VOICE_URL, params, signature)
    assert validate_signature(TOKEN, VOICE_URL, {**params, "Tags": ["ω", "α", "β"]}, signature)
    assert not validate_signature(TOKEN, VOICE_URL, {**params, "Tags": ["α", "β"]}, signature)


# Twilio's backend may sign with or without the default port; the request may
# carry either form.  (signed URL, URL we reconstruct)
PORT_CASES = [
    ("https://h.example/voice", "https://h.example:443/voice"),
    ("https://h.example:443/voice", "https://h.example/voice"),
    ("http://h.example/voice", "http://h.example:80/voice"),
    ("http://h.example:80/voice", "http://h.example/voice"),
    ("https://h.example/voice?a=1", "https://h.example:443/voice?a=1"),
    # A non-default port may also be dropped (twilio-python removes any port).
    ("https://h.example/voice", "https://h.example:8443/voice"),
]


@pytest.mark.parametrize(("signed_url", "request_url"), PORT_CASES)
def test_validate_port_quirk_agrees_with_twilio(signed_url: str, request_url: str) -> None:
    signature = twilio_sign(signed_url, VOICE_PARAMS)
    assert validate_signature(TOKEN, request_url, VOICE_PARAMS, signature)
    assert twilio_validates(request_url, VOICE_PARAMS, signature)


@pytest.mark.parametrize(
    ("signed_url", "request_url"),
    [
        ("wss://h.example/media-stream", "wss://h.example:443/media-stream"),
        ("wss://h.example:443/media-stream", "wss://h.example/media-stream"),
        ("ws://h.example:80/media-stream", "ws://h.example/media-stream"),
    ],
)
def test_validate_port_quirk_websocket_schemes(signed_url: str, request_url: str) -> None:
    # Deliberate difference: twilio-python adds :80 to every non-https scheme,
    # so it cannot match a wss URL signed with :443.  We use the scheme's default.
    assert validate_signature(TOKEN, request_url, {}, twilio_sign(signed_url, {}))


def test_twilio_python_cannot_match_wss_signed_with_443() -> None:
    # Why we differ: twilio-python tries wss://h.example:80/..., never :443.
    signature = twilio_sign("wss://h.example:443/media-stream", {})
    assert not twilio_validates("wss://h.example/media-stream", {}, signature)
    assert validate_signature(TOKEN, "wss://h.example/media-stream", {}, signature)


def test_validate_rejects_other_nondefault_port() -> None:
    signature = twilio_sign("https://h.example:8443/voice", VOICE_PARAMS)
    assert not validate_signature(TOKEN, "https://h.example:9443/voice", VOICE_PARAMS, signature)
    assert not validate_signature(TOKEN, "https://h.example:443/voice", VOICE_PARAMS, signature)


@pytest.mark.parametrize(
    ("url", "params"),
    [("https://[::1/voice", {}), ("https://h.example/\udcff", {}), (VOICE_URL, {"a": "\ud800"})],
    ids=["bad-ipv6", "surrogate-url", "surrogate-param"],
)
def test_validate_is_total_on_garbage_input(url: str, params: Params) -> None:
    assert not validate_signature(TOKEN, url, params, twilio_sign(VOICE_URL, {}))


def test_validate_malformed_port_only_matches_literally() -> None:
    url = "https://h.example:notaport/voice"
    assert validate_signature(TOKEN, url, {}, twilio_sign(url, {}))
    assert not validate_signature(TOKEN, url, {}, twilio_sign("https://h.example/voice", {}))


# --------------------------------------------------------------------------
# validate_signature: rejections


@pytest.mark.parametrize(
    "params",
    [
        {**VOICE_PARAMS, "CallStatus": "completed"},  # tampered value
        {**VOICE_PARAMS, "Extra": "1"},  # added field
        {k: v for k, v in VOICE_PARAMS.items() if k != "Direction"},  # removed field
        {**VOICE_PARAMS, "From": ["+14158675309", "+10000000000"]},  # added value
        {k.lower(): v for k, v in VOICE_PARAMS.items()},  # renamed fields
        {},
    ],
    ids=["value", "added", "removed", "added-value", "renamed", "dropped-all"],
)
def test_validate_rejects_tampered_params(params: Params) -> None:
    signature = twilio_sign(VOICE_URL, VOICE_PARAMS)
    assert not validate_signature(TOKEN, VOICE_URL, params, signature)


@pytest.mark.parametrize(
    "url",
    [
        "https://mycompany.example.com/voice2",
        "https://mycompany.example.com/voice/",
        "https://mycompany.example.com/voice?x=1",
        "https://attacker.example.com/voice",
        "http://mycompany.example.com/voice",
        "wss://mycompany.example.com/voice",
        "https://mycompany.example.com:8443/voic",
    ],
)
def test_validate_rejects_tampered_url(url: str) -> None:
    assert not validate_signature(TOKEN, url, VOICE_PARAMS, twilio_sign(VOICE_URL, VOICE_PARAMS))


def test_validate_rejects_tampered_signature() -> None:
    signature = twilio_sign(VOICE_URL, VOICE_PARAMS)
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    for bad in (flipped, signature[:-1], signature + "=", signature.lower(), " " + signature):
        assert not validate_signature(TOKEN, VOICE_URL, VOICE_PARAMS, bad)


@pytest.mark.parametrize("signature", [None, "", "ünïcode☎", "\udcff"])
def test_validate_rejects_missing_or_garbage_signature(signature: str | None) -> None:
    assert not validate_signature(TOKEN, VOICE_URL, VOICE_PARAMS, signature)


def test_validate_rejects_wrong_token() -> None:
    signature = twilio_sign(VOICE_URL, VOICE_PARAMS, token=OTHER_TOKEN)
    assert not validate_signature(TOKEN, VOICE_URL, VOICE_PARAMS, signature)
    assert validate_signature(OTHER_TOKEN, VOICE_URL, VOICE_PARAMS, signature)


def test_validate_refuses_empty_token() -> None:
    # Development mode must be decided by the caller, never by an empty key.
    with pytest.raises(ValueError, match="auth_token"):
        validate_signature("", VOICE_URL, {}, compute_signature("x", VOICE_URL, {}))


# --------------------------------------------------------------------------
# JSON body variant (bodySHA256)


def _json_request() -> tuple[str, str]:
    body = json.dumps({"CallSid": "CA123", "note": "ünïcode"}, ensure_ascii=False)
    return f"https://h.example/events?bodySHA256={body_sha256(body)}", body


def test_body_signature_interop_with_twilio() -> None:
    url, body = _json_request()
    signature = twilio_sign(url, {})
    assert RequestValidator(TOKEN).validate(url, body, signature)
    assert validate_body_signature(TOKEN, url, body, signature)
    assert validate_body_signature(TOKEN, url, body.encode("utf-8"), signature)


def test_body_signature_rejects_tampered_body_or_missing_hash() -> None:
    url, body = _json_request()
    signature = twilio_sign(url, {})
    assert not validate_body_signature(TOKEN, url, body.replace("CA123", "CA999"), signature)
    assert not RequestValidator(TOKEN).validate(url, body.replace("CA123", "CA999"), signature)
    unhashed = "https://h.example/events"
    assert not validate_body_signature(TOKEN, unhashed, body, twilio_sign(unhashed, {}))
    assert not validate_body_signature(TOKEN, url, body, twilio_sign(url, {}, token=OTHER_TOKEN))


def test_body_sha256_is_lowercase_hex() -> None:
    assert body_sha256(b"{}") == hashlib.sha256(b"{}").hexdigest()
    assert body_sha256("é") == hashlib.sha256("é".encode()).hexdigest()


# --------------------------------------------------------------------------
# WebSocket upgrade


def test_upgrade_signature_behind_tls_terminator() -> None:
    # Twilio opens wss://abc.ngrok.app/media-stream (as written in the TwiML);
    # the server sees a plain ws upgrade on its own port.
    url = upgrade_signature_url(
        MEDIA_STREAM_PATH,
        configured=None,
        scheme="ws",
        host="127.0.0.1:8080",
        headers={"host": "127.0.0.1:8080", "x-forwarded-proto": "https", "x-forwarded-host": "abc.ngrok.app"},
    )
    assert url == "wss://abc.ngrok.app/media-stream"
    signature = twilio_sign("wss://abc.ngrok.app/media-stream", {})
    assert validate_signature(TOKEN, url, {}, signature)
    assert twilio_validates(url, {}, compute_signature(TOKEN, url, {}))
    # The https form of the same URL is a different signed string.
    assert not validate_signature(TOKEN, url, {}, twilio_sign("https://abc.ngrok.app/media-stream", {}))
    # Upgrades have no body: any params break the signature.
    assert not validate_signature(TOKEN, url, {"a": "b"}, signature)


def test_upgrade_signature_url_matches_twiml_stream_url() -> None:
    webhook = {"Host": "voice.example.com"}
    for scheme in ("https", "wss"):
        assert upgrade_signature_url(
            MEDIA_STREAM_PATH, configured=None, scheme=scheme, host="", headers=webhook
        ) == stream_url(configured=None, scheme="https", host="", headers=webhook)


def test_upgrade_signature_url_configured_and_query() -> None:
    url = upgrade_signature_url(
        "/media-stream", configured="https://voice.example.com/tw", scheme="ws", host="x", headers={}, query=b"a=1"
    )
    assert url == "wss://voice.example.com/tw/media-stream?a=1"


# --------------------------------------------------------------------------
# public_url / stream_url


def test_public_url_configured_wins_over_headers() -> None:
    headers = {"Host": "internal:8080", "X-Forwarded-Proto": "http", "X-Forwarded-Host": "spoofed.example"}
    url = public_url("/voice", configured="https://voice.example.com", scheme="http", host="internal", headers=headers)
    assert url == "https://voice.example.com/voice"


@pytest.mark.parametrize(
    ("configured", "expected"),
    [
        ("https://voice.example.com/", "https://voice.example.com/voice"),
        ("https://voice.example.com:8443", "https://voice.example.com:8443/voice"),
        ("https://voice.example.com/twilio", "https://voice.example.com/twilio/voice"),
        ("https://voice.example.com/twilio/", "https://voice.example.com/twilio/voice"),
        ("http://localhost:8080", "http://localhost:8080/voice"),
    ],
)
def test_public_url_configured_base(configured: str, expected: str) -> None:
    assert public_url("/voice", configured=configured, scheme="http", host="x", headers={}) == expected


@pytest.mark.parametrize(
    "configured",
    ["ftp://voice.example.com", "voice.example.com", "https://", "https://h.example/?a=1", "https://h.example#f",
     "https://h.example:99999"],
)
def test_public_url_rejects_bad_configured_base(configured: str) -> None:
    with pytest.raises(ValueError, match="MEDIASERVER_PUBLIC_URL"):
        public_url("/voice", configured=configured, scheme="https", host="x", headers={})


def test_public_url_ngrok_forwarded_headers() -> None:
    # ngrok (and most TLS terminators) forward plain HTTP and say what the client used.
    headers = {
        "Host": "localhost:8080",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "abc123.ngrok-free.app",
        "X-Forwarded-For": "54.172.60.1",
    }
    url = public_url("/voice", configured=None, scheme="http", host="localhost:8080", headers=headers)
    assert url == "https://abc123.ngrok-free.app/voice"


def test_public_url_forwarded_proto_with_plain_host() -> None:
    headers = {"host": "abc123.ngrok-free.app", "x-forwarded-proto": "https"}
    assert (
        public_url("/voice", configured=None, scheme="http", host="ignored", headers=headers)
        == "https://abc123.ngrok-free.app/voice"
    )


def test_public_url_comma_lists_take_first_value() -> None:
    headers = {"X-Forwarded-Proto": " HTTPS , http", "X-Forwarded-Host": "edge.example.com, inner.local:8080"}
    url = public_url("/voice", configured=None, scheme="http", host="x", headers=headers)
    assert url == "https://edge.example.com/voice"


def test_public_url_repeated_header_first_line_wins() -> None:
    headers = Headers([("X-Forwarded-Host", "first.example"), ("X-Forwarded-Host", "second.example")])
    assert public_url("/v", configured=None, scheme="https", host="x", headers=headers) == "https://first.example/v"


def test_public_url_plain_host() -> None:
    assert (
        public_url("/voice", configured=None, scheme="http", host="x", headers={"Host": "example.com:8080"})
        == "http://example.com:8080/voice"
    )
    assert public_url("/voice", configured=None, scheme="https", host="[::1]:8443", headers={}) == (
        "https://[::1]:8443/voice"
    )


def test_public_url_websocket_scheme_maps_to_http() -> None:
    assert public_url("/v", configured=None, scheme="wss", host="h.example", headers={}) == "https://h.example/v"
    assert public_url("/v", configured=None, scheme="ws", host="h.example", headers={}) == "http://h.example/v"


def test_public_url_query_string() -> None:
    def url(query: str | bytes) -> str:
        return public_url("/voice", configured=None, scheme="https", host="h.example", headers={}, query=query)

    assert url(b"a=1&b=%20") == "https://h.example/voice?a=1&b=%20"
    assert url("a=1") == "https://h.example/voice?a=1"
    assert url(b"") == "https://h.example/voice"


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-Host": "evil.example/path"},
        {"X-Forwarded-Host": "user@evil.example"},
        {"Host": "h.example:80:80"},
        {"Host": "h example"},
        {"Host": "h.example:123456"},
        {},  # and host="" below: nowhere to get a host from
    ],
)
def test_public_url_rejects_malformed_host(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="host"):
        public_url("/voice", configured=None, scheme="https", host="", headers=headers)


def test_public_url_rejects_bad_scheme_or_path() -> None:
    with pytest.raises(ValueError, match="scheme"):
        public_url("/v", configured=None, scheme="https", host="h", headers={"X-Forwarded-Proto": "gopher"})
    with pytest.raises(ValueError, match="path"):
        public_url("voice", configured=None, scheme="https", host="h", headers={})


def test_public_url_reconstruction_validates_twilio_request() -> None:
    # End to end: Twilio signed https://voice.example.com/voice; behind the proxy
    # werkzeug's request.host may have dropped or kept the default port.
    signature = twilio_sign("https://voice.example.com/voice", VOICE_PARAMS)
    for host_header in ("voice.example.com", "voice.example.com:443"):
        headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": host_header}
        url = public_url("/voice", configured=None, scheme="http", host="127.0.0.1:8080", headers=headers)
        assert validate_signature(TOKEN, url, VOICE_PARAMS, signature)


@pytest.mark.parametrize(
    ("scheme", "configured", "expected"),
    [
        ("https", None, "wss://voice.example.com/media-stream"),
        ("http", None, "ws://voice.example.com/media-stream"),
        ("http", "https://public.example.com/tw/", "wss://public.example.com/tw/media-stream"),
        ("https", "http://localhost:8080", "ws://localhost:8080/media-stream"),
    ],
)
def test_stream_url(scheme: str, configured: str | None, expected: str) -> None:
    headers = {"Host": "voice.example.com"}
    assert stream_url(configured=configured, scheme=scheme, host="x", headers=headers) == expected


def test_stream_url_custom_path() -> None:
    assert stream_url("/s", configured=None, scheme="https", host="h.example", headers={}) == "wss://h.example/s"


# --------------------------------------------------------------------------
# sans-I/O


def test_security_and_twiml_import_no_framework() -> None:
    code = (
        "import sys, mediaserver.security, mediaserver.twiml; "
        "bad = [m for m in ('trio', 'quart', 'quart_trio', 'hypercorn', 'twilio') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
