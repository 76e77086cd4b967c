"""mediaserver.transport.http against loopback servers that misbehave on purpose.

Each server reads the client's request with an independent h11 *server*
connection (so what we send must be valid HTTP/1.1 to a real parser), records
it, then writes raw bytes: well-formed answers in every framing, or broken
ones (garbage, closed mid-body, silence, too big).  The TLS server uses a
self-signed certificate made here with ``cryptography``.  Loopback only,
port 0; the one DNS test swaps Trio's hostname resolver, so nothing leaves
the machine.
"""

from __future__ import annotations

import socket
import struct
import ssl
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import h11
import pytest
import trio
import trio.testing

from mediaserver.transport.http import USER_AGENT, HttpError, NoAnswer, Response, parse_url, redact, request
from mediaserver.transport.tls import client_context

from tests.fakes import fail_after

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ helpers
from tls_send import make_certificate  # noqa: E402

SECRET = "s3cr3t-token"


@dataclass
class Seen:
    """What one server connection received: the request as h11 parsed it, and whether the client hung up."""

    method: str = ""
    target: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    closed_by_client: trio.Event = field(default_factory=trio.Event)

    def header(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]


Reply = Callable[[trio.abc.Stream], Awaitable[None]]


async def read_request(stream: trio.abc.Stream, seen: Seen) -> None:
    conn = h11.Connection(h11.SERVER)
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(65536)))
        elif isinstance(event, h11.Request):
            seen.method, seen.target = event.method.decode(), event.target.decode()
            seen.headers = [(k.decode(), v.decode()) for k, v in event.headers]
        elif isinstance(event, h11.Data):
            seen.body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return
        else:
            raise AssertionError(f"unexpected {event!r}")


async def wait_for_hangup(stream: trio.abc.Stream, seen: Seen) -> None:
    """Read until the client closes its end (EOF or reset), then note it."""
    try:
        while await stream.receive_some(65536):
            pass
    except trio.BrokenResourceError:
        pass
    seen.closed_by_client.set()


async def until_hangup(stream: trio.abc.Stream) -> None:
    """A server that never answers but notices when the client goes away."""
    while await stream.receive_some(65536):
        pass


@dataclass
class Server:
    url: str
    port: int
    seen: list[Seen]


@asynccontextmanager
async def serving(reply: Reply, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    """A loopback server: each connection's request is recorded, then ``reply`` writes the answer."""
    seen: list[Seen] = []

    async def handle(stream: trio.abc.Stream) -> None:
        record = Seen()
        seen.append(record)
        try:
            await read_request(stream, record)
            await reply(stream)
            await wait_for_hangup(stream, record)
        except trio.BrokenResourceError:
            record.closed_by_client.set()
        except trio.ClosedResourceError:
            pass  # ``reply`` closed the connection itself

    async with trio.open_nursery() as nursery:
        if tls is None:
            listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        else:
            listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, handle, 0, tls, host="127.0.0.1"))
        sock = listeners[0].socket if tls is None else listeners[0].transport_listener.socket
        port = sock.getsockname()[1]
        yield Server(f"{'https' if tls else 'http'}://127.0.0.1:{port}", port, seen)
        nursery.cancel_scope.cancel()


def raw(data: bytes, *, close: bool = False) -> Reply:
    async def reply(stream: trio.abc.Stream) -> None:
        await stream.send_all(data)
        if close:
            await stream.aclose()

    return reply


def trickle(data: bytes) -> Reply:
    """Send one byte at a time, to exercise incremental parsing."""

    async def reply(stream: trio.abc.Stream) -> None:
        for i in range(len(data)):
            await stream.send_all(data[i : i + 1])

    return reply


