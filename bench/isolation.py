"""Isolation bench: how much one misbehaving peer (a bad model, or a bad Twilio caller) hurts the other calls.

Run ``.venv/bin/python bench/isolation.py``.  For every scenario it starts a
fresh ``python -m mediaserver serve --provider openai`` (development mode, a
temporary ``MEDIASERVER_DATA_DIR``; with two or more CPUs pinned to the first,
this process on the others: ``bench/load.py``'s helpers), pointed at a fake
OpenAI Realtime model in this process, and runs ``--calls`` well-behaved
calls plus one bad call through it (``bench/_isolation_peers.py``: each call
is the voice webhook, the Media Stream with 20 ms frames in real time and
mark echoes, and a model session that answers in 3 s real-time replies, each
cut by a barge-in).  From 8 s on, the bad call's model or caller misbehaves
as the scenario says; the calls send ``stop`` 7 s after the 10 s "during"
window (longer where the server's own timeouts need it: m_frozen, c_noread,
c_vanish).  The baseline, ``none``, is the same run with no misbehaviour;
it always runs first, and every p99 is also shown as a ratio to it.

Measured, for the good calls inside the bad window (by send time):

* uplink latency: a caller's frame handed to its socket until the fake
  model read it; downlink: a model delta handed to its socket until the
  caller read it (both ends share this process's Trio clock, so this
  includes this process's own scheduling: see harness lag);
* barge-in: the model's ``speech_started`` sent until the caller read the
  server's ``clear`` (the max over the window);
* lost frames over the whole call (caller frames the model never got,
  model deltas the caller never got; the end of a reply that the server
  still held when the caller interrupted it is cut on purpose, and counted
  apart, as "cut"), audio of one call that reached another, and good calls
  the server ended;
* how and when the bad call ended: the reason in the server's log (or the
  close the caller saw), seconds after its misbehaviour began, or
  "stayed" (it lived to its ``stop``); and whether that is what the server
  should do (each scenario says);
* the server's RSS (max over the run) and CPU in the window (psutil), the
  model sessions still open at the end (at the fake model: TCP connections
  the server has not closed; and the server's own gauge from ``/metrics``):
  must be 0;
* harness lag: how late this process's 10 ms ticker woke (p99, max) in the
  window: latencies near it measured this process, not the server; and
  steal: the share of both CPUs' time the hypervisor gave to other guests
  in the window (``/proc/stat``; on a virtual machine it shows as lag and
  latency in no process's CPU time). A scenario whose window had 10% steal
  or more gets a ``caveat:`` line after the findings (not a finding: the
  exit status does not change): its figures may be the host's.

Scenarios (``--scenarios a,b,...``; the default set is the first nine):

* ``none`` -- baseline: every call behaves;
* ``m_fast`` -- the model sends audio as fast as the socket takes it (0.5 s
  deltas, for 5 s), then barges in over the queue that built up;
* ``m_fragment`` -- the model sends 320-byte deltas in 1-byte WebSocket
  fragments, continuously, for 5 s;
* ``m_ping`` -- the model floods WebSocket pings for 5 s and goes on talking;
* ``c_ping`` -- the caller floods WebSocket pings for 5 s, its frames go on;
* ``m_tiny`` -- the model floods ``{"type":"x.y"}`` (an unknown type) for 5 s;
* ``m_large`` -- the model sends a delta of ~8 MiB (just under the server's
  limit: ~13 min of audio) every second for 5 s;
* ``m_frozen`` -- the model stops reading and talking, its socket open: the
  server's ``MEDIASERVER_MODEL_PING_S`` check (a ping after 10 s of
  silence, the cut 10 s later; it looks every quarter period, so 20-22.5 s
  after the model's last message) should end the call; a 35 s window;
* ``c_noread`` -- the caller sends on but reads nothing: it lives on, a
  known limit.  ``MEDIASERVER_IDLE_TIMEOUT_S`` (30 s) ends a call whose
  writes to Twilio stick, but a write sticks only once the kernel's buffers
  are full: on Linux up to 4 MiB, minutes of a talking model's audio
  (``--window S`` waits longer); a 40 s window;
* ``m_tinyaudio`` -- the model floods one-byte audio deltas for 5 s;
* ``m_oversize`` -- the model sends one delta over the 8 MiB limit (ends);
* ``m_close`` -- the model closes its WebSocket (1000) mid-reply (ends);
* ``m_rst`` -- the model resets its TCP connection mid-reply (ends);
* ``m_badjson`` -- the model sends a message that is not JSON (ends);
* ``m_binary`` -- the model sends a binary frame (ends);
* ``m_hang`` -- the model stops talking but reads on (stays);
* ``m_noread`` -- the model stops reading but talks on (stays: its socket
  buffers take minutes to fill before the idle check can see it);
* ``c_vanish`` -- the caller stops sending and reading for 35 s, then drops
  the connection without ``stop``: the idle check should end it at 30 s;
* ``c_silent`` -- the caller sends nothing for 5 s, reading on (stays);
* ``c_burst`` -- the caller holds its frames back 3 s and sends them at
  once, three times;
* ``c_flood`` -- the caller sends frames as fast as it can for 5 s;
* ``c_bigframe`` -- the caller sends 47 KB media frames (6 s of audio each),
  50 a second, for 5 s;
* ``c_seqjump`` -- ``media.chunk`` leaps far ahead (up to 10**15) with random
  timestamps, every frame of the window;
* ``c_seqjump63`` -- ``media.chunk`` leaps 63 ahead on every frame (62
  frames of concealment each);
* ``c_seqback`` -- ``media.chunk`` goes back to 1 (ends: protocol error);
* ``c_seqnum`` -- a ``sequenceNumber`` repeats (ends: protocol error);
* ``c_markbogus`` -- the caller echoes a mark never sent (ends);
* ``c_marktwice`` -- the caller echoes every mark twice (ends);
* ``c_noecho`` -- the caller never echoes a mark (stays).

Options: ``--calls N`` (good calls, default 10; the bad one is extra),
``--repeats N`` (runs of every scenario, round-robin; the table shows
medians, lost frames and open sessions are summed, ratios are of the
medians), ``--quick`` (2 good calls, the bad window at 2.5 s for 2.5 s,
scenarios none, m_badjson, m_ping unless named; the server's timeouts still
take as long as they take), ``--json PATH`` (every run's figures, windows
before/during/after, the bad call's own figures and notes),
``--window S`` (the bad window's length; a scenario that needs more gets
its minimum), ``--port P`` (the server on P, the fake model on P+1; default: free
ports), ``--no-pin``.  Progress goes to stderr, each server's log to
``bench/out/isolation-SCENARIO.log``.  It exits 1 when a finding is
printed: a model session left open, a good call that lost a frame, got
another call's audio or was ended, a bad call that did not end as the
scenario expects, or a server that died.  Nothing beyond loopback is
touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, when imported from elsewhere
# This checkout's mediaserver, not whichever one is installed (the venv's may be another checkout's, editable)
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # type: ignore[import-untyped]  # noqa: E402
import trio  # noqa: E402

import load  # noqa: E402
from _isolation_peers import HOST, QUICK, SCENARIOS, Caller, CallLog, FakeModel, Recorder, Scenario, Timeline  # noqa: E402
from _measure import (  # noqa: E402
    Column,
    check_log_folder,
    check_output_path,
    cpu_model,
    interrupt_on_sigterm,
    print_header,
    render_table,
    utc_now,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SCENARIOS = ("none", "m_fast", "m_fragment", "m_ping", "c_ping", "m_tiny", "m_large", "m_frozen", "c_noread")
QUICK_SCENARIOS = ("none", "m_badjson", "m_ping")
BASELINE = "none"
CALL_SPACING_S = 0.1  # between call starts
SAMPLE_S = 0.25  # server RSS/CPU sampling period
TICK_S = 0.01  # the harness-lag ticker
RUN_MARGIN_S = 90.0  # a scenario run taking this much longer than planned is abandoned


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- one run ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    """The server process at one moment of the run."""

    t_s: float
    rss_mib: float
    cpu_s: float
    steal_s: float  # every CPU's time the hypervisor gave to other guests so far (load.steal_split)
    all_s: float  # every CPU's time so far


async def sample_server(process: psutil.Process, recorder: Recorder, samples: list[Sample]) -> None:
    """The server's RSS and CPU time, and the machine's steal, every SAMPLE_S until cancelled (or the server is gone)."""
    cpus = range(psutil.cpu_count() or 1)
    while True:
        try:
            times = process.cpu_times()
            rss_mib = process.memory_info().rss / 2**20
        except psutil.Error:
            return
        samples.append(Sample(recorder.now(), rss_mib, times.user + times.system, *load.steal_split(cpus)))
        await trio.sleep(SAMPLE_S)


async def monitor_lag(recorder: Recorder) -> None:
    """How late this process wakes for a 10 ms tick (its own scheduling noise), until cancelled."""
    due = trio.current_time()
    while True:
        due += TICK_S
        await trio.sleep_until(due)
        recorder.lag_s.append((recorder.now(), trio.current_time() - due))


async def metric(port: int, name: str) -> int | None:
    """A count from the server's /metrics (None if it is not there)."""
    status, text = await load.http_get(port, "/metrics")
    if status != 200:
        return None
    return next((int(float(line.split()[-1])) for line in text.splitlines() if line.startswith(f"{name} ")), None)


