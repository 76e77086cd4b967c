"""G.711 against CPython's audioop (the issue's oracle) and the numpy reference."""

from __future__ import annotations

import array
import sys
import threading
import time
from collections.abc import Callable
import audioop  # stdlib until 3.12; the audioop-lts package (same C code) from 3.13

import numpy as np
import pytest

from mediaserver import codec
from mediaserver.codec._reference import g711 as reference

ALL_CODES = bytes(range(256))
ALL_SAMPLES = np.arange(-32768, 32768, dtype="<i2").tobytes()


@pytest.mark.parametrize(
    ("ours", "oracle"),
    [(codec.ulaw_decode, audioop.ulaw2lin), (codec.alaw_decode, audioop.alaw2lin)],
)
def test_g711_decode_all_256_codes_match_audioop(ours, oracle) -> None:
    assert ours(ALL_CODES) == oracle(ALL_CODES, 2)


@pytest.mark.parametrize(
    ("ours", "oracle"),
    [(codec.ulaw_encode, audioop.lin2ulaw), (codec.alaw_encode, audioop.lin2alaw)],
)
def test_g711_encode_all_65536_samples_match_audioop(ours, oracle) -> None:
    assert ours(ALL_SAMPLES) == oracle(ALL_SAMPLES, 2)


def test_g711_reference_matches_audioop_exhaustively() -> None:
    codes = np.frombuffer(ALL_CODES, np.uint8)
    samples = np.frombuffer(ALL_SAMPLES, "<i2")
    assert reference.ulaw_decode(codes).astype("<i2").tobytes() == audioop.ulaw2lin(ALL_CODES, 2)
    assert reference.alaw_decode(codes).astype("<i2").tobytes() == audioop.alaw2lin(ALL_CODES, 2)
    assert reference.ulaw_encode(samples).tobytes() == audioop.lin2ulaw(ALL_SAMPLES, 2)
    assert reference.alaw_encode(samples).tobytes() == audioop.lin2alaw(ALL_SAMPLES, 2)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: np.frombuffer(b, np.uint8)])
def test_g711_accepts_any_buffer_and_returns_bytes(wrap) -> None:
    frame = ALL_CODES[:160]
    pcm = codec.ulaw_decode(wrap(frame))
    assert type(pcm) is bytes and pcm == audioop.ulaw2lin(frame, 2)
    assert type(codec.ulaw_encode(wrap(pcm))) is bytes
    assert codec.alaw_encode(wrap(pcm)) == audioop.lin2alaw(pcm, 2)
    assert codec.alaw_decode(wrap(frame)) == audioop.alaw2lin(frame, 2)


def test_g711_accepts_non_contiguous_views_of_int16_arrays() -> None:
    pcm = array.array("h", range(-8000, 8000, 7))
    assert codec.ulaw_encode(pcm) == audioop.lin2ulaw(pcm.tobytes(), 2)
    assert codec.ulaw_encode(memoryview(ALL_SAMPLES)[2:20]) == audioop.lin2ulaw(ALL_SAMPLES[2:20], 2)


def test_g711_large_inputs_take_the_nogil_path_with_the_same_result() -> None:
    big = ALL_SAMPLES * 2  # 131072 samples: above the GIL-release threshold
    assert codec.ulaw_encode(bytearray(big)) == audioop.lin2ulaw(big, 2)
    assert codec.alaw_decode(bytearray(ALL_CODES * 100)) == audioop.alaw2lin(ALL_CODES * 100, 2)


@pytest.mark.parametrize("fn", [codec.ulaw_decode, codec.ulaw_encode])
@pytest.mark.parametrize("wrap", [bytes, bytearray])  # (bytes take a path of their own)
def test_g711_large_inputs_let_other_threads_run(fn: Callable[[bytes], bytes], wrap: type) -> None:
    """The GIL is released for a large input, whatever its type: another thread runs in the middle of each call.

    (Only the middle counts: around a call the interpreter may hand the GIL over for a switch interval.  The
    input grows (to 128 MiB at most) until one call lasts 50 ms, and calls repeat until their middles add up to
    0.2 s: whatever the machine's speed, in bounded memory.  On a virtual machine the host may take the other
    core away for a while, starving the thread whatever the GIL does: up to three measurements, one must show
    it running.  A call holding the GIL never lets it run, so no measurement would.)
    """
    seen = []
    for _ in range(3):
        inside, alone, middle = _thread_progress_during(fn, wrap)
        assert middle >= 0.2, "each call too short to tell on this machine"
        # Free, it notes at least a tenth of its solo rate on the other core; with the GIL held it barely runs (~1%).
        if inside > 0.1 * alone * middle:
            return
        seen.append(inside / (alone * middle))
    raise AssertionError(f"the other thread ran at {', '.join(f'{r:.1%}' for r in seen)} of its solo rate")


def _thread_progress_during(fn: Callable[[bytes], bytes], wrap: type) -> tuple[int, float, float]:
    """(notes the other thread made in the calls' middles, its solo rate per second, the middles' total seconds)."""
    size = 16 << 20
    ran: list[float] = []
    running, stop = threading.Event(), threading.Event()

    def note() -> None:
        running.set()
        n = 0
        while not stop.is_set():
            n += 1
            if n % 64 == 0:  # (a note every 64 turns: the list stays small)
                ran.append(time.perf_counter())

    thread = threading.Thread(target=note)
    thread.start()
    running.wait()
    margin = 2 * sys.getswitchinterval()
    middles: list[tuple[float, float]] = []
    try:
        time.sleep(0.1)  # the thread alone: how fast it notes when nothing holds the GIL
        alone = len(ran) / 0.1
        data = wrap(bytes(range(256)) * (size >> 8))
        for _ in range(200):
            start = time.perf_counter()
            fn(data)
            end = time.perf_counter()
            if end - start < 5 * margin and size < 128 << 20:
                size *= 2
                data = wrap(bytes(range(256)) * (size >> 8))
                continue
            if end - start > 2 * margin:
                middles.append((start + margin, end - margin))
            if sum(b - a for a, b in middles) >= 0.2:
                break
    finally:
        stop.set()
        thread.join()
    middle = sum(b - a for a, b in middles)
    inside = sum(any(a < t < b for a, b in middles) for t in ran)
    return inside, alone, middle


@pytest.mark.parametrize("encode", [codec.ulaw_encode, codec.alaw_encode])
@pytest.mark.parametrize("wrap", [bytes, bytearray])
def test_g711_encode_odd_length_pcm_raises_value_error_naming_it(encode, wrap) -> None:
    with pytest.raises(ValueError, match="even number of bytes, got 161"):
        encode(wrap(bytes(161)))


@pytest.mark.parametrize("fn", [codec.ulaw_decode, codec.ulaw_encode, codec.alaw_decode, codec.alaw_encode])
def test_g711_rejects_non_buffers_and_handles_empty_input(fn) -> None:
    with pytest.raises(TypeError):
        fn("not a buffer")
    assert fn(b"") == b""


def test_g711_ulaw_round_trip_is_idempotent_on_codes() -> None:
    # decode then encode returns every code except the two zeros (0x7F -> 0xFF)
    again = codec.ulaw_encode(codec.ulaw_decode(ALL_CODES))
    assert [i for i in range(256) if again[i] != i] == [0x7F]
    assert codec.alaw_encode(codec.alaw_decode(ALL_CODES)) == ALL_CODES
