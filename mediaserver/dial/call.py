"""Placing one simulated call: the I/O around :class:`~mediaserver.dial.caller.MediaStreamCaller`.

:func:`place_call` does what Twilio does when a call comes in:

1. POST the voice webhook, form-encoded, with ``CallSid``, ``AccountSid``,
   ``From``, ``To``, ``CallStatus=ringing``, ``Direction=inbound`` and
   ``ApiVersion``, signed with ``X-Twilio-Signature`` when an auth token is
   given (:func:`mediaserver.security.compute_signature`);
2. read the TwiML answer's ``<Connect><Stream url>`` and its ``<Parameter>``\\ s;
3. open the stream's WebSocket (the upgrade signed over the stream URL with
   no parameters) and run a :class:`CallSession`: ``connected``, ``start``,
   the caller's actions as real-time paced 20 ms frames with silence in
   between, Twilio's playback of the agent audio with mark echoes, then
   ``stop``.

Every failure to get a call going raises :class:`DialError` with a one-line
message.  Time is read from Trio only.
"""

from __future__ import annotations

import functools
import math
import re
import secrets
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import urlencode, urlsplit

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, WebSocketConnection, wrap_client_stream

from mediaserver.dial.caller import FRAME_BYTES, SILENCE, MediaStreamCaller
from mediaserver.dial.script import Action, BargeIn, Pause, Speak, Wait
from mediaserver.dial.timeline import Event
from mediaserver.security import SIGNATURE_HEADER, compute_signature, on_this_network, to_ws
from mediaserver.transport.http import HttpError, Url, open_stream, parse_url, request

__all__ = [
    "API_VERSION",
    "CallResult",
    "CallSession",
    "DialError",
    "DialOptions",
    "MessageTransport",
    "TwimlStream",
    "check_url",
    "parse_twiml",
    "place_call",
    "post_webhook",
]

API_VERSION = "2010-04-01"
USER_AGENT = "mediaserver-dial (TwilioProxy emulation)"
_CLOSE_WAIT_S = 2.0  # after stop, how long the server gets to close the socket


class DialError(Exception):
    """The call could not be placed; the message is one line, fit for the user."""


@dataclass(frozen=True, slots=True)
class DialOptions:
    """Everything one call needs; ``duration_s`` hangs up that long after ``start``
    (cutting the script short), else the call ends ``listen_s`` after the script."""

    url: str
    actions: tuple[Action, ...] = ()
    auth_token: str | None = None
    duration_s: float | None = None
    listen_s: float = 3.0
    from_number: str = "+15550001111"
    to_number: str = "+15552223333"
    account_sid: str = field(default_factory=lambda: "AC" + secrets.token_hex(16))
    timeout_s: float = 10.0
    # The server's MEDIASERVER_PUBLIC_URL, for ``url`` on this machine or network (the server dialled
    # directly, behind its tunnel or proxy): requests are signed as Twilio signs them, for the public URL,
    # and the stream is opened on the server dialled, as the proxy would forward it.
    public_url: str | None = None
    # The server's MEDIASERVER_INSTANCE_URL (one of several instances behind a proxy that strips its path): a
    # stream URL under it is opened on the server dialled, without that path, as the proxy would forward it.
    instance_url: str | None = None


@dataclass
class CallResult:
    call_sid: str
    events: list[Event]
    error: str | None = None  # why the call never got going (then ``events`` is empty)


# ------------------------------------------------------------------ webhook


@dataclass(frozen=True, slots=True)
class TwimlStream:
    url: str
    parameters: dict[str, str]


