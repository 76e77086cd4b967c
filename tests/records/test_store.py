"""The stores, on SQLite and on a real PostgreSQL server: schema, migrations, writes, reads."""

from __future__ import annotations

import logging
import sqlite3
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from mediaserver.config import Settings
from mediaserver.records.migrations import MIGRATIONS, apply_migrations, read_version
from mediaserver.records.model import CallRecord, Turn
from mediaserver.records.store import (
    INTERRUPTED_REASON,
    RecordsError,
    SaveCall,
    SetTwilioStatus,
    SqliteStore,
    open_store,
    redact,
    sqlite_path,
)

T0 = "2026-11-21T08:00:00+00:00"


def full_record(sid: str = "CA" + "1" * 32, **changes: object) -> CallRecord:
    record = CallRecord(
        call_sid=sid,
        started_at=T0,
        status="completed",
        stream_sid="MZ" + "2" * 32,
        account_sid="AC" + "3" * 32,
        direction="outbound",
        from_number="+15550001111",
        to_number="+15552223333",
        provider="openai",
        ended_at="2026-11-21T08:01:00+00:00",
        end_reason="twilio sent stop",
        duration_s=60.25,
        barge_ins=1,
        tool_calls=["weather", "hang_up"],
        latency_ms={"uplink_p50": 0.02, "uplink_p99": 0.05},
        turns=[
            Turn("user", "Wie ist das Wetter? ☀", 1.5),
            Turn("assistant", "Sunny, and", 3.25, interrupted=True, heard_ms=740),
            Turn("user", "Thanks.", 5.0),
        ],
    )
    for key, value in changes.items():
        setattr(record, key, value)
    return record


def test_store_fresh_database_is_migrated_once(records_settings: Callable[..., Settings]) -> None:
    settings = records_settings()
    store = open_store(settings)
    try:
        assert store.version() == len(MIGRATIONS) == 4
        rows = store.execute("SELECT version, applied_at FROM schema_migrations ORDER BY version")
        assert [r[0] for r in rows] == [1, 2, 3, 4] and all(r[1].startswith("20") for r in rows)
        assert store.migrate() == []  # idempotent
    finally:
        store.close()
    again = open_store(settings)  # and again at the next start
    try:
        assert again.migrate() == [] and again.version() == 4
        assert len(again.execute("SELECT * FROM schema_migrations")) == 4
    finally:
        again.close()
    if not settings.database_url:
        assert sqlite_path(settings).is_file()


def test_read_version_reads_without_writing_and_tells_no_table_from_a_failure(
    records_settings: Callable[..., Settings],
) -> None:
    settings = records_settings()
    store = open_store(settings, migrate=False)  # an empty database: no migrations table
    try:
        assert read_version(store) == 0
        assert read_version(store) == 0  # (and it created nothing: PostgreSQL's failed query left no transaction)
        store.migrate()
        assert read_version(store) == len(MIGRATIONS)
    finally:
        store.close()

    class Failing:
        def execute(self, sql: str, params: object = ()) -> list[tuple[object, ...]]:
            raise sqlite3.OperationalError("disk I/O error")

    with pytest.raises(sqlite3.OperationalError, match="disk I/O"):  # not "no calls yet"
        read_version(Failing())  # type: ignore[arg-type]


def test_store_v1_database_upgrades_and_keeps_its_calls(records_settings: Callable[..., Settings]) -> None:
    settings = records_settings()
    store = open_store(settings, migrate=False)
    try:
        assert apply_migrations(store, MIGRATIONS[:1]) == [1]
        assert store.version() == 1
        # a call as the v1 schema stored it
        store.execute(
            "INSERT INTO calls (call_sid, started_at, status, provider, duration_s) VALUES (?, ?, ?, ?, ?)",
            ("CAold", T0, "completed", "echo", 12.5),
        )
        with pytest.raises(Exception):  # noqa: B017 - v1 has no twilio_status (either driver's error)
            store.execute("SELECT twilio_status FROM calls")
    finally:
        store.close()
    upgraded = open_store(settings)
    try:
        assert upgraded.version() == len(MIGRATIONS)
        old = upgraded.get("CAold")
        assert old is not None
        assert (old.status, old.provider, old.duration_s, old.twilio_status, old.instance, old.answered_by) == (
            "completed", "echo", 12.5, None, None, None
        )
        upgraded.apply([SetTwilioStatus("CAold", "completed", 13, T0)])
        assert (upgraded.get("CAold") or old).twilio_duration_s == 13
    finally:
        upgraded.close()


