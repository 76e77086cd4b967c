"""Tests for mediaserver.transport.listener and ws_server: which connections we serve, and how.

The router runs on a real loopback listener; the client side of every
WebSocket is wsproto (through our ClientWebSocket), so the server's frames
are checked by an independent RFC 6455 parser.  The last tests run the real
server: an upgrade on a kept-alive HTTP connection still reaches the ASGI
route (mediaserver.transport.twilio_ws) and is still signature-checked.
"""

from __future__ import annotations

import base64
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial

import h11
import pytest
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, TextMessage

from mediaserver.bridge.call import MessageStream, StreamClosed
from mediaserver.transport.listener import BAD_UPGRADE, HEAD_LIMIT, SEND_PIECE, ConnectionRouter, ReplayStream
from mediaserver.transport.ws_client import ClientWebSocket, WebSocketClosed, connect
from tests.fakes import fail_after, twilio_signature
from tests.test_app import AUTH_TOKEN, base_settings, running

MAX = 64 * 1024
TOKEN = "router-test-token"


class Recorder:
    """The two sides of the router: what reached Hypercorn's side, what reached the stream handler."""

    def __init__(self, stream_handler: Callable[[MessageStream], object] | None = None) -> None:
        self.other: list[bytes] = []  # every byte the "Hypercorn" side read, per connection
        self.streams = 0
        self.ended: list[str] = []
        self._stream_handler = stream_handler

    async def other_side(self, stream: ReplayStream) -> None:
        data = b""
        async with stream:
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(1024)
                if not chunk:
                    break
                data += chunk
            self.other.append(data)
            await stream.send_all(b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n")

    async def echo(self, stream: MessageStream) -> None:
        """Echo text messages until the peer goes; "bye" returns at once (the server then closes)."""
        self.streams += 1
        try:
            while True:
                message = await stream.receive()
                assert isinstance(message, str)
                if message == "bye":
                    self.ended.append("returned")
                    return
                if message == "boom":
                    raise RuntimeError("handler bug")
                await stream.send(message)
        except StreamClosed as exc:
            self.ended.append(str(exc))


@asynccontextmanager
async def router(rec: Recorder, *, auth_token: str | None = None, head_timeout_s: float = 5.0) -> AsyncIterator[int]:
    """A loopback listener served by a ConnectionRouter; yields its port."""
    route = ConnectionRouter(
        rec.other_side,
        rec.echo,
        path="/media-stream",
        auth_token=auth_token,
        public_url=None,
        max_message_size=MAX,
        head_timeout_s=head_timeout_s,
    )
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, route, 0, host="127.0.0.1"))
        yield listener.socket.getsockname()[1]
        nursery.cancel_scope.cancel()


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, return everything the server sends until it closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
        return received


@asynccontextmanager
async def ws(port: int, target: str = "/media-stream", headers: list[tuple[str, str]] | None = None) -> AsyncIterator[ClientWebSocket]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        yield await connect(stream, f"127.0.0.1:{port}", target, headers or [], max_message_size=1 << 20)


def upgrade_head(target: str, *extra: str, key: bool = True) -> bytes:
    lines = [f"GET {target} HTTP/1.1", "Host: 127.0.0.1", "Upgrade: websocket", "Connection: Upgrade"]
    lines += ["Sec-WebSocket-Version: 13"]
    if key:
        lines.append("Sec-WebSocket-Key: " + base64.b64encode(b"0123456789abcdef").decode())
    return ("\r\n".join([*lines, *extra]) + "\r\n\r\n").encode()


