"""A/B of the server's CPU per call between two revisions, on this machine, in interleaved runs.

Why.  On a shared or virtual machine a server's CPU per call drifts by
10-20% within minutes (measured on the 2-vCPU VM this project is developed
on: 0.18-0.22% of a core per call at 400 calls, ten minutes apart), so one
load run of each revision says nothing about a change worth a few percent.
This script runs ``bench/load.py`` on revision A and revision B in turns,
the same step each time, with the order alternating (AB, BA, AB, ...) so
that a drift favours neither, and prints every pair and the ratio B/A of
CPU per call: its median over the pairs, its range, and in how many pairs
B was the cheaper.  A median within the range of the pairs' spread is not
a result.

Usage::

    .venv/bin/python bench/ab.py HEAD~1 HEAD            # two commits
    .venv/bin/python bench/ab.py main .                 # main against the working tree (uncommitted changes)
    .venv/bin/python bench/ab.py A B --steps 300 --pairs 8 --hold 12 [--tls]

Each revision other than ``.`` is checked out in its own git worktree under
``bench/out/ab/`` and its native modules are built there with this Python
(the same packages for both); ``.`` is this checkout as it is, its native
modules built in place first.  The load runs use ``--no-peer``: the peer does
not change between revisions.  ``--json PATH`` writes every pair.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# This checkout's mediaserver, not whichever one is installed (the venv's may be another checkout's, editable)
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from _measure import Column, check_output_path, cpu_model, print_header, render_table, utc_now, write_json  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WORKTREES = ROOT / "bench" / "out" / "ab"


@dataclass(frozen=True)
class Run:
    """One load run of one revision: what the A/B compares, and what says whether to trust it."""

    side: str  # "A" or "B"
    cpu_pct_per_call: float
    up_p99_ms: float
    down_p99_ms: float
    broken: bool  # failed calls, lost frames, leaks or p99 over the limit
    gen_bound: bool  # the generator, not the server, was the limit
    wait_pct: float | None  # time the server was runnable but waited for a CPU (another process had it)


def order(pair: int) -> tuple[str, str]:
    """Which side runs first in pair ``pair`` (from 0): AB, BA, AB, ..."""
    return ("A", "B") if pair % 2 == 0 else ("B", "A")


def run_from_json(side: str, payload: Mapping[str, object], calls: int) -> Run:
    """The ``ours`` row of ``calls`` calls in a ``load.py --json`` payload."""
    rows = payload.get("rows")
    if not isinstance(rows, list):
        raise ValueError("load.py's JSON has no rows")
    for row in rows:
        if isinstance(row, dict) and row.get("server") == "ours" and row.get("calls") == calls:
            if not isinstance(row.get("cpu_pct_per_call"), (int, float)) or not row["cpu_pct_per_call"] > 0:
                raise ValueError(f"load.py measured no server CPU for {side} (a hold too short?)")
            return Run(
                side=side,
                cpu_pct_per_call=float(row["cpu_pct_per_call"]),
                up_p99_ms=_number(row.get("up_p99_ms")),
                down_p99_ms=_number(row.get("down_p99_ms")),  # (NaN, stored as null: no sample in the window)
                broken=bool(row["broken"]),
                gen_bound=bool(row["gen_bound"]),
                wait_pct=None if row.get("server_wait_pct") is None else float(row["server_wait_pct"]),
            )
    raise ValueError(f"load.py's JSON has no row for ours at {calls} calls")


def _number(value: object) -> float:
    if value in ("inf", "-inf"):  # (write_json's spelling of an infinity)
        return float(value)
    return float(value) if isinstance(value, (int, float)) else float("nan")


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: how likely a split at least this uneven is when neither side is cheaper."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)


def summarize(pairs: Sequence[tuple[Run, Run]]) -> dict[str, float | int]:
    """Ratios B/A of CPU per call over the pairs (each pair is (A, B)): median, min, max, B's wins, a sign test."""
    if not pairs:
        raise ValueError("no pairs to summarize")
    ratios = [b.cpu_pct_per_call / a.cpu_pct_per_call for a, b in pairs]
    cheaper, costlier = sum(1 for r in ratios if r < 1.0), sum(1 for r in ratios if r > 1.0)
    return {
        "pairs": len(pairs),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "b_cheaper": cheaper,
        "b_costlier": costlier,
        "sign_test_p": sign_test_p(cheaper, costlier),
        "a_cpu_median": statistics.median(a.cpu_pct_per_call for a, _ in pairs),
        "b_cpu_median": statistics.median(b.cpu_pct_per_call for _, b in pairs),
    }


def verdict(summary: Mapping[str, float | int]) -> str:
    """What the pairs say, in one line: a difference only when drift alone would rarely split them so."""
    p = float(summary["sign_test_p"])
    if p < 0.05:
        which = "cheaper" if summary["b_cheaper"] > summary["b_costlier"] else "costlier"
        return f"B is {which} than A: a split this uneven comes from drift alone with p = {p:.3f} (sign test)."
    return f"No difference told apart from drift (sign test p = {p:.2f}): add pairs, or the change is below the noise."


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def resolve(rev: str) -> str | None:
    """The commit ``rev`` names (None for ``.``); exits with one line (status 2) if it names none."""
    if rev == ".":
        return None
    try:
        return _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        print(f"ab.py: {rev!r} is not a revision of this repository", file=sys.stderr)
        raise SystemExit(2) from None


