"""Outbound calls: ``POST /calls`` places one, ``POST /outbound-twiml`` connects it.

1. ``POST /calls`` (JSON ``{"to", "from"?, "greeting"?, "instructions"?, "ring_timeout_s"?, "machine_detection"?, "voicemail"?}``,
   ``Authorization: Bearer $MEDIASERVER_API_KEY``) keeps the call's greeting
   and instructions here under a random one-time id and asks Twilio's REST
   API to dial ``to`` with ``Url=<public>/outbound-twiml?outbound=<id>`` and
   status callbacks to ``/call-status``.  It answers ``201`` with the call's
   SID.  Errors are JSON ``{"error": ...}``: 401 (bad or missing key), 400
   (bad body), 404 (route disabled: no ``MEDIASERVER_API_KEY``), 503 (no
   Twilio credentials), 502 (Twilio refused; its code and message included).
2. When the callee answers, Twilio POSTs ``/outbound-twiml`` (signed like
   ``/twiml``).  The id is redeemed -- once -- and the call's session is
   pre-opened with its own :class:`~mediaserver.bridge.link.AgentOptions`,
   so the agent speaks first with the greeting; the answer is the same
   ``<Connect><Stream>`` TwiML as for an inbound call.

Only the id travels in the URL; the greeting and instructions never leave
the server.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import RequestEntityTooLarge, RequestTimeout

from mediaserver import security, twiml
from mediaserver.bridge.link import AgentOptions
from mediaserver.bridge.registry import TOKEN_PARAMETER, CallManager
from mediaserver.config import Settings
from mediaserver.logs import shown
from mediaserver.protocol import twilio_events as tw
from mediaserver.tools.builtins import E164
from mediaserver.twilio_rest import MAX_RING_S, MIN_RING_S, TwilioRest, TwilioRestError

__all__ = ["OUTBOUND_PARAMETER", "Machine", "OutboundRequests", "register_routes"]

log = logging.getLogger("mediaserver.outbound")

OUTBOUND_PARAMETER = "outbound"  # query parameter of the answer URL carrying the one-time id
PENDING_TTL_S = 15 * 60.0  # Twilio rings for at most 600 s (Calls.json Timeout); then some slack (queued: see status())
# How long a call placed here may still be answered, so that a draining server waits for it (and it holds its
# place under MEDIASERVER_MAX_CALLS): Twilio's 60 s default ring (or the call's ring_timeout_s), 30 s more for
# answering-machine detection (Twilio's MachineDetectionTimeout) when asked, and some slack.
DEFAULT_RING_S = 60.0
AMD_S = 30.0
RING_SLACK_S = 15.0
RINGING_S = DEFAULT_RING_S + RING_SLACK_S  # a call placed with neither
MAX_PENDING = 1000
RETRY_WINDOW_S = 60.0  # an answered call's id stays redeemable by that call this long (Twilio's retries of its webhook)
MAX_GREETING_CHARS = 1000  # (and a voicemail's)
MAX_INSTRUCTIONS_CHARS = 20_000
# The largest body POST /calls takes: the instructions and greeting at their limits, in JSON's \uXXXX escapes
# (6 bytes a character; 12 for one outside the BMP, which counts as one character), with room for the rest.
MAX_CALLS_BODY_BYTES = 256 * 1024
TWILIO_API_BASE = "https://api.twilio.com"  # TWILIO_API_BASE's default: the real Twilio, which calls back over the Internet


@dataclass(frozen=True, slots=True)
class _Pending:
    to: str
    agent: AgentOptions
    expires_s: float
    answered_by: str | None = None  # the call SID whose answer webhook redeemed it
    placed_s: float = 0.0  # when it was placed, or when Twilio last said it started ringing (see status())
    call_sid: str | None = None  # Twilio's SID for it, once the REST request has answered
    machine: Machine | None = None  # what to do when a machine answers (None: no answering-machine detection)
    ringing_s: float = RINGING_S  # how long after placed_s it may still be answered


@dataclass(frozen=True, slots=True)
class Machine:
    """Answering-machine detection for one outbound call: hang up on a machine, or leave ``voicemail`` after its
    beep (Twilio's ``<Say>``: no model session is opened for a machine either way)."""

    voicemail: str | None = None

    @property
    def twilio_mode(self) -> str:
        """``MachineDetection``: ``DetectMessageEnd`` waits for the greeting's end (the beep) to leave a message;
        ``Enable`` answers as soon as it knows (a person waits less)."""
        return "DetectMessageEnd" if self.voicemail is not None else "Enable"

    def answer(self, answered_by: str) -> str | None:
        """The TwiML for a call Twilio says ``answered_by`` (its ``AnsweredBy``); None: a person (or ``unknown``),
        who gets the agent."""
        if answered_by == "fax" or (answered_by.startswith("machine_") and self.voicemail is None):
            return twiml.hangup()
        if answered_by.startswith("machine_"):
            assert self.voicemail is not None
            return twiml.say_and_hangup(self.voicemail)
        return None


class OutboundRequests:
    """Agent options of outbound calls not answered yet, under one-time ids."""

    def __init__(self, ttl_s: float = PENDING_TTL_S, max_entries: int = MAX_PENDING) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, _Pending] = {}
        self._ended: dict[str, None] = {}  # call SIDs whose final status came lately, oldest first

    def __len__(self) -> int:
        return len(self._entries)

    def put(
        self, to: str, agent: AgentOptions, machine: Machine | None = None, ring_s: float | None = None
    ) -> str | None:
        """Keep ``agent`` for a call to ``to``; returns its id (None when full: ``max_entries`` calls not answered yet).

        ``ring_s``: the call's ring timeout (None: Twilio's default).
        """
        now = trio.current_time()
        self._entries = {k: v for k, v in self._entries.items() if v.expires_s > now}
        if sum(1 for entry in self._entries.values() if entry.answered_by is None) >= self.max_entries:
            return None
        key = secrets.token_urlsafe(18)
        ringing_s = (DEFAULT_RING_S if ring_s is None else ring_s) + (AMD_S if machine is not None else 0.0) + RING_SLACK_S
        self._entries[key] = _Pending(to, agent, now + self.ttl_s, placed_s=now, machine=machine, ringing_s=ringing_s)
        return key

    def machine(self, key: str) -> Machine | None:
        """The answering-machine handling ``key``'s call was placed with (None: none, or no such id)."""
        entry = self._entries.get(key)
        return None if entry is None else entry.machine

    def take(self, key: str, to: str | None, call_sid: str) -> AgentOptions | None:
        """Redeem ``key`` for ``call_sid``; None if unknown, expired, for another number than ``to``, or redeemed by
        another call.  The same call may redeem it again until it expires: Twilio may retry the answer webhook, and
        the retry's answer is the one Twilio follows (the call manager gives it the same session)."""
        entry = self._entries.get(key)
        if entry is None or entry.expires_s <= trio.current_time():
            self._entries.pop(key, None)
            return None
        if (to is not None and to != entry.to) or entry.answered_by not in (None, call_sid):
            return None
        if entry.answered_by is None:  # (answered: kept only for the retry window, and no longer counted as waiting)
            expires_s = min(entry.expires_s, trio.current_time() + RETRY_WINDOW_S)
            self._entries[key] = replace(entry, answered_by=call_sid, expires_s=expires_s)
        return entry.agent

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)

    def placed(self, key: str, call_sid: str) -> None:
        """Twilio placed ``key``'s call as ``call_sid`` (its status callbacks name it).

        A final status callback may come before the REST request's answer (a number that fails at once): then
        the call is over already, and its entry goes.
        """
        entry = self._entries.get(key)
        if entry is None or not call_sid:
            return
        if call_sid in self._ended:
            del self._entries[key]
        else:
            self._entries[key] = replace(entry, call_sid=call_sid)

    def status(self, call_sid: str, status: str) -> None:
        """Twilio's status callback for a call placed here and not answered yet.

        ``initiated`` / ``ringing``: it starts to ring only now (Twilio queues outbound calls at the account's
        calls per second), so its ring time counts from now.  ``busy``, ``no-answer``, ``failed``, ``canceled``,
        ``completed``: it will not be answered, and stops holding a place (drain, ``MEDIASERVER_MAX_CALLS``).
        """
        final = status in tw.CALL_FINAL_STATUSES
        if final and call_sid:
            self._ended[call_sid] = None  # (for placed(), if the REST answer has not come yet)
            while len(self._ended) > self.max_entries:
                del self._ended[next(iter(self._ended))]
        for key, entry in self._entries.items():
            if entry.call_sid != call_sid or entry.answered_by is not None:
                continue
            if status in ("initiated", "ringing"):
                now = trio.current_time()
                # (its id stays redeemable for as long as it may ring from now, queued however long first)
                expires_s = max(entry.expires_s, now + entry.ringing_s + RETRY_WINDOW_S)
                self._entries[key] = replace(entry, placed_s=max(entry.placed_s, now), expires_s=expires_s)
            elif final:
                del self._entries[key]
            return

    def waiting(self) -> int:
        """Calls placed here that may still be answered (within their ring timeout, and answering-machine detection,
        and some slack: ``RINGING_S`` for a call placed with neither) and are not yet: a draining server waits for
        them, and they hold their place under ``MEDIASERVER_MAX_CALLS`` (an older one has stopped ringing -- no
        answer, busy, failed)."""
        now = trio.current_time()
        return sum(
            1 for entry in self._entries.values()
            if entry.answered_by is None and entry.expires_s > now and now - entry.placed_s < entry.ringing_s
        )  # fmt: skip