def test_store_round_trips_a_call_and_replaces_it(records_settings: Callable[..., Settings]) -> None:
    store = open_store(records_settings())
    try:
        record = full_record()
        store.save(record)
        assert store.get(record.call_sid) == record
        # the end-of-call save replaces the row and the transcript
        shorter = full_record(status="failed", end_reason="provider ended: gone", turns=[Turn("user", "Hi", 0.5)])
        store.save(shorter)
        assert store.get(record.call_sid) == shorter
        assert store.get("CA-unknown") is None
    finally:
        store.close()


def test_store_lists_recent_calls_newest_first(records_settings: Callable[..., Settings]) -> None:
    store = open_store(records_settings())
    try:
        for i in range(5):
            store.save(full_record(f"CA{i}", started_at=f"2026-11-21T08:0{i}:00+00:00"))
        recent = store.recent(3)
        assert [r.call_sid for r in recent] == ["CA4", "CA3", "CA2"]
        assert all(r.turns == [] for r in recent)  # listings leave the transcripts out
        assert recent[0].tool_calls == ["weather", "hang_up"]
    finally:
        store.close()


def test_store_marks_live_calls_interrupted_at_the_next_start(records_settings: Callable[..., Settings]) -> None:
    settings = records_settings()
    store = open_store(settings)
    try:
        store.save(CallRecord("CAlive", T0, stream_sid="MZlive", provider="echo"))  # in-progress: the server died
        store.save(full_record("CAdone"))
    finally:
        store.close()
    restarted = open_store(settings)
    try:
        assert restarted.mark_interrupted("2026-11-21T09:00:00+00:00") == ["CAlive"]
        live = restarted.get("CAlive")
        assert live is not None
        assert (live.status, live.end_reason, live.ended_at) == (
            "interrupted",
            INTERRUPTED_REASON,
            "2026-11-21T09:00:00+00:00",
        )
        assert restarted.get("CAdone") == full_record("CAdone")  # untouched
        assert restarted.mark_interrupted("2026-11-21T10:00:00+00:00") == []
    finally:
        restarted.close()


def test_store_a_restart_marks_only_its_own_instances_calls(records_settings: Callable[..., Settings]) -> None:
    # Several instances on one database: instance 1 restarting must not end the calls live on instance 2.
    settings = records_settings()
    store = open_store(settings)
    try:
        for sid, instance in (("CAone", "https://v.example.com/n1"), ("CAtwo", "https://v.example.com/n2"),
                              ("CAsolo", None)):  # fmt: skip
            store.save(CallRecord(sid, T0, stream_sid="MZ" + sid, instance=instance))
        assert store.mark_interrupted("2026-11-21T09:00:00+00:00", "https://v.example.com/n1") == ["CAone"]
        assert [store.get(sid).status for sid in ("CAone", "CAtwo", "CAsolo")] == [  # type: ignore[union-attr]
            "interrupted", "in-progress", "in-progress"]  # fmt: skip
        assert store.get("CAtwo").instance == "https://v.example.com/n2"  # type: ignore[union-attr]
        assert store.mark_interrupted("2026-11-21T09:00:00+00:00") == ["CAsolo"]  # (no instance URL: the only one)
    finally:
        store.close()


