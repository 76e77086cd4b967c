"""What a call record holds, and how a transcript is collected during the call.

Pure data and pure functions: no I/O, no clock.  The bridge feeds a
:class:`TranscriptLog` as transcript events and barge-ins happen; the
recorder turns the call's statistics into a :class:`CallRecord` at the end.

The assistant's turn is cut at what the caller heard: when an item is
truncated at ``heard_ms`` of ``generated_ms`` milliseconds of audio, its text
is cut to the same proportion of characters, back to the previous word
boundary (:func:`cut_text`).  Speech rate is not uniform, so this is an
approximation; OpenAI's ``conversation.item.truncate`` likewise drops the
unheard part of the transcript on the server.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["CALL_STATUSES", "CallRecord", "Role", "TranscriptLog", "Turn", "cut_text"]

Role = Literal["user", "assistant"]

# Our own statuses; Twilio's status callbacks are kept beside them (twilio_status).
CALL_STATUSES = ("in-progress", "completed", "failed", "interrupted")


@dataclass(frozen=True, slots=True)
class Turn:
    """One utterance: who spoke, what, when (seconds from the call's start).

    ``interrupted`` turns were cut by a barge-in; ``heard_ms`` is then how much
    of the assistant's audio the caller heard, and ``text`` is cut to match.
    """

    role: Role
    text: str
    offset_s: float
    interrupted: bool = False
    heard_ms: int | None = None


@dataclass(slots=True)
class CallRecord:
    """Everything stored about one call (one row of ``calls`` plus its ``turns``)."""

    call_sid: str
    started_at: str  # UTC, ISO 8601
    status: str = "in-progress"
    stream_sid: str | None = None
    account_sid: str | None = None
    direction: str = "inbound"
    from_number: str | None = None
    to_number: str | None = None
    provider: str | None = None
    ended_at: str | None = None
    end_reason: str | None = None
    duration_s: float | None = None
    barge_ins: int = 0
    tool_calls: list[str] = field(default_factory=list)
    latency_ms: dict[str, float] = field(default_factory=dict)
    twilio_status: str | None = None
    twilio_duration_s: int | None = None
    answered_by: str | None = None  # Twilio's AnsweredBy (human, machine_start, fax, ...): detection was asked
    instance: str | None = None  # MEDIASERVER_INSTANCE_URL of the instance that bridged it (None: the only one)
    turns: list[Turn] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The record as JSON-ready data (the HTTP route's and ``calls --json``'s shape)."""
        data = asdict(self)
        data["tool_call_count"] = len(self.tool_calls)
        return data

    def dumps(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False)


def cut_text(text: str, heard_ms: int, generated_ms: int) -> str:
    """The part of ``text`` heard when ``heard_ms`` of its ``generated_ms`` of audio played.

    Proportional by characters, cut back to a word boundary (a word is only
    kept when it was heard to its end).  Nothing generated or nothing heard
    gives ``""``; everything heard gives the whole text.
    """
    text = text.strip()
    if heard_ms <= 0 or generated_ms <= 0 or not text:
        return ""
    if heard_ms >= generated_ms:
        return text
    keep = len(text) * heard_ms // generated_ms
    if keep < len(text) and not text[keep].isspace():
        # mid-word: back to the end of the previous word
        space = text.rfind(" ", 0, keep + 1)
        keep = space if space >= 0 else 0
    return text[:keep].rstrip()


_NOT_YET = float("inf")  # offset of a turn known only from its truncation


@dataclass(slots=True)
class _Open:
    role: Role
    offset_s: float
    parts: list[str] = field(default_factory=list)
    final: str | None = None
    heard_ms: int | None = None
    generated_ms: int = 0
    cut_already: bool = False  # the provider's final text is what was heard (Transcript.cut)


class TranscriptLog:
    """Both sides' transcripts of one call, turn by turn, as the events arrive.

    Fragments (``final=False``) of one item are appended; the final text of the
    item replaces them.  Turns are ordered by when they began (:meth:`began`), or else by when their first
    text arrived.
    Events without an item id belong to the open turn of that role until its
    final text closes it.
    """

    __slots__ = ("_anonymous", "_turns")

    def __init__(self) -> None:
        self._turns: dict[tuple[Role, str], _Open] = {}
        self._anonymous = 0

    def add(
        self, role: Role, text: str, *, final: bool, item_id: str | None, offset_s: float,
        cumulative: bool = False, cut: bool = False,
    ) -> None:
        """One transcript event, ``offset_s`` seconds into the call.

        ``cumulative``: a fragment that is the text so far (it replaces the
        earlier ones); ``cut``: final text the provider already cut at what
        the caller heard (no second cut by :meth:`cut`'s proportions).
        """
        key = (role, item_id if item_id is not None else f"\0{role}{self._anonymous}")
        turn = self._turns.get(key)
        if turn is None:
            turn = self._turns[key] = _Open(role, offset_s)
        elif turn.offset_s == _NOT_YET:  # cut before its first text arrived
            turn.offset_s = offset_s
        if final:
            turn.final = text
            turn.cut_already = cut
            turn.parts.clear()  # (the final text replaces them: an hour of deltas would otherwise stay in memory)
            if item_id is None:
                self._anonymous += 1  # the next anonymous fragment starts a new turn
        elif cumulative:
            turn.parts[:] = [text]
        else:
            turn.parts.append(text)

    def began(self, role: Role, item_id: str, offset_s: float) -> None:
        """``item_id``'s turn began ``offset_s`` seconds into the call, before any of its text (the caller started
        speaking): it is ordered from then, not from when its transcript arrived, which for the caller's words can
        be after the reply's."""
        turn = self._turns.get((role, item_id))
        if turn is None:
            self._turns[(role, item_id)] = _Open(role, offset_s)
        elif offset_s < turn.offset_s:
            turn.offset_s = offset_s

    def cut(self, item_id: str, heard_ms: int, generated_ms: int) -> None:
        """The assistant's ``item_id`` was interrupted after ``heard_ms`` of ``generated_ms`` ms."""
        key: tuple[Role, str] = ("assistant", item_id)
        turn = self._turns.get(key)
        if turn is None:  # the transcript may still be on its way
            turn = self._turns[key] = _Open("assistant", _NOT_YET)
        turn.heard_ms = heard_ms
        turn.generated_ms = generated_ms

    def turns(self) -> list[Turn]:
        """The turns so far, interrupted ones cut at what was heard; empty turns left out."""
        result: list[Turn] = []
        for turn in sorted(self._turns.values(), key=lambda t: t.offset_s):
            text = (turn.final if turn.final is not None else "".join(turn.parts)).strip()
            if turn.heard_ms is not None:
                if not (turn.cut_already and turn.final is not None):
                    text = cut_text(text, turn.heard_ms, turn.generated_ms)
                if turn.offset_s == _NOT_YET:
                    continue  # cut before any of its text arrived, and none came
                result.append(Turn(turn.role, text, turn.offset_s, True, turn.heard_ms))
            elif text:
                result.append(Turn(turn.role, text, turn.offset_s))
        return result
