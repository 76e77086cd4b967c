"""The transcript model: cutting an interrupted reply at what was heard, and turn collection."""

from __future__ import annotations

import pytest

from mediaserver.records.model import CallRecord, TranscriptLog, Turn, cut_text

REPLY = "The weather in Paris is sunny today with a light breeze from the west."


@pytest.mark.parametrize(
    ("heard_ms", "generated_ms", "expected"),
    [
        (0, 4000, ""),  # nothing heard
        (4000, 4000, REPLY),  # everything heard
        (5000, 4000, REPLY),  # more than generated (rounding): everything
        (1000, 0, ""),  # no audio known: nothing can be claimed as heard
        # 25 % of 70 characters = 17: "The weather in Pa|ris" -> back to the last whole word
        (1000, 4000, "The weather in"),
        # 50 % = 35: "... is sunny today|" ends exactly at a space: that word was heard
        (2000, 4000, "The weather in Paris is sunny today"),
        (100, 4000, ""),  # 1 character: mid "The" -> no whole word
        (200, 4000, "The"),  # 3 characters: "The" ends there, so it was heard
    ],
)
def test_cut_text_keeps_the_heard_words(heard_ms: int, generated_ms: int, expected: str) -> None:
    assert len(REPLY) == 70
    assert cut_text(REPLY, heard_ms, generated_ms) == expected


def test_cut_text_is_a_word_prefix_and_grows_with_heard_time() -> None:
    words = REPLY.split()
    previous = -1
    for heard in range(0, 4001, 50):
        cut = cut_text(REPLY, heard, 4000)
        assert cut.split() == words[: len(cut.split())]  # whole words, in order
        assert len(cut) <= len(REPLY) * heard / 4000 + 1e-9  # never more than the proportion
        assert len(cut) >= previous
        previous = len(cut)


def test_transcript_log_orders_turns_and_prefers_final_text() -> None:
    log = TranscriptLog()
    log.add("user", "Hello", final=False, item_id="u1", offset_s=1.0)
    log.add("user", " there", final=False, item_id="u1", offset_s=1.2)
    log.add("assistant", "Hi! ", final=False, item_id="a1", offset_s=2.0)
    log.add("user", "Hello there.", final=True, item_id="u1", offset_s=2.5)  # replaces the fragments
    log.add("assistant", "How can I help?", final=False, item_id="a1", offset_s=2.1)
    log.add("user", "", final=True, item_id="u2", offset_s=3.0)  # empty: left out
    assert log.turns() == [
        Turn("user", "Hello there.", 1.0),
        Turn("assistant", "Hi! How can I help?", 2.0),
    ]
    # the fragments a final text replaced are not kept (an hour of deltas would stay in memory otherwise)
    assert [turn.parts for turn in log._turns.values()] == [[], ["Hi! ", "How can I help?"], []]


def test_transcript_log_orders_a_caller_turn_from_when_it_began_not_when_its_text_came() -> None:
    """OpenAI's input transcription is asynchronous: the caller's words can arrive after the reply's."""
    log = TranscriptLog()
    log.began("user", "u1", 1.0)  # the caller started speaking
    log.add("assistant", "Sure.", final=True, item_id="a1", offset_s=2.5)  # the reply's transcript came first
    log.add("user", "Can you help?", final=True, item_id="u1", offset_s=3.0)
    log.began("user", "u2", 4.0)  # speech without any transcript: no turn
    log.add("user", "Thanks", final=True, item_id="u3", offset_s=5.0)
    log.began("user", "u3", 4.5)  # (begun after its text was filed: the earlier time wins)
    assert log.turns() == [Turn("user", "Can you help?", 1.0), Turn("assistant", "Sure.", 2.5), Turn("user", "Thanks", 4.5)]


def test_transcript_log_anonymous_fragments_split_at_each_final() -> None:
    log = TranscriptLog()
    log.add("assistant", "One", final=False, item_id=None, offset_s=0.5)
    log.add("assistant", "One.", final=True, item_id=None, offset_s=0.6)
    log.add("assistant", "Two", final=False, item_id=None, offset_s=0.9)
    assert [t.text for t in log.turns()] == ["One.", "Two"]


def test_transcript_log_cuts_an_interrupted_item_even_when_its_text_comes_later() -> None:
    log = TranscriptLog()
    log.add("assistant", "Sure, first", final=False, item_id="a1", offset_s=1.0)
    log.cut("a1", 1000, 2000)
    # the rest of the transcript (and its final) arrive after the truncation
    log.add("assistant", " open the settings page", final=False, item_id="a1", offset_s=1.5)
    log.add("assistant", "Sure, first open the settings page", final=True, item_id="a1", offset_s=2.0)
    log.cut("a2", 0, 500)  # cut before any of its text arrived ...
    log.add("assistant", "Also", final=True, item_id="a2", offset_s=2.5)  # ... heard nothing of it
    log.cut("a3", 100, 500)  # no text ever came: no turn
    assert log.turns() == [
        Turn("assistant", "Sure, first open", 1.0, interrupted=True, heard_ms=1000),
        Turn("assistant", "", 2.5, interrupted=True, heard_ms=0),
    ]


def test_transcript_log_keeps_a_providers_own_cut_and_the_latest_cumulative_fragment() -> None:
    """AssemblyAI: an interrupted reply's final text is already what was heard; the caller's deltas are the text so far."""
    log = TranscriptLog()
    log.add("user", "What's", final=False, item_id="u1", offset_s=1.0, cumulative=True)
    log.add("user", "What's the weather", final=False, item_id="u1", offset_s=1.2, cumulative=True)
    log.cut("a1", 1000, 3000)  # heard a third: our own cut would keep "The forecast" of the full text
    log.add("assistant", "The forecast for Paris is", final=True, item_id="a1", offset_s=2.0, cut=True)
    log.add("assistant", "Later words", final=True, item_id="a2", offset_s=3.0)
    log.cut("a2", 1000, 3000)  # (a text not cut by its provider is cut here, as before)
    assert log.turns() == [
        Turn("user", "What's the weather", 1.0),  # not "What'sWhat's the weather"
        Turn("assistant", "The forecast for Paris is", 2.0, interrupted=True, heard_ms=1000),
        Turn("assistant", "", 3.0, interrupted=True, heard_ms=1000),
    ]


def test_call_record_json_has_counts() -> None:
    record = CallRecord("CA1", "2026-01-01T00:00:00+00:00", tool_calls=["lookup", "lookup"])
    data = record.to_json()
    assert data["tool_call_count"] == 2 and data["tool_calls"] == ["lookup", "lookup"]
    assert data["turns"] == [] and data["status"] == "in-progress"
