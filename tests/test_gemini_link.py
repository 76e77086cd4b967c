"""GeminiLink's session switch when the new connection fails or says goAway before it is live.

The new connection's ``setupComplete`` and what follows it (a close, or a
fresh handle and ``goAway``) arrive in one TCP read, as when the service
fails right after accepting the resumed setup: the link's reader for the new
connection sees them while the switch is still making it live.  The fake is
:class:`tests.gemini_fake.FakeGeminiServer` (``google-genai`` types), with
``after_setup`` writing those frames together.  The link is driven as the
bridge drives it, without a call around it, so that no caller audio wakes it
(a caller's next frame would notice a dead socket within 20 ms).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio
from google.genai import types

from mediaserver.adapters.gemini import GOAWAY_MARGIN_S, GeminiLink, open_link
from mediaserver.bridge.link import AgentOptions, ProviderClosed
from mediaserver.config import Settings
from mediaserver.protocol.providers.base import AudioDelta, ProviderEvent, ResponseDone, SendAudio, ToolCall, ToolResult

from tests.fakes import fail_after
from tests.gemini_fake import OUTPUT_MIME, FakeGeminiServer, FakeGeminiSession
from tests.test_app import base_settings


async def handle_then_go_away(session: FakeGeminiSession) -> None:
    """The first connection gives a handle, then says goAway (and stays open until the link retires it)."""
    await session.ready.wait()
    if session.number == 1:
        await session.resumption_update()
        await session.go_away("10s")


@asynccontextmanager
async def gemini_link(**options: Any) -> AsyncIterator[tuple[GeminiLink, FakeGeminiServer]]:
    async with trio.open_nursery() as nursery:
        model: FakeGeminiServer = await nursery.start(FakeGeminiServer(handle_then_go_away, **options).run)
        settings: Settings = base_settings(provider="gemini", gemini_api_key="test", gemini_live_url=model.url)
        async with open_link(settings, AgentOptions.from_settings(settings)) as link:
            yield link, model
        nursery.cancel_scope.cancel()


async def outcome(link: GeminiLink, model: FakeGeminiServer, *, within_s: float = 3.0) -> str:
    """``ended: REASON`` (receive raised ProviderClosed), ``switched again`` (a third connection) or ``stalled``."""
    result = "stalled"
    with trio.move_on_after(within_s):
        async with trio.open_nursery() as nursery:

            async def receive() -> None:  # as the bridge's provider reader does
                nonlocal result
                try:
                    while True:
                        await link.receive()
                except ProviderClosed as exc:
                    result = f"ended: {exc.reason}"
                    nursery.cancel_scope.cancel()

            async def third() -> None:
                nonlocal result
                await model.wait_for(lambda: len(model.sessions) >= 3)
                result = "switched again"
                nursery.cancel_scope.cancel()

            nursery.start_soon(receive)
            nursery.start_soon(third)
    return result


def close_after_setup(session: FakeGeminiSession) -> list[types.LiveServerMessage | tuple[int, str]]:
    return [(1011, "Internal error")] if session.number == 2 else []


@fail_after(15)
async def test_gemini_link_new_connection_closed_before_it_is_live_ends_the_link() -> None:
    # Before: its reader saw the close while the switch was under way and stopped; the link went on with a
    # connection nobody read, and receive() waited for ever (until a send happened to hit the dead socket).
    async with gemini_link(after_setup=close_after_setup) as (link, model):
        result = await outcome(link, model)
        assert model.sessions[1].resumed_with is not None  # it was the resumption that failed
    assert result == "ended: gemini: resumption failed: gemini connection closed: 1011 INTERNAL_ERROR Internal error", result


@fail_after(15)
async def test_gemini_link_new_connection_closed_with_audio_held_ends_the_link_the_same_way() -> None:
    async with gemini_link(after_setup=close_after_setup) as (link, model):
        model.resume_gate = trio.Event()  # the new connection is answered once five frames wait for it
        async with trio.open_nursery() as nursery:

            async def receive_until_the_switch() -> None:
                while len(model.sessions) < 2:
                    with trio.move_on_after(0.05):
                        await link.receive()

            nursery.start_soon(receive_until_the_switch)
            second = await model.session(1)
            for _ in range(5):  # caller audio while the switch waits: held for the new connection
                await link.send(SendAudio(b"\x00\x00" * 320))
                await trio.sleep(0.02)
            assert not second.ready.is_set()
            model.resume_gate.set()
        result = await outcome(link, model)
    assert result.startswith("ended: gemini: resumption failed: gemini connection closed: 1011"), result


@fail_after(15)
async def test_gemini_link_go_away_before_the_new_connection_is_live_switches_again() -> None:
    def handle_and_go_away(session: FakeGeminiSession) -> list[types.LiveServerMessage | tuple[int, str]]:
        if session.number != 2:
            return []
        handle = "handle-2-early"
        session.server.issued_handles.add(handle)
        return [
            types.LiveServerMessage(
                session_resumption_update=types.LiveServerSessionResumptionUpdate(new_handle=handle, resumable=True)
            ),
            types.LiveServerMessage(go_away=types.LiveServerGoAway(time_left="10s")),
        ]

    # Before: the goAway was dropped (a switch was under way), and the connection ran until the service cut it.
    async with gemini_link(after_setup=handle_and_go_away) as (link, model):
        result = await outcome(link, model)
        third = await model.session(2)
        assert third.resumed_with == "handle-2-early"
    assert result == "switched again", result


@fail_after(15)
async def test_gemini_link_tool_result_whose_write_failed_is_answered_on_the_resumed_connection() -> None:
    reset = trio.Event()

    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        if session.number == 1:
            await session.resumption_update()
            await session.tool_call("call-1", "lookup", {"q": "x"})
            await session.model_audio(b"\x00\x00" * 480)  # the link's reader holds this until the bridge takes it
            await trio.sleep(0.1)
            session._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            reset.set()
            await session.abort()  # a reset: the link learns of it only from a read or a write

    async with trio.open_nursery() as nursery:
        model: FakeGeminiServer = await nursery.start(FakeGeminiServer(script).run)
        settings: Settings = base_settings(provider="gemini", gemini_api_key="test", gemini_live_url=model.url)
        async with open_link(settings, AgentOptions.from_settings(settings)) as link:
            while not isinstance(event := await link.receive(), ToolCall):
                pass
            await reset.wait()  # the bridge is running the tool, not reading: the reader has not seen the reset
            await trio.sleep(0.05)
            await link.send(ToolResult(event.call_id, '{"ok": true}'))  # the write fails: kept for the next connection
            async with trio.open_nursery() as reading:

                async def receive() -> None:
                    with contextlib.suppress(ProviderClosed):
                        while True:
                            await link.receive()

                reading.start_soon(receive)
                second = await model.session(1)
                # Before: the resumed core refused the result ("no pending function call"), crashing the link.
                await second.wait_for(lambda: bool(second.tool_responses))
                reading.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    [response] = second.tool_responses
    assert response.function_responses == [
        types.FunctionResponse(id="call-1", name="lookup", response={"output": {"ok": True}})
    ]


@fail_after(15)
async def test_gemini_link_retiring_the_old_connection_delivers_what_it_had_read() -> None:
    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        if session.number == 1:
            await session.resumption_update()
            await session.go_away("10s")
            part = types.Part(inline_data=types.Blob(data=b"\x00\x00" * 2400, mime_type=OUTPUT_MIME))
            # the turn's last audio and its end in one message, then a tool call
            await session.content(model_turn=types.Content(role="model", parts=[part]), turn_complete=True)
            await session.tool_call("call-9", "lookup", {})

    seen: list[ProviderEvent] = []
    async with trio.open_nursery() as nursery:
        model: FakeGeminiServer = await nursery.start(FakeGeminiServer(script, resume_delay_s=0.1).run)
        settings: Settings = base_settings(provider="gemini", gemini_api_key="test", gemini_live_url=model.url)
        async with open_link(settings, AgentOptions.from_settings(settings)) as link:
            with trio.move_on_after(2):
                while True:
                    seen.append(await link.receive())
                    await trio.sleep(0.04)  # the bridge is busy a moment with each event (writing to Twilio)
        nursery.cancel_scope.cancel()
    # Before: the switch cancelled the old connection's reader while it was handing over the audio, so the
    # bridge never heard that turn end, nor of the tool call, which its core had already registered.
    assert [type(e).__name__ for e in seen] == [
        "SessionReady", "ResumptionUpdate", "GoAway", "ResponseStarted", "AudioDelta", "AudioDone", "ResponseDone",
        "ToolCall",
    ]
    assert len(model.sessions) == 2 and model.sessions[0].closed.is_set()


async def _collect(link: GeminiLink, within_s: float, *, until: Callable[[list[ProviderEvent]], bool] | None = None
                   ) -> list[ProviderEvent]:
    """The events received within ``within_s``; with ``until``: until it holds (however long), then ``within_s`` more."""
    seen: list[ProviderEvent] = []
    if until is not None:
        while not until(seen):
            with trio.move_on_after(0.05):
                seen.append(await link.receive())
    with trio.move_on_after(within_s):
        while True:
            seen.append(await link.receive())
    return seen


@fail_after(20)
async def test_gemini_link_go_away_during_a_reply_switches_once_the_reply_is_over() -> None:
    """A goAway with time to spare, half a second into a 3 s reply: the reply plays whole on the old connection, and
    the switch waits for the turn's end and a fresh resumable handle (resuming mid-turn loses what was said)."""
    reply = b"\x01\x00" * (24000 * 3)
    switch_began_at: list[float] = []

    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        if session.number == 1:
            await session.resumption_update()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(session.model_audio, reply, chunk_bytes=4800, interval_s=0.1))
                await trio.sleep(0.5)
                await session.go_away("50s")
            await session.finish_turn()
            await trio.sleep(0.3)
            assert len(session.server.sessions) == 1  # not yet: the handle predates the turn
            await session.resumption_update()
        else:
            switch_began_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        model: FakeGeminiServer = await nursery.start(FakeGeminiServer(script).run)
        settings: Settings = base_settings(provider="gemini", gemini_api_key="test", gemini_live_url=model.url)
        async with open_link(settings, AgentOptions.from_settings(settings)) as link:
            # (until the reply is over and the new connection is live: the fake's timeline is relative, so a stalled
            # machine stretches it; then a moment more, for anything that should not come)
            seen = await _collect(
                link, 0.3, until=lambda seen: any(isinstance(e, ResponseDone) for e in seen)
                and len(model.sessions) == 2 and model.sessions[1].ready.is_set()
            )
        nursery.cancel_scope.cancel()
    audio = b"".join(e.payload for e in seen if isinstance(e, AudioDelta))
    assert audio == reply  # all of it: nothing cut by the switch
    names = [type(e).__name__ for e in seen]
    assert names.count("ResponseDone") == 1 and "GoAway" in names
    done = next(e for e in seen if isinstance(e, ResponseDone))
    assert done.status == "completed"  # (not "cancelled, reconnected")
    assert len(model.sessions) == 2 and model.sessions[1].resumed_with == "handle-1-2" and switch_began_at


