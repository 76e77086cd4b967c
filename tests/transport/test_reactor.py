"""The reactor (one epoll set, handlers called in one task) and the non-blocking WebSocket calls it drives.

Real loopback sockets throughout (the pairs of tests/transport/test_raw_socket.py).
"""

from __future__ import annotations

import logging
import socket

import pytest
import trio
import trio.lowlevel
import trio.testing

from mediaserver._native._wsframe import encode_b64_frame
from mediaserver.bridge.call import StreamClosed
from mediaserver.transport.reactor import Reactor, current_reactor
from mediaserver.transport.ws_client import WebSocketClosed
from tests.transport.test_raw_socket import frame_to, ws_pair


def _socketpair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def test_handlers_run_for_readable_sockets_until_removed() -> None:
    reactor = current_reactor()
    assert current_reactor() is reactor  # one per run
    a, b = _socketpair()
    c, d = _socketpair()
    seen: list[tuple[str, bytes]] = []
    with a, b, c, d:
        reactor.add(b.fileno(), lambda: seen.append(("b", b.recv(100))))
        reactor.add(d.fileno(), lambda: seen.append(("d", d.recv(100))))
        a.send(b"one")
        c.send(b"two")
        while len(seen) < 2:
            await trio.sleep(0.001)
        assert sorted(seen) == [("b", b"one"), ("d", b"two")]
        reactor.remove(b.fileno())
        reactor.remove(b.fileno())  # idempotent
        a.send(b"ignored")
        c.send(b"three")
        while len(seen) < 3:
            await trio.sleep(0.001)
        await trio.sleep(0.02)
        assert seen[2:] == [("d", b"three")]
        assert b.recv(100) == b"ignored"  # nobody read it
        reactor.remove(d.fileno())
        assert len(reactor) == 0


async def test_level_triggered_a_handler_that_leaves_data_is_called_again() -> None:
    reactor = current_reactor()
    a, b = _socketpair()
    got = bytearray()
    with a, b:
        reactor.add(b.fileno(), lambda: got.extend(b.recv(2)))  # two bytes per call
        a.send(b"abcdefgh")
        while len(got) < 8:
            await trio.sleep(0.001)
        reactor.remove(b.fileno())
    assert bytes(got) == b"abcdefgh"


async def test_registering_twice_is_refused() -> None:
    reactor = current_reactor()
    a, b = _socketpair()
    with a, b:
        reactor.add(b.fileno(), lambda: None)
        try:
            with pytest.raises(ValueError, match="already registered"):
                reactor.add(b.fileno(), lambda: None)
        finally:
            reactor.remove(b.fileno())


async def test_a_failing_handler_is_dropped_and_logged_and_the_others_go_on(caplog: pytest.LogCaptureFixture) -> None:
    reactor = current_reactor()
    a, b = _socketpair()
    c, d = _socketpair()
    good: list[bytes] = []

    def bad() -> None:
        b.recv(100)
        raise RuntimeError("boom")

    with a, b, c, d, caplog.at_level(logging.ERROR, "mediaserver.reactor"):
        reactor.add(b.fileno(), bad)
        reactor.add(d.fileno(), lambda: good.append(d.recv(100)))
        a.send(b"x")
        c.send(b"y")
        while not good or len(reactor) == 2:
            await trio.sleep(0.001)
        assert good == [b"y"]
        assert len(reactor) == 1  # the failing one was dropped
        assert "boom" in caplog.text and f"fd {b.fileno()}" in caplog.text
        c.send(b"z")
        while len(good) < 2:
            await trio.sleep(0.001)
        reactor.remove(d.fileno())


async def test_the_reactor_yields_between_batches() -> None:
    """A socket that is always readable must not starve other tasks (each batch ends in a checkpoint)."""
    reactor = Reactor()
    a, b = _socketpair()
    ticks = 0
    with a, b:
        a.send(b"never read")
        reactor.add(b.fileno(), lambda: None)  # never reads: readable forever
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            while ticks < 50:
                await trio.lowlevel.checkpoint()
                ticks += 1
            assert reactor.batches >= 10
            nursery.cancel_scope.cancel()
        reactor.remove(b.fileno())


