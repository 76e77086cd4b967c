"""Type-checked by ``make test`` (pyproject's mypy ``files``), never run: how other programs call the codec.

The stubs must take numpy arrays on Python 3.11 too, where numpy's own stubs
do not declare the buffer protocol, and must still reject what is not a
buffer (the ``type: ignore`` below is flagged as unused if they stop).
"""

import numpy as np

from mediaserver.codec import EnergyVAD, JitterBuffer, Resampler, alaw_decode, ulaw_encode

pcm = np.zeros(160, np.int16)
ulaw_encode(pcm)
alaw_decode(np.zeros(160, np.uint8))
Resampler(8000, 16000).process(pcm)
EnergyVAD().process(pcm)
JitterBuffer().push(1, np.zeros(160, np.uint8))
ulaw_encode(bytearray(320))
ulaw_encode(memoryview(b"\0\0"))
ulaw_encode(3)  # type: ignore[arg-type]
