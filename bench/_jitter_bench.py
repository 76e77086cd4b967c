"""Jitter buffer bench: native kernel against the plain-Python reference.

Each frame is pushed and then popped until ``pop()`` returns ``None``, as the
uplink pump does, so one row's figure is the cost of one frame's push plus
its pops, in ns, median over ``repeats`` timed runs after ``warmup`` runs.
Frames are 160 bytes (20 ms of 8 kHz µ-law); "5% swaps" exchanges a random
5% of neighbouring pairs (seed fixed).  ``bench_jitter()`` returns the rows;
run this file to print them.
"""

from __future__ import annotations

import random
import statistics
import time

from mediaserver._native._jitter import JitterBuffer
from mediaserver.codec._reference.jitter import JitterBuffer as ReferenceJitterBuffer

FRAME_BYTES = 160  # 20 ms of 8 kHz G.711
SEED = 20_240_611


def arrivals(frames: int, swap_rate: float, seed: int = SEED) -> list[int]:
    """Sequence numbers 1..frames with a fraction of adjacent pairs swapped."""
    rng = random.Random(seed)
    seqs = list(range(1, frames + 1))
    i = 0
    while i < frames - 1:
        if rng.random() < swap_rate:
            seqs[i], seqs[i + 1] = seqs[i + 1], seqs[i]
            i += 2
        else:
            i += 1
    return seqs


def _run_once(cls: type[JitterBuffer] | type[ReferenceJitterBuffer], seqs: list[int], frame: bytes) -> float:
    jb = cls(depth=2, frame_bytes=FRAME_BYTES, first_seq=1)
    push, pop = jb.push, jb.pop
    start = time.perf_counter_ns()
    for seq in seqs:
        push(seq, frame)
        while pop() is not None:
            pass
    elapsed = time.perf_counter_ns() - start
    assert jb.stats.played == len(seqs), jb.stats
    return elapsed / len(seqs)


def bench_jitter(frames: int = 20_000, repeats: int = 9, warmup: int = 2) -> list[tuple[str, float]]:
    """Rows of (name, median ns per frame for push + pops) for both implementations."""
    frame = bytes(range(FRAME_BYTES))
    rows = []
    for label, swap_rate in (("in order", 0.0), ("5% swaps", 0.05)):
        for impl, cls in (("native", JitterBuffer), ("reference", ReferenceJitterBuffer)):
            n = frames if impl == "native" else min(frames, 2000)  # the reference is 10x slower
            seqs = arrivals(n, swap_rate)
            for _ in range(warmup):
                _run_once(cls, seqs, frame)
            times = [_run_once(cls, seqs, frame) for _ in range(repeats)]
            rows.append((f"jitter {impl}, {label}", statistics.median(times)))
    return rows


if __name__ == "__main__":
    results = bench_jitter()
    width = max(len(name) for name, _ in results)
    print(f"{'kernel':<{width}}  ns/frame (push + pops, 160 B)")
    for name, ns in results:
        print(f"{name:<{width}}  {ns:8.1f}")
