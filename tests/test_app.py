"""End-to-end tests of the server over real loopback sockets.

The server is started with ``await nursery.start(serve, settings)`` on
127.0.0.1 port 0.  Twilio is :class:`tests.fakes.FakeTwilioCaller` (webhook
first, then the Media Stream with the token from the TwiML); the model is
either the built-in echo agent or :class:`tests.fakes.FakeOpenAIServer`,
which validates every client message against the ``openai`` SDK's types.

These tests use real sockets, so they run on Trio's real clock (no
autojump); each has an absolute Trio-time limit (``fail_after``).  The
deterministic, virtual-time tests of the bridge are in tests/bridge/.
"""

from __future__ import annotations

import functools
import json
import math
import os
import socket
import logging
import re
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed
from openai.types.realtime import AudioTranscription, InputAudioBufferAppendEvent, SessionUpdateEvent
from openai.types.realtime.realtime_audio_formats import AudioPCM, AudioPCMU

import mediaserver.app as app_module
import mediaserver.server as server_module
from mediaserver.config import Settings
from mediaserver.protocol.twilio import DEFAULT_MAX_MESSAGE_BYTES
from mediaserver.server import serve

from tests.fakes import (
    FakeOpenAIServer,
    FakeRealtimeSession,
    ACCOUNT_SID,
    FakeTwilioCaller,
    Script,
    answer_call,
    band_energy_ratio,
    dominant_frequency_hz,
    fail_after,
    from_ulaw,
    http_request,
    open_ws_client,
    parse_twiml,
    pcm16,
    to_ulaw,
    tone,
    turn_script,
    twilio_signature,
    websocket_upgrade_status,
)
from tests.test_http_client import certificate, server_context  # noqa: F401  (certificate: a pytest fixture)

AUTH_TOKEN = "test-auth-token-0123456789abcdef"
API_KEY = "sk-test-not-a-real-key"
CALL_A = "CA" + "a" * 32
CALL_B = "CA" + "b" * 32


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mediaserver")


def base_settings(**changes: Any) -> Settings:
    # Constructed directly: Settings.validated() (used by from_env/with_)
    # refuses port 0, which tests need.
    # Call records go to a fresh temporary directory, never the working directory.
    values: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "provider": "echo",
        "drain_s": 0.5,
        "data_dir": tempfile.mkdtemp(prefix="mediaserver-test-"),
    }
    values.update(changes)
    return Settings(**values)


def openai_settings(server: FakeOpenAIServer, **changes: Any) -> Settings:
    return base_settings(
        provider="openai", openai_api_key=API_KEY, openai_realtime_url=server.url, **changes
    )


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[str]:
    """The server, on an ephemeral port; yields its base URL (http://127.0.0.1:PORT)."""
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(serve, settings)
        assert len(binds) == 1 and binds[0].startswith("http://127.0.0.1:"), binds
        yield binds[0]
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def fake_openai(script: Script | None = None, **options: Any) -> AsyncIterator[FakeOpenAIServer]:
    async with trio.open_nursery() as nursery:
        server: FakeOpenAIServer = await nursery.start(FakeOpenAIServer(script, **options).run)
        yield server
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def phone_call(
    base_url: str, call_sid: str = CALL_A, *, auth_token: str | None = None, token: str | None = None
) -> AsyncIterator[FakeTwilioCaller]:
    """Answer a call through the webhook, then open its Media Stream (signed if ``auth_token``)."""
    twiml = await answer_call(base_url, call_sid, auth_token=auth_token)
    parameters = dict(twiml.parameters)
    if token is not None:
        parameters["token"] = token
    caller = FakeTwilioCaller(call_sid=call_sid, custom_parameters=parameters)
    headers = []
    if auth_token is not None:
        headers.append(("X-Twilio-Signature", twilio_signature(auth_token, twiml.stream_url)))
    async with open_ws_client(twiml.stream_url, headers) as ws:
        async with caller.attached(ws):
            yield caller


async def point_at_a_closed_port(model: FakeOpenAIServer) -> None:
    """Make the server's model URL a port nobody listens on (connections are refused)."""
    closed = trio.socket.socket()
    await closed.bind(("127.0.0.1", 0))
    model.port = closed.getsockname()[1]
    closed.close()


def call_log(caplog: pytest.LogCaptureFixture, call_sid: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("mediaserver") and call_sid in r.getMessage()]


