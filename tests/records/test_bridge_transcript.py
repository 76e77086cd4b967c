"""The bridge collects both sides' transcripts and cuts the assistant's at what the caller heard.

Same set-up as tests/bridge/test_call.py: virtual time (``autojump_clock``),
the Twilio caller over an in-memory stream (it echoes marks as its audio
plays), and a :class:`tests.fakes.FakeLink` that emits provider events.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from mediaserver.protocol.providers import base as pv
from mediaserver.records.model import Turn
from tests.bridge.test_call import audio as audio_ms
from tests.bridge.test_call import bridged
from tests.fakes import FakeLink, fail_after
from tests.protocol import test_deepgram as deepgram
from tests.protocol.test_elevenlabs import audio, feed, msg, ready_session

REPLY = "It will be sunny in Paris all day, with a high of twenty degrees."  # 65 characters


@fail_after(60)
async def test_bridge_transcript_of_an_interrupted_reply_is_what_was_heard(
    autojump_clock: trio.testing.MockClock,
) -> None:
    link = FakeLink()
    async with bridged(link) as call:
        await trio.sleep(0.25)
        link.emit(pv.Transcript("user", "What's the weather like?", True, "user_1"))
        await trio.sleep(0.25)
        # 2 s of reply audio, its transcript streamed as fragments
        link.emit(pv.Transcript("assistant", REPLY[:20], False, "item_1"), pv.AudioDelta("item_1", audio_ms(2000)))
        link.emit(pv.Transcript("assistant", REPLY[20:], False, "item_1"), pv.AudioDone("item_1"))
        await trio.sleep(0.5)
        link.emit(pv.SpeechStarted(item_id="user_2", audio_start_ms=900))
        await call.caller.wait_for_clear()
        await trio.testing.wait_all_tasks_blocked()
        assert link.truncates() == [pv.Truncate("item_1", 480)]  # 12 marks echoed
        # The final transcript of the cut item arrives after the truncation.
        link.emit(pv.Transcript("assistant", REPLY, True, "item_1"))
        link.emit(pv.Transcript("user", "Wait", False, "user_2"), pv.Transcript("user", ", and tomorrow?", False, "user_2"))
        await trio.sleep(0.1)
        turns = call.bridge.stats.transcript.turns()
    # 480 of 2000 ms heard: 24 % of 65 characters is 15 ("It will be sunn"), back to a whole word.
    assert turns == [
        Turn("user", "What's the weather like?", pytest.approx(0.25, abs=1e-6)),  # type: ignore[arg-type]
        Turn("assistant", "It will be", pytest.approx(0.5, abs=1e-6), interrupted=True, heard_ms=480),  # type: ignore[arg-type]
        Turn("user", "Wait, and tomorrow?", pytest.approx(1.0, abs=1e-6)),  # type: ignore[arg-type]
    ]


@fail_after(60)
async def test_bridge_transcript_cut_uses_all_the_audio_of_the_reply(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The model is still generating: 400 ms of audio have arrived when the caller barges in after 280 ms were heard.
    # The text is the whole reply's, and the rest of its audio (600 ms) still arrives, dropped: 280 of 1000 ms were
    # heard, so 28 % of the text stays (counting only the 400 ms that had come kept 70 %: words never heard).
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(pv.Transcript("assistant", "Let me check that for you right away.", True, "item_1"))
        link.emit(pv.AudioDelta("item_1", audio_ms(400)))
        await trio.sleep(0.3)
        link.emit(pv.SpeechStarted(None, None))
        await call.caller.wait_for_clear()
        await trio.testing.wait_all_tasks_blocked()
        assert link.truncates() == [pv.Truncate("item_1", 280)]
        first = [(t.text, t.heard_ms) for t in call.bridge.stats.transcript.turns()]
        link.emit(pv.AudioDelta("item_1", audio_ms(600)), pv.AudioDone("item_1"))  # late audio: dropped, counted
        link.emit(pv.Transcript("assistant", "Sure.", True, "item_2"), pv.AudioDelta("item_2", audio_ms(80, 0x33)))
        await call.caller.wait_for(lambda: call.caller.received_audio.endswith(audio_ms(80, 0x33)))
        stats = call.bridge.stats
    assert first == [("Let me check that for you", 280)]  # (at the cut: 280 of the 400 ms that had come)
    assert [(t.text, t.interrupted, t.heard_ms) for t in stats.transcript.turns()] == [
        ("Let me", True, 280),  # 10 of 37 characters, to a word's end
        ("Sure.", False, None),
    ]
    assert stats.barge_ins == 1


@fail_after(60)
async def test_bridge_transcript_of_an_interrupted_elevenlabs_reply_is_one_cut_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # ElevenLabs' own events through its core: agent_response names the reply its audio belongs to, so the
    # barge-in cuts that text; its agent_response_correction is not a second copy of the turn.
    core = ready_session()
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(*feed(core, msg("agent_response", agent_response_event={"agent_response": REPLY}),
                        audio(audio_ms(2000), 1)))  # fmt: skip
        await trio.sleep(0.5)
        link.emit(*feed(core, msg("interruption", interruption_event={"event_id": 1})))
        await call.caller.wait_for_clear()
        await trio.testing.wait_all_tasks_blocked()
        correction = {"original_agent_response": REPLY, "corrected_agent_response": "It will be sunny"}
        link.emit(*feed(core, msg("agent_response_correction", agent_response_correction_event=correction)))
        await trio.sleep(0.1)
        turns = call.bridge.stats.transcript.turns()
    [turn] = turns
    assert (turn.role, turn.interrupted, turn.heard_ms) == ("assistant", True, 480)
    assert turn.text == "It will be"  # 480 of 2000 ms heard, as the marks say


@fail_after(60)
async def test_bridge_transcript_of_an_interrupted_deepgram_reply_is_one_cut_turn(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Deepgram's own events through its core: the agent's ConversationText (here before its reply's start and
    # audio, as Deepgram may send it) names that reply, so the barge-in cuts that text.
    core = deepgram.ready_session()
    link = FakeLink()
    async with bridged(link) as call:
        link.emit(*deepgram.receive(core, deepgram.assistant_text(REPLY), deepgram.AGENT_STARTED,
                                    audio_ms(2000)))  # fmt: skip
        await trio.sleep(0.5)
        link.emit(*deepgram.receive(core, deepgram.USER_STARTED))
        await call.caller.wait_for_clear()
        await trio.testing.wait_all_tasks_blocked()
        turns = call.bridge.stats.transcript.turns()
    [turn] = turns
    assert (turn.role, turn.interrupted, turn.heard_ms) == ("assistant", True, 480)
    assert turn.text == "It will be"  # 480 of 2000 ms heard, as the marks say
