"""The server's counters in Prometheus' text format (``GET /metrics``), sans I/O.

:class:`CallTotals` is what the calls that have ended add up to; the call
manager folds each call into it when the call ends
(:meth:`CallTotals.add_call`).  A scrape takes a copy and adds the calls
still running (``CallManager.metrics``), so every counter moves as the
calls go on, not only when they end, and never goes back: when a call ends,
its counts move from the live part to the totals unchanged.
:func:`render` writes the exposition text.

Every name starts with ``mediaserver_``; no label carries a call SID, a
phone number or anything else a caller could choose, so the series stay few
whatever the traffic.  The list is in the README (Monitoring).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import os
import resource
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from mediaserver import __version__
from mediaserver.bridge.stats import REPLY_EDGES_S, CallStats, LatencyHistogram, SecondsHistogram
from mediaserver.codec import JitterStats

__all__ = [
    "CONNECT_EDGES_S",
    "END_KINDS",
    "FAILED_KINDS",
    "LATENCY_EDGES_S",
    "REFUSALS",
    "CallTotals",
    "Gauges",
    "ProcessStats",
    "RecordsStats",
    "end_kind",
    "process_stats",
    "render",
]

# Histogram bounds of the bridge-added latency (seconds): multiples of the
# native histogram's 10 µs buckets, so each bound counts what lies below it
# (a sample exactly on a bound may count in the next one up).
LATENCY_EDGES_S = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02)

# Histogram bounds of the time to open a model session (connect, TLS, WebSocket, the session's handshake), seconds.
CONNECT_EDGES_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# How calls end (``CallBridge.end_reason`` and the call manager's), by prefix: the ``end`` label.
_END_KINDS = (
    ("twilio sent stop", "twilio_stop"),
    ("twilio hung up", "twilio_closed"),
    ("agent hung up", "agent_hangup"),
    ("transferred to", "transferred"),
    ("idle:", "idle"),
    ("maximum call length", "max_length"),
    ("model closed", "model_closed"),  # the model ended the session itself (a normal close)
    ("provider", "provider"),  # "provider ended: ..." and "provider error: ..."
    ("protocol error", "protocol_error"),
    ("failed", "failed"),
    ("running", "cancelled"),  # no reason set: Quart saw the socket go (or the server cancelled it)
    ("cancelled", "cancelled"),  # "cancelled: the server shut down before the call ended"
)
END_KINDS = tuple(dict.fromkeys(kind for _, kind in _END_KINDS)) + ("other",)  # (each once: two prefixes share one)
# The ends that mean something broke: in the log (a warning), the stream's close code, records and metrics alike.
# (An idle timeout: the model stopped reading, or Twilio, which streams even silence, stopped sending.)
FAILED_KINDS = frozenset({"provider", "protocol_error", "failed", "idle"})

# Why a Media Stream was not bridged (``CallManager.refused`` keys): the ``reason`` label.
REFUSALS = (
    "no_start",
    "wrong_account",
    "no_token",
    "no_model_session",
    "cannot_bridge",
    "too_many_pending",
    "shutting_down",
    "replayed",
    "at_capacity",
)


def end_kind(reason: str) -> str:
    """The ``end`` label for a call's end reason."""
    for prefix, kind in _END_KINDS:
        if reason.startswith(prefix):
            return kind
    return "other"


@dataclass
class CallTotals:
    """Counts over calls, and the bridge-added latency of every frame in them."""

    ended: dict[str, int] = field(default_factory=dict)  # end kind -> calls
    call_seconds: float = 0.0
    frames_in: int = 0  # media frames from Twilio
    frames_to_model: int = 0
    chunks_out: int = 0  # audio chunks to Twilio (each followed by a mark)
    gaps_filled: int = 0  # missing caller frames the jitter buffer concealed
    late_frames: int = 0  # caller frames dropped as late or duplicate
    barge_ins: int = 0
    truncations: int = 0
    uplink: LatencyHistogram = field(default_factory=LatencyHistogram)
    downlink: LatencyHistogram = field(default_factory=LatencyHistogram)
    reply: SecondsHistogram = field(default_factory=lambda: SecondsHistogram(REPLY_EDGES_S))

    def add_call(self, stats: CallStats, jitter: JitterStats, seconds: float) -> None:
        """Add one call's counts: one that ended, or a live one in a scrape's copy."""
        self.call_seconds += max(seconds, 0.0)
        self.frames_in += stats.frames_in
        self.frames_to_model += stats.frames_to_model
        self.chunks_out += stats.frames_out
        self.gaps_filled += jitter.concealed
        self.late_frames += jitter.late + jitter.duplicates
        self.barge_ins += stats.barge_ins
        self.truncations += stats.truncations
        self.uplink.merge(stats.uplink)
        self.downlink.merge(stats.downlink)
        self.reply.merge(stats.reply)

    def end(self, reason: str) -> None:
        """Count one call that ended, by its end reason (``"running"``: it was cancelled)."""
        kind = end_kind(reason)
        self.ended[kind] = self.ended.get(kind, 0) + 1

    def copy(self) -> CallTotals:
        twin = dataclasses.replace(
            self, ended=dict(self.ended), uplink=LatencyHistogram(), downlink=LatencyHistogram(),
            reply=SecondsHistogram(REPLY_EDGES_S),
        )
        twin.uplink.merge(self.uplink)
        twin.downlink.merge(self.downlink)
        twin.reply.merge(self.reply)
        return twin


