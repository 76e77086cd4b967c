"""Measurement helpers shared by the benches: timing, test signals, spectra, tables.

Timing follows ``timeit``: each measured statement is compiled into its own
loop function, so a call costs what it costs in real code (no lambda or
``functools.partial`` around it).  Cases are timed round-robin, one repeat of
each in turn, so noise from other processes on a shared machine is spread
evenly over them and the ratios stay fair.  The bare ``for`` loop is timed
the same way and subtracted: what remains is the statement, Python call
included.

Signals follow ``tests/codec/test_resample.py``: integer-Hz tones that fall on
exact FFT bins, a Blackman-Harris window (sidelobes at -92 dB), least-squares
tone amplitudes, and a speech-band multitone whose ideal output at any rate
and any delay is known analytically.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

Int16Array = npt.NDArray[np.int16]
FloatArray = npt.NDArray[np.float64]

FULL_SCALE = 32768.0  # int16 full scale, the 0 dBFS reference
FRAME_MS = 20  # Twilio media frames are 20 ms (160 µ-law bytes at 8 kHz)

__all__ = [
    "FRAME_MS",
    "Column",
    "Loop",
    "Multitone",
    "Timing",
    "amplitude_at",
    "blackman_harris",
    "cpu_model",
    "dist_version",
    "estimate_delay_s",
    "format_value",
    "frames_of",
    "multitone",
    "native_build_flags",
    "normalize_rows",
    "print_header",
    "render_rows",
    "render_table",
    "snr_db",
    "spectrum_db",
    "time_cases",
    "to_int16",
    "tone",
    "utc_now",
    "write_json",
]


# --- timing ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loop:
    """One timed statement.

    ``stmt`` runs once per element of ``args``, with the element bound to
    ``arg``; ``setup`` runs once before the loop (e.g. to load a stream state
    into a local); ``names`` are the globals the code sees.
    """

    stmt: str
    args: Sequence[object]
    names: Mapping[str, object] = dataclasses.field(default_factory=dict)
    setup: str = "pass"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Nanoseconds per call: median, quartiles and minimum of the per-repeat means."""

    median_ns: float
    p25_ns: float
    p75_ns: float
    min_ns: float
    calls: int
    repeats: int


_TEMPLATE = """\
def _loop(_args, _clock):
    {setup}
    _t0 = _clock()
    for arg in _args:
        {stmt}
    return _clock() - _t0
"""

_BARE = Loop("pass", [None])


def _compile(loop: Loop) -> Callable[[Sequence[object], Callable[[], int]], int]:
    namespace: dict[str, Any] = dict(loop.names)
    exec(_TEMPLATE.format(setup=loop.setup, stmt=loop.stmt), namespace)  # noqa: S102 - our own strings
    fn: Callable[[Sequence[object], Callable[[], int]], int] = namespace["_loop"]
    return fn


def _cycled(args: Sequence[object], n: int) -> list[object]:
    return list(itertools.islice(itertools.cycle(args), n))


def time_cases(
    cases: Mapping[str, Loop],
    *,
    repeats: int = 15,
    repeat_ns: int = 10_000_000,
    min_calls: int = 50,
    max_calls: int = 200_000,
) -> dict[str, Timing]:
    """Time every case: calibrate, warm up, then ``repeats`` round-robin repeats.

    Each repeat makes enough calls to last about ``repeat_ns``; the result
    per case is the median (and quartiles) of the per-repeat means, minus
    the bare loop's cost per iteration.
    """
    clock = time.perf_counter_ns
    compiled = {name: _compile(loop) for name, loop in cases.items()}
    compiled["(loop)"] = _compile(_BARE)
    sources = {**cases, "(loop)": _BARE}
    calls: dict[str, int] = {}
    for name, fn in compiled.items():
        probe = _cycled(sources[name].args, 20)
        fn(probe, clock)  # first call: caches, branch predictors, lazy imports
        per_call = max(fn(probe, clock) / len(probe), 1.0)
        calls[name] = int(min(max(repeat_ns / per_call, min_calls), max_calls))
    if calls["(loop)"] < max(calls.values()):
        calls["(loop)"] = max(calls.values())
    args = {name: _cycled(sources[name].args, calls[name]) for name in compiled}
    for name, fn in compiled.items():  # warm-up: one full, untimed repeat each
        fn(args[name], clock)
    samples: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, fn in compiled.items():
            samples[name].append(fn(args[name], clock) / calls[name])
    bare = statistics.median(samples.pop("(loop)"))
    out: dict[str, Timing] = {}
    for name, values in samples.items():
        net = sorted(v - bare for v in values)
        q = statistics.quantiles(net, n=4) if len(net) > 1 else [net[0]] * 3
        out[name] = Timing(statistics.median(net), q[0], q[2], net[0], calls[name], repeats)
    out["(loop)"] = Timing(bare, bare, bare, bare, calls["(loop)"], repeats)
    return out


