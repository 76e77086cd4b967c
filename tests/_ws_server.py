"""Loopback server plumbing shared by the fakes of vendor servers.

Every fake (OpenAI, Gemini, Deepgram, AssemblyAI, ElevenLabs, the PCM model)
is a WebSocket server on 127.0.0.1 at a free port that runs, per connection,
the vendor's side of the protocol and a test *script* beside it.  That part
is the same for all of them and lives here:

* :class:`Changes`: "something happened" notification (``touch`` /
  ``wait_for(predicate)``), so tests wait for a state instead of sleeping;
* :func:`listen_loopback` and :class:`LoopbackServer`: the TCP listener
  (``await nursery.start(server.run)``, then :attr:`LoopbackServer.port`);
  the HTTP fake of Twilio's REST API uses the listener too;
* :class:`LoopbackWsServer`: that listener doing the WebSocket handshake;
* :func:`serve_session`: run a connection's protocol loop and its script,
  stop the script when the client goes away, close the socket at the end;
* :class:`FakeConnection`: the server side of one connection (send lock,
  receive loop, and the record of how the client closed it);
* :func:`assert_no_extra`: the strict "no unknown keys" check on a vendor
  SDK's models, which accept unknown keys where the real servers do not.

What differs per vendor (message validation, replies) stays in each fake.  A
failing handler (an invalid client message) raises out of ``run`` and so
fails the test that runs the server.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import pydantic
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, wrap_server_stream

__all__ = [
    "Changes",
    "FakeConnection",
    "FakeWsSession",
    "LoopbackServer",
    "LoopbackWsServer",
    "SessionServer",
    "assert_no_extra",
    "listen_loopback",
    "serve_session",
]

S = TypeVar("S")


def assert_no_extra(value: object, path: str = "$") -> None:
    """Fail on any key an SDK model did not declare, at every depth (the models are ``extra="allow"``)."""
    if isinstance(value, pydantic.BaseModel):
        assert not value.model_extra, f"unknown keys at {path}: {sorted(value.model_extra)}"
        for name in type(value).model_fields:
            assert_no_extra(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for index, element in enumerate(value):
            assert_no_extra(element, f"{path}[{index}]")


class Changes:
    """A notification tasks can wait on: :meth:`touch` wakes every :meth:`wait_for`."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def touch(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true (checked after every :meth:`touch`)."""
        while not predicate():
            await self._event.wait()


async def listen_loopback(nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[object]]) -> int:
    """Serve TCP connections with ``handler`` on 127.0.0.1 at a free port, in ``nursery``; the port."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


class LoopbackServer:
    """A TCP server on 127.0.0.1, a free port; subclasses serve each connection.

    Start it with ``await nursery.start(server.run)``; :attr:`port` is set by then.
    """

    def __init__(self) -> None:
        self.port: int | None = None
        self._changes = Changes()
        self.tls: ssl.SSLContext | None = None  # a server context: serve wss:// (LoopbackWsServer)

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.port = await listen_loopback(nursery, self._serve_connection)
            task_status.started(self)

    def touch(self) -> None:
        """Something changed (a connection came, a message arrived): wake the waiters."""
        self._changes.touch()

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        await self._changes.wait_for(predicate)

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        raise NotImplementedError


class LoopbackWsServer(LoopbackServer):
    """A :class:`LoopbackServer` that does the WebSocket handshake and calls :meth:`_handle`.

    ``serve_tcp`` closes the TCP stream when :meth:`_handle` returns; the
    stream is passed on so that a fake can drop it without a close handshake.
    """

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            wire: trio.abc.Stream = stream if self.tls is None else trio.SSLStream(stream, self.tls, server_side=True)
            request = await wrap_server_stream(nursery, wire)
            await self._handle(request, stream)
            nursery.cancel_scope.cancel()  # the connection's reader task

    async def _handle(self, request: WebSocketRequest, stream: trio.SocketStream) -> None:
        raise NotImplementedError


async def serve_session(
    ws: WebSocketConnection,
    protocol: Callable[[], Awaitable[None]],
    script: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run one connection: ``protocol`` (returns when the client has gone) and ``script`` beside it.

    When ``protocol`` returns, the script is cancelled; at the end the
    WebSocket is closed (within 1 s, in case the client no longer answers).
    """
    try:
        async with trio.open_nursery() as nursery:

            async def serve_protocol() -> None:
                await protocol()
                nursery.cancel_scope.cancel()  # the client has gone: stop the script

            nursery.start_soon(serve_protocol)
            if script is not None:
                nursery.start_soon(script)
    finally:
        with trio.move_on_after(1):
            await ws.aclose()


