# cython: language_level=3
"""OpenAI Realtime: a scanner for the plain ``response.output_audio.delta`` event.

Why: while the agent talks, every 20-40 ms of its voice arrives as one
delta, and ``json.loads`` plus the field checks and base64 cost several
µs of Python each.  :func:`parse_audio_delta` handles only the plain case
-- one flat JSON object (no nested object or array), every key and string
value free of escape sequences, every other value an integer (``-``,
1 to 18 digits, no leading zero, no fraction or exponent), ``true``,
``false`` or ``null``; ASCII only; ``type`` exactly ``"response.output_audio.delta"``;
``item_id`` a non-empty string; ``response_id`` a string or ``null`` or
absent; ``delta`` canonical base64 (``native/b64.h``); none of those four
keys repeated -- and answers ``None`` for anything else, which the caller
parses the ordinary way (and which then accepts it or names the error).
What it accepts it reads exactly as ``json.loads`` and the core's checks
would: ``tests/protocol/test_openai_fastpath.py`` checks that on generated
messages.
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
    K_TYPE = 1
    K_ITEM = 2
    K_RESPONSE = 4
    K_DELTA = 8
    # what a value was
    V_STRING = 1
    V_NULL = 2
    V_OTHER = 3


cdef inline Py_ssize_t _literal_end(const char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """End of the integer, ``true``, ``false`` or ``null`` at ``i``; -1 for anything else."""
    cdef Py_ssize_t start
    if s[i] == c't':
        return i + 4 if i + 4 <= n and equals(s, i, i + 4, b"true", 4) else -1
    if s[i] == c'f':
        return i + 5 if i + 5 <= n and equals(s, i, i + 5, b"false", 5) else -1
    if s[i] == c'n':
        return i + 4 if i + 4 <= n and equals(s, i, i + 4, b"null", 4) else -1
    if s[i] == c'-':
        i += 1
    start = i
    while i < n and c'0' <= s[i] <= c'9':
        i += 1
    if i == start or (s[start] == c'0' and i - start > 1) or i - start > 18:
        return -1  # (long numbers: json.loads has a digit limit of its own, which the process may set)
    if i < n and (s[i] == c'.' or s[i] == c'e' or s[i] == c'E'):
        return -1  # a fraction or an exponent: json.loads's job
    return i


def parse_audio_delta(str text not None):
    """``(item_id, response_id or None, audio)`` of a plain delta event; ``None`` otherwise (see the module docstring)."""
    if not PyUnicode_IS_COMPACT_ASCII(text):
        return None
    cdef const char* s = <const char*>PyUnicode_DATA(text)
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text)
    cdef Py_ssize_t i, key_start, key_end, value_start = 0, value_end = 0
    cdef Py_ssize_t item_start = 0, item_end = 0, response_start = 0, response_end = 0, delta_start = 0, delta_end = 0
    cdef int seen = 0, key, kind
    cdef bint type_ok = False, response_null = False
    cdef bytes audio

    i = skip_ws(s, 0, n)
    if i >= n or s[i] != c'{':
        return None
    i += 1
    while True:
        i = skip_ws(s, i, n)
        if i >= n or s[i] != c'"':
            return None
        key_start = i + 1
        key_end = string_end(s, key_start, n)
        if key_end < 0:
            return None
        if equals(s, key_start, key_end, b"type", 4):
            key = K_TYPE
        elif equals(s, key_start, key_end, b"item_id", 7):
            key = K_ITEM
        elif equals(s, key_start, key_end, b"response_id", 11):
            key = K_RESPONSE
        elif equals(s, key_start, key_end, b"delta", 5):
            key = K_DELTA
        else:
            key = 0
        if seen & key:
            return None  # a repeated key we read: json.loads keeps the last one
        seen |= key
        i = skip_ws(s, key_end + 1, n)
        if i >= n or s[i] != c':':
            return None
        i = skip_ws(s, i + 1, n)
        if i >= n:
            return None
        if s[i] == c'"':
            value_start = i + 1
            value_end = string_end(s, value_start, n)
            if value_end < 0:
                return None
            i = value_end + 1
            kind = V_STRING
        else:
            value_end = _literal_end(s, i, n)
            if value_end < 0:
                return None
            kind = V_NULL if s[i] == c'n' else V_OTHER
            i = value_end
        if key == K_TYPE:
            if kind != V_STRING or not equals(s, value_start, value_end, b"response.output_audio.delta", 27):
                return None
            type_ok = True
        elif key == K_ITEM:
            if kind != V_STRING or value_end == value_start:
                return None
            item_start, item_end = value_start, value_end
        elif key == K_RESPONSE:
            if kind == V_NULL:
                response_null = True
            elif kind == V_STRING:
                response_start, response_end = value_start, value_end
            else:
                return None
        elif key == K_DELTA:
            if kind != V_STRING:
                return None
            delta_start, delta_end = value_start, value_end
        i = skip_ws(s, i, n)
        if i >= n:
            return None
        if s[i] == c',':
            i += 1
            continue
        if s[i] != c'}' or skip_ws(s, i + 1, n) != n:
            return None
        break
    if not type_ok or not (seen & K_ITEM) or not (seen & K_DELTA):
        return None
    audio = b64_bytes(s + delta_start, delta_end - delta_start)
    if audio is None:
        return None
    return (
        PyUnicode_Substring(text, item_start, item_end),
        None if (response_null or not (seen & K_RESPONSE)) else PyUnicode_Substring(text, response_start, response_end),
        audio,
    )
