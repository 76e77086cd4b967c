"""What happened on a simulated call, as plain values, and Twilio's playback buffer.

The call simulator writes one :data:`Event` per thing that happened on the
Media Stream (a frame sent, agent audio received, a mark or clear received,
a mark echoed).  Everything the report says is computed afterwards from this
log by pure functions (:mod:`mediaserver.dial.report`), so the figures can be
tested exactly on constructed logs.

:class:`Playback` is Twilio's outbound buffer, sans I/O: agent audio plays in
order, in real time, starting when it arrives or when the audio before it
has finished; a ``mark`` falls due when the audio sent before it has played
(at once if nothing is buffered); ``clear`` drops what has not played and
returns every pending mark (Twilio echoes them all at once).
Twilio-side facts: /work/shared/reference/twilio-side.md §1.3-1.4.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

__all__ = [
    "BYTES_PER_S",
    "ClearReceived",
    "Event",
    "FrameSent",
    "MarkEchoed",
    "MarkReceived",
    "MediaReceived",
    "Played",
    "Playback",
    "ProtocolWarning",
    "StreamEnded",
    "StreamStarted",
]

BYTES_PER_S = 8000  # 8 kHz µ-law: one byte per sample


@dataclass(frozen=True, slots=True)
class StreamStarted:
    """The ``start`` message went out: time zero of the call's timeline."""

    at_s: float


@dataclass(frozen=True, slots=True)
class FrameSent:
    """One ``media`` frame of caller audio (µ-law) sent at ``at_s``; ``speech`` unless silence.

    ``late_s``: how long after its place in the caller's real-time schedule the frame left (the
    caller itself fell behind: an overloaded machine).
    """

    at_s: float
    payload: bytes
    speech: bool
    late_s: float = 0.0


@dataclass(frozen=True, slots=True)
class MediaReceived:
    """Agent audio (µ-law) arrived from the server."""

    at_s: float
    payload: bytes


@dataclass(frozen=True, slots=True)
class MarkReceived:
    at_s: float
    name: str


@dataclass(frozen=True, slots=True)
class ClearReceived:
    at_s: float


@dataclass(frozen=True, slots=True)
class MarkEchoed:
    """We sent the mark back: its audio played (``cleared=False``) or a clear dropped it."""

    at_s: float
    name: str
    cleared: bool


@dataclass(frozen=True, slots=True)
class ProtocolWarning:
    """The server sent something Twilio would reject or ignore (warning 31951 and friends)."""

    at_s: float
    text: str


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The call ended (we sent ``stop``, or the server closed the socket); playback stops here."""

    at_s: float
    reason: str
    error: bool = False


Event = (
    StreamStarted | FrameSent | MediaReceived | MarkReceived | ClearReceived | MarkEchoed | ProtocolWarning | StreamEnded
)


@dataclass(frozen=True, slots=True)
class Played:
    """A piece of agent audio the caller heard from ``start_s`` to ``end_s``."""

    start_s: float
    payload: bytes

    @property
    def end_s(self) -> float:
        return self.start_s + len(self.payload) / BYTES_PER_S


class Playback:
    """Twilio's playback buffer for one stream (see the module docstring).

    ``segments`` is what was (or is scheduled to be) heard; :meth:`clear` and
    :meth:`cut` shorten it to what actually played.  ``now`` is supplied by
    the caller and must not decrease.
    """

    def __init__(self) -> None:
        self.segments: list[Played] = []
        self.buffer_end_s = -math.inf  # when everything queued will have played
        self.run_start_s = -math.inf  # when the current stretch of uninterrupted audio began
        self._marks: deque[tuple[str, float]] = deque()

    def media(self, payload: bytes, now: float) -> None:
        """Queue agent audio; it plays after what is buffered, or now if the buffer is empty."""
        if not payload:
            return
        if now > self.buffer_end_s or self.run_start_s > now:  # ran dry or was cleared: a new stretch
            self.run_start_s = now
        start = max(self.buffer_end_s, now)
        segment = Played(start, bytes(payload))
        self.segments.append(segment)
        self.buffer_end_s = segment.end_s

    def mark(self, name: str, now: float) -> None:
        """Queue a mark; it falls due when the audio before it has played (now if none is left)."""
        self._marks.append((name, max(self.buffer_end_s, now)))

    def next_due_s(self) -> float | None:
        """When the oldest pending mark falls due, or None."""
        return self._marks[0][1] if self._marks else None

    def due(self, now: float) -> list[str]:
        """Pop the marks whose audio has played by ``now``, oldest first."""
        names = []
        while self._marks and self._marks[0][1] <= now:
            names.append(self._marks.popleft()[0])
        return names

    def clear(self, now: float) -> list[str]:
        """Drop the audio not played by ``now``; return every pending mark (to echo at once)."""
        self.cut(now)
        names = [name for name, _ in self._marks]
        self._marks.clear()
        return names

    def cut(self, now: float) -> None:
        """Stop playback at ``now`` (clear or hang-up): shorten or drop what had not played."""
        kept: list[Played] = []
        for segment in self.segments:
            if segment.end_s <= now:
                kept.append(segment)
            elif segment.start_s < now:
                heard = math.floor((now - segment.start_s) * BYTES_PER_S + 1e-6)  # float noise, not a sample
                if heard > 0:
                    kept.append(Played(segment.start_s, segment.payload[:heard]))
        self.segments = kept
        if self.buffer_end_s > now:
            self.buffer_end_s = now
            self.run_start_s = math.inf  # what plays next starts a new stretch

    def playing_since(self, now: float) -> float | None:
        """Start of the stretch of audio playing at ``now``, or None if the caller hears nothing."""
        return self.run_start_s if self.run_start_s <= now < self.buffer_end_s else None
