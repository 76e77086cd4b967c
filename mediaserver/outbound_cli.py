"""``mediaserver call +15551234567``: ask the running server to place an outbound call.

The CLI does not talk to Twilio itself: it POSTs ``/calls`` on the server
(``--server``, default ``http://127.0.0.1:$MEDIASERVER_PORT``) with
``MEDIASERVER_API_KEY``, because the server is what Twilio calls back when
the callee answers, and it keeps that call's greeting and instructions until
then.  Exit status: 0 placed, 1 refused or failed, 2 bad usage or settings.
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from mediaserver._urls import local_base
from mediaserver.config import ConfigError, Settings, is_http_url, load_dotenv_file
from mediaserver.twilio_rest import MAX_RING_S, MIN_RING_S
from mediaserver.tools.builtins import E164
from mediaserver.transport.http import HttpError, NoAnswer, request

__all__ = ["configure", "main", "place"]


# Longer than the server's own Twilio request (TwilioRest's 15 s), so a slow Twilio is the server's
# 502 with Twilio's word, not a timeout here that cannot say whether the call was placed.
ANSWER_TIMEOUT_S = 30.0


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("to", help="number to call, E.164 (+15551234567)")
    parser.add_argument("--from", dest="from_", metavar="NUMBER", help="caller id, E.164 (default: the server's TWILIO_FROM_NUMBER)")
    parser.add_argument("--greeting", help="what the agent says first when the callee answers")
    parser.add_argument("--instructions", help="instructions for the agent on this call")
    parser.add_argument("--ring-timeout", type=int, metavar="S", help="seconds to let it ring, 5-600 (default: Twilio's 60)")
    parser.add_argument(
        "--machine-detection", action="store_true",
        help="answering-machine detection: hang up on a machine or fax (no model session is opened for it)",
    )  # fmt: skip
    parser.add_argument("--voicemail", metavar="TEXT", help="on a machine, leave this message after the beep (implies --machine-detection)")
    parser.add_argument("--server", help="the running server's base URL (default http://127.0.0.1:$MEDIASERVER_PORT)")
    parser.add_argument("--env-file", help="read settings from this file (default: .env, if there is one; '' for none)")


def _fail(message: str, status: int = 1) -> int:
    print(f"mediaserver call: {message}", file=sys.stderr)
    return status


def main(args: argparse.Namespace) -> int:
    try:
        load_dotenv_file(args.env_file)
        # Only the API key and the port matter here: do not insist on the provider's key (the server has it).
        settings = Settings.from_env(provider="echo")
    except ConfigError as exc:
        return _fail(f"configuration error: {exc}", 2)
    if not settings.api_key:
        return _fail("MEDIASERVER_API_KEY is not set (the server's POST /calls needs it)", 2)
    if args.server is not None and not is_http_url(args.server):
        return _fail(f"--server must be the server's http:// or https:// URL, not {args.server!r}", 2)
    if not E164.match(args.to):
        return _fail(f"{args.to!r} is not an E.164 number such as +15551234567", 2)
    if args.from_ is not None and not E164.match(args.from_):
        return _fail(f"--from {args.from_!r} is not an E.164 number", 2)
    if args.ring_timeout is not None and not MIN_RING_S <= args.ring_timeout <= MAX_RING_S:
        return _fail(f"--ring-timeout must be {MIN_RING_S}-{MAX_RING_S} seconds, not {args.ring_timeout}", 2)
    if args.voicemail is not None and not args.voicemail.strip():
        return _fail("--voicemail must not be empty", 2)
    return trio.run(place, args, settings)


async def place(args: argparse.Namespace, settings: Settings) -> int:
    """POST /calls on the server; print the call SID (exit 0) or why it failed (exit 1)."""
    assert settings.api_key is not None
    server = (args.server or local_base(settings.host, settings.port)).rstrip("/")
    body: dict[str, str | int | bool] = {"to": args.to}
    for key, value in (("from", args.from_), ("greeting", args.greeting), ("instructions", args.instructions),
                       ("voicemail", args.voicemail), ("ring_timeout_s", args.ring_timeout)):  # fmt: skip
        if value is not None:
            body[key] = value
    if args.machine_detection:
        body["machine_detection"] = True
    headers = [("Authorization", f"Bearer {settings.api_key}"), ("Content-Type", "application/json")]
    try:
        response = await request(
            "POST", server + "/calls", headers=headers, body=json.dumps(body, ensure_ascii=False).encode(),
            timeout_s=ANSWER_TIMEOUT_S,
        )  # fmt: skip
        status, raw = response.status, response.body
    except NoAnswer as exc:  # the server took the request: Twilio may have been asked
        return _fail(f"{exc}: the call may have been placed; see the server's log and `mediaserver calls`")
    except HttpError as exc:
        return _fail(f"{exc}; is `mediaserver serve` running at {server}?")
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        return _fail(f"unexpected answer from {server}/calls: HTTP {status} {raw[:120]!r}")
    if status == 201:
        print(f"call {answer.get('call_sid')} to {answer.get('to')} from {answer.get('from')}: {answer.get('status')}")
        if answer.get("warning"):
            print(f"mediaserver call: warning: {answer['warning']}", file=sys.stderr)
        return 0
    error = answer.get("error", f"HTTP {status}")
    if status == 401:
        return _fail(f"the server refused the API key: {error}")
    if status == 404:
        return _fail(f"{server} does not place outbound calls: {error}")
    if status == 400:  # (what the server checks of the request and this command cannot: bad usage, as its own checks)
        return _fail(str(error), 2)
    return _fail(str(error))
