"""The native receive fast path of ClientWebSocket gives what wsproto alone gives, however bytes arrive.

The reference is the same connection class with the fast path switched off
(wsproto parses everything, as before the fast path existed): for the same
bytes, cut into reads at the same points, both must deliver the same
messages, end with the same close code and send the same control replies.
"""

from __future__ import annotations

import random
import struct
from collections import deque

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import AcceptConnection, Request
from wsproto.frame_protocol import CloseReason, FrameProtocol

from mediaserver._native._wsframe import OTHER
from mediaserver.transport import ws_client
from mediaserver.transport.ws_client import ClientWebSocket, WebSocketClosed

LIMIT = 1000


class ScriptedStream(trio.abc.Stream):
    """Reads return the given chunks in order, then EOF; sends are recorded."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = deque(chunks)
        self.sent = bytearray()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._chunks.popleft() if self._chunks else b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        self.sent += data

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def _open_pair(server_side: bool) -> WSConnection:
    """Our end of a connection past the opening handshake (server end iff ``server_side``)."""
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="example.com", target="/media")))
    list(server.events())
    client.receive_data(server.send(AcceptConnection()))
    list(client.events())
    return server if server_side else client


def _run(chunks: list[bytes], server_side: bool) -> tuple[list[str | bytes], int, list[tuple[int, str]]]:
    """Messages received, the close code, and the control frames we sent back."""

    async def main() -> tuple[list[str | bytes], int, list[tuple[int, str]]]:
        stream = ScriptedStream(chunks)
        conn = ClientWebSocket(stream, _open_pair(server_side), LIMIT)
        got: list[str | bytes] = []
        with trio.fail_after(5):
            while True:
                try:
                    got.append(await conn.receive())
                except WebSocketClosed as exc:
                    code = exc.code
                    break
        peer = FrameProtocol(client=server_side, extensions=[])
        peer.receive_bytes(bytes(stream.sent))
        # (a close frame's payload comes back as (code, reason))
        replies = [(int(frame.opcode), repr(frame.payload)) for frame in peer.received_frames()]
        return got, code, replies

    return trio.run(main)


def _both(chunks: list[bytes], server_side: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    fast = _run(chunks, server_side)
    with monkeypatch.context() as m:
        m.setattr(ws_client, "scan", lambda data, limit, masked: ([], 0, OTHER))  # wsproto parses it all
        slow = _run(chunks, server_side)
    assert fast == slow


def _frame(first: int, payload: bytes, masked: bool, rng: random.Random, key: bytes | None = None) -> bytes:
    n = len(payload)
    bit = 0x80 if masked else 0
    if n < 126:
        head = bytes((first, bit | n))
    elif n < 65536:
        head = bytes((first, bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((first, bit | 127)) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    key = rng.randbytes(4) if key is None else key
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


KINDS = ["text", "binary", "big", "ping", "fragmented", "nested", "interleaved", "bad utf-8", "oversize", "rsv", "close"]


def _stream(kinds: list[str], masked: bool, seed: int) -> bytes:
    """Frames of the given kinds back to back, as the peer would send them."""
    rng = random.Random(seed)
    out = b""
    for i, kind in enumerate(kinds):
        if kind == "text":
            out += _frame(0x81, f"msg {i} é {rng.random()}".encode(), masked, rng)
        elif kind == "binary":
            out += _frame(0x82, rng.randbytes(rng.randrange(0, 40)), masked, rng)
        elif kind == "big":
            out += _frame(0x82, rng.randbytes(rng.randrange(126, 400)), masked, rng)
        elif kind == "ping":
            out += _frame(0x89, b"p%d" % i, masked, rng)
        elif kind == "fragmented":
            text = "fragé".encode()
            out += _frame(0x01, text[:5], masked, rng) + _frame(0x89, b"mid", masked, rng)
            out += _frame(0x00, text[5:], masked, rng) + _frame(0x80, b"!", masked, rng)
        elif kind == "nested":  # after a ping, a binary frame whose payload looks like a plain frame
            inner = _frame(0x81, b"not a frame", masked, rng)
            # (a zero masking key leaves the payload as it is on the wire too)
            out += _frame(0x89, b"", masked, rng) + _frame(0x82, inner, masked, rng, key=bytes(4))
        elif kind == "interleaved":  # a whole text frame inside a fragmented message: 1002
            out += _frame(0x02, b"start", masked, rng) + _frame(0x81, b"intruder", masked, rng)
        elif kind == "bad utf-8":
            out += _frame(0x81, b"ok\xff", masked, rng)
        elif kind == "oversize":
            out += _frame(0x82, b"x" * (LIMIT + 1), masked, rng)
        elif kind == "rsv":
            out += _frame(0xC2, b"r", masked, rng)
        elif kind == "close":
            out += _frame(0x88, struct.pack("!H", 4000) + b"bye", masked, rng)
    return out


def _cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = [0, *sorted({p % (len(data) + 1) for p in points}), len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.sampled_from(KINDS), max_size=8),
    st.booleans(),
    st.integers(0, 2**32),
    st.lists(st.integers(0, 10_000), max_size=6),
)
def test_random_streams_cut_anywhere_match_wsproto(
    kinds: list[str], server_side: bool, seed: int, points: list[int]
) -> None:
    data = _stream(kinds, masked=server_side, seed=seed)
    with pytest.MonkeyPatch.context() as m:
        _both(_cut(data, points), server_side, m)


@pytest.mark.parametrize(
    "kinds",
    [
        ["text", "big", "ping", "binary", "fragmented", "text", "close", "text"],
        ["text", "nested", "text", "interleaved", "text"],
    ],
)
@pytest.mark.parametrize("server_side", [True, False])
def test_every_single_split_point_matches_wsproto(
    kinds: list[str], server_side: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _stream(kinds, masked=server_side, seed=7)
    for cut in range(len(data) + 1):
        _both(_cut(data, [cut]), server_side, monkeypatch)


@pytest.mark.parametrize("server_side", [True, False])
def test_byte_by_byte_delivery_matches_wsproto(server_side: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _stream(["text", "big", "ping", "text", "bad utf-8", "text"], masked=server_side, seed=3)
    _both([data[i : i + 1] for i in range(len(data))], server_side, monkeypatch)


def test_the_fast_path_really_parses_plain_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    """Guard against a fast path that silently never runs: plain frames must not reach wsproto."""
    fed: list[bytes] = []
    original = Connection.receive_data

    def spy(self: Connection, data: bytes | None) -> None:
        if data:  # (the handshake hands each new connection its empty leftover)
            fed.append(data)
        original(self, data)

    monkeypatch.setattr(Connection, "receive_data", spy)
    data = _stream(["text", "binary", "big", "text"], masked=True, seed=1)
    got, code, replies = _run(_cut(data, [5, 300]), server_side=True)
    assert len(got) == 4 and code == 1006 and replies == []
    assert fed == []
    data = _stream(["text", "ping", "text"], masked=True, seed=1)
    got, code, replies = _run([data], server_side=True)
    assert len(got) == 2 and replies == [(0xA, repr(b"p1"))]
    assert len(fed) == 1 and fed[0] == data[len(_stream(["text"], masked=True, seed=1)) :]


class _Silent(ScriptedStream):
    """After its chunks the peer says nothing more, and does not hang up either."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._chunks:
            return await super().receive_some(max_bytes)
        await trio.sleep_forever()
        raise AssertionError("unreachable")


