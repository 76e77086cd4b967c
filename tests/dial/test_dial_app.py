"""``mediaserver dial`` against real sockets on loopback.

* the real server with the echo agent: the recording's agent channel holds
  the caller's utterance played back after the caller stopped; a barge-in
  makes the server ``clear`` and the echo stop;
* fakes of Twilio's *peers* (a webhook and a Media Streams endpoint) that
  check our requests with twilio-python's own ``RequestValidator`` and the
  message shapes of reference/twilio-side.md;
* the command line's error paths: exit status and a one-line message.

Real sockets, so real time (no autojump); each test has a Trio-time limit.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import re
import socket
import subprocess
import sys
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import h11
import numpy as np
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket
from twilio.request_validator import RequestValidator

from mediaserver.dial import cli, report
from mediaserver.dial.call import CallResult, DialOptions, _as_dialled, _as_public, place_call
from mediaserver.dial.script import Pause, Speak
from mediaserver.dial.timeline import StreamEnded, StreamStarted

from tests.fakes import band_energy_ratio, dominant_frequency_hz, fail_after, to_ulaw, tone
from tests.test_app import base_settings, running

AUTH_TOKEN = "test-auth-token-0123456789abcdef"


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("TWILIO_AUTH_TOKEN", "TWILIO_ACCOUNT_SID", "MEDIASERVER_PUBLIC_URL"):  # (what dial reads)
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # default recordings land here


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return parser.parse_args([*argv, "--env-file", ""])


async def dial(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await cli.run(args(*argv), stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def read_stereo(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with wave.open(str(path), "rb") as recording:
        assert (recording.getnchannels(), recording.getsampwidth(), recording.getframerate()) == (2, 2, 8000)
        both = np.frombuffer(recording.readframes(recording.getnframes()), dtype="<i2").reshape(-1, 2)
    return both[:, 0], both[:, 1]


def settings(tmp_path: Path, **changes: Any) -> Any:
    return base_settings(data_dir=str(tmp_path / "data"), **changes)


# ---------------------------------------------------------------- echo agent


@fail_after(30)
async def test_dial_require_answer_fails_a_call_that_left_a_turn_unanswered(tmp_path: Path) -> None:
    """For smoke tests: exit 0 only if the agent answered every caller turn (without the flag, 0 either way)."""
    (tmp_path / "answered.txt").write_text("pause 300\ntone 1000 500\nwait 2500\n")
    (tmp_path / "cut.txt").write_text("pause 300\ntone 1000 500\n")  # hung up as soon as it is said: the echo comes too late
    async with running(settings(tmp_path)) as url:
        status, out, err = await dial(url + "/twiml", "--script", "answered.txt", "--listen", "0.2", "--no-record",
                                      "--require-answer")  # fmt: skip
        assert (status, err) == (0, ""), out
        status, out, err = await dial(url + "/twiml", "--script", "cut.txt", "--listen", "0", "--no-record")
        assert (status, err) == (0, "") and "no answer" in out
        status, out, err = await dial(url + "/twiml", "--script", "cut.txt", "--listen", "0", "--no-record",
                                      "--require-answer")  # fmt: skip
    assert status == 1 and "no answer" in out
    assert one_line(err).startswith("mediaserver dial: call CA") and "left 1 turn(s) unanswered (--require-answer)" in err


@fail_after(60)
async def test_dial_records_the_echo_of_the_utterance_after_the_caller_stopped(tmp_path: Path) -> None:
    (tmp_path / "call.txt").write_text("pause 300\ntone 1000 500\nwait 3000\n")
    # Frames go out on a real-time schedule; the log has when each actually left. A frame sent late
    # by a stalled machine (50-100 ms on CI) moves the figures with it, and a stall of the server while
    # the echo plays is an underrun (a gap in the agent's channel). So up to five calls are placed: one
    # must have its utterance where the script put it. One without an underrun is preferred; the server's
    # pacing itself is checked on a virtual clock in tests/bridge/test_call.py, and the checks of the
    # recording below hold with a gap in the echo.
    timings, chosen = [], None
    for _ in range(5):
        async with running(settings(tmp_path)) as url:
            status, out, err = await dial(url + "/twiml", "--script", "call.txt", "--listen", "0.2", "--json",
                                          "--record", "call.wav")  # fmt: skip
        assert (status, err) == (0, "")
        [call] = json.loads(out)["calls"]
        assert call["error"] is None and call["recording"] == "call.wav"
        figures = call["figures"]
        timings.append(([(t["speech_start_ms"], t["speech_end_ms"]) for t in figures["turns"]], figures["underruns"]))
        if len(figures["turns"]) != 1:  # (the script has one utterance: any other count is reported below)
            continue
        [turn] = figures["turns"]
        if abs(turn["speech_start_ms"] - 300) <= 20 and abs(turn["speech_end_ms"] - 800) <= 20:
            chosen = (turn, figures, (tmp_path / "call.wav").read_bytes())
            if not figures["underruns"]:
                break
    if chosen is None:
        pytest.fail(f"no call had its utterance at 300-800 ms: (turns, underruns) {timings}")
    turn, figures, recording = chosen
    (tmp_path / "call.wav").write_bytes(recording)
    assert turn["latency_ms"] is not None and turn["latency_ms"] > 0
    # (each figure is rounded to 0.001 ms on its own: the sum of two may differ from the third by one step)
    assert figures["first_audio_ms"] == pytest.approx(turn["speech_end_ms"] + turn["latency_ms"], abs=1.5e-3)
    assert figures["marks_received"] > 0 and figures["marks_played"] == figures["marks_received"]
    assert figures["warnings"] == []
    caller, agent = read_stereo(tmp_path / "call.wav")
    sent = tone(1000, 500, amplitude=0.3).astype(np.float64)
    # The caller's channel: the tone where it was sent.
    lag = int(np.argmax(np.abs(np.correlate(caller.astype(np.float64), sent, mode="valid"))))
    assert abs(lag - 300 * 8) <= 8
    # The agent's channel: the same tone, played back after the caller stopped, all of it and nothing else.
    after = agent[round(turn["speech_end_ms"] * 8) :].astype(np.float64)
    assert float(np.dot(after, after)) / float(np.dot(sent, sent)) == pytest.approx(1, abs=0.1)
    assert dominant_frequency_hz(after, 8000) == pytest.approx(1000, abs=16)
    assert band_energy_ratio(after, 8000, 1000) > 0.95
    # The same signal, not just the pitch: in phase and at its level all through -- or, when a stall of the
    # machine left a gap in the echo (a gap breaks the phase), for 100 ms.
    piece = sent if not figures["underruns"] else sent[:800]
    corr = np.correlate(after, piece, mode="valid")
    assert float(np.max(np.abs(corr))) > 0.5 * float(np.dot(piece, piece))
    assert not np.any(agent[: round(turn["speech_end_ms"] * 8)])  # nothing before the caller stopped


@fail_after(90)
async def test_dial_barge_in_makes_the_server_clear_and_the_echo_stop(tmp_path: Path) -> None:
    (tmp_path / "barge.json").write_text(
        '[{"pause": 300}, {"tone": [1000, 600]}, {"barge-in": 200}, {"tone": [500, 400]}, {"wait": 3000}]'
    )
    # The caller speaks again 200 ms into the echo, on its real-time frame schedule. A stall of this
    # process (CI's machines: 50-100 ms) takes that away: caller frames that leave late may find the echo
    # over or shifted (the clear then comes after the audio ran out), and a stall while the echo plays
    # splits it (an underrun), so the barge-in step waits for a stretch of 200 ms that never comes. So up
    # to four calls are placed; one must have the barge-in. One whose caller frames all left on time
    # (the report's caller_late_frames) is preferred, and every check below is made on that call.
    attempts: list[dict[str, Any]] = []
    chosen: list[tuple[float, int, dict[str, Any], bytes]] = []
    for _ in range(4):
        async with running(settings(tmp_path)) as url:
            status, out, err = await dial(url + "/twiml", "--script", "barge.json", "--listen", "0.2", "--json",
                                          "--record", "barge.wav")  # fmt: skip
        assert (status, err) == (0, "")
        figures = json.loads(out)["calls"][0]["figures"]
        attempts.append({k: figures[k] for k in ("turns", "barge_ins", "underruns", "clears", "caller_late_max_ms")})
        if len(figures["barge_ins"]) == 1:
            chosen.append((figures["caller_late_max_ms"], len(chosen), figures, (tmp_path / "barge.wav").read_bytes()))
            if not figures["caller_late_frames"]:
                break
    if not chosen:
        pytest.fail(f"no call had one barge-in: {attempts}")
    _, _, figures, recording = min(chosen)
    (tmp_path / "barge.wav").write_bytes(recording)
    [barge_in] = figures["barge_ins"]
    assert barge_in["cleared"] and figures["clears"] >= 1
    assert figures["marks_cleared"] >= 1
    assert figures["agent_played_ms"] < figures["agent_received_ms"]  # part of the first echo was dropped
    stopped_at = round((barge_in["speech_start_ms"] + barge_in["reaction_ms"]) * 8)
    _, agent = read_stereo(tmp_path / "barge.wav")
    before, after = agent[:stopped_at], agent[stopped_at:]
    assert band_energy_ratio(before, 8000, 1000) > 0.9  # the start of the first echo
    # After the clear the caller hears the echo of the barge-in (500 Hz), not the rest of the first one.
    assert band_energy_ratio(after, 8000, 500) > 0.9
    assert band_energy_ratio(after, 8000, 1000) < 0.05
    assert [t["latency_ms"] is not None for t in figures["turns"]] == [True, True]


@fail_after(20)
async def test_dial_concurrent_calls_print_percentiles_and_a_progress_bar(tmp_path: Path) -> None:
    (tmp_path / "s.txt").write_text("pause 200\ntone 800 300\nwait 3000\n")
    async with running(settings(tmp_path)) as url:
        status, out, err = await dial(url + "/twiml", "--script", "s.txt", "--calls", "3", "--listen", "0.1")
    assert status == 0
    assert "3 calls, 0 failed" in out
    latency = next(line for line in out.splitlines() if line.startswith("turn latency"))
    assert latency.split()[2] == "3"  # three turns pooled
    assert "[" + "#" * 30 + "] 3/3 calls done, 0 failed" in err
    # not a terminal: a line per change, not a bar redrawn with carriage returns (a CI log would be one long line)
    assert "\r" not in err and err.splitlines()[0] == "[" + "-" * 30 + "] 0/3 calls done, 0 failed"
    assert err.count("3/3 calls done") == 1
    assert list(tmp_path.glob("*.wav")) == []  # many calls record only when asked


@fail_after(20)
async def test_dial_signs_for_a_server_with_an_auth_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    async with running(settings(tmp_path, twilio_auth_token=AUTH_TOKEN)) as url:
        status, out, err = await dial(url + "/twiml", "--listen", "0.2", "--no-record")
        assert (status, err) == (0, "")
        assert "ended: caller hung up (stop sent)" in out
        status, _, err = await dial(url + "/twiml", "--listen", "0.2", "--auth-token", "wrong-token")
    assert status == 1
    assert one_line(err).startswith(f"mediaserver dial: the webhook {url}/twiml answered HTTP 403: 403 Forbidden (is the")


@fail_after(20)
async def test_dial_calls_as_the_configured_account_and_a_refused_stream_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours, theirs = "AC" + "1" * 32, "AC" + "2" * 32
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    monkeypatch.setenv("TWILIO_ACCOUNT_SID", ours)  # as the server's .env has it
    async with running(settings(tmp_path, twilio_auth_token=AUTH_TOKEN, twilio_account_sid=ours)) as url:
        status, out, err = await dial(url + "/twiml", "--listen", "0.2", "--no-record")
        assert (status, err) == (0, "") and "ended: caller hung up (stop sent)" in out
        # Another account's stream is refused, and that is a failed call, not a normal end.
        status, _, err = await dial(url + "/twiml", "--listen", "0.2", "--no-record", "--account-sid", theirs)
        assert status == 1
        assert one_line(err) == "mediaserver dial: the server closed the stream (1008 refused: wrong account)\n"
    status, _, err = await dial(url + "/twiml", "--account-sid", "AC123")
    assert status == 2 and "'AC123' is not an account SID" in one_line(err)


@fail_after(20)
async def test_dial_signs_for_the_public_url_and_streams_to_the_server_dialled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    public = "https://voice.example.com/agent"  # the tunnel or proxy in front; not reachable from here
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    monkeypatch.setenv("MEDIASERVER_PUBLIC_URL", public)
    async with running(settings(tmp_path, twilio_auth_token=AUTH_TOKEN, public_url=public)) as url:
        status, out, err = await dial(url + "/twiml", "--listen", "0.2", "--no-record")
        assert (status, err) == (0, "") and "ended: caller hung up (stop sent)" in out
        # Signed for the URL dialled (--public-url '' overrides the environment): not what the server checks.
        status, _, err = await dial(url + "/twiml", "--listen", "0.2", "--no-record", "--public-url", "")
        assert status == 1 and "answered HTTP 403" in one_line(err)
    # Another server, dialled by its own (public) address, is signed for that address, not for ours.
    options = DialOptions(url="https://staging.example.com/twiml", public_url=public)
    assert _as_public(options.url, options.public_url) == "https://staging.example.com/twiml"
    assert _as_public("http://127.0.0.1:8080/twiml?x=1", public) == "https://voice.example.com/agent/twiml?x=1"
    assert _as_dialled("wss://voice.example.com/agent/media-stream", "http://10.0.0.5:8080/twiml", public) == (
        "ws://10.0.0.5:8080/media-stream"
    )


@fail_after(20)
async def test_dial_reaches_one_of_several_instances_dialled_directly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MEDIASERVER_INSTANCE_URL (docs/several-instances.md): the TwiML's stream URL is the instance's, whose path the
    proxy strips; dialled directly, as the server's start-up hint says, the stream is opened on the server dialled."""
    public, instance = "https://voice.example.com", "https://voice.example.com/n1"
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
    monkeypatch.setenv("MEDIASERVER_PUBLIC_URL", public)
    monkeypatch.setenv("MEDIASERVER_INSTANCE_URL", instance)
    configured = settings(tmp_path, twilio_auth_token=AUTH_TOKEN, public_url=public, instance_url=instance)
    async with running(configured) as url:
        status, out, err = await dial(url + "/twiml", "--listen", "0.2", "--no-record")
        assert (status, err) == (0, "") and "ended: caller hung up (stop sent)" in out
    assert _as_dialled("wss://voice.example.com/n1/media-stream", "http://10.0.0.5:8080/twiml", public, instance) == (
        "ws://10.0.0.5:8080/media-stream"
    )