def parse_twiml(text: str) -> TwimlStream:
    """The ``<Connect><Stream>`` of a TwiML answer; :class:`DialError` if there is none."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        raise DialError(f"the webhook answer is not TwiML (not XML): {_snippet(text)}") from None
    if root.tag != "Response":
        raise DialError(f"the webhook answer is not TwiML (root <{root.tag}>, expected <Response>)")
    stream = root.find("./Connect/Stream")
    if stream is None:
        said = " ".join((e.text or "").strip() for e in root.iter("Say"))
        verbs = ", ".join(f"<{child.tag}>" for child in root) or "nothing"
        detail = f" (it says: {said!r})" if said else ""
        raise DialError(f"the TwiML has no <Connect><Stream>, only {verbs}{detail}")
    url = stream.get("url", "")
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise DialError(f"<Stream url> must be an absolute ws:// or wss:// URL, not {url!r}")
    parameters = {p.get("name", ""): p.get("value", "") for p in stream.findall("Parameter")}
    return TwimlStream(url, parameters)


def _snippet(text: str) -> str:
    return repr(" ".join(text.split())[:80])


def _body_hint(text: str) -> str:
    """``": <what the error page says>"``: an HTML page's title, else the start of the text."""
    title = re.search(r"<title>(.*?)</title>", text, re.IGNORECASE | re.DOTALL)
    if title:
        return f": {title.group(1).strip()[:80]}"
    return f": {_snippet(text)}" if text.strip() else ""


def check_url(url: str) -> Url:
    """The parts of an ``http(s)://`` webhook URL; :class:`DialError` if it is not one."""
    try:
        return parse_url(url)
    except HttpError:
        hint = "expected http://host[:port]/path, like http://127.0.0.1:8080/twiml"
        raise DialError(f"bad URL {url!r}: {hint}") from None


async def post_webhook(url: str, form: Sequence[tuple[str, str]], headers: Sequence[tuple[str, str]],
                       timeout_s: float) -> str:  # fmt: skip
    """POST ``form`` to ``url`` as Twilio would and return the TwiML text of a 200 answer."""
    check_url(url)
    sent = [("User-Agent", USER_AGENT), ("Content-Type", "application/x-www-form-urlencoded"), *headers]
    body = urlencode(list(form)).encode()
    try:
        response = await request("POST", url, headers=sent, body=body, timeout_s=timeout_s)
    except HttpError as exc:
        raise DialError(str(exc)) from None
    text = response.text()
    if response.status != 200:
        hint = ""
        if response.status == 403:
            hint = (
                " (is the request signed with the server's TWILIO_AUTH_TOKEN, and does the server have a"
                " MEDIASERVER_PUBLIC_URL? Then dial needs it too, to sign for that URL)"
            )
        raise DialError(f"the webhook {url} answered HTTP {response.status}" + _body_hint(text) + hint)
    content_type = response.header("content-type")
    if "xml" not in content_type.lower():
        raise DialError(f"the webhook answer is not TwiML (Content-Type {content_type or 'missing'}): {_snippet(text)}")
    return text


# ------------------------------------------------------------------ the stream


class MessageTransport(Protocol):
    """The caller's end of the Media Stream (a trio-websocket connection fits)."""

    async def send_message(self, message: str) -> None: ...

    async def get_message(self) -> str | bytes: ...


_CLOSED = (ConnectionClosed, trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError)


