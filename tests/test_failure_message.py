"""A caller whose model fails hears MEDIASERVER_FAILURE_MESSAGE (Twilio's <Say>, asked through REST), not dead air.

Real loopback sockets: the fake Twilio caller, the fake OpenAI server and
the fake Twilio REST API (every request checked against the ``twilio``
SDK by :class:`tests.twilio_rest_fake.FakeTwilioRest`).
"""

from __future__ import annotations

import logging
from typing import Any
from xml.etree import ElementTree

import pytest
import trio

from mediaserver.config import ConfigError, Settings
from mediaserver.twiml import failure
from tests.fakes import FakeRealtimeSession, fail_after, to_ulaw, tone
from tests.test_app import CALL_A, call_log, fake_openai, openai_settings, phone_call, running
from tests.twilio_rest_fake import ACCOUNT_SID, AUTH_TOKEN, FakeTwilioRest, TwilioError, fake_rest

DEFAULT = Settings().failure_message


def failure_twiml_of(message: str) -> str:
    answer = failure(message)
    assert answer is not None
    return answer


def with_rest(model: Any, rest: FakeTwilioRest, **changes: Any) -> Settings:
    return openai_settings(
        model, twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN, twilio_api_base=rest.base_url, **changes
    )


def said(twiml: str) -> list[tuple[str, str]]:
    return [(verb.tag, verb.text or "") for verb in ElementTree.fromstring(twiml)]


# ------------------------------------------------------------------- the TwiML


def test_failure_twiml_says_text_or_runs_verbs_then_hangs_up() -> None:
    assert said(failure_twiml_of("Sorry <now> & later")) == [("Say", "Sorry <now> & later"), ("Hangup", "")]
    verbs = '<Say language="fr-FR">Désolé.</Say><Play>https://example.com/sorry.mp3</Play>'
    root = ElementTree.fromstring(failure_twiml_of(verbs))
    assert [v.tag for v in root] == ["Say", "Play", "Hangup"] and root[0].get("language") == "fr-FR"
    with pytest.raises(ValueError, match="not well-formed TwiML verbs"):
        failure_twiml_of("<Say>unclosed")
    assert [failure(off) for off in ("off", " OFF ", "")] == [None, None, None]  # nothing said: the call just ends


def test_a_failure_message_that_is_not_twiml_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="MEDIASERVER_FAILURE_MESSAGE: not well-formed TwiML verbs"):
        Settings.from_env({"MEDIASERVER_FAILURE_MESSAGE": "<Say>unclosed"})
    assert Settings.from_env({"MEDIASERVER_FAILURE_MESSAGE": "Back soon."}).failure_message == "Back soon."


# ---------------------------------------------------------------- on a call


@pytest.mark.parametrize("message", [DEFAULT, "<Play>https://example.com/sorry.mp3</Play>", "off"])
@fail_after(15)
async def test_a_model_that_cannot_be_reached_has_twilio_tell_the_caller(
    message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mediaserver")
    async with fake_rest() as rest, fake_openai(reject_with=401) as model:
        async with running(with_rest(model, rest, failure_message=message)) as url:
            async with phone_call(url, CALL_A, auth_token=AUTH_TOKEN) as caller:
                await caller.send_silence(100)
                await caller.closed.wait()
            assert caller.received == [] and caller.close_code == 1011
    if message == "off":
        assert rest.requests == []
        return
    [update] = rest.requests
    assert update.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Calls/{CALL_A}.json"
    assert update.form == [("Twiml", failure_twiml_of(message))]
    expected = [("Say", DEFAULT)] if message == DEFAULT else [("Play", "https://example.com/sorry.mp3")]
    assert said(update.value("Twiml")) == [*expected, ("Hangup", "")]
    assert any("Twilio says the failure message to the caller" in r.getMessage() for r in call_log(caplog, CALL_A))


@pytest.mark.parametrize("ending", ["crash", "orderly"])
@fail_after(15)
async def test_a_model_that_breaks_mid_call_has_twilio_tell_the_caller(ending: str) -> None:
    """A crash mid-call gets the message; a model that closed its session in order ended the call itself: none."""
    go = trio.Event()

    async def script(session: FakeRealtimeSession) -> None:
        await session.ready.wait()
        await go.wait()
        if ending == "crash":
            await session.abort()  # the TCP connection dropped, no close handshake
        else:
            await session.close()

    async with fake_rest() as rest, fake_openai(script) as model:
        async with running(with_rest(model, rest, model_ping_s=0)) as url:
            async with phone_call(url, CALL_A, auth_token=AUTH_TOKEN) as caller:
                await caller.send_audio(to_ulaw(tone(300, 200, amplitude=0.1)))  # the call runs
                await (await model.session(0)).wait_appends(5)
                go.set()
                await caller.closed.wait()
    if ending == "orderly":
        assert rest.requests == []
        return
    [update] = rest.requests
    assert update.path.endswith(f"/Calls/{CALL_A}.json") and said(update.value("Twiml")) == [("Say", DEFAULT), ("Hangup", "")]


@fail_after(15)
async def test_without_rest_credentials_or_when_twilio_refuses_the_call_just_ends(caplog: pytest.LogCaptureFixture) -> None:
    async with fake_rest() as rest, fake_openai(reject_with=401) as model:
        rest.fail_next = TwilioError(400, 21220, "Call is not in-progress. Cannot redirect.")  # (the caller hung up)
        async with running(with_rest(model, rest)) as url:
            async with phone_call(url, CALL_A, auth_token=AUTH_TOKEN) as caller:
                await caller.closed.wait()
            assert caller.close_code == 1011
        assert len(rest.requests) == 1
    assert any("could not have Twilio tell the caller the call failed: " in r.getMessage() and "21220" in r.getMessage()
               for r in call_log(caplog, CALL_A))  # fmt: skip


def test_a_text_failure_message_xml_cannot_carry_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="MEDIASERVER_FAILURE_MESSAGE: character U\\+000B cannot be written in XML"):
        Settings.from_env({"MEDIASERVER_FAILURE_MESSAGE": "Sorry\x0b later"})  # (a stray control character)
    assert Settings.from_env({"MEDIASERVER_FAILURE_MESSAGE": "OFF"}).failure_message == "OFF"  # off: never sent


