"""bench/frame_path.py and bench/load.py run end to end; the load bench's fake model speaks GA Realtime.

No timing is asserted: the benches' figures are shown, not enforced.  What is
checked is that every table has its rows and sane values, that a tiny load
run bridges every frame both ways with no failed call and no leaked
session, on our server and on the peer (bench/_peer_sample.py, the design
of Twilio's Python sample) in the same run, and that each message the fake
model sends is a valid server event of the OpenAI SDK, and each message the
peer sends the model a valid client event (strict, no unknown keys, nothing
lost in a round trip).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pydantic
import pytest
from openai.types.realtime import (
    RealtimeClientEvent,
    RealtimeServerEvent,
    SessionUpdateEvent,
)

from mediaserver.protocol.providers.base import AudioDelta
from mediaserver.protocol.providers.openai import (
    OpenAIRealtimeConfig,
    OpenAIRealtimeSession,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _loadgen  # noqa: E402

from tests._ws_server import assert_no_extra

_SERVER_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RealtimeServerEvent)
_CLIENT_EVENT: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RealtimeClientEvent)
_PEER_MISSING = [m for m in ("fastapi", "uvicorn", "websockets") if importlib.util.find_spec(m) is None]
needs_peer = pytest.mark.skipif(
    bool(_PEER_MISSING),
    reason=f"the load bench's peer needs {', '.join(_PEER_MISSING)} (pip install fastapi uvicorn websockets)",
)


def _run(script: str, *args: str, timeout: float = 60) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def _server_event(text: str) -> Any:
    model = _SERVER_EVENT.validate_json(text, strict=True)
    assert_no_extra(model)
    assert model.model_dump(mode="json", exclude_unset=True) == json.loads(text), text[:200]
    return model


def _client_event(text: str) -> Any:
    model = _CLIENT_EVENT.validate_json(text, strict=True)
    assert_no_extra(model)
    assert model.model_dump(mode="json", exclude_unset=True) == json.loads(text), text[:200]
    return model


@pytest.fixture(scope="module")
def quick_load(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any], Path]:
    """One tiny load run (2 calls), against the peer too where its packages are installed: (stdout, JSON, plot)."""
    tmp = tmp_path_factory.mktemp("load")
    peer = ["--no-peer"] if _PEER_MISSING else []
    records = ROOT / "data"  # the checkout's own call records (make run's): the bench's calls must not land there
    before = _files(records)
    out = _run(
        "load.py", "--quick", "--steps", "2", "--hold", "1.2", "--grace", "0.5", "--json", str(tmp / "load.json"),
        "--plot", str(tmp / "load.png"), *peer,
    )
    assert _files(records) == before
    return out, json.loads((tmp / "load.json").read_text()), tmp / "load.png"


def _files(directory: Path) -> dict[str, tuple[int, int]]:
    """Name -> (size, mtime) of what ``directory`` holds ({} if it does not exist)."""
    if not directory.is_dir():
        return {}
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()}


def _assert_clean(row: dict[str, Any]) -> None:
    """A step's row in which every frame crossed both ways and nothing failed or leaked."""
    assert row["failed"] == 0, row["first_failure"]
    assert row["sessions"] == 2 and row["leaked"] == 0
    assert row["up_sent"] >= 2 * 50 and row["up_lost"] == 0 and row["up_made_up"] == 0
    assert row["down_sent"] > 0 and row["down_lost"] == 0 and row["down_made_up"] == 0
    assert row["up_samples"] > 0 and row["down_samples"] > 0
    assert 0 < row["up_p50_ms"] <= row["up_p99_ms"] and 0 < row["down_p50_ms"] <= row["down_p99_ms"]
    assert row["server_cpu_pct"] > 0 and row["server_rss_mib"] > 10
    assert row["model_errors"] == []


