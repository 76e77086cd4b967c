"""``GET /metrics``: the exposition text (read back with ``prometheus_client``'s own parser) and what it counts.

The unit tests render known totals; the app tests count a real call over
loopback sockets (the fake Twilio caller and the fake OpenAI server of
tests/test_app.py) and compare every counter with what the two ends saw.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import re
import time
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from mediaserver.bridge.stats import REPLY_EDGES_S, CallStats, LatencyHistogram, SecondsHistogram
from mediaserver.codec import JitterStats
from mediaserver.metrics import (
    CONNECT_EDGES_S,
    END_KINDS,
    LATENCY_EDGES_S,
    REFUSALS,
    CallTotals,
    Gauges,
    ProcessStats,
    RecordsStats,
    end_kind,
    process_stats,
    render,
)

from tests.fakes import (
    FakeTwilioCaller,
    answer_call,
    fail_after,
    http_request,
    open_ws_client,
    to_ulaw,
    tone,
    turn_script,
    twilio_signature,
)
from tests.test_app import (
    AUTH_TOKEN,
    CALL_A,
    base_settings,
    call_log,
    fake_openai,
    openai_settings,
    phone_call,
    point_at_a_closed_port,
    running,
)

GAUGES = Gauges(
    active_calls=0,
    pending_sessions=0,
    model_sessions=0,
    reactor={"sockets": 0, "wakeups": 0, "handler_calls": 0},
    provider="echo",
    instance=None,
)


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, keyed by name and sorted labels (the parser raises on bad syntax)."""
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"sample {key} twice"
            samples[key] = sample.value
    assert types["mediaserver_calls_ended"] == "counter"  # the parser strips _total from a counter's family name
    assert types["mediaserver_bridge_latency_seconds"] == "histogram"
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def one_call(frames_in: int, latencies: list[float]) -> tuple[CallStats, JitterStats]:
    stats = CallStats("CA1", "openai", 0.0, frames_in=frames_in, frames_to_model=frames_in - 1, frames_out=7)
    stats.barge_ins, stats.truncations = 2, 3
    for seconds in latencies:
        stats.uplink.add(seconds)
    stats.downlink.add(0.0004)
    stats.reply.add(0.6)
    return stats, JitterStats(frames_in, frames_in, 1, 2, 5, 0, 0, 0)


# ------------------------------------------------------------------ unit


def test_every_end_reason_of_the_bridge_and_the_manager_has_its_kind() -> None:
    reasons = {
        "twilio sent stop": "twilio_stop",
        "twilio hung up": "twilio_closed",
        "agent hung up: goodbye": "agent_hangup",
        "transferred to +15550001111": "transferred",
        "idle: nothing from Twilio for 30 s": "idle",
        "maximum call length 3600 s": "max_length",
        "model closed: openai connection closed: 1000 NORMAL_CLOSURE": "model_closed",
        "provider ended: openai closed the connection": "provider",
        "provider error: server_error": "provider",
        "protocol error: Twilio sent 'start' in state STREAMING": "protocol_error",
        "failed: RuntimeError('x')": "failed",
        "running": "cancelled",
        "cancelled: the server shut down before the call ended (MEDIASERVER_DRAIN_S)": "cancelled",
        "something new": "other",
    }
    assert {reason: end_kind(reason) for reason in reasons} == reasons
    assert set(reasons.values()) == set(END_KINDS)


def test_an_idle_server_renders_every_series_at_zero() -> None:
    samples = parse(render(CallTotals(), {}, GAUGES))
    assert value(samples, "mediaserver_info", version="0.1.0", provider="echo", instance_url="") == 1
    for kind in END_KINDS:
        assert value(samples, "mediaserver_calls_ended_total", end=kind) == 0
    for reason in REFUSALS:
        assert value(samples, "mediaserver_streams_refused_total", reason=reason) == 0
    for direction in ("up", "down"):
        assert value(samples, "mediaserver_bridge_latency_seconds_count", direction=direction) == 0
        assert value(samples, "mediaserver_bridge_latency_seconds_bucket", direction=direction, le="+Inf") == 0
    assert value(samples, "mediaserver_calls_active") == 0
    assert value(samples, "mediaserver_model_sessions_open") == 0