def server_argv(port: int) -> list[str]:
    return [sys.executable, "-m", "mediaserver", "serve", "--host", HOST, "--port", str(port), "--provider", "openai",
            "--env-file", os.devnull]


async def run_scenario(scenario: Scenario, timeline: Timeline, args: argparse.Namespace,
                       server_cpus: set[int] | None) -> dict[str, Any]:
    """A fresh server, the calls, the figures of this run."""
    recorder = Recorder(args.calls + 1)
    model = FakeModel(recorder, scenario, timeline)
    port = args.port or load.free_port()
    server = load.Server("ours", server_argv(port), "/twiml", ROOT / "bench" / "out" / f"isolation-{scenario.name}.log", port)
    samples: list[Sample] = []
    end: dict[str, Any] = {}
    with trio.fail_after(timeline.end_s + RUN_MARGIN_S):
        async with trio.open_nursery() as nursery:
            model_port = await nursery.start(model.serve, args.port + 1 if args.port else 0)
            with load.server_process(server, model_port, server_cpus):
                await load.wait_healthy(server)
                recorder.start()
                nursery.start_soon(sample_server, server.ps, recorder, samples)
                nursery.start_soon(monitor_lag, recorder)
                async with trio.open_nursery() as calls:
                    for call in recorder.calls:
                        calls.start_soon(Caller(recorder, call, port, scenario, timeline).run)
                        await trio.sleep(CALL_SPACING_S)
                recorder.note("every call has ended")
                await trio.sleep(timeline.tail_s)
                end = await end_state(server, model)
                nursery.cancel_scope.cancel()
    end["server_log"] = server.log_path.read_text(errors="replace")
    return summarize(scenario, timeline, recorder, samples, end)


