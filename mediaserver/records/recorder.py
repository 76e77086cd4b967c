"""The non-blocking writer of call records.

The call path only *queues* records: every hook of :class:`Recorder` is a
plain function that puts one write on a bounded Trio memory channel with
``send_nowait``.  When the channel is full the write is dropped and counted
(with a warning) -- a slow or dead database never delays a call's audio.
One writer task (:meth:`Recorder.run`, in the server's nursery) drains the
channel in batches and runs each batch in a worker thread.

:func:`open_recorder` is the server's start-up and shutdown: open the store
(migrations), mark calls left ``in-progress`` by a previous run as
``interrupted``, run the writer, and at exit write what is still queued and
close the store.
"""

from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import trio

from mediaserver.bridge.stats import CallStats
from mediaserver.config import Settings
from mediaserver.metrics import FAILED_KINDS, end_kind
from mediaserver.protocol import twilio_events as tw

from .model import CallRecord
from .store import TWILIO_LONGEST_CALL_S, RecordsError, RecordStore, SaveCall, SetTwilioStatus, StoreOp, open_store

__all__ = ["Recorder", "RecordsUnavailable", "end_status", "open_recorder", "utc_now"]


class RecordsUnavailable(Exception):
    """The database did not answer a read in time."""


log = logging.getLogger("mediaserver.records")

QUEUE_SIZE = 1000  # writes waiting for the database; more are dropped
BATCH_SIZE = 100  # writes per transaction
MAX_EXPECTED = 10_000  # webhook details kept for calls whose stream has not started
MAX_DETAIL_CHARS = 256  # a From/To (a number, client:name or a SIP URI) or AccountSid kept: longer is cut
SHUTDOWN_WRITE_S = 10.0  # at shutdown, how long the writer may take to write what is queued ...
FINAL_WRITE_S = 5.0  # ... and then its last batch (a database that does not answer cannot hold the server up)

SWEEP_EVERY_S = 3600.0  # how often a running server closes callback-only calls whose final status never came
READ_THREADS = 4  # reads (GET /calls/SID) at once, on threads of their own
READ_TIMEOUT_S = 5.0  # a read the database has not answered by then is abandoned: 503

CANCELLED = "cancelled: Twilio disconnected or shutdown"  # as the registry logs a call that never set a reason

def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def end_status(end_reason: str) -> str:
    """``failed`` when a bridged call ended because something broke, else ``completed`` (kinds as /metrics counts them).

    (A stream that could not be bridged at all is recorded as failed by :meth:`Recorder.call_not_bridged`.)
    """
    return "failed" if end_kind(end_reason) in FAILED_KINDS else "completed"


