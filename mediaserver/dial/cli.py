"""``mediaserver dial``: place simulated Twilio calls against a running server.

See docs/dial.md for the options, the script format and what each figure
means.  :func:`configure` declares the arguments, :func:`main` runs them
(exit status 0: every call connected and ended normally; 1: a call failed
or its recording could not be written; 2: bad options or input audio).
:func:`run` is the async body, for tests.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import trio

from mediaserver.dial import audio, report, script
from mediaserver.dial.call import CallResult, DialError, DialOptions, check_url, place_call
from mediaserver.dial.script import BargeIn, Pause, Say, Step
from mediaserver.protocol.twilio_events import is_twilio_sid
from mediaserver.security import configured_base

__all__ = ["DEFAULT_URL", "configure", "main", "run"]

DEFAULT_URL = "http://127.0.0.1:8080/twiml"  # with MEDIASERVER_PORT set (environment or .env), that port
_LEAD_MS = 500  # silence before the first words, as a caller waits for the line to open
_PROG = "mediaserver dial"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url", nargs="?", default=None,
        help="the voice webhook (default http://127.0.0.1:$MEDIASERVER_PORT/twiml: the local server's port, 8080 if unset)",
    )  # fmt: skip
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--say", metavar="TEXT", help="say this (offline TTS, needs espeakng-loader)")
    what.add_argument("--wav", metavar="FILE", help="say this WAV file (PCM 8-32 bit, mono/stereo, any common rate)")
    what.add_argument("--script", metavar="FILE", help="follow a conversation script (see docs/dial.md)")
    parser.add_argument("--barge-in-after", type=int, metavar="MS",
                        help="with --say/--wav: talk again once the agent has been speaking for MS ms")  # fmt: skip
    parser.add_argument("--duration", type=float, metavar="S", help="hang up S seconds after the stream started")
    parser.add_argument("--listen", type=float, default=3.0, metavar="S",
                        help="without --duration: keep listening S seconds after the script (default 3)")  # fmt: skip
    parser.add_argument("--calls", type=int, default=1, metavar="N", help="place N concurrent calls (default 1)")
    parser.add_argument("--record", metavar="FILE",
                        help="stereo WAV of the call, caller left, agent right (default dial-<CallSid>.wav "
                        "for a single call; with --calls the CallSid is added to the name)")  # fmt: skip
    parser.add_argument("--no-record", action="store_true", help="do not write a recording")
    parser.add_argument("--require-answer", action="store_true",
                        help="exit 1 if the agent left a caller turn unanswered (for smoke tests)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    parser.add_argument("--from", dest="from_number", default="+15550001111", help="caller number (From)")
    parser.add_argument("--to", dest="to_number", default="+15552223333", help="called number (To)")
    parser.add_argument("--auth-token", help="sign requests with this Twilio auth token (default $TWILIO_AUTH_TOKEN)")
    parser.add_argument("--public-url", metavar="URL",
                        help="the server's MEDIASERVER_PUBLIC_URL, to sign for when dialling it on this machine or "
                        "network (default $MEDIASERVER_PUBLIC_URL; '' for none)")  # fmt: skip
    parser.add_argument("--account-sid", help="the AccountSid of the calls (default $TWILIO_ACCOUNT_SID, else a random AC...)")
    parser.add_argument("--env-file",
                        help="read TWILIO_AUTH_TOKEN, TWILIO_ACCOUNT_SID and MEDIASERVER_PUBLIC_URL from this file "
                        "(default: .env, if there is one; '' for none)")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=10.0, metavar="S", help="how long to wait for the webhook's answer and for each connection (default 10)")


def main(args: argparse.Namespace) -> int:
    try:
        return trio.run(run, args)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return 130


def _fail(message: str, stderr: TextIO, status: int) -> int:
    print(f"{_PROG}: {message}", file=stderr)
    return status


def _steps(args: argparse.Namespace) -> list[Step]:
    if args.script:
        if args.barge_in_after is not None:
            raise script.ScriptError("--barge-in-after goes with --say or --wav; in a script, use a barge-in line")
        return script.load_script(args.script)
    if args.say is not None:
        words: Step = Say(args.say)
    elif args.wav is not None:
        words = script.Play(Path(args.wav))
    else:
        if args.barge_in_after is not None:
            raise script.ScriptError("--barge-in-after needs something to say (--say or --wav)")
        return []
    steps: list[Step] = [Pause(_LEAD_MS), words]
    if args.barge_in_after is not None:
        steps += [BargeIn(args.barge_in_after), words]
    return steps


def _is_utf8(text: str) -> bool:
    """False for text from bytes that are not UTF-8 (arguments and the environment keep those as lone surrogates)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _check(args: argparse.Namespace) -> str | None:
    # (Sent or spoken, so they must be text.  File names need not be: Path takes any bytes.)
    texts = {"URL": args.url, "--say": args.say, "--from": args.from_number, "--to": args.to_number,
             "--account-sid": args.account_sid}  # fmt: skip
    for name, value in texts.items():
        if value is not None and not _is_utf8(value):
            return f"{name} is not valid UTF-8 text"
    if args.url is not None:
        try:
            check_url(args.url)
        except DialError as exc:
            return str(exc)
    if args.calls < 1:
        return "--calls must be at least 1"
    for name in ("duration", "listen", "timeout"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value >= 0):
            return f"--{name} must be a non-negative number of seconds"
    if not args.timeout > 0:
        return "--timeout must be more than 0 seconds (no connection is made in no time)"
    if args.barge_in_after is not None and not 0 <= args.barge_in_after <= script.MAX_MS:
        return f"--barge-in-after must be 0 to {script.MAX_MS} ms (an hour)"
    return None