@fail_after(15)
async def test_a_fatal_model_error_mid_call_has_twilio_tell_the_caller() -> None:
    from tests.pcm_fake import PcmModelSession
    from tests.test_pcm_e2e import fake_model, pcm_settings

    async def script(session: PcmModelSession) -> None:
        await session.wait_for(lambda: session.frames_in >= 3)
        await session.send_json({"type": "error", "message": "model weights missing", "fatal": True})

    async with fake_rest() as rest, fake_model(script) as model:
        settings = pcm_settings(model, twilio_account_sid=ACCOUNT_SID, twilio_auth_token=AUTH_TOKEN,
                                twilio_api_base=rest.base_url)  # fmt: skip
        async with running(settings) as url, phone_call(url, CALL_A, auth_token=AUTH_TOKEN) as caller:
            await caller.send_audio(to_ulaw(tone(300, 200, amplitude=0.1)))
            await caller.closed.wait()
    [update] = rest.requests
    assert said(update.value("Twiml")) == [("Say", DEFAULT), ("Hangup", "")]


@fail_after(20)
async def test_a_transfer_under_way_is_not_replaced_by_the_failure_message(caplog: pytest.LogCaptureFixture) -> None:
    """The model asked for a transfer and its connection dropped before the stream ended: the caller is being put
    through (Twilio runs the <Dial>), so no <Say> may replace it."""
    from tests.test_tools import TRANSFER_TO, model_calls

    caplog.set_level(logging.INFO, logger="mediaserver")

    async def script(session: FakeRealtimeSession) -> None:
        await session.ready.wait()
        await model_calls(session, "transfer_call", f'{{"to": "{TRANSFER_TO}"}}', "call_transfer")
        await rest.wait_requests(1)  # the <Dial> went out
        await session.abort()  # and the model's connection drops before the stream ends

    async with fake_rest() as rest, fake_openai(script) as model:
        # Twilio's answer comes after the drop, and after the call's grace for it (TRANSFER_GRACE_S, 0.25 s)
        rest.answer_delay_s = 1.5
        settings = with_rest(model, rest, transfer_numbers=TRANSFER_TO, model_ping_s=0)
        async with running(settings) as url, phone_call(url, CALL_A, auth_token=AUTH_TOKEN) as caller:
            await caller.closed.wait()
        while not rest.unanswered:  # (the fake's answer, to a client that no longer waits for it)
            await trio.sleep(0.05)
        await trio.sleep(0.2)
    assert [r.value("Twiml") for r in rest.requests] == [f'<?xml version="1.0" encoding="UTF-8"?><Response><Dial>{TRANSFER_TO}</Dial></Response>']
    assert not any("failure message" in r.getMessage() for r in caplog.records)
    # The ended call did not wait the REST client's 15 s for Twilio's answer: it hung up on it.
    assert rest.unanswered == 1
    assert any("the call ended before Twilio answered" in r.getMessage() for r in caplog.records)


@fail_after(15)
async def test_without_rest_credentials_the_call_just_ends(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mediaserver")
    async with fake_openai(reject_with=401) as model:
        async with running(openai_settings(model)) as url:  # (no Twilio credentials: development mode)
            async with phone_call(url, CALL_A) as caller:
                await caller.closed.wait()
            assert caller.close_code == 1011
    assert not any("failure message" in r.getMessage() for r in caplog.records)
