"""Outbound calls end to end: ``POST /calls`` -> fake Twilio REST -> ``/outbound-twiml`` -> the call.

The server runs on loopback with the OpenAI fake (SDK-validated) as the
model and :class:`tests.twilio_rest_fake.FakeTwilioRest` as Twilio's REST
API; the test then plays Twilio: it POSTs the answer URL from the REST
request (signed), opens the Media Stream with :class:`FakeTwilioCaller` and
checks that the model session got this call's greeting and instructions.
The CLI's error paths run against the same server.
"""

from __future__ import annotations

from unittest.mock import ANY

import dataclasses
import functools
import json
import logging
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import pytest
import trio
import trio.testing
from openai.types.realtime import ResponseCreateEvent, SessionUpdateEvent

from mediaserver.__main__ import _parser
from mediaserver.config import Settings
from mediaserver import outbound_cli
from mediaserver.security import on_this_network as _unreachable
from mediaserver.server import serve
from mediaserver.transport.http import request
from mediaserver.twilio_rest import TwilioRest

from tests.fakes import (
    FakeOpenAIServer,
    FakeTwilioCaller,
    fail_after,
    http_request,
    open_ws_client,
    parse_twiml,
    read_response,
    twilio_signature,
)
from tests.test_app import fake_openai, openai_settings, running
from tests.twilio_rest_fake import ACCOUNT_SID, AUTH_TOKEN, FakeTwilioRest, TwilioError, fake_rest

API_KEY = "ms-api-key-0123456789abcdef"
TO, FROM = "+15551234567", "+15559876543"
GREETING = "Hi, this is Robin from the clinic, calling about your appointment."
INSTRUCTIONS = "You are Robin. Confirm the appointment on Tuesday at 3 pm."