def test_call_records_render_up_or_down_with_their_writes() -> None:
    """Monitoring sees whether call records work: off (no database at start) and failing are both 0."""
    off = parse(render(CallTotals(), {}, GAUGES))
    assert value(off, "mediaserver_records_up") == 0
    assert value(off, "mediaserver_records_writes_total", result="written") == 0
    records = RecordsStats(healthy=True, written=7, failed=2, dropped=1, queued=3)
    on = parse(render(CallTotals(), {}, dataclasses.replace(GAUGES, records=records)))
    assert value(on, "mediaserver_records_up") == 1 and value(on, "mediaserver_records_queued") == 3
    for result, count in (("written", 7), ("failed", 2), ("dropped", 1)):
        assert value(on, "mediaserver_records_writes_total", result=result) == count
    failing = parse(render(CallTotals(), {}, dataclasses.replace(GAUGES, records=dataclasses.replace(records, healthy=False))))
    assert value(failing, "mediaserver_records_up") == 0


def test_totals_render_as_counted() -> None:
    totals = CallTotals()
    stats, jitter = one_call(100, [0.00005, 0.0003, 0.0009, 0.015, 0.5])
    totals.add_call(stats, jitter, 12.5)
    totals.end("twilio sent stop")
    totals.add_call(stats, jitter, 2.0)
    totals.end("provider ended: gone")
    gauges = Gauges(3, 1, 4, {"sockets": 6, "wakeups": 10, "handler_calls": 25}, "openai", 'https://x/"n1"')
    samples = parse(render(totals, {"no_token": 2}, gauges))

    assert value(samples, "mediaserver_info", version="0.1.0", provider="openai", instance_url='https://x/"n1"') == 1
    assert value(samples, "mediaserver_calls_ended_total", end="twilio_stop") == 1
    assert value(samples, "mediaserver_calls_ended_total", end="provider") == 1
    assert value(samples, "mediaserver_calls_ended_total", end="idle") == 0
    assert value(samples, "mediaserver_streams_refused_total", reason="no_token") == 2
    assert value(samples, "mediaserver_call_seconds_total") == 14.5
    assert value(samples, "mediaserver_frames_received_total") == 200
    assert value(samples, "mediaserver_frames_to_model_total") == 198
    assert value(samples, "mediaserver_chunks_sent_total") == 14
    assert value(samples, "mediaserver_gaps_filled_total") == 10
    assert value(samples, "mediaserver_late_frames_total") == 6  # late 2 + duplicates 1, twice
    assert value(samples, "mediaserver_barge_ins_total") == 4
    assert value(samples, "mediaserver_truncations_total") == 6
    assert (value(samples, "mediaserver_calls_active"), value(samples, "mediaserver_sessions_pending")) == (3, 1)
    assert value(samples, "mediaserver_model_sessions_open") == 4
    assert value(samples, "mediaserver_reactor_sockets") == 6
    assert value(samples, "mediaserver_reactor_handler_calls_total") == 25
    # The uplink histogram: each call's 5 samples, twice, cumulative at each bound.
    up = {edge: value(samples, "mediaserver_bridge_latency_seconds_bucket", direction="up", le=repr(edge)) for edge in LATENCY_EDGES_S}
    assert up == {0.0001: 2, 0.00025: 2, 0.0005: 4, 0.001: 6, 0.002: 6, 0.005: 6, 0.01: 6, 0.02: 8}
    assert value(samples, "mediaserver_bridge_latency_seconds_bucket", direction="up", le="+Inf") == 10
    assert value(samples, "mediaserver_bridge_latency_seconds_count", direction="up") == 10
    assert value(samples, "mediaserver_bridge_latency_seconds_sum", direction="up") == pytest.approx(2 * 0.51625)
    assert value(samples, "mediaserver_bridge_latency_seconds_count", direction="down") == 2
    assert value(samples, "mediaserver_reply_latency_seconds_bucket", le="0.5") == 0
    assert value(samples, "mediaserver_reply_latency_seconds_bucket", le="0.75") == 2
    assert value(samples, "mediaserver_reply_latency_seconds_count") == 2
    assert value(samples, "mediaserver_reply_latency_seconds_sum") == pytest.approx(1.2)


