# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Streaming polyphase resampler for PCM16 between 8, 16 and 24 kHz.

Rate ``in_hz -> out_hz`` is ``L/M`` with ``L = out/g``, ``M = in/g``.  Output
sample ``m`` sits at index ``t = m*M`` of the virtual signal upsampled by
``L``; it is ``sum_k h[p + k*L] * x[j0 - k]`` with ``p = t % L`` and
``j0 = t // L``.  It depends on inputs up to ``j0`` only, so every input
chunk yields its output at once: after ``n`` samples in total, exactly
``ceil(n*L/M)`` samples have come out, whatever the chunking.  Each output
is computed by the same arithmetic on the same values, so the result is
bit-identical for any chunking.

The taps (``resample_taps.h``) come from ``native/design_filters.py``.  Per
phase, zero taps at either end are trimmed (a Nyquist filter makes one
interpolation phase a single tap).  All outputs of one phase in a chunk are
computed together by ``fir_lanes.h``, one output per vector lane.
"""

cimport cython
from cpython.buffer cimport PyBuffer_Release

from audiobuf cimport get_audio_buffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.math cimport lrintf
from libc.stdint cimport int16_t, int64_t, uint8_t
from libc.string cimport memmove, memset

from common cimport bind_args, load_le16, same_args, to_le16

cdef extern from "resample_taps.h":
    ctypedef struct ms_filter:
        int fs_hi
        int minimum_phase
        int numtaps
        double delay_ms
        const float* taps
    const ms_filter MS_FILTERS[]
    const int MS_NUM_FILTERS

cdef extern from "fir_lanes.h":
    void ms_fir_lanes(const float* h, int K, const float* const* src, int n, float* y) noexcept nogil

# Chunks at least this long (input samples) are processed without the GIL;
# for a 20 ms frame, releasing it would cost more than the work.
DEF NOGIL_SAMPLES = 2048
# Longer inputs are resampled in blocks of this many samples, so the scratch
# buffers never grow past it, whatever one call is given.
DEF BLOCK = 4096
import operator

SUPPORTED_RATES = (8000, 16000, 24000)


def _bind(in_rate, out_rate, *, phase="linear"):
    return in_rate, out_rate, phase


cdef int _gcd(int a, int b) noexcept nogil:
    while b:
        a, b = b, a % b
    return a


cdef inline int16_t _to_int16(float y) noexcept nogil:
    # round to nearest; overflow saturates, never wraps
    if y >= 32767.0:
        return 32767
    if y <= -32768.0:
        return -32768
    return <int16_t>lrintf(y)


@cython.final
@cython.auto_pickle(False)
cdef class Resampler:
    """Resampler(in_rate, out_rate, *, phase="linear")