def _signing_problem(args: argparse.Namespace, auth_token: str | None, public_url: str | None) -> str | None:
    """What is wrong with the token and public URL to sign with (from the options or the environment), if anything."""
    if auth_token is not None and not _is_utf8(auth_token):
        return f"{'--auth-token' if args.auth_token else 'TWILIO_AUTH_TOKEN'} is not valid UTF-8 text"
    if public_url is None:
        return None
    name = "MEDIASERVER_PUBLIC_URL" if args.public_url is None else "--public-url"
    if not _is_utf8(public_url):
        return f"{name} is not valid UTF-8 text"
    try:
        configured_base(public_url, name)  # the server's rule for its MEDIASERVER_PUBLIC_URL
    except ValueError as exc:
        return str(exc)
    return None


def _record_problem(args: argparse.Namespace) -> str | None:
    """Why the recording could not be written, found before any call is placed (None: it can)."""
    path = _record_path(args, "CA" + "0" * 32)  # every call's file is in the same folder
    if path is None:
        return None
    shown = args.record or "dial-<CallSid>.wav"
    try:
        if path.exists():  # (the file a call writes: NAME itself, or NAME-<CallSid>.wav next to it for several)
            with open(path, "ab"):  # (changes nothing; fails on a folder or a read-only file)
                pass
        else:
            with tempfile.TemporaryFile(dir=path.parent):  # a nameless file, gone when closed
                pass
    except OSError as exc:
        return f"cannot write {shown}: {exc.strerror or exc}" + ("" if args.record else " (--no-record: no recording)")
    return None


def _record_path(args: argparse.Namespace, call_sid: str) -> Path | None:
    if args.no_record or (args.calls > 1 and not args.record):
        return None
    if not args.record:
        return Path(f"dial-{call_sid}.wav")
    path = Path(args.record)
    return path if args.calls == 1 else path.with_name(f"{path.stem}-{call_sid}{path.suffix or '.wav'}")


