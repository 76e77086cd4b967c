"""bench/isolation.py: its fake model speaks GA Realtime, its figures add up, and a quick run behaves.

No timing is asserted.  What is checked: every message the fake model sends,
well behaved or in any ``m_*`` scenario, is a valid server event of the
OpenAI SDK (strict, no unknown keys, nothing lost in a round trip) except
the three that are wrong on purpose (``m_tiny``'s unknown type ``x.y``,
``m_badjson``'s broken JSON, ``m_binary``'s binary frame), and our own core
takes the well-behaved exchange; lost and cut frames, the bad call's end
and the medians of repeats are computed as documented; every scenario is
documented; and a quick run of the baseline and ``m_badjson`` loses no frame
of a good call, ends the bad call (and only it), and leaves no model
session open.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest
import trio
import trio.testing
from openai.types.realtime import RealtimeServerEvent

from mediaserver.protocol.providers.base import AudioDelta, SpeechStarted
from mediaserver.protocol.providers.openai import OpenAIRealtimeConfig, OpenAIRealtimeSession

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _isolation_peers as peers  # noqa: E402
import _isolation_ws as ws  # noqa: E402
import isolation  # noqa: E402
from _loadgen import CHUNK_BYTES, FRAME_BYTES, tag_audio  # noqa: E402

from tests._ws_server import assert_no_extra  # noqa: E402

_SERVER_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RealtimeServerEvent)
# Sent wrong on purpose: what the misbehaving model is for (checked to be the only such messages).
_DELIBERATELY_INVALID = {
    "m_tiny": ws.Message(ws.OP_TEXT, b'{"type":"x.y"}'),
    "m_badjson": ws.Message(ws.OP_TEXT, b'{"type": "response.output_audio.delta", broken'),
    "m_binary": ws.Message(ws.OP_BINARY, b"\x00\x01binary"),
}
_TIMELINE = peers.Timeline(bad_at_s=0.0, bad_len_s=1.0, after_s=1.5, flood_s=0.05, settle_s=0.05, reply_s=0.2)


def _server_event(text: bytes) -> Any:
    model = _SERVER_EVENT.validate_json(text, strict=True)
    assert_no_extra(model)
    assert model.model_dump(mode="json", exclude_unset=True) == json.loads(text), text[:200]
    return model


@contextlib.asynccontextmanager
async def _session_pair(scenario: str) -> AsyncIterator[tuple[peers.ModelSession, ws.WebSocket]]:
    """A fake-model session for the bad call (number 1 of 2) and the server's end of its socket (a socketpair)."""
    ours, theirs = (trio.SocketStream(s) for s in trio.socket.socketpair())
    async with ours, theirs:
        model = peers.FakeModel(peers.Recorder(2), peers.SCENARIOS[scenario], _TIMELINE)
        yield peers.ModelSession(model, ws.WebSocket(ours, client=False), 1), ws.WebSocket(theirs, client=True)


async def _collect(server_end: ws.WebSocket, got: dict[bytes, ws.Message], *, task_status: trio.TaskStatus[None]) -> None:
    """Every distinct message the model sends, until it closes."""
    task_status.started()
    try:
        while True:
            message = await server_end.receive()
            got.setdefault(message.payload, message)
    except ws.Closed:
        pass