def test_frame_path_quick_run_has_every_stage_of_every_path(tmp_path: Path) -> None:
    out = _run("frame_path.py", "--quick", "--json", str(tmp_path / "fp.json"))
    for text in ["Table 1. Bridge stages", "Table 2. Per call", "median ns", "p99 ns", "% of 33 µs"]:
        assert text in out, text
    data = json.loads((tmp_path / "fp.json").read_text())
    stages = data["tables"]["stages"]
    by_path: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    for row in stages:
        by_path.setdefault(row["path"], {})[row["direction"], row["stage"]] = row
    assert set(by_path) == {"pcmu passthrough", "pcm16 8k", "pcm16 16k", "pcm16 24k"}
    for path, rows in by_path.items():
        for row in rows.values():
            assert math.isfinite(row["median_ns"]) and row["median_ns"] >= 0, row
            assert row["p99_ns"] >= row["median_ns"] * 0.999, row
        for direction in ("up", "down"):
            counted = [r for (d, _), r in rows.items() if d == direction and r["counted"]]
            assert counted and not any(r["stage"] == "total" or "VAD" in r["stage"] for r in counted)
            total = rows[direction, "total"]
            assert total["median_ns"] > 0
            # the total is a per-frame sum of the bridge stages, so at least the largest one
            assert total["median_ns"] >= 0.9 * max(r["median_ns"] for r in counted), path
        assert ("up", "Twilio parse (take_media: native scan, checks, base64)") in rows
        assert ("up", "provider serialize + frame (native envelope)") in rows
        assert not rows["up", "  ordinary parser (json.loads, checks), not used"]["counted"]
        assert rows["up", "WebSocket: receive frame, native (I/O)"]["median_ns"] > 0
        assert not rows["up", "WebSocket: receive frame, native (I/O)"]["counted"]
        assert ("down", "Twilio media+mark serialize + frame (native envelope)") in rows
        assert (("up", "µ-law decode") in rows) == (path != "pcmu passthrough")
        resampled = path in ("pcm16 16k", "pcm16 24k")
        assert any("resample" in name for (_, name) in rows) == resampled, path
    summary = {r["path"]: r for r in data["tables"]["summary"]}
    for row in summary.values():
        assert row["both_ns"] > 0 and row["share_pct"] > 0
        assert row["both_ns"] >= 0.9 * max(row["up_ns"], row["down_ns"])


def test_load_quick_run_bridges_every_frame_and_leaks_nothing(quick_load: tuple[str, dict[str, Any], Path]) -> None:
    out, data, png = quick_load
    for text in ["Load: concurrent calls", "server", "up p99", "dn p99", "lost up/dn", "leaked", "srv CPU%", "gen-bound"]:
        assert text in out, text
    ours = [r for r in data["rows"] if r["server"] == "ours"]
    assert [r["calls"] for r in ours] == [2]
    _assert_clean(ours[0])
    assert ours[0]["sockets_per_wakeup"] >= 1  # our server's reactor handled the sockets (from its /healthz)
    assert ours[0]["gen_gc_max_ms"] >= 0  # measured (NaN would fail)
    assert "socks/wake" in out
    assert 0 <= ours[0]["steal_pct"] <= 100 and "steal%" in out  # (Linux: /proc/stat has steal, 0 on bare metal)
    assert 0 <= ours[0]["server_sys_pct"] <= 100 and " sys%" in out  # (a share; NaN fails: 2 calls may use no whole tick)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_peer
def test_load_quick_run_measures_the_peer_in_the_same_run(quick_load: tuple[str, dict[str, Any], Path]) -> None:
    out, data, _ = quick_load
    assert "_peer_sample.py" in data["header"]["peer"] and "uvicorn" in data["header"]["peer"]
    peer = [r for r in data["rows"] if r["server"] == "peer"]
    assert [r["calls"] for r in peer] == [2]
    _assert_clean(peer[0])  # the peer bridged every frame both ways too: same callers, same fake model
    assert peer[0]["sockets_per_wakeup"] is None  # no reactor there
    ours = next(r for r in data["rows"] if r["server"] == "ours")
    [pair] = data["comparison"]
    # ("ok" also needs p99 within --max-p99-ms: a timing on a shared CI machine, which the table shows, not a test's
    # to assert; what it says must follow from each row.)
    assert pair["calls"] == 2 and (pair["ours_ok"], pair["peer_ok"]) == (not ours["broken"], not peer[0]["broken"])
    assert pair["ratio"] == pytest.approx(peer[0]["cpu_pct_per_call"] / ours["cpu_pct_per_call"])
    assert pair["peer_up_p99_ms"] == peer[0]["up_p99_ms"] and pair["ours_down_p99_ms"] == ours["down_p99_ms"]
    for text in ["Peer in the same run", "CPU%/call ours", "peer/ours", "leaked o|p"]:
        assert text in out, text


