"""A/B of the native message scanners of two revisions, loaded side by side in one process.

Why.  A change to a scanner (``native/_twilio.pyx``, ``native/_realtime.pyx``,
``native/jsonscan.pxd``, ``native/b64.h``) is worth a few percent of the
server's CPU at most, below what ``bench/ab.py``'s load runs can tell apart
on a shared machine.  Here both revisions' modules are loaded into one
process and timed in alternating rounds on the same messages, so a drift of
the machine's speed favours neither.

What.  Per round and revision: every message of a set through
``MediaCursor.take`` (a Twilio ``media`` message, 20 ms of µ-law, as the
bridge's uplink takes it), ``parse_mark`` (Twilio's echo of a ``mark``) and
``parse_audio_delta`` (an OpenAI ``response.output_audio.delta`` of 40 ms,
the bridge's chunk, and of 200 ms), in ns per message.  The table shows
each revision's median over the rounds, B/A of the medians, and in how many
rounds B was the faster, with a sign test.  ``json.loads`` of the same
messages, timed in the same rounds, is there for scale (what the ordinary
parser starts with).

Usage::

    .venv/bin/python bench/scan_ab.py HEAD~1 HEAD [--rounds 30] [--messages 2000] [--json PATH]

Revisions are checked out and built as ``bench/ab.py`` does (worktrees under
``bench/out/ab/``; ``.`` is this checkout, built in place first).
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import json
import random
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ab  # noqa: E402
from _measure import check_output_path, write_json  # noqa: E402

STREAM_SID = "MZ" + "0123456789abcdef" * 2


def load(tree: Path, name: str) -> ModuleType:
    """``mediaserver._native.<name>`` as built in ``tree``, loaded under its own name (two revisions side by side)."""
    found = sorted((tree / "mediaserver" / "_native").glob(f"{name}.*.so"))
    if not found:
        raise SystemExit(f"scan_ab.py: no built {name} in {tree} (did its build fail?)")
    spec = importlib.util.spec_from_file_location(f"mediaserver._native.{name}", found[0])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def messages(count: int, seed: int = 1) -> dict[str, list[str]]:
    """The message sets, as Twilio and OpenAI send them (random audio, so base64 of every byte value)."""
    rnd = random.Random(seed)

    def b64(size: int) -> str:
        return base64.b64encode(rnd.randbytes(size)).decode()

    media = [
        json.dumps({
            "event": "media", "sequenceNumber": str(n + 2), "streamSid": STREAM_SID,
            "media": {"track": "inbound", "chunk": str(n + 1), "timestamp": str(20 * n), "payload": b64(160)},
        })
        for n in range(count)
    ]  # fmt: skip
    marks = [
        json.dumps({"event": "mark", "sequenceNumber": str(n + 2), "streamSid": STREAM_SID, "mark": {"name": str(n + 1)}})
        for n in range(count)
    ]

    def delta(n: int, size: int) -> str:
        return json.dumps({
            "type": "response.output_audio.delta", "event_id": f"event_{n}", "response_id": "resp_1",
            "item_id": "item_1", "output_index": 0, "content_index": 0, "delta": b64(size),
        })  # fmt: skip

    return {
        "media": media,
        "mark": marks,
        "delta 40 ms": [delta(n, 320) for n in range(count)],
        "delta 200 ms": [delta(n, 1600) for n in range(count)],
    }


def timers(twilio: ModuleType, realtime: ModuleType, sets: dict[str, list[str]]) -> dict[str, Callable[[], float]]:
    """One function per message set: ns per message through one revision's scanner (checked to take every one)."""

    def take() -> float:
        cursor = twilio.MediaCursor()
        cursor.stream_sid = STREAM_SID
        cursor.next_sequence = 2
        fn, texts, taken = cursor.take, sets["media"], 0
        start = time.perf_counter_ns()
        for text in texts:
            taken += fn(text, 1 << 20) is not None
        elapsed = time.perf_counter_ns() - start
        return _checked(elapsed, taken, texts, "MediaCursor.take")

    def per(fn: Callable[[str], object], key: str, what: str) -> Callable[[], float]:
        def timed() -> float:
            texts, taken = sets[key], 0
            start = time.perf_counter_ns()
            for text in texts:
                taken += fn(text) is not None
            return _checked(time.perf_counter_ns() - start, taken, texts, what)

        return timed

    return {
        "media": take,
        "mark": per(twilio.parse_mark, "mark", "parse_mark"),
        "delta 40 ms": per(realtime.parse_audio_delta, "delta 40 ms", "parse_audio_delta"),
        "delta 200 ms": per(realtime.parse_audio_delta, "delta 200 ms", "parse_audio_delta"),
    }


