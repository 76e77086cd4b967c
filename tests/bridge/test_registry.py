"""CallManager: pre-opened sessions and the streams that claim them (virtual time, in memory)."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from mediaserver.agents.echo import EchoLink
from mediaserver.bridge.link import AgentOptions, ProviderLink
from mediaserver.bridge.registry import SHUTDOWN_GRACE_S, CallManager
from mediaserver.config import Settings
from tests.fakes import TwilioMessages, memory_twilio_pair

CALL = "CA" + "1" * 32
STREAM = "MZ" + "2" * 32


def test_a_stream_arriving_while_a_timed_out_session_closes_is_refused_not_bridged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After ``stream_timeout_s`` the session closes (which takes a while); a stream then gets no half-closed session."""
    closes: list[float] = []

    @contextlib.asynccontextmanager
    async def slow_close(settings: Settings, agent: AgentOptions) -> AsyncIterator[ProviderLink]:
        link = EchoLink()
        try:
            yield link
        finally:
            with trio.CancelScope(shield=True):
                await trio.sleep(1.0)  # a close handshake, as WebSocketLink's (at most 1 s)
            link.close()
            closes.append(trio.current_time())

    async def main() -> None:
        settings = Settings(provider="echo", stream_timeout_s=5.0, data_dir=tempfile.mkdtemp())
        calls = CallManager(settings, slow_close)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            token = calls.prepare(CALL)
            await trio.sleep(5.5)  # the timeout has passed; the session is still closing
            assert closes == []
            stream, caller = memory_twilio_pair()
            messages = TwilioMessages(stream_sid=STREAM, call_sid=CALL)
            await caller.send_message(messages.connected())
            await caller.send_message(messages.start({"token": token}))
            with trio.fail_after(1):
                await calls.handle_stream(stream)  # refused at once: it returns
            assert calls.active == 0
            assert calls.refused == {"no_model_session": 1}
            await trio.sleep(1)
            assert closes == [6.0] and calls.model_sessions == 0  # (the timeout at 5 s, then the 1 s close)
            nursery.cancel_scope.cancel()

    caplog.set_level(logging.INFO)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    messages = [r.getMessage() for r in caplog.records]
    assert f"call {CALL}: no model session (no media stream within 5 s); hanging up" in messages, messages
    assert not any(m.startswith(f"call {CALL}: started") for m in messages)


