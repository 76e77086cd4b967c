"""MEDIASERVER_LOG_FORMAT=json: one JSON object per log line, with the call SID of call lines and tracebacks."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import IO

import pytest

from mediaserver.logs import JsonFormatter, OncePer, configure, quiet_accept_errors

SID = "CA" + "0123456789abcdef" * 2


def record(message: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("the model said no")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord("mediaserver.calls", logging.INFO, __file__, 1, message, args, exc_info)


def test_a_call_line_is_an_object_with_its_call_sid() -> None:
    line = json.loads(JsonFormatter().format(record("call %s: ended (%s) after %.1f s", SID, "twilio sent stop", 63.25)))
    assert line["message"] == f"call {SID}: ended (twilio sent stop) after 63.2 s"
    assert line["call_sid"] == SID
    assert (line["level"], line["logger"]) == ("INFO", "mediaserver.calls")
    stamp = datetime.fromisoformat(line["time"])
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert line["time"].endswith("+00:00") and len(line["time"].split(".")[1]) == len("123+00:00")


def test_other_lines_have_no_call_sid_and_tracebacks_are_kept() -> None:
    plain = json.loads(JsonFormatter().format(record("stream closed before it started")))
    assert "call_sid" not in plain and "exception" not in plain
    # a SID that is not at the start is not this line's call
    assert "call_sid" not in json.loads(JsonFormatter().format(record("transferred to call %s", SID)))
    failed = json.loads(JsonFormatter().format(record("call %s: failed", SID, exc=True)))
    assert failed["call_sid"] == SID
    assert failed["exception"].startswith("Traceback") and "ValueError: the model said no" in failed["exception"]
    outbound = json.loads(JsonFormatter().format(record("outbound call %s: answered by %s", SID, "+15550001111")))
    assert outbound["call_sid"] == SID
    unicode = json.loads(JsonFormatter().format(record("tool said: %s", "ça marche \u2713")))
    assert unicode["message"] == "tool said: ça marche \u2713"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_configure_writes_the_chosen_format_to_stderr_at_the_level(fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    configure("warning", fmt)
    log = logging.getLogger("mediaserver.test")
    log.info("call %s: not shown", SID)
    log.warning("call %s: shown", SID)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    if fmt == "json":
        assert json.loads(lines[0])["message"] == f"call {SID}: shown"
    else:
        assert lines[0].endswith(f"WARNING mediaserver.test: call {SID}: shown")


def _lines(stream: IO[str], count: int, timeout_s: float) -> list[str]:
    """The next ``count`` lines of a pipe, failing (not hanging) if they do not come in time."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(stream.readline() for _ in range(count)), daemon=True)
    reader.start()
    reader.join(timeout_s)
    assert not reader.is_alive(), f"the server wrote {got!r} in {timeout_s} s, expected {count} lines"
    return got