def _checked(elapsed_ns: int, taken: int, texts: Sequence[str], what: str) -> float:
    if taken != len(texts):  # (a scanner that declines the plain shape would be timed doing nothing)
        raise SystemExit(f"scan_ab.py: {what} took {taken} of {len(texts)} plain messages")
    return elapsed_ns / len(texts)


def json_timer(texts: Sequence[str]) -> Callable[[], float]:
    def timed() -> float:
        loads = json.loads
        start = time.perf_counter_ns()
        for text in texts:
            loads(text)
        return (time.perf_counter_ns() - start) / len(texts)

    return timed


def measure(a: dict[str, Callable[[], float]], b: dict[str, Callable[[], float]], refs: dict[str, Callable[[], float]],
            rounds: int, progress: Callable[[int], None] = lambda n: None) -> dict[str, dict[str, list[float]]]:  # fmt: skip
    """Each set's ns per message, per round, for A, B and json.loads; A and B alternate which goes first."""
    times: dict[str, dict[str, list[float]]] = {key: {"A": [], "B": [], "json": []} for key in a}
    for key in a:  # (one untimed warm-up round each)
        a[key](), b[key](), refs[key]()
    for n in range(rounds):
        for key in a:
            for side in ("A", "B") if n % 2 == 0 else ("B", "A"):
                times[key][side].append((a if side == "A" else b)[key]())
            times[key]["json"].append(refs[key]())
        progress(n + 1)
    return times


def summary(times: dict[str, dict[str, list[float]]]) -> list[dict[str, object]]:
    rows = []
    for key, sides in times.items():
        a_med, b_med = statistics.median(sides["A"]), statistics.median(sides["B"])
        faster = sum(b < a for a, b in zip(sides["A"], sides["B"]))
        slower = sum(b > a for a, b in zip(sides["A"], sides["B"]))
        rows.append({
            "messages": key, "a_ns": round(a_med), "b_ns": round(b_med), "ratio": round(b_med / a_med, 3),
            "b_faster": faster, "rounds": len(sides["A"]), "sign_test_p": round(ab.sign_test_p(faster, slower), 4),
            "json_loads_ns": round(statistics.median(sides["json"])),
        })  # fmt: skip
    return rows


def table(rows: list[dict[str, object]], label_a: str, label_b: str) -> str:
    lines = [
        f"  A  {label_a}",
        f"  B  {label_b}",
        "",
        "messages       A ns/msg  B ns/msg    B/A  B faster  sign test p  json.loads ns/msg",
        "------------  --------  --------  -----  --------  -----------  -----------------",
    ]
    for r in rows:
        lines.append(
            f"{r['messages']:<12}  {r['a_ns']:>8}  {r['b_ns']:>8}  {r['ratio']:>5.3f}  "
            f"{str(r['b_faster']) + '/' + str(r['rounds']):>8}  {r['sign_test_p']:>11.4f}  {r['json_loads_ns']:>17}"
        )
    lines += [
        "",
        "  ns/msg: median over the rounds of the mean time per message (one round: every message of the set once).",
        "  B faster: rounds in which B's time was below A's; sign test p: that a speed drift alone gave such a split.",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ab.add_revision_args(parser)
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds, order alternating (default 30)")
    parser.add_argument("--messages", type=int, default=2000, help="messages per set (default 2000)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.messages < 1:
        parser.error("--rounds and --messages must be at least 1")
    problem = check_output_path(args.json, "--json")
    if problem is not None:
        parser.error(problem)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    (label_a, tree_a), (label_b, tree_b) = ab.prepare_both(args.a, args.b)
    sets = messages(args.messages)
    side_a = timers(load(tree_a, "_twilio"), load(tree_a, "_realtime"), sets)
    side_b = timers(load(tree_b, "_twilio"), load(tree_b, "_realtime"), sets)
    refs = {key: json_timer(texts) for key, texts in sets.items()}
    print(f"mediaserver scanner A/B: {args.rounds} rounds of {args.messages} messages per set", flush=True)

    def progress(n: int) -> None:
        if n % 10 == 0 or n == args.rounds:
            print(f"  round {n}/{args.rounds}", file=sys.stderr, flush=True)

    rows = summary(measure(side_a, side_b, refs, args.rounds, progress))
    print(table(rows, label_a, label_b), flush=True)
    if args.json:
        write_json(args.json, {"a": label_a, "b": label_b, "rounds": args.rounds, "messages": args.messages, "rows": rows})
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background job, cmd &, starts with SIGINT ignored)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("scan_ab.py: interrupted", file=sys.stderr)
        sys.exit(130)
