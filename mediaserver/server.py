"""Run the app: Media Streams on our own socket code, everything else on Hypercorn's Trio worker.

We accept the TCP connections ourselves (one listener on the configured
host and port) and route each by its first request
(:class:`mediaserver.transport.listener.ConnectionRouter`): the Media
Streams WebSocket, ~100 messages a second per call, is served with wsproto
directly on the socket (:mod:`mediaserver.transport.ws_server`); every
other connection goes to Hypercorn's ``TCPServer`` with the Quart app,
exactly as Hypercorn's own worker would serve it.  :func:`_serve` is
Hypercorn 0.18's ``hypercorn.trio.run.worker_serve`` with that one
difference (its lifespan, worker context and graceful shutdown).
"""

from __future__ import annotations

import functools
import logging
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import h11
import trio
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map
from werkzeug.sansio.utils import get_host
from hypercorn.config import Config
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.statsd import StatsdLogger
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable, ASGISendEvent, Scope
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState, LifespanState
from hypercorn.utils import repr_socket_addr, wrap_app

from mediaserver.app import MEDIA_STREAM_PATH, create_app
from mediaserver.bridge.registry import CallManager
from mediaserver.config import Settings
from mediaserver.logs import quiet_accept_errors, shown
from mediaserver.protocol.twilio import DEFAULT_MAX_MESSAGE_BYTES
from mediaserver.records.recorder import Recorder, open_recorder
from mediaserver.transport.listener import ConnectionRouter, ReplayStream, watch_connection

__all__ = ["ListenError", "hypercorn_config", "serve"]

log = logging.getLogger("mediaserver")


