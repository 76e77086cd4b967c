"""Codec benches: our native kernels against their peers, per 20 ms frame, in one run.

Run ``.venv/bin/python bench/codecs.py`` (``make bench`` does).  Tables:

1. G.711 (µ-law and A-law, decode and encode): ours, audioop, numpy lookup tables.
2. Resamplers (8k<->16k, 8k<->24k, and 16k<->24k for ours): ours (linear and
   minimum phase), audioop.ratecv, soxr HQ/QQ, libsamplerate sinc_fastest and
   sinc_medium, scipy resample_poly per chunk -- speed, and quality measured
   through each one's streaming API with 20 ms int16 frames in and out.
3. Jitter buffer, from ``bench/_jitter_bench.py`` (``bench_jitter()``).
4. VAD against webrtcvad, from ``bench/_vad_bench.py`` (``vad_table()``).

Options: ``--quick`` (a fast smoke run: few repeats, short signals),
``--only codecs,resample,jitter,vad``, ``--json PATH`` (every row, and the
header, as JSON).  Nothing is asserted: targets are shown, not enforced.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import inspect
import math
import os
import platform
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, when imported from elsewhere
# This checkout's mediaserver, not whichever one is installed (the venv's may be another checkout's, editable)
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from _measure import (  # noqa: E402
    FRAME_MS,
    Column,
    Int16Array,
    Loop,
    Multitone,
    Timing,
    amplitude_at,
    check_output_path,
    cpu_model,
    dist_version,
    estimate_delay_s,
    frames_of,
    interrupt_on_sigterm,
    multitone,
    native_build_flags,
    normalize_rows,
    print_header,
    render_rows,
    render_table,
    snr_db,
    spectrum_db,
    time_cases,
    to_int16,
    tone,
    utc_now,
    write_json,
)

from mediaserver import codec  # noqa: E402
from mediaserver._native import _g711, _resample  # noqa: E402

SEED = 20240611  # any fixed value: the same frames every run
SECTIONS = ("codecs", "resample", "jitter", "vad")

# Targets from the issue, per 160-sample (20 ms) frame, Python call included.
# Shown next to the measurement, never asserted (shared CI machines are noisy).
G711_TARGET_NS = {"µ-law decode": 80, "µ-law encode": 150}
RESAMPLE_TARGET_NS = {(8000, 16000): 1500, (8000, 24000): 1500, (16000, 8000): 1500, (24000, 8000): 1500}
PEER_PAIRS = [(8000, 16000), (8000, 24000), (16000, 8000), (24000, 8000)]
OURS_ONLY_PAIRS = [(16000, 24000), (24000, 16000)]


def _import_audioop() -> Any:
    """audioop: stdlib up to 3.12 (deprecated, so silence the warning), audioop-lts from 3.13."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return importlib.import_module("audioop")
        except ImportError:
            return None


