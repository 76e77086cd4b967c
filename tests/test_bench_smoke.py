"""bench/codecs.py runs end to end and prints its tables (no timing is asserted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    # a quick run's few short repeats are not judged against the targets (they would read as regressions)
    assert "MISSED" not in out and " met" not in out and "(quick run: not judged)" in out
    assert all(r["target"] in ("", f"<= {r['target_ns']} (quick run: not judged)") for r in rows)

    out = _run("--only", "resample")
    for text in ["Table 2. Resamplers", "ripple dB", "stop dB", "SNR dB", "delay ms", "lat mean", "lat max"]:
        assert text in out, text
    for impl in ["ours linear", "ours minimum", "soxr HQ", "libsamplerate sinc_medium", "resample_poly"]:
        assert impl in out, impl
    assert "Table 1." not in out
    assert "MISSED" not in out and "(quick run: not judged)" in out


def test_bench_codecs_says_a_missing_comparison_package_is_not_installed(tmp_path: Path) -> None:
    """Without webrtcvad (a bench extra), the VAD table says what to install, not "not built yet"."""
    (tmp_path / "webrtcvad.py").write_text("raise ModuleNotFoundError(\"No module named 'webrtcvad'\", name='webrtcvad')\n")
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "vad"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert "(skipped: webrtcvad is not installed; pip install -e '.[bench]')" in proc.stdout, proc.stdout + proc.stderr
    assert "not built yet" not in proc.stdout


@pytest.mark.parametrize("bench", ["codecs.py", "frame_path.py", "tls_send.py"])
def test_bench_sigterm_stops_it_as_ctrl_c_does(bench: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / bench)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        time.sleep(2.0)  # (well into its first table: a full run takes minutes)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err


def test_bench_output_path_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path) -> None:
    """Not after a long run, with a traceback: one argparse line, exit 2, nothing measured."""
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--only", "codecs", "--json", "/proc/mediaserver-bench.json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "codecs.py: error: --json /proc/mediaserver-bench.json cannot be written: No such file or directory"
    )
    assert proc.stdout == ""
    # a writable path is checked without leaving a file behind, and one there already is kept as it is
    sys.path.insert(0, str(ROOT / "bench"))
    from _measure import check_output_path

    assert check_output_path(tmp_path / "new.json", "--json") is None and not (tmp_path / "new.json").exists()
    from _measure import check_log_folder  # (the servers' logs: bench/out/, made if need be)

    assert check_log_folder(tmp_path / "out") is None and (tmp_path / "out").is_dir()
    assert list((tmp_path / "out").iterdir()) == []  # (the probe is gone)
    (tmp_path / "file").write_text("")
    assert check_log_folder(tmp_path / "file") == (
        f"the servers' logs go to {tmp_path / 'file'}, which cannot be made: File exists"
    )
    (tmp_path / "old.json").write_text("kept")
    assert check_output_path(tmp_path / "old.json", "--json") is None
    assert (tmp_path / "old.json").read_text() == "kept"
