"""Live and pre-opened calls: where each call's nursery is started and ended.

The voice webhook calls :meth:`CallManager.prepare`, which starts opening the
model session at once (in the manager's own nursery) and returns a one-time
token for the TwiML ``<Parameter>``.  When Twilio's stream arrives with that
token, :meth:`CallManager.handle_stream` claims the session and bridges it;
when the stream ends, the pre-open task closes the session.  A session whose
stream never comes is closed ``stream_timeout_s`` after the webhook; a
session that could not be opened keeps its slot until then, so that its
stream is hung up with the reason.  In development mode (no Twilio auth
token) a stream without a known token opens its own session on the spot.

Failures stop at the call they belong to: a pre-open task never raises into
the manager's nursery, and :meth:`CallManager.handle_stream` logs how each
call ended in one line (cancellation passes through).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import json
import secrets
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from mediaserver import twiml
from mediaserver.bridge.stats import SecondsHistogram
from mediaserver.config import Settings
from mediaserver.logs import shown
from mediaserver.metrics import CONNECT_EDGES_S, FAILED_KINDS, CallTotals, end_kind
from mediaserver.protocol import twilio_events as tw
from mediaserver.protocol.errors import LocalProtocolError, ProtocolError
from mediaserver.protocol.twilio import TwilioStream

from mediaserver.tools import load_toolset
from mediaserver.twilio_rest import TwilioRest, TwilioRestError

from .call import (
    FAILED,
    MODEL_IDLE,
    REFUSED,
    CallBridge,
    MessageStream,
    PolledStream,
    StreamClosed,
    StreamEnd,
    stream_closed_reason,
)
from .link import AgentOptions, ProviderClosed, ProviderLink

if TYPE_CHECKING:
    from mediaserver.records.recorder import Recorder

__all__ = ["CallManager", "TOKEN_PARAMETER"]

log = logging.getLogger("mediaserver.calls")

TOKEN_PARAMETER = "token"  # name of the TwiML <Parameter> carrying the one-time token
START_TIMEOUT_S = 10.0  # connected + start must arrive this soon after the upgrade
MAX_PENDING = 1000  # pre-opened sessions at once; more webhooks are refused
# What is kept of a stream read while its model session opens: ~50 s of a caller's 20 ms media messages, ~385
# bytes each (the wait is bounded by the connect timeout, 10 s by default); past it the stream is not read until
# the session is.
MAX_HELD_BYTES = 1 << 20
MAX_WEBHOOKS_PER_CALL = 3  # answers for one call SID (Twilio may retry the webhook); more look like a replay
SEEN_CALLS = 50_000  # call SIDs remembered for that, the oldest forgotten first ...
SEEN_TTL_S = 4 * 3600.0  # ... and for at most this long (Twilio's longest call)

LinkOpener = Callable[[Settings, AgentOptions], AbstractAsyncContextManager[ProviderLink]]


@dataclass(eq=False)
class _Slot:
    call_sid: str
    agent: AgentOptions
    ready: trio.Event = field(default_factory=trio.Event)
    claimed: trio.Event = field(default_factory=trio.Event)
    released: trio.Event = field(default_factory=trio.Event)
    link: ProviderLink | None = None
    error: str | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # cancelled to retire an unclaimed slot
    tokens: list[str] = field(default_factory=list)  # every answer's token for it (the webhook again: one more)

    def retire(self, reason: str) -> None:
        """Close this unclaimed slot's session; a stream that still comes for it is hung up with ``reason``."""
        self.link = None
        self.error = reason
        self.scope.cancel()


@dataclass(slots=True)
class _Seen:
    """What the webhook has done for one call SID: when first, how many answers, and whether its stream came."""

    first_s: float
    webhooks: int = 0
    streamed: bool = False
    token: str | None = None  # the newest answer's one-time token (its slot, while pending, is in _slots)


