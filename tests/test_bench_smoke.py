"""bench/codecs.py runs end to end and prints its tables (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "codecs.py"


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_bench_codecs_quick_run_prints_the_g711_and_resampler_tables(tmp_path: Path) -> None:
    out = _run("--only", "codecs", "--json", str(tmp_path / "codecs.json"))
    for text in ["Python", "Cython", "numpy", "CPU", "Table 1. G.711", "ns/frame", "ratio", "µ-law encode", "audioop"]:
        assert text in out, text
    assert "Table 2." not in out
    rows = json.loads((tmp_path / "codecs.json").read_text())["tables"]["g711"]
    assert {r["implementation"] for r in rows} >= {"ours", "numpy LUT"}
    assert all(r["bit_exact"] for r in rows)

    out = _run("--only", "resample")
    for text in ["Table 2. Resamplers", "ripple dB", "stop dB", "SNR dB", "delay ms", "lat mean", "lat max"]:
        assert text in out, text
    for impl in ["ours linear", "ours minimum", "soxr HQ", "libsamplerate sinc_medium", "resample_poly"]:
        assert impl in out, impl
    assert "Table 1." not in out
