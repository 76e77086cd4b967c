"""A provider's sans-I/O core over a client WebSocket (:mod:`mediaserver.transport.ws_client`).

``open_provider_link`` connects (with a timeout), sends the core's
configuration and hands back a :class:`~mediaserver.bridge.link.ProviderLink`.
Leaving the ``async with`` block closes the socket: a close handshake under
a shielded scope limited to ``disconnect_timeout_s`` (so the provider learns
the session is over even when the call is being cancelled, e.g. at
shutdown), then the TCP close.  Either way nothing is left open.

The TCP (or TLS) stream is opened here and closed on the way out, whatever
happened.  ``wss://`` uses :mod:`mediaserver.transport.tls` (the stdlib's
``SSLObject`` on the raw socket, ~3x cheaper per send than
``trio.SSLStream``: bench/tls_send.py).  The WebSocket has no reader task: the task that receives from
the link (the bridge's provider reader) reads the socket, so a message costs
no task switch on its way in; sends from the uplink, the reader's automatic
replies and the keepalive share the connection's lock.

The link is yielded once the core reports ``SessionReady`` (the provider
accepted our configuration), so a session pre-opened at webhook time has
finished its handshake before the caller's stream arrives; events read
meanwhile wait in the link for the bridge.

Failures to connect (timeout, DNS/TCP/TLS error, HTTP refusal) raise
:class:`~mediaserver.bridge.link.ProviderClosed`.  The link's keepalive task
runs in a nursery that encloses the ``async with`` body, so an exception the
body raises reaches the caller inside an exception group: callers handle it
with ``except*``.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

import trio
from wsproto.frame_protocol import CloseReason

from mediaserver._native._wsframe import encode_b64_frame
from mediaserver.bridge.link import ProviderClosed
from mediaserver.protocol.errors import ProtocolError
from mediaserver.protocol.providers.base import (
    AudioFormat,
    ProviderCommand,
    ProviderError,
    ProviderEvent,
    ProviderSession,
    SendAudio,
    SessionReady,
)
from mediaserver.transport.http import open_stream, redact
from mediaserver.transport.reactor import MESSAGES_PER_TURN
from mediaserver.transport.tls import open_tls_stream
from mediaserver.transport.ws_client import (
    CLOSED_BY_US,
    ClientWebSocket,
    HandshakeRejected,
    WebSocketClosed,
    connect,
)

__all__ = ["WebSocketLink", "open_provider_link"]

log = logging.getLogger("mediaserver.provider")

# A provider message is at most a few hundred ms of base64 audio; 8 MiB also
# leaves room for session echoes with long instructions and tool schemas.
MAX_PROVIDER_MESSAGE_BYTES = 8 * 1024 * 1024

# A model that sends nothing for this long is pinged; with nothing back as long again, its link is cut (a frozen
# model, or a dead network path, is found within 2.25 times this: WebSocketLink.watch_alive).  MEDIASERVER_MODEL_PING_S.
MODEL_PING_S = 10.0
ORDERLY_CLOSE_CODES = (1000, 1001)  # the model ended the session (normal closure, going away): not a failure
MAX_NOWAIT_BACKLOG_BYTES = 256 * 1024  # read_nowait stops reading the model while more than this waits to go to it


class WebSocketLink:
    """A :class:`ProviderLink` backed by a sans-I/O core and a WebSocket."""

    def __init__(self, name: str, session: ProviderSession, ws: ClientWebSocket) -> None:
        self.name = name
        self.session = session
        self._ws = ws
        self._pending: deque[ProviderEvent] = deque()
        # The uplink, the provider reader (automatic replies), tools and the
        # keepalive all send.  Each batch the core produces goes out as one
        # write (ClientWebSocket.send_many), taken in call order, and nothing
        # awaits between the core producing a batch and queueing its write:
        # batches never interleave and keep the core's order, with no lock
        # of the link's own.
        self._now = trio.lowlevel.current_clock().current_time  # trio.current_time() without its wrappers (per frame)
        self.last_send_s = self._now()
        self.violation: str | None = None  # what the model sent that broke the protocol (said in our close frame)
        self._envelope: Callable[[], tuple[bytes, bytes] | None] | None = getattr(session, "audio_envelope", None)
        self.frames_audio = self._envelope is not None  # (its core may: audio_framing() says when)
        # A bridge reads the link (receive() or the reactor, which asks for poll_socket() first): until then (a
        # session pre-opened at the webhook) nothing it sends is read, and its silence proves nothing.
        self._read_by_bridge = trio.Event()

    @property
    def input_format(self) -> AudioFormat:
        return self.session.input_format

    @property
    def output_format(self) -> AudioFormat:
        return self.session.output_format

    async def _send_all(self, messages: Sequence[str | bytes]) -> None:
        if not messages:
            return
        try:
            await self._ws.send_many(messages)
        except WebSocketClosed as exc:
            raise self._closed(exc) from None
        self.last_send_s = self._now()

    async def send(self, command: ProviderCommand) -> None:
        await self._send_all(self.session.send(command))

    async def send_closing(self) -> None:
        """The core's closing messages (AssemblyAI's ``session.end``), just before the close: best effort, the model may be gone."""
        closing = getattr(self.session, "closing_messages", None)  # (a session written before the hook: none)
        messages = closing() if closing is not None else ()
        if messages and not self._ws.write_failed:
            try:
                await self._send_all(messages)
            except ProviderClosed:
                pass

    # -- without awaiting, for a reactor handler (PolledLink; plain TCP or our TLS) ----

    def poll_socket(self) -> socket.socket | None:
        """The socket to watch for :meth:`read_nowait` (under TLS for ``wss://``); None when only the awaiting calls may be used."""
        self.reading()
        return self._ws.poll_socket()

    def send_nowait(self, command: ProviderCommand) -> bool:
        """Send without waiting (see ClientWebSocket.send_many_nowait): True if sent, False if :meth:`flush` must run."""
        messages = self.session.send(command)
        if not messages:
            return True
        try:
            sent = self._ws.send_many_nowait(messages)
        except WebSocketClosed as exc:
            raise self._closed(exc) from None
        self.last_send_s = self._now()
        return sent

    def send_audio_nowait(self, audio: bytes) -> bool:
        """``send_nowait(SendAudio(audio))``, framed natively when the core gives its envelope (the per-frame path).

        A core with ``audio_envelope()`` (OpenAI's) says what the message
        is; the frame is then built in one native step
        (:func:`~mediaserver._native._wsframe.encode_b64_frame`) instead of
        through a command object, base64, JSON text and framing.
        """
        envelope = self._envelope() if self._envelope is not None and audio else None
        if envelope is None:  # (empty audio too: the core refuses it, as for send_nowait)
            return self.send_nowait(SendAudio(audio))
        return self.send_frames_nowait(encode_b64_frame(envelope[0], audio, envelope[1], self._ws.frame_key))

    def audio_framing(self) -> tuple[bytes, bytes, Literal[True] | None] | None:
        """``(prefix, suffix, key)``: how to frame a SendAudio natively now, or None (use :meth:`send_audio_nowait`).

        For the bridge's uplink, which frames a read's audio in one native
        step (:func:`~mediaserver._native._wsframe.uplink_pass`): the core's
        ``audio_envelope()`` (ask again for each read: the core's state
        decides it) and this end's masking.
        """
        envelope = self._envelope() if self._envelope is not None else None
        if envelope is None:
            return None
        return envelope[0], envelope[1], self._ws.frame_key

    def native_send_fd(self) -> int:
        """The socket's fd when framed audio may be written to it natively now (see ClientWebSocket.native_send_fd); else -1."""
        return self._ws.native_send_fd()

    def send_frames_nowait(self, frames: bytes) -> bool:
        """Send audio messages framed as :meth:`audio_framing` says, without waiting; as :meth:`send_audio_nowait`."""
        try:
            sent = self._ws.write_frames_nowait(frames)
        except WebSocketClosed as exc:
            raise self._closed(exc) from None
        self.last_send_s = self._now()
        return sent

    @property
    def backlogged(self) -> bool:
        """True while something :meth:`send_nowait` (or :meth:`read_nowait`'s replies) queued waits for :meth:`flush`."""
        return self._ws.backlogged

    async def flush(self) -> None:
        """Write what :meth:`send_nowait` queued; raises :class:`ProviderClosed` if the connection is gone."""
        try:
            await self._ws.flush()
        except WebSocketClosed as exc:
            raise self._closed(exc) from None

    def read_nowait(self) -> bool:
        """Read what is there without blocking, through the core; False when :meth:`receive` must take over.

        Events wait in :attr:`inbox` (and for :meth:`receive`); the
        core's replies are sent with ``send_nowait`` (check
        :attr:`backlogged`).  False: the connection closed or needs the
        awaiting path (see ClientWebSocket.read_nowait).  Raises
        :class:`ProviderClosed` on a protocol error.
        """
        ws = self._ws
        if ws.backlog_bytes > MAX_NOWAIT_BACKLOG_BYTES:
            # What we queued (replies such as pongs, caller audio) is not leaving: read no more here, or a model
            # that sends and never reads would make that queue grow without bound.  receive() reads on, and its
            # awaiting sends hold the reader back until the model reads.  (A small backlog is usual under load:
            # it goes with the next write, and handing over for it would cost every call latency.)
            return False
        more = ws.read_nowait()
        messages = ws.inbox
        for _ in range(MESSAGES_PER_TURN):  # (the rest wait in the socket's inbox: unread)
            if not messages:
                break
            replies = self._take(messages.popleft())
            if replies and not ws.write_failed:
                try:
                    ws.send_many_nowait(replies)
                except WebSocketClosed as exc:
                    if not ws.write_failed:
                        raise self._closed(exc) from None
                    # (the model has gone: what it sent before still counts, so reading goes on to its end)
        return more

    @property
    def unread(self) -> bool:
        """Messages were read from the socket that :meth:`read_nowait` has not taken yet (it takes
        ``MESSAGES_PER_TURN`` per call): call it again, whether or not the socket is readable."""
        return bool(self._ws.inbox)

    @property
    def inbox(self) -> deque[ProviderEvent]:
        """The events read and not yet received, oldest first: a reactor handler pops them from the left."""
        return self._pending

    async def keep_alive(self) -> None:
        """Send the core's keepalive whenever nothing was sent for its interval (runs until cancelled)."""
        interval = self.session.keepalive_interval_s
        if interval is None:
            return
        while True:
            await trio.sleep_until(self.last_send_s + interval)
            if self._now() - self.last_send_s >= interval:
                try:
                    await self._send_all(self.session.keepalive())
                except ProviderClosed:
                    return  # the reader reports the close
                # also when the core had nothing to send yet (before its handshake)
                self.last_send_s = self._now()

    async def watch_alive(self, after_s: float = MODEL_PING_S) -> None:
        """Ping a model that has sent nothing for ``after_s``; cut the link if nothing comes within as long again.

        A model that froze (no reads, no writes; or a network path that
        died) is otherwise found only when the socket's send buffer fills,
        which took minutes: the caller heard silence and the session stayed
        billed.  Cut, the link ends as any broken connection does (the call
        ends, ``provider ended: ...``).  It watches from when a bridge first
        reads the link.  Our own stalls are not the model's: an answer that
        waits unread in the socket counts, and a wait this process overran
        by a quarter of the interval (it could not run) starts again.  Runs
        until cancelled.
        """
        ws = self._ws
        await self._read_by_bridge.wait()
        # Checked every quarter of the interval, so the ping goes out within a quarter of it after the silence began
        # (whole intervals cut a model as much as an interval late).
        seen, heard_s = ws.received_bytes, self._now()
        while ws.closed is None:
            await trio.sleep(after_s / 4)
            if ws.received_bytes != seen:
                seen, heard_s = ws.received_bytes, self._now()
                continue
            if self._now() - heard_s < after_s:
                continue
            deadline = self._now() + after_s
            with trio.move_on_at(deadline):  # (also bounds a send that a frozen model never takes)
                try:
                    await ws.ping(b"mediaserver")
                except WebSocketClosed:
                    return  # the reader reports it
                await trio.sleep_forever()  # (the scope ends it)
            if self._now() - deadline > after_s / 4:
                continue  # this process stalled over the wait (the model had no fair chance to answer): again
            # (Bytes waiting unread came while this process was busy or stalled: the silence was ours.)
            if ws.received_bytes == seen and ws.closed is None and not ws.input_waiting():
                quiet_s = self._now() - heard_s
                ws.abort(f"the model sent nothing for {quiet_s:.{0 if quiet_s >= 10 else 1}f} s, nor answered a ping")
                return

    async def wait_ready(self) -> None:
        """Read until the core reports :class:`SessionReady`, keeping every event for :meth:`receive`.

        A pre-opened session thus finishes its handshake (and answers
        whatever the provider expects, e.g. Deepgram's ``Settings`` after
        ``Welcome``) at webhook time, before the caller's stream arrives.
        A fatal provider error before that ends the session.
        """
        seen = 0
        while True:
            while seen < len(self._pending):
                event = self._pending[seen]
                seen += 1
                if isinstance(event, SessionReady):
                    return
                if isinstance(event, ProviderError) and event.fatal:
                    raise ProviderClosed(f"{self.name} refused the session: {event.message}")
            await self._read_one()

    def reading(self) -> None:
        """From now on the link's events are read as they come (by a bridge): its liveness is watched."""
        self._read_by_bridge.set()

    async def receive(self) -> ProviderEvent:
        self.reading()
        return await self.next_event()

    async def next_event(self) -> ProviderEvent:
        """:meth:`receive` for a reader that is not the bridge (Gemini's, which hands the events on)."""
        while not self._pending:
            await self._read_one()
        return self._pending.popleft()

    async def _read_one(self) -> None:
        """Read one message, let the core handle it, send its replies, queue its events."""
        try:
            message = await self._ws.receive()
        except WebSocketClosed as exc:
            raise self._closed(exc) from None
        replies = self._take(message)
        if replies and not self._ws.write_failed:
            try:
                await self._send_all(replies)
            except ProviderClosed:
                if not self._ws.write_failed:
                    raise

    def _take(self, message: str | bytes) -> Sequence[str | bytes]:
        """One message through the core: its events queued; the replies it owes the provider returned."""
        session = self.session
        try:
            session.receive_message(message)
            replies = session.pending_messages()
        except ProtocolError as exc:
            self.violation = str(exc)
            raise ProviderClosed(f"{self.name} protocol error: {exc}", broken=True) from None
        self._pending.extend(session.events())
        return replies

    def _closed(self, exc: WebSocketClosed) -> ProviderClosed:
        # (1000/1001 from the model: it ended the session; a close we made for its protocol violation: broken)
        orderly = exc.code in ORDERLY_CLOSE_CODES and not exc.violation and exc.reason != CLOSED_BY_US
        return ProviderClosed(f"{self.name} connection closed: {exc}", orderly=orderly, broken=exc.violation)


@dataclass(frozen=True, slots=True)
class _Target:
    host: str
    port: int
    tls: bool
    host_header: str
    resource: str

    @classmethod
    def parse(cls, url: str) -> _Target:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"not a ws:// or wss:// URL: {_safe(url)}")
        tls = parts.scheme == "wss"
        resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        netloc = parts.netloc.rpartition("@")[2]
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls, netloc, resource)