def test_store_keeps_twilio_status_callbacks(records_settings: Callable[..., Settings]) -> None:
    store = open_store(records_settings())
    try:
        store.save(full_record("CAa", status="in-progress"))
        store.apply([SetTwilioStatus("CAa", "completed", 61, T0), SetTwilioStatus("CAb", "no-answer", None, T0)])
        a = store.get("CAa")
        assert a is not None and (a.status, a.twilio_status, a.twilio_duration_s) == ("in-progress", "completed", 61)
        store.save(full_record("CAa"))  # the end-of-call save does not lose Twilio's status
        a = store.get("CAa")
        assert a is not None and (a.status, a.twilio_status, a.twilio_duration_s) == ("completed", "completed", 61)
        # A call that never reached us is known from its callback alone.
        b = store.get("CAb")
        assert b is not None and (b.status, b.twilio_status, b.started_at, b.turns) == ("no-answer", "no-answer", T0, [])
        # ... and follows Twilio's status (answered elsewhere, then completed)
        store.apply([SetTwilioStatus("CAb", "in-progress", None, T0)])
        assert store.mark_interrupted(T0) == []  # not ours: it never streamed to us
        store.apply([SetTwilioStatus("CAb", "completed", 30, T0)])
        b = store.get("CAb")
        assert b is not None and (b.status, b.twilio_status, b.twilio_duration_s) == ("completed", "completed", 30)
    finally:
        store.close()


T1 = "2026-11-22T10:00:05+00:00"


def test_store_a_late_status_callback_never_replaces_a_final_one(records_settings: Callable[..., Settings]) -> None:
    """Twilio's callbacks may arrive out of order: a late in-progress after completed must not reopen the call."""
    store = open_store(records_settings())
    try:
        store.apply([SetTwilioStatus("CAb", "ringing", None, T0), SetTwilioStatus("CAb", "completed", 30, T1),
                     SetTwilioStatus("CAb", "in-progress", None, T0)])  # fmt: skip
        b = store.get("CAb")
        assert b is not None and (b.status, b.twilio_status, b.twilio_duration_s) == ("completed", "completed", 30)
        assert b.ended_at == T1  # a call known from callbacks alone ends with its final status
        assert store.mark_interrupted(T1) == []
        # a streamed call keeps its own status and end; only Twilio's status is guarded
        store.save(full_record("CAa"))
        store.apply([SetTwilioStatus("CAa", "completed", 5, T1), SetTwilioStatus("CAa", "in-progress", None, T0)])
        a = store.get("CAa")
        assert a is not None and (a.status, a.twilio_status) == ("completed", "completed")
        assert a.ended_at == full_record("CAa").ended_at
        # one final status after another (Twilio would not send it; nothing to guard): the newer one stands
        store.apply([SetTwilioStatus("CAb", "failed", None, T1)])
        assert store.get("CAb").twilio_status == "failed"  # type: ignore[union-attr]
    finally:
        store.close()


def test_store_keeps_who_answered_an_outbound_call_with_machine_detection(records_settings: Callable[..., Settings]) -> None:
    """Twilio's AnsweredBy (the answer webhook's, then the callbacks'): kept once known, and a save keeps it."""
    store = open_store(records_settings())
    try:
        store.apply([SetTwilioStatus("CAm", "ringing", None, T0, direction="outbound"),
                     SetTwilioStatus("CAm", "in-progress", None, T0, answered_by="machine_end_beep"),
                     SetTwilioStatus("CAm", "completed", 9, T1)])  # fmt: skip
        m = store.get("CAm")
        assert m is not None and (m.answered_by, m.status, m.twilio_duration_s) == ("machine_end_beep", "completed", 9)
        assert m.to_json()["answered_by"] == "machine_end_beep"
        store.apply([SetTwilioStatus("CAh", "in-progress", None, T0, answered_by="human")])
        store.save(full_record("CAh"))  # the bridged call's own record does not lose it
        h = store.get("CAh")
        assert h is not None and (h.answered_by, h.status) == ("human", "completed")
        assert store.get("CAa") is None or store.get("CAa").answered_by is None  # type: ignore[union-attr]
        # The call's own record may know it first (its callback write was lost): a save writes it, never erases it.
        store.save(full_record("CAs", answered_by="human"))
        store.save(full_record("CAs"))
        assert store.get("CAs").answered_by == "human"  # type: ignore[union-attr]
    finally:
        store.close()


