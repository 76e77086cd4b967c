"""Audio kernels for telephony bridges, usable on their own.

PCM is always signed 16-bit little-endian mono; every function accepts any
contiguous one-dimensional buffer (``bytes``, ``bytearray``, ``memoryview``, a
numpy array) and returns ``bytes``.  Its items must be raw bytes or, for PCM16,
little-endian int16: a float, big-endian or wider array is a TypeError, not
noise.  Importing this module imports nothing but the
compiled kernels: no trio, quart, hypercorn, numpy or scipy.

>>> from mediaserver.codec import ulaw_decode, ulaw_encode
>>> pcm = ulaw_decode(b"\\xff" * 160)      # 20 ms of µ-law silence -> PCM16
>>> len(pcm)
320
>>> ulaw_encode(pcm) == b"\\xff" * 160
True
"""

from mediaserver._native._g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from mediaserver._native._jitter import JitterBuffer, JitterStats
from mediaserver._native._vad import EnergyVAD
from mediaserver._native._resample import Resampler

__all__ = [
    "EnergyVAD",
    "JitterBuffer",
    "JitterStats",
    "Resampler",
    "alaw_decode",
    "alaw_encode",
    "ulaw_decode",
    "ulaw_encode",
]