def prepare(rev: str) -> tuple[str, Path]:
    """(label, directory) for ``rev``: ``.`` is this checkout; a revision gets a built worktree of its own."""
    if rev == ".":
        # (built here too: a .so older than native/ would measure the old kernel under this label)
        print("building the native modules of the working tree ...", flush=True)
        _build(ROOT, "the working tree")
        return "working tree", ROOT
    sha = resolve(rev)
    assert sha is not None
    tree = WORKTREES / sha[:12]
    if (tree / "setup.py").exists():
        # A worktree left by an earlier run is used only as that commit, untouched: an interrupted checkout or
        # an edit there would be measured under the commit's name.
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=tree,
                               capture_output=True, text=True).stdout.strip()  # fmt: skip
        if head != sha or dirty:
            raise SystemExit(
                f"ab.py: {tree.relative_to(ROOT)} is not {rev} ({sha[:12]}) as committed"
                f"{' (it has changes)' if dirty else ''}: remove it (git worktree remove --force {tree}) and run again"
            )
    else:
        print(f"checking out {rev} ({sha[:12]}) in {tree.relative_to(ROOT)} ...", flush=True)
        WORKTREES.mkdir(parents=True, exist_ok=True)
        try:
            _git("worktree", "add", "--detach", "--force", str(tree), sha)
        except subprocess.CalledProcessError as exc:
            raise SystemExit(
                f"ab.py: cannot check out {rev} in {tree}: {exc.stderr.strip()[-500:]}\n"
                f"(a worktree left by an interrupted run? git worktree remove --force {tree}; git worktree prune)"
            ) from None
    print(f"building the native modules of {rev} ({sha[:12]}) ...", flush=True)
    _build(tree, rev)
    return f"{rev} ({sha[:12]})", tree


def prepare_both(a: str, b: str) -> tuple[tuple[str, Path], tuple[str, Path]]:
    """:func:`prepare` for A and B, both revisions known before anything is checked out or built (once if the same)."""
    resolve(a), resolve(b)
    first = prepare(a)
    return first, first if b == a else prepare(b)


def _build(tree: Path, what: str) -> None:
    proc = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=tree,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"ab.py: building the native modules of {what} failed:\n{proc.stderr[-2000:]}")


