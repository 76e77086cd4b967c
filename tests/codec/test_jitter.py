"""JitterBuffer: scenario tests, then property tests against the reference.

The reference (``mediaserver/codec/_reference/jitter.py``) keeps waiting
frames in a dict and has no ring; the native kernel must give the same frames,
the same concealment bytes and the same counters for any input.
"""

from __future__ import annotations

import array
import random
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mediaserver._native._g711 import alaw_decode, ulaw_decode
from mediaserver._native._jitter import SEQ_LIMIT, JitterBuffer, JitterStats
from mediaserver.codec._reference import jitter as ref

MAX_SEQ = 2**63 - 1


def frame(seq: int, size: int = 160) -> bytes:
    return bytes((seq * 37 + i) & 0xFF for i in range(size))


Impl = type[JitterBuffer] | type[ref.JitterBuffer]
# Scenario tests run on both: the reference must obey them too.
IMPLS = pytest.mark.parametrize("impl", [JitterBuffer, ref.JitterBuffer], ids=["native", "reference"])


def feed(jb: Any, seqs: list[int], size: int = 160) -> list[bytes]:
    """Push each frame and pop eagerly, as the uplink pump does."""
    out = []
    for seq in seqs:
        jb.push(seq, frame(seq, size))
        while (f := jb.pop()) is not None:
            out.append(f)
    return out


def accounted(jb: Any) -> bool:
    s = jb.stats
    return s.received == s.played + s.duplicates + s.late + s.dropped + len(jb)


# -- scenarios ---------------------------------------------------------------


@IMPLS
def test_jitter_in_order_has_no_latency_and_returns_the_pushed_objects(impl: Impl) -> None:
    jb = impl()
    assert jb.pop() is None
    assert jb.next_seq is None
    for seq in range(1, 101):
        f = frame(seq)
        jb.push(seq, f)
        assert len(jb) == 1
        assert jb.pop() is f  # no copy, no wait
        assert jb.pop() is None
        assert jb.next_seq == seq + 1
    assert jb.stats == JitterStats(100, 100, 0, 0, 0, 0, 0, 0)


@IMPLS
def test_jitter_swapped_frames_are_put_back_in_order(impl: Impl) -> None:
    jb = impl(depth=2)
    assert feed(jb, [1, 3, 2, 4, 6, 5]) == [frame(s) for s in range(1, 7)]
    assert jb.stats.reordered == 2
    assert jb.stats.concealed == 0
    assert accounted(jb)


@IMPLS
def test_jitter_waits_for_a_missing_frame_until_depth_is_exceeded(impl: Impl) -> None:
    jb = impl(depth=2)
    assert feed(jb, [1, 3, 4]) == [frame(1)]  # 2 missing, two later frames wait
    assert len(jb) == 2
    assert feed(jb, [5]) == [b"\xff" * 160, frame(3), frame(4), frame(5)]
    assert jb.stats.concealed == 1
    assert jb.next_seq == 6


@IMPLS
def test_jitter_depth_zero_conceals_at_once(impl: Impl) -> None:
    jb = impl(depth=0)
    assert feed(jb, [1, 3, 2]) == [frame(1), b"\xff" * 160, frame(3)]
    assert jb.stats.late == 1


@IMPLS
def test_jitter_lost_frames_are_concealed_one_per_sequence_number(impl: Impl) -> None:
    jb = impl(depth=1)
    out = feed(jb, [1, 2, 6, 7])  # 3, 4, 5 lost
    assert out == [frame(1), frame(2)] + [b"\xff" * 160] * 3 + [frame(6), frame(7)]
    assert jb.stats.concealed == 3
    assert jb.stats.played == 4


@IMPLS
def test_jitter_late_frame_is_dropped_and_counted(impl: Impl) -> None:
    jb = impl(depth=1)
    feed(jb, [1, 3, 4])  # 2 concealed
    assert feed(jb, [2]) == []
    assert jb.stats.late == 1
    assert feed(jb, [5]) == [frame(5)]
    assert accounted(jb)


