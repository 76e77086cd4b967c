"""CallManager: pre-opened sessions and the streams that claim them (virtual time, in memory)."""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
import trio.testing

from mediaserver.agents.echo import EchoLink
from mediaserver.bridge.link import AgentOptions, ProviderClosed, ProviderLink
from mediaserver.bridge import registry
from mediaserver.bridge.call import StreamEnd
from mediaserver.bridge.registry import CallManager
from mediaserver.protocol import providers as pv
from mediaserver.config import Settings
from tests.fakes import MemoryMessageStream, TwilioMessages, memory_twilio_pair

CALL = "CA" + "1" * 32
OTHER = "CA" + "3" * 32
STREAM = "MZ" + "2" * 32


class Sessions:
    """Opens echo sessions for a CallManager, noting when each closed (and whose greeting it had)."""

    def __init__(self, close_s: float = 0.0, link: Callable[[], EchoLink] = EchoLink, open_s: float = 0.0) -> None:
        self.close_s = close_s  # how long closing takes (a WebSocketLink's close handshake: at most 1 s)
        self.open_s = open_s  # how long opening takes (connect, TLS, the session's handshake)
        self.link = link
        self.opened = 0
        self.closed: list[tuple[float, str | None]] = []

    @contextlib.asynccontextmanager
    async def __call__(self, settings: Settings, agent: AgentOptions) -> AsyncIterator[ProviderLink]:
        if self.open_s:
            await trio.sleep(self.open_s)
        link = self.link()
        self.opened += 1
        try:
            yield link
        finally:
            if self.close_s:
                with trio.CancelScope(shield=True):
                    await trio.sleep(self.close_s)
            link.close()
            self.closed.append((trio.current_time(), agent.greeting))


def manager(sessions: Sessions, **settings: object) -> CallManager:
    return CallManager(
        Settings(**{"provider": "echo", "twilio_auth_token": "t", "data_dir": tempfile.mkdtemp(), **settings}),  # type: ignore[arg-type]
        sessions,
    )


async def started_stream(call_sid: str, token: str | None) -> MemoryMessageStream:
    """A Media Stream whose caller has sent ``connected`` and ``start`` with ``token``."""
    stream, caller = memory_twilio_pair()
    messages = TwilioMessages(stream_sid=STREAM, call_sid=call_sid)
    await caller.send_message(messages.connected())
    await caller.send_message(messages.start({"token": token or ""}))
    return stream


def run_virtual(main: Callable[[], Awaitable[None]], caplog: pytest.LogCaptureFixture) -> list[str]:
    """``main`` under a MockClock; the log lines it wrote."""
    caplog.set_level(logging.INFO)
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return [r.getMessage() for r in caplog.records]


