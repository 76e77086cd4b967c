"""Where call records are kept: SQLite (default) or PostgreSQL (``DATABASE_URL``).

Both backends are the same class of blocking store with one connection,
used from worker threads (``trio.to_thread.run_sync``) one call at a time (a
lock serialises them).  They share every SQL statement; only connecting,
placeholders (``?`` here, ``%s`` for psycopg) and transactions differ.

``psycopg`` is imported only when ``DATABASE_URL`` is set; it is the optional
extra ``postgres`` (psycopg 3).
"""

from __future__ import annotations

import json
import logging
import shlex
import sqlite3
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from mediaserver.config import Settings
from mediaserver.protocol import twilio_events as tw

from .migrations import apply_migrations, current_version
from .model import CallRecord, Turn

__all__ = [
    "PostgresStore",
    "RecordStore",
    "RecordsError",
    "SaveCall",
    "SetTwilioStatus",
    "SqliteStore",
    "StoreOp",
    "open_store",
    "sqlite_path",
]

log = logging.getLogger("mediaserver.records")

SQLITE_FILE = "calls.sqlite3"
INTERRUPTED_REASON = "server stopped during the call"
NO_FINAL_STATUS_REASON = "no final status from Twilio (its status callback never came)"
# A call Twilio has not ended this long after its first callback is over: 24 h calls (an account setting; 4 h by
# default), and 10 minutes of ringing.
TWILIO_LONGEST_CALL_S = 24 * 3600.0 + 600.0

# calls columns written by a SaveCall, in CallRecord order (the Twilio columns
# belong to the status callbacks and are never overwritten by a save)
_SAVED = (
    "call_sid", "stream_sid", "account_sid", "direction", "from_number", "to_number", "provider",
    "started_at", "ended_at", "status", "end_reason", "duration_s", "barge_ins", "tool_calls", "latency_ms",
    "instance",
)  # fmt: skip
_COLUMNS = (*_SAVED, "twilio_status", "twilio_duration_s", "answered_by")


class RecordsError(Exception):
    """The records database cannot be opened or used; the message says why (never a password)."""


@dataclass(frozen=True, slots=True)
class SaveCall:
    """Insert or replace one call (and its transcript)."""

    record: CallRecord


@dataclass(frozen=True, slots=True)
class SetTwilioStatus:
    """A Twilio status callback: keep its status (and duration) on the call's row."""

    call_sid: str
    status: str
    duration_s: int | None
    at: str  # when it came (UTC ISO); the row's start time if this creates it
    # The callback's Direction (inbound/outbound), From and To: for a call known only from callbacks
    # (an outbound call nobody answered), else kept as the call's own record has them.
    direction: str | None = None
    from_number: str | None = None
    to_number: str | None = None
    answered_by: str | None = None  # Twilio's AnsweredBy, with answering-machine detection
    account_sid: str | None = None  # the callback's AccountSid (for a call known only from callbacks)


StoreOp = SaveCall | SetTwilioStatus

TWILIO_FINAL_STATUSES = tw.CALL_FINAL_STATUSES  # (a call's status callbacks end with one of these)
_FINAL_SQL = ", ".join(f"'{status}'" for status in sorted(TWILIO_FINAL_STATUSES))