@fail_after(20)
async def test_gemini_link_a_turn_that_outlasts_go_aways_time_switches_before_the_server_cuts() -> None:
    """No fresh handle comes: the switch starts GOAWAY_MARGIN_S before timeLeft runs out, turn or no turn."""
    async def script(session: FakeGeminiSession) -> None:
        await session.ready.wait()
        if session.number == 1:
            await session.resumption_update()
            await session.model_audio(b"\x01\x00" * 2400)  # a turn begins, and never ends
            await session.go_away("6s")

    async with trio.open_nursery() as nursery:
        model: FakeGeminiServer = await nursery.start(FakeGeminiServer(script).run)
        settings: Settings = base_settings(provider="gemini", gemini_api_key="test", gemini_live_url=model.url)
        async with open_link(settings, AgentOptions.from_settings(settings)) as link:
            started = trio.current_time()
            seen = await _collect(link, 0.6)
            assert len(model.sessions) == 1  # waiting for the turn to end
            await model.wait_for(lambda: len(model.sessions) == 2)
            waited = trio.current_time() - started
            seen += await _collect(link, 0.5)
        nursery.cancel_scope.cancel()
    assert 6 - GOAWAY_MARGIN_S - 0.3 <= waited <= 6 - GOAWAY_MARGIN_S + 2.0  # (not at once, not at timeLeft)
    # the old connection's turn is over for the bridge: cancelled by the reconnection
    assert any(isinstance(e, ResponseDone) and e.reason == "reconnected" for e in seen)
