# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""G.711 µ-law / A-law table coding (bit-exact with CPython's audioop, width 2).

Decoding is a 256-entry lookup.  Encoding indexes a table by the top 14
(µ-law) or 13 (A-law) bits of the sample: 16 KiB and 8 KiB, so both stay in
L1 cache.  Each function takes any object exporting a contiguous buffer and
returns a new ``bytes``.  ``bytes`` input skips the buffer protocol.
"""

from cpython.buffer cimport PyBuffer_Release

from audiobuf cimport get_audio_buffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int16_t, uint8_t

from common cimport alaw_to_linear, linear13_to_alaw, linear14_to_ulaw, load_le16, to_le16, ulaw_to_linear

# Below this many samples the loop costs less than releasing the GIL does.
DEF NOGIL_SAMPLES = 8192

cdef int16_t ULAW_DECODE[256]
cdef int16_t ALAW_DECODE[256]
cdef uint8_t ULAW_ENCODE[1 << 14]
cdef uint8_t ALAW_ENCODE[1 << 13]


cdef void _init_tables() noexcept nogil:
    cdef int i
    for i in range(256):
        # stored in little-endian byte order, ready to copy to the output
        ULAW_DECODE[i] = to_le16(ulaw_to_linear(<uint8_t>i))
        ALAW_DECODE[i] = to_le16(alaw_to_linear(<uint8_t>i))
    for i in range(1 << 14):
        # index = (sample >> 2) & 0x3FFF; sign-extend it back to 14 bits
        ULAW_ENCODE[i] = linear14_to_ulaw(i - (1 << 14) if i >= (1 << 13) else i)
    for i in range(1 << 13):
        ALAW_ENCODE[i] = linear13_to_alaw(i - (1 << 13) if i >= (1 << 12) else i)


_init_tables()


cdef void _decode(const int16_t* table, const uint8_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil:
    # dst is the payload of a fresh bytes object, so it is int16-aligned
    cdef int16_t* out = <int16_t*>dst
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = table[src[i]]


cdef void _encode(const uint8_t* table, int shift, int index_mask,
                  const uint8_t* src, uint8_t* dst, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dst[i] = table[(load_le16(src + 2 * i) >> shift) & index_mask]


cdef bytes _decoded(const int16_t* table, const uint8_t* src, Py_ssize_t n):
    # (the source must not change meanwhile: bytes, or a buffer view held by the caller)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 2 * n)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(out)
    if n >= NOGIL_SAMPLES:
        with nogil:
            _decode(table, src, dst, n)
    else:
        _decode(table, src, dst, n)
    return out


cdef bytes _encoded(const uint8_t* table, int shift, int index_mask, const uint8_t* src, Py_ssize_t n):
    if n & 1:
        raise ValueError(f"PCM16 input must have an even number of bytes, got {n}")
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n >> 1)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(out)
    if n >= 2 * NOGIL_SAMPLES:
        with nogil:
            _encode(table, shift, index_mask, src, dst, n >> 1)
    else:
        _encode(table, shift, index_mask, src, dst, n >> 1)
    return out


cdef bytes _run_decode(object data, const int16_t* table):
    cdef Py_buffer view
    if PyBytes_CheckExact(data):
        return _decoded(table, <const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    get_audio_buffer(data, &view, 1, "G.711 input")
    try:
        return _decoded(table, <const uint8_t*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


cdef bytes _run_encode(object data, const uint8_t* table, int shift, int index_mask):
    cdef Py_buffer view
    if PyBytes_CheckExact(data):
        return _encoded(table, shift, index_mask, <const uint8_t*>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
    get_audio_buffer(data, &view, 2, "PCM16 input")
    try:
        return _encoded(table, shift, index_mask, <const uint8_t*>view.buf, view.len)
    finally:
        PyBuffer_Release(&view)


def ulaw_decode(data, /):
    """Decode G.711 µ-law bytes to PCM16 (signed 16-bit little-endian)."""
    return _run_decode(data, ULAW_DECODE)


def alaw_decode(data, /):
    """Decode G.711 A-law bytes to PCM16 (signed 16-bit little-endian)."""
    return _run_decode(data, ALAW_DECODE)


def ulaw_encode(data, /):
    """Encode PCM16 (signed 16-bit little-endian) to G.711 µ-law bytes."""
    return _run_encode(data, ULAW_ENCODE, 2, 0x3FFF)


def alaw_encode(data, /):
    """Encode PCM16 (signed 16-bit little-endian) to G.711 A-law bytes."""
    return _run_encode(data, ALAW_ENCODE, 3, 0x1FFF)
