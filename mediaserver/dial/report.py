"""The caller's experience in figures: pure functions from a call's event log.

:func:`call_figures` replays the log through :class:`~mediaserver.dial.timeline.Playback`
to learn what the caller *heard* and when, then measures (all in
milliseconds, times relative to the ``start`` message):

* ``first_audio_ms`` -- when the first agent audio started playing;
* per turn, ``latency_ms`` -- from the end of an utterance (the end of its
  last speech frame) to the first agent audio that *starts* playing after
  it and before the caller's next utterance (None: no answer);
* per barge-in (an utterance that starts while agent audio is playing),
  ``reaction_ms`` -- from the start of the utterance to the moment the agent
  audio stopped playing (a ``clear``, or the audio ran out), and whether a
  ``clear`` did it;
* underruns -- the caller heard a gap inside the agent's speech: the
  playback buffer ran dry and more agent audio followed within
  ``gap_limit_ms`` with no ``clear`` and no caller speech in between
  (count and total ms);
* marks received from the server, echoed as played, echoed by a clear;
* the caller's own delay -- frames that left :data:`CALLER_LATE_MS` or more
  after their place in the real-time schedule, and the worst delay. A
  simulated caller that falls behind (an overloaded machine) shifts every
  figure with it: they measure this machine as well as the server.

A frame sent at ``t`` is taken to carry the caller's audio from ``t`` to
``t + 20 ms`` (the simulated phone has no capture delay).

:func:`summarize` pools many calls into p50/p95/p99 (nearest rank), and
:func:`format_call`/:func:`format_summary` write the text report.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mediaserver.dial.timeline import (
    BYTES_PER_S,
    ClearReceived,
    Event,
    FrameSent,
    MarkEchoed,
    MarkReceived,
    MediaReceived,
    Playback,
    Played,
    ProtocolWarning,
    StreamEnded,
    StreamStarted,
)

__all__ = [
    "CALLER_LATE_MS",
    "DEFAULT_GAP_LIMIT_MS",
    "BargeIn",
    "CallFigures",
    "Stats",
    "Summary",
    "Turn",
    "call_figures",
    "format_call",
    "format_summary",
    "heard",
    "recording",
    "percentile",
    "summarize",
    "utterances",
]

DEFAULT_GAP_LIMIT_MS = 2000.0  # a longer silence between agent audio is a pause, not an underrun
# A caller frame this late stalled the figures noticeably (this VM's timer alone wakes up to ~30 ms late at times).
CALLER_LATE_MS = 50.0
_EPS_S = 1e-9  # float slack when comparing times computed by different sums


def _ms(seconds: float) -> float:
    """Seconds to milliseconds, rounded to the microsecond (hides float noise)."""
    return round(seconds * 1000, 3)


@dataclass(frozen=True, slots=True)
class Turn:
    speech_start_ms: float
    speech_end_ms: float
    latency_ms: float | None  # None: the agent did not answer before the caller spoke again


@dataclass(frozen=True, slots=True)
class BargeIn:
    speech_start_ms: float
    reaction_ms: float
    cleared: bool  # the server sent ``clear`` (else its audio just ran out)


@dataclass(frozen=True, slots=True)
class CallFigures:
    duration_ms: float
    first_audio_ms: float | None
    turns: tuple[Turn, ...]
    barge_ins: tuple[BargeIn, ...]
    underruns: int
    underrun_ms: float
    speech_sent_ms: float
    agent_received_ms: float
    agent_played_ms: float
    clears: int
    marks_received: int
    marks_played: int
    marks_cleared: int
    caller_late_frames: int  # frames that left CALLER_LATE_MS or more behind the caller's schedule
    caller_late_max_ms: float
    warnings: tuple[str, ...]
    ended: str
    error: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def utterances(events: Iterable[Event]) -> list[tuple[float, float]]:
    """(start_s, end_s) of each run of consecutive speech frames."""
    spans: list[tuple[float, float]] = []
    current: tuple[float, float] | None = None
    for event in events:
        if not isinstance(event, FrameSent):
            continue
        if event.speech:
            end = event.at_s + len(event.payload) / BYTES_PER_S
            current = (event.at_s, end) if current is None else (current[0], end)
        elif current is not None:
            spans.append(current)
            current = None
    if current is not None:
        spans.append(current)
    return spans


def heard(events: Iterable[Event]) -> list[Played]:
    """The agent audio the caller heard, placed at the time it played (clears and hang-up applied)."""
    playback = Playback()
    for event in events:
        if isinstance(event, MediaReceived):
            playback.media(event.payload, event.at_s)
        elif isinstance(event, ClearReceived):
            playback.clear(event.at_s)
        elif isinstance(event, StreamEnded):
            playback.cut(event.at_s)
            break
    return playback.segments


def _runs(segments: Sequence[Played]) -> list[tuple[float, float]]:
    """Merge back-to-back segments into stretches of uninterrupted audio."""
    runs: list[tuple[float, float]] = []
    for segment in segments:
        if runs and segment.start_s <= runs[-1][1] + _EPS_S:
            runs[-1] = (runs[-1][0], max(runs[-1][1], segment.end_s))
        else:
            runs.append((segment.start_s, segment.end_s))
    return runs


def call_figures(events: Sequence[Event], *, gap_limit_ms: float = DEFAULT_GAP_LIMIT_MS) -> CallFigures:
    """Every figure of the per-call report, from the call's event log (see the module docstring)."""
    starts = [e.at_s for e in events if isinstance(e, StreamStarted)]
    t0 = starts[0] if starts else (events[0].at_s if events else 0.0)
    ends = [e for e in events if isinstance(e, StreamEnded)]
    end_s = ends[0].at_s if ends else (events[-1].at_s if events else t0)
    runs = _runs(heard(events))
    spans = utterances(events)
    clear_times = [e.at_s for e in events if isinstance(e, ClearReceived)]

    turns = []
    for index, (start, end) in enumerate(spans):
        next_start = spans[index + 1][0] if index + 1 < len(spans) else math.inf
        answer = next((r for r in runs if end - _EPS_S <= r[0] < next_start), None)
        turns.append(Turn(_ms(start - t0), _ms(end - t0), None if answer is None else _ms(answer[0] - end)))

    barge_ins = []
    for start, _ in spans:
        run = next((r for r in runs if r[0] < start < r[1]), None)
        if run is not None:
            # A clear cuts playback at a whole sample, up to one sample before the clear itself.
            cleared = any(start - _EPS_S <= c <= run[1] + 1 / BYTES_PER_S + _EPS_S for c in clear_times)
            barge_ins.append(BargeIn(_ms(start - t0), _ms(run[1] - start), cleared))

    gaps = []
    for (_, a_end), (b_start, _) in zip(runs, runs[1:]):
        gap = b_start - a_end
        if gap * 1000 > gap_limit_ms:
            continue
        if any(a_end - _EPS_S <= c <= b_start + 1 / BYTES_PER_S + _EPS_S for c in clear_times):
            continue
        if any(s < b_start and e > a_end for s, e in spans):  # the caller took a turn
            continue
        gaps.append(gap)

    echoes = [e for e in events if isinstance(e, MarkEchoed)]
    speech_bytes = sum(len(e.payload) for e in events if isinstance(e, FrameSent) and e.speech)
    lateness = [e.late_s for e in events if isinstance(e, FrameSent)]
    return CallFigures(
        duration_ms=_ms(end_s - t0),
        first_audio_ms=_ms(runs[0][0] - t0) if runs else None,
        turns=tuple(turns),
        barge_ins=tuple(barge_ins),
        underruns=len(gaps),
        underrun_ms=_ms(sum(gaps)),
        speech_sent_ms=_ms(speech_bytes / BYTES_PER_S),
        agent_received_ms=_ms(sum(len(e.payload) for e in events if isinstance(e, MediaReceived)) / BYTES_PER_S),
        agent_played_ms=_ms(sum(r[1] - r[0] for r in runs)),
        clears=len(clear_times),
        marks_received=sum(1 for e in events if isinstance(e, MarkReceived)),
        marks_played=sum(1 for e in echoes if not e.cleared),
        marks_cleared=sum(1 for e in echoes if e.cleared),
        caller_late_frames=sum(1 for late in lateness if late * 1000 >= CALLER_LATE_MS - 1e-6),
        caller_late_max_ms=_ms(max(lateness, default=0.0)),
        warnings=tuple(e.text for e in events if isinstance(e, ProtocolWarning)),
        ended=ends[0].reason if ends else "not ended",
        error=ends[0].error if ends else False,
    )