class FakeConnection:
    """The server side of one fake WebSocket connection.

    Tests read :attr:`closed` / :attr:`closed_at_s` / :attr:`close_code` (how
    and when the client closed it) and wait with :meth:`wait_for`; every
    :meth:`touch` also wakes the waiters of the whole server.
    """

    def __init__(self, server: LoopbackServer, ws: WebSocketConnection) -> None:
        self.server = server
        self.ws = ws
        self.closed = trio.Event()
        self.closed_at_s: float | None = None
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self._changes = Changes()
        self._send_lock = trio.StrictFIFOLock()
        self._resume_reads: trio.Event | None = None

    def touch(self) -> None:
        self._changes.touch()
        self.server.touch()

    def hold_reads(self) -> None:
        """Stop taking client messages (the socket fills up, as with a slow model) until :meth:`resume_reads`."""
        self._resume_reads = trio.Event()

    def resume_reads(self) -> None:
        if self._resume_reads is not None:
            self._resume_reads.set()
            self._resume_reads = None

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        await self._changes.wait_for(predicate)

    async def send_message(self, message: str | bytes) -> None:
        """Send one frame; concurrent senders (protocol loop, script) never interleave."""
        async with self._send_lock:
            await self.ws.send_message(message)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        await self.ws.aclose(code, reason)

    def record_close(self, exc: ConnectionClosed) -> None:
        """Note that the client closed the connection (time and close code)."""
        self.closed_at_s = trio.current_time()
        self.close_code = None if exc.reason is None else exc.reason.code
        self.close_reason = None if exc.reason is None else exc.reason.reason
        self.closed.set()
        self.touch()

    async def receive_until_closed(self, handle: Callable[[str | bytes], Awaitable[None]]) -> None:
        """Feed every client message to ``handle`` until the client closes."""
        while True:
            if self._resume_reads is not None:
                await self._resume_reads.wait()
            try:
                message = await self.ws.get_message()
            except ConnectionClosed as exc:
                self.record_close(exc)
                return
            await handle(message)
            self.touch()


class FakeWsSession(FakeConnection):
    """A :class:`FakeConnection` that keeps its request's path and headers (lower-case names)."""

    def __init__(
        self, server: LoopbackServer, request: WebSocketRequest, ws: WebSocketConnection, stream: trio.SocketStream
    ) -> None:
        super().__init__(server, ws)
        self.stream = stream
        self.path = request.path
        self.headers = {k.decode().lower(): v.decode() for k, v in request.headers}

    async def send_text(self, text: str) -> None:
        await self.send_message(text)


class SessionServer(LoopbackWsServer, Generic[S]):
    """A WebSocket server at ``ws://127.0.0.1:<port><path>``: ``make_session`` builds each
    connection's protocol object, whose ``run()`` serves it; ``script`` runs beside it.
    """

    path = "/"

    def __init__(
        self,
        make_session: Callable[[SessionServer[S], WebSocketRequest, WebSocketConnection, trio.SocketStream], S],
        script: Callable[[S], Awaitable[None]] | None = None,
    ) -> None:
        super().__init__()
        self._make_session = make_session
        self.script = script
        self.sessions: list[S] = []

    @property
    def url(self) -> str:
        assert self.port is not None, "start the server first: await nursery.start(server.run)"
        return f"ws://127.0.0.1:{self.port}{self.path}"

    async def session(self, index: int = 0) -> S:
        """The ``index``-th connection (waits for it)."""
        await self.wait_for(lambda: len(self.sessions) > index)
        return self.sessions[index]

    async def _handle(self, request: WebSocketRequest, stream: trio.SocketStream) -> None:
        ws = await request.accept()
        session = self._make_session(self, request, ws, stream)
        self.sessions.append(session)
        self.touch()
        script = self.script
        await serve_session(
            ws,
            session.run,  # type: ignore[attr-defined]
            None if script is None else functools.partial(script, session),
        )
