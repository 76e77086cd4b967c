"""One HTTP/1.1 request over Trio: the server's only HTTP client.

The server makes a few rare outbound HTTP requests (Twilio REST, the
ElevenLabs signed URL, ``mediaserver dial``'s webhook POST).  They all go
through :func:`request`:

* one request per connection (``Connection: close``): no pool, so nothing
  lingers between calls;
* h11 frames the exchange: a ``Content-Length`` request body; a
  ``Content-Length``, chunked or close-delimited response, at most
  ``max_response_bytes`` long;
* the whole exchange (DNS, connect, TLS, send, receive) runs under one
  deadline on Trio's clock, so tests can use ``MockClock``;
* every failure is an :class:`HttpError` whose one-line message names the
  host and port only -- never the query string (signed URLs carry tokens
  there), credentials in the URL, or header values;
* the socket is closed in ``finally``, whatever happens (cancellation too).

:func:`open_stream` is the connect step alone (TCP, or TLS with
``https_compatible``), for callers that speak another protocol over it.
"""

from __future__ import annotations

import os
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import h11
import trio

from mediaserver import __version__
from mediaserver._urls import redact
from mediaserver.transport.tls import client_context

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "USER_AGENT",
    "HttpError",
    "NoAnswer",
    "Response",
    "Url",
    "open_stream",
    "parse_url",
    "redact",
    "request",
]

DEFAULT_MAX_RESPONSE_BYTES = 1 << 20
USER_AGENT = f"mediaserver/{__version__}"
MAX_HEAD_BYTES = 64 * 1024  # status line + headers
RECEIVE_BYTES = 65536
# Framing is ours: a caller's value would contradict what h11 writes.
_RESERVED_HEADERS = frozenset({"host", "connection", "content-length", "transfer-encoding"})


class HttpError(Exception):
    """The exchange failed: bad URL, DNS, connect, TLS, timeout, or a malformed or oversized answer.

    ``str()`` is one line, fit for a user, and free of secrets.  An answer
    with an error status is not an :class:`HttpError`: it is a
    :class:`Response` for the caller to judge.
    """


class NoAnswer(HttpError):
    """The request went out and no whole answer came (in time, or before the connection broke or closed):
    the server may have acted on it."""


@dataclass(frozen=True, slots=True)
class Response:
    """A complete answer: status, headers (lower-case names), body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    @property
    def ok(self) -> bool:
        """A 2xx status."""
        return 200 <= self.status < 300

    def header(self, name: str, default: str = "") -> str:
        """The value of header ``name`` (any case); repeated fields are joined with ``", "``."""
        return self.headers.get(name.lower(), default)

    def text(self) -> str:
        """The body as UTF-8, undecodable bytes replaced."""
        return self.body.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Url:
    """An ``http(s)://`` URL split into what a request needs."""

    tls: bool
    host: str
    port: int
    where: str  # host[:port] as written, without credentials: the Host header and error messages
    target: str  # path?query: the request line