# ------------------------------------------------------------------ many calls


@dataclass(frozen=True, slots=True)
class Stats:
    n: int
    p50: float
    p95: float
    p99: float
    max: float


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (``p`` in 0..100) of a non-empty sequence."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _stats(values: Sequence[float]) -> Stats | None:
    if not values:
        return None
    return Stats(len(values), percentile(values, 50), percentile(values, 95), percentile(values, 99), max(values))


@dataclass(frozen=True, slots=True)
class Summary:
    calls: int
    failed: int
    first_audio_ms: Stats | None
    turn_latency_ms: Stats | None
    unanswered_turns: int
    barge_in_reaction_ms: Stats | None
    underruns_per_call: Stats | None
    underrun_ms_per_call: Stats | None
    calls_caller_late: int  # calls with a caller frame CALLER_LATE_MS or more behind schedule

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(figures: Sequence[CallFigures], failed: int = 0) -> Summary:
    """Pool the calls that connected (``failed`` counts those that did not)."""
    latencies = [t.latency_ms for f in figures for t in f.turns if t.latency_ms is not None]
    return Summary(
        calls=len(figures) + failed,
        failed=failed + sum(1 for f in figures if f.error),
        first_audio_ms=_stats([f.first_audio_ms for f in figures if f.first_audio_ms is not None]),
        turn_latency_ms=_stats(latencies),
        unanswered_turns=sum(1 for f in figures for t in f.turns if t.latency_ms is None),
        barge_in_reaction_ms=_stats([b.reaction_ms for f in figures for b in f.barge_ins]),
        underruns_per_call=_stats([float(f.underruns) for f in figures]),
        underrun_ms_per_call=_stats([f.underrun_ms for f in figures]),
        calls_caller_late=sum(1 for f in figures if f.caller_late_frames),
    )


