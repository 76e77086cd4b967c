"""A fake of Twilio's REST API for calls: trio + h11 on 127.0.0.1:0.

It serves the two requests the media server makes:

* ``POST /2010-04-01/Accounts/{AccountSid}/Calls.json`` (create a call),
* ``POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`` (update one),

and checks each one as Twilio would: path and method, HTTP Basic auth
(Account SID + Auth Token, or API key SID + secret), form encoding.  Every
request is also checked against the official ``twilio`` helper library:
the fake makes the same call through ``twilio.rest.Client`` with a
recording HTTP client (:class:`SdkRecorder`) and asserts that the SDK would
have sent exactly the same form fields to the same URL.  Replies are the
Twilio JSON shapes (a Call resource; errors as ``{code, message, more_info,
status}``), and they are fed back through the SDK too, so an answer the SDK
could not read fails the test.

Tests read :attr:`FakeTwilioRest.requests` and set :attr:`FakeTwilioRest.fail_next`
to make the next request fail with a Twilio error.
"""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

import h11
import trio
from twilio.base.exceptions import TwilioRestException
from twilio.http import HttpClient
from twilio.http.response import Response as SdkResponse
from twilio.rest import Client
from twilio.rest.api.v2010.account.call import CallInstance

from tests._ws_server import listen_loopback

ACCOUNT_SID = "AC" + "0" * 32
AUTH_TOKEN = "rest-auth-token-0123456789abcdef"
CALL_SID_PREFIX = "CA" + "c" * 24


@dataclass
class RestRequest:
    method: str
    path: str
    headers: dict[str, str]
    form: list[tuple[str, str]]
    username: str | None
    password: str | None
    status: int = 0  # what the fake answered

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.form if k == name]

    def value(self, name: str) -> str:
        (only,) = self.values(name)
        return only


@dataclass
class TwilioError:
    status: int
    code: int
    message: str

    def body(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "message": self.message,
            "more_info": f"https://www.twilio.com/docs/errors/{self.code}",
            "status": self.status,
        }


class SdkRecorder(HttpClient):
    """A ``twilio.http.HttpClient`` that records the request and answers with a canned reply."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(logger=None, is_async=False)  # type: ignore[arg-type]
        self.status = status
        self.body = body
        self.requests: list[dict[str, Any]] = []

    def request(self, method: str, url: str, params: Any = None, data: Any = None, headers: Any = None,
                auth: Any = None, timeout: Any = None, allow_redirects: bool = False) -> SdkResponse:
        self.requests.append({"method": method, "url": url, "data": data or {}, "auth": auth})
        return SdkResponse(self.status, self.body)


def _pairs(data: dict[str, Any]) -> list[tuple[str, str]]:
    """The form pairs ``requests`` would encode for the SDK's data dict (lists repeat the field)."""
    out: list[tuple[str, str]] = []
    for key, value in data.items():
        for item in value if isinstance(value, list) else [value]:
            out.append((key, str(item)))
    return out