class RecordStore:
    """The common store: schema, writes and reads in plain SQL (see the module docstring)."""

    description = "records database"

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # -- what a backend provides ---------------------------------------------------

    def _run(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[None]:
        raise NotImplementedError
        yield  # pragma: no cover

    def close(self) -> None:
        raise NotImplementedError

    def _reconnected(self, exc: Exception) -> bool:
        """``exc`` lost the connection to the database, and a new one is open now: the failed write may be tried
        again (the writes are idempotent upserts).  A file database never loses one: False."""
        return False

    def claim_instance(self, instance: str | None) -> bool:
        """Hold, for as long as the store is open, the claim to be server ``instance`` on this database.

        False if another server that is running holds it (then its live
        calls are not this start's to mark interrupted).  Released on close.
        """
        raise NotImplementedError

    # -- the Database protocol of migrations.py --------------------------------

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (``?`` placeholders); returns its rows (``[]`` when none)."""
        with self._lock:
            return self._run(sql, params)

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[None]:
        """One transaction; ``write=False`` for reads only (SQLite: no write lock, so a writer does not block it)."""
        with self._lock, self._transaction(write):
            yield

    # -- schema and start-up ---------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied now."""
        with self._lock:
            return apply_migrations(self)

    def version(self) -> int:
        return current_version(self)

    def mark_interrupted(self, ended_at: str, instance: str | None = None) -> list[str]:
        """This instance's calls still ``in-progress`` (it stopped during them) become ``interrupted``.

        Only calls that streamed to us (``stream_sid`` set); a row known only
        from Twilio's status callbacks keeps Twilio's status.  Only the calls
        ``instance`` (``MEDIASERVER_INSTANCE_URL``; None for a single instance)
        bridged: with several instances on one database, the calls live on
        the others are not this start's to end.
        """
        live = "status = 'in-progress' AND stream_sid IS NOT NULL AND COALESCE(instance, '') = ?"
        mine = (instance or "",)
        with self.transaction():
            sids = [row[0] for row in self.execute(f"SELECT call_sid FROM calls WHERE {live}", mine)]
            self.execute(
                "UPDATE calls SET status = 'interrupted', end_reason = COALESCE(end_reason, ?), "
                f"ended_at = COALESCE(ended_at, ?) WHERE {live}",
                (INTERRUPTED_REASON, ended_at, *mine),
            )
        return sids

    def close_unfinished_callbacks(self, before: str) -> list[str]:
        """Calls known only from Twilio's callbacks (no stream here), first heard of before ``before``, whose final
        status never came (a callback Twilio did not retry, a server that was down): status ``unknown``.

        Twilio ends every call within 24 hours (4 by default: ``TWILIO_LONGEST_CALL_S``), so a row older than that
        still ``ringing`` or ``in-progress`` (an outbound call a machine answered, say) is not a call that goes on.
        A final callback that still comes replaces ``unknown`` (and its ``end_reason``).
        """
        stuck = f"stream_sid IS NULL AND status NOT IN ({_FINAL_SQL}, 'unknown') AND started_at < ?"
        with self.transaction():
            sids = [row[0] for row in self.execute(f"SELECT call_sid FROM calls WHERE {stuck}", (before,))]
            self.execute(
                f"UPDATE calls SET status = 'unknown', end_reason = COALESCE(end_reason, ?) WHERE {stuck}",
                (NO_FINAL_STATUS_REASON, before),
            )
        return sids

    # -- writes ----------------------------------------------------------------------

    def _apply_all(self, ops: Sequence[StoreOp]) -> None:
        """``ops`` in one transaction; once more on a new connection if the database dropped the old one (a
        PostgreSQL restart or failover: the first write after it fails, and was lost before)."""
        try:
            with self.transaction():
                for op in ops:
                    self._apply(op)
        except Exception as exc:
            if not self._reconnected(exc):
                raise
            with self.transaction():
                for op in ops:
                    self._apply(op)

    def apply(self, ops: Sequence[StoreOp]) -> int:
        """Write a batch in one transaction; if that fails, each op on its own.

        Returns how many ops could not be written (their errors are raised
        only when every op of the batch failed).
        """
        try:
            self._apply_all(ops)
            return 0
        except RecordsError:
            raise  # the database cannot be reached: each op alone would wait for it again
        except Exception:
            if len(ops) == 1:
                raise
        failed: list[Exception] = []
        for op in ops:
            try:
                self._apply_all([op])
            except Exception as exc:
                failed.append(exc)
        if len(failed) == len(ops):
            raise failed[0]
        return len(failed)

    def save(self, record: CallRecord) -> None:
        self.apply([SaveCall(record)])

    def _apply(self, op: StoreOp) -> None:
        if isinstance(op, SaveCall):
            r = op.record
            values = (
                r.call_sid, r.stream_sid, r.account_sid, r.direction, r.from_number, r.to_number, r.provider,
                r.started_at, r.ended_at, r.status, r.end_reason, r.duration_s, r.barge_ins,
                json.dumps(r.tool_calls), json.dumps(r.latency_ms), r.instance, r.answered_by,
            )  # fmt: skip
            # (answered_by is Twilio's, like the status columns, but the call's own record may know it first:
            # written, never erased)
            updates = ", ".join(f"{c} = excluded.{c}" for c in _SAVED[1:])
            updates += ", answered_by = COALESCE(excluded.answered_by, calls.answered_by)"
            self.execute(
                f"INSERT INTO calls ({', '.join(_SAVED)}, answered_by) VALUES ({', '.join('?' * (len(_SAVED) + 1))}) "
                f"ON CONFLICT (call_sid) DO UPDATE SET {updates}",
                values,
            )
            self.execute("DELETE FROM turns WHERE call_sid = ?", (r.call_sid,))
            for seq, turn in enumerate(r.turns):
                self.execute(
                    "INSERT INTO turns (call_sid, seq, role, text, offset_s, interrupted, heard_ms) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (r.call_sid, seq, turn.role, turn.text, turn.offset_s, turn.interrupted, turn.heard_ms),
                )
        else:
            # A call known only from callbacks (it never streamed to us) follows Twilio's status and direction.
            direction = (
                ", direction = CASE WHEN calls.stream_sid IS NULL THEN excluded.direction ELSE calls.direction END"
                if op.direction is not None
                else ""
            )
            # Twilio's callbacks may arrive out of order (it says so, and numbers them): a late "ringing" or
            # "in-progress" never replaces a final status, which would leave a finished call in progress for ever.
            # A call known only from callbacks ends when its final status comes.
            final = op.status in TWILIO_FINAL_STATUSES
            stale = f"calls.twilio_status IN ({_FINAL_SQL}) AND excluded.twilio_status NOT IN ({_FINAL_SQL})"
            self.execute(
                "INSERT INTO calls (call_sid, started_at, ended_at, status, twilio_status, twilio_duration_s, "
                "direction, from_number, to_number, answered_by, account_sid) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (call_sid) DO UPDATE SET "
                f"twilio_status = CASE WHEN {stale} THEN calls.twilio_status ELSE excluded.twilio_status END, "
                "twilio_duration_s = COALESCE(excluded.twilio_duration_s, calls.twilio_duration_s), "
                "answered_by = COALESCE(excluded.answered_by, calls.answered_by), "
                "from_number = COALESCE(calls.from_number, excluded.from_number), "
                "to_number = COALESCE(calls.to_number, excluded.to_number), "
                "account_sid = COALESCE(calls.account_sid, excluded.account_sid), "
                "ended_at = CASE WHEN calls.stream_sid IS NULL THEN COALESCE(calls.ended_at, excluded.ended_at) "
                "ELSE calls.ended_at END, "
                # (a callback-only row the start-up sweep closed as unknown: its final status came after all)
                "end_reason = CASE WHEN calls.stream_sid IS NULL AND calls.status = 'unknown' "
                f"AND excluded.twilio_status IN ({_FINAL_SQL}) THEN NULL ELSE calls.end_reason END, "
                f"status = CASE WHEN calls.stream_sid IS NULL AND NOT ({stale}) THEN excluded.status ELSE calls.status END"
                + direction,
                (
                    op.call_sid, op.at, op.at if final else None, op.status, op.status, op.duration_s,
                    op.direction or "inbound", op.from_number, op.to_number, op.answered_by, op.account_sid,
                ),
            )

    # -- reads -----------------------------------------------------------------------

    def get(self, call_sid: str) -> CallRecord | None:
        """One call with its transcript, or None."""
        with self.transaction(write=False):
            rows = self.execute(f"SELECT {', '.join(_COLUMNS)} FROM calls WHERE call_sid = ?", (call_sid,))
            if not rows:
                return None
            turns = self.execute(
                "SELECT role, text, offset_s, interrupted, heard_ms FROM turns WHERE call_sid = ? ORDER BY seq",
                (call_sid,),
            )
        record = _record(rows[0])
        record.turns = [Turn(role, text, float(offset), bool(cut), heard) for role, text, offset, cut, heard in turns]
        return record

    def recent(self, limit: int = 20) -> list[CallRecord]:
        """The ``limit`` most recently started calls, newest first (without transcripts)."""
        rows = self.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM calls ORDER BY started_at DESC, call_sid LIMIT ?", (limit,)
        )
        return [_record(row) for row in rows]


