"""G.711 from ITU-T G.711 / the Sun reference code, vectorised with numpy."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

_ULAW_BIAS = 0x84
_ULAW_CLIP = 8159  # largest 14-bit magnitude µ-law represents
_ULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF])
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF])


def ulaw_decode(codes: npt.ArrayLike) -> npt.NDArray[np.int16]:
    u = ~np.asarray(codes, dtype=np.uint8).astype(np.int32) & 0xFF
    t = (((u & 0x0F) << 3) + _ULAW_BIAS) << ((u & 0x70) >> 4)
    return np.where(u & 0x80, _ULAW_BIAS - t, t - _ULAW_BIAS).astype(np.int16)


def alaw_decode(codes: npt.ArrayLike) -> npt.NDArray[np.int16]:
    a = np.asarray(codes, dtype=np.uint8).astype(np.int32) ^ 0x55
    seg = (a & 0x70) >> 4
    t = (a & 0x0F) << 4
    t = np.where(seg == 0, t + 8, (t + 0x108) << np.maximum(seg - 1, 0))
    return np.where(a & 0x80, t, -t).astype(np.int16)


def ulaw_encode(pcm: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    x = np.asarray(pcm, dtype=np.int16).astype(np.int32) >> 2  # 14-bit
    mask = np.where(x < 0, 0x7F, 0xFF)
    mag = np.minimum(np.abs(x), _ULAW_CLIP) + (_ULAW_BIAS >> 2)
    seg = np.searchsorted(_ULAW_SEG_END, mag)  # first seg with mag <= end
    code = (seg << 4) | ((mag >> (seg + 1)) & 0x0F)
    return (np.where(seg >= 8, 0x7F, code) ^ mask).astype(np.uint8)


def alaw_encode(pcm: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    x = np.asarray(pcm, dtype=np.int16).astype(np.int32) >> 3  # 13-bit
    mask = np.where(x >= 0, 0xD5, 0x55)
    mag = np.where(x >= 0, x, -x - 1)
    seg = np.searchsorted(_ALAW_SEG_END, mag)
    quant = np.where(seg < 2, mag >> 1, mag >> np.maximum(seg, 1)) & 0x0F
    code = (seg << 4) | quant
    return (np.where(seg >= 8, 0x7F, code) ^ mask).astype(np.uint8)