@IMPLS
def test_jitter_duplicates_waiting_or_played_are_dropped(impl: Impl) -> None:
    jb = impl(depth=2)
    assert feed(jb, [1, 1, 3, 3]) == [frame(1)]
    assert jb.stats.duplicates == 2
    assert feed(jb, [2, 2, 1]) == [frame(2), frame(3)]
    assert jb.stats.duplicates == 4  # 2 again (played) and 1 again (played)
    assert jb.stats.late == 0
    assert accounted(jb)


@IMPLS
def test_jitter_duplicate_of_a_concealed_frame_counts_as_late(impl: Impl) -> None:
    jb = impl(depth=0)
    feed(jb, [1, 3])
    jb.push(2, frame(2))
    jb.push(2, frame(2))
    assert jb.stats.late == 2
    assert jb.stats.duplicates == 0


@IMPLS
def test_jitter_very_old_repeat_counts_as_late(impl: Impl) -> None:
    jb = impl(capacity=64)
    feed(jb, list(range(1, 200)))
    jb.push(199 - 64 + 1, b"x")  # played, capacity behind: still a duplicate
    jb.push(199 - 64, b"x")  # played, too far behind to tell
    assert jb.stats.duplicates == 1
    assert jb.stats.late == 1


@IMPLS
def test_jitter_first_pushed_frame_sets_the_start_until_play_out_begins(impl: Impl) -> None:
    jb = impl()
    jb.push(5, frame(5))
    jb.push(3, frame(3))  # nothing popped yet: start moves back
    assert jb.next_seq == 3
    assert feed(jb, [4]) == [frame(3), frame(4), frame(5)]
    assert feed(jb, [2]) == []  # play-out has begun
    assert jb.stats.late == 1
    assert jb.stats.reordered == 2


@IMPLS
def test_jitter_start_moves_back_only_within_capacity(impl: Impl) -> None:
    jb = impl(capacity=64)
    jb.push(100, b"a")
    jb.push(100 - 63, b"b")  # the waiting frames span 64 sequence numbers: fits
    jb.push(100 - 64, b"c")  # would span 65
    assert (len(jb), jb.next_seq, jb.stats.late) == (2, 37, 1)


@IMPLS
def test_jitter_first_seq_fixes_the_start(impl: Impl) -> None:
    jb = impl(depth=2, first_seq=1)
    assert jb.next_seq == 1
    assert feed(jb, [2, 3]) == []
    assert feed(jb, [4]) == [b"\xff" * 160, frame(2), frame(3), frame(4)]
    jb = impl(first_seq=10)
    jb.push(9, b"x")
    assert jb.stats.late == 1
    assert jb.next_seq == 10


@IMPLS
def test_jitter_far_jump_resyncs_instead_of_concealing_the_gap(impl: Impl) -> None:
    jb = impl(depth=2, capacity=64)
    feed(jb, [1, 2, 4])  # 3 missing, 4 waiting
    out = feed(jb, [10_000, 10_001, 10_002])
    assert out == [frame(10_000), frame(10_001), frame(10_002)]
    s = jb.stats
    assert (s.resyncs, s.dropped, s.concealed) == (1, 1, 0)
    assert jb.next_seq == 10_003
    feed(jb, [3, 4])
    assert jb.stats.late == 2
    assert accounted(jb)


@IMPLS
def test_jitter_gap_shorter_than_capacity_is_concealed(impl: Impl) -> None:
    jb = impl(depth=0, capacity=8)
    out = feed(jb, [1, 8])  # 7 - 1 < 8: within the ring
    assert out == [frame(1)] + [b"\xff" * 160] * 6 + [frame(8)]
    out = feed(jb, [17])  # 17 - 9 = 8 >= capacity: resync
    assert out == [frame(17)]
    assert jb.stats.resyncs == 1


