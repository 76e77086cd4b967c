"""Per-call counters and latency histograms (native: :mod:`mediaserver._native._latency`), cheap enough for every frame."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field

from mediaserver._native._latency import LatencyHistogram
from mediaserver.records.model import TranscriptLog

__all__ = ["REPLY_EDGES_S", "CallStats", "LatencyHistogram", "SecondsHistogram"]

# Bounds of the reply latency (seconds): the model's "caller stopped speaking" to the reply's first audio sent.
REPLY_EDGES_S = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class SecondsHistogram:
    """Counts of durations at or below each of ``edges`` (a Prometheus histogram's buckets), their sum and count."""

    def __init__(self, edges: tuple[float, ...]) -> None:
        if list(edges) != sorted(set(edges)):
            raise ValueError("histogram edges must be ascending and distinct")
        self.edges = edges
        self.buckets = [0] * len(edges)  # not cumulative: bucket i holds edges[i-1] < s <= edges[i]
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.count += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)
        at = bisect.bisect_left(self.edges, seconds)
        if at < len(self.buckets):
            self.buckets[at] += 1

    def merge(self, other: SecondsHistogram) -> None:
        """Add ``other``'s samples (same edges)."""
        if other.edges != self.edges:
            raise ValueError("only histograms with the same edges merge")
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.count += other.count
        self.total_s += other.total_s
        self.max_s = max(self.max_s, other.max_s)

    def cumulative(self) -> list[int]:
        """Samples at or below each edge."""
        return list(itertools.accumulate(self.buckets))


@dataclass
class CallStats:
    call_sid: str
    provider: str
    started_s: float
    frames_in: int = 0
    frames_to_model: int = 0
    frames_out: int = 0
    barge_ins: int = 0
    truncations: int = 0
    uplink: LatencyHistogram = field(default_factory=LatencyHistogram)
    downlink: LatencyHistogram = field(default_factory=LatencyHistogram)
    # From the provider's SpeechStopped to the first chunk of the reply on Twilio's socket.
    reply: SecondsHistogram = field(default_factory=lambda: SecondsHistogram(REPLY_EDGES_S))
    # For the call record: tool names in call order (the tool runner appends),
    # and both sides' transcripts, cut at what was heard on barge-in.
    tool_calls: list[str] = field(default_factory=list)
    transcript: TranscriptLog = field(default_factory=TranscriptLog)