def answer(status: int, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()) -> Reply:
    lines = [f"HTTP/1.1 {status} Whatever", f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers)]
    return raw(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------ what is sent


@fail_after(10)
async def test_get_sends_a_valid_request_and_returns_the_answer() -> None:
    reply = answer(200, b'{"ok": true}', [("Content-Type", "application/json"), ("X-Twice", "a"), ("x-twice", "b")])
    async with serving(reply) as server:
        response = await request("GET", f"{server.url}/v1/thing?agent_id=a%201&x=2", timeout_s=5)
        [seen] = server.seen
        with trio.fail_after(5):
            await seen.closed_by_client.wait()  # the socket was closed, not leaked
    assert response == Response(200, {"content-length": "12", "content-type": "application/json", "x-twice": "a, b"},
                                b'{"ok": true}')  # fmt: skip
    assert response.ok and response.header("Content-Type") == "application/json" and response.header("nope") == ""
    assert (seen.method, seen.target, seen.body) == ("GET", "/v1/thing?agent_id=a%201&x=2", b"")
    assert seen.header("host") == [f"127.0.0.1:{server.port}"]
    assert seen.header("connection") == ["close"]
    assert seen.header("user-agent") == [USER_AGENT]
    assert seen.header("content-length") == []  # a GET without a body has no framing header


@fail_after(10)
async def test_post_body_and_caller_headers_arrive_intact() -> None:
    body = "To=%2B15551234567&Greeting=h%C3%A9llo".encode() * 500  # bigger than one segment
    headers = [("Authorization", "Basic abc="), ("User-Agent", "custom/1"), ("Content-Type", "text/plain")]
    async with serving(answer(201, b"made")) as server:
        response = await request("POST", server.url + "/calls", headers=headers, body=body, timeout_s=5)
    [seen] = server.seen
    assert (response.status, response.body, response.ok) == (201, b"made", True)
    assert (seen.method, seen.target, seen.body) == ("POST", "/calls", body)
    assert seen.header("content-length") == [str(len(body))]
    assert seen.header("user-agent") == ["custom/1"]  # replaces the default, not added to it
    assert seen.header("authorization") == ["Basic abc="] and seen.header("content-type") == ["text/plain"]


@fail_after(10)
async def test_empty_post_says_content_length_zero() -> None:
    async with serving(answer(204)) as server:
        response = await request("POST", server.url, timeout_s=5)
    assert (response.status, response.body, response.ok) == (204, b"", True)
    assert server.seen[0].target == "/" and server.seen[0].header("content-length") == ["0"]


@pytest.mark.parametrize("status", [301, 400, 401, 404, 429, 500, 503])
@fail_after(10)
async def test_error_statuses_are_answers_not_exceptions(status: int) -> None:
    async with serving(answer(status, b'{"code": 20003}')) as server:
        response = await request("GET", server.url, timeout_s=5)
    assert (response.status, response.body, response.ok) == (status, b'{"code": 20003}', False)


def test_reserved_headers_are_refused() -> None:
    for name in ("Host", "content-length", "Transfer-Encoding", "Connection"):
        with pytest.raises(ValueError, match="is written by request"):
            trio.run(partial(request, "GET", "http://127.0.0.1:9/", headers=[(name, "x")], timeout_s=1))


def test_a_header_http_cannot_carry_is_an_error_that_does_not_quote_it() -> None:
    for value in (f"{SECRET}\r\nX-Evil: 1", f"{SECRET}é"):
        with pytest.raises(HttpError, match="characters HTTP does not allow") as info:
            trio.run(partial(request, "GET", "http://127.0.0.1:9/", headers=[("xi-api-key", value)], timeout_s=1))
        assert SECRET not in str(info.value)


# ------------------------------------------------------------------- framings


@fail_after(10)
async def test_chunked_response_in_one_byte_pieces() -> None:
    wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/xml\r\n\r\n"
            b"5\r\n<Resp\r\n8;ext=1\r\nonse></R\r\n7\r\nesponse\r\n1\r\n>\r\n0\r\nX-Trailer: t\r\n\r\n")  # fmt: skip
    async with serving(trickle(wire)) as server:
        response = await request("GET", server.url, timeout_s=5)
    assert (response.status, response.body) == (200, b"<Response></Response>")
    assert response.header("transfer-encoding") == "chunked" and response.text() == "<Response></Response>"


@fail_after(10)
async def test_close_delimited_body_and_informational_responses() -> None:
    wire = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end \xff"
    async with serving(raw(wire, close=True)) as server:
        response = await request("POST", server.url, body=b"x", timeout_s=5)
    assert (response.status, response.body) == (200, b"until the end \xff")
    assert response.text() == "until the end \ufffd"


