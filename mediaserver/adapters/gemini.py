"""Settings -> Gemini Live session, kept alive across ``goAway`` by session resumption.

The bridge holds one :class:`GeminiLink` for the whole call.  Underneath it,
one or more WebSocket connections (each a
:func:`~mediaserver.transport.provider_ws.open_provider_link` around its own
:class:`~mediaserver.protocol.providers.gemini.GeminiLiveSession` core) come
and go:

* The first connection is open and has answered ``setupComplete`` before
  :func:`open_link` yields, so a refused or unreachable endpoint fails the
  open (``ProviderClosed``).
* When the active connection closes unexpectedly after the server gave us
  a resumable handle, or says ``goAway``, the link *switches*.  After a
  ``goAway`` it first waits, going on as before on the old connection,
  until resuming would lose nothing (:attr:`GeminiLiveSession.resumable_now`:
  no turn under way, no function call awaiting its result, a fresh
  resumable handle) or until ``timeLeft`` less ``GOAWAY_MARGIN_S`` -- so a
  reply the caller is hearing is not cut off, and the resumed session
  knows all of it.  A switch opens a new
  connection whose ``setup`` carries ``sessionResumption.handle``, waits for
  its ``setupComplete`` (within the connect timeout), makes it the active
  one, and then retires the old one: what its reader has already read still
  reaches the bridge, then the socket is closed (close handshake).
* From the moment a switch begins until the new connection is live, commands
  from the bridge -- caller audio, tool results -- are **buffered** and sent,
  in order, on the new connection right after its ``setupComplete``.
  Nothing is sent on the old connection once a switch begins, so no caller
  audio is lost or sent twice; the model's audio keeps arriving from the old
  connection until it is retired.  The buffer is bounded in time by the
  connect timeout, not in size.
* A switch that fails (cannot connect, the handle is refused, no
  ``setupComplete`` in time) ends the call: the bridge sees ``ProviderClosed``.
  So does a close without a resumable handle, and a malformed message.

All connection tasks run in a nursery owned by :func:`open_link`'s
``async with``; leaving it closes every socket (each within
``disconnect_timeout_s`` = 1 s).  The link is specific to Gemini's
resumption protocol, so it lives here rather than in ``mediaserver.transport``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from mediaserver.bridge.link import AgentOptions, ProviderClosed
from mediaserver.config import Settings
from mediaserver.protocol.providers.base import (
    AudioFormat,
    ProviderCommand,
    ProviderEvent,
    SessionReady,
)
from mediaserver.protocol.providers.gemini import GeminiLiveConfig, GeminiLiveSession, GoAway, SessionState
from mediaserver.transport.provider_ws import WebSocketLink, open_provider_link

__all__ = ["GeminiLink", "gemini_config", "open_link"]

log = logging.getLogger("mediaserver.provider")

NAME = "gemini"
GOAWAY_MARGIN_S = 5.0  # after goAway, switch this long before the server's timeLeft at the latest


def gemini_config(settings: Settings, agent: AgentOptions | None = None) -> GeminiLiveConfig:
    """The first connection's configuration, from the settings and the call's agent options."""
    agent = agent or AgentOptions.from_settings(settings)
    greeting = agent.greeting
    return GeminiLiveConfig(
        model=settings.gemini_model,
        instructions=agent.instructions,
        voice=settings.gemini_voice,
        tools=agent.tools,
        greeting=f'Greet the caller by saying: "{greeting}"' if greeting else None,
    )


@dataclass(eq=False)
class _Connection:
    """One WebSocket connection of the link."""

    number: int
    session: GeminiLiveSession
    ws: WebSocketLink | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # cancel = drop at once (the link has ended)
    closed: str | None = None  # why its reader saw it close (before it went live: the switch to it failed)
    retired: bool = False  # replaced: its reader hands over what it has read, then stops
    waiting: trio.CancelScope | None = None  # the reader's wait for the socket, cancelled to retire it
    done: trio.Event = field(default_factory=trio.Event)  # its reader has stopped


class GeminiLink:
    """The :class:`~mediaserver.bridge.link.ProviderLink` of a Gemini call (see the module docstring)."""

    name = NAME

    def __init__(self, settings: Settings, nursery: trio.Nursery) -> None:
        self._settings = settings
        self._nursery = nursery
        self._headers = [("x-goog-api-key", settings.gemini_api_key or "")]
        # Events for the bridge.  Capacity 0: a connection's reader waits for
        # the bridge, exactly as it would on a single socket.
        self._events_in, self._events_out = trio.open_memory_channel[ProviderEvent](0)
        self._send_lock = trio.StrictFIFOLock()
        self._active: _Connection | None = None
        self._switching = True  # until the first setupComplete
        self._backlog: list[ProviderCommand] = []
        self._resume = trio.Event()
        self._event_read = trio.Event()  # set after each event of the active connection (a goAway waits on them)
        self._ended: str | None = None
        self._ended_how: dict[str, bool] = {}  # ProviderClosed's orderly/broken for how the link ended
        self.connections = 0
        self.resumptions = 0
        self._bridge_reads = False  # the bridge reads this link: each connection's liveness is watched (WebSocketLink.reading)

    # -- ProviderLink --------------------------------------------------------

    @property
    def input_format(self) -> AudioFormat:
        assert self._active is not None
        return self._active.session.input_format

    @property
    def output_format(self) -> AudioFormat:
        assert self._active is not None
        return self._active.session.output_format

    async def send(self, command: ProviderCommand) -> None:
        """Send on the active connection, or buffer while no connection is ready."""
        async with self._send_lock:
            if self._ended is not None:
                raise ProviderClosed(self._ended, **self._ended_how)
            active = self._active
            if self._switching or active is None or active.ws is None:
                self._backlog.append(command)
                return
            try:
                await active.ws.send(command)
            except ProviderClosed:
                if active.session.resumption_handle is None:
                    raise
                # The reader will see the close and resume; keep the command for the next connection.
                self._backlog.append(command)
                self._begin_switch()

    async def receive(self) -> ProviderEvent:
        if not self._bridge_reads:
            self._bridge_reads = True
            if self._active is not None and self._active.ws is not None:
                self._active.ws.reading()
        try:
            return await self._events_out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ProviderClosed(self._ended or f"{NAME} session ended", **self._ended_how) from None

    # -- connections -----------------------------------------------------------

    async def open_first(self, session: GeminiLiveSession) -> None:
        """Open the first connection (raises ``ProviderClosed`` if that fails) and start supervising."""
        self._active = await self._connect(session)
        self._nursery.start_soon(self._supervise)

    async def _connect(self, session: GeminiLiveSession) -> _Connection:
        """A new connection, returned once Gemini answered its setup with ``setupComplete``.

        ``open_provider_link`` yields only after the core's :class:`SessionReady`
        (and raises ``ProviderClosed`` inside an exception group when the
        server refuses or closes first); the group is flattened here.
        """
        try:
            conn: _Connection = await self._nursery.start(self._connection, session)
        except BaseExceptionGroup as group:
            matched, rest = group.split(ProviderClosed)
            if matched is None or rest is not None:
                raise
            raise ProviderClosed(_first_reason(matched)) from None
        return conn

    async def _connection(
        self, session: GeminiLiveSession, *, task_status: trio.TaskStatus[_Connection] = trio.TASK_STATUS_IGNORED
    ) -> None:
        self.connections += 1
        conn = _Connection(self.connections, session)
        async with open_provider_link(
            NAME,
            session,
            self._settings.gemini_live_url,
            self._headers,
            connect_timeout_s=self._settings.connect_timeout_s,
            ping_after_s=self._settings.model_ping_s,
        ) as ws:
            conn.ws = ws
            try:
                with conn.scope:
                    task_status.started(conn)
                    await self._read(conn)
            finally:
                conn.done.set()
        # Leaving open_provider_link closed the socket (retired, or the server closed it).

    async def _read(self, conn: _Connection) -> None:
        assert conn.ws is not None
        while True:
            # Retiring cancels only this wait: what was read from the socket before (events its core has
            # already applied -- a turn's end, a tool call) still reaches the bridge; receive() hands those
            # over without waiting, and the first real wait of a retired connection is its end.
            with trio.CancelScope() as waiting:
                conn.waiting = waiting
                if conn.retired:
                    waiting.cancel()
                try:
                    event = await conn.ws.next_event()  # (not receive(): the bridge may not be reading yet)
                except ProviderClosed as exc:
                    self._on_closed(conn, exc)
                    self._event_read.set()  # (a switch waiting for this connection's turn to end sees it closed)
                    return
            conn.waiting = None
            if waiting.cancelled_caught:
                return
            if isinstance(event, SessionReady) and conn.number > 1:
                continue  # a resumed connection: the bridge must not notice
            if isinstance(event, GoAway) and conn is self._active and not self._switching:
                if conn.session.resumption_handle is None:
                    log.warning(
                        "%s: goAway on connection %d before any resumable handle; cannot resume", NAME, conn.number
                    )
                elif conn.session.resumable_now:
                    log.info("%s: goAway (time left %s) on connection %d; resuming", NAME, event.time_left, conn.number)
                    self._begin_switch()
                else:
                    self._nursery.start_soon(self._switch_when_resumable, conn, event.time_left)
            self._event_read.set()
            self._event_read = trio.Event()
            try:
                await self._events_in.send(event)
            except trio.ClosedResourceError:
                return  # the link has ended

    async def _switch_when_resumable(self, conn: _Connection, time_left: str | None) -> None:
        """After a ``goAway`` in the middle of a turn (or a function call): switch once resuming loses nothing,
        or ``GOAWAY_MARGIN_S`` before the server's ``timeLeft`` at the latest."""
        left_s = _seconds(time_left)
        deadline = trio.current_time() + max(0.0, (left_s if left_s is not None else 0.0) - GOAWAY_MARGIN_S)
        log.info("%s: goAway (time left %s) on connection %d during a turn; resuming once it is over",
                 NAME, time_left, conn.number)
        with trio.move_on_at(deadline) as waited:
            while not conn.session.resumable_now and conn.closed is None:
                await self._event_read.wait()
        if conn is not self._active or self._switching or self._ended is not None or conn.closed is not None:
            return  # (closed meanwhile: its reader resumes, or ends the link)
        if waited.cancelled_caught:
            log.warning("%s: connection %d still busy %g s before goAway's deadline; resuming now",
                        NAME, conn.number, GOAWAY_MARGIN_S)
        self._begin_switch()

    def _on_closed(self, conn: _Connection, exc: ProviderClosed) -> None:
        reason = exc.reason
        conn.closed = reason
        if conn is not self._active:
            return  # a retired connection, or a new one not made active yet (_go_live sees conn.closed)
        if self._switching:
            return  # a switch is under way (to this connection: _go_live sees conn.closed)
        broken = exc.broken or conn.session.state is SessionState.ERROR  # a malformed message would likely recur
        if conn.session.resumption_handle is not None and not broken:
            log.info("%s: connection %d closed (%s); resuming", NAME, conn.number, reason)
            self._begin_switch()
            return
        self._end(reason, orderly=exc.orderly and not broken, broken=broken)

    def _begin_switch(self) -> None:
        self._switching = True
        self._resume.set()

    def _end(self, reason: str, *, orderly: bool = False, broken: bool = False) -> None:
        """End the link: the bridge's next ``receive`` (and any ``send``) raises ``ProviderClosed(reason)``.

        (``orderly``, ``broken``: as :class:`ProviderClosed` says, for the close that ended it.)
        """
        if self._ended is None:
            self._ended = reason
            self._ended_how = {"orderly": orderly, "broken": broken}
        self._events_in.close()

    async def _supervise(self) -> None:
        assert self._active is not None
        if not await self._go_live(self._active):
            return
        while True:
            await self._resume.wait()
            self._resume = trio.Event()
            old = self._active
            assert old is not None
            try:
                new = await self._connect(old.session.resumed())
            except ProviderClosed as exc:
                self._end(f"{NAME}: resumption failed: {exc.reason}")
                return
            self.resumptions += 1
            self._active = new
            if self._bridge_reads and new.ws is not None:
                new.ws.reading()  # (its events go to the bridge as they come: it is watched from the start)
            if not await self._go_live(new):
                return
            log.info("%s: resumed the session on connection %d", NAME, new.number)
            # Retire the old one: its reader hands the bridge what it has read, then its socket is closed.
            old.retired = True
            if old.waiting is not None:
                old.waiting.cancel()
            await old.done.wait()
            try:
                for event in old.session.abandon_turn():  # a turn cut by the switch is over for the bridge
                    await self._events_in.send(event)
            except trio.ClosedResourceError:
                return  # the link has ended

    async def _go_live(self, conn: _Connection) -> bool:
        """Flush the backlog to ``conn`` and make it the connection commands go to; False if it closed first.

        A connection that closed (or said ``goAway``) between its
        ``setupComplete`` and now -- its reader saw it while the switch was
        still under way -- is the switch failing: the link ends, as for any
        failed switch, rather than waiting for a reader that is gone.  A
        ``goAway`` that came in that time starts the next switch at once.
        """
        assert conn.ws is not None
        async with self._send_lock:
            backlog, self._backlog = self._backlog, []
            try:
                for command in backlog:
                    await conn.ws.send(command)
            except ProviderClosed as exc:
                conn.closed = conn.closed or exc.reason
            if conn.closed is not None:
                self._end(conn.closed if conn.number == 1 else f"{NAME}: resumption failed: {conn.closed}")
                return False
            self._switching = False
            if conn.session.going_away:
                if conn.session.resumption_handle is None:
                    log.warning("%s: goAway on connection %d before any resumable handle; cannot resume", NAME, conn.number)
                else:
                    log.info("%s: goAway on connection %d while it was being made live; resuming", NAME, conn.number)
                    self._begin_switch()
            return True


def _seconds(duration: str | None) -> float | None:
    """A protobuf JSON Duration ("50s", "1.5s") in seconds; None if absent or not one."""
    if duration is None or not duration.endswith("s"):
        return None
    try:
        value = float(duration[:-1])
    except ValueError:
        return None
    return value if value >= 0 and math.isfinite(value) else None


def _first_reason(group: BaseExceptionGroup[ProviderClosed]) -> str:
    for exc in group.exceptions:
        if isinstance(exc, ProviderClosed):
            return exc.reason
        if isinstance(exc, BaseExceptionGroup):
            return _first_reason(exc)
    return str(group)


@asynccontextmanager
async def open_link(settings: Settings, agent: AgentOptions) -> AsyncIterator[GeminiLink]:
    """Open a Gemini Live session for one call; leaving the block closes every connection."""
    session = GeminiLiveSession(gemini_config(settings, agent))
    async with trio.open_nursery() as nursery:
        link = GeminiLink(settings, nursery)
        await link.open_first(session)
        try:
            yield link
        finally:
            nursery.cancel_scope.cancel()