def test_the_process_renders_under_prometheus_client_s_names() -> None:
    process = ProcessStats(
        cpu_seconds=12.5, start_time_seconds=1.7e9, resident_bytes=50_000_000, open_fds=40, max_fds=20000,
        gc=((100, 5000, 0), (9, 300, 0), (1, 20, 2)),
    )
    samples = parse(render(CallTotals(), {}, dataclasses.replace(GAUGES, process=process)))
    assert value(samples, "process_cpu_seconds_total") == 12.5
    assert value(samples, "process_start_time_seconds") == 1.7e9
    assert value(samples, "process_resident_memory_bytes") == 50_000_000
    assert (value(samples, "process_open_fds"), value(samples, "process_max_fds")) == (40, 20000)
    assert [value(samples, "python_gc_collections_total", generation=str(g)) for g in range(3)] == [100, 9, 1]
    assert value(samples, "python_gc_objects_collected_total", generation="1") == 300
    assert value(samples, "python_gc_objects_uncollectable_total", generation="2") == 2
    # What the OS does not say is left out, not made up; no process section without process stats.
    unknown = parse(render(CallTotals(), {}, dataclasses.replace(GAUGES, process=ProcessStats(1.0, 2.0))))
    assert ("process_resident_memory_bytes", ()) not in unknown and ("process_open_fds", ()) not in unknown
    assert ("process_cpu_seconds_total", ()) in unknown
    assert not any(name.startswith("process_") for name, _ in parse(render(CallTotals(), {}, GAUGES)))


def test_process_stats_read_this_process() -> None:
    before = time.time()
    stats = process_stats(fallback_start_s=before)
    assert stats.cpu_seconds > 0
    assert len(stats.gc) == len(gc.get_stats()) == 3
    assert all(collections <= now["collections"] for (collections, _, _), now in zip(stats.gc, gc.get_stats()))
    if Path("/proc/self/stat").exists():  # Linux: from /proc
        assert before - 7 * 86400 < stats.start_time_seconds <= before  # (this test process started before now)
        assert stats.resident_bytes is not None and stats.resident_bytes > 10_000_000
        assert stats.open_fds is not None and stats.open_fds >= 3
    else:
        assert stats.start_time_seconds == before


def test_model_connect_times_are_a_histogram_at_or_below_each_bound() -> None:
    connect = SecondsHistogram(CONNECT_EDGES_S)
    for seconds in (0.01, 0.05, 0.051, 0.3, 2.5, 30.0, -1.0):
        connect.add(seconds)
    assert connect.cumulative() == [3, 4, 4, 5, 5, 6, 6, 6]  # 0.05 counts at le=0.05 (-1 counts as 0); 30 s above all
    assert (connect.count, connect.total_s) == (7, pytest.approx(0.01 + 0.05 + 0.051 + 0.3 + 2.5 + 30.0))
    samples = parse(render(CallTotals(), {}, dataclasses.replace(GAUGES, model_connect=connect, model_connect_failures=4)))
    assert value(samples, "mediaserver_model_connect_seconds_bucket", le="0.05") == 3
    assert value(samples, "mediaserver_model_connect_seconds_bucket", le="10.0") == 6
    assert value(samples, "mediaserver_model_connect_seconds_bucket", le="+Inf") == 7
    assert value(samples, "mediaserver_model_connect_seconds_count") == 7
    assert value(samples, "mediaserver_model_connect_failures_total") == 4
    with pytest.raises(ValueError, match="ascending"):
        SecondsHistogram((1.0, 0.5))
    other = SecondsHistogram(CONNECT_EDGES_S)
    other.add(0.07)
    connect.merge(other)
    assert connect.cumulative()[:2] == [3, 5] and connect.count == 8
    with pytest.raises(ValueError, match="same edges"):
        connect.merge(SecondsHistogram(REPLY_EDGES_S))


def test_a_copy_of_the_totals_is_its_own() -> None:
    totals = CallTotals()
    stats, jitter = one_call(10, [0.001])
    totals.add_call(stats, jitter, 1.0)
    totals.end("twilio sent stop")
    twin = totals.copy()
    twin.add_call(stats, jitter, 1.0)
    twin.end("twilio sent stop")
    assert (totals.frames_in, totals.uplink.count, totals.reply.count, totals.ended) == (10, 1, 1, {"twilio_stop": 1})
    assert (twin.frames_in, twin.uplink.count, twin.reply.count, twin.ended) == (20, 2, 2, {"twilio_stop": 2})