def _first_json_lines(tmp_path: Path, count: int, **env_extra: str) -> list[dict[str, object]]:
    """Start ``mediaserver serve`` in JSON log mode (no settings from this environment) and read its first lines."""
    with socket.socket() as probe:  # a free port (the server refuses port 0)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIASERVER_", "TWILIO_"))}
    env.update(MEDIASERVER_DATA_DIR=str(tmp_path), MEDIASERVER_LOG_FORMAT="json", **env_extra)
    with subprocess.Popen(
        [sys.executable, "-m", "mediaserver", "serve", "--host", "127.0.0.1", "--port", str(port), "--env-file", ""],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            lines = _lines(proc.stderr, count, timeout_s=30)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return [json.loads(line) for line in lines]


def test_the_server_logs_json_lines_from_its_first_line(tmp_path: Path) -> None:
    first, second = _first_json_lines(tmp_path, 2)
    assert first["level"] == "WARNING" and "DEVELOPMENT MODE" in str(first["message"])
    assert str(second["logger"]).startswith("mediaserver")


def test_signatures_checked_against_client_headers_are_warned_about_at_start(tmp_path: Path) -> None:
    [first] = _first_json_lines(tmp_path, 1, TWILIO_AUTH_TOKEN="secret")
    assert first["level"] == "WARNING"
    message = str(first["message"])
    assert message.startswith("MEDIASERVER_PUBLIC_URL is not set, so webhook signatures are checked against")
    assert "secret" not in message


def test_a_warning_from_loading_the_tools_is_a_json_line_and_is_logged_once(tmp_path: Path) -> None:
    # (The toolset is loaded at start to check it, before the logs were set up, then again by the server.)
    lines = _first_json_lines(
        tmp_path, 3, TWILIO_ACCOUNT_SID="AC" + "a" * 32, TWILIO_AUTH_TOKEN="secret",
        MEDIASERVER_PUBLIC_URL="https://example.com",
    )
    assert [(line["level"], line["message"]) for line in lines if line["logger"] == "mediaserver.tools"] == [
        # (information, not a warning: the credentials are there to sign webhooks and place calls)
        ("INFO", "transfer_call is not offered: set MEDIASERVER_TRANSFER_NUMBERS to the numbers it may dial")
    ]
    assert "Running on" in str(lines[-1]["message"])  # (the server is up: the second loading is behind us)


def test_a_misspelled_setting_is_warned_about_at_start(tmp_path: Path) -> None:
    [first] = _first_json_lines(tmp_path, 1, MEDIASERVER_PROVIDR="openai", TWILIO_AUTH_TOKEN="secret",
                                MEDIASERVER_PUBLIC_URL="https://example.com")  # fmt: skip
    assert first["level"] == "WARNING"
    assert first["message"] == "MEDIASERVER_PROVIDR is not a setting: ignored (did you mean MEDIASERVER_PROVIDER?)"


def test_in_json_mode_a_port_in_use_is_a_json_line_too(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIASERVER_", "TWILIO_"))}
        env.update(MEDIASERVER_DATA_DIR=str(tmp_path), MEDIASERVER_LOG_FORMAT="json")
        proc = subprocess.run(
            [sys.executable, "-m", "mediaserver", "serve", "--host", "127.0.0.1", "--port", str(port), "--env-file", ""],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )
    assert proc.returncode == 2
    lines = [json.loads(line) for line in proc.stderr.splitlines()]  # every line is JSON, the error too
    assert lines[-1]["level"] == "ERROR"
    assert lines[-1]["message"].startswith(f"cannot listen on 127.0.0.1:{port}: Address already in use")


def test_shown_keeps_plain_values_and_quotes_anything_that_could_break_a_line() -> None:
    from mediaserver.logs import shown

    assert shown("+15551234567") == "+15551234567"
    assert shown("a\nb") == "'a\\nb'" and shown("x\u2028y") == "'x\\u2028y'" and shown("esc\x1b[31m") == "'esc\\x1b[31m'"
    assert shown("9" * 70) == "9" * 64 + "…" and shown("9" * 70, 80) == "9" * 70
    assert shown("\n" * 100, 3) == repr("\n\n\n…")


def test_trio_s_accept_errors_are_logged_once_per_interval_without_their_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Out of file descriptors, Trio logs "accept returned EMFILE ...; retrying in 0.1 seconds" with a traceback
    ten times a second: one line every 10 s, saying how many it held back."""
    now = [0.0]
    logger = logging.getLogger("test.accept_errors")
    limiter = OncePer(10.0, clock=lambda: now[0])
    logger.addFilter(limiter)
    caplog.set_level(logging.ERROR, logger="test.accept_errors")
    try:
        for _ in range(100):  # 10 s of it
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                logger.error("accept returned %s (%s); retrying in %s seconds", "EMFILE", "Too many open files", 0.1,
                             exc_info=True)  # fmt: skip
            now[0] += 0.1
        now[0] = 10.0  # (exactly: a hundred float steps of 0.1 fall short of it)
        logger.error("accept returned %s (%s); retrying in %s seconds", "EMFILE", "Too many open files", 0.1)
    finally:
        logger.removeFilter(limiter)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "accept returned EMFILE (Too many open files); retrying in 0.1 seconds",
        "accept returned EMFILE (Too many open files); retrying in 0.1 seconds (99 more like it in the last 10 s)",
    ]
    assert all(r.exc_info is None for r in caplog.records)
    quiet_accept_errors()
    quiet_accept_errors()  # (idempotent: the server calls it at every start)
    assert sum(isinstance(f, OncePer) for f in logging.getLogger("trio.serve_listeners").filters) == 1