# ------------------------------------------------------------- Twilio's peers


@dataclass
class FakeWebhook:
    """An HTTP server on loopback that records each request and gives one fixed answer."""

    status: int = 200
    content_type: str = "text/xml"
    body: str = ""
    port: int = 0
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/voice?x=1"

    async def serve(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = bytearray()
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert request is not None
            headers = {k.decode().lower(): v.decode() for k, v in request.headers}
            self.requests.append((request.target.decode(), headers, bytes(body)))
            answer = self.body.encode()
            reply = h11.Response(
                status_code=self.status,
                headers=[("Content-Type", self.content_type), ("Content-Length", str(len(answer)))],
            )
            await stream.send_all(conn.send(reply) + conn.send(h11.Data(data=answer)) + conn.send(h11.EndOfMessage()))


@asynccontextmanager
async def fake_webhook(**answer: Any) -> AsyncIterator[FakeWebhook]:
    hook = FakeWebhook(**answer)
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, hook.serve, 0, host="127.0.0.1"))
        hook.port = listeners[0].socket.getsockname()[1]
        yield hook
        nursery.cancel_scope.cancel()


@fail_after(20)
async def test_dial_speaks_twilio_to_the_webhook_and_the_stream() -> None:
    """Webhook and upgrade signatures checked with twilio-python's RequestValidator,
    the form and the Media Stream messages with Twilio's documented shapes."""
    upgrades: list[tuple[str, dict[str, str]]] = []
    messages: list[dict[str, Any]] = []

    async def media_endpoint(request: WebSocketRequest) -> None:
        upgrades.append((request.path, {k.decode().lower(): v.decode() for k, v in request.headers}))
        ws = await request.accept()
        try:
            while True:
                messages.append(json.loads(await ws.get_message()))
                if messages[-1]["event"] == "stop":
                    await ws.aclose()
                    return
        except ConnectionClosed:
            return

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, media_endpoint, "127.0.0.1", 0, None)
        stream_url = f"ws://127.0.0.1:{server.port}/streams/in"
        twiml = (
            '<?xml version="1.0" encoding="UTF-8"?><Response><Connect>'
            f'<Stream url="{stream_url}"><Parameter name="token" value="abc"/>'
            '<Parameter name="lang" value="fr &amp; en"/></Stream></Connect><Hangup/></Response>'
        )
        async with fake_webhook(body=twiml) as hook:
            options = DialOptions(
                url=hook.url, actions=(Pause(40), Speak(to_ulaw(tone(1000, 60)), "beep")), auth_token=AUTH_TOKEN,
                listen_s=0.04, from_number="+33123456789", to_number="+15550009999",
            )  # fmt: skip
            result = await place_call(options)
        nursery.cancel_scope.cancel()
    assert result.error is None
    [(target, headers, body)] = hook.requests
    form = dict(parse_qsl(body.decode(), keep_blank_values=True))
    assert target == "/voice?x=1" and headers["content-type"] == "application/x-www-form-urlencoded"
    assert RequestValidator(AUTH_TOKEN).validate(hook.url, form, headers["x-twilio-signature"])
    assert not RequestValidator("another-token").validate(hook.url, form, headers["x-twilio-signature"])
    assert re.fullmatch("CA[0-9a-f]{32}", form["CallSid"]) and form["CallSid"] == result.call_sid
    assert re.fullmatch("AC[0-9a-f]{32}", form["AccountSid"])
    assert {k: form[k] for k in ("CallStatus", "Direction", "ApiVersion", "From", "To")} == {
        "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01",
        "From": "+33123456789", "To": "+15550009999",
    }  # fmt: skip
    [(path, ws_headers)] = upgrades
    assert path == "/streams/in"
    assert RequestValidator(AUTH_TOKEN).validate(stream_url, {}, ws_headers["x-twilio-signature"])
    assert [m["event"] for m in messages] == ["connected", "start"] + ["media"] * 7 + ["stop"]
    start = messages[1]["start"]
    assert start["customParameters"] == {"token": "abc", "lang": "fr & en"}
    assert start["callSid"] == form["CallSid"] and start["accountSid"] == form["AccountSid"]
    assert re.fullmatch("MZ[0-9a-f]{32}", start["streamSid"])
    assert all(m["streamSid"] == start["streamSid"] for m in messages[1:])
    assert report.call_figures(result.events).speech_sent_ms == 60.0


