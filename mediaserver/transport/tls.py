"""Client TLS for provider links: the stdlib's ``SSLObject`` over the raw socket, no per-send scheduler trips.

Why: a provider link sends 50 small messages a second per call, and
``trio.SSLStream.send_all`` costs ~26 µs of CPU for a 300-byte message on the
bench machine against ~8 µs for the same encryption with ``SSLObject`` and a
direct ``send`` (``bench/tls_send.py``): Trio's stream takes two internal
locks, checkpoints and moves every record through its own buffers.  Here a
send encrypts into a memory BIO and writes the ciphertext straight to the
socket; when the kernel takes it whole (nearly always) nothing yields.

Semantics are those of ``trio.open_ssl_over_tcp_stream(...,
https_compatible=True)`` as the provider links use it:

* :func:`open_tls_stream` connects and completes the handshake before it
  returns; certificate or hostname failures raise :class:`ssl.SSLError`
  (an ``OSError``), as a refused connection does;
* :meth:`TLSStream.receive_some` returns decrypted bytes, and ``b""`` at the
  end of the stream, whether the peer sent ``close_notify`` or just closed
  the TCP connection (a "ragged" EOF, which HTTPS clients accept);
* any other TLS failure, or a peer that resets the connection, raises
  :class:`trio.BrokenResourceError`; after a send was cancelled half-way,
  the stream is broken (the peer saw part of a record) and every later call
  raises; a write the socket refuses (the peer has gone) makes every later
  send raise, but reading goes on: what the peer sent before it went is
  still delivered, then the end of the stream (or the reset);
* :meth:`TLSStream.aclose` sends ``close_notify`` (best effort) and closes
  the socket.

Every write of ciphertext -- application data, and whatever reading
produced (TLS 1.3 post-handshake messages, alerts) -- happens under one
FIFO lock with the memory BIO read inside it, so records reach the wire in
the order OpenSSL produced them.  One task at a time may receive.

For a reader driven by socket readiness (:mod:`mediaserver.transport.reactor`)
there are non-blocking twins: :meth:`TLSStream.receive_nowait` (one
non-blocking read, everything it completes decrypted) and
:meth:`TLSStream.send_nowait` (encrypt now; write what the socket takes when
no one holds the write lock).  Ciphertext a non-blocking send could not
write waits -- before anything encrypted later -- for the next send or
:meth:`TLSStream.flush`; :attr:`TLSStream.unsent` says whether some does.
"""

from __future__ import annotations

import os
import socket
import ssl

import trio

from mediaserver._locks import acquire

__all__ = ["TLSStream", "open_tls_stream"]

RECEIVE_BYTES = 64 * 1024


