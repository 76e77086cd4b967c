"""Reorder buffer written plainly from the spec: a dict of waiting frames.

Same constructor, methods and counters as the native ``JitterBuffer``
(``native/_jitter.pyx``), and bit-identical output, concealment included.  It
keeps no ring: waiting frames live in a ``dict`` keyed by sequence number and
the frames played lately in a ``set``.  The capacity only enters through the
rules it defines (the window of acceptable sequence numbers and how far back a
repeat is still recognised as a duplicate).

The rules, for one ``push(seq, frame)``, with ``next`` the play-out point:

* before the first frame, ``next`` is ``first_seq`` if given, else ``seq``;
* ``seq < next``: if no frame has been played out yet, ``first_seq`` was not
  given and the waiting frames would still span less than ``capacity``
  sequence numbers, ``next`` moves back to ``seq`` and the frame is kept.
  Otherwise it is a *duplicate* if it was played and ``next - seq <=
  capacity``, else *late*; either way it is dropped;
* ``seq >= next + capacity``: with ``start = seq - capacity + 1``, if frames
  wait and the first of them is at or after ``start``, ``next`` moves up to
  ``start`` and the numbers it passes (all missing) are *owed* as
  concealment frames; otherwise *resync*: the waiting frames are *dropped*
  and ``next = seq``;
* ``seq`` already waiting: *duplicate*;
* otherwise the frame waits; it counts as *reordered* if a higher sequence
  number was accepted before it (since the last resync or reset).

``pop()`` returns a concealment frame while any are owed (whatever
``depth``); else the frame at ``next`` if it is waiting; else, if more than
``depth`` frames are waiting, a concealment frame; else ``None``.
``next_seq`` is ``next`` less what is owed: the number whose turn is next.
"""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from mediaserver.codec._reference import g711
from mediaserver.codec._reference.audiobuf import audio_bytes

if TYPE_CHECKING:
    from typing_extensions import Buffer

SEQ_LIMIT = 1 << 63  # sequence numbers are int64 >= 0
MAX_CAPACITY = 1 << 20
MIN_CAPACITY = 64  # 1.28 s of 20 ms frames: the longest gap that is concealed
SILENCE = {"ulaw": 0xFF, "alaw": 0xD5, "pcm16": 0x00}


class JitterStats(NamedTuple):
    received: int
    played: int
    duplicates: int
    late: int
    concealed: int
    reordered: int
    resyncs: int
    dropped: int


def default_capacity(depth: int) -> int:
    cap = MIN_CAPACITY
    while cap < 2 * depth + 2:
        cap *= 2
    return cap


