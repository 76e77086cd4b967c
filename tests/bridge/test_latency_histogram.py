"""The native latency histogram (``mediaserver._native._latency``) against a plain-Python reference.

The reference is the histogram the bridge used before it went native: 10 µs
buckets up to 20 ms, an overflow bucket, quantiles as the upper edge of the
bucket holding the rank, capped at the largest sample -- with one fix: a
quantile in the overflow bucket is the largest sample, not 20.01 ms.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mediaserver.bridge.stats import CallStats, LatencyHistogram


class ReferenceHistogram:
    BUCKET_S = 10e-6
    BUCKETS = 2000

    def __init__(self) -> None:
        self.counts = [0] * (self.BUCKETS + 1)
        self.count = 0
        self.total_s = 0.0
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        bucket = int(seconds * 100_000.0)
        self.counts[min(bucket, self.BUCKETS)] += 1
        self.count += 1
        self.total_s += seconds
        self.max_s = max(self.max_s, seconds)

    def quantile(self, q: float) -> float:
        if not self.count:
            return 0.0
        rank = max(q * self.count, 1)  # (the 0-quantile is the smallest sample)
        seen = 0
        for i, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                if i == self.BUCKETS:  # (the Python version gave 20.01 ms here, whatever the samples)
                    return self.max_s
                return min((i + 1) * self.BUCKET_S, self.max_s)
        return self.max_s


samples = st.lists(
    st.one_of(
        st.floats(min_value=-1.0, max_value=0.05, allow_nan=False),
        st.sampled_from([0.0, 10e-6, 9.999e-6, 0.019999, 0.02, 0.020001, 1e6]),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(samples, st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=5))
def test_native_histogram_matches_the_reference(values: list[float], qs: list[float]) -> None:
    native, reference = LatencyHistogram(), ReferenceHistogram()
    for value in values:
        native.add(value)
        reference.add(value)
    assert (native.count, native.max_s) == (reference.count, reference.max_s)
    assert native.total_s == pytest.approx(reference.total_s, rel=1e-12, abs=1e-15)
    for q in [*qs, 0.5, 0.99, 1.0]:
        assert native.quantile(q) == reference.quantile(q)


# Samples in the middle of their 10 µs bucket (and some beyond 20 ms), bounds on bucket edges: a
# sample counts towards a bound exactly when it is below it.
mid_bucket = st.lists(st.integers(min_value=0, max_value=2200).map(lambda n: n * 10e-6 + 5e-6), max_size=200)
edges = st.lists(st.integers(min_value=0, max_value=2500), max_size=10).map(lambda ns: [n * 10e-6 for n in sorted(ns)])


@settings(max_examples=200, deadline=None)
@given(mid_bucket, mid_bucket, edges)
def test_merge_and_counts_below_match_the_samples(first: list[float], second: list[float], bounds: list[float]) -> None:
    merged, other, reference = LatencyHistogram(), LatencyHistogram(), ReferenceHistogram()
    for value in first:
        merged.add(value)
        reference.add(value)
    for value in second:
        other.add(value)
        reference.add(value)
    merged.merge(other)
    assert (merged.count, merged.max_s) == (reference.count, reference.max_s)
    assert merged.total_s == pytest.approx(reference.total_s, rel=1e-12, abs=1e-15)
    assert merged.quantile(0.99) == reference.quantile(0.99)
    samples = first + second
    assert merged.counts_below(bounds) == [sum(1 for s in samples if s < min(bound, 0.02)) for bound in bounds]
    assert other.count == len(second)  # merging leaves its argument as it was


def test_the_0_quantile_is_the_smallest_sample_and_an_infinite_edge_counts_every_bucket() -> None:
    histogram = LatencyHistogram()
    for seconds in (0.005, 0.006, 0.007, 0.5):
        histogram.add(seconds)
    assert histogram.quantile(0.0) == pytest.approx(0.00501)  # the upper edge of 5 ms's bucket, not of an empty one
    assert histogram.counts_below([0.01, math.inf]) == [3, 3]  # (0.5 s is past the last bucket: in no edge's count)
    assert histogram.counts_below([1e15]) == [3]
    with pytest.raises(ValueError, match="ascending"):
        histogram.counts_below([math.inf, 0.01])


def test_histogram_summary_and_edges() -> None:
    histogram = LatencyHistogram()
    assert (histogram.quantile(0.99), histogram.summary_ms()) == (0.0, "n/a")
    for value in [0.00012] * 98 + [0.0031, 0.5]:
        histogram.add(value)
    assert histogram.quantile(0.5) == pytest.approx(0.00013)
    assert histogram.quantile(0.99) == pytest.approx(0.00311)  # the 10 µs bucket [3.10, 3.11) ms
    assert histogram.quantile(1.0) == 0.5  # the overflow bucket: capped at the largest sample
    assert histogram.summary_ms() == "p50 0.13 p99 3.11 max 500.00 ms"
    histogram.add(math.nan)  # counts as 0, never a crash
    histogram.add(-1.0)
    assert (histogram.count, histogram.max_s) == (102, 0.5)
    assert (LatencyHistogram.BUCKET_S, LatencyHistogram.BUCKETS) == (10e-6, 2000)


def test_call_stats_have_their_own_histograms() -> None:
    a, b = CallStats("CA1", "echo", 0.0), CallStats("CA2", "echo", 0.0)
    a.uplink.add(0.001)
    assert (a.uplink.count, a.downlink.count, b.uplink.count) == (1, 0, 0)
