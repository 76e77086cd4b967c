# cython: language_level=3
"""Twilio Media Streams: a scanner for the plain inbound ``media`` message (and ``mark`` echo).

Why: 50 ``media`` messages a second arrive on every call, and parsing one
with ``json.loads`` plus the protocol core's field checks costs ~7 µs of
Python; this is most of the uplink's own cost on the µ-law passthrough
path.  :func:`parse_media` handles only the plain case -- one JSON object
whose keys are exactly ``event`` (= ``"media"``), ``sequenceNumber``,
``streamSid`` and ``media`` (keys ``track``, ``chunk``, ``timestamp``,
``payload``), in any order, every value a string with no escape sequence,
the three numbers strings of 1 to 18 decimal digits, ASCII only -- and
answers ``None`` for anything else, so that the caller parses that message
the ordinary way (which then accepts it or names exactly what is wrong).
For every message it accepts, the fields it returns are the ones
``json.loads`` would give: ``tests/protocol/test_twilio_fastpath.py``
checks that on generated messages.  The base64 payload is returned as text:
the caller decodes it with the same strict decoder as the ordinary path.
:func:`parse_mark` does the same for Twilio's echo of a ``mark`` (12.5 a
second while the agent talks), and :class:`MediaCursor` adds the media
checks and base64 for the bridge's per-frame path.
"""

from cpython.unicode cimport PyUnicode_Substring

from b64 cimport b64_bytes
from jsonscan cimport (
    PyUnicode_DATA,
    PyUnicode_GET_LENGTH,
    PyUnicode_IS_COMPACT_ASCII,
    equals,
    skip_ws,
    string_end,
)


cdef enum:
    # Digits in a number converted here: 18 always fit in a C long long.
    MAX_DIGITS = 18
    # Which field a key names (bit flags, so a repeated key is noticed).
    K_EVENT = 1
    K_SEQUENCE = 2
    K_STREAM_SID = 4
    K_MEDIA = 8
    K_TRACK = 16
    K_CHUNK = 32
    K_TIMESTAMP = 64
    K_PAYLOAD = 128
    K_MARK = 256
    K_NAME = 512
    TOP_KEYS = K_EVENT | K_SEQUENCE | K_STREAM_SID | K_MEDIA
    MARK_KEYS = K_EVENT | K_SEQUENCE | K_STREAM_SID | K_MARK | K_NAME
    MEDIA_KEYS = K_TRACK | K_CHUNK | K_TIMESTAMP | K_PAYLOAD


cdef inline int _key(const char* s, Py_ssize_t start, Py_ssize_t end, bint inner, bint mark) noexcept nogil:
    if mark:
        if inner:
            return K_NAME if equals(s, start, end, b"name", 4) else 0
        if equals(s, start, end, b"mark", 4):
            return K_MARK
    elif inner:
        if equals(s, start, end, b"track", 5):
            return K_TRACK
        if equals(s, start, end, b"chunk", 5):
            return K_CHUNK
        if equals(s, start, end, b"timestamp", 9):
            return K_TIMESTAMP
        if equals(s, start, end, b"payload", 7):
            return K_PAYLOAD
        return 0
    if equals(s, start, end, b"event", 5):
        return K_EVENT
    if equals(s, start, end, b"sequenceNumber", 14):
        return K_SEQUENCE
    if equals(s, start, end, b"streamSid", 9):
        return K_STREAM_SID
    if not mark and equals(s, start, end, b"media", 5):
        return K_MEDIA
    return 0


cdef inline long long _digits(const char* s, Py_ssize_t start, Py_ssize_t end) noexcept nogil:
    """The value of 1..MAX_DIGITS decimal digits; -1 for anything else."""
    cdef long long value = 0
    cdef Py_ssize_t k
    if end <= start or end - start > MAX_DIGITS:
        return -1
    for k in range(start, end):
        if s[k] < c'0' or s[k] > c'9':
            return -1
        value = value * 10 + (s[k] - c'0')
    return value


cdef struct Fields:
    long long sequence
    long long chunk
    long long timestamp
    Py_ssize_t sid_start, sid_end, track_start, track_end, payload_start, payload_end