# ------------------------------------------------------------------ text


def _fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f} ms"


def format_call(call_sid: str, f: CallFigures) -> str:
    """The per-call report, a few aligned lines."""
    lines = [
        f"call {call_sid}: {f.duration_ms / 1000:.1f} s, ended: {f.ended}",
        f"  first agent audio     {_fmt(f.first_audio_ms)}",
    ]
    for n, turn in enumerate(f.turns, 1):
        answer = "no answer" if turn.latency_ms is None else f"answered after {_fmt(turn.latency_ms)}"
        lines.append(f"  turn {n:<2} speech {_fmt(turn.speech_start_ms)}-{_fmt(turn.speech_end_ms)}, {answer}")
    for n, b in enumerate(f.barge_ins, 1):
        how = "clear received" if b.cleared else "audio ran out, no clear"
        lines.append(f"  barge-in {n}: agent stopped {_fmt(b.reaction_ms)} after the caller spoke ({how})")
    lines += [
        f"  agent audio           {_fmt(f.agent_received_ms)} received, {_fmt(f.agent_played_ms)} played",
        f"  underruns (gaps)      {f.underruns} ({_fmt(f.underrun_ms)})",
        f"  marks                 {f.marks_received} received, {f.marks_played} echoed as played, "
        f"{f.marks_cleared} echoed by {f.clears} clear(s)"
        + (f", {pending} still pending at hang-up" if (pending := f.marks_received - f.marks_played - f.marks_cleared) else ""),
    ]
    if f.caller_late_frames:
        lines.append(
            f"  caller behind         {f.caller_late_frames} frame(s) sent {CALLER_LATE_MS:.0f}+ ms late, up to "
            f"{_fmt(f.caller_late_max_ms)}: this machine stalled or was overloaded, and the figures include its delays"
        )
    lines += [f"  warning: {w}" for w in f.warnings]
    return "\n".join(lines)


def format_summary(s: Summary) -> str:
    """p50/p95/p99 of the pooled figures of many calls."""
    lines = [f"{s.calls} calls, {s.failed} failed", f"{'':24}{'n':>6}{'p50':>10}{'p95':>10}{'p99':>10}{'max':>10}"]
    rows: list[tuple[str, Stats | None, str]] = [
        ("first agent audio", s.first_audio_ms, "ms"),
        ("turn latency", s.turn_latency_ms, "ms"),
        ("barge-in reaction", s.barge_in_reaction_ms, "ms"),
        ("underruns per call", s.underruns_per_call, ""),
        ("underrun ms per call", s.underrun_ms_per_call, "ms"),
    ]
    for label, stats, _unit in rows:
        if stats is None:
            lines.append(f"{label:24}{0:>6}{'-':>10}{'-':>10}{'-':>10}{'-':>10}")
        else:
            values = "".join(f"{v:>10.0f}" for v in (stats.p50, stats.p95, stats.p99, stats.max))
            lines.append(f"{label:24}{stats.n:>6}{values}")
    if s.unanswered_turns:
        lines.append(f"{s.unanswered_turns} turn(s) got no answer")
    if s.calls_caller_late:
        lines.append(
            f"{s.calls_caller_late} call(s) fell behind the caller's schedule by {CALLER_LATE_MS:.0f}+ ms: this machine "
            "stalled or was overloaded, and the figures include its delays (if most calls did: place fewer --calls, or "
            "dial from another machine)"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ recording


def recording(events: Sequence[Event]) -> tuple[bytes, bytes]:
    """The call on one timeline from the ``start`` message on, as two µ-law channels.

    The caller's channel is every frame sent, back to back: the audio a
    phone sends is continuous, and the frames leave on a real-time schedule
    starting at ``start``, so frame *n* covers ``20n`` to ``20n + 20`` ms.
    The agent's channel is what the caller heard, placed at the time it
    played (clears and hang-up applied).  Gaps are µ-law silence.
    """
    starts = [e.at_s for e in events if isinstance(e, StreamStarted)]
    t0 = starts[0] if starts else 0.0
    caller = b"".join(e.payload for e in events if isinstance(e, FrameSent))
    agent = [(p.start_s, p.payload) for p in heard(events)]
    return caller, _place(agent, t0)


def _place(pieces: Sequence[tuple[float, bytes]], t0: float) -> bytes:
    track = bytearray()
    for at_s, payload in pieces:
        offset = max(0, round((at_s - t0) * BYTES_PER_S))
        if len(track) < offset + len(payload):
            track.extend(b"\xff" * (offset + len(payload) - len(track)))
        track[offset : offset + len(payload)] = payload
    return bytes(track)
