"""The direct-socket path of ClientWebSocket / ServerStream (plain TCP), on real loopback sockets.

On a plain-TCP ``trio.SocketStream`` both classes read and write the stdlib
socket themselves (``raw_socket``, ``_receive_raw``, ``_send_raw``) instead
of going through the stream; TLS and test streams keep the stream's own
methods.  These tests connect our client to our server on 127.0.0.1 and
check what the raw path must still get right: a full kernel send buffer,
concurrent senders, a peer that closes or resets, cancellation and closing
while blocked in ``receive``, ``ServerStream.send_many`` and the pooled
mask keys.  Every connection asserts that it really is on the raw path
(``_sock`` set), so a silent fallback to the stream methods cannot make
these tests pass vacuously.
"""

from __future__ import annotations

import os
import random
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import trio
import trio.testing
from wsproto.events import AcceptConnection

from mediaserver.bridge.call import StreamClosed
from mediaserver._native._wsframe import MaskKeys, mask
from mediaserver.transport.ws_client import ClientWebSocket, WebSocketClosed, connect, data_frame, raw_socket
from mediaserver.transport.ws_server import ServerStream, parse_upgrade, server_frame
from tests.fakes import fail_after
from tests.test_http_client import certificate, server_context  # noqa: F401  (certificate: a pytest fixture)

MAX = 4 << 20  # max_message_size: room for the 2 MiB message below
SMALL_BUFFER = 65536  # SO_SNDBUF for the full-buffer tests (the kernel doubles it)

Side = Literal["client", "server"]
SIDES: list[Side] = ["client", "server"]
Wrap = Callable[[trio.SocketStream, trio.SocketStream], tuple[trio.abc.Stream, trio.abc.Stream]]


@dataclass
class Pair:
    """Our client and our server WebSocket, connected, and the Trio streams under them."""

    client: ClientWebSocket
    server: ServerStream
    client_stream: trio.abc.Stream
    server_stream: trio.abc.Stream

    def ws(self, side: Side) -> ClientWebSocket:
        return self.client if side == "client" else self.server

    def stream(self, side: Side) -> trio.abc.Stream:
        return self.client_stream if side == "client" else self.server_stream

    def peer_stream(self, side: Side) -> trio.abc.Stream:
        return self.server_stream if side == "client" else self.client_stream


def closed_error(side: Side) -> type[Exception]:
    """What the side's send/receive raise once the connection is gone."""
    return WebSocketClosed if side == "client" else StreamClosed


def frame_to(side: Side, message: str | bytes) -> bytes:
    """``message`` framed as the peer of ``side`` sends it (a client masks, a server does not)."""
    return server_frame(message) if side == "client" else data_frame(message)


