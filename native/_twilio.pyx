# cython: language_level=3
"""Twilio Media Streams: a scanner for the plain inbound ``media`` message.

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
"""

from cpython.unicode cimport PyUnicode_Substring

cdef extern from "Python.h":
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)

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
    TOP_KEYS = K_EVENT | K_SEQUENCE | K_STREAM_SID | K_MEDIA
    MEDIA_KEYS = K_TRACK | K_CHUNK | K_TIMESTAMP | K_PAYLOAD


cdef inline Py_ssize_t _skip_ws(const char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (s[i] == c' ' or s[i] == c'\t' or s[i] == c'\n' or s[i] == c'\r'):
        i += 1
    return i


cdef inline Py_ssize_t _string_end(const char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Index of the closing quote of the plain string whose first character is at ``i``; -1 if not plain."""
    cdef unsigned char c
    while i < n:
        c = <unsigned char>s[i]
        if c == c'"':
            return i
        if c == c'\\' or c < 0x20:
            return -1
        i += 1
    return -1


cdef inline bint _equals(const char* s, Py_ssize_t start, Py_ssize_t end, const char* word, Py_ssize_t size) noexcept nogil:
    cdef Py_ssize_t k
    if end - start != size:
        return False
    for k in range(size):
        if s[start + k] != word[k]:
            return False
    return True


cdef inline int _key(const char* s, Py_ssize_t start, Py_ssize_t end, bint inner) noexcept nogil:
    if inner:
        if _equals(s, start, end, b"track", 5):
            return K_TRACK
        if _equals(s, start, end, b"chunk", 5):
            return K_CHUNK
        if _equals(s, start, end, b"timestamp", 9):
            return K_TIMESTAMP
        if _equals(s, start, end, b"payload", 7):
            return K_PAYLOAD
        return 0
    if _equals(s, start, end, b"event", 5):
        return K_EVENT
    if _equals(s, start, end, b"sequenceNumber", 14):
        return K_SEQUENCE
    if _equals(s, start, end, b"streamSid", 9):
        return K_STREAM_SID
    if _equals(s, start, end, b"media", 5):
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


def parse_media(str text not None):
    """``(sequence_number, stream_sid, track, chunk, timestamp_ms, payload_base64)`` of a plain media message.

    ``None`` when ``text`` is not the plain case described in the module
    docstring (including any message that is not ``media``): parse it the
    ordinary way.
    """
    if not PyUnicode_IS_COMPACT_ASCII(text):
        return None
    cdef const char* s = <const char*>PyUnicode_DATA(text)
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text)
    cdef Py_ssize_t i = 0, key_start, key_end, value_start, value_end
    cdef int seen = 0, key
    cdef bint inner = False
    cdef long long sequence = -1, chunk = -1, timestamp = -1
    cdef Py_ssize_t sid_start = 0, sid_end = 0, track_start = 0, track_end = 0, payload_start = 0, payload_end = 0

    i = _skip_ws(s, i, n)
    if i >= n or s[i] != c'{':
        return None
    i += 1
    while True:
        # at the start of a member (or the end of an object)
        i = _skip_ws(s, i, n)
        if i >= n or s[i] != c'"':
            return None
        key_start = i + 1
        key_end = _string_end(s, key_start, n)
        if key_end < 0:
            return None
        key = _key(s, key_start, key_end, inner)
        if key == 0 or seen & key:
            return None
        seen |= key
        i = _skip_ws(s, key_end + 1, n)
        if i >= n or s[i] != c':':
            return None
        i = _skip_ws(s, i + 1, n)
        if i >= n:
            return None
        if key == K_MEDIA:
            if s[i] != c'{':
                return None
            inner = True
            i += 1
            continue
        if s[i] != c'"':
            return None
        value_start = i + 1
        value_end = _string_end(s, value_start, n)
        if value_end < 0:
            return None
        i = value_end + 1
        if key == K_EVENT:
            if not _equals(s, value_start, value_end, b"media", 5):
                return None
        elif key == K_SEQUENCE:
            sequence = _digits(s, value_start, value_end)
            if sequence < 0:
                return None
        elif key == K_STREAM_SID:
            sid_start, sid_end = value_start, value_end
        elif key == K_TRACK:
            if value_end == value_start:
                return None
            track_start, track_end = value_start, value_end
        elif key == K_CHUNK:
            chunk = _digits(s, value_start, value_end)
            if chunk < 0:
                return None
        elif key == K_TIMESTAMP:
            timestamp = _digits(s, value_start, value_end)
            if timestamp < 0:
                return None
        else:  # K_PAYLOAD
            payload_start, payload_end = value_start, value_end
        # after a value: ',' (next member) or '}' (end of this object, maybe of the inner one)
        while True:
            i = _skip_ws(s, i, n)
            if i >= n:
                return None
            if s[i] == c',':
                i += 1
                break
            if s[i] != c'}':
                return None
            i += 1
            if inner:
                if seen & MEDIA_KEYS != MEDIA_KEYS:
                    return None
                inner = False
                continue  # the outer object goes on with ',' or ends with '}'
            if seen != TOP_KEYS | MEDIA_KEYS or _skip_ws(s, i, n) != n:
                return None
            return (
                sequence,
                PyUnicode_Substring(text, sid_start, sid_end),
                PyUnicode_Substring(text, track_start, track_end),
                chunk,
                timestamp,
                PyUnicode_Substring(text, payload_start, payload_end),
            )
