"""Soak bench: the same number of calls started and ended round after round -- does anything grow?

Run ``.venv/bin/python bench/soak.py`` (``--calls 100 --rounds 10 --hold 3``
by default: 1 000 calls in about two minutes).  Each round is one step of the
load bench (``bench/load.py``: webhook, Media Stream with 20 ms frames both
ways, mark echoes, model replies from the fake OpenAI Realtime model, then
``stop``), against our server started once for the whole soak.  After each
round, once the server reports no live or pending call, it samples the
server process: resident memory (RSS), open file descriptors and threads,
and the model sessions still open at the fake model (each one would bill).

Printed: a row per round, then the growth over the rounds after the first
two (warm-up: the allocator's arenas, caches, the first full collections):
RSS per 1 000 calls by least squares, and descriptors, threads and open
sessions from the first of those rounds to the last.  A leak of one socket,
one session or a few KiB per call shows as a trend here long before it
shows in a single load step.  Latencies are not the point: ``bench/load.py``
measures those (this prints the p99 only to show the rounds were healthy).

Options: ``--calls``, ``--rounds``, ``--hold``, ``--no-pin``, ``--json PATH``.
Ctrl-C stops it (and the server it started) and prints the rounds so far.
Nothing beyond loopback is touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# This checkout's mediaserver, not whichever one is installed (the venv's may be another checkout's, editable)
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import trio  # noqa: E402

import load  # noqa: E402
from _loadgen import FakeModel, Recorder  # noqa: E402
from _measure import (  # noqa: E402
    Column,
    check_output_path,
    interrupt_on_sigterm,
    print_header,
    render_table,
    utc_now,
    write_json,
)

WARM_UP_ROUNDS = 2  # left out of the trend: the allocator and the caches settle in these


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(this bench's options, the load bench's arguments for one step of ``--calls`` calls)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=100, help="concurrent calls in each round (default 100)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds (default 10; the first 2 are warm-up)")
    parser.add_argument("--hold", type=float, default=3.0, help="seconds each round holds its calls (default 3)")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin the server and the generator to CPUs")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows and the trend as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.calls <= 5000:
        parser.error("--calls must be between 1 and 5000")
    if not args.hold > 0.5 or args.hold == float("inf"):
        parser.error("--hold must exceed 0.5 s (and be finite)")
    if not WARM_UP_ROUNDS + 2 <= args.rounds <= 1000:
        parser.error(f"--rounds must be between {WARM_UP_ROUNDS + 2} and 1000 (the first {WARM_UP_ROUNDS} are warm-up)")
    problem = check_output_path(args.json, "--json")
    if problem is not None:
        parser.error(problem)
    step = ["--no-peer", "--steps", str(args.calls), "--hold", str(args.hold), "--repeats", "1", "--no-plot", "--keep-going"]
    if not args.pin:
        step.append("--no-pin")
    return args, load.parse_args(step)


async def sample(server: load.Server) -> dict[str, Any]:
    """The server process now, and its own counts (/healthz; /metrics for the model sessions it has open)."""
    ps = server.ps
    process = {"rss_mib": ps.memory_info().rss / 2**20, "fds": ps.num_fds(), "threads": ps.num_threads()}  # (first:
    # the requests below are connections of their own)
    status, text = await load.http_get(server.port, "/healthz")
    health = json.loads(text) if status == 200 else {}
    status, text = await load.http_get(server.port, "/metrics")
    sessions_open = next(
        (float(line.split()[-1]) for line in text.splitlines() if line.startswith("mediaserver_model_sessions_open ")),
        float("nan"),
    ) if status == 200 else float("nan")
    return {
        **process,
        "active_after": health.get("active_calls"),
        "pending_after": health.get("pending_calls"),
        "server_sessions_open": sessions_open,
    }


async def soak(args: argparse.Namespace, load_args: argparse.Namespace, server_cpus: set[int] | None,
               rows: list[dict[str, Any]]) -> str | None:
    """Run the rounds, appending a row per round to ``rows``; returns why it stopped early (None: it did not)."""
    recorder = Recorder()
    model = FakeModel(recorder, reply_every_s=load_args.reply_every, reply_ms=load_args.reply_ms, speed=load_args.model_speed)
    [server] = load.make_servers(load_args)
    async with trio.open_nursery() as nursery:
        model_port = await nursery.start(model.run)
        with load.server_process(server, model_port, server_cpus):
            try:
                await load.wait_healthy(server)
            except (RuntimeError, trio.TooSlowError) as exc:
                nursery.cancel_scope.cancel()
                return str(exc) or "the server did not answer /healthz within 30 s"
            before = await sample(server)
            load.log(f"started: RSS {before['rss_mib']:.0f} MiB, {before['fds']} descriptors, {before['threads']} threads")
            for number in range(1, args.rounds + 1):
                step = await load.run_step(args.calls, load_args, server, model, recorder)
                after = await sample(server)
                row = {
                    "round": number,
                    "calls_so_far": number * args.calls,
                    **after,
                    "model_sessions_open": model.open_sessions,
                    "model_errors": len(step["model_errors"]),  # (sessions the fake itself ended: none expected)
                    "failed": step["failed"],
                    "lost": step["up_lost"] + step["down_lost"],
                    "leaked": step["leaked"],
                    "p99_ms": max(step["up_p99_ms"], step["down_p99_ms"]),
                }
                rows.append(row)
                load.log(
                    f"  round {number}: RSS {row['rss_mib']:.1f} MiB, {row['fds']} fds, {row['threads']} threads,"
                    f" model sessions open {row['model_sessions_open']}, failed {row['failed']}, lost {row['lost']}"
                )
                assert server.proc is not None
                if server.proc.poll() is not None:
                    nursery.cancel_scope.cancel()
                    return server.exited()
        nursery.cancel_scope.cancel()
    return None


def trend(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Growth over the rounds after the warm-up: RSS per 1 000 calls (least squares), the rest first -> last."""
    settled = rows[WARM_UP_ROUNDS:]
    if len(settled) < 2:
        return {}
    calls = np.array([r["calls_so_far"] for r in settled], dtype=float)
    rss = np.array([r["rss_mib"] for r in settled], dtype=float)
    slope = float(np.polyfit(calls, rss, 1)[0]) * 1000
    first, last = settled[0], settled[-1]
    return {
        "rounds": len(settled),
        "calls": int(calls[-1] - calls[0]),
        "rss_mib_per_1000_calls": slope,
        "rss_first_mib": first["rss_mib"],
        "rss_last_mib": last["rss_mib"],
        "fds_first": first["fds"],
        "fds_last": last["fds"],
        "threads_first": first["threads"],
        "threads_last": last["threads"],
        "model_sessions_open_last": last["model_sessions_open"],
        "server_sessions_open_last": last["server_sessions_open"],
        "failed": sum(r["failed"] for r in rows),
        "model_errors": sum(r["model_errors"] for r in rows),
        "undrained_rounds": sum(1 for r in rows if r["active_after"] != 0 or r["pending_after"] != 0),
        "lost": sum(r["lost"] for r in rows),
        "leaked": sum(r["leaked"] for r in rows),
    }