def load_run(side: str, tree: Path, args: argparse.Namespace) -> Run:
    """One ``bench/load.py`` step of ``args.steps`` calls, run from ``tree`` (so its server is the one measured)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "load.json"
        load = tree / "bench" / "load.py"
        # One run per step on both sides, so the pairs compare like with like (load.py runs 3 since 4ff29d3).
        once = ["--repeats", "1"] if "--repeats" in load.read_text(encoding="utf-8") else []
        speed = ["--model-speed", f"{args.model_speed:g}"] if args.model_speed != 1.0 else []
        cmd = [sys.executable, str(load), "--steps", str(args.steps), "--hold", str(args.hold),
               "--no-peer", "--no-plot", "--json", str(out), *once, *(["--tls"] if args.tls else []), *speed]
        proc = subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate()
        except BaseException:  # Ctrl-C or SIGTERM: load.py stops its servers on SIGTERM (a kill would orphan them)
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"ab.py: load.py failed for {side} in {tree}:\n{stdout[-2000:]}{stderr[-2000:]}")
        try:
            return run_from_json(side, json.loads(out.read_text()), args.steps)
        except ValueError as exc:
            raise SystemExit(f"ab.py: {exc}") from None


COLUMNS = [
    Column("pair", "pair"),
    Column("first", "first", align="<"),
    Column("a_cpu", "A CPU%/call", ".3f"),
    Column("b_cpu", "B CPU%/call", ".3f"),
    Column("ratio", "B/A", ".3f"),
    Column("a_p99", "A p99 up/dn ms", align="<"),
    Column("b_p99", "B p99 up/dn ms", align="<"),
    Column("flags", "flags", align="<"),
]


def pair_row(n: int, first: str, a: Run, b: Run) -> dict[str, object]:
    flags = [f"{r.side}: {what}" for r in (a, b) for what, on in (("broken", r.broken), ("gen-bound", r.gen_bound),
             (f"waited {r.wait_pct:.0f}% for a CPU", (r.wait_pct or 0) > 3)) if on]
    return {
        "pair": n,
        "first": first,
        "a_cpu": a.cpu_pct_per_call,
        "b_cpu": b.cpu_pct_per_call,
        "ratio": b.cpu_pct_per_call / a.cpu_pct_per_call,
        "a_p99": f"{a.up_p99_ms:.2f} / {a.down_p99_ms:.2f}",
        "b_p99": f"{b.up_p99_ms:.2f} / {b.down_p99_ms:.2f}",
        "flags": "; ".join(flags) or "-",
    }


def add_revision_args(parser: argparse.ArgumentParser) -> None:
    """The two revisions an A/B bench compares (this one and ``scan_ab.py``)."""
    parser.add_argument("a", help="revision A (a commit, branch or tag; '.' for this checkout as it is)")
    parser.add_argument("b", help="revision B (likewise)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_revision_args(parser)
    parser.add_argument("--steps", type=int, default=300, help="concurrent calls in every run (default 300)")
    parser.add_argument("--pairs", type=int, default=6, help="A/B pairs, order alternating (default 6)")
    parser.add_argument("--hold", type=float, default=12.0, help="seconds each run holds its calls (default 12)")
    parser.add_argument("--tls", action="store_true", help="the fake model on wss://, as real providers are")
    parser.add_argument(
        "--model-speed", type=float, default=1.0,
        help="the fake model sends replies this many times faster than real time (bench/load.py --model-speed; default 1)",
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write every pair and the summary as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.steps <= 60000 or args.pairs < 1:
        parser.error("--steps must be 1 to 60000 calls and --pairs at least 1")
    if not 1.0 <= args.model_speed <= 100.0:
        parser.error("--model-speed must be between 1 (real time) and 100 (as bench/load.py takes)")
    if not (math.isfinite(args.hold) and args.hold > 0.5):
        parser.error("--hold must be a number of seconds over 0.5 (as bench/load.py takes)")
    problem = check_output_path(args.json, "--json")
    if problem is not None:
        parser.error(problem)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    (label_a, tree_a), (label_b, tree_b) = prepare_both(args.a, args.b)
    for side, tree in (("A", tree_a), ("B", tree_b)):  # (each runs its own load.py: one without the option cannot)
        if args.model_speed != 1.0 and "--model-speed" not in (tree / "bench" / "load.py").read_text(encoding="utf-8"):
            raise SystemExit(f"ab.py: {side}'s bench/load.py has no --model-speed; compare revisions that have it")
    print_header("mediaserver A/B: CPU per call, interleaved load runs", [
        ("date", utc_now()), ("CPU", cpu_model()), ("A", label_a), ("B", label_b),
        ("runs", f"{args.pairs} pairs of bench/load.py --steps {args.steps} --hold {args.hold:g}"
                 f"{' --tls' if args.tls else ''}{f' --model-speed {args.model_speed:g}' if args.model_speed != 1.0 else ''}"
                 " --no-peer, order AB, BA, ..."),
    ])
    trees = {"A": tree_a, "B": tree_b}
    pairs: list[tuple[Run, Run]] = []
    rows: list[dict[str, object]] = []
    interrupted = False
    try:
        for n in range(args.pairs):
            first, second = order(n)
            done: dict[str, Run] = {}
            for side in (first, second):
                print(f"pair {n + 1}/{args.pairs}: {side} ...", flush=True)
                done[side] = load_run(side, trees[side], args)
            pairs.append((done["A"], done["B"]))
            rows.append(pair_row(n + 1, first, done["A"], done["B"]))
            print(f"  A {done['A'].cpu_pct_per_call:.3f}  B {done['B'].cpu_pct_per_call:.3f} %/call", flush=True)
    except KeyboardInterrupt:
        if not pairs:
            raise
        interrupted = True
        print(f"ab.py: interrupted; the {len(pairs)} whole pair(s) so far:", file=sys.stderr)
    summary = summarize(pairs)
    print()
    print(render_table(
        f"A/B at {args.steps} calls: server CPU per call (% of one core), each pair run back to back",
        COLUMNS, rows,
        notes=[
            f"B/A median {summary['ratio_median']:.3f} (range {summary['ratio_min']:.3f}-{summary['ratio_max']:.3f}); "
            f"B cheaper in {summary['b_cheaper']} of {summary['pairs']} pairs; "
            f"medians A {summary['a_cpu_median']:.3f}, B {summary['b_cpu_median']:.3f} %/call.",
            verdict(summary),
            "flags: a run that broke, was generator-bound or waited for a CPU measured something else too.",
        ],
    ))
    if args.json is not None:
        write_json(args.json, {"a": label_a, "b": label_b, "steps": args.steps, "hold": args.hold, "tls": args.tls,
                               "pairs": [{"a": asdict(a), "b": asdict(b)} for a, b in pairs], "summary": summary,
                               "interrupted": interrupted})
        print(f"wrote {args.json}")
    worktrees = [tree for tree in (tree_a, tree_b) if tree != ROOT]
    if worktrees:
        print("worktrees kept for the next run; remove them with: "
              + "; ".join(f"git worktree remove {tree.relative_to(ROOT)}" for tree in dict.fromkeys(worktrees)))
    return 130 if interrupted else 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background job, cmd &, starts with SIGINT ignored)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # (no Trio here: a plain KeyboardInterrupt is safe)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("ab.py: interrupted", file=sys.stderr)
        sys.exit(130)