async def test_again_calls_a_handler_in_the_next_batch_without_new_data_with_other_tasks_between() -> None:
    """A handler that left messages for later (MESSAGES_PER_TURN) asks to be called again; nothing makes its
    socket readable, yet it is called in the next batch, and other tasks run between its calls.  Asked from
    outside the loop (a task's own first call of its handler), it wakes the waiting loop."""
    reactor = Reactor()
    a, b = _socketpair()
    ticks_at_call: list[int] = []
    ticks = 0
    wanted = 5

    def handler() -> None:
        ticks_at_call.append(ticks)
        if len(ticks_at_call) < wanted:
            reactor.again(b.fileno())

    async def tick_until(n: int) -> None:
        nonlocal ticks
        while len(ticks_at_call) < n:
            await trio.lowlevel.checkpoint()
            ticks += 1

    with a, b:
        reactor.add(b.fileno(), handler)  # never readable: a never sends
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reactor.run)
            await trio.sleep(0.01)  # the loop waits now
            assert ticks_at_call == []
            reactor.again(b.fileno())
            with trio.fail_after(1):
                await tick_until(wanted)
            await trio.sleep(0.05)
            assert len(ticks_at_call) == wanted  # no more than it asked for
            # The other task ran between the calls: once per batch (Trio may run it before or after the reactor
            # within a batch, so a pair of calls can see the same count, but not all of them).
            assert ticks_at_call == sorted(ticks_at_call) and ticks_at_call[-1] - ticks_at_call[0] >= wanted - 2
            reactor.again(b.fileno())
            reactor.remove(b.fileno())  # removing drops a pending again: the fd's next handler is not called for it
            later: list[str] = []
            reactor.add(b.fileno(), lambda: later.append("called"))
            await trio.sleep(0.05)
            assert len(ticks_at_call) == wanted and later == []
            reactor.remove(b.fileno())
            nursery.cancel_scope.cancel()
    assert reactor.batches <= 10  # (the loop waited between: no spinning on the wake-up socket)


# -- ClientWebSocket / ServerStream: read_nowait, inbox, send_many_nowait, flush ------


async def _until_read(ws, count: int) -> list[str | bytes]:  # type: ignore[no-untyped-def]
    got: list[str | bytes] = []
    while len(got) < count:
        assert ws.read_nowait()
        while ws.inbox:
            got.append(ws.inbox.popleft())
        await trio.sleep(0.001)
    return got


async def test_read_nowait_parses_whole_frames_and_keeps_a_cut_one() -> None:
    async with ws_pair() as pair:
        server, client_stream = pair.server, pair.client_stream
        assert server.poll_socket() is not None
        assert server.read_nowait()  # nothing there: still fine
        assert not server.inbox
        one, two = frame_to("server", "first"), frame_to("server", "second")
        with trio.fail_after(5):
            await client_stream.send_all(one + two[:3])  # the second frame cut short
            assert await _until_read(server, 1) == ["first"]
            await client_stream.send_all(two[3:])
            assert await _until_read(server, 1) == ["second"]


async def test_read_nowait_hands_a_ping_to_receive_which_answers_it_and_goes_on() -> None:
    from wsproto.events import Ping

    async with ws_pair() as pair:
        server, client = pair.server, pair.client
        with trio.fail_after(5):
            await client.send("before")
            await client._send(Ping(b"hi"))
            await client.send("after")
            got: list[str | bytes] = []
            while True:
                more = server.read_nowait()
                while server.inbox:
                    got.append(server.inbox.popleft())
                if not more:
                    break
                await trio.sleep(0.001)
            assert got == ["before"]
            assert not server.read_nowait()  # stays handed off until receive() has run
            assert await server.receive() == "after"  # the ping was handled on the way
            # the pong reached the client (wsproto saw it; nothing for receive to return)
            server_more = server.read_nowait()
            assert server_more
            await server.send("done")
            assert await client.receive() == "done"


async def test_read_nowait_reports_a_closed_peer_and_receive_raises() -> None:
    async with ws_pair() as pair:
        server = pair.server
        with trio.fail_after(5):
            await trio.aclose_forcefully(pair.client_stream)
            while server.read_nowait():
                await trio.sleep(0.001)
            with pytest.raises(Exception, match="1006"):
                await server.receive()


async def test_send_many_nowait_goes_out_at_once_when_the_socket_takes_it() -> None:
    async with ws_pair() as pair:
        with trio.fail_after(5):
            assert pair.client.send_many_nowait(["a", b"b"])
            assert not pair.client._backlog
            assert await pair.server.receive() == "a"
            assert await pair.server.receive() == b"b"


