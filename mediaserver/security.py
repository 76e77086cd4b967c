"""Sans-I/O security building blocks for the HTTP side: signatures, public URLs, stream tokens.

Nothing here does I/O, reads a clock or imports the web framework; the app
passes in what it read from the request (and ``trio.current_time()``).

Twilio request signatures (``X-Twilio-Signature``)
--------------------------------------------------
Mirrors ``twilio.request_validator.RequestValidator`` (twilio-python 9.x):

* the signed string is the full URL Twilio requested (query string included),
  then, for each POST parameter name in ``sorted()`` order, for each of its
  *distinct* values in ``sorted()`` order, ``name + value``;
* the signature is ``base64(HMAC-SHA1(auth_token, signed_string))`` (UTF-8);
* validation accepts the URL with the port removed *or* with the scheme's
  default port added, because Twilio's signing "is inconsistent" about ports
  (twilio-python comment).  We add ``:443`` for ``https`` *and* ``wss`` and
  ``:80`` for ``http``/``ws``; twilio-python adds ``:80`` to every
  non-``https`` scheme, which is useless for ``wss`` upgrade URLs;
* JSON bodies: Twilio puts ``bodySHA256=<hex sha256 of the raw body>`` in the
  query string and signs the URL with no parameters
  (:func:`validate_body_signature`).

A WebSocket upgrade is signed over the ``wss://`` URL written in the TwiML,
with no parameters: see :func:`upgrade_signature_url`.

Public URLs
-----------
Signatures cover the URL *Twilio* used, not the one the server sees behind a
TLS terminator or tunnel.  :func:`public_url` takes, in order: the configured
``MEDIASERVER_PUBLIC_URL`` base, else ``X-Forwarded-Proto``/``X-Forwarded-Host``
(first value of a comma list), else ``Host``.  Forwarded headers are
client-controlled unless a proxy sets them, so production should configure
the public URL.

The one-time stream tokens (a random token per answered call, put in the
TwiML ``<Parameter>`` and checked in the stream's ``start.customParameters``)
are issued and checked by the call manager with the pre-opened model
session they stand for (:mod:`mediaserver.bridge.registry`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, cast
from urllib.parse import SplitResult, parse_qs, urlsplit

from mediaserver.logs import shown
from mediaserver.protocol.twilio_events import is_sid_like, is_twilio_sid

__all__ = [
    "MEDIA_STREAM_PATH",
    "SIGNATURE_HEADER",
    "HeaderSource",
    "body_sha256",
    "compute_signature",
    "configured_base",
    "on_this_network",
    "public_url",
    "signature_bases",
    "signed_by_any",
    "to_ws",
    "stream_url",
    "upgrade_signature_url",
    "validate_body_signature",
    "validate_signature",
]

# Header Twilio signs webhooks and Media Streams upgrades with (twilio-python
# request_validator.SIGNATURE_HEADER; arrives lower-case on the WS upgrade).
SIGNATURE_HEADER = "X-Twilio-Signature"

# Route of the Media Streams WebSocket (the <Stream url> path).
MEDIA_STREAM_PATH = "/media-stream"

# Ports twilio-python's validator adds when the URL has none (add_port): 443
# for https, 80 otherwise.  We also map the WebSocket schemes to their TLS /
# plain default ports, which is what a wss URL "with the port" would carry.
_DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80}

# X-Forwarded-Proto / request scheme -> HTTP scheme of the public URL.
# Proxies report a WebSocket upgrade as either http(s) or ws(s).
_HTTP_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
_WS_SCHEMES = {"http": "ws", "https": "wss"}

# Host[:port] as it may appear in Host / X-Forwarded-Host: an RFC 3986
# reg-name (letters, digits, "-._~", no percent-encoding) or a bracketed IPv6
# literal, then an optional numeric port.  Anything else (paths, "@", spaces)
# would change the URL's structure, so it is refused.
_HOST_RE = re.compile(r"(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


# --------------------------------------------------------------------------
# Signatures


def compute_signature(auth_token: str, url: str, params: Mapping[str, str | Sequence[str]]) -> str:
    """``X-Twilio-Signature`` for a request to ``url`` with POST ``params``.

    ``params`` maps each name to a value or a sequence of values.  A werkzeug
    ``MultiDict`` (Quart's ``request.form``) is read with ``getlist`` so that
    repeated fields are not truncated to their first value.  Distinct values
    are signed once each, as twilio-python does (``sorted(set(values))``).
    For GET webhooks and WebSocket upgrades pass ``{}``: the parameters are
    already in the URL.
    """
    if not auth_token:
        raise ValueError("auth_token is empty: without a token there is nothing to sign with")
    parts = [url]
    for name in sorted(set(params)):
        for value in sorted(set(_values(params, name))):
            parts.append(name + value)
    mac = hmac.new(auth_token.encode("utf-8"), "".join(parts).encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def validate_signature(
    auth_token: str,
    url: str,
    params: Mapping[str, str | Sequence[str]],
    signature: str | None,
) -> bool:
    """Whether ``signature`` is Twilio's signature of ``url`` + ``params``.

    ``url`` is the exact public URL (see :func:`public_url`); it is also tried
    without its port and with the scheme's default port.  A missing or empty
    ``signature`` is rejected.  Comparison is constant-time.  Never raises for
    request-supplied values; raises :class:`ValueError` for an empty token.
    """
    if not auth_token:
        raise ValueError("auth_token is empty: check development mode before validating")
    if not signature:
        return False
    candidates = _url_variants(url)
    try:
        return any(_matches(compute_signature(auth_token, candidate, params), signature) for candidate in candidates)
    except UnicodeEncodeError:  # lone surrogates in url or params: nothing Twilio could have signed
        return False


def body_sha256(body: bytes | str) -> str:
    """Lower-case hex SHA-256 of a raw request body (``str`` is UTF-8 encoded)."""
    raw = body.encode("utf-8") if isinstance(body, str) else body
    return hashlib.sha256(raw).hexdigest()


def validate_body_signature(auth_token: str, url: str, body: bytes | str, signature: str | None) -> bool:
    """Validate a JSON-body request: Twilio's ``bodySHA256`` variant.

    ``url`` must carry ``bodySHA256`` in its query string; it must equal the
    SHA-256 of the *raw* ``body`` (do not re-serialise parsed JSON), and the
    signature must match ``url`` with no parameters.  Without ``bodySHA256``
    the body is unauthenticated, so the request is rejected (twilio-python
    would instead sign the body string as if it were a form; see
    twilio/twilio-python#885).
    """
    try:
        declared = parse_qs(urlsplit(url).query).get("bodySHA256")
    except ValueError:
        return False
    if not declared:
        return False
    try:
        body_ok = _matches(body_sha256(body), declared[0])
    except UnicodeEncodeError:  # a str body with lone surrogates was not what Twilio sent
        return False
    return validate_signature(auth_token, url, {}, signature) and body_ok


def call_sid_error(call_sid: str, *, signed: bool) -> str | None:
    """Why ``call_sid`` (a webhook's ``CallSid``) is refused, or None.

    Twilio's signature joins each parameter's name and value with nothing in
    between, so a captured signed webhook stays valid when the parameters
    after ``CallSid`` are folded into its value (``CallSid=CA…CallStatusringing``)
    or split at another point: each such request would be a "new" call with
    its own model session, past the replay limit.  A webhook whose signature
    was checked (``signed``) must therefore carry a call SID in Twilio's exact
    format, ``CA`` and 32 hex digits, which leaves no room to move
    characters.  In development mode (nothing is signed) any short
    identifier of letters, digits, ``_`` and ``-`` is taken, which still keeps
    line breaks and markup out of the logs.
    """
    if not call_sid:
        return "CallSid missing"
    if signed:
        if not is_twilio_sid(call_sid, "CA"):
            return "CallSid is not a Twilio call SID (CA and 32 hex digits)"
    elif not is_sid_like(call_sid):
        return "CallSid must be 1-64 letters, digits, '_' or '-'"
    return None


def _values(params: Mapping[str, str | Sequence[str]], name: str) -> Sequence[str]:
    getlist = getattr(params, "getlist", None)
    if callable(getlist):  # werkzeug MultiDict: params[name] is only the first value
        return cast("Sequence[str]", getlist(name))
    value = params[name]
    if isinstance(value, str):
        return (value,)
    return value


def _matches(computed: str, given: str) -> bool:
    # compare_digest refuses non-ASCII str; bytes keep it constant-time and total.
    return hmac.compare_digest(computed.encode("utf-8"), given.encode("utf-8", "surrogatepass"))


def _url_variants(url: str) -> tuple[str, ...]:
    """``url`` as given, without its port, and with the scheme's default port."""
    variants = [url]
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # bad IPv6 literal, non-numeric or out-of-range port: only the literal URL
        return tuple(variants)
    if port is not None:
        variants.append(parts.geturl())
        variants.append(parts._replace(netloc=parts.netloc.rpartition(":")[0]).geturl())
    else:
        variants.append(parts.geturl())
        default_port = _DEFAULT_PORTS.get(parts.scheme)
        if default_port is not None and parts.netloc:
            variants.append(parts._replace(netloc=f"{parts.netloc}:{default_port}").geturl())
    return tuple(dict.fromkeys(variants))


# --------------------------------------------------------------------------
# Public URLs


class HeaderSource(Protocol):
    """Anything with ``items()`` of header name/value pairs: a dict, Quart's ``Headers``."""

    def items(self) -> Iterable[tuple[str, str]]: ...


def public_url(
    path: str,
    *,
    configured: str | None,
    scheme: str,
    host: str,
    headers: HeaderSource,
    query: str | bytes = "",
) -> str:
    """The ``http(s)://`` URL Twilio requested for ``path`` (plus ``?query`` if any).

    ``path`` is the route as the server saw it, starting with ``/``; pass the
    raw (still percent-encoded) path when it may contain escapes.
    ``configured`` is ``MEDIASERVER_PUBLIC_URL`` (``https://host[:port][/prefix]``)
    and wins when set; the prefix is prepended to ``path``.  Otherwise the
    scheme comes from ``X-Forwarded-Proto`` or ``scheme`` (``ws``/``wss`` map
    to ``http``/``https``), and the host from ``X-Forwarded-Host``, ``Host`` or
    ``host``, in that order; comma lists use their first value.

    Raises :class:`ValueError` for a malformed configured URL, scheme or host
    (for header-supplied values the app should answer 400).
    """
    if not path.startswith("/"):
        raise ValueError(f"path must start with '/', not {path!r}")
    if configured is not None:
        base = configured_base(configured)
        url = base.scheme + "://" + base.netloc + base.path.rstrip("/") + path
    else:
        forwarded_proto = _first(headers, "x-forwarded-proto")
        proto = forwarded_proto if forwarded_proto is not None else scheme
        http_scheme = _HTTP_SCHEMES.get(proto.strip().lower())
        if http_scheme is None:
            raise ValueError(f"unsupported request scheme {proto!r}")
        netloc = _first(headers, "x-forwarded-host") or _first(headers, "host") or host
        if not _HOST_RE.fullmatch(netloc):
            raise ValueError(f"malformed host {netloc!r}")
        url = http_scheme + "://" + netloc + path
    query_text = query.decode("utf-8", "replace") if isinstance(query, bytes) else query
    return url + "?" + query_text if query_text else url


def stream_url(
    path: str = MEDIA_STREAM_PATH,
    *,
    configured: str | None,
    scheme: str,
    host: str,
    headers: HeaderSource,
) -> str:
    """The ``ws(s)://`` URL of the Media Streams route, for ``<Stream url>``.

    Same host resolution as :func:`public_url` (call it with the *webhook*
    request's values); ``https`` becomes ``wss`` and ``http`` becomes ``ws``.
    No query string: Twilio drops it.
    """
    return to_ws(public_url(path, configured=configured, scheme=scheme, host=host, headers=headers))


def upgrade_signature_url(
    path: str,
    *,
    configured: str | None,
    scheme: str,
    host: str,
    headers: HeaderSource,
    query: str | bytes = "",
) -> str:
    """The URL a Media Streams WebSocket upgrade's signature is computed over.

    That is the ``wss://`` URL from the TwiML, rebuilt from the upgrade
    request (a TLS terminator may show it to us as ``ws`` or ``https``).
    Validate with ``validate_signature(token, url, {}, signature)``: the
    upgrade is a GET with no body, so there are no parameters.
    """
    return to_ws(public_url(path, configured=configured, scheme=scheme, host=host, headers=headers, query=query))


def to_ws(http_url: str) -> str:
    """``http(s)://...`` as ``ws(s)://...``."""
    scheme, sep, rest = http_url.partition("://")
    return _WS_SCHEMES[scheme] + sep + rest


def on_this_network(url: str) -> bool:
    """True for a URL on this machine or a private network: not one Twilio's servers can call back."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: it may well resolve publicly
    return address.is_loopback or address.is_private or address.is_link_local or address.is_unspecified


def repeated_field(params: Mapping[str, Sequence[str]]) -> str | None:
    """Why a webhook's form is refused when a field comes more than once (else None).

    Twilio sends each field of its webhooks once.  A repeat is someone
    else's: the signature covers every value of a name, sorted, as
    name+value, so a captured request can be re-cut with a second
    ``CallSid`` (the end of ``ParentCallSid`` giving it its name) that the
    signature still covers while the server would read the other one.
    """
    for name, values in params.items():
        if len(values) > 1:
            return f"{shown(name, 40)} more than once: Twilio sends each field of a webhook once"
    return None


def configured_base(configured: str, name: str = "MEDIASERVER_PUBLIC_URL") -> SplitResult:
    """``configured`` split, if it is a base URL ``http(s)://host[:port][/prefix]``; else ValueError naming ``name``."""
    try:
        base = urlsplit(configured)
        _ = base.port  # raises ValueError on a malformed port
    except ValueError as exc:
        raise ValueError(f"{name} is malformed: {configured!r}") from exc
    if base.scheme not in ("http", "https") or not base.netloc:
        raise ValueError(f"{name} must be https://host[:port][/prefix], not {configured!r}")
    if base.query or base.fragment or "?" in configured or "#" in configured:
        raise ValueError(f"{name} must not have a query or fragment: {configured!r}")
    return base


def signature_bases(public_url: str | None, instance_url: str | None) -> tuple[str | None, ...]:
    """The configured bases Twilio may sign a request to us under: the public URL, and this instance's if set."""
    return (public_url,) if instance_url is None else (public_url, instance_url)


def signed_by_any(
    auth_token: str,
    bases: Sequence[str | None],
    url_for: Callable[[str | None], str],
    params: Mapping[str, str | Sequence[str]],
    signature: str | None,
) -> tuple[bool, str]:
    """Whether ``signature`` is Twilio's for the request's URL under any of ``bases``; and the URLs tried (for logs).

    ``bases`` are the configured URLs the request may have been sent to
    (``MEDIASERVER_PUBLIC_URL``, ``MEDIASERVER_INSTANCE_URL``; None: from the
    request's headers); ``url_for(base)`` rebuilds the URL Twilio signed
    (:func:`public_url` or :func:`upgrade_signature_url` with ``configured=base``).
    A base whose URL cannot be built (a malformed ``Host``) is skipped; if no
    URL can be built, the first :class:`ValueError` propagates (answer 400).
    """
    urls: list[str] = []
    error: ValueError | None = None
    for base in dict.fromkeys(bases):
        try:
            urls.append(url_for(base))
        except ValueError as exc:
            error = error or exc
    if not urls:
        assert error is not None
        raise error
    return any(validate_signature(auth_token, url, params, signature) for url in urls), " or ".join(urls)


def _first(headers: HeaderSource, lower_name: str) -> str | None:
    """First value of the first ``lower_name`` header, split on commas; None if absent/empty."""
    for name, value in headers.items():
        if name.lower() == lower_name:
            first = value.split(",", 1)[0].strip()
            return first or None
    return None