# ------------------------------------------------------------------ size limit


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n",  # declared too big: refused before the body
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n40\r\n" + b"a" * 64 + b"\r\n40\r\n" + b"b" * 64,
        b"HTTP/1.1 200 OK\r\n\r\n" + b"c" * 4096,  # close-delimited, never closed: the limit ends it
    ],
)
@fail_after(10)
async def test_response_size_limit(wire: bytes) -> None:
    async with serving(raw(wire)) as server:
        too_large = rf"^the response from 127\.0\.0\.1:{server.port} is larger than 100 bytes$"
        with pytest.raises(HttpError, match=too_large):
            await request("GET", server.url, timeout_s=5, max_response_bytes=100)
        with trio.fail_after(5):
            await server.seen[0].closed_by_client.wait()


@fail_after(10)
async def test_a_body_exactly_at_the_limit_is_fine() -> None:
    async with serving(answer(200, b"d" * 100)) as server:
        response = await request("GET", server.url, timeout_s=5, max_response_bytes=100)
    assert response.body == b"d" * 100


# -------------------------------------------------------------------- failures


@fail_after(10)
async def test_refused_port() -> None:
    port = closed_port()
    with pytest.raises(HttpError, match=rf"^cannot reach 127\.0\.0\.1:{port}: Connection refused$"):
        await request("GET", f"http://127.0.0.1:{port}/x", timeout_s=5)


@fail_after(100)
async def test_timeout_closes_the_socket(autojump_clock: trio.testing.MockClock) -> None:
    async with serving(until_hangup) as server:
        started = trio.current_time()
        with pytest.raises(HttpError, match=rf"^no answer from 127\.0\.0\.1:{server.port} within 30 s$"):
            await request("GET", server.url, timeout_s=30)
        assert trio.current_time() - started == pytest.approx(30)
        [seen] = server.seen
        await seen.closed_by_client.wait()
    assert seen.method == "GET"


@fail_after(10)
async def test_cancelling_a_request_closes_the_socket() -> None:
    async with serving(until_hangup) as server:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(request, "GET", server.url, timeout_s=60))
            while not server.seen or not server.seen[0].method:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
        with trio.fail_after(5):
            await server.seen[0].closed_by_client.wait()


@pytest.mark.parametrize(
    ("wire", "message", "uncertain"),
    [
        # (the request went out whole and the connection closed: the server may have acted on it)
        (b"", "closed the connection before the response ended", True),  # accepted, read, closed
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", "closed the connection before the response", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc", "closed the connection before the response", True),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "malformed HTTP response from", False),
        (b"HTTP/1.1 2xx OK\r\n\r\n", "malformed HTTP response from", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef", "malformed HTTP response from", False),
    ],
)
@fail_after(10)
async def test_broken_answers(wire: bytes, message: str, uncertain: bool) -> None:
    async with serving(raw(wire, close=True)) as server:
        with pytest.raises(HttpError) as info:
            await request("GET", server.url, timeout_s=5)
    assert isinstance(info.value, NoAnswer) is uncertain
    assert message in str(info.value) and f"127.0.0.1:{server.port}" in str(info.value)
    assert "\n" not in str(info.value)


@fail_after(10)
async def test_a_reset_after_the_request_went_out_is_no_answer_not_a_refusal() -> None:
    """The server read the request and reset the connection: it may have acted on it (placed the call)."""

    async def reset(stream: trio.abc.Stream) -> None:
        assert isinstance(stream, trio.SocketStream)
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        await stream.aclose()

    async with serving(reset) as server:
        with pytest.raises(NoAnswer, match=r"the connection to 127\.0\.0\.1:\d+ broke: .*\(after the request went out\)"):
            await request("POST", server.url, body=b"To=%2B15551234567", timeout_s=5)


