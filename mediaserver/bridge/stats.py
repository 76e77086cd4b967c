"""Per-call counters and latency histograms, cheap enough for every frame."""

from __future__ import annotations

from dataclasses import dataclass, field

from mediaserver.records.model import TranscriptLog

__all__ = ["CallStats", "LatencyHistogram"]


class LatencyHistogram:
    """Latencies in 10 µs buckets up to 20 ms (plus an overflow bucket): O(1) per sample."""

    BUCKET_S = 10e-6
    BUCKETS = 2000

    __slots__ = ("_counts", "count", "max_s", "total_s")

    def __init__(self) -> None:
        self._counts = [0] * (self.BUCKETS + 1)
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        if seconds < 0.0:
            seconds = 0.0
        bucket = int(seconds * 100_000.0)  # / BUCKET_S
        self._counts[bucket if bucket < 2000 else 2000] += 1  # (BUCKETS: the overflow bucket)
        self.count += 1
        self.total_s += seconds
        if seconds > self.max_s:
            self.max_s = seconds

    def quantile(self, q: float) -> float:
        """Upper edge of the bucket holding the q-quantile (seconds); 0 when empty."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self._counts):
            seen += n
            if seen >= rank:
                return min((i + 1) * self.BUCKET_S, self.max_s)
        return self.max_s  # pragma: no cover - rank <= count always ends the loop

    def summary_ms(self) -> str:
        if not self.count:
            return "n/a"
        return f"p50 {self.quantile(0.5) * 1e3:.2f} p99 {self.quantile(0.99) * 1e3:.2f} max {self.max_s * 1e3:.2f} ms"


@dataclass
class CallStats:
    call_sid: str
    provider: str
    started_s: float
    frames_in: int = 0
    frames_to_model: int = 0
    frames_out: int = 0
    gaps_filled: int = 0
    late_or_duplicate: int = 0
    barge_ins: int = 0
    truncations: int = 0
    uplink: LatencyHistogram = field(default_factory=LatencyHistogram)
    downlink: LatencyHistogram = field(default_factory=LatencyHistogram)
    # For the call record: tool names in call order (the tool runner appends),
    # and both sides' transcripts, cut at what was heard on barge-in.
    tool_calls: list[str] = field(default_factory=list)
    transcript: TranscriptLog = field(default_factory=TranscriptLog)