def parse_url(url: str) -> Url:
    """Split an absolute ``http://`` or ``https://`` URL; :class:`HttpError` if it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise HttpError(f"bad URL {redact(url)!r}: the host or port is malformed") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(f"not an http(s) URL: {redact(url)!r}")
    tls = parts.scheme == "https"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Url(tls, parts.hostname, port or (443 if tls else 80), parts.netloc.rpartition("@")[2], target)


async def open_stream(
    host: str, port: int, *, tls: bool, ssl_context: ssl.SSLContext | None = None
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    """A TCP stream to ``host:port``, or TLS over it (verified with ``ssl_context``, default: the system CAs).

    TLS is ``https_compatible``: a peer that closes without ``close_notify``
    is not an error, as in every HTTPS client.  The handshake happens on the
    first send or receive.
    """
    if tls:
        context = ssl_context or client_context()  # (made once: loading the CAs would stall every call)
        return await trio.open_ssl_over_tcp_stream(host, port, ssl_context=context, https_compatible=True)
    return await trio.open_tcp_stream(host, port)


async def request(
    method: str,
    url: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    timeout_s: float,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ssl_context: ssl.SSLContext | None = None,
) -> Response:
    """Send one request on a fresh connection and return the whole answer, any status.

    ``headers`` may not set ``Host``, ``Connection``, ``Content-Length`` or
    ``Transfer-Encoding`` (:class:`ValueError`): those are written here.  A
    ``User-Agent`` replaces :data:`USER_AGENT`.  Raises :class:`HttpError`
    for a bad URL, a DNS, connect or TLS failure, no complete answer within
    ``timeout_s``, a malformed answer, or one over ``max_response_bytes``.
    """
    where = parse_url(url)
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
    wire = _encode(conn, method, where, headers, body)
    exchange = _Exchange(conn, where.where, max_response_bytes)
    connected = sent = False
    try:
        with trio.fail_after(timeout_s):
            stream = await open_stream(where.host, where.port, tls=where.tls, ssl_context=ssl_context)
            connected = True
            try:
                await stream.send_all(wire)
                sent = True
                return await exchange.read(stream)
            finally:
                await trio.aclose_forcefully(stream)
    except trio.TooSlowError:
        if not connected:  # (the request never went out)
            raise HttpError(f"cannot reach {where.where}: no connection within {timeout_s:g} s") from None
        raise NoAnswer(f"no answer from {where.where} within {timeout_s:g} s") from None
    except h11.RemoteProtocolError as exc:
        if exchange.eof:  # (after the whole request went out: the server may have acted on it)
            raise NoAnswer(f"{where.where} closed the connection before the response ended") from None
        raise HttpError(f"malformed HTTP response from {where.where}: {str(exc)[:120]}") from None
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, ssl.SSLError):
            broke = f"TLS with {where.where} failed: {_tls_reason(exc.__cause__)}"
        else:
            broke = f"the connection to {where.where} broke: {_os_reason(exc.__cause__ or exc)}"
        # (once the whole request went out, the server may have acted on it: no answer, not a refusal)
        raise (NoAnswer(f"{broke} (after the request went out)") if sent else HttpError(broke)) from None
    except ssl.SSLError as exc:
        broke = f"TLS with {where.where} failed: {_tls_reason(exc)}"
        raise (NoAnswer(f"{broke} (after the request went out)") if sent else HttpError(broke)) from None
    except socket.gaierror as exc:
        raise HttpError(f"cannot resolve {where.host}: {exc.strerror or exc}") from None
    except OSError as exc:
        raise HttpError(f"cannot reach {where.where}: {_os_reason(exc)}") from None


def _encode(conn: h11.Connection, method: str, where: Url, headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    """The request's bytes; :class:`HttpError` (naming no value) if HTTP cannot carry them."""
    for name, _ in headers:
        if name.lower() in _RESERVED_HEADERS:
            raise ValueError(f"header {name!r} is written by request() itself")
    own = [("Host", where.where), ("Connection", "close")]
    if not any(name.lower() == "user-agent" for name, _ in headers):
        own.append(("User-Agent", USER_AGENT))
    if body or method.upper() in ("POST", "PUT", "PATCH"):
        own.append(("Content-Length", str(len(body))))
    try:
        head = conn.send(h11.Request(method=method, target=where.target, headers=[*own, *headers]))
        data = conn.send(h11.Data(data=body)) if body else b""
        return (head or b"") + (data or b"") + (conn.send(h11.EndOfMessage()) or b"")
    except (h11.LocalProtocolError, UnicodeEncodeError):
        # h11's own message would quote the offending header value, which may be a secret.
        raise HttpError(
            f"cannot send this request to {where.where}: "
            "its method, path or a header has characters HTTP does not allow"
        ) from None


class _Exchange:
    """Reads one response off ``conn`` with a size limit; remembers whether the peer has closed."""

    def __init__(self, conn: h11.Connection, where: str, limit: int) -> None:
        self.conn = conn
        self.where = where
        self.limit = limit
        self.eof = False

    async def read(self, stream: trio.abc.Stream) -> Response:
        status = 0
        headers: dict[str, str] = {}
        body = bytearray()
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(RECEIVE_BYTES)
                self.eof = not data
                self.conn.receive_data(bytes(data))
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = _headers(event.headers)
                declared = headers.get("content-length", "")
                if declared.isdigit() and int(declared) > self.limit:
                    raise self._too_large()
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limit:
                    raise self._too_large()
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpError(f"{self.where} closed the connection before the response ended")
            # h11.InformationalResponse (100 Continue, ...): the final answer follows.

    def _too_large(self) -> HttpError:
        return HttpError(f"the response from {self.where} is larger than {self.limit} bytes")


def _headers(raw: Sequence[tuple[bytes, bytes]]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    return headers


def _os_reason(exc: BaseException) -> str:
    """``Connection refused`` rather than ``all attempts to connect to ... failed``."""
    group = exc.__cause__
    if isinstance(group, BaseExceptionGroup) and group.exceptions:
        exc = group.exceptions[0]
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)  # trio's strerror repeats the address: "Error connecting to (...): ..."
    return str(exc) or type(exc).__name__


def _tls_reason(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    return exc.reason or exc.strerror or str(exc)
