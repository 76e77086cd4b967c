"""The Media Streams route served on ASGI (mediaserver.transport.twilio_ws), end to end on loopback.

The signature checks, stop, idle and shutdown cases are in tests/test_app.py;
these cover what the route itself decides: a caller that vanishes, an
oversize message, and the other routes still reaching Quart.
"""

from __future__ import annotations

import json
import logging

import pytest
import trio

from mediaserver.bridge.call import MessageStream, StreamEnd
from mediaserver.protocol.twilio import DEFAULT_MAX_MESSAGE_BYTES
from mediaserver.transport.twilio_ws import MediaStreamRoute

from tests.fakes import fail_after, http_request, websocket_upgrade_status
from tests.test_app import CALL_A, base_settings, call_log, fake_openai, keep_talking, openai_settings, phone_call, running


@fail_after(10)
async def test_a_caller_that_vanishes_ends_the_call_and_its_model_session(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mediaserver")
    async with fake_openai() as model, running(openai_settings(model)) as url:
        async with phone_call(url) as caller, trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            session = await model.session(0)
            await session.wait_appends(5)
            nursery.cancel_scope.cancel()
            await caller.abort()  # TCP gone, no close frame
        with trio.fail_after(1):
            await session.closed.wait()
        assert session.close_code == 1000  # the model still gets a clean close
        health = json.loads((await http_request(url + "/healthz")).body)
        assert health["active_calls"] == 0
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended " in r.getMessage()]
    assert "ended (twilio hung up)" in ended


@fail_after(10)
async def test_an_oversize_message_is_refused_with_1009_and_the_server_carries_on() -> None:
    async with fake_openai() as model, running(openai_settings(model)) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(100)
            await caller.send_raw("x" * (DEFAULT_MAX_MESSAGE_BYTES + 1))
            with trio.fail_after(2):
                await caller.closed.wait()
            assert caller.close_code == 1009
        health = await http_request(url + "/healthz")
        assert health.status == 200 and json.loads(health.body)["active_calls"] == 0


@fail_after(10)
async def test_other_websocket_paths_still_go_to_quart() -> None:
    async with running(base_settings()) as url:
        ws_url = url.replace("http://", "ws://")
        assert await websocket_upgrade_status(ws_url + "/media-stream/other") == 404  # Quart: no such route
        assert await websocket_upgrade_status(ws_url + "/media-stream") == 101  # ours (development mode)
        assert (await http_request(url + "/healthz")).status == 200


@pytest.mark.parametrize(
    ("end", "closed"),
    [
        (None, {"type": "websocket.close", "code": 1000}),
        (StreamEnd(1008, "refused: wrong account"), {"type": "websocket.close", "code": 1008, "reason": "refused: wrong account"}),
        ("raise", {"type": "websocket.close", "code": 1011, "reason": "internal error"}),
    ],
)
async def test_the_route_closes_with_the_handler_s_stream_end(end: object, closed: dict[str, object]) -> None:
    async def handle(stream: MessageStream) -> StreamEnd | None:
        if end == "raise":
            raise RuntimeError("handler bug")
        assert end is None or isinstance(end, StreamEnd)
        return end

    async def not_quart(scope: object, receive: object, send: object) -> None:
        raise AssertionError("the media stream path must not reach the app")

    sent: list[dict[str, object]] = []
    incoming = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, object]:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, object]) -> None:
        sent.append(dict(message))

    route = MediaStreamRoute(not_quart, handle, auth_token=None, public_url=None)
    scope = {"type": "websocket", "path": "/media-stream", "headers": [KEY], "scheme": "ws", "query_string": b""}
    await route(scope, receive, send)
    assert sent == [{"type": "websocket.accept"}, closed]


async def _route_once(scope: dict[str, object], incoming: list[dict[str, object]]) -> tuple[list[dict[str, object]], list[str]]:
    """``scope`` through a MediaStreamRoute: what it sent, and who took it (``app`` or the handler's ``stream``)."""
    taken: list[str] = []
    sent: list[dict[str, object]] = []

    async def handle(stream: MessageStream) -> StreamEnd | None:
        taken.append("stream")
        await stream.receive()
        return None

    async def app(scope: object, receive: object, send: object) -> None:
        taken.append("app")

    async def receive() -> dict[str, object]:
        return incoming.pop(0)

    async def send(message: dict[str, object]) -> None:
        sent.append(dict(message))

    await MediaStreamRoute(app, handle, auth_token=None, public_url=None)(scope, receive, send)
    return sent, taken


