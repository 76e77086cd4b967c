"""bench/scan_ab.py: the native scanners of two revisions side by side -- messages, timing, summary, a tiny real run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from openai.types.realtime import ResponseAudioDeltaEvent

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import scan_ab  # noqa: E402
from mediaserver._native import _realtime, _twilio  # noqa: E402


def test_every_message_set_is_plain_and_means_what_the_ordinary_parser_reads() -> None:
    sets = scan_ab.messages(20)
    assert set(sets) == {"media", "mark", "delta 40 ms", "delta 200 ms"} and all(len(v) == 20 for v in sets.values())
    media = json.loads(sets["media"][3])
    assert (media["event"], media["sequenceNumber"], media["media"]["chunk"], media["streamSid"]) == ("media", "5", "4", scan_ab.STREAM_SID)
    assert len(json.loads(sets["delta 40 ms"][0])["delta"]) == 320 // 3 * 4 + 4  # 320 bytes of µ-law: 40 ms at 8 kHz
    assert len(json.loads(sets["delta 200 ms"][0])["delta"]) == 1600 // 3 * 4 + 4
    assert _twilio.parse_mark(sets["mark"][0]) == (2, scan_ab.STREAM_SID, "1")
    assert scan_ab.messages(5) == scan_ab.messages(5)  # (seeded: both revisions, and every run, time the same text)
    for text in sets["delta 40 ms"][:3] + sets["delta 200 ms"][:3]:  # OpenAI's own event, as its SDK reads and writes it
        event = ResponseAudioDeltaEvent.model_validate_json(text, strict=True)
        assert json.loads(event.model_dump_json()) == json.loads(text)


def test_the_timers_take_every_message_and_refuse_a_scanner_that_declines() -> None:
    sets = scan_ab.messages(30)
    timers = scan_ab.timers(_twilio, _realtime, sets)
    assert all(timers[key]() > 0 for key in sets)
    sets["mark"][7] = sets["mark"][7].replace('"name": "8"', '"name": "a\\\\b"')  # an escape: the scanner declines
    with pytest.raises(SystemExit, match="parse_mark took 29 of 30 plain messages"):
        scan_ab.timers(_twilio, _realtime, sets)["mark"]()


def test_the_summary_is_medians_their_ratio_and_a_sign_test_over_rounds() -> None:
    times = {"media": {"A": [10.0, 12.0, 11.0, 13.0], "B": [9.0, 12.5, 8.0, 7.0], "json": [50.0, 52.0, 51.0, 49.0]}}
    [row] = scan_ab.summary(times)
    assert row == {
        "messages": "media", "a_ns": 12, "b_ns": 8, "ratio": round(8.5 / 11.5, 3), "b_faster": 3, "rounds": 4,
        "sign_test_p": round(scan_ab.ab.sign_test_p(3, 1), 4), "json_loads_ns": 50,
    }  # fmt: skip


def test_rounds_alternate_which_side_goes_first() -> None:
    calls: list[str] = []
    side = {"A": {"m": lambda: calls.append("A") or 1.0}, "B": {"m": lambda: calls.append("B") or 2.0}}
    times = scan_ab.measure(side["A"], side["B"], {"m": lambda: 3.0}, rounds=3)
    assert calls == ["A", "B", "A", "B", "B", "A", "A", "B"]  # (a warm-up, then AB, BA, AB)
    assert times == {"m": {"A": [1.0] * 3, "B": [2.0] * 3, "json": [3.0] * 3}}


def test_a_tiny_run_of_this_checkout_against_itself(tmp_path: Path) -> None:
    out = tmp_path / "scan.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scan_ab.py"), ".", ".", "--rounds", "2", "--messages", "50", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "B faster" in proc.stdout and "delta 200 ms" in proc.stdout
    data = json.loads(out.read_text())
    assert data["a"] == data["b"] == "working tree"
    assert [row["messages"] for row in data["rows"]] == ["media", "mark", "delta 40 ms", "delta 200 ms"]
    assert all(row["rounds"] == 2 and row["a_ns"] > 0 and row["b_ns"] > 0 for row in data["rows"])


def test_bad_counts_are_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        scan_ab.parse_args([".", ".", "--rounds", "0"])
    assert exc.value.code == 2


def test_a_bad_output_path_or_revision_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        scan_ab.parse_args([".", ".", "--json", str(tmp_path / "no" / "such" / "dir" / "x.json")])
    assert exc.value.code == 2
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "scan_ab.py"), ".", "no-such-revision-xyz"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 2
    assert "'no-such-revision-xyz' is not a revision of this repository" in proc.stderr
    assert "building" not in proc.stdout  # (the bad revision is found before '.' is built)
