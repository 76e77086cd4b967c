"""One call: a Twilio Media Stream bridged to a provider link, in one nursery.

Tasks of a call, all children of :meth:`CallBridge.run`'s nursery:

* ``_twilio_reader`` -- Twilio messages through the :class:`TwilioStream`
  core; media goes straight up the uplink (jitter buffer, transcode, send),
  marks feed the playback accounting, ``stop`` ends the call;
* ``_provider_reader`` -- provider events: audio to the playout queue,
  speech-started to barge-in, fatal errors end the call;
* ``_pacer`` -- the downlink: queued audio to Twilio in ``chunk_ms`` chunks,
  each followed by a mark, in real time with ``lead_ms`` (to ``lead_ms`` +
  ``TOP_UP_S`` + a chunk) of audio buffered at Twilio: it wakes when a chunk
  is due and sends the chunks of the next ``TOP_UP_S`` with it, in one write.

When both sockets can be polled (the Media Stream on the server's own
listener, a ``ws://`` model or a ``wss://`` one over our TLS stream), the
two readers do not read themselves: each
registers its socket with the run's :class:`~mediaserver.transport.reactor.Reactor`
and waits, and the reactor calls a handler (:meth:`CallBridge._on_twilio_readable`,
:meth:`CallBridge._on_provider_readable`) that does the same work without
awaiting -- audio to the provider with ``send_nowait`` (a ``_flush_link``
task writes what the socket could not take), provider events straight into
the playout queue.  A message costs a function call instead of a task
wake-up.  The reader task takes over whenever awaiting is needed (a
barge-in, a control frame, a closed socket) and errors are re-raised in it,
so the call behaves exactly as with a task per socket.

When any task finishes the call is over and the nursery is cancelled; when
one fails the failure propagates to the caller of :meth:`run` (the WebSocket
handler logs it once).  ``idle_timeout_s`` (nothing from Twilio) and
``max_call_s`` (the whole call) end the call from inside :meth:`run`.

Barge-in (the provider heard the caller start talking) happens under the
send lock, in one step: every item that is queued here, buffered at Twilio
or still being generated is marked interrupted, the queue is emptied, the
pacer's wait is cancelled, ``clear`` goes out, and each item is truncated at
what Twilio's mark echoes confirmed the caller heard *before* the clear.
Late audio of an interrupted item is dropped.

Every write to the Twilio socket happens under one lock, together with the
core's bookkeeping for it, so the core's idea of the wire order is the real
one.  Time is read from Trio only, so the whole bridge runs unchanged under
a ``MockClock`` (tests/bridge/test_call.py).
"""

from __future__ import annotations

import binascii
import contextvars
import logging
import math
import socket
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple, Protocol, runtime_checkable

import trio

from mediaserver._locks import acquire
from mediaserver._native._wsframe import uplink_pass
from mediaserver.logs import shown
from mediaserver.codec import JitterBuffer, Resampler, ulaw_decode, ulaw_encode
from mediaserver.protocol import twilio_events as tw
from mediaserver.protocol.providers import base as pv
from mediaserver.protocol import twilio as tw_stream
from mediaserver.protocol.twilio import StreamState, TwilioStream
from mediaserver.tools import ToolError, ToolSet
from mediaserver.transport.reactor import MESSAGES_PER_TURN, current_reactor
from mediaserver.twilio_rest import TwilioRest, TwilioRestError, dial_twiml

from .link import PolledLink, ProviderClosed, ProviderLink
from .stats import CallStats

__all__ = ["CallBridge", "MessageStream", "PolledStream", "StreamClosed", "StreamEnd"]

log = logging.getLogger("mediaserver.call")
PLAY_OUT_READ_S = 1.0  # after the model closed, how long the provider reader may take to read what it sent before

_TOOL_CALL: contextvars.ContextVar[str | None] = contextvars.ContextVar("mediaserver_tool_call", default=None)

MULAW_FRAME_BYTES = 160  # 20 ms at 8 kHz, Twilio's usual media frame (not contractual)
# An item whose audio stopped this long ago counts as finished for wait_played (end_call, transfer), said
# done or not: not every provider always says so (ElevenLabs' agent_response_complete is optional).
SILENT_ITEM_S = 1.0
# The model's audio queued here ahead of its playback, at most (a model sends faster than real time; one that sent
# hours of it at once would grow the server without bound and stall every call).  Audio past it is dropped.
MAX_QUEUED_S = 300.0
# When the pacer wakes for a chunk that is due, it also sends those due within this long after it, in one write:
# a reply that comes faster than real time (as models send them) costs a wake-up and a system call per
# TOP_UP_S + one chunk of audio instead of per chunk.  Twilio then holds lead_ms to lead_ms + TOP_UP_S + one
# chunk of it (160-280 ms at the defaults); a barge-in's clear drops all of it, and the cut is by marks.
TOP_UP_S = 0.080
DUE_SLACK_S = 1e-6  # a chunk's slot this close after now counts as now (see _take_due)
MODEL_IDLE = "idle: the model took no audio"  # the start of the end reason of a call whose model stopped reading
MAX_CUT_ITEMS = 16  # cut replies whose late audio is still counted for the record (the newest)
MAX_OVERFLOW_LOGS = 32  # replies cut short by MAX_QUEUED_S logged per call (one line each)
MAX_UNKNOWN_TYPES = 32  # unknown provider message types logged per call (one line each)
MAX_DTMF_BATCH = 64  # keypad digits told to the model in one message at most
DIGITS_MARGIN_S = 0.5  # next_digits returns this long before the tool's time limit, with what has arrived
TRANSFER_REQUEST_S = 5.0  # transfer() keeps this much of the tool's time limit for Twilio's REST request
# Once the call is ending (Twilio's stop: the transfer itself ends the stream; or its maximum length), the transfer's
# REST request has this long left for its answer: it is on its way or done, and the call's model socket must not wait
# up to 15 s for it.
TRANSFER_GRACE_S = 0.25

_MEDIA, _STOP, _OTHER, _BARGE = object(), object(), object(), object()


class StreamClosed(Exception):
    """The Twilio WebSocket is gone.

    ``violation``: we closed it because Twilio's side broke the WebSocket
    protocol (the call ends with a protocol error, not a hang-up).
    """

    def __init__(self, message: str, *, violation: bool = False) -> None:
        super().__init__(message)
        self.violation = violation


def stream_closed_reason(exc: StreamClosed) -> str:
    """The end reason for a Twilio stream that closed."""
    return f"protocol error: {exc}" if exc.violation else "twilio hung up"


class StreamEnd(NamedTuple):
    """How to close a Twilio stream that did not end normally: the WebSocket close code and reason.

    Twilio ignores both; they are for the operator's tools and for ``mediaserver dial``,
    which reports a call closed with anything but 1000 as failed.
    """

    code: int
    reason: str


REFUSED = 1008  # policy violation: the stream was refused (no token, wrong account, ...)
FAILED = 1011  # internal error: the call could not be served (no model session, a bug)


class MessageStream(Protocol):
    """The Twilio side's socket, as the bridge uses it."""

    async def receive(self) -> str | bytes:
        """Next message; raises :class:`StreamClosed` when the peer has gone."""
        ...

    async def send(self, text: str) -> None:
        """Send one text message; raises :class:`StreamClosed` when the peer has gone."""
        ...

    async def send_many(self, texts: Sequence[str]) -> None:
        """Send several text messages in order (one write where the transport can); as :meth:`send`."""
        ...


@runtime_checkable
class PolledStream(MessageStream, Protocol):
    """A :class:`MessageStream` that can also be read from a reactor handler (ws_server.ServerStream)."""

    def poll_socket(self) -> socket.socket | None:
        """The socket to watch; None when this connection must be read with :meth:`receive`."""
        ...

    def read_nowait(self) -> bool:
        """Read what is there without blocking; False when :meth:`receive` must take over."""
        ...

    @property
    def inbox(self) -> deque[str | bytes]:
        """The messages read and not yet received, oldest first (pop them from the left)."""
        ...

    def send_many_nowait(self, texts: Sequence[str]) -> bool:
        """Send without waiting: True if on the socket, False if queued (then :meth:`flush` must run)."""
        ...

    def send_media_nowait(self, parts: Sequence[tuple[bytes, bytes, bytes, str]]) -> bool:
        """``send_many_nowait`` of ``(prefix + base64(payload) + suffix).decode()`` and ``then`` for each of
        ``parts`` (an empty ``then`` is not sent), in one write; as it."""
        ...

    def native_read(self) -> tuple[int, int, bool] | None:
        """``(fd, limit, masked)`` when the next read may be made by ``_wsframe.uplink_pass``; else None."""
        ...

    def after_native_read(self, read: int, rest: bytes | None) -> bool:
        """Account for what ``uplink_pass`` read, and parse the ``rest`` it left into :attr:`inbox`; as :meth:`read_nowait`."""
        ...

    async def flush(self) -> None:
        """Write what :meth:`send_many_nowait` queued; raises :class:`StreamClosed` when the peer has gone."""
        ...


