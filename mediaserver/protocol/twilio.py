"""Sans-I/O core for one Twilio Media Streams WebSocket (the bidirectional kind).

Three verbs, as in h11/wsproto, and no I/O, clock or event loop:

* :meth:`TwilioStream.receive_message` takes one text frame from Twilio,
  validates it completely and queues at most one event;
* :meth:`TwilioStream.events` drains the queued events;
* :meth:`TwilioStream.send` turns one command into the text frame to send.

Every state transition, inbound and outbound, is in :data:`_TRANSITIONS` below.
Malformed or out-of-place input raises :class:`RemoteProtocolError`, misuse
raises :class:`LocalProtocolError`; either way the stream moves to
:attr:`StreamState.ERROR` and every later call raises.

Ordering facts
--------------
Twilio numbers every message after ``connected`` with ``sequenceNumber``
("1", "2", ...) and every ``media`` message with a per-track ``media.chunk``
("1", "2", ...).  One WebSocket is one ordered TCP byte stream, so a number
that repeats or goes backwards can only come from a broken or confused peer:
that is a :class:`RemoteProtocolError`.  A number that jumps *forward* is
not fatal: Twilio documents that it drops inbound audio under congestion
(error 31930), so the jump is reported (``Media.chunks_missing`` and the
running totals :attr:`TwilioStream.sequence_numbers_missing` and
:attr:`TwilioStream.chunks_missing`) and the bridge decides what to do.
``media.timestamp`` is parsed and passed on, not judged.

Playback accounting (marks and clear)
-------------------------------------
Twilio echoes a ``mark`` when the audio sent before it has finished playing
(immediately if nothing is buffered), *and* echoes every still-pending mark
when we send ``clear``; the two kinds of echo look identical on the wire.
The stream therefore keeps the outbound audio in three buckets, in samples
(µ-law: 1 byte = 1 sample, 8 samples per ms):

* the *tail*: audio sent since the last mark, as ``(item, samples)`` segments;
* *live marks*: marks sent since the last ``clear``, oldest first, each
  holding the tail segments it closed;
* *cleared marks*: marks that were live when we sent ``clear``.

``SendMark`` closes the tail into a new live mark.  ``ClearAudio`` moves every
live mark to the cleared set and discards the tail; their samples are
counted as *cleared* at that moment.  An echo of the oldest live mark
credits its segments as *played*; an echo of a cleared mark yields
``Mark(cleared=True)`` and credits nothing.  Any other name (never sent,
already echoed, or a live mark echoed ahead of an older live one) is a
:class:`RemoteProtocolError`, because accepting it would corrupt the played
position.  Cleared echoes may arrive in any order, also interleaved with
live echoes of marks sent after the ``clear``.

A carrier that never echoes cannot grow this without bound: past
:data:`MAX_PENDING_MARKS` live marks, :meth:`TwilioStream.send_chunk` sends
its chunks without a mark, and past as many cleared marks the oldest are
forgotten (a later echo of one still reads as cleared).

Invariant, globally and per item: ``sent = played + cleared + unconfirmed``.
``played`` only ever counts audio that precedes an echo Twilio sent for a
live mark, so it never exceeds what the caller heard; it lags true playback
by at most the audio between two marks (send a mark after every outbound
frame for 20 ms precision).  One race is resolved conservatively: a
"played" echo that crosses our ``clear`` on the wire is counted as cleared.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from mediaserver._native._twilio import MediaCursor, parse_mark, parse_media

from ._wire import (
    REPLY_HISTORY,
    JsonObject,
    ProtocolEnum,
    SansIOCore,
    b64decode,
    b64encode,
    field,
    load_object,
    obj_field,
    require_text,
    str_field,
    text_field,
)
from .errors import LocalProtocolError, RemoteProtocolError
from .twilio_events import (
    MULAW_SAMPLE_RATE_HZ,
    MULAW_SAMPLES_PER_MS,
    ClearAudio,
    Connected,
    Dtmf,
    Mark,
    Media,
    MediaFormat,
    SendAudio,
    SendMark,
    Start,
    Stop,
    TwilioCommand,
    TwilioEvent,
    Unknown,
    is_sid_like,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ItemPlayback",
    "StreamState",
    "TwilioStream",
]

# A Twilio media frame is ~0.4 KB (160 µ-law bytes -> 216 base64 chars plus
# JSON); 64 KiB leaves room for a large ``start.customParameters`` while
# refusing floods.  Same cap as openai-agents-python PR #5110 for this socket.
DEFAULT_MAX_MESSAGE_BYTES: Final = 64 * 1024
DTMF_KEYS: Final = frozenset("0123456789*#ABCD")  # a telephone keypad (A-D: the fourth column some have)

# Numeric strings longer than this are refused before int() sees them, so
# that every counter fits the native cursor's 64-bit integers (10**18 < 2**63;
# Twilio's counters are far smaller).
_MAX_DIGITS: Final = 18

# start.mediaFormat.encoding as documented on the websocket-messages page.
_MULAW_ENCODING: Final = "audio/x-mulaw"


class StreamState(ProtocolEnum):
    """Where the stream is in Twilio's message sequence."""

    AWAITING_CONNECTED = "awaiting_connected"  # nothing received yet
    AWAITING_START = "awaiting_start"  # got ``connected``; no streamSid yet
    STREAMING = "streaming"  # got ``start``; media flows, commands allowed
    STOPPED = "stopped"  # got ``stop``; nothing more may arrive or be sent
    ERROR = "error"  # a protocol error happened; the stream is dead


