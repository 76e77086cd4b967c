"""The recorder: hooks that never block, one writer in a worker thread, start-up and shutdown."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
import trio
import trio.testing

from mediaserver.bridge.stats import CallStats
from mediaserver.config import Settings
from mediaserver.protocol import twilio_events as tw
from mediaserver.records.model import CallRecord, Turn
from mediaserver.records import recorder as recorder_module
from mediaserver.records.recorder import Recorder, RecordsUnavailable, end_status, open_recorder
from mediaserver.records.store import RecordStore, SetTwilioStatus, StoreOp, open_store
from tests.fakes import fail_after

ACCOUNT = "AC" + "0" * 32


def start_event(call_sid: str) -> tw.Start:
    return tw.Start(
        sequence_number=1,
        stream_sid="MZ" + call_sid[2:],
        account_sid=ACCOUNT,
        call_sid=call_sid,
        tracks=("inbound",),
        custom_parameters={},
        media_format=tw.MediaFormat("audio/x-mulaw", 8000, 1),
    )


class Clock:
    """Wall clock for records: 2026-11-21 08:00 UTC, one second later at each reading."""

    def __init__(self) -> None:
        self.now = datetime(2026, 11, 21, 8, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        self.now += timedelta(seconds=1)
        return self.now


class SpyStore:
    """Wraps a real store's ``apply``: which thread ran each batch, and how big it was."""

    def __init__(self, store: RecordStore) -> None:
        self.store = store
        self.batches: list[int] = []
        self.threads: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        self.real_apply = store.apply
        store.apply = self.apply  # type: ignore[method-assign]

    def apply(self, ops: Sequence[StoreOp]) -> int:
        self.gate.wait(10)
        self.threads.add(threading.get_ident())
        self.batches.append(len(ops))
        return self.real_apply(ops)


def test_end_status_maps_end_reasons() -> None:
    for reason in ("twilio sent stop", "twilio hung up", "agent hung up: bye", "transferred to +15551234567",
                   "maximum call length 3600 s", "cancelled: Twilio disconnected or shutdown", "model closed: bye"):
        assert end_status(reason) == "completed", reason
    for reason in ("provider ended: openai connection closed (1011)", "provider error: boom",
                   "protocol error: bad JSON", "failed: RuntimeError()",
                   "idle: the model took no audio for 30 s (it is not reading)", "idle: nothing from Twilio for 30 s"):
        assert end_status(reason) == "failed", reason


@pytest.fixture
def store(records_settings: Callable[..., Settings]) -> Iterator[RecordStore]:
    opened = open_store(records_settings())
    yield opened
    opened.close()


@fail_after(20)
async def test_a_read_the_database_does_not_answer_is_abandoned_on_threads_of_its_own(store: RecordStore) -> None:
    """GET /calls/SID on a stalled database: 503 after the timeout, and trio's default threads (DNS for new
    model connections) stay free however many such requests come in."""
    release = threading.Event()
    real_get = store.get

    def stuck_get(call_sid: str) -> CallRecord | None:
        release.wait(10)
        return real_get(call_sid)

    store.get = stuck_get  # type: ignore[method-assign]
    recorder = Recorder(store, clock=Clock())
    default = trio.to_thread.current_default_thread_limiter()
    failures: list[str] = []

    async def read() -> None:
        try:
            await recorder.get("CAnone", wait_s=0, timeout_s=0.3)
        except RecordsUnavailable as exc:
            failures.append(str(exc))

    try:
        started_s = trio.current_time()
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(read)
            await trio.sleep(0.1)
            assert default.borrowed_tokens == 0  # the stuck reads hold only the records' own threads
        assert trio.current_time() - started_s < 1.0
        assert len(failures) == 10 and "within 0.3 s" in failures[0]
        with trio.move_on_after(0.1) as cancelled:  # a shutdown cancels a read at once
            await recorder.get("CAnone", wait_s=0, timeout_s=5)
        assert cancelled.cancelled_caught
    finally:
        release.set()
    assert await recorder.get("CAnone", wait_s=0) is None  # the database answers again: reads work