async def end_state(server: load.Server, model: FakeModel) -> dict[str, Any]:
    """What is still open once every call has ended, and whether the server is alive."""
    assert server.proc is not None
    state: dict[str, Any] = {"model_sessions": len(model.sessions), "open_model": model.open_sessions(),
                             "server_exit": server.proc.poll()}
    if state["server_exit"] is None:
        state["open_server"] = await metric(server.port, "mediaserver_model_sessions_open")
        state["calls_server"] = await metric(server.port, "mediaserver_calls_active")
    return state


# --- figures ------------------------------------------------------------------------------


def pct_ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else math.nan


def in_window(t: float, window: tuple[float, float]) -> bool:
    return window[0] <= t < window[1]


def latencies(calls: Sequence[CallLog], window: tuple[float, float]) -> dict[str, list[float]]:
    """Uplink, downlink and clear latencies (s) of ``calls`` for what was sent in ``window``."""
    up = [c.up_arrived_s[k] - c.up_sent_s[k] for c in calls for k in c.up_arrived_s if in_window(c.up_sent_s[k], window)]
    down = [c.down_arrived_s[k] - c.down_sent_s[k] for c in calls for k in c.down_arrived_s
            if in_window(c.down_sent_s[k], window)]
    clear = [latency for c in calls for barge, latency in c.clears if in_window(barge, window)]
    return {"up": up, "down": down, "clear": clear}


