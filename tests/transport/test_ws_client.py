"""mediaserver.transport.ws_client against an independent WebSocket server (trio-websocket) on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Message, Request, TextMessage

from mediaserver.transport.ws_client import ClientWebSocket, HandshakeRejected, WebSocketClosed, connect, data_frame

from tests.fakes import fail_after

Handler = Callable[[WebSocketRequest], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        listener = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        yield listener.port
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def client(port: int, *, max_message_size: int = 1 << 20) -> AsyncIterator[ClientWebSocket]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        ws = await connect(stream, f"127.0.0.1:{port}", "/v1/x?model=m", [("Authorization", "Bearer k")],
                           max_message_size=max_message_size)
        yield ws
    finally:
        await trio.aclose_forcefully(stream)


@fail_after(5)
async def test_messages_both_ways_with_headers_and_the_close_handshake() -> None:
    seen: dict[str, object] = {}
    closed = trio.Event()

    async def echo(request: WebSocketRequest) -> None:
        seen["path"] = request.path
        seen["auth"] = dict((k.decode().lower(), v.decode()) for k, v in request.headers).get("authorization")
        ws = await request.accept()
        try:
            while True:
                message = await ws.get_message()
                await ws.send_message(message)
        except ConnectionClosed as exc:
            seen["close"] = exc.reason.code if exc.reason else None
            closed.set()

    async with server(echo) as port, client(port) as ws:
        await ws.send("héllo")
        await ws.send(b"\x00\x01\xff")
        big = "x" * 200_000  # several TCP reads
        await ws.send(big)
        assert await ws.receive() == "héllo"
        assert await ws.receive() == b"\x00\x01\xff"
        assert await ws.receive() == big
        with trio.fail_after(1):
            await ws.aclose()
        await closed.wait()
        with pytest.raises(WebSocketClosed):
            await ws.send("late")
    assert seen == {"path": "/v1/x?model=m", "auth": "Bearer k", "close": 1000}


@fail_after(5)
async def test_sends_from_many_tasks_arrive_whole() -> None:
    got: list[str] = []
    done = trio.Event()

    async def collect(request: WebSocketRequest) -> None:
        ws = await request.accept()
        while len(got) < 300:
            got.append(str(await ws.get_message()))
        done.set()
        await ws.aclose()

    async with server(collect) as port, client(port) as ws, trio.open_nursery() as nursery:
        for task in range(3):
            async def sender(task: int = task) -> None:
                for i in range(100):
                    await ws.send(f"{task}:{i}:" + "y" * 5000)
            nursery.start_soon(sender)
        await done.wait()
    assert sorted(got) == sorted(f"{t}:{i}:" + "y" * 5000 for t in range(3) for i in range(100))
    for task in range(3):  # each sender's messages in its order
        mine = [int(m.split(":")[1]) for m in got if m.startswith(f"{task}:")]
        assert mine == list(range(100))


@fail_after(5)
async def test_server_close_code_and_reason_are_reported() -> None:
    async def close_it(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message("last words")
        await ws.aclose(1011, "internal error")

    async with server(close_it) as port, client(port) as ws:
        assert await ws.receive() == "last words"
        with pytest.raises(WebSocketClosed) as info:
            await ws.receive()
        assert (info.value.code, info.value.reason) == (1011, "internal error")
        assert str(info.value) == "1011 INTERNAL_ERROR internal error"
        with pytest.raises(WebSocketClosed):
            await ws.send("after the close")
        with trio.fail_after(1):
            await ws.aclose()  # nothing left to do


@fail_after(5)
async def test_pings_are_answered_while_receiving() -> None:
    pong = trio.Event()

    async def ping(request: WebSocketRequest) -> None:
        ws: WebSocketConnection = await request.accept()
        await ws.ping(b"are you there")  # returns once the matching pong has arrived
        pong.set()
        await ws.send_message("done")
        await trio.sleep_forever()

    async with server(ping) as port, client(port) as ws:
        assert await ws.receive() == "done"
        assert pong.is_set()


@fail_after(5)
async def test_a_dropped_connection_is_an_abnormal_closure() -> None:
    async def drop(stream: trio.SocketStream) -> None:  # wsproto's server side, then a TCP close
        server_ws = WSConnection(ConnectionType.SERVER)
        while True:
            server_ws.receive_data(await stream.receive_some(4096))
            requests = [e for e in server_ws.events() if isinstance(e, Request)]
            if requests:
                break
        await stream.send_all(server_ws.send(AcceptConnection()) + server_ws.send(TextMessage("bye")))
        await stream.aclose()  # no close frame

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, drop, 0, host="127.0.0.1"))
        async with client(listener.socket.getsockname()[1]) as ws:
            assert await ws.receive() == "bye"
            with pytest.raises(WebSocketClosed) as info:
                await ws.receive()
            assert info.value.code == 1006
            with trio.fail_after(1):
                await ws.aclose()
        nursery.cancel_scope.cancel()


@fail_after(5)
async def test_oversize_messages_are_refused_with_1009() -> None:
    code: list[int | None] = []

    async def big(request: WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.send_message("small")
        await ws.send_message("z" * 5000)
        try:
            await ws.get_message()
        except ConnectionClosed as exc:
            code.append(exc.reason.code if exc.reason else None)

    async with server(big) as port, client(port, max_message_size=4096) as ws:
        assert await ws.receive() == "small"
        with pytest.raises(WebSocketClosed) as info:
            await ws.receive()
        assert info.value.code == 1009
        with trio.fail_after(1):
            await ws.aclose()
    assert code == [1009]


@fail_after(5)
async def test_a_refused_upgrade_reports_the_http_status() -> None:
    async def refuse(request: WebSocketRequest) -> None:
        await request.reject(401, body=b"no key")

    async with server(refuse) as port:
        with pytest.raises(HandshakeRejected) as info:
            async with client(port):
                pass
        assert info.value.status_code == 401
        assert info.value.body == b"no key" and info.value.reason == "no key"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"error": {"message": "Incorrect API key provided: sk-ab***cd.", "type": "invalid_request_error"}}',
         "Incorrect API key provided: sk-ab***cd."),
        (b'{"message": "model not found"}', "model not found"),
        (b'{"error": "Unauthorized"}', "Unauthorized"),
        (b'{"detail": "bad token"}', "bad token"),
        (b"<html>\n<body>Forbidden</body>\n</html>", "<html> <body>Forbidden</body> </html>"),
        (b"", ""),
        (b"x" * 5000, "x" * 300),
    ],
)
@fail_after(5)
async def test_a_refused_upgrade_keeps_why_from_its_body(body: bytes, reason: str) -> None:
    async def refuse(request: WebSocketRequest) -> None:
        await request.reject(403, body=body)

    async with server(refuse) as port:
        with pytest.raises(HandshakeRejected) as info:
            async with client(port):
                pass
    assert info.value.status_code == 403
    assert info.value.body == body[:1024]
    assert info.value.reason == reason


@fail_after(5)
async def test_a_peer_that_is_not_websocket_is_a_closed_connection() -> None:
    async def hang_up(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, hang_up, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with pytest.raises(WebSocketClosed) as info:
            await connect(stream, "h", "/", max_message_size=1024)
        assert info.value.code == 1006
        await stream.aclose()
        nursery.cancel_scope.cancel()


@fail_after(5)
async def test_a_refusal_whose_body_never_comes_is_reported_after_a_second() -> None:
    async def refuse_slowly(stream: trio.SocketStream) -> None:
        await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 429 Too Many Requests\r\nContent-Length: 100\r\n\r\nslow down")
        await trio.sleep_forever()  # the other 91 bytes never come

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, refuse_slowly, 0, host="127.0.0.1"))
        stream = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
        start = trio.current_time()
        with pytest.raises(HandshakeRejected) as info:
            await connect(stream, "h", "/", max_message_size=1024)
        assert 0.9 <= trio.current_time() - start < 3.0  # REJECT_BODY_WAIT_S, not the caller's whole deadline
        assert (info.value.status_code, info.value.reason) == (429, "slow down")
        await stream.aclose()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70001])
@pytest.mark.parametrize("kind", ["text", "bytes"])
def test_data_frames_decode_as_the_same_message_in_wsproto(size: int, kind: str) -> None:
    client_ws, server_ws = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server_ws.receive_data(client_ws.send(Request(host="h", target="/")))
    list(server_ws.events())
    client_ws.receive_data(server_ws.send(AcceptConnection()))
    list(client_ws.events())
    message: str | bytes = ("é" * size)[:size] if kind == "text" else bytes(i % 251 for i in range(size))
    frame = data_frame(message)
    assert frame[1] & 0x80  # masked, as a client must
    server_ws.receive_data(frame)
    [event] = server_ws.events()
    assert isinstance(event, Message) and event.message_finished
    assert isinstance(event, TextMessage if kind == "text" else BytesMessage)
    assert event.data == message
    assert data_frame(message) != frame  # a fresh random mask key each time


@pytest.mark.parametrize("read", ["receive", "read_nowait"])
@fail_after(5)
async def test_what_the_peer_sent_before_it_went_is_read_after_a_send_failed(read: str) -> None:
    """A model that streams its goodbye, closes (1000) and drops the socket: our next send fails, the goodbye is read."""
    gone = trio.Event()

    async def goodbye(stream: trio.SocketStream) -> None:
        server_ws = WSConnection(ConnectionType.SERVER)
        while True:
            server_ws.receive_data(await stream.receive_some(4096))
            if any(isinstance(e, Request) for e in server_ws.events()):
                break
        await stream.send_all(server_ws.send(AcceptConnection()))
        await trio.sleep(0.05)  # (after the handshake, not read with it)
        await stream.send_all(
            server_ws.send(TextMessage("goodbye 1"))
            + server_ws.send(TextMessage("goodbye 2"))
            + server_ws.send(CloseConnection(1000, "session over"))
        )
        await stream.aclose()  # without waiting for our close reply: what we send next is answered with a reset
        gone.set()

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, goodbye, 0, host="127.0.0.1"))
        async with client(listener.socket.getsockname()[1]) as ws:
            await gone.wait()
            with pytest.raises(WebSocketClosed) as failed:
                for _ in range(100):  # the first send may still be taken; the reset makes a later one fail
                    if read == "read_nowait":
                        ws.send_many_nowait(["audio"])
                    else:
                        await ws.send("audio")
                    await trio.sleep(0.01)
            assert failed.value.code == 1006 and ws.closed is None  # not closed for reading
            assert ws.write_failed and not ws.backlogged  # (nothing to flush: it could never go)
            if read == "receive":
                assert [await ws.receive(), await ws.receive()] == ["goodbye 1", "goodbye 2"]
            else:
                sock = ws.poll_socket()
                assert sock is not None
                await trio.lowlevel.wait_readable(sock)
                assert ws.read_nowait() is False  # the close frame: receive() takes over for it
                assert list(ws.inbox) == ["goodbye 1", "goodbye 2"]
                ws.inbox.clear()
            with pytest.raises(WebSocketClosed) as closed:
                await ws.receive()
            assert (closed.value.code, closed.value.reason) == (1000, "session over")
            with pytest.raises(WebSocketClosed):  # sending stays refused
                await ws.send("late")
            with trio.fail_after(1):
                await ws.aclose()
        nursery.cancel_scope.cancel()


def test_a_lone_surrogate_in_a_text_message_is_sent_as_a_replacement_not_an_exception() -> None:
    """UTF-8 cannot carry "\\ud83d" alone (a JSON escape decodes to it): sent as "?" rather than ending the call."""
    from mediaserver.transport.ws_server import server_frame

    text = '{"text": "hi \ud83d"}'
    peer = WSConnection(ConnectionType.SERVER)  # the client's masked frame, as a server reads it
    peer.initiate_upgrade_connection([(b"host", b"x"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                                      (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
                                      (b"sec-websocket-version", b"13")], "/")  # fmt: skip
    peer.send(AcceptConnection())
    peer.receive_data(data_frame(text))
    assert [e.data for e in peer.events() if isinstance(e, TextMessage)] == ['{"text": "hi ?"}']
    frame = server_frame(text)  # unmasked, short: two header bytes, then the payload
    assert frame[:2] == bytes([0x81, len(frame) - 2]) and frame[2:].decode() == '{"text": "hi ?"}'
