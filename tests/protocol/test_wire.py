"""The helpers every sans-I/O core shares: ``mediaserver.protocol._wire`` and
``mediaserver.protocol.providers._core``."""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mediaserver.protocol import _wire as wire
from mediaserver.protocol.errors import CLOSE_MESSAGE_TOO_BIG, LocalProtocolError, RemoteProtocolError
from mediaserver.protocol.providers._core import AudioLedger, EarlyAudio, RecentSet

# ------------------------------------------------------------------ encoding


def test_dumps_is_compact_and_keeps_unicode() -> None:
    assert wire.dumps({"type": "x", "text": "é", "n": [1, 2]}) == '{"type":"x","text":"é","n":[1,2]}'


@given(st.binary(max_size=300))
def test_base64_round_trip_matches_the_standard_library(payload: bytes) -> None:
    text = wire.b64encode(payload)
    assert text == base64.b64encode(payload).decode("ascii")
    assert wire.b64decode(text, "x") == payload


def test_b64decode_accepts_the_url_safe_alphabet_only_when_asked() -> None:
    payload = b"\xfb\xff\xfe"
    urlsafe = base64.urlsafe_b64encode(payload).decode("ascii")
    assert "-" in urlsafe or "_" in urlsafe
    assert wire.b64decode(urlsafe, "x", urlsafe=True) == payload
    with pytest.raises(RemoteProtocolError, match="^x: invalid base64"):
        wire.b64decode(urlsafe, "x")


@pytest.mark.parametrize("data", ["AAE", "AA=A", "AA\nA", "AAé="])
def test_b64decode_refuses_malformed_input_naming_the_place(data: str) -> None:
    with pytest.raises(RemoteProtocolError, match=r"^reply\.audio\.data: invalid base64"):
        wire.b64_field({"data": data}, "data", "reply.audio")


# ------------------------------------------------------------------ parsing


def test_require_text_refuses_binary_frames_naming_the_peer() -> None:
    assert wire.require_text("{}", "Peer") == "{}"
    with pytest.raises(RemoteProtocolError, match="^Peer sent a binary frame"):
        wire.require_text(b"{}", "Peer")