@fail_after(10)
async def test_huge_header_block_is_malformed() -> None:
    wire = b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"h" * 100_000  # and more to come: the head never ends
    async with serving(raw(wire)) as server:
        with pytest.raises(HttpError, match="^malformed HTTP response from"):
            await request("GET", server.url, timeout_s=5)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://user:pw@example.com/x?token=" + SECRET, "not an http(s) URL: 'ftp://example.com/x'"),
        ("http:///path?token=" + SECRET, "not an http(s) URL: 'http:///path'"),
        ("127.0.0.1:8080/x", "not an http(s) URL"),
        ("http://127.0.0.1:99999/x?token=" + SECRET, "bad URL 'http://127.0.0.1:99999/x': the host or port is"),
        ("http://[::1/x", "bad URL"),
    ],
)
async def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(HttpError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as info:
        await request("GET", url, timeout_s=1)
    assert SECRET not in str(info.value) and "pw" not in str(info.value)


@fail_after(10)
async def test_credentials_and_query_never_reach_messages_or_the_host_header() -> None:
    port = closed_port()
    with pytest.raises(HttpError) as info:
        await request("GET", f"http://user:{SECRET}@127.0.0.1:{port}/p?token={SECRET}", timeout_s=5)
    assert SECRET not in str(info.value) and str(info.value).startswith(f"cannot reach 127.0.0.1:{port}:")
    async with serving(answer(200)) as server:
        await request("GET", f"http://user:{SECRET}@127.0.0.1:{server.port}/p", timeout_s=5)
    assert server.seen[0].header("host") == [f"127.0.0.1:{server.port}"]


@fail_after(10)
async def test_dns_failure() -> None:
    class NoSuchHost(trio.abc.HostnameResolver):
        async def getaddrinfo(self, *args: Any, **kwargs: Any) -> Any:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

        async def getnameinfo(self, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError("not used")

    previous = trio.socket.set_custom_hostname_resolver(NoSuchHost())
    try:
        with pytest.raises(HttpError, match=r"^cannot resolve api\.example\.test: Name or service not known$"):
            await request("GET", "https://api.example.test/v1?key=x", timeout_s=5)
    finally:
        trio.socket.set_custom_hostname_resolver(previous)


def test_parse_url_and_redact() -> None:
    url = parse_url("https://u:p@Host.example:8443/a/b?q=1#frag")
    assert (url.tls, url.host, url.port) == (True, "host.example", 8443)
    assert (url.where, url.target) == ("Host.example:8443", "/a/b?q=1")
    assert parse_url("http://h").port == 80 and parse_url("http://h").target == "/"
    assert parse_url("https://h").port == 443
    assert redact("https://u:p@h:1/a?token=x#f") == "https://h:1/a"


# ------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (cert.pem, key.pem); the benches' maker (bench/tls_send.py)."""
    return make_certificate(tmp_path_factory.mktemp("tls"))


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


@fail_after(10)
async def test_https_with_a_trusted_certificate(certificate: tuple[Path, Path]) -> None:
    trust = ssl.create_default_context(cafile=str(certificate[0]))
    reply = raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    async with serving(reply, tls=server_context(certificate)) as server:
        response = await request("POST", server.url + "/secure", body=b"hi", timeout_s=5, ssl_context=trust)
        with trio.fail_after(5):
            await server.seen[0].closed_by_client.wait()
    assert (response.status, response.body) == (200, b"abc")
    assert (server.seen[0].target, server.seen[0].body) == ("/secure", b"hi")


@fail_after(10)
async def test_https_with_an_untrusted_certificate(certificate: tuple[Path, Path]) -> None:
    async with serving(answer(200), tls=server_context(certificate)) as server:
        untrusted = rf"^TLS with 127\.0\.0\.1:{server.port} failed: certificate verify failed: "
        with pytest.raises(HttpError, match=untrusted):
            await request("GET", server.url, timeout_s=5)


@fail_after(10)
async def test_https_default_context_is_made_once_per_ca_setting(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Loading the system CAs takes tens of ms in the event loop: not at every REST request or model connection.
    first = client_context()
    assert client_context() is first
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))  # a deployment's own CA (and the tests')
    ours = client_context()
    assert ours is not first and client_context() is ours
    async with serving(answer(200), tls=server_context(certificate)) as server:
        assert (await request("GET", server.url, timeout_s=5)).status == 200  # the default context trusts it now


@fail_after(10)
async def test_https_to_a_plain_http_server() -> None:
    async def handle(stream: trio.abc.Stream) -> None:
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with pytest.raises(HttpError, match=rf"^TLS with 127\.0\.0\.1:{port} failed: "):
            await request("GET", f"https://127.0.0.1:{port}/", timeout_s=5)
        nursery.cancel_scope.cancel()


@fail_after(10)
async def test_a_connect_that_never_completes_is_not_reported_as_a_request_without_answer() -> None:
    """A black-holed host: the request never went out (callers tell the two apart, e.g. mediaserver call)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # never accepted: once its queue is full, further SYNs are dropped
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            with pytest.raises(HttpError, match=rf"^cannot reach 127\.0\.0\.1:{port}: no connection within 0\.5 s$"):
                await request("GET", f"http://127.0.0.1:{port}/x", timeout_s=0.5)
        finally:
            for filler in fillers:
                filler.close()