def test_a_stream_arriving_while_a_timed_out_session_closes_is_refused_not_bridged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After ``stream_timeout_s`` the session closes (which takes a while); a stream then gets no half-closed session."""
    sessions = Sessions(close_s=1.0)

    async def main() -> None:
        calls = manager(sessions, stream_timeout_s=5.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            token = calls.prepare(CALL)
            await trio.sleep(5.5)  # the timeout has passed; the session is still closing
            assert sessions.closed == []
            with trio.fail_after(1):
                end = await calls.handle_stream(await started_stream(CALL, token))  # refused at once: it returns
            assert end == StreamEnd(1011, "no model session")  # (the stream's close code: not served)
            assert calls.active == 0
            assert calls.refused == {"no_model_session": 1}
            await trio.sleep(1)
            assert sessions.closed == [(6.0, None)] and calls.model_sessions == 0  # (timeout at 5 s, 1 s close)
            nursery.cancel_scope.cancel()

    messages = run_virtual(main, caplog)
    assert f"call {CALL}: no model session (no media stream within 5 s); hanging up" in messages, messages
    assert not any(m.startswith(f"call {CALL}: started") for m in messages)


@pytest.mark.parametrize("first_wins", [True, False], ids=["first-token", "second-token"])
def test_the_webhook_again_for_the_same_call_gives_the_same_session_a_second_token(
    caplog: pytest.LogCaptureFixture, first_wins: bool,
) -> None:
    """A retried webhook opens no second billed session, and a replayed one cannot hang up the real call: both
    answers' tokens name the one session, and the first stream to come with either gets it."""
    sessions = Sessions()

    async def main() -> None:
        calls = manager(sessions, stream_timeout_s=15.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            first = calls.prepare(CALL)
            await trio.sleep(1)
            assert calls.prepare(OTHER) is not None  # another call's session is not touched
            second = calls.prepare(CALL)
            await trio.sleep(0.001)
            assert first is not None and second is not None and first != second
            assert sessions.closed == [] and sessions.opened == 2 and calls.model_sessions == 2 and calls.pending == 2
            winner, loser = (first, second) if first_wins else (second, first)
            nursery.start_soon(calls.handle_stream, await started_stream(CALL, winner))
            await trio.sleep(0.1)
            assert calls.active == 1
            with trio.fail_after(1):  # the other token: its session is taken
                end = await calls.handle_stream(await started_stream(CALL, loser))
            assert end == StreamEnd(1008, "refused: no valid token") and calls.active == 1
            nursery.cancel_scope.cancel()

    messages = run_virtual(main, caplog)
    assert f"call {CALL}: webhook again before its stream; its session takes either answer's token" in messages


def test_the_webhook_again_at_full_capacity_still_gets_its_token_and_withdrawing_it_spares_the_first(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry opens nothing, so a full house must not refuse it (its apology would hang up the call); and an answer
    that could not be sent withdraws only its own token, not the session the call's first answer names."""
    monkeypatch.setattr(registry, "MAX_PENDING", 1)
    sessions = Sessions()

    async def main() -> None:
        calls = manager(sessions, stream_timeout_s=15.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            first = calls.prepare(CALL)
            await trio.sleep(0.5)
            assert calls.prepare(OTHER) is None and calls.refused == {"too_many_pending": 1}  # full
            second = calls.prepare(CALL)
            assert second is not None and calls.refused == {"too_many_pending": 1}
            calls.withdraw(second, "the webhook could not be answered")
            await trio.sleep(0.001)
            assert sessions.closed == [] and calls.pending == 1
            third = calls.prepare(CALL)  # the webhook once more: still the first answer's session, not a new one
            assert third is not None and sessions.opened == 1 and calls.refused == {"too_many_pending": 1}
            with trio.fail_after(1):  # the withdrawn token is no longer known ...
                end = await calls.handle_stream(await started_stream(CALL, second))
            assert end == StreamEnd(1008, "refused: no valid token")
            nursery.start_soon(calls.handle_stream, await started_stream(CALL, first))  # ... the first still works
            await trio.sleep(0.1)
            assert calls.active == 1
            nursery.cancel_scope.cancel()

    run_virtual(main, caplog)


def test_stop_accepting_refuses_new_calls_but_keeps_live_ones_and_pending_ones_until_their_stream_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sessions = Sessions()

    async def main() -> None:
        calls = manager(sessions, stream_timeout_s=10.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            live_token = calls.prepare(CALL, AgentOptions("i", greeting="live"))
            calls.prepare(OTHER, AgentOptions("i", greeting="pending"))
            nursery.start_soon(calls.handle_stream, await started_stream(CALL, live_token))
            await trio.sleep(1)
            assert calls.active == 1 and calls.model_sessions == 2
            calls.stop_accepting()
            assert calls.prepare("CA" + "4" * 32) is None
            assert calls.refused == {"shutting_down": 1}
            await trio.sleep(8.9)
            assert sessions.closed == [] and not calls.drained  # (its stream may still come: the listener is open)
            await trio.sleep(0.2)
            assert [greeting for _, greeting in sessions.closed] == ["pending"] and calls.active == 1  # live goes on
            nursery.cancel_scope.cancel()

    run_virtual(main, caplog)


def test_a_draining_manager_still_answers_outbound_calls_it_placed_and_is_drained_when_nothing_is_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """While the listener stays open for the drain, a callee picking up an outbound call placed here is bridged
    (refusing would play them an error), and the drain waits for such calls still ringing."""
    sessions = Sessions()
    ringing = [1]

    async def main() -> None:
        calls = manager(sessions)
        calls.outbound_waiting = lambda: ringing[0]
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            assert not calls.drained  # (not shutting down)
            calls.stop_accepting()
            assert calls.prepare("CA" + "4" * 32) is None  # a new inbound call: refused
            assert not calls.drained  # an outbound call still rings
            ringing[0] = 0
            token = calls.prepare(OTHER, AgentOptions("i", greeting="outbound"), placed_here=True)
            assert token is not None and calls.pending == 1 and not calls.drained
            await trio.sleep(3)
            assert sessions.closed == []  # its stream can still come: the listener is open
            nursery.start_soon(calls.handle_stream, await started_stream(OTHER, token))
            await trio.sleep(1)
            assert calls.active == 1 and not calls.drained
            nursery.cancel_scope.cancel()

    run_virtual(main, caplog)


def test_a_draining_manager_is_not_drained_while_a_stream_waits_for_its_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A stream that came before its model session was ready is neither pending (claimed) nor live yet: the drain
    must wait for it all the same, or the call is cut off as it starts."""
    sessions = Sessions(open_s=2.0)

    async def main() -> None:
        calls = manager(sessions)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            token = calls.prepare(CALL)
            calls.stop_accepting()
            nursery.start_soon(calls.handle_stream, await started_stream(CALL, token))
            await trio.sleep(0.5)
            assert calls.pending == 0 and calls.active == 0  # claimed, its session still opening
            assert not calls.drained
            await trio.sleep(2)
            assert calls.active == 1 and not calls.drained
            nursery.cancel_scope.cancel()

    run_virtual(main, caplog)


def test_max_calls_turns_away_new_calls_counting_answered_live_and_ringing_ones(caplog: pytest.LogCaptureFixture) -> None:
    """MEDIASERVER_MAX_CALLS: answered (pending) and live calls and outbound calls ringing count; the webhook again
    for a call already answered is not turned away (that would hang it up); a call's end frees its place."""
    sessions = Sessions()
    ringing = [0]
    third, fourth = "CA" + "4" * 32, "CA" + "5" * 32

    async def main() -> None:
        calls = manager(sessions, max_calls=2, stream_timeout_s=5.0)
        calls.outbound_waiting = lambda: ringing[0]
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            live = calls.prepare(CALL)
            assert live is not None and calls.prepare(OTHER) is not None
            await trio.sleep(0.1)
            stream, caller = memory_twilio_pair()
            messages = TwilioMessages(stream_sid=STREAM, call_sid=CALL)
            await caller.send_message(messages.connected())
            await caller.send_message(messages.start({"token": live}))
            nursery.start_soon(calls.handle_stream, stream)
            await trio.sleep(0.1)
            assert (calls.active, calls.pending, calls.calls_now) == (1, 1, 2) and calls.at_capacity
            assert calls.prepare(third) is None
            assert calls.refused == {"at_capacity": 1} and sessions.opened == 2
            assert calls.prepare(OTHER) is not None  # Twilio retried a webhook: the same session, not a refusal
            assert sessions.opened == 2
            await trio.sleep(5)  # OTHER's stream never came: its session is closed, and its place freed
            assert (calls.calls_now, calls.at_capacity) == (1, False)
            ringing[0] = 1  # an outbound call placed here rings: it holds a place
            assert calls.at_capacity and calls.prepare(third) is None
            ringing[0] = 0  # ... and when it is answered, it takes the place it held
            assert calls.prepare(fourth, placed_here=True) is not None and calls.at_capacity
            await caller.send_message(messages.stop())
            await trio.sleep(1)  # the live call ended: its session closed, its place freed
            assert (calls.active, calls.calls_now) == (0, 1)
            assert calls.prepare(third) is not None
            assert calls.refused == {"at_capacity": 2}
            nursery.cancel_scope.cancel()

    lines = run_virtual(main, caplog)
    assert f"call {third}: refused: at the call limit, MEDIASERVER_MAX_CALLS=2" in lines


def test_max_calls_does_not_turn_away_the_webhook_again_for_a_call_whose_session_failed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The call was let in; its session failed to open (a failed one holds no place), another call took the place:
    Twilio retrying the first call's webhook gets a new session, not a busy (which would hang it up)."""
    opened: list[str] = []

    @contextlib.asynccontextmanager
    async def opener(settings: Settings, agent: AgentOptions) -> AsyncIterator[ProviderLink]:
        opened.append(agent.instructions)
        if len(opened) == 1:
            raise ProviderClosed("401 from the model")
        yield EchoLink()

    async def main() -> None:
        calls = CallManager(Settings(provider="echo", twilio_auth_token="t", data_dir=tempfile.mkdtemp(), max_calls=1), opener)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            assert calls.prepare(CALL) is not None
            await trio.sleep(0.1)
            assert (calls.calls_now, len(opened)) == (0, 1)  # failed: it holds no place
            assert calls.prepare(OTHER) is not None and calls.at_capacity
            assert calls.prepare("CA" + "4" * 32) is None and calls.refusal == "at_capacity"
            assert calls.prepare(CALL) is not None and calls.refusal is None  # the retry: a new session
            await trio.sleep(0.1)
            assert len(opened) == 3
            # A webhook refused for another reason says so, full or not (the app's 503 is for at_capacity only).
            for _ in range(3):
                calls.prepare(OTHER)
            assert calls.prepare(OTHER) is None and calls.refusal == "replayed" and calls.at_capacity
            nursery.cancel_scope.cancel()

    run_virtual(main, caplog)


def test_max_calls_refuses_a_development_mode_stream_without_a_webhook_at_the_limit(caplog: pytest.LogCaptureFixture) -> None:
    sessions = Sessions()

    async def main() -> None:
        calls = CallManager(Settings(provider="echo", data_dir=tempfile.mkdtemp(), max_calls=1), sessions)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            assert calls.prepare(CALL) is not None  # answered: holds the only place
            end = await calls.handle_stream(await started_stream(OTHER, None))
            assert end == StreamEnd(1008, "refused: at the call limit")
            assert calls.refused == {"at_capacity": 1} and sessions.opened == 1
            nursery.cancel_scope.cancel()

    run_virtual(main, caplog)


def test_a_replayed_webhook_gets_no_session_once_the_call_streamed_or_was_answered_three_times(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Twilio signatures carry no timestamp: a captured webhook must not open sessions again and again."""
    sessions = Sessions()

    async def main() -> None:
        calls = manager(sessions)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            # A call that streamed: a later webhook for it is refused.
            nursery.start_soon(calls.handle_stream, await started_stream(CALL, calls.prepare(CALL)))
            await trio.sleep(1)
            assert calls.active == 1
            assert calls.prepare(CALL) is None
            # A call that never streamed: three answers (Twilio's retries), then no more.
            assert all(calls.prepare(OTHER) is not None for _ in range(3))
            assert calls.prepare(OTHER) is None
            assert calls.refused == {"replayed": 2}
            await trio.sleep(0.1)
            assert sessions.opened == 2  # the streamed call's, and one for the other (its three answers share it)
            # Much later (past the longest call), the SID is forgotten.
            await trio.sleep(4 * 3600 + 1)
            assert calls.prepare(OTHER) is not None
            nursery.cancel_scope.cancel()

    messages = run_virtual(main, caplog)
    assert f"call {CALL}: webhook refused: its media stream already ran (a replayed request?)" in messages
    assert f"call {OTHER}: webhook refused: answered 3 times already (a replayed request?)" in messages


def test_the_limit_on_pre_opened_sessions_does_not_count_live_calls(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "MAX_PENDING", 2)
    sessions = Sessions()

    async def main() -> None:
        calls = manager(sessions)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            for sid in (CALL, OTHER):  # two live calls
                nursery.start_soon(calls.handle_stream, await started_stream(sid, calls.prepare(sid)))
            await trio.sleep(1)
            assert (calls.active, calls.pending) == (2, 0)
            waiting = [calls.prepare(f"CA{n}") for n in range(3)]  # two may wait for their streams, not three
            assert [token is not None for token in waiting] == [True, True, False]
            assert calls.refused == {"too_many_pending": 1}
            nursery.cancel_scope.cancel()

    run_virtual(main, caplog)


def test_development_mode_streams_without_a_token_are_bounded_too(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No auth token: a stream with no webhook behind it gets a session -- but not without bound (a flood of them
    would open as many model sessions)."""
    monkeypatch.setattr(registry, "MAX_PENDING", 2)
    sessions = Sessions()

    async def main() -> None:
        calls = manager(sessions, twilio_auth_token=None)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            for n in range(2):
                nursery.start_soon(calls.handle_stream, await started_stream(f"CA{n}", None))
            await trio.sleep(1)
            assert calls.active == 2
            with trio.fail_after(1):
                end = await calls.handle_stream(await started_stream("CA9", None))
            assert end == StreamEnd(1008, "refused: too many calls without a token")
            assert calls.refused == {"too_many_pending": 1} and sessions.opened == 2
            nursery.cancel_scope.cancel()

    messages = run_virtual(main, caplog)
    assert "call CA9: stream without a token, and 2 such calls already; refused" in messages


def test_a_final_status_callback_closes_the_session_of_a_call_whose_stream_never_came(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The caller hung up while the webhook was answered (a callee at once): Twilio's final callback closes the
    pre-opened session now, not at the stream timeout 15 s later, and gives its MEDIASERVER_MAX_CALLS place back.
    A live call is left to its stream."""
    sessions = Sessions()

    async def main() -> None:
        calls = manager(sessions, max_calls=2)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            token = calls.prepare(CALL)
            nursery.start_soon(calls.handle_stream, await started_stream(OTHER, calls.prepare(OTHER)))
            await trio.sleep(1)
            assert (calls.pending, calls.active, calls.calls_now, calls.at_capacity) == (1, 1, 2, True)
            for status in ("initiated", "ringing", "in-progress", "queued", "nonsense"):
                assert not calls.call_ended(CALL, status)
            assert not calls.call_ended("CA" + "5" * 32, "completed")  # a call this server never answered
            assert not calls.call_ended(OTHER, "completed")  # live: its stream ends it
            closed_s = trio.current_time()
            assert calls.call_ended(CALL, "completed")
            assert not calls.call_ended(CALL, "completed")  # (once)
            await trio.sleep(0.1)
            assert [at for at, _ in sessions.closed] == [closed_s]  # at once, not at the stream timeout
            assert (calls.pending, calls.active, calls.calls_now, calls.at_capacity) == (0, 1, 1, False)
            with trio.fail_after(1):  # a stream that still came with its token finds no session
                end = await calls.handle_stream(await started_stream(CALL, token))
            assert end.code == 1008 and sessions.opened == 2
            nursery.cancel_scope.cancel()

    messages = run_virtual(main, caplog)
    assert f"call {CALL}: Twilio says it ended (completed) before its stream came; closed its echo session" in messages


@pytest.mark.parametrize("status", ["busy", "no-answer", "failed", "canceled"])
def test_every_final_status_closes_a_waiting_session(status: str, caplog: pytest.LogCaptureFixture) -> None:
    sessions = Sessions()

    async def main() -> None:
        calls = manager(sessions)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            calls.prepare(CALL)
            await trio.sleep(1)
            assert calls.call_ended(CALL, status)
            await trio.sleep(0.1)
            assert (calls.pending, len(sessions.closed)) == (0, 1)
            nursery.cancel_scope.cancel()

    run_virtual(main, caplog)


def test_development_mode_refuses_a_stream_without_a_token_while_the_server_drains(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """As its webhook would be: a new call opens no model session during the drain."""
    sessions = Sessions()

    async def main() -> None:
        calls = manager(sessions, twilio_auth_token=None)
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            calls.stop_accepting()
            with trio.fail_after(1):
                end = await calls.handle_stream(await started_stream("CA9", None))
            assert end == StreamEnd(1008, "refused: shutting down")
            assert calls.refused == {"shutting_down": 1} and sessions.opened == 0
            nursery.cancel_scope.cancel()

    messages = run_virtual(main, caplog)
    assert "call CA9: stream without a token refused: the server is shutting down" in messages


class _ALawLink(EchoLink):
    input_format = pv.AudioFormat("pcma", 8000)


def test_a_session_whose_audio_cannot_be_bridged_fails_the_stream_with_1011(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        calls = manager(Sessions(link=_ALawLink))
        async with trio.open_nursery() as nursery:
            await nursery.start(calls.run)
            token = calls.prepare(CALL)
            with trio.fail_after(1):
                end = await calls.handle_stream(await started_stream(CALL, token))
            assert end == StreamEnd(1011, "cannot bridge") and calls.refused == {"cannot_bridge": 1}
            nursery.cancel_scope.cancel()

    messages = run_virtual(main, caplog)
    assert any("cannot bridge to echo: A-law providers are not supported" in m for m in messages), messages