async def _accept(stream: trio.abc.Stream) -> ServerStream:
    """The server half of the opening handshake (wsproto's, via ws_server.parse_upgrade)."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await stream.receive_some(4096)
        assert chunk, "the client hung up during the handshake"
        head += chunk
    parsed = parse_upgrade(head)
    assert parsed is not None, head
    ws, _request = parsed
    await stream.send_all(ws.send(AcceptConnection()))
    return ServerStream(stream, ws, MAX)


@asynccontextmanager
async def ws_pair(*, small_buffers: bool = False, wrap: Wrap | None = None) -> AsyncIterator[Pair]:
    """A connected client/server pair over one loopback TCP connection (optionally wrapped, e.g. TLS)."""
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        client_tcp = await trio.testing.open_stream_to_socket_listener(listener)
        server_tcp = await listener.accept()
    assert isinstance(client_tcp, trio.SocketStream) and isinstance(server_tcp, trio.SocketStream)
    try:
        if small_buffers:  # (SO_RCVBUF is left alone: shrunk after the connect, Linux prunes and retransmits)
            for tcp in (client_tcp, server_tcp):
                tcp.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_BUFFER)
        client_stream, server_stream = wrap(client_tcp, server_tcp) if wrap else (client_tcp, server_tcp)
        accepted: list[ServerStream] = []

        async def accept() -> None:
            accepted.append(await _accept(server_stream))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept)
            client = await connect(client_stream, "127.0.0.1", "/media-stream", max_message_size=MAX)
        pair = Pair(client, accepted[0], client_stream, server_stream)
        if wrap is None:  # plain TCP: both ends must be on the raw path, or these tests prove nothing
            assert pair.client._sock is not None and pair.client._sock.fileno() == client_tcp.socket.fileno()
            assert pair.server._sock is not None and pair.server._sock.fileno() == server_tcp.socket.fileno()
        yield pair
    finally:
        with trio.CancelScope(shield=True):  # (a test that timed out must not leak the sockets)
            await trio.aclose_forcefully(client_tcp)
            await trio.aclose_forcefully(server_tcp)


async def send_as(side: Side, pair: Pair, message: str | bytes) -> None:
    await pair.ws(side).send(message)  # ServerStream.send, or ClientWebSocket.send


# ------------------------------------------------------------------ raw_socket


@fail_after(5)
async def test_raw_socket_is_the_stdlib_socket_of_a_plain_tcp_stream() -> None:
    [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
    async with listener:
        client = await trio.testing.open_stream_to_socket_listener(listener)
        async with client, await listener.accept() as server:
            for stream in (client, server):
                assert isinstance(stream, trio.SocketStream)
                sock = raw_socket(stream)
                assert isinstance(sock, socket.socket)
                assert sock.fileno() == stream.socket.fileno()
                assert sock.getsockname() == stream.socket.getsockname()


async def test_raw_socket_is_none_for_memory_streams() -> None:
    left, right = trio.testing.memory_stream_pair()
    assert raw_socket(left) is None and raw_socket(right) is None


def tls(certificate: tuple[Path, Path]) -> Wrap:
    """Wrap a TCP pair in TLS: our self-signed certificate for 127.0.0.1, trusted by the client."""

    def wrap(client: trio.SocketStream, server: trio.SocketStream) -> tuple[trio.abc.Stream, trio.abc.Stream]:
        trust = ssl.create_default_context(cafile=str(certificate[0]))
        return (
            trio.SSLStream(client, trust, server_hostname="127.0.0.1"),
            trio.SSLStream(server, server_context(certificate), server_side=True),
        )

    return wrap


@fail_after(10)
async def test_tls_streams_have_no_raw_socket_and_still_carry_messages(certificate: tuple[Path, Path]) -> None:  # noqa: F811
    async with ws_pair(wrap=tls(certificate)) as pair:
        assert isinstance(pair.client_stream, trio.SSLStream)
        assert raw_socket(pair.client_stream) is None and raw_socket(pair.server_stream) is None
        assert pair.client._sock is None and pair.server._sock is None  # the stream's own methods
        big = random.Random(5).randbytes(300_000)  # several TLS records and reads
        async with trio.open_nursery() as nursery:  # (the big one needs the server reading meanwhile)
            nursery.start_soon(pair.client.send, "héllo")
            assert await pair.server.receive() == "héllo"
            nursery.start_soon(pair.client.send, big)
            assert await pair.server.receive() == big
        await pair.server.send_many(["a", "b"])
        assert [await pair.client.receive(), await pair.client.receive()] == ["a", "b"]


# ------------------------------------------------------- a full kernel buffer


def _payloads() -> list[bytes]:
    """8 MiB: 96 numbered 64 KiB messages, then one 2 MiB message (far over the socket buffers)."""
    rng = random.Random(1)
    return [i.to_bytes(4, "big") + rng.randbytes(64 * 1024 - 4) for i in range(96)] + [rng.randbytes(2 << 20)]


@pytest.mark.parametrize("side", SIDES)
@fail_after(20)
async def test_sends_wait_while_the_peer_does_not_read_and_everything_arrives_in_order(side: Side) -> None:
    messages = _payloads()
    sent = 0
    async with ws_pair(small_buffers=True) as pair:
        receiver = pair.ws("server" if side == "client" else "client")

        async def sender() -> None:
            nonlocal sent
            for message in messages:
                await send_as(side, pair, message)
                sent += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            await trio.sleep(0.2)  # nobody reads yet: the kernel buffers fill up
            assert sent < len(messages), "the sender finished although nobody read: no back-pressure?"
            got = [await receiver.receive() for _ in messages]
        assert sent == len(messages)
        assert len(got) == len(messages)
        for i, (expected, actual) in enumerate(zip(messages, got)):
            assert actual == expected, f"message {i} differs"


@pytest.mark.parametrize("side", SIDES)
@fail_after(20)
async def test_concurrent_senders_never_interleave_frames(side: Side) -> None:
    rng = random.Random(2)
    texts = [f"text {i} " + "é" * 50_000 + str(rng.random()) for i in range(30)]  # ~100 KiB each
    blobs = [i.to_bytes(4, "big") + rng.randbytes(100_000) for i in range(30)]
    async with ws_pair(small_buffers=True) as pair:
        receiver = pair.ws("server" if side == "client" else "client")

        async def send_all(batch: list[str] | list[bytes]) -> None:
            for message in batch:
                await send_as(side, pair, message)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, texts)
            nursery.start_soon(send_all, blobs)
            await trio.sleep(0.1)  # both senders block on the full socket, one of them inside a frame
            got = [await receiver.receive() for _ in range(len(texts) + len(blobs))]
    assert [m for m in got if isinstance(m, str)] == texts  # whole, and each task's order kept
    assert [m for m in got if isinstance(m, bytes)] == blobs
    # they really ran concurrently: the two kinds are mixed, not one batch after the other
    kinds = [isinstance(m, str) for m in got]
    assert sum(a != b for a, b in zip(kinds, kinds[1:])) > 1


# ------------------------------------------------------- a peer that goes away


def _reset(stream: trio.abc.Stream) -> None:
    """Make closing ``stream`` send a TCP RST instead of a FIN (SO_LINGER, zero timeout)."""
    assert isinstance(stream, trio.SocketStream)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("side", SIDES)
@fail_after(5)
async def test_sending_to_a_peer_that_closed_or_reset_raises_the_closed_exception(side: Side, how: str) -> None:
    async with ws_pair() as pair:
        peer = pair.peer_stream(side)
        if how == "reset":
            _reset(peer)
        await peer.aclose()
        with pytest.raises(closed_error(side)) as info:  # never a bare OSError (EPIPE / ECONNRESET)
            for _ in range(500):  # the first write may still be accepted by the kernel
                await send_as(side, pair, "x" * 1000)
                await trio.sleep(0.002)
        assert "1006" in str(info.value)
        with pytest.raises(closed_error(side)):  # and it stays closed
            await send_as(side, pair, "again")


@pytest.mark.parametrize("how", ["close", "reset"])
@pytest.mark.parametrize("side", SIDES)
@fail_after(5)
async def test_receive_after_the_peer_drops_tcp_without_a_close_frame_is_1006(side: Side, how: str) -> None:
    async with ws_pair() as pair:
        peer = pair.peer_stream(side)
        await peer.send_all(frame_to(side, "last words"))
        assert await pair.ws(side).receive() == "last words"
        if how == "reset":
            _reset(peer)
        await peer.aclose()
        with pytest.raises(closed_error(side)) as info:
            await pair.ws(side).receive()
        assert "1006" in str(info.value)
        if side == "client":
            assert isinstance(info.value, WebSocketClosed) and info.value.code == 1006
        closed = pair.ws(side).closed
        assert closed is not None and closed.code == 1006


# ------------------------------------------------- cancelling and closing receive


@pytest.mark.parametrize("side", SIDES)
@fail_after(5)
async def test_a_cancelled_receive_leaves_the_connection_usable_and_loses_nothing(side: Side) -> None:
    async with ws_pair() as pair:
        ws, peer = pair.ws(side), pair.peer_stream(side)
        with trio.move_on_after(0.05) as scope:  # nothing to read: blocked in wait_readable
            await ws.receive()
        assert scope.cancelled_caught
        await peer.send_all(frame_to(side, "after the cancel"))
        assert await ws.receive() == "after the cancel"
        # cancelled with half a frame already read: the rest completes it
        messages: list[str | bytes] = ["small é", random.Random(3).randbytes(200_000)]  # fast path tail, wsproto
        for message in messages:
            data = frame_to(side, message)
            await peer.send_all(data[: len(data) // 2])
            with trio.move_on_after(0.05) as scope:
                await ws.receive()
            assert scope.cancelled_caught
            await peer.send_all(data[len(data) // 2 :] + frame_to(side, "next"))
            assert await ws.receive() == message
            assert await ws.receive() == "next"
        await send_as(side, pair, "still sending")  # the send side is untouched too
        other = pair.ws("server" if side == "client" else "client")
        assert await other.receive() == "still sending"


@pytest.mark.parametrize("side", SIDES)
@fail_after(5)
async def test_closing_the_stream_from_another_task_ends_a_blocked_receive(side: Side) -> None:
    async with ws_pair() as pair:
        ws = pair.ws(side)
        caught: list[Exception] = []

        async def receive() -> None:
            try:
                await ws.receive()
            except Exception as exc:  # noqa: BLE001 - recorded and checked below
                caught.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()  # the receiver waits in wait_readable
            await pair.stream(side).aclose()  # Trio's notify_closing wakes it
        assert len(caught) == 1 and isinstance(caught[0], closed_error(side)), caught
        assert "1006" in str(caught[0])
        with pytest.raises(closed_error(side)):
            await send_as(side, pair, "after close")


# ------------------------------------------------------------------ send_many


class CountingSocket:
    """A stand-in for the server's stdlib socket that counts ``send`` calls (the rest passes through)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends = 0

    def send(self, data: memoryview) -> int:
        self.sends += 1
        return self._sock.send(data)

    def recv(self, size: int) -> bytes:
        return self._sock.recv(size)

    def fileno(self) -> int:
        return self._sock.fileno()