class CallSession:
    """Runs one :class:`MediaStreamCaller` over a transport, in real (Trio) time.

    Two tasks: the talker streams paced frames (speech or silence) following
    the actions; the listener reads the server's messages and echoes marks
    when their audio has played.  Both send under one lock, and each
    message is built under it, so sequence numbers reach the wire in order.
    """

    def __init__(self, caller: MediaStreamCaller, transport: MessageTransport) -> None:
        self.caller = caller
        self.transport = transport
        self._lock = trio.StrictFIFOLock()
        self._next_frame_s = 0.0
        self._talking = trio.CancelScope()
        self._server_closed = trio.Event()

    async def run(self, actions: Sequence[Action], *, duration_s: float | None = None, listen_s: float = 3.0) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen)
            await self._send(self.caller.connected)
            await self._send(lambda: self.caller.start(trio.current_time()))
            self._next_frame_s = trio.current_time()
            deadline = math.inf if duration_s is None else self._next_frame_s + duration_s
            with self._talking, trio.move_on_at(deadline):
                for action in actions:
                    await self._act(action)
                await self._silence(math.inf if duration_s is not None else listen_s)
                await trio.sleep_until(self._next_frame_s)  # the last frame's 20 ms have passed
            if self.caller.state == "streaming":
                await self._send(lambda: self.caller.stop(trio.current_time()))
                with trio.move_on_after(_CLOSE_WAIT_S):
                    await self._server_closed.wait()
            nursery.cancel_scope.cancel()

    async def _send(self, build: Callable[[], str]) -> bool:
        async with self._lock:
            if self.caller.state == "ended":
                return False
            message = build()
            try:
                await self.transport.send_message(message)
            except _CLOSED as exc:
                self._closed(exc)
                return False
        return True

    def _closed(self, exc: BaseException) -> None:
        reason = getattr(exc, "reason", None)
        code = getattr(reason, "code", None)
        if code is None:
            text, error = "the server dropped the connection (no close frame)", True
        else:
            detail = getattr(reason, "reason", None) or getattr(reason, "name", "")
            text, error = f"the server closed the stream ({code} {detail})".strip(), code != 1000
        self.caller.ended(trio.current_time(), text, error=error and self.caller.state == "streaming")
        self._server_closed.set()
        self._talking.cancel()

    # -- talker ------------------------------------------------------------------

    async def _frame(self, payload: bytes, *, speech: bool) -> None:
        due = self._next_frame_s
        await trio.sleep_until(due)
        late = trio.current_time() - due  # behind schedule: a stalled process, or a send the server did not take
        self._next_frame_s += len(payload) / 8000
        if not await self._send(lambda: self.caller.media(payload, trio.current_time(), speech=speech, late_s=late)):
            self._talking.cancel()
            await trio.lowlevel.checkpoint()

    async def _silence(self, seconds: float) -> None:
        end = self._next_frame_s + seconds
        while self._next_frame_s < end - 1e-9:
            await self._frame(SILENCE * FRAME_BYTES, speech=False)

    async def _silence_until(self, done: Callable[[float], bool], timeout_ms: int) -> None:
        deadline = self._next_frame_s + timeout_ms / 1000
        while not done(self._next_frame_s) and self._next_frame_s < deadline - 1e-9:
            await self._frame(SILENCE * FRAME_BYTES, speech=False)

    async def _act(self, action: Action) -> None:
        playback = self.caller.playback
        if isinstance(action, Speak):
            audio = action.ulaw + SILENCE * (-len(action.ulaw) % FRAME_BYTES)
            for at in range(0, len(audio), FRAME_BYTES):
                await self._frame(audio[at : at + FRAME_BYTES], speech=True)
        elif isinstance(action, Pause):
            await self._silence(action.ms / 1000)
        elif isinstance(action, BargeIn):
            after_s = action.after_ms / 1000

            def talking_long_enough(now: float) -> bool:
                since = playback.playing_since(now)
                return since is not None and now - since >= after_s - 1e-9

            await self._silence_until(talking_long_enough, action.timeout_ms)
        elif isinstance(action, Wait):
            began = self._next_frame_s
            quiet_s = action.quiet_ms / 1000

            def answered_and_quiet(now: float) -> bool:
                return playback.buffer_end_s > began and now >= playback.buffer_end_s + quiet_s

            await self._silence_until(answered_and_quiet, action.timeout_ms)

    # -- listener ----------------------------------------------------------------

    async def _listen(self) -> None:
        while True:
            message: str | bytes | None = None
            due = self.caller.next_due_s()
            with trio.move_on_at(math.inf if due is None else due):
                try:
                    message = await self.transport.get_message()
                except _CLOSED as exc:
                    async with self._lock:
                        self._closed(exc)
                    return
            now = trio.current_time()
            echoes = self.caller.due(now)
            if message is not None:
                echoes += self.caller.receive(message, now)
            for name, cleared in echoes:
                await self._send(functools.partial(self._echo, name, cleared))

    def _echo(self, name: str, cleared: bool) -> str:
        return self.caller.echo(name, trio.current_time(), cleared=cleared)