def fade_frame(last: bytes, frame_bytes: int, codec: str) -> bytes:
    """The first ``frame_bytes`` of ``last`` under a linear ramp to zero.

    Sample ``i`` of ``n`` is scaled by ``(n - 1 - i) / n``, truncated toward
    zero; samples missing from a short ``last`` are silence.
    """
    width = 2 if codec == "pcm16" else 1
    n = frame_bytes // width
    have = min(len(last) // width, n)
    if codec == "pcm16":
        x = np.frombuffer(last[: 2 * have], dtype="<i2").astype(np.int64)
    elif codec == "ulaw":
        x = g711.ulaw_decode(np.frombuffer(last[:have], dtype=np.uint8)).astype(np.int64)
    else:
        x = g711.alaw_decode(np.frombuffer(last[:have], dtype=np.uint8)).astype(np.int64)
    gain = n - 1 - np.arange(have, dtype=np.int64)
    y = np.sign(x) * (np.abs(x) * gain // n)
    pcm = np.zeros(n, dtype=np.int16)
    pcm[:have] = y
    if codec == "pcm16":
        return pcm.astype("<i2").tobytes()
    if codec == "ulaw":
        return g711.ulaw_encode(pcm).tobytes()
    return g711.alaw_encode(pcm).tobytes()


def _check_seq(seq: int) -> int:
    if isinstance(seq, bool) or not hasattr(type(seq), "__index__"):
        raise TypeError(f"sequence number must be an int, got {type(seq).__name__}")
    seq = operator.index(seq)
    if not 0 <= seq < SEQ_LIMIT:
        raise ValueError(f"sequence number must be in [0, 2**63), got {seq}")
    return seq


class JitterBuffer:
    def __init__(
        self,
        depth: int = 2,
        frame_bytes: int = 160,
        fill: Buffer | str = "silence",
        codec: str = "ulaw",
        *,
        capacity: int | None = None,
        first_seq: int | None = None,
    ) -> None:
        if codec not in SILENCE:
            raise ValueError(f"codec must be 'ulaw', 'alaw' or 'pcm16', got {codec!r}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if frame_bytes <= 0 or (codec == "pcm16" and frame_bytes % 2):
            raise ValueError(f"bad frame_bytes {frame_bytes}")
        if capacity is None:
            capacity = default_capacity(depth)
        if capacity & (capacity - 1) or not depth + 2 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"bad capacity {capacity}")
        self.depth = depth
        self.frame_bytes = frame_bytes
        self.capacity = capacity
        self.codec = codec
        self._silence = bytes([SILENCE[codec]]) * frame_bytes
        self._fade = False
        if isinstance(fill, str):
            if fill not in ("silence", "fade"):
                raise ValueError(f"fill must be 'silence', 'fade' or a frame, got {fill!r}")
            self._fill = self._silence
            self._fade = fill == "fade"
        else:
            self._fill = audio_bytes(fill, 2 if codec == "pcm16" else 1, "fill")
            if len(self._fill) != frame_bytes:
                raise ValueError("fill frame has the wrong length")
        self._received = self._played = self._duplicates = self._late = 0
        self._concealed = self._reordered = self._resyncs = self._dropped = 0
        self._waiting: dict[int, bytes] = {}
        self.reset(first_seq)

    def reset(self, first_seq: int | None = None) -> None:
        self._first_seq = None if first_seq is None else _check_seq(first_seq)
        self._dropped += len(self._waiting)
        self._waiting.clear()
        self._played_seqs: set[int] = set()
        self._next: int | None = self._first_seq
        self._max_seen = -1
        self._floating = self._first_seq is None
        self._last: bytes | None = None
        self._run = 0  # concealment frames since the last real frame
        self._owed = 0  # concealment frames due before _next (a gap the play-out point was moved past)

    def push(self, seq: int, frame: Buffer) -> None:
        seq = _check_seq(seq)
        frame = audio_bytes(frame, 2 if self.codec == "pcm16" else 1, "frame")
        self._received += 1
        if self._next is None:
            self._next = seq
        if seq < self._next:
            if self._floating and self._max_seen - seq < self.capacity:
                self._next = seq
            elif seq in self._played_seqs and self._next - seq <= self.capacity:
                self._duplicates += 1
                return
            else:
                self._late += 1
                return
        elif seq - self._next >= self.capacity:
            start = seq - self.capacity + 1  # the play-out point that lets seq into the ring
            if self._waiting and min(self._waiting) >= start:
                # the gap before the waiting frames is shorter than capacity: conceal it, frame by frame
                self._owed += start - self._next
                self._next = start
            else:
                self._resyncs += 1
                self._dropped += len(self._waiting)
                self._waiting.clear()
                self._owed = 0
                self._next = self._max_seen = seq
        elif seq in self._waiting:
            self._duplicates += 1
            return
        if seq < self._max_seen:
            self._reordered += 1
        else:
            self._max_seen = seq
        self._waiting[seq] = frame

    def pop(self) -> bytes | None:
        return self._pop(self.depth)

    def drain(self) -> list[bytes]:
        out = []
        while self._waiting:
            frame = self._pop(0)
            assert frame is not None
            out.append(frame)
        return out

    def _pop(self, depth: int) -> bytes | None:
        if not self._waiting:
            return None
        assert self._next is not None
        if self._owed:  # numbers the play-out point was moved past: all missing
            self._owed -= 1
            return self._conceal()
        seq = self._next
        frame = self._waiting.pop(seq, None)
        if frame is not None:
            self._next = seq + 1
            self._played += 1
            self._played_seqs.add(seq)
            self._played_seqs.discard(seq - self.capacity)
            self._floating = False
            self._last = frame
            self._run = 0
            return frame
        if len(self._waiting) > depth:
            self._next = seq + 1
            return self._conceal()
        return None

    def _conceal(self) -> bytes:
        self._concealed += 1
        self._floating = False
        if self._fade and self._run == 0 and self._last is not None:
            frame = fade_frame(self._last, self.frame_bytes, self.codec)
        else:
            frame = self._fill
        self._run += 1
        return frame

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def next_seq(self) -> int | None:
        return None if self._next is None else self._next - self._owed

    @property
    def stats(self) -> JitterStats:
        return JitterStats(
            self._received,
            self._played,
            self._duplicates,
            self._late,
            self._concealed,
            self._reordered,
            self._resyncs,
            self._dropped,
        )
