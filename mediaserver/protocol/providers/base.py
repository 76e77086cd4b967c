"""What the bridge needs from any realtime speech provider, independent of vendor.

Each provider module (``openai.py`` today; Gemini, AssemblyAI, Deepgram,
ElevenLabs, generic PCM later) implements :class:`ProviderSession` as a
sans-I/O core: wire messages in, the events below out; the commands below
in, wire messages out.  The bridge only ever sees these types.

Rules every provider core follows:

* ``initial_messages()`` is called once, right after the WebSocket opens and
  before anything else; it returns the configuration messages to send.
* ``send(command)`` returns a *sequence* of wire messages, because a command
  may take zero messages (a provider that needs no truncation returns ``[]``
  for :class:`Truncate`), one, or several (OpenAI needs two for a tool
  result that should be answered).  Messages are ``str`` (text frames) or
  ``bytes`` (binary frames, e.g. Deepgram audio).
* Every inbound message produces at least one event (a Gemini message may
  carry audio *and* the end of the turn; a Deepgram function-call request
  one :class:`ToolCall` per function); a message type the core does not
  know becomes :class:`Unknown`, one it knows but that has no
  provider-neutral meaning becomes :class:`Other`.  Nothing is dropped.
* Some providers expect replies the bridge never asks for (ElevenLabs
  ``ping`` -> ``pong``): the core queues them while receiving and the
  transport sends whatever ``pending_messages()`` returns after every
  ``receive_message``.
* ``keepalive_interval_s`` (``None`` = never): when nothing has been sent
  for that long, the transport sends ``keepalive()`` (Deepgram ``KeepAlive``
  while no audio flows, e.g. before the caller's stream arrives).
* Audio payloads are raw bytes in the session's :attr:`ProviderSession.input_format`
  / :attr:`ProviderSession.output_format`; base64 stays inside the core.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, Protocol, TypeAlias, runtime_checkable

from ..errors import LocalProtocolError

__all__ = [
    "AudioDelta",
    "AudioDone",
    "AudioFormat",
    "AudioTruncated",
    "CancelResponse",
    "CreateResponse",
    "FunctionTool",
    "Other",
    "ProviderCommand",
    "ProviderError",
    "ProviderEvent",
    "ProviderSession",
    "ResponseDone",
    "ResponseStarted",
    "SendAudio",
    "SendText",
    "SessionReady",
    "SpeechStarted",
    "SpeechStopped",
    "ToolCall",
    "ToolCallsCancelled",
    "ToolResult",
    "Transcript",
    "Truncate",
    "Unknown",
    "WireMessage",
]

WireMessage: TypeAlias = str | bytes
"""One WebSocket message: ``str`` for a text frame, ``bytes`` for a binary frame."""


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """Raw mono audio as a provider sends or expects it.

    ``pcmu``/``pcma`` are G.711 (1 byte per sample); ``pcm16`` is signed
    16-bit little-endian (2 bytes per sample).
    """

    encoding: Literal["pcmu", "pcma", "pcm16"]
    sample_rate_hz: int

    def __post_init__(self) -> None:
        # Whole samples per ms keeps every ms <-> byte conversion exact.
        if self.sample_rate_hz <= 0 or self.sample_rate_hz % 1000:
            raise LocalProtocolError(
                f"sample rate must be a positive multiple of 1000 Hz, got {self.sample_rate_hz}"
            )

    @property
    def bytes_per_sample(self) -> int:
        return 2 if self.encoding == "pcm16" else 1

    @property
    def bytes_per_ms(self) -> int:
        return self.sample_rate_hz // 1000 * self.bytes_per_sample


@dataclass(frozen=True, slots=True)
class FunctionTool:
    """A function the model may call, in the neutral form every provider maps from.

    ``parameters`` is a JSON Schema object (``{"type": "object", ...}``).
    ``irreversible``: the call cannot be undone (hanging up, a transfer); a
    provider that may dispatch calls before the caller's turn is confirmed
    is asked to hold this one until it is (Deepgram's ``defer_until_eot``).
    """

    name: str
    description: str
    parameters: Mapping[str, object] = field(
        default_factory=lambda: MappingProxyType({"type": "object", "properties": {}})
    )
    irreversible: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise LocalProtocolError("a tool needs a name")

    def to_json(self) -> dict[str, object]:
        """``{"name", "description", "parameters"}`` as plain JSON values."""
        return {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class SessionReady:
    """The provider accepted our configuration; audio may flow."""

    session_id: str | None


@dataclass(frozen=True, slots=True)
class AudioDelta:
    """A piece of the assistant's audio, in the session's output format.

    ``item_id`` names the assistant output this audio belongs to; it is the
    key for :class:`Truncate` and for the Twilio stream's playback accounting.
    """

    item_id: str
    payload: bytes
    response_id: str | None = None


@dataclass(frozen=True, slots=True)
class AudioDone:
    """No more audio will come for ``item_id`` (also after an interruption)."""

    item_id: str
    response_id: str | None = None


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """The provider heard the caller start speaking: barge-in.

    ``audio_start_ms`` is measured on the provider's input-audio clock
    (audio we sent since the session began), when the provider reports it.
    ``by_caller`` False: the model stopped its own reply (the ``pcm``
    protocol's ``clear``): handled the same, but not counted as a barge-in.
    ``speech_began`` False: the provider decided the cut later than the
    caller began to speak, maybe after they stopped (AssemblyAI's
    interrupted ``reply.done``): the reply latency goes on counting from
    the caller's last stop.
    """

    item_id: str | None
    audio_start_ms: int | None
    by_caller: bool = True
    speech_began: bool = True


@dataclass(frozen=True, slots=True)
class SpeechStopped:
    """The provider decided the caller stopped speaking."""

    item_id: str | None
    audio_end_ms: int | None


@dataclass(frozen=True, slots=True)
class ResponseStarted:
    """The assistant began a response."""

    response_id: str | None


@dataclass(frozen=True, slots=True)
class ResponseDone:
    """The assistant's response ended.

    ``status`` is the provider's word for how (OpenAI: ``completed``,
    ``cancelled``, ``failed``, ``incomplete``); ``reason`` refines it
    (OpenAI: ``turn_detected``, ``client_cancelled``, ...).  ``error`` is why
    a ``failed`` response failed (OpenAI: quota, rate limit, server error),
    which no separate error event reports.
    """

    response_id: str | None
    status: str | None
    reason: str | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCall:
    """The model wants a function called; answer with :class:`ToolResult`.

    ``arguments`` is JSON text, exactly as the provider produced it (it may be
    invalid JSON: the tool runner decides).  ``response_id``: the response
    that made the call, where the provider says (OpenAI): calls of one
    response are answered together (see :class:`ToolResult`).
    """

    call_id: str
    name: str
    arguments: str
    item_id: str | None = None
    response_id: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallsCancelled:
    """The model withdrew these tool calls (:class:`ToolCall`; the caller spoke on, say): do not act on them.

    Gemini's ``toolCallCancellation``, Deepgram's ``FunctionCallCancelled``.
    A tool still running should be stopped (a transfer it asked for must not
    happen); a result sent anyway is dropped by the core.
    ``raw`` is the provider's message.
    """

    call_ids: tuple[str, ...]
    raw: str = ""


@dataclass(frozen=True, slots=True)
class Transcript:
    """Text of what was said.

    ``final=False`` carries an incremental fragment (to be appended), or,
    with ``cumulative``, the item's text so far (replacing the fragments);
    ``final=True`` carries the complete text of the item.  ``cut``: the
    provider already cut this text at what the caller heard of an
    interrupted reply (AssemblyAI), so the record does not cut it again.
    """

    role: Literal["user", "assistant"]
    text: str
    final: bool
    item_id: str | None = None
    cumulative: bool = False
    cut: bool = False


@dataclass(frozen=True, slots=True)
class AudioTruncated:
    """The provider confirmed a :class:`Truncate`."""

    item_id: str
    audio_end_ms: int


@dataclass(frozen=True, slots=True)
class ProviderError:
    """The provider reported an error.

    ``fatal`` means the session cannot usefully continue (for instance our
    configuration was rejected); the bridge should end the call.
    ``command`` is the wire type of our message that caused it, when known.
    """

    message: str
    fatal: bool
    code: str | None = None
    command: str | None = None


@dataclass(frozen=True, slots=True)
class Other:
    """A valid message of a known type that has no provider-neutral meaning."""

    type: str
    raw: str


@dataclass(frozen=True, slots=True)
class Unknown:
    """A message of a type the core does not know; ``raw`` is the text as received."""

    type: str
    raw: str


ProviderEvent: TypeAlias = (
    SessionReady
    | AudioDelta
    | AudioDone
    | SpeechStarted
    | SpeechStopped
    | ResponseStarted
    | ResponseDone
    | ToolCall
    | ToolCallsCancelled
    | Transcript
    | AudioTruncated
    | ProviderError
    | Other
    | Unknown
)


# ------------------------------------------------------------------------- commands


@dataclass(frozen=True, slots=True)
class SendAudio:
    """Caller audio for the provider, in the session's input format."""

    payload: bytes

    def __post_init__(self) -> None:
        if not self.payload:
            raise LocalProtocolError("SendAudio needs at least one byte of audio")


@dataclass(frozen=True, slots=True)
class Truncate:
    """The caller heard only the first ``audio_end_ms`` of ``item_id``'s audio.

    Cores clamp ``audio_end_ms`` to the audio they actually received for the
    item, and return no message when the provider needs none.
    """

    item_id: str
    audio_end_ms: int

    def __post_init__(self) -> None:
        if not self.item_id:
            raise LocalProtocolError("Truncate needs an item_id")
        if type(self.audio_end_ms) is not int or self.audio_end_ms < 0:
            raise LocalProtocolError(f"audio_end_ms must be a non-negative int, got {self.audio_end_ms!r}")


@dataclass(frozen=True, slots=True)
class CancelResponse:
    """Stop generating the current response (or ``response_id``)."""

    response_id: str | None = None


@dataclass(frozen=True, slots=True)
class CreateResponse:
    """Ask the model to respond now; ``instructions`` override the session's for this response."""

    instructions: str | None = None


@dataclass(frozen=True, slots=True)
class ToolResult:
    """The output of a :class:`ToolCall`.

    ``respond=True`` asks the model to continue speaking afterwards where the
    provider needs asking (OpenAI); send ``respond=False`` for all but the
    last of several parallel results.
    """

    call_id: str
    output: str
    respond: bool = True

    def __post_init__(self) -> None:
        if not self.call_id:
            raise LocalProtocolError("ToolResult needs a call_id")


@dataclass(frozen=True, slots=True)
class SendText:
    """A user turn in text, e.g. "The caller pressed 1 on the phone keypad." (DTMF).

    The model reads it as something the caller said; ``respond=True`` asks
    it to answer now where the provider needs asking (OpenAI).  A provider
    that cannot take text input returns ``[]`` (the text is dropped).
    """

    text: str
    respond: bool = True

    def __post_init__(self) -> None:
        if not self.text:
            raise LocalProtocolError("SendText needs some text")


ProviderCommand: TypeAlias = SendAudio | Truncate | CancelResponse | CreateResponse | ToolResult | SendText


# ------------------------------------------------------------------------- protocol


@runtime_checkable
class ProviderSession(Protocol):
    """A sans-I/O provider core, as the bridge uses it."""

    @property
    def input_format(self) -> AudioFormat:
        """Format of :class:`SendAudio` payloads."""
        ...

    @property
    def output_format(self) -> AudioFormat:
        """Format of :class:`AudioDelta` payloads."""
        ...

    def initial_messages(self) -> Sequence[WireMessage]:
        """Configuration to send first, once, right after connecting."""
        ...

    def receive_message(self, message: WireMessage) -> None:
        """Feed one WebSocket message from the provider; raises on bad input."""
        ...

    def events(self) -> Iterator[ProviderEvent]:
        """Yield and remove the queued events, oldest first."""
        ...

    def send(self, command: ProviderCommand) -> Sequence[WireMessage]:
        """Return the wire messages for ``command`` (possibly none)."""
        ...

    def pending_messages(self) -> Sequence[WireMessage]:
        """Return and forget replies the core owes the provider (e.g. ``pong``)."""
        ...

    @property
    def keepalive_interval_s(self) -> float | None:
        """Send :meth:`keepalive` after this long without sending; ``None``: never."""
        ...

    def keepalive(self) -> Sequence[WireMessage]:
        """The keepalive message(s) (empty when the provider has none)."""
        ...

    def closing_messages(self) -> Sequence[WireMessage]:
        """What to send before closing the socket, once, when the call ends (AssemblyAI's ``session.end``)."""
        ...
