"""``mediaserver calls``: recent calls as a table, or one call with its transcript.

``mediaserver calls [--limit N] [--json]`` lists the newest calls;
``mediaserver calls show SID [--json]`` prints one.  The database is the
server's: ``DATABASE_URL``, else ``MEDIASERVER_DATA_DIR/calls.sqlite3``, read
from the environment and ``.env`` like ``mediaserver serve``.  Exit status 1
when there is nothing to show, 2 when the database cannot be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from mediaserver.config import ConfigError, Settings, load_dotenv_file

from .model import CallRecord
from .migrations import MIGRATIONS, read_version
from .store import RecordsError, RecordStore, open_store, sqlite_path

__all__ = ["configure", "format_call", "format_table", "main"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=_positive, default=20, help="how many calls to list (default 20)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--env-file", help="read settings from this file (default: .env, if there is one; '' for none)")
    sub = parser.add_subparsers(dest="calls_command", title="commands", metavar="show SID")
    show = sub.add_parser("show", help="one call with its transcript")
    show.add_argument("sid", help="the call SID (CA...)")
    show.add_argument("--json", dest="show_json", action="store_true", help="print JSON")
    show.add_argument("--env-file", dest="show_env_file", help="as --env-file before 'show'")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        show_env_file = getattr(args, "show_env_file", None)
        load_dotenv_file(show_env_file if show_env_file is not None else args.env_file)
        # Only the database settings matter here: do not insist on a provider's key.
        settings = Settings.from_env(provider="echo")
    except ConfigError as exc:
        print(f"mediaserver calls: configuration error: {exc}", file=err)
        return 2
    if not settings.database_url and not sqlite_path(settings).is_file():
        folder = sqlite_path(settings).parent
        if folder.exists() and not folder.is_dir():  # (the server cannot create it there either: it logs that at start)
            print(f"mediaserver calls: MEDIASERVER_DATA_DIR {str(folder)!r} is not a folder", file=err)
            return 2
        print(f"no call records yet: {sqlite_path(settings)} does not exist (the server creates it)", file=err)
        return 1
    try:
        store = open_store(settings, migrate=False)  # (reading writes nothing: no schema change, no write lock)
    except RecordsError as exc:
        print(f"mediaserver calls: {exc}", file=err)
        return 2
    try:
        version, latest = read_version(store), max(m.version for m in MIGRATIONS)
        if version == 0:  # (no server has used it yet)
            print(f"no calls recorded yet in the {store.description}", file=err)
            return 1
        if version < latest:
            print(
                f"mediaserver calls: the {store.description} has schema version {version}, this version of "
                f"mediaserver reads {latest}: start `mediaserver serve` once to bring it up to date",
                file=err,
            )
            return 2
        return _run(args, store, out, err)
    except BrokenPipeError:
        raise  # (whoever read our output went away, `| head`: not the database's fault; main() ends quietly)
    except Exception as exc:  # the database failed mid-query
        print(f"mediaserver calls: cannot read the {store.description}: {exc}", file=err)
        return 2
    finally:
        store.close()


def _run(args: argparse.Namespace, store: RecordStore, out: TextIO, err: TextIO) -> int:
    if args.calls_command == "show":
        record = store.get(args.sid)
        if record is None:
            print(f"mediaserver calls: no call {args.sid} in the {store.description}", file=err)
            return 1
        print(json.dumps(record.to_json(), indent=2, ensure_ascii=False) if args.show_json or args.json else format_call(record),
              file=out)
        return 0
    records = store.recent(args.limit)
    if not records:
        print(f"no calls recorded yet in the {store.description}", file=err)
        return 1
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2, ensure_ascii=False), file=out)
    else:
        print(format_table(records), file=out)
    return 0


_HEADER = ("TIME (UTC)", "SID", "DIRECTION", "FROM", "TO", "PROVIDER", "STATUS", "DURATION")


def format_table(records: Sequence[CallRecord]) -> str:
    """One line per call under a header, columns aligned."""
    rows = [_HEADER]
    for r in records:
        rows.append((
            r.started_at[:19].replace("T", " "),
            r.call_sid,
            r.direction,
            r.from_number or "-",
            r.to_number or "-",
            r.provider or "-",
            (r.status if not r.twilio_status or r.twilio_status == r.status else f"{r.status} ({r.twilio_status})")
            + (f", {r.answered_by}" if r.answered_by not in (None, "human") else ""),  # (a machine, a fax: unknown)
            _duration(r),
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _duration(r: CallRecord) -> str:
    """The bridge's duration; for a call known from Twilio's status callbacks alone, Twilio's (a machine answered)."""
    if r.duration_s is not None:
        return f"{r.duration_s:.1f} s"
    return "-" if r.twilio_duration_s is None else f"{r.twilio_duration_s} s (Twilio)"


def format_call(r: CallRecord) -> str:
    """A call's details, then its transcript one turn a line (``[cut at N ms]`` after a barge-in)."""
    lines = [
        f"call       {r.call_sid} ({r.direction})",
        f"from/to    {r.from_number or '-'} -> {r.to_number or '-'}",
        f"provider   {r.provider or '-'}",
        f"started    {r.started_at}",
        f"ended      {r.ended_at or '-'}",
        f"status     {r.status}" + (f" (Twilio: {r.twilio_status})" if r.twilio_status else ""),
        *([f"answered   by {r.answered_by} (answering-machine detection)"] if r.answered_by else []),
        f"reason     {r.end_reason or '-'}",
        f"duration   {'-' if r.duration_s is None else f'{r.duration_s:.1f} s'}"
        + (f" (Twilio: {r.twilio_duration_s} s)" if r.twilio_duration_s is not None else ""),
        f"barge-ins  {r.barge_ins}",
        f"tool calls {len(r.tool_calls)}" + (f": {', '.join(r.tool_calls)}" if r.tool_calls else ""),
        "latency    " + (", ".join(f"{k} {v:.2f} ms" for k, v in r.latency_ms.items()) or "-"),
        f"stream     {r.stream_sid or '-'}, account {r.account_sid or '-'}",
        "",
        "transcript:" if r.turns else "transcript: (none)",
    ]
    for turn in r.turns:
        cut = f"  [cut at {turn.heard_ms} ms]" if turn.interrupted else ""
        lines.append(f"  {turn.offset_s:7.1f} s  {turn.role:9}  {turn.text}{cut}")
    return "\n".join(lines)