@needs_peer
def test_peer_sample_messages_are_sdk_client_events() -> None:
    import _peer_sample

    update = _client_event(_peer_sample.session_update())
    assert update.type == "session.update"
    assert update.session.audio.input.format.type == "audio/pcmu"
    assert update.session.audio.output.format.type == "audio/pcmu"
    append = _client_event(_peer_sample.audio_append("f/8A"))
    assert (append.type, append.audio) == ("input_audio_buffer.append", "f/8A")
    truncate = _client_event(_peer_sample.item_truncate("item_1", 480))
    assert (truncate.type, truncate.item_id, truncate.content_index, truncate.audio_end_ms) == (
        "conversation.item.truncate", "item_1", 0, 480
    )


@needs_peer
def test_peer_sample_answers_twilio_as_the_callers_expect() -> None:
    import _peer_sample

    url = "ws://127.0.0.1:9/media-stream"
    assert _loadgen.parse_stream_twiml(_peer_sample.incoming_call_twiml(url)) == (url, {})
    assert _peer_sample.twilio_media("MZ1", "f/8A") == {"event": "media", "streamSid": "MZ1", "media": {"payload": "f/8A"}}
    assert _peer_sample.twilio_mark("MZ1", "m") == {"event": "mark", "streamSid": "MZ1", "mark": {"name": "m"}}
    assert _peer_sample.twilio_clear("MZ1") == {"event": "clear", "streamSid": "MZ1"}


def test_fake_model_messages_are_sdk_server_events() -> None:
    # the session.update our server sends, answered by the echo the fake model builds from it
    core = OpenAIRealtimeSession(OpenAIRealtimeConfig(model="gpt-realtime", instructions="Be brief."))
    first = core.initial_messages()[0]
    SessionUpdateEvent.model_validate_json(first)
    session = json.loads(first)["session"]
    audio = _loadgen.tag_audio(7, 3, _loadgen.CHUNK_BYTES)
    messages = [
        _loadgen.session_created("e1"),
        _loadgen.session_updated("e2", session),
        _loadgen.response_created("e3", "resp_1"),
        _loadgen.audio_delta("e4", "resp_1", "item_1", audio),
        _loadgen.audio_done("e5", "resp_1", "item_1"),
        _loadgen.response_done("e6", "resp_1"),
        _loadgen.item_truncated("e7", "item_1", 0, 120),
    ]
    types = [_server_event(m).type for m in messages]
    assert types == [
        "session.created",
        "session.updated",
        "response.created",
        "response.output_audio.delta",
        "response.output_audio.done",
        "response.done",
        "conversation.item.truncated",
    ]
    # and our own core accepts the whole exchange, audio intact
    for message in messages[:6]:
        core.receive_message(message)
    events = list(core.events())
    assert [e.payload for e in events if isinstance(e, AudioDelta)] == [audio]


@pytest.mark.parametrize(("call_no", "frame_no"), [(1, 0), (65535, 2**32 - 1), (300, 123456)])
def test_tags_round_trip_and_untagged_audio_is_recognised(call_no: int, frame_no: int) -> None:
    audio = _loadgen.tag_audio(call_no, frame_no, _loadgen.FRAME_BYTES)
    assert len(audio) == _loadgen.FRAME_BYTES
    assert _loadgen.read_tag(audio) == (call_no, frame_no)
    assert _loadgen.read_tag(b"\xff" * _loadgen.FRAME_BYTES) is None
    assert _loadgen.read_tag(audio[:5]) is None


def test_twiml_stream_and_parameters_are_read_from_the_servers_answer() -> None:
    from mediaserver import twiml

    text = twiml.connect_stream("ws://127.0.0.1:9/media-stream", {"token": "t0k", "CallSid": "CA1"})
    assert _loadgen.parse_stream_twiml(text) == ("ws://127.0.0.1:9/media-stream", {"token": "t0k", "CallSid": "CA1"})
    with pytest.raises(ValueError, match="no <Connect><Stream>"):
        _loadgen.parse_stream_twiml(twiml.say_and_hangup("busy"))


def test_tls_send_quick_run_measures_both_transports(tmp_path: Path) -> None:
    """bench/tls_send.py: both rows, positive figures, the ratio consistent with them (nothing timed is asserted)."""
    out = _run("tls_send.py", "--quick", "--json", str(tmp_path / "tls.json"))
    assert "Table 1. Sender CPU per send_all" in out
    rows = json.loads((tmp_path / "tls.json").read_text())["rows"]
    assert [r["transport"] for r in rows] == ["plain TCP", "TLS"]
    for row in rows:
        assert row["peer_us"] > 0 and row["ours_us"] > 0
        assert math.isclose(row["ratio"], row["peer_us"] / row["ours_us"])