async def test_fake_model_well_behaved_exchange_is_sdk_server_events_our_core_accepts() -> None:
    core = OpenAIRealtimeSession(OpenAIRealtimeConfig(model="gpt-realtime", instructions="Be brief."))
    got: dict[bytes, ws.Message] = {}
    with trio.fail_after(10):
        async with _session_pair("none") as (session, server_end), trio.open_nursery() as nursery:
            await nursery.start(_collect, server_end, got)
            nursery.start_soon(session.run)
            session.recorder.start()
            await server_end.send_text(core.initial_messages()[0])  # our session.update
            for k in range(20):  # tagged frames of call 1: the model starts talking
                session.recorder.calls[1].up_sent_s.append(session.recorder.now())
                audio = tag_audio(1, k, FRAME_BYTES)
                await server_end.send_text(json.dumps({"type": "input_audio_buffer.append",
                                                       "audio": base64.b64encode(audio).decode()}))
            await trio.sleep(_TIMELINE.reply_s + peers.SPEECH_S + 0.2)  # one whole reply, its barge-in
            await server_end.send_text(json.dumps({"type": "conversation.item.truncate", "item_id": "item_1_1",
                                                   "content_index": 0, "audio_end_ms": 120}))
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    messages = list(got.values())
    assert all(m.opcode == ws.OP_TEXT for m in messages)
    kinds = [_server_event(m.payload).type for m in messages]
    for kind in ("session.created", "session.updated", "response.created", "response.output_audio.delta",
                 "input_audio_buffer.speech_started", "response.output_audio.done", "response.done",
                 "input_audio_buffer.speech_stopped", "conversation.item.truncated"):
        assert kind in kinds, kind
    assert session.recorder.calls[1].up_arrived_s.keys() == set(range(20))
    for message in messages:
        core.receive_message(message.payload.decode())
    events = list(core.events())
    deltas = [e for e in events if isinstance(e, AudioDelta)]
    assert deltas and all(len(e.payload) == CHUNK_BYTES for e in deltas)
    assert any(isinstance(e, SpeechStarted) for e in events)


async def _act(act: peers.ModelAct, session: peers.ModelSession) -> None:
    with contextlib.suppress(ws.Closed):  # m_close, m_rst: the model's own end
        await act(session, _TIMELINE)


@pytest.mark.parametrize("scenario", [name for name, s in peers.SCENARIOS.items() if s.model_act is not None])
async def test_every_message_of_a_misbehaving_model_is_an_sdk_server_event_or_wrong_on_purpose(scenario: str) -> None:
    act = peers.SCENARIOS[scenario].model_act
    assert act is not None
    got: dict[bytes, ws.Message] = {}
    with trio.fail_after(20):
        async with _session_pair(scenario) as (session, server_end), trio.open_nursery() as nursery:
            await nursery.start(_collect, server_end, got)
            session.call = session.recorder.bad  # (as its first frame would have told it)
            nursery.start_soon(_act, act, session)
            # Most of them end waiting for ever: done once nothing moves for longer than any pause they take.
            await trio.testing.wait_all_tasks_blocked(cushion=peers.SPEECH_S + 0.05)
            nursery.cancel_scope.cancel()
    invalid = _DELIBERATELY_INVALID.get(scenario)
    for message in got.values():
        if message == invalid:
            continue
        assert message.opcode == ws.OP_TEXT, (scenario, message.payload[:80])
        _server_event(message.payload)
    assert invalid is None or invalid in got.values()


async def test_websocket_reads_messages_split_anywhere_answers_pings_and_reports_the_close() -> None:
    """The bench's bare WebSocket: masked or not, 7/16/64-bit lengths, fragments, split at every byte."""
    big = b"x" * 70_000
    small = (
        ws.frame(ws.OP_TEXT, b"one", masked=True)
        + ws.frame(ws.OP_PING, b"p", masked=True)
        + ws.frame(ws.OP_TEXT, b"fr", masked=True, fin=False)
        + ws.frame(ws.OP_PONG, b"", masked=True)  # (a control frame between fragments)
        + ws.frame(ws.OP_CONT, b"ag", masked=True)
        + ws.frame(ws.OP_BINARY, b"y" * 300, masked=False)
    )
    code = (1011).to_bytes(2, "big")
    wire = small + ws.frame(ws.OP_TEXT, big, masked=False) + ws.frame(ws.OP_CLOSE, code + b"bye", masked=True)
    a, b = (trio.SocketStream(s) for s in trio.socket.socketpair())
    async with a, b:
        reader = ws.WebSocket(a, client=False)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def feed() -> None:  # byte by byte, then (the 64-bit frame) in prime-sized pieces
                    pieces = [wire[k:k + 1] for k in range(len(small) + 20)]
                    pieces += [wire[k:k + 997] for k in range(len(small) + 20, len(wire), 997)]
                    for piece in pieces:
                        await b.send_all(piece)

                nursery.start_soon(feed)
                got = [await reader.receive() for _ in range(4)]
                with pytest.raises(ws.Closed) as closed:
                    await reader.receive()
        assert got == [ws.Message(ws.OP_TEXT, b"one"), ws.Message(ws.OP_TEXT, b"frag"),
                       ws.Message(ws.OP_BINARY, b"y" * 300), ws.Message(ws.OP_TEXT, big)]
        assert (closed.value.code, closed.value.reason) == (1011, "bye")
        answers = await b.receive_some(100)
        assert answers == ws.frame(ws.OP_PONG, b"p", masked=False) + ws.frame(ws.OP_CLOSE, code, masked=False)