@pytest.mark.parametrize(("kind", "code"), [("bad utf-8", 1007), ("rsv", 1002), ("interleaved", 1002)])
@pytest.mark.parametrize("server_side", [True, False])
def test_a_peer_that_breaks_the_protocol_is_told_so_and_the_close_does_not_wait_for_it(
    kind: str, code: int, server_side: bool
) -> None:
    async def main() -> None:
        stream = _Silent([_stream(["text", kind, "text"], masked=server_side, seed=5)])
        conn = ClientWebSocket(stream, _open_pair(server_side), LIMIT)
        assert isinstance(await conn.receive(), str)
        with pytest.raises(WebSocketClosed) as closed:
            await conn.receive()
        assert closed.value.code == code and "broke the protocol" in str(closed.value)
        with trio.fail_after(0.5):  # wsproto reads nothing after the bad bytes: no close reply can come
            await conn.aclose()
        peer = FrameProtocol(client=server_side, extensions=[])
        peer.receive_bytes(bytes(stream.sent))
        frames = list(peer.received_frames())
        assert [(int(f.opcode), f.payload[0]) for f in frames] == [(8, code)]  # one close, with the error's code

    trio.run(main)


def test_text_messages_are_limited_in_bytes_on_the_slow_path_too() -> None:
    # 600 characters, 1200 bytes of UTF-8: over the 1000-byte limit (the slow path once counted characters).
    rng = random.Random(0)
    payload = ("é" * 600).encode()
    one = _frame(0x81, payload, True, rng)
    fragmented = _frame(0x01, payload[:600], True, rng) + _frame(0x80, payload[600:], True, rng)
    for data in (one, fragmented):
        got, code, _ = _run([data], server_side=True)
        assert (got, code) == ([], 1009)