# --- signals -----------------------------------------------------------------


def tone(freq_hz: float, rate_hz: int, n_samples: int, amplitude: float = 16000.0) -> Int16Array:
    """A cosine rounded to int16; integer freq_hz over whole seconds lands on an FFT bin."""
    n = np.arange(n_samples)
    return np.rint(amplitude * np.cos(2 * np.pi * freq_hz * n / rate_hz)).astype(np.int16)


def to_int16(y: npt.ArrayLike, scale: float = 1.0) -> Int16Array:
    """Round to nearest and saturate (what a float resampler's caller must do)."""
    return np.clip(np.rint(np.asarray(y, dtype=np.float64) * scale), -32768, 32767).astype(np.int16)


def frames_of(x: Int16Array, rate_hz: int, frame_ms: int = FRAME_MS) -> list[Int16Array]:
    """Split x into consecutive frame_ms frames (the last may be short)."""
    step = rate_hz * frame_ms // 1000
    return [x[i : i + step] for i in range(0, len(x), step)]


@dataclasses.dataclass(frozen=True)
class Multitone:
    """A sum of cosines with known frequencies, amplitudes (in LSB) and phases.

    ``at(rate_hz, n, delay_s)`` is the ideal band-limited signal sampled at any
    rate and delayed by any amount: the reference a perfect resampler with
    that delay would produce.
    """

    freqs_hz: FloatArray
    amps: FloatArray
    phases: FloatArray

    def basis(self, rate_hz: int, n: int, start: int = 0) -> tuple[FloatArray, FloatArray]:
        """cos and sin of each tone at samples start..n-1, shape (tones, samples)."""
        t = np.arange(start, n) / rate_hz
        arg = 2 * np.pi * self.freqs_hz[:, None] * t[None, :] + self.phases[:, None]
        return np.cos(arg), np.sin(arg)

    def at(self, rate_hz: int, n: int, delay_s: float = 0.0, start: int = 0) -> FloatArray:
        # cos(w(t - d) + p) = cos(wt + p) cos(wd) + sin(wt + p) sin(wd)
        c, s = self.basis(rate_hz, n, start)
        w = 2 * np.pi * self.freqs_hz
        result: FloatArray = (self.amps * np.cos(w * delay_s)) @ c + (self.amps * np.sin(w * delay_s)) @ s
        return result


def multitone(rate_hz: int, seconds: float, top_hz: float, seed: int = 3, peak: float = 0.7) -> tuple[Int16Array, Multitone]:
    """24 log-spaced tones, 100 Hz .. top_hz, falling like speech, peak at ``peak`` of full scale."""
    rng = np.random.default_rng(seed)
    freqs = np.geomspace(100, top_hz, 24)
    amps = 1.0 / np.sqrt(freqs / 100)
    phases = rng.uniform(0, 2 * np.pi, len(freqs))
    n = round(rate_hz * seconds)
    clean = Multitone(freqs, amps, phases).at(rate_hz, n)
    scale = peak * 32767 / np.abs(clean).max()
    mt = Multitone(freqs, amps * scale, phases)
    return np.rint(clean * scale).astype(np.int16), mt


def blackman_harris(n: int) -> FloatArray:
    """The periodic 4-term Blackman-Harris window (scipy's ``blackmanharris(n, sym=False)``), -92 dB sidelobes."""
    a = (0.35875, 0.48829, 0.14128, 0.01168)
    x = 2 * np.pi * np.arange(n) / n
    result: FloatArray = a[0] - a[1] * np.cos(x) + a[2] * np.cos(2 * x) - a[3] * np.cos(3 * x)
    return result


def spectrum_db(y: npt.ArrayLike, rate_hz: int, seconds: float = 1.0) -> FloatArray:
    """Amplitude spectrum of the last ``seconds`` of y in dBFS; bins are 1/seconds Hz apart."""
    n = round(rate_hz * seconds)
    seg = np.asarray(y, dtype=np.float64)[-n:]
    if len(seg) < n:
        raise ValueError(f"need {n} samples for the spectrum, got {len(seg)}")
    w = blackman_harris(n)
    mag = np.abs(np.fft.rfft(seg * w)) / (w.sum() / 2)
    result: FloatArray = 20 * np.log10(np.maximum(mag, 1e-12) / FULL_SCALE)
    return result


def amplitude_at(y: npt.ArrayLike, rate_hz: int, freq_hz: float, seconds: float = 0.5) -> float:
    """Least-squares amplitude of a tone at freq_hz over the last ``seconds`` of y."""
    seg = np.asarray(y, dtype=np.float64)[-round(rate_hz * seconds) :]
    n = np.arange(len(seg))
    arg = 2 * np.pi * freq_hz * n / rate_hz
    basis = np.stack([np.cos(arg), np.sin(arg)], 1)
    coef, *_ = np.linalg.lstsq(basis, seg, rcond=None)
    return float(np.hypot(*coef))


