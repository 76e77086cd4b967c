"""``mediaserver calls``: the listing, one call with its transcript, and the error cases."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from mediaserver.__main__ import main
from mediaserver.config import Settings
from mediaserver.records.model import CallRecord, Turn
from mediaserver.records.migrations import MIGRATIONS
from mediaserver.records.store import SetTwilioStatus, open_store


@pytest.fixture
def cli(
    records_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[..., int]:
    """``cli(*args)``: run ``mediaserver calls *args`` against this test's database."""
    settings = records_settings()
    monkeypatch.setenv("MEDIASERVER_DATA_DIR", settings.data_dir)
    if settings.database_url:
        monkeypatch.setenv("DATABASE_URL", settings.database_url)
    else:
        monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("MEDIASERVER_PROVIDER", "openai")  # no key: must not matter to `calls`
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)

    def run(*args: str) -> int:
        return main(["calls", "--env-file", "", *args])  # no .env of the checkout

    run.settings = settings  # type: ignore[attr-defined]
    return run


def seed(settings: Settings) -> list[CallRecord]:
    records = [
        CallRecord("CA" + "1" * 32, "2026-11-21T08:00:00.123+00:00", status="completed", stream_sid="MZ1",
                   direction="inbound", from_number="+15550001111", to_number="+15552223333", provider="openai",
                   ended_at="2026-11-21T08:01:05+00:00", end_reason="twilio sent stop", duration_s=65.04,
                   barge_ins=1, tool_calls=["weather"], latency_ms={"uplink_p50": 0.02},
                   turns=[Turn("user", "Weather in Paris?", 1.25),
                          Turn("assistant", "It will be", 2.5, interrupted=True, heard_ms=480)]),
        CallRecord("CA" + "2" * 32, "2026-11-21T08:05:00+00:00", status="failed", direction="outbound",
                   from_number="+15559998888", to_number="+15551112222", provider="gemini",
                   end_reason="no model session: refused", duration_s=0.0),
        CallRecord("CA" + "3" * 32, "2026-11-21T08:10:00+00:00", provider="echo"),  # in progress
    ]
    machine = [SetTwilioStatus("CA" + "4" * 32, "completed", 9, "2026-11-21T07:55:00+00:00", direction="outbound",
                               to_number="+15553334444", answered_by="machine_end_beep")]  # fmt: skip
    store = open_store(settings)
    try:
        for record in records:
            store.save(record)
        store.apply(machine)  # an outbound call a machine answered: known from Twilio alone
    finally:
        store.close()
    return records


def test_cli_lists_recent_calls(cli: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    seed(cli.settings)  # type: ignore[attr-defined]
    assert cli() == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TIME", "(UTC)", "SID", "DIRECTION", "FROM", "TO", "PROVIDER", "STATUS", "DURATION"]
    assert lines[1].split() == ["2026-11-21", "08:10:00", "CA" + "3" * 32, "inbound", "-", "-", "echo", "in-progress", "-"]
    assert lines[2].split() == ["2026-11-21", "08:05:00", "CA" + "2" * 32, "outbound", "+15559998888", "+15551112222",
                                "gemini", "failed", "0.0", "s"]
    assert lines[3].split()[2:] == ["CA" + "1" * 32, "inbound", "+15550001111", "+15552223333", "openai",
                                    "completed", "65.0", "s"]
    # A machine's call says so (a person's does not: "human" is what a call is expected to be).
    # (known from Twilio alone: Twilio's duration, said to be Twilio's)
    assert lines[4].split()[2:] == ["CA" + "4" * 32, "outbound", "-", "+15553334444", "-", "completed,", "machine_end_beep",
                                    "9", "s", "(Twilio)"]
    assert len(lines) == 5
    assert len({line.index("SID") if i == 0 else line.index("CA") for i, line in enumerate(lines)}) == 1  # aligned

    assert cli("--limit", "1") == 0
    assert len(capsys.readouterr().out.splitlines()) == 2

    assert cli("--json", "--limit", "2") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["call_sid"] for c in listed] == ["CA" + "3" * 32, "CA" + "2" * 32]
    assert listed[1]["direction"] == "outbound" and listed[1]["end_reason"] == "no model session: refused"


