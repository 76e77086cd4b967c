"""Twilio's side of a bidirectional Media Stream, sans I/O.

:class:`MediaStreamCaller` builds the messages Twilio sends (``connected``,
``start``, 20 ms ``media`` frames, ``mark`` echoes, ``stop``), numbered as
Twilio numbers them: one string ``sequenceNumber`` per message from "1"
(``connected`` has none), string ``media.chunk`` from "1", string
``media.timestamp`` in milliseconds of audio since the stream started.  It
reads the server's messages (``media``, ``mark``, ``clear``) into its
:class:`~mediaserver.dial.timeline.Playback` and tells the I/O shell which
marks to echo and when.  Every step is appended to :attr:`events`.

The shell supplies ``now`` (``trio.current_time()``) and must build and send
each message in one step under a lock, so that sequence numbers reach the
wire in order.  What the server gets wrong is recorded as a
:class:`~mediaserver.dial.timeline.ProtocolWarning` (Twilio logs a warning
and carries on); what *we* get wrong raises :class:`LocalProtocolError`.
Message shapes: /work/shared/reference/twilio-side.md §1.2-1.3.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Literal

from mediaserver.dial.timeline import (
    ClearReceived,
    Event,
    FrameSent,
    MarkEchoed,
    MarkReceived,
    MediaReceived,
    Playback,
    ProtocolWarning,
    StreamEnded,
    StreamStarted,
)
from mediaserver.protocol.errors import LocalProtocolError

__all__ = ["FRAME_BYTES", "FRAME_S", "SILENCE", "MediaStreamCaller"]

FRAME_BYTES = 160  # 20 ms of 8 kHz µ-law, the frame Twilio sends
FRAME_S = 0.020
SILENCE = b"\xff"  # µ-law code of 0

State = Literal["idle", "connected", "streaming", "ended"]

# The exact shapes Twilio accepts from the server (reference §1.3).
_SHAPES: dict[str, tuple[set[str], str | None, set[str]]] = {
    "media": ({"event", "streamSid", "media"}, "media", {"payload"}),
    "mark": ({"event", "streamSid", "mark"}, "mark", {"name"}),
    "clear": ({"event", "streamSid"}, None, set()),
}


class MediaStreamCaller:
    """One Media Stream as Twilio plays it (see the module docstring)."""

    def __init__(
        self,
        *,
        call_sid: str,
        stream_sid: str,
        account_sid: str,
        custom_parameters: dict[str, str],
    ) -> None:
        self.call_sid = call_sid
        self.stream_sid = stream_sid
        self.account_sid = account_sid
        self.custom_parameters = dict(custom_parameters)
        self.playback = Playback()
        self.events: list[Event] = []
        self.state: State = "idle"
        self._sequence = 0
        self._chunk = 0
        self._timestamp_ms = 0

    # -- messages we send ------------------------------------------------------

    def connected(self) -> str:
        self._expect("idle", "connected")
        self.state = "connected"
        return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(self, now: float) -> str:
        self._expect("connected", "start")
        self.state = "streaming"
        self.events.append(StreamStarted(now))
        start = {
            "streamSid": self.stream_sid,
            "accountSid": self.account_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": self.custom_parameters,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        return self._message("start", start)

    def media(self, frame: bytes, now: float, *, speech: bool, late_s: float = 0.0) -> str:
        """One inbound frame (any length; Twilio's are :data:`FRAME_BYTES`), ``late_s`` behind its schedule."""
        self._expect("streaming", "media")
        if not frame:
            raise LocalProtocolError("an empty media frame")
        self._chunk += 1
        media = {
            "track": "inbound",
            "chunk": str(self._chunk),
            "timestamp": str(self._timestamp_ms),
            "payload": base64.b64encode(frame).decode("ascii"),
        }
        self._timestamp_ms += len(frame) * 1000 // 8000
        self.events.append(FrameSent(now, bytes(frame), speech, late_s))
        return self._message("media", media)

    def echo(self, name: str, now: float, *, cleared: bool) -> str:
        """The ``mark`` echo for ``name`` (from :meth:`receive` or :meth:`due`)."""
        self._expect("streaming", "mark")
        self.events.append(MarkEchoed(now, name, cleared))
        return self._message("mark", {"name": name})

    def stop(self, now: float) -> str:
        """We hang up: ``stop``; the caller hears nothing more."""
        self._expect("streaming", "stop")
        message = self._message("stop", {"accountSid": self.account_sid, "callSid": self.call_sid})
        self.ended(now, "caller hung up (stop sent)")
        return message

    def ended(self, now: float, reason: str, *, error: bool = False) -> None:
        """The call is over (we stopped, or the server closed the socket)."""
        if self.state == "ended":
            return
        self.state = "ended"
        self.playback.cut(now)
        self.events.append(StreamEnded(now, reason, error))

    # -- messages we receive ---------------------------------------------------

    def receive(self, message: str | bytes, now: float) -> list[tuple[str, bool]]:
        """Handle one server message; returns the marks to echo now as (name, cleared)."""
        if self.state != "streaming":
            return []
        due = [(name, False) for name in self.playback.due(now)]
        if not isinstance(message, str):
            return due + self._warn(now, "binary frame (Twilio warning 31950)")
        try:
            msg: Any = json.loads(message)
        except ValueError:
            return due + self._warn(now, f"not JSON: {message[:60]!r}")
        event = msg.get("event") if isinstance(msg, dict) else None
        shape = _SHAPES.get(event) if isinstance(event, str) else None
        if shape is None:
            return due + self._warn(now, f"invalid event (Twilio error 31951): {message[:60]!r}")
        keys, inner, inner_keys = shape
        body = msg.get(inner) if inner else {}
        if set(msg) != keys or not isinstance(body, dict) or (inner and set(body) != inner_keys):
            return due + self._warn(now, f"malformed {event} message (Twilio ignores it): {message[:60]!r}")
        if msg["streamSid"] != self.stream_sid:
            return due + self._warn(now, f"wrong streamSid in {event} (Twilio error 31951)")
        if event == "media":
            try:
                payload = base64.b64decode(str(body["payload"]), validate=True)
            except (binascii.Error, ValueError):
                return due + self._warn(now, "media payload is not base64")
            self.events.append(MediaReceived(now, payload))
            self.playback.media(payload, now)
            return due
        if event == "mark":
            name = body["name"]
            if not isinstance(name, str):
                return due + self._warn(now, "mark name is not a string")
            self.events.append(MarkReceived(now, name))
            self.playback.mark(name, now)
            return due + [(n, False) for n in self.playback.due(now)]
        self.events.append(ClearReceived(now))
        return due + [(name, True) for name in self.playback.clear(now)]

    def due(self, now: float) -> list[tuple[str, bool]]:
        """Marks whose audio has finished playing by ``now`` (to echo)."""
        if self.state != "streaming":
            return []
        return [(name, False) for name in self.playback.due(now)]

    def next_due_s(self) -> float | None:
        """When the next mark falls due (the shell should wake up then), or None."""
        return self.playback.next_due_s() if self.state == "streaming" else None

    # -- helpers ---------------------------------------------------------------

    def _message(self, event: str, body: dict[str, Any]) -> str:
        self._sequence += 1
        return json.dumps(
            {"event": event, "sequenceNumber": str(self._sequence), event: body, "streamSid": self.stream_sid}
        )

    def _expect(self, state: State, what: str) -> None:
        if self.state != state:
            raise LocalProtocolError(f"cannot send {what} in state {self.state}")

    def _warn(self, now: float, text: str) -> list[tuple[str, bool]]:
        self.events.append(ProtocolWarning(now, text))
        return []
