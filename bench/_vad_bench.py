"""VAD bench: our EnergyVAD against webrtcvad (modes 0-3), speed and per-frame accuracy.

Speech: eight English sentences from eSpeak NG (``tests/speech.py``) with
800 ms pauses, none of them used when the detector's constants were chosen
(the tests use another set), at 8 kHz, cut into 20 ms frames.  Noise: seeded
white and pink (3 dB/octave) Gaussian noise, mixed at 20, 10 and 5 dB SNR
against the active speech level (-26 dBFS).  Ground truth per frame: the
clean frame's power is within 40 dB of the loudest frame's (``speech_labels``).
Every detector sees the same frames from a fresh state, and is scored on
every frame: precision, recall, F1 of "speech".

ns/frame: ``process(frame)`` / ``is_speech(frame, 8000)`` on 20 ms bytes
frames of the white 10 dB mix, Python call included, the bare loop's cost
subtracted (``bench/_measure.py``: median of round-robin repeats).  The
target from the issue is 150 ns for ours (webrtcvad: about 1.1 us).

``vad_table()`` returns the rows; run this file to print them with notes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import webrtcvad

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):  # tests.speech, and _measure when run as a script
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _measure import Column, Loop, render_table, time_cases  # noqa: E402

from mediaserver._native._vad import EnergyVAD  # noqa: E402
from tests.speech import mix, utterance  # noqa: E402

RATE_HZ = 8000
FRAME_SAMPLES = RATE_HZ // 50  # 20 ms
SEED = 20_240_611
TARGET_NS = 150
SENTENCES = (
    "Good morning. I'm calling about my internet bill.",
    "It went up by twenty dollars this month, and nobody told me why.",
    "Can you check whether the promotion expired?",
    "Okay, thanks. Please send me an email with the details.",
    "My account number is four, seven, two, nine, one.",
    "Actually, could you also move my payment date to the fifteenth?",
    "Great. That should be fine for now.",
    "No, that's everything. Have a nice day.",
)
CONDITIONS = [(kind, snr) for kind in ("white", "pink") for snr in (20, 10, 5)]

Frames = list[bytes]


class Detector:
    """One row's detector: a factory for a fresh per-frame decision function, and its timed loop."""

    def __init__(self, name: str, new: Callable[[], Callable[[bytes], bool]], stmt: str, names: Callable[[], dict[str, Any]]):
        self.name = name
        self.new = new
        self.stmt = stmt
        self.names = names


def detectors() -> list[Detector]:
    ours = [
        Detector("ours", lambda: EnergyVAD().process, "f(arg)", lambda: {"f": EnergyVAD().process}),
        Detector(
            "ours, attack_ms=60",
            lambda: EnergyVAD(attack_ms=60).process,
            "f(arg)",
            lambda: {"f": EnergyVAD(attack_ms=60).process},
        ),
    ]
    theirs = []
    for mode in range(4):

        def new(mode: int = mode) -> Callable[[bytes], bool]:
            v = webrtcvad.Vad(mode)
            return lambda frame: bool(v.is_speech(frame, RATE_HZ))

        theirs.append(
            Detector(
                f"webrtcvad mode {mode}",
                new,
                "f(arg, RATE)",
                lambda mode=mode: {"f": webrtcvad.Vad(mode).is_speech, "RATE": RATE_HZ},
            )
        )
    return ours + theirs


def frames_of(pcm: npt.NDArray[np.int16]) -> Frames:
    n = len(pcm) // FRAME_SAMPLES
    return [pcm[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES].tobytes() for i in range(n)]


def scores(pred: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> tuple[float, float, float]:
    tp = int(np.sum(pred & truth))
    fp = int(np.sum(pred & ~truth))
    fn = int(np.sum(~pred & truth))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return precision, recall, f1


def vad_table(quick: bool = False) -> list[dict[str, object]]:
    """Rows: per noise and SNR, each detector's ns/frame, precision, recall and F1."""
    clean = utterance(SENTENCES[:3] if quick else SENTENCES, pause_ms=800, rate_hz=RATE_HZ)
    mixes = {c: mix(clean, c[0], c[1], seed=SEED, rate_hz=RATE_HZ) for c in CONDITIONS}
    dets = detectors()

    timing_frames = frames_of(mixes["white", 10][0])
    cases = {d.name: Loop(d.stmt, timing_frames, d.names()) for d in dets}
    timings = time_cases(cases, repeats=3 if quick else 15, repeat_ns=300_000 if quick else 8_000_000)

    rows: list[dict[str, object]] = []
    for kind, snr in CONDITIONS:
        pcm, truth = mixes[kind, snr]
        frames = frames_of(pcm)
        results = {}
        for d in dets:
            decide = d.new()
            results[d.name] = scores(np.array([decide(f) for f in frames], dtype=bool), truth)
        best_webrtc = max(f for name, (_, _, f) in results.items() if name.startswith("webrtcvad"))
        if rows:
            rows.append({})
        for d in dets:
            precision, recall, f1 = results[d.name]
            ns = timings[d.name].median_ns
            rows.append(
                {
                    "noise": kind,
                    "SNR dB": snr,
                    "implementation": d.name,
                    "ns/frame": ns,
                    "precision": precision,
                    "recall": recall,
                    "F1": f1,
                    "F1 - best webrtcvad": f1 - best_webrtc,
                    "target": _target(ns, quick) if d.name == "ours" else "",
                }
            )
    return rows


def _target(ns: float, quick: bool) -> str:
    if quick:
        return "(quick run: not judged)"
    return f"<= {TARGET_NS} ns {'met' if ns <= TARGET_NS else 'MISSED'}"


NOTES: Sequence[str] = (
    "speech: 8 eSpeak NG sentences (not the tuning set), 800 ms pauses, 8 kHz, 20 ms frames; active level -26 dBFS.",
    "truth per frame: clean frame power within 40 dB of the loudest frame; SNR against the active speech level.",
    "ns/frame: process(bytes) / is_speech(bytes, 8000) on the white 10 dB frames, Python call included, bare loop subtracted.",
    "ours: defaults (attack 0 ms, hangover 160 ms, margin 4 dB); 'attack_ms=60' is a barge-in setting, for its cost.",
)


if __name__ == "__main__":
    table = vad_table(quick="--quick" in sys.argv)
    columns = [
        Column("noise", "noise", align="<"),
        Column("SNR dB", "SNR dB"),
        Column("implementation", "implementation", align="<"),
        Column("ns/frame", "ns/frame", ".0f"),
        Column("precision", "precision", ".3f"),
        Column("recall", "recall", ".3f"),
        Column("F1", "F1", ".3f"),
        Column("F1 - best webrtcvad", "F1 - best webrtcvad", "+.3f"),
        Column("target", "target", align="<"),
    ]
    print(render_table("VAD against webrtcvad, per 20 ms frame at 8 kHz", columns, table, NOTES))