COLUMNS = [
    Column("round", "round", "d"),
    Column("calls_so_far", "calls so far", "d"),
    Column("rss_mib", "RSS MiB", ".1f"),
    Column("fds", "fds", "d"),
    Column("threads", "threads", "d"),
    Column("active_after", "calls left", "d"),
    Column("model_sessions_open", "model sessions open", "d"),
    Column("server_sessions_open", "server's gauge", ".0f"),
    Column("failed", "failed calls", "d"),
    Column("lost", "lost frames", "d"),
    Column("p99_ms", "p99 ms", ".2f"),
]


def main(argv: Sequence[str] | None = None) -> int:
    args, load_args = parse_args(argv)
    interrupt_on_sigterm()
    fd_limit = load.raise_fd_limit()
    server_cpus, our_cpus = load.cpu_split(load_args.pin)
    if our_cpus is not None:
        os.sched_setaffinity(0, our_cpus)
    header = [
        ("date", utc_now()),
        ("Python", sys.version.split()[0]),
        ("server", "ours: python -m mediaserver serve --provider openai (a fake GA Realtime model on loopback)"),
        ("rounds", f"{args.rounds} of {args.calls} calls, hold {args.hold:g} s; the first {WARM_UP_ROUNDS} are warm-up"),
        ("pinning", f"server on CPU {sorted(server_cpus)}" if server_cpus else "none"),
        ("open files", str(fd_limit)),
    ]
    print_header("mediaserver soak bench", header)
    rows: list[dict[str, Any]] = []
    failure: str | None = None
    interrupted = False
    try:
        failure = trio.run(soak, args, load_args, server_cpus, rows)
    except* KeyboardInterrupt:
        interrupted, failure = True, "interrupted; the server was stopped"
    if not rows:
        load.log(f"soak bench: {failure or 'no round ran'}")
        return 130 if interrupted else 1
    print(render_table("rounds (sampled once the server reported no live call)", COLUMNS, rows, []))
    summary = trend(rows)
    if summary:
        print(
            f"after the warm-up ({summary['rounds']} rounds, {summary['calls']} calls):"
            f" RSS {summary['rss_first_mib']:.1f} -> {summary['rss_last_mib']:.1f} MiB"
            f" ({summary['rss_mib_per_1000_calls']:+.2f} MiB per 1000 calls, least squares);"
            f" fds {summary['fds_first']} -> {summary['fds_last']}; threads {summary['threads_first']} -> {summary['threads_last']};"
            f" model sessions open at the end {summary['model_sessions_open_last']}"
            f" (the server's gauge: {summary['server_sessions_open_last']:.0f});"
            f" failed calls {summary['failed']}, lost frames {summary['lost']}, leaked sessions {summary['leaked']},"
            f" model-side errors {summary['model_errors']}, rounds not drained {summary['undrained_rounds']}"
        )
    else:
        print(f"too few rounds after the warm-up for a trend ({len(rows)} ran)")
    if failure:
        load.log(f"soak bench stopped early: {failure}")
    if args.json is not None:
        write_json(args.json, {"header": dict(header), "rows": rows, "trend": summary})
        print(f"wrote {args.json}")
    if interrupted:
        return 130
    unclean = [r["round"] for r in rows if r["failed"] or r["lost"] or r["leaked"] or r["model_errors"]
               or r["model_sessions_open"] or r["server_sessions_open"] or r["active_after"] or r["pending_after"]]
    if unclean:
        print(f"NOT clean: rounds {unclean} failed a call, lost a frame, left a session or a call open, or the model"
              " saw an error (see --json for the details)")
    return 0 if not failure and not unclean else 1


if __name__ == "__main__":
    sys.exit(main())