# ------------------------------------------------------------- error paths


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("mediaserver dial: ")
    return err


@fail_after(10)
async def test_dial_unreachable_server() -> None:
    port = closed_port()
    status, out, err = await dial(f"http://127.0.0.1:{port}/twiml")
    assert (status, out) == (1, "")
    assert one_line(err).startswith(f"mediaserver dial: cannot reach 127.0.0.1:{port}: ")


@fail_after(10)
async def test_dial_http_error(tmp_path: Path) -> None:
    async with running(settings(tmp_path)) as url:
        status, _, err = await dial(url + "/nope")
    assert status == 1
    assert one_line(err).startswith(f"mediaserver dial: the webhook {url}/nope answered HTTP 404")


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ({"content_type": "text/html", "body": "<html>hi</html>"}, "the webhook answer is not TwiML (Content-Type text/html)"),
        ({"body": "<Response><Say>We are busy</Say><Hangup/></Response>"},
         "the TwiML has no <Connect><Stream>, only <Say>, <Hangup> (it says: 'We are busy')"),
        ({"body": "<Response><Connect>"}, "the webhook answer is not TwiML (not XML)"),
        ({"status": 500, "body": "oops"}, "answered HTTP 500: 'oops'"),
    ],
)  # fmt: skip
@fail_after(10)
async def test_dial_bad_webhook_answers(answer: dict[str, Any], message: str) -> None:
    async with fake_webhook(**answer) as hook:
        status, _, err = await dial(hook.url)
    assert status == 1
    assert message in one_line(err)