class TLSStream(trio.abc.Stream):
    """TLS over a connected :class:`trio.SocketStream` (see the module docstring)."""

    def __init__(self, transport: trio.SocketStream, context: ssl.SSLContext, server_hostname: str) -> None:
        raw = getattr(transport.socket, "_sock", None)
        if not isinstance(raw, socket.socket):
            raise TypeError("TLSStream needs a trio.SocketStream over a stdlib socket")
        self.transport = transport
        self._sock = raw
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname)
        self._lock = trio.StrictFIFOLock()
        self._broken: str | None = None  # nothing more can be read or written
        self._unwritable: str | None = None  # a write failed (the peer reset): what it sent before can still be read
        self._closed = False
        self._unsent = b""  # ciphertext taken from the BIO but not yet on the wire (goes before the BIO's)
        self._eof = False  # receive_nowait saw the end of the stream

    # -- the wire ----------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the TLS stream is closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(self._broken)

    def _check_write(self) -> None:
        self._check()
        if self._unwritable is not None:
            raise trio.BrokenResourceError(self._unwritable)

    def _write_failed(self, exc: OSError) -> trio.BrokenResourceError:
        # (the socket's read side may still hold what the peer sent before it went: reads go on)
        self._unwritable = f"the connection failed: {exc}"
        return trio.BrokenResourceError(self._unwritable)

    def _encrypt(self, data: bytes | bytearray | memoryview) -> None:
        """Into the TLS session; its records wait in the outgoing BIO."""
        try:
            self._tls.write(data)
        except ssl.SSLError as exc:  # a closed or failed TLS session (renegotiation is not offered)
            self._broken = f"TLS error: {exc}"
            raise trio.BrokenResourceError(self._broken) from exc

    @property
    def raw_socket(self) -> socket.socket:
        """The TCP socket under the TLS session (to watch for readiness)."""
        return self._sock

    @property
    def buffered_in(self) -> bool:
        """Input read from the socket and not yet taken: ciphertext (:meth:`receive_some` decrypts one record
        per call) or plaintext.  The socket's readiness does not report it."""
        return self._incoming.pending > 0 or self._tls.pending() > 0

    @property
    def at_eof(self) -> bool:
        """True once :meth:`receive_nowait` has seen the end of the stream (the socket may stay open and quiet)."""
        return self._eof

    @property
    def failed(self) -> bool:
        """True once the stream broke (a TLS error, a failed socket): the next call raises."""
        return self._broken is not None

    @property
    def unsent_bytes(self) -> int:
        """How much ciphertext waits for the socket."""
        return len(self._unsent) + self._outgoing.pending

    @property
    def unsent(self) -> bool:
        """True while ciphertext waits for :meth:`flush` (or the next send)."""
        return bool(self._unsent or self._outgoing.pending)

    async def flush(self) -> None:
        """Write every ciphertext byte still waiting (see :meth:`send_nowait`)."""
        self._check_write()
        await self._write_out()

    def send_nowait(self, data: bytes) -> bool:
        """Encrypt ``data`` now and write what the socket takes: True if all of it is on the wire.

        False: the rest waits (in order) for :meth:`flush` or the next send
        -- also when another task holds the write lock.  Raises as
        :meth:`send_all` does.
        """
        self._check_write()
        self._encrypt(data)
        if self._lock.locked():
            return False
        return self._send_now()

    def _send_now(self) -> bool:
        """Write waiting ciphertext without blocking (no task holds the lock); True if none is left."""
        data = self._unsent + self._outgoing.read()
        self._unsent = b""
        if not data:
            return True
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise self._write_failed(exc) from exc
        if sent < len(data):
            self._unsent = data[sent:]
            return False
        return True

    def receive_nowait(self) -> bytes | None:
        """What can be decrypted now, without blocking: bytes, None if nothing yet, b"" at the end of the stream.

        One non-blocking read from the socket, then every whole record is
        decrypted (nothing decrypted is left inside the TLS object, so the
        socket's readiness says all there is to say).  What reading
        produced for the peer (a TLS 1.3 key update's answer) is written
        at once if the write lock is free; :attr:`unsent` tells otherwise.
        """
        self._check()
        if not self._eof:
            try:
                data = self._sock.recv(RECEIVE_BYTES)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError as exc:
                self._broken = f"the connection failed: {exc}"
                raise trio.BrokenResourceError(self._broken) from exc
            if data == b"":
                self._incoming.write_eof()
            elif data:
                self._incoming.write(data)
        parts: list[bytes] = []
        while True:
            try:
                chunk = self._tls.read(RECEIVE_BYTES)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or a ragged EOF
                self._eof = True
                break
            except ssl.SSLError as exc:
                self._broken = f"TLS error: {exc}"
                if parts:  # what came before the failure is delivered; the next call raises
                    break
                raise trio.BrokenResourceError(self._broken) from exc
            if not chunk:  # close_notify (the ssl module returns b"" for it)
                self._eof = True
                break
            parts.append(chunk)
        if self._outgoing.pending and not self._lock.locked() and self._broken is None and self._unwritable is None:
            try:
                self._send_now()
            except trio.BrokenResourceError:
                if not parts:
                    raise
        if parts:
            return b"".join(parts)
        return b"" if self._eof else None

    async def _write_out(self) -> None:
        """Send every pending ciphertext byte, in order (takes the write lock)."""
        if not self.unsent:
            return
        lock = self._lock
        await acquire(lock)
        try:
            await self._send_pending()
        finally:
            lock.release()

    async def _send_pending(self) -> None:
        # caller holds the lock; also sends what send_nowait encrypted meanwhile
        while True:
            data = self._unsent + self._outgoing.read()
            self._unsent = b""
            if not data:
                return
            await self._send_ciphertext(data)

    async def _send_ciphertext(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = self._sock.send(view)
                except (BlockingIOError, InterruptedError):
                    await trio.lowlevel.wait_writable(self._sock)
                    continue
                view = view[sent:]
                if view:
                    await trio.lowlevel.wait_writable(self._sock)
        except OSError as exc:
            raise self._write_failed(exc) from exc
        except BaseException:  # cancelled part-way: the peer has part of a record
            if view:
                self._broken = "a send was cancelled part-way; the TLS stream is unusable"
            raise

    async def _read_in(self) -> bool:
        """Read ciphertext from the socket into the TLS object; False at the TCP end of stream."""
        while True:
            await trio.lowlevel.wait_readable(self._sock)
            try:
                data = self._sock.recv(RECEIVE_BYTES)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:  # a reset
                self._broken = f"the connection failed: {exc}"
                raise trio.BrokenResourceError(self._broken) from exc
            if not data:
                self._incoming.write_eof()
                return False
            self._incoming.write(data)
            return True

    # -- the stream --------------------------------------------------------------

    async def do_handshake(self) -> None:
        """Run the TLS handshake; certificate and protocol failures raise :class:`ssl.SSLError`."""
        while True:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                await self._write_out()
                if not await self._read_in():
                    raise ssl.SSLEOFError("the server closed the connection during the TLS handshake") from None
                continue
            await self._write_out()
            return

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_write()
        lock = self._lock
        await acquire(lock)
        try:
            if data:
                self._encrypt(data)
            await self._send_pending()
        finally:
            lock.release()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.wait_writable(self._sock)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        self._check()
        size = max_bytes or RECEIVE_BYTES
        if self._eof:  # (receive_nowait saw it)
            return b""
        while True:
            try:
                return self._tls.read(size)
            except ssl.SSLWantReadError:
                if self._unwritable is None:
                    await self._write_out()  # what reading produced (e.g. a key update's answer)
                await self._read_in()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):  # close_notify, or a ragged EOF
                return b""
            except ssl.SSLError as exc:
                self._broken = f"TLS error: {exc}"
                raise trio.BrokenResourceError(self._broken) from exc

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._broken is None and self._unwritable is None:
                with trio.move_on_after(0.5):  # best effort: the peer need not answer
                    try:
                        self._tls.unwrap()
                    except (ssl.SSLWantReadError, ssl.SSLError):
                        pass
                    await self._write_out()
        except (trio.BrokenResourceError, OSError):
            pass
        finally:
            await self.transport.aclose()