@IMPLS
@pytest.mark.parametrize("depth", [0, 2, 5])
def test_jitter_every_gap_shorter_than_capacity_is_concealed_when_frames_follow_it(impl: Impl, depth: int) -> None:
    # The frames after the gap: once depth + 1 of them wait, the last is capacity or more ahead of the play-out
    # point for the longest gaps; they were dropped by a resync (a 62-frame gap at depth 2 lost 2 real frames).
    cap = 64
    for gap in range(1, cap):
        jb = impl(depth=depth, capacity=cap, first_seq=1)
        after = list(range(2 + gap, 2 + gap + depth + 3))
        out = feed(jb, [1, *after]) + jb.drain()
        assert out == [frame(1)] + [b"\xff" * 160] * gap + [frame(seq) for seq in after], gap
        s = jb.stats
        assert (s.played, s.concealed, s.resyncs, s.dropped, s.late) == (1 + len(after), gap, 0, 0, 0), gap
    for gap in (cap, cap + 1, 1000):  # a gap of capacity or more is skipped
        jb = impl(depth=depth, capacity=cap, first_seq=1)
        feed(jb, [1])
        assert feed(jb, [2 + gap]) == [frame(2 + gap)] and jb.stats.resyncs == 1


@IMPLS
def test_jitter_concealment_owed_for_a_passed_gap_comes_first_and_late_frames_from_it_are_late(impl: Impl) -> None:
    jb = impl(depth=2, capacity=8, first_seq=1)
    assert feed(jb, [1, 8, 9]) == [frame(1)]  # 2-7 missing, 8 and 9 wait
    assert jb.next_seq == 2
    # 10 - 2 >= capacity, but 8, 9 and 10 fit in the ring: the point moves to 3, and 2 is owed
    assert feed(jb, [10]) == [b"\xff" * 160] * 6 + [frame(8), frame(9), frame(10)]
    assert jb.next_seq == 11 and jb.stats.resyncs == 0
    jb = impl(depth=2, capacity=8, first_seq=1)
    feed(jb, [1])
    for seq in (8, 9, 10, 11):  # no pops: the point moves to 3, then to 4
        jb.push(seq, frame(seq))
    assert jb.next_seq == 2 and len(jb) == 4
    jb.push(2, frame(2))  # owed: its turn has passed
    jb.push(3, frame(3))
    assert jb.stats.late == 2
    assert jb.drain() == [b"\xff" * 160] * 6 + [frame(8), frame(9), frame(10), frame(11)]
    assert jb.next_seq == 12 and accounted(jb)


@IMPLS
def test_jitter_holds_at_most_capacity_frames_without_pops(impl: Impl) -> None:
    jb = impl(capacity=8)
    for seq in range(100, 108):
        jb.push(seq, frame(seq))
    assert len(jb) == 8
    jb.push(108, frame(108))  # outside the ring: not a queue
    assert len(jb) == 1
    assert jb.stats.dropped == 8
    assert jb.pop() == frame(108)


@IMPLS
@pytest.mark.parametrize("start", [0, 2**40, 2**62 + 12345, MAX_SEQ - 300])
def test_jitter_large_sequence_numbers(impl: Impl, start: int) -> None:
    jb = impl(depth=2)
    seqs = [start + i for i in (0, 2, 1, 3, 5, 6, 7, 8)]
    out = feed(jb, seqs)
    expect = [frame(start + i) for i in range(5)] + [frame(start + i) for i in (5, 6, 7, 8)]
    expect[4] = b"\xff" * 160
    assert out == expect
    assert jb.next_seq == start + 9


@IMPLS
def test_jitter_last_sequence_number_plays_and_then_everything_is_late(impl: Impl) -> None:
    jb = impl(depth=1)
    out = feed(jb, [MAX_SEQ - 2, MAX_SEQ, MAX_SEQ - 1])
    assert out == [frame(MAX_SEQ - 2), frame(MAX_SEQ - 1), frame(MAX_SEQ)]
    assert jb.next_seq == 2**63 == SEQ_LIMIT
    jb.push(MAX_SEQ, b"x")
    jb.push(0, b"x")
    assert jb.stats.duplicates == 1
    assert jb.stats.late == 1
    assert jb.pop() is None