async def test_frames_built_with_each_sides_frame_key_are_as_each_side_must_send() -> None:
    """A client's frames are masked and a server's are not (RFC 6455); each side reads the other's text."""
    import base64

    async with ws_pair() as pair:
        with trio.fail_after(5):
            assert (pair.client.frame_key, pair.server.frame_key) == (True, None)
            frame = encode_b64_frame(b'{"audio":"', b"\x00\xff\x10", b'"}', pair.client.frame_key)
            assert pair.client.write_frames_nowait(frame)
            assert await pair.server.receive() == '{"audio":"' + base64.b64encode(b"\x00\xff\x10").decode() + '"}'
            assert pair.server.write_frames_nowait(encode_b64_frame(b"[", b"abcd", b"]", pair.server.frame_key))
            assert await pair.client.receive() == "[" + base64.b64encode(b"abcd").decode() + "]"


async def test_send_media_nowait_is_a_chunk_and_its_mark_as_their_own_frames() -> None:
    """A server's downlink chunk (native base64 framing) and the mark after it, each its own unmasked text frame."""
    import base64

    async with ws_pair() as pair:
        with trio.fail_after(5):
            assert pair.server.send_media_nowait([(b'{"media":"', b"\x00\xff\x10\x7f", b'"}}', '{"mark":"7"}')])
            assert not pair.server._backlog
            assert await pair.client.receive() == '{"media":"' + base64.b64encode(b"\x00\xff\x10\x7f").decode() + '"}}'
            assert await pair.client.receive() == '{"mark":"7"}'
            # A withheld mark (the stream's MAX_PENDING_MARKS): the chunk alone, no empty frame after it.
            assert pair.server.send_media_nowait([(b"[", b"\x01", b"]", "")])
            assert pair.server.send_media_nowait([(b"(", b"\x02", b")", "m")])
            assert [await pair.client.receive() for _ in range(3)] == ["[AQ==]", "(Ag==)", "m"]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.client.aclose)
                with pytest.raises(StreamClosed):
                    await pair.server.receive()  # answers the close
            with pytest.raises(StreamClosed):
                pair.server.send_media_nowait([(b"[", b"a", b"]", "late")])


async def test_send_media_nowait_takes_several_chunks_and_their_marks_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pacer's top-up: several chunks and their marks, in order, in one socket write; a withheld mark adds
    no frame."""
    import base64

    async with ws_pair() as pair:
        server, client = pair.server, pair.client
        writes: list[int] = []
        real_write = server._write_nowait

        def counting_write(data: bytes) -> bool:
            writes.append(len(data))
            return real_write(data)

        monkeypatch.setattr(server, "_write_nowait", counting_write)
        with trio.fail_after(5):
            parts = [(b"[", b"\x00\xff", b"]", "m1"), (b"(", b"\x02", b")", ""), (b"<", b"\x7f\x10\x20", b">", "m3")]
            assert server.send_media_nowait(parts)
            assert len(writes) == 1
            expected = ["[" + base64.b64encode(b"\x00\xff").decode() + "]", "m1", "(Ag==)",
                        "<" + base64.b64encode(b"\x7f\x10\x20").decode() + ">", "m3"]
            assert [await client.receive() for _ in range(5)] == expected


async def test_send_many_nowait_queues_on_a_full_socket_and_flush_keeps_the_order() -> None:
    async with ws_pair(small_buffers=True) as pair:
        client, server = pair.client, pair.server
        payload = "x" * 1000
        sent_now = queued = 0
        with trio.fail_after(10):
            for i in range(2000):  # ~2 MB: far more than the socket buffers hold
                if client.send_many_nowait([f"{i}:{payload}"]):
                    sent_now += 1
                else:
                    queued += 1
            assert sent_now > 0 and queued > 0 and client._backlog
            got: list[str | bytes] = []

            async def read_all() -> None:
                while len(got) < 2001:
                    got.append(await server.receive())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                await client.send("after the backlog")  # an ordinary send writes the backlog first
                await client.flush()  # nothing left: returns at once
        assert not client._backlog
        assert [str(m).split(":")[0] for m in got[:2000]] == [str(i) for i in range(2000)]
        assert got[2000] == "after the backlog"


async def test_send_media_nowait_queues_on_a_full_socket_behind_the_backlog_in_order() -> None:
    """A server's chunk+mark writes (the downlink) on a socket that fills: queued whole, in order, then flushed."""
    import base64

    async with ws_pair(small_buffers=True) as pair:
        client, server = pair.client, pair.server
        audio = bytes(range(256)) * 4
        sent_now = queued = 0
        with trio.fail_after(10):
            for i in range(500):  # ~2 MB of base64: far more than the socket buffers hold
                if server.send_media_nowait([(f"{i * 3 + j}:".encode(), audio, b"", f"mark {i * 3 + j}") for j in range(3)]):
                    sent_now += 1
                else:
                    queued += 1
            assert sent_now > 0 and queued > 0 and server._backlog
            got: list[str | bytes] = []

            async def read_all() -> None:
                while len(got) < 3001:
                    got.append(await client.receive())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                await server.send("after the backlog")  # an ordinary send writes the backlog first
        assert not server._backlog
        media = base64.b64encode(audio).decode()
        assert got[:3000] == [m for i in range(1500) for m in (f"{i}:{media}", f"mark {i}")]
        assert got[3000] == "after the backlog"