async def _open_and_run(
    stream_url: str, headers: Sequence[tuple[str, str]], timeout_s: float, run: Callable[[WebSocketConnection], Awaitable[None]]
) -> None:
    """Connect the stream's WebSocket (socket owned here, so it is always closed) and ``run`` it."""
    parts = urlsplit(stream_url)
    assert parts.hostname is not None
    tls = parts.scheme == "wss"
    where = parts.netloc
    try:
        with trio.fail_after(timeout_s):
            stream = await open_stream(parts.hostname, parts.port or (443 if tls else 80), tls=tls)
    except trio.TooSlowError:
        raise DialError(f"no connection to the media stream {stream_url} within {timeout_s:g} s") from None
    except OSError as exc:
        raise DialError(f"cannot reach the media stream at {where}: {exc.strerror or exc}") from None
    connected = False
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(timeout_s):
                ws = await wrap_client_stream(
                    nursery,
                    stream,
                    where,
                    (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                    extra_headers=[(k.encode(), v.encode()) for k, v in headers],
                )
            connected = True
            try:
                await run(ws)
            finally:
                with trio.move_on_after(1, shield=True):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except* ConnectionRejected as group:
        if connected:
            raise
        status = getattr(group.exceptions[0], "status_code", "?")
        raise DialError(f"the server refused the media stream WebSocket {stream_url} with HTTP {status}") from None
    except* (HandshakeError, trio.TooSlowError, OSError, trio.BrokenResourceError) as group:
        if connected:
            raise
        raise DialError(f"the media stream WebSocket handshake with {where} failed: {group.exceptions[0]!r}") from None
    finally:
        await trio.aclose_forcefully(stream)


def _new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


def _public_base(public_url: str | None, url: str) -> str | None:
    """``public_url`` without its trailing ``/``, if set and ``url`` is the server behind it: on this machine or network.

    (Not for another server dialled by its own address: its signatures are for that address.)
    """
    if not public_url or not on_this_network(url):
        return None
    base = public_url.rstrip("/")
    return None if url == base or url.startswith(base + "/") else base


def _as_public(url: str, public_url: str | None) -> str:
    """The URL Twilio would have requested for ``url``: its path (and query) under the public base, if any."""
    base = _public_base(public_url, url)
    if base is None:
        return url
    parts = urlsplit(url)
    return base + (parts.path or "/") + ("?" + parts.query if parts.query else "")


def _as_dialled(stream_url: str, url: str, public_url: str | None, instance_url: str | None = None) -> str:
    """Where to open the TwiML's stream: on the server dialled when the TwiML points at its instance or public base.

    (The instance URL first: it is the public one and a path, which its proxy strips.)
    """
    for configured in (instance_url, public_url):
        base = _public_base(configured, url)
        if base is None:
            continue
        ws_base = to_ws(base)
        if stream_url.startswith(ws_base + "/"):
            dialled = urlsplit(url)
            return to_ws(f"{dialled.scheme}://{dialled.netloc}") + stream_url[len(ws_base) :]
    return stream_url


async def place_call(options: DialOptions, *, call_sid: str | None = None) -> CallResult:
    """One call from webhook to hang-up; failures to connect come back in ``CallResult.error``."""
    call_sid = call_sid or _new_sid("CA")
    form = [
        ("AccountSid", options.account_sid),
        ("ApiVersion", API_VERSION),
        ("CallSid", call_sid),
        ("CallStatus", "ringing"),
        ("Called", options.to_number),
        ("Caller", options.from_number),
        ("Direction", "inbound"),
        ("From", options.from_number),
        ("To", options.to_number),
    ]
    caller: MediaStreamCaller | None = None
    try:
        headers = []
        if options.auth_token:
            signed = _as_public(options.url, options.public_url)
            headers.append((SIGNATURE_HEADER, compute_signature(options.auth_token, signed, dict(form))))
        twiml = parse_twiml(await post_webhook(options.url, form, headers, options.timeout_s))
        caller = MediaStreamCaller(
            call_sid=call_sid,
            stream_sid=_new_sid("MZ"),
            account_sid=options.account_sid,
            custom_parameters=twiml.parameters,
        )
        ws_headers = [("User-Agent", USER_AGENT)]
        if options.auth_token:
            ws_headers.append((SIGNATURE_HEADER, compute_signature(options.auth_token, twiml.url, {})))
        stream_caller = caller

        async def run(ws: WebSocketConnection) -> None:
            session = CallSession(stream_caller, ws)
            await session.run(options.actions, duration_s=options.duration_s, listen_s=options.listen_s)

        stream_url = _as_dialled(twiml.url, options.url, options.public_url, options.instance_url)
        await _open_and_run(stream_url, ws_headers, options.timeout_s, run)
    except DialError as exc:
        return CallResult(call_sid, caller.events if caller else [], str(exc))
    return CallResult(call_sid, caller.events)