KEY = (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==")


def _scope(**changes: object) -> dict[str, object]:
    return {"type": "websocket", "path": "/media-stream", "raw_path": b"/media-stream", "headers": [KEY], "scheme": "ws",
            "query_string": b"", "http_version": "1.1", "extensions": {"websocket.http.response": {}}, **changes}  # fmt: skip


async def test_the_route_matches_the_path_as_sent_not_decoded() -> None:
    """/media%2Dstream is not the Media Stream here either (our own listener, which serves Twilio, matches the bytes):
    it could otherwise pick this route over that one."""
    _, taken = await _route_once(_scope(raw_path=b"/media%2Dstream"), [])
    assert taken == ["app"]
    _, taken = await _route_once(_scope(), [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}])
    assert taken == ["stream"]


@pytest.mark.parametrize("key", [b"abc", b"!!!!!!!!!!!!!!!!!!!!!!==", None])
async def test_a_bad_websocket_key_is_refused_on_this_route_too(key: bytes | None) -> None:
    headers = [] if key is None else [(b"sec-websocket-key", key)]
    sent, taken = await _route_once(_scope(headers=headers), [{"type": "websocket.connect"}])
    assert taken == [] and sent[0]["status"] == 400


async def test_an_http2_websocket_is_refused() -> None:
    """RFC 8441 over cleartext h2: Twilio never does it, and Hypercorn's h2 writes never block on a stuck peer."""
    sent, taken = await _route_once(_scope(http_version="2"), [{"type": "websocket.connect"}])
    assert taken == [] and sent[0] == {"type": "websocket.http.response.start", "status": 400, "headers": sent[0]["headers"]}


@pytest.mark.parametrize(("code", "violation"), [(1002, True), (1007, True), (1009, True), (1000, False), (1006, False)])
async def test_a_disconnect_for_broken_websocket_bytes_is_a_protocol_error(code: int, violation: bool) -> None:
    from mediaserver.bridge.call import StreamClosed, stream_closed_reason
    from mediaserver.transport.twilio_ws import ASGIStream

    async def receive() -> dict[str, object]:
        return {"type": "websocket.disconnect", "code": code}

    async def send(message: object) -> None:
        raise AssertionError("nothing is sent")

    with pytest.raises(StreamClosed) as info:
        await ASGIStream(receive, send).receive()
    assert info.value.violation is violation
    assert stream_closed_reason(info.value) == (
        f"protocol error: the Twilio stream broke the WebSocket protocol (code {code})" if violation else "twilio hung up"
    )


def _upgrade(port: int, *extra: str, version: str = "HTTP/1.1") -> bytes:
    lines = [
        f"GET /media-stream {version}", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13", *extra,
    ]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _head(stream: trio.SocketStream, buffered: bytes = b"") -> tuple[bytes, bytes]:
    """The next response head on ``stream`` (its lines), and what came after it."""
    while b"\r\n\r\n" not in buffered:
        chunk = await stream.receive_some(65536)
        assert chunk, buffered
        buffered += chunk
    head, _, rest = buffered.partition(b"\r\n\r\n")
    return head, rest