def estimate_delay_s(
    y: npt.ArrayLike,
    ref: Multitone,
    rate_hz: int,
    *,
    start: int,
    min_s: float = -0.005,
    max_s: float = 0.1,
) -> float:
    """The delay d minimising E(d) = sum over m >= start of (y[m] - ref.at(m/rate - d))^2.

    For a sum of tones E(d) is analytic: with C_k, S_k the cos and sin of each
    tone over the window, ref.at(d) = sum_k a_k (cos(w_k d) C_k + sin(w_k d) S_k)
    = B v(d), so E(d) = |y|^2 - 2 v(d).(B y) + v(d).(B B^T) v(d).  B y and B B^T
    are computed once; E is then evaluated on a grid of 1/8 output sample over
    [min_s, max_s], again on a grid of 1/1024 sample around the best point, and
    the minimum is refined by a parabola through the three best points.
    """
    yy = np.asarray(y, dtype=np.float64)
    c, s = ref.basis(rate_hz, len(yy), start)
    basis = np.concatenate([c, s])  # (2 tones, samples)
    by = basis @ yy[start:]
    gram = basis @ basis.T
    w = 2 * np.pi * ref.freqs_hz

    def err(d: FloatArray) -> FloatArray:  # E(d) - |y|^2 for each d
        v = np.concatenate([np.cos(np.outer(d, w)), np.sin(np.outer(d, w))], axis=1) * np.tile(ref.amps, 2)
        result: FloatArray = ((v @ gram) * v).sum(axis=1) - 2 * (v @ by)
        return result

    step = 1.0 / (8 * rate_hz)
    grid = np.arange(min_s, max_s + step, step)
    best = float(grid[int(np.argmin(err(grid)))])
    fine_step = step / 128
    fine = best + fine_step * np.arange(-128, 129)
    e = err(fine)
    i = int(np.clip(np.argmin(e), 1, len(fine) - 2))
    denom = e[i - 1] - 2 * e[i] + e[i + 1]
    shift = 0.5 * (e[i - 1] - e[i + 1]) / denom if denom > 0 else 0.0
    return float(fine[i] + shift * fine_step)


def snr_db(y: npt.ArrayLike, ideal: npt.ArrayLike) -> float:
    yy = np.asarray(y, dtype=np.float64)
    ii = np.asarray(ideal, dtype=np.float64)
    noise = float(np.sum((yy - ii) ** 2))
    return math.inf if noise == 0 else 10 * math.log10(float(np.sum(ii**2)) / noise)


# --- environment -------------------------------------------------------------


def dist_version(dist: str, module: str | None = None) -> str:
    """Installed version of a distribution, else the module's __version__, else 'n/a'."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        pass
    if module is not None:
        try:
            return str(getattr(__import__(module), "__version__", "n/a"))
        except ImportError:
            pass
    return "n/a"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_build_flags(extension: Path) -> str:
    """The compiler and flags recorded in an extension's DWARF producer string (needs -g), or 'n/a'."""
    try:
        data = extension.read_bytes()
    except OSError:
        return "n/a"
    match = re.search(rb"GNU C[0-9+]* [0-9][^\x00]{0,400}", data) or re.search(rb"clang version [^\x00]{0,400}", data)
    return match.group().decode("ascii", "replace") if match else "n/a"


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def print_header(title: str, fields: Iterable[tuple[str, str]]) -> None:
    items = list(fields)
    width = max(len(k) for k, _ in items)
    print(title)
    for key, value in items:
        print(f"  {key:<{width}}  {value}")
    print()


# --- tables ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Column:
    """A table column: the row key it shows, its title, and a format spec for numbers."""

    key: str
    title: str
    spec: str | None = None  # e.g. ".1f"; None: format_value's automatic choice
    align: str = ">"  # ">" numbers, "<" text