@asynccontextmanager
async def open_provider_link(
    name: str,
    session: ProviderSession,
    url: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    connect_timeout_s: float = 10.0,
    disconnect_timeout_s: float = 1.0,
    ping_after_s: float = MODEL_PING_S,
) -> AsyncIterator[WebSocketLink]:
    """Connect to ``url``, send the session's configuration, yield the link.

    A model that sends nothing for ``ping_after_s`` is pinged, and the link
    cut if nothing comes back as long again (:meth:`WebSocketLink.watch_alive`;
    0: never).
    """
    try:
        target = _Target.parse(url)
    except ValueError as exc:
        raise ProviderClosed(f"{name}: {exc}") from None
    deadline = trio.current_time() + connect_timeout_s
    too_slow = f"{name}: no connection to {_safe(url)} within {connect_timeout_s:g} s"
    try:
        with trio.fail_at(deadline):
            if target.tls:  # the lean TLS stream: this socket carries 50 sends a second
                stream: trio.abc.Stream = await open_tls_stream(target.host, target.port)
            else:
                stream = await open_stream(target.host, target.port, tls=False)
    except trio.TooSlowError:
        raise ProviderClosed(too_slow) from None
    except (OSError, trio.BrokenResourceError) as exc:  # DNS, TCP or TLS (a reset during the TLS handshake)
        raise ProviderClosed(f"{name}: cannot connect to {_safe(url)}: {exc}") from None
    try:
        try:
            with trio.fail_at(deadline):
                ws = await connect(
                    stream, target.host_header, target.resource, headers, max_message_size=MAX_PROVIDER_MESSAGE_BYTES
                )
        except trio.TooSlowError:
            raise ProviderClosed(too_slow) from None
        except HandshakeRejected as exc:
            why = f": {_scrubbed(exc.reason, url, headers)}" if exc.reason else ""
            raise ProviderClosed(f"{name}: {_safe(url)} rejected the connection with HTTP {exc.status_code}{why}") from None
        except WebSocketClosed as exc:
            raise ProviderClosed(f"{name}: {_safe(url)} closed the connection during the handshake: {exc}") from None
        link: WebSocketLink | None = None
        async with trio.open_nursery() as nursery:
            try:
                link = WebSocketLink(name, session, ws)
                with trio.move_on_at(deadline) as handshake:  # (a peer that stops reading must not hold the send)
                    await link._send_all(session.initial_messages())
                    nursery.start_soon(link.keep_alive)
                    await link.wait_ready()
                if handshake.cancelled_caught:
                    raise ProviderClosed(f"{name}: the session was not ready within {connect_timeout_s:g} s")
                if ping_after_s > 0:
                    nursery.start_soon(link.watch_alive, ping_after_s)
                yield link
            finally:
                try:
                    with trio.move_on_after(disconnect_timeout_s, shield=True) as closing:
                        if link is not None and link.violation is not None:
                            # Tell the model what was wrong (1002 and the reason):
                            # a plain 1000 would look like an ordinary hang-up to its developer.
                            await ws.aclose(CloseReason.PROTOCOL_ERROR, _close_reason(link.violation))
                        else:
                            if link is not None:
                                await link.send_closing()
                            await ws.aclose()
                    if closing.cancelled_caught:
                        log.info("%s: no close handshake within %g s; dropping the connection", name, disconnect_timeout_s)
                finally:
                    nursery.cancel_scope.cancel()  # the keepalive task
    finally:
        await trio.aclose_forcefully(stream)


def _close_reason(text: str) -> str:
    """``text`` cut to fit a close frame's reason (123 bytes of UTF-8)."""
    return text.encode()[:120].decode(errors="ignore")


def _safe(url: str) -> str:
    """The URL without its query string or user name and password (which may carry keys)."""
    return redact(url)


def _scrubbed(text: str, url: str, headers: Sequence[tuple[str, str]]) -> str:
    """``text`` (a peer's words, for our log) without any secret we sent: the URL's query values, user name and
    password, and our credential headers' values (``Bearer KEY``: KEY too) -- a server may echo the request."""
    parts = urlsplit(url)
    secrets = [value for _, value in parse_qsl(parts.query, keep_blank_values=False)]
    secrets += [parts.username or "", parts.password or ""]
    for name, value in headers:
        if any(word in name.lower() for word in ("auth", "key", "token", "secret", "cookie")):
            secrets += [value, value.rpartition(" ")[2]]
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= 4:  # (a short value -- "1", "true" -- is not a secret, and would garble the text)
            text = text.replace(secret, "…")
    return text