@pytest.mark.parametrize("how", ["send", "send_many_nowait then flush"])
def test_a_send_cancelled_part_way_keeps_its_frame_whole_and_ahead_of_later_ones(how: str) -> None:
    import socket as socket_module

    async def main() -> None:
        ours, theirs = socket_module.socketpair()
        ours.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_SNDBUF, 4096)
        peer = trio.socket.from_stdlib_socket(theirs)
        big = b"x" * 1_000_000  # far more than the socket takes: the write waits with part of the frame out
        with peer, ours:
            conn = ClientWebSocket(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), _open_pair(False), LIMIT)
            with trio.move_on_after(0.2) as scope:
                if how == "send":
                    await conn.send(big)
                else:
                    assert conn.send_many_nowait([big]) is False  # part written, the rest in the backlog
                    await conn.flush()
            assert scope.cancelled_caught and conn.closed is None
            frames: list[tuple[int, bytes]] = []

            async def read_frames() -> None:
                protocol = FrameProtocol(client=False, extensions=[])  # the server's view of our masked frames
                opcode, payload = 0, b""
                while len(frames) < 2:
                    data = await peer.recv(1 << 20)
                    assert data, "the connection ended early"
                    protocol.receive_bytes(data)
                    for piece in protocol.received_frames():  # (a large frame comes in pieces)
                        opcode = opcode or int(piece.opcode)
                        payload += piece.payload if isinstance(piece.payload, bytes) else piece.payload.encode()
                        if piece.frame_finished:
                            frames.append((opcode, payload))
                            opcode, payload = 0, b""

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_frames)
                with trio.fail_after(5):
                    await conn.send("after")  # goes out after the rest of the cut frame
            assert frames == [(2, big), (1, b"after")]

    trio.run(main)


@pytest.mark.parametrize("server_side", [False, True])
def test_empty_fragments_keep_nothing(server_side: bool) -> None:
    """A message of endless empty continuation frames never reaches the size limit: they must not pile up."""
    peer = FrameProtocol(client=server_side, extensions=[])
    frames = [peer.send_data("ab", False), *(peer.send_data("", False) for _ in range(20_000)), peer.send_data("cd", True)]
    parts_seen: list[int] = []

    class Watched(ScriptedStream):
        async def receive_some(self, max_bytes: int | None = None) -> bytes:
            parts_seen.append(len(conn._parts))
            return await super().receive_some(max_bytes)

    stream = Watched([b"".join(frames[:10_000]), b"".join(frames[10_000:])])
    conn = ClientWebSocket(stream, _open_pair(server_side), LIMIT)

    async def main() -> str | bytes:
        with trio.fail_after(10):
            return await conn.receive()

    assert trio.run(main) == "abcd"
    assert max(parts_seen) <= 2  # "ab" and one empty piece at most, not 10 000


@pytest.mark.parametrize("server_side", [False, True])
def test_a_reads_pings_get_one_pong_the_last_ones_and_before_what_follows(server_side: bool) -> None:
    """RFC 6455 5.5.3: only the latest ping needs its pong.  A flood of them costs one send, not one each."""
    rng = random.Random(5)
    pings = b"".join(_frame(0x89, b"p%d" % i, server_side, rng) for i in range(1000))
    after = _frame(0x81, b"after", server_side, rng)
    more = _frame(0x89, b"again", server_side, rng)
    close = _frame(0x88, struct.pack("!H", 1000), server_side, rng)
    got, code, replies = _run([pings + after + more + close], server_side)
    # One pong for the 1000 (the last one's payload), sent before the message is taken; none for a ping the
    # peer's close follows (wsproto refused that pong, and the close's code was lost: 1006 instead of 1000).
    assert got == ["after"] and code == 1000
    assert replies == [(10, repr(b"p999")), (8, repr((CloseReason.NORMAL_CLOSURE, "")))]
    got, code, replies = _run([pings + after + more], server_side)
    assert got == ["after"] and code == 1006 and replies == [(10, repr(b"p999")), (10, repr(b"again"))]


@pytest.mark.parametrize("server_side", [False, True])
def test_a_read_of_thousands_of_frames_lets_other_tasks_run_while_it_is_handled(server_side: bool) -> None:
    """One peer's 64 KiB of tiny fragments or pings (a reviewer: 380 ms of work) must not stall every other call."""
    peer = FrameProtocol(client=server_side, extensions=[])
    fragments = [peer.send_data("a", False), *(peer.send_data("", False) for _ in range(10_000)), peer.send_data("b", True)]
    rng = random.Random(6)
    pings = [_frame(0x89, b"", server_side, rng) for _ in range(10_000)]
    stream = ScriptedStream([b"".join(fragments) + b"".join(pings) + _frame(0x81, b"c", server_side, rng)])
    conn = ClientWebSocket(stream, _open_pair(server_side), LIMIT)
    turns = 0

    async def main() -> list[str | bytes]:
        nonlocal turns
        got: list[str | bytes] = []
        async with trio.open_nursery() as nursery:

            async def other_call() -> None:
                nonlocal turns
                while True:
                    await trio.sleep(0)
                    turns += 1

            nursery.start_soon(other_call)
            with trio.fail_after(20):
                got.append(await conn.receive())
                got.append(await conn.receive())
            nursery.cancel_scope.cancel()
        return got

    assert trio.run(main) == ["ab", "c"]
    assert turns >= 20_000 // ws_client.SLOW_EVENTS_PER_TURN - 5  # a turn for the others every 64 events
    assert stream.sent.count(b"\x8a") <= 2  # (10 000 pings: one pong)
