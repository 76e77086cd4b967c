"""Streaming polyphase resampling, the textbook way: zero-stuff, filter, pick.

``y[m] = sum_k h[k] * u[m*M - k]`` where ``u`` is the input upsampled by L
with zeros and ``h`` the prototype filter scaled by L -- the definition the
native kernel implements with polyphase branches.  Float64 throughout.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt


def ratio(in_rate: int, out_rate: int) -> tuple[int, int]:
    g = math.gcd(in_rate, out_rate)
    return out_rate // g, in_rate // g


def resample_float(
    pcm: npt.ArrayLike, in_rate: int, out_rate: int, taps: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """Resample from silence-initialised history; ceil(n*L/M) samples, unrounded."""
    x = np.asarray(pcm, dtype=np.float64)
    up, down = ratio(in_rate, out_rate)
    h = np.asarray(taps, dtype=np.float64) * up
    stuffed = np.zeros(len(x) * up)
    stuffed[::up] = x
    filtered = np.convolve(stuffed, h)[: len(stuffed)] if len(h) else stuffed
    return filtered[::down]


def to_int16(y: npt.NDArray[np.float64]) -> npt.NDArray[np.int16]:
    """Round to nearest and saturate."""
    return np.clip(np.rint(y), -32768, 32767).astype(np.int16)


def resample(pcm: npt.ArrayLike, in_rate: int, out_rate: int, taps: npt.ArrayLike) -> npt.NDArray[np.int16]:
    return to_int16(resample_float(pcm, in_rate, out_rate, taps))