def test_store_closes_calls_known_only_from_callbacks_whose_final_status_never_came(
    records_settings: Callable[..., Settings],
) -> None:
    """Twilio ends every call within 4 h: a callback-only row older than that and not final becomes ``unknown``
    (a machine's call whose completed callback was lost would say in-progress for ever); nothing else changes."""
    old, recent = "2026-11-21T03:00:00+00:00", "2026-11-21T07:30:00+00:00"
    store = open_store(records_settings())
    try:
        store.apply([
            SetTwilioStatus("CAmachine", "in-progress", None, old, answered_by="machine_start"),
            SetTwilioStatus("CAringing", "ringing", None, old),
            SetTwilioStatus("CArecent", "in-progress", None, recent),
            SetTwilioStatus("CAdone", "no-answer", None, old),
        ])  # fmt: skip
        store.save(full_record("CAstreamed", status="in-progress", started_at=old, ended_at=None, end_reason=None))
        before = "2026-11-21T04:00:00+00:00"  # (4 h before a start at 08:00)
        assert sorted(store.close_unfinished_callbacks(before)) == ["CAmachine", "CAringing"]
        statuses = {sid: (r.status, r.end_reason) for sid in ("CAmachine", "CAringing", "CArecent", "CAdone", "CAstreamed")
                    if (r := store.get(sid)) is not None}  # fmt: skip
        reason = "no final status from Twilio (its status callback never came)"
        assert statuses == {
            "CAmachine": ("unknown", reason), "CAringing": ("unknown", reason), "CArecent": ("in-progress", None),
            "CAdone": ("no-answer", None), "CAstreamed": ("in-progress", None),  # (mark_interrupted's, not this)
        }  # fmt: skip
        assert store.close_unfinished_callbacks(before) == []  # once
        # A late final callback still tells the truth.
        store.apply([SetTwilioStatus("CAmachine", "completed", 12, T0), SetTwilioStatus("CAringing", "ringing", None, T0)])
        machine, ringing = store.get("CAmachine"), store.get("CAringing")
        assert machine is not None and (machine.status, machine.end_reason) == ("completed", None)
        assert ringing is not None and (ringing.status, ringing.end_reason) == ("ringing", reason)  # (not final)
    finally:
        store.close()


