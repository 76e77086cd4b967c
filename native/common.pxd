# cython: language_level=3
# Shared scalar helpers for the kernels.  G.711 exactly as CPython's audioop
# implements it for width 2 (Modules/audioop.c: st_ulaw2linear16,
# st_14linear2ulaw, st_alaw2linear16, st_linear2alaw), which follow the Sun
# reference code for ITU-T G.711.

from libc.stdint cimport int16_t, int32_t, uint8_t

cdef inline int16_t ulaw_to_linear(uint8_t code) noexcept nogil:
    cdef int u = (~code) & 0xFF
    cdef int t = ((u & 0x0F) << 3) + 0x84          # QUANT_MASK, BIAS
    t <<= (u & 0x70) >> 4                          # SEG_MASK, SEG_SHIFT
    if u & 0x80:
        return <int16_t>(0x84 - t)
    return <int16_t>(t - 0x84)

cdef inline uint8_t linear14_to_ulaw(int pcm) noexcept nogil:
    # pcm: a 14-bit sample (int16 >> 2)
    cdef int mask, seg, limit
    if pcm < 0:
        pcm = -pcm
        mask = 0x7F
    else:
        mask = 0xFF
    if pcm > 8159:                                 # CLIP
        pcm = 8159
    pcm += 0x84 >> 2
    seg = 0
    limit = 0x3F                                   # seg_uend = 0x3F << seg
    while seg < 8 and pcm > limit:
        seg += 1
        limit = (limit << 1) | 1
    if seg >= 8:
        return <uint8_t>(0x7F ^ mask)
    return <uint8_t>(((seg << 4) | ((pcm >> (seg + 1)) & 0x0F)) ^ mask)

cdef inline int16_t alaw_to_linear(uint8_t code) noexcept nogil:
    cdef int a = code ^ 0x55
    cdef int t = (a & 0x0F) << 4
    cdef int seg = (a & 0x70) >> 4
    if seg == 0:
        t += 8
    elif seg == 1:
        t += 0x108
    else:
        t += 0x108
        t <<= seg - 1
    if a & 0x80:
        return <int16_t>t
    return <int16_t>(-t)

cdef inline uint8_t linear13_to_alaw(int pcm) noexcept nogil:
    # pcm: a 13-bit sample (int16 >> 3)
    cdef int mask, seg, limit, aval
    if pcm >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        pcm = -pcm - 1
    seg = 0
    limit = 0x1F                                   # seg_aend = 0x1F << seg
    while seg < 8 and pcm > limit:
        seg += 1
        limit = (limit << 1) | 1
    if seg >= 8:
        return <uint8_t>(0x7F ^ mask)
    aval = seg << 4
    if seg < 2:
        aval |= (pcm >> 1) & 0x0F
    else:
        aval |= (pcm >> seg) & 0x0F
    return <uint8_t>(aval ^ mask)

from libc.string cimport memcpy

# PCM16 on the wire is little-endian.  ``to_le16`` maps a host int16 to the
# int16 whose in-memory bytes are its little-endian form (identity on
# little-endian hosts, so tables built with it can be stored directly).
cdef inline int16_t to_le16(int16_t v) noexcept nogil:
    cdef uint8_t b[2]
    cdef int16_t out
    b[0] = <uint8_t>(v & 0xFF)
    b[1] = <uint8_t>((v >> 8) & 0xFF)
    memcpy(&out, b, 2)
    return out

# Little-endian int16 access independent of the host's byte order and of the
# pointer's alignment; on x86 and ARM these compile to plain 16-bit loads.
cdef inline int16_t load_le16(const uint8_t* p) noexcept nogil:
    return <int16_t>(p[0] | (p[1] << 8))

cdef inline void store_le16(uint8_t* p, int16_t v) noexcept nogil:
    p[0] = <uint8_t>(v & 0xFF)
    p[1] = <uint8_t>((v >> 8) & 0xFF)

cdef inline int16_t saturate16(double v) noexcept nogil:
    # round half away from zero, then clamp: overflow saturates, never wraps
    if v >= 32767.0:
        return 32767
    if v <= -32768.0:
        return -32768
    if v >= 0.0:
        return <int16_t>(v + 0.5)
    return <int16_t>(v - 0.5)


# Constructor arguments.  A cdef class's __cinit__/__init__ take (*args, **kwargs) and bind them with a plain
# function of the class's signature, so a wrong call says "Resampler() takes ..." rather than naming
# __cinit__ or __init__ (and inspect.signature reads the signature from the class docstring's first line).
cdef inline tuple bind_args(object bind, str cls, tuple args, dict kwargs):
    try:
        return bind(*args, **kwargs)
    except TypeError as e:
        # (bind only binds: a TypeError is about the call, and its message starts "<bind's name>()")
        raise TypeError(cls + "()" + str(e).partition("()")[2]) from None


cdef inline bint same_args(tuple made, object bind, str cls, tuple args, dict kwargs) except -1:
    """Whether ``__init__`` got what ``__cinit__`` was made with (the same objects: ``Cls(...)`` passes both
    the same); not so when ``Cls.__new__(Cls, ...)`` was followed by ``__init__`` with other settings."""
    cdef tuple bound = bind_args(bind, cls, args, kwargs)
    cdef Py_ssize_t i
    if made is None or len(bound) != len(made):
        return False
    for i in range(len(bound)):  # (a loop: a generator expression in this header breaks modules without one)
        if bound[i] is not made[i]:
            return False
    return True
