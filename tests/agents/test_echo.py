"""The built-in echo agent (mediaserver.agents.echo) on its own: what it hears as the caller, what it replies.

Audio as on a call: 8 kHz µ-law from the caller, decoded and resampled to the
agent's 16 kHz PCM16 (the bridge's uplink), fed 20 ms at a time; speech is
eSpeak NG's (tests.speech), noise seeded.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import trio

from mediaserver.agents.echo import FRAME_BYTES, RATE_HZ, EchoLink
from mediaserver.codec import Resampler, ulaw_decode, ulaw_encode
from mediaserver.protocol.providers import base as pv
from tests.speech import FULL_SCALE, noise, utterance

SENTENCE = "The quick brown fox jumps over the lazy dog."


def phone(pcm8k: npt.NDArray[np.float64] | npt.NDArray[np.int16]) -> bytes:
    """What the agent gets for this 8 kHz audio: through µ-law and the 8 -> 16 kHz resampler."""
    codes = ulaw_encode(np.clip(np.round(pcm8k), -32768, 32767).astype("<i2"))
    up = Resampler(8000, RATE_HZ)
    return b"".join(up.process(ulaw_decode(codes[at : at + 160])) for at in range(0, len(codes), 160))


async def hear(link: EchoLink, pcm16k: bytes) -> list[pv.ProviderEvent]:
    """Feed the audio in 20 ms frames; every event the agent raised meanwhile."""
    for at in range(0, len(pcm16k) - FRAME_BYTES + 1, FRAME_BYTES):
        await link.send(pv.SendAudio(pcm16k[at : at + FRAME_BYTES]))
    events: list[pv.ProviderEvent] = []
    while True:
        with trio.move_on_after(0.005) as scope:  # (0 would cancel even a receive that has an event waiting)
            events.append(await link.receive())
        if scope.cancelled_caught:
            return events


def replies(events: list[pv.ProviderEvent]) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for event in events:
        if isinstance(event, pv.AudioDelta):
            out[event.item_id] = out.get(event.item_id, b"") + event.payload
    return out


@pytest.mark.parametrize("kind", ["white", "pink"])
@pytest.mark.parametrize("dbfs", [-50, -40, -30])
async def test_echo_room_tone_from_the_first_frame_is_not_speech(kind: str, dbfs: int) -> None:
    # Before: a priming frame at -53.6 dBFS seeded the noise floor under the room tone, which then read as
    # speech for about 2 s and was played back to the caller.
    room = noise(kind, 8000 * 6, seed=3) * FULL_SCALE * 10 ** (dbfs / 20)
    events = await hear(EchoLink(), phone(room))
    assert not any(isinstance(e, pv.SpeechStarted) for e in events), events[:3]


async def test_echo_first_words_after_digital_silence_are_heard() -> None:
    said = utterance([SENTENCE])
    events = await hear(EchoLink(), phone(np.concatenate([np.zeros(8000), said, np.zeros(8000)])))
    [(item, audio)] = replies(events).items()
    assert [type(e) for e in events][:2] == [pv.SpeechStarted, pv.SpeechStopped]
    loud = np.nonzero(np.abs(said) > 100)[0]
    spoken_ms = (loud[-1] - loud[0]) // 8  # (utterance() pads the sentence with silence)
    assert spoken_ms <= len(audio) // 32 <= spoken_ms + 600  # the sentence, plus pre-roll and hangover


async def test_echo_an_utterance_over_the_limit_is_one_reply_after_the_caller_stops() -> None:
    # Before: at 10 s it replied while the caller talked on, then raised a second speech-started (a barge-in
    # against its own reply), and the next reply began with the last reply's end (its pre-roll).
    said = utterance([SENTENCE] * 6, pause_ms=150)  # ~15 s, pauses shorter than the hangover
    events = await hear(EchoLink(max_utterance_ms=10_000), phone(np.concatenate([np.zeros(8000), said, np.zeros(16000)])))
    assert sum(isinstance(e, pv.SpeechStarted) for e in events) == 1
    [(item, audio)] = replies(events).items()
    assert len(audio) == 10_000 * RATE_HZ // 1000 * 2  # the first 10 s
    stopped = next(i for i, e in enumerate(events) if isinstance(e, pv.SpeechStopped))
    assert stopped < next(i for i, e in enumerate(events) if isinstance(e, pv.AudioDelta))
    assert events[stopped].audio_end_ms > len(said) // 8  # type: ignore[attr-defined]  # after the caller stopped


async def test_echo_its_own_reply_coming_back_on_the_line_is_not_a_barge_in() -> None:
    # A phone line carries the agent's voice back, 20 dB down: that must not cut the reply (before: the agent
    # raised speech-started 200 ms into its reply, and then played its own echo back).
    link = EchoLink()
    said = utterance([SENTENCE])
    first = await hear(link, phone(np.concatenate([np.zeros(8000), said, np.zeros(4000)])))
    [reply] = replies(first).values()
    echo = np.frombuffer(reply, "<i2").astype(np.float64) * 0.1  # -20 dB
    again = await hear(link, echo.astype("<i2").tobytes())
    assert not any(isinstance(e, pv.SpeechStarted) for e in again)
    louder = await hear(link, phone(utterance(["Wait, stop."]) * 1.0))  # the caller talking over it is
    assert any(isinstance(e, pv.SpeechStarted) for e in louder)