@dataclass
class FakeTwilioRest:
    """The fake server; start with ``await nursery.start(fake.run)``."""

    account_sid: str = ACCOUNT_SID
    username: str = ACCOUNT_SID
    password: str = AUTH_TOKEN
    requests: list[RestRequest] = field(default_factory=list)
    sdk_failures: list[str] = field(default_factory=list)
    fail_next: TwilioError | None = None
    port: int | None = None
    answer_delay_s: float = 0.0  # Twilio acts on a request at once, but its answer may take this long to come
    html_next: bytes | None = None  # the next request acted on, but answered 200 with this page (a proxy's, say)
    unanswered: int = 0  # requests acted on whose client hung up before the answer was sent

    def __post_init__(self) -> None:
        self._sids = itertools.count(1)
        self._changed = trio.Event()

    @property
    def base_url(self) -> str:
        assert self.port is not None, "start the fake first"
        return f"http://127.0.0.1:{self.port}"

    async def run(self, *, task_status: trio.TaskStatus[FakeTwilioRest] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.port = await listen_loopback(nursery, self._serve)
            task_status.started(self)

    async def wait_requests(self, n: int) -> list[RestRequest]:
        while len(self.requests) < n:
            await self._changed.wait()
        return self.requests

    # -- HTTP ------------------------------------------------------------------

    async def _serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                return
        assert request is not None
        status, answer = self._handle(request, bytes(body))
        if self.answer_delay_s:
            await trio.sleep(self.answer_delay_s)
            try:
                with trio.move_on_after(0.01):
                    if not await stream.receive_some(1):  # (end of stream: the client hung up while the answer took)
                        self.unanswered += 1
                        return
            except trio.BrokenResourceError:  # (or reset the connection)
                self.unanswered += 1
                return
        payload, content_type = json.dumps(answer).encode(), "application/json"
        if self.html_next is not None and 200 <= status < 300:
            payload, content_type, self.html_next = self.html_next, "text/html", None
        head = h11.Response(
            status_code=status,
            headers=[("Content-Type", content_type), ("Content-Length", str(len(payload))), ("Connection", "close")],
        )
        try:
            await stream.send_all(conn.send(head) + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            # The client hung up before the answer (its call ended meanwhile, and it stopped waiting): Twilio acted
            # on the request all the same, and nothing is wrong with this server.
            self.unanswered += 1

    def _handle(self, request: h11.Request, body: bytes) -> tuple[int, dict[str, Any]]:
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        username = password = None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        if scheme == "Basic":
            username, _, password = base64.b64decode(token).decode().partition(":")
        form = parse_qsl(body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body))
        record = RestRequest(request.method.decode(), request.target.decode(), headers, form, username, password)
        self.requests.append(record)
        status, answer = self._answer(record)
        record.status = status
        self._changed.set()
        self._changed = trio.Event()
        return status, answer

    def _answer(self, req: RestRequest) -> tuple[int, dict[str, Any]]:
        base = f"/2010-04-01/Accounts/{self.account_sid}/Calls"
        if (req.username, req.password) != (self.username, self.password):
            return 401, TwilioError(401, 20003, "Authenticate").body()
        if req.headers.get("content-type") != "application/x-www-form-urlencoded":
            return 400, TwilioError(400, 20001, "form body expected").body()
        if req.method != "POST" or not req.path.startswith(base) or not req.path.endswith(".json"):
            return 404, TwilioError(404, 20404, f"The requested resource {req.path} was not found").body()
        call_sid = req.path[len(base) + 1 : -len(".json")] if req.path != base + ".json" else None
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            self._check_with_sdk(req, call_sid, error.status, error.body())
            return error.status, error.body()
        if call_sid is None:
            fields = dict(req.form)
            for name in ("To", "From", "Url"):
                if name not in fields:
                    error = TwilioError(400, 21201 if name != "Url" else 21205, f"Missing parameter {name}")
                    return 400, error.body()
            sid = f"{CALL_SID_PREFIX}{next(self._sids):08d}"
            answer = self._call(sid, fields["To"], fields["From"], "queued")
            self._check_with_sdk(req, None, 201, answer)
            return 201, answer
        answer = self._call(call_sid, "+15550001111", "+15552223333", dict(req.form).get("Status", "in-progress"))
        self._check_with_sdk(req, call_sid, 200, answer)
        return 200, answer

    def _call(self, sid: str, to: str, from_: str, status: str) -> dict[str, Any]:
        """A Call resource as Twilio returns it (the fields the SDK's CallInstance reads)."""
        return {
            "sid": sid, "account_sid": self.account_sid, "to": to, "to_formatted": to, "from": from_,
            "from_formatted": from_, "status": status, "direction": "outbound-api", "api_version": "2010-04-01",
            "date_created": "Sat, 21 Nov 2026 08:00:00 +0000", "date_updated": "Sat, 21 Nov 2026 08:00:00 +0000",
            "start_time": None, "end_time": None, "duration": None, "price": None, "price_unit": "USD",
            "parent_call_sid": None, "phone_number_sid": "PN" + "d" * 32, "answered_by": None,
            "forwarded_from": None, "group_sid": None, "caller_name": None, "queue_time": "0",
            "trunk_sid": None, "uri": f"/2010-04-01/Accounts/{self.account_sid}/Calls/{sid}.json",
            "subresource_uris": {"notifications": f"/2010-04-01/Accounts/{self.account_sid}/Calls/{sid}/Notifications.json"},
        }

    # -- the SDK's opinion -------------------------------------------------------

    def _check_with_sdk(self, req: RestRequest, call_sid: str | None, status: int, answer: dict[str, Any]) -> None:
        """Make the same call with twilio-python; record any difference in :attr:`sdk_failures`."""
        recorder = SdkRecorder(status, json.dumps(answer))
        client = Client(self.username, self.password, self.account_sid, http_client=recorder)
        fields: dict[str, list[str]] = {}
        for key, value in req.form:
            fields.setdefault(key, []).append(value)
        one = {k: v[0] for k, v in fields.items()}
        result: Any = None
        try:
            calls = client.api.v2010.accounts(self.account_sid).calls
            if call_sid is None:
                names = {"To": "to", "From": "from_", "Url": "url", "Method": "method",
                         "StatusCallback": "status_callback", "StatusCallbackMethod": "status_callback_method",
                         "Timeout": "timeout", "MachineDetection": "machine_detection"}  # fmt: skip
                kwargs: dict[str, Any] = {names[k]: v for k, v in one.items() if k in names}
                if "StatusCallbackEvent" in fields:
                    kwargs["status_callback_event"] = fields["StatusCallbackEvent"]
                unknown = set(fields) - set(names) - {"StatusCallbackEvent"}
                if unknown:
                    self.sdk_failures.append(f"fields the fake does not model: {sorted(unknown)}")
                result = calls.create(**kwargs)
            else:
                update = {name.lower(): one[name] for name in ("Twiml", "Status") if name in one}
                result = calls(call_sid).update(**update)
        except TwilioRestException as exc:
            # the SDK prefixes its own words ("Unable to create record: ") to Twilio's message
            if status < 400 or exc.code != answer["code"] or not exc.msg.endswith(answer["message"]):
                self.sdk_failures.append(f"SDK read the error as {exc.code} {exc.msg!r}")
        except Exception as exc:
            self.sdk_failures.append(f"SDK call failed: {exc!r}")
            return
        else:
            if status >= 400 or not isinstance(result, CallInstance) or result.sid != answer["sid"]:
                self.sdk_failures.append(f"SDK did not read the answer as a call: {result!r}")
        (sent,) = recorder.requests
        expected_url = f"http://127.0.0.1:{self.port}{req.path}".replace(
            f"http://127.0.0.1:{self.port}", "https://api.twilio.com"
        )
        if sent["url"] != expected_url or sent["method"] != req.method:
            self.sdk_failures.append(f"SDK would use {sent['method']} {sent['url']}, we used {req.method} {req.path}")
        if sorted(_pairs(sent["data"])) != sorted(req.form):
            self.sdk_failures.append(f"SDK would send {sorted(_pairs(sent['data']))}, we sent {sorted(req.form)}")
        if tuple(sent["auth"]) != (req.username, req.password):
            self.sdk_failures.append(f"SDK would authenticate as {sent['auth'][0]}, we used {req.username}")


@asynccontextmanager
async def fake_rest() -> AsyncIterator[FakeTwilioRest]:
    """A running :class:`FakeTwilioRest` for the block; afterwards, that every request passed the SDK's checks."""
    async with trio.open_nursery() as nursery:
        fake: FakeTwilioRest = await nursery.start(FakeTwilioRest().run)
        yield fake
        nursery.cancel_scope.cancel()
    assert fake.sdk_failures == []