def _record(row: tuple[Any, ...]) -> CallRecord:
    data = dict(zip(_COLUMNS, row, strict=True))
    data["tool_calls"] = json.loads(data["tool_calls"])
    data["latency_ms"] = json.loads(data["latency_ms"])
    if data["duration_s"] is not None:
        data["duration_s"] = float(data["duration_s"])
    return CallRecord(**data)


# ----------------------------------------------------------------------- SQLite


class SqliteStore(RecordStore):
    """A SQLite file (WAL mode, so ``mediaserver calls`` can read while the server writes)."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.description = f"SQLite database {self.path}"
        self._depth = 0  # transactions open (nested ones are part of the outermost)
        self._claim: IO[str] | None = None  # the open lock file of claim_instance
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # autocommit mode; transactions are explicit (BEGIN IMMEDIATE takes the write lock up front)
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10)
        except (OSError, sqlite3.Error) as exc:
            raise RecordsError(f"cannot open the {self.description}: {exc}") from None
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:  # not a database, say
            self._conn.close()
            raise RecordsError(f"cannot open the {self.description}: {exc}") from None

    def _run(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return self._conn.execute(sql, tuple(params)).fetchall()

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[None]:
        # Nesting is counted, not read from in_transaction: a COMMIT that failed (the database busy past the
        # timeout, a full disk) can leave the connection inside the transaction, and every later batch would
        # then look nested and never be committed.
        if self._depth:  # nested: part of the outer one
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        # BEGIN IMMEDIATE takes the write lock up front; a read (WAL mode) sees a snapshot without any lock
        self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        self._depth = 1
        try:
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise
        finally:
            self._depth = 0

    def _rollback(self) -> None:
        if self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:  # (the error being raised says what went wrong)
                pass

    def claim_instance(self, instance: str | None) -> bool:
        # An exclusive lock on a file beside the database, held by the open file (the process's, so a server
        # that died has let go of it).
        import fcntl
        import hashlib

        digest = hashlib.sha256((instance or "").encode()).hexdigest()[:16]
        path = self.path.with_name(f"{self.path.name}.{digest}.lock")
        try:
            handle = open(path, "a")  # noqa: SIM115 - held open until close()
        except PermissionError:  # made by another user: a lock needs no write access
            handle = open(path)  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: another server runs as this instance
            handle.close()
            return False
        except OSError:  # no locks on this file system (some network mounts): claim it, as before there were claims
            handle.close()
            return True
        self._claim = handle
        return True

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._claim is not None:
                self._claim.close()
                self._claim = None


# ------------------------------------------------------------------- PostgreSQL


def redact(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class PostgresStore(RecordStore):
    """A PostgreSQL database through psycopg 3 (one autocommit connection, explicit transactions)."""

    def __init__(self, url: str) -> None:
        super().__init__()
        try:
            import psycopg
        except ImportError:
            raise RecordsError(
                "DATABASE_URL is set but PostgreSQL support (psycopg 3) is not installed in the server's Python "
                f"environment; install it with (or with that environment's installer, e.g. uv pip): "
                f"{shlex.quote(sys.executable)} -m pip install 'psycopg[binary]>=3.2'"
            ) from None
        self._psycopg = psycopg
        self.url = url
        self.description = f"PostgreSQL database {redact(url)}"
        self._conn = self._connect()
        self._instance: str | None = None  # the instance claimed (claim_instance), if any

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except self._psycopg.Error as exc:
            message = " ".join(str(exc).split()).replace(self.url, redact(self.url))  # one line
            raise RecordsError(f"cannot connect to the {self.description}: {message}") from None

    def _run(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        cursor = self._conn.execute(sql.replace("?", "%s"), tuple(params) if params else None)
        return list(cursor.fetchall()) if cursor.description is not None else []

    @contextmanager
    def _transaction(self, write: bool = True) -> Iterator[None]:
        if self._conn.closed:  # the server restarted or the network dropped: try once more
            self._conn = self._connect()
        with self._conn.transaction():
            yield

    def _reconnected(self, exc: Exception) -> bool:
        # Only a lost connection: closed or broken, or the server's "connection exception" (SQLSTATE class 08) and
        # shutdown errors (57P01-57P03: AdminShutdown on a restart, a crash, cannot connect now).  A statement or lock
        # timeout, a full disk, a constraint is the same on a new connection -- and closing a good one would let go
        # of this instance's claim (an advisory lock of the session).  Nor a failed reconnect (RecordsError).
        if isinstance(exc, RecordsError):
            return False
        state = getattr(exc, "sqlstate", None) or ""
        lost = self._conn.closed or self._conn.broken or state.startswith("08") or state in ("57P01", "57P02", "57P03")
        if not lost:
            return False
        with self._lock:
            try:
                self._conn.close()
            except self._psycopg.Error:
                pass
            self._conn = self._connect()  # (RecordsError if the database is still away: no write is tried op by op)
            if self._instance is not None and not self._reclaim():
                log.warning("call records: after reconnecting, another server holds this instance's claim (%s)",
                            self._instance or "the only instance")
        log.warning("call records: the connection to the %s was lost (%s); reconnected, writing again",
                    self.description, " ".join(str(exc).split())[:200])
        return True

    def _reclaim(self) -> bool:
        return self.claim_instance(self._instance)

    def migrate(self) -> list[int]:
        # Two servers starting at once must not both run a migration.
        with self._lock:
            self.execute("SELECT pg_advisory_lock(727277)")
            try:
                return super().migrate()
            finally:
                self.execute("SELECT pg_advisory_unlock(727277)")

    def claim_instance(self, instance: str | None) -> bool:
        # A session-level advisory lock: held while this connection lives (a server that died lost it with its
        # connection; one whose connection dropped and came back holds it no more, and a later start may then
        # mark its live calls interrupted).
        rows = self.execute("SELECT pg_try_advisory_lock(727278, hashtext(?))", (instance or "",))
        claimed = bool(rows[0][0])
        if claimed:
            self._instance = instance or ""  # (taken again on a new connection: _reconnected)
        return claimed

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# ----------------------------------------------------------------------- opening


def sqlite_path(settings: Settings) -> Path:
    return Path(settings.data_dir) / SQLITE_FILE


def open_store(settings: Settings, *, migrate: bool = True) -> RecordStore:
    """The store the settings name (``DATABASE_URL``, else ``<data_dir>/calls.sqlite3``), migrated.

    Blocking: call it from a worker thread in async code.  Raises
    :class:`RecordsError` with a one-line reason when it cannot be opened.
    """
    url = settings.database_url
    if url:
        if not url.startswith(("postgresql://", "postgres://")):
            raise RecordsError(f"DATABASE_URL must be a postgresql:// URL, not {redact(url)!r}")
        store: RecordStore = PostgresStore(url)
    else:
        store = SqliteStore(sqlite_path(settings))
    if migrate:
        try:
            store.migrate()
        except RecordsError:
            store.close()
            raise
        except Exception as exc:
            store.close()
            raise RecordsError(f"cannot prepare the {store.description}: {exc}") from None
    return store