@fail_after(20)
async def test_recorder_hooks_never_block_and_count_what_is_dropped(
    store: RecordStore, caplog: pytest.LogCaptureFixture
) -> None:
    spy = SpyStore(store)
    recorder = Recorder(store, queue_size=3, clock=Clock())
    for i in range(5):  # no writer yet: the queue fills, the rest is dropped at once
        recorder.call_not_bridged(start_event(f"CA{i}"), "no model session: refused", "openai")
    assert recorder.dropped == 2
    assert sum("call record dropped" in r.getMessage() for r in caplog.records) == 2
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        await recorder.flushed()
        assert spy.batches == [3]  # drained as one batch, in one transaction
        assert spy.threads and threading.get_ident() not in spy.threads  # in a worker thread
        # While the database is slow, the hooks still return at once.
        spy.gate.clear()
        recorder.call_not_bridged(start_event("CA5"), "no model session: refused")
        await trio.sleep(0.05)
        for i in range(6, 9):  # plain functions: they cannot wait for the writer
            recorder.call_not_bridged(start_event(f"CA{i}"), "no model session: refused")
        assert len(spy.batches) == 1  # CA5's write is still stuck in the database
        spy.gate.set()
        await recorder.flushed()
        recorder.close()
    assert recorder.written == 7 and recorder.failed == 0 and recorder.dropped == 2
    stored = await trio.to_thread.run_sync(store.recent, 50)
    assert sorted(r.call_sid for r in stored) == ["CA0", "CA1", "CA2", "CA5", "CA6", "CA7", "CA8"]
    assert all(r.status == "failed" and r.end_reason == "no model session: refused" for r in stored)