async def _progress(results: list[CallResult], total: int, stderr: TextIO) -> None:
    """A text progress bar on stderr, redrawn a few times a second (until cancelled).

    Not on a terminal (a CI log, a file) it is a line each time a call ends, not a redrawn one.
    """
    tty = stderr.isatty()
    shown = -1

    def draw(last: bool = False) -> None:
        nonlocal shown
        width = 30
        done = len(results)
        if not tty and done == shown and not last:
            return
        shown = done
        failed = sum(1 for r in results if r.error)
        bar = "#" * (width * done // total) + "-" * (width - width * done // total)
        line = f"[{bar}] {done}/{total} calls done, {failed} failed"
        if tty:
            print("\r" + line, end="", file=stderr, flush=True)
        else:
            print(line, file=stderr, flush=True)

    try:
        while True:
            draw()
            await trio.sleep(0.25)
    finally:
        if tty:
            draw(last=True)
            print(file=stderr, flush=True)
        elif shown != len(results):
            draw(last=True)


async def run(args: argparse.Namespace, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Place the calls and print the report; returns the exit status."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    problem = _check(args)
    if problem:
        return _fail(problem, err, 2)
    from mediaserver.config import ConfigError, load_dotenv_file

    try:
        load_dotenv_file(args.env_file)
    except ConfigError as exc:
        return _fail(str(exc), err, 2)
    if args.url is None:  # the local server, where it listens (as `mediaserver call` assumes)
        from mediaserver._urls import local_base

        port = os.environ.get("MEDIASERVER_PORT", "").strip() or "8080"
        if not (port.isdigit() and 1 <= int(port) <= 65535):
            return _fail(f"MEDIASERVER_PORT must be 1-65535, not {port!r} (or give dial the webhook URL)", err, 2)
        args.url = f"{local_base(os.environ.get('MEDIASERVER_HOST', ''), int(port))}/twiml"
    account_sid = args.account_sid or os.environ.get("TWILIO_ACCOUNT_SID") or None
    if account_sid is not None and not is_twilio_sid(account_sid, "AC"):
        return _fail(f"{account_sid!r} is not an account SID (AC followed by 32 hex digits)", err, 2)
    auth_token = args.auth_token or os.environ.get("TWILIO_AUTH_TOKEN") or None
    public_url = (os.environ.get("MEDIASERVER_PUBLIC_URL") if args.public_url is None else args.public_url) or None
    problem = _signing_problem(args, auth_token, public_url) or _record_problem(args)
    if problem:
        return _fail(problem, err, 2)
    try:
        actions = script.prepare(_steps(args))
    except (script.ScriptError, audio.AudioError) as exc:
        return _fail(str(exc), err, 2)
    options = DialOptions(
        url=args.url,
        actions=tuple(actions),
        auth_token=auth_token,
        duration_s=args.duration,
        listen_s=args.listen,
        from_number=args.from_number,
        to_number=args.to_number,
        timeout_s=args.timeout,
        public_url=public_url,
        instance_url=os.environ.get("MEDIASERVER_INSTANCE_URL") or None,
        **({"account_sid": account_sid} if account_sid else {}),
    )
    results: list[CallResult] = []

    async def one() -> None:
        results.append(await place_call(options))

    async with trio.open_nursery() as nursery:
        if args.calls > 1:
            nursery.start_soon(_progress, results, args.calls, err)
        async with trio.open_nursery() as calls:
            for _ in range(args.calls):
                calls.start_soon(one)
        nursery.cancel_scope.cancel()
    return _report(args, results, out, err)


def _report(args: argparse.Namespace, results: Sequence[CallResult], out: TextIO, err: TextIO) -> int:
    connected = [r for r in results if r.events]
    figures = {r.call_sid: report.call_figures(r.events) for r in connected}
    recordings: dict[str, str] = {}
    unwritten = 0  # recordings that could not be written (checked before the calls, but a disk can fill up)
    for r in connected:
        path = _record_path(args, r.call_sid)
        if path is not None:
            try:
                caller_side, agent_side = report.recording(r.events)
                audio.write_stereo_wav(path, audio.ulaw_to_pcm(caller_side), audio.ulaw_to_pcm(agent_side))
            except audio.AudioError as exc:
                print(f"{_PROG}: {exc}", file=err)
                unwritten += 1
            else:
                recordings[r.call_sid] = str(path)
    failed = [r for r in results if r.error or (r.call_sid in figures and figures[r.call_sid].error)]
    unanswered = {  # --require-answer: a call that connected and ended well, but left a turn unanswered
        r.call_sid: n
        for r in results
        if args.require_answer and r not in failed and r.call_sid in figures
        and (n := sum(1 for t in figures[r.call_sid].turns if t.latency_ms is None))
    }  # fmt: skip
    never = sum(1 for r in results if not r.events)
    if args.json:
        document: dict[str, Any] = {
            "calls": [
                {
                    "call_sid": r.call_sid,
                    "error": r.error,
                    "figures": figures[r.call_sid].as_dict() if r.call_sid in figures else None,
                    "recording": recordings.get(r.call_sid),
                }
                for r in results
            ],
            "summary": report.summarize(list(figures.values()), never).as_dict(),
        }
        print(json.dumps(document, indent=2), file=out)
    elif len(results) == 1 and connected:
        [r] = results
        print(report.format_call(r.call_sid, figures[r.call_sid]), file=out)
        if r.call_sid in recordings:
            print(f"  recording             {recordings[r.call_sid]} (caller left, agent right)", file=out)
    elif len(results) > 1:
        print(report.format_summary(report.summarize(list(figures.values()), never)), file=out)
    errors = list(dict.fromkeys(r.error or figures[r.call_sid].ended for r in failed))
    errors += [f"call {sid}: the agent left {n} turn(s) unanswered (--require-answer)" for sid, n in unanswered.items()]
    if len(results) == 1 and errors:
        return _fail(errors[0], err, 1)
    for error in errors[:5]:
        print(f"{_PROG}: {error}", file=err)
    return 1 if failed or unanswered or unwritten else 0