def test_store_an_unanswered_outbound_call_keeps_its_direction_and_numbers(
    records_settings: Callable[..., Settings],
) -> None:
    """Known only from callbacks (nobody answered): outbound, from and to, as the callbacks say."""
    store = open_store(records_settings())
    try:
        ring = SetTwilioStatus("CAout", "ringing", None, T0, direction="outbound", from_number="+1555", to_number="+1666",
                               account_sid="AC" + "a" * 32)  # fmt: skip
        store.apply([ring, SetTwilioStatus("CAout", "no-answer", 0, T0)])  # (a callback without the fields)
        out = store.get("CAout")
        assert out is not None
        assert (out.direction, out.from_number, out.to_number, out.status) == ("outbound", "+1555", "+1666", "no-answer")
        assert out.account_sid == "AC" + "a" * 32
        # A call that streamed keeps what its own record says.
        store.save(full_record("CAa"))
        before = store.get("CAa")
        store.apply([SetTwilioStatus("CAa", "completed", 5, T0, direction="outbound", from_number="+19", to_number="+18")])
        after = store.get("CAa")
        assert before is not None and after is not None
        assert (after.direction, after.from_number, after.to_number) == (before.direction, before.from_number, before.to_number)
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["postgres"])  # (a file database has no connection to lose)
def test_store_postgres_writes_again_on_a_new_connection_after_losing_its_own(
    records_settings: Callable[..., Settings], backend: str, request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A PostgreSQL restart or failover ends the store's connection: the next write fails on it, and was lost
    (a call's final save, leaving it in progress for ever).  Now it is written again on a new connection."""
    server = request.getfixturevalue("postgres_server")
    store = open_store(records_settings())
    try:
        store.save(full_record("CAa", status="in-progress"))
        pid = store._conn.info.backend_pid  # type: ignore[attr-defined]
        server.admin(f"SELECT pg_terminate_backend({pid})")  # what a restart does to it (AdminShutdown)
        with caplog.at_level(logging.WARNING, logger="mediaserver.records"):
            assert store.apply([SaveCall(full_record("CAa")), SetTwilioStatus("CAb", "completed", 3, T0)]) == 0
        a, b = store.get("CAa"), store.get("CAb")
        assert a is not None and a.status == "completed" and b is not None and b.twilio_status == "completed"
        assert any("was lost" in r.getMessage() and "reconnected" in r.getMessage() for r in caplog.records)
        # an error that is not the connection's is not retried (it would fail again), and the good connection --
        # which holds this instance's claim -- is kept: a statement timeout, say
        import psycopg

        conn = store._conn  # type: ignore[attr-defined]
        for error in (ValueError("no"), psycopg.errors.QueryCanceled("timeout"), psycopg.errors.DiskFull("full")):
            assert store._reconnected(error) is False  # type: ignore[attr-defined]
        assert store._conn is conn  # type: ignore[attr-defined]
        # the claim is taken again on the new connection
        assert store.claim_instance("node1")
        server.admin(f"SELECT pg_terminate_backend({store._conn.info.backend_pid})")  # type: ignore[attr-defined]
        assert store.apply([SetTwilioStatus("CAc", "completed", 1, T0)]) == 0
        other = open_store(records_settings())
        try:
            assert not other.claim_instance("node1")  # still this store's
        finally:
            other.close()
    finally:
        store.close()


def test_store_batch_with_a_bad_write_keeps_the_good_ones(records_settings: Callable[..., Settings]) -> None:
    store = open_store(records_settings())
    try:
        bad = full_record("CAbad")
        bad.started_at = None  # type: ignore[assignment]  # NOT NULL violation
        assert store.apply([SaveCall(full_record("CAx")), SaveCall(bad), SaveCall(full_record("CAy"))]) == 1
        assert store.get("CAx") is not None and store.get("CAy") is not None and store.get("CAbad") is None
        with pytest.raises(Exception):  # noqa: B017 - a batch where nothing could be written raises
            store.apply([SaveCall(bad)])
    finally:
        store.close()


def test_store_sqlite_commit_that_fails_leaves_no_transaction_open(tmp_path: Path) -> None:
    # A COMMIT refused (here: a reader holds the file in rollback-journal mode, as where WAL is unavailable)
    # must not leave the connection inside the transaction: every later batch would look nested, report
    # success and never be committed.
    store = SqliteStore(tmp_path / "calls.sqlite3")
    try:
        store.migrate()
        store.execute("PRAGMA journal_mode=DELETE")
        store.execute("PRAGMA busy_timeout=100")
        reader = sqlite3.connect(store.path, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT * FROM calls").fetchall()
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            store.apply([SaveCall(full_record("CA1"))])
        reader.execute("COMMIT")
        reader.close()
        assert store.apply([SaveCall(full_record("CA2"))]) == 0
    finally:
        store.close()
    on_disk = sqlite3.connect(tmp_path / "calls.sqlite3")
    try:
        assert on_disk.execute("SELECT call_sid FROM calls").fetchall() == [("CA2",)]
    finally:
        on_disk.close()


def test_store_postgres_needs_psycopg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    settings = Settings(database_url="postgresql://u:secret@127.0.0.1:1/db")
    with pytest.raises(RecordsError) as e:
        open_store(settings)
    # The pip of the server's own environment, and a package the registry has (mediaserver itself is not there).
    assert str(e.value).endswith(f"e.g. uv pip): {shlex.quote(sys.executable)} -m pip install 'psycopg[binary]>=3.2'")


def test_store_bad_database_urls_give_one_line_errors() -> None:
    with pytest.raises(RecordsError, match="must be a postgresql:// URL") as wrong:
        open_store(Settings(database_url="mysql://u:hunter2@db/x"))
    assert "hunter2" not in str(wrong.value)
    with pytest.raises(RecordsError, match="cannot connect to the PostgreSQL database") as refused:
        open_store(Settings(database_url="postgresql://u:hunter2@127.0.0.1:1/x?connect_timeout=2"))
    assert "hunter2" not in str(refused.value) and "\n" not in str(refused.value).strip()
    assert redact("postgresql://u:hunter2@h:5432/x") == "postgresql://u:***@h:5432/x"


def test_store_sqlite_path_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RecordsError, match="cannot open the SQLite database"):
        open_store(Settings(data_dir=str(blocker / "data")))


def test_store_sqlite_file_that_is_not_a_database(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "calls.sqlite3").write_bytes(b"not a database, just some text " * 10)
    with pytest.raises(RecordsError, match="cannot open the SQLite database .*calls.sqlite3: file is not a database"):
        open_store(Settings(data_dir=str(data)))