@fail_after(5)
async def test_send_many_is_one_write_of_separate_messages_then_stream_closed() -> None:
    async with ws_pair() as pair:
        assert pair.server._sock is not None
        counting = CountingSocket(pair.server._sock)
        pair.server._sock = counting  # type: ignore[assignment]
        await pair.server.send_many(["a", "b", "c"])
        assert counting.sends == 1
        assert [await pair.client.receive() for _ in range(3)] == ["a", "b", "c"]
        await pair.server.send_many([])  # nothing to send is not an error
        await pair.server.send_many(["d"])
        assert await pair.client.receive() == "d"

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.client.aclose)  # close frame 1000; waits for the server's reply
            with pytest.raises(StreamClosed, match="1000"):
                await pair.server.receive()
        with pytest.raises(StreamClosed, match="1000"):
            await pair.server.send_many(["a", "b", "c"])
        with pytest.raises(StreamClosed):
            await pair.server.send("x")


# ------------------------------------------------------------------- mask keys


def test_mask_keys_come_from_the_pool_in_order_and_it_refills(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[bytes] = []
    real = os.urandom

    def urandom(n: int) -> bytes:
        data = real(n)
        drawn.append(data)
        return data

    monkeypatch.setattr(os, "urandom", urandom)  # (the native pool calls os.urandom at each refill)
    pool = MaskKeys()
    keys = [pool.next() for _ in range(2000)]  # crosses the 1024-key pool boundary
    assert all(type(key) is bytes and len(key) == 4 for key in keys)
    assert [len(block) for block in drawn] == [4096, 4096]  # one system call per 1024 keys
    assert b"".join(keys) == b"".join(drawn)[: 4 * 2000]  # every key fresh, none replayed
    assert keys[1024:2000] != keys[: 2000 - 1024]


def test_a_short_or_failing_random_source_is_an_error_not_a_short_key(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = MaskKeys()
    monkeypatch.setattr(os, "urandom", lambda n: b"ab")
    with pytest.raises(RuntimeError, match="did not return 4096 bytes"):
        pool.next()

    def broken(n: int) -> bytes:
        raise OSError("no entropy")

    monkeypatch.setattr(os, "urandom", broken)
    with pytest.raises(OSError, match="no entropy"):
        pool.next()
    monkeypatch.undo()
    assert len(pool.next()) == 4  # and it recovers once the source does


def test_client_frames_carry_fresh_keys_and_unmask_to_the_message() -> None:
    frames = [data_frame("hi") for _ in range(3000)] + [data_frame(b"\x00\x01")]
    keys = [frame[2:6] for frame in frames]  # a short frame's masking key: bytes 2..5
    assert len(set(keys)) > 2990  # 3001 draws of 32 random bits: a repeat or two at most
    assert all(frame[1] & 0x80 for frame in frames)  # the mask bit
    assert mask(frames[0][6:], keys[0]) == b"hi" and mask(frames[-1][6:], keys[-1]) == b"\x00\x01"


# ------------------------------------------ provider links: batches without a lock


class _BatchCore:
    """A stand-in provider core: each command becomes a batch of three big messages, numbered in call order."""

    def __init__(self) -> None:
        self.calls = 0

    def send(self, command: object) -> list[str]:
        self.calls += 1
        n = self.calls
        return [f"{n}.{part} " + "x" * 60_000 for part in range(3)]


@fail_after(20)
async def test_provider_link_keeps_each_batch_whole_and_in_call_order() -> None:
    """Concurrent ``WebSocketLink.send`` calls, the socket full: every batch arrives whole, batches in call order."""
    from mediaserver.transport.provider_ws import WebSocketLink

    async with ws_pair(small_buffers=True) as pair:
        core = _BatchCore()
        link = WebSocketLink("fake", core, pair.client)  # type: ignore[arg-type]

        async def sender() -> None:
            for _ in range(8):
                await link.send(None)  # type: ignore[arg-type]

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(sender)
            await trio.sleep(0.1)  # the writers pile up on the full socket
            got = [await pair.server.receive() for _ in range(3 * 8 * 3)]
    heads = [str(message).split(" ", 1)[0] for message in got]
    assert heads == [f"{n}.{part}" for n in range(1, 25) for part in range(3)]