_CLIENT_CONTEXTS: dict[tuple[str | None, str | None], ssl.SSLContext] = {}


def client_context() -> ssl.SSLContext:
    """The default client context (the system CAs, hostname check, no TLS 1.2 renegotiation), made once.

    Loading the system CA bundle takes tens of milliseconds, in the event
    loop: made for every model connection or REST request, it would hold up
    every live call that long.  One context serves every connection (an
    ``SSLContext`` may be shared); a new one is made only when
    ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` change (tests, a deployment's own
    CA).  The server makes it at start, before any call.
    """
    key = (os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))
    context = _CLIENT_CONTEXTS.get(key)
    if context is None:
        context = ssl.create_default_context()
        context.options |= ssl.OP_NO_RENEGOTIATION
        _CLIENT_CONTEXTS.clear()
        _CLIENT_CONTEXTS[key] = context
    return context


async def open_tls_stream(host: str, port: int, *, ssl_context: ssl.SSLContext | None = None) -> TLSStream:
    """Connect to ``host:port`` and complete a TLS handshake (default: the system CAs and hostname check).

    The default context refuses TLS 1.2 renegotiation: a server's request
    for it mid-stream would make a later write need a read first, which the
    non-blocking writes here do not do (TLS 1.3 has no renegotiation).
    """
    context = ssl_context if ssl_context is not None else client_context()
    transport = await trio.open_tcp_stream(host, port)
    stream = TLSStream(transport, context, host)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(transport)
        raise
    return stream