class _Input(ProtocolEnum):
    """Everything that can happen to a stream: inbound events and outbound commands."""

    CONNECTED = "connected"
    START = "start"
    MEDIA = "media"
    DTMF = "dtmf"
    MARK = "mark"
    STOP = "stop"
    UNKNOWN = "unknown"
    SEND_AUDIO = "send_audio"
    SEND_MARK = "send_mark"
    CLEAR_AUDIO = "clear_audio"


_S = StreamState
_I = _Input

# The whole protocol, one table.  A (state, input) pair that is not listed is
# illegal: RemoteProtocolError for inbound inputs, LocalProtocolError for
# outbound ones.  ERROR is entered from any state by any error and is not listed.
_TRANSITIONS: Final[Mapping[tuple[StreamState, _Input], StreamState]] = MappingProxyType(
    {
        (_S.AWAITING_CONNECTED, _I.CONNECTED): _S.AWAITING_START,
        (_S.AWAITING_CONNECTED, _I.UNKNOWN): _S.AWAITING_CONNECTED,
        (_S.AWAITING_START, _I.START): _S.STREAMING,
        (_S.AWAITING_START, _I.UNKNOWN): _S.AWAITING_START,
        (_S.STREAMING, _I.MEDIA): _S.STREAMING,
        (_S.STREAMING, _I.DTMF): _S.STREAMING,
        (_S.STREAMING, _I.MARK): _S.STREAMING,
        (_S.STREAMING, _I.UNKNOWN): _S.STREAMING,
        (_S.STREAMING, _I.STOP): _S.STOPPED,
        (_S.STREAMING, _I.SEND_AUDIO): _S.STREAMING,
        (_S.STREAMING, _I.SEND_MARK): _S.STREAMING,
        (_S.STREAMING, _I.CLEAR_AUDIO): _S.STREAMING,
    }
)

_INBOUND_INPUTS: Final = {
    "connected": _I.CONNECTED,
    "start": _I.START,
    "media": _I.MEDIA,
    "dtmf": _I.DTMF,
    "mark": _I.MARK,
    "stop": _I.STOP,
}


@dataclass(frozen=True, slots=True)
class ItemPlayback:
    """What became of one item's outbound audio, in µ-law samples (8 per ms).

    ``played_samples`` counts only audio confirmed by a live mark echo, so
    ``played_ms`` (rounded down) is safe to use as OpenAI's
    ``conversation.item.truncate.audio_end_ms``: it never exceeds what the
    caller heard, nor what was sent.
    """

    item: str
    sent_samples: int
    played_samples: int
    cleared_samples: int

    @property
    def unconfirmed_samples(self) -> int:
        """Sent but neither confirmed played nor cleared: buffered at Twilio or in flight."""
        return self.sent_samples - self.played_samples - self.cleared_samples

    @property
    def played_ms(self) -> int:
        """Confirmed played audio in whole milliseconds, rounded down."""
        return self.played_samples // MULAW_SAMPLES_PER_MS