def format_value(value: object, spec: str | None = None) -> str:
    """None and NaN print as '-'; floats get a precision that suits their size."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        a = abs(v)
        text = format(v, spec) if spec is not None else f"{v:.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.3f}"
        return text[1:] if text.startswith("-") and not any(ch in "123456789" for ch in text) else text  # no "-0.000"
    if spec is not None and isinstance(value, int | np.integer):
        return format(int(value), spec)
    return str(value)


def render_table(
    title: str,
    columns: Sequence[Column],
    rows: Sequence[Mapping[str, object]],
    notes: Sequence[str] = (),
) -> str:
    """A plain-text table: title, header, rule, rows (blank rows separate groups), notes."""
    cells = [[c.title for c in columns]]
    for row in rows:
        cells.append([format_value(row.get(c.key), c.spec) if row else "" for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(f"{v:{c.align}{w}}" for v, c, w in zip(r, columns, widths, strict=True)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [title, line(cells[0]), rule]
    out += [line(r) if any(r) else "" for r in cells[1:]]
    out += [f"  {n}" for n in notes]
    return "\n".join(out) + "\n"


def normalize_rows(rows: Sequence[object], names: Sequence[str] = ()) -> list[dict[str, object]]:
    """Rows of any common shape as dicts: mappings, dataclasses, named tuples, or
    plain sequences, whose keys are ``names``, else the first row if it is all
    strings, else col1, col2, ..."""
    keys = list(names)
    seq_rows = list(rows)
    if seq_rows and isinstance(seq_rows[0], list | tuple) and not hasattr(seq_rows[0], "_asdict"):
        first = seq_rows[0]
        if not keys and all(isinstance(v, str) for v in first) and len(seq_rows) > 1:
            keys = [str(v) for v in first]
            seq_rows = seq_rows[1:]
    dicts: list[dict[str, object]] = []
    for row in seq_rows:
        if isinstance(row, Mapping):
            dicts.append({str(k): v for k, v in row.items()})
        elif dataclasses.is_dataclass(row) and not isinstance(row, type):
            dicts.append(dataclasses.asdict(row))
        elif hasattr(row, "_asdict"):
            dicts.append(dict(row._asdict()))
        elif isinstance(row, list | tuple):
            dicts.append(dict(zip(keys or [f"col{i + 1}" for i in range(len(row))], row, strict=False)))
        else:
            dicts.append({"value": row})
    return dicts


def render_rows(title: str, rows: Sequence[Mapping[str, object]], notes: Sequence[str] = ()) -> str:
    """Render dict rows (see normalize_rows) with one column per key, in first-seen order."""
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    columns = []
    for k in keys:
        numeric = any(isinstance(r.get(k), int | float | np.number) and not isinstance(r.get(k), bool) for r in rows)
        columns.append(Column(k, k, None, ">" if numeric else "<"))
    return render_table(title, columns, rows, notes)


def write_json(path: Path, payload: Mapping[str, object]) -> None:
    def default(o: object) -> object:
        if isinstance(o, np.generic):
            return o.item()
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            return dataclasses.asdict(o)
        return str(o)

    def clean(o: object) -> object:  # JSON has no NaN or inf: NaN (nothing measured) is null, inf the string "inf"
        if isinstance(o, float | np.floating) and not math.isfinite(o):
            return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
        if isinstance(o, Mapping):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, list | tuple):
            return [clean(v) for v in o]
        return o

    text = json.dumps(clean(payload), indent=2, default=default, ensure_ascii=False) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:  # (checked before the run; something changed since: one line, not a traceback)
        raise SystemExit(f"bench: could not write {path}: {exc.strerror or exc}") from None


def interrupt_on_sigterm() -> None:
    """SIGTERM (a timeout, a CI cancel) as Ctrl-C, which Trio delivers at a safe point: a bench's finally blocks
    stop its servers, nothing is orphaned.  SIGINT's handler first: a shell starts a background job (cmd &)
    with SIGINT ignored, and the SIGTERM would then do nothing."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))


def die_with_parent(signum: int = 15) -> None:
    """In a child (``subprocess.Popen(preexec_fn=...)``, or after ``fork``): ``signum`` (SIGTERM) comes when
    the bench dies, however it dies.

    (PR_SET_PDEATHSIG, Linux: a bench killed with SIGKILL, or by ab.py giving up on it, leaves no server
    running, pinned to a core and costing the next run.)  Elsewhere it does nothing.
    """
    import ctypes
    import os

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signum)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # (the parent died before that)
        os._exit(0)


def check_log_folder(folder: Path) -> str | None:
    """Why the servers' logs cannot go to ``folder`` (bench/out/, made if need be), or None: checked before a run."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"the servers' logs go to {folder}, which cannot be made: {exc.strerror or exc}"
    probe = folder / f".write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        return f"the servers' logs go to {folder}, which cannot be written: {exc.strerror or exc}"
    return None


def check_output_path(path: Path | None, option: str) -> str | None:
    """Why ``path`` cannot be written (a directory, a folder that does not exist), or None: checked before a run."""
    if path is None:
        return None
    if path.is_dir():
        return f"{option} {path} is a directory; give a file name"
    if not path.parent.is_dir():
        return f"{option} {path}: the folder {path.parent} does not exist"
    existed = path.exists()
    try:  # (really: permissions, a read-only or special file system; a file there already is left as it is)
        with path.open("a"):
            pass
    except OSError as exc:
        return f"{option} {path} cannot be written: {exc.strerror or exc}"
    if not existed:
        path.unlink(missing_ok=True)
    return None