class Recorder:
    """Hooks for the call path (never block, never raise) and the writer task."""

    def __init__(
        self,
        store: RecordStore,
        *,
        queue_size: int = QUEUE_SIZE,
        batch_size: int = BATCH_SIZE,
        clock: Callable[[], datetime] = utc_now,
        instance: str | None = None,
    ) -> None:
        self.store = store
        self.instance = instance  # written into every record: whose live calls a restart may mark interrupted
        self.batch_size = batch_size
        self.clock = clock
        self._send, self._receive = trio.open_memory_channel[StoreOp](queue_size)
        self.dropped = 0  # writes refused because the queue was full (or closed)
        self.written = 0
        self.failed = 0  # writes the database refused
        self._unwritten = 0  # queued or being written
        self.stuck = False  # a write was abandoned at shutdown, the database not answering
        self.last_failed = False  # the last batch's write failed (whole or in part): the database is in trouble
        self._deadline = math.inf  # see stop_by
        self._write_scope: trio.CancelScope | None = None
        self._idle = trio.Event()
        self._idle.set()
        self._live: dict[str, tuple[CallRecord, CallStats]] = {}
        self._readers = trio.CapacityLimiter(READ_THREADS)  # (not trio's default limiter: DNS for new calls uses it)
        self._expected: OrderedDict[str, dict[str, str]] = OrderedDict()

    # -- hooks for the call path ------------------------------------------------------

    def expect(self, call_sid: str, **details: str | None) -> None:
        """Details of a call known before its stream starts (webhook or outbound dial).

        Keys: ``direction`` (``inbound``/``outbound``), ``from_number``,
        ``to_number``, ``account_sid``, ``answered_by``; ``None`` values are ignored.
        """
        known = self._expected.pop(call_sid, {})
        known.update({k: v[:MAX_DETAIL_CHARS] for k, v in details.items() if v})
        self._expected[call_sid] = known
        while len(self._expected) > MAX_EXPECTED:
            self._expected.popitem(last=False)

    def webhook(self, form: Mapping[str, Sequence[str]]) -> None:
        """The voice webhook's form (``CallSid``, ``From``, ``To``, ``AccountSid``, ``Direction``)."""
        first = {key: values[0] for key, values in form.items() if values}
        call_sid = first.get("CallSid")
        if not call_sid:
            return
        direction = first.get("Direction", "")
        self.expect(
            call_sid,
            direction="outbound" if direction.startswith("outbound") else None,
            from_number=first.get("From"),
            to_number=first.get("To"),
            account_sid=first.get("AccountSid"),
            answered_by=_answered_by(first),
        )

    def call_started(self, start: tw.Start, stats: CallStats) -> None:
        """The bridge started: insert the call as ``in-progress``."""
        record = self._new_record(start, stats.provider)
        self._live[start.call_sid] = (record, stats)
        self._put(SaveCall(replace(record, tool_calls=[], turns=[])))

    def call_ended(self, call_sid: str, stats: CallStats, end_reason: str) -> None:
        """The bridge ended (``CallBridge.end_reason``; ``"running"`` = cancelled): the full record."""
        live = self._live.pop(call_sid, None)
        if live is None:
            return
        self._put(SaveCall(self._snapshot(live[0], stats, end_reason, ended=True)))

    def call_not_bridged(self, start: tw.Start, reason: str, provider: str | None = None, *, status: str = "failed") -> None:
        """The stream came but was not bridged: a ``failed`` record (no model session, say), or with
        ``status="completed"`` when nothing broke (the caller hung up before the model session was ready)."""
        record = self._new_record(start, provider)
        record.status, record.end_reason = status, reason
        record.ended_at = record.started_at
        record.duration_s = 0.0
        self._put(SaveCall(record))

    def twilio_status(self, form: Mapping[str, Sequence[str]]) -> None:
        """A status callback's form (``CallSid``, ``CallStatus``, ``CallDuration``; ``Direction``, ``From``, ``To``;
        ``AnsweredBy`` with answering-machine detection), or an outbound call's answer webhook (``in-progress``)."""
        first = {key: values[0] for key, values in form.items() if values}
        call_sid, status = first.get("CallSid"), first.get("CallStatus")
        if not call_sid or not status:
            return
        duration = first.get("CallDuration", "")
        # (ASCII digits only: "²" is a digit to str.isdigit; and at most 9 of them, which SQLite's INTEGER holds)
        seconds = int(duration) if duration.isascii() and duration.isdigit() and len(duration) <= 9 else None
        direction = first.get("Direction", "")
        self._put(
            SetTwilioStatus(
                call_sid,
                status[:40],
                seconds,
                self.clock().isoformat(),
                direction="outbound" if direction.startswith("outbound") else "inbound" if direction == "inbound" else None,
                from_number=first.get("From", "")[:MAX_DETAIL_CHARS] or None,
                to_number=first.get("To", "")[:MAX_DETAIL_CHARS] or None,
                answered_by=_answered_by(first),
                account_sid=_account_sid(first),
            )
        )

    # -- reads -------------------------------------------------------------------------

    def live(self, call_sid: str) -> CallRecord | None:
        """A call in progress as it stands now (transcript so far), or None."""
        live = self._live.get(call_sid)
        return None if live is None else self._snapshot(live[0], live[1], None, ended=False)

    async def get(self, call_sid: str, *, wait_s: float = 1.0, timeout_s: float = READ_TIMEOUT_S) -> CallRecord | None:
        """A live call's snapshot, else the stored record (after up to ``wait_s`` for queued writes).

        The read runs on a thread of the records' own few (:data:`READ_THREADS`),
        never on the threads new model connections need (DNS), and is
        abandoned after ``timeout_s`` (raising :class:`RecordsUnavailable`)
        or when cancelled (a shutdown): a database that stopped answering
        holds up neither the server nor its shutdown.
        """
        record = self.live(call_sid)
        if record is not None:
            return record
        with trio.move_on_after(wait_s):
            await self.flushed()
        with trio.move_on_after(timeout_s):
            return await trio.to_thread.run_sync(self.store.get, call_sid, abandon_on_cancel=True, limiter=self._readers)
        raise RecordsUnavailable(f"no answer from the {self.store.description} within {timeout_s:g} s")

    async def flushed(self) -> None:
        """Return once everything queued so far has been written (or has failed)."""
        while not self._idle.is_set():
            await self._idle.wait()

    # -- the writer ----------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued records until :meth:`close` (or cancellation; what is queued is written first)."""
        task_status.started()
        try:
            async for op in self._receive:
                batch = [op]
                while len(batch) < self.batch_size:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                await self._write(batch)
        finally:
            rest: list[StoreOp] = []
            while True:
                try:
                    rest.append(self._receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
            if rest:  # (the writer was cancelled: what is queued gets FINAL_WRITE_S at most)
                self.stop_by(trio.current_time() + FINAL_WRITE_S)
                await self._write(rest)
            if self._unwritten:
                log.error(
                    "call records: %d record(s) not written: the %s did not answer in time",
                    self._unwritten,
                    self.store.description,
                )

    def close(self) -> None:
        """No more writes: the writer drains the queue and returns."""
        self._send.close()

    # -- internals -----------------------------------------------------------------------

    def _put(self, op: StoreOp) -> None:
        try:
            self._send.send_nowait(op)
        except (trio.WouldBlock, trio.ClosedResourceError):
            self.dropped += 1
            sid = op.record.call_sid if isinstance(op, SaveCall) else op.call_sid
            log.warning(
                "call %s: call record dropped: the write queue is full or closed (%d dropped)", sid, self.dropped
            )
            return
        self._unwritten += 1
        if self._idle.is_set():
            self._idle = trio.Event()

    def stop_by(self, deadline: float) -> None:
        """Shutdown: a write still under way at ``deadline`` (Trio time) is abandoned, and nothing more is written.

        Until then writes are shielded from cancellation, as a batch half
        written is worse than a shutdown a moment later.
        """
        self._deadline = min(self._deadline, deadline)
        if self._write_scope is not None:
            self._write_scope.deadline = self._deadline

    async def _write(self, batch: list[StoreOp]) -> None:
        if self.stuck:  # behind a write the database never answered, this one would wait too
            return
        failed = len(batch)
        with trio.CancelScope(shield=True, deadline=self._deadline) as scope:
            self._write_scope = scope
            try:
                # (abandon_on_cancel: at the deadline the thread is left waiting for the database)
                failed = await trio.to_thread.run_sync(self.store.apply, batch, abandon_on_cancel=True)
            except Exception as exc:
                log.error("call records: could not write %d record(s) to the %s (%s): %s", failed, self.store.description,
                          _calls_of(batch), exc)
            else:
                if failed:
                    log.error("call records: %d of %d record(s) could not be written", failed, len(batch))
            finally:
                self._write_scope = None
        if scope.cancelled_caught:
            self.stuck = True  # its thread still waits for the database, holding the store: the batch is unwritten
            return
        self.failed += failed
        self.written += len(batch) - failed
        self.last_failed = failed > 0
        self._unwritten -= len(batch)
        if self._unwritten == 0:
            self._idle.set()

    @property
    def queued(self) -> int:
        """Writes queued or being written now."""
        return self._unwritten

    @property
    def health(self) -> str:
        """``ok``, or ``failing`` (the last write failed), or ``stuck`` (the database stopped answering)."""
        return "stuck" if self.stuck else "failing" if self.last_failed else "ok"

    def _new_record(self, start: tw.Start, provider: str | None) -> CallRecord:
        known = self._expected.pop(start.call_sid, {})
        return CallRecord(
            call_sid=start.call_sid,
            started_at=self.clock().isoformat(),
            stream_sid=start.stream_sid,
            account_sid=start.account_sid or known.get("account_sid"),
            direction=known.get("direction", "inbound"),
            from_number=known.get("from_number"),
            to_number=known.get("to_number"),
            provider=provider,
            instance=self.instance,
            answered_by=known.get("answered_by"),
        )

    def _snapshot(self, record: CallRecord, stats: CallStats, end_reason: str | None, *, ended: bool) -> CallRecord:
        latency: dict[str, float] = {}
        for name, histogram in (("uplink", stats.uplink), ("downlink", stats.downlink)):
            if histogram.count:
                latency[f"{name}_p50"] = round(histogram.quantile(0.5) * 1e3, 3)
                latency[f"{name}_p99"] = round(histogram.quantile(0.99) * 1e3, 3)
        if stats.reply.count:  # how long the caller waited for the agent's answers
            latency["reply_mean"] = round(stats.reply.total_s / stats.reply.count * 1e3, 1)
            latency["reply_max"] = round(stats.reply.max_s * 1e3, 1)
        snapshot = replace(
            record,
            barge_ins=stats.barge_ins,
            tool_calls=list(stats.tool_calls),
            latency_ms=latency,
            turns=stats.transcript.turns(),
            duration_s=round(trio.current_time() - stats.started_s, 3),
        )
        if ended:
            reason = end_reason if end_reason and end_reason != "running" else CANCELLED
            snapshot.status = end_status(reason)
            snapshot.end_reason = reason
            snapshot.ended_at = self.clock().isoformat()
        return snapshot


@asynccontextmanager
async def open_recorder(
    settings: Settings, *, clock: Callable[[], datetime] = utc_now
) -> AsyncIterator[Recorder | None]:
    """The server's recorder, its writer running; ``None`` (records off) if the store cannot be opened.

    At start, calls a previous run left ``in-progress`` are marked
    ``interrupted``.  At exit, queued records are written, then the store is closed.
    """
    try:
        store = await trio.to_thread.run_sync(open_store, settings)
    except RecordsError as exc:
        log.error("call records are OFF: %s", exc)
        yield None
        return
    recorder: Recorder | None = None
    try:
        try:
            stale: list[str] = []
            now = clock()
            if await trio.to_thread.run_sync(store.claim_instance, settings.instance_url):
                stale = await trio.to_thread.run_sync(store.mark_interrupted, now.isoformat(), settings.instance_url)
            else:
                log.warning(
                    "call records: another server is running on the %s as %s: its live calls are left as they are "
                    "(give each server its own MEDIASERVER_INSTANCE_URL, or its own MEDIASERVER_DATA_DIR)",
                    store.description, settings.instance_url or "the same single instance",
                )
            unfinished = await trio.to_thread.run_sync(store.close_unfinished_callbacks, _longest_call_ago(now))
        except Exception as exc:
            log.error("call records are OFF: cannot update the %s: %s", store.description, exc)
            yield None
            return
        _log_unfinished(unfinished)
        if stale:
            shown = ", ".join(stale[:10]) + (" ..." if len(stale) > 10 else "")
            log.warning("call records: %d call(s) were live when the server last stopped, now interrupted: %s",
                        len(stale), shown)
        log.info("call records: %s", store.description)
        recorder = Recorder(store, clock=clock, instance=settings.instance_url)
        async with trio.open_nursery() as nursery:
            await nursery.start(recorder.run)
            sweeping = trio.CancelScope()
            nursery.start_soon(_sweep_unfinished, recorder, sweeping)
            try:
                yield recorder
            finally:
                sweeping.cancel()
                recorder.close()
                recorder.stop_by(trio.current_time() + SHUTDOWN_WRITE_S)
    finally:
        if recorder is None or not recorder.stuck:  # (else the store is held by the abandoned write: leave it)
            with trio.move_on_after(FINAL_WRITE_S, shield=True):
                await trio.to_thread.run_sync(store.close, abandon_on_cancel=True)


def _longest_call_ago(now: datetime) -> str:
    # (any instance's rows: one first heard of that long ago is no call under way anywhere)
    return (now - timedelta(seconds=TWILIO_LONGEST_CALL_S)).isoformat()


def _log_unfinished(sids: Sequence[str]) -> None:
    if sids:
        log.info("call records: %d call(s) known only from Twilio's callbacks never got a final status; now "
                 "unknown: %s", len(sids), ", ".join(sids[:10]) + (" ..." if len(sids) > 10 else ""))


async def _sweep_unfinished(recorder: Recorder, scope: trio.CancelScope) -> None:
    """Every ``SWEEP_EVERY_S`` while the server runs, what the start does once: callback-only calls first heard of
    more than ``TWILIO_LONGEST_CALL_S`` ago whose final status never came become ``unknown`` (a server that runs
    for weeks would otherwise show them ringing or in progress until its next start)."""
    with scope:
        while True:
            await trio.sleep(SWEEP_EVERY_S)
            if recorder.stuck:  # (the database stopped answering a write: nothing more goes to it)
                return
            try:
                # (the store's lock serialises this with the writer's batches)
                sids = await trio.to_thread.run_sync(
                    recorder.store.close_unfinished_callbacks, _longest_call_ago(recorder.clock()),
                    abandon_on_cancel=True, limiter=recorder._readers,
                )
            except Exception as exc:  # (the next sweep tries again; calls go on either way)
                log.warning("call records: could not close calls without a final status: %s", exc)
            else:
                _log_unfinished(sids)


def _calls_of(batch: Sequence[StoreOp], most: int = 5) -> str:
    """The calls a batch is about, for the line saying it was not written (which records to look at)."""
    sids = sorted({op.record.call_sid if isinstance(op, SaveCall) else op.call_sid for op in batch})
    shown_sids = ", ".join(sids[:most]) + (f" and {len(sids) - most} more" if len(sids) > most else "")
    return f"call{'s' if len(sids) > 1 else ''} {shown_sids}"


def _answered_by(form: Mapping[str, str]) -> str | None:
    """Twilio's ``AnsweredBy`` (answering-machine detection): a few lower-case words, or None (absent, or not that)."""
    value = form.get("AnsweredBy", "")
    return value if re.fullmatch(r"[a-z_]{1,40}", value) else None


def _account_sid(form: Mapping[str, str]) -> str | None:
    """Twilio's ``AccountSid``: AC and 32 hex digits, or None."""
    value = form.get("AccountSid", "")
    return value if tw.is_twilio_sid(value, "AC") else None