def test_every_scenario_is_documented_and_the_defaults_exist() -> None:
    doc = isolation.__doc__ or ""
    for name in peers.SCENARIOS:
        assert f"``{name}`` --" in doc, name
    assert set(isolation.DEFAULT_SCENARIOS) <= set(peers.SCENARIOS)
    assert set(isolation.QUICK_SCENARIOS) <= set(peers.SCENARIOS)
    assert isolation.DEFAULT_SCENARIOS[0] == isolation.BASELINE


def test_losses_count_a_gap_as_lost_and_the_unheard_end_of_an_interrupted_reply_as_cut() -> None:
    call = peers.CallLog(0, bad=False)
    call.up_sent_s = [0.1 * k for k in range(10)]
    call.up_arrived_s = {k: 0.1 * k + 0.001 for k in range(10) if k != 4}
    # reply 1: deltas 0-4, interrupted, 3 and 4 never arrived (cut); reply 2: 5-9, 6 missing before 7 (lost),
    # 9 missing at its end but reply 2 was not interrupted (lost); delta 10 sent after the end (not counted)
    call.down_sent_s = [0.1 * k for k in range(11)]
    call.down_reply = [1] * 5 + [2] * 6
    call.barged = {1}
    call.down_arrived_s = {k: 0.1 * k for k in (0, 1, 2, 5, 7, 8, 10)}
    assert isolation.losses(call, until_s=0.95) == {"up": 1, "down": 2, "cut": 2}


def test_bad_call_end_prefers_the_servers_logged_reason_and_times_it_from_the_misbehaviour() -> None:
    timeline = peers.Timeline()
    bad = peers.CallLog(3, bad=True, call_sid="CA123")
    bad.stop_s, bad.closed_s, bad.close = 25.0, 25.01, "close 1000"
    assert isolation.bad_call_end(bad, timeline, "") == (None, None)  # it lived to its stop
    bad.stop_s, bad.closed_s, bad.close = None, 8.5, "close 1011 provider ended: x"
    bad.model_closed_s, bad.model_close = 8.4, "close 1002 y"
    log = "W mediaserver.calls: call CA123: ended (provider ended: openai protocol error: (bad)) after 8.4 s; frames in 3"
    how, after = isolation.bad_call_end(bad, timeline, log)
    assert how == "provider ended: openai protocol error: (bad)" and after == pytest.approx(0.4)
    how, _ = isolation.bad_call_end(bad, timeline, "")
    assert how == "model session: close 1002 y"  # the first end seen, when the log has none