# (its answer URL is this instance's, and this instance is going away)
SHUTTING_DOWN = "the server is shutting down; place the call on another instance"


def _json_error(status: int, message: str, **extra: Any) -> tuple[dict[str, Any], int]:
    return {"error": message, **extra}, status


def _text(body: dict[str, Any], key: str, limit: int) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"'{key}' must be a non-empty string")
    if len(value) > limit:
        raise ValueError(f"'{key}' is {len(value)} characters; the limit is {limit}")
    try:
        value.encode()
    except UnicodeEncodeError as exc:  # (a lone surrogate: "\ud83d" without its pair, which JSON lets through)
        raise ValueError(f"'{key}' is not valid Unicode text (character {exc.start}: a lone surrogate)") from None
    return value.strip()


def register_routes(
    app: QuartTrio, settings: Settings, calls: CallManager, signed_form: Callable[[], Awaitable[dict[str, list[str]]]]
) -> OutboundRequests:
    """Add ``POST /calls`` and ``POST /outbound-twiml`` to ``app``; returns the pending map.

    ``signed_form()`` is the app's for every Twilio webhook: the request's
    form, each field's values, once its signature is checked (if
    ``TWILIO_AUTH_TOKEN`` is set; it aborts with 400 or 403 otherwise).
    """
    pending = OutboundRequests()
    calls.outbound_waiting = pending.waiting  # (a draining server still answers the calls it placed)
    rest = TwilioRest.from_settings(settings)

    def public(path: str, query: str | bytes = b"", configured: str | None = settings.call_url) -> str:
        """The URL Twilio reaches ``path`` at; by default this instance's (MEDIASERVER_INSTANCE_URL), where the call's state is."""
        return security.public_url(
            path,
            configured=configured,
            scheme=request.scheme,
            host=request.host,
            headers=request.headers,
            query=query,
        )

    @app.post("/calls")
    async def place_call() -> tuple[dict[str, Any], int] | Response:
        if not settings.api_key:
            return _json_error(404, "outbound calls are disabled: set MEDIASERVER_API_KEY on the server")
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
            answer, status = _json_error(401, "missing or wrong API key (Authorization: Bearer $MEDIASERVER_API_KEY)")
            return Response(
                json.dumps(answer), status, {"WWW-Authenticate": "Bearer"}, content_type="application/json"
            )
        if not calls.accepting:  # (its answer URL is this instance's, and this instance is going away)
            return _json_error(503, SHUTTING_DOWN)
        try:
            raw = await request.get_data()
        except RequestEntityTooLarge:
            return _json_error(413, f"the request body is over {MAX_CALLS_BODY_BYTES // 1024} KiB")
        except RequestTimeout:
            return _json_error(408, "the request body did not arrive in time")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # (not JSON, not UTF-8, or nested deeper than Python recurses)
            body = None
        if not isinstance(body, dict):
            return _json_error(400, "the body must be a JSON object: {\"to\": \"+15551234567\", ...}")
        unknown = sorted(set(body) - {"to", "from", "greeting", "instructions", "ring_timeout_s", "machine_detection",
                                      "voicemail"})  # fmt: skip
        if unknown:
            return _json_error(400, f"unknown field(s): {', '.join(unknown)}")
        to = body.get("to")
        from_ = body.get("from") if body.get("from") is not None else settings.twilio_from_number
        if not isinstance(to, str) or not E164.match(to):
            return _json_error(400, "'to' must be an E.164 number such as +15551234567")
        if from_ is None:
            return _json_error(400, "'from' is needed (or set TWILIO_FROM_NUMBER on the server)")
        if not isinstance(from_, str) or not E164.match(from_):
            return _json_error(400, "'from' must be an E.164 number such as +15551234567")
        try:
            greeting = _text(body, "greeting", MAX_GREETING_CHARS)
            instructions = _text(body, "instructions", MAX_INSTRUCTIONS_CHARS)
            voicemail = _text(body, "voicemail", MAX_GREETING_CHARS)
        except ValueError as exc:
            return _json_error(400, str(exc))
        ring_timeout_s = body.get("ring_timeout_s")
        if ring_timeout_s is not None and (
            type(ring_timeout_s) is not int or not MIN_RING_S <= ring_timeout_s <= MAX_RING_S
        ):
            return _json_error(400, f"'ring_timeout_s' must be a whole number of seconds, {MIN_RING_S}-{MAX_RING_S}")
        detect = body.get("machine_detection")
        if detect is not None and type(detect) is not bool:
            return _json_error(400, "'machine_detection' must be true or false")
        if voicemail is not None and detect is False:
            return _json_error(400, "'voicemail' needs answering-machine detection: leave out 'machine_detection'")
        if voicemail is not None:
            try:
                twiml.say_and_hangup(voicemail)  # (what a machine will get: a character XML cannot carry is a 400 now)
            except ValueError as exc:
                return _json_error(400, f"'voicemail': {exc}")
        machine = Machine(voicemail) if detect or voicemail is not None else None
        if rest is None:
            return _json_error(
                503,
                "Twilio REST credentials are not configured: set TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN "
                "(or TWILIO_API_KEY_SID and TWILIO_API_KEY_SECRET)",
            )
        agent = dataclasses.replace(
            calls.agent,
            greeting=greeting if greeting is not None else calls.agent.greeting,
            instructions=instructions if instructions is not None else calls.agent.instructions,
        )
        if calls.at_capacity:  # (checked here: no await between it and put(), which counts this call as ringing)
            return _json_error(
                503, f"this server is at its call limit (MEDIASERVER_MAX_CALLS={settings.max_calls}); try again later"
            )
        key = pending.put(to, agent, machine, ring_timeout_s)
        if key is None:
            return _json_error(503, "too many outbound calls waiting to be answered; try again later")
        try:
            answer_url = public("/outbound-twiml", f"{OUTBOUND_PARAMETER}={key}")
            status_url = public("/call-status")
        except ValueError as exc:
            pending.discard(key)
            return _json_error(400, f"cannot build the public URL for Twilio: {exc}")
        if settings.call_url is None and settings.twilio_api_base == TWILIO_API_BASE and security.on_this_network(answer_url):
            pending.discard(key)
            return _json_error(
                400,
                f"Twilio could not reach {answer_url.partition('?')[0]} (the URL this request came in on): "
                "set MEDIASERVER_PUBLIC_URL to the https:// URL Twilio reaches this server at",
            )
        if not calls.accepting:  # (shutdown began while the body came in)
            pending.discard(key)
            return _json_error(503, SHUTTING_DOWN)
        try:
            call = await rest.create_call(
                to=to, from_=from_, url=answer_url, status_callback=status_url, timeout_s=ring_timeout_s,
                machine_detection=None if machine is None else machine.twilio_mode,
            )  # fmt: skip
        except TwilioRestError as exc:
            if exc.uncertain:
                # Twilio got the request and did not answer in time: the call may be ringing.  Its outbound id
                # stays (until it expires), so that if it is answered the callee gets the agent, not an apology.
                log.warning("outbound call to %s: %s; it may have been placed", to, exc)
                return _json_error(
                    504,
                    f"{exc}: the call may have been placed; check before placing it again",
                    **{k: v for k, v in exc.to_json().items() if k != "error"},
                )
            pending.discard(key)
            log.error("outbound call to %s: %s", to, exc)
            return _json_error(502, str(exc), **{k: v for k, v in exc.to_json().items() if k != "error"})
        call_sid = str(call.get("sid", ""))
        pending.placed(key, call_sid)
        log.info("outbound call %s: dialling %s from %s", call_sid or "?", to, from_)
        placed: dict[str, Any] = {"call_sid": call_sid, "status": call.get("status"), "to": to, "from": from_}
        if body.get("greeting") is not None and settings.provider == "echo":
            placed["warning"] = "the built-in echo agent has no voice: the greeting will not be spoken"
        return placed, 201

    @app.post("/outbound-twiml")
    async def outbound_answered() -> Response | tuple[str, int]:
        params = await signed_form()
        call_sid = (params.get("CallSid") or [""])[0]
        why = security.call_sid_error(call_sid, signed=bool(settings.twilio_auth_token))
        if why is not None:
            return why, 400
        to = params["To"][0] if params.get("To") else None
        key = request.args.get(OUTBOUND_PARAMETER, "")
        machine = pending.machine(key)
        agent = pending.take(key, to, call_sid)
        if agent is None:
            log.warning("outbound call %s: unknown, used or expired outbound id; hanging up", call_sid)
            body = twiml.say_and_hangup("Sorry, this call could not be connected. Goodbye.")
            return Response(body, content_type=twiml.CONTENT_TYPE)
        answered_by = (params.get("AnsweredBy") or [""])[0]
        if machine is not None and answered_by:
            if calls.recorder is not None:
                calls.recorder.twilio_status(params)  # (who answered, in the call's record: in-progress, AnsweredBy)
            try:
                body_for_machine = machine.answer(answered_by)
            except ValueError:  # (a voicemail TwiML cannot carry: refused at POST /calls, so never; hang up all the same)
                body_for_machine = twiml.hangup()
            if body_for_machine is not None:  # no model session: a machine gets a message or nothing
                left = "leaving the voicemail" if "<Say" in body_for_machine else "hanging up"
                log.info("outbound call %s: answered by %s (AnsweredBy=%s); %s", call_sid, shown(to or "?", 40),
                         shown(answered_by, 40), left)  # fmt: skip
                return Response(body_for_machine, content_type=twiml.CONTENT_TYPE)
        elif machine is not None:
            log.warning("outbound call %s: answering-machine detection asked, but Twilio sent no AnsweredBy", call_sid)
        try:
            stream = security.stream_url(
                security.MEDIA_STREAM_PATH,
                configured=settings.call_url,
                scheme=request.scheme,
                host=request.host,
                headers=request.headers,
            )
        except ValueError as exc:
            return str(exc), 400
        token = calls.prepare(call_sid, agent, placed_here=True)
        if token is not None and calls.recorder is not None:  # From/To/Direction for the call record, as for /twiml
            calls.recorder.webhook(params)
        if token is None:
            body = twiml.say_and_hangup("Sorry, all our agents are busy. Please try again later.")
            return Response(body, content_type=twiml.CONTENT_TYPE)
        try:
            body = twiml.connect_stream(stream, {TOKEN_PARAMETER: token, "CallSid": call_sid})
        except ValueError as exc:  # a CallSid TwiML cannot carry: the session opened for it must not wait for a stream
            calls.withdraw(token, "the webhook could not be answered")
            return str(exc), 400
        log.info("outbound call %s: answered by %s, streaming to %s", call_sid, to or "?", stream)
        return Response(body, content_type=twiml.CONTENT_TYPE)

    return pending