@pytest.fixture(autouse=True)
def _setup(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    caplog.set_level(logging.INFO, logger="mediaserver")
    monkeypatch.chdir(tmp_path)  # call records (./data) and .env lookups stay in tmp_path


def outbound_settings(model: FakeOpenAIServer, rest: FakeTwilioRest | None, **changes: Any) -> Settings:
    values: dict[str, Any] = {
        "api_key": API_KEY,
        "twilio_account_sid": ACCOUNT_SID,
        "twilio_auth_token": AUTH_TOKEN,
        "twilio_from_number": FROM,
        "twilio_api_base": rest.base_url if rest is not None else "http://127.0.0.1:9",
    }
    values.update(changes)
    return openai_settings(model, **values)


async def post_calls(url: str, body: object, *, key: str | None = API_KEY) -> tuple[int, dict[str, str], Any]:
    headers = [("Content-Type", "application/json")]
    if key is not None:
        headers.append(("Authorization", f"Bearer {key}"))
    raw = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
    response = await request("POST", url + "/calls", headers=headers, body=raw, timeout_s=15.0)
    status, response_headers, answer = response.status, dict(response.headers), response.body
    assert response_headers["content-type"] == "application/json", response_headers
    return status, response_headers, json.loads(answer)


async def twilio_answers(
    answer_url: str, call_sid: str, *, to: str = TO, sign: bool = True, answered_by: str | None = None
) -> Any:
    """What Twilio does when the callee picks up: POST the call's Url (signed); ``answered_by`` with
    answering-machine detection (Twilio's ``AnsweredBy``)."""
    form = [("CallSid", call_sid), ("AccountSid", ACCOUNT_SID), ("From", FROM), ("To", to),
            ("CallStatus", "in-progress"), ("Direction", "outbound-api"), ("ApiVersion", "2010-04-01")]
    if answered_by is not None:
        form.append(("AnsweredBy", answered_by))
    headers = [("X-Twilio-Signature", twilio_signature(AUTH_TOKEN, answer_url, form))] if sign else []
    return await http_request(answer_url, "POST", form=form, headers=headers)


@fail_after(15)
async def test_outbound_call_end_to_end_with_its_greeting() -> None:
    async with fake_rest() as rest, fake_openai() as model:
        async with running(outbound_settings(model, rest)) as url:
            status, _, answer = await post_calls(
                url, {"to": TO, "greeting": GREETING, "instructions": INSTRUCTIONS}
            )
            assert status == 201, answer
            (req,) = rest.requests
            call_sid = answer["call_sid"]
            assert answer == {"call_sid": call_sid, "status": "queued", "to": TO, "from": FROM}
            assert call_sid.startswith("CA")
            # The exact REST request.
            assert req.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
            assert (req.username, req.password) == (ACCOUNT_SID, AUTH_TOKEN)
            answer_url = req.value("Url")
            parts = urlsplit(answer_url)
            assert f"{parts.scheme}://{parts.netloc}" == url and parts.path == "/outbound-twiml"
            (one_time_id,) = parse_qs(parts.query)["outbound"]
            assert len(one_time_id) >= 24 and list(parse_qs(parts.query)) == ["outbound"]
            assert req.form == [
                ("To", TO), ("From", FROM), ("Url", answer_url), ("Method", "POST"),
                ("StatusCallback", url + "/call-status"),
                ("StatusCallbackEvent", "initiated"), ("StatusCallbackEvent", "ringing"),
                ("StatusCallbackEvent", "answered"), ("StatusCallbackEvent", "completed"),
                ("StatusCallbackMethod", "POST"),
            ]  # fmt: skip
            assert GREETING.split()[0] not in answer_url

            # Twilio fetches the answer URL: unsigned is refused, signed connects the stream.
            assert (await twilio_answers(answer_url, call_sid, sign=False)).status == 403
            webhook = await twilio_answers(answer_url, call_sid)
            assert webhook.status == 200 and webhook.headers["content-type"].startswith("text/xml")
            twiml = parse_twiml(webhook.text)
            assert twiml.parameters["CallSid"] == call_sid and twiml.hangup_after
            # The id is this call's now: another call cannot redeem it (a retry of this one can: see below).
            again = await twilio_answers(answer_url, "CA" + "8" * 32)
            assert "<Say>" in again.text and "<Connect>" not in again.text

            session = await model.session(0)  # pre-opened with this call's options
            await session.ready.wait()
            caller = FakeTwilioCaller(call_sid=call_sid, custom_parameters=twiml.parameters)
            signature = [("X-Twilio-Signature", twilio_signature(AUTH_TOKEN, twiml.stream_url))]
            async with open_ws_client(twiml.stream_url, signature) as ws, caller.attached(ws):
                await caller.send_silence(200)
                await session.wait_appends(1)
                await caller.stop()
    assert len(model.sessions) == 1
    update, greeting = [m for _, m in session.received if not m.type.startswith("input_audio_buffer")][:2]
    assert isinstance(update, SessionUpdateEvent) and update.session.instructions == INSTRUCTIONS  # type: ignore[union-attr]
    assert isinstance(greeting, ResponseCreateEvent) and greeting.response is not None
    # (the agent's own instructions first: a response's instructions replace the session's)
    assert greeting.response.instructions.endswith(f'\n\nGreet the caller by saying: "{GREETING}"')


@fail_after(15)
@pytest.mark.parametrize(
    ("body", "mode", "answers"),
    [
        # Detection alone: a machine or a fax is hung up on at once; a person (or Twilio's "unknown") gets the agent.
        ({"machine_detection": True, "ring_timeout_s": 25}, "Enable",
         {"machine_start": "hangup", "fax": "hangup", "human": "agent", "unknown": "agent"}),
        # With a voicemail: Twilio waits for the greeting's end, and the message is left with <Say>.
        ({"voicemail": "Hi, this is the clinic: please call us back."}, "DetectMessageEnd",
         {"machine_end_beep": "voicemail", "machine_end_silence": "voicemail", "machine_end_other": "voicemail",
          "fax": "hangup", "human": "agent"}),
    ],
)  # fmt: skip
async def test_outbound_answering_machine_detection_opens_no_model_session_for_a_machine(
    body: dict[str, Any], mode: str, answers: dict[str, str]
) -> None:
    async with fake_rest() as rest, fake_openai() as model:
        async with running(outbound_settings(model, rest)) as url:
            agents = 0
            placed: list[str] = []
            for n, (answered_by, expected) in enumerate(answers.items()):
                status, _, answer = await post_calls(url, {"to": TO, **body})
                assert status == 201, answer
                placed.append(answer["call_sid"])
                req = rest.requests[n]
                assert req.value("MachineDetection") == mode
                assert dict(req.form).get("Timeout") == (str(body["ring_timeout_s"]) if "ring_timeout_s" in body else None)
                webhook = await twilio_answers(req.value("Url"), answer["call_sid"], answered_by=answered_by)
                assert webhook.status == 200 and webhook.headers["content-type"].startswith("text/xml")
                if expected == "agent":
                    assert parse_twiml(webhook.text).parameters["CallSid"] == answer["call_sid"]
                    await (await model.session(agents)).ready.wait()  # pre-opened for this call
                    agents += 1
                elif expected == "hangup":
                    assert webhook.text == '<?xml version="1.0" encoding="UTF-8"?><Response><Hangup/></Response>'
                else:
                    assert webhook.text == (
                        '<?xml version="1.0" encoding="UTF-8"?><Response>'
                        f"<Say>{body['voicemail']}</Say><Hangup/></Response>"
                    )
            await trio.sleep(0.2)
            assert len(model.sessions) == agents == list(answers.values()).count("agent")  # none for a machine
            # Who answered is in each call's record (GET /calls/<sid>), a machine's as a person's.
            records = []
            for sid in placed:
                got = await request("GET", f"{url}/calls/{sid}", headers=[("Authorization", f"Bearer {API_KEY}")], timeout_s=5.0)
                records.append(json.loads(got.body)["answered_by"])
            assert records == list(answers)


@fail_after(15)
async def test_outbound_ring_timeout_and_machine_detection_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    async with fake_rest() as rest, fake_openai() as model:
        async with running(outbound_settings(model, rest)) as url:
            ring = "'ring_timeout_s' must be a whole number of seconds, 5-600"
            for extra, error in [
                ({"ring_timeout_s": 4}, ring), ({"ring_timeout_s": 601}, ring), ({"ring_timeout_s": "30"}, ring),
                ({"ring_timeout_s": 30.5}, ring), ({"ring_timeout_s": True}, ring),
                ({"machine_detection": "yes"}, "'machine_detection' must be true or false"),
                ({"voicemail": "Call us back.", "machine_detection": False},
                 "'voicemail' needs answering-machine detection: leave out 'machine_detection'"),
                ({"voicemail": " "}, "'voicemail' must be a non-empty string"),
                ({"voicemail": "x" * 1001}, "'voicemail' is 1001 characters; the limit is 1000"),
                ({"voicemail": "Call us\u0001 back."}, "'voicemail': character U+0001 cannot be written in XML"),
            ]:  # fmt: skip
                assert await post_calls(url, {"to": TO, **extra}) == (400, ANY, {"error": error}), extra
            assert rest.requests == []
            # Without either, nothing is asked of Twilio's detection, and the call rings Twilio's default time.
            assert (await post_calls(url, {"to": TO, "ring_timeout_s": 600, "machine_detection": False}))[0] == 201
            assert [k for k, _ in rest.requests[0].form if k in ("Timeout", "MachineDetection")] == ["Timeout"]
            # The CLI's flags, and the server's 400 through it.
            ok = cli_args(TO, "--ring-timeout", "30", "--machine-detection", "--server", url)
            assert await outbound_cli.place(ok, Settings(api_key=API_KEY)) == 0
            assert (rest.requests[1].value("Timeout"), rest.requests[1].value("MachineDetection")) == ("30", "Enable")
            ok = cli_args(TO, "--voicemail", "Call us back.", "--server", url)
            assert await outbound_cli.place(ok, Settings(api_key=API_KEY)) == 0
            assert rest.requests[2].value("MachineDetection") == "DetectMessageEnd"
            # (a request the server refuses as bad is bad usage: 2, as for what the command checks itself)
            assert await outbound_cli.place(cli_args(TO, "--ring-timeout", "3", "--server", url), Settings(api_key=API_KEY)) == 2
            assert capsys.readouterr().err == f"mediaserver call: {ring}\n"
            assert len(rest.requests) == 3


@fail_after(15)
async def test_outbound_call_comes_back_to_the_instance_that_placed_it() -> None:
    """Behind a shared public URL, the answer URL, status callback and stream name this instance (MEDIASERVER_INSTANCE_URL)."""
    instance = "https://voice.example.com/n1"  # a proxy routes /n1/... here, stripping the prefix
    async with fake_rest() as rest, fake_openai() as model:
        settings = outbound_settings(model, rest, public_url="https://voice.example.com", instance_url=instance)
        async with running(settings) as url:
            status, _, answer = await post_calls(url, {"to": TO})
            assert status == 201, answer
            (req,) = rest.requests
            answer_url = req.value("Url")
            assert answer_url.startswith(instance + "/outbound-twiml?outbound=")
            assert req.value("StatusCallback") == instance + "/call-status"
            # Twilio signs for the URL it was given; we are reached through a terminator at our own address.
            local = url + answer_url.removeprefix(instance)
            form = [("CallSid", answer["call_sid"]), ("AccountSid", ACCOUNT_SID), ("From", FROM), ("To", TO)]
            wrong = twilio_signature(AUTH_TOKEN, "https://voice.example.com/n2" + answer_url.removeprefix(instance), form)
            refused = await http_request(local, "POST", form=form, headers=[("X-Twilio-Signature", wrong)])
            assert refused.status == 403
            signature = twilio_signature(AUTH_TOKEN, answer_url, form)
            webhook = await http_request(local, "POST", form=form, headers=[("X-Twilio-Signature", signature)])
            assert webhook.status == 200, webhook.text
            assert parse_twiml(webhook.text).stream_url == "wss://voice.example.com/n1/media-stream"
            # The status callback, signed for the instance's URL, is taken too.
            status_form = [("CallSid", answer["call_sid"]), ("CallStatus", "completed")]
            signature = twilio_signature(AUTH_TOKEN, instance + "/call-status", status_form)
            callback = await http_request(url + "/call-status", "POST", form=status_form, headers=[("X-Twilio-Signature", signature)])
            assert callback.status == 204


@fail_after(15)
async def test_outbound_post_calls_at_max_calls_is_refused_and_a_ringing_call_holds_its_place() -> None:
    async with fake_rest() as rest, fake_openai() as model:
        async with running(outbound_settings(model, rest, max_calls=1)) as url:
            status, _, answer = await post_calls(url, {"to": TO})
            assert status == 201, answer  # placed: it rings, and holds the only place
            full = (503, {"error": "this server is at its call limit (MEDIASERVER_MAX_CALLS=1); try again later"})
            assert (await post_calls(url, {"to": TO}))[::2] == full
            assert len(rest.requests) == 1
            # The callee picks up: answered all the same (it was counted while it rang), and it keeps the place.
            webhook = await twilio_answers(rest.requests[0].value("Url"), answer["call_sid"])
            assert parse_twiml(webhook.text).parameters["CallSid"] == answer["call_sid"]
            assert (await post_calls(url, {"to": TO}))[::2] == full
            assert len(rest.requests) == 1


@fail_after(15)
async def test_outbound_a_call_that_will_not_be_answered_gives_its_place_back_at_its_status_callback() -> None:
    """Busy, no answer, failed: Twilio's status callback says so within seconds, and the place the call held while
    it rang is free again (not only when its ring time is over)."""
    async with fake_rest() as rest, fake_openai() as model:
        async with running(outbound_settings(model, rest, max_calls=1)) as url:
            for n, final in enumerate(("busy", "no-answer", "failed", "canceled")):
                status, _, answer = await post_calls(url, {"to": TO})
                assert status == 201, answer
                assert (await post_calls(url, {"to": TO}))[0] == 503
                callback = [("CallSid", answer["call_sid"]), ("AccountSid", ACCOUNT_SID), ("CallStatus", "ringing")]
                for state in ("initiated", "ringing", final):
                    callback[-1] = ("CallStatus", state)
                    signature = twilio_signature(AUTH_TOKEN, url + "/call-status", callback)
                    sent = await http_request(url + "/call-status", "POST", form=callback, headers=[("X-Twilio-Signature", signature)])
                    assert sent.status == 204
                    health = json.loads((await http_request(url + "/healthz")).body)
                    assert health["calls"] == (0 if state == final else 1), state
            assert len(rest.requests) == 4


@fail_after(15)
async def test_outbound_defaults_come_from_the_settings() -> None:
    async with fake_rest() as rest, fake_openai() as model:
        settings = outbound_settings(model, rest, agent_greeting="Hello from the default.")
        async with running(settings) as url:
            status, _, answer = await post_calls(url, {"to": TO, "from": "+15550002222"})
            assert status == 201, answer
            req = rest.requests[0]
            assert req.value("From") == "+15550002222"
            webhook = await twilio_answers(req.value("Url"), answer["call_sid"])
            assert parse_twiml(webhook.text).parameters["CallSid"] == answer["call_sid"]
            session = await model.session(0)
            await session.ready.wait()
            await session.wait_for(lambda: len(session.received) >= 2)
    update, greeting = (m for _, m in session.received[:2])
    assert update.session.instructions == settings.agent_instructions
    assert greeting.response.instructions.endswith('\n\nGreet the caller by saying: "Hello from the default."')


@fail_after(15)
async def test_outbound_answer_for_another_number_or_unknown_id_hangs_up() -> None:
    async with fake_rest() as rest, fake_openai() as model:
        async with running(outbound_settings(model, rest)) as url:
            status, _, answer = await post_calls(url, {"to": TO})
            assert status == 201
            answer_url = rest.requests[0].value("Url")
            wrong = await twilio_answers(answer_url, answer["call_sid"], to="+15550009999")
            assert "<Say>" in wrong.text and "<Hangup/>" in wrong.text
            unknown = await twilio_answers(url + "/outbound-twiml?outbound=not-an-id", answer["call_sid"])
            assert "<Say>" in unknown.text
    assert model.sessions == []  # no model session was opened for either


@fail_after(15)
async def test_outbound_answer_webhook_again_gets_the_same_session_and_another_call_does_not() -> None:
    """Twilio may retry the answer webhook: the retry (whose TwiML Twilio follows) is answered too, with a token for
    the same session -- not the apology that would hang the callee up.  Another call SID cannot redeem the id."""
    async with fake_rest() as rest, fake_openai() as model:
        async with running(outbound_settings(model, rest)) as url:
            status, _, answer = await post_calls(url, {"to": TO, "greeting": GREETING})
            assert status == 201
            answer_url = rest.requests[0].value("Url")
            first = parse_twiml((await twilio_answers(answer_url, answer["call_sid"])).text)
            again = parse_twiml((await twilio_answers(answer_url, answer["call_sid"])).text)
            other = await twilio_answers(answer_url, "CA" + "9" * 32)
            assert "<Say>" in other.text and "<Hangup/>" in other.text
            assert first.parameters["token"] != again.parameters["token"]
            await trio.sleep(0.3)
            assert len(model.sessions) == 1  # one session for the call, whichever answer's stream comes


@fail_after(15)
async def test_outbound_twilio_slow_to_answer_is_a_call_that_may_have_been_placed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Twilio acts on Calls.json at once; its answer arrives after our 15 s (here 0.5 s).  Before: 502 "refused",
    # the one-time id dropped, and the callee who picked up heard an apology and was hung up on.
    monkeypatch.setitem(TwilioRest.__init__.__kwdefaults__, "timeout_s", 0.5)
    async with fake_rest() as rest, fake_openai() as model:
        rest.answer_delay_s = 2.0
        async with running(outbound_settings(model, rest)) as url:
            status, _, answer = await post_calls(url, {"to": TO, "greeting": GREETING})
            assert status == 504, answer
            assert answer["error"].startswith("Twilio no response: no answer from 127.0.0.1:")
            assert answer["error"].endswith("the call may have been placed; check before placing it again")
            (req,) = await rest.wait_requests(1)
            webhook = await twilio_answers(req.value("Url"), "CA" + "e" * 32)  # it rang, and was answered
            assert "<Connect>" in webhook.text and "<Say>" not in webhook.text
    assert any("it may have been placed" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


@fail_after(15)
async def test_outbound_post_calls_while_shutting_down_is_refused() -> None:
    # A request whose body comes in after shutdown began (the listener closed): its answer URL is this
    # instance's, so Twilio would find no one to answer the call.  Before: 201, and the call was placed.
    async with fake_rest() as rest, fake_openai() as model, trio.open_nursery() as nursery:
        shutdown = trio.Event()
        settings = outbound_settings(model, rest, drain_s=5.0)
        [bind] = await nursery.start(functools.partial(serve, settings, shutdown_trigger=shutdown.wait))
        port = int(bind.rsplit(":", 1)[1])
        body = json.dumps({"to": TO}).encode()
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        conn = h11.Connection(h11.CLIENT)
        head = [("Host", f"127.0.0.1:{port}"), ("Authorization", f"Bearer {API_KEY}"),
                ("Content-Type", "application/json"), ("Content-Length", str(len(body)))]  # fmt: skip
        await stream.send_all(conn.send(h11.Request(method="POST", target="/calls", headers=head)))
        await trio.sleep(0.2)
        shutdown.set()  # SIGTERM
        await trio.sleep(0.2)
        await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        response = await read_response(conn, stream)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    assert (response.status, json.loads(response.body)) == (
        503, {"error": "the server is shutting down; place the call on another instance"}
    )
    assert rest.requests == []


@fail_after(15)
async def test_outbound_post_calls_errors_are_json() -> None:
    async with fake_rest() as rest, fake_openai() as model:
        async with running(outbound_settings(model, rest)) as url:
            status, headers, answer = await post_calls(url, {"to": TO}, key=None)
            assert (status, headers["www-authenticate"]) == (401, "Bearer")
            assert answer == {"error": "missing or wrong API key (Authorization: Bearer $MEDIASERVER_API_KEY)"}
            assert (await post_calls(url, {"to": TO}, key=API_KEY + "x"))[0] == 401
            for body, error in [
                ("{not json", 'the body must be a JSON object: {"to": "+15551234567", ...}'),
                ([TO], 'the body must be a JSON object: {"to": "+15551234567", ...}'),
                ({"to": "5551234567"}, "'to' must be an E.164 number such as +15551234567"),
                ({"to": TO, "from": "me"}, "'from' must be an E.164 number such as +15551234567"),
                ({"to": TO, "from": ""}, "'from' must be an E.164 number such as +15551234567"),  # not the default
                ({"to": TO, "from": 0}, "'from' must be an E.164 number such as +15551234567"),
                # a body Quart would have answered with an HTML 500 and a traceback in the log
                ('{"to": "+15551234567", "greeting": "caf\xe9"}'.encode("latin-1"),
                 'the body must be a JSON object: {"to": "+15551234567", ...}'),
                ('{"to": ' + "[" * 5000 + "]" * 5000 + "}", 'the body must be a JSON object: {"to": "+15551234567", ...}'),
                ({"to": TO, "greeting": 5}, "'greeting' must be a non-empty string"),
                ({"to": TO, "greeting": "x" * 1001}, "'greeting' is 1001 characters; the limit is 1000"),
                # JSON lets a lone surrogate through; UTF-8 cannot carry it (the call was placed, its session failed)
                ({"to": TO, "greeting": "hi \ud83d"}, "'greeting' is not valid Unicode text (character 3: a lone surrogate)"),
                ({"to": TO, "instructions": "\udc00x"},
                 "'instructions' is not valid Unicode text (character 0: a lone surrogate)"),
                ({"to": TO, "voice": "alloy"}, "unknown field(s): voice"),
            ]:
                status, _, answer = await post_calls(url, body)
                assert (status, answer) == (400, {"error": error}), body
            rest.fail_next = TwilioError(400, 21219, "The number +15551234567 is unverified.")
            status, _, answer = await post_calls(url, {"to": TO})
            assert status == 502
            assert answer == {
                "error": "Twilio error 21219 (HTTP 400): The number +15551234567 is unverified."
                " (see https://www.twilio.com/docs/errors/21219)",
                "twilio_status": 400,
                "twilio_code": 21219,
                "twilio_message": "The number +15551234567 is unverified.",
                "more_info": "https://www.twilio.com/docs/errors/21219",
            }
            assert len(rest.requests) == 1  # the invalid bodies never reached Twilio


@fail_after(15)
async def test_outbound_instructions_at_the_limit_fit_in_any_script_and_larger_bodies_get_json_413(
    capsys: pytest.CaptureFixture[str],
) -> None:
    cyrillic, emoji = "Ж" * 20_000, "\U0001f600" * 20_000  # 6 and 12 bytes a character as JSON escapes
    async with fake_rest() as rest, fake_openai() as model:
        async with running(outbound_settings(model, rest)) as url:
            for instructions in (cyrillic, emoji):
                status, _, answer = await post_calls(url, {"to": TO, "instructions": instructions, "greeting": "й" * 1000})
                assert status == 201, answer
            ok = cli_args(TO, "--instructions", cyrillic, "--server", url)  # as UTF-8: 40 KB
            assert await outbound_cli.place(ok, Settings(api_key=API_KEY)) == 0
            assert capsys.readouterr().out.startswith("call CA")
            status, _, answer = await post_calls(url, {"to": TO, "instructions": "x" * 300_000})
            assert (status, answer) == (413, {"error": "the request body is over 256 KiB"})
            # The webhooks keep their 64 KiB limit.
            webhook = await request(
                "POST", url + "/twiml", headers=[("Content-Type", "application/x-www-form-urlencoded")],
                body=b"CallSid=" + b"x" * 70_000, timeout_s=5.0,
            )  # fmt: skip
            assert webhook.status == 413
            # Chunked (no Content-Length): the same 64 KiB, not the 256 KiB of POST /calls.
            for size, status in ((70_000, b"413"), (1_000, b"403")):  # (403: read, then the unsigned request refused)
                chunked = b"CallSid=CA" + b"0" * 32 + b"&pad=" + b"x" * size
                head = b"POST /twiml HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                wire = head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                wire += b"%x\r\n" % len(chunked) + chunked + b"\r\n0\r\n\r\n"
                stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
                async with stream:
                    await stream.send_all(wire)
                    answer = await stream.receive_some(4096)
                assert answer.split(b" ")[1] == status, answer[:80]
    assert len(rest.requests) == 3


@fail_after(15)
async def test_outbound_refuses_to_give_twilio_a_url_on_this_machine() -> None:
    async with fake_openai() as model:
        settings = outbound_settings(model, None, twilio_api_base="https://api.twilio.com")  # the real Twilio
        async with running(settings) as url:  # no MEDIASERVER_PUBLIC_URL: the URL is the request's, 127.0.0.1
            status, _, answer = await post_calls(url, {"to": TO})
            assert status == 400
            assert answer["error"] == (
                f"Twilio could not reach {url}/outbound-twiml (the URL this request came in on): "
                "set MEDIASERVER_PUBLIC_URL to the https:// URL Twilio reaches this server at"
            )
    assert _unreachable("http://127.0.0.1:8080/x") and _unreachable("http://10.1.2.3/x") and _unreachable("http://[::1]:80/")
    assert _unreachable("http://app.localhost/x") and _unreachable("http://192.168.0.2/")
    assert not _unreachable("https://voice.example.com/x") and not _unreachable("http://8.8.8.8/")


@fail_after(15)
async def test_outbound_is_off_without_api_key_or_credentials() -> None:
    async with fake_openai() as model:
        async with running(outbound_settings(model, None, api_key=None)) as url:
            status, _, answer = await post_calls(url, {"to": TO})
            assert (status, answer) == (404, {"error": "outbound calls are disabled: set MEDIASERVER_API_KEY on the server"})
        async with running(outbound_settings(model, None, twilio_auth_token=None)) as url:
            status, _, answer = await post_calls(url, {"to": TO})
            assert status == 503 and answer["error"].startswith("Twilio REST credentials are not configured")
        async with running(outbound_settings(model, None, twilio_from_number=None)) as url:
            assert (await post_calls(url, {"to": TO}))[0] == 400  # no From anywhere


# ------------------------------------------------------------------- the CLI


def cli_args(*argv: str) -> Any:
    return _parser().parse_args(["call", *argv, "--env-file", ""])


def test_outbound_cli_usage_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("MEDIASERVER_API_KEY", raising=False)
    assert outbound_cli.main(cli_args(TO)) == 2
    assert "MEDIASERVER_API_KEY is not set" in capsys.readouterr().err
    monkeypatch.setenv("MEDIASERVER_API_KEY", API_KEY)
    assert outbound_cli.main(cli_args("5551234567")) == 2
    assert "'5551234567' is not an E.164 number" in capsys.readouterr().err
    assert outbound_cli.main(cli_args(TO, "--from", "me")) == 2
    assert "--from 'me' is not an E.164 number" in capsys.readouterr().err
    for argv, message in [(("--ring-timeout", "3"), "--ring-timeout must be 5-600 seconds, not 3"),
                          (("--ring-timeout", "601"), "--ring-timeout must be 5-600 seconds, not 601"),
                          (("--voicemail", " "), "--voicemail must not be empty")]:  # fmt: skip
        assert outbound_cli.main(cli_args(TO, *argv)) == 2
        assert capsys.readouterr().err == f"mediaserver call: {message}\n"
    for server in ("ftp://x", "http://[::1", "127.0.0.1:8080"):
        assert outbound_cli.main(cli_args(TO, "--server", server)) == 2
        assert f"--server must be the server's http:// or https:// URL, not {server!r}" in capsys.readouterr().err
    monkeypatch.setenv("MEDIASERVER_PORT", "not-a-port")
    assert outbound_cli.main(cli_args(TO)) == 2
    assert "configuration error: MEDIASERVER_PORT must be a whole number" in capsys.readouterr().err


def test_outbound_cli_does_not_need_the_provider_s_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEDIASERVER_API_KEY", API_KEY)
    monkeypatch.setenv("MEDIASERVER_PROVIDER", "openai")  # the server's setting, in a shared .env: its key is the server's
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert outbound_cli.main(cli_args(TO, "--server", "http://127.0.0.1:9")) == 1  # got as far as the request
    assert "cannot reach 127.0.0.1:9" in capsys.readouterr().err


def test_outbound_cli_server_not_running(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MEDIASERVER_API_KEY", API_KEY)
    assert outbound_cli.main(cli_args(TO, "--server", "http://127.0.0.1:9")) == 1
    err = capsys.readouterr().err
    assert err.startswith("mediaserver call: cannot reach 127.0.0.1:9") and "is `mediaserver serve` running" in err


@fail_after(15)
async def test_outbound_cli_against_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    async with fake_rest() as rest, fake_openai() as model:
        async with running(outbound_settings(model, rest)) as url:
            ok = cli_args(TO, "--greeting", GREETING, "--server", url)
            assert await outbound_cli.place(ok, Settings(api_key=API_KEY)) == 0
            out = capsys.readouterr().out
            assert out.startswith("call CA") and out.rstrip().endswith(f"to {TO} from {FROM}: queued")
            assert await outbound_cli.place(ok, Settings(api_key="wrong")) == 1
            assert "the server refused the API key" in capsys.readouterr().err
            rest.fail_next = TwilioError(400, 21215, "Account not authorized to call +15551234567.")
            assert await outbound_cli.place(ok, Settings(api_key=API_KEY)) == 1
            assert "Twilio error 21215 (HTTP 400): Account not authorized" in capsys.readouterr().err
        async with running(outbound_settings(model, rest, api_key=None)) as url:
            off = cli_args(TO, "--server", url)
            assert await outbound_cli.place(off, Settings(api_key=API_KEY)) == 1
            assert "does not place outbound calls: outbound calls are disabled" in capsys.readouterr().err
    assert len(rest.requests) == 2  # the accepted call and the refused one


@fail_after(10)
async def test_outbound_cli_says_a_call_may_have_been_placed_when_the_server_does_not_answer(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async def never_answers(stream: trio.SocketStream) -> None:
        await stream.receive_some(65536)
        await trio.sleep_forever()

    monkeypatch.setattr(outbound_cli, "ANSWER_TIMEOUT_S", 0.3)
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(trio.serve_tcp, never_answers, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        assert await outbound_cli.place(cli_args(TO, "--server", f"http://127.0.0.1:{port}"), Settings(api_key=API_KEY)) == 1
        nursery.cancel_scope.cancel()
    err = capsys.readouterr().err
    assert "within 0.3 s: the call may have been placed" in err and "is `mediaserver serve` running" not in err


async def test_outbound_ids_answered_do_not_fill_the_waiting_list_and_stay_the_answering_calls(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Answered calls' ids are kept only for Twilio's retries (RETRY_WINDOW_S), and do not count as waiting."""
    from mediaserver.bridge.link import AgentOptions
    from mediaserver.outbound import RETRY_WINDOW_S, OutboundRequests

    pending = OutboundRequests(max_entries=2)
    agent = AgentOptions("Be brief.")
    first, second = pending.put(TO, agent), pending.put(TO, agent)
    assert first is not None and second is not None and pending.put(TO, agent) is None  # two waiting: full
    assert pending.take(first, TO, "CA1") is agent and pending.take(second, TO, "CA2") is agent
    third = pending.put(TO, agent)  # both answered: room again
    assert third is not None
    assert pending.take(first, TO, "CA1") is agent  # a retry of the answering call's webhook
    assert pending.take(first, TO, "CA9") is None  # another call: no
    await trio.sleep(RETRY_WINDOW_S + 1)
    assert pending.take(first, TO, "CA1") is None  # the retry window is over
    assert pending.take(third, TO, "CA3") is agent  # (an unanswered id keeps its 15 minutes)


async def test_outbound_calls_still_ringing_are_waited_for_by_a_drain_only_while_they_can_ring(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A draining server answers the calls it placed; it waits for those placed in the last RINGING_S (Twilio's
    60 s ring and a margin), not for the 15 minutes an unanswered id is kept (no answer, busy: never redeemed)."""
    from mediaserver.bridge.link import AgentOptions
    from mediaserver.outbound import RINGING_S, OutboundRequests

    pending = OutboundRequests()
    agent = AgentOptions("Be brief.")
    first = pending.put(TO, agent)
    await trio.sleep(RINGING_S / 2)
    second = pending.put(TO, agent)
    assert first is not None and second is not None and pending.waiting() == 2
    assert pending.take(second, TO, "CA2") is agent
    assert pending.waiting() == 1  # answered: not waited for
    await trio.sleep(RINGING_S / 2 + 1)
    assert pending.waiting() == 0  # the first has rung out (its id is still kept, for a late answer)
    assert pending.take(first, TO, "CA1") is agent


async def test_outbound_a_call_s_ring_timeout_and_machine_detection_lengthen_its_wait(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A call placed to ring longer than Twilio's default, or with answering-machine detection (up to 30 s more before
    the answer webhook), is waited for (and holds its place under MEDIASERVER_MAX_CALLS) that much longer."""
    from mediaserver.bridge.link import AgentOptions
    from mediaserver.outbound import Machine, OutboundRequests

    pending = OutboundRequests()
    agent = AgentOptions("Be brief.")
    pending.put(TO, agent, ring_s=300)
    pending.put(TO, agent, Machine())
    pending.put(TO, agent, ring_s=10)
    await trio.sleep(24)
    assert pending.waiting() == 3
    await trio.sleep(2)  # 10 s of ringing and 15 s of slack are over
    assert pending.waiting() == 2
    await trio.sleep(60 + 30 + 15 - 26 + 1)  # Twilio's 60 s, 30 s of detection, the slack
    assert pending.waiting() == 1
    await trio.sleep(300 + 15 - 106 + 1)
    assert pending.waiting() == 0

    # Twilio queues outbound calls (calls per second): the ring time counts from its "ringing" callback.
    queued = pending.put(TO, agent, ring_s=10)
    assert queued is not None
    pending.placed(queued, "CA" + "7" * 32)
    await trio.sleep(20)
    pending.status("CA" + "7" * 32, "ringing")
    await trio.sleep(20)
    assert pending.waiting() == 1  # 40 s after it was placed, 20 s after it began to ring
    pending.status("CA" + "7" * 32, "completed")  # (rung out: Twilio's final status for it)
    assert pending.waiting() == 0 and pending.take(queued, TO, "CA" + "7" * 32) is None

    # Queued long (Twilio dials an account's calls at its calls per second), then a long ring: it may still be
    # answered past the 15 minutes an id is kept from placing, and it holds its place until then.
    late = pending.put(TO, agent, ring_s=600)
    assert late is not None
    pending.placed(late, "CA" + "8" * 32)
    await trio.sleep(500)
    pending.status("CA" + "8" * 32, "ringing")
    await trio.sleep(550)  # 1050 s after it was placed
    assert pending.waiting() == 1 and pending.take(late, TO, "CA" + "8" * 32) is agent

    # A number that fails at once: its final callback may come before the REST request's answer.
    pending.status("CA" + "9" * 32, "failed")
    failed = pending.put(TO, agent)
    assert failed is not None and pending.waiting() == 1
    pending.placed(failed, "CA" + "9" * 32)
    assert pending.waiting() == 0 and pending.take(failed, TO, "CA" + "9" * 32) is None


async def test_outbound_a_greeting_for_the_echo_agent_is_answered_with_a_warning() -> None:
    """The echo agent has no voice: a call placed with a greeting is placed, and the answer says it goes unspoken."""
    async with fake_rest() as rest, fake_openai() as model:
        settings = dataclasses.replace(outbound_settings(model, rest), provider="echo")
        async with running(settings) as url:
            status, _, answer = await post_calls(url, {"to": TO, "greeting": GREETING})
            assert status == 201 and len(rest.requests) == 1
            assert answer["warning"] == "the built-in echo agent has no voice: the greeting will not be spoken"
            status, _, answer = await post_calls(url, {"to": TO})  # no greeting asked for: no warning
            assert status == 201 and "warning" not in answer