class CallManager:
    def __init__(
        self, settings: Settings, open_link: LinkOpener | None = None, *, recorder: Recorder | None = None
    ) -> None:
        if open_link is None:
            from mediaserver.providers import open_link as default_opener

            open_link = default_opener
        self.settings = settings
        self._open_link = open_link
        self.recorder = recorder  # call records (mediaserver.records); None = not recorded
        # What the agent is told on every call unless prepare() overrides it.
        # Tools for every call: MEDIASERVER_TOOLS's and the built-ins (ConfigError if they cannot load).
        self.tools = load_toolset(settings)
        self.rest = TwilioRest.from_settings(settings)  # transfers; None without credentials
        self.agent = dataclasses.replace(AgentOptions.from_settings(settings), tools=self.tools.specs())
        self._slots: dict[str, _Slot] = {}
        self._untokened = 0  # development mode: streams bridged without a webhook's token, now
        self._seen: OrderedDict[str, _Seen] = OrderedDict()  # call SIDs answered lately (see prepare)
        self._closing = False  # stop_accepting() was called
        self.outbound_waiting: Callable[[], int] = lambda: 0  # outbound calls placed here not answered yet (outbound.py)
        self._streams = 0  # Media Streams being served: bridged, waiting for their session, or reading their start
        self._nursery: trio.Nursery | None = None
        self.active = 0
        self.completed = 0
        # For /metrics (mediaserver.metrics): calls that ended, folded in; the
        # bridges still running; model connections open; streams refused by reason.
        self.totals = CallTotals()
        self._live: dict[CallBridge, None] = {}
        self.model_sessions = 0
        self.model_connect = SecondsHistogram(CONNECT_EDGES_S)  # time to open each model session
        self.model_connect_failures = 0
        self.refused: dict[str, int] = {}
        self.refusal: str | None = None  # why the last prepare() returned None (a REFUSALS reason)

    @property
    def pending(self) -> int:
        """Pre-opened sessions still waiting for their media stream."""
        return sum(1 for slot in self._unique_slots() if slot.error is None and not slot.claimed.is_set())

    @property
    def calls_now(self) -> int:
        """Calls this server holds now, as ``MEDIASERVER_MAX_CALLS`` counts them: answered and waiting for their
        stream, live (their session still open), streaming without a webhook (development mode), and outbound
        calls placed here still ringing.  (A session that failed to open, kept only to tell its stream why, is
        not counted.)"""
        held = sum(1 for slot in self._unique_slots() if slot.claimed.is_set() or slot.error is None)
        return held + self._untokened + self.outbound_waiting()

    @property
    def at_capacity(self) -> bool:
        """``MEDIASERVER_MAX_CALLS`` is set and reached: a new call is turned away."""
        return 0 < self.settings.max_calls <= self.calls_now

    def _unique_slots(self) -> list[_Slot]:
        """Each pending or live session once (a call answered twice has two tokens for one)."""
        return list({id(slot): slot for slot in self._slots.values()}.values())

    def metrics(self) -> CallTotals:
        """The ended calls' totals plus every running call's counts so far (a copy)."""
        totals = self.totals.copy()
        now = trio.current_time()
        for bridge in self._live:
            totals.add_call(bridge.stats, bridge.jitter.stats, now - bridge.stats.started_s)
        return totals

    def _refuse(self, reason: str) -> None:
        self.refused[reason] = self.refused.get(reason, 0) + 1
        self.refusal = reason

    @contextlib.asynccontextmanager
    async def _session(self, agent: AgentOptions) -> AsyncIterator[ProviderLink]:
        """``open_link``, counted in :attr:`model_sessions` from opened until its close has returned.

        The time it took to open goes to :attr:`model_connect`; an error
        before it opened (not a cancellation) to :attr:`model_connect_failures`.
        """
        started_s = trio.current_time()
        opened = False
        try:
            async with self._open_link(self.settings, agent) as link:
                self.model_sessions += 1
                opened = True
                self.model_connect.add(trio.current_time() - started_s)
                yield link
        except Exception:
            if not opened:
                self.model_connect_failures += 1
            raise
        finally:
            if opened:
                self.model_sessions -= 1

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery of pre-opened sessions until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def prepare(self, call_sid: str, agent: AgentOptions | None = None, *, placed_here: bool = False) -> str | None:
        """Start opening a session for ``call_sid``; returns its one-time token (None when full).

        ``agent`` overrides :attr:`agent` for this call (an outbound call's greeting, say).
        ``placed_here``: an outbound call this server placed, answered now: it is taken while the server drains
        (its callee has picked up; refusing would play them an error).
        """
        self.refusal = None
        if self._nursery is None:
            return None
        if self._closing and not placed_here:
            self._refuse("shutting_down")
            return None
        seen = self._seen_call(call_sid)
        if seen.streamed or seen.webhooks >= MAX_WEBHOOKS_PER_CALL:
            # Twilio signatures carry no timestamp: a captured signed webhook validates forever.  A call whose
            # stream has run (or that was answered this often) gets no new session: a replay must not bill.
            self._refuse("replayed")
            why = "its media stream already ran" if seen.streamed else f"answered {seen.webhooks} times already"
            log.warning("call %s: webhook refused: %s (a replayed request?)", call_sid, why)
            return None
        seen.webhooks += 1
        token = secrets.token_urlsafe(24)
        earlier = self._slots.get(seen.token or "")
        if earlier is not None and not earlier.claimed.is_set() and earlier.error is None:
            # The webhook again for a call whose stream has not come (Twilio retried it, a fallback URL pointed
            # here -- or someone replays a leaked signed webhook): the same session, one more token for it.  The
            # first stream to come with either token gets it; retiring the first answer's session would let a
            # replay hang up the real call.
            log.info("call %s: webhook again before its stream; its session takes either answer's token", call_sid)
            earlier.tokens.append(token)
            self._slots[token] = earlier
            seen.token = token
            return token
        # (sessions waiting for their stream, failed ones included; a live call's slot is not counted.  After the
        # branch above: a retry that opens nothing is not refused for a full house -- that would hang up its call.)
        if sum(1 for slot in self._unique_slots() if not slot.claimed.is_set()) >= MAX_PENDING:
            seen.webhooks -= 1
            self._refuse("too_many_pending")
            return None
        # Not for a call answered before (its first session failed to open: a new one is tried), nor for an
        # outbound call placed here (it was counted while it rang).
        if not placed_here and earlier is None and self.at_capacity:
            seen.webhooks -= 1
            self._refuse("at_capacity")
            log.warning("call %s: refused: at the call limit, MEDIASERVER_MAX_CALLS=%d", call_sid, self.settings.max_calls)
            return None
        if earlier is not None and not earlier.claimed.is_set():
            earlier.retire("replaced by a later webhook for the same call")  # (it failed: a new session is tried)
        slot = _Slot(call_sid, agent or self.agent, tokens=[token])
        self._slots[token] = slot
        seen.token = token
        self._nursery.start_soon(self._preopen, slot)
        return token

    def withdraw(self, token: str, reason: str) -> None:
        """Close the session :meth:`prepare` opened for ``token``: its answer could not be sent (a stream with it is hung up)."""
        slot = self._slots.get(token)
        if slot is not None and not slot.claimed.is_set():
            if len(slot.tokens) > 1:  # (the call's other answer still names it: only this token goes)
                slot.tokens.remove(token)
                del self._slots[token]
                seen = self._seen.get(slot.call_sid)
                if seen is not None and seen.token == token:
                    seen.token = slot.tokens[-1]  # (a later webhook again still finds the session)
                return
            slot.retire(reason)

    def call_ended(self, call_sid: str, status: str) -> bool:
        """Twilio's status callback: a final ``status`` for a call whose stream has not come closes its pre-opened
        session now, not at the stream timeout (the caller hung up while it was answered, the callee at once).

        True if a session was closed.  A live call is left alone: its stream
        ends it.  Only as trustworthy as the callback (signed, with an auth token).
        """
        if status not in tw.CALL_FINAL_STATUSES:
            return False
        seen = self._seen.get(call_sid)
        slot = None if seen is None or seen.token is None else self._slots.get(seen.token)
        if slot is None or slot.claimed.is_set() or slot.error is not None:
            return False
        slot.retire(f"the call ended before its stream came (Twilio: {status})")
        log.info("call %s: Twilio says it ended (%s) before its stream came; closed its %s session",
                 call_sid, status, self.settings.provider)
        return True

    def _seen_call(self, call_sid: str) -> _Seen:
        now = trio.current_time()
        seen = self._seen.get(call_sid)
        if seen is None or now - seen.first_s > SEEN_TTL_S:
            seen = self._seen[call_sid] = _Seen(now)
            self._seen.move_to_end(call_sid)
            while len(self._seen) > SEEN_CALLS:
                self._seen.popitem(last=False)
        return seen

    @property
    def accepting(self) -> bool:
        """False once the server is shutting down (:meth:`stop_accepting`): no new call can be answered here."""
        return not self._closing

    def stop_accepting(self) -> None:
        """The server is shutting down: refuse new calls; the calls it has go on until the drain deadline.

        The listener stays open while calls drain, so the streams of calls
        answered just before (pending sessions) still come and are bridged
        (each session's stream timeout bounds its wait), and outbound calls
        placed here can still be answered (``prepare(placed_here=True)``).
        """
        self._closing = True

    @property
    def drained(self) -> bool:
        """Shutting down, and nothing of a call is left: no Media Stream being served (a live call, or one whose
        stream came before its model session was ready), no session waiting for its stream, and no outbound call
        placed here still ringing (``outbound_waiting``)."""
        return self._closing and self._streams == 0 and self.pending == 0 and self.outbound_waiting() == 0

    async def _preopen(self, slot: _Slot) -> None:
        # Runs in the manager's nursery, next to every other pending call: it
        # must never raise, or one bad session would take the server down.
        deadline = trio.current_time() + self.settings.stream_timeout_s
        try:
            with slot.scope:
                await self._open_for(slot, deadline)
        finally:
            for token in slot.tokens:
                self._slots.pop(token, None)

    async def _open_for(self, slot: _Slot, deadline: float) -> None:
        """The session of a pending call: opened, held until its stream is over (or none came), closed."""
        try:
            async with self._session(slot.agent) as link:
                slot.link = link
                slot.ready.set()
                with trio.move_on_at(deadline):
                    await slot.claimed.wait()
                if not slot.claimed.is_set():
                    # Unclaimable from here: a stream that comes while the session closes is hung up, not
                    # bridged onto a session on its way out.
                    slot.link = None
                    slot.error = f"no media stream within {self.settings.stream_timeout_s:g} s"
                    log.warning(
                        "call %s: no media stream within %g s; closed the %s session",
                        slot.call_sid,
                        self.settings.stream_timeout_s,
                        link.name,
                    )
                    return
                await slot.released.wait()
        except* ProviderClosed as group:
            reason = _reason(group)
            slot.error = reason
            if slot.link is None:
                log.error("call %s: could not open the model session: %s", slot.call_sid, shown(reason, 300))
            else:
                log.warning("call %s: model session ended: %s", slot.call_sid, shown(reason, 300))
        except* Exception as group:  # a bug or an unexpected transport error: this call only
            slot.error = repr(group.exceptions[0])
            log.error("call %s: model session failed", slot.call_sid, exc_info=group)
        finally:
            slot.link = None  # closed now; a late claimer sees "no model session"
            slot.ready.set()
        if slot.error is not None and not slot.claimed.is_set():
            # Keep the slot for the stream, so that it is hung up with the
            # reason rather than refused (or, in development mode, given a
            # second session that would fail the same way).
            with trio.move_on_at(deadline):
                await slot.claimed.wait()

    async def handle_stream(self, stream: MessageStream) -> StreamEnd | None:
        """Serve one Twilio Media Streams WebSocket until the call ends.

        Returns how to close the stream when it was refused or could not be
        served (None: the call ran, close normally).
        """
        self._streams += 1  # (a draining server waits for it: it may be a call whose session is still opening)
        try:
            return await self._handle_stream(stream)
        finally:
            self._streams -= 1

    async def _handle_stream(self, stream: MessageStream) -> StreamEnd | None:
        twilio = TwilioStream()
        start = await self._read_start(stream, twilio)
        if start is None:
            self._refuse("no_start")
            return StreamEnd(REFUSED, "refused: no start")
        if self.settings.twilio_account_sid and start.account_sid != self.settings.twilio_account_sid:
            self._refuse("wrong_account")
            log.error("stream %s: account %s is not ours; refused", start.stream_sid, start.account_sid)
            return StreamEnd(REFUSED, "refused: wrong account")
        token = start.custom_parameters.get(TOKEN_PARAMETER, "")
        slot = self._slots.get(token)
        if slot is not None and not slot.claimed.is_set() and slot.call_sid == start.call_sid:
            slot.claimed.set()
            self._seen_call(start.call_sid).streamed = True
            try:
                if not slot.ready.is_set():
                    waited = await self._wait_for_session(stream, slot)
                    if waited is None:  # the caller hung up first: the session is not opened (or is closed)
                        slot.scope.cancel()
                        log.info("call %s: the caller hung up before the model session was ready", start.call_sid)
                        if self.recorder is not None:
                            self.recorder.call_not_bridged(
                                start, "caller hung up before the model session was ready", self.settings.provider,
                                status="completed",  # (the caller's choice: nothing broke)
                            )
                        return None
                    stream = waited
                if slot.link is None:
                    self._refuse("no_model_session")
                    # (a warning: why the session failed was logged, as an error, when it failed)
                    log.warning("call %s: no model session (%s); hanging up", start.call_sid, shown(slot.error or "", 300))
                    if self.recorder is not None:
                        self.recorder.call_not_bridged(start, f"no model session: {slot.error}", self.settings.provider)
                    await self._tell_caller(start.call_sid)
                    return StreamEnd(FAILED, "no model session")
                return await self._bridge(stream, twilio, start, slot.link)
            finally:
                slot.released.set()
        if not self.settings.development_mode:
            self._refuse("no_token")
            log.error("call %s: stream without a valid one-time token; refused", start.call_sid)
            return StreamEnd(REFUSED, "refused: no valid token")
        if self._closing:  # (development mode: a new call, as its webhook would be, refused while the server drains)
            self._refuse("shutting_down")
            log.warning("call %s: stream without a token refused: the server is shutting down", start.call_sid)
            return StreamEnd(REFUSED, "refused: shutting down")
        if self._untokened >= MAX_PENDING:  # (development mode: no webhook, no token, but not without bound either)
            self._refuse("too_many_pending")
            log.error("call %s: stream without a token, and %d such calls already; refused", start.call_sid, MAX_PENDING)
            return StreamEnd(REFUSED, "refused: too many calls without a token")
        if self.at_capacity:
            self._refuse("at_capacity")
            log.warning("call %s: stream refused: at the call limit, MEDIASERVER_MAX_CALLS=%d", start.call_sid,
                        self.settings.max_calls)  # fmt: skip
            return StreamEnd(REFUSED, "refused: at the call limit")
        opened = False  # (an error after the session opened is the call's, not a refusal)
        end: StreamEnd | None = None
        self._untokened += 1
        try:
            async with self._session(self.agent) as link:
                opened = True
                end = await self._bridge(stream, twilio, start, link)
        except* ProviderClosed as group:
            if not opened:
                self._refuse("no_model_session")
                end = StreamEnd(FAILED, "no model session")
            log.error("call %s: could not open the model session: %s", start.call_sid, shown(_reason(group), 300))
            if self.recorder is not None:
                self.recorder.call_not_bridged(start, f"no model session: {_reason(group)}", self.settings.provider)
        except* Exception as group:
            if not opened:
                self._refuse("no_model_session")
            end = StreamEnd(FAILED, "no model session" if not opened else "the call failed")
            log.error("call %s: model session failed", start.call_sid, exc_info=group)
        finally:
            self._untokened -= 1
        # (no failure message here: without a token the stream's CallSid is not known to be a call of ours)
        return end

    async def _tell_caller(self, call_sid: str) -> None:
        """The model failed this call: have Twilio say so (``MEDIASERVER_FAILURE_MESSAGE``), then hang up.

        Without this the caller hears silence, then the line goes dead.  A
        REST update replaces the call's TwiML, which ends the stream; so it
        is asked before the stream is closed (closed first, Twilio would
        run ``<Hangup/>`` at once).  Needs REST credentials; bounded by
        ``FAILURE_REST_S``: the caller is hearing silence meanwhile.
        """
        try:
            answer = twiml.failure(self.settings.failure_message)  # (checked at start: never raises here)
        except ValueError:
            answer = None
        if self.rest is None or answer is None:
            return
        with trio.move_on_after(FAILURE_REST_S) as waited:
            try:
                await self.rest.update_call(call_sid, twiml=answer, timeout_s=FAILURE_REST_S)
            except TwilioRestError as exc:  # (the caller may have hung up meanwhile: the call is over)
                log.warning("call %s: could not have Twilio tell the caller the call failed: %s", call_sid, exc)
                return
        if waited.cancelled_caught:
            log.warning("call %s: Twilio did not answer within %g s; the caller may not hear the failure message",
                        call_sid, FAILURE_REST_S)  # fmt: skip
        else:
            log.info("call %s: Twilio says the failure message to the caller, then hangs up", call_sid)

    async def _wait_for_session(self, stream: MessageStream, slot: _Slot) -> MessageStream | None:
        """Wait for the call's session, reading the stream meanwhile; None if the caller hung up first.

        Not reading it would leave a hang-up unseen until the session is
        ready (or has failed: up to the connect timeout), with the model
        socket open all that while.  What is read is kept, in order, for the
        call: the stream that is returned gives it back first.  At most
        ``MAX_HELD_BYTES`` of it: a stream that sends more than a caller
        could meanwhile is not read further until the session is ready (its
        socket fills up and holds the sender back), rather than growing the
        server's memory.
        """
        held: deque[str | bytes] = deque()
        gone = False
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal gone
                size = 0
                try:
                    while True:
                        message = await stream.receive()
                        held.append(message)
                        if _is_stop(message):
                            break
                        size += len(message)
                        if size > MAX_HELD_BYTES:
                            log.warning(
                                "call %s: over %d bytes from Twilio before the model session was ready; "
                                "not read further until it is", slot.call_sid, MAX_HELD_BYTES,
                            )  # fmt: skip
                            return
                except StreamClosed:
                    pass
                gone = True
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await slot.ready.wait()
            nursery.cancel_scope.cancel()
        if gone:
            return None
        if isinstance(stream, PolledStream):
            stream.inbox.extendleft(reversed(held))  # (read from the inbox first, by the reactor's first call too)
            return stream
        return _Replayed(stream, held) if held else stream

    async def _read_start(self, stream: MessageStream, twilio: TwilioStream) -> tw.Start | None:
        with trio.move_on_after(START_TIMEOUT_S):
            try:
                while True:
                    twilio.receive_message(await stream.receive())
                    for event in twilio.events():
                        if isinstance(event, tw.Start):
                            return event
            except StreamClosed as exc:
                if exc.violation:  # (its bytes broke the WebSocket protocol: not an ordinary hang-up)
                    log.warning("stream closed before it started: %s", stream_closed_reason(exc))
                else:
                    log.warning("stream closed before it started")
                return None
            except ProtocolError as exc:
                log.error("stream refused before start: %s", exc)
                return None
        log.error("no start event within %g s; closing the stream", START_TIMEOUT_S)
        return None

    async def _bridge(
        self, stream: MessageStream, twilio: TwilioStream, start: tw.Start, link: ProviderLink
    ) -> StreamEnd | None:
        """Run the call on ``link``; a StreamEnd if it could not be bridged at all (None: it ran)."""
        s = self.settings
        try:
            bridge = CallBridge(
                stream, twilio, link, call_sid=start.call_sid, idle_timeout_s=s.idle_timeout_s, max_call_s=s.max_call_s,
                tools=self.tools, tool_timeout_s=s.tool_timeout_s, rest=self.rest, chunk_ms=s.chunk_ms,
            )
        except ValueError as exc:  # the provider's audio formats cannot be bridged
            self._refuse("cannot_bridge")
            log.error("call %s: cannot bridge to %s: %s", start.call_sid, link.name, exc)
            if self.recorder is not None:
                self.recorder.call_not_bridged(start, f"cannot bridge to {link.name}: {exc}", link.name)
            return StreamEnd(FAILED, "cannot bridge")

        def ended(reason: str) -> None:
            if bridge.end_reason == "running":
                bridge.end_reason = reason

        # The call boundary: whatever ends this call is logged once, below,
        # and goes no further (other calls and the server are unaffected).
        # Cancellation (hang-up seen by Quart, server shutdown) passes through.
        self.active += 1
        self._live[bridge] = None
        try:
            log.info("call %s: started, stream %s, provider %s", start.call_sid, start.stream_sid, link.name)
            if self.recorder is not None:
                self.recorder.call_started(start, bridge.stats)
            await bridge.run()
        except* LocalProtocolError as group:  # our own misuse of a core: a bug, not the peer's fault
            ended(f"failed: {group.exceptions[0]!r}")
            log.error("call %s: failed", start.call_sid, exc_info=group)
        except* ProtocolError as group:  # what Twilio sent (the model's are ProviderClosed)
            ended(f"protocol error: {group.exceptions[0]}")
        except* ProviderClosed as group:
            ended(f"provider ended: {group.exceptions[0]}")
        except* StreamClosed as group:
            ended(stream_closed_reason(group.exceptions[0]))  # type: ignore[arg-type]
        except* Exception as group:
            ended(f"failed: {group.exceptions[0]!r}")
            log.error("call %s: failed", start.call_sid, exc_info=group)
        finally:
            if bridge.end_reason == "running" and self._closing:
                bridge.end_reason = SHUTDOWN_END  # (cancelled at the drain deadline: say so, not "Twilio or shutdown")
            self.active -= 1
            self.completed += 1
            del self._live[bridge]
            self.totals.add_call(bridge.stats, bridge.jitter.stats, trio.current_time() - bridge.stats.started_s)
            self.totals.end(bridge.end_reason)
            if self.recorder is not None:
                self.recorder.call_ended(start.call_sid, bridge.stats, bridge.end_reason)
            st = bridge.stats
            jit = bridge.jitter.stats
            log.log(
                logging.WARNING if _failed(bridge.end_reason) else logging.INFO,
                "call %s: ended (%s) after %.1f s; frames in %d, to model %d, out %d; gaps filled %d, "
                "late/duplicate %d; barge-ins %d; bridge latency up %s, down %s; %s",
                st.call_sid,
                shown(bridge.end_reason, 300) if bridge.end_reason != "running" else "cancelled: Twilio disconnected or shutdown",
                trio.current_time() - st.started_s,
                st.frames_in,
                st.frames_to_model,
                st.frames_out,
                jit.concealed,
                jit.late + jit.duplicates,
                st.barge_ins,
                st.uplink.summary_ms(),
                st.downlink.summary_ms(),
                f"replies {st.reply.count}, waited mean {st.reply.total_s / st.reply.count * 1e3:.0f} ms, max {st.reply.max_s * 1e3:.0f} ms"
                if st.reply.count
                else "no timed replies",
            )
        if _model_failed(bridge.end_reason) and not bridge.handed_off:
            await self._tell_caller(start.call_sid)
        return _stream_end(bridge.end_reason)