def _optional(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


audioop = _import_audioop()
soxr = _optional("soxr")
samplerate = _optional("samplerate")


@dataclasses.dataclass(frozen=True)
class Settings:
    repeats: int
    repeat_ns: int  # target duration of one timed repeat
    ripple_hz: tuple[int, ...]
    up_tones_hz: tuple[int, ...]  # images checked for these input tones
    down_tones_hz: tuple[int, ...]  # inputs above the stop edge, checked for aliases
    tone_s: float  # input length for the ripple tones
    spectrum_s: float  # spectrum length (bin spacing 1/spectrum_s Hz)
    multitone_s: float  # input length for SNR, delay and latency
    quick: bool = False  # a smoke run: its timings are not judged against the targets


FULL = Settings(
    repeats=15,
    repeat_ns=8_000_000,
    ripple_hz=(100, 250, 500, 1000, 1500, 2000, 2500, 3000, 3200, 3400),
    up_tones_hz=(100, 1000, 2000, 3000, 3400),
    down_tones_hz=(4600, 5000, 6000, 7000, 7900),
    tone_s=0.7,
    spectrum_s=1.0,
    multitone_s=1.4,
)
QUICK = Settings(
    repeats=3,
    repeat_ns=300_000,
    ripple_hz=(100, 1000, 3400),
    up_tones_hz=(1000, 3400),
    down_tones_hz=(4600, 7000),
    tone_s=0.3,
    spectrum_s=0.5,
    multitone_s=0.5,
    quick=True,
)


# --- header ------------------------------------------------------------------


def header_fields(settings: Settings, quick: bool) -> list[tuple[str, str]]:
    cython = _optional("Cython")
    scipy = _optional("scipy")

    py = f"{platform.python_implementation()} {platform.python_version()}"
    if audioop is None:
        audioop_version = "not available"
    elif sys.version_info >= (3, 13):
        audioop_version = f"audioop-lts {dist_version('audioop-lts')}"
    else:
        audioop_version = f"stdlib ({platform.python_version()})"
    soxr_version = "not installed" if soxr is None else f"{soxr.__version__} (libsoxr {getattr(soxr, '__libsoxr_version__', '?')})"
    src_version = (
        "not installed"
        if samplerate is None
        else f"{samplerate.__version__} (libsamplerate {getattr(samplerate, '__libsamplerate_version__', '?')})"
    )
    flags = {native_build_flags(Path(m.__file__ or "")) for m in (_g711, _resample)}
    return [
        ("Python", py),
        ("Cython", getattr(cython, "__version__", "n/a")),
        ("numpy", np.__version__),
        ("scipy", scipy.__version__ if scipy is not None else "not installed (its resampler row is skipped)"),
        ("soxr", soxr_version),
        ("samplerate", src_version),
        ("webrtcvad", f"webrtcvad-wheels {dist_version('webrtcvad-wheels', 'webrtcvad')}"),
        ("audioop", audioop_version),
        ("mediaserver", dist_version("mediaserver")),
        ("build", " | ".join(sorted(flags))),
        ("CPU", f"{cpu_model()} ({os.cpu_count()} logical CPUs, {platform.machine()})"),
        ("date", utc_now()),
        (
            "timing",
            f"{'QUICK smoke run, not for comparison; ' if quick else ''}median of {settings.repeats} "
            f"round-robin repeats (~{settings.repeat_ns / 1e6:g} ms each) after a warm-up; seed {SEED}",
        ),
    ]


# --- table 1: G.711 ----------------------------------------------------------


def _numpy_g711() -> dict[str, Callable[[bytes], bytes]]:
    """Table-lookup G.711 in numpy, the LUTs built from our own kernels.

    Decode: np.take on a 256-entry int16 table.  Encode: a 16384-entry table
    indexed by the sample's top 14 bits (sample >> 2 as unsigned), enough for
    µ-law (14 bits) and A-law (13 bits).
    """
    codes = bytes(range(256))
    top14 = (np.arange(1 << 14, dtype=np.uint16) << 2).astype("<u2").tobytes()  # i << 2, as int16 bits
    ulaw_dec = np.frombuffer(codec.ulaw_decode(codes), "<i2").copy()
    alaw_dec = np.frombuffer(codec.alaw_decode(codes), "<i2").copy()
    ulaw_enc = np.frombuffer(codec.ulaw_encode(top14), np.uint8).copy()
    alaw_enc = np.frombuffer(codec.alaw_encode(top14), np.uint8).copy()

    def decoder(lut: np.ndarray) -> Callable[[bytes], bytes]:
        def decode(data: bytes) -> bytes:
            return lut.take(np.frombuffer(data, np.uint8)).tobytes()

        return decode

    def encoder(lut: np.ndarray) -> Callable[[bytes], bytes]:
        def encode(data: bytes) -> bytes:
            return lut.take(np.frombuffer(data, "<u2") >> 2).tobytes()

        return encode

    return {
        "µ-law decode": decoder(ulaw_dec),
        "µ-law encode": encoder(ulaw_enc),
        "A-law decode": decoder(alaw_dec),
        "A-law encode": encoder(alaw_enc),
    }


def bench_g711(settings: Settings) -> tuple[str, list[dict[str, object]]]:
    rng = np.random.default_rng(SEED)
    frame = 8000 * FRAME_MS // 1000  # 160 samples
    law_frames = [rng.integers(0, 256, frame, dtype=np.uint8).tobytes() for _ in range(64)]
    pcm_frames = [np.clip(rng.normal(0, 4000, frame), -32768, 32767).astype("<i2").tobytes() for _ in range(64)]
    all_codes = bytes(range(256))
    all_samples = np.arange(-32768, 32768, dtype="<i2").tobytes()

    ours: dict[str, Callable[[bytes], bytes]] = {
        "µ-law decode": codec.ulaw_decode,
        "µ-law encode": codec.ulaw_encode,
        "A-law decode": codec.alaw_decode,
        "A-law encode": codec.alaw_encode,
    }
    oracle = {"µ-law decode": "ulaw2lin", "µ-law encode": "lin2ulaw", "A-law decode": "alaw2lin", "A-law encode": "lin2alaw"}
    numpy_impl = _numpy_g711()

    cases: dict[str, Loop] = {}
    exact: dict[str, bool] = {}
    for op, fn in ours.items():
        decode = op.endswith("decode")
        frames = law_frames if decode else pcm_frames
        every = all_codes if decode else all_samples  # exhaustive bit-exactness check
        cases[f"{op}|ours"] = Loop("f(arg)", frames, {"f": fn})
        exact[f"{op}|ours"] = True
        if audioop is not None:
            peer = getattr(audioop, oracle[op])
            cases[f"{op}|audioop"] = Loop("f(arg, 2)", frames, {"f": peer})
            exact[f"{op}|audioop"] = peer(every, 2) == fn(every)
        cases[f"{op}|numpy LUT"] = Loop("f(arg)", frames, {"f": numpy_impl[op]})
        exact[f"{op}|numpy LUT"] = numpy_impl[op](every) == fn(every)

    timings = time_cases(cases, repeats=settings.repeats, repeat_ns=settings.repeat_ns)
    rows: list[dict[str, object]] = []
    for op in ours:
        if rows:
            rows.append({})
        base = timings[f"{op}|ours"].median_ns
        for key in [k for k in cases if k.startswith(f"{op}|")]:
            impl = key.split("|", 1)[1]
            t = timings[key]
            target = G711_TARGET_NS.get(op) if impl == "ours" else None
            rows.append(
                {
                    "kernel": op,
                    "implementation": impl,
                    "ns_per_frame": t.median_ns,
                    "ns_p25": t.p25_ns,
                    "ns_p75": t.p75_ns,
                    "ratio": t.median_ns / base,
                    "bit_exact": exact[key],
                    "target_ns": target,
                    "target": _target_text(t.median_ns, target, settings.quick),
                }
            )
    notes = [
        f"ns/frame: median of per-repeat means, bytes in -> bytes out, Python call included, "
        f"bare loop ({timings['(loop)'].median_ns:.0f} ns/iteration) subtracted.",
        "ratio = implementation / ours: above 1 means ours is faster.",
        "= ours: output identical to ours for all 256 codes / all 65,536 samples.",
        "numpy LUT: np.take on tables built from ours (256 entries to decode; 16384, indexed by sample >> 2, to encode).",
        "targets (issue): µ-law decode <= 80 ns, encode <= 150 ns (audioop measured 84 / 275 there).",
        "The targets are absolute, from the issue's machine: on a slower one compare the ratio to audioop instead.",
    ]
    columns = [
        Column("kernel", "kernel", align="<"),
        Column("implementation", "implementation", align="<"),
        Column("ns_per_frame", "ns/frame", ".0f"),
        Column("ratio", "ratio", ".2f"),
        Column("bit_exact", "= ours"),
        Column("target", "target", align="<"),
    ]
    print(render_table("Table 1. G.711, per 20 ms frame (160 samples at 8 kHz)", columns, rows, notes))
    return "g711", [r for r in rows if r]


def _target_text(value_ns: float, target_ns: int | None, quick: bool = False) -> str:
    if target_ns is None:
        return ""
    if quick:  # (a few short repeats, likely on a busy machine: as the VAD table says)
        return f"<= {target_ns} (quick run: not judged)"
    return f"<= {target_ns} {'met' if value_ns <= target_ns else 'MISSED'}"


# --- table 2: resamplers -------------------------------------------------------

Feed = Callable[[Int16Array], Int16Array]


@dataclasses.dataclass(frozen=True)
class ResamplerImpl:
    """A resampler under test.

    ``new(in_hz, out_hz)`` returns a fresh stream as a function from one int16
    frame to the int16 samples it releases.  ``loop(in_hz, out_hz, frames)``
    is the timed statement, written in the implementation's own I/O types
    (bytes for ours and audioop, int16 arrays otherwise) with any float
    conversion included: every row costs one int16 frame in, int16 out.
    """

    name: str
    new: Callable[[int, int], Feed]
    loop: Callable[[int, int, list[Int16Array]], Loop]
    ours: bool = False


def _ours(phase: str) -> ResamplerImpl:
    def new(i: int, o: int) -> Feed:
        r = codec.Resampler(i, o, phase=phase)
        return lambda f: np.frombuffer(r.process(f), "<i2")

    def loop(i: int, o: int, frames: list[Int16Array]) -> Loop:
        return Loop("r.process(arg)", [f.tobytes() for f in frames], {"r": codec.Resampler(i, o, phase=phase)})

    return ResamplerImpl(f"ours {phase}", new, loop, ours=True)


def _audioop_ratecv() -> ResamplerImpl:
    def new(i: int, o: int) -> Feed:
        state: Any = None

        def feed(f: Int16Array) -> Int16Array:
            nonlocal state
            out, state = audioop.ratecv(f.tobytes(), 2, 1, i, o, state)
            return np.frombuffer(out, "<i2")

        return feed

    def loop(i: int, o: int, frames: list[Int16Array]) -> Loop:
        return Loop(
            "out, state = ratecv(arg, 2, 1, IN, OUT, state)",
            [f.tobytes() for f in frames],
            {"ratecv": audioop.ratecv, "IN": i, "OUT": o},
            setup="state = None",
        )

    return ResamplerImpl("audioop.ratecv", new, loop)


def _soxr(quality: str) -> ResamplerImpl:
    def new(i: int, o: int) -> Feed:
        s = soxr.ResampleStream(i, o, 1, dtype="int16", quality=quality)
        return lambda f: np.asarray(s.resample_chunk(f), np.int16)

    def loop(i: int, o: int, frames: list[Int16Array]) -> Loop:
        s = soxr.ResampleStream(i, o, 1, dtype="int16", quality=quality)
        return Loop("s.resample_chunk(arg)", frames, {"s": s})

    return ResamplerImpl(f"soxr {quality}", new, loop)


_F32_SCALE = np.float32(1 / 32768)  # int16 -> [-1, 1), exact (a power of two)


def _samplerate(converter: str) -> ResamplerImpl:
    def new(i: int, o: int) -> Feed:
        r = samplerate.Resampler(converter, channels=1)
        ratio = o / i
        return lambda f: to_int16(r.process(f.astype(np.float32) * _F32_SCALE, ratio, end_of_input=False), 32768.0)

    def loop(i: int, o: int, frames: list[Int16Array]) -> Loop:
        return Loop(
            "y = r.process(arg.astype(f32) * SCALE, RATIO, False)\n"
            "        np.clip(np.rint(y * 32768.0), -32768, 32767).astype(i16)",
            frames,
            {"r": samplerate.Resampler(converter, channels=1), "RATIO": o / i, "np": np,
             "f32": np.float32, "i16": np.int16, "SCALE": _F32_SCALE},
        )

    return ResamplerImpl(f"libsamplerate {converter}", new, loop)


def _resample_poly_per_chunk(scipy_signal: Any) -> ResamplerImpl:
    def ratio(i: int, o: int) -> tuple[int, int]:
        fr = Fraction(o, i)
        return fr.numerator, fr.denominator

    def new(i: int, o: int) -> Feed:
        up, down = ratio(i, o)
        return lambda f: to_int16(scipy_signal.resample_poly(f, up, down))

    def loop(i: int, o: int, frames: list[Int16Array]) -> Loop:
        up, down = ratio(i, o)
        return Loop(
            "np.clip(np.rint(resample_poly(arg, UP, DOWN)), -32768, 32767).astype(i16)",
            frames,
            {"resample_poly": scipy_signal.resample_poly, "UP": up, "DOWN": down, "np": np, "i16": np.int16},
        )

    return ResamplerImpl("scipy resample_poly/chunk", new, loop)


def resampler_impls() -> list[ResamplerImpl]:
    impls = [_ours("linear"), _ours("minimum")]
    if audioop is not None:
        impls.append(_audioop_ratecv())
    if soxr is not None:
        impls += [_soxr("HQ"), _soxr("QQ")]
    if samplerate is not None:
        impls += [_samplerate("sinc_fastest"), _samplerate("sinc_medium")]
    scipy_signal = _optional("scipy.signal")  # imported here: it takes most of a second
    if scipy_signal is not None:
        impls.append(_resample_poly_per_chunk(scipy_signal))
    return impls


def band_hz(in_hz: int, out_hz: int) -> tuple[int, int]:
    """(pass edge, stop edge): telephone band when 8 kHz is involved, else wideband (as the tests)."""
    return (3400, 4600) if 8000 in (in_hz, out_hz) else (7000, 9000)


def run_stream(feed: Feed, x: Int16Array, in_hz: int) -> tuple[Int16Array, list[int]]:
    """Feed x in 20 ms frames; return the output and the output count after each frame."""
    outs: list[Int16Array] = []
    counts: list[int] = []
    total = 0
    for frame in frames_of(x, in_hz):
        y = feed(frame)
        outs.append(y)
        total += len(y)
        counts.append(total)
    return (np.concatenate(outs) if outs else np.zeros(0, np.int16)).astype(np.int16), counts


@functools.cache
def _multitone(rate_hz: int, seconds: float, top_hz: int) -> tuple[Int16Array, Multitone]:
    x, ref = multitone(rate_hz, seconds, top_hz, seed=SEED)
    x.flags.writeable = False  # shared between implementations
    return x, ref


@dataclasses.dataclass(frozen=True)
class Quality:
    ripple_db: float
    stopband_db: float
    snr_db: float
    delay_ms: float
    latency_mean_ms: float
    latency_max_ms: float


def measure_quality(impl: ResamplerImpl, in_hz: int, out_hz: int, s: Settings) -> Quality:
    pass_hz, stop_hz = band_hz(in_hz, out_hz)

    # passband ripple: least-squares gain of single tones, 100 Hz .. pass edge
    ripple_hz = list(s.ripple_hz) if pass_hz <= 3400 else [*s.ripple_hz, 4000, 5000, 6000, 6500, 7000]
    gains = []
    for f in ripple_hz:
        x = tone(f, in_hz, round(in_hz * s.tone_s))
        y, _ = run_stream(impl.new(in_hz, out_hz), x, in_hz)
        gains.append(amplitude_at(y, out_hz, f, s.tone_s - 0.15) / amplitude_at(x, in_hz, f, s.tone_s - 0.15))
    ripple = 20 * math.log10(max(gains) / min(gains))

    # stop band: worst image (up) above the stop edge, or worst alias (down) anywhere
    spec_n = round(in_hz * (s.spectrum_s + 0.25))  # 250 ms spare for start-up and buffering
    per_hz = s.spectrum_s  # bins per Hz
    worst = math.inf
    if out_hz > in_hz:
        tones = [f for f in (*s.up_tones_hz, pass_hz) if f <= pass_hz]
        for f in sorted(set(tones)):
            y, _ = run_stream(impl.new(in_hz, out_hz), tone(f, in_hz, spec_n), in_hz)
            spec = spectrum_db(y, out_hz, s.spectrum_s)
            images = spec[round(stop_hz * per_hz) :]
            worst = min(worst, spec[round(f * per_hz)] - images.max())
    else:
        level_in = 20 * math.log10(32000 / 32768)
        tones = [f for f in (*s.down_tones_hz, stop_hz, in_hz // 2 - 100) if stop_hz <= f < in_hz // 2]
        for f in sorted(set(tones)):
            y, _ = run_stream(impl.new(in_hz, out_hz), tone(f, in_hz, spec_n, 32000.0), in_hz)
            if y[-round(out_hz * s.spectrum_s) :].any():
                worst = min(worst, level_in - spectrum_db(y, out_hz, s.spectrum_s).max())
            # else: every alias rounds away, the int16 output is digital silence (inf)

    # SNR against the ideal band-limited output at the fitted delay
    x, ref = _multitone(in_hz, s.multitone_s, pass_hz)
    y, counts = run_stream(impl.new(in_hz, out_hz), x, in_hz)
    max_delay_s = 0.1
    search_start = round(out_hz * (max_delay_s + FRAME_MS / 1000))
    delay_s = estimate_delay_s(y, ref, out_hz, start=search_start, max_s=max_delay_s)
    start = round(out_hz * (max(delay_s, 0.0) + FRAME_MS / 1000))  # skip the start-up transient
    snr = snr_db(y[start:], ref.at(out_hz, len(y), delay_s, start))

    # latency: the algorithmic delay plus audio waiting inside the stream
    step = in_hz * FRAME_MS // 1000
    waits_ms = [
        ((k + 1) * step * out_hz / in_hz - out_so_far) / out_hz * 1000 for k, out_so_far in enumerate(counts)
    ]
    delay_ms = delay_s * 1000
    lat = [delay_ms + w for w in waits_ms]
    return Quality(ripple, worst, snr, delay_ms, sum(lat) / len(lat), max(lat))


def _pair_name(in_hz: int, out_hz: int) -> str:
    return f"{in_hz // 1000}k->{out_hz // 1000}k"


def bench_resample(settings: Settings) -> tuple[str, list[dict[str, object]]]:
    impls = resampler_impls()
    plan: list[tuple[int, int, ResamplerImpl]] = []
    for i, o in PEER_PAIRS + OURS_ONLY_PAIRS:
        plan += [(i, o, impl) for impl in impls if impl.ours or (i, o) in PEER_PAIRS]

    cases: dict[tuple[int, int, str], Loop] = {}
    for i, o, impl in plan:
        x, _ = _multitone(i, 1.0, band_hz(i, o)[0])
        cases[(i, o, impl.name)] = impl.loop(i, o, frames_of(x, i))
    named = {f"{i}|{o}|{n}": loop for (i, o, n), loop in cases.items()}
    timings = time_cases(named, repeats=settings.repeats, repeat_ns=settings.repeat_ns, min_calls=20)

    rows: list[dict[str, object]] = []
    for i, o in PEER_PAIRS + OURS_ONLY_PAIRS:
        if rows:
            rows.append({})
        base = timings[f"{i}|{o}|ours linear"].median_ns
        for pi, po, impl in plan:
            if (pi, po) != (i, o):
                continue
            t: Timing = timings[f"{i}|{o}|{impl.name}"]
            q = measure_quality(impl, i, o, settings)
            target = RESAMPLE_TARGET_NS.get((i, o)) if impl.ours else None
            rows.append(
                {
                    "pair": _pair_name(i, o),
                    "in_hz": i,
                    "out_hz": o,
                    "implementation": impl.name,
                    "ns_per_frame": t.median_ns,
                    "ns_p25": t.p25_ns,
                    "ns_p75": t.p75_ns,
                    "ratio": t.median_ns / base,
                    **dataclasses.asdict(q),
                    "target_ns": target,
                    "target": _target_text(t.median_ns, target, settings.quick),
                }
            )
    lin = codec.Resampler(8000, 16000)
    mini = codec.Resampler(8000, 16000, phase="minimum")
    notes = [
        f"ns/frame: median of per-repeat means for one 20 ms int16 frame in and int16 out, float conversions "
        f"included; bare loop ({timings['(loop)'].median_ns:.0f} ns) subtracted. ratio = implementation / ours linear.",
        "quality is measured through each streaming API, 20 ms int16 frames in, int16 out (float output rounded and clipped):",
        "  ripple: max/min least-squares tone gain, 100 Hz .. 3400 Hz (7000 Hz for 16k<->24k).",
        "  stop: dB from the tone to its worst image at >= 4.6 kHz (upsampling; 9 kHz for 16k->24k), or from an input",
        "    tone at >= 4.6 kHz (9 kHz) to its worst alias anywhere (downsampling); Blackman-Harris, 1 Hz bins.",
        "    inf: every alias stays below half an LSB, so the int16 output is digital silence.",
        "  SNR: speech-band multitone against the ideal band-limited output at the delay that fits best (least squares);",
        "    minimum phase is not a pure delay, so its SNR measures phase dispersion, not noise.",
        "  delay: the fitted delay, ms; latency: delay + audio held inside the stream after each frame, mean / max.",
        f"ours' nominal delay_ms: linear {lin.delay_ms:.4f}, minimum {mini.delay_ms:.4f} (8k->16k).",
        "targets (issue): ours <= 1500 ns per 20 ms frame for 8k->16k, 8k->24k, 16k->8k, 24k->8k (absolute, from",
        "the issue's machine: on a slower one compare the ratios to the peers instead).",
    ]
    columns = [
        Column("pair", "pair", align="<"),
        Column("implementation", "implementation", align="<"),
        Column("ns_per_frame", "ns/frame", ".0f"),
        Column("ratio", "ratio", ".2f"),
        Column("ripple_db", "ripple dB", ".3f"),
        Column("stopband_db", "stop dB", ".1f"),
        Column("snr_db", "SNR dB", ".1f"),
        Column("delay_ms", "delay ms", ".3f"),
        Column("latency_mean_ms", "lat mean", ".2f"),
        Column("latency_max_ms", "lat max", ".2f"),
        Column("target", "target", align="<"),
    ]
    print(render_table("Table 2. Resamplers, per 20 ms frame", columns, rows, notes))
    return "resample", [r for r in rows if r]


# --- tables 3 and 4: other engineers' benches --------------------------------


def external_table(
    module: str, function: str, title: str, quick: bool, names: Sequence[str] = (), notes: Sequence[str] = ()
) -> tuple[list[object], bool]:
    """Import bench/<module>.py and print what <function>() returns; (rows, ok).

    With --quick, a ``quick`` parameter gets True; failing that, ``repeats``
    and ``frames`` parameters get small values.  ``names`` label the columns
    of rows that are plain tuples.  The module's ``NOTES`` (strings) are
    printed under the table, and its ``COLUMNS`` (``_measure.Column``), if
    any, replace the automatic layout.
    """
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if exc.name and exc.name.split(".")[0] not in (module, "mediaserver"):  # a package the table compares with
            print(f"{title}\n  (skipped: {exc.name} is not installed; pip install -e '.[bench]')\n")
        else:
            print(f"{title}\n  (not built yet: {exc})\n")
        return [], True
    fn = getattr(mod, function, None)
    if fn is None:
        print(f"{title}\n  (not built yet: {module}.{function} missing)\n")
        return [], True
    try:
        params = inspect.signature(fn).parameters
        kwargs: dict[str, object] = {}
        if quick and "quick" in params:
            kwargs["quick"] = True
        elif quick:
            kwargs.update({k: v for k, v in (("repeats", 3), ("frames", 2000)) if k in params})
        result = fn(**kwargs)
    except Exception:  # their bench failing must not hide ours; the exit status reports it
        print(f"{title}\n  (failed, traceback on stderr)\n")
        traceback.print_exc()
        return [], False
    if isinstance(result, str):
        print(f"{title}\n{result}")
        return [result], True
    rows = normalize_rows(list(result) if result is not None else [], names)
    notes = [*notes, *getattr(mod, "NOTES", ())]
    columns = getattr(mod, "COLUMNS", None)  # a module may lay out its own columns
    print(render_table(title, columns, rows, notes) if columns else render_rows(title, rows, notes))
    return [r for r in rows if r], True  # blank rows only separate groups


# --- main ----------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fast smoke run: few repeats, short signals")
    parser.add_argument(
        "--only",
        default=",".join(SECTIONS),
        help=f"comma-separated sections to run, from {', '.join(SECTIONS)} (default: all)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the header and all rows as JSON")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.only.split(",") if s.strip()]
    if not args.sections:
        parser.error(f"--only: name at least one section of {', '.join(SECTIONS)}")
    problem = check_output_path(args.json, "--json")
    if problem is not None:
        parser.error(problem)
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()  # (SIGTERM stops it as Ctrl-C does: the tables printed so far stay, status 130)
    settings = QUICK if args.quick else FULL
    header = header_fields(settings, args.quick)
    print_header("mediaserver codec bench", header)
    tables: dict[str, object] = {}
    ok = True
    if "codecs" in args.sections:
        name, rows = bench_g711(settings)
        tables[name] = rows
    if "resample" in args.sections:
        name, rows = bench_resample(settings)
        tables[name] = rows
    if "jitter" in args.sections:
        rows_j, good = external_table(
            "_jitter_bench",
            "bench_jitter",
            "Table 3. Jitter buffer, per 20 ms frame (bench/_jitter_bench.py)",
            args.quick,
            names=("case", "ns/frame"),
            notes=("ns/frame: one push plus the pops it allows, 160-byte frames, depth 2.",),
        )
        tables["jitter"], ok = rows_j, ok and good
    if "vad" in args.sections:
        rows_v, good = external_table(
            "_vad_bench", "vad_table", "Table 4. VAD against webrtcvad, per 20 ms frame at 8 kHz (bench/_vad_bench.py)", args.quick
        )
        tables["vad"], ok = rows_v, ok and good
    if args.json is not None:
        write_json(args.json, {"header": dict(header), "quick": args.quick, "tables": tables})
        print(f"wrote {args.json}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # (the tables printed so far stay on the screen)
        print("codecs bench: interrupted", file=sys.stderr)
        sys.exit(130)