def test_load_quick_run_over_tls_bridges_every_frame_on_both_servers(tmp_path: Path) -> None:
    """``load.py --tls``: the fake model on wss:// with a fresh self-signed certificate that both servers must verify."""
    peer = ["--no-peer"] if _PEER_MISSING else []
    out = _run(
        "load.py", "--quick", "--tls", "--steps", "2", "--hold", "1.2", "--grace", "0.5",
        "--json", str(tmp_path / "load.json"), "--no-plot", *peer,
    )
    data = json.loads((tmp_path / "load.json").read_text())
    assert data["tls"] is True
    assert data["tls_negotiated"].startswith("TLSv1.")  # the sessions really ran TLS (an untrusted cert opens none)
    assert data["header"]["model link"].startswith("wss://")
    assert "model over wss:// (TLS)" in out
    servers = ["ours"] if _PEER_MISSING else ["ours", "peer"]
    assert sorted(r["server"] for r in data["rows"]) == servers
    for row in data["rows"]:
        assert row["calls"] == 2
        _assert_clean(row)


def test_load_quick_run_with_a_model_faster_than_real_time_bridges_every_frame(tmp_path: Path) -> None:
    """``load.py --model-speed 5``: replies come at 5x real time; the server paces them, every delta still arrives,
    and only each reply's first delta is timed (the server holds the rest back on purpose)."""
    out = _run(
        "load.py", "--quick", "--no-peer", "--model-speed", "5", "--steps", "2", "--hold", "1.5", "--grace", "0.5",
        "--json", str(tmp_path / "load.json"), "--no-plot",
    )
    data = json.loads((tmp_path / "load.json").read_text())
    assert data["header"]["calls"].endswith("each sent at 5x real time")
    assert "dn: each reply's first delta only" in out
    [row] = data["rows"]
    _assert_clean(row)
    # --quick replies are 400 ms: ten 40 ms deltas each, one of them timed (if it was sent in the window)
    assert row["down_samples"] * 10 <= row["down_sent"]