# How long the REST request that has Twilio say MEDIASERVER_FAILURE_MESSAGE may take
FAILURE_REST_S = 5.0

SHUTDOWN_END = "cancelled: the server shut down before the call ended (MEDIASERVER_DRAIN_S)"


def _model_failed(reason: str) -> bool:
    """The call ended because its model failed: its connection broke, a fatal error, or it stopped reading.

    Not ``model closed: ...`` (a model that ended the session in order: it
    ended the call), nor what Twilio's side did."""
    return end_kind(reason) == "provider" or reason.startswith(MODEL_IDLE)


# End reasons that are failures: the call's end line is a warning (and the only line about it).
def _failed(reason: str) -> bool:
    """The call ended because something broke (one rule for the log, the stream's close, records and metrics)."""
    return end_kind(reason) in FAILED_KINDS


PROTOCOL_ERROR = 1002
MAX_CLOSE_REASON_BYTES = 123  # RFC 6455: a close frame's payload is at most 125 bytes, the code included


def _stream_end(reason: str) -> StreamEnd | None:
    """How to close the stream of a call that ended for ``reason``: None (1000) unless it failed.

    A failed call's stream closes with 1002 (a Twilio protocol error) or
    1011 and the end reason, so that tools that watch the close code
    (``mediaserver dial``) see the failure; Twilio ignores both.
    """
    if not _failed(reason):
        return None
    code = PROTOCOL_ERROR if reason.startswith("protocol error") else FAILED
    return StreamEnd(code, reason.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore"))


def _is_stop(message: str | bytes) -> bool:
    """Twilio's ``stop`` (a cheap look: the bridge's core checks it properly)."""
    if not isinstance(message, str) or '"stop"' not in message:
        return False
    try:
        parsed = json.loads(message)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("event") == "stop"


class _Replayed:
    """A stream that gives ``held`` messages back before reading on (what was read while the session got ready)."""

    def __init__(self, stream: MessageStream, held: deque[str | bytes]) -> None:
        self._stream = stream
        self._held = held

    async def receive(self) -> str | bytes:
        if self._held:
            return self._held.popleft()
        return await self._stream.receive()

    async def send(self, text: str) -> None:
        await self._stream.send(text)

    async def send_many(self, texts: Sequence[str]) -> None:
        await self._stream.send_many(texts)


def _reason(group: BaseExceptionGroup[ProviderClosed]) -> str:
    return "; ".join(exc.reason for exc in group.exceptions if isinstance(exc, ProviderClosed)) or str(group)