--

    Streaming PCM16 resampler.

    ``process(pcm)`` returns the resampled audio for ``pcm`` at once (20 ms
    in, 20 ms out); ``flush()`` returns the tail still inside the filter and
    resets; ``reset()`` forgets all history.  Supported: 8000<->16000,
    8000<->24000, 16000<->24000 and any rate to itself (a copy).
    ``phase="minimum"`` selects minimum-phase filters: the same magnitude
    response with under 1 ms of delay, at the cost of phase linearity.
    """

    cdef readonly int in_rate
    cdef readonly int out_rate
    cdef readonly str phase
    cdef readonly double delay_ms
    cdef int L, M
    cdef int history          # input samples kept between calls
    cdef int flush_samples    # zeros pushed by flush()
    cdef int64_t t_next       # upsampled index of the next output, relative to the chunk start
    cdef float* taps          # L rows of `stride`: each phase's nonzero taps, oldest input first
    cdef int* offsets         # L rows of `stride`: buffer position each tap reads, minus j0
    cdef int* phase_len       # nonzero taps per phase
    cdef int stride
    cdef const float** src    # per-tap lane pointers, scratch
    cdef float* buf           # history + current chunk, as float
    cdef float* lanes         # M deinterleaved copies of buf (M > 1), rows of lane_cap
    cdef float* acc           # one phase's outputs, scratch
    cdef Py_ssize_t buf_cap
    cdef Py_ssize_t lane_cap
    cdef bint busy
    cdef bint initialised
    cdef tuple made           # the settings __cinit__ took, until __init__ has checked it got the same
    cdef bint fed             # input since the last reset: flush() has a tail to give
    cdef const ms_filter* filter

    def __cinit__(self, *args, **kwargs):
        cdef int in_hz, out_hz
        self.made = bind_args(_bind, "Resampler", args, kwargs)
        in_rate, out_rate, phase = self.made
        self.taps = NULL
        self.phase_len = NULL
        self.offsets = NULL
        self.src = NULL
        self.buf = NULL
        self.filter = NULL
        self.lanes = NULL
        self.acc = NULL
        self.initialised = False
        for name, value in (("in_rate", in_rate), ("out_rate", out_rate)):
            if isinstance(value, bool) or not hasattr(type(value), "__index__"):
                raise TypeError(f"{name} must be an int of Hz, got {type(value).__name__}")
        in_rate = operator.index(in_rate)
        out_rate = operator.index(out_rate)
        if in_rate not in SUPPORTED_RATES or out_rate not in SUPPORTED_RATES:
            raise ValueError(
                f"unsupported rate pair {in_rate} -> {out_rate} Hz: rates must be 8000, 16000 or 24000"
            )
        in_hz = in_rate
        out_hz = out_rate
        if not isinstance(phase, str):
            raise TypeError(f"phase must be 'linear' or 'minimum', got {type(phase).__name__}")
        if phase not in ("linear", "minimum"):
            raise ValueError(f"phase must be 'linear' or 'minimum', not {phase!r}")
        self.in_rate = in_hz
        self.out_rate = out_hz
        self.phase = phase
        cdef int g = _gcd(in_rate, out_rate)
        self.L = out_rate // g
        self.M = in_rate // g
        self.busy = False
        if self.L == self.M:
            self.delay_ms = 0.0
            self.history = 0
            self.flush_samples = 0
            return
        cdef int fs_hi = in_rate * self.L
        cdef const ms_filter* f = NULL
        cdef int i
        for i in range(MS_NUM_FILTERS):
            if MS_FILTERS[i].fs_hi == fs_hi and MS_FILTERS[i].minimum_phase == (phase == "minimum"):
                f = &MS_FILTERS[i]
        if f == NULL:
            raise ValueError(f"no filter for {in_rate} -> {out_rate} Hz")
        self.delay_ms = f.delay_ms
        self.filter = f
        self._layout(f)
        # Enough zeros to push the linear-phase group delay, D = (numtaps - 1) / (2L)
        # input samples, out of the filter, and then to reach the first output
        # at or after the last input's delayed time: n + z zeros give
        # ceil((n + z) L / M) outputs, and the last must be at index
        # >= (n - 1 + D) L / M, so z >= D - 1 + M / L (a downsampler's outputs
        # are M / L inputs apart: pushing only D could stop one output short).
        self.flush_samples = max((f.numtaps - 1 + 2 * self.L - 1) // (2 * self.L),
                                 (f.numtaps + 2 * self.M - 2) // (2 * self.L))
        self._ensure(1024)
        self.reset()

    def __init__(self, *args, **kwargs):
        # (set up by __cinit__; a second __init__ would silently keep the old settings)
        if self.initialised or not same_args(self.made, _bind, "Resampler", args, kwargs):
            raise TypeError("a Resampler is set up when made: make a new one for other rates")
        self.initialised = True
        self.made = None

    cdef _layout(self, const ms_filter* f):
        # Phase p computes sum_k h[p + k*L] * x[j0 - k].  Only its nonzero taps
        # are kept (a Nyquist prototype zeroes every L-th or M-th one), each
        # with the buffer position it reads relative to j0.
        cdef int L = self.L, N = f.numtaps
        cdef int p, k, n
        self.stride = (N + L - 1) // L
        self.taps = <float*>PyMem_Malloc(L * self.stride * sizeof(float))
        self.offsets = <int*>PyMem_Malloc(L * self.stride * sizeof(int))
        self.phase_len = <int*>PyMem_Malloc(L * sizeof(int))
        self.src = <const float**>PyMem_Malloc(self.stride * sizeof(float*))
        if self.taps == NULL or self.offsets == NULL or self.phase_len == NULL or self.src == NULL:
            raise MemoryError()
        self.history = 0
        for p in range(L):
            k = 0
            while p + k * L < N:
                if f.taps[p + k * L] != 0.0 and k > self.history:
                    self.history = k
                k += 1
        for p in range(L):
            n = 0
            k = (N - 1 - p) // L
            while k >= 0:  # oldest input first
                if f.taps[p + k * L] != 0.0:
                    self.taps[p * self.stride + n] = f.taps[p + k * L] * L
                    self.offsets[p * self.stride + n] = self.history - k
                    n += 1
                k -= 1
            self.phase_len[p] = n

    cdef int _ensure(self, Py_ssize_t chunk) except -1:
        # room for history + chunk inputs, their M deinterleaved rows, and one
        # phase's outputs; grown, never shrunk, so steady frames never allocate
        cdef Py_ssize_t need = self.history + chunk + self.M
        cdef float* grown
        if need <= self.buf_cap:
            return 0
        grown = <float*>PyMem_Realloc(self.buf, need * sizeof(float))
        if grown == NULL:
            raise MemoryError()
        self.buf = grown
        PyMem_Free(self.lanes)
        PyMem_Free(self.acc)
        # each lane holds every M-th input; one phase computes at most need / M + 2 outputs
        self.lane_cap = need // self.M + 1
        self.lanes = <float*>PyMem_Malloc(self.lane_cap * self.M * sizeof(float))
        self.acc = <float*>PyMem_Malloc((need // self.M + 16) * sizeof(float))
        if self.lanes == NULL or self.acc == NULL:
            self.buf_cap = 0  # (so the next call allocates again rather than writing through NULL)
            raise MemoryError()
        self.buf_cap = need
        return 0

    def __dealloc__(self):
        PyMem_Free(self.taps)
        PyMem_Free(self.phase_len)
        PyMem_Free(self.offsets)
        PyMem_Free(self.src)
        PyMem_Free(self.buf)
        PyMem_Free(self.lanes)
        PyMem_Free(self.acc)

    def reset(self):
        """Forget all history, as if newly constructed."""
        if self.busy:
            raise RuntimeError("Resampler.reset() called while another thread is in process()")
        self.t_next = 0
        self.fed = False
        if self.buf != NULL:
            memset(self.buf, 0, self.history * sizeof(float))

    cdef Py_ssize_t _count(self, Py_ssize_t n) noexcept nogil:
        # outputs for the next n inputs: t_next, t_next+M, ... <= n*L - 1
        cdef int64_t end = <int64_t>n * self.L
        if self.t_next >= end:
            return 0
        return <Py_ssize_t>((end - self.t_next + self.M - 1) // self.M)

    cdef void _run(self, const uint8_t* src, Py_ssize_t n, uint8_t* dst, Py_ssize_t n_out) noexcept nogil:
        cdef int L = self.L, M = self.M, H = self.history
        cdef float* x = self.buf + H
        cdef int16_t* out = <int16_t*>dst
        cdef Py_ssize_t i, k, first, count, w, pos, total = H + n
        cdef int p, K, r
        cdef int64_t t
        cdef const float* h
        cdef float* row
        for i in range(n):
            x[i] = load_le16(src + 2 * i)
        if M > 1:
            # lane r holds buf[r], buf[r+M], ...: outputs m and m+1 of one
            # phase read inputs M apart, which must sit side by side
            for r in range(M):
                row = self.lanes + r * self.lane_cap
                k = 0
                i = r
                while i < total:
                    row[k] = self.buf[i]
                    k += 1
                    i += M
        for first in range(L):
            if first >= n_out:
                break
            # outputs first, first+L, ... share one phase p and step j0 by M
            t = self.t_next + <int64_t>first * M
            p = <int>(t % L)
            w = <Py_ssize_t>(t // L)
            count = (n_out - 1 - first) // L + 1
            K = self.phase_len[p]
            h = self.taps + p * self.stride
            for k in range(K):
                pos = w + self.offsets[p * self.stride + k]
                if M == 1:
                    self.src[k] = self.buf + pos
                else:
                    self.src[k] = self.lanes + (pos % M) * self.lane_cap + pos // M
            ms_fir_lanes(h, K, self.src, <int>count, self.acc)
            for k in range(count):
                out[first + k * L] = to_le16(_to_int16(self.acc[k]))
        self.t_next += <int64_t>n_out * M - <int64_t>n * L
        # keep the last `history` inputs for the next call
        memmove(self.buf, self.buf + n, H * sizeof(float))

    cdef void _run_blocks(self, const uint8_t* src, Py_ssize_t n, uint8_t* dst) noexcept nogil:
        # A long input in blocks: the scratch buffers stay BLOCK-sized whatever one call is given (the output
        # does not depend on how the input is cut).
        cdef Py_ssize_t done = 0, b, c
        while done < n:
            b = n - done if n - done < BLOCK else BLOCK
            c = self._count(b)
            self._run(src + 2 * done, b, dst, c)
            done += b
            dst += 2 * c

    def process(self, pcm, /):
        """Resample a chunk of PCM16 (any buffer of 16-bit samples); returns its byte length times out/in, in whole samples (±1)."""
        cdef Py_buffer view
        cdef Py_ssize_t n, n_out
        cdef bytes out
        cdef uint8_t* dst
        get_audio_buffer(pcm, &view, 2, "PCM16 input")
        try:
            if view.len & 1:
                raise ValueError(f"PCM16 input must have an even number of bytes, got {view.len}")
            if self.L == self.M:
                return PyBytes_FromStringAndSize(<char*>view.buf, view.len)
            if self.busy:
                raise RuntimeError("Resampler.process called concurrently from two threads")
            n = view.len >> 1
            if n:
                self.fed = True
            self._ensure(n if n < BLOCK else BLOCK)
            n_out = self._count(n)
            out = PyBytes_FromStringAndSize(NULL, 2 * n_out)
            dst = <uint8_t*>PyBytes_AS_STRING(out)
            self.busy = True
            try:
                if n >= NOGIL_SAMPLES:
                    with nogil:
                        self._run_blocks(<const uint8_t*>view.buf, n, dst)
                else:
                    self._run_blocks(<const uint8_t*>view.buf, n, dst)
            finally:
                self.busy = False
            return out
        finally:
            PyBuffer_Release(&view)

    def flush(self):
        """Return the audio still inside the filter (its delay), then reset.

        Nothing (``b""``) when no audio came in since the last reset or
        flush: there is no tail to give, only silence.
        """
        if self.L == self.M:
            return b""
        if not self.fed:
            self.reset()
            return b""
        out = self.process(bytes(2 * self.flush_samples))
        self.reset()
        return out

    @property
    def taps(self):
        """The prototype low-pass filter at in_rate * L Hz (unit DC gain); () for a copy."""
        if self.filter == NULL:
            return ()
        return tuple([self.filter.taps[i] for i in range(self.filter.numtaps)])

    @property
    def ratio(self):
        """out_rate / in_rate as (L, M) in lowest terms."""
        return (self.L, self.M)

    def __repr__(self):
        return (f"Resampler({self.in_rate}, {self.out_rate}, phase={self.phase!r}) "
                f"# delay {self.delay_ms:.3f} ms")