ITEM_HISTORY: Final = REPLY_HISTORY  # items whose playback a stream keeps, the most recently started
# Marks awaiting their echo that a stream keeps.  Twilio echoes a mark once
# the audio before it has played, about ``lead`` after it was sent, so this
# many unechoed marks (80 s of audio at the bridge's 40 ms chunks) means a
# carrier that does not echo them: ``send_chunk`` then sends its chunks with
# no mark until echoes catch up, and the oldest cleared marks are forgotten,
# so such a call's accounting stays bounded instead of growing with the call.
MAX_PENDING_MARKS: Final = 2048


class _PendingMark:
    """A mark we sent and Twilio has not echoed yet, with the audio it covers."""

    __slots__ = ("name", "samples", "segments")

    def __init__(self, name: str, segments: tuple[tuple[str | None, int], ...], samples: int) -> None:
        self.name = name
        self.segments = segments
        self.samples = samples


class TwilioStream(SansIOCore[StreamState, TwilioEvent]):
    """One Twilio Media Streams connection, seen from our server.

    ``max_message_bytes`` bounds one inbound message (UTF-8 size); larger
    messages raise :class:`RemoteProtocolError` with close code hint 1009.
    Twilio sends text frames only, so a binary frame given to
    :meth:`receive_message` is a :class:`RemoteProtocolError` too.
    """

    _DEAD_MESSAGE = "the stream is dead after an earlier protocol error"

    def __init__(self, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        if max_message_bytes < 1:
            raise ValueError("max_message_bytes must be positive")
        super().__init__(StreamState.AWAITING_CONNECTED, StreamState.ERROR)
        self._max_message_bytes = max_message_bytes

        # Set by ``start``.
        self._start: Start | None = None
        self._media_prefix = ""
        self._media_envelope = (b"", b"")  # _media_prefix and the end, as bytes (send_chunk)
        self._mark_prefix = ""
        self._clear_message = ""

        # Ordering facts: sequence numbers, the inbound track's chunks and the
        # totals in the native cursor (shared with take_media), other tracks here.
        self._cursor = MediaCursor()
        self._next_chunk: dict[str, int] = {}
        self._other_chunks_missing = 0

        # Playback accounting (see the module docstring).
        self._next_mark_number = 1
        self._tail_items: list[str | None] = []
        self._tail_samples: list[int] = []
        self._tail_total = 0
        self._live_marks: deque[_PendingMark] = deque()
        self._cleared_marks: dict[str, _PendingMark] = {}
        self._forgotten_through = 0  # cleared marks numbered up to this were forgotten (MAX_PENDING_MARKS)
        self._marks_withheld = 0
        # Samples per reply item, sent / played / cleared: plain str -> int
        # dicts, which the garbage collector does not track, so a long call's
        # replies add nothing to its full collections (one object per item did).
        self._item_sent: dict[str, int] = {}
        self._item_played: dict[str, int] = {}
        self._item_cleared: dict[str, int] = {}
        self._sent_samples = 0
        self._played_samples = 0
        self._cleared_samples = 0
        self._clear_count = 0

    # ------------------------------------------------------------------ state

    @property
    def start(self) -> Start | None:
        """The ``start`` event, once received."""
        return self._start

    @property
    def stream_sid(self) -> str | None:
        return None if self._start is None else self._start.stream_sid

    def _transition(self, what: _Input, *, inbound: bool, event: str = "") -> None:
        """Apply one input to the state machine, or raise (the caller marks ERROR)."""
        try:
            self._state = _TRANSITIONS[self._state, what]
        except KeyError:
            if inbound:
                raise RemoteProtocolError(
                    f"Twilio sent {event or what.value!r} in state {self._state.name}"
                ) from None
            raise LocalProtocolError(
                f"cannot send {what.value!r} in state {self._state.name}"
            ) from None

    # ---------------------------------------------------------------- inbound

    def _parse_events(self, message: str | bytes) -> tuple[TwilioEvent]:
        return (self._parse(message),)

    def receive_event(self, message: str | bytes) -> TwilioEvent:
        """:meth:`receive_message` and the one event the message means, returned rather than queued.

        Every Twilio message is exactly one event, so the bridge's per-frame
        path skips the queue.  A plain ``media`` message while streaming is
        scanned natively (:func:`mediaserver._native._twilio.parse_media`), as
        is a plain ``mark`` echo (``parse_mark``);
        anything else, and any media message the scanner does not take, is
        parsed as :meth:`receive_message` parses it.  Either way the checks
        are the same (:meth:`_media`), and an error kills the stream.
        Do not mix with :meth:`receive_message` while its events are unread.
        """
        self._check_alive()
        try:
            if (
                self._state is StreamState.STREAMING
                and type(message) is str
                and len(message) <= self._max_message_bytes
            ):
                fields = parse_media(message)
                if fields is not None:
                    return self._media(*fields)
                marked = parse_mark(message)
                if marked is not None:
                    return self._scanned_mark(*marked)
            return self._parse(message)
        except BaseException:
            self._state = StreamState.ERROR
            raise

    def take_media(self, message: str | bytes) -> tuple[int, bytes] | None:
        """``(chunk, payload)`` of a plain inbound ``media`` message while streaming, all natively; else None.

        The bridge's per-frame path: what :meth:`receive_event` would make
        of the message -- the same checks and counters -- without building
        a :class:`~mediaserver.protocol.twilio_events.Media`
        (:class:`mediaserver._native._twilio.MediaCursor`).  None changes
        nothing: give the message to :meth:`receive_event`, which returns
        its event or raises its error (DTMF, marks, ``stop``, other tracks,
        unusual layouts, every message that fails a check).
        """
        if self._state is StreamState.STREAMING:
            return self._cursor.take(message, self._max_message_bytes)
        return None

    def media_taker(self) -> tuple[Callable[[str | bytes, int], tuple[int, bytes] | None], int] | None:
        """``(take, max_bytes)``: :meth:`take_media` is ``take(message, max_bytes)`` now; None when it is None for all.

        For a loop that takes a run of media messages in one native call
        (:func:`mediaserver._native._wsframe.uplink_pass`).  Ask again after
        any message that ``take`` declined went through :meth:`receive_event`:
        it can change the stream's state.
        """
        if self._state is StreamState.STREAMING:
            return self._cursor.take, self._max_message_bytes
        return None

    def _parse(self, message: str | bytes) -> TwilioEvent:
        text = require_text(message, "Twilio")
        msg = load_object(text, tag="event", max_bytes=self._max_message_bytes)
        name: str = msg["event"]
        what = _INBOUND_INPUTS.get(name, _I.UNKNOWN)
        self._transition(what, inbound=True, event=name)
        if what is _I.MEDIA:  # by far the most frequent
            return self._parse_media(msg)
        if what is _I.MARK:
            return self._parse_mark(msg)
        if what is _I.DTMF:
            return self._parse_dtmf(msg)
        if what is _I.CONNECTED:
            return Connected(protocol=str_field(msg, "protocol", name), version=str_field(msg, "version", name))
        if what is _I.START:
            return self._parse_start(msg)
        if what is _I.STOP:
            return self._parse_stop(msg)
        return self._parse_unknown(name, msg, text)

    def _sequence(self, msg: JsonObject) -> int:
        number = _numeric(field(msg, "sequenceNumber", msg["event"]), "sequenceNumber")
        self._check_sequence(number)
        return number

    def _check_sequence(self, number: int) -> None:
        cursor = self._cursor
        expected = cursor.next_sequence
        if number != expected:
            if number < expected:
                raise RemoteProtocolError(
                    f"sequenceNumber {number} repeats or goes backwards (expected {expected})"
                )
            cursor.sequence_missing += number - expected
        cursor.next_sequence = number + 1

    def _check_stream_sid(self, msg: JsonObject) -> None:
        assert self._start is not None
        sid = msg.get("streamSid")
        if sid != self._start.stream_sid:
            raise RemoteProtocolError(
                f"{msg['event']!r} for streamSid {sid!r:.40}, but this stream is {self._start.stream_sid!r}"
            )

    def _parse_start(self, msg: JsonObject) -> Start:
        sequence_number = self._sequence(msg)
        start = obj_field(msg, "start", "start")
        stream_sid = _sid_field(msg, "streamSid", "start")
        inner_sid = str_field(start, "streamSid", "start.start")
        if inner_sid != stream_sid:
            raise RemoteProtocolError(f"start: streamSid {stream_sid!r} != start.streamSid {inner_sid!r}")
        tracks = field(start, "tracks", "start.start")
        if type(tracks) is not list or not all(type(t) is str for t in tracks):
            raise RemoteProtocolError(f"start.tracks must be a list of strings, got {tracks!r:.80}")
        params = start.get("customParameters", {})
        if type(params) is not dict or not all(type(v) is str for v in params.values()):
            raise RemoteProtocolError(
                f"start.customParameters must map strings to strings, got {params!r:.80}"
            )
        fmt = obj_field(start, "mediaFormat", "start.start")
        media_format = MediaFormat(
            encoding=str_field(fmt, "encoding", "start.mediaFormat"),
            sample_rate_hz=_number(field(fmt, "sampleRate", "start.mediaFormat"), "sampleRate"),
            channels=_number(field(fmt, "channels", "start.mediaFormat"), "channels"),
        )
        # Everything downstream (marks, played_ms, truncation) counts 8 samples per ms.
        if media_format != MediaFormat(_MULAW_ENCODING, MULAW_SAMPLE_RATE_HZ, 1):
            raise RemoteProtocolError(f"unsupported media format {media_format}")
        event = Start(
            sequence_number=sequence_number,
            stream_sid=stream_sid,
            account_sid=_sid_field(start, "accountSid", "start.start"),
            call_sid=_sid_field(start, "callSid", "start.start"),
            tracks=tuple(tracks),
            custom_parameters=MappingProxyType(dict(params)),
            media_format=media_format,
        )
        self._start = event
        self._cursor.stream_sid = event.stream_sid
        sid = json.dumps(stream_sid)
        self._media_prefix = '{"event":"media","streamSid":' + sid + ',"media":{"payload":"'
        self._media_envelope = (self._media_prefix.encode(), b'"}}')
        self._mark_prefix = '{"event":"mark","streamSid":' + sid + ',"mark":{"name":"'
        self._clear_message = '{"event":"clear","streamSid":' + sid + "}"
        return event

    def _parse_media(self, msg: JsonObject) -> Media:
        sequence_number = _numeric(field(msg, "sequenceNumber", "media"), "sequenceNumber")
        sid = msg.get("streamSid")
        media = obj_field(msg, "media", "media")
        track = str_field(media, "track", "media.media")
        chunk = _numeric(media.get("chunk"), "media.chunk")
        timestamp_ms = _numeric(media.get("timestamp"), "media.timestamp")
        payload = text_field(media, "payload", "media.media")
        return self._media(sequence_number, sid, track, chunk, timestamp_ms, payload)

    def _media(self, sequence_number: int, sid: object, track: str, chunk: int, timestamp_ms: int, payload: str) -> Media:
        """The checks and bookkeeping of one ``media`` message, once its fields are read (both parsers)."""
        self._check_sequence(sequence_number)
        assert self._start is not None
        if sid != self._start.stream_sid:
            raise RemoteProtocolError(
                f"'media' for streamSid {sid!r:.40}, but this stream is {self._start.stream_sid!r}"
            )
        audio = b64decode(payload, "media.media.payload")
        cursor = self._cursor
        inbound = track == "inbound"
        if not inbound and track != "outbound":
            # (Twilio's two tracks: a counter is kept per track, so any other name would be memory a peer grows)
            raise RemoteProtocolError(f"media.track must be 'inbound' or 'outbound', got {track!r:.40}")
        expected = cursor.next_inbound_chunk if inbound else self._next_chunk.get(track, 1)
        missing = 0
        if chunk != expected:
            if chunk < expected:
                raise RemoteProtocolError(
                    f"media.chunk {chunk} on track {track!r} repeats or goes backwards (expected {expected})"
                )
            missing = chunk - expected
            if inbound:
                cursor.chunks_missing += missing
            else:
                self._other_chunks_missing += missing
        if inbound:
            cursor.next_inbound_chunk = chunk + 1
        else:
            self._next_chunk[track] = chunk + 1
        return Media(sequence_number, track, chunk, timestamp_ms, audio, missing)

    def _parse_dtmf(self, msg: JsonObject) -> Dtmf:
        sequence_number = self._sequence(msg)
        self._check_stream_sid(msg)
        dtmf = obj_field(msg, "dtmf", "dtmf")
        digit = str_field(dtmf, "digit", "dtmf.dtmf")
        if len(digit) != 1 or digit not in DTMF_KEYS:
            # (one key per event: anything else is not a keypress, and would reach the log and the model as is)
            raise RemoteProtocolError(f"dtmf.digit must be one of 0-9, *, #, A-D, got {digit!r:.40}")
        return Dtmf(
            sequence_number=sequence_number,
            track=str_field(dtmf, "track", "dtmf.dtmf"),
            digit=digit,
        )

    def _parse_mark(self, msg: JsonObject) -> Mark:
        sequence_number = self._sequence(msg)
        self._check_stream_sid(msg)
        name = str_field(obj_field(msg, "mark", "mark"), "name", "mark.mark")
        return self._mark(sequence_number, name)

    def _scanned_mark(self, sequence_number: int, sid: str, name: str) -> Mark:
        """A mark echo read by the native scanner: the checks of :meth:`_parse_mark`, in its order."""
        self._check_sequence(sequence_number)
        assert self._start is not None
        if sid != self._start.stream_sid:
            raise RemoteProtocolError(f"'mark' for streamSid {sid!r:.40}, but this stream is {self._start.stream_sid!r}")
        return self._mark(sequence_number, name)

    def _mark(self, sequence_number: int, name: str) -> Mark:
        """The playback accounting of one echoed mark, once its fields are read and checked (both parsers)."""
        cleared_mark = self._cleared_marks.pop(name, None)
        if cleared_mark is not None:
            return Mark(sequence_number, name, cleared=True)
        live = self._live_marks
        if not live or live[0].name != name:
            if self._forgotten_through and name.isascii() and name.isdecimal() and len(name) <= _MAX_DIGITS and int(name) <= self._forgotten_through:
                return Mark(sequence_number, name, cleared=True)  # a cleared mark forgotten for MAX_PENDING_MARKS
            expected = f"mark {live[0].name!r}" if live else "no live mark"
            raise RemoteProtocolError(
                f"Twilio echoed mark {name!r:.40}, which was never sent, was already echoed, "
                f"or overtakes an older mark (expected {expected})"
            )
        mark = live.popleft()
        self._played_samples += mark.samples
        played = self._item_played
        for item, samples in mark.segments:
            if item is not None:
                played[item] = played.get(item, 0) + samples
        return Mark(sequence_number, name, cleared=False)

    def _parse_stop(self, msg: JsonObject) -> Stop:
        assert self._start is not None
        sequence_number = self._sequence(msg)
        self._check_stream_sid(msg)
        stop = obj_field(msg, "stop", "stop")
        event = Stop(
            sequence_number=sequence_number,
            account_sid=str_field(stop, "accountSid", "stop.stop"),
            call_sid=str_field(stop, "callSid", "stop.stop"),
        )
        if (event.account_sid, event.call_sid) != (self._start.account_sid, self._start.call_sid):
            raise RemoteProtocolError(
                f"stop names call {event.call_sid!r:.40} of account {event.account_sid!r:.40}, "
                f"but the stream started for call {self._start.call_sid!r} "
                f"of account {self._start.account_sid!r}"
            )
        return event

    def _parse_unknown(self, name: str, msg: JsonObject, message: str) -> Unknown:
        sequence_number = self._sequence(msg) if "sequenceNumber" in msg else None
        if self._start is not None and "streamSid" in msg:
            self._check_stream_sid(msg)
        return Unknown(event=name, raw=message, sequence_number=sequence_number)

    # --------------------------------------------------------------- outbound

    def send(self, command: TwilioCommand) -> str:
        """Return the text frame for ``command``; update the playback accounting."""
        return self._guarded(self._send, command)

    def _send(self, command: TwilioCommand) -> str:
        if type(command) is SendAudio:
            self._transition(_I.SEND_AUDIO, inbound=False)
            return self._send_audio(command)
        if type(command) is SendMark:
            self._transition(_I.SEND_MARK, inbound=False)
            return self._send_mark()
        if type(command) is ClearAudio:
            self._transition(_I.CLEAR_AUDIO, inbound=False)
            return self._clear_audio()
        raise LocalProtocolError(f"not a Twilio command: {command!r:.80}")

    def send_chunk(self, payload: bytes, item: str | None) -> tuple[bytes, bytes, str]:
        """``send(SendAudio(payload, item=item))`` then ``send(SendMark())`` in one step: the downlink's per-chunk path.

        Returns the media message as an envelope for a native framer --
        ``prefix + base64(payload) + suffix`` is the text :meth:`send` would
        have returned (``mediaserver._native._wsframe.encode_b64_frame``) --
        and the mark message, or ``""`` when :data:`MAX_PENDING_MARKS` marks
        await their echo (the chunk goes without one, and the next mark sent
        covers it; :attr:`marks_withheld` counts these).  The state checks and the playback accounting
        are those of the two sends; an empty payload is refused as
        ``SendAudio`` refuses it, leaving the stream as it was.
        """
        if not payload:
            raise LocalProtocolError("SendAudio needs at least one byte of audio")
        return self._guarded(self._send_chunk, payload, item)

    def _send_chunk(self, payload: bytes, item: str | None) -> tuple[bytes, bytes, str]:
        if self._state is not StreamState.STREAMING:  # (both are no-ops while streaming)
            self._transition(_I.SEND_AUDIO, inbound=False)
            self._transition(_I.SEND_MARK, inbound=False)
        self._account_audio(payload, item)
        prefix, suffix = self._media_envelope
        if len(self._live_marks) >= MAX_PENDING_MARKS:  # (the tail keeps the audio for the next mark sent)
            self._marks_withheld += 1
            return prefix, suffix, ""
        return prefix, suffix, self._send_mark()

    def _send_audio(self, command: SendAudio) -> str:
        self._account_audio(command.payload, command.item)
        return self._media_prefix + b64encode(command.payload) + '"}}'

    def _account_audio(self, payload: bytes, item: str | None) -> None:
        samples = len(payload)  # µ-law: one byte per sample
        self._sent_samples += samples
        if item is not None:
            sent = self._item_sent
            if item in sent:
                sent[item] += samples
            else:
                if len(sent) >= ITEM_HISTORY:
                    self._forget_oldest_item()
                sent[item] = samples
        if self._tail_items and self._tail_items[-1] == item:
            self._tail_samples[-1] += samples
        else:
            self._tail_items.append(item)
            self._tail_samples.append(samples)
        self._tail_total += samples

    def _forget_oldest_item(self) -> None:
        """Drop the playback of the item sent longest ago: a long call's accounting stays bounded."""
        oldest = next(iter(self._item_sent))
        del self._item_sent[oldest]
        self._item_played.pop(oldest, None)
        self._item_cleared.pop(oldest, None)

    def _send_mark(self) -> str:
        name = str(self._next_mark_number)
        self._next_mark_number += 1
        self._live_marks.append(
            _PendingMark(name, tuple(zip(self._tail_items, self._tail_samples)), self._tail_total)
        )
        self._tail_items = []
        self._tail_samples = []
        self._tail_total = 0
        return self._mark_prefix + name + '"}}'

    def _clear_audio(self) -> str:
        cleared = self._item_cleared
        cleared_marks = self._cleared_marks
        for mark in self._live_marks:
            cleared_marks[mark.name] = mark
            for item, samples in mark.segments:
                if item is not None:
                    cleared[item] = cleared.get(item, 0) + samples
            self._cleared_samples += mark.samples
        self._live_marks.clear()
        while len(cleared_marks) > MAX_PENDING_MARKS:  # oldest first (numbered in the order sent)
            self._forgotten_through = int(cleared_marks.pop(next(iter(cleared_marks))).name)
        for item, samples in zip(self._tail_items, self._tail_samples):
            if item is not None:
                cleared[item] = cleared.get(item, 0) + samples
        self._cleared_samples += self._tail_total
        self._tail_items = []
        self._tail_samples = []
        self._tail_total = 0
        self._clear_count += 1
        return self._clear_message

    # ------------------------------------------------------------- accounting

    @property
    def sent_samples(self) -> int:
        """All µ-law samples sent with :class:`SendAudio`."""
        return self._sent_samples

    @property
    def played_samples(self) -> int:
        """Samples confirmed played by live mark echoes."""
        return self._played_samples

    @property
    def played_ms(self) -> int:
        """:attr:`played_samples` in whole milliseconds, rounded down."""
        return self._played_samples // MULAW_SAMPLES_PER_MS

    @property
    def cleared_samples(self) -> int:
        """Samples that were unconfirmed when we sent ``clear`` (discarded by Twilio)."""
        return self._cleared_samples

    @property
    def unconfirmed_samples(self) -> int:
        """Samples sent but not yet confirmed played or cleared (Twilio's buffer, roughly)."""
        return self._sent_samples - self._played_samples - self._cleared_samples

    @property
    def pending_mark_count(self) -> int:
        """Marks sent whose echo has not arrived yet (live and cleared)."""
        return len(self._live_marks) + len(self._cleared_marks)

    @property
    def marks_withheld(self) -> int:
        """Chunks :meth:`send_chunk` sent without a mark: :data:`MAX_PENDING_MARKS` marks were awaiting their echo."""
        return self._marks_withheld

    @property
    def clear_count(self) -> int:
        """How many ``clear`` commands were sent."""
        return self._clear_count

    def playback(self, item: str) -> ItemPlayback:
        """What became of ``item``'s audio so far.

        All zeros for an item never sent, or first sent before the last
        :data:`ITEM_HISTORY` items (long finished: Twilio plays in order).
        """
        return ItemPlayback(
            item, self._item_sent.get(item, 0), self._item_played.get(item, 0), self._item_cleared.get(item, 0)
        )

    def items_in_flight(self) -> tuple[str, ...]:
        """Items with audio sent but not yet confirmed played or cleared, oldest first.

        On barge-in, read this *before* sending :class:`ClearAudio`: these are
        the items to truncate at ``playback(item).played_ms`` once the clear
        has been sent.
        """
        seen: dict[str, None] = {}
        for mark in self._live_marks:
            for item, _ in mark.segments:
                if item is not None:
                    seen[item] = None
        for item in self._tail_items:
            if item is not None:
                seen[item] = None
        return tuple(seen)

    # ---------------------------------------------------------------- ordering

    @property
    def sequence_numbers_missing(self) -> int:
        """Total ``sequenceNumber`` values skipped so far."""
        return self._cursor.sequence_missing

    @property
    def chunks_missing(self) -> int:
        """Total ``media.chunk`` values skipped so far, over all tracks."""
        return self._cursor.chunks_missing + self._other_chunks_missing


# ------------------------------------------------------------------- helpers


def _sid_field(obj: JsonObject, key: str, where: str) -> str:
    """A required identifier (see :func:`is_sid_like`): ids reach log lines, records and the JSON we send."""
    value = field(obj, key, where)
    if type(value) is not str or not is_sid_like(value):
        raise RemoteProtocolError(
            f"{where}: {key!r} must be an identifier (1-64 letters, digits, '_' or '-'), got {value!r:.40}"
        )
    return value


def _numeric(value: object, what: str) -> int:
    """Parse one of Twilio's numeric *strings* ("1", "20", ...)."""
    if not (isinstance(value, str) and 0 < len(value) <= _MAX_DIGITS and value.isascii() and value.isdigit()):
        raise RemoteProtocolError(f"{what} must be a string of decimal digits, got {value!r:.40}")
    return int(value)


def _number(value: object, what: str) -> int:
    """A count that the docs show as a JSON number; a numeric string is accepted too."""
    if type(value) is int:
        return value
    return _numeric(value, what)
