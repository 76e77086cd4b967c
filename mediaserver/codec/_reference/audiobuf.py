"""The native kernels' rule for audio arguments (``native/audiobuf.pxd``), in Python.

Bytes-like audio is one contiguous, one-dimensional run of items that are
raw bytes (format ``B``, ``b`` or ``c``) or, for PCM16, little-endian
``int16`` (``h`` in native order on a little-endian host, or ``<h``).
Anything else is refused: a float or big-endian array would otherwise be read
as PCM16 (or G.711 codes) and come back as noise.
"""

from __future__ import annotations

import sys
from typing import Any

_ORDERS = "@=<>!"


def audio_bytes(data: Any, width: int, what: str) -> bytes:
    """``data`` as bytes, by the kernels' rule; ``width`` is 2 for PCM16, 1 for G.711 codes."""
    if type(data) is bytes:
        return data
    try:
        view = memoryview(data)
    except TypeError:
        raise TypeError(
            f"{what} must be a bytes-like object (bytes, bytearray, memoryview, array), not {type(data).__name__}"
        ) from None
    with view:
        if not view.c_contiguous:
            raise ValueError(f"{what} must be one contiguous buffer")
        if view.ndim > 1:
            raise ValueError(f"{what} must be one-dimensional (mono), got a buffer of {view.ndim} dimensions")
        fmt = view.format
        order, kind = (fmt[0], fmt[1:]) if fmt[:1] and fmt[0] in _ORDERS else ("@", fmt)
        little = order == "<" or (order in "@=" and sys.byteorder == "little")
        # (int8 'b': codes, never PCM16 -- 8-bit audio read as 16-bit samples is noise -- as the kernels rule)
        if not (kind in ("B", "c") or (width == 1 and kind == "b") or (width == 2 and kind == "h" and little)):
            if width == 2:
                raise TypeError(f"{what} must be bytes or an array of little-endian int16 (PCM16), not of items {fmt!r}")
            raise TypeError(f"{what} must be bytes (one code per byte), not an array of items {fmt!r}")
        return view.tobytes()