def test_cli_shows_one_call_with_its_transcript(cli: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    first = seed(cli.settings)[0]  # type: ignore[attr-defined]
    assert cli("show", first.call_sid) == 0
    out = capsys.readouterr().out
    assert f"call       {first.call_sid} (inbound)" in out
    assert "from/to    +15550001111 -> +15552223333" in out
    assert "status     completed" in out and "reason     twilio sent stop" in out
    assert "barge-ins  1" in out and "tool calls 1: weather" in out and "uplink_p50 0.02 ms" in out
    assert "duration   65.0 s\n" in out  # no Twilio duration known yet
    assert "answered" not in out  # (no answering-machine detection on this call)
    transcript = out.split("transcript:\n", 1)[1].splitlines()
    assert [line.split(None, 3) for line in transcript] == [
        ["1.2", "s", "user", "Weather in Paris?"],
        ["2.5", "s", "assistant", "It will be  [cut at 480 ms]"],
    ]
    store = open_store(cli.settings)  # type: ignore[attr-defined]
    try:
        store.apply([SetTwilioStatus(first.call_sid, "completed", 66, "2026-11-21T08:01:06+00:00", answered_by="human")])
    finally:
        store.close()
    assert cli("show", first.call_sid) == 0
    out = capsys.readouterr().out
    assert "status     completed (Twilio: completed)\nanswered   by human (answering-machine detection)\n" in out
    assert "duration   65.0 s (Twilio: 66 s)" in out  # Twilio's billed duration too, not only in --json
    expected = {**first.to_json(), "twilio_status": "completed", "twilio_duration_s": 66, "answered_by": "human"}
    assert cli("show", first.call_sid, "--json") == 0
    assert json.loads(capsys.readouterr().out) == expected
    assert cli("--json", "show", first.call_sid) == 0  # (the flag before the command, as the README has it)
    assert json.loads(capsys.readouterr().out) == expected


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_cli_reads_while_the_server_writes_and_never_changes_the_schema(
    cli: Callable[..., int], capsys: pytest.CaptureFixture[str]
) -> None:
    """Reading takes no write lock (a server mid-write does not make it wait) and migrates nothing."""
    settings: Settings = cli.settings  # type: ignore[attr-defined]
    first = seed(settings)[0]
    path = Path(settings.data_dir) / "calls.sqlite3"
    writer = sqlite3.connect(path, isolation_level=None, timeout=0)
    try:
        writer.execute("BEGIN IMMEDIATE")  # as the server's writer holds it during a batch
        started = time.monotonic()
        assert cli("show", first.call_sid) == 0 and cli() == 0
        assert time.monotonic() - started < 2.0  # (a write lock would have made it wait 10 s and fail)
        writer.execute("ROLLBACK")
        # A database an older server made: the CLI says so rather than migrating it under that server.
        latest = max(m.version for m in MIGRATIONS)
        writer.execute("DELETE FROM schema_migrations WHERE version = ?", (latest,))
        capsys.readouterr()
        assert cli() == 2
        assert f"reads {latest}: start `mediaserver serve` once" in capsys.readouterr().err
        assert writer.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] == latest - 1
    finally:
        writer.close()


def test_cli_data_dir_that_is_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("MEDIASERVER_DATA_DIR", str(tmp_path / "afile"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    assert main(["calls", "--env-file", ""]) == 2
    assert capsys.readouterr().err == f"mediaserver calls: MEDIASERVER_DATA_DIR {str(tmp_path / 'afile')!r} is not a folder\n"


def test_cli_unknown_sid_and_empty_database(cli: Callable[..., int], capsys: pytest.CaptureFixture[str]) -> None:
    settings: Settings = cli.settings  # type: ignore[attr-defined]
    assert cli() == 1
    err = capsys.readouterr().err
    if settings.database_url:
        assert "no calls recorded yet in the PostgreSQL database" in err
    else:
        assert "no call records yet:" in err and "calls.sqlite3 does not exist" in err
        assert not Path(settings.data_dir).exists()  # reading never creates the database
    open_store(settings).close()  # created, but empty
    assert cli() == 1
    assert "no calls recorded yet" in capsys.readouterr().err
    assert cli("show", "CAnope") == 1
    assert "mediaserver calls: no call CAnope in the" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_cli_bad_arguments_and_database(
    cli: Callable[..., int], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli("--limit", "0")
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:hunter2@127.0.0.1:1/x?connect_timeout=2")
    assert cli() == 2
    err = capsys.readouterr().err
    assert err.startswith("mediaserver calls: cannot connect to the PostgreSQL database") and "hunter2" not in err


@pytest.mark.parametrize("args", [["calls"], ["calls", "--json"], ["calls", "show", "CA" + "1" * 32], ["settings"]])
def test_cli_output_into_a_pipe_its_reader_closed_ends_quietly(
    cli: Callable[..., int], args: list[str], tmp_path: Path
) -> None:
    """`mediaserver calls | head -1`: no traceback, no "cannot read the database", the status of SIGPIPE."""
    import os
    import subprocess
    import sys

    seed(cli.settings)  # type: ignore[attr-defined]
    read_end, write_end = os.pipe()
    os.close(read_end)  # (the reader went away before we wrote)
    try:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (buffered, as in a user's shell)
        done = subprocess.run([sys.executable, "-m", "mediaserver", *args], stdout=write_end, stderr=subprocess.PIPE,
                              cwd=tmp_path, env=env, timeout=60)  # (no .env there)
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr.decode()) == (141, "")


def test_cli_show_takes_env_file_after_the_sid_too(cli: Callable[..., int], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.env"
    broken.write_text("NOT A SETTING LINE\n")
    assert cli("show", "CA" + "1" * 32, "--env-file", str(broken)) == 2  # the file was read (and refused)
    assert "broken.env' line 1: not KEY=value" in capsys.readouterr().err
    seed(cli.settings)  # type: ignore[attr-defined]
    empty = tmp_path / "empty.env"
    empty.write_text("")
    assert cli("show", "CA" + "1" * 32, "--env-file", str(empty)) == 0
