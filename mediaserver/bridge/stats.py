"""Per-call counters and latency histograms (native: :mod:`mediaserver._native._latency`), cheap enough for every frame."""

from __future__ import annotations

from dataclasses import dataclass, field

from mediaserver._native._latency import LatencyHistogram
from mediaserver.records.model import TranscriptLog

__all__ = ["CallStats", "LatencyHistogram"]


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
