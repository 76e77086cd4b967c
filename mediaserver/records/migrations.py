"""The call-records schema, as numbered migrations applied in order at start.

The same SQL runs on SQLite and PostgreSQL (types both accept: ``TEXT``,
``INTEGER``, ``DOUBLE PRECISION``, ``BOOLEAN``; timestamps are ISO 8601 UTC
text, which sorts in time order).  ``schema_migrations`` records each applied
version, so applying is idempotent: only versions above the highest recorded
one run, each in its own transaction together with its row.  Never edit a
released migration; add the next one.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Protocol

__all__ = ["MIGRATIONS", "Database", "Migration", "apply_migrations", "current_version", "read_version"]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "calls and their transcripts",
        (
            """CREATE TABLE calls (
                call_sid TEXT PRIMARY KEY,
                stream_sid TEXT,
                account_sid TEXT,
                direction TEXT NOT NULL DEFAULT 'inbound',
                from_number TEXT,
                to_number TEXT,
                provider TEXT,
                started_at TEXT NOT NULL,
                ended_at TEXT,
                status TEXT NOT NULL,
                end_reason TEXT,
                duration_s DOUBLE PRECISION,
                barge_ins INTEGER NOT NULL DEFAULT 0,
                tool_calls TEXT NOT NULL DEFAULT '[]',
                latency_ms TEXT NOT NULL DEFAULT '{}'
            )""",
            """CREATE TABLE turns (
                call_sid TEXT NOT NULL REFERENCES calls (call_sid) ON DELETE CASCADE,
                seq INTEGER NOT NULL,
                role TEXT NOT NULL,
                text TEXT NOT NULL,
                offset_s DOUBLE PRECISION NOT NULL,
                interrupted BOOLEAN NOT NULL DEFAULT FALSE,
                heard_ms INTEGER,
                PRIMARY KEY (call_sid, seq)
            )""",
        ),
    ),
    Migration(
        2,
        "Twilio status callbacks; index for recent-calls listing",
        (
            "ALTER TABLE calls ADD COLUMN twilio_status TEXT",
            "ALTER TABLE calls ADD COLUMN twilio_duration_s INTEGER",
            "CREATE INDEX calls_started_at ON calls (started_at)",
        ),
    ),
    Migration(
        3,
        "the instance that bridged each call (MEDIASERVER_INSTANCE_URL)",
        ("ALTER TABLE calls ADD COLUMN instance TEXT",),
    ),
    Migration(
        4,
        "who answered an outbound call placed with answering-machine detection (Twilio's AnsweredBy)",
        ("ALTER TABLE calls ADD COLUMN answered_by TEXT",),
    ),
)


_CREATE_MIGRATIONS_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
)


class Database(Protocol):
    """What the migrations need of a store: statements with ``?`` placeholders, transactions."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def transaction(self) -> AbstractContextManager[None]: ...


def current_version(db: Database) -> int:
    """Highest applied version (0 for an empty database)."""
    with db.transaction():
        db.execute(_CREATE_MIGRATIONS_TABLE)
        rows = db.execute("SELECT MAX(version) FROM schema_migrations")
    return int(rows[0][0] or 0)


def read_version(db: Database) -> int:
    """As :func:`current_version`, without writing anything (0 when there is no migrations table)."""
    try:
        rows = db.execute("SELECT MAX(version) FROM schema_migrations")
    except Exception as exc:
        # No such table: SQLite says "no such table: schema_migrations", PostgreSQL 'relation
        # "schema_migrations" does not exist' (each driver has its own error class).  Anything else is an error.
        message = str(exc)
        if "schema_migrations" in message and ("no such table" in message or "does not exist" in message):
            return 0
        raise
    return int(rows[0][0] or 0)


def apply_migrations(db: Database, migrations: Sequence[Migration] = MIGRATIONS) -> list[int]:
    """Bring the schema up to date; returns the versions applied now (``[]`` if it was current)."""
    applied: list[int] = []
    for migration in sorted(migrations, key=lambda m: m.version):
        with db.transaction():
            # re-read inside the transaction: another process may have migrated meanwhile
            db.execute(_CREATE_MIGRATIONS_TABLE)
            done = db.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,))
            if done:
                continue
            for statement in migration.statements:
                db.execute(statement)
            db.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                (migration.version, datetime.now(timezone.utc).isoformat()),
            )
        applied.append(migration.version)
    return applied