@fail_after(10)
async def test_an_upgrade_offering_compression_on_hypercorn_s_path_is_refused() -> None:
    # An upgrade after another request on a kept-alive connection is served by Hypercorn, which would negotiate
    # permessage-deflate and inflate each message before checking its size (a 300 KB frame became 300 MB).
    async with running(base_settings()) as url:
        port = int(url.rsplit(":", 1)[1])
        deflate = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits"
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:  # our listener: first request
            await stream.send_all(_upgrade(port, deflate))
            head, _ = await _head(stream)
            assert head.startswith(b"HTTP/1.1 101 ") and b"extensions" not in head.lower()  # accepted, uncompressed
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:  # kept alive: Hypercorn's path
            await stream.send_all(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            head, rest = await _head(stream)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            while len(rest) < length:
                rest += await stream.receive_some(65536)
            await stream.send_all(_upgrade(port, deflate))
            head, _ = await _head(stream, rest[length:])
            assert head.startswith(b"HTTP/1.1 400 "), head
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:  # the same path without the offer
            await stream.send_all(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            head, rest = await _head(stream)
            while len(rest) < length:
                rest += await stream.receive_some(65536)
            await stream.send_all(_upgrade(port))
            head, _ = await _head(stream, rest[length:])
            assert head.startswith(b"HTTP/1.1 101 ") and b"extensions" not in head.lower()


@pytest.mark.parametrize("bad", ["HTTP/1.0", "version 8", "no key", "short key", "not base64", "two keys"])
@fail_after(10)
async def test_a_media_stream_upgrade_that_is_not_a_websocket_handshake_is_refused_and_closed(bad: str) -> None:
    """400, and the connection closed (Hypercorn answered these 400 too, then held the connection open for as long
    as the client liked)."""
    async with running(base_settings()) as url:
        port = int(url.rsplit(":", 1)[1])
        request = _upgrade(port, version="HTTP/1.0") if bad == "HTTP/1.0" else _upgrade(port)  # (RFC 6455: 1.1)
        if bad == "version 8":
            request = request.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8")
        elif bad == "no key":
            request = request.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b"")
        elif bad == "short key":  # (RFC 6455 4.2.1: the base64 of 16 bytes; wsproto takes any value)
            request = request.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"abc")
        elif bad == "not base64":
            request = request.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"!!!!!!!!!!!!!!!!!!!!!!==")
        elif bad == "two keys":
            request = request.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
                                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n" * 2)  # fmt: skip
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request)
            head, rest = await _head(stream)
            assert head.split(b" ", 2)[1] == b"400", head
            assert b"connection: close" in head.lower()
            with trio.fail_after(2):  # closed at once
                while chunk := await stream.receive_some(65536):
                    rest += chunk
            assert rest.startswith(b"not a WebSocket handshake this server takes")




@fail_after(10)
async def test_bytes_sent_with_an_upgrade_on_a_kept_alive_connection_get_a_400_and_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Hypercorn refuses the upgrade (400) when bytes follow it in the same write, and then refused our accept:
    two ERROR tracebacks per connection, at any client's will."""
    caplog.set_level(logging.INFO)
    async with running(base_settings()) as url:
        port = int(url.rsplit(":", 1)[1])
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            head, rest = await _head(stream)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
            while len(rest) < length:
                rest += await stream.receive_some(65536)
            await stream.send_all(_upgrade(port) + b"x")
            head, _ = await _head(stream, rest[length:])
            assert head.startswith(b"HTTP/1.1 400 "), head
        assert (await http_request(url + "/healthz")).status == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records
                                                                           if r.levelno >= logging.ERROR]


@fail_after(10)
async def test_a_media_stream_over_http2_is_refused_by_the_running_server(caplog: pytest.LogCaptureFixture) -> None:
    """Cleartext h2 with prior knowledge, RFC 8441's extended CONNECT: refused, no call is started."""
    import h2.config
    import h2.connection
    import h2.events

    async with running(base_settings()) as url:
        port = int(url.rsplit(":", 1)[1])
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(conn.data_to_send())
            status = None
            sent_connect = False
            while status is None:
                for event in conn.receive_data(await stream.receive_some(65536)):
                    if isinstance(event, h2.events.RemoteSettingsChanged) and not sent_connect:
                        sent_connect = True  # (extended CONNECT needs the server's SETTINGS_ENABLE_CONNECT_PROTOCOL)
                        conn.send_headers(1, [(":method", "CONNECT"), (":protocol", "websocket"), (":scheme", "http"),
                                              (":path", "/media-stream"), (":authority", f"127.0.0.1:{port}"),
                                              ("sec-websocket-version", "13")])  # fmt: skip
                    elif isinstance(event, h2.events.ResponseReceived):
                        status = dict(event.headers)[b":status"]
                await stream.send_all(conn.data_to_send())
        assert status == b"400"
        health = json.loads((await http_request(url + "/healthz")).body)
        assert (health["active_calls"], health["pending_calls"]) == (0, 0)
    assert any("upgrade over HTTP/2 refused" in r.getMessage() for r in caplog.records)
