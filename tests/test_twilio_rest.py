"""The Twilio REST client against a fake Twilio (tests/twilio_rest_fake.py) on loopback.

The fake checks each request itself and against the official twilio-python
library (what it would have sent for the same call), and answers in
Twilio's JSON shapes, which the SDK must be able to read.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from twilio.twiml.voice_response import VoiceResponse

from mediaserver.config import Settings
from mediaserver.twilio_rest import (
    STATUS_CALLBACK_EVENTS,
    TwilioCredentials,
    TwilioRest,
    TwilioRestError,
    dial_twiml,
)

from tests.fakes import fail_after
from tests.twilio_rest_fake import ACCOUNT_SID, AUTH_TOKEN, FakeTwilioRest, TwilioError

API_KEY_SID = "SK" + "5" * 32
API_KEY_SECRET = "api-key-secret-0123456789"


@asynccontextmanager
async def fake_twilio(**options: str) -> AsyncIterator[FakeTwilioRest]:
    async with trio.open_nursery() as nursery:
        fake: FakeTwilioRest = await nursery.start(FakeTwilioRest(**options).run)
        yield fake
        nursery.cancel_scope.cancel()
    assert fake.sdk_failures == []


def client_for(fake: FakeTwilioRest, username: str = ACCOUNT_SID, password: str = AUTH_TOKEN) -> TwilioRest:
    return TwilioRest(TwilioCredentials(ACCOUNT_SID, username, password), base_url=fake.base_url, timeout_s=5)


@fail_after(10)
async def test_twilio_rest_create_call_sends_the_exact_request() -> None:
    async with fake_twilio() as fake:
        call = await client_for(fake).create_call(
            to="+15551234567",
            from_="+15559876543",
            url="https://agent.example.com/outbound-twiml?outbound=abc",
            status_callback="https://agent.example.com/call-status",
        )
    (req,) = fake.requests
    assert req.method == "POST"
    assert req.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls.json"
    assert (req.username, req.password) == (ACCOUNT_SID, AUTH_TOKEN)
    assert req.headers["accept"] == "application/json"
    assert req.form == [
        ("To", "+15551234567"),
        ("From", "+15559876543"),
        ("Url", "https://agent.example.com/outbound-twiml?outbound=abc"),
        ("Method", "POST"),
        ("StatusCallback", "https://agent.example.com/call-status"),
        ("StatusCallbackEvent", "initiated"),
        ("StatusCallbackEvent", "ringing"),
        ("StatusCallbackEvent", "answered"),
        ("StatusCallbackEvent", "completed"),
        ("StatusCallbackMethod", "POST"),
    ]
    assert req.values("StatusCallbackEvent") == list(STATUS_CALLBACK_EVENTS)
    assert call["sid"].startswith("CA") and call["status"] == "queued" and call["to"] == "+15551234567"


@fail_after(10)
async def test_twilio_rest_api_key_auth_keeps_the_account_in_the_path() -> None:
    async with fake_twilio(username=API_KEY_SID, password=API_KEY_SECRET) as fake:
        settings = Settings(
            twilio_account_sid=ACCOUNT_SID,
            twilio_auth_token=AUTH_TOKEN,
            twilio_api_key_sid=API_KEY_SID,
            twilio_api_key_secret=API_KEY_SECRET,
            twilio_api_base=fake.base_url,
        )
        client = TwilioRest.from_settings(settings)
        assert client is not None
        await client.update_call("CA" + "1" * 32, status="completed")
    (req,) = fake.requests
    assert (req.username, req.password) == (API_KEY_SID, API_KEY_SECRET)
    assert req.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{'CA' + '1' * 32}.json"
    assert req.form == [("Status", "completed")]


def test_twilio_rest_credentials_from_settings() -> None:
    assert TwilioCredentials.from_settings(Settings()) is None
    assert TwilioCredentials.from_settings(Settings(twilio_account_sid=ACCOUNT_SID)) is None
    assert TwilioCredentials.from_settings(Settings(twilio_auth_token=AUTH_TOKEN)) is None
    token = TwilioCredentials.from_settings(Settings(twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN))
    assert token == TwilioCredentials(ACCOUNT_SID, ACCOUNT_SID, AUTH_TOKEN)
    half_key = Settings(twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN, twilio_api_key_sid=API_KEY_SID)
    assert TwilioCredentials.from_settings(half_key) == token  # a key without its secret is not used
    key_only = Settings(
        twilio_account_sid=ACCOUNT_SID, twilio_api_key_sid=API_KEY_SID, twilio_api_key_secret=API_KEY_SECRET
    )
    assert TwilioCredentials.from_settings(key_only) == TwilioCredentials(ACCOUNT_SID, API_KEY_SID, API_KEY_SECRET)


@fail_after(10)
async def test_twilio_rest_transfer_twiml_is_what_the_sdk_builds() -> None:
    expected = VoiceResponse()
    expected.dial("+15557654321")
    assert dial_twiml("+15557654321") == str(expected)
    async with fake_twilio() as fake:
        await client_for(fake).update_call("CA" + "2" * 32, twiml=dial_twiml("+15557654321"))
    (req,) = fake.requests
    root = ET.fromstring(req.value("Twiml"))
    assert root.tag == "Response" and [(c.tag, c.text) for c in root] == [("Dial", "+15557654321")]


@fail_after(10)
async def test_twilio_rest_error_carries_twilios_code_and_message() -> None:
    async with fake_twilio() as fake:
        fake.fail_next = TwilioError(400, 21211, "The 'To' number +1555 is not a valid phone number.")
        with pytest.raises(TwilioRestError) as info:
            await client_for(fake).create_call(to="+15551234567", from_="+15559876543", url="https://x.example/t")
    error = info.value
    assert (error.status, error.code, error.uncertain) == (400, 21211, False)  # a refusal: nothing was done
    assert error.message == "The 'To' number +1555 is not a valid phone number."
    assert error.more_info == "https://www.twilio.com/docs/errors/21211"
    assert str(error) == (
        "Twilio error 21211 (HTTP 400): The 'To' number +1555 is not a valid phone number."
        " (see https://www.twilio.com/docs/errors/21211)"
    )


@pytest.mark.parametrize("status", [500, 503])
@fail_after(10)
async def test_twilio_rest_a_5xx_answer_is_uncertain_not_a_refusal(status: int) -> None:
    """Twilio (or a gateway) failing may or may not have placed the call: the caller must not be told it failed."""
    async with fake_twilio() as fake:
        fake.fail_next = TwilioError(status, 20500, "Internal Server Error")
        with pytest.raises(TwilioRestError) as info:
            await client_for(fake).create_call(to="+15551234567", from_="+15559876543", url="https://x.example/t")
    assert (info.value.status, info.value.uncertain) == (status, True)


@fail_after(10)
async def test_twilio_rest_a_2xx_answer_that_is_not_json_is_uncertain_not_a_refusal() -> None:
    """A 2xx says the request was taken: whatever its body, the call may have been placed (retrying could call twice)."""
    async with fake_twilio() as fake:
        fake.html_next = b"<html>hi</html>"
        with pytest.raises(TwilioRestError) as info:
            await client_for(fake).create_call(to="+15551234567", from_="+15559876543", url="https://x.example/t")
    assert (info.value.status, info.value.uncertain) == (201, True)  # (Twilio's status for a call created)
    assert "expected a JSON object, got b'<html>hi</html>'" in str(info.value)
    assert len(fake.requests) == 1


@fail_after(10)
async def test_twilio_rest_wrong_credentials_are_reported() -> None:
    async with fake_twilio() as fake:
        with pytest.raises(TwilioRestError, match=r"^Twilio error 20003 \(HTTP 401\): Authenticate"):
            await client_for(fake, password="wrong").update_call("CA" + "3" * 32, status="completed")
    assert fake.requests[0].status == 401


@fail_after(10)
async def test_twilio_rest_unreachable_api_is_a_clear_error() -> None:
    listener = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener[0].socket.getsockname()[1]
    await listener[0].aclose()  # nothing listens there now
    client = TwilioRest(TwilioCredentials(ACCOUNT_SID, ACCOUNT_SID, AUTH_TOKEN), base_url=f"http://127.0.0.1:{port}")
    with pytest.raises(TwilioRestError, match=r"^Twilio no response: cannot reach 127\.0\.0\.1:\d+") as info:
        await client.update_call("CA" + "4" * 32, status="completed")
    assert info.value.status == 0 and info.value.code is None


def test_twilio_rest_update_needs_exactly_one_change() -> None:
    client = TwilioRest(TwilioCredentials(ACCOUNT_SID, ACCOUNT_SID, AUTH_TOKEN))
    with pytest.raises(ValueError, match="exactly one"):
        trio.run(lambda: client.update_call("CA1", twiml="<Response/>", status="completed"))
