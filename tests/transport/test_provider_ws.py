"""open_provider_link: every step of opening a model session is bounded by ``connect_timeout_s``."""

from __future__ import annotations

import base64
import hashlib
import re
from functools import partial

import pytest
import trio

from mediaserver.bridge.link import ProviderClosed
from mediaserver.protocol.providers.openai import OpenAIRealtimeConfig, OpenAIRealtimeSession
from mediaserver.transport.provider_ws import open_provider_link
from tests.fakes import fail_after

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


async def _accept_then_stall(stream: trio.SocketStream) -> None:
    """Accept the WebSocket upgrade, then never read again (a stalled or black-holed peer)."""
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(65536)
    [key] = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n") if line.lower().startswith(b"sec-websocket-key")]
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
    await stream.send_all(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
    await trio.sleep_forever()


@fail_after(10)
async def test_a_model_that_stops_reading_after_the_upgrade_fails_the_open_at_the_timeout() -> None:
    """The configuration (here 8 MB of instructions, more than the socket buffers) cannot hang the open."""
    session = OpenAIRealtimeSession(OpenAIRealtimeConfig(model="m", instructions="x" * 8_000_000))
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, _accept_then_stall, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        started = trio.current_time()
        with pytest.raises(ExceptionGroup) as failed:  # (raised through the link's nursery, as callers catch it: except*)
            async with open_provider_link("openai", session, f"ws://127.0.0.1:{port}/v1/realtime", connect_timeout_s=0.5):
                pytest.fail("the link opened")
        assert failed.group_contains(ProviderClosed, match="^openai: the session was not ready within 0.5 s$", depth=1)
        # the timeout, then at most the 1 s close handshake (the peer reads nothing); margin for a slow machine
        # (building the 8 MB message takes a while), far below the hang it replaces
        assert trio.current_time() - started < 0.5 + 1.0 + 2.5
        nursery.cancel_scope.cancel()


async def _answer_with(answer: bytes, stream: trio.SocketStream) -> None:
    head = b""
    while b"\r\n\r\n" not in head:
        head += await stream.receive_some(65536)
    await stream.send_all(answer)
    await trio.sleep_forever()


async def _reset_at_once(stream: trio.SocketStream) -> None:
    """Read the ClientHello, then reset the connection (RST): a TLS handshake that fails half-way."""
    import socket
    import struct

    await stream.receive_some(65536)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


@pytest.mark.parametrize(
    ("handler", "scheme", "reason"),
    [
        (partial(_answer_with, b"\x16\x03\x01\x00\x05hello\r\n\r\n"), "ws", "closed the connection during the handshake"),
        (
            partial(_answer_with, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n"),  # fmt: skip
            "ws",
            "closed the connection during the handshake",
        ),
        (_reset_at_once, "wss", "cannot connect to"),
    ],
    ids=["not-http", "wrong-accept-key", "reset-during-tls"],
)
@fail_after(10)
async def test_a_connection_that_fails_in_the_handshake_is_a_provider_closed(handler: object, scheme: str, reason: str) -> None:
    """Not a raw h11/wsproto/Trio exception: the registry logs ProviderClosed as one clean line, and Gemini retries it."""
    session = OpenAIRealtimeSession(OpenAIRealtimeConfig(model="m"))
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        with pytest.raises(ProviderClosed, match=f"^openai: .*{reason}"):
            async with open_provider_link("openai", session, f"{scheme}://127.0.0.1:{port}/v1/realtime", connect_timeout_s=5):
                pytest.fail("the link opened")
        nursery.cancel_scope.cancel()


def test_a_link_whose_replies_wait_for_the_socket_reads_no_more_on_the_reactor() -> None:
    """A model that keeps sending messages that need a reply (ElevenLabs' pings) and never reads: the replies
    must not pile up without bound.  While some wait, read_nowait hands over to receive(), whose awaiting
    sends hold the reader back until the model reads."""
    import socket as socket_module

    from wsproto.frame_protocol import FrameProtocol

    from mediaserver.transport.provider_ws import WebSocketLink
    from mediaserver.transport.ws_client import ClientWebSocket
    from tests.protocol.test_elevenlabs import msg, ready_session
    from tests.transport.test_ws_fastpath import LIMIT, _open_pair

    async def main() -> None:
        ours, theirs = socket_module.socketpair()
        ours.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_SNDBUF, 4096)
        with ours, theirs:
            ws = ClientWebSocket(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), _open_pair(False), LIMIT)
            link = WebSocketLink("elevenlabs", ready_session(), ws)
            assert ws.send_many_nowait([b"x" * 1_000_000]) is False  # the model is not reading: a backlog
            backlog = len(ws._backlog)
            ping = FrameProtocol(client=False, extensions=[]).send_data(
                msg("ping", ping_event={"event_id": 1, "ping_ms": 5}), True
            )
            theirs.sendall(bytes(ping) * 100)
            assert link.read_nowait() is False  # hand over ...
            assert len(ws._backlog) == backlog and not link.inbox  # ... without reading (no 100 pongs queued)

    trio.run(main)