def growth_pct(samples: Sequence[Sample], part: str, whole: str) -> float:
    """100 x how much ``part`` grew over how much ``whole`` did, first sample to last (NaN: too few samples)."""
    if len(samples) < 2:
        return math.nan
    first, last = samples[0], samples[-1]
    grew = getattr(last, whole) - getattr(first, whole)
    return 100 * (getattr(last, part) - getattr(first, part)) / grew if grew > 0 else math.nan


def window_figures(calls: Sequence[CallLog], window: tuple[float, float], recorder: Recorder,
                   samples: Sequence[Sample]) -> dict[str, Any]:
    lat = latencies(calls, window)
    lag = [late for t, late in recorder.lag_s if in_window(t, window)]
    inside = [s for s in samples if in_window(s.t_s, window)]
    return {
        "range_s": list(window),
        "up_p50_ms": pct_ms(lat["up"], 50), "up_p99_ms": pct_ms(lat["up"], 99), "up_max_ms": pct_ms(lat["up"], 100),
        "down_p50_ms": pct_ms(lat["down"], 50), "down_p99_ms": pct_ms(lat["down"], 99),
        "down_max_ms": pct_ms(lat["down"], 100),
        "clear_max_ms": pct_ms(lat["clear"], 100), "clears": len(lat["clear"]),
        "up_samples": len(lat["up"]), "down_samples": len(lat["down"]),
        "lag_p99_ms": pct_ms(lag, 99), "lag_max_ms": pct_ms(lag, 100),
        "server_cpu_pct": growth_pct(inside, "cpu_s", "t_s"),
        "steal_pct": growth_pct(inside, "steal_s", "all_s"),
    }


def losses(call: CallLog, until_s: float) -> dict[str, int]:
    """Frames sent before ``until_s`` that never arrived.

    A barge-in cuts what of its reply the server still held (queued behind
    a burst, or arriving with the barge-in), by design: the deltas that
    never arrived *after the last one of their reply that did*, in a reply
    that was interrupted, are "cut", not lost.  A gap before a delta that
    did arrive is lost whatever followed.
    """
    up = sum(1 for k, t in enumerate(call.up_sent_s) if t < until_s and k not in call.up_arrived_s)
    replies: dict[int, list[int]] = {}
    for k, (t, reply) in enumerate(zip(call.down_sent_s, call.down_reply, strict=True)):
        if t < until_s:
            replies.setdefault(reply, []).append(k)
    down = cut = 0
    for reply, deltas in replies.items():
        last = max((k for k in deltas if k in call.down_arrived_s), default=-1)
        missing = [k for k in deltas if k not in call.down_arrived_s]
        tail = sum(1 for k in missing if k > last) if reply in call.barged else 0
        cut += tail
        down += len(missing) - tail
    return {"up": up, "down": down, "cut": cut}


def server_end_reason(server_log: str, call_sid: str) -> str | None:
    """The reason the server logged for ending ``call_sid`` (failures are logged at WARNING, the bench's level)."""
    match = re.search(rf"call {re.escape(call_sid)}: ended \((.*)\) after [\d.]+ s; frames in", server_log)
    return match.group(1) if match else None


def bad_call_end(bad: CallLog, timeline: Timeline, server_log: str) -> tuple[str | None, float | None]:
    """(how, seconds after the misbehaviour began) the server ended the bad call; (None, None): it lived to its stop."""
    stop = bad.stop_s if bad.stop_s is not None else math.inf
    ends = ((bad.closed_s, f"stream: {bad.close}"), (bad.model_closed_s, f"model session: {bad.model_close}"))
    seen = [(t, how) for t, how in ends if t is not None and t < stop]
    if bad.failed is not None:
        return f"did not start: {bad.failed}", None
    if not seen:
        return None, None
    at, how = min(seen)
    began = bad.misbehaved_s if bad.misbehaved_s is not None else timeline.bad_at_s
    return server_end_reason(server_log, bad.call_sid) or how, at - began


