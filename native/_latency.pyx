# cython: language_level=3
"""A latency histogram cheap enough for every frame of every call.

Why: the bridge records the latency it adds to every uplink frame and every
downlink chunk (~60 samples a second per call).  In Python each sample
rebinds an int in a 2001-slot list (a fresh int object past 256) and costs
~0.3 µs; here it is one increment in a C array.
"""

from libc.stdint cimport uint64_t

cdef enum:
    NBUCKETS = 2000


cdef class LatencyHistogram:
    """Latencies in 10 µs buckets up to 20 ms (plus an overflow bucket): O(1) per sample.

    ``quantile(q)`` is the upper edge of the bucket holding the q-quantile,
    capped at the largest sample (the largest sample itself when that is the
    overflow bucket); ``count``, ``total_s`` and ``max_s`` are
    running totals.  A negative (or NaN) sample counts as 0.
    """

    BUCKET_S = 10e-6
    BUCKETS = NBUCKETS

    cdef uint64_t _counts[NBUCKETS + 1]
    cdef readonly Py_ssize_t count
    cdef readonly double total_s
    cdef readonly double max_s

    def __cinit__(self):
        cdef int i
        for i in range(NBUCKETS + 1):
            self._counts[i] = 0
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def add(self, double seconds):
        cdef Py_ssize_t bucket
        if not seconds >= 0.0:  # (NaN too)
            seconds = 0.0
        if seconds >= NBUCKETS * 10e-6:
            bucket = NBUCKETS
        else:
            bucket = <Py_ssize_t>(seconds * 100000.0)  # / BUCKET_S
            if bucket > NBUCKETS:
                bucket = NBUCKETS
        self._counts[bucket] += 1
        self.count += 1
        self.total_s += seconds
        if seconds > self.max_s:
            self.max_s = seconds

    def quantile(self, double q):
        """Upper edge of the bucket holding the q-quantile (seconds); 0 when empty."""
        cdef double rank, edge
        cdef uint64_t seen = 0
        cdef int i
        if not self.count:
            return 0.0
        rank = q * self.count
        if rank < 1.0:  # (the 0-quantile is the smallest sample: the first bucket holding one)
            rank = 1.0
        for i in range(NBUCKETS + 1):
            seen += self._counts[i]
            if seen >= rank:
                if i == NBUCKETS:  # the overflow bucket has no upper edge
                    return self.max_s
                edge = (i + 1) * 10e-6
                return edge if edge < self.max_s else self.max_s
        return self.max_s

    def merge(self, LatencyHistogram other not None):
        """Add ``other``'s samples to this histogram (a server's totals over its calls)."""
        cdef int i
        for i in range(NBUCKETS + 1):
            self._counts[i] += other._counts[i]
        self.count += other.count
        self.total_s += other.total_s
        if other.max_s > self.max_s:
            self.max_s = other.max_s

    def counts_below(self, edges):
        """For each edge (seconds, ascending), how many samples lie in whole buckets below it.

        For edges that are multiples of ``BUCKET_S`` up to 20 ms (a
        Prometheus histogram's ``le`` bounds) that is every sample below the
        edge: a bucket ``[a, a + 10 µs)`` counts towards every edge ``>= a +
        10 µs`` (a sample exactly on an edge may land in the bucket above
        it).  Samples of 20 ms and more are in no edge's count.
        """
        cdef list out = []
        cdef uint64_t seen = 0
        cdef Py_ssize_t at = 0, stop
        cdef double edge
        for value in edges:
            edge = value
            if not edge >= 0.0:
                raise ValueError(f"histogram edges must be non-negative, not {value!r}")
            if edge >= NBUCKETS / 100000.0:  # (also +Inf, Prometheus' last bound: no cast of a huge double)
                stop = NBUCKETS
            else:
                stop = <Py_ssize_t>(edge * 100000.0 + 1e-6)  # whole buckets below the edge
            if stop < at:
                raise ValueError("histogram edges must be ascending")
            while at < stop:
                seen += self._counts[at]
                at += 1
            out.append(seen)
        return out

    def summary_ms(self):
        if not self.count:
            return "n/a"
        return f"p50 {self.quantile(0.5) * 1e3:.2f} p99 {self.quantile(0.99) * 1e3:.2f} max {self.max_s * 1e3:.2f} ms"