def test_fake_model_tls_layer_decrypts_whole_and_split_records(tmp_path: Path) -> None:
    """The model's server-side TLS on memory BIOs, against a client SSLObject: a handshake, then records
    arriving whole, several at once, and split byte by byte, both ways, and close_notify."""
    import ssl

    from tls_send import make_certificate

    cert, key = make_certificate(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    server = _loadgen._TLS(server_context)
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = ssl.create_default_context(cafile=str(cert)).wrap_bio(c_in, c_out, server_hostname="127.0.0.1")
    done = {"client": False, "server": False}
    for _ in range(10):  # pump the flights both ways until both ends have finished (TLS 1.3: the client first)
        for name, end in (("client", client), ("server", server.obj)):
            try:
                end.do_handshake()
                done[name] = True
            except ssl.SSLWantReadError:
                pass
        server.incoming.write(c_out.read())
        c_in.write(server.outgoing.read())
        if all(done.values()):
            break
    else:
        pytest.fail("the TLS handshake did not finish")
    assert server.obj.version() == "TLSv1.3"
    # client -> model: three records in one read, then one record a byte at a time
    for message in (b"one", b"two" * 100, b"three"):
        client.write(message)
    assert server.decrypt(c_out.read()) == b"one" + b"two" * 100 + b"three"
    client.write(b"split record")
    wire = c_out.read()
    got = b"".join(server.decrypt(wire[i:i + 1]) for i in range(len(wire)))
    assert got == b"split record"
    # model -> client
    c_in.write(server.encrypt(b"reply") + server.encrypt(b"x" * 70000))
    received = b""
    while True:
        try:
            received += client.read(1 << 17)
        except ssl.SSLWantReadError:
            break
    assert received == b"reply" + b"x" * 70000
    assert not server.closed
    with pytest.raises(ssl.SSLWantReadError):
        client.unwrap()  # sends close_notify, then waits for ours
    assert server.decrypt(c_out.read()) == b"" and server.closed


def test_load_bench_finds_the_generator_s_longest_collection_in_a_window() -> None:
    import gc
    import time

    import load

    pauses = load._GCPauses()
    gc.callbacks.append(pauses)
    try:
        before = time.perf_counter()
        garbage = [[i] for i in range(200_000)]
        start = time.perf_counter()
        gc.collect()
        end = time.perf_counter()
        del garbage
    finally:
        gc.callbacks.remove(pauses)
    longest = pauses.longest_s(start, end)
    assert 0 < longest <= end - start
    assert pauses.longest_s(before - 10, before - 5) == 0.0  # none began then


def load_run(cpu: float, up_p99: float, *, lost: int = 0, failed: str | None = None, steal: float = 1.0,
             calls: int = 100, server: str = "ours") -> dict[str, Any]:  # fmt: skip
    """One run's figures of a load step, as run_step returns them."""
    import load

    row: dict[str, Any] = {key: 1.0 for key in load._MEDIANS}
    row.update({key: 10 for key in load._SUMS})
    row.update(
        calls=calls, server=server, server_cpu_pct=cpu, up_p99_ms=up_p99, down_p99_ms=1.0, up_lost=lost, down_lost=0,
        failed=int(failed is not None), leaked=0, failure_kinds={failed: 1} if failed else {},
        first_failure=failed, model_errors=[], server_active_after=0, gen_bound=False, sockets_per_wakeup=4.0,
        steal_pct=steal,
    )
    return row


def test_load_combines_a_steps_runs_into_medians_and_sums() -> None:
    import argparse

    import load

    run = load_run
    args = argparse.Namespace(max_p99_ms=20.0)
    runs = [run(30.0, 2.0), run(20.0, 50.0, steal=40.0), run(25.0, 3.0)]  # one run's p99 far out: the median is not
    row = load.combine(runs, args)
    assert row["steal_pct"] == 40.0  # the worst run's: it explains that run
    assert (row["server_cpu_pct"], row["up_p99_ms"], row["repeats"], row["runs"]) == (25.0, 3.0, 3, runs)
    assert row["cpu_pct_per_call"] == 0.25 and row["calls_per_core"] == 400
    assert row["up_sent"] == 30 and row["sessions"] == 30 and not row["broken"]
    lossy = load.combine([run(30.0, 2.0), run(20.0, 2.0, lost=1, failed="stream: refused")], args)
    assert lossy["up_lost"] == 1 and lossy["failed"] == 1 and lossy["broken"]  # any run's loss breaks the step
    assert lossy["failure_kinds"] == {"stream: refused": 1} and lossy["first_failure"] == "stream: refused"
    single = load.combine([run(30.0, 2.0)], args)
    assert "runs" not in single and single["server_cpu_pct"] == 30.0


def test_an_interrupted_step_keeps_the_runs_it_finished() -> None:
    import load

    args = load.parse_args(["--steps", "100,200", "--repeats", "3", "--no-plot"])
    done = [load.combine([load_run(30.0, 2.0)] * 3, args), load.combine([load_run(60.0, 2.0, server="peer")] * 3, args)]
    # Interrupted in the step of 200 calls: ours finished two runs, the peer none.
    step = {"ours": [load_run(50.0, 3.0, calls=200), load_run(54.0, 5.0, calls=200)], "peer": []}
    [partial] = load.interrupted_rows(step, done, args)
    assert (partial["calls"], partial["server"], partial["repeats"], partial["partial"]) == (200, "ours", 2, True)
    assert partial["server_cpu_pct"] == 52.0 and partial["up_p99_ms"] == 4.0  # the median of the two
    # A step whose row was already made (the interrupt came after it) is not added twice.
    assert load.interrupted_rows({"ours": [load_run(30.0, 2.0)] * 3}, done, args) == []
    table = load.table([*done, partial], args, pinned=True)
    assert "ours at 200 calls: interrupted; 2 of 3 run(s) finished, and the row is theirs." in table
    assert "interrupted" not in load.table(done, args, pinned=True)


@needs_peer
def test_load_says_how_many_more_calls_ours_held_than_the_peer_bounded_by_the_step_grid() -> None:
    import load

    def row(server: str, calls: int, broken: bool) -> dict[str, Any]:
        return {"server": server, "calls": calls, "broken": broken}

    rows = [row("ours", 100, False), row("peer", 100, False), row("ours", 120, False), row("peer", 120, True),
            row("ours", 300, False), row("ours", 400, False), row("ours", 500, True)]
    said = load.calls_held(rows)
    assert said is not None
    assert "ours 400, the peer 100, the peer broke at 120" in said
    assert "more than 3.33x the peer's calls (400 / 120" in said
    # the peer broke at its first step: it held none; ours is still compared with that step
    said = load.calls_held([row("ours", 50, False), row("peer", 50, True)])
    assert said is not None and "the peer none of its steps, the peer broke at 50" in said and "1.00x" in said
    # the peer never broke: no bound
    said = load.calls_held([row("ours", 50, False), row("peer", 50, False)])
    assert said is not None and "broke at no step" in said
    # no peer, or no clean step of ours: nothing to say
    assert load.calls_held([row("ours", 50, False)]) is None
    assert load.calls_held([row("ours", 50, True), row("peer", 50, True)]) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "2,2"], "--steps: each step once"),
        (["--steps", "4,2"], "--steps must increase (4,2): each server's ramp stops at its first step that is not ok"),
        (["--steps", "2", "--hold", "nan"], "--hold must be a finite number"),
        (["--steps", "2", "--grace", "-1"], "--grace and --drain-timeout must not be negative"),
        (["--steps", "2", "--repeats", "0"], "--repeats must be between 1 and 50"),
        (["--steps", "2", "--model-speed", "0.5"], "--model-speed must be between 1 (real time) and 100"),
        (["--steps", "2", "--model-speed", "nan"], "--model-speed must be between 1 (real time) and 100"),
        (["--steps", "2", "--plot", str(Path(tempfile.gettempdir()) / "load.txt")],
         "--plot: 'load.txt' is not an image file matplotlib writes: name it .png, .svg or .pdf"),
    ],
)
def test_load_bad_options_are_one_line_errors_before_anything_starts(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load.py"), *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_load_quick_shortens_only_what_was_not_given() -> None:
    import load

    quick = load.parse_args(["--quick", "--no-plot"])
    assert (quick.step_list, quick.hold, quick.repeats) == ([2, 4], 1.5, 1)
    assert (quick.settle, quick.grace, quick.reply_every, quick.reply_ms, quick.drain_timeout) == (0.5, 1.0, 0.6, 400, 10.0)
    given = load.parse_args(["--quick", "--no-plot", "--settle", "3", "--grace", "4", "--reply-every", "5",
                             "--reply-ms", "2000", "--drain-timeout", "30"])  # fmt: skip
    assert (given.settle, given.grace, given.reply_every, given.reply_ms, given.drain_timeout) == (3.0, 4.0, 5.0, 2000, 30.0)
    usual = load.parse_args(["--steps", "2", "--no-plot"])
    assert (usual.settle, usual.grace, usual.reply_every, usual.reply_ms, usual.drain_timeout) == (1.0, 2.0, 2.0, 1000, 60.0)


def test_a_server_that_exits_is_reported_with_its_status_and_its_log_s_last_line(tmp_path: Path) -> None:
    import load

    log_path = tmp_path / "server.log"
    server = load.Server("ours", [sys.executable, "-c", "raise SystemExit(2)"], "/twiml", log_path)
    server.proc = subprocess.Popen(server.argv)
    server.proc.wait()
    assert server.exited() == f"the ours server exited with status 2; see {log_path}"  # (no log: nothing to quote)
    log_path.write_text("INFO starting\n" + "x" * 5000 + "\nERROR [Errno 98] Address already in use\n\n")
    assert server.exited() == (
        f"the ours server exited with status 2 (its log ends: 'ERROR [Errno 98] Address already in use'); see {log_path}"
    )


def test_load_servers_get_no_proxy_for_the_loopback_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import load

    monkeypatch.setenv("https_proxy", "http://10.255.255.1:3128")
    monkeypatch.setenv("ALL_PROXY", "socks5://10.255.255.1:1080")
    captured: dict[str, Any] = {}

    class NoProcess:
        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            captured.update(kwargs["env"])
            self.pid = 0

        def terminate(self) -> None: ...

        def wait(self, timeout: float | None = None) -> int:
            return 0

    monkeypatch.setattr(load.subprocess, "Popen", NoProcess)
    server = load.make_servers(load.parse_args(["--steps", "2", "--no-peer", "--no-plot"]))[0]
    with load.server_process(server, 1, None):
        pass
    assert not {k for k in captured if k.lower().endswith("_proxy") and k.lower() != "no_proxy"}
    assert captured["NO_PROXY"] == captured["no_proxy"] == "127.0.0.1,localhost"
