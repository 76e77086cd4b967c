# Plain-JSON scanning helpers for the native message scanners (_twilio, _realtime).
# "Plain": ASCII text, strings without escape sequences or control characters;
# a scanner that meets anything else declines and leaves it to json.loads.

from libc.stdint cimport uint64_t
from libc.string cimport memcpy

cdef extern from "Python.h":
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)


cdef inline Py_ssize_t skip_ws(const char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (s[i] == c' ' or s[i] == c'\t' or s[i] == c'\n' or s[i] == c'\r'):
        i += 1
    return i


cdef inline bint _stop_in_word(uint64_t v) noexcept nogil:
    """Whether any of the 8 bytes of ``v`` may be a quote, a backslash or a control character (no false negatives)."""
    # The classic "has a zero byte" test, x = v ^ c: (x - 0x01..01) & ~x & 0x80..80 is nonzero when some byte of x
    # is zero; with 0x20..20 subtracted from v it flags a byte below 0x20.  A borrow can flag a byte above a true
    # hit too (a false positive), never miss one: the caller checks that word byte by byte.
    cdef uint64_t q = v ^ 0x2222222222222222ULL
    cdef uint64_t b = v ^ 0x5C5C5C5C5C5C5C5CULL
    return (((q - 0x0101010101010101ULL) & ~q)
            | ((b - 0x0101010101010101ULL) & ~b)
            | ((v - 0x2020202020202020ULL) & ~v)) & 0x8080808080808080ULL != 0


cdef inline Py_ssize_t string_end(const char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """Index of the closing quote of the plain string whose first character is at ``i``; -1 if not plain."""
    cdef unsigned char c
    cdef uint64_t word
    # Eight bytes at a time while none of them can end the string (a base64 payload is hundreds of them).
    while i + 8 <= n:
        memcpy(&word, s + i, 8)
        if _stop_in_word(word):
            break
        i += 8
    while i < n:
        c = <unsigned char>s[i]
        if c == c'"':
            return i
        if c == c'\\' or c < 0x20:
            return -1
        i += 1
    return -1


cdef inline bint equals(const char* s, Py_ssize_t start, Py_ssize_t end, const char* word, Py_ssize_t size) noexcept nogil:
    """``s[start:end]`` is exactly the ``size`` bytes of ``word``."""
    cdef Py_ssize_t k
    if end - start != size:
        return False
    for k in range(size):
        if s[start + k] != word[k]:
            return False
    return True