def ended_early(call: CallLog) -> bool:
    """The server ended the call before its stop (or it never started)."""
    if call.failed is not None or call.stop_s is None:
        return True
    return any(t is not None and t < call.stop_s for t in (call.closed_s, call.model_closed_s))


def summarize(scenario: Scenario, timeline: Timeline, recorder: Recorder, samples: Sequence[Sample],
              end: dict[str, Any]) -> dict[str, Any]:
    good = [c for c in recorder.calls if not c.bad]
    bad = recorder.bad
    until_s = timeline.end_s - 0.5
    lost = [losses(c, until_s) for c in good]
    windows = {name: window_figures(good, w, recorder, samples) for name, w in timeline.windows().items()}
    during = windows["during"]
    how, after_s = bad_call_end(bad, timeline, end["server_log"])
    bad_lat = latencies([bad], (0.0, until_s))
    return {
        "scenario": scenario.name,
        "side": scenario.side,
        "expected": "ends" if scenario.ends else "stays",
        "bad_end": how or "stayed",
        "bad_end_after_s": after_s,
        "as_expected": (how is not None) == scenario.ends,
        "up_p99_ms": during["up_p99_ms"],
        "down_p99_ms": during["down_p99_ms"],
        "clear_max_ms": during["clear_max_ms"],
        "lag_p99_ms": during["lag_p99_ms"],
        "lag_max_ms": during["lag_max_ms"],
        "server_cpu_pct": during["server_cpu_pct"],
        "steal_pct": during["steal_pct"],
        "up_lost": sum(x["up"] for x in lost),
        "down_lost": sum(x["down"] for x in lost),
        "down_cut": sum(x["cut"] for x in lost),
        "up_sent": sum(len(c.up_sent_s) for c in good),
        "down_sent": sum(len(c.down_sent_s) for c in good),
        "misrouted": sum(c.misrouted for c in recorder.calls),
        "up_made_up": sum(c.up_made_up for c in good),
        "good_ended": sum(1 for c in good if ended_early(c)),
        "rss_max_mib": max((s.rss_mib for s in samples), default=math.nan),
        "open_model": end.get("open_model"),
        "open_server": end.get("open_server"),
        "calls_server": end.get("calls_server"),
        "model_sessions": end.get("model_sessions"),
        "server_exit": end.get("server_exit"),
        "timeline": dataclasses.asdict(timeline) | {"end_s": timeline.end_s},
        "windows": windows,
        "bad_call": {
            "up_p99_ms": pct_ms(bad_lat["up"], 99), "down_p99_ms": pct_ms(bad_lat["down"], 99),
            "clears": len(bad.clears), "barge_ins": len(bad.barge_s), "clear_max_ms": pct_ms(bad_lat["clear"], 100),
            "closed_s": bad.closed_s, "close": bad.close, "model_closed_s": bad.model_closed_s,
            "model_close": bad.model_close, "stop_s": bad.stop_s,
        },
        "notes": recorder.notes,
    }


_MEDIANS = ("up_p99_ms", "down_p99_ms", "clear_max_ms", "lag_p99_ms", "lag_max_ms", "server_cpu_pct", "steal_pct",
            "rss_max_mib")
_SUMS = ("up_lost", "down_lost", "down_cut", "misrouted", "good_ended", "up_sent", "down_sent")


