# Base64 for the native message paths (b64.h): canonical decoding, padded encoding.

cdef extern from "b64.h" nogil:
    Py_ssize_t ms_b64_decoded_size(const char* s, Py_ssize_t n)
    bint ms_b64_decode(const char* s, Py_ssize_t n, unsigned char* out)
    void ms_b64_encode(const unsigned char* src, Py_ssize_t n, unsigned char* dst)