@fail_after(10)
async def test_dial_refused_websocket(tmp_path: Path) -> None:
    async with running(settings(tmp_path, twilio_auth_token=AUTH_TOKEN)) as url:
        stream = url.replace("http://", "ws://") + "/media-stream"
        twiml = f'<Response><Connect><Stream url="{stream}"/></Connect></Response>'
        async with fake_webhook(body=twiml) as hook:
            status, _, err = await dial(hook.url)  # no token: the upgrade is not signed
    assert status == 1
    assert f"the server refused the media stream WebSocket {stream} with HTTP 403" in one_line(err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ftp://example.com/twiml"], "bad URL 'ftp://example.com/twiml'"),
        (["--calls", "0"], "--calls must be at least 1"),
        (["--wav", "missing.wav"], "cannot read missing.wav"),
        (["--barge-in-after", "300"], "--barge-in-after needs something to say"),
        (["--timeout", "0"], "--timeout must be more than 0 seconds"),
    ],
)
async def test_dial_bad_options(argv: list[str], message: str) -> None:
    status, _, err = await dial(*argv)
    assert status == 2
    assert message in one_line(err)


@fail_after(20)
async def test_dial_without_a_url_calls_the_local_server_on_its_port(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As the server reads MEDIASERVER_PORT (environment or .env), so does dial's default URL."""
    async with running(settings(tmp_path)) as url:
        monkeypatch.setenv("MEDIASERVER_PORT", url.rsplit(":", 1)[1])
        status, out, err = await dial("--listen", "0.2", "--no-record", "--env-file", "")
        assert (status, err) == (0, "")
        assert "ended: caller hung up (stop sent)" in out
        # MEDIASERVER_HOST too, where the server listens on one address (this one listens on 127.0.0.1 only)
        monkeypatch.setenv("MEDIASERVER_HOST", "127.0.0.2")
        status, out, err = await dial("--listen", "0.2", "--no-record", "--env-file", "")
        assert status == 1 and f"cannot reach 127.0.0.2:{url.rsplit(':', 1)[1]}" in one_line(err)
        monkeypatch.delenv("MEDIASERVER_HOST")
    monkeypatch.setenv("MEDIASERVER_PORT", "80800")
    status, _, err = await dial("--env-file", "")
    assert status == 2 and "MEDIASERVER_PORT must be 1-65535, not '80800'" in one_line(err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # Input audio: too short for the resampler's filter once, a silly rate, silence, absurd lengths.
        (["--say", "\x01\x02"], "the text '\\x01\\x02' makes no sound: nothing to say"),
        (["--script", "short.txt"], "the text '\\x01\\x02' makes no sound: nothing to say"),
        (["--wav", "1hz.wav"], "1hz.wav: a sample rate of 1 Hz is not supported (4000 to 192000 Hz)"),
        (["--wav", "quiet.wav"], "the WAV file quiet.wav is silent: nothing to say"),
        (["--script", "long.json"], "long.json: entry 1: a step may last at most 3600000 ms (an hour)"),
        (["--script", "inf.json"], "inf.json: entry 1: Infinity is not a whole number of milliseconds"),
        # Arguments that are not UTF-8 (Python keeps the bytes as lone surrogates).
        (["--say", os.fsdecode(b"\xff\xfe")], "--say is not valid UTF-8 text"),
        (["--from", os.fsdecode(b"\xff")], "--from is not valid UTF-8 text"),
        (["--script", "lone.json"], "cannot say '\\ud800': it is not valid UTF-8 text"),  # a JSON escape
        (["--script", "nul.json"], "cannot read 'a\\x00b.wav': embedded null byte"),
        # The server's rule for MEDIASERVER_PUBLIC_URL.
        (["--public-url", "not-a-url"], "--public-url must be https://host[:port][/prefix], not 'not-a-url'"),
        (["--public-url", "https://a:b"], "--public-url is malformed: 'https://a:b'"),
        # A recording that could not be written: found before the call is placed.
        (["--record", "no-such-dir/x.wav"], "cannot write no-such-dir/x.wav: No such file or directory"),
        (["--record", "."], "cannot write .: Is a directory"),
    ],
)
@fail_after(20)
async def test_dial_unusable_input_is_one_line_and_exit_2(tmp_path: Path, argv: list[str], message: str) -> None:
    (tmp_path / "short.txt").write_text("say \x01\x02\n")
    (tmp_path / "long.json").write_text('[{"tone": [1000, 1e9]}]')
    (tmp_path / "inf.json").write_text('[{"pause": 1e400}]')
    (tmp_path / "lone.json").write_text('[{"say": "\\ud800"}]')
    (tmp_path / "nul.json").write_text('[{"play": "a\\u0000b.wav"}]')
    for name, rate, amplitude in (("1hz.wav", 1, 0.5), ("quiet.wav", 8000, 0.0)):
        with wave.open(str(tmp_path / name), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(rate)
            out.writeframes((tone(700, 100) * amplitude).astype("<i2").tobytes())
    status, out, err = await dial(f"http://127.0.0.1:{closed_port()}/twiml", *argv)  # never dialled
    assert (status, out) == (2, "")
    assert one_line(err) == f"mediaserver dial: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".wav") == ["1hz.wav", "quiet.wav"]


@fail_after(20)
async def test_dial_says_a_wav_file_shorter_than_the_resampling_filter(tmp_path: Path) -> None:
    """100 samples at 44.1 kHz (2.3 ms; the filter is 8 ms long) become 18 samples at 8 kHz."""
    with wave.open(str(tmp_path / "click.wav"), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(44100)
        out.writeframes(tone(1000, 100, 44100)[:100].astype("<i2").tobytes())
    async with running(settings(tmp_path)) as url:
        status, out, err = await dial(url + "/twiml", "--wav", "click.wav", "--listen", "0.1", "--json", "--no-record")
    assert (status, err) == (0, "")
    [turn] = json.loads(out)["calls"][0]["figures"]["turns"]
    assert turn["speech_end_ms"] - turn["speech_start_ms"] == pytest.approx(20, abs=20)  # one frame


def test_dial_recording_that_fails_after_the_call_exits_1(tmp_path: Path) -> None:
    """The folder was there when the call was placed, and is gone when it ends."""
    call = CallResult("CA" + "1" * 32, [StreamStarted(0.0), StreamEnded(1.0, "caller hung up (stop sent)")])
    out, err = io.StringIO(), io.StringIO()
    status = cli._report(args("--record", "gone/call.wav"), [call], out, err)
    assert status == 1
    assert one_line(err.getvalue()) == "mediaserver dial: cannot write gone/call.wav: No such file or directory\n"
    assert out.getvalue().startswith(f"call {call.call_sid}: 1.0 s, ended: caller hung up (stop sent)")
    assert "recording" not in out.getvalue()


def test_dial_is_a_mediaserver_command() -> None:
    """Through ``python -m mediaserver``: no traceback, one line, non-zero exit."""
    port = closed_port()
    done = subprocess.run(
        [sys.executable, "-m", "mediaserver", "dial", f"http://127.0.0.1:{port}/twiml", "--env-file", ""],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).parents[2], check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert one_line(done.stderr).startswith(f"mediaserver dial: cannot reach 127.0.0.1:{port}")
