"""Sans-I/O protocol cores: wire text in, typed events out; commands in, wire text out.

Nothing in this package performs I/O, reads a clock or imports an event loop
(no trio, quart or network libraries); the transports and the bridge do that.

* :mod:`mediaserver.protocol.twilio`: :class:`TwilioStream`, the Twilio Media
  Streams WebSocket core, with its events and commands in
  :mod:`mediaserver.protocol.twilio_events` (re-exported here).
* :mod:`mediaserver.protocol.providers`: one session core per speech provider
  behind the :class:`~mediaserver.protocol.providers.ProviderSession` protocol.
  Its event and command names overlap with Twilio's (``SendAudio``,
  ``Unknown``), so they are not re-exported here.
"""

from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from .twilio import DEFAULT_MAX_MESSAGE_BYTES, ItemPlayback, StreamState, TwilioStream
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
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MULAW_SAMPLES_PER_MS",
    "MULAW_SAMPLE_RATE_HZ",
    "ClearAudio",
    "Connected",
    "Dtmf",
    "ItemPlayback",
    "LocalProtocolError",
    "Mark",
    "Media",
    "MediaFormat",
    "ProtocolError",
    "RemoteProtocolError",
    "SendAudio",
    "SendMark",
    "Start",
    "Stop",
    "StreamState",
    "TwilioCommand",
    "TwilioEvent",
    "TwilioStream",
    "Unknown",
]