@pytest.mark.parametrize("seq", [-1, -(2**63), 2**63, 2**64, 10**30])
def test_jitter_out_of_range_sequence_number_is_a_value_error(seq: int) -> None:
    jb = JitterBuffer()
    with pytest.raises(ValueError, match=r"sequence number must be in \[0, 2\*\*63\)"):
        jb.push(seq, b"x")
    with pytest.raises(ValueError, match="sequence number"):
        JitterBuffer(first_seq=seq)
    with pytest.raises(ValueError, match="sequence number"):
        jb.reset(first_seq=seq)
    assert jb.stats.received == 0


@pytest.mark.parametrize("seq", [1.0, "1", None, True, b"\x01"])
def test_jitter_non_integer_sequence_number_is_a_type_error(seq: object) -> None:
    jb = JitterBuffer()
    with pytest.raises(TypeError, match="sequence number must be an int"):
        jb.push(seq, b"x")  # type: ignore[arg-type]
    assert jb.stats.received == 0


@IMPLS
def test_jitter_accepts_integer_like_sequence_numbers(impl: Impl) -> None:
    jb = impl()
    jb.push(np.int64(7), b"a")
    jb.push(np.uint64(8), b"b")
    assert jb.drain() == [b"a", b"b"]


@IMPLS
def test_jitter_non_bytes_frames_are_copied_once(impl: Impl) -> None:
    jb = impl(depth=0)
    buf = bytearray(b"abc")
    jb.push(1, buf)
    jb.push(2, memoryview(b"defg")[1:])
    jb.push(3, array.array("B", [1, 2]))
    buf[0] = 0  # the buffer keeps the frame as it was pushed
    out = jb.drain()
    assert out == [b"abc", b"efg", b"\x01\x02"]
    assert all(type(f) is bytes for f in out)
    with pytest.raises(TypeError):
        jb.push(4, "text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        jb.push(4, [1, 2, 3])  # type: ignore[arg-type]
    assert jb.stats.received == 3


@IMPLS
def test_jitter_frames_of_another_sample_type_are_refused(impl: Impl) -> None:
    """µ-law frames are bytes; PCM16 frames bytes or little-endian int16: a float or int16-in-µ-law frame is refused."""
    ulaw = impl(depth=0)
    with pytest.raises(TypeError, match="frame must be bytes \\(one code per byte\\), not an array of items 'h'"):
        ulaw.push(1, array.array("h", [1, 2]))
    pcm = impl(depth=0, frame_bytes=4, codec="pcm16")
    pcm.push(1, array.array("h", [1, -2]))
    pcm.push(2, np.array([3, 4], dtype="<i2"))
    for bad in (np.zeros(2, np.float32), np.zeros(2, ">i2"), np.zeros(2, np.int32)):
        with pytest.raises(TypeError, match="frame must be bytes or an array of little-endian int16"):
            pcm.push(3, bad)
    with pytest.raises(ValueError, match="one-dimensional"):
        pcm.push(3, np.zeros((2, 1), np.int16))
    with pytest.raises(ValueError):
        pcm.push(3, np.zeros(4, np.int16)[::2])  # not contiguous
    with pytest.raises(TypeError, match="fill must be bytes or an array of little-endian int16"):
        impl(depth=0, frame_bytes=4, codec="pcm16", fill=np.zeros(1, np.float32))
    assert pcm.drain() == [b"\x01\x00\xfe\xff", b"\x03\x00\x04\x00"]
    assert (ulaw.stats.received, pcm.stats.received) == (0, 2)


@IMPLS
def test_jitter_frames_of_any_length_pass_through(impl: Impl) -> None:
    jb = impl(depth=0, frame_bytes=160)
    assert feed(jb, [1, 2, 4], size=7) == [frame(1, 7), frame(2, 7), b"\xff" * 160, frame(4, 7)]
    jb.push(5, b"")
    assert jb.pop() == b""


@IMPLS
@pytest.mark.parametrize(
    ("codec", "frame_bytes", "silence"),
    [("ulaw", 160, b"\xff"), ("alaw", 160, b"\xd5"), ("pcm16", 320, b"\x00")],
)
def test_jitter_silence_matches_the_codec(impl: Impl, codec: str, frame_bytes: int, silence: bytes) -> None:
    jb = impl(depth=0, frame_bytes=frame_bytes, codec=codec)  # type: ignore[arg-type]
    out = feed(jb, [1, 3], size=frame_bytes)
    assert out[1] == silence * frame_bytes
    decode = {"ulaw": ulaw_decode, "alaw": alaw_decode, "pcm16": bytes}[codec]
    # A-law has no code for 0: 0xD5 decodes to +8, its smallest step
    assert np.abs(np.frombuffer(decode(out[1]), "<i2")).max() <= 8


@IMPLS
def test_jitter_silence_frame_is_shared_not_allocated(impl: Impl) -> None:
    jb = impl(depth=0)
    out = feed(jb, [1, 3, 5])
    assert out[1] is out[3]


@IMPLS
def test_jitter_explicit_fill_frame(impl: Impl) -> None:
    fill = b"\x7e" * 160
    jb = impl(depth=0, fill=bytearray(fill))
    out = feed(jb, [1, 4])
    assert out[1:3] == [fill, fill]


@IMPLS
def test_jitter_fade_ramps_the_last_frame_down_then_goes_silent(impl: Impl) -> None:
    last = np.array([1000, -1000, 32767, -32768], dtype="<i2").tobytes()
    jb = impl(depth=0, frame_bytes=8, fill="fade", codec="pcm16")
    jb.push(1, last)
    jb.push(4, last)
    out = [jb.pop() for _ in range(4)]
    assert out[0] is last
    # gains 3/4, 2/4, 1/4, 0, truncated toward zero
    assert np.frombuffer(out[1], "<i2").tolist() == [750, -500, 8191, 0]
    assert out[2] == bytes(8)  # a second concealment in a row is silence
    assert out[3] is last


@IMPLS
@pytest.mark.parametrize("codec", ["ulaw", "alaw"])
def test_jitter_fade_g711_decays_to_silence(impl: Impl, codec: str) -> None:
    decode = ulaw_decode if codec == "ulaw" else alaw_decode
    rng = random.Random(1)
    last = bytes(rng.randrange(256) for _ in range(160))
    jb = impl(depth=0, fill="fade", codec=codec)  # type: ignore[arg-type]
    jb.push(1, last)
    jb.push(3, b"z")
    assert jb.pop() is last
    faded = jb.pop()
    assert faded is not None
    assert faded == ref.fade_frame(last, 160, codec)
    x = np.abs(np.frombuffer(decode(last), "<i2").astype(int))
    y = np.abs(np.frombuffer(decode(faded), "<i2").astype(int))
    assert (y <= x).all()  # G.711 quantisation is monotonic
    assert y[-1] <= 8  # 0 (µ-law) or A-law's smallest step
    assert y[-20:].sum() < x[-20:].sum() / 4


@IMPLS
def test_jitter_fade_without_a_played_frame_is_silence(impl: Impl) -> None:
    jb = impl(depth=0, fill="fade", first_seq=1)
    jb.push(2, frame(2))
    assert jb.pop() == b"\xff" * 160


@IMPLS
def test_jitter_fade_of_a_short_or_long_frame_is_frame_bytes_long(impl: Impl) -> None:
    jb = impl(depth=0, frame_bytes=8, fill="fade", codec="pcm16")
    jb.push(1, np.array([400, 400, 400], "<i2").tobytes() + b"\x01")  # 3.5 samples
    jb.push(3, b"")
    jb.pop()
    assert np.frombuffer(jb.pop() or b"", "<i2").tolist() == [300, 200, 100, 0]
    jb.push(4, np.full(10, 800, "<i2").tobytes())
    jb.push(6, b"")
    jb.pop()
    jb.pop()
    assert np.frombuffer(jb.pop() or b"", "<i2").tolist() == [600, 400, 200, 0]


@IMPLS
def test_jitter_drain_returns_the_rest_in_order_with_gaps_concealed(impl: Impl) -> None:
    jb = impl(depth=4)
    assert feed(jb, [1, 2, 4, 6]) == [frame(1), frame(2)]
    assert jb.drain() == [b"\xff" * 160, frame(4), b"\xff" * 160, frame(6)]
    assert len(jb) == 0
    assert jb.next_seq == 7
    assert jb.drain() == []


@IMPLS
def test_jitter_reset_starts_a_new_stream_and_keeps_the_counters(impl: Impl) -> None:
    jb = impl(depth=2)
    feed(jb, [100, 101, 103])
    jb.reset()
    assert jb.next_seq is None
    assert len(jb) == 0
    assert feed(jb, [1, 2]) == [frame(1), frame(2)]
    s = jb.stats
    assert (s.received, s.played, s.dropped) == (5, 4, 1)
    jb.reset(first_seq=1)
    assert jb.next_seq == 1
    assert accounted(jb)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": -1}, "depth must be >= 0"),
        ({"frame_bytes": 0}, "frame_bytes must be > 0"),
        ({"frame_bytes": -160}, "frame_bytes must be > 0"),
        ({"frame_bytes": 161, "codec": "pcm16"}, "must be even for pcm16"),
        ({"codec": "opus"}, "codec must be 'ulaw', 'alaw' or 'pcm16'"),
        ({"codec": None}, "codec must be"),
        ({"fill": "noise"}, "fill must be 'silence', 'fade' or a frame"),
        ({"fill": b"\xff" * 159}, "fill frame must be frame_bytes=160 bytes long, got 159"),
        ({"capacity": 48}, "capacity must be a power of two"),
        ({"capacity": 0}, "capacity must be a power of two"),
        ({"capacity": 2**21}, "capacity must be a power of two <= 2\\*\\*20"),
        ({"depth": 7, "capacity": 8}, "capacity must be >= depth \\+ 2 = 9"),
        ({"depth": 2**19}, "depth must be <"),
    ],
)
def test_jitter_bad_arguments_are_value_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        JitterBuffer(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs", [{"depth": 2.0}, {"frame_bytes": "160"}, {"capacity": 64.0}, {"depth": True}])
def test_jitter_non_integer_arguments_are_type_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(TypeError, match="must be an int"):
        JitterBuffer(**kwargs)  # type: ignore[arg-type]


def test_jitter_default_capacity_grows_with_depth() -> None:
    assert JitterBuffer().capacity == 64
    assert JitterBuffer(depth=31).capacity == 64
    assert JitterBuffer(depth=32).capacity == 128
    assert JitterBuffer(depth=3, capacity=8).capacity == 8
    jb = JitterBuffer(depth=5, frame_bytes=320, codec="pcm16")
    assert (jb.depth, jb.frame_bytes) == (5, 320)
    assert "depth=5" in repr(jb)


def test_jitter_holds_no_references_after_pop_or_dealloc() -> None:
    f = frame(1) + b"unique"
    base = sys.getrefcount(f)
    jb = JitterBuffer(fill="fade")
    jb.push(1, f)
    assert sys.getrefcount(f) == base + 1
    out = jb.pop()
    assert sys.getrefcount(f) == base + 2  # `out` and the fade source
    del out
    jb.reset()
    assert sys.getrefcount(f) == base
    for seq in (2, 5, 9):
        jb.push(seq, f)
    assert sys.getrefcount(f) == base + 3
    del jb
    assert sys.getrefcount(f) == base


def test_jitter_cannot_be_pickled() -> None:
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(JitterBuffer())


# -- properties against the reference ------------------------------------------

# (kind, arg, frame size): ("push", seq, size); ("back"|"below", k, size)
# pushes capacity + k before the play-out point / the newest frame;
# ("stream", n, size) pushes n frames in order after the newest, popping
# eagerly; ("pop", n, 0) pops n times; ("drain", 0, 0); ("reset", first_seq
# or -1, 0)
PushOp = tuple[str, int, int]

BASES = st.sampled_from([0, 1, 2**40, 2**63 - 5000])


@st.composite
def configs(draw: st.DrawFn) -> dict[str, object]:
    codec = draw(st.sampled_from(["ulaw", "alaw", "pcm16"]))
    frame_bytes = draw(st.sampled_from([2, 8, 160]))
    depth = draw(st.integers(0, 5))
    capacity = draw(st.sampled_from([None, 8, 16, 32]).filter(lambda c: c is None or c >= depth + 2))
    fill: object = draw(st.sampled_from(["silence", "fade", "explicit"]))
    if fill == "explicit":
        fill = bytes([0x5A]) * frame_bytes
    return {"depth": depth, "frame_bytes": frame_bytes, "fill": fill, "codec": codec, "capacity": capacity}


def payload(seq: int, size: int) -> bytes:
    return bytes((seq * 131 + i * 7) & 0xFF for i in range(size))


def run_both(config: dict[str, object], first_seq: int | None, ops: list[PushOp]) -> JitterBuffer:
    """Apply ops to the kernel and the reference; compare after every step."""
    nat = JitterBuffer(**config, first_seq=first_seq)  # type: ignore[arg-type]
    rf = ref.JitterBuffer(**config, first_seq=first_seq)  # type: ignore[arg-type]
    top = -1  # highest sequence number pushed since the last reset
    for kind, arg, size in ops:
        if kind in ("back", "below"):
            # capacity + arg before the play-out point / the newest frame:
            # the edges of duplicate detection and of the movable start
            anchor = (nat.next_seq if kind == "back" else top if top >= 0 else None) or 0
            kind, arg = "push", min(max(anchor - nat.capacity - arg, 0), 2**63 - 1)
        elif kind == "stream":
            # a run of `arg` consecutive frames after the newest, popped eagerly
            start = top + 1 if top >= 0 else (nat.next_seq or 0)
            for seq in range(start, min(start + arg, 2**63)):
                f = payload(seq, size)
                nat.push(seq, f)
                rf.push(seq, f)
                top = seq
                while (got := nat.pop()) is not None:
                    assert got == rf.pop()
                assert rf.pop() is None
            kind = "checked"
        if kind == "push":
            f = payload(arg, size)
            nat.push(arg, f)
            rf.push(arg, f)
            top = max(top, arg)
        elif kind == "pop":
            for _ in range(arg):
                assert nat.pop() == rf.pop()
        elif kind == "drain":
            assert nat.drain() == rf.drain()
        elif kind == "reset":
            nat.reset(arg if arg >= 0 else None)
            rf.reset(arg if arg >= 0 else None)
            top = -1
        assert len(nat) == len(rf)
        assert nat.next_seq == rf.next_seq
        assert nat.stats == rf.stats
        assert accounted(nat)
    assert nat.drain() == rf.drain()
    assert nat.stats == rf.stats
    return nat


@st.composite
def network(draw: st.DrawFn) -> tuple[int, list[int]]:
    """A stream after a network: frames dropped, duplicated and displaced."""
    base = draw(BASES)
    n = draw(st.integers(0, 150))
    seqs = list(range(base, base + n))
    lost = draw(st.sets(st.sampled_from(seqs))) if seqs else set()
    seqs = [s for s in seqs if s not in lost]
    if seqs:
        seqs += draw(st.lists(st.sampled_from(seqs), max_size=10))
    keys = draw(st.lists(st.floats(0, 6, allow_nan=False), min_size=len(seqs), max_size=len(seqs)))
    order = sorted(range(len(seqs)), key=lambda i: (seqs[i] - base) + keys[i])
    return base, [seqs[i] for i in order]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), network(), st.booleans(), st.lists(st.integers(0, 3), min_size=1))