def test_latency_merge_and_counts_below_match_the_samples() -> None:
    values = [0.0, 0.000099, 0.0001, 0.000105, 0.00025, 0.0019, 0.019999, 0.02, 3.0, math.nan]
    a, b, both = LatencyHistogram(), LatencyHistogram(), LatencyHistogram()
    for i, seconds in enumerate(values):
        (a if i % 2 else b).add(seconds)
        both.add(seconds)
    a.merge(b)
    assert (a.count, a.max_s, a.quantile(0.5), a.quantile(0.99)) == (both.count, both.max_s, both.quantile(0.5), both.quantile(0.99))
    assert a.total_s == pytest.approx(both.total_s)
    # A sample counts below an edge when its whole 10 µs bucket does (100 µs itself is in [100, 110) µs).
    assert a.counts_below(LATENCY_EDGES_S) == [3, 5, 6, 6, 7, 7, 7, 8]  # 20 ms and 3 s: above every edge
    assert a.counts_below([]) == []
    with pytest.raises(ValueError, match="ascending"):
        a.counts_below([0.001, 0.0005])
    with pytest.raises(ValueError, match="non-negative"):
        a.counts_below([-0.001])


# ------------------------------------------------------------------ app


async def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = await http_request(url + "/metrics")
    assert response.status == 200
    assert response.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(response.text)


@fail_after(20)
async def test_app_metrics_count_a_call_while_it_runs_and_after_it_ends() -> None:
    reply = to_ulaw(tone(440, 600, amplitude=0.3))
    script = turn_script(reply, after_appends=10, chunk_bytes=1600)
    async with fake_openai(script) as model, running(openai_settings(model)) as url:
        async with phone_call(url) as caller:
            await caller.send_audio(to_ulaw(tone(300, 300, amplitude=0.2)))
            await caller.wait_for_audio(len(reply))
            live = await scrape(url)
            await caller.send_silence(100)
            await caller.wait_quiet(0.2)
            await caller.stop()
            await caller.closed.wait()
        session = await model.session(0)
        await session.closed.wait()
        with trio.fail_after(5):  # the call's end is counted when its handler returns
            while value(after := await scrape(url), "mediaserver_calls_active"):
                await trio.sleep(0.02)

    assert caller.errors == []
    # While the call ran: one call, one model session, its frames so far.
    assert value(live, "mediaserver_calls_active") == 1
    assert value(live, "mediaserver_model_sessions_open") == 1
    assert value(live, "mediaserver_calls_ended_total", end="twilio_stop") == 0
    assert 15 <= value(live, "mediaserver_frames_received_total") <= len(caller.sent_frames)
    assert value(live, "mediaserver_chunks_sent_total") >= len(reply) // 320
    # After: every counter exactly what the two ends saw, none lower than during the call.
    sent, received = len(caller.sent_frames), len(caller.received)
    assert value(after, "mediaserver_calls_active") == 0
    assert value(after, "mediaserver_model_sessions_open") == 0
    assert value(after, "mediaserver_sessions_pending") == 0
    assert value(after, "mediaserver_calls_ended_total", end="twilio_stop") == 1
    assert sum(value(after, "mediaserver_calls_ended_total", end=kind) for kind in END_KINDS) == 1
    assert value(after, "mediaserver_frames_received_total") == sent
    assert value(after, "mediaserver_frames_to_model_total") == len(session.appends) == sent
    assert value(after, "mediaserver_chunks_sent_total") == received == len(reply) // 320
    assert value(after, "mediaserver_gaps_filled_total") == 0
    assert value(after, "mediaserver_barge_ins_total") == 0
    assert value(after, "mediaserver_bridge_latency_seconds_count", direction="up") == sent
    assert value(after, "mediaserver_bridge_latency_seconds_count", direction="down") == received
    assert 0.4 < value(after, "mediaserver_call_seconds_total") < 15
    assert value(after, "mediaserver_reactor_handler_calls_total") > 0
    assert value(after, "process_cpu_seconds_total") > value(live, "process_cpu_seconds_total") > 0
    assert value(after, "mediaserver_model_connect_seconds_count") == 1  # the session opened at the webhook
    assert 0 < value(after, "mediaserver_model_connect_seconds_sum") < 5
    assert value(after, "mediaserver_model_connect_failures_total") == 0
    # the reply, timed on the reactor's path (the model over ws://): from speech_stopped to its first chunk
    assert value(after, "mediaserver_reply_latency_seconds_count") == 1
    assert 0 <= value(after, "mediaserver_reply_latency_seconds_sum") < 1
    assert value(after, "python_gc_collections_total", generation="0") > 0
    for key, number in live.items():
        if key[0].endswith(("_total", "_count", "_bucket", "_sum")):
            assert after[key] >= number, key