def test_the_webhook_again_for_the_same_call_closes_the_session_opened_for_the_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A retried webhook (or a fallback URL pointing here) must not leave a second billed session open until the timeout."""
    opened: list[EchoLink] = []
    closed: list[float] = []

    @contextlib.asynccontextmanager
    async def opener(settings: Settings, agent: AgentOptions) -> AsyncIterator[ProviderLink]:
        link = EchoLink()
        opened.append(link)
        try:
            yield link
        finally:
            link.close()
            closed.append(trio.current_time())

    async def main() -> None:
        settings = Settings(provider="echo", stream_timeout_s=15.0, twilio_auth_token="t", data_dir=tempfile.mkdtemp())
        calls = CallManager(settings, opener)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            first = calls.prepare(CALL)
            await trio.sleep(1)
            other = calls.prepare("CA" + "3" * 32)  # another call's session is not touched
            second = calls.prepare(CALL)
            await trio.sleep(0)
            await trio.sleep(0.001)
            assert closed == [1.0] and len(opened) == 3 and calls.model_sessions == 2
            assert first != second and other is not None
            # A stream with the first answer's token is hung up; the second's is bridged.
            stale, caller = memory_twilio_pair()
            messages = TwilioMessages(stream_sid=STREAM, call_sid=CALL)
            await caller.send_message(messages.connected())
            await caller.send_message(messages.start({"token": first}))
            with trio.fail_after(1):
                await calls.handle_stream(stale)
            assert calls.refused == {"no_token": 1}  # (the slot is gone: its token is no longer known)
            stream, caller = memory_twilio_pair()
            await caller.send_message(messages.connected())
            await caller.send_message(messages.start({"token": second}))
            nursery.start_soon(calls.handle_stream, stream)
            await trio.sleep(0.1)
            assert calls.active == 1
            nursery.cancel_scope.cancel()

    caplog.set_level(logging.INFO)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    messages = [r.getMessage() for r in caplog.records]
    assert f"call {CALL}: webhook again before its stream; closing the session opened for the first" in messages


def test_stop_accepting_closes_pending_sessions_and_refuses_new_calls_but_keeps_live_ones() -> None:
    closed: list[str] = []

    @contextlib.asynccontextmanager
    async def opener(settings: Settings, agent: AgentOptions) -> AsyncIterator[ProviderLink]:
        link = EchoLink()
        try:
            yield link
        finally:
            link.close()
            closed.append(agent.greeting or "")

    async def main() -> None:
        settings = Settings(provider="echo", twilio_auth_token="t", data_dir=tempfile.mkdtemp())
        calls = CallManager(settings, opener)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            live_token = calls.prepare(CALL, AgentOptions("i", greeting="live"))
            calls.prepare("CA" + "3" * 32, AgentOptions("i", greeting="pending"))
            stream, caller = memory_twilio_pair()
            messages = TwilioMessages(stream_sid=STREAM, call_sid=CALL)
            await caller.send_message(messages.connected())
            await caller.send_message(messages.start({"token": live_token}))
            nursery.start_soon(calls.handle_stream, stream)
            await trio.sleep(1)
            assert calls.active == 1 and calls.model_sessions == 2
            calls.stop_accepting()
            await trio.sleep(SHUTDOWN_GRACE_S - 0.1)
            assert closed == []  # (a stream accepted just before the listener closed may still send start)
            await trio.sleep(0.2)
            assert closed == ["pending"] and calls.active == 1  # the live call goes on
            assert calls.prepare("CA" + "4" * 32) is None
            assert calls.refused == {"shutting_down": 1}
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_replayed_webhook_gets_no_session_once_the_call_streamed_or_was_answered_three_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Twilio signatures carry no timestamp: a captured webhook must not open sessions again and again."""
    opened: list[str] = []

    @contextlib.asynccontextmanager
    async def opener(settings: Settings, agent: AgentOptions) -> AsyncIterator[ProviderLink]:
        link = EchoLink()
        opened.append("x")
        try:
            yield link
        finally:
            link.close()

    async def main() -> None:
        settings = Settings(provider="echo", twilio_auth_token="t", data_dir=tempfile.mkdtemp())
        calls = CallManager(settings, opener)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            # A call that streamed: a later webhook for it is refused.
            token = calls.prepare(CALL)
            stream, caller = memory_twilio_pair()
            messages = TwilioMessages(stream_sid=STREAM, call_sid=CALL)
            await caller.send_message(messages.connected())
            await caller.send_message(messages.start({"token": token}))
            nursery.start_soon(calls.handle_stream, stream)
            await trio.sleep(1)
            assert calls.active == 1
            assert calls.prepare(CALL) is None
            # A call that never streamed: three answers (Twilio's retries), then no more.
            other = "CA" + "3" * 32
            assert all(calls.prepare(other) is not None for _ in range(3))
            assert calls.prepare(other) is None
            assert calls.refused == {"replayed": 2}
            await trio.sleep(0.1)
            assert len(opened) == 4  # the streamed call's, and three for the other (each closing the one before)
            # Much later (past the longest call), the SID is forgotten.
            await trio.sleep(4 * 3600 + 1)
            assert calls.prepare(other) is not None
            nursery.cancel_scope.cancel()

    caplog.set_level(logging.INFO)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    messages = [r.getMessage() for r in caplog.records]
    assert f"call {CALL}: webhook refused: its media stream already ran (a replayed request?)" in messages
    assert f"call CA{'3' * 32}: webhook refused: answered 3 times already (a replayed request?)" in messages