def test_jitter_matches_reference_on_a_jittery_network(
    config: dict[str, object], net: tuple[int, list[int]], fixed_start: bool, pops: list[int]
) -> None:
    base, seqs = net
    ops: list[PushOp] = []
    for i, seq in enumerate(seqs):
        ops.append(("push", seq, (seq % 3) * 80 if config["frame_bytes"] == 160 else 8))
        ops.append(("pop", pops[i % len(pops)], 0))
    run_both(config, base if fixed_start else None, ops)


@st.composite
def op_lists(draw: st.DrawFn) -> tuple[int, list[PushOp]]:
    base = draw(BASES)
    op = st.one_of(
        st.tuples(st.just("push"), st.integers(0, 60).map(lambda o: base + o), st.sampled_from([0, 3, 8, 160])),
        st.tuples(st.just("push"), st.integers(0, 4000).map(lambda o: base + o), st.just(8)),
        st.tuples(st.sampled_from(["back", "below"]), st.integers(-3, 2), st.just(3)),
        st.tuples(st.just("stream"), st.integers(1, 80), st.just(2)),
        st.tuples(st.just("pop"), st.integers(1, 4), st.just(0)),
        st.tuples(st.just("drain"), st.just(0), st.just(0)),
        st.tuples(st.just("reset"), st.sampled_from([-1, base, base + 30]), st.just(0)),
    )
    return base, draw(st.lists(op, max_size=120))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs(), op_lists(), st.booleans())
