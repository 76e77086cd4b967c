# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Reorder buffer for telephony media frames keyed by sequence number.

The shape is aiortc's ``JitterBuffer`` (``src/aiortc/jitterbuffer.py``): a
power-of-two ring of slots indexed by ``seq & (capacity - 1)``, no clock, and
a resync when a frame lands too far ahead.  Unlike RTP's 16-bit numbers, ours
are int64 and do not wrap (Twilio's ``media.chunk`` counts up from 1), so
every comparison is a plain subtraction.

The slots hold the pushed ``bytes`` objects themselves: ``pop()`` hands back
the very object that was pushed, and neither call allocates for a ``bytes``
frame.  The ring only ever holds ``bytes`` (other buffers are copied into one
on push), which cannot take part in reference cycles, so the type opts out
of the cyclic GC.

The plain-Python reference with the same rules is
``mediaserver/codec/_reference/jitter.py``.
"""

cimport cython
from cpython.buffer cimport PyBuffer_Release, PyObject_CheckBuffer

from audiobuf cimport get_audio_buffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from libc.stdint cimport int16_t, int64_t, uint8_t, uint64_t
from libc.string cimport memset

from common cimport bind_args, same_args, alaw_to_linear, linear13_to_alaw, linear14_to_ulaw, load_le16, store_le16, ulaw_to_linear

from collections import namedtuple
from operator import index as _index

# Sequence numbers are stored as int64: valid ones are 0 <= seq < 2**63.
SEQ_LIMIT = 1 << 63
cdef enum:
    # Default ring: 64 slots = 1.28 s of 20 ms frames.  A gap up to this long
    # is concealed frame by frame (the caller's audio clock stays right); a
    # longer jump is a resync.  Grown for deep buffers to >= 2 * (depth + 1).
    MIN_CAPACITY = 64
    # 2**20 slots: 16 MiB of ring, 5.8 hours of 20 ms frames.
    MAX_CAPACITY = 1 << 20

cdef enum:
    ULAW = 0
    ALAW = 1
    PCM16 = 2

_CODECS = {"ulaw": ULAW, "alaw": ALAW, "pcm16": PCM16}
# The byte for silence in each format: µ-law 0xFF decodes to 0; A-law has no
# zero, 0xD5 (sign bit set = positive, magnitude 0, even bits inverted by
# ^ 0x55) decodes to +8, its smallest step; PCM16 is zeros.
_SILENCE_BYTE = {"ulaw": 0xFF, "alaw": 0xD5, "pcm16": 0x00}

JitterStats = namedtuple(
    "JitterStats",
    ["received", "played", "duplicates", "late", "concealed", "reordered", "resyncs", "dropped"],
    module=__name__,
)
JitterStats.__doc__ = """Counters of a :class:`JitterBuffer` since it was built (``reset()`` keeps them).

received:   frames passed to ``push()`` (with a valid sequence number)
played:     real frames returned by ``pop()``/``drain()``
duplicates: frames dropped because that sequence number was already waiting,
            or was played at most ``capacity`` sequence numbers ago
late:       frames dropped because the play-out point had passed them (or had been
            moved past them to make room: their concealment is owed)
concealed:  concealment frames returned in place of missing ones
reordered:  accepted frames that arrived after a higher sequence number
resyncs:    jumps of ``capacity`` or more ahead of the play-out point that skipped
            the gap (nothing waiting before the frame, or too much: see ``capacity``)
dropped:    accepted frames discarded unplayed by a resync or ``reset()``

``received == played + duplicates + late + dropped + len(buffer)`` always.
"""


cdef inline int64_t _to_seq(object seq) except -1:
    cdef int overflow = 0
    cdef long long value
    if not PyLong_CheckExact(seq):
        if isinstance(seq, bool) or not hasattr(type(seq), "__index__"):
            raise TypeError(f"sequence number must be an int, got {type(seq).__name__}")
        seq = _index(seq)
    value = PyLong_AsLongLongAndOverflow(seq, &overflow)
    if overflow or value < 0:
        raise ValueError(f"sequence number must be in [0, 2**63), got {seq}")
    return value


cdef object _int_arg(str name, object value):
    if isinstance(value, bool) or not hasattr(type(value), "__index__"):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return _index(value)


cdef bytes _copy_buffer(object data, int codec, str what="frame"):
    cdef Py_buffer view
    get_audio_buffer(data, &view, 2 if codec == PCM16 else 1, what)
    try:
        return PyBytes_FromStringAndSize(<const char*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


cdef void _fade(int codec, const uint8_t* src, Py_ssize_t src_bytes,
                uint8_t* dst, Py_ssize_t frame_bytes, uint8_t silence) noexcept nogil:
    # Sample i of n is scaled by (n - 1 - i) / n, truncated toward zero (C99
    # division), so the ramp ends at 0 on the frame's last sample.  Samples a
    # short source lacks are silence.
    cdef Py_ssize_t width = 2 if codec == PCM16 else 1
    cdef Py_ssize_t n = frame_bytes // width
    cdef Py_ssize_t have = src_bytes // width
    cdef Py_ssize_t i
    cdef int64_t x
    if have > n:
        have = n
    for i in range(have):
        if codec == ULAW:
            x = ulaw_to_linear(src[i])
        elif codec == ALAW:
            x = alaw_to_linear(src[i])
        else:
            x = load_le16(src + 2 * i)
        x = x * (n - 1 - i) / n
        if codec == ULAW:
            dst[i] = linear14_to_ulaw(<int>(x >> 2))
        elif codec == ALAW:
            dst[i] = linear13_to_alaw(<int>(x >> 3))
        else:
            store_le16(dst + 2 * i, <int16_t>x)
    memset(dst + have * width, silence, frame_bytes - have * width)


def _bind(depth=2, frame_bytes=160, fill="silence", codec="ulaw", *, capacity=None, first_seq=None):
    return depth, frame_bytes, fill, codec, capacity, first_seq


@cython.final
@cython.no_gc
@cython.auto_pickle(False)
cdef class JitterBuffer:
    """JitterBuffer(depth=2, frame_bytes=160, fill="silence", codec="ulaw", *, capacity=None, first_seq=None)
--

    Put media frames back in sequence order and conceal the missing ones.

    ``push(seq, frame)`` each frame as it arrives, then call ``pop()`` until
    it returns ``None``.  ``pop()`` returns the next frame in sequence the
    moment it is there, so frames that arrive in order pass straight through
    with no added delay.  While the next frame is missing, ``pop()`` returns
    ``None`` until more than ``depth`` later frames are waiting; then it gives
    up on that frame and returns a concealment frame in its place, one per
    missing sequence number, so the output keeps one frame per sequence
    number.  A frame that arrives after its turn is dropped and counted as
    ``late``: ``depth`` trades latency (``depth`` frames, only while a frame
    is missing) against late drops.

    Sequence numbers: use Twilio's ``media.chunk`` (a string in the JSON, so
    ``int()`` it; the first media message is 1 and each one adds 1), *not* the
    top-level ``sequenceNumber``, which counts every message on the socket
    (``start``, ``mark``, ``dtmf`` ...) and so has gaps that are not losses.
    For Telnyx, whose docs state that media frame order is not guaranteed,
    use ``media.chunk`` the same way.  Valid numbers are ``0 <= seq < 2**63``;
    they never wrap.

    Parameters:

    * ``depth``: later frames that must be waiting before a missing one is
      concealed (0 conceals at once: no reordering).
    * ``frame_bytes``: size of a concealment frame (160 = 20 ms of 8 kHz
      G.711; 320 for 8 kHz PCM16).  Pushed frames may have any length and
      come back unchanged.
    * ``fill``: ``"silence"`` (the codec's silence), ``"fade"`` (the last real
      frame under a linear ramp to zero; a second concealment in a row is
      silence), or an explicit ``frame_bytes``-long frame returned as is.
    * ``codec``: ``"ulaw"``, ``"alaw"`` or ``"pcm16"`` (little-endian); picks
      the silence byte and how ``"fade"`` decodes and re-encodes.
    * ``capacity``: ring size, a power of two >= ``depth + 2`` (default: 64,
      or ``2 * (depth + 1)`` rounded up to a power of two if larger).  Frames
      must lie within ``capacity`` sequence numbers of the play-out point.  A
      frame further ahead moves the play-out point up to make room when it
      and the frames waiting fit in the ring together: the missing numbers
      passed still come out as concealment frames, first.  Otherwise (nothing
      waits before it, or a waiting frame would fall out) it is a *resync*:
      waiting frames are dropped and play-out restarts at that frame, with no
      burst of concealment.  So a gap shorter than ``capacity`` is concealed,
      a longer one skipped.
    * ``first_seq``: the sequence number play-out starts at (Twilio: 1).  If
      omitted, the first pushed frame sets it, and until the first frame is
      played out an earlier one may still move it back (within capacity).

    The buffer is not a queue: pop after every push.  It holds at most
    ``capacity`` consecutive sequence numbers.  Sequence numbers that restart
    from a lower value (a new stream) are dropped until you call ``reset()``
    (counted as ``duplicates`` where a frame of that number was played at most
    ``capacity`` numbers ago, else as ``late``).
    At the end of a stream, ``drain()`` returns what is still waiting.
    """

    cdef PyObject** _slots          # owned references to bytes, or NULL
    cdef int64_t* _played_seq       # per slot: the last seq played from it
    cdef uint64_t _next             # play-out point; reaches 2**63 at most
    cdef int64_t _max_seen          # highest accepted seq since resync/reset
    cdef Py_ssize_t _cap, _mask, _depth, _count, _frame_bytes, _run
    cdef Py_ssize_t _owed           # concealment frames due before _next (see _catch_up)
    cdef bint _started, _floating, _fade, _initialised
    cdef tuple _made                # the settings __cinit__ took, until __init__ has checked it got the same
    cdef int _codec
    cdef uint8_t _silence_byte
    cdef bytes _fill                # the concealment frame for silence/explicit
    cdef bytes _last                # last real frame played ("fade" only)
    cdef uint64_t _received, _played, _duplicates, _late, _concealed, _reordered, _resyncs, _dropped

    def __cinit__(self, *args, **kwargs):
        self._made = bind_args(_bind, "JitterBuffer", args, kwargs)
        depth, frame_bytes, fill, codec, capacity, first_seq = self._made
        if not isinstance(codec, str) or codec not in _CODECS:
            raise ValueError(f"codec must be 'ulaw', 'alaw' or 'pcm16', got {codec!r}")
        depth = _int_arg("depth", depth)
        frame_bytes = _int_arg("frame_bytes", frame_bytes)
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth}")
        if frame_bytes <= 0:
            raise ValueError(f"frame_bytes must be > 0, got {frame_bytes}")
        if codec == "pcm16" and frame_bytes % 2:
            raise ValueError(f"frame_bytes must be even for pcm16, got {frame_bytes}")
        if capacity is None:
            capacity = MIN_CAPACITY
            while capacity < 2 * depth + 2:
                capacity *= 2
            if capacity > MAX_CAPACITY:
                raise ValueError(f"depth must be < {MAX_CAPACITY // 2}, got {depth}")
        else:
            capacity = _int_arg("capacity", capacity)
            if capacity <= 0 or capacity & (capacity - 1) or capacity > MAX_CAPACITY:
                raise ValueError(f"capacity must be a power of two <= 2**20, got {capacity}")
            if capacity < depth + 2:
                raise ValueError(f"capacity must be >= depth + 2 = {depth + 2}, got {capacity}")
        if frame_bytes > (1 << 30):
            raise ValueError(f"frame_bytes must be <= 2**30, got {frame_bytes}")
        if first_seq is not None:
            _to_seq(first_seq)

        self._depth = depth
        self._frame_bytes = frame_bytes
        self._cap = capacity
        self._mask = capacity - 1
        self._codec = _CODECS[codec]
        self._silence_byte = _SILENCE_BYTE[codec]
        self._fade = False
        if isinstance(fill, str):
            if fill == "silence" or fill == "fade":
                self._fill = bytes([self._silence_byte]) * frame_bytes
                self._fade = fill == "fade"
            else:
                raise ValueError(f"fill must be 'silence', 'fade' or a frame of bytes, got {fill!r}")
        else:
            if not PyObject_CheckBuffer(fill):
                raise TypeError(f"fill must be 'silence', 'fade' or a frame of bytes, got {type(fill).__name__}")
            self._fill = fill if PyBytes_CheckExact(fill) else _copy_buffer(fill, _CODECS[codec], "fill")
            if PyBytes_GET_SIZE(self._fill) != frame_bytes:
                raise ValueError(
                    f"fill frame must be frame_bytes={frame_bytes} bytes long, "
                    f"got {PyBytes_GET_SIZE(self._fill)}")

        self._slots = <PyObject**>PyMem_Malloc(self._cap * sizeof(PyObject*))
        self._played_seq = <int64_t*>PyMem_Malloc(self._cap * sizeof(int64_t))
        if self._slots == NULL or self._played_seq == NULL:
            raise MemoryError()
        memset(self._slots, 0, self._cap * sizeof(PyObject*))
        self._count = 0
        self.reset(first_seq)

    def __init__(self, *args, **kwargs):
        # (set up by __cinit__; a second __init__ would silently keep the old settings)
        if self._initialised or not same_args(self._made, _bind, "JitterBuffer", args, kwargs):
            raise TypeError("a JitterBuffer is set up when made: make a new one for other settings")
        self._initialised = True
        self._made = None

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self._slots != NULL:
            for i in range(self._cap):
                Py_XDECREF(self._slots[i])
            PyMem_Free(self._slots)
        PyMem_Free(self._played_seq)

    cdef void _clear(self) noexcept:
        # Drop every waiting frame; they count as ``dropped``.
        cdef Py_ssize_t i
        cdef PyObject* p
        if self._count:
            for i in range(self._cap):
                p = self._slots[i]
                if p != NULL:
                    self._slots[i] = NULL
                    Py_XDECREF(p)
            self._dropped += <uint64_t>self._count
            self._count = 0
        self._owed = 0

    def reset(self, first_seq=None):
        """Forget the stream: drop waiting frames (counted as ``dropped``),
        the play-out point, the played history and the fade source.  The
        counters in ``stats`` carry on.  ``first_seq`` as in the constructor."""
        cdef int64_t first = -1 if first_seq is None else _to_seq(first_seq)
        self._clear()
        memset(self._played_seq, 0xFF, self._cap * sizeof(int64_t))   # all -1
        self._started = first >= 0
        self._floating = first < 0
        self._next = <uint64_t>first if first >= 0 else 0
        self._max_seen = -1
        self._last = None
        self._run = 0
        self._owed = 0

    def push(self, seq, frame):
        """Add one frame.  ``frame`` is any bytes-like object; ``bytes`` is kept
        by reference, anything else is copied once.  Duplicates and frames the
        play-out has passed are dropped (see ``stats``).  A bad ``seq`` raises
        ValueError (out of range) or TypeError (not an int) and changes
        nothing."""
        cdef int64_t s = _to_seq(seq)
        cdef int64_t d
        cdef Py_ssize_t slot
        if not PyBytes_CheckExact(frame):
            frame = _copy_buffer(frame, self._codec)
        self._received += 1
        if not self._started:
            self._started = True
            self._next = <uint64_t>s
        # exact: s < 2**63 and _next <= 2**63, so the difference fits int64
        d = <int64_t>(<uint64_t>s - self._next)
        slot = <Py_ssize_t>(s & self._mask)
        if d < 0:
            if self._floating and self._max_seen - s < self._cap:
                self._next = <uint64_t>s        # play-out has not begun: start earlier
            else:
                if d >= -self._cap and self._played_seq[slot] == s:
                    self._duplicates += 1
                else:
                    self._late += 1
                return
        elif d >= self._cap:
            if not self._catch_up(s):
                self._resyncs += 1
                self._clear()
                self._next = <uint64_t>s
                self._max_seen = -1
        elif self._slots[slot] != NULL:
            self._duplicates += 1
            return
        if s < self._max_seen:
            self._reordered += 1
        else:
            self._max_seen = s
        Py_INCREF(frame)
        self._slots[slot] = <PyObject*>frame
        self._count += 1

    cdef bint _catch_up(self, int64_t s) noexcept:
        # ``s`` is ``capacity`` or more ahead of the play-out point.  If the frames waiting and ``s`` fit in the
        # ring together, the gap before the first of them is shorter than ``capacity``: move the play-out point
        # up so that ``s`` fits, and owe a concealment frame for each missing number it passed (they are all
        # missing: the first waiting frame is at or after the new point).  False: a resync it is.
        cdef uint64_t seq = self._next
        cdef uint64_t start
        if self._count == 0:
            return False
        while self._slots[<Py_ssize_t>(seq & <uint64_t>self._mask)] == NULL:
            seq += 1
        start = <uint64_t>s - <uint64_t>self._cap + 1
        if seq < start:
            return False   # a waiting frame would fall out of the ring
        self._owed += <Py_ssize_t>(start - self._next)
        self._next = start
        return True

    cdef inline object _pop(self, Py_ssize_t depth):
        cdef Py_ssize_t slot
        cdef PyObject* p
        cdef bytes frame
        if self._count == 0:
            return None
        if self._owed:     # numbers the play-out point was moved past (_catch_up): all missing
            self._owed -= 1
            return self._conceal()
        slot = <Py_ssize_t>(self._next & <uint64_t>self._mask)
        p = self._slots[slot]
        if p != NULL:
            self._slots[slot] = NULL
            self._count -= 1
            self._played_seq[slot] = <int64_t>self._next
            self._next += 1
            self._played += 1
            self._floating = False
            self._run = 0
            frame = <bytes>p            # takes a reference ...
            Py_XDECREF(p)               # ... so release the ring's
            if self._fade:
                self._last = frame
            return frame
        if self._count > depth:
            self._next += 1
            return self._conceal()
        return None

    cdef inline bytes _conceal(self):
        # One concealment frame: the last real frame faded ("fade", first of a run), else the fill frame.
        self._concealed += 1
        self._floating = False
        self._run += 1
        if self._run == 1 and self._last is not None:
            return self._faded()
        return self._fill

    cdef bytes _faded(self):
        cdef bytes out = PyBytes_FromStringAndSize(NULL, self._frame_bytes)
        _fade(self._codec, <const uint8_t*>PyBytes_AS_STRING(self._last), PyBytes_GET_SIZE(self._last),
              <uint8_t*>PyBytes_AS_STRING(out), self._frame_bytes, self._silence_byte)
        return out

    def pop(self):
        """Return the next frame in order (the object that was pushed), a
        concealment frame if the next one is missing and more than ``depth``
        later frames are waiting (or the play-out point was moved past it:
        see ``capacity``), or ``None``: nothing to play yet."""
        return self._pop(self._depth)

    def drain(self):
        """Return a list of everything still waiting, in order, with
        concealment frames for the gaps between (as ``pop()`` with
        ``depth=0``).  For the end of a stream; afterwards the buffer is
        empty and play-out continues after the last frame returned."""
        cdef list out = []
        while self._count:
            out.append(self._pop(0))
        return out

    def __len__(self):
        """Frames waiting (pushed, not yet played or dropped)."""
        return self._count

    @property
    def next_seq(self):
        """The sequence number whose turn is next in ``pop()``; None before the
        first frame (unless ``first_seq`` was given).  Numbers from it up to
        a point the buffer moved past (see ``capacity``) are concealed: a frame
        for one of them that still comes is late."""
        if not self._started:
            return None
        return self._next - <uint64_t>self._owed

    @property
    def depth(self):
        return self._depth

    @property
    def capacity(self):
        return self._cap

    @property
    def frame_bytes(self):
        return self._frame_bytes

    @property
    def stats(self):
        """A :class:`JitterStats` snapshot of the counters."""
        return JitterStats(self._received, self._played, self._duplicates, self._late,
                           self._concealed, self._reordered, self._resyncs, self._dropped)

    def __repr__(self):
        return (f"JitterBuffer(depth={self._depth}, frame_bytes={self._frame_bytes}, "
                f"capacity={self._cap}, waiting={self._count}, next_seq={self.next_seq})")