def combine(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One scenario's repeats as one row: medians of the figures, sums of what went wrong, the worst end state."""
    first = runs[0]
    row: dict[str, Any] = {k: first[k] for k in ("scenario", "side", "expected")}
    row.update({k: statistics.median(r[k] for r in runs) for k in _MEDIANS})
    row.update({k: sum(r[k] for r in runs) for k in _SUMS})
    for key in ("open_model", "open_server"):
        values = [r[key] for r in runs]
        row[key] = None if any(v is None for v in values) else max(values)
    row["server_exit"] = next((r["server_exit"] for r in runs if r["server_exit"] is not None), None)
    row["as_expected"] = all(r["as_expected"] for r in runs)
    ends = {r["bad_end"] == "stayed" for r in runs}
    after = [r["bad_end_after_s"] for r in runs if r["bad_end_after_s"] is not None]
    row["bad_end"] = first["bad_end"] if len(ends) == 1 else "mixed: " + ", ".join(r["bad_end"] for r in runs)
    row["bad_end_after_s"] = statistics.median(after) if after else None
    row["repeats"] = len(runs)
    return row


def add_ratios(rows: Sequence[dict[str, Any]]) -> None:
    """Each row's p99s over the baseline's (both measured in this run)."""
    base = next((r for r in rows if r["scenario"] == BASELINE), None)
    for row in rows:
        for key in ("up_p99_ms", "down_p99_ms"):
            ref = base[key] if base is not None else math.nan
            row[key.replace("_ms", "_x")] = row[key] / ref if math.isfinite(ref) and ref > 0 else math.nan


def findings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What a reader must not miss: each one is something the server should not do."""
    out = []
    for r in rows:
        name = r["scenario"]
        if r["server_exit"] is not None:
            out.append(f"{name}: the server exited with status {r['server_exit']}")
        if r["open_model"] or r["open_server"]:
            out.append(f"{name}: model sessions still open at the end: {r['open_model']} at the model,"
                       f" {r['open_server']} by the server's gauge")
        if r["up_lost"] or r["down_lost"]:
            out.append(f"{name}: the good calls lost {r['up_lost']} uplink and {r['down_lost']} downlink frames")
        if r["misrouted"]:
            out.append(f"{name}: {r['misrouted']} frames of audio reached another call")
        if r["good_ended"]:
            out.append(f"{name}: {r['good_ended']} good call(s) ended early or never started")
        if not r["as_expected"]:
            should = "end it" if r["expected"] == "ends" else "let it live to its stop"
            out.append(f"{name}: the server should {should}; the bad call: {r['bad_end']}")
    return out


STEAL_CAVEAT_PCT = 10.0  # the hypervisor took this share of the CPUs or more (a few % is usual): say so


def caveats(rows: Sequence[dict[str, Any]]) -> list[str]:
    """What may be the machine's rather than the server's: scenarios run while the hypervisor took much of the CPUs."""
    return [
        f"{r['scenario']}: the hypervisor took {r['steal_pct']:.0f}% of the CPUs in the window: its latencies (and any"
        " lost frames) may be the host's, not the server's; run it again"
        for r in rows
        if not math.isnan(r.get("steal_pct", math.nan)) and r["steal_pct"] >= STEAL_CAVEAT_PCT
    ]


# --- output -------------------------------------------------------------------------------


def _cell(row: dict[str, Any]) -> dict[str, Any]:
    """A row's compound cells, as the table shows them."""
    end = row["bad_end"]
    if end != "stayed":
        end = (end if len(end) <= 34 else end[:33] + "…") + (
            f" +{row['bad_end_after_s']:.1f}s" if row["bad_end_after_s"] is not None else "")
    return row | {
        "end_cell": end,
        "ok_cell": "yes" if row["as_expected"] else "NO",
        "lost_cell": f"{row['up_lost']}/{row['down_lost']}",
        "open_cell": f"{row['open_model'] if row['open_model'] is not None else '-'}/"
                     f"{row['open_server'] if row['open_server'] is not None else '-'}",
        "lag_cell": f"{row['lag_p99_ms']:.1f}/{row['lag_max_ms']:.1f}",
    }


def table(rows: Sequence[dict[str, Any]], repeats: int) -> str:
    columns = [
        Column("scenario", "scenario", align="<"),
        Column("end_cell", "bad call ended", align="<"),
        Column("ok_cell", "as exp.", align="<"),
        Column("up_p99_ms", "up p99", ".1f"),
        Column("up_p99_x", "x base", ".1f"),
        Column("down_p99_ms", "dn p99", ".1f"),
        Column("down_p99_x", "x base", ".1f"),
        Column("clear_max_ms", "clear max", ".1f"),
        Column("lost_cell", "lost up/dn"),
        Column("rss_max_mib", "RSS MiB", ".0f"),
        Column("server_cpu_pct", "srv CPU%", ".0f"),
        Column("open_cell", "open m/s"),
        Column("lag_cell", "lag p99/max"),
        Column("steal_pct", "steal%", ".1f"),
    ]
    of = f", median of {repeats} runs" if repeats > 1 else ""
    notes = [
        "good calls only, in the bad window (ms); x base: p99 over the baseline's in this run; clear max: barge-in to clear",
        "bad call ended: the server's reason (+ s after the misbehaviour began), or stayed (lived to its stop)",
        "open m/s: model sessions still open at the end, at the fake model / the server's gauge",
        "lag: this process's own (its latencies include it); steal%: CPU the hypervisor took, both CPUs: noise, not server",
    ]
    return render_table(f"Isolation: one bad call among the good ones{of}", columns, [_cell(r) for r in rows], notes)


def commit() -> str:
    """This checkout's commit, and the tracked files it has changed (read-only git calls): what the server ran."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        changed = subprocess.run(["git", "diff", "HEAD", "--name-only"], cwd=ROOT, capture_output=True, text=True,
                                 check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def progress(row: dict[str, Any]) -> str:
    end = row["bad_end"] if row["bad_end_after_s"] is None else f"{row['bad_end']} (+{row['bad_end_after_s']:.1f} s)"
    return (f"  up p99 {row['up_p99_ms']:.1f} ms, down p99 {row['down_p99_ms']:.1f} ms, clear max {row['clear_max_ms']:.1f} ms,"
            f" lost {row['up_lost']}/{row['down_lost']} (cut {row['down_cut']}), open {row['open_model']}/{row['open_server']},"
            f" RSS {row['rss_max_mib']:.0f} MiB, lag p99 {row['lag_p99_ms']:.1f} ms; bad call: {end[:160]}")


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", help=f"comma-separated names, of the {len(SCENARIOS)} in the module docstring"
                                            f" (default {','.join(DEFAULT_SCENARIOS)}); the baseline, none, always runs")
    parser.add_argument("--calls", type=int, help="good calls beside the bad one (default 10, 2 with --quick)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each scenario, round-robin (default 1)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (see the module docstring)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON")
    parser.add_argument(
        "--window", type=float,
        help="seconds of the bad window (default 10, 2.5 with --quick; scenarios that need more get their minimum)",
    )
    parser.add_argument("--port", type=int, default=0, help="the server's port; the fake model's is the next (default: free)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the server and this process to CPUs")
    args = parser.parse_args(argv)
    if args.scenarios is not None and not args.scenarios.strip(", "):
        parser.error("--scenarios: name at least one (leave the option out for the default set)")
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()] if args.scenarios else list(
        QUICK_SCENARIOS if args.quick else DEFAULT_SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"--scenarios: unknown {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    args.names = [BASELINE] + [n for n in dict.fromkeys(names) if n != BASELINE]
    args.calls = args.calls if args.calls is not None else (2 if args.quick else 10)
    if not 1 <= args.calls <= 200:
        parser.error("--calls must be between 1 and 200")
    if not 1 <= args.repeats <= 20:
        parser.error("--repeats must be between 1 and 20")
    if args.port and not 1024 <= args.port <= 65534:
        parser.error("--port must be between 1024 and 65534")
    problem = check_output_path(args.json, "--json") or check_log_folder(ROOT / "bench" / "out")
    if problem is not None:
        parser.error(problem)
    args.timeline = QUICK if args.quick else Timeline()
    if args.window is not None:
        if not 1 <= args.window <= 3600:
            parser.error("--window must be between 1 and 3600 s")
        args.timeline = dataclasses.replace(args.timeline, bad_len_s=args.window)
    return args


def timeline_for(args: argparse.Namespace, scenario: Scenario) -> Timeline:
    """The run's timeline, with the bad window stretched to what ``scenario`` needs."""
    base: Timeline = args.timeline
    return dataclasses.replace(base, bad_len_s=max(base.bad_len_s, scenario.min_bad_len_s))


async def run_all(args: argparse.Namespace, server_cpus: set[int] | None, runs: list[dict[str, Any]]) -> str | None:
    """Every scenario, ``--repeats`` times round-robin, appending to ``runs``; why it stopped early, or None."""
    total = len(args.names) * args.repeats
    for repeat in range(args.repeats):
        for name in args.names:
            scenario = SCENARIOS[name]
            timeline = timeline_for(args, scenario)
            of = f", run {repeat + 1} of {args.repeats}" if args.repeats > 1 else ""
            log(f"[{len(runs) + 1}/{total}] {name}{of}: {scenario.side} misbehaves at {timeline.bad_at_s:g} s,"
                f" window {timeline.bad_len_s:g} s, calls end at {timeline.end_s:g} s ...")
            failure: BaseException | None = None
            try:
                row = await run_scenario(scenario, timeline, args, server_cpus)
            except* (RuntimeError, OSError, trio.TooSlowError) as group:  # the server did not start, or went away
                failure = group.exceptions[0]
            if failure is not None:
                why = str(failure) or "the run took too long"
                return f"{name}: {why}" + ("" if f"isolation-{name}.log" in why else f"; see bench/out/isolation-{name}.log")
            row["repeat"] = repeat + 1
            runs.append(row)
            log(progress(row))
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()
    server_cpus, our_cpus = load.cpu_split(args.pin)
    if our_cpus is not None:
        os.sched_setaffinity(0, our_cpus)
    t = args.timeline
    header = [
        ("date", utc_now()),
        ("commit", commit()),
        ("CPU", f"{cpu_model()}, {len(os.sched_getaffinity(0)) if our_cpus is None else len(our_cpus) + 1} usable"),
        ("pinning", f"server on CPU {sorted(server_cpus)}, callers + fake model on {sorted(our_cpus or [])}"
         if server_cpus else "none"),
        ("Python", sys.version.split()[0]),
        ("path", "OpenAI Realtime GA, audio/pcmu both ways (µ-law passthrough), a fresh server per run"),
        ("calls", f"{args.calls} good + 1 bad; {t.reply_s:g} s replies, each cut by a barge-in"),
        ("timeline", f"bad from {t.bad_at_s:g} s for {t.bad_len_s:g} s (longer where a scenario needs it),"
         f" stop {t.after_s:g} s later; floods last {t.flood_s:g} s"),
        ("scenarios", f"{','.join(args.names)}; {args.repeats} run(s) each"),
        ("load avg", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]
    print_header("mediaserver isolation bench", header)
    runs: list[dict[str, Any]] = []
    failure: str | None = None
    interrupted = False
    try:
        failure = trio.run(run_all, args, server_cpus, runs)
    except* KeyboardInterrupt:
        failure = "interrupted; the server was stopped"
        interrupted = True
    rows = [combine([r for r in runs if r["scenario"] == name]) for name in args.names if any(
        r["scenario"] == name for r in runs)]
    add_ratios(rows)
    if rows:
        print(table(rows, args.repeats))
        print("How the bad calls ended:")
        for row in rows:
            print(f"  {row['scenario']}: {row['bad_end'][:200]}")
    found = findings(rows)
    if rows:  # (no findings line for a run that measured nothing)
        print("findings: " + ("none" if not found else ""))
        for line in found:
            print(f"  {line}")
    noted = caveats(rows)
    for line in noted:
        print(f"caveat: {line}")
    if failure is not None:
        log(f"isolation bench stopped early: {failure}")
    if args.json is not None:
        write_json(args.json, {"header": dict(header), "quick": args.quick, "rows": rows, "runs": runs, "findings": found,
                               "caveats": noted, "failure": failure})
        print(f"wrote {args.json}")
    if interrupted:
        return 130  # (as the other benches: Ctrl-C, or SIGTERM)
    return 1 if failure is not None or found else 0


if __name__ == "__main__":
    sys.exit(main())
