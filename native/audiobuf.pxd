# cython: language_level=3
# Audio arguments in any buffer, with their item format checked: a float or
# big-endian array handed to a kernel that reads raw bytes would otherwise be
# taken for PCM16 (or G.711 codes) and come back as noise, with no error.

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBuffer_Release, PyObject_GetBuffer


cdef extern from *:
    """
    static int ms_host_little_endian(void) { const unsigned short one = 1; return *(const unsigned char *)&one; }
    """
    int ms_host_little_endian() noexcept nogil


cdef inline bint _audio_format_ok(const char* f, int width) noexcept:
    cdef char order = b'@'
    cdef char kind
    if f == NULL:  # (a buffer that gives no format is unsigned bytes)
        return True
    if f[0] == b'@' or f[0] == b'=' or f[0] == b'<' or f[0] == b'>' or f[0] == b'!':
        order = f[0]
        f += 1
    kind = f[0]
    if kind == 0 or f[1] != 0:
        return False
    if kind == b'B' or kind == b'c':
        return True
    if kind == b'b':  # int8: raw codes, but never PCM16 (8-bit audio read as 16-bit samples is noise)
        return width == 1
    return width == 2 and kind == b'h' and (order == b'<' or ((order == b'@' or order == b'=') and ms_host_little_endian()))


cdef inline int get_audio_buffer(object data, Py_buffer* view, int width, str what) except -1:
    """``PyObject_GetBuffer`` for audio: one contiguous 1-D run of bytes, or (``width`` 2) of little-endian int16.

    ``bytes``, ``bytearray``, ``memoryview``, ``array('B'/'h')`` (and ``'b'`` for codes) and numpy
    arrays of uint8, int8 (codes only) or (for PCM16) little-endian int16 pass; anything else raises
    TypeError (not a buffer: None, str, a list; another item type: float, int32, big-endian) or ValueError
    (not contiguous, a scalar or more than one dimension), with the view released.
    """
    try:
        PyObject_GetBuffer(data, view, PyBUF_FORMAT | PyBUF_ND)
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object (bytes, bytearray, memoryview, array), "
                        f"not {type(data).__name__}") from None
    except (BufferError, ValueError) as exc:  # (a strided view: memoryview raises BufferError, numpy ValueError)
        raise ValueError(f"{what} must be one contiguous buffer: {exc}") from None
    if view.ndim != 1:
        ndim = view.ndim
        PyBuffer_Release(view)
        if ndim == 0:  # (a numpy scalar, a ctypes number: one item, most likely a[i] where a[i:i+1] was meant)
            raise ValueError(f"{what} must be one-dimensional (mono), got a scalar (a 0-dimensional buffer): "
                             f"pass a 1-D array or slice")
        raise ValueError(f"{what} must be one-dimensional (mono), got a buffer of {ndim} dimensions")
    if not _audio_format_ok(view.format, width):
        fmt = (<bytes>view.format).decode("ascii", "replace")
        PyBuffer_Release(view)
        if width == 2:
            raise TypeError(f"{what} must be bytes or an array of little-endian int16 (PCM16), not of items {fmt!r}")
        raise TypeError(f"{what} must be bytes (one code per byte), not an array of items {fmt!r}")
    return 0