async def keep_talking(caller: FakeTwilioCaller, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Send paced silence until cancelled, as a phone line does."""
    task_status.started()
    while True:
        await caller.send_silence(100)


async def talk_until_hung_up(caller: FakeTwilioCaller, limit_s: float = math.inf) -> None:
    """Talk (paced silence, as a phone line does) until the server ends the call; at most ``limit_s``."""
    async with trio.open_nursery() as nursery:
        await nursery.start(keep_talking, caller)
        with trio.fail_after(limit_s):
            await caller.closed.wait()
        nursery.cancel_scope.cancel()


# ------------------------------------------------------------------ HTTP side


@fail_after(10)
async def test_app_healthz() -> None:
    async with running(base_settings()) as url:
        response = await http_request(url + "/healthz")
    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert json.loads(response.body) == {
        "active_calls": 0,
        "pending_calls": 0,
        "calls": 0,
        "max_calls": None,
        "instance": None,
        "status": "ok",
        "records": "ok",  # (the test's own SQLite database)
        "reactor": {"sockets": 0, "wakeups": 0, "handler_calls": 0},  # no call has used it yet
    }


@fail_after(10)
async def test_app_readyz_is_ready_with_no_limit() -> None:
    async with running(base_settings()) as url:
        response = await http_request(url + "/readyz")
    assert response.status == 200
    assert json.loads(response.body) == {"ready": True, "reason": None, "calls": 0, "max_calls": None, "instance": None}


@fail_after(10)
async def test_app_twiml_connects_the_stream_with_a_token() -> None:
    async with running(base_settings()) as url:
        port = url.rsplit(":", 1)[1]
        response = await http_request(url + "/twiml", "POST", form=[("CallSid", CALL_A), ("From", "+15550001111")])
        assert response.status == 200
        assert response.headers["content-type"] == "text/xml; charset=utf-8"
        twiml = parse_twiml(response.text)
        assert twiml.stream_url == f"ws://127.0.0.1:{port}/media-stream"
        assert set(twiml.parameters) == {"token", "CallSid"}
        assert twiml.parameters["CallSid"] == CALL_A
        assert len(twiml.parameters["token"]) >= 32
        assert twiml.hangup_after
        # Every answer gets a fresh token, and the session is pre-opened.
        second = parse_twiml((await http_request(url + "/twiml", "POST", form=[("CallSid", CALL_B)])).text)
        assert second.parameters["token"] != twiml.parameters["token"]
        health = await http_request(url + "/healthz")
        assert json.loads(health.body)["pending_calls"] == 2

        missing = await http_request(url + "/twiml", "POST", form=[("From", "+15550001111")])
        assert missing.status == 400


@fail_after(10)
async def test_app_webhook_signature_is_enforced() -> None:
    async with running(base_settings(twilio_auth_token=AUTH_TOKEN)) as url:
        form = [("CallSid", CALL_A), ("From", "+15550001111"), ("To", "+15552223333")]
        unsigned = await http_request(url + "/twiml", "POST", form=form)
        assert unsigned.status == 403
        wrong = twilio_signature("some-other-token", url + "/twiml", form)
        forged = await http_request(url + "/twiml", "POST", form=form, headers=[("X-Twilio-Signature", wrong)])
        assert forged.status == 403
        tampered = await http_request(
            url + "/twiml",
            "POST",
            form=[*form[:-1], ("To", "+19990000000")],
            headers=[("X-Twilio-Signature", twilio_signature(AUTH_TOKEN, url + "/twiml", form))],
        )
        assert tampered.status == 403
        health = await http_request(url + "/healthz")
        assert json.loads(health.body)["pending_calls"] == 0  # nothing was pre-opened

        good = twilio_signature(AUTH_TOKEN, url + "/twiml", form)
        signed = await http_request(url + "/twiml", "POST", form=form, headers=[("X-Twilio-Signature", good)])
        assert signed.status == 200
        assert parse_twiml(signed.text).parameters["CallSid"] == CALL_A

        status = [("CallSid", CALL_A), ("CallStatus", "completed"), ("CallDuration", "3")]
        assert (await http_request(url + "/call-status", "POST", form=status)).status == 403
        sig = twilio_signature(AUTH_TOKEN, url + "/call-status", status)
        signed_status = await http_request(url + "/call-status", "POST", form=status, headers=[("X-Twilio-Signature", sig)])
        assert signed_status.status == 204


@fail_after(10)
async def test_app_a_signed_webhook_cannot_be_refolded_into_new_calls() -> None:
    # Twilio signs name+value pairs with nothing between them: the fields after CallSid can be folded into
    # its value under the same signature.  Each fold would be a "new" call with its own
    # model session, past the replay limit; a signed webhook must carry a real call SID, which leaves no room.
    sid = "CA" + "0123456789abcdef" * 2
    form = [("AccountSid", "AC" + "1" * 32), ("CallSid", sid), ("CallStatus", "ringing"), ("From", "+15550001111")]
    folds = [
        [form[0], ("CallSid", sid + "CallStatusringing"), form[3]],
        [form[0], ("CallSid", sid + "CallStatusringingFrom+15550001111")],
    ]
    async with running(base_settings(twilio_auth_token=AUTH_TOKEN)) as url:
        signature = [("X-Twilio-Signature", twilio_signature(AUTH_TOKEN, url + "/twiml", form))]
        for fold in folds:
            # (the attack is real: Twilio's own validator takes the folded form under the same signature)
            assert twilio_signature(AUTH_TOKEN, url + "/twiml", fold) == signature[0][1]
            refused = await http_request(url + "/twiml", "POST", form=fold, headers=signature)
            assert refused.status == 400 and b"not a Twilio call SID" in refused.body
        assert json.loads((await http_request(url + "/healthz")).body)["pending_calls"] == 0
        answered = await http_request(url + "/twiml", "POST", form=form, headers=signature)
        assert answered.status == 200 and parse_twiml(answered.text).parameters["CallSid"] == sid


@fail_after(10)
async def test_app_a_signed_webhook_cannot_be_recut_with_a_second_call_sid() -> None:
    """The signature covers every value of a name, sorted: a captured webhook of a child leg (with ParentCallSid) can
    be re-cut so that "CallSid" appears twice, the end of "ParentCallSid" lending it the name, under the same
    signature -- with the parent's SID first.  Twilio sends each field once: a repeat is refused, on every webhook."""
    child, parent = "CA" + "1" * 32, "CA" + "2" * 32  # (the trick needs the child's SID to sort first)
    form = [("CallSid", child), ("CallStatus", "ringing"), ("From", "+15550001111"), ("ParentCallSid", parent)]
    recut = [("CallSid", parent), ("CallSid", child + "CallStatusringingFrom+15550001111Parent")]
    async with running(base_settings(twilio_auth_token=AUTH_TOKEN)) as url:
        for path in ("/twiml", "/call-status", "/outbound-twiml"):
            signature = [("X-Twilio-Signature", twilio_signature(AUTH_TOKEN, url + path, form))]
            # (the attack is real: Twilio's own validator takes the re-cut form under the same signature)
            assert twilio_signature(AUTH_TOKEN, url + path, recut) == signature[0][1]
            refused = await http_request(url + path, "POST", form=recut, headers=signature)
            assert refused.status == 400 and b"CallSid more than once" in refused.body, (path, refused.body)
        assert json.loads((await http_request(url + "/healthz")).body)["pending_calls"] == 0


@fail_after(10)
async def test_app_media_stream_upgrade_requires_signature() -> None:
    async with running(base_settings(twilio_auth_token=AUTH_TOKEN)) as url:
        stream_url = url.replace("http://", "ws://") + "/media-stream"
        assert await websocket_upgrade_status(stream_url) == 403
        forged = twilio_signature("some-other-token", stream_url)
        assert await websocket_upgrade_status(stream_url, [("X-Twilio-Signature", forged)]) == 403
        elsewhere = twilio_signature(AUTH_TOKEN, url.replace("http://", "ws://") + "/other")
        assert await websocket_upgrade_status(stream_url, [("X-Twilio-Signature", elsewhere)]) == 403
        good = twilio_signature(AUTH_TOKEN, stream_url)
        assert await websocket_upgrade_status(stream_url, [("X-Twilio-Signature", good)]) == 101


@fail_after(10)
async def test_app_stream_without_a_valid_token_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    async with fake_openai() as model, running(openai_settings(model, twilio_auth_token=AUTH_TOKEN)) as url:
        twiml = await answer_call(url, CALL_A, auth_token=AUTH_TOKEN)
        session = await model.session(0)  # pre-opened at webhook time
        await session.ready.wait()
        signature = [("X-Twilio-Signature", twilio_signature(AUTH_TOKEN, twiml.stream_url))]
        for parameters in ({"CallSid": CALL_A, "token": "not-the-token"}, {"CallSid": CALL_A}):
            caller = FakeTwilioCaller(call_sid=CALL_A, custom_parameters=parameters)
            async with open_ws_client(twiml.stream_url, signature) as ws:
                async with caller.attached(ws):
                    await caller.send_silence(100, paced=False)
                    await caller.closed.wait()
            assert caller.close_code == 1008  # refused (Twilio ignores the code; mediaserver dial reports it)
            assert caller.received == []
        # The same token for another call is refused too.
        other = FakeTwilioCaller(call_sid=CALL_B, custom_parameters=twiml.parameters)
        async with open_ws_client(twiml.stream_url, signature) as ws:
            async with other.attached(ws):
                await other.closed.wait()
        # No model session was used: the pre-opened one got no audio and no other was opened.
        assert len(model.sessions) == 1
        assert session.appends == [] and not session.closed.is_set()
        refusals = [r for r in caplog.records if "without a valid one-time token" in r.getMessage()]
        assert len(refusals) == 3


@fail_after(30)
async def test_app_instances_sharing_a_public_url_get_their_own_calls_streams(caplog: pytest.LogCaptureFixture) -> None:
    """Two instances behind one webhook URL: each call's stream comes back to the instance that answered it."""
    public = "https://voice.example.com"  # the load balancer's URL, which Twilio signs the webhook for
    instances = {name: f"https://{name}.example.com" for name in ("a", "b")}
    async with running(
        base_settings(twilio_auth_token=AUTH_TOKEN, public_url=public, instance_url=instances["a"])
    ) as url_a, running(
        base_settings(twilio_auth_token=AUTH_TOKEN, public_url=public, instance_url=instances["b"])
    ) as url_b:
        urls = {"a": url_a, "b": url_b}
        for name, url in urls.items():  # an operator can tell which instance answered
            assert json.loads((await http_request(url + "/healthz")).body)["instance"] == instances[name]
        twimls = {}
        for (name, url), call_sid in zip(urls.items(), (CALL_A, CALL_B)):
            form = [("CallSid", call_sid), ("From", "+15550001111"), ("To", "+15552223333")]
            signature = twilio_signature(AUTH_TOKEN, public + "/twiml", form)
            answer = await http_request(url + "/twiml", "POST", form=form, headers=[("X-Twilio-Signature", signature)])
            assert answer.status == 200
            twimls[name] = parse_twiml(answer.text)
            # The stream URL names this instance, not the load balancer.
            assert twimls[name].stream_url == f"wss://{name}.example.com/media-stream"

        # A webhook signed for the public URL or for this instance's own is taken; one for another instance is not.
        form = [("CallSid", "CA" + "c" * 32), ("From", "+15550001111")]
        for base, status in ((public, 200), (instances["a"], 200), (instances["b"], 403), ("https://a.example.org", 403)):
            signature = twilio_signature(AUTH_TOKEN, base + "/twiml", form)
            answer = await http_request(url_a + "/twiml", "POST", form=form, headers=[("X-Twilio-Signature", signature)])
            assert answer.status == status, base

        # The upgrade is signed for the URL in the TwiML (a TLS terminator forwards it to us as ws://).
        stream_a = url_a.replace("http://", "ws://") + "/media-stream"
        public_stream = "wss://voice.example.com/media-stream"
        for signed_url, status in ((twimls["b"].stream_url, 403), (twimls["a"].stream_url, 101), (public_stream, 101)):
            signature = twilio_signature(AUTH_TOKEN, signed_url)
            assert await websocket_upgrade_status(stream_a, [("X-Twilio-Signature", signature)]) == status

        # Each stream, at the instance that answered its call, is bridged (the echo agent plays the tone back).
        burst = to_ulaw(tone(1000, 300, amplitude=0.5))
        for (name, url), call_sid in zip(urls.items(), (CALL_A, CALL_B)):
            signature = twilio_signature(AUTH_TOKEN, twimls[name].stream_url)
            caller = FakeTwilioCaller(call_sid=call_sid, custom_parameters=twimls[name].parameters)
            async with open_ws_client(url.replace("http://", "ws://") + "/media-stream", [("X-Twilio-Signature", signature)]) as ws:
                async with caller.attached(ws):
                    await caller.send_silence(200)
                    await caller.send_audio(burst)
                    await caller.send_silence(600)
                    await caller.wait_for_audio(len(burst))
                    await caller.stop()
                    await caller.closed.wait()
            assert caller.errors == [] and caller.close_code == 1000

        # What a load balancer in front of the streams would do: B's call at A has no session or token there.
        form = [("CallSid", "CA" + "d" * 32), ("From", "+15550001111")]
        signature = twilio_signature(AUTH_TOKEN, public + "/twiml", form)
        answer = await http_request(url_b + "/twiml", "POST", form=form, headers=[("X-Twilio-Signature", signature)])
        twiml = parse_twiml(answer.text)
        caller = FakeTwilioCaller(call_sid="CA" + "d" * 32, custom_parameters=twiml.parameters)
        signature = twilio_signature(AUTH_TOKEN, twimls["a"].stream_url)
        async with open_ws_client(stream_a, [("X-Twilio-Signature", signature)]) as ws:
            async with caller.attached(ws):
                await caller.send_silence(100, paced=False)
                await caller.closed.wait()
        assert caller.received == []
        assert [r for r in call_log(caplog, "CA" + "d" * 32) if "without a valid one-time token" in r.getMessage()]


@fail_after(10)
async def test_app_a_malformed_forwarded_host_does_not_hide_the_instance_url() -> None:
    """No public URL: the webhook URL comes from the headers; a bad one is a 400 unless the instance URL matches."""
    form = [("CallSid", CALL_A), ("From", "+15550001111")]
    bad_host = ("X-Forwarded-Host", "bad host!")
    async with running(base_settings(twilio_auth_token=AUTH_TOKEN, instance_url="https://a.example.com")) as url:
        signature = ("X-Twilio-Signature", twilio_signature(AUTH_TOKEN, "https://a.example.com/twiml", form))
        assert (await http_request(url + "/twiml", "POST", form=form, headers=[bad_host, signature])).status == 200
        wrong = ("X-Twilio-Signature", twilio_signature(AUTH_TOKEN, "https://b.example.com/twiml", form))
        assert (await http_request(url + "/twiml", "POST", form=form, headers=[bad_host, wrong])).status == 403
    async with running(base_settings(twilio_auth_token=AUTH_TOKEN)) as url:
        assert (await http_request(url + "/twiml", "POST", form=form, headers=[bad_host, signature])).status == 400


# ----------------------------------------------------------------- echo agent


@fail_after(20)
async def test_app_echo_call_plays_the_burst_back(caplog: pytest.LogCaptureFixture) -> None:
    burst = to_ulaw(tone(1000, 500, amplitude=0.5))
    async with running(base_settings()) as url, phone_call(url) as caller:
        await caller.send_silence(400)
        burst_end_s = await caller.say_and_hear_the_echo(burst)
        await caller.stop()
        with trio.fail_after(1):
            await caller.closed.wait()
    assert caller.errors == []
    assert caller.close_code == 1000
    received = from_ulaw(caller.received_audio)
    # The reply is the utterance: 100 ms pre-roll + 500 ms burst + 400 ms hangover.
    assert 900 * 8 <= len(received) <= 1100 * 8
    assert all(m.at_s > burst_end_s for m in caller.received)  # played back after the caller stopped talking
    # Find the burst in the reply by cross-correlation with what was sent.
    sent = from_ulaw(burst).astype(np.float64)
    corr = np.correlate(received.astype(np.float64), sent, mode="valid")
    lag = int(np.argmax(np.abs(corr)))
    echoed = received[lag : lag + len(sent)]
    assert 60 * 8 <= lag <= 140 * 8  # after about 100 ms of pre-roll
    assert dominant_frequency_hz(echoed, 8000) == pytest.approx(1000, abs=16)
    assert band_energy_ratio(echoed, 8000, 1000) > 0.95
    assert np.sqrt(np.mean(echoed.astype(np.float64) ** 2)) == pytest.approx(0.5 * 32767 / np.sqrt(2), rel=0.1)
    # Everything sent was played and every mark came back as played.
    assert [e.cleared for e in caller.echoes] == [False] * len(caller.echoes)
    assert sum(e.audio_bytes for e in caller.echoes) == len(caller.received_audio)
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if "ended" in r.getMessage()]
    assert "ended (twilio sent stop)" in ended