@pytest.mark.parametrize(
    ("text", "tag", "match"),
    [
        ("nope", "type", "not valid JSON"),
        ("[" * 100_000, "type", "not valid JSON"),  # RecursionError, not a crash
        ("[]", "type", "not a JSON object"),
        ('{"type": 1}', "type", "no string 'type'"),
        ('{"type": "x"}', "event", "no string 'event'"),
    ],
)
def test_load_object_refuses_what_is_not_a_tagged_object(text: str, tag: str, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        wire.load_object(text, tag=tag)


def test_load_object_without_tag_takes_any_object() -> None:
    assert wire.load_object('{"setupComplete": {}}', tag=None) == {"setupComplete": {}}


@pytest.mark.parametrize("text", ['{"a":"' + "x" * 100 + '"}', '{"a":"' + "é" * 60 + '"}'])
def test_load_object_bounds_the_utf8_size(text: str) -> None:
    limit = len(text.encode("utf-8")) - 1
    with pytest.raises(RemoteProtocolError, match=f"exceeds the {limit}-byte limit") as info:
        wire.load_object(text, tag=None, max_bytes=limit)
    assert info.value.close_code_hint == CLOSE_MESSAGE_TOO_BIG
    assert wire.load_object(text, tag=None, max_bytes=limit + 1) == json.loads(text)


# ------------------------------------------------------------ field accessors

_OBJ: dict[str, Any] = {
    "s": "abc",
    "empty": "",
    "n": 7,
    "neg": -1,
    "flt": 1.0,
    "yes": True,
    "null": None,
    "obj": {"k": 1},
    "objs": [{"a": 1}, {}],
    "mixed": [{}, 1],
}

Accessor = Callable[[dict[str, Any], str, str], Any]


@pytest.mark.parametrize(
    ("accessor", "key", "expected"),
    [
        (wire.field, "null", None),
        (wire.str_field, "s", "abc"),
        (wire.text_field, "empty", ""),
        (wire.optional_str_field, "s", "abc"),
        (wire.optional_str_field, "null", None),
        (wire.optional_str_field, "absent", None),
        (wire.int_field, "n", 7),
        (wire.flag_field, "yes", True),
        (wire.flag_field, "absent", False),
        (wire.flag_field, "null", False),
        (wire.obj_field, "obj", {"k": 1}),
        (wire.object_list_field, "objs", [{"a": 1}, {}]),
    ],
)
def test_accessors_return_valid_values(accessor: Accessor, key: str, expected: object) -> None:
    assert accessor(_OBJ, key, "where") == expected


@pytest.mark.parametrize(
    ("accessor", "key", "message"),
    [
        (wire.field, "absent", "where: missing 'absent'"),
        (wire.str_field, "absent", "where: missing 'absent'"),
        (wire.str_field, "empty", "where: 'empty' must be a non-empty string, got ''"),
        (wire.str_field, "n", "where: 'n' must be a non-empty string, got 7"),
        (wire.text_field, "null", "where: 'null' must be a string, got None"),
        (wire.optional_str_field, "n", "where: 'n' must be a string or null, got 7"),
        (wire.int_field, "neg", "where: 'neg' must be a non-negative integer, got -1"),
        (wire.int_field, "flt", "where: 'flt' must be a non-negative integer, got 1.0"),
        (wire.int_field, "yes", "where: 'yes' must be a non-negative integer, got True"),
        (wire.int_field, "s", "where: 's' must be a non-negative integer, got 'abc'"),
        (wire.flag_field, "n", "where: 'n' must be a boolean, got 7"),
        (wire.obj_field, "objs", "where: 'objs' must be an object, got [{'a': 1}, {}]"),
        (wire.obj_field, "absent", "where: missing 'absent'"),
        (wire.object_list_field, "mixed", "where: 'mixed' must be a list of objects, got [{}, 1]"),
        (wire.object_list_field, "obj", "where: 'obj' must be a list of objects, got {'k': 1}"),
    ],
)
def test_accessors_refuse_wrong_values_with_one_wording(accessor: Accessor, key: str, message: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        accessor(_OBJ, key, "where")
    assert str(info.value) == message


def test_accessor_errors_cut_long_values() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        wire.int_field({"k": "x" * 500}, "k", "w")
    assert str(info.value) == "w: 'k' must be a non-negative integer, got '" + "x" * 39


# ---------------------------------------------------------------- state table


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    ERROR = "error"


class _Input(enum.Enum):
    START = "start"
    PING = "ping"


_TABLE = {(_State.NEW, _Input.START): _State.OPEN, (_State.OPEN, _Input.PING): _State.OPEN}


def test_table_transition_follows_the_table_and_blames_the_right_side() -> None:
    assert wire.table_transition(_TABLE, _State.NEW, _Input.START, inbound=False) is _State.OPEN
    with pytest.raises(RemoteProtocolError, match="^Peer sent ping in state NEW$"):
        wire.table_transition(_TABLE, _State.NEW, _Input.PING, inbound=True, peer="Peer")
    with pytest.raises(LocalProtocolError, match="^cannot send start in state OPEN$"):
        wire.table_transition(_TABLE, _State.OPEN, _Input.START, inbound=False)


# ---------------------------------------------------------------- core base


class _EchoCore(wire.SansIOCore[_State, str]):
    """Each text message ``"a b"`` yields the events ``"a"``, ``"b"``; ``"!"`` is malformed."""

    def __init__(self) -> None:
        super().__init__(_State.NEW, _State.ERROR, new=_State.NEW)

    def start(self) -> None:
        self._begin(_State.OPEN)

    def send(self, word: str) -> str:
        return self._guarded(self._send, word)

    def _send(self, word: str) -> str:
        if not word:
            raise LocalProtocolError("empty word")
        return word.upper()

    def _parse_events(self, message: str | bytes) -> list[str]:
        text = wire.require_text(message, "Echo")
        if text == "!":
            raise RemoteProtocolError("malformed")
        return text.split()


def _assert_dead(core: _EchoCore) -> None:
    assert core.state is _State.ERROR
    for call in (lambda: core.receive_message("a"), lambda: list(core.events()), lambda: core.send("a"), core.start):
        with pytest.raises(LocalProtocolError, match="dead after an earlier protocol error"):
            call()


def test_core_queues_events_in_order_until_drained() -> None:
    core = _EchoCore()
    core.start()
    core.receive_message("a b")
    core.receive_message("c")
    assert list(core.events()) == ["a", "b", "c"]
    assert list(core.events()) == []
    assert core.send("x") == "X"
    assert core.state is _State.OPEN


def test_core_receiving_before_start_is_our_error_and_kills_it() -> None:
    core = _EchoCore()
    with pytest.raises(LocalProtocolError, match="before initial_messages"):
        core.receive_message("a")
    _assert_dead(core)


def test_core_starting_twice_kills_it() -> None:
    core = _EchoCore()
    core.start()
    with pytest.raises(LocalProtocolError, match="called twice"):
        core.start()
    _assert_dead(core)


@pytest.mark.parametrize("message", ["!", b"a"])
def test_core_bad_input_kills_it_and_keeps_nothing(message: str | bytes) -> None:
    core = _EchoCore()
    core.start()
    with pytest.raises(RemoteProtocolError):
        core.receive_message(message)
    _assert_dead(core)


def test_core_failing_command_kills_it() -> None:
    core = _EchoCore()
    core.start()
    with pytest.raises(LocalProtocolError, match="empty word"):
        core.send("")
    _assert_dead(core)


# -------------------------------------------------------- provider helpers


def test_early_audio_keeps_the_newest_frames_within_its_limit() -> None:
    early = EarlyAudio(max_bytes=300)
    assert not early
    for n in range(1, 5):
        early.push(bytes([n]) * 100)
    assert early and early.buffered_bytes == 300 and early.dropped_bytes == 100
    assert early.take() == [b"\x02" * 100, b"\x03" * 100, b"\x04" * 100]
    assert not early and early.buffered_bytes == 0 and early.take() == []
    assert early.dropped_bytes == 100


def test_audio_ledger_clamps_cuts_to_the_audio_received() -> None:
    ledger: AudioLedger[str] = AudioLedger(bytes_per_ms=8)
    ledger.add("r1", 800)  # 100 ms
    assert ledger.received_ms("r1") == 100 and ledger.received_ms("other") == 0
    assert ledger.cut("r1", 250, "r1") == 100  # beyond what arrived: clamped
    assert ledger.cut("r1", 40, "r1") == 40
    assert ledger.received_ms("r1") == 40  # a later cut cannot reach past this one
    assert ledger.cut("r1", 90, "r1") == 40


def test_audio_ledger_nothing_to_cut_when_a_complete_reply_was_all_heard() -> None:
    ledger: AudioLedger[int] = AudioLedger(bytes_per_ms=2)
    ledger.add(1, 100)  # 50 ms
    ledger.complete(1)
    assert ledger.cut(1, 50, "reply-1") is None
    assert ledger.cut(1, 20, "reply-1") == 20  # heard only part of it
    ledger.add(2, 101)  # 50.5 ms: the marks count whole ms, so 50 is all of it
    ledger.complete(2)
    assert ledger.cut(2, 50, "reply-2") is None


def test_audio_ledger_refuses_to_cut_a_reply_without_audio() -> None:
    ledger: AudioLedger[str] = AudioLedger(bytes_per_ms=8)
    with pytest.raises(LocalProtocolError, match="no audio was received for item 'x'"):
        ledger.cut("x", 10, "x")
    ledger.complete("y")  # done without audio: nothing to cut, nothing refused
    assert ledger.cut("y", 10, "y") is None


def test_audio_ledger_keeps_the_latest_replies_only() -> None:
    ledger: AudioLedger[int] = AudioLedger(bytes_per_ms=8)
    n = AudioLedger.HISTORY + 44
    for reply in range(n):
        ledger.add(reply, 80 * (reply + 1))  # reply k: k + 1 times 10 ms
        ledger.add(reply, 8)  # more of the same reply keeps its place
        if reply % 2:
            ledger.complete(reply)
    # The 44 oldest are forgotten (a cut of one stands as asked: the bridge played that much of it); the rest
    # are exact.  (Before, such a cut was refused and a barge-in ended the call.)
    assert [ledger.received_ms(r) for r in (0, 43)] == [0, 0]
    assert ledger.cut(43, 5, "r43") == 5
    with pytest.raises(LocalProtocolError, match="no audio was received"):
        ledger.cut(10_000, 5, "never")
    assert ledger.received_ms(44) == 451 and ledger.received_ms(n - 1) == 10 * n + 1
    assert ledger.cut(n - 1, 10 * n + 1, "last") is None  # complete and all heard
    assert ledger.cut(n - 2, 5, "before") == 5
    ledger.complete(n)  # a reply that completes with no audio takes a place too
    assert ledger.received_ms(44) == 0 and ledger.cut(n, 10, "empty") is None


def test_every_core_s_states_and_inputs_hash_by_identity() -> None:
    """ProtocolEnum: the transition tables' lookups hash members with object.__hash__, not Enum's Python-level one."""
    import importlib

    from mediaserver.protocol._wire import ProtocolEnum

    modules = ["twilio", *(f"providers.{name}" for name in ("assemblyai", "deepgram", "elevenlabs", "gemini", "openai", "pcm"))]
    enums = [
        value
        for name in modules
        for value in vars(importlib.import_module(f"mediaserver.protocol.{name}")).values()
        if isinstance(value, type) and issubclass(value, enum.Enum) and value.__module__.startswith("mediaserver.protocol")
        and value is not ProtocolEnum
    ]
    assert len(set(enums)) == 10  # Twilio, OpenAI and Gemini: states and inputs; the others: states
    for enum_type in enums:
        assert issubclass(enum_type, ProtocolEnum), enum_type
        for member in enum_type:
            assert hash(member) == object.__hash__(member)
            assert {member: 1}[enum_type(member.value)] == 1  # found again by value


def test_recent_set_forgets_the_oldest_beyond_its_size() -> None:
    recent = RecentSet(3)
    for key in "abcd":
        recent.add(key)
    assert len(recent) == 3 and "a" not in recent and all(k in recent for k in "bcd")
    recent.add("b")  # seen again: the newest now
    recent.add("e")
    assert "c" not in recent and all(k in recent for k in "bde")
    recent.discard("d")
    recent.discard("zz")
    assert len(recent) == 2
