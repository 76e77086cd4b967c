"""Twilio Media Streams messages as values: inbound events and outbound commands.

Inbound events are named after the wire ``event`` values of the bidirectional
Media Streams WebSocket (https://www.twilio.com/docs/voice/media-streams/websocket-messages):
``connected``, ``start``, ``media``, ``dtmf``, ``mark``, ``stop``; anything else
becomes :class:`Unknown`.  Field names are the wire names in snake case, with
the unit appended where the wire leaves it implicit (``timestamp`` ->
``timestamp_ms``, ``sampleRate`` -> ``sample_rate_hz``).  Numeric wire fields
arrive as JSON *strings* and are already parsed to ``int`` here.

Inbound events are built only by :class:`~mediaserver.protocol.twilio.TwilioStream`
after it has validated the message, so they do no checking of their own (the
media path builds one per 20 ms frame).  Outbound commands are built by the
bridge and validate themselves on construction, raising
:class:`~mediaserver.protocol.errors.LocalProtocolError` (which does not
affect any stream).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeAlias

from .errors import LocalProtocolError

__all__ = [
    "CALL_FINAL_STATUSES",
    "MULAW_BYTES_PER_SAMPLE",
    "MULAW_SAMPLES_PER_MS",
    "MULAW_SAMPLE_RATE_HZ",
    "ClearAudio",
    "Connected",
    "Dtmf",
    "Mark",
    "Media",
    "MediaFormat",
    "SendAudio",
    "SendMark",
    "Start",
    "Stop",
    "TwilioCommand",
    "TwilioEvent",
    "Unknown",
    "is_sid_like",
    "is_twilio_sid",
]

# Media Streams audio is "audio/x-mulaw" at 8000 Hz, mono, in both directions
# (websocket-messages page: start.mediaFormat and the outbound media rules).
MULAW_SAMPLE_RATE_HZ = 8000
# G.711 µ-law codes one sample per byte (ITU-T G.711 §1).
MULAW_BYTES_PER_SAMPLE = 1
# 8000 samples/s / 1000 ms/s.  Exact: positions in samples convert to ms by // 8.
MULAW_SAMPLES_PER_MS = MULAW_SAMPLE_RATE_HZ // 1000

_SID_LIKE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def is_sid_like(value: str) -> bool:
    """Whether ``value`` may be taken as a Twilio identifier (``CA…``, ``MZ…``, ``AC…``): 1-64 letters, digits, ``_``, ``-``.

    Looser than Twilio's own format (two letters and 32 hex digits), so test
    SIDs pass, but nothing that could break a log line or a record (a line
    break, markup) gets through.
    """
    return _SID_LIKE.fullmatch(value) is not None


_HEX32 = re.compile(r"[0-9a-fA-F]{32}")


def is_twilio_sid(value: str, prefix: str) -> bool:
    """Whether ``value`` is a SID in Twilio's exact format: ``prefix`` (``CA``, ``AC``, ``SK``...) and 32 hex digits."""
    return value.startswith(prefix) and _HEX32.fullmatch(value, len(prefix)) is not None


# Twilio's final call statuses: a call's status callbacks end with one of these.
CALL_FINAL_STATUSES: frozenset[str] = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})


# --------------------------------------------------------------------------- inbound


@dataclass(frozen=True, slots=True)
class MediaFormat:
    """``start.mediaFormat``: always µ-law / 8000 Hz / 1 channel on Twilio today."""

    encoding: str
    sample_rate_hz: int
    channels: int


@dataclass(frozen=True, slots=True)
class Connected:
    """``connected``: the first message; carries no ``streamSid`` or ``sequenceNumber``."""

    protocol: str
    version: str


@dataclass(frozen=True, slots=True)
class Start:
    """``start``: stream metadata, sent once, right after ``connected``.

    ``custom_parameters`` holds the ``<Parameter>`` children of the TwiML
    ``<Stream>`` (string to string); it is a read-only mapping.
    """

    sequence_number: int
    stream_sid: str
    account_sid: str
    call_sid: str
    tracks: tuple[str, ...]
    custom_parameters: Mapping[str, str]
    media_format: MediaFormat


@dataclass(frozen=True, slots=True)
class Media:
    """``media``: one chunk of caller audio.

    ``payload`` is the base64-decoded µ-law bytes (one byte per sample).
    ``chunks_missing`` is how many ``media.chunk`` numbers on this track were
    skipped just before this message (0 when contiguous); the stream also
    keeps running totals.  Reordering and concealment are the jitter buffer's
    job, not the protocol core's.
    """

    sequence_number: int
    track: str
    chunk: int
    timestamp_ms: int
    payload: bytes
    chunks_missing: int = 0


@dataclass(frozen=True, slots=True)
class Dtmf:
    """``dtmf``: the caller pressed a key (bidirectional streams only)."""

    sequence_number: int
    track: str
    digit: str


@dataclass(frozen=True, slots=True)
class Mark:
    """``mark``: Twilio echoed one of our marks.

    ``cleared`` is False when the echo means "the audio before this mark has
    finished playing", and True when the mark was still pending at the time
    we sent ``clear``, i.e. its audio was discarded (or its played-echo raced
    our ``clear``); cleared echoes never advance the played position.
    """

    sequence_number: int
    name: str
    cleared: bool


@dataclass(frozen=True, slots=True)
class Stop:
    """``stop``: the stream ended (for ``<Connect><Stream>``: the call ended)."""

    sequence_number: int
    account_sid: str
    call_sid: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """A well-formed message whose ``event`` this core does not know.

    ``raw`` is the message text exactly as received.  ``sequence_number`` is
    set when the message carried one (it is validated like any other).
    """

    event: str
    raw: str
    sequence_number: int | None = None


TwilioEvent: TypeAlias = Connected | Start | Media | Dtmf | Mark | Stop | Unknown


# -------------------------------------------------------------------------- outbound


@dataclass(frozen=True, slots=True)
class SendAudio:
    """Send µ-law 8 kHz audio (no file header) to be played to the caller.

    ``item`` is an opaque key chosen by the bridge, normally the provider's
    output item id.  The stream counts, per item, how many samples were sent,
    confirmed played and cleared, so the bridge can ask how much of an item
    the caller actually heard (:meth:`TwilioStream.playback`).  Audio of one
    item is assumed to be sent in order, from its start.
    """

    payload: bytes
    item: str | None = None

    def __post_init__(self) -> None:
        if not self.payload:
            raise LocalProtocolError("SendAudio needs at least one byte of audio")


@dataclass(frozen=True, slots=True)
class SendMark:
    """Ask Twilio to tell us when all audio sent so far has played.

    The stream chooses the mark's name itself (``"1"``, ``"2"``, ...) and
    remembers which audio the mark covers.
    """


@dataclass(frozen=True, slots=True)
class ClearAudio:
    """Drop all audio buffered at Twilio (barge-in).  Pending marks come back as cleared."""


TwilioCommand: TypeAlias = SendAudio | SendMark | ClearAudio
