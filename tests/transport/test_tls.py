"""The lean client TLS stream (mediaserver.transport.tls) against Trio's own TLS server.

What a provider link needs from it: the handshake and certificate checks
of the system's default context, bytes both ways intact under load and in
both directions at once, the end of the stream (``close_notify`` or a
ragged TCP close) as ``b""``, failures as ``BrokenResourceError``, and a
stream that refuses further use once a send was cancelled half-way.  The
end-to-end ``wss://`` call is ``tests/test_app.py::test_app_openai_call_pcmu_passthrough[wss]``.
"""

from __future__ import annotations

import functools
import random
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from mediaserver.transport.tls import TLSStream, open_tls_stream
from tests.fakes import fail_after
from tests.test_http_client import certificate, server_context  # noqa: F401  (certificate: a pytest fixture)

Handler = Callable[[trio.SSLStream[trio.SocketStream], trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def tls_server(certificate: tuple[Path, Path], handler: Handler) -> AsyncIterator[int]:  # noqa: F811
    """A Trio TLS server on 127.0.0.1 running ``handler(tls_stream, tcp_stream)`` per connection; yields the port."""
    context = server_context(certificate)

    async def serve(tcp: trio.SocketStream) -> None:
        stream = trio.SSLStream(tcp, context, server_side=True)
        try:
            await handler(stream, tcp)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def trusting(certificate: tuple[Path, Path]) -> ssl.SSLContext:  # noqa: F811
    return ssl.create_default_context(cafile=str(certificate[0]))


async def echo(stream: trio.SSLStream[trio.SocketStream], _: trio.SocketStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.aclose()


async def receive_exactly(stream: TLSStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(65536)
        assert chunk, f"end of stream after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


@fail_after(20)
async def test_tls_stream_echoes_every_size_and_both_ways_at_once(certificate: tuple[Path, Path]) -> None:  # noqa: F811
    rng = random.Random(7)
    async with tls_server(certificate, echo) as port:
        stream = await open_tls_stream("127.0.0.1", port, ssl_context=trusting(certificate))
        assert isinstance(stream, TLSStream)
        for size in (1, 300, 16_384, 70_000):
            payload = rng.randbytes(size)
            await stream.send_all(payload)
            assert await receive_exactly(stream, size) == payload
        # 4 MiB out while reading the echo back: sends block on a full socket while the receiver works
        blob = rng.randbytes(4 * 1024 * 1024)
        got = bytearray()

        async def reader() -> None:
            got.extend(await receive_exactly(stream, len(blob)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for at in range(0, len(blob), 300):  # provider-sized messages
                await stream.send_all(blob[at : at + 300])
        assert bytes(got) == blob
        await stream.aclose()
        with pytest.raises(trio.ClosedResourceError):
            await stream.send_all(b"x")


@fail_after(20)
async def test_tls_stream_concurrent_senders_keep_records_whole(certificate: tuple[Path, Path]) -> None:  # noqa: F811
    """Two tasks sending at once: every length-prefixed message arrives whole (records never interleave)."""
    async with tls_server(certificate, echo) as port:
        stream = await open_tls_stream("127.0.0.1", port, ssl_context=trusting(certificate))

        async def sender(tag: int) -> None:
            for n in range(200):
                body = bytes([tag]) * (n * 37 % 5000 + 1)
                await stream.send_all(struct.pack(">I", len(body)) + body)

        got: list[bytes] = []

        async def reader() -> None:
            buffer = b""
            while len(got) < 400:
                buffer += await stream.receive_some(65536)
                while len(buffer) >= 4 and len(buffer) >= 4 + struct.unpack(">I", buffer[:4])[0]:
                    size = struct.unpack(">I", buffer[:4])[0]
                    got.append(buffer[4 : 4 + size])
                    buffer = buffer[4 + size :]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            nursery.start_soon(sender, 1)
            nursery.start_soon(sender, 2)
        for tag in (1, 2):
            mine = [m for m in got if m[:1] == bytes([tag])]
            assert [len(m) for m in mine] == [n * 37 % 5000 + 1 for n in range(200)]
            assert all(m == bytes([tag]) * len(m) for m in mine)
        await stream.aclose()


@pytest.mark.parametrize("how", ["close_notify", "ragged"])
@fail_after(10)
async def test_tls_stream_end_of_stream_is_empty_bytes(how: str, certificate: tuple[Path, Path]) -> None:  # noqa: F811
    async def hang_up(stream: trio.SSLStream[trio.SocketStream], tcp: trio.SocketStream) -> None:
        await stream.send_all(b"bye")
        if how == "close_notify":
            await stream.aclose()
        else:  # TCP close with no close_notify, as many HTTPS servers do
            await tcp.aclose()

    async with tls_server(certificate, hang_up) as port:
        stream = await open_tls_stream("127.0.0.1", port, ssl_context=trusting(certificate))
        assert await receive_exactly(stream, 3) == b"bye"
        assert await stream.receive_some() == b""
        await stream.aclose()


@fail_after(10)
async def test_tls_stream_reset_is_broken_resource_for_sends(certificate: tuple[Path, Path]) -> None:  # noqa: F811
    async def reset(stream: trio.SSLStream[trio.SocketStream], tcp: trio.SocketStream) -> None:
        await stream.do_handshake()
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        await tcp.aclose()

    async with tls_server(certificate, reset) as port:
        stream = await open_tls_stream("127.0.0.1", port, ssl_context=trusting(certificate))
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):  # the RST may arrive after a few sends
                await stream.send_all(b"x" * 1000)
                await trio.sleep(0.01)
        # The send reported the reset; reading goes on (what came before it would be delivered) and ends.
        assert await stream.receive_some() == b""
        with pytest.raises(trio.BrokenResourceError):
            await stream.send_all(b"x")
        await stream.aclose()


@fail_after(10)
async def test_tls_stream_refuses_untrusted_or_misnamed_servers(certificate: tuple[Path, Path]) -> None:  # noqa: F811
    async with tls_server(certificate, echo) as port:
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
            await open_tls_stream("127.0.0.1", port)  # the system CAs do not know our certificate
        with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
            await open_tls_stream("localhost", port, ssl_context=trusting(certificate))  # issued for 127.0.0.1 only


@fail_after(10)
async def test_tls_stream_is_unusable_after_a_send_cancelled_half_way(certificate: tuple[Path, Path]) -> None:  # noqa: F811
    async def stall(stream: trio.SSLStream[trio.SocketStream], _: trio.SocketStream) -> None:
        await stream.do_handshake()
        await trio.sleep_forever()  # never reads: the client's sends fill the socket

    async with tls_server(certificate, stall) as port:
        stream = await open_tls_stream("127.0.0.1", port, ssl_context=trusting(certificate))
        with trio.move_on_after(0.3) as scope:
            await stream.send_all(b"x" * (16 * 1024 * 1024))
        assert scope.cancelled_caught
        with pytest.raises(trio.BrokenResourceError, match="cancelled part-way"):
            await stream.send_all(b"more")
        await stream.aclose()


# -- the non-blocking calls (a reactor handler's) -------------------------------------------


async def receive_nowait_exactly(stream: TLSStream, size: int) -> bytes:
    data = bytearray()
    with trio.fail_after(10):
        while len(data) < size:
            await trio.lowlevel.wait_readable(stream.raw_socket)
            chunk = stream.receive_nowait()
            assert chunk != b"", f"end of stream after {len(data)} of {size} bytes"
            if chunk is not None:
                data += chunk
    return bytes(data)


@fail_after(20)
async def test_tls_nowait_calls_carry_every_byte_in_order(certificate: tuple[Path, Path]) -> None:  # noqa: F811
    rng = random.Random(11)
    async with tls_server(certificate, echo) as port:
        stream = await open_tls_stream("127.0.0.1", port, ssl_context=trusting(certificate))
        assert stream.receive_nowait() is None  # nothing yet
        for size in (1, 300, 16_384, 70_000):
            payload = rng.randbytes(size)
            assert stream.send_nowait(payload) or stream.unsent
            await stream.flush()
            assert not stream.unsent
            assert await receive_nowait_exactly(stream, size) == payload
        # many sends without waiting while nobody reads the echo: the socket fills, ciphertext waits, in order
        parts = [rng.randbytes(1000) for _ in range(4000)]
        got = bytearray()
        queued = False
        async with trio.open_nursery() as nursery:

            async def read_back() -> None:
                got.extend(await receive_nowait_exactly(stream, 4_000_000))

            for part in parts:
                queued |= not stream.send_nowait(part)
            assert queued and stream.unsent
            nursery.start_soon(read_back)
            await stream.flush()
        assert bytes(got) == b"".join(parts)
        await stream.aclose()


@fail_after(10)
async def test_tls_nowait_send_while_a_send_holds_the_lock_goes_after_it(certificate: tuple[Path, Path]) -> None:  # noqa: F811
    async with tls_server(certificate, echo) as port:
        stream = await open_tls_stream("127.0.0.1", port, ssl_context=trusting(certificate))
        stream._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        big = b"a" * (3 << 20)
        got = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, big)  # blocks: the echo is not read yet
            await trio.testing.wait_all_tasks_blocked()
            assert stream._lock.locked()
            assert not stream.send_nowait(b"b" * 10)  # encrypted now, written by the lock holder after its own

            async def read_back() -> None:
                got.extend(await receive_nowait_exactly(stream, len(big) + 10))

            nursery.start_soon(read_back)
        assert bytes(got) == big + b"b" * 10
        assert not stream.unsent
        await stream.aclose()


@pytest.mark.parametrize("how", ["close_notify", "tcp_close"])
@fail_after(10)
async def test_tls_receive_nowait_reports_the_end_of_the_stream(certificate: tuple[Path, Path], how: str) -> None:  # noqa: F811
    async def goodbye(stream: trio.SSLStream[trio.SocketStream], tcp: trio.SocketStream) -> None:
        await stream.send_all(b"last words")
        if how == "close_notify":
            await stream.aclose()
        else:
            await tcp.aclose()

    async with tls_server(certificate, goodbye) as port:
        stream = await open_tls_stream("127.0.0.1", port, ssl_context=trusting(certificate))
        assert await receive_nowait_exactly(stream, 10) == b"last words"
        with trio.fail_after(5):
            while (chunk := stream.receive_nowait()) != b"":
                assert chunk is None
                await trio.lowlevel.wait_readable(stream.raw_socket)
        assert stream.receive_nowait() == b""  # and stays so
        assert await stream.receive_some() == b""
        await stream.aclose()


@fail_after(10)
async def test_tls_close_notify_on_a_connection_left_open_is_seen_by_receive_nowait(
    certificate: tuple[Path, Path],  # noqa: F811
) -> None:
    """The peer says close_notify but keeps TCP open (waiting for ours): no more readiness will come, so
    ``at_eof`` must tell the caller, with the data that came with it."""

    async def last_words_then_unwrap(stream: trio.SSLStream[trio.SocketStream], _: trio.SocketStream) -> None:
        await stream.send_all(b"last words")
        await stream.unwrap()  # sends close_notify, then waits for ours with the TCP connection open

    async with tls_server(certificate, last_words_then_unwrap) as port:
        stream = await open_tls_stream("127.0.0.1", port, ssl_context=trusting(certificate))
        got = bytearray()
        with trio.fail_after(5):
            while not stream.at_eof:
                await trio.lowlevel.wait_readable(stream.raw_socket)
                chunk = stream.receive_nowait()
                if chunk:
                    got += chunk
        assert bytes(got) == b"last words"
        assert stream.receive_nowait() == b""
        await stream.aclose()


@pytest.mark.parametrize("read", ["receive_some", "receive_nowait"])
@fail_after(10)
async def test_tls_what_the_peer_sent_before_it_went_is_read_after_a_send_failed(
    read: str, certificate: tuple[Path, Path]  # noqa: F811
) -> None:
    """A peer that says goodbye and closes: our next sends fail (the reset), its goodbye is still read."""
    gone = trio.Event()

    async def goodbye(stream: trio.SSLStream[trio.SocketStream], tcp: trio.SocketStream) -> None:
        await stream.send_all(b"goodbye")
        await stream.aclose()  # close_notify, then the socket closes: what we send next is answered with a reset
        gone.set()

    async with tls_server(certificate, goodbye) as port:
        stream = await open_tls_stream("127.0.0.1", port, ssl_context=trusting(certificate))
        await gone.wait()
        with pytest.raises(trio.BrokenResourceError):
            for _ in range(100):  # the first send may still be taken; the reset makes a later one fail
                stream.send_nowait(b"x" * 1000) if read == "receive_nowait" else await stream.send_all(b"x" * 1000)
                await trio.sleep(0.01)
        assert not stream.failed  # the read side is intact
        if read == "receive_some":
            assert await receive_exactly(stream, 7) == b"goodbye"
            assert await stream.receive_some() == b""
        else:
            assert await receive_nowait_exactly(stream, 7) == b"goodbye"
            assert stream.receive_nowait() == b""
        with pytest.raises(trio.BrokenResourceError):  # sending stays refused
            await stream.send_all(b"late")
        await stream.aclose()
