# cython: language_level=3
"""WebSocket (RFC 6455) frame kernels: XOR masking, a data-frame scanner and frame builders.

Why: wsproto parses and unmasks every frame in pure Python, and a Media
Stream carries ~100 small frames a second per call.  :func:`scan` handles
only the plain case -- whole FIN text/binary frames, no RSV bits, minimal
length encoding, the expected masking, payload within a limit, valid UTF-8
for text -- and stops at the first frame that is anything else (or is not
complete yet), so that the caller hands the rest to wsproto, which keeps
handling every unusual case exactly as before.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

from b64 cimport ms_b64_encode

import os

# Why :func:`scan` stopped before the end of the buffer.
DONE = 0        # every byte was consumed
INCOMPLETE = 1  # the next frame is not all there yet (nothing about it is unusual so far)
OTHER = 2       # the next frame is not a plain data frame: leave it to wsproto


cdef inline void _xor(const unsigned char* src, unsigned char* dst, Py_ssize_t n,
                      const unsigned char* key) noexcept nogil:
    """dst[i] = src[i] ^ key[i % 4]: eight bytes at a time, then the tail."""
    cdef uint32_t k32
    cdef uint64_t k64, word
    cdef Py_ssize_t i = 0
    memcpy(&k32, key, 4)
    k64 = (<uint64_t>k32 << 32) | k32  # same byte pattern twice, whatever the endianness
    while i + 8 <= n:
        memcpy(&word, src + i, 8)
        word ^= k64
        memcpy(dst + i, &word, 8)
        i += 8
    while i < n:
        dst[i] = src[i] ^ key[i & 3]
        i += 1


def mask(bytes data not None, bytes key not None):
    """``data`` XOR-ed with the 4-byte ``key`` repeated (masking and unmasking are the same)."""
    if PyBytes_GET_SIZE(key) != 4:
        raise ValueError(f"a masking key is 4 bytes, not {PyBytes_GET_SIZE(key)}")
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    out = PyBytes_FromStringAndSize(NULL, n)
    _xor(<const unsigned char*>PyBytes_AS_STRING(data), <unsigned char*>PyBytes_AS_STRING(out), n,
         <const unsigned char*>PyBytes_AS_STRING(key))
    return out


cdef class MaskKeys:
    """Fresh 4-byte masking keys from the OS's random source, drawn 4 KiB at a time (one system call per 1024 keys).

    RFC 6455 wants every client frame masked with an unpredictable key;
    ``os.urandom`` per frame would be a system call per frame.  The
    encoders take ``key=True`` for the next key of the module's pool.
    """

    cdef bytes _pool
    cdef Py_ssize_t _at

    def __cinit__(self):
        self._pool = b""
        self._at = 0

    cdef int take(self, unsigned char* out) except -1:
        """Copy the next key to ``out`` (4 bytes)."""
        if self._at + 4 > PyBytes_GET_SIZE(self._pool):
            pool = os.urandom(4096)
            if not isinstance(pool, bytes) or PyBytes_GET_SIZE(pool) != 4096:
                raise RuntimeError("os.urandom(4096) did not return 4096 bytes")
            self._pool = pool
            self._at = 0
        memcpy(out, PyBytes_AS_STRING(self._pool) + self._at, 4)
        self._at += 4
        return 0

    def next(self):
        """The next key, as bytes."""
        cdef unsigned char key[4]
        self.take(key)
        return PyBytes_FromStringAndSize(<const char*>key, 4)


cdef MaskKeys _KEYS = MaskKeys()  # key=True draws from here


cdef bytes _new_frame(bint text, Py_ssize_t n, object key, unsigned char** body):
    """A FIN frame of ``n`` payload bytes: header (and masking key) written, ``*body`` at the payload to fill.

    ``key``: None (unmasked), 4 bytes, or True (the next key of the
    module's :class:`MaskKeys`).  The caller fills the payload in plain
    text, then masks it in place (:func:`_mask_body`).
    """
    cdef Py_ssize_t head = 2 if n < 126 else (4 if n < 65536 else 10)
    cdef bint masked = key is not None
    if masked and key is not True and (not isinstance(key, bytes) or PyBytes_GET_SIZE(key) != 4):
        raise ValueError("a masking key is 4 bytes, or True for a fresh one")
    out = PyBytes_FromStringAndSize(NULL, head + (4 if masked else 0) + n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    cdef unsigned char bit = 0x80 if masked else 0
    cdef int i
    p[0] = 0x81 if text else 0x82
    if n < 126:
        p[1] = bit | <unsigned char>n
    elif n < 65536:
        p[1] = bit | 126
        p[2] = (n >> 8) & 0xFF
        p[3] = n & 0xFF
    else:
        p[1] = bit | 127
        for i in range(8):
            p[2 + i] = (<uint64_t>n >> (8 * (7 - i))) & 0xFF
    if key is True:
        _KEYS.take(p + head)
        head += 4
    elif masked:
        memcpy(p + head, PyBytes_AS_STRING(key), 4)
        head += 4
    body[0] = p + head
    return out


cdef inline void _mask_body(unsigned char* body, Py_ssize_t n, object key):
    if key is not None:  # in place (_xor reads each word before it writes it), with the key in the header
        _xor(body, body, n, body - 4)


def encode_frame(bint text, bytes payload not None, key=None):
    """One whole FIN frame (text or binary opcode) carrying ``payload``; masked with ``key`` if given (True: a fresh key)."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    cdef unsigned char* body
    out = _new_frame(text, n, key, &body)
    memcpy(body, PyBytes_AS_STRING(payload), n)
    _mask_body(body, n, key)
    return out


def encode_b64_frame(bytes prefix not None, bytes data not None, bytes suffix not None, key=None):
    """``encode_frame(True, prefix + base64(data) + suffix, key)`` in one step.

    The per-frame audio message of a JSON provider (e.g. OpenAI's
    ``{"type":"input_audio_buffer.append","audio":"`` + base64 + ``"}``),
    framed without building the text first.  ``prefix`` and ``suffix`` must
    be UTF-8 (the frame is a text frame); base64 is ASCII.  ``key`` as
    for :func:`encode_frame`.
    """
    return _b64_frame(prefix, data, suffix, key)


cdef bytes _b64_frame(bytes prefix, bytes data, bytes suffix, object key):
    cdef Py_ssize_t np = PyBytes_GET_SIZE(prefix), nd = PyBytes_GET_SIZE(data), ns = PyBytes_GET_SIZE(suffix)
    cdef Py_ssize_t nb = (nd + 2) // 3 * 4
    cdef unsigned char* body
    out = _new_frame(True, np + nb + ns, key, &body)
    memcpy(body, PyBytes_AS_STRING(prefix), np)
    ms_b64_encode(<const unsigned char*>PyBytes_AS_STRING(data), nd, body + np)
    memcpy(body + np + nb, PyBytes_AS_STRING(suffix), ns)
    _mask_body(body, np + nb + ns, key)
    return out


def scan(bytes data not None, Py_ssize_t limit, bint masked):
    """Plain data frames at the start of ``data``: ``(messages, consumed, why_stopped)``.

    ``messages`` holds one ``str`` (text) or ``bytes`` (binary) per frame,
    unmasked; ``consumed`` is how many bytes they took; ``why_stopped`` is
    DONE, INCOMPLETE or OTHER (see above).  A frame counts as plain when it
    is FIN, opcode text or binary, has no RSV bit, carries the mask bit iff
    ``masked``, encodes its length minimally, has a payload of at most
    ``limit`` bytes and, if text, is valid UTF-8.
    """
    cdef const unsigned char* buf = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    cdef Py_ssize_t pos = 0, at, n
    cdef uint64_t length
    cdef unsigned char b0, b1
    cdef int i, why = DONE
    cdef unsigned char* scratch = NULL
    cdef Py_ssize_t scratch_size = 0
    cdef const unsigned char* payload
    messages = []
    try:
        while pos < size:
            if size - pos < 2:
                why = INCOMPLETE
                break
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if (b0 != 0x81 and b0 != 0x82) or ((b1 & 0x80) != 0) != masked:
                why = OTHER
                break
            at = pos + 2
            length = b1 & 0x7F
            if length == 126:
                if size - at < 2:
                    why = INCOMPLETE
                    break
                length = (<uint64_t>buf[at] << 8) | buf[at + 1]
                at += 2
                if length < 126:
                    why = OTHER
                    break
            elif length == 127:
                if size - at < 8:
                    why = INCOMPLETE
                    break
                length = 0
                for i in range(8):
                    length = (length << 8) | buf[at + i]
                at += 8
                if length < 65536 or (length >> 63):
                    why = OTHER
                    break
            if limit < 0 or length > <uint64_t>limit:
                why = OTHER
                break
            n = <Py_ssize_t>length
            if masked:
                at += 4
            if size - at < n:
                why = INCOMPLETE
                break
            if masked:
                if n > scratch_size:
                    free(scratch)
                    scratch_size = n if n > 512 else 512
                    scratch = <unsigned char*>malloc(scratch_size)
                    if scratch == NULL:
                        scratch_size = 0
                        raise MemoryError()
                _xor(buf + at, scratch, n, buf + at - 4)
                payload = scratch
            else:
                payload = buf + at
            if b0 == 0x81:
                try:
                    messages.append(PyUnicode_DecodeUTF8(<const char*>payload, n, NULL))
                except UnicodeDecodeError:
                    why = OTHER  # wsproto refuses it with 1007, as always
                    break
            else:
                messages.append(PyBytes_FromStringAndSize(<const char*>payload, n))
            pos = at + n
    finally:
        free(scratch)
    return messages, pos, why


# -- the uplink's read, in one step ------------------------------------------------------------------------------

cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_recv "recv"(int sockfd, void* buf, size_t n, int flags)
    ssize_t c_send "send"(int sockfd, const void* buf, size_t n, int flags)
    int MSG_DONTWAIT
    int MSG_NOSIGNAL

from libc.errno cimport EAGAIN, EINTR, errno

cdef enum:
    READ_SIZE = 65536
READ_BYTES = READ_SIZE  # what uplink_pass reads at most (ClientWebSocket's RECEIVE_BYTES; a test checks they agree)


def uplink_pass(int fd, Py_ssize_t limit, bint masked, object take, Py_ssize_t max_bytes, object push, object pop,
                bytes prefix not None, bytes suffix not None, object key, int out_fd, Py_ssize_t budget):
    """One read of a caller's socket, its plain ``media`` messages sent up to the model, in one native step.

    The bridge's per-frame path for µ-law passthrough on plain sockets
    (``CallBridge._on_twilio_readable``), doing what ``read_nowait``,
    :func:`scan`, the Twilio core's ``take_media``, the jitter buffer and
    :func:`encode_b64_frame` do one Python call at a time: read once from
    ``fd`` (non-blocking, at most :data:`READ_BYTES`); for each whole frame
    from the start that :func:`scan` would take (``limit``, ``masked``) and
    that is text, ``take(text, max_bytes)`` (a ``MediaCursor``'s) gives
    ``(chunk, payload)``, ``push(chunk, payload)`` hands it to the jitter
    buffer, and every non-empty frame ``pop()`` then returns is framed as
    ``encode_b64_frame(prefix, frame, suffix, key)``.  It stops at the
    first frame that is anything else, or that ``take`` declines, or after
    ``budget`` messages.  The frames are written to ``out_fd`` at once
    (``out_fd`` < 0: not written).

    Returns ``(read, rest, taken, framed, unsent, error)``: ``read`` is the
    number of bytes read, -1 when there was nothing to read, 0 when the
    peer closed or the read failed; ``rest`` the bytes read from the first
    frame not taken on (None when all were taken), for the ordinary path;
    ``taken`` the messages taken, ``framed`` the frames made; ``unsent``
    what of them was not written (all of them when ``out_fd`` < 0 or the
    write failed or would block; the rest of a partial write; ``b""``)
    for the ordinary send path, which queues it or raises the failure;
    ``error`` the exception ``take``, ``push`` or ``pop`` raised (then the
    run ended there and ``rest`` is None).
    """
    # (on this call's stack: no allocation per read, and not a static buffer -- take, push and pop run Python
    # code, and a masking key's refill releases the GIL, so another thread's call could overwrite a shared one)
    cdef unsigned char _read_buf[READ_SIZE]
    cdef ssize_t n = c_recv(fd, _read_buf, READ_SIZE, MSG_DONTWAIT)
    if n < 0:
        if errno == EAGAIN or errno == EINTR:  # (EWOULDBLOCK is EAGAIN on Linux)
            return -1, None, 0, 0, b"", None
        return 0, None, 0, 0, b"", None
    if n == 0:
        return 0, None, 0, 0, b"", None
    cdef Py_ssize_t size = n, pos = 0, at, length_n, taken = 0, framed = 0, sent
    cdef uint64_t length
    cdef unsigned char b0, b1
    cdef int i
    cdef const unsigned char* payload
    cdef list out = []
    cdef object fields, text, error = None, rest = None
    cdef bytes frame, frames
    while pos < size:
        if taken >= budget or size - pos < 2:
            break
        b0 = _read_buf[pos]
        b1 = _read_buf[pos + 1]
        if b0 != 0x81 or ((b1 & 0x80) != 0) != masked:
            break
        at = pos + 2
        length = b1 & 0x7F
        if length == 126:
            if size - at < 2:
                break
            length = (<uint64_t>_read_buf[at] << 8) | _read_buf[at + 1]
            at += 2
            if length < 126:
                break
        elif length == 127:
            break  # (a frame of 64 KiB or more is never whole in one read: the ordinary path)
        if limit < 0 or length > <uint64_t>limit:
            break
        length_n = <Py_ssize_t>length
        if masked:
            at += 4
        if size - at < length_n:
            break
        payload = _read_buf + at
        if masked:  # (unmasked in place; a frame left to the ordinary path is masked again, as it came)
            _xor(payload, <unsigned char*>payload, length_n, payload - 4)
        try:
            text = PyUnicode_DecodeUTF8(<const char*>payload, length_n, NULL)
        except UnicodeDecodeError:  # (the ordinary path refuses it with 1007)
            if masked:
                _xor(payload, <unsigned char*>payload, length_n, payload - 4)
            break
        try:
            fields = take(text, max_bytes)
            if fields is None:
                if masked:
                    _xor(payload, <unsigned char*>payload, length_n, payload - 4)
                break
            pos = at + length_n
            taken += 1
            push(fields[0], fields[1])
            frame = pop()
            while frame is not None:
                if PyBytes_GET_SIZE(frame):
                    out.append(_b64_frame(prefix, frame, suffix, key))
                    framed += 1
                frame = pop()
        except Exception as exc:
            error = exc
            break
    if error is None and pos < size:
        rest = PyBytes_FromStringAndSize(<const char*>_read_buf + pos, size - pos)
    if framed == 0:
        return n, rest, taken, 0, b"", error
    frames = out[0] if framed == 1 else b"".join(out)
    if out_fd < 0:
        return n, rest, taken, framed, frames, error
    sent = c_send(out_fd, PyBytes_AS_STRING(frames), PyBytes_GET_SIZE(frames), MSG_DONTWAIT | MSG_NOSIGNAL)
    if sent == PyBytes_GET_SIZE(frames):
        return n, rest, taken, framed, b"", error
    if sent <= 0:
        return n, rest, taken, framed, frames, error
    return n, rest, taken, framed, frames[sent:], error