@pytest.mark.parametrize("answers", [True, False], ids=["answer-waits-unread", "no-answer"])
@fail_after(10)
async def test_liveness_cuts_a_silent_model_but_not_one_whose_answer_waits_unread_in_our_socket(answers: bool) -> None:
    """The ping's answer can reach our socket while this process is busy or stalled (CI's loaded machines): it is
    then unread when the wait ends, and the silence was ours, not the model's.  A model that sent nothing is cut."""
    import socket as socket_module

    from wsproto.frame_protocol import Opcode

    from mediaserver.transport.provider_ws import WebSocketLink
    from mediaserver.transport.ws_client import ClientWebSocket
    from tests.protocol.test_elevenlabs import ready_session
    from tests.transport.test_ws_fastpath import LIMIT, _open_pair

    ours, theirs = socket_module.socketpair()
    theirs.setblocking(False)
    with ours, theirs:
        ws = ClientWebSocket(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), _open_pair(False), LIMIT)
        link = WebSocketLink("elevenlabs", ready_session(), ws)
        link.reading()  # a bridge reads the link (here: nobody does, as if this process were stalled)
        pong = bytes([0x80 | Opcode.PONG, 0])  # (FIN, an empty payload, unmasked: from a server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.watch_alive, 0.1)
            with trio.fail_after(2):
                while True:  # the ping arrives at the model
                    await trio.lowlevel.wait_readable(theirs)
                    if theirs.recv(100):
                        break
            if answers:
                theirs.send(pong)
            await trio.sleep(0.8)  # windows of 0.1 s: four pings at least
            nursery.cancel_scope.cancel()
        if answers:
            assert ws._abort_reason is None
        else:
            assert ws._abort_reason is not None
            [quiet] = re.findall(r"^the model sent nothing for ([0-9.]+) s, nor answered a ping$", ws._abort_reason)
            assert 0.2 <= float(quiet) <= 0.8


@fail_after(10)
async def test_liveness_gives_a_model_another_window_when_this_process_stalled_past_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stall of this whole process (a loaded machine) that runs past the ping's wait leaves the model no fair
    chance to answer: the wait starts again (here a model that never answers is then cut, one ping later)."""
    import socket as socket_module
    import time

    from mediaserver.transport import ws_client
    from mediaserver.transport.provider_ws import WebSocketLink
    from mediaserver.transport.ws_client import ClientWebSocket
    from tests.protocol.test_elevenlabs import ready_session
    from tests.transport.test_ws_fastpath import LIMIT, _open_pair

    real_ping = ws_client.ClientWebSocket.ping
    pings = 0

    async def ping_then_stall_once(self: ClientWebSocket, payload: bytes = b"") -> None:
        nonlocal pings
        await real_ping(self, payload)
        pings += 1
        if pings == 1:
            time.sleep(0.2)  # (blocks the whole process: every task, as a stalled machine does) past the 0.1 s wait

    monkeypatch.setattr(ws_client.ClientWebSocket, "ping", ping_then_stall_once)
    ours, theirs = socket_module.socketpair()
    with ours, theirs:
        ws = ClientWebSocket(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), _open_pair(False), LIMIT)
        link = WebSocketLink("elevenlabs", ready_session(), ws)
        link.reading()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(link.watch_alive, 0.1)
            while ws._abort_reason is None:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    # The stalled wait did not count: the model was cut after a later ping (the second, unless this machine
    # stalled past that wait too -- on CI it can -- which gives it another window in the same way).
    assert pings >= 2
    assert ws._abort_reason is not None and ws._abort_reason.endswith("nor answered a ping")