@fail_after(20)
async def test_app_metrics_count_refused_streams_and_the_sessions_they_leave_open() -> None:
    async with fake_openai() as model, running(openai_settings(model, twilio_auth_token=AUTH_TOKEN)) as url:
        twiml = await answer_call(url, CALL_A, auth_token=AUTH_TOKEN)
        session = await model.session(0)
        await session.ready.wait()
        pending = await scrape(url)
        signature = [("X-Twilio-Signature", twilio_signature(AUTH_TOKEN, twiml.stream_url))]
        caller = FakeTwilioCaller(call_sid=CALL_A, custom_parameters={"CallSid": CALL_A, "token": "forged"})
        async with open_ws_client(twiml.stream_url, signature) as ws:
            async with caller.attached(ws):
                await caller.closed.wait()
        refused = await scrape(url)
        # A stream that closes before its start event.
        async with open_ws_client(twiml.stream_url, signature):
            pass
        with trio.fail_after(5):
            while value(no_start := await scrape(url), "mediaserver_streams_refused_total", reason="no_start") < 1:
                await trio.sleep(0.02)
        # The real stream then claims the pre-opened session.
        real = FakeTwilioCaller(call_sid=CALL_A, custom_parameters=twiml.parameters)
        async with open_ws_client(twiml.stream_url, signature) as ws:
            async with real.attached(ws):
                await real.send_silence(100)
                await session.wait_appends(3)
                bridged = await scrape(url)
                await real.stop()
                await real.closed.wait()
        await session.closed.wait()
        with trio.fail_after(5):  # counted until the model connection's close has returned
            while value(after := await scrape(url), "mediaserver_model_sessions_open"):
                await trio.sleep(0.02)

    assert value(pending, "mediaserver_sessions_pending") == 1
    assert value(pending, "mediaserver_model_sessions_open") == 1
    assert value(pending, "mediaserver_calls_active") == 0
    assert value(refused, "mediaserver_streams_refused_total", reason="no_token") == 1
    assert sum(value(refused, "mediaserver_streams_refused_total", reason=r) for r in REFUSALS) == 1
    assert value(refused, "mediaserver_model_sessions_open") == 1  # still waiting for its real stream
    assert (value(bridged, "mediaserver_calls_active"), value(bridged, "mediaserver_sessions_pending")) == (1, 0)
    assert value(bridged, "mediaserver_model_sessions_open") == 1
    assert value(no_start, "mediaserver_streams_refused_total", reason="no_token") == 1
    assert sum(value(after, "mediaserver_streams_refused_total", reason=r) for r in REFUSALS) == 2
    assert value(after, "mediaserver_calls_ended_total", end="twilio_stop") == 1
    assert value(after, "mediaserver_calls_active") == value(after, "mediaserver_sessions_pending") == 0


@fail_after(20)
async def test_app_metrics_count_a_model_session_that_could_not_be_opened() -> None:
    async with fake_openai() as model:
        await point_at_a_closed_port(model)
        async with running(openai_settings(model)) as url:
            async with phone_call(url) as caller:
                await caller.send_silence(100)
                await caller.closed.wait()
            samples = await scrape(url)
    assert value(samples, "mediaserver_model_connect_failures_total") == 1
    assert value(samples, "mediaserver_model_connect_seconds_count") == 0
    assert value(samples, "mediaserver_streams_refused_total", reason="no_model_session") == 1
    assert value(samples, "mediaserver_model_sessions_open") == value(samples, "mediaserver_calls_active") == 0


@fail_after(20)
async def test_app_metrics_time_the_echo_agent_s_reply(caplog: pytest.LogCaptureFixture) -> None:
    """The echo agent says when the caller stopped (SpeechStopped) and then plays the utterance back: one reply."""
    caplog.set_level(logging.INFO, logger="mediaserver")
    burst = to_ulaw(tone(1000, 400, amplitude=0.5))
    async with running(base_settings()) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(300)
            await caller.say_and_hear_the_echo(burst)
            await caller.stop()
            await caller.closed.wait()
        with trio.fail_after(5):
            while value(samples := await scrape(url), "mediaserver_calls_active"):
                await trio.sleep(0.02)
    assert value(samples, "mediaserver_reply_latency_seconds_count") == 1
    # the echo agent replies as soon as it hears the end of speech: well under the first bound
    assert 0 <= value(samples, "mediaserver_reply_latency_seconds_sum") < 0.25
    assert value(samples, "mediaserver_reply_latency_seconds_bucket", le="0.25") == 1
    # and the call's end line says the same
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert re.search(r"; replies 1, waited mean \d+ ms, max \d+ ms$", ended), ended
