"""Load bench: the real server under a ramp of concurrent simulated calls.

Run ``.venv/bin/python bench/load.py`` (``make bench`` does, after the other
benches).  It starts ``python -m mediaserver serve --provider openai`` as a
subprocess in development mode (no Twilio auth token), pointed at a fake
OpenAI Realtime model that runs in this process next to the call generator
(``bench/_loadgen.py``).  With ``--peer`` (the default) it also starts the
peer, ``bench/_peer_sample.py`` (the design of Twilio's official Python
sample: FastAPI + uvicorn + websockets, OpenAI Realtime, µ-law both ways),
pinned like ours, against the same fake model, and runs every step against
both servers, one after the other (the order alternates from step to step),
so the comparison is measured in the same run on the same machine.  Each
step holds N calls for ``--hold`` seconds:
every call is a voice webhook POST, the Media Stream with 20 ms frames in
real time, mark echoes as Twilio sends them, and ``stop``; every model
session answers with a ``--reply-ms`` reply every ``--reply-every`` seconds,
sent in real time as 40 ms deltas.

Measured per step (latencies only inside the hold window, after every call
of the step has started):

* bridge-added latency, uplink: a caller's ``media`` frame handed to the
  socket until the ``input_audio_buffer.append`` carrying it reached the
  model's socket (the kernel's receive timestamp); downlink: a model delta
  handed to the socket until the Twilio ``media`` carrying it reached the
  caller's.  Both ends share this process's clock.
  Deltas come in real time, so the server's pacer (which keeps 160 ms
  buffered at Twilio) sends each chunk as soon as it has it: what is
  measured is the server's work and queueing plus both loopback hops, not
  this process's delay in reading (an overloaded generator still sends
  late and in bursts: see gen-bound);
* frames lost: caller frames the model never got, and model chunks the
  caller never got (replies end before the calls do, so none is legitimately
  cut); the JSON also has "made up" frames, which the server sent but no
  one sent it (jitter-buffer concealment);
* failed calls (webhook, stream or early hang-up by the server), leaked
  model sessions (opened during the step and still open ``--grace`` seconds after the server's
  ``/healthz`` reports no live or pending call; an overloaded server gets up
  to ``--drain-timeout`` to work through its backlog first), the server's
  CPU (% of one core, psutil, over the window) and RSS;
* CPU wait: how long the server and the generator were runnable but waiting
  for a CPU (``/proc/PID/task/*/schedstat``).  On a shared machine other
  processes take CPU time; rows with a high wait measured the machine;
* the generator's own garbage collector is kept out of the window (a full
  collection when the ramp ends, then ``gc.freeze`` until the step is
  over): a pause of the callers would come back as a burst that the
  server queues, counted as its latency.  The JSON's ``gen_gc_max_ms`` is
  the longest collection the generator still ran inside the window;
* gen-bound: the generator/fake-model process, not the server, limited the
  step (its CPU over ``--gen-cpu`` % of a core, or its event-loop lag p99
  over ``--gen-lag-ms``).  Latencies of such rows overstate the server's;
  the JSON also has how late the callers sent their frames
  (``gen_send_late_p99_ms``);
* ok: no failed call, lost frame or leaked session and both p99s within
  ``--max-p99-ms`` (default 20 ms).  Each server's ramp stops after its
  first step that is not ok (``--keep-going`` runs every step); calls per
  core is shown for ok steps only;
* vs the peer, per step both servers ran: CPU %/call of the peer divided by
  ours, i.e. how many times more calls one core sustains with our server at
  that load (> 1: ours is better), next to both servers' latencies, lost
  frames, failed calls and leaked sessions.  Where the peer's row is not
  ok because it saturated its core, its CPU %/call is capped and the ratio
  understates the difference.

With two or more CPUs the bench (unless ``--no-pin``) puts the server on the first
CPU and this process on the others, so server CPU % is "% of one core" and
calls per core is calls / (CPU % / 100).  The generator and the fake model
share one process on purpose: per call they do about as much WebSocket work
as the server (every message one sends, the other receives), so on a
two-core machine they need the second core whichever way they are split,
and one process gives both ends the same clock.  Pinning keeps our two
processes apart, not other programs off those CPUs: the CPU wait column
shows how much a busy machine took.  The peer gets the same CPU as ours;
only one of them carries calls at a time.  Issue 3's targets: bridge-added
p99 <= 2 ms at 100 calls; >= 600 calls per core with no lost frames and no
leaked sessions.

Options: ``--steps 10,25,...`` (increasing), ``--hold S``, ``--repeats R`` (runs of
each step per server, default 3: every figure in the tables is the median
over the runs, which alternate which server goes first; lost frames,
failed calls and leaked sessions are summed, so a step is ok only if no run
lost anything; the JSON keeps every run), ``--quick`` (2 and 4 calls
for a few seconds, one run each, at most 10 s to drain; an option given
with it keeps its value), ``--no-peer``, ``--json PATH``,
``--plot PATH`` (PNG of both servers' p99 and CPU; default
``bench/out/load.png``, git-ignored), ``--no-pin``, ``--keep-going``,
``--tls`` (serve the fake model on ``wss://``, as real providers are: a
self-signed certificate for 127.0.0.1 made at start-up, which both servers
trust through ``SSL_CERT_FILE`` in their environment; ours reads it through
``ssl.create_default_context()``, the peer's ``websockets`` client through
asyncio's, which is the same call; the model link then costs both servers
TLS, and the table header says which link a run used),
``--profile PATH`` (run our server under cProfile and print where its CPU
time goes, by function and by package).  Progress goes to stderr; the
servers' own logs go to ``bench/out/load-server.log`` and
``bench/out/load-peer.log``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ helpers, when imported from elsewhere
# This checkout's mediaserver, not whichever one is installed (the venv's may be another checkout's, editable)
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # type: ignore[import-untyped]  # noqa: E402
import trio  # noqa: E402

from _loadgen import CallRecord, FakeModel, Recorder, clock, http_request, monitor_loop_lag, run_call  # noqa: E402
from _measure import (  # noqa: E402
    Column,
    check_log_folder,
    check_output_path,
    cpu_model,
    die_with_parent,
    interrupt_on_sigterm,
    print_header,
    render_table,
    utc_now,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
DEFAULT_STEPS = (10, 25, 50, 100, 200, 400, 600, 800)
TARGET_P99_MS = 2.0
TARGET_CALLS = 100
TARGET_PER_CORE = 600
OURS, PEER = "ours", "peer"
PEER_PACKAGES = ("fastapi", "uvicorn", "websockets", "starlette")


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- the server subprocesses -----------------------------------------------------------


@dataclasses.dataclass
class Server:
    """One server under test: how to start it, where its voice webhook is, and its process once started."""

    name: str  # OURS or PEER
    argv: list[str]
    webhook_path: str
    log_path: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    done: bool = False  # its ramp has stopped

    @property
    def ps(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def exited(self) -> str:
        """Why the server is gone, for one line: its exit status and its log's last line (the cause, usually)."""
        assert self.proc is not None
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
                lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
        except OSError:
            lines = []
        last = f" (its log ends: {lines[-1][-200:]!r})" if lines else ""
        return f"the {self.name} server exited with status {self.proc.returncode}{last}; see {self.log_path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def raise_fd_limit() -> int:
    """Each call is two sockets at each end; lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def cpu_split(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(server CPUs, our CPUs): the first allowed CPU for the servers, the rest for us."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    return {cpus[0]}, set(cpus[1:])


def peer_missing() -> str | None:
    """Why the peer cannot run here (a package it needs is not importable), or None."""
    missing = [name for name in ("fastapi", "uvicorn", "websockets", "twilio") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{', '.join(missing)} not importable (pip install fastapi uvicorn websockets twilio)"
    return None


def peer_versions() -> str:
    parts = []
    for name in PEER_PACKAGES:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} ?")
    return ", ".join(parts)


def make_servers(args: argparse.Namespace) -> list[Server]:
    """Our server, and the peer when ``--peer`` (each on a free port, logging to bench/out/)."""
    out = ROOT / "bench" / "out"
    port = free_port()
    profiler = ["-m", "cProfile", "-o", str(args.profile)] if args.profile is not None else []
    servers = [
        Server(
            OURS,
            [sys.executable, *profiler, "-m", "mediaserver", "serve", "--host", HOST, "--port", str(port),
             "--provider", "openai", "--env-file", os.devnull],
            "/twiml",
            out / "load-server.log",
            port,
        )
    ]
    if args.peer:
        port = free_port()
        servers.append(
            Server(
                PEER,
                [sys.executable, str(ROOT / "bench" / "_peer_sample.py"), "--host", HOST, "--port", str(port)],
                "/incoming-call",
                out / "load-peer.log",
                port,
            )
        )
    return servers


@contextlib.contextmanager
def server_process(
    server: Server, model_port: int, cpus: set[int] | None, cert: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``server.argv`` against the fake model, pinned to ``cpus``; terminate it on exit.

    With ``cert`` the model is at ``wss://`` and the server trusts ``cert``
    alone (``SSL_CERT_FILE``, which OpenSSL's default verify paths read).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDIASERVER_", "TWILIO_", "OPENAI_"))}
    # Loopback only: a proxy configured on the machine must not carry the model link (the peer's websockets
    # client honours *_proxy, and 127.0.0.1 is not exempt by default).
    for name in list(env):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "ws_proxy", "wss_proxy"):
            del env[name]
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(
        OPENAI_API_KEY="bench",
        OPENAI_REALTIME_URL=f"{'ws' if cert is None else 'wss'}://{HOST}:{model_port}/v1/realtime",
        MEDIASERVER_LOG_LEVEL="WARNING",
    )
    if cert is not None:
        env["SSL_CERT_FILE"] = str(cert)
        env.pop("SSL_CERT_DIR", None)
    server.log_path.parent.mkdir(parents=True, exist_ok=True)
    # The bench's calls are recorded as any call is (that work is part of what is measured), but in a directory
    # of their own: never in the checkout's data/, among the records `mediaserver calls` shows.
    with tempfile.TemporaryDirectory(prefix="mediaserver-bench-") as data_dir, server.log_path.open("wb") as out:
        env["MEDIASERVER_DATA_DIR"] = data_dir
        proc = subprocess.Popen(
            server.argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=die_with_parent
        )
        server.proc = proc
        try:
            if cpus is not None:
                os.sched_setaffinity(proc.pid, cpus)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def wait_healthy(server: Server, timeout_s: float = 30) -> None:
    assert server.proc is not None
    with trio.fail_after(timeout_s):
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(server.exited())
            with trio.move_on_after(1):  # (a port some other program holds may accept and never answer)
                try:
                    status, _ = await http_get(server.port, "/healthz")
                    if status == 200:
                        return
                except OSError:
                    pass
            await trio.sleep(0.1)


async def http_get(port: int, path: str) -> tuple[int, str]:
    return await http_request(HOST, port, "GET", path)


# --- one step --------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def cpu_and_kernel_seconds(proc: psutil.Process) -> tuple[float, float]:
    """(:func:`cpu_seconds`, the part of it spent in the kernel on the process's behalf: its system calls), from one
    reading, so that the share is of the same total."""
    t = proc.cpu_times()
    return float(t.user + t.system), float(t.system)


def runqueue_wait_s(pid: int) -> float:
    """Seconds the process's threads spent runnable but waiting for a CPU (/proc/PID/task/*/schedstat).

    High values mean another process (on a shared machine) took the CPU: the
    step measured contention, not our server.  NaN where schedstat is missing.
    """
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue
    except OSError:
        return float("nan")
    return total / 1e9


def steal_split(cpus: Sequence[int]) -> tuple[float, float]:
    """(steal, all) CPU seconds so far on ``cpus`` (psutil, /proc/stat): how much the hypervisor took, of how much time.

    On a virtual machine the host may run other guests on our CPUs; that
    time shows in no process's CPU time or run-queue wait, only as steal.
    (0, 0) where psutil has no per-CPU steal (not Linux).
    """
    times = psutil.cpu_times(percpu=True)
    steal = total = 0.0
    for cpu in cpus:
        if cpu < len(times):
            t = times[cpu]
            steal += getattr(t, "steal", 0.0)
            total += sum(t)
    return steal, total


class _GCPauses:
    """This process's garbage collections, as (start, seconds) on ``time.perf_counter`` (a ``gc.callbacks`` hook)."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, float]] = []
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.pauses.append((self._start, time.perf_counter() - self._start))

    def longest_s(self, start: float, end: float) -> float:
        """The longest collection that began between ``start`` and ``end`` (0 if none)."""
        return max((s for t, s in self.pauses if start <= t <= end), default=0.0)


_GC_PAUSES = _GCPauses()  # hooked into gc.callbacks by main()


async def _run_calls(
    n_calls: int,
    args: argparse.Namespace,
    target: Server,
    recorder: Recorder,
    t0: float,
    ramp_s: float,
    end_s: float,
    measure_window: Callable[[], Awaitable[None]],
) -> None:
    """Start the step's calls over the ramp and wait until they are over, measuring the window alongside."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(measure_window)
        lag_scope = trio.CancelScope()

        async def lag() -> None:
            with lag_scope:
                await monitor_loop_lag(recorder)

        nursery.start_soon(lag)
        async with trio.open_nursery() as calls:
            for i in range(n_calls):
                call_no = i + 1
                recorder.calls[call_no] = CallRecord(call_no)
                calls.start_soon(run_call, recorder, call_no, HOST, target.port, end_s, target.webhook_path)
                # Real calls' 20 ms frames arrive at independent phases; an even
                # spacing that divides 20 ms would send every call's frame at
                # the same instant and measure that burst's queueing instead.
                # The golden-ratio offset spreads the phases evenly.
                phase_s = ((i + 1) * 0.6180339887 % 1.0) * 0.020
                await trio.sleep_until(t0 + (i + 1) * ramp_s / n_calls + phase_s)
            # This process's own garbage collector must not pause the callers
            # in the window: a full collection (40-120 ms at 350-400 calls, as
            # the ramp grows the heap) holds every caller's frames back, and
            # the burst that follows is queued by the server and measured as
            # its latency.  So: collect now that every call has started (the
            # settle time absorbs it) and freeze what is alive until the step
            # is over (run_step unfreezes).
            gc.collect()
            gc.freeze()
        lag_scope.cancel()


async def run_step(
    n_calls: int,
    args: argparse.Namespace,
    target: Server,
    model: FakeModel,
    recorder: Recorder,
) -> dict[str, Any]:
    """Start n_calls on ``target`` (spread over the ramp), hold, stop them all, count what was lost and leaked."""
    me = psutil.Process()
    server = target.ps
    ramp_s = max(n_calls / args.ramp_rate, 0.5)
    t0 = clock()
    window_start = t0 + ramp_s + args.settle
    end_s = window_start + args.hold
    recorder.reset()
    recorder.window = (window_start, end_s - 0.1)
    recorder.replies_until_s = end_s
    model.label = f"{target.name} {n_calls}"
    sessions_before = model.sessions
    errors_before = len(model.errors)
    measured: dict[str, float] = {}

    async def reactor_counters() -> tuple[int, int] | None:
        """(wake-ups, handler calls) from the server's /healthz; None for a server without a reactor (the peer)."""
        status, text = await http_get(target.port, "/healthz")
        reactor = json.loads(text).get("reactor") if status == 200 else None
        return (reactor["wakeups"], reactor["handler_calls"]) if isinstance(reactor, dict) else None

    async def measure_window() -> None:
        await trio.sleep_until(window_start)
        before = await reactor_counters()
        server_cpus = server.cpu_affinity() or list(range(psutil.cpu_count() or 1))
        s_cpu, s_sys = cpu_and_kernel_seconds(server)
        measured.update(
            s_cpu=s_cpu, s_sys=s_sys, g_cpu=cpu_seconds(me), wall=time.perf_counter(),
            s_wait=runqueue_wait_s(server.pid), g_wait=runqueue_wait_s(me.pid),
        )
        steal_before = steal_split(server_cpus)
        await trio.sleep_until(end_s - 0.1)
        wall = time.perf_counter() - measured["wall"]
        measured["gen_gc_max_ms"] = 1000 * _GC_PAUSES.longest_s(measured["wall"], measured["wall"] + wall)
        cpu_after, sys_after = cpu_and_kernel_seconds(server)
        server_used = cpu_after - measured["s_cpu"]
        measured.update(
            server_sys=100 * (sys_after - measured["s_sys"]) / server_used if server_used > 0 else float("nan"),
            server_cpu=100 * server_used / wall,
            gen_cpu=100 * (cpu_seconds(me) - measured["g_cpu"]) / wall,
            rss=server.memory_info().rss / 2**20,
            server_wait=100 * (runqueue_wait_s(server.pid) - measured["s_wait"]) / wall,
            gen_wait=100 * (runqueue_wait_s(me.pid) - measured["g_wait"]) / wall,
        )
        steal_after = steal_split(server_cpus)
        if steal_after[1] > steal_before[1]:
            measured["steal"] = 100 * (steal_after[0] - steal_before[0]) / (steal_after[1] - steal_before[1])
        after = await reactor_counters()
        if before is not None and after is not None and after[0] > before[0]:
            measured["sockets_per_wakeup"] = (after[1] - before[1]) / (after[0] - before[0])

    try:
        await _run_calls(n_calls, args, target, recorder, t0, ramp_s, end_s, measure_window)
    finally:
        gc.unfreeze()  # the step's calls are over: their objects may be collected again
    calls_done_s = clock()
    # A server that fell behind may still be working through its backlog:
    # wait (up to --drain-timeout) until it reports no live or pending call,
    # then give it --grace to close the model sessions.
    health: dict[str, Any] = {}
    with trio.move_on_after(args.drain_timeout):
        while True:
            status, text = await http_get(target.port, "/healthz")
            health = json.loads(text) if status == 200 else {}
            if health.get("active_calls") == 0 and health.get("pending_calls") == 0:
                break
            await trio.sleep(0.2)
    drained_s = clock() - calls_done_s
    await trio.sleep(args.grace)
    leaked = model.open_for(model.label)

    recs = list(recorder.calls.values())
    failures = Counter((r.failed or "").split(":")[0] for r in recs if r.failed)
    up_sent = sum(len(r.up_sent_s) for r in recs)
    up_got = sum(r.up_received for r in recs)
    down_sent = sum(len(r.down_sent_s) for r in recs)
    down_got = sum(r.down_received for r in recs)
    server_cpu = measured.get("server_cpu", float("nan"))
    gen_lag_p99 = pct(recorder.loop_lag_s, 99) * 1000
    gen_cpu = measured.get("gen_cpu", float("nan"))
    per_core = n_calls * 100 / server_cpu if server_cpu > 0 else float("nan")
    row: dict[str, Any] = {
        "calls": n_calls,
        "server": target.name,
        "up_p50_ms": pct(recorder.up_latency_s, 50) * 1000,
        "up_p99_ms": pct(recorder.up_latency_s, 99) * 1000,
        "down_p50_ms": pct(recorder.down_latency_s, 50) * 1000,
        "down_p99_ms": pct(recorder.down_latency_s, 99) * 1000,
        "up_samples": len(recorder.up_latency_s),
        "down_samples": len(recorder.down_latency_s),
        "up_sent": up_sent,
        "up_lost": up_sent - up_got,
        "up_made_up": recorder.up_untagged,
        "down_sent": down_sent,
        "down_lost": down_sent - down_got,
        "down_made_up": sum(r.down_untagged for r in recs),
        "failed": sum(1 for r in recs if r.failed),
        "failure_kinds": dict(failures),
        "first_failure": next((r.failed for r in recs if r.failed), None),
        "sessions": model.sessions - sessions_before,
        "leaked": leaked,
        "server_active_after": health.get("active_calls"),
        "drain_s": drained_s,
        "server_cpu_pct": server_cpu,
        # the share of that CPU spent in the kernel (system calls: the sockets' TCP work), not in the interpreter
        "server_sys_pct": measured.get("server_sys", float("nan")),
        "server_rss_mib": measured.get("rss", float("nan")),
        "cpu_pct_per_call": server_cpu / n_calls,
        "calls_per_core": per_core,
        "gen_cpu_pct": gen_cpu,
        "gen_lag_p99_ms": gen_lag_p99,
        "gen_send_late_p99_ms": pct(recorder.send_lateness_s, 99) * 1000,
        # the generator's longest garbage collection in the window (kept out of it: see measure_window)
        "gen_gc_max_ms": measured.get("gen_gc_max_ms", float("nan")),
        "gen_bound": bool(gen_cpu > args.gen_cpu or gen_lag_p99 > args.gen_lag_ms),
        "server_wait_pct": measured.get("server_wait", float("nan")),
        # ours: ready sockets handled per reactor wake-up in the hold window (None for the peer)
        "sockets_per_wakeup": measured.get("sockets_per_wakeup"),
        "gen_wait_pct": measured.get("gen_wait", float("nan")),
        "steal_pct": measured.get("steal", float("nan")),
        "model_errors": model.errors[errors_before:][:5],
        "stop_s": calls_done_s - end_s,
    }
    worst_p99 = max(row["up_p99_ms"], row["down_p99_ms"])
    row["broken"] = bool(
        row["failed"] or row["leaked"] or row["up_lost"] or row["down_lost"] or not worst_p99 <= args.max_p99_ms
    )
    return row


# Per-run figures the combined row takes the median of; the counts are summed over the runs.
_MEDIANS = (
    "up_p50_ms", "up_p99_ms", "down_p50_ms", "down_p99_ms", "drain_s", "server_cpu_pct", "server_sys_pct", "server_rss_mib",
    "gen_cpu_pct", "gen_lag_p99_ms", "gen_send_late_p99_ms", "gen_gc_max_ms", "server_wait_pct", "gen_wait_pct",
    "stop_s",
)
_SUMS = (
    "up_samples", "down_samples", "up_sent", "up_lost", "up_made_up", "down_sent", "down_lost", "down_made_up",
    "failed", "sessions", "leaked",
)


def combine(runs: Sequence[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """One row for a step's runs on one server: the median of each figure, the sum of what was lost or failed.

    ok (not ``broken``) needs no failed call, lost frame or leaked session in
    any run, and the median p99s within ``--max-p99-ms``.  The runs
    themselves are kept under ``runs`` (for the JSON).
    """
    first = runs[0]
    row: dict[str, Any] = {"calls": first["calls"], "server": first["server"], "repeats": len(runs)}
    for key in _MEDIANS:
        row[key] = float(np.median([r[key] for r in runs]))
    for key in _SUMS:
        row[key] = sum(r[key] for r in runs)
    row["cpu_pct_per_call"] = row["server_cpu_pct"] / row["calls"]
    row["calls_per_core"] = row["calls"] * 100 / row["server_cpu_pct"] if row["server_cpu_pct"] > 0 else float("nan")
    wakes = [r["sockets_per_wakeup"] for r in runs if r["sockets_per_wakeup"] is not None]
    row["sockets_per_wakeup"] = float(np.median(wakes)) if wakes else None
    kinds: Counter[str] = Counter()
    for r in runs:
        kinds.update(r["failure_kinds"])
    row["failure_kinds"] = dict(kinds)
    row["first_failure"] = next((r["first_failure"] for r in runs if r["first_failure"]), None)
    row["model_errors"] = [e for r in runs for e in r["model_errors"]][:5]
    active = [r["server_active_after"] for r in runs if r["server_active_after"] is not None]
    row["server_active_after"] = max(active) if active else None
    row["gen_bound"] = any(r["gen_bound"] for r in runs)
    steals = [r["steal_pct"] for r in runs if not math.isnan(r.get("steal_pct", math.nan))]
    row["steal_pct"] = max(steals) if steals else math.nan  # the worst run's: one host hiccup can break a step
    worst_p99 = max(row["up_p99_ms"], row["down_p99_ms"])
    row["broken"] = bool(
        row["failed"] or row["leaked"] or row["up_lost"] or row["down_lost"] or not worst_p99 <= args.max_p99_ms
    )
    if len(runs) > 1:
        row["runs"] = list(runs)
    return row


def compare(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step both servers ran: the peer's CPU %/call over ours, and both servers' figures side by side."""
    by_step: dict[int, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_step.setdefault(r["calls"], {})[r["server"]] = r
    out = []
    for calls, pair in sorted(by_step.items()):
        if OURS not in pair or PEER not in pair:
            continue
        ours, peer = pair[OURS], pair[PEER]
        ratio = peer["cpu_pct_per_call"] / ours["cpu_pct_per_call"] if ours["cpu_pct_per_call"] > 0 else float("nan")
        entry: dict[str, Any] = {"calls": calls, "ratio": ratio}
        for name, r in ((OURS, ours), (PEER, peer)):
            for key in ("cpu_pct_per_call", "up_p50_ms", "up_p99_ms", "down_p50_ms", "down_p99_ms",
                        "up_lost", "down_lost", "failed", "leaked", "server_cpu_pct", "server_wait_pct"):
                entry[f"{name}_{key}"] = r[key]
            entry[f"{name}_ok"] = not r["broken"]
        out.append(entry)
    return out


# --- output ---------------------------------------------------------------------------------


COLUMNS = [
    Column("calls", "calls"),
    Column("server", "server", align="<"),
    Column("ok", "ok", align="<"),
    Column("up_p50_ms", "up p50", ".2f"),
    Column("up_p99_ms", "up p99", ".2f"),
    Column("down_p50_ms", "dn p50", ".2f"),
    Column("down_p99_ms", "dn p99", ".2f"),
    Column("lost", "lost up/dn", align=">"),
    Column("failed", "failed"),
    Column("leaked", "leaked"),
    Column("server_cpu_pct", "srv CPU%", ".0f"),
    Column("server_sys_pct", "sys%", ".0f"),
    Column("server_rss_mib", "RSS MiB", ".0f"),
    Column("cpu_pct_per_call", "CPU%/call", ".3f"),
    Column("calls_per_core", "calls/core", ".0f"),
    Column("sockets_per_wakeup", "socks/wake", ".1f"),
    Column("gen_cpu_pct", "gen CPU%", ".0f"),
    Column("gen_lag_p99_ms", "gen lag99", ".1f"),
    Column("gen_bound", "gen-bound", align="<"),
    Column("wait", "CPU wait% srv/gen", align=">"),
    Column("steal_pct", "steal%", ".1f"),
]

PEER_COLUMNS = [
    Column("calls", "calls"),
    Column("ours_cpu", "CPU%/call ours", ".3f"),
    Column("peer_cpu", "peer", ".3f"),
    Column("ratio", "peer/ours", ".2f"),
    Column("ours_p50", "p50 up/dn ours", align=">"),
    Column("peer_p50", "peer", align=">"),
    Column("ours_p99", "p99 up/dn ours", align=">"),
    Column("peer_p99", "peer", align=">"),
    Column("lost", "lost ours|peer", align=">"),
    Column("failed", "failed o|p", align=">"),
    Column("leaked", "leaked o|p", align=">"),
    Column("ok", "ok o|p", align=">"),
    Column("wait", "srv wait% o|p", align=">"),
]


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def table(rows: Sequence[dict[str, Any]], args: argparse.Namespace, pinned: bool) -> str:
    shown: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: (r["calls"], r["server"] != OURS)):
        if shown and shown[-1] and shown[-1]["calls"] != r["calls"]:
            shown.append({})  # a blank line between steps
        shown.append(
            {
                **r,
                "ok": not r["broken"],
                # capacity figures only mean something for a step the server kept up with
                "calls_per_core": None if r["broken"] else r["calls_per_core"],
                "lost": f"{r['up_lost']}/{r['down_lost']}",
                "wait": f"{max(r['server_wait_pct'], 0.0):.0f}/{max(r['gen_wait_pct'], 0.0):.0f}",
            }
        )
    peer_note = (
        f"; {PEER} = bench/_peer_sample.py (the design of Twilio's Python sample), same callers, same fake model, same CPU"
        if any(r["server"] == PEER for r in rows) else ""
    )
    notes = [
        f"server: {OURS} = mediaserver{peer_note}.",
        *(f"{r['server']} at {r['calls']} calls: interrupted; {r['repeats']} of {args.repeats} run(s) finished, and the"
          " row is theirs." for r in rows if r.get("partial")),
        f"ok: no failed call, lost frame or leaked session (in any run), and p99 <= {args.max_p99_ms:g} ms"
        " (else that server's ramp stops).",
        "Each figure is the median over the runs of a step (runs alternate which server goes first);"
        " lost, failed and leaked are summed over them.",
        "up/dn p50/p99: bridge-added latency in ms (caller frame -> model; model delta -> caller), hold window only"
        + ("." if args.model_speed == 1.0 else f"; dn: each reply's first delta only (at {args.model_speed:g}x real time"
           " the server holds the rest back on purpose, to keep its lead at Twilio)."),
        "lost: frames sent but never received, up (caller -> model) / down (model -> caller).",
        f"srv CPU%: server process, % of one core{' (pinned to one CPU)' if pinned else ' (not pinned)'};"
        " calls/core = calls / (CPU% / 100), an extrapolation, shown for ok rows only.",
        "sys%: the share of the server's CPU spent in the kernel (its system calls: the sockets' TCP work on loopback,"
        " where the kernel also delivers what a send carries to the receiving process); the rest is the interpreter.",
        "socks/wake: ready sockets our reactor handled per wake-up in the hold window (its /healthz counters).",
        f"gen-bound: generator CPU > {args.gen_cpu:g}% or its loop lag p99 > {args.gen_lag_ms:g} ms.",
        f"targets (issue 3): p99 <= {TARGET_P99_MS:g} ms at {TARGET_CALLS} calls; >= {TARGET_PER_CORE} calls per core,"
        " no lost frames, no leaked sessions.",
        "CPU wait%: time runnable but waiting for a CPU (/proc schedstat), server / generator: other processes"
        " on the machine took it; rows with more than a few % measured a shared machine, not the server.",
        "steal%: on a virtual machine, the share of the server's CPU the host gave to someone else in the window"
        " (/proc/stat; the worst run's): no process's CPU or wait shows it. A few % makes CPU figures noisy; a run"
        " with much more may have been frozen for a moment, which a step shows as latency and even lost frames"
        " (replies still in flight when the callers hang up).",
    ]
    if args.tls:
        notes.append(
            f"model link: wss://, {getattr(args, 'tls_negotiated', '?')}; both servers verify the fake model's certificate"
            " (TLS on the model side is the generator's CPU, counted in gen CPU%)."
        )
    return render_table(
        f"Load: concurrent calls, {args.hold:g} s hold each, {_runs(args)}, model over {model_link(args)}", COLUMNS, shown, notes
    )


def interrupted_rows(
    step_runs: dict[str, list[dict[str, Any]]], rows: Sequence[dict[str, Any]], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Rows for the runs an interrupted step finished, per server that has no row for that step yet (marked ``partial``)."""
    out = []
    for runs in step_runs.values():
        if runs and not any(r["calls"] == runs[0]["calls"] and r["server"] == runs[0]["server"] for r in rows):
            out.append(combine(runs, args) | {"partial": True})
    return out


def _runs(args: argparse.Namespace) -> str:
    return f"median of {args.repeats} runs per server and step" if args.repeats > 1 else "1 run per server and step"


def peer_table(comparison: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    def pair(c: dict[str, Any], name: str, stat: str) -> str:
        return f"{c[f'{name}_up_{stat}_ms']:.2f}/{c[f'{name}_down_{stat}_ms']:.2f}"

    shown = [
        {
            "calls": c["calls"],
            "ours_cpu": c["ours_cpu_pct_per_call"],
            "peer_cpu": c["peer_cpu_pct_per_call"],
            "ratio": c["ratio"],
            "ours_p50": pair(c, OURS, "p50"),
            "peer_p50": pair(c, PEER, "p50"),
            "ours_p99": pair(c, OURS, "p99"),
            "peer_p99": pair(c, PEER, "p99"),
            "lost": f"{c['ours_up_lost']}/{c['ours_down_lost']}|{c['peer_up_lost']}/{c['peer_down_lost']}",
            "failed": f"{c['ours_failed']}|{c['peer_failed']}",
            "leaked": f"{c['ours_leaked']}|{c['peer_leaked']}",
            "ok": f"{_yes(c['ours_ok'])}|{_yes(c['peer_ok'])}",
            "wait": f"{max(c['ours_server_wait_pct'], 0.0):.0f}|{max(c['peer_server_wait_pct'], 0.0):.0f}",
        }
        for c in comparison
    ]
    notes = [
        "peer/ours: the peer's CPU%/call divided by ours (medians over the runs) = how many times more calls one"
        " core sustains with our server at that load (> 1: ours is better).",
        "Both servers ran each step in this run, one after the other, pinned to the same CPU; latencies in ms.",
        "Where the peer's row is not ok because its core was saturated, its CPU%/call is capped and the ratio"
        " understates the difference.",
    ]
    return render_table(
        f"Peer in the same run: ours vs Twilio's Python sample design, {args.hold:g} s hold, {_runs(args)},"
        f" model over {model_link(args)}",
        PEER_COLUMNS, shown, notes,
    )


def print_profile(path: Path, top: int = 25) -> None:
    """The server's hottest functions by own time, and the same grouped by package."""
    import io
    import pstats

    stats = pstats.Stats(str(path))
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    print(f"Server profile (cProfile, all steps), top {top} by own time:")
    print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[-6000:])
    by_package: Counter[str] = Counter()
    total = idle = 0.0
    for (filename, _, function), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        marker = "site-packages/"
        if "select.epoll" in function:
            idle += tottime
            continue
        total += tottime
        if marker in filename:
            key = filename.split(marker, 1)[1].split("/", 1)[0]
        elif "/mediaserver/" in filename:
            key = "mediaserver/" + filename.split("/mediaserver/", 1)[1].split("/", 1)[0]
        elif filename.startswith("~") or filename.startswith("<"):
            key = "builtins (C)"
        else:
            key = "stdlib"
        by_package[key] += tottime
    print(f"Own time by package, % of busy time ({total:.2f} s, start-up imports included; idle in epoll {idle:.2f} s):")
    for key, seconds in by_package.most_common(15):
        print(f"  {key:32} {seconds:8.2f} s  {100 * seconds / total:5.1f}%")
    print()


def plot(rows: Sequence[dict[str, Any]], path: Path, link: str = "ws://") -> None:
    """p99 latencies (log scale) and server CPU (second axis) against calls, for each server that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, ax = plt.subplots(figsize=(8, 4.5))
    cpu = ax.twinx()
    styles = {OURS: ("tab:blue", "-", "mediaserver"), PEER: ("tab:orange", "--", "peer (Twilio sample design)")}
    cpu_max = 110.0
    for name, (color, ls, label) in styles.items():
        mine = sorted((r for r in rows if r["server"] == name), key=lambda r: r["calls"])
        if not mine:
            continue
        calls = [r["calls"] for r in mine]
        ax.plot(calls, [r["up_p99_ms"] for r in mine], marker="o", ls=ls, color=color, label=f"{label}: uplink p99")
        ax.plot(calls, [r["down_p99_ms"] for r in mine], marker="s", ls=ls, color=color, alpha=0.6, label=f"{label}: downlink p99")
        for r in mine:
            if r["gen_bound"]:
                ax.annotate("gen-bound", (r["calls"], max(r["up_p99_ms"], r["down_p99_ms"])), fontsize=7)
        cpu_pct = [r["server_cpu_pct"] for r in mine]
        cpu.plot(calls, cpu_pct, marker="^", ls=":", color=color, label=f"{label}: CPU %")
        cpu_max = max(cpu_max, *(c * 1.1 for c in cpu_pct if math.isfinite(c)))
    ax.axhline(TARGET_P99_MS, color="grey", ls=":", lw=1, label=f"target {TARGET_P99_MS:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["calls"] for r in rows}))
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    for axis in (ax.xaxis, ax.yaxis):  # plain numbers, not 10^x, on both log axes
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("concurrent calls")
    ax.set_ylabel("bridge-added latency p99, ms")
    cpu.set_ylabel("server CPU, % of one core (dotted)")
    cpu.set_ylim(0, cpu_max)
    lines = ax.get_legend_handles_labels()
    more = cpu.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", fontsize=7)
    ax.set_title(f"Under load, same run (OpenAI pcmu path, fake model on {link})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", help="comma-separated concurrent calls per step (default 10,25,50,100,200,400,600,800)")
    parser.add_argument("--hold", type=float, help="seconds each step holds its calls after ramp-up (default 15)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke run: steps 2,4, 1.5 s hold")
    parser.add_argument(
        "--peer", action=argparse.BooleanOptionalAction, default=True,
        help="also run every step against the peer, bench/_peer_sample.py (default on; --no-peer skips it)"
    )
    parser.add_argument("--ramp-rate", type=float, default=100.0, help="new calls per second while ramping (default 100)")
    parser.add_argument(
        "--settle", type=float, help="seconds after the ramp before measuring (default 1, 0.5 with --quick; at least 0.2)"
    )
    parser.add_argument("--grace", type=float, help="seconds after the calls end before counting leaks (default 2, 1 with --quick)")
    parser.add_argument(
        "--drain-timeout", type=float,
        help="max seconds to wait for the server to finish the step's calls (default 60, 10 with --quick)",
    )
    parser.add_argument("--reply-every", type=float, help="model reply period per call, s (default 2, 0.6 with --quick)")
    parser.add_argument("--reply-ms", type=int, help="model reply length, ms (default 1000, 400 with --quick)")
    parser.add_argument(
        "--model-speed", type=float, default=1.0,
        help="the model sends each reply this many times faster than real time, as real models do (default 1: real time)",
    )
    parser.add_argument("--gen-cpu", type=float, default=85.0, help="gen-bound above this generator CPU %% (default 85)")
    parser.add_argument("--gen-lag-ms", type=float, default=2.0, help="gen-bound above this loop-lag p99 (default 2 ms)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the servers and the generator to CPUs")
    parser.add_argument(
        "--max-p99-ms", type=float, default=20.0,
        help="a step whose p99 exceeds this is not ok (default 20 ms)"
    )
    parser.add_argument("--keep-going", action="store_true", help="run every step even after one breaks")
    parser.add_argument(
        "--repeats", type=int,
        help="runs of each step per server, order alternating; the table shows their median (default 3, 1 with --quick)"
    )
    parser.add_argument(
        "--tls", action="store_true",
        help="serve the fake model on wss:// with a self-signed certificate both servers trust (default ws://)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the header and all rows as JSON")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "out" / "load.png", help="PNG path (default bench/out/load.png)")
    parser.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="skip the plot")
    parser.add_argument(
        "--profile", type=Path, metavar="PATH",
        help="run our server under cProfile, write its stats here and print the top functions"
    )
    args = parser.parse_args(argv)
    if args.profile is not None:
        args.profile = args.profile.resolve()  # (the server runs from the checkout's root, not from here)
    default_plot = ROOT / "bench" / "out" / "load.png"  # (its folder is made when the run starts)
    plot = args.plot if args.plot != default_plot else None
    for path, option in ((args.json, "--json"), (plot, "--plot"), (args.profile, "--profile")):
        problem = check_output_path(path, option)
        if problem is not None:
            parser.error(problem)
    if args.steps is not None and not args.steps.strip():
        parser.error("--steps: give at least one step")
    try:
        steps = [int(s) for s in args.steps.split(",")] if args.steps else ([2, 4] if args.quick else list(DEFAULT_STEPS))
    except ValueError:
        parser.error(f"--steps must be comma-separated integers, got {args.steps!r}")
    if not steps or min(steps) < 1 or max(steps) > 60000:
        parser.error("--steps: each step must be between 1 and 60000 calls")
    args.step_list = steps
    args.repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if not 1 <= args.repeats <= 50:
        parser.error("--repeats must be between 1 and 50")
    args.hold = args.hold if args.hold is not None else (1.5 if args.quick else 15.0)
    # What --quick shortens, unless given (a smoke run reports a stuck server rather than wait on it).
    for name, usual, quick in (("settle", 1.0, 0.5), ("grace", 2.0, 1.0), ("reply_every", 2.0, 0.6),
                               ("reply_ms", 1000, 400), ("drain_timeout", 60.0, 10.0)):  # fmt: skip
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else usual)
    if len(set(steps)) != len(steps):
        parser.error("--steps: each step once (to repeat a measurement use --repeats; to compare revisions, bench/ab.py)")
    if steps != sorted(steps):
        parser.error(f"--steps must increase ({args.steps}): each server's ramp stops at its first step that is not ok")
    for name in ("hold", "ramp_rate", "reply_every", "settle", "grace", "drain_timeout", "max_p99_ms", "gen_cpu", "gen_lag_ms"):
        value = getattr(args, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            parser.error(f"--{name.replace('_', '-')} must be a finite number")
    if args.grace < 0 or args.drain_timeout < 0:
        parser.error("--grace and --drain-timeout must not be negative")
    if not 1.0 <= args.model_speed <= 100.0:
        parser.error("--model-speed must be between 1 (real time) and 100")
    if args.hold <= 0.5 or args.ramp_rate <= 0 or args.reply_ms < 40 or args.reply_every <= 0:
        parser.error("--hold must exceed 0.5 s, --ramp-rate and --reply-every be positive, --reply-ms at least 40")
    if args.settle < 0.2:
        parser.error("--settle must be at least 0.2 s: the generator collects its garbage then, out of the measured window")
    if args.max_p99_ms <= 0 or args.gen_lag_ms <= 0 or not 0 < args.gen_cpu <= 100:
        parser.error("--max-p99-ms and --gen-lag-ms must be positive, --gen-cpu a % of a core above 0, at most 100")
    problem = check_log_folder(ROOT / "bench" / "out")
    if problem is not None:
        parser.error(problem)
    if args.tls and importlib.util.find_spec("cryptography") is None:
        parser.error("--tls needs the cryptography package (pip install cryptography) for its certificate")
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        log("no plot: matplotlib is not importable (pip install matplotlib, or pass --no-plot)")
        args.plot = None
    if args.plot is not None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        kinds = FigureCanvasAgg.get_supported_filetypes()
        if args.plot.suffix[1:].lower() not in kinds:
            parser.error(f"--plot: {args.plot.name!r} is not an image file matplotlib writes: name it .png, .svg or .pdf"
                         f" ({', '.join(sorted(kinds))})")
    args.peer_skipped = peer_missing() if args.peer else None
    if args.peer_skipped is not None:
        args.peer = False
    return args


def _progress(row: dict[str, Any]) -> str:
    return (
        f"  {row['server']}: up p99 {row['up_p99_ms']:.2f} ms, down p99 {row['down_p99_ms']:.2f} ms,"
        f" lost {row['up_lost']}/{row['down_lost']}, failed {row['failed']}, leaked {row['leaked']},"
        f" server CPU {row['server_cpu_pct']:.0f}%, gen CPU {row['gen_cpu_pct']:.0f}%, gen lag p99 {row['gen_lag_p99_ms']:.1f} ms"
        + (f", steal {row['steal_pct']:.1f}%" if not math.isnan(row.get("steal_pct", math.nan)) else "")
        + (f"; first failure: {row['first_failure']}" if row["first_failure"] else "")
    )


def model_link(args: argparse.Namespace) -> str:
    """The fake model's link, for headers and titles: a table must never be mistaken for the other kind."""
    return "wss:// (TLS)" if args.tls else "ws:// (plain TCP)"


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The fake model's server-side TLS context (the defaults a client-facing server gets)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def run_all(
    args: argparse.Namespace, server_cpus: set[int] | None, tls: tuple[Path, Path] | None = None, info: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Start the fake model and every server, then run each step against each server whose ramp goes on.

    ``tls`` is (certificate, key) to serve the model on ``wss://``; what TLS
    the sessions negotiated goes into ``info``.
    """
    recorder = Recorder()
    context = tls_context(*tls) if tls is not None else None
    model = FakeModel(recorder, reply_every_s=args.reply_every, reply_ms=args.reply_ms, speed=args.model_speed, ssl_context=context)
    rows: list[dict[str, Any]] = args.rows  # (on args: an interrupted run still prints what it measured)
    servers = make_servers(args)
    args.failure = None  # why the bench stopped before its end (a server died), for main to say
    async with trio.open_nursery() as nursery:
        model_port = await nursery.start(model.run)
        with contextlib.ExitStack() as stack:
            for server in servers:
                stack.enter_context(server_process(server, model_port, server_cpus, tls[0] if tls is not None else None))
            for server in servers:
                try:
                    await wait_healthy(server)
                except (RuntimeError, trio.TooSlowError) as exc:
                    args.failure = str(exc) or f"the {server.name} server did not answer /healthz within 30 s"
                    nursery.cancel_scope.cancel()
                    return rows
            turn = 0
            for n in args.step_list:
                runs: dict[str, list[dict[str, Any]]] = {server.name: [] for server in servers}
                args.step_runs = runs  # (an interrupted step: main() still shows the runs it finished)
                for repeat in range(args.repeats):
                    # Alternate who goes first, so neither always runs on a machine the other has just warmed up.
                    for server in servers if turn % 2 == 0 else servers[::-1]:
                        if server.done:
                            continue
                        of = f" (run {repeat + 1} of {args.repeats})" if args.repeats > 1 else ""
                        log(f"step {n} calls on {server.name}{of}: ramp {max(n / args.ramp_rate, 0.5):.1f} s,"
                            f" hold {args.hold:g} s ...")
                        failure: BaseException | None = None
                        try:
                            row = await run_step(n, args, server, model, recorder)
                        except* (OSError, psutil.Error) as group:  # the server went away mid-step (its /healthz, its CPU)
                            failure = group.exceptions[0]
                        if failure is not None:
                            assert server.proc is not None
                            args.failure = (server.exited() if server.proc.poll() is not None
                                            else f"step {n} on {server.name} failed: {failure!r}; see {server.log_path}")
                            log(f"  {args.failure}")
                            server.done = True
                            continue
                        runs[server.name].append(row)
                        log(_progress(row))
                        assert server.proc is not None
                        if server.proc.poll() is not None:
                            log(f"  {server.exited()}")
                            server.done = True
                    turn += 1
                for server in servers:
                    if not runs[server.name]:
                        continue
                    row = combine(runs[server.name], args)
                    rows.append(row)
                    if len(runs[server.name]) > 1:
                        log(f"  {server.name}, median of {len(runs[server.name])} runs:" + _progress(row)[len(f"  {server.name}:"):])
                    if row["broken"] and not args.keep_going and not server.done:
                        log(f"  {server.name}: this step broke (failed calls, lost frames, leaked sessions or p99 over"
                            " --max-p99-ms): its ramp stops")
                        server.done = True
                if all(s.done for s in servers):
                    break
        nursery.cancel_scope.cancel()
    if info is not None and model.tls_version is not None:
        info["tls"] = f"{model.tls_version}, {model.tls_cipher}"
    return rows


def calls_held(rows: Sequence[dict[str, Any]]) -> str | None:
    """Issue 3's "3x the peer's calls per core", as measured here: each server's largest ok step, and the bound the grid gives.

    Both servers ran the same steps on the same CPU in this run, each ramp
    stopping at its first step that was not ok.  Ours held at least its
    largest ok step; the peer held less than its first step that was not ok
    (its ramp stops there), so ours held more than ``ours / that step``
    times the peer's calls.  None when the peer did not run, or no step of
    ours was ok.
    """
    ours = [r for r in rows if r["server"] == OURS]
    peer = [r for r in rows if r["server"] == PEER]
    ours_ok = [r["calls"] for r in ours if not r["broken"]]
    if not peer or not ours_ok:
        return None
    best = max(ours_ok)
    peer_ok = [r["calls"] for r in peer if not r["broken"]]
    peer_broke = [r["calls"] for r in peer if r["broken"]]
    held = f"calls held on one core in this run: ours {best}, the peer {max(peer_ok) if peer_ok else 'none of its steps'}"
    if not peer_broke:
        return held + " (the peer broke at no step: run larger steps to compare)"
    broke = min(peer_broke)
    return (
        f"{held}, the peer broke at {broke}: ours held more than {best / broke:.2f}x the peer's calls"
        f" ({best} / {broke}; the step grid bounds it; target 3x)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    interrupt_on_sigterm()
    gc.callbacks.append(_GC_PAUSES)
    if args.peer_skipped is not None:
        log(f"peer skipped: {args.peer_skipped}")
    fd_limit = raise_fd_limit()
    server_cpus, our_cpus = cpu_split(args.pin)
    if our_cpus is not None:
        os.sched_setaffinity(0, our_cpus)
    header = [
        ("date", utc_now()),
        ("CPU", f"{cpu_model()}, {len(os.sched_getaffinity(0)) if our_cpus is None else len(our_cpus) + 1} usable"),
        ("pinning", f"servers on CPU {sorted(server_cpus)}, generator + fake model on {sorted(our_cpus or [])}" if server_cpus else "none"),
        ("Python", sys.version.split()[0]),
        ("path", "OpenAI Realtime GA, audio/pcmu both ways (µ-law passthrough)"),
        ("model link", f"{model_link(args)}"
         + (": self-signed certificate for 127.0.0.1, trusted by both servers through SSL_CERT_FILE" if args.tls else "")),
        ("calls", f"webhook + media stream, 20 ms frames; model replies {args.reply_ms} ms every {args.reply_every:g} s"
                  + ("" if args.model_speed == 1.0 else f", each sent at {args.model_speed:g}x real time")),
        ("steps", f"{','.join(map(str, args.step_list))}; ramp {args.ramp_rate:g} calls/s, settle {args.settle:g} s,"
         f" hold {args.hold:g} s; {args.repeats} run(s) of each step per server"),
        ("peer", f"bench/_peer_sample.py (Twilio's Python sample design): {peer_versions()}" if args.peer
         else f"skipped ({args.peer_skipped or '--no-peer'})"),
        ("open files", str(fd_limit)),
        ("load avg", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]
    print_header("mediaserver load bench", header)
    info: dict[str, Any] = {}
    args.rows = []
    args.failure = None
    interrupted = False
    try:
        if args.tls:
            from tls_send import make_certificate  # cryptography, only when asked for

            with tempfile.TemporaryDirectory() as folder:
                trio.run(run_all, args, server_cpus, make_certificate(Path(folder)), info)
            args.tls_negotiated = info.get("tls", "no TLS session was opened")
        else:
            trio.run(run_all, args, server_cpus)
    except* KeyboardInterrupt:  # (from inside Trio it comes in a group; the servers were stopped on the way out)
        interrupted = True
        args.failure = "interrupted; the servers were stopped"
    rows = args.rows
    if interrupted:
        rows += interrupted_rows(getattr(args, "step_runs", {}), rows, args)
    if interrupted and not rows:
        log(f"load bench: {args.failure}")
        return 130
    if not rows and args.failure:
        log(f"load bench: {args.failure}")
        return 1
    print(table(rows, args, server_cpus is not None))
    if args.failure:
        log(f"load bench stopped early: {args.failure}")
    comparison = compare(rows)
    if comparison:
        print(peer_table(comparison, args))
        ratios = [c["ratio"] for c in comparison if c["ours_ok"] and c["peer_ok"]]
        if ratios:
            print(
                f"peer in the same run: the peer used {min(ratios):.2f}x to {max(ratios):.2f}x our CPU per call"
                f" (median {float(np.median(ratios)):.2f}x) over the {len(ratios)} step(s) both kept up with"
            )
    ours = [r for r in rows if r["server"] == OURS]
    target_rows = [r for r in ours if r["calls"] >= TARGET_CALLS]
    if target_rows:
        r = target_rows[0]
        worst = max(r["up_p99_ms"], r["down_p99_ms"])
        print(f"target p99 <= {TARGET_P99_MS:g} ms at {r['calls']} calls: {worst:.2f} ms -> {'met' if worst <= TARGET_P99_MS else 'NOT met'}")
    elif ours:
        print(f"target p99 <= {TARGET_P99_MS:g} ms at {TARGET_CALLS} calls: not measured (our last step: {ours[-1]['calls']} calls)")
    clean = [r for r in ours if not r["broken"]]
    if clean:
        best = max(clean, key=lambda r: r["calls"])
        print(
            f"largest clean step: {best['calls']} calls at {best['server_cpu_pct']:.0f}% of a core"
            f" (~{best['calls_per_core']:.0f} calls per core extrapolated; target {TARGET_PER_CORE})"
        )
    held = calls_held(rows)
    if held is not None:
        print(held)
    if args.profile is not None and args.profile.exists():
        print_profile(args.profile)
    if args.json is not None:  # (before the plot: a plot that fails must not lose the figures)
        write_json(
            args.json,
            {"header": dict(header), "quick": args.quick, "tls": args.tls, "tls_negotiated": info.get("tls"),
             "rows": rows, "comparison": comparison},
        )
        print(f"wrote {args.json}")
    if args.plot is not None and rows:
        plot(rows, args.plot, "wss://" if args.tls else "ws://")
        print(f"wrote {args.plot}")
    if interrupted:
        return 130
    return 0 if rows and not args.failure else 1


if __name__ == "__main__":
    status = 130
    try:
        status = main()
    except* KeyboardInterrupt:  # (from inside Trio it comes in a group)
        log("load bench: interrupted; the servers were stopped")
    sys.exit(status)