@fail_after(5)
async def test_a_media_stream_upgrade_is_served_here_with_frames_wsproto_accepts() -> None:
    rec = Recorder()
    async with router(rec) as port, ws(port, "/media-stream?x=1") as client:
        for size in (5, 200, MAX):  # UTF-8 bytes; each length encoding: 7-bit, 16-bit, 64-bit (at the limit)
            text = "é" * (size // 2) + "a" * (size % 2)
            await client.send(text)
            assert await client.receive() == text
        await client.send("bye")
        with pytest.raises(WebSocketClosed) as closed:
            await client.receive()
        assert closed.value.code == 1000
    assert rec.streams == 1 and rec.ended == ["returned"] and rec.other == []


@fail_after(5)
async def test_a_peer_that_closes_ends_the_handler_with_stream_closed() -> None:
    rec = Recorder()
    async with router(rec) as port:
        async with ws(port) as client:
            await client.send("hi")
            assert await client.receive() == "hi"
            with trio.fail_after(1):
                await client.aclose(1001)
        while not rec.ended:
            await trio.sleep(0.01)
    assert rec.ended == ["Twilio closed the stream (code 1001)"]


@fail_after(5)
async def test_an_oversize_message_is_refused_with_1009() -> None:
    rec = Recorder()
    async with router(rec) as port, ws(port) as client:
        await client.send("x" * (MAX + 1))
        with pytest.raises(WebSocketClosed) as closed:
            await client.receive()
        assert closed.value.code == 1009
        while not rec.ended:
            await trio.sleep(0.01)
    # we closed it, for Twilio's side breaking the protocol: the call ends with a protocol error, not a hang-up
    assert rec.ended == [f"the Twilio stream broke the WebSocket protocol (1009 MESSAGE_TOO_BIG message over {MAX} bytes)"]


@fail_after(5)
async def test_a_text_frame_that_is_not_utf8_closes_with_1007_as_a_protocol_violation() -> None:
    rec = Recorder()
    frame = bytes([0x81, 0x82, 0, 0, 0, 0, 0xFF, 0xFE])  # FIN text, masked (key 0), 2 bytes that are not UTF-8
    async with router(rec) as port:
        answer = await raw_exchange(port, upgrade_head("/media-stream") + frame)
        while not rec.ended:
            await trio.sleep(0.01)
    assert answer.partition(b"\r\n\r\n")[2][:4] == bytes([0x88, 0x02, 0x03, 0xEF])  # close, 1007
    [ended] = rec.ended
    assert ended.startswith("the Twilio stream broke the WebSocket protocol (1007 ")


@fail_after(5)
async def test_a_failing_handler_is_logged_and_the_socket_closed_with_1011(caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    async with router(rec) as port, ws(port) as client:
        await client.send("boom")
        with pytest.raises(WebSocketClosed) as closed:
            await client.receive()
        assert closed.value.code == 1011 and "internal error" in str(closed.value)
    assert any("the handler failed" in r.getMessage() for r in caplog.records)


@fail_after(5)
async def test_frames_sent_with_the_upgrade_request_are_the_streams_first_messages() -> None:
    # A client need not wait for the 101 (nothing in RFC 6455 forbids pipelining): the bytes read with the
    # head are the stream's, not lost with the handshake.
    rec = Recorder()
    client = Connection(ConnectionType.CLIENT)
    frames = client.send(TextMessage("first")) + client.send(TextMessage("second")) + client.send(TextMessage("bye"))
    async with router(rec) as port:
        answer = await raw_exchange(port, upgrade_head("/media-stream") + frames)
    head, _, rest = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    client.receive_data(rest)
    events = list(client.events())
    assert [e.data for e in events if isinstance(e, TextMessage)] == ["first", "second"]
    assert isinstance(events[-1], CloseConnection) and events[-1].code == 1000
    assert rec.streams == 1 and rec.ended == ["returned"]


@pytest.mark.parametrize(
    "head",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /twiml HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        upgrade_head("/media-stream/other"),  # another WebSocket path: the app's
        b"GET /media-stream HTTP/1.1\r\nHost: x\r\n\r\n",  # no upgrade
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * HEAD_LIMIT + b"\r\n\r\n",  # over our head limit
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
@fail_after(5)
async def test_everything_else_goes_to_hypercorn_with_every_byte_replayed(head: bytes) -> None:
    rec = Recorder()
    async with router(rec) as port:
        answer = await raw_exchange(port, head)
    assert answer.startswith(b"HTTP/1.1 204")
    assert rec.other == [head] and rec.streams == 0


@fail_after(5)
async def test_an_invalid_media_stream_handshake_is_answered_400_here_and_closed() -> None:
    """(Hypercorn answered it 400 too, then kept the connection open for as long as the client liked.)"""
    rec = Recorder()
    async with router(rec) as port:
        for head in (upgrade_head("/media-stream", key=False),
                     upgrade_head("/media-stream").replace(b"HTTP/1.1", b"HTTP/1.0", 1)):  # fmt: skip
            assert await raw_exchange(port, head) == BAD_UPGRADE
    assert rec.other == [] and rec.streams == 0


@fail_after(5)
async def test_a_slow_head_is_handed_over_after_the_timeout_and_a_silent_socket_is_closed() -> None:
    rec = Recorder()
    async with router(rec, head_timeout_s=0.2) as port:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /media-stream HTTP/1.1\r\n")
            await trio.sleep(0.4)  # the router gave up waiting and handed over what it had
            await stream.send_all(b"Host: x\r\n\r\n")
            assert (await stream.receive_some(1024)).startswith(b"HTTP/1.1 204")
        assert await raw_exchange(port, b"") == b""
    assert rec.other == [b"GET /media-stream HTTP/1.1\r\nHost: x\r\n\r\n"]


@fail_after(5)
async def test_the_upgrade_signature_is_checked_here() -> None:
    rec = Recorder()
    async with router(rec, auth_token=TOKEN) as port:
        url = f"ws://127.0.0.1:{port}/media-stream"
        forged = twilio_signature("another-token", url)
        answer = await raw_exchange(port, upgrade_head("/media-stream", f"X-Twilio-Signature: {forged}"))
        assert answer.startswith(b"HTTP/1.1 403 ") and answer.endswith(b"Forbidden")
        assert (await raw_exchange(port, upgrade_head("/media-stream"))).startswith(b"HTTP/1.1 403 ")
        good = twilio_signature(TOKEN, f"ws://127.0.0.1:{port}/media-stream")
        headers = [("X-Twilio-Signature", good)]
        async with ws(port, headers=headers) as client:
            await client.send("signed")
            assert await client.receive() == "signed"
    assert rec.streams == 1


async def _upgrade_after_a_request(url: str, extra: list[tuple[str, str]]) -> tuple[int, int]:
    """On one kept-alive connection: GET /healthz, then the Media Streams upgrade; both statuses."""
    host = url.removeprefix("http://")
    h, port = host.rsplit(":", 1)
    conn = h11.Connection(h11.CLIENT)
    stream = await trio.open_tcp_stream(h, int(port))
    statuses: list[int] = []

    async def response() -> int:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, (h11.InformationalResponse, h11.Response)):
                return int(event.status_code)

    async with stream:
        request = h11.Request(method="GET", target="/healthz", headers=[("Host", host)])
        await stream.send_all(conn.send(request) + conn.send(h11.EndOfMessage()))
        statuses.append(await response())
        while not isinstance(event := conn.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
        conn.start_next_cycle()
        upgrade = [
            ("Host", host),
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade"),
            ("Sec-WebSocket-Key", base64.b64encode(b"0123456789abcdef").decode()),
            ("Sec-WebSocket-Version", "13"),
            *extra,
        ]
        await stream.send_all(conn.send(h11.Request(method="GET", target="/media-stream", headers=upgrade)))
        statuses.append(await response())
    return statuses[0], statuses[1]


@fail_after(10)
async def test_an_upgrade_on_a_kept_alive_connection_still_reaches_the_asgi_route() -> None:
    async with running(base_settings()) as url:
        assert await _upgrade_after_a_request(url, []) == (200, 101)


@fail_after(10)
async def test_the_asgi_route_still_checks_the_signature() -> None:
    async with running(base_settings(twilio_auth_token=AUTH_TOKEN)) as url:
        ws_url = url.replace("http://", "ws://") + "/media-stream"
        forged = [("X-Twilio-Signature", twilio_signature("another-token", ws_url))]
        assert await _upgrade_after_a_request(url, forged) == (200, 403)
        good = [("X-Twilio-Signature", twilio_signature(AUTH_TOKEN, ws_url))]
        assert await _upgrade_after_a_request(url, good) == (200, 101)


@fail_after(10)
async def test_the_asgi_route_takes_a_signature_for_the_public_or_the_instance_url() -> None:
    settings = base_settings(
        twilio_auth_token=AUTH_TOKEN, public_url="https://voice.example.com", instance_url="https://voice.example.com/n1"
    )
    async with running(settings) as url:
        for signed, status in (
            ("wss://voice.example.com/n1/media-stream", 101),
            ("wss://voice.example.com/media-stream", 101),
            ("wss://voice.example.com/n2/media-stream", 403),
            (url.replace("http://", "ws://") + "/media-stream", 403),  # what we see is not what Twilio signed
        ):
            signature = [("X-Twilio-Signature", twilio_signature(AUTH_TOKEN, signed))]
            assert await _upgrade_after_a_request(url, signature) == (200, status), signed


async def test_a_replay_stream_returns_the_buffered_bytes_first_within_max_bytes() -> None:
    a, b = trio.socket.socketpair()
    ours, peer = trio.SocketStream(a), trio.SocketStream(b)
    async with ours, peer:
        replay = ReplayStream(ours, b"0123456789")
        assert replay.socket is ours.socket  # what Hypercorn reads the addresses from
        await peer.send_all(b"after")
        assert await replay.receive_some(4) == b"0123"
        assert await replay.receive_some() == b"456789"
        assert await replay.receive_some(100) == b"after"
        await replay.send_all(b"back")
        assert await peer.receive_some(10) == b"back"
        await replay.send_eof()
        assert await peer.receive_some(10) == b""


@fail_after(20)
async def test_a_long_answer_to_a_slow_but_reading_client_is_timed_by_its_pieces() -> None:
    """The watch's send limit is for a client that reads nothing: one that reads slowly makes progress on each
    piece (SEND_PIECE), so how long a send has waited never grows with the answer's length."""
    a, b = trio.socket.socketpair()
    for sock in (a, b):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    server, client = ReplayStream(trio.SocketStream(a), b""), trio.SocketStream(b)
    since: list[float] = []  # every sending_since_s seen while the send is under way
    answer = bytes(range(256)) * 2048  # 512 KiB: 8 pieces

    async def read_slowly() -> None:
        received = b""
        while len(received) < len(answer):
            received += await client.receive_some(32 * 1024)
            await trio.sleep(0.02)
        assert received == answer

    async def watch() -> None:
        while True:
            if server.sending_since_s is not None:
                since.append(server.sending_since_s)
            await trio.sleep(0.01)

    async with server, client, trio.open_nursery() as nursery:
        nursery.start_soon(read_slowly)
        nursery.start_soon(watch)
        started = trio.current_time()
        await server.send_all(answer)
        took = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert server.sending_since_s is None and server.active_s >= started + took - 0.05
    # The clock restarted with each piece (not once for the whole answer).  Counted, not timed: a stalled machine
    # stretches every wait alike, and a sample may miss a piece, but one start for the whole send is one value.
    assert took > 0.5 and len(set(since)) >= len(answer) // SEND_PIECE // 2, (took, sorted(set(since)))