# --------------------------------------------------------------- OpenAI (fake)


@pytest.mark.parametrize(("wss", "chunk_ms"), [(False, 40), (True, 40), (False, 20)], ids=["ws", "wss", "ws-chunk-20ms"])
@fail_after(20)
async def test_app_openai_call_pcmu_passthrough(
    wss: bool, chunk_ms: int, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """Byte-exact both ways; over ``wss://`` too, through the lean TLS stream (mediaserver.transport.tls);
    in MEDIASERVER_CHUNK_MS chunks (40 ms by default)."""
    tls = None
    if wss:  # the server trusts our self-signed certificate the way a deployment trusts a CA bundle
        monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
        tls = server_context(certificate)
    reply = to_ulaw(tone(440, 1000, amplitude=0.3)) + to_ulaw(tone(660, 220, amplitude=0.3))  # not a chunk multiple
    script = turn_script(reply, after_appends=25, chunk_bytes=1234)  # answer after 500 ms of caller audio
    speech = to_ulaw(tone(300, 500, amplitude=0.2))
    changes = {} if chunk_ms == 40 else {"chunk_ms": chunk_ms}  # (the default, unset)
    async with fake_openai(script, tls=tls) as model, running(openai_settings(model, **changes)) as url:
        assert model.url.startswith("wss://" if wss else "ws://")
        async with phone_call(url) as caller:
            await caller.send_audio(speech)
            await caller.wait_for_audio(len(reply))
            await caller.send_silence(200)
            await caller.wait_quiet(0.2)
            await caller.stop()
            await caller.closed.wait()
        session = await model.session(0)
        await session.closed.wait()

    assert caller.errors == []
    # Uplink: the caller's µ-law frames, byte for byte and in order.
    assert session.appends == caller.sent_frames
    assert bytes(session.audio_in) == b"".join(caller.sent_frames)
    # Downlink: the model's µ-law, byte for byte, in chunk_ms chunks plus the remainder, a mark after each.
    assert caller.received_audio == reply
    size = 8 * chunk_ms
    assert [len(m.payload) for m in caller.received] == [size] * (len(reply) // size) + [len(reply) % size] * (len(reply) % size > 0)
    assert [e.cleared for e in caller.echoes] == [False] * len(caller.received)
    # The session was configured for G.711 µ-law both ways, on the GA endpoint, with our key.
    assert session.path == "/v1/realtime?model=gpt-realtime-2.1"
    update = session.received[0][1]
    assert isinstance(update, SessionUpdateEvent)
    assert update.session.audio.input.format == AudioPCMU(type="audio/pcmu")
    assert update.session.audio.output.format == AudioPCMU(type="audio/pcmu")
    # The caller's words are transcribed (for the call record): the API does not unless asked.
    assert update.session.audio.input.transcription == AudioTranscription(model="gpt-live-transcribe")
    assert set(session.types()) == {"session.update", "input_audio_buffer.append"}
    assert all(isinstance(m, InputAudioBufferAppendEvent) for _, m in session.received[1:])


@fail_after(20)
async def test_app_openai_barge_in_clears_and_truncates_at_what_was_heard(caplog: pytest.LogCaptureFixture) -> None:
    reply = to_ulaw(tone(440, 3000, amplitude=0.3))
    response: list[Any] = []
    go = trio.Event()

    async def script(session: FakeRealtimeSession) -> None:
        await session.wait_appends(5)
        response.append(await session.respond(reply, chunk_bytes=4000, done=False))  # still generating
        await go.wait()
        await session.speech_started()

    async with fake_openai(script) as model, running(openai_settings(model)) as url, phone_call(url) as caller:
        async with trio.open_nursery() as nursery:
            await nursery.start(keep_talking, caller)
            # Let about 600 ms play, then barge in with the caller's echoes held, so that no echo crosses our
            # clear on the wire, however long the clear takes (a stalled machine): which marks the server had
            # before it is then exact.
            await caller.wait_for(lambda: sum(not e.cleared for e in caller.echoes) >= 15)
            await caller.hold_echoes()
            barge_in_s = trio.current_time()
            go.set()
            clear = await caller.wait_for_clear()
            caller.release_echoes()
            session = await model.session(0)
            await session.wait_for(lambda: bool(session.truncates))
            [record] = response
            # Late audio of the interrupted item must not be played.
            await session.audio_delta(record, to_ulaw(tone(440, 500, amplitude=0.3)))
            await session.finish(record, status="cancelled")
            # A new response after the barge-in plays normally.
            fresh = to_ulaw(tone(880, 400, amplitude=0.3))
            await session.respond(fresh)
            await caller.wait_for(lambda: caller.received_audio.endswith(fresh))
            nursery.cancel_scope.cancel()
        await caller.stop()
        await caller.closed.wait()

    assert caller.errors == []
    assert clear.at_s - barge_in_s < 1.0  # at once, not after the 2.4 s of reply buffered at Twilio (and a margin for CI)
    assert len(caller.clears) == 1
    [(_, truncate)] = session.truncates
    assert truncate.item_id == record.item_id
    assert truncate.content_index == 0
    # Exactly the audio whose marks were echoed as played before the clear ...
    assert clear.played_marked_bytes > 0 and clear.played_marked_bytes % 320 == 0
    assert truncate.audio_end_ms == clear.played_marked_bytes // 8
    # ... never more than was sent to the caller (or produced by the model).
    before_clear = sum(len(m.payload) for m in caller.received if m.at_s <= clear.at_s)
    assert truncate.audio_end_ms * 8 <= before_clear < len(reply)
    assert clear.dropped_bytes > 0  # the clear did cut buffered audio
    # After the clear: only the fresh response arrived, and the cleared marks came back as such.
    after = b"".join(m.payload for m in caller.received if m.at_s > clear.at_s)
    assert after == fresh
    assert any(e.cleared for e in caller.echoes)
    assert all(not e.cleared for e in caller.echoes if e.at_s != clear.at_s)
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert "ended (twilio sent stop)" in ended and "barge-ins 1;" in ended


@fail_after(10)
async def test_app_stop_closes_the_model_socket_within_a_second() -> None:
    async with fake_openai() as model, running(openai_settings(model)) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(200)
            session = await model.session(0)
            await session.wait_appends(10)
            await caller.stop()
            await session.closed.wait()
            assert caller.stopped_at_s is not None
            assert session.closed_at_s is not None
            assert session.closed_at_s - caller.stopped_at_s < 1.0
            assert session.close_code == 1000  # a clean close handshake
            await caller.closed.wait()
            assert caller.close_code == 1000


@fail_after(10)
async def test_app_caller_dropping_the_connection_ends_the_call(caplog: pytest.LogCaptureFixture) -> None:
    async with fake_openai() as model, running(openai_settings(model)) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(200)
            session = await model.session(0)
            await session.wait_appends(10)
            await caller.abort()  # no stop: the network went away
            await session.closed.wait()
            assert caller.stopped_at_s is not None and session.closed_at_s is not None
            assert session.closed_at_s - caller.stopped_at_s < 1.0
        await trio.sleep(0.05)  # let the call's log line out
        assert json.loads((await http_request(url + "/healthz")).body)["active_calls"] == 0
    assert any(" ended (" in r.getMessage() for r in call_log(caplog, CALL_A))


@fail_after(15)
async def test_app_shutdown_keeps_serving_its_calls_while_they_drain(caplog: pytest.LogCaptureFixture) -> None:
    """Draining: new calls are refused, but the listener stays open: /healthz says so (503, for load balancers),
    the stream of a call answered just before still comes and is bridged, Twilio's status callbacks are recorded;
    and the server stops as soon as its calls have ended, well before the drain deadline."""
    shutdown = trio.Event()
    stopped = trio.Event()

    async def server(settings: Settings, *, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(settings, shutdown_trigger=shutdown.wait, task_status=task_status)
        stopped.set()

    async with fake_openai() as model, trio.open_nursery() as nursery:
        [url] = await nursery.start(server, openai_settings(model, drain_s=8.0))
        async with phone_call(url) as caller:
            await caller.send_silence(100)
            session = await model.session(0)
            await session.wait_appends(5)
            twiml_b = await answer_call(url, CALL_B)  # answered; its stream comes only after the shutdown began
            shutdown.set()
            await trio.sleep(0.2)
            health = await http_request(url + "/healthz")
            assert health.status == 503 and json.loads(health.body)["status"] == "draining"
            assert json.loads(health.body)["active_calls"] == 1
            ready = await http_request(url + "/readyz")
            assert ready.status == 503 and json.loads(ready.body)["reason"] == "draining"
            form = [("CallSid", "CA" + "9" * 32), ("AccountSid", ACCOUNT_SID), ("From", "+15550001111")]
            refused = await http_request(url + "/twiml", "POST", form=form)  # a new call: refused, with a spoken reason
            assert refused.status == 200 and "busy" in refused.text and "<Stream" not in refused.text
            # the live call goes on, and the one answered before the shutdown is bridged when its stream comes
            await caller.send_silence(100)
            await session.wait_appends(10)
            b = FakeTwilioCaller(call_sid=CALL_B, custom_parameters=dict(twiml_b.parameters))
            assert twiml_b.stream_url is not None
            async with open_ws_client(twiml_b.stream_url, []) as ws, b.attached(ws):
                await b.send_silence(100)
                second = await model.session(1)
                await second.wait_appends(5)
                await b.stop()
                await b.closed.wait()
            status = [("CallSid", CALL_B), ("CallStatus", "completed"), ("CallDuration", "3")]
            assert (await http_request(url + "/call-status", "POST", form=status)).status == 204
            await caller.stop()
            await caller.closed.wait()
        ended_s = trio.current_time()
        with trio.fail_after(5):  # not the 8 s drain deadline: nothing is left to wait for
            await stopped.wait()
        assert trio.current_time() - ended_s < 4
    assert b.errors == [] and caller.errors == []
    ends = [r.getMessage() for r in caplog.records if " ended (" in r.getMessage()]
    assert any(CALL_A in m and "ended (twilio sent stop)" in m for m in ends)
    assert any(CALL_B in m and "ended (twilio sent stop)" in m for m in ends)


@fail_after(10)
async def test_app_one_of_several_instances_draining_refuses_webhooks_with_503_for_twilio_s_fallback() -> None:
    """Behind a load balancer a draining instance answers a new call's webhook with an error, so that Twilio tries
    the number's fallback URL (another instance) instead of playing the caller a refusal."""
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        settings = base_settings(drain_s=3.0, instance_url="https://n1.voice.example.com")
        [url] = await nursery.start(functools.partial(serve, settings, shutdown_trigger=shutdown.wait))
        await answer_call(url, CALL_B)  # answered: its stream keeps the drain going
        shutdown.set()
        await trio.sleep(0.3)
        form = [("CallSid", "CA" + "9" * 32), ("AccountSid", ACCOUNT_SID), ("From", "+15550001111")]
        refused = await http_request(url + "/twiml", "POST", form=form)
        assert refused.status == 503 and refused.headers["retry-after"] == "1"
        nursery.cancel_scope.cancel()


@fail_after(10)
async def test_app_max_calls_turns_new_calls_away_busy_or_with_503_for_another_instance() -> None:
    """MEDIASERVER_MAX_CALLS: a webhook past the limit gets a spoken "busy" and no session (one of several
    instances: a 503, so that Twilio tries the fallback URL); /healthz shows the limit, /metrics the refusals."""
    for instance_url in (None, "https://n1.voice.example.com"):
        async with running(base_settings(max_calls=1, instance_url=instance_url)) as url:
            await answer_call(url, CALL_A)  # answered: it holds the only place until its stream has come and gone
            form = [("CallSid", CALL_B), ("AccountSid", ACCOUNT_SID), ("From", "+15550001111")]
            refused = await http_request(url + "/twiml", "POST", form=form)
            if instance_url is None:
                assert refused.status == 200 and "busy" in refused.text and "<Stream" not in refused.text
            else:
                assert refused.status == 503 and refused.headers["retry-after"] == "1"
                assert refused.body == b"this instance is at its call limit"
                assert refused.headers["content-type"].startswith("text/plain")
            health = json.loads((await http_request(url + "/healthz")).body)
            assert (health["status"], health["pending_calls"], health["calls"], health["max_calls"]) == ("ok", 1, 1, 1)
            ready = await http_request(url + "/readyz")  # (a load balancer's active check: send new calls elsewhere)
            assert ready.status == 503
            assert json.loads(ready.body) == {
                "ready": False, "reason": "at_capacity", "calls": 1, "max_calls": 1, "instance": instance_url
            }
            metrics = (await http_request(url + "/metrics")).text
            assert 'mediaserver_streams_refused_total{reason="at_capacity"} 1' in metrics.splitlines()
            # Twilio retrying the webhook of the call answered: the same session, not a refusal (that would hang up)
            again = await http_request(url + "/twiml", "POST", form=[("CallSid", CALL_A), *form[1:]])
            assert parse_twiml(again.text).stream_url is not None


@fail_after(10)
async def test_app_a_final_status_callback_closes_the_model_session_of_a_call_that_never_streamed() -> None:
    """The caller hangs up while the webhook is answered: Twilio's completed callback (signed) closes the
    pre-opened model session at once, not at MEDIASERVER_STREAM_TIMEOUT_S, and frees its place."""
    async with fake_openai() as model:
        settings = openai_settings(model, twilio_auth_token=AUTH_TOKEN, max_calls=1, stream_timeout_s=60.0)
        async with running(settings) as url:
            await answer_call(url, CALL_B, auth_token=AUTH_TOKEN)
            session = await model.session(0)
            await session.ready.wait()
            assert json.loads((await http_request(url + "/readyz")).body)["reason"] == "at_capacity"
            status = [("CallSid", CALL_B), ("AccountSid", ACCOUNT_SID), ("CallStatus", "completed"), ("CallDuration", "0")]
            sig = twilio_signature(AUTH_TOKEN, url + "/call-status", status)
            sent_s = trio.current_time()
            response = await http_request(url + "/call-status", "POST", form=status, headers=[("X-Twilio-Signature", sig)])
            assert response.status == 204
            with trio.fail_after(2):
                await session.closed.wait()
            assert session.closed_at_s is not None and session.closed_at_s - sent_s < 1.5
            health = json.loads((await http_request(url + "/healthz")).body)
            assert (health["pending_calls"], health["calls"]) == (0, 0)
            assert (await http_request(url + "/readyz")).status == 200
            metrics = (await http_request(url + "/metrics")).text.splitlines()
            assert "mediaserver_model_sessions_open 0" in metrics


@fail_after(10)
async def test_app_shutdown_cancels_what_is_left_at_the_drain_deadline(caplog: pytest.LogCaptureFixture) -> None:
    shutdown = trio.Event()
    async with fake_openai() as model, trio.open_nursery() as nursery:
        settings = openai_settings(model, drain_s=3.0)
        [url] = await nursery.start(functools.partial(serve, settings, shutdown_trigger=shutdown.wait))
        async with phone_call(url) as caller:
            await caller.send_silence(100)
            session = await model.session(0)
            await session.wait_appends(5)
            await answer_call(url, CALL_B)  # pre-opened, its stream never comes
            waiting = await model.session(1)
            await waiting.ready.wait()
            shutdown_s = trio.current_time()
            shutdown.set()
            await trio.sleep(0.2)
            await caller.send_silence(100)
            await session.wait_appends(10)
            assert not caller.closed.is_set()
            await session.closed.wait()  # at the drain deadline the call is cancelled
            assert session.closed_at_s is not None
            assert 3.0 <= session.closed_at_s - shutdown_s < 4.5
            assert session.close_code == 1000
            await caller.closed.wait()
            await waiting.closed.wait()  # and the session whose stream never came is closed
            assert waiting.closed_at_s is not None and waiting.closed_at_s - shutdown_s < 5.0
    # the call's end says the shutdown cut it off (not "Twilio disconnected or shutdown")
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert " ended (cancelled: the server shut down before the call ended (MEDIASERVER_DRAIN_S))" in ended


@pytest.mark.parametrize("how", ["close", "abort", "malformed"])
@fail_after(10)
async def test_app_model_failure_hangs_up_the_call(how: str, caplog: pytest.LogCaptureFixture) -> None:
    async def script(session: FakeRealtimeSession) -> None:
        await session.wait_appends(10)
        if how == "close":
            await session.close(1011, "internal error")
        elif how == "abort":
            await session.abort()
        else:
            await session.ws.send_message('{"type": "response.output_audio.delta", "delta": 7}')  # deliberately invalid

    async with fake_openai(script) as model, running(openai_settings(model)) as url:
        async with phone_call(url) as caller:
            await talk_until_hung_up(caller, 2)
        session = await model.session(0)
        assert caller.closed_at_s is not None and session.closed_at_s is not None
        assert caller.closed_at_s - session.closed_at_s < 1.0
        # a failed call's stream says so (Twilio ignores it; mediaserver dial reports the call failed)
        assert caller.close_code == 1011 and caller.close_reason.startswith("provider ended: openai ")
        assert len(caller.close_reason.encode()) <= 123
        health = await http_request(url + "/healthz")
        assert json.loads(health.body)["active_calls"] == 0
    # One line says how the call failed (a warning), as for a Twilio protocol error: not a second one before it.
    lines = [r for r in call_log(caplog, CALL_A) if r.levelno >= logging.INFO]
    [webhook, started, ended] = lines
    assert " webhook from " in webhook.getMessage() and " started, " in started.getMessage()
    assert ended.levelno == logging.WARNING
    if how == "malformed":
        assert "ended (provider ended: openai protocol error: " in ended.getMessage()
    else:
        assert "ended (provider ended: openai connection closed" in ended.getMessage()
    if how == "close":
        assert "1011" in ended.getMessage()


class Relay:
    """A loopback TCP relay to ``port``; :meth:`freeze` makes it a dead network path (nothing read or written)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port: int | None = None
        self.frozen = False

    def freeze(self) -> None:
        self.frozen = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listener.socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._relay, [listener])

    async def _relay(self, near: trio.SocketStream) -> None:
        far = await trio.open_tcp_stream("127.0.0.1", self.target)

        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            while data := await source.receive_some(65536):
                if self.frozen:
                    await trio.sleep_forever()  # (nor reads any more: the sender's buffers fill)
                await sink.send_all(data)
            await sink.send_eof()

        async with far, near, trio.open_nursery() as nursery:
            nursery.start_soon(pump, near, far)
            nursery.start_soon(pump, far, near)


@fail_after(15)
async def test_app_a_pre_opened_session_is_not_taken_for_dead_while_no_one_reads_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Until its stream comes, nothing reads a pre-opened session: a pong to a ping would go unread."""
    async with fake_openai() as model, running(openai_settings(model, model_ping_s=0.3)) as url:
        twiml = await answer_call(url, CALL_A)
        await trio.sleep(2.0)  # more than three quiet windows and their pings
        caller = FakeTwilioCaller(call_sid=CALL_A, custom_parameters=dict(twiml.parameters))
        async with open_ws_client(twiml.stream_url, []) as ws, caller.attached(ws):
            await caller.send_silence(1000)
            session = await model.session(0)
            await session.wait_appends(40)
            assert not caller.closed.is_set()
            await caller.stop()
    assert not any("nor answered" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("frozen", [True, False, "off"])
@fail_after(15)
async def test_app_a_model_that_stops_answering_is_found_by_a_ping_and_the_call_ends(
    frozen: bool | str, caplog: pytest.LogCaptureFixture
) -> None:
    """A frozen model (or a dead network path) was found only once the socket's send buffer filled: minutes of
    silence for the caller, billed.  A quiet model that answers pings is left alone; with the ping off, a frozen
    one is not found (MEDIASERVER_MODEL_PING_S=0)."""
    async with fake_openai() as model, trio.open_nursery() as nursery:
        relay = Relay(model.port or 0)
        await nursery.start(relay.run)
        model.port = relay.port  # the server reaches the model through the relay
        async with running(openai_settings(model, model_ping_s=0.0 if frozen == "off" else 0.3)) as url:
            async with phone_call(url) as caller:
                session = await model.session(0)
                await session.ready.wait()
                async with trio.open_nursery() as talking:
                    await talking.start(keep_talking, caller)
                    if frozen is True:
                        relay.freeze()
                        frozen_s = trio.current_time()
                        await caller.closed.wait()
                        # a quiet window (0.3 s, maybe begun before), the ping's wait (0.3 s); margin for CI
                        assert trio.current_time() - frozen_s < 0.3 * 3 + 2.0
                    else:
                        if frozen == "off":
                            relay.freeze()
                        await trio.sleep(3.0)  # a quiet model, ten windows: it answers each ping
                        assert not caller.closed.is_set()
                    talking.cancel_scope.cancel()
                if frozen is not True:
                    await caller.stop()
            if frozen == "off":
                await trio.sleep(1.5)  # (the close handshake with a frozen model: 1 s, then the socket is dropped)
            metrics = (await http_request(url + "/metrics")).text.splitlines()
            assert "mediaserver_model_sessions_open 0" in metrics
        nursery.cancel_scope.cancel()
    [ended] = [r.getMessage() for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    if frozen is True:
        assert caller.close_code == 1011
        assert "provider ended: " in ended, ended
        [quiet] = re.findall(r"the model sent nothing for ([0-9.]+) s, nor answered a ping", ended)
        assert 0.6 <= float(quiet) <= 0.3 * 3 + 2.0  # a quiet interval and the ping's wait, at the least
    else:
        assert "nor answered" not in ended and "provider ended" not in ended, ended


@pytest.mark.parametrize("failure", ["refused", "http-401", "untrusted-certificate"])
@fail_after(10)
async def test_app_unreachable_model_hangs_up_the_call(
    failure: str, caplog: pytest.LogCaptureFixture, certificate: tuple[Path, Path]  # noqa: F811
) -> None:
    tls = server_context(certificate) if failure == "untrusted-certificate" else None  # and SSL_CERT_FILE not set
    async with fake_openai(reject_with=401 if failure == "http-401" else None, tls=tls) as model:
        if failure == "refused":
            await point_at_a_closed_port(model)
        async with running(openai_settings(model)) as url:
            async with phone_call(url) as caller:
                await caller.send_silence(100)
                await caller.closed.wait()
            assert caller.received == [] and caller.close_code == 1011  # not served
            # The server is unharmed and ready for the next call.
            health = json.loads((await http_request(url + "/healthz")).body)
            assert (health["status"], health["active_calls"], health["pending_calls"]) == ("ok", 0, 0)
            assert health["reactor"]["sockets"] == 0  # nothing of the call is left registered
    messages = [r.getMessage() for r in call_log(caplog, CALL_A)]
    expected = {
        "refused": "cannot connect to ws://127.0.0.1",
        "http-401": "rejected the connection with HTTP 401: Incorrect API key provided: sk-***ey. You can find",
        "untrusted-certificate": "certificate verify failed",
    }[failure]
    assert any("could not open the model session: openai: " in m and expected in m for m in messages), messages
    assert any("no model session" in m and "hanging up" in m for m in messages), messages
    errors = [r.getMessage() for r in call_log(caplog, CALL_A) if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "could not open the model session" in errors[0], errors  # one error line, not two
    assert not any(API_KEY in r.getMessage() for r in caplog.records)  # the key is never logged


@fail_after(10)
async def test_app_preopened_session_closes_when_no_stream_arrives(caplog: pytest.LogCaptureFixture) -> None:
    async with fake_openai() as model, running(openai_settings(model, stream_timeout_s=0.5)) as url:
        webhook_s = trio.current_time()
        await answer_call(url, CALL_A)
        session = await model.session(0)
        await session.closed.wait()
        assert session.closed_at_s is not None
        assert 0.5 <= session.closed_at_s - webhook_s < 0.5 + 2.0  # (not the 15 s default; a margin for a stalled CI)
        assert session.appends == []
        health = await http_request(url + "/healthz")
        assert json.loads(health.body)["pending_calls"] == 0
    assert any("no media stream within 0.5 s" in r.getMessage() for r in call_log(caplog, CALL_A))


@fail_after(20)
async def test_app_malformed_message_ends_only_that_call(caplog: pytest.LogCaptureFixture) -> None:
    burst = to_ulaw(tone(1000, 300, amplitude=0.5))
    async with running(base_settings()) as url:
        async with phone_call(url, CALL_A) as bad, phone_call(url, CALL_B) as good:
            await bad.send_silence(100)
            await good.send_silence(100)
            before = len(call_log(caplog, CALL_A))
            await bad.send_raw('{"event": "media", "sequenceNumber": "7", "media": ')  # truncated JSON
            await bad.closed.wait()
            assert bad.close_code == 1002 and bad.close_reason.startswith("protocol error: message is not valid JSON")
            # The other call still works: it gets its burst echoed.
            await good.send_audio(burst)
            await good.send_silence(600)
            await good.wait_for_audio(len(burst))
            await good.wait_quiet(0.2)
            assert not good.closed.is_set()
            await good.stop()
            await good.closed.wait()
    lines = [r for r in call_log(caplog, CALL_A)][before:]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].getMessage().startswith(f"call {CALL_A}: ended (protocol error: message is not valid JSON")
    assert dominant_frequency_hz(from_ulaw(good.received_audio), 8000) == pytest.approx(1000, abs=16)
    assert good.errors == [] and bad.errors == []


@fail_after(10)
async def test_app_a_stream_that_breaks_the_websocket_protocol_ends_with_a_protocol_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """We close it (1009 for a message over the limit): a protocol error, one warning, not a caller who hung up."""
    async with running(base_settings()) as url, phone_call(url) as caller:
        await caller.send_silence(100)
        await caller.send_raw("x" * (DEFAULT_MAX_MESSAGE_BYTES + 1))
        await caller.closed.wait()
        assert caller.close_code == 1009
    [ended] = [r for r in call_log(caplog, CALL_A) if " ended (" in r.getMessage()]
    assert ended.levelno == logging.WARNING
    assert " ended (protocol error: the Twilio stream broke the WebSocket protocol (1009 " in ended.getMessage()


@fail_after(10)
async def test_app_a_stream_that_breaks_the_websocket_protocol_before_start_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Before ``start`` too, a violation is logged as one (with why), not as a caller who hung up."""
    async with running(base_settings()) as url:
        twiml = await answer_call(url, CALL_A)
        async with open_ws_client(twiml.stream_url) as ws:
            await ws.send_message("x" * (DEFAULT_MAX_MESSAGE_BYTES + 1))
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason.code == 1009
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stream closed before it started")]
    assert line.startswith(
        "stream closed before it started: protocol error: the Twilio stream broke the WebSocket protocol (1009 "
    ), line


@fail_after(10)
async def test_app_idle_stream_is_hung_up(caplog: pytest.LogCaptureFixture) -> None:
    async with running(base_settings(idle_timeout_s=0.3)) as url, phone_call(url) as caller:
        await caller.send_silence(100, paced=False)
        last_s = trio.current_time()
        await caller.closed.wait()
        assert caller.closed_at_s is not None
        assert 0.3 <= caller.closed_at_s - last_s < 0.3 + 2.0  # (not the 30 s default; a margin for a stalled CI)
    assert any("ended (idle: nothing from Twilio for 0.3 s)" in r.getMessage() for r in call_log(caplog, CALL_A))


@fail_after(20)
async def test_app_openai_pcm24k_resamples_both_ways() -> None:
    reply = tone(440, 1000, 24000, amplitude=0.3).tobytes()

    async def script(session: FakeRealtimeSession) -> None:
        await session.wait_appends(60)  # 1.2 s: the whole tone has arrived
        await session.respond(reply, chunk_bytes=4800)

    async with fake_openai(script) as model, running(openai_settings(model, openai_audio="pcm24k")) as url:
        async with phone_call(url) as caller:
            await caller.send_silence(100, paced=False)
            await caller.send_audio(to_ulaw(tone(1000, 1000, amplitude=0.3)), paced=False)
            await caller.send_silence(100, paced=False)
            await caller.wait_for_audio(8000)  # the whole reply (a stall could end a quiet wait early) ...
            await caller.wait_quiet(0.2)  # ... and whatever else would come
            await caller.stop()
            await caller.closed.wait()
        session = await model.session(0)
    update = session.received[0][1]
    assert update.session.audio.input.format == AudioPCM(type="audio/pcm", rate=24000)
    assert update.session.audio.output.format == AudioPCM(type="audio/pcm", rate=24000)
    # Uplink: 8 kHz µ-law became 24 kHz PCM16 with the tone still at 1 kHz.
    uplink = pcm16(bytes(session.audio_in))
    assert len(uplink) == 3 * 8 * 1200  # 1.2 s at 24 kHz, no samples lost or added
    middle = uplink[24000 * 3 // 10 : 24000 * 9 // 10]  # 200..800 ms of the tone
    assert dominant_frequency_hz(middle, 24000) == pytest.approx(1000, abs=5)
    assert band_energy_ratio(middle, 24000, 1000) > 0.98
    # Downlink: 24 kHz PCM16 became 8 kHz µ-law with the tone still at 440 Hz.
    downlink = from_ulaw(caller.received_audio)
    assert 0 <= len(downlink) - 8000 <= 20  # 1 s, and the resampler's delay (its tail plays with the reply)
    assert dominant_frequency_hz(downlink[1600:6400], 8000) == pytest.approx(440, abs=5)
    assert band_energy_ratio(downlink[1600:6400], 8000, 440) > 0.98
    assert caller.errors == []


@fail_after(10)
async def test_app_a_webhook_body_that_trickles_in_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client sending its body a byte at a time cannot hold a connection for Quart's default minute."""
    monkeypatch.setattr(app_module, "BODY_TIMEOUT_S", 0.5)
    async with running(base_settings()) as url:
        port = int(url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(
                b"POST /twiml HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: 1000\r\n\r\nCallSid=CA"
            )
            started = trio.current_time()
            response = await _response_head(stream, 5)
            assert response.startswith(b"HTTP/1.1 408"), response[:80]
            assert trio.current_time() - started < 2.0
            # ... and its connection is closed: trickling on holds nothing (Hypercorn would read the rest to reuse it).
            assert await _closed_while_trickling(stream)


async def _response_head(stream: trio.SocketStream, timeout_s: float) -> bytes:
    """What the server sent until its answer's head was complete (or it closed, or ``timeout_s`` passed)."""
    response = b""
    with trio.move_on_after(timeout_s):
        while b"\r\n\r\n" not in response:
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            response += chunk
    return response


async def _closed_while_trickling(stream: trio.SocketStream) -> bool:
    """True if the server closes ``stream`` within 2 s while a byte of the body goes every 0.2 s."""
    with trio.move_on_after(2):
        async with trio.open_nursery() as nursery:
            async def trickle() -> None:
                while True:
                    await trio.sleep(0.2)
                    try:
                        await stream.send_all(b"x")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

            nursery.start_soon(trickle)
            while True:
                try:
                    data = await stream.receive_some(4096)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    nursery.cancel_scope.cancel()
                    return True
    return False


@fail_after(15)
@pytest.mark.parametrize(
    ("path", "length", "status"),
    [("/nonexistent", 1000, b"404"), ("/healthz", 1000, b"405"), ("/twiml", 1000, b"403"), ("/twiml", 1_000_000, b"413")],
)
async def test_app_an_answer_before_the_body_was_read_closes_the_connection(path: str, length: int, status: bytes) -> None:
    """A 404, 405, 403 (unsigned) or 413 sent at once with the body still to come: the connection closes, nothing is
    held however slowly the rest trickles in."""
    async with running(base_settings(twilio_auth_token="tok")) as url:  # (signed: /twiml answers 403 at once)
        port = int(url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {length}\r\n\r\nx".encode())
            response = await _response_head(stream, 3)
            assert response.startswith(b"HTTP/1.1 " + status), response[:80]
            assert b"connection: close" in response.lower()
            assert await _closed_while_trickling(stream)
        # A request whose body was read whole keeps its connection for the next one (keep-alive as before).
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            for _ in range(2):
                await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                response = b""
                while b'"status"' not in response:
                    response += await stream.receive_some(4096)
                assert response.startswith(b"HTTP/1.1 200") and b"connection: close" not in response.lower()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _fds_settle_at(count: int, within_s: float) -> bool:
    with trio.move_on_after(within_s):
        while _open_fds() != count:
            await trio.sleep(0.05)
        return True
    return False


async def _pipelined_client(port: int, requests: int) -> trio.socket.SocketType:
    """A client with a tiny receive buffer that pipelines ``requests`` GETs and reads none of the answers."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    data = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * requests
    while data:
        data = data[await sock.send(data):]
    return sock


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts file descriptors in /proc")
@pytest.mark.parametrize("client", ["stops_reading", "leaves"])
@fail_after(15)
async def test_app_a_client_that_stops_reading_or_leaves_mid_pipeline_does_not_hold_its_connection(
    client: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Pipelined requests whose answers the client does not read: Hypercorn's send waits (shielded, no timeout),
    and a client that then leaves left the connection and its file descriptor open for ever (a few hundred such
    and the server was out of descriptors).  Now: closed HTTP_SEND_LIMIT_S after the client stopped reading, or
    GONE_GRACE_S after it was found gone."""
    caplog.set_level(logging.INFO, logger="mediaserver.http")
    monkeypatch.setattr(server_module, "HTTP_SEND_LIMIT_S", 1.0)
    async with running(base_settings()) as url:
        port = int(url.rsplit(":", 1)[1])
        await http_request(url + "/healthz")  # (whatever a first request opens, open before counting)
        await trio.sleep(0.2)
        before = _open_fds()
        sock = await _pipelined_client(port, 500)
        await trio.sleep(0.5)
        assert _open_fds() == before + 2  # the client's socket, and the server's
        if client == "leaves":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST
            sock.close()
            assert await _fds_settle_at(before, 5)
        else:
            assert await _fds_settle_at(before + 1, 5)  # the server's side is closed; the client still holds its own
            sock.close()
        # the server still serves
        assert (await http_request(url + "/healthz")).status == 200
    closed = [r.getMessage() for r in caplog.records if "HTTP connection from" in r.getMessage()]
    assert closed and closed[0].endswith("the client read nothing for 1 s" if client == "stops_reading"
                                         else ("the client read nothing for 1 s", "the client is gone")), closed


@fail_after(10)
async def test_app_http_2_with_prior_knowledge_is_served() -> None:
    """(An h2c upstream: Envoy, a sidecar, a load balancer speaking HTTP/2 to its backends.)"""
    import h2.config
    import h2.connection
    import h2.events

    async with running(base_settings()) as url:
        port = int(url.rsplit(":", 1)[1])
        conn = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "GET"), (":path", "/healthz"), (":scheme", "http"),
                              (":authority", f"127.0.0.1:{port}")], end_stream=True)  # fmt: skip
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(conn.data_to_send())
            status, body, ended = None, b"", False
            while not ended:
                for event in conn.receive_data(await stream.receive_some(65536)):
                    if isinstance(event, h2.events.ResponseReceived):
                        status = dict(event.headers)[b":status"]
                    elif isinstance(event, h2.events.DataReceived):
                        body += event.data
                    elif isinstance(event, h2.events.StreamEnded):
                        ended = True
                await stream.send_all(conn.data_to_send())
    assert status == b"200" and json.loads(body)["status"] == "ok"


@pytest.mark.parametrize("host", ["a..b", ".", "a" * 64, "x." + "b" * 70 + ".example"])
@fail_after(10)
async def test_app_a_malformed_host_header_is_a_400_not_a_500_with_a_traceback(
    host: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running(base_settings(twilio_auth_token="tok")) as url:
        port = int(url.rsplit(":", 1)[1])
        for request in (f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n",
                        f"POST /twiml HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n"):  # fmt: skip
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request.encode())
                answer = b""
                with trio.fail_after(3):
                    while chunk := await stream.receive_some(4096):
                        answer += chunk
            assert answer.startswith(b"HTTP/1.1 400") and answer.endswith(b"\r\n\r\nmalformed Host header\n"), answer
        assert (await http_request(url + "/healthz")).status == 200
        for good in ("例え.jp", "example.com.", "[::1]:8080", "xn--bcher-kva.example:443"):  # as Quart took them
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(f"GET /healthz HTTP/1.1\r\nHost: {good}\r\nConnection: close\r\n\r\n".encode())
                answer = b""
                with trio.fail_after(3):
                    while chunk := await stream.receive_some(4096):
                        answer += chunk
            assert answer.startswith(b"HTTP/1.1 200"), (good, answer[:100])
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]


@fail_after(10)
async def test_app_request_values_cannot_forge_log_lines_or_fill_the_records(caplog: pytest.LogCaptureFixture) -> None:
    """A From, CallStatus or URL with a newline is quoted in the log, and a 30 KB From is cut there (and in the call
    record: tests/records/test_recorder.py)."""
    caplog.set_level(logging.INFO, logger="mediaserver")
    forged = "\n2026-11-22 05:00:00,000 ERROR mediaserver: FORGED"
    async with running(base_settings()) as url:
        await http_request(url + "/twiml", "POST", form=[("CallSid", "CA1"), ("From", "+1555" + forged)])
        await http_request(url + "/call-status", "POST", form=[("CallSid", "CA1"), ("CallStatus", "busy" + forged),
                                                                ("CallDuration", "1" + forged)])
        await http_request(url + "/twiml", "POST", form=[("CallSid", "CA2"), ("From", "+1" + "5" * 30_000)])
        async with running(base_settings(twilio_auth_token="tok")) as signed:
            await http_request(signed + "/twiml?a=%0aFORGED", "POST", form=[("CallSid", "CA3")])
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("mediaserver")]
    assert not [m for m in messages if "\n" in m]  # no line of ours spans two
    assert any(m.startswith("call CA1: webhook from '+1555\\n2026-11-22 ") for m in messages), messages
    assert any(m.startswith("call CA1: status 'busy\\n2026") and "duration '1\\n2026" in m for m in messages), messages
    assert any(m.startswith("/twiml: bad or missing X-Twilio-Signature for ") and "FORGED" in m for m in messages)
    [long_from] = [m for m in messages if m.startswith("call CA2: webhook from ")]
    assert len(long_from) < 200 and "…" in long_from


@fail_after(10)
async def test_app_a_call_sid_that_is_not_an_identifier_is_refused_before_any_session() -> None:
    async with fake_openai() as model, running(openai_settings(model)) as url:
        for bad in ("CA" + "1" * 600, "CA1\ncall CA2: ended", "<CA1>"):
            response = await http_request(url + "/twiml", "POST", form=[("CallSid", bad)])
            assert response.status == 400 and b"CallSid must be 1-64 letters" in response.body
        assert (await http_request(url + "/call-status", "POST", form=[("CallSid", "a b")])).status == 400
        assert json.loads((await http_request(url + "/healthz")).body)["pending_calls"] == 0
        assert model.sessions == []


@fail_after(10)
async def test_app_an_answer_twiml_cannot_carry_closes_the_session_opened_for_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """(The TwiML failing after the session began to open: the session is closed at once.)"""

    def cannot_write(*args: object, **kwargs: object) -> str:
        raise ValueError("Twilio allows fewer than 500 characters")

    monkeypatch.setattr(app_module.twiml, "connect_stream", cannot_write)
    async with fake_openai() as model, running(openai_settings(model)) as url:
        response = await http_request(url + "/twiml", "POST", form=[("CallSid", "CA1")])
        assert response.status == 400 and b"Twilio allows fewer than 500" in response.body
        with trio.fail_after(2):
            while json.loads((await http_request(url + "/healthz")).body)["pending_calls"]:
                await trio.sleep(0.05)
        for session in model.sessions:  # opened (or opening) for it: closed, not left billing until the timeout
            await session.closed.wait()


@fail_after(20)
async def test_app_a_kept_alive_http_connection_is_closed_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """One request, then nothing: the connection closes after the keep-alive timeout (it used to stay open for
    ever, so idle clients could use up the server's file descriptors)."""
    import hypercorn.config

    monkeypatch.setattr(hypercorn.config.Config, "keep_alive_timeout", 1.0)
    async with running(base_settings()) as url:
        port = int(url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += await stream.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 200")
        asked_s = trio.current_time()
        with trio.fail_after(5):
            while await stream.receive_some(65536):  # (the rest of the body, then the close)
                pass
        assert 0.5 <= trio.current_time() - asked_s < 1.0 + 2.0  # the 1 s timeout, not Hypercorn's 5 s default (a margin for a stalled CI)
        await stream.aclose()