async def test_send_many_nowait_queues_behind_a_send_in_progress() -> None:
    async with ws_pair(small_buffers=True) as pair:
        client, server = pair.client, pair.server
        big = "y" * (4 << 20 >> 1)  # 2 MiB: the send blocks until the server reads
        got: list[str | bytes] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send, big)
                await trio.testing.wait_all_tasks_blocked()
                assert client._lock.locked()
                assert not client.send_many_nowait(["small"])  # queued: the big one holds the socket
                for _ in range(2):
                    got.append(await server.receive())
                    if len(got) == 1:
                        nursery.start_soon(client.flush)
        assert got == [big, "small"]


async def test_send_many_nowait_on_a_closed_connection_raises() -> None:
    async with ws_pair() as pair:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pair.client.aclose)
                with pytest.raises(Exception, match="1000"):
                    await pair.server.receive()  # answers the close
            with pytest.raises(WebSocketClosed):
                pair.client.send_many_nowait(["late"])


async def test_a_failing_handler_reports_to_its_error_callback(caplog: pytest.LogCaptureFixture) -> None:
    reactor = current_reactor()
    a, b = _socketpair()
    reported: list[Exception] = []

    def bad() -> None:
        b.recv(100)
        raise RuntimeError("broken handler")

    with a, b, caplog.at_level(logging.ERROR, "mediaserver.reactor"):
        reactor.add(b.fileno(), bad, reported.append)
        a.send(b"x")
        with trio.fail_after(5):
            while not reported:
                await trio.sleep(0.001)
        assert len(reactor) == 0
    assert [str(e) for e in reported] == ["broken handler"]


async def test_an_awaiting_send_keeps_its_place_ahead_of_later_nowait_sends() -> None:
    async with ws_pair(small_buffers=True) as pair:
        client, server = pair.client, pair.server
        big = "y" * (2 << 20)  # blocks its sender until the server reads
        got: list[str | bytes] = []
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send, big)
                await trio.testing.wait_all_tasks_blocked()
                nursery.start_soon(client.send, "second")  # waits for the lock
                await trio.testing.wait_all_tasks_blocked()
                assert not client.send_many_nowait(["third"])  # called after "second": must go after it
                for _ in range(3):
                    got.append(await server.receive())
        assert got == [big, "second", "third"]


class _TLSAtEndOfStream:
    """What TLSStream.receive_nowait gives when one read brought the last frame and the peer's close_notify."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.at_eof = False
        self.failed = False
        self.unsent = False

    def receive_nowait(self) -> bytes:
        data, self._data = self._data, b""
        self.at_eof = True
        return data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return b""


class _TLSFailedAfterData(_TLSAtEndOfStream):
    """One read brought a whole frame and then a record that failed its check: the data is given, the stream broke."""

    def receive_nowait(self) -> bytes:
        data, self._data = self._data, b""
        self.failed = True
        return data

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        raise trio.BrokenResourceError("TLS error: bad record mac")


@pytest.mark.parametrize("fake_tls", [_TLSAtEndOfStream, _TLSFailedAfterData])
async def test_read_nowait_hands_over_when_tls_saw_the_end_of_the_stream_with_data(fake_tls: type[_TLSAtEndOfStream]) -> None:
    """No readiness follows a close_notify, or a record that broke the stream, on a connection the peer keeps
    open and quiet: read_nowait must say so at once."""
    async with ws_pair() as pair:
        client = pair.client
        fake = fake_tls(frame_to("client", "the last message"))
        client._sock, client._tls, client._stream = None, fake, fake  # type: ignore[assignment]
        with trio.fail_after(5):
            assert not client.read_nowait()  # hand-off, although the frame was whole
            assert list(client.inbox) == ["the last message"]
            assert await client.receive() == "the last message"
            with pytest.raises(WebSocketClosed, match="1006"):
                await client.receive()

