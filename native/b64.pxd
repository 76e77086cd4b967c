# Base64 for the native message paths (b64.h): canonical decoding, padded encoding.

cdef extern from "b64.h" nogil:
    Py_ssize_t ms_b64_decoded_size(const char* s, Py_ssize_t n)
    bint ms_b64_decode(const char* s, Py_ssize_t n, unsigned char* out)
    void ms_b64_encode(const unsigned char* src, Py_ssize_t n, unsigned char* dst)


from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize


cdef inline object b64_bytes(const char* s, Py_ssize_t n):
    """The bytes canonical base64 ``s[0:n]`` decodes to; None if it is not canonical (see b64.h)."""
    cdef Py_ssize_t size = ms_b64_decoded_size(s, n)
    if size < 0:
        return None
    out = PyBytes_FromStringAndSize(NULL, size)
    if not ms_b64_decode(s, n, <unsigned char*>PyBytes_AS_STRING(out)):
        return None
    return out
