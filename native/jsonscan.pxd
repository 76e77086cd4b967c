# Plain-JSON scanning helpers for the native message scanners (_twilio, _realtime).
# "Plain": ASCII text, strings without escape sequences or control characters;
# a scanner that meets anything else declines and leaves it to json.loads.

cdef extern from "Python.h":
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void* PyUnicode_DATA(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)


cdef inline Py_ssize_t skip_ws(const char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and (s[i] == c' ' or s[i] == c'\t' or s[i] == c'\n' or s[i] == c'\r'):
        i += 1
    return i


cdef inline Py_ssize_t string_end(const char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
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


cdef inline bint equals(const char* s, Py_ssize_t start, Py_ssize_t end, const char* word, Py_ssize_t size) noexcept nogil:
    """``s[start:end]`` is exactly the ``size`` bytes of ``word``."""
    cdef Py_ssize_t k
    if end - start != size:
        return False
    for k in range(size):
        if s[start + k] != word[k]:
            return False
    return True