class ListenError(OSError):
    """The configured host and port cannot be listened on (in use, no such address, not allowed)."""


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening, non-blocking TCP socket on ``host``:``port``, bound as Hypercorn binds; ListenError if it cannot be had.

    IPv6 when the host has a ``:`` (``::``, ``[::1]``), else IPv4 (a name
    such as ``localhost`` resolves to its IPv4 address; ``""`` is every
    interface).  The socket is closed again when binding or listening fails.
    """
    address = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc} (MEDIASERVER_HOST / MEDIASERVER_PORT)") from exc
    return sock


DRAIN_POLL_S = 0.1  # while draining: how often to look whether the calls have all ended
DRAIN_LAST_S = 0.5  # after the drain: what is left (calls past the deadline, a request in flight) gets this, then is cancelled
HTTP_SEND_LIMIT_S = 20.0  # an HTTP connection whose client reads nothing for this long is closed ...
HTTP_IDLE_LIMIT_S = 60.0  # ... and one that sends and receives nothing for this long (see watch_connection)
CLOSE_LIMIT_S = 2.0  # the shielded steps below (a timer's restart; closing the socket) take microseconds: a bound only


class _TCPServer(TCPServer):
    """Hypercorn's connection, with its idle timer re-armed after every response.

    Hypercorn re-arms the keep-alive timer (``Updated(idle=True)``) from the
    task that sent the response; Quart-Trio's other task for that request
    ends at that moment and cancels the request's task group, so the timer
    was never re-armed: a client that sent one request and then nothing
    held its connection (and a file descriptor) for ever.  Shielded, the
    re-arming completes and the connection closes after
    ``keep_alive_timeout`` as configured.  The same cancellation stopped
    the close after an answer that says ``Connection: close`` half-way
    (before the socket was closed): it is shielded too.
    """

    async def protocol_send(self, event: Event) -> None:
        if isinstance(event, Updated | Closed):  # (Closed: the close that follows a "Connection: close" answer)
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_LIMIT_S):
                await super().protocol_send(event)
        elif isinstance(event, RawData):
            try:
                await super().protocol_send(event)
            except trio.BusyResourceError:  # (the connection is closing meanwhile: as a closed one)
                await self.protocol.handle(Closed())
        else:
            await super().protocol_send(event)


_HOSTS = Map()  # (only to bind hosts to, as Quart does for every request)
BAD_HOST = b"malformed Host header\n"


def _host_ok(scheme: str, host: bytes | None) -> bool:
    """Whether werkzeug takes ``host`` (a Host header; None: there is none) as Quart will: the host werkzeug makes
    of the header (``get_host``: "" for one with characters no host has), bound to a URL map."""
    if host is None:
        return True
    try:
        _HOSTS.bind(get_host(scheme, host.decode("latin-1")))
    except (HTTPException, UnicodeError, ValueError):
        return False
    return True


def close_after_unread_body(app: ASGIFramework) -> ASGIFramework:
    """An HTTP answer sent before its request's body was all read says ``Connection: close``.

    Hypercorn would otherwise keep reading the rest of that body to reuse
    the connection -- a 404 at once, or the 408 of a body that trickles in,
    and the client's next byte every few seconds holds the connection and
    its file descriptor for as long as it likes (its declared length may be
    a megabyte).  Closed after the answer, it cannot.

    Also, ahead of Quart: a Host header werkzeug cannot bind (an empty or
    over-long label) is a 400 here, not a 500 with a traceback.
    """

    async def guarded(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if not _host_ok(scope.get("scheme", "http"), headers.get(b"host")):
            # (Quart builds the request's URL adapter outside its error handling: werkzeug's BadHost was a 500
            # and a traceback in the log, for any request, from anyone)
            await send({"type": "http.response.start", "status": 400, "headers": [
                (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(BAD_HOST)),
                (b"connection", b"close")]})  # fmt: skip
            await send({"type": "http.response.body", "body": BAD_HOST, "more_body": False})
            return
        unread = [headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers]

        async def receive_counting() -> ASGIReceiveEvent:
            event = await receive()
            if event["type"] == "http.disconnect" or (event["type"] == "http.request" and not event.get("more_body")):
                unread[0] = False
            return event

        async def send_closing(event: ASGISendEvent) -> None:
            if event["type"] == "http.response.start" and unread[0]:
                event = {**event, "headers": [*event.get("headers", ()), (b"connection", b"close")]}
            await send(event)

        await app(scope, receive_counting, send_closing)

    return guarded


def hypercorn_config(settings: Settings) -> Config:
    config = Config()
    config.bind = [f"{settings.host}:{settings.port}"]
    # graceful shutdown: stop accepting, let live calls run this long, then cancel them
    config.graceful_timeout = settings.drain_s
    config.websocket_max_message_size = DEFAULT_MAX_MESSAGE_BYTES
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def _first_signal(signals: AsyncIterator[int]) -> None:
    async for signum in signals:
        log.info("%s: draining calls (up to the drain limit; again to stop now), then stopping", signal.Signals(signum).name)
        return


async def _second_signal(signals: AsyncIterator[int], drain: trio.CancelScope) -> None:
    """While the server drains: a second SIGINT or SIGTERM ends the drain at once (what is left is cancelled)."""
    async for signum in signals:
        log.warning("%s again: stopping now, without waiting for the calls to end", signal.Signals(signum).name)
        drain.cancel()
        return


async def serve(
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[object]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until ``shutdown_trigger`` returns (default: SIGINT/SIGTERM); reports the bound URLs.

    Shutdown: refuse new calls, give live calls ``drain_s`` to finish while
    the listener stays open for their status callbacks, the streams of
    calls answered just before and the answers of outbound calls placed
    here (``/healthz`` says ``draining``, 503); then stop listening and
    cancel the rest; then the pre-opened model sessions are closed.
    Cancelling the caller's scope stops everything at once.  Call records
    (mediaserver.records) are opened first and closed last, after the
    records of the calls that were drained have been written.
    """
    quiet_accept_errors()  # (out of file descriptors, Trio's accept would log a traceback ten times a second)
    # The port first: a server that cannot listen (in use, no such address) stops before it creates anything.
    sock = listen_socket(settings.host, settings.port, hypercorn_config(settings).backlog)
    try:
        async with open_recorder(settings) as recorder:
            if shutdown_trigger is not None:
                await _serve(settings, shutdown_trigger, None, recorder, sock, task_status)
                return
            # One receiver for the whole run: a second signal during the drain is never left to the default action
            # (SIGTERM's would kill the process before the records are written).
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                await _serve(settings, functools.partial(_first_signal, signals),
                             functools.partial(_second_signal, signals), recorder, sock, task_status)
    finally:
        sock.close()