@fail_after(20)
async def test_recorder_survives_a_failing_database(store: RecordStore, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder(store, clock=Clock())

    def broken(ops: Sequence[StoreOp]) -> int:
        raise RuntimeError("disk full")

    real = store.apply
    store.apply = broken  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        recorder.call_not_bridged(start_event("CAx"), "no model session: x")
        await recorder.flushed()
        assert recorder.failed == 1 and recorder.written == 0
        assert recorder.health == "failing"  # (/healthz and /metrics say so)
        store.apply = real  # type: ignore[method-assign]
        recorder.call_not_bridged(start_event("CAy"), "no model session: y")  # the writer still runs
        await recorder.flushed()
        assert recorder.health == "ok"
        recorder.close()
    assert recorder.written == 1
    # the line names the call whose record is missing: which one to look at
    assert any("could not write 1 record(s)" in r.getMessage() and "(call CAx)" in r.getMessage()
               and "disk full" in r.getMessage() for r in caplog.records)
    assert store.get("CAy") is not None and store.get("CAx") is None


@fail_after(20)
async def test_recorder_start_closes_callback_only_calls_older_than_twilio_s_longest_call(
    records_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = records_settings()
    store = open_store(settings)
    # A machine answered the day before, 24 h 11 min before this start, and the completed callback never came;
    # another call was answered 24 h 9 min before (Twilio allows 24-hour calls, and 10 minutes of ringing).
    try:
        store.apply([SetTwilioStatus("CAold", "in-progress", None, "2026-11-20T07:50:00+00:00", answered_by="machine_start"),
                     SetTwilioStatus("CAnew", "in-progress", None, "2026-11-20T07:52:00+00:00")])  # fmt: skip
    finally:
        store.close()
    caplog.set_level(logging.INFO, logger="mediaserver.records")
    async with open_recorder(settings, clock=Clock()) as recorder:  # starts at 2026-11-21 08:00:01
        assert recorder is not None
        old = await trio.to_thread.run_sync(recorder.store.get, "CAold")
        new = await trio.to_thread.run_sync(recorder.store.get, "CAnew")
        assert old is not None and new is not None and (old.status, new.status) == ("unknown", "in-progress")
    assert any("1 call(s) known only from Twilio's callbacks never got a final status; now unknown: CAold"
               in r.getMessage() for r in caplog.records)


@fail_after(20)
async def test_a_running_recorder_closes_callback_only_calls_once_they_are_old_enough(
    records_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only at start: a server that runs for weeks sweeps every SWEEP_EVERY_S."""
    monkeypatch.setattr(recorder_module, "SWEEP_EVERY_S", 0.05)
    caplog.set_level(logging.INFO, logger="mediaserver.records")
    settings = records_settings()
    clock = Clock()
    async with open_recorder(settings, clock=clock) as recorder:  # starts at 2026-11-21 08:00:01
        assert recorder is not None
        # first heard of 24 h 9 min before the start: not closed by it, nor by a sweep a minute later
        recorder.store.apply([SetTwilioStatus("CAlate", "ringing", None, "2026-11-20T07:51:01+00:00")])
        await trio.sleep(0.2)
        row = await trio.to_thread.run_sync(recorder.store.get, "CAlate")
        assert row is not None and row.status == "ringing"
        clock.now += timedelta(minutes=2)  # now 24 h 11 min: the next sweep closes it
        with trio.fail_after(5):
            while True:
                row = await trio.to_thread.run_sync(recorder.store.get, "CAlate")
                assert row is not None
                if row.status != "ringing":
                    break
                await trio.sleep(0.05)
        assert (row.status, row.end_reason) == ("unknown", "no final status from Twilio (its status callback never came)")
    assert [r.getMessage() for r in caplog.records if "never got a final status" in r.getMessage()] == [
        "call records: 1 call(s) known only from Twilio's callbacks never got a final status; now unknown: CAlate"
    ]


@fail_after(20)
async def test_recorder_keeps_who_answered_from_the_answer_webhook(records_settings: Callable[..., Settings]) -> None:
    """An outbound call placed with answering-machine detection: Twilio's AnsweredBy, live and stored; a value
    that is not one of Twilio's few words is not kept."""
    async with open_recorder(records_settings(), clock=Clock()) as recorder:
        assert recorder is not None
        answer = {"CallSid": ["CAamd"], "CallStatus": ["in-progress"], "Direction": ["outbound-api"],
                  "AnsweredBy": ["human"], "AccountSid": ["AC" + "b" * 32]}  # fmt: skip
        recorder.twilio_status(answer)
        recorder.webhook(answer)
        stats = CallStats(call_sid="CAamd", provider="fake", started_s=trio.current_time())
        recorder.call_started(start_event("CAamd"), stats)
        live = recorder.live("CAamd")
        assert live is not None and live.answered_by == "human"
        recorder.call_ended("CAamd", stats, "twilio sent stop")
        recorder.twilio_status({"CallSid": ["CAodd"], "CallStatus": ["completed"], "AnsweredBy": ["<machine>"],
                                "AccountSid": ["not-an-account"]})  # fmt: skip
        recorder.twilio_status({"CallSid": ["CAcb"], "CallStatus": ["busy"], "AccountSid": ["AC" + "c" * 32]})
        await recorder.flushed()
        stored = await trio.to_thread.run_sync(recorder.store.get, "CAamd")
        odd = await trio.to_thread.run_sync(recorder.store.get, "CAodd")
        assert stored is not None and (stored.answered_by, stored.status) == ("human", "completed")
        assert odd is not None and (odd.answered_by, odd.account_sid) == (None, None)
        busy = await trio.to_thread.run_sync(recorder.store.get, "CAcb")  # known only from a callback: its account
        assert busy is not None and busy.account_sid == "AC" + "c" * 32


@fail_after(20)
async def test_recorder_records_a_call_from_webhook_to_end(records_settings: Callable[..., Settings]) -> None:
    settings = records_settings()
    async with open_recorder(settings, clock=Clock()) as recorder:
        assert recorder is not None
        recorder.webhook({"CallSid": ["CAin"], "From": ["+15550001111"], "To": ["+15552223333"],
                          "Direction": ["outbound-api"], "AccountSid": [ACCOUNT]})
        stats = CallStats(call_sid="CAin", provider="fake", started_s=trio.current_time())
        recorder.call_started(start_event("CAin"), stats)
        await recorder.flushed()
        started = await trio.to_thread.run_sync(recorder.store.get, "CAin")
        assert started is not None and started.status == "in-progress"
        assert (started.direction, started.from_number, started.to_number) == ("outbound", "+15550001111", "+15552223333")
        stats.transcript.add("user", "Hello?", final=True, item_id="u1", offset_s=0.5)
        stats.transcript.add("assistant", "Hi, how can I help you today?", final=True, item_id="a1", offset_s=1.0)
        stats.transcript.cut("a1", 500, 2000)
        stats.barge_ins = 1
        stats.tool_calls.append("lookup")
        stats.uplink.add(0.0001)
        stats.reply.add(0.5)
        stats.reply.add(1.0)
        live = await recorder.get("CAin")  # a live call: as it stands now
        assert live is not None and live.status == "in-progress" and len(live.turns) == 2
        recorder.call_ended("CAin", stats, "twilio sent stop")
        recorder.twilio_status({"CallSid": ["CAin"], "CallStatus": ["completed"], "CallDuration": ["7"]})
        assert recorder.live("CAin") is None
        # An outbound call nobody answered: known from its callbacks alone, which say where it went.
        recorder.twilio_status(
            {"CallSid": ["CAnone"], "CallStatus": ["no-answer"], "Direction": ["outbound-api"],
             "From": ["+15550001111"], "To": ["+15554445555"]}
        )
        # A From/To of any length is kept to its first 256 characters (a SIP URI fits; a 30 KB flood does not),
        # from a status callback and from the webhook alike.
        recorder.twilio_status({"CallSid": ["CAlong"], "CallStatus": ["ringing"], "From": ["sip:" + "a" * 30_000],
                                "To": ["+1" + "5" * 300]})
        recorder.webhook({"CallSid": ["CAhook"], "From": ["sip:" + "b" * 30_000], "To": ["+15552223333"]})
        hooked = CallStats(call_sid="CAhook", provider="fake", started_s=trio.current_time())
        recorder.call_started(start_event("CAhook"), hooked)
        recorder.call_ended("CAhook", hooked, "twilio sent stop")
        # Durations that are not a count of seconds SQLite can hold are no duration, not a failed callback.
        for odd in ("²", "1" * 5000, "1" * 23, "-3", "4.5"):
            recorder.twilio_status({"CallSid": [f"CAodd{len(odd)}{odd[:1]}"], "CallStatus": ["completed"],
                                    "CallDuration": [odd]})
    # Shutdown wrote everything that was queued; the store is closed.
    store = await trio.to_thread.run_sync(open_store, settings)
    record = store.get("CAin")
    unanswered = store.get("CAnone")
    long = store.get("CAlong")
    hooked_record = store.get("CAhook")
    odd = [store.get(f"CAodd{len(d)}{d[:1]}") for d in ("²", "1" * 5000, "1" * 23, "-3", "4.5")]
    store.close()
    assert [(r.twilio_status, r.twilio_duration_s) for r in odd if r is not None] == [("completed", None)] * 5
    assert long is not None and (long.from_number, long.to_number) == ("sip:" + "a" * 252, "+1" + "5" * 254)
    assert hooked_record is not None and hooked_record.from_number == "sip:" + "b" * 252
    assert unanswered is not None
    assert (unanswered.direction, unanswered.from_number, unanswered.to_number, unanswered.status) == (
        "outbound", "+15550001111", "+15554445555", "no-answer")
    assert record is not None
    assert (record.status, record.end_reason, record.twilio_status, record.twilio_duration_s) == (
        "completed", "twilio sent stop", "completed", 7)
    # (the clock's first reading went to the start-up check for interrupted calls)
    assert record.started_at == "2026-11-21T08:00:02+00:00" and record.ended_at == "2026-11-21T08:00:03+00:00"
    assert (record.stream_sid, record.account_sid, record.provider) == ("MZin", ACCOUNT, "fake")
    assert record.barge_ins == 1 and record.tool_calls == ["lookup"]
    assert set(record.latency_ms) == {"uplink_p50", "uplink_p99", "reply_mean", "reply_max"}
    assert record.latency_ms["uplink_p50"] == 0.1  # one 0.1 ms sample
    assert (record.latency_ms["reply_mean"], record.latency_ms["reply_max"]) == (750.0, 1000.0)
    assert record.turns == [
        Turn("user", "Hello?", 0.5),
        Turn("assistant", "Hi, how", 1.0, interrupted=True, heard_ms=500),  # 25 % of 29 characters
    ]


@fail_after(20)
async def test_open_recorder_marks_calls_of_the_last_run_interrupted(
    records_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = records_settings()
    async with open_recorder(settings) as recorder:
        assert recorder is not None
        stats = CallStats(call_sid="CAlive", provider="echo", started_s=trio.current_time())
        recorder.call_started(start_event("CAlive"), stats)
        await recorder.flushed()
        # the server dies here: the call never ends
    caplog.set_level(logging.INFO, logger="mediaserver")
    async with open_recorder(settings) as recorder:
        assert recorder is not None
        record = await recorder.get("CAlive")
    assert record is not None and record.status == "interrupted"
    assert record.end_reason == "server stopped during the call" and record.ended_at is not None
    assert any("1 call(s) were live when the server last stopped" in r.getMessage() for r in caplog.records)


@fail_after(20)
async def test_a_second_server_on_the_same_database_leaves_the_live_calls_of_the_first_alone(
    records_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    settings = records_settings()
    async with open_recorder(settings) as first:
        assert first is not None
        first.call_started(start_event("CAlive"), CallStats(call_sid="CAlive", provider="echo", started_s=0.0))
        await first.flushed()
        async with open_recorder(settings) as second:  # another server, started beside the running one
            assert second is not None
            record = await second.get("CAlive")
            assert record is not None and record.status == "in-progress"  # not "interrupted": it is live
        assert any("another server is running on the" in r.getMessage() for r in caplog.records)
        # a server with an instance name of its own is another instance: it may claim and look at its own calls
        async with open_recorder(replace(settings, instance_url="https://b.example.com")) as other:
            assert other is not None
            assert (await other.get("CAlive")).status == "in-progress"  # type: ignore[union-attr]
    async with open_recorder(settings) as restarted:  # the first has stopped: its live call was cut off
        assert restarted is not None
        record = await restarted.get("CAlive")
    assert record is not None and record.status == "interrupted"


@fail_after(20)
async def test_open_recorder_without_a_database_turns_records_off(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(database_url="postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")
    async with open_recorder(settings) as recorder:
        assert recorder is None
    assert any("call records are OFF: cannot connect" in r.getMessage() for r in caplog.records)


def test_call_record_of_a_cancelled_call_is_completed() -> None:
    recorder = Recorder(RecordStore(), clock=Clock())
    stats = CallStats(call_sid="CAc", provider="echo", started_s=0.0)

    async def run() -> CallRecord:
        recorder.call_started(start_event("CAc"), stats)
        recorder.call_ended("CAc", stats, "running")  # never set a reason: cancelled
        await trio.sleep(0)
        return recorder._receive.receive_nowait().record  # type: ignore[union-attr]  # the start

    first = trio.run(run)
    assert first.status == "in-progress"
    ended = recorder._receive.receive_nowait()
    assert ended.record.end_reason == "cancelled: Twilio disconnected or shutdown"  # type: ignore[union-attr]
    assert ended.record.status == "completed"  # type: ignore[union-attr]


@fail_after(20)
async def test_a_database_that_stops_answering_cannot_hang_the_shutdown(
    records_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A write stuck in the database is abandoned after SHUTDOWN_WRITE_S, what is queued after FINAL_WRITE_S."""
    import mediaserver.records.recorder as recorder_module

    stuck = threading.Event()
    hanging = threading.Event()
    answered = threading.Event()
    stores: list[RecordStore] = []
    real_open = recorder_module.open_store

    def open_hanging(settings: Settings) -> RecordStore:
        store = real_open(settings)
        stores.append(store)
        real_apply = store.apply

        def apply(ops: Sequence[StoreOp]) -> int:
            if any(getattr(op, "record", None) is not None and op.record.call_sid == "CAstuck" for op in ops):  # type: ignore[union-attr]
                with store._lock:  # as a statement the database never answers: the store is held meanwhile
                    hanging.set()
                    stuck.wait()
                answered.set()
            return real_apply(ops)

        store.apply = apply  # type: ignore[method-assign]
        return store

    monkeypatch.setattr(recorder_module, "open_store", open_hanging)
    monkeypatch.setattr(recorder_module, "SHUTDOWN_WRITE_S", 0.3)
    monkeypatch.setattr(recorder_module, "FINAL_WRITE_S", 0.2)
    try:
        async with open_recorder(records_settings()) as recorder:
            assert recorder is not None
            recorder.call_not_bridged(start_event("CAok"), "no model session: x")
            await recorder.flushed()
            recorder.call_not_bridged(start_event("CAstuck"), "no model session: x")
            while not hanging.is_set():  # its write is in the database now, and hangs
                await trio.sleep(0.01)
            recorder.call_not_bridged(start_event("CAlater"), "no model session: x")
            closing_s = trio.current_time()
        # SHUTDOWN_WRITE_S, then nothing more: CAlater's write and the close would wait behind the stuck one
        assert trio.current_time() - closing_s < 0.3 + 1.0
        assert recorder.written == 1 and recorder.stuck
    finally:
        stuck.set()  # let the abandoned thread finish, then close what the server left
        await trio.to_thread.run_sync(answered.wait, 5)
        for store in stores:
            await trio.to_thread.run_sync(store.close)
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("call records: 2 record(s) not written: the ") for m in messages), messages