def test_jitter_matches_reference_on_arbitrary_operations(
    config: dict[str, object], case: tuple[int, list[PushOp]], fixed_start: bool
) -> None:
    base, ops = case
    run_both(config, base if fixed_start else None, ops)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 6), st.integers(0, 200), BASES, st.randoms(use_true_random=False))
def test_jitter_restores_order_when_displacement_is_within_depth(
    depth: int, n: int, base: int, rnd: random.Random
) -> None:
    # Shuffle within blocks of depth + 1: a missing frame never has more than
    # `depth` later frames waiting, so nothing is concealed or late.
    seqs = list(range(base, base + n))
    arrival: list[int] = []
    for i in range(0, n, depth + 1):
        block = seqs[i : i + depth + 1]
        rnd.shuffle(block)
        arrival += block
    jb = JitterBuffer(depth=depth, first_seq=base)
    assert feed(jb, arrival, size=4) == [frame(s, 4) for s in seqs]
    s = jb.stats
    assert (s.concealed, s.late, s.duplicates, s.resyncs, len(jb)) == (0, 0, 0, 0, 0)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 4), st.lists(st.booleans(), max_size=200), BASES)
def test_jitter_in_order_with_losses_keeps_one_frame_per_sequence_number(
    depth: int, kept: list[bool], base: int
) -> None:
    seqs = [base + i for i, k in enumerate(kept) if k]
    jb = JitterBuffer(depth=depth, frame_bytes=4, first_seq=base)
    out = feed(jb, seqs, size=4) + jb.drain()
    last = seqs[-1] - base + 1 if seqs else 0
    expect = [frame(base + i, 4) if k else b"\xff" * 4 for i, k in enumerate(kept[:last])]
    assert out == expect
    assert jb.stats.late == 0



def test_jitter_settings_are_fixed_when_made() -> None:
    jb = JitterBuffer(2, 160)
    with pytest.raises(TypeError, match="make a new one"):
        jb.__init__(5, 320, "fade", "pcm16")  # type: ignore[misc]
    assert (jb.depth, jb.frame_bytes) == (2, 160)
    # made with __new__, its first __init__ must not bring other settings either (they would be ignored)
    fill = b"\x7f" * 160
    jb = JitterBuffer.__new__(JitterBuffer, 2, 160, fill)
    with pytest.raises(TypeError, match="make a new one"):
        jb.__init__(5, 320)  # type: ignore[misc]
    with pytest.raises(TypeError, match="make a new one"):
        jb.__init__(2, 160, bytes(bytearray(fill)))  # type: ignore[misc]  # (an equal frame, not the one it was made with)
    jb = JitterBuffer.__new__(JitterBuffer, 2, 160, fill)
    jb.__init__(2, 160, fill)  # type: ignore[misc]  # (what JitterBuffer(2, 160, fill) does)
    assert (jb.depth, jb.frame_bytes) == (2, 160)