cdef bint _scan(const char* s, Py_ssize_t n, Fields* f, bint mark) noexcept nogil:
    """Fill ``f`` from a plain media message (``mark``: a plain mark echo, its name in the payload
    fields) as the module docstring describes; False for anything else."""
    cdef Py_ssize_t i = 0, key_start, key_end, value_start, value_end
    cdef int seen = 0, key
    cdef bint inner = False
    f.sequence = f.chunk = f.timestamp = -1
    f.sid_start = f.sid_end = f.track_start = f.track_end = f.payload_start = f.payload_end = 0

    i = skip_ws(s, i, n)
    if i >= n or s[i] != c'{':
        return False
    i += 1
    while True:
        # at the start of a member (or the end of an object)
        i = skip_ws(s, i, n)
        if i >= n or s[i] != c'"':
            return False
        key_start = i + 1
        key_end = string_end(s, key_start, n)
        if key_end < 0:
            return False
        key = _key(s, key_start, key_end, inner, mark)
        if key == 0 or seen & key:
            return False
        seen |= key
        i = skip_ws(s, key_end + 1, n)
        if i >= n or s[i] != c':':
            return False
        i = skip_ws(s, i + 1, n)
        if i >= n:
            return False
        if key == K_MEDIA or key == K_MARK:
            if s[i] != c'{':
                return False
            inner = True
            i += 1
            continue
        if s[i] != c'"':
            return False
        value_start = i + 1
        value_end = string_end(s, value_start, n)
        if value_end < 0:
            return False
        i = value_end + 1
        if key == K_EVENT:
            if mark:
                if not equals(s, value_start, value_end, b"mark", 4):
                    return False
            elif not equals(s, value_start, value_end, b"media", 5):
                return False
        elif key == K_SEQUENCE:
            f.sequence = _digits(s, value_start, value_end)
            if f.sequence < 0:
                return False
        elif key == K_STREAM_SID:
            f.sid_start, f.sid_end = value_start, value_end
        elif key == K_TRACK:
            if value_end == value_start:
                return False
            f.track_start, f.track_end = value_start, value_end
        elif key == K_CHUNK:
            f.chunk = _digits(s, value_start, value_end)
            if f.chunk < 0:
                return False
        elif key == K_TIMESTAMP:
            f.timestamp = _digits(s, value_start, value_end)
            if f.timestamp < 0:
                return False
        else:  # K_PAYLOAD, K_NAME
            if key == K_NAME and value_end == value_start:  # (the core refuses an empty name)
                return False
            f.payload_start, f.payload_end = value_start, value_end
        # after a value: ',' (next member) or '}' (end of this object, maybe of the inner one)
        while True:
            i = skip_ws(s, i, n)
            if i >= n:
                return False
            if s[i] == c',':
                i += 1
                break
            if s[i] != c'}':
                return False
            i += 1
            if inner:
                if seen & (K_NAME if mark else MEDIA_KEYS) != (K_NAME if mark else MEDIA_KEYS):
                    return False
                inner = False
                continue  # the outer object goes on with ',' or ends with '}'
            return seen == (MARK_KEYS if mark else TOP_KEYS | MEDIA_KEYS) and skip_ws(s, i, n) == n


def parse_media(str text not None):
    """``(sequence_number, stream_sid, track, chunk, timestamp_ms, payload_base64)`` of a plain media message.

    ``None`` when ``text`` is not the plain case described in the module
    docstring (including any message that is not ``media``): parse it the
    ordinary way.
    """
    cdef Fields f
    if not PyUnicode_IS_COMPACT_ASCII(text):
        return None
    if not _scan(<const char*>PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text), &f, False):
        return None
    return (
        f.sequence,
        PyUnicode_Substring(text, f.sid_start, f.sid_end),
        PyUnicode_Substring(text, f.track_start, f.track_end),
        f.chunk,
        f.timestamp,
        PyUnicode_Substring(text, f.payload_start, f.payload_end),
    )


def parse_mark(str text not None):
    """``(sequence_number, stream_sid, name)`` of a plain ``mark`` message; None otherwise.

    Plain as for :func:`parse_media`: exactly the keys ``event`` (=
    ``"mark"``), ``sequenceNumber``, ``streamSid`` and ``mark`` (key
    ``name``, not empty), any order, string values without escapes, ASCII only.
    """
    cdef Fields f
    if not PyUnicode_IS_COMPACT_ASCII(text):
        return None
    if not _scan(<const char*>PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text), &f, True):
        return None
    return (
        f.sequence,
        PyUnicode_Substring(text, f.sid_start, f.sid_end),
        PyUnicode_Substring(text, f.payload_start, f.payload_end),
    )


cdef class MediaCursor:
    """The per-stream checks of inbound ``media``, and :meth:`take`, which does them natively.

    ``TwilioStream`` keeps its sequence and chunk bookkeeping here, so the
    ordinary parser and :meth:`take` share one set of counters.
    """

    cdef public str stream_sid
    cdef public long long next_sequence
    cdef public long long sequence_missing
    cdef public long long next_inbound_chunk
    cdef public long long chunks_missing  # on the inbound track

    def __init__(self):
        self.stream_sid = None
        self.next_sequence = 1
        self.sequence_missing = 0
        self.next_inbound_chunk = 1
        self.chunks_missing = 0

    def take(self, object text, Py_ssize_t max_size):
        """``(chunk, payload)`` of a plain ``media`` message on the ``inbound`` track that passes every check; else None.

        The checks are the ordinary path's (``TwilioStream._media``): this
        stream's ``streamSid``, a sequence number and a chunk number that do
        not repeat or go backwards (gaps are counted), and base64 that
        decodes.  Anything this declines -- including every message that
        fails a check, and base64 that is not canonical -- changes nothing
        here: parse it the ordinary way, which accepts it or names the error.
        """
        cdef Fields f
        cdef Py_ssize_t sid_size
        cdef const char* s
        cdef bytes payload
        cdef const char* sid
        if type(text) is not str or self.stream_sid is None:
            return None
        if PyUnicode_GET_LENGTH(text) > max_size or not PyUnicode_IS_COMPACT_ASCII(text):
            return None
        s = <const char*>PyUnicode_DATA(text)
        if not _scan(s, PyUnicode_GET_LENGTH(text), &f, False):
            return None
        if f.sequence < self.next_sequence or f.chunk < self.next_inbound_chunk:
            return None
        if not equals(s, f.track_start, f.track_end, b"inbound", 7):
            return None
        sid_size = PyUnicode_GET_LENGTH(self.stream_sid)
        if not PyUnicode_IS_COMPACT_ASCII(self.stream_sid) or not equals(
            s, f.sid_start, f.sid_end, <const char*>PyUnicode_DATA(self.stream_sid), sid_size
        ):
            return None
        payload = b64_bytes(s + f.payload_start, f.payload_end - f.payload_start)
        if payload is None:
            return None
        self.sequence_missing += f.sequence - self.next_sequence
        self.next_sequence = f.sequence + 1
        self.chunks_missing += f.chunk - self.next_inbound_chunk
        self.next_inbound_chunk = f.chunk + 1
        return f.chunk, payload