@dataclass(frozen=True)
class ProcessStats:
    """The server process, under the names Prometheus' own client libraries use (``process_*``, ``python_gc_*``)."""

    cpu_seconds: float  # user + system
    start_time_seconds: float  # Unix time
    resident_bytes: int | None = None  # None where the OS does not say (only Linux's /proc is read)
    open_fds: int | None = None
    max_fds: int | None = None
    gc: tuple[tuple[int, int, int], ...] = ()  # per generation: collections, collected, uncollectable


@functools.cache
def _boot_time_s() -> int:
    """When the machine booted (Unix time, /proc/stat's btime): read once, it does not change."""
    with open("/proc/stat", "rb") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(b"btime "))


def process_stats(fallback_start_s: float) -> ProcessStats:
    """This process now (``fallback_start_s``: the start time to give where /proc cannot say)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start_s, resident, fds = fallback_start_s, None, None
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()  # (after the command name, which may hold spaces)
        start_s = _boot_time_s() + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # stat field 22: starttime, in ticks after boot
        resident = int(fields[21]) * resource.getpagesize()  # stat field 24: rss, in pages
        fds = len(os.listdir("/proc/self/fd"))
    except (OSError, ValueError, IndexError, StopIteration):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return ProcessStats(
        cpu_seconds=usage.ru_utime + usage.ru_stime,
        start_time_seconds=start_s,
        resident_bytes=resident,
        open_fds=fds,
        max_fds=None if soft == resource.RLIM_INFINITY else soft,
        gc=tuple((g["collections"], g["collected"], g["uncollectable"]) for g in gc.get_stats()),
    )


@dataclass(frozen=True)
class Gauges:
    """The values of this moment: calls, sessions, the reactor, the process."""

    active_calls: int
    pending_sessions: int  # opened at the webhook, waiting for their media stream
    model_sessions: int  # model connections open now, whatever their state
    reactor: Mapping[str, int]  # reactor_stats(): sockets, wakeups, handler_calls
    provider: str
    instance: str | None
    process: ProcessStats | None = None
    model_connect: SecondsHistogram | None = None  # time to open each model session so far
    model_connect_failures: int = 0
    records: RecordsStats | None = None  # None: call records are off


@dataclass(frozen=True)
class RecordsStats:
    """The call-records writer (mediaserver.records.Recorder): how its writes went."""

    healthy: bool  # the last write went through, and the database answers
    written: int
    failed: int  # refused by the database
    dropped: int  # not queued: the queue was full
    queued: int


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_: str, samples: Iterable[tuple[str, float]]) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{labels} {_number(value)}")

    def histogram(
        self, name: str, help_: str, series: Iterable[tuple[str, Sequence[float], Sequence[int], int, float]]
    ) -> None:
        """Each series: (label, bounds, cumulative counts at them, count, sum); ``label`` "" for none."""
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} histogram")
        for label, edges, counts, count, total in series:
            sep = "," if label else ""
            for edge, at_or_below in zip(edges, counts, strict=True):
                self.lines.append(f'{name}_bucket{{{label}{sep}le="{edge!r}"}} {at_or_below}')
            self.lines.append(f'{name}_bucket{{{label}{sep}le="+Inf"}} {count}')
            braces = f"{{{label}}}" if label else ""
            self.lines.append(f"{name}_sum{braces} {total!r}")
            self.lines.append(f"{name}_count{braces} {count}")


def _latency(label: str, hist: LatencyHistogram) -> tuple[str, Sequence[float], Sequence[int], int, float]:
    return label, LATENCY_EDGES_S, hist.counts_below(LATENCY_EDGES_S), hist.count, hist.total_s


def _seconds(hist: SecondsHistogram) -> tuple[str, Sequence[float], Sequence[int], int, float]:
    return "", hist.edges, hist.cumulative(), hist.count, hist.total_s


def render(totals: CallTotals, refused: Mapping[str, int], gauges: Gauges) -> str:
    """Prometheus text exposition (format 0.0.4) of ``totals`` (calls ended and running), refusals and gauges."""
    w = _Writer()
    instance = _escape(gauges.instance or "")
    w.metric(
        "mediaserver_info",
        "gauge",
        "The server: version, provider, and instance URL (MEDIASERVER_INSTANCE_URL, empty if unset).",
        [(f'{{version="{__version__}",provider="{_escape(gauges.provider)}",instance_url="{instance}"}}', 1)],
    )
    w.metric("mediaserver_calls_active", "gauge", "Calls being bridged now.", [("", gauges.active_calls)])
    w.metric(
        "mediaserver_sessions_pending",
        "gauge",
        "Model sessions opened at the voice webhook, waiting for their media stream.",
        [("", gauges.pending_sessions)],
    )
    w.metric(
        "mediaserver_model_sessions_open",
        "gauge",
        "Model connections open now, closing ones included (each one may be billed).",
        [("", gauges.model_sessions)],
    )
    w.metric(
        "mediaserver_calls_ended_total",
        "counter",
        "Calls bridged and ended, by how they ended.",
        [(f'{{end="{kind}"}}', totals.ended.get(kind, 0)) for kind in END_KINDS],
    )
    w.metric(
        "mediaserver_streams_refused_total",
        "counter",
        "Media Streams not bridged, by why.",
        [(f'{{reason="{reason}"}}', refused.get(reason, 0)) for reason in REFUSALS],
    )
    w.metric(
        "mediaserver_call_seconds_total",
        "counter",
        "Time calls have been bridged, ended and running, in seconds.",
        [("", totals.call_seconds)],
    )
    for name, value, help_ in (
        ("mediaserver_frames_received_total", totals.frames_in, "Caller audio frames received from Twilio."),
        ("mediaserver_frames_to_model_total", totals.frames_to_model, "Caller audio frames sent to the model."),
        ("mediaserver_chunks_sent_total", totals.chunks_out, "Agent audio chunks sent to Twilio, each with a mark."),
        ("mediaserver_gaps_filled_total", totals.gaps_filled, "Missing caller frames concealed by the jitter buffer."),
        ("mediaserver_late_frames_total", totals.late_frames, "Caller frames dropped as late or duplicate."),
        ("mediaserver_barge_ins_total", totals.barge_ins, "Times the caller interrupted the agent (Twilio clear)."),
        ("mediaserver_truncations_total", totals.truncations, "Model replies cut by a barge-in (the model is told what was heard where its API allows)."),
    ):
        w.metric(name, "counter", help_, [("", value)])
    w.histogram(
        "mediaserver_bridge_latency_seconds",
        "Latency the bridge adds: a caller frame in until the model has it (up), a model delta in until Twilio has it (down).",
        [_latency('direction="up"', totals.uplink), _latency('direction="down"', totals.downlink)],
    )
    w.histogram(
        "mediaserver_reply_latency_seconds",
        "From the model's 'the caller stopped speaking' to the first audio of its reply on Twilio's socket.",
        [_seconds(totals.reply)],
    )
    if gauges.model_connect is not None:
        w.histogram(
            "mediaserver_model_connect_seconds",
            "Time to open a model session: connect, TLS, WebSocket and the session's own handshake.",
            [_seconds(gauges.model_connect)],
        )
    w.metric(
        "mediaserver_model_connect_failures_total",
        "counter",
        "Model sessions that could not be opened.",
        [("", gauges.model_connect_failures)],
    )
    records = gauges.records
    w.metric(
        "mediaserver_records_up",
        "gauge",
        "1 while call records are written; 0 when they are off (no database at start) or failing.",
        [("", 1 if records is not None and records.healthy else 0)],
    )
    w.metric(
        "mediaserver_records_writes_total",
        "counter",
        "Call-record writes, by result: written, failed (the database refused), dropped (the queue was full).",
        [(f'{{result="{result}"}}', getattr(records, result) if records is not None else 0)
         for result in ("written", "failed", "dropped")],
    )
    w.metric(
        "mediaserver_records_queued", "gauge", "Call-record writes waiting for the database.",
        [("", records.queued if records is not None else 0)],
    )
    reactor = gauges.reactor
    w.metric(
        "mediaserver_reactor_sockets", "gauge", "Call sockets on the reactor now.", [("", reactor.get("sockets", 0))]
    )
    w.metric(
        "mediaserver_reactor_wakeups_total",
        "counter",
        "Reactor wake-ups (each serves every socket ready then).",
        [("", reactor.get("wakeups", 0))],
    )
    w.metric(
        "mediaserver_reactor_handler_calls_total",
        "counter",
        "Ready sockets the reactor served.",
        [("", reactor.get("handler_calls", 0))],
    )
    if gauges.process is not None:
        _process(w, gauges.process)
    return "\n".join(w.lines) + "\n"


def _process(w: _Writer, p: ProcessStats) -> None:
    w.metric("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", [("", p.cpu_seconds)])
    w.metric(
        "process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.",
        [("", p.start_time_seconds)],
    )
    for name, value, help_ in (
        ("process_resident_memory_bytes", p.resident_bytes, "Resident memory size in bytes."),
        ("process_open_fds", p.open_fds, "Number of open file descriptors."),
        ("process_max_fds", p.max_fds, "Maximum number of open file descriptors."),
    ):
        if value is not None:
            w.metric(name, "gauge", help_, [("", value)])
    for index, (name, help_) in enumerate((
        ("python_gc_collections_total", "Number of times this generation was collected"),
        ("python_gc_objects_collected_total", "Objects collected during gc"),
        ("python_gc_objects_uncollectable_total", "Uncollectable objects found during GC"),
    )):
        w.metric(name, "counter", help_, [(f'{{generation="{g}"}}', stats[index]) for g, stats in enumerate(p.gc)])
