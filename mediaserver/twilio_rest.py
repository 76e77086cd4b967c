"""A small async client for the few Twilio REST calls the server makes.

* :meth:`TwilioRest.create_call` -- ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json``
  (an outbound call; Twilio fetches ``Url`` for its TwiML when it is answered);
* :meth:`TwilioRest.update_call` -- ``POST .../Calls/{CallSid}.json`` with
  ``Twiml`` (transfer) or ``Status`` (hang up).

Requests are form-encoded with HTTP Basic auth: the Account SID and Auth
Token, or an API key SID (``SK...``) and its secret with the Account SID in
the path (reference/twilio-side.md §5).  Twilio's JSON error body
(``code``, ``message``, ``more_info``, ``status``) becomes a
:class:`TwilioRestError` whose text names the code and message.

Requests go through :func:`mediaserver.transport.http.request` (one
connection each: these calls are rare).
"""

from __future__ import annotations

import base64
import json
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlencode
from xml.sax.saxutils import escape

from mediaserver.config import Settings
from mediaserver.transport.http import HttpError, NoAnswer, request

__all__ = [
    "API_VERSION",
    "STATUS_CALLBACK_EVENTS",
    "HttpError",
    "TwilioCredentials",
    "TwilioRest",
    "TwilioRestError",
    "dial_twiml",
]

API_VERSION = "2010-04-01"
# Call progress events to subscribe to (Call resource docs; reference/twilio-side.md §4.3).
STATUS_CALLBACK_EVENTS = ("initiated", "ringing", "answered", "completed")
MIN_RING_S, MAX_RING_S = 5, 600  # Timeout on Calls.json: how long an outbound call rings (Twilio's own limit is 600)


class TwilioRestError(Exception):
    """Twilio answered with an error, or could not be reached (``status`` 0).

    ``uncertain``: the request went out and no answer came (in time, or
    before the connection broke), or the answer was a 5xx, or a 2xx whose
    body is not the JSON object expected, so Twilio may have acted on it
    (placed the call, redirected it): not a refusal.
    """

    def __init__(
        self, status: int, message: str, code: int | None = None, more_info: str | None = None, *, uncertain: bool = False
    ) -> None:
        self.uncertain = uncertain
        self.status = status
        self.code = code
        self.message = message
        self.more_info = more_info
        where = f"HTTP {status}" if status else "no response"
        text = f"Twilio error {code} ({where}): {message}" if code is not None else f"Twilio {where}: {message}"
        super().__init__(text + (f" (see {more_info})" if more_info else ""))

    def to_json(self) -> dict[str, object]:
        return {"error": str(self), "twilio_status": self.status, "twilio_code": self.code,
                "twilio_message": self.message, "more_info": self.more_info}


