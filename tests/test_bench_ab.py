"""bench/ab.py: interleaved A/B load runs -- the order, what it reads from load.py, the summary, a tiny real run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import ab  # noqa: E402


def run(side: str, cpu: float) -> ab.Run:
    return ab.Run(side=side, cpu_pct_per_call=cpu, up_p99_ms=1.0, down_p99_ms=2.0, broken=False, gen_bound=False, wait_pct=0.0)


def test_the_order_alternates_so_a_drift_favours_neither_side() -> None:
    assert [ab.order(n) for n in range(4)] == [("A", "B"), ("B", "A"), ("A", "B"), ("B", "A")]


def test_the_summary_is_over_the_ratios_of_each_pair() -> None:
    pairs = [(run("A", 0.20), run("B", 0.18)), (run("A", 0.25), run("B", 0.25)), (run("A", 0.20), run("B", 0.22))]
    summary = ab.summarize(pairs)
    assert summary["pairs"] == 3
    assert summary["ratio_median"] == pytest.approx(1.0)
    assert (summary["ratio_min"], summary["ratio_max"]) == (pytest.approx(0.9), pytest.approx(1.1))
    assert (summary["b_cheaper"], summary["b_costlier"]) == (1, 1)  # (an equal pair is neither)
    assert summary["sign_test_p"] == 1.0
    assert ab.verdict(summary).startswith("No difference")
    assert (summary["a_cpu_median"], summary["b_cpu_median"]) == (0.20, 0.22)
    with pytest.raises(ValueError):
        ab.summarize([])


def test_the_sign_test_is_the_exact_binomial_tail() -> None:
    assert ab.sign_test_p(7, 1) == pytest.approx(2 * (1 + 8) / 256)  # 0.0703
    assert ab.sign_test_p(8, 0) == pytest.approx(2 / 256)
    assert ab.sign_test_p(0, 8) == ab.sign_test_p(8, 0)
    assert ab.sign_test_p(3, 3) == 1.0 and ab.sign_test_p(0, 0) == 1.0
    cheaper = ab.summarize([(run("A", 0.2), run("B", 0.18))] * 8)
    assert cheaper["sign_test_p"] < 0.05
    assert ab.verdict(cheaper).startswith("B is cheaper than A")
    costlier = ab.summarize([(run("A", 0.2), run("B", 0.22))] * 8)
    assert ab.verdict(costlier).startswith("B is costlier than A")


def test_it_reads_ours_at_the_step_from_load_json() -> None:
    rows = [
        {"server": "peer", "calls": 300, "cpu_pct_per_call": 0.5},
        {"server": "ours", "calls": 100, "cpu_pct_per_call": 0.3},
        {"server": "ours", "calls": 300, "cpu_pct_per_call": 0.21, "up_p99_ms": 1.5, "down_p99_ms": None,
         "broken": False, "gen_bound": True, "server_wait_pct": 0.4},
    ]
    got = ab.run_from_json("B", {"rows": rows}, 300)
    assert (got.side, got.cpu_pct_per_call, got.up_p99_ms, got.gen_bound, got.wait_pct) == ("B", 0.21, 1.5, True, 0.4)
    assert math.isnan(got.down_p99_ms)  # no downlink sample in the window: NaN, stored by load.py as null
    with pytest.raises(ValueError, match="no row for ours at 200"):
        ab.run_from_json("A", {"rows": rows}, 200)
    with pytest.raises(ValueError, match="no server CPU"):
        ab.run_from_json("A", {"rows": [{"server": "ours", "calls": 5, "cpu_pct_per_call": None}]}, 5)


def test_a_tiny_run_of_this_checkout_against_itself(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ab.py"), ".", ".", "--steps", "2", "--pairs", "1", "--hold", "1.2",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "A/B at 2 calls" in proc.stdout and "B/A median" in proc.stdout
    data = json.loads(out.read_text())
    assert data["a"] == data["b"] == "working tree" and data["steps"] == 2
    [pair] = data["pairs"]
    assert pair["a"]["side"] == "A" and pair["b"]["side"] == "B"
    assert pair["a"]["cpu_pct_per_call"] > 0 and pair["b"]["cpu_pct_per_call"] > 0
    assert data["summary"]["ratio_median"] == pytest.approx(pair["b"]["cpu_pct_per_call"] / pair["a"]["cpu_pct_per_call"])


@pytest.mark.parametrize("speed", ["0.5", "101", "nan"])
def test_a_model_speed_below_real_time_or_past_load_py_s_range_is_a_usage_error(speed: str) -> None:
    with pytest.raises(SystemExit) as exc:
        ab.parse_args([".", ".", "--model-speed", speed])
    assert exc.value.code == 2


def test_the_model_speed_is_passed_to_both_sides_load_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    commands: list[list[str]] = []

    class Done(Exception):
        pass

    def popen(cmd: list[str], **_: object) -> None:
        commands.append(cmd)
        raise Done

    monkeypatch.setattr(ab.subprocess, "Popen", popen)
    for speed, expected in (("4", ["--model-speed", "4"]), ("1", [])):
        args = ab.parse_args([".", ".", "--model-speed", speed])
        with pytest.raises(Done):
            ab.load_run("A", ROOT, args)
        if expected:
            assert commands[-1][-2:] == expected
        else:  # (real time: the option is left out, so a revision whose load.py lacks it can still be measured)
            assert "--model-speed" not in commands[-1]


def test_a_revision_that_does_not_exist_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ab.py"), "no-such-revision-xyz", "."],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode != 0
    assert "'no-such-revision-xyz' is not a revision of this repository" in proc.stderr


def test_bench_json_keeps_infinity_apart_from_nothing_measured(tmp_path: Path) -> None:
    """A bench's JSON: NaN (no sample) is null, an infinity (an exact match's SNR) the string "inf"; ab.py reads both back."""
    import numpy as np
    from _measure import write_json

    path = tmp_path / "out.json"
    write_json(path, {"rows": [{"snr_db": math.inf, "low": -math.inf, "p99": math.nan, "np": np.float64("inf"), "x": 1.5}]})
    row = json.loads(path.read_text())["rows"][0]
    assert row == {"snr_db": "inf", "low": "-inf", "p99": None, "np": "inf", "x": 1.5}
    assert ab._number(row["snr_db"]) == math.inf and ab._number(row["low"]) == -math.inf
    assert math.isnan(ab._number(row["p99"])) and ab._number(row["x"]) == 1.5
