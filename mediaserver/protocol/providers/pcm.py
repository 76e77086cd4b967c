"""Sans-I/O core for the generic ``pcm`` provider protocol, version 1.

The protocol is ours, published in ``docs/pcm-protocol.md``: a self-hosted
model speaks it over one WebSocket.  Binary frames carry raw PCM16 LE mono
audio both ways (caller audio at the input rate, model audio at the output
rate); small JSON text messages carry control.

Client (us) -> model: ``start`` (first, once), binary audio, ``playback``
(after a barge-in: how much of a reply the caller heard), ``tool_result``,
``text`` (caller input as text, e.g. keypad digits).
Model -> client: binary audio, ``ready``, ``speech_started``, ``clear``,
``reply_done``, ``transcript``, ``tool_call``, ``error``.  Messages of an
unknown type, and unknown fields, are ignored by both sides (an
:class:`Unknown` event here).

Replies.  The model's audio is numbered in replies, the same way on both
sides: audio belongs to reply 1 until the model sends ``reply_done``,
``speech_started`` or ``clear``; the next audio frame opens the next reply.
Reply ``N`` is ``item_id`` ``"reply-N"`` for the bridge, and ``playback``
names it by number.

States: ``NEW`` until ``initial_messages()``; ``OPEN`` after.  The model
answers ``start`` with ``ready`` (:class:`SessionReady`; the transport
waits for it before the call uses the session).  ``ERROR`` after a
protocol error, when every call raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from .._wire import JsonObject, ProtocolEnum, dumps, load_object
from ..errors import LocalProtocolError, RemoteProtocolError
from ._core import AudioLedger, ProviderCore
from .base import (
    AudioDelta,
    AudioDone,
    AudioFormat,
    CancelResponse,
    CreateResponse,
    FunctionTool,
    Other,
    ProviderCommand,
    ProviderError,
    ProviderEvent,
    SendAudio,
    SendText,
    SessionReady,
    SpeechStarted,
    ToolCall,
    ToolResult,
    Transcript,
    Truncate,
    Unknown,
)

__all__ = ["PROTOCOL_VERSION", "RATES_HZ", "PcmConfig", "PcmSession", "SessionState"]

PROTOCOL_VERSION: Final = 1  # docs/pcm-protocol.md
RATES_HZ: Final = (8000, 16000, 24000)  # what the bridge's resampler supports (mediaserver.codec.Resampler)
_ITEM_PREFIX: Final = "reply-"


@dataclass(frozen=True, slots=True)
class PcmConfig:
    """What goes into the ``start`` message.

    ``input_rate_hz`` is the caller audio we send, ``output_rate_hz`` the
    model audio we expect; each is 8000, 16000 or 24000.
    """

    input_rate_hz: int = 16000
    output_rate_hz: int = 16000
    instructions: str | None = None
    greeting: str | None = None
    tools: tuple[FunctionTool, ...] = ()
    call: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for name in ("input_rate_hz", "output_rate_hz"):
            if getattr(self, name) not in RATES_HZ:
                raise LocalProtocolError(f"{name} must be 8000, 16000 or 24000, got {getattr(self, name)!r}")


class SessionState(ProtocolEnum):
    NEW = "new"  # initial_messages() not called yet
    OPEN = "open"  # start sent: audio and control flow
    ERROR = "error"  # a protocol error happened; the session is dead


class PcmSession(ProviderCore[SessionState, PcmConfig]):
    """One session of the generic PCM protocol; implements ``ProviderSession``.

    The protocol has no unsolicited replies and no keepalive (caller audio
    flows continuously once the call is up).
    """

    def __init__(self, config: PcmConfig | None = None) -> None:
        config = config or PcmConfig()
        input_ = AudioFormat("pcm16", config.input_rate_hz)
        output = AudioFormat("pcm16", config.output_rate_hz)
        new = SessionState.NEW
        super().__init__(config, new, SessionState.ERROR, new=new, input_format=input_, output_format=output)
        self._reply = 1  # the number of the reply audio currently belongs to
        self._reply_open = False  # audio of self._reply has arrived
        self._said: dict[int, list[str]] = {}  # the agent's transcript texts of the last few replies, by number
        # Per reply number: audio received, and whether the model ended it.
        self._audio: AudioLedger[int] = AudioLedger(output.bytes_per_ms)

    # ------------------------------------------------------------------ state

    def audio_received_ms(self, item_id: str) -> int:
        """Whole ms of a reply's audio received (after our truncations); 0 if none."""
        number = _reply_number(item_id)
        return 0 if number is None else self._audio.received_ms(number)

    # -------------------------------------------------------------- outbound

    def initial_messages(self) -> list[str]:
        """The ``start`` message."""
        self._begin(SessionState.OPEN)
        config = self._config
        start: dict[str, object] = {
            "type": "start",
            "version": PROTOCOL_VERSION,
            "input": {"encoding": "pcm16", "sample_rate": config.input_rate_hz, "channels": 1},
            "output": {"encoding": "pcm16", "sample_rate": config.output_rate_hz, "channels": 1},
        }
        if config.instructions is not None:
            start["instructions"] = config.instructions
        if config.greeting is not None:
            start["greeting"] = config.greeting
        if config.tools:
            start["tools"] = [tool.to_json() for tool in config.tools]
        if config.call:
            start["call"] = dict(config.call)
        return [dumps(start)]

    def send(self, command: ProviderCommand) -> list[str | bytes]:
        """Return the wire messages for ``command``: none or one frame."""
        return self._guarded(self._send, command)

    def _send(self, command: ProviderCommand) -> list[str | bytes]:
        if self._state is SessionState.NEW:
            raise LocalProtocolError(f"{type(command).__name__} before initial_messages()")
        if type(command) is SendAudio:
            if len(command.payload) % 2:
                raise LocalProtocolError("PCM16 audio must be a whole number of 2-byte samples")
            return [bytes(command.payload)]
        if type(command) is Truncate:
            return self._playback(command)
        if type(command) is ToolResult:
            return [dumps({"type": "tool_result", "call_id": command.call_id, "output": command.output})]
        if type(command) is SendText:
            return [dumps({"type": "text", "text": command.text, "respond": command.respond})]
        if type(command) in (CancelResponse, CreateResponse):
            return []  # version 1 has neither: the model decides when to speak
        raise LocalProtocolError(f"not a provider command: {command!r:.80}")

    def _playback(self, command: Truncate) -> list[str | bytes]:
        number = _reply_number(command.item_id)
        if number is None:
            raise LocalProtocolError(f"no audio was received for item {command.item_id!r}; cannot truncate it")
        heard_ms = self._audio.cut(number, command.audio_end_ms, command.item_id)
        if heard_ms is None:
            return []  # the whole reply was heard: nothing was cut
        return [dumps({"type": "playback", "reply": number, "heard_ms": heard_ms})]

    # --------------------------------------------------------------- inbound

    def _parse_events(self, message: str | bytes) -> tuple[ProviderEvent]:
        return (self._parse(message),)

    def _parse(self, message: str | bytes) -> ProviderEvent:
        if isinstance(message, (bytes, bytearray, memoryview)):
            return self._on_audio(bytes(message))
        msg = load_object(message)
        type_: str = msg["type"]
        if type_ == "ready":
            return SessionReady(None)
        if type_ in ("speech_started", "clear"):
            return self._on_cut(type_)
        if type_ == "reply_done":
            return self._on_reply_done(message)
        if type_ == "transcript":
            return self._on_transcript(msg)
        if type_ == "tool_call":
            return self._on_tool_call(msg)
        if type_ == "error":
            return self._on_error(msg)
        return Unknown(type_, message)

    def _item(self) -> str:
        return f"{_ITEM_PREFIX}{self._reply}"

    def _next_reply(self) -> str | None:
        """End the current reply (if it has audio); return its item id."""
        if not self._reply_open:
            return None
        item = self._item()
        self._audio.complete(self._reply)
        self._reply += 1
        self._reply_open = False
        return item

    def _on_audio(self, payload: bytes) -> ProviderEvent:
        if len(payload) % 2:
            raise RemoteProtocolError(f"audio frame of {len(payload)} bytes is not whole PCM16 samples")
        self._reply_open = True  # (an empty frame too: "the next audio frame starts the next reply", both sides)
        if not payload:
            self._audio.add(self._reply, 0)
            return Other("audio", "")
        self._audio.add(self._reply, len(payload))
        return AudioDelta(self._item(), payload)

    def _on_cut(self, type_: str) -> ProviderEvent:
        self._next_reply()
        # Both mean "stop playing now": the bridge's barge-in clears Twilio's buffer.
        return SpeechStarted(item_id=None, audio_start_ms=None, by_caller=type_ == "speech_started")

    def _on_reply_done(self, raw: str) -> ProviderEvent:
        item = self._next_reply()
        return Other("reply_done", raw) if item is None else AudioDone(item)

    def _on_transcript(self, msg: JsonObject) -> ProviderEvent:
        role, text = msg.get("role"), msg.get("text")
        if role not in ("user", "assistant") or type(text) is not str:
            raise RemoteProtocolError("transcript needs role 'user' or 'assistant' and a string 'text'")
        if role == "user":
            return Transcript("user", text, final=True)
        # The agent's words belong to the reply it names, else to the reply being received, else (between
        # replies: a text-to-speech pipeline knows its words before their audio) to the next one.  A
        # barge-in's cut of that reply then applies to them too.
        number = msg.get("reply", self._reply)
        upcoming = self._reply + 1 if self._reply_open else self._reply  # (the next reply's: its words may come first)
        if type(number) is not int or not 1 <= number <= upcoming:
            raise RemoteProtocolError(f"transcript 'reply' must be a reply number from 1 to {upcoming}, got {number!r:.20}")
        said = self._said.setdefault(number, [])
        said.append(text.strip())
        while len(self._said) > 4:  # (the last few replies' texts: a late one for an earlier reply still joins it)
            del self._said[next(iter(self._said))]
        # (a reply's text may come in several messages: each final text is all of it so far, and replaces the last)
        return Transcript("assistant", " ".join(t for t in said if t), final=True, item_id=f"{_ITEM_PREFIX}{number}")

    def _on_tool_call(self, msg: JsonObject) -> ProviderEvent:
        call_id, name, arguments = msg.get("call_id"), msg.get("name"), msg.get("arguments", {})
        if type(call_id) is not str or not call_id or type(name) is not str or not name:
            raise RemoteProtocolError("tool_call needs non-empty string 'call_id' and 'name'")
        if type(arguments) is not dict:
            raise RemoteProtocolError("tool_call 'arguments' must be a JSON object")
        return ToolCall(call_id, name, dumps(arguments))

    def _on_error(self, msg: JsonObject) -> ProviderEvent:
        message, fatal = msg.get("message"), msg.get("fatal", False)
        if type(message) is not str or type(fatal) is not bool:
            raise RemoteProtocolError("error needs a string 'message' and a boolean 'fatal'")
        code = msg.get("code")
        return ProviderError(message, fatal=fatal, code=code if type(code) is str else None)


def _reply_number(item_id: str) -> int | None:
    if not item_id.startswith(_ITEM_PREFIX) or not item_id[len(_ITEM_PREFIX) :].isdigit():
        return None
    return int(item_id[len(_ITEM_PREFIX) :])