async def _serve(
    settings: Settings,
    shutdown_trigger: Callable[[], Awaitable[object]],
    stop_now: Callable[[trio.CancelScope], Awaitable[object]] | None,
    recorder: Recorder | None,
    sock: socket.socket,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    calls = CallManager(settings, recorder=recorder)
    config = hypercorn_config(settings)
    app = wrap_app(close_after_unread_body(create_app(settings, calls)), config.wsgi_max_body_size, "asgi")
    config.set_statsd_logger_class(StatsdLogger)
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(app, config, lifespan_state)
    context = WorkerContext(None)

    # (a Media Stream on a kept-alive connection is served here too: Twilio sends media every 20 ms, and a call
    # silent for idle_timeout_s ends anyway)
    idle_s = max(HTTP_IDLE_LIMIT_S, settings.idle_timeout_s + HTTP_IDLE_LIMIT_S / 2)

    async def hypercorn_connection(stream: ReplayStream) -> None:
        server = _TCPServer(app, config, context, ConnectionState(lifespan_state.copy()), stream)  # type: ignore[arg-type]  # a plain stream works
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(
                    watch_connection, stream, nursery.cancel_scope, idle_s=idle_s, send_s=HTTP_SEND_LIMIT_S
                ))  # fmt: skip
                await server.run()
                nursery.cancel_scope.cancel()  # (over: the watch with it)
        except* (h11.LocalProtocolError, h11.RemoteProtocolError) as group:
            # Hypercorn's h11 connection in its ERROR state fed more bytes (a client that sent data after an
            # upgrade Hypercorn refused, say): one line, not a traceback any client can repeat.
            # (the socket is closed already: by the watch, on its way out)
            log.info("HTTP connection ended on a protocol error: %s", shown(str(group.exceptions[0]), 200))

    router = ConnectionRouter(
        hypercorn_connection,
        calls.handle_stream,
        path=MEDIA_STREAM_PATH,
        auth_token=settings.twilio_auth_token,
        public_url=settings.public_url,
        instance_url=settings.instance_url,
        max_message_size=DEFAULT_MAX_MESSAGE_BYTES,
        head_timeout_s=config.keep_alive_timeout,
    )

    async with trio.open_nursery() as nursery:
        await nursery.start(calls.run)
        await nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as connections:
            listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
            bind = f"http://{repr_socket_addr(sock.family, sock.getsockname())}"
            await config.log.info(f"Running on {bind} (CTRL + C to quit)")
            task_status.started([bind])
            try:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(
                        functools.partial(trio.serve_listeners, router, listeners, handler_nursery=connections)
                    )
                    await shutdown_trigger()
                    # Draining: no new call, but the listener stays open while the calls end (up to drain_s), so
                    # Twilio's status callbacks for them are recorded, streams of calls answered just before still
                    # come, outbound calls placed here can still be answered, and /healthz says "draining".
                    calls.stop_accepting()
                    log.info("draining: %d live calls, %d waiting for their stream (at most %g s)",
                             calls.active, calls.pending, settings.drain_s)
                    with trio.move_on_after(settings.drain_s) as drain:
                        async with trio.open_nursery() as watching:
                            if stop_now is not None:
                                watching.start_soon(stop_now, drain)
                            while not calls.drained:
                                await trio.sleep(DRAIN_POLL_S)
                            watching.cancel_scope.cancel()
                    accepting.cancel_scope.cancel()  # stop accepting: the listeners close
            finally:
                await context.terminated.set()  # kept-alive HTTP connections close when idle
                # What is left -- calls past the drain deadline, a request in flight -- gets a moment, then is
                # cancelled (a call's record then says the shutdown cut it off).
                connections.cancel_scope.deadline = trio.current_time() + DRAIN_LAST_S
        await lifespan.wait_for_shutdown()
        nursery.cancel_scope.cancel()  # hypercorn's lifespan task and the pre-opened sessions