@dataclass(frozen=True, slots=True)
class TwilioCredentials:
    """Who we are to Twilio: the account in the path, the Basic-auth pair."""

    account_sid: str
    username: str
    password: str = field(repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> TwilioCredentials | None:
        """API key + secret if both are set, else Account SID + Auth Token; None without an account."""
        account = settings.twilio_account_sid
        if not account:
            return None
        if settings.twilio_api_key_sid and settings.twilio_api_key_secret:
            return cls(account, settings.twilio_api_key_sid, settings.twilio_api_key_secret)
        if settings.twilio_auth_token:
            return cls(account, account, settings.twilio_auth_token)
        return None

    def authorization(self) -> str:
        pair = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


def dial_twiml(to: str) -> str:
    """``<Response><Dial>to</Dial></Response>``: a cold transfer."""
    return f'<?xml version="1.0" encoding="UTF-8"?><Response><Dial>{escape(to)}</Dial></Response>'


class TwilioRest:
    """The Twilio REST calls the server makes (see the module docstring)."""

    def __init__(
        self,
        credentials: TwilioCredentials,
        *,
        base_url: str = "https://api.twilio.com",
        timeout_s: float = 15.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.credentials = credentials
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._ssl_context = ssl_context

    @classmethod
    def from_settings(cls, settings: Settings) -> TwilioRest | None:
        """A client for the configured account, or None without REST credentials."""
        credentials = TwilioCredentials.from_settings(settings)
        if credentials is None:
            return None
        return cls(credentials, base_url=settings.twilio_api_base)

    def _calls_url(self, call_sid: str | None = None) -> str:
        account = quote(self.credentials.account_sid, safe="")
        tail = f"/{quote(call_sid, safe='')}.json" if call_sid else ".json"
        return f"{self.base_url}/{API_VERSION}/Accounts/{account}/Calls{tail}"

    async def create_call(
        self,
        *,
        to: str,
        from_: str,
        url: str,
        status_callback: str | None = None,
        status_callback_events: Sequence[str] = STATUS_CALLBACK_EVENTS,
        timeout_s: int | None = None,
        machine_detection: str | None = None,
    ) -> dict[str, Any]:
        """Place a call; Twilio POSTs to ``url`` for its TwiML once answered.  Returns the Call resource.

        ``timeout_s``: how long it rings (Twilio's ``Timeout``); ``machine_detection``: ``Enable`` or
        ``DetectMessageEnd`` (answering-machine detection: the answer webhook then carries ``AnsweredBy``).
        """
        form: list[tuple[str, str]] = [("To", to), ("From", from_), ("Url", url), ("Method", "POST")]
        if status_callback is not None:
            form.append(("StatusCallback", status_callback))
            form.extend(("StatusCallbackEvent", event) for event in status_callback_events)
            form.append(("StatusCallbackMethod", "POST"))
        if timeout_s is not None:
            form.append(("Timeout", str(timeout_s)))
        if machine_detection is not None:
            form.append(("MachineDetection", machine_detection))
        return await self._post(self._calls_url(), form)

    async def update_call(
        self, call_sid: str, *, twiml: str | None = None, status: str | None = None, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Redirect a live call to ``twiml``, or set its ``status`` (``completed`` hangs up).

        ``timeout_s``: this request's limit instead of the client's.
        """
        if (twiml is None) == (status is None):
            raise ValueError("give exactly one of twiml and status")
        form = [("Twiml", twiml)] if twiml is not None else [("Status", status or "")]
        return await self._post(self._calls_url(call_sid), form, timeout_s)

    async def _post(self, url: str, form: Sequence[tuple[str, str]], timeout_s: float | None = None) -> dict[str, Any]:
        body = urlencode(list(form)).encode("ascii")
        headers = [
            ("Authorization", self.credentials.authorization()),
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Accept", "application/json"),
        ]
        try:
            response = await request(
                "POST", url, headers=headers, body=body, timeout_s=timeout_s or self.timeout_s,
                ssl_context=self._ssl_context,
            )  # fmt: skip
        except HttpError as exc:
            raise TwilioRestError(0, str(exc), uncertain=isinstance(exc, NoAnswer)) from exc
        status, raw = response.status, response.body
        try:
            payload = json.loads(raw) if raw else {}
        except (ValueError, RecursionError):  # (not JSON, or JSON nested deeper than Python recurses)
            payload = None
        if not 200 <= status < 300:
            raise _error_from(status, payload, raw)
        if not isinstance(payload, dict):  # a 2xx all the same: Twilio (or what answered for it) may have acted on it
            raise TwilioRestError(status, f"expected a JSON object, got {raw[:80]!r}", uncertain=True)
        return payload


def _error_from(status: int, payload: object, raw: bytes) -> TwilioRestError:
    # A 5xx (Twilio's own failure, or a gateway's) does not say the request was not acted on: uncertain.
    uncertain = status >= 500
    if isinstance(payload, Mapping):
        code = payload.get("code")
        message = payload.get("message") or payload.get("detail") or payload.get("title")
        more_info = payload.get("more_info") or payload.get("type")
        return TwilioRestError(
            status,
            str(message) if message else f"no message in {raw[:80]!r}",
            code if isinstance(code, int) else None,
            str(more_info) if more_info else None,
            uncertain=uncertain,
        )
    return TwilioRestError(status, f"unexpected answer {raw[:80]!r}", uncertain=uncertain)
