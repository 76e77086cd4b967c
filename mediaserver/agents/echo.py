"""The built-in echo agent: no network, no key, the default provider.

It listens to the caller through the energy VAD and, when an utterance
ends, plays it back.  Its audio runs as PCM16 at 16 kHz, so every echo call
exercises the µ-law codec and the resampler both ways; it raises
speech-started when the caller talks, so barge-in works as with a model.
"""

from __future__ import annotations

import itertools
import math
import sys
from array import array
from collections import deque

import trio

from mediaserver.bridge.link import ProviderClosed
from mediaserver.codec import EnergyVAD
from mediaserver.protocol.providers import base as pv

__all__ = ["EchoLink"]

RATE_HZ = 16000
FRAME_MS = 20
FRAME_BYTES = RATE_HZ * FRAME_MS // 1000 * 2

# EnergyVAD leaves its noise floor unset until a frame reaches its minimum
# level (-55 dBFS by default), so after the digital silence a call starts
# with, the caller's first word would become the "noise floor" and never be
# heard.  So when the line has been digitally silent, one frame of a 1 kHz
# sine at amplitude 100 (about -53.6 dBFS, just above that minimum) seeds the
# floor as for a quiet line just before the first sound.  A line that carries
# room tone from its first frame is not primed: the tone is the floor, and
# would otherwise read as speech until minimum statistics caught up (2 s).
DIGITAL_SILENCE = 8  # PCM16 peak of a frame that is digital silence (µ-law's quietest codes, after resampling)
def _priming_frame() -> bytes:
    samples = array("h", (round(100 * math.sin(2 * math.pi * 1000 * n / RATE_HZ)) for n in range(FRAME_BYTES // 2)))
    if sys.byteorder == "big":
        samples.byteswap()  # PCM16 is little-endian
    return samples.tobytes()


_PRIMING_FRAME = _priming_frame()


class EchoLink:
    """A :class:`~mediaserver.bridge.link.ProviderLink` that repeats what the caller said."""

    name = "echo"
    input_format = pv.AudioFormat("pcm16", RATE_HZ)
    output_format = pv.AudioFormat("pcm16", RATE_HZ)

    def __init__(
        self,
        *,
        max_utterance_ms: int = 10_000,
        preroll_ms: int = 100,
        reply_chunk_ms: int = 100,
        hangover_ms: int = 400,
    ) -> None:
        self.vad = EnergyVAD(RATE_HZ, FRAME_MS, attack_ms=40, hangover_ms=hangover_ms)
        self._primed = False  # the first sound on the line was seen (and the VAD primed if silence came first)
        self._silence_seen = False
        self._max_frames = max_utterance_ms // FRAME_MS
        self._reply_chunk_bytes = reply_chunk_ms * RATE_HZ // 1000 * 2
        self._preroll: deque[bytes] = deque(maxlen=max(preroll_ms // FRAME_MS, 1))
        self._partial = bytearray()
        self._utterance: list[bytes] = []
        self._speaking = False
        self._received_ms = 0
        self._items = itertools.count(1)
        self._events_in, self._events_out = trio.open_memory_channel[pv.ProviderEvent](math.inf)
        self.truncations: list[pv.Truncate] = []
        self._closed = False

    async def send(self, command: pv.ProviderCommand) -> None:
        if self._closed:
            raise ProviderClosed("echo agent closed")
        if isinstance(command, pv.SendAudio):
            self._partial += command.payload
            while len(self._partial) >= FRAME_BYTES:
                frame = bytes(self._partial[:FRAME_BYTES])
                del self._partial[:FRAME_BYTES]
                self._frame(frame)
        elif isinstance(command, pv.Truncate):
            self.truncations.append(command)
        # CancelResponse / CreateResponse / ToolResult / SendText: nothing to do

    def _emit(self, event: pv.ProviderEvent) -> None:
        self._events_in.send_nowait(event)

    def _frame(self, frame: bytes) -> None:
        self._received_ms += FRAME_MS
        if not self._primed:
            self._prime(frame)
        speaking = self.vad.process(frame)
        if speaking and not self._speaking:
            self._speaking = True
            self._utterance = list(self._preroll)
            self._emit(pv.SpeechStarted(item_id=None, audio_start_ms=self._received_ms))
        if self._speaking:
            # Past max_utterance_ms the rest is not kept: the reply comes once the caller stops, as always
            # (a reply while they talk on would be cut at once by their own next words).
            if len(self._utterance) < self._max_frames:
                self._utterance.append(frame)
            if not speaking:
                self._speaking = False
                self._reply()
        self._preroll.append(frame)

    def _prime(self, frame: bytes) -> None:
        if not frame.strip(b"\x00"):  # (the usual digital silence, without looking at the samples one by one)
            self._silence_seen = True
            return
        samples = array("h", frame)
        if sys.byteorder == "big":
            samples.byteswap()
        if max(samples) - min(samples) <= 2 * DIGITAL_SILENCE:
            self._silence_seen = True
            return
        if self._silence_seen:
            self.vad.process(_PRIMING_FRAME)
        self._primed = True

    def _reply(self) -> None:
        self._emit(pv.SpeechStopped(item_id=None, audio_end_ms=self._received_ms))
        audio = b"".join(self._utterance)
        self._utterance = []
        # The echo guard: the caller's line carries our reply back, some dB down, while it plays; quieter input
        # than that is not the caller speaking (else the agent would cut itself off and replay its own echo).
        self.vad.observe_agent(audio)
        item = f"echo_{next(self._items)}"
        self._emit(pv.ResponseStarted(response_id=item))
        for at in range(0, len(audio), self._reply_chunk_bytes):
            self._emit(pv.AudioDelta(item, audio[at : at + self._reply_chunk_bytes], response_id=item))
        self._emit(pv.AudioDone(item, response_id=item))
        self._emit(pv.ResponseDone(response_id=item, status="completed", reason=None))

    async def receive(self) -> pv.ProviderEvent:
        try:
            return await self._events_out.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise ProviderClosed("echo agent closed") from None

    def close(self) -> None:
        self._closed = True
        self._events_in.close()