def test_repeats_combine_into_medians_sums_and_the_worst_end_state() -> None:
    def run(up: float, lost: int, open_model: int, end: str) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(isolation._MEDIANS, 1.0) | dict.fromkeys(isolation._SUMS, 0)
        return row | {"scenario": "m_x", "side": "model", "expected": "ends", "up_p99_ms": up, "up_lost": lost,
                      "open_model": open_model, "open_server": 0, "server_exit": None, "as_expected": end != "stayed",
                      "bad_end": end, "bad_end_after_s": None if end == "stayed" else 1.0}

    row = isolation.combine([run(2.0, 0, 0, "closed"), run(50.0, 1, 0, "closed"), run(3.0, 0, 1, "closed")])
    assert (row["up_p99_ms"], row["up_lost"], row["open_model"], row["repeats"]) == (3.0, 1, 1, 3)
    assert row["as_expected"] and row["bad_end"] == "closed" and row["bad_end_after_s"] == 1.0
    mixed = isolation.combine([run(2.0, 0, 0, "closed"), run(2.0, 0, 0, "stayed")])
    assert not mixed["as_expected"] and mixed["bad_end"].startswith("mixed: ")
    rows = [row | {"scenario": "none", "up_p99_ms": 2.0, "down_p99_ms": 4.0}, row | {"down_p99_ms": 2.0}]
    isolation.add_ratios(rows)
    assert (rows[1]["up_p99_x"], rows[1]["down_p99_x"]) == (1.5, 0.5)
    found = isolation.findings(rows)
    assert any("lost 1 uplink" in f for f in found) and any("still open" in f for f in found)


def test_a_scenario_run_under_heavy_steal_gets_a_caveat_not_a_finding() -> None:
    rows = [{"scenario": "none", "steal_pct": 2.0}, {"scenario": "m_slow", "steal_pct": 35.4},
            {"scenario": "c_flood", "steal_pct": math.nan}, {"scenario": "m_badjson", "steal_pct": 10.0}]  # fmt: skip
    said = isolation.caveats(rows)
    assert [line.split(":")[0] for line in said] == ["m_slow", "m_badjson"]
    assert said[0] == ("m_slow: the hypervisor took 35% of the CPUs in the window: its latencies (and any lost frames)"
                       " may be the host's, not the server's; run it again")  # fmt: skip


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.CompletedProcess[str], dict[str, Any]]]:
    """One quick run: the baseline and m_badjson, 2 good calls each (about 20 s)."""
    out = tmp_path_factory.mktemp("isolation") / "iso.json"
    records = ROOT / "data"  # the checkout's call records: the bench's calls must not land there
    before = sorted(p.name for p in records.iterdir()) if records.is_dir() else []
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "isolation.py"), "--quick", "--scenarios", "m_badjson", "--calls", "2",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert (sorted(p.name for p in records.iterdir()) if records.is_dir() else []) == before
    yield proc, json.loads(out.read_text()) if out.exists() else {}


def test_quick_run_prints_its_table_and_finds_nothing(quick_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]]) -> None:
    proc, data = quick_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for text in ("Isolation: one bad call", "bad call ended", "up p99", "x base", "clear max", "open m/s", "findings: none"):
        assert text in proc.stdout, text
    lines = proc.stdout.splitlines()
    assert any(line.startswith("none ") and " stayed " in line for line in lines)
    assert any(line.startswith("m_badjson ") and "provider ended" in line for line in lines)
    assert "[2/2] m_badjson" in proc.stderr  # progress
    assert [r["scenario"] for r in data["rows"]] == ["none", "m_badjson"]


def test_quick_run_ends_only_the_bad_call_and_leaves_nothing_open(
    quick_run: tuple[subprocess.CompletedProcess[str], dict[str, Any]],
) -> None:
    _, data = quick_run
    rows = {r["scenario"]: r for r in data["runs"]}
    assert rows["none"]["bad_end"] == "stayed" and rows["none"]["as_expected"]
    bad = rows["m_badjson"]
    assert "not valid JSON" in bad["bad_end"] and bad["as_expected"]
    assert 0 <= bad["bad_end_after_s"] < 2  # (at once, as behaviour goes; not a timing)
    for row in rows.values():
        assert row["up_sent"] > 0 and row["down_sent"] > 0 and row["windows"]["during"]["up_samples"] > 0
        assert (row["up_lost"], row["down_lost"], row["misrouted"], row["good_ended"]) == (0, 0, 0, 0), row["scenario"]
        assert (row["open_model"], row["open_server"], row["server_exit"]) == (0, 0, None), row["scenario"]
        assert row["model_sessions"] == 3