class _Watch:
    """One stretch of a socket on the reactor: its task waits for ``done``; the handler says why in ``error``/``result``."""

    __slots__ = ("done", "error", "fd", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: Exception | None = None
        self.result: object = None
        self.fd = -1  # the socket the reactor watches for it

    def again(self) -> None:
        """Have the handler called again in the reactor's next batch (it left messages for later)."""
        current_reactor().again(self.fd)

    def fail(self, exc: Exception) -> None:
        self.error = exc
        self.done.set()

    def end(self, result: object = None) -> None:
        self.result = result
        self.done.set()


class _Chunk:
    __slots__ = ("item", "payload", "received_s")

    def __init__(self, item: str, payload: bytes, received_s: float) -> None:
        self.item = item
        self.payload = payload
        self.received_s = received_s


class _DigitCollector:
    """Keypad digits for one ``next_digits`` call."""

    def __init__(self, count: int, finish_on: str | None) -> None:
        self.count = count
        self.finish_on = finish_on
        self.digits: list[str] = []
        self.done = trio.Event()

    def add(self, digit: str) -> None:
        if self.done.is_set():
            return
        if self.finish_on is not None and digit in self.finish_on:
            self.done.set()
            return
        self.digits.append(digit)
        if len(self.digits) >= self.count:
            self.done.set()


class CallBridge:
    """Bridge one started Twilio stream to one provider link (see the module docstring).

    ``chunk_ms`` is the downlink chunk (a mark follows each), ``lead_ms`` how
    far ahead of its playback a chunk is sent at least (at most ``lead_ms`` +
    ``TOP_UP_S``: see :meth:`_pacer`), ``jitter_depth`` how many later
    frames wait before a missing uplink frame is concealed.
    """

    def __init__(
        self,
        stream: MessageStream,
        twilio: TwilioStream,
        link: ProviderLink,
        *,
        call_sid: str,
        idle_timeout_s: float = 30.0,
        max_call_s: float = 3600.0,
        chunk_ms: int = 40,
        lead_ms: int = 160,
        jitter_depth: int = 2,
        tools: ToolSet | None = None,
        tool_timeout_s: float = 10.0,
        rest: TwilioRest | None = None,
        dtmf_gap_s: float = 1.0,
        goodbye_timeout_s: float = 15.0,
        max_queued_s: float = MAX_QUEUED_S,
    ) -> None:
        if twilio.start is None:
            raise ValueError("the Twilio stream must have started before bridging")
        if chunk_ms <= 0 or lead_ms < 0:
            raise ValueError("chunk_ms must be positive and lead_ms non-negative")
        self.stream = stream
        self.twilio = twilio
        self.link = link
        self.idle_timeout_s = idle_timeout_s
        self.max_call_s = max_call_s
        self.chunk_bytes = chunk_ms * tw.MULAW_SAMPLES_PER_MS
        self.chunk_s = chunk_ms / 1000
        self.lead_s = lead_ms / 1000
        self._max_chunks = max(1, int(max_queued_s * 1000 // chunk_ms))  # chunks queued at most (MAX_QUEUED_S)
        self._overflowed = 0  # replies that lost audio to the cap (each logged, up to MAX_OVERFLOW_LOGS)
        self.stats = CallStats(call_sid=call_sid, provider=link.name, started_s=trio.current_time())
        self.end_reason = "running"

        self.jitter = JitterBuffer(depth=jitter_depth, frame_bytes=MULAW_FRAME_BYTES, codec="ulaw", fill="fade")
        # uplink: µ-law 8 kHz -> provider input
        fmt_in, fmt_out = link.input_format, link.output_format
        for fmt in (fmt_in, fmt_out):
            if fmt.encoding == "pcma":
                raise ValueError("A-law providers are not supported on Twilio calls")
        self._up_pcm = fmt_in.encoding == "pcm16"
        self._up_resampler = (
            Resampler(8000, fmt_in.sample_rate_hz) if self._up_pcm and fmt_in.sample_rate_hz != 8000 else None
        )
        if not self._up_pcm and fmt_in.sample_rate_hz != 8000:
            raise ValueError(f"µ-law input at {fmt_in.sample_rate_hz} Hz is not supported")
        # downlink: provider output -> µ-law 8 kHz
        self._down_pcm = fmt_out.encoding == "pcm16"
        self._down_resampler = (
            Resampler(fmt_out.sample_rate_hz, 8000) if self._down_pcm and fmt_out.sample_rate_hz != 8000 else None
        )
        if not self._down_pcm and fmt_out.sample_rate_hz != 8000:
            raise ValueError(f"µ-law output at {fmt_out.sample_rate_hz} Hz is not supported")
        self._down_tail = False  # the resampler holds the end of the last item's audio (see _resampler_tail)
        # The resampler's filter delay, in 8 kHz samples (rounded up): the first that many samples of each item's
        # µ-law are the filter filling, not the model's audio, so a cut takes them off what the caller heard.
        self._down_delay = math.ceil(self._down_resampler.delay_ms * 8) if self._down_resampler is not None else 0
        # Items cut (by a barge-in, or at the queue's cap) whose audio may still arrive, dropped: heard ms and ms
        # generated so far, so the record's cut text keeps the heard share of the whole reply, not of what had come
        # when it was cut.
        self._cut_items: OrderedDict[str, list[float]] = OrderedDict()
        # PCM16 split inside a sample (a delta of odd length): its first byte waits for the rest, per item
        self._half_sample: tuple[str, bytes] | None = None

        # Every write to the Twilio socket, and every change to the queue and
        # the interrupted set, happens under this lock.
        self._send_lock = trio.StrictFIFOLock()
        self._queue: deque[_Chunk] = deque()
        self._queued = trio.Event()
        self._pending = bytearray()  # downlink µ-law not yet a whole chunk
        self._pending_item: str | None = None
        self._pending_s = 0.0
        self._generating: dict[str, None] = {}  # items with audio arriving (no AudioDone yet), oldest first
        self._interrupted: set[str] = set()
        self._cuts = 0  # barge-ins so far (a truncate for an overflow sent after one would undo its cut)
        self._cut_response: str | None = None  # the response open at the last barge-in: its audio is dropped
        self._playing_until_s = 0.0  # when Twilio's buffer runs dry (Trio time)
        self._pacer_wait: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        # Tools and keypad (see _run_tool, _on_digit, end_call, transfer).
        self.tools = tools
        self.tool_timeout_s = tool_timeout_s
        self.rest = rest
        self.dtmf_gap_s = dtmf_gap_s  # digits this close together reach the model as one message
        self.goodbye_timeout_s = goodbye_timeout_s  # end_call/transfer wait at most this for the goodbye
        self._changed = trio.Event()  # set (and replaced) whenever playback or response state may have moved
        self._watchers = 0  # tasks waiting on _changed (no one, most of the time)
        self._responses_framed = False  # the provider says when a response starts (not pcm, ElevenLabs)
        self._unknown_types: set[str] = set()  # provider message types already logged as unknown
        self._model_cut = False  # the next _barge_in is the model stopping its own reply (pcm clear)
        self._last_heard_s = 0.0  # when Twilio last sent anything (the idle watchdog reads it)
        self._twilio_stuck_s: float | None = None  # since when a write to Twilio has been waiting (the watchdog reads it)
        # Reply latency: when the provider last said the caller stopped speaking (None once answered), and the
        # items already under way then (generating, queued, pending), whose audio is not the answer.
        self._speech_stopped_s: float | None = None
        self._writing: list[str] = []  # the items of the chunks the pacer is writing, until they are counted
        self._audio_in_s = -math.inf  # when the provider last sent audio
        self._tool_groups: dict[str, int] = {}  # response id -> its tool calls under way
        self._tool_scopes: dict[str, trio.CancelScope] = {}  # call id -> the running tool's scope
        self._answer_owed: set[str] = set()  # responses whose finished tools asked for an answer while others ran
        self._before_stop: frozenset[str | None] = frozenset()
        self._now = trio.lowlevel.current_clock().current_time  # trio.current_time() without its wrappers
        self._response_open = False
        self._open_response: str | None = None  # the id of the response last started
        self._ending = False
        self._transfer_asked = False  # a transfer's REST request went out (whatever its answer)
        self._model_gone = False  # the model's side is over (see _provider_closed): nothing more goes to it
        self._gone_reason: str | None = None  # why, while what it said plays out (_play_out)
        self._provider_done = trio.Event()  # the provider reader has returned
        self._hang_up_scope: trio.CancelScope | None = None  # an end_call's hang-up, waiting for the goodbye
        self._transfer_scopes: set[trio.CancelScope] = set()  # transfers' REST requests, shielded (_end shortens them)
        self._limit_s = math.inf  # when the call reaches its maximum length (trio time; set by run)
        self._hang_up_call: str | None = None  # the tool call that asked for it (the model may withdraw it)
        self._announcing: set[trio.CancelScope] = set()  # transfers waiting for their announcement to play
        self._spoken_over: set[str] = set()  # tool calls the caller's barge-in called off: answered without a response
        self._digits: _DigitCollector | None = None
        self._dtmf_text: list[str] = []
        self._dtmf_flush_s = 0.0
        self._dtmf_flushing = False
        self._dtmf_full = trio.Event()  # MAX_DTMF_BATCH keys wait: tell the model now, pause or not
        self._flushing = False  # a _flush_link task is running
        self._up_waiting = False  # the reader task waits for the model to take a frame
        self._twilio_flushing = False  # a _flush_twilio task is running
        self._in_handler = False  # the provider handler is queueing audio (it wakes the pacer itself)
        # Both sockets pollable (plain TCP, or our TLS): the reactor reads them (_read_polled, _provider_polled).
        self._polling = False
        if (
            isinstance(stream, PolledStream)
            and stream.poll_socket() is not None
            and isinstance(link, PolledLink)
            and link.poll_socket() is not None
        ):
            self._polling = True
            self._polled: PolledStream = stream  # self.stream and self.link, typed for the handlers
            self._nowait: PolledLink = link
        # µ-law passthrough, both sockets read by the reactor: a read of plain media goes up in one native call
        self._native_up = self._polling and not self._up_pcm and self._nowait.frames_audio

    # -- lifecycle -----------------------------------------------------------

    async def run(self) -> CallStats:
        """Bridge until the call ends; returns the call's statistics."""
        try:
            with trio.move_on_after(self.max_call_s) as limit:  # (tools see the deadline: a transfer keeps time for it)
                self._limit_s = limit.deadline
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._twilio_reader)
                    nursery.start_soon(self._idle_watchdog)
                    nursery.start_soon(self._provider_reader)
                    nursery.start_soon(self._pacer)
            if limit.cancelled_caught:
                self._end(f"maximum call length {self.max_call_s:g} s")
        finally:
            self._nursery = None
        return self.stats

    def _end(self, reason: str) -> None:
        if self.end_reason == "running":
            self.end_reason = reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        for transfer in self._transfer_scopes:  # (shielded: the call's cancellation does not reach them)
            transfer.deadline = min(transfer.deadline, trio.current_time() + TRANSFER_GRACE_S)

    async def _send_twilio(self, command: tw.TwilioCommand) -> None:
        # caller holds _send_lock.  After ``stop`` the call is being torn down
        # (the nursery is cancelled); a task that resumes before noticing
        # must not feed the core a command it would refuse.
        if self.twilio.state is not StreamState.STREAMING:
            return
        self._twilio_stuck_s = self._now()
        try:
            await self.stream.send(self.twilio.send(command))
        finally:
            self._twilio_stuck_s = None

    def _mark_withheld(self) -> None:
        if self.twilio.marks_withheld == 1:
            log.warning(
                "call %s: %d marks await Twilio's echo; chunks go without marks until echoes catch up "
                "(a barge-in meanwhile cuts the reply at the last mark echoed)",
                self.call_sid, tw_stream.MAX_PENDING_MARKS,
            )

    # -- uplink ----------------------------------------------------------------

    async def _idle_watchdog(self) -> None:
        """End the call after ``idle_timeout_s`` without a message from Twilio, or with a write to it stuck as long.

        A task of its own that wakes about once per timeout, rather than a
        deadline the reader moves on every message (a heap update each time).
        """
        self._last_heard_s = self._now()
        while True:
            stuck_s = self._twilio_stuck_s
            await trio.sleep_until(min(self._last_heard_s, math.inf if stuck_s is None else stuck_s) + self.idle_timeout_s)
            stuck_s = self._twilio_stuck_s
            if stuck_s is not None and self._now() >= stuck_s + self.idle_timeout_s:
                # Twilio sends but does not read (or its path is half dead): the audio, clears and marks we
                # write wait for ever, and the model session with them.
                self._end(f"idle: Twilio took none of our audio for {self.idle_timeout_s:g} s (it is not reading)")
                return
            if self._now() >= self._last_heard_s + self.idle_timeout_s:
                if self._flushing or self._up_waiting:  # Twilio's socket is not read: we wait for the model
                    self._end(f"{MODEL_IDLE} for {self.idle_timeout_s:g} s (it is not reading)")
                else:
                    self._end(f"idle: nothing from Twilio for {self.idle_timeout_s:g} s")
                return

    async def _twilio_reader(self) -> None:
        stats = self.stats
        poll = self._polling
        while True:
            # Polled: the reactor reads until it hands over (a control frame, a
            # stalled model, a closed socket); this task then takes at least
            # the next message, awaiting what must be awaited, and hands the
            # socket back once nothing read is left waiting and no flush to the
            # model is under way -- so the reactor never reads more while the
            # model is behind, and the caller's socket backs up as it would
            # with a task per socket (what is read stays bounded by one read).
            if poll:
                if await self._read_polled():
                    return
                poll = False
            try:
                message = await self.stream.receive()
            except StreamClosed as exc:
                self._end(stream_closed_reason(exc))
                return
            received_s = self._last_heard_s = self._now()
            kind = self._on_twilio(message)
            if kind is _MEDIA:
                for frame in iter(self.jitter.pop, None):
                    await self._uplink(frame)
                stats.uplink.add(self._now() - received_s)
            elif kind is _STOP:
                return
            poll = self._polling and not self._polled.inbox and not self._flushing

    def _on_twilio(self, message: str | bytes) -> object:
        """One Twilio message through the core: _MEDIA (frames wait in the jitter buffer), _STOP or _OTHER."""
        taken = self.twilio.take_media(message)  # the usual caller frame, natively
        if taken is not None:
            self.stats.frames_in += 1
            self.jitter.push(*taken)
            return _MEDIA
        return self._on_twilio_event(message)

    def _on_twilio_event(self, message: str | bytes) -> object:
        """:meth:`_on_twilio` for a message ``take_media`` declined: any event, or the error."""
        event = self.twilio.receive_event(message)
        if type(event) is tw.Media:
            self.stats.frames_in += 1
            self.jitter.push(event.chunk, event.payload)
            return _MEDIA  # media moves no playback: nothing to notify
        if isinstance(event, tw.Stop):
            self._end("twilio sent stop")
            return _STOP
        if isinstance(event, tw.Dtmf):
            log.debug("call %s: DTMF %s", self.stats.call_sid, event.digit)  # (the batch is logged: see _flush_digits)
            self._on_digit(event.digit)
        elif isinstance(event, tw.Unknown):
            log.debug("call %s: ignored Twilio event %r", self.stats.call_sid, event.event)
        # Mark: the core did the playback accounting
        self._notify()  # playback may have moved (end_call and transfer wait on it)
        return _OTHER

    def _up_frame(self, frame: bytes) -> bytes:
        """A µ-law uplink frame as the provider takes it (b"" while the resampler fills)."""
        if self._up_pcm:
            frame = ulaw_decode(frame)
            if self._up_resampler is not None:
                frame = self._up_resampler.process(frame)
        return frame

    async def _uplink(self, frame: bytes) -> None:
        frame = self._up_frame(frame)
        if frame and not self._model_gone:
            self._up_waiting = True  # (while this waits, Twilio's socket is not read: see the idle watchdog)
            try:
                await self.link.send(pv.SendAudio(frame))
            except ProviderClosed as exc:
                self._provider_closed(exc)
                return
            finally:
                self._up_waiting = False
            self.stats.frames_to_model += 1

    # -- the uplink on the reactor (pollable sockets both sides) ----------------

    async def _read_polled(self) -> bool:
        """Run the Twilio side as a reactor handler; True when it is over, False to go on with ``receive``.

        The handler (:meth:`_on_twilio_readable`) does what the loop in
        :meth:`_twilio_reader` does, without awaiting: messages through the
        core, frames through the jitter buffer, audio to the provider with
        ``send_nowait`` (what the socket cannot take at once is flushed by
        :meth:`_flush_link`).  This task only waits: for ``stop``, an error
        (re-raised here, as the loop would have raised it), or a hand-off
        when the connection needs ``receive`` (a closed socket, a control
        frame) or the model is not keeping up; then :meth:`_twilio_reader`
        takes one message itself and comes back here.
        """
        self._tw = watch = _Watch()
        await self._on_reactor(self._polled.poll_socket(), self._on_twilio_readable, watch)
        if watch.error is not None:
            raise watch.error
        return watch.result is _STOP

    async def _on_reactor(self, sock: socket.socket | None, on_readable: Callable[[], None], watch: _Watch) -> None:
        """Have the reactor call ``on_readable`` for ``sock`` until ``watch`` is done; it also runs once at once.

        (At once: for what was read before the handler was registered -- by
        the awaiting path, or with the event that handed over -- and bytes
        kept for it, which the socket's readiness would never report.)  A
        handler that raises fails the watch (:meth:`Reactor.add`'s ``on_error``).
        """
        assert sock is not None
        watch.fd = fd = sock.fileno()
        reactor = current_reactor()
        reactor.add(fd, on_readable, watch.fail)
        try:
            on_readable()
            await watch.done.wait()
        finally:
            reactor.remove(fd)

    def _on_twilio_readable(self) -> None:
        watch = self._tw
        if watch.done.is_set():
            return
        if self._native_up and not self._model_gone:
            spec = self._polled.native_read()
            if spec is not None:
                taker = self.twilio.media_taker()
                framing = self._nowait.audio_framing()
                if taker is not None and framing is not None:
                    self._uplink_native(spec, taker, framing)
                    return
        try:
            more = self._polled.read_nowait()
        except Exception as exc:
            watch.fail(exc)
            return
        self._drain_polled(more)

    def _uplink_native(
        self,
        spec: tuple[int, int, bool],
        taker: tuple[Callable[[str | bytes, int], tuple[int, bytes] | None], int],
        framing: tuple[bytes, bytes, Literal[True] | None],
    ) -> None:
        """The per-frame path of µ-law passthrough in one native call: read, parse, jitter, frame, send (``uplink_pass``).

        What it leaves -- a message that is not plain media (a mark echo,
        ``stop``), an unusual frame, a part of one -- goes the ordinary way
        (:meth:`_drain_polled`), as does what the model's socket did not take.
        """
        link = self._nowait
        jitter = self.jitter
        try:
            start = self._now()
            read, rest, taken, framed, unsent, error = uplink_pass(
                spec[0], spec[1], spec[2], taker[0], taker[1], jitter.push, jitter.pop,
                framing[0], framing[1], framing[2], link.native_send_fd(), MESSAGES_PER_TURN,
            )  # fmt: skip
            if read < 0:  # (nothing there after all)
                return
            self._last_heard_s = start
            more = self._polled.after_native_read(read, rest)
            keep = True
            if taken:
                stats = self.stats
                stats.frames_in += taken
                if framed:
                    stats.frames_to_model += framed
                    link.last_send_s = start
                    if unsent:  # (the model's socket was busy or full: the ordinary send queues it, or raises)
                        keep = self._uplink_frames_nowait(unsent)
                elapsed = self._now() - start
                for _ in range(taken):
                    stats.uplink.add(elapsed)
            if error is not None:
                raise error
        except Exception as exc:
            self._tw.fail(exc)
            return
        if not keep:  # the model is not keeping up: the reader task takes over and waits for it
            self._tw.end()
        elif rest is not None or not more:
            self._drain_polled(more, MESSAGES_PER_TURN - taken)

    def _drain_polled(self, more: bool, budget: int = MESSAGES_PER_TURN) -> None:
        # The per-frame path, flattened (this runs 50 times a second per call):
        # what _on_twilio does for a plain media message, inline.
        messages = self._polled.inbox
        stats = self.stats
        now = self._now
        take = self.twilio.take_media
        jitter = self.jitter
        # (budget: a flood is taken in turns with the other calls, MESSAGES_PER_TURN per handler call: see the reactor)
        try:
            received_s = self._last_heard_s = now()
            while messages:
                if not budget:
                    if more:
                        self._tw.again()
                    break
                budget -= 1
                message = messages.popleft()
                taken = take(message)
                if taken is not None:
                    stats.frames_in += 1
                    jitter.push(*taken)
                else:
                    kind = self._on_twilio_event(message)
                    if kind is _STOP:
                        self._tw.end(_STOP)
                        return
                    if kind is not _MEDIA:
                        continue
                keep = True
                frame = jitter.pop()
                while frame is not None:
                    keep = self._uplink_nowait(frame) and keep
                    frame = jitter.pop()
                stats.uplink.add(now() - received_s)
                if not keep:  # the model is not keeping up: the reader task takes over and waits for it
                    more = False
                    break
        except Exception as exc:
            self._tw.fail(exc)
            return
        if not more:
            self._tw.end()

    def _uplink_nowait(self, frame: bytes) -> bool:
        """Send one frame up; False when audio is piling up behind a flush already under way.

        Then the handler hands over to the reader task, whose awaiting send
        waits for the model: the caller's socket is no longer read, as with
        a task per socket, so a stalled model cannot make the backlog grow
        without bound (and the idle watchdog sees the silence).
        """
        if self._model_gone:  # (the goodbye plays out: the caller's audio has nowhere to go)
            return True
        if self._up_pcm:
            frame = self._up_frame(frame)
        if not frame:  # (the resampler filling, or an empty media payload: nothing to send)
            return True
        self.stats.frames_to_model += 1
        try:
            if self._nowait.send_audio_nowait(frame):
                return True
        except ProviderClosed as exc:
            self._provider_closed(exc)
            return True
        return self._queued_up()

    def _uplink_frames_nowait(self, frames: bytes) -> bool:
        """Send audio messages ``uplink_pass`` framed and could not write; as :meth:`_uplink_nowait`."""
        try:
            if self._nowait.send_frames_nowait(frames):
                return True
        except ProviderClosed as exc:
            self._provider_closed(exc)
            return True
        return self._queued_up()

    def _queued_up(self) -> bool:
        """Audio went into the link's backlog: a flush writes it; False if one was already under way (hand over)."""
        if self._flushing:
            return False
        self._start_flush()
        return True

    def _start_flush(self) -> None:
        if not self._flushing and self._nursery is not None:
            self._flushing = True
            self._nursery.start_soon(self._flush_link)

    async def _flush_link(self) -> None:
        """Write what ``send_nowait`` could not (the provider's socket was full or busy)."""
        try:
            await self._nowait.flush()
        except ProviderClosed as exc:
            self._provider_closed(exc)
        finally:
            self._flushing = False

    # -- provider events -----------------------------------------------------

    async def _provider_reader(self) -> None:
        try:
            await self._read_provider()
        finally:
            self._provider_done.set()

    async def _read_provider(self) -> None:
        polled = self._polling
        while True:
            if polled:
                kind = await self._provider_polled()
                if kind is None:  # the link needs receive() from now on
                    polled = False
                    continue
            else:
                try:
                    event = await self.link.receive()
                except ProviderClosed as exc:
                    self._provider_closed(exc)
                    return
                kind = self._on_provider_event(event)
                # Back to the reactor once nothing read is left waiting (a ping or a fragmented message needed
                # the awaiting path for one message, not for the rest of the call).
                polled = self._polling and not self._nowait.inbox
            if kind is _STOP:
                return
            if kind is _BARGE:
                await self._barge_in()

    def _provider_closed(self, exc: ProviderClosed) -> None:
        """The model's side is over (whichever task found out): the call ends, once what it said has played.

        A model may stream a goodbye faster than real time and close at
        once (ElevenLabs' own end_call, a session's maximum length): the
        audio already here is the caller's to hear, for up to
        ``goodbye_timeout_s``.  Meanwhile the caller's audio is dropped.
        Not after a protocol error (``exc.broken``): the call ends at once.
        A model that closed normally (``exc.orderly``) ends the call as
        ``model closed: ...``, not as a failure.
        """
        # (a failure's end line says why, at warning level: one line, as for a Twilio protocol error)
        reason = f"model closed: {exc.reason}" if exc.orderly else f"provider ended: {exc.reason}"
        if self._model_gone:
            if exc.orderly and self._gone_reason is not None:
                # The reader found the model's own close behind a send that failed first (a reset): that says why.
                self._gone_reason = reason
            return
        self._model_gone = True
        if (
            exc.broken
            or self._nursery is None
            or self.end_reason != "running"
            or self.twilio.state is not StreamState.STREAMING
        ):
            self._end(reason)
            return
        self._gone_reason = reason
        self._nursery.start_soon(self._play_out)

    async def _play_out(self) -> None:
        # What the model sent before it closed may still wait to be read (a send found out first): the provider
        # reader reads to the close, and is given a moment to.
        with trio.move_on_after(PLAY_OUT_READ_S):
            await self._provider_done.wait()
        if self._pending_item is not None:
            self._finish_item(self._pending_item)
        self._generating.clear()  # nothing more is coming: no reply is still being said
        self._response_open = False
        if not await self.wait_played(self.goodbye_timeout_s):
            log.warning("call %s: the model's last words still playing after %g s; hanging up", self.call_sid, self.goodbye_timeout_s)
        self._end(self._gone_reason or "provider ended")

    def _on_provider_event(self, event: pv.ProviderEvent) -> object:
        """One provider event, handled at once; _BARGE if the caller's task must barge in, _STOP if the call ends."""
        self._observe(event)
        if isinstance(event, pv.AudioDelta):
            if event.item_id not in self._interrupted:
                if event.response_id is not None and event.response_id == self._cut_response:
                    self._cut_unheard(event.item_id, len(event.payload))  # a response cut before it had audio
                else:
                    self._generating[event.item_id] = None
                    self._downlink(event.item_id, event.payload)
            elif (cut := self._cut_items.get(event.item_id)) is not None:  # the rest of a cut reply: dropped, counted
                cut[1] += len(event.payload) / self.link.output_format.bytes_per_ms
                self.stats.transcript.cut(event.item_id, int(cut[0]), round(cut[1]))
        elif isinstance(event, pv.AudioDone):
            self._generating.pop(event.item_id, None)
            self._finish_item(event.item_id)
        elif isinstance(event, pv.SpeechStarted):
            if not event.by_caller:  # the model stopped its own reply: the same cut, not the caller's barge-in
                self._model_cut = True
                return _BARGE
            if event.speech_began:
                self._speech_stopped_s = None  # the caller goes on: the reply latency counts from their next stop
            if event.item_id is not None:  # (the caller's transcript may come after the reply's: order by this)
                self.stats.transcript.began("user", event.item_id, self._now() - self.stats.started_s)
            return _BARGE
        elif isinstance(event, pv.SpeechStopped):
            self._speech_stopped_s = self._now()
            self._before_stop = frozenset(
                [
                    *self._generating,
                    *(chunk.item for chunk in self._queue),
                    self._pending_item if self._pending else None,
                    *self._writing,  # the chunks the pacer is writing now
                ]
            )
        elif isinstance(event, pv.ProviderError):
            what = event.message if event.code is None else f"{event.message} (code {shown(event.code, 80)})"
            if event.fatal:  # (the call's end line says why)
                self._end(f"provider error: {what}")
                return _STOP
            log.warning("call %s: %s error: %s", self.stats.call_sid, self.link.name, shown(what, 300))
        elif isinstance(event, pv.ToolCall):
            # Run in the call's nursery: a slow tool must not hold up the provider reader.
            if self._nursery is not None:
                self._nursery.start_soon(self._run_tool, event)
        elif isinstance(event, pv.ToolCallsCancelled):
            self._cancel_tools(event.call_ids)
        elif isinstance(event, pv.Unknown):
            self._unknown(event)
        elif isinstance(event, pv.Transcript):
            offset_s = self._now() - self.stats.started_s
            self.stats.transcript.add(event.role, event.text, final=event.final, item_id=event.item_id, offset_s=offset_s,
                                      cumulative=event.cumulative, cut=event.cut)
            if event.final:
                log.debug("call %s: %s: %s", self.stats.call_sid, event.role, shown(event.text, 2000))
        return _OTHER

    def _unknown(self, event: pv.Unknown) -> None:
        """A message type the provider's core does not know: said once per type and call (ignored all the same).

        At warning level for ``pcm``, whose protocol is ours: an unknown type
        there is a mistake in the model (``"replyDone"``), and a barge-in or a
        reply's end it meant would otherwise be lost without a word.  Vendors add
        event types as they go: those are for the debug log.
        """
        if event.type in self._unknown_types or len(self._unknown_types) >= MAX_UNKNOWN_TYPES:
            return
        self._unknown_types.add(event.type)
        level = logging.WARNING if self.link.name == "pcm" else logging.DEBUG
        log.log(level, "call %s: %s sent a message of unknown type %r; ignored", self.call_sid, self.link.name, event.type[:60])

    async def _provider_polled(self) -> object:
        """Read the provider on the reactor until an event needs this task: _BARGE, _STOP, or None (hand-off).

        As :meth:`_read_polled` for the Twilio side: the handler
        (:meth:`_on_provider_readable`) handles events without awaiting; a
        barge-in (it awaits the send lock) comes back here and the reader
        returns to the reactor after it.
        """
        self._pv = watch = _Watch()
        # (messages read by wait_ready, or after the SpeechStarted of a barge-in, are taken at once)
        await self._on_reactor(self._nowait.poll_socket(), self._on_provider_readable, watch)
        error = watch.error
        if isinstance(error, ProviderClosed):
            self._provider_closed(error)
            return _STOP
        if error is not None:
            raise error
        return watch.result

    def _on_provider_readable(self) -> None:
        watch = self._pv
        if watch.done.is_set():
            return
        try:
            more = self._nowait.read_nowait()
        except Exception as exc:
            watch.fail(exc)
            return
        self._drain_provider(more)

    def _drain_provider(self, more: bool) -> None:
        link = self._nowait
        events = link.inbox
        kind: object = _OTHER
        self._in_handler = True
        try:
            if link.backlogged:  # the core's replies, queued
                self._start_flush()
            while events:
                kind = self._on_provider_event(events.popleft())
                if kind is not _OTHER:
                    break
        except Exception as exc:
            self._pv.fail(exc)
            return
        finally:
            self._in_handler = False
        if kind is not _OTHER:  # a barge-in or the end, for the task: nothing more goes to Twilio from here
            # (Not even through the pacer: woken now, it could send a chunk of the reply being cut before the
            # barge-in takes the send lock and clears the queue.)
            self._pv.end(kind)
            return
        try:
            self._pace_now()
        except Exception as exc:
            self._pv.fail(exc)
            return
        if not more:
            self._pv.end()
        elif link.unread:  # (a flood of small messages: the rest in the next batch, after the other calls)
            self._pv.again()

    # -- tools, keypad, hanging up and transfer ---------------------------------

    @property
    def call_sid(self) -> str:
        return self.stats.call_sid

    def _notify(self) -> None:
        if self._watchers:  # a fresh Event per message only when someone waits for one
            self._changed.set()
            self._changed = trio.Event()

    def _observe(self, event: pv.ProviderEvent) -> None:
        if isinstance(event, pv.ResponseStarted):
            self._response_open = True
            self._open_response = event.response_id
            self._responses_framed = True
        elif isinstance(event, pv.ResponseDone):
            if event.response_id is not None and self._open_response not in (None, event.response_id):
                return  # an earlier response's end, after the next one began (a Gemini connection switch)
            self._response_open = False
            if event.status in ("cancelled", "failed"):  # no spoken answer is coming for the last stop
                self._speech_stopped_s = None
            if event.status == "failed":  # (quota, rate limit, server error: the caller hears nothing)
                log.warning("call %s: %s: the model's response failed: %s", self.call_sid, self.link.name,
                            shown(event.error or "no reason given", 300))
        self._notify()

    async def _run_tool(self, call: pv.ToolCall) -> None:
        """Run one tool call and answer it; errors become an error result, never a failed call.

        The model may withdraw the call while it runs (:class:`~pv.ToolCallsCancelled`):
        the tool is cancelled and nothing is answered; a transfer it asked
        for is cancelled with it, unless Twilio's REST request is under way.
        """
        self.stats.tool_calls.append(call.name)
        group = call.response_id  # parallel calls of one response: the last result asks for the answer, for all
        if group is not None:
            self._tool_groups[group] = self._tool_groups.get(group, 0) + 1
        withdrawn = False
        try:
            if self.tools is None:
                output, respond = '{"error": "no tools are configured"}', True
            else:
                with trio.CancelScope() as scope:
                    self._tool_scopes[call.call_id] = scope
                    _TOOL_CALL.set(call.call_id)  # (this task's own: end_call learns which call asked)
                    try:
                        outcome = await self.tools.run(
                            call.name, call.arguments, control=self, timeout_s=self.tool_timeout_s
                        )
                    finally:
                        if self._tool_scopes.get(call.call_id) is scope:
                            del self._tool_scopes[call.call_id]
                if scope.cancelled_caught:
                    log.info("call %s: tool %s withdrawn by the model; cancelled, not answered", self.call_sid, shown(call.name))
                    withdrawn = True
                else:
                    output, respond = outcome.output, outcome.respond
                    log.info("call %s: tool %s -> %s", self.call_sid, shown(call.name), "ok" if outcome.ok else shown(output, 200))
        finally:
            if group is not None:
                if self._tool_groups[group] > 1:
                    self._tool_groups[group] -= 1
                else:
                    del self._tool_groups[group]
                    if withdrawn:  # the last of its response owes no answer (the providers that withdraw calls
                        self._answer_owed.discard(group)  # answer by themselves), and leaves no entry behind
        if withdrawn:
            self._spoken_over.discard(call.call_id)  # (a transfer the caller talked over, withdrawn by the model too)
            return
        if group is not None:
            if group in self._tool_groups:  # others of its response still run
                if respond:
                    self._answer_owed.add(group)
                respond = False
            elif group in self._answer_owed:
                self._answer_owed.discard(group)
                respond = True
        if call.call_id in self._spoken_over:  # the caller is talking: their turn brings the next response
            self._spoken_over.discard(call.call_id)
            respond = False
        if self._ending and self._hang_up_call == call.call_id:  # (a tool of the module's own that ended the call,
            respond = False  # as the built-in end_call: the goodbye was said before it; nothing more is asked for)
        try:
            await self.link.send(pv.ToolResult(call.call_id, output, respond=respond))
        except ProviderClosed as exc:
            self._provider_closed(exc)

    def _goodbye_spoken_over(self) -> None:
        """The caller barged in on the agent while an end_call or a transfer waited for its words to play: neither
        happens (a caller who says "wait, one more thing" over the goodbye stays on the line).

        A model that generates faster than real time (OpenAI) has its response
        done, tool call and all, long before the caller has heard the goodbye,
        so no provider withdraws the call: the bridge does.  The model asks
        again if the call should still end.
        """
        if self.end_reason != "running":
            return
        for scope in self._announcing:  # (the transfer answers the model itself: see transfer)
            scope.cancel()
        if self._hang_up_scope is not None:
            self._hang_up_scope.cancel()
            self._hang_up_scope = self._hang_up_call = None
            self._ending = False
            log.info("call %s: the caller spoke over the goodbye; not hanging up", self.call_sid)

    def _cancel_tools(self, call_ids: Sequence[str]) -> None:
        for call_id in call_ids:
            scope = self._tool_scopes.get(call_id)
            if scope is not None:
                scope.cancel()
        if self._hang_up_call is not None and self._hang_up_call in call_ids and self._hang_up_scope is not None:
            # end_call returned at once, its hang-up waits for the goodbye: a withdrawn call (Deepgram's speculative
            # dispatch when the caller's turn resumes, a barge-in on the goodbye) must not hang up on the caller.
            self._hang_up_scope.cancel()
            self._hang_up_scope = self._hang_up_call = None
            self._ending = False
            log.info("call %s: end_call withdrawn by the model; the call goes on", self.call_sid)

    def _quiet(self) -> bool:
        """Nothing being said: no response open, no audio arriving, nothing queued, everything sent confirmed played."""
        return (
            not self._response_open
            and (not self._generating or self._now() >= self._audio_in_s + SILENT_ITEM_S)
            and not self._queue
            and not self._pending
            and self.twilio.unconfirmed_samples == 0
        )

    async def _goodbye_begun(self, limit_s: float) -> None:
        """Nothing playing and no audio for a while, from a provider that does not say when a response starts:
        give the goodbye ``SILENT_ITEM_S`` (at most ``limit_s``) to begin.

        A text-to-speech pipeline (a ``pcm`` model) may send its ``end_call``
        before the goodbye's audio is ready; hanging up at once would cut it.
        Providers that frame responses (OpenAI, Gemini, Deepgram, AssemblyAI)
        say so with the response still open.
        """
        if (
            self._responses_framed
            or self._model_gone
            or self.twilio.state is not StreamState.STREAMING
            or self._now() < self._audio_in_s + SILENT_ITEM_S  # audio just came: that was the goodbye
            or not self._quiet()
        ):
            return
        with trio.move_on_after(min(SILENT_ITEM_S, limit_s)):
            while self._quiet():
                await self._next_change()

    async def wait_played(self, limit_s: float) -> bool:
        """Wait (at most ``limit_s``) until what the agent is saying has played; True if it has."""
        with trio.move_on_after(limit_s):
            while not self._quiet():
                # (and look again once the last audio is SILENT_ITEM_S old: an item may never be said done)
                silent_s = self._audio_in_s + SILENT_ITEM_S
                await self._next_change(silent_s if self._generating and silent_s > self._now() else math.inf)
            return True
        return False

    async def _next_change(self, until_s: float = math.inf) -> None:
        """Wait until playback or response state may have moved (``_notify``), or until ``until_s``."""
        self._watchers += 1
        try:
            with trio.move_on_at(until_s):
                await self._changed.wait()
        finally:
            self._watchers -= 1

    @property
    def handed_off(self) -> bool:
        """The agent was ending the call (``end_call``) or had asked Twilio to transfer it: a model failure from
        then on is no news for the caller (and a failure message would replace the transfer's ``<Dial>``)."""
        return self._ending or self._transfer_asked

    async def end_call(self, reason: str) -> None:
        """CallControl: end the call once the goodbye has played (returns at once)."""
        if self._nursery is not None and not self._ending:
            self._ending = True
            self._hang_up_scope = scope = trio.CancelScope()
            self._hang_up_call = _TOOL_CALL.get()
            self._nursery.start_soon(self._hang_up, reason, scope)

    async def _hang_up(self, reason: str, scope: trio.CancelScope) -> None:
        with scope:  # (cancelled if the model withdraws the end_call while the goodbye plays: _cancel_tools)
            await self._goodbye_begun(self.goodbye_timeout_s)
            if not await self.wait_played(self.goodbye_timeout_s):
                log.warning("call %s: goodbye still playing after %g s; hanging up", self.call_sid, self.goodbye_timeout_s)
            # (called off while this task was already woken -- a barge-in clears what was playing, which also
            # makes it look played -- the wait returns without a checkpoint: the cancellation is seen here)
            await trio.lowlevel.checkpoint_if_cancelled()
            # Closing the stream ends the call: the TwiML has <Hangup/> after <Connect>.
            self._end(f"agent hung up: {reason}")

    async def transfer(self, to: str) -> None:
        """CallControl: cold transfer with a REST ``<Dial>`` once the agent's words have played."""
        if self.rest is None:
            raise ToolError("transfers need Twilio REST credentials, which are not configured")
        # The goodbye may take the tool's time, but not the part the REST request needs.
        with trio.CancelScope() as announcing:  # (cancelled by a barge-in on it: _goodbye_spoken_over)
            self._announcing.add(announcing)
            try:
                left_s = trio.current_effective_deadline() - self._now() - TRANSFER_REQUEST_S
                await self._goodbye_begun(max(0.0, min(self.goodbye_timeout_s, left_s)))
                left_s = trio.current_effective_deadline() - self._now() - TRANSFER_REQUEST_S
                await self.wait_played(max(0.0, min(self.goodbye_timeout_s, left_s)))
                await trio.lowlevel.checkpoint_if_cancelled()  # (as in _hang_up)
            finally:
                self._announcing.discard(announcing)
        if announcing.cancelled_caught:
            call_id = _TOOL_CALL.get()
            if call_id is not None:
                self._spoken_over.add(call_id)
            log.info("call %s: the caller spoke over the transfer's announcement; not transferring to %s",
                     self.call_sid, to)
            raise ToolError(f"the caller started talking before the transfer to {to}: it was not made and the call"
                            " goes on (transfer again if they still want it)")
        # The request has what is left of the tool's time (at least TRANSFER_REQUEST_S), not the REST client's own
        # 15 s: the caller hears nothing meanwhile.
        request_s = max(TRANSFER_REQUEST_S, trio.current_effective_deadline() - self._now())
        await trio.lowlevel.checkpoint_if_cancelled()  # (a call already ending asks Twilio for nothing)
        # Shielded: once asked, Twilio transfers, so the call must end here too -- but when the call ends meanwhile
        # (Twilio stops the stream for the transfer; its maximum length), the answer gets TRANSFER_GRACE_S more.
        scope = trio.CancelScope(shield=True, deadline=self._limit_s + TRANSFER_GRACE_S)
        if self.end_reason != "running":
            scope.deadline = min(scope.deadline, trio.current_time() + TRANSFER_GRACE_S)
        self._transfer_scopes.add(scope)
        try:
            with scope:
                self._transfer_asked = True
                await self.rest.update_call(self.call_sid, twiml=dial_twiml(to), timeout_s=min(request_s, 15.0))
            if scope.cancelled_caught:
                log.info("call %s: transfer to %s: the call ended before Twilio answered (it is likely under way)",
                         self.call_sid, to)
                raise ToolError(f"the call ended before Twilio answered: the transfer to {to} is likely under way")
        except TwilioRestError as exc:
            if exc.uncertain:  # asked, and no answer: Twilio may be transferring the call right now
                log.warning("call %s: transfer to %s: %s; it may be under way", self.call_sid, to, exc)
                raise ToolError(f"no answer from Twilio in time: the transfer to {to} may be under way") from exc
            log.error("call %s: transfer to %s failed: %s", self.call_sid, to, exc)
            raise ToolError(f"the transfer failed: {exc}") from exc
        finally:
            self._transfer_scopes.discard(scope)
        log.info("call %s: transferred to %s", self.call_sid, to)
        self._end(f"transferred to {to}")  # Twilio now runs <Dial>; the stream is over

    async def next_digits(self, count: int, timeout_s: float, finish_on: str | None) -> str:
        """CallControl: collect keypad digits pressed from now on (see CallContext.next_digits)."""
        if self._digits is not None:
            raise ToolError("another tool is already reading the keypad")
        collector = self._digits = _DigitCollector(count, finish_on)
        # Give up in time for the tool to answer with what arrived: not after the tool's own time limit.
        until = min(self._now() + timeout_s, trio.current_effective_deadline() - DIGITS_MARGIN_S)
        try:
            with trio.move_on_at(until):
                await collector.done.wait()
        finally:
            self._digits = None
        return "".join(collector.digits)

    def _on_digit(self, digit: str) -> None:
        if self._digits is not None:  # a tool is reading the keypad: the digit is its
            self._digits.add(digit)
            return
        self._dtmf_text.append(digit)
        self._dtmf_flush_s = self._now() + self.dtmf_gap_s
        if len(self._dtmf_text) >= MAX_DTMF_BATCH:  # (a caller who never pauses, or a flood: batches of at most this)
            self._dtmf_full.set()
        if not self._dtmf_flushing and self._nursery is not None:
            self._dtmf_flushing = True
            self._nursery.start_soon(self._flush_digits)

    async def _flush_digits(self) -> None:
        """Tell the model which keys were pressed, once the caller pauses for ``dtmf_gap_s`` (or
        ``MAX_DTMF_BATCH`` keys wait: then in messages of at most that many)."""
        while True:
            while self._now() < self._dtmf_flush_s and not self._dtmf_full.is_set():
                with trio.move_on_at(self._dtmf_flush_s):
                    await self._dtmf_full.wait()
            self._dtmf_full = trio.Event()
            digits, self._dtmf_text = self._dtmf_text[:MAX_DTMF_BATCH], self._dtmf_text[MAX_DTMF_BATCH:]
            last = not self._dtmf_text
            if last:
                self._dtmf_flushing = False  # (keys pressed while this is sent start the next message)
            elif len(self._dtmf_text) >= MAX_DTMF_BATCH:
                self._dtmf_full.set()
            log.info("call %s: keypad %s", self.stats.call_sid, "".join(digits))
            text = f"The caller pressed {', '.join(digits)} on the phone keypad."
            try:
                await self.link.send(pv.SendText(text))
            except ProviderClosed as exc:
                self._provider_closed(exc)
                return
            if last:
                return

    # -- downlink --------------------------------------------------------------

    def _downlink(self, item: str, payload: bytes) -> None:
        now = self._audio_in_s = self._now()  # (also when audio last came: see _quiet)
        if len(self._queue) >= self._max_chunks:
            self._drop_overflow(item, 0, len(payload) / self.link.output_format.bytes_per_ms)
            return
        if self._down_tail and self._pending_item != item:
            self._resampler_tail(self._pending_item)  # another reply without an "audio done" for the last one
        if self._down_pcm:
            half = self._half_sample
            if half is not None:
                self._half_sample = None
                if half[0] == item:  # (another item's stray byte is dropped: it was never a whole sample)
                    payload = half[1] + payload
            if len(payload) & 1:
                self._half_sample = (item, payload[-1:])
                payload = payload[:-1]
            if self._down_resampler is not None:
                payload = self._down_resampler.process(payload)
                self._down_tail = True
            payload = ulaw_encode(payload)
        if self._pending_item != item:
            self._flush_pending(self._pending_item)
            self._pending_item = item
        if not payload:
            return
        room = (self._max_chunks - len(self._queue)) * self.chunk_bytes - len(self._pending)
        if len(payload) > room:  # (one message can hold minutes of audio)
            kept = max(room, 0)
            self._drop_overflow(item, kept, (len(payload) - kept) / tw.MULAW_SAMPLES_PER_MS)
            payload = payload[:kept]
            if not payload:
                return
        started = not self._pending
        if started:
            self._pending_s = now
        self._pending += payload
        size = self.chunk_bytes
        whole = len(self._pending) - len(self._pending) % size
        for at in range(0, whole, size):
            self._queue.append(_Chunk(item, bytes(self._pending[at : at + size]), self._pending_s))
        if whole:
            del self._pending[:whole]
            self._pending_s = now
        if (whole or started) and not self._in_handler:
            # (A handler sends what is due itself, then wakes the pacer if need be.)  A part-chunk alone wakes
            # it too: an idle pacer plays it after one chunk's time if nothing joins it (a reply whose last
            # delta is short and that never gets "audio done" would otherwise keep its tail until the next).
            self._queued.set()

    def _drop_overflow(self, item: str, kept: int, dropped_ms: float) -> None:
        """The queue holds ``MAX_QUEUED_S`` of audio already: the rest of ``item`` is dropped, as if it were cut.

        (The rest of the reply, not only this piece: resumed later, the
        caller would hear it jump from minute 5 to minute N.  A reply that
        begins while the queue is full is dropped whole.)  ``kept``: µ-law
        samples of this piece that still join the queue; ``dropped_ms``: the
        audio of it that does not.  As for a barge-in, the model is told
        where its reply ends for the caller (``Truncate`` at the end of what
        was sent or queued: a barge-in later cuts it again, at what was
        heard), and the record keeps the share of the reply's text that
        plays.
        """
        if item in self._interrupted:
            return
        self._interrupted.add(item)  # (its later audio is dropped on arrival)
        self._overflowed += 1
        kept += self.twilio.playback(item).sent_samples + sum(len(c.payload) for c in self._queue if c.item == item)
        if self._pending_item == item:
            kept += len(self._pending)
        kept_ms = max(0, kept - self._down_delay) // tw.MULAW_SAMPLES_PER_MS
        self._cut_items[item] = [kept_ms, kept_ms + dropped_ms]  # (the rest of it, when it comes, counts as dropped)
        if len(self._cut_items) > MAX_CUT_ITEMS:
            self._cut_items.popitem(last=False)
        self.stats.transcript.cut(item, kept_ms, round(kept_ms + dropped_ms))
        if self._overflowed <= MAX_OVERFLOW_LOGS:
            log.warning(
                "call %s: the model's audio is more than %g s ahead of its playback; the rest of %s is dropped "
                "(the model is told its reply ends at %d ms)",
                self.call_sid, self._max_chunks * self.chunk_s, item, kept_ms,
            )  # fmt: skip
        if self._nursery is not None and not self._model_gone:
            self._nursery.start_soon(self._truncate_overflow, item, kept_ms, self._cuts)

    async def _truncate_overflow(self, item: str, kept_ms: int, cuts: int) -> None:
        if self._cuts != cuts or self._model_gone:  # a barge-in came first: it cut the reply at what was heard
            return
        try:
            await self.link.send(pv.Truncate(item, kept_ms))
        except ProviderClosed as exc:
            self._provider_closed(exc)

    def _resampler_tail(self, item: str | None) -> None:
        """The end of ``item``'s audio still inside the resampler's filter (a few ms), to play with it now.

        Left there, it would play at the start of the next reply, however
        much later that comes: a click.
        """
        assert self._down_resampler is not None
        tail = self._down_resampler.flush()  # (and reset: the next reply starts from silence)
        self._down_tail = False
        if tail and item not in self._interrupted:  # (a cut reply's tail is dropped, as the rest of it)
            if not self._pending:
                self._pending_s = self._now()
            self._pending += ulaw_encode(tail)

    def _finish_item(self, item: str) -> None:
        """All of ``item``'s audio is here: what the resampler still holds of it and its part-chunk join the queue."""
        if item in self._interrupted:
            return
        if self._down_tail and item == self._pending_item:
            self._resampler_tail(item)
        self._flush_pending(item)

    def _flush_pending(self, item: str | None) -> None:
        if item is not None and item == self._pending_item and self._pending:
            self._queue.append(_Chunk(item, bytes(self._pending), self._pending_s))
            self._pending.clear()
            if not self._in_handler:
                self._queued.set()

    def _pace_now(self) -> None:
        """From a handler: send the queued chunks that are already due, as the pacer would, without awaiting.

        A model that streams in real time (or slower) has every chunk due on
        arrival; sending it here saves the pacer a wake-up per chunk.  What
        is not due yet, or finds the send lock taken, is left to the pacer,
        which is woken for it.  Raises :class:`StreamClosed` as the pacer's
        send would.
        """
        queue = self._queue
        if queue and not self._send_lock.locked():
            now = self._now()
            due = self._take_due(now, now)
            if due and self.twilio.state is StreamState.STREAMING:
                # (all in one write: a large delta, or the start of a reply, has several chunks due at once)
                sent = self._polled.send_media_nowait(self._chunk_parts(due))
                for chunk, slot_s in due:
                    self._chunk_sent(chunk, slot_s, now)
                if not sent:
                    self._start_twilio_flush()
        if queue or self._pending:  # (a partial chunk: the pacer plays it if nothing joins it in time)
            self._queued.set()

    def _take_due(self, now: float, horizon_s: float, *, first: bool = False) -> list[tuple[_Chunk, float]]:
        """Take the queued chunks whose slot (``lead_s`` before Twilio plays them) is at ``horizon_s`` or before,
        with the first one in any case if ``first``: each chunk, and when the lead let it out (now, at the latest).

        (To a microsecond: the slots are float sums of chunk lengths, which land either side of a time they
        meet exactly -- four 40 ms chunks are not quite 160 ms, and the fifth would miss its turn.)
        """
        horizon_s += DUE_SLACK_S
        queue = self._queue
        until_s = max(self._playing_until_s, now)  # (Twilio's buffer may have run dry)
        due: list[tuple[_Chunk, float]] = []
        while queue:
            slot_s = until_s - self.lead_s
            if slot_s > horizon_s and (due or not first):
                break
            chunk = queue.popleft()
            due.append((chunk, min(slot_s, now)))
            until_s += len(chunk.payload) / (tw.MULAW_SAMPLES_PER_MS * 1000)
        return due

    def _chunk_parts(self, chunks: Sequence[tuple[_Chunk, float]]) -> list[tuple[bytes, bytes, bytes, str]]:
        """The Twilio core's step for each chunk about to be written (the stream is streaming): ``(prefix, payload,
        suffix, mark)``, the media message as an envelope for the native framer and its mark (``""``: withheld)."""
        send_chunk = self.twilio.send_chunk
        parts = []
        for chunk, _ in chunks:
            prefix, suffix, mark = send_chunk(chunk.payload, chunk.item)
            if not mark:
                self._mark_withheld()
            parts.append((prefix, chunk.payload, suffix, mark))
        return parts

    def _chunk_sent(self, chunk: _Chunk, slot_s: float, now: float) -> None:
        stats = self.stats
        stats.frames_out += 1
        if self._speech_stopped_s is not None and chunk.item not in self._before_stop:
            # the first audio of the answer to what the caller said (tool time included: the caller waits through it)
            stats.reply.add(self._now() - self._speech_stopped_s)
            self._speech_stopped_s = None
        # bridge-added latency: from when the audio arrived, or when the
        # lead allowed it out, to when it was on Twilio's socket
        stats.downlink.add(self._now() - max(chunk.received_s, slot_s))
        self._playing_until_s = max(self._playing_until_s, now) + len(chunk.payload) / (tw.MULAW_SAMPLES_PER_MS * 1000)

    def _start_twilio_flush(self) -> None:
        if not self._twilio_flushing and self._nursery is not None:
            self._twilio_flushing = True
            self._nursery.start_soon(self._flush_twilio)

    async def _flush_twilio(self) -> None:
        """Write what ``_pace_now`` could not (Twilio's socket was full), under the send lock."""
        try:
            async with self._send_lock:
                self._twilio_stuck_s = self._now()
                await self._polled.flush()
        finally:
            self._twilio_stuck_s = None
            self._twilio_flushing = False

    async def _pacer(self) -> None:
        """Send queued chunks, each at least ``lead_s`` before Twilio will start playing it.

        It wakes when the next chunk is due and sends it with those due in
        the next ``TOP_UP_S`` (:meth:`_send_due`): a reply that comes faster
        than real time, as models send them, then costs a wake-up and a
        write per ``TOP_UP_S`` + one chunk of audio, not per chunk.
        """
        while True:
            if not self._queue:
                self._queued = trio.Event()
                if self._pending:
                    # A partial chunk and nothing else to send: give the
                    # provider one chunk's time to add to it, then play it
                    # (providers that never say "audio done" would otherwise
                    # hold the last < 40 ms of every reply until the next).
                    with trio.move_on_at(self._pending_s + self.chunk_s):
                        await self._queued.wait()
                    # (Woken early is not the time up: a handler that sent what was due itself wakes this too.)
                    if not self._queue and self._pending and self._now() >= self._pending_s + self.chunk_s:
                        self._flush_pending(self._pending_item)
                    continue
                await self._queued.wait()
                continue
            now = self._now()
            if self._playing_until_s < now:
                self._playing_until_s = now  # Twilio's buffer ran dry
            slot_s = self._playing_until_s - self.lead_s
            if slot_s > now + DUE_SLACK_S:
                # (one scope for both ends of the wait -- its deadline, and a barge-in's cancel -- where
                # sleep_until would open a second: this runs every TOP_UP_S + a chunk per call while a reply plays)
                with trio.CancelScope(deadline=slot_s) as self._pacer_wait:
                    await trio.sleep_forever()
                self._pacer_wait = None
                continue  # re-check: a barge-in may have emptied the queue
            lock = self._send_lock
            await acquire(lock)
            try:
                # Take chunks only once the lock is held: a barge-in that
                # held the lock meanwhile has emptied the queue, and a chunk
                # popped before it would otherwise slip out after its clear.
                if self._queue:
                    await self._send_due()
            finally:
                lock.release()

    async def _send_due(self) -> None:
        """The pacer's write (under the send lock): the next chunk, and those due within ``TOP_UP_S`` after it.

        All of them, each with its mark, go in one write.  A chunk is
        counted (:meth:`_chunk_sent`) once the write is done; until then
        its item is in :attr:`_writing` (under way, for SpeechStopped).  A
        stream that has stopped takes none of them: they are dropped
        uncounted, as the call is ending.
        """
        now = self._now()
        # (the first chunk even if it is not due: it was when the pacer took the lock, see _pacer)
        batch = self._take_due(now, now + TOP_UP_S, first=True)
        if self.twilio.state is not StreamState.STREAMING:
            return
        self._writing = [chunk.item for chunk, _ in batch]
        try:
            if self._polling:  # (framed natively, as _pace_now does)
                polled = self._polled
                if not polled.send_media_nowait(self._chunk_parts(batch)):
                    self._twilio_stuck_s = self._now()
                    try:
                        await polled.flush()
                    finally:
                        self._twilio_stuck_s = None
            else:
                texts = []
                for prefix, payload, suffix, mark in self._chunk_parts(batch):
                    texts.append((prefix + binascii.b2a_base64(payload, newline=False) + suffix).decode())
                    if mark:
                        texts.append(mark)
                self._twilio_stuck_s = self._now()
                try:
                    await self.stream.send_many(texts)
                finally:
                    self._twilio_stuck_s = None
            for chunk, slot_s in batch:
                self._chunk_sent(chunk, slot_s, now)
        finally:
            self._writing = []

    def _cut_unheard(self, item: str, n_bytes: int) -> None:
        """The first audio of ``item``, of a response the caller cut before any of its audio came: none of it plays.

        As for an item cut while playing, the model hears that the caller
        heard none of it (``Truncate`` at 0 ms) and the record says so.
        """
        self._interrupted.add(item)
        self.stats.transcript.cut(item, 0, n_bytes // self.link.output_format.bytes_per_ms)
        log.info("call %s: %s arrived after the caller cut its response; cut at 0 ms", self.call_sid, item)
        if self._nursery is not None and not self._model_gone:
            self._nursery.start_soon(self._truncate_unheard, item)

    async def _truncate_unheard(self, item: str) -> None:
        try:
            await self.link.send(pv.Truncate(item, 0))
        except ProviderClosed as exc:
            self._provider_closed(exc)
            return
        self.stats.truncations += 1

    async def _barge_in(self) -> None:
        """The caller started talking: stop the agent now, cut its reply at what was heard."""
        by_model, self._model_cut = self._model_cut, False  # (or the model stopped its own reply)
        self._cuts += 1
        if self._response_open and self._open_response is not None:
            self._cut_response = self._open_response  # (audio of it that has not arrived yet is cut too)
        async with self._send_lock:
            items: dict[str, None] = {}
            for item in self.twilio.items_in_flight():  # buffered at Twilio
                items[item] = None
            for chunk in self._queue:  # queued here
                items[chunk.item] = None
            if self._pending_item is not None and self._pending:
                items[self._pending_item] = None
            for item in self._generating:  # still arriving from the provider
                if item not in self._interrupted:
                    items[item] = None
            talking = bool(items) or self.twilio.unconfirmed_samples > 0
            if talking and not by_model:
                # (before anything is cleared: a hang-up waiting for its goodbye would find it played, and hang up)
                self._goodbye_spoken_over()
            # µ-law samples of each item generated so far (sent, queued, pending): the transcript cut
            generated = {item: self.twilio.playback(item).sent_samples for item in items}
            for chunk in self._queue:
                generated[chunk.item] += len(chunk.payload)
            if self._pending_item in generated:
                generated[self._pending_item] += len(self._pending)
            self._queue.clear()
            self._pending.clear()
            self._interrupted.update(items)
            self._generating.clear()
            if self._pacer_wait is not None:
                self._pacer_wait.cancel()
            if not talking:
                return
            self._half_sample = None
            if self._down_resampler is not None:
                self._down_resampler.reset()  # no tail of the cut reply in the next one
                self._down_tail = False
            await self._send_twilio(tw.ClearAudio())
            self._playing_until_s = self._now()
            # What the caller heard of each item is final now: echoes that
            # arrive from here on are for cleared marks.  (Less the downlink
            # resampler's delay: that much of what played was its filter filling.)
            heard = [
                (item, max(0, self.twilio.playback(item).played_samples - self._down_delay) // tw.MULAW_SAMPLES_PER_MS)
                for item in items
            ]
        if not by_model:
            self.stats.barge_ins += 1
        for item, heard_ms in heard:  # (all of them in the record, even if the model goes away below)
            generated_ms = generated[item] // tw.MULAW_SAMPLES_PER_MS
            if (overflowed := self._cut_items.get(item)) is not None:  # (its audio dropped at the cap counts too)
                generated_ms = max(generated_ms, round(overflowed[1]))
            self.stats.transcript.cut(item, heard_ms, generated_ms)
            self._cut_items[item] = [heard_ms, generated_ms]
            if len(self._cut_items) > MAX_CUT_ITEMS:
                self._cut_items.popitem(last=False)
        for item, heard_ms in heard:
            if self._model_gone:
                break
            try:
                await self.link.send(pv.Truncate(item, heard_ms))
            except ProviderClosed as exc:
                self._provider_closed(exc)
                break
            self.stats.truncations += 1
        log.info(
            "call %s: %s, cut %s",
            self.stats.call_sid,
            "the model stopped its reply" if by_model else "barge-in",
            ", ".join(f"{item} at {ms} ms" for item, ms in heard),
        )
