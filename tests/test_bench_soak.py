"""bench/soak.py: the trend it reports, its option checks, and a tiny real run against our server (no timing asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import soak  # noqa: E402


def _row(number: int, rss: float, *, fds: int = 14, failed: int = 0, open_sessions: int = 0) -> dict[str, object]:
    return {"round": number, "calls_so_far": number * 100, "rss_mib": rss, "fds": fds, "threads": 2,
            "model_sessions_open": open_sessions, "server_sessions_open": 0.0, "active_after": 0, "pending_after": 0,
            "model_errors": 0, "failed": failed, "lost": 0, "leaked": 0, "p99_ms": 1.0}


def test_the_trend_leaves_out_the_warm_up_and_fits_rss_per_1000_calls() -> None:
    # Warm-up rounds jump (the allocator settling); afterwards 0.5 MiB per round of 100 calls: 5 MiB per 1000.
    rows = [_row(1, 50.0), _row(2, 58.0), _row(3, 60.0), _row(4, 60.5), _row(5, 61.0, fds=15), _row(6, 61.5, failed=2)]
    summary = soak.trend(rows)
    assert summary["rounds"] == 4 and summary["calls"] == 300
    assert summary["rss_mib_per_1000_calls"] == pytest.approx(5.0)
    assert (summary["rss_first_mib"], summary["rss_last_mib"]) == (60.0, 61.5)
    assert (summary["fds_first"], summary["fds_last"]) == (14, 14)
    assert summary["failed"] == 2  # (every round's failures count, the warm-up's too)
    assert (summary["model_errors"], summary["undrained_rounds"]) == (0, 0)
    flat = soak.trend([_row(n, 60.0) for n in range(1, 7)])
    assert flat["rss_mib_per_1000_calls"] == pytest.approx(0.0, abs=1e-9)
    assert soak.trend([_row(1, 50.0), _row(2, 51.0), _row(3, 52.0)]) == {}  # one round after the warm-up: no trend


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "3"], "--rounds must be between 4 and 1000"),
        (["--calls", "0"], "--calls must be between 1 and 5000"),
        (["--hold", "0.2"], "--hold must exceed 0.5 s"),
        (["--json", "/nonexistent-dir/x.json"], "--json"),
    ],
)
def test_bad_options_are_one_line_errors_before_anything_starts(args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("soak.py: error: " + message), proc.stderr  # its own, one line
    assert proc.stderr.count("usage:") == 1  # (not the load bench's usage too)


def _stalled_only(out_json: Path) -> bool:
    """The run was not clean only because the machine stalled: frames lost in rounds whose p99 was far out
    (CI once: 676 ms in a 0.6 s hold, 2 reply frames still in flight when the callers hung up), nothing else."""
    if not out_json.exists():
        return False
    rows = json.loads(out_json.read_text())["rows"]
    if any(r["failed"] or r["leaked"] or r["model_sessions_open"] or r["model_errors"] for r in rows):
        return False
    lossy = [r for r in rows if r["lost"]]
    return bool(lossy) and all(r["p99_ms"] > 100 for r in lossy)


def test_a_tiny_soak_runs_every_round_and_leaves_nothing_open(tmp_path: Path) -> None:
    out_json = tmp_path / "soak.json"
    for _ in range(2):  # a second run only when a stall of the machine is all that spoiled the first
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "soak.py"), "--calls", "2", "--rounds", "4", "--hold", "0.6",
             "--no-pin", "--json", str(out_json)],
            cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
        )
        if proc.returncode == 0 or not _stalled_only(out_json):
            break
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "after the warm-up (2 rounds, 2 calls)" in proc.stdout
    result = json.loads(out_json.read_text())
    rows = result["rows"]
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and [r["calls_so_far"] for r in rows] == [2, 4, 6, 8]
    for row in rows:  # every call bridged and ended; no model session left open, at the model or in the server
        assert (row["failed"], row["lost"], row["leaked"], row["model_sessions_open"]) == (0, 0, 0, 0), row
        assert row["server_sessions_open"] == 0 and row["active_after"] == 0
        assert row["fds"] > 0 and row["rss_mib"] > 0
    assert result["trend"]["leaked"] == 0 and result["trend"]["rounds"] == 2 and result["trend"]["undrained_rounds"] == 0
    assert "NOT clean" not in proc.stdout
