"""Sans-I/O core for one ElevenLabs Agents (Conversational AI) WebSocket session.

Wire facts come from the ``elevenlabs`` SDK (``elevenlabs/conversational_ai/
conversation.py``, which handles the protocol as plain dicts, and
``elevenlabs/types/``): the initiation message is
``ConversationInitiationClientDataRequestInput``; server message names are the
``ClientEvent`` literal.

Use::

    session = ElevenLabsSession(ElevenLabsConfig(prompt="...", first_message="Hi!"))
    for message in session.initial_messages():   # conversation_initiation_client_data
        await ws.send(message)
    session.receive_message(text)
    for event in session.events(): ...
    for message in session.pending_messages():   # pong for every ping
        await ws.send(message)

Audio formats.  ElevenLabs fixes the formats on the *agent*
(``conversation_config.asr.user_input_audio_format`` and
``conversation_config.tts.agent_output_audio_format``); the per-call override
has no format field.  The session is always G.711 µ-law 8 kHz both ways
(``ulaw_8000``: Twilio's own format, passed through untouched).  When
``conversation_initiation_metadata`` reports another format, the core emits
a fatal :class:`ProviderError` naming the agent setting to change, and stops
sending audio (state ``REFUSED``).

Replies and barge-in.  ``audio`` events carry an integer ``event_id``.  The
core gives each agent reply its own ``item_id`` (``el-reply-N``): a new one
starts with the first audio after the session began, an ``interruption``,
a ``user_transcript``, an ``agent_response`` (sent with a reply's first
audio) or an ``agent_response_complete``.  ``interruption`` becomes
:class:`SpeechStarted`, and any later ``audio`` whose ``event_id`` is not
above the interruption's is dropped here (as the SDK's ``_last_interrupt_id``
does), reported as :class:`Other`.  ElevenLabs cuts its own context, so
:class:`Truncate` sends nothing.

States (:class:`SessionState`): ``NEW`` until ``initial_messages()``;
``AWAITING_METADATA`` until ``conversation_initiation_metadata``; then
``READY`` (formats match) or ``REFUSED`` (they do not).  A protocol error
moves to ``ERROR``, after which every call raises.
"""

from __future__ import annotations

import itertools
import json
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from .._wire import (
    JsonObject,
    ProtocolEnum,
    b64_field,
    b64encode,
    dumps,
    load_object,
    obj_field,
    require_text,
    text_field,
)
from ..errors import LocalProtocolError, RemoteProtocolError
from ._core import ProviderCore
from .base import (
    AudioDelta,
    AudioDone,
    AudioFormat,
    CancelResponse,
    CreateResponse,
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

__all__ = ["TWILIO_FORMAT", "ElevenLabsConfig", "ElevenLabsSession", "SessionState"]

# The only agent format that passes Twilio's µ-law through (SDK types/asr_input_format.py,
# types/tts_output_format.py list pcm_8000 ... pcm_48000 and ulaw_8000).
TWILIO_FORMAT: Final = "ulaw_8000"
_ULAW_8K: Final = AudioFormat("pcmu", 8000)

# Where each format is set on the agent (SDK conversation_config_input.py; the
# dashboard shows them under the agent's Voice and Advanced settings).
_FORMAT_SETTINGS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "agent_output_audio_format": (
            "conversation_config.tts.agent_output_audio_format (Voice: TTS output format)"
        ),
        "user_input_audio_format": (
            "conversation_config.asr.user_input_audio_format (Advanced: user input audio format)"
        ),
    }
)

# Server messages the core knows but that have no provider-neutral meaning
# (SDK types/client_event.py, minus the ones handled below).
_OTHER_TYPES: Final = frozenset(
    {
        "asr_initiation_metadata",
        "tentative_user_transcript",
        "mcp_tool_call",
        "mcp_connection_status",
        "agent_tool_request",
        "agent_tool_response",
        "agent_tool_response_full_payload",
        "agent_response_metadata",
        "vad_score",
        "agent_chat_response_part",
        "guardrail_triggered",
        "dtmf_request",
        "context_usage",
        "internal_turn_probability",
        "internal_tentative_agent_response",
    }
)


@dataclass(frozen=True, slots=True)
class ElevenLabsConfig:
    """What goes into ``conversation_initiation_client_data``.

    ``prompt`` and ``first_message`` override the agent's own
    (``conversation_config_override.agent.prompt.prompt`` and
    ``.agent.first_message``); ``None`` keeps the agent's setting.  The agent
    must allow each override it receives (agent Security settings), or
    ElevenLabs refuses the conversation.  ``dynamic_variables`` fill the
    agent's ``{{variables}}``.
    """

    prompt: str | None = None
    first_message: str | None = None
    dynamic_variables: Mapping[str, str | int | float | bool] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for name, value in self.dynamic_variables.items():
            if not name or type(value) not in (str, int, float, bool):
                raise LocalProtocolError(f"dynamic variable {name!r} must have a string, number or bool value")


class SessionState(ProtocolEnum):
    NEW = "new"  # initial_messages() not called yet
    AWAITING_METADATA = "awaiting_metadata"  # initiation sent; no conversation_initiation_metadata yet
    READY = "ready"  # the agent's formats are ulaw_8000 both ways
    REFUSED = "refused"  # the agent's formats are wrong; audio is no longer sent
    ERROR = "error"  # a protocol error happened; the session is dead


class ElevenLabsSession(ProviderCore[SessionState, ElevenLabsConfig]):
    """One ElevenLabs Agents conversation; implements ``ProviderSession``.

    No keepalive: the server pings and the core answers (:meth:`pending_messages`).
    """

    def __init__(self, config: ElevenLabsConfig | None = None) -> None:
        new = SessionState.NEW
        super().__init__(
            config or ElevenLabsConfig(), new, SessionState.ERROR, new=new, input_format=_ULAW_8K, output_format=_ULAW_8K
        )
        self._replies: deque[str] = deque()  # pongs owed
        self._reply_numbers = itertools.count(1)
        self._item: str | None = None  # the reply audio currently belongs to
        self._last_interrupt_id = 0
        self._conversation_id: str | None = None

    # ------------------------------------------------------------------ state

    @property
    def conversation_id(self) -> str | None:
        """From ``conversation_initiation_metadata``, once it has arrived."""
        return self._conversation_id

    # -------------------------------------------------------------- outbound

    def initial_messages(self) -> list[str]:
        """The ``conversation_initiation_client_data`` message."""
        self._begin(SessionState.AWAITING_METADATA)
        agent: dict[str, object] = {}
        if self._config.prompt is not None:
            agent["prompt"] = {"prompt": self._config.prompt}
        if self._config.first_message is not None:
            agent["first_message"] = self._config.first_message
        message: dict[str, object] = {"type": "conversation_initiation_client_data"}
        message["conversation_config_override"] = {"agent": agent} if agent else {}
        if self._config.dynamic_variables:
            message["dynamic_variables"] = dict(self._config.dynamic_variables)
        return [dumps(message)]

    def send(self, command: ProviderCommand) -> list[str]:
        """Return the wire messages for ``command``: none or one text frame."""
        return self._guarded(self._send, command)

    def _send(self, command: ProviderCommand) -> list[str]:
        if self._state is SessionState.NEW:
            raise LocalProtocolError(f"{type(command).__name__} before initial_messages()")
        if type(command) is SendAudio:
            if self._state is SessionState.REFUSED:
                return []  # the agent would misread µ-law; the call is ending anyway
            return ['{"user_audio_chunk":"' + b64encode(command.payload) + '"}']
        if type(command) is ToolResult:
            return [
                dumps(
                    {
                        "type": "client_tool_result",
                        "tool_call_id": command.call_id,
                        "result": command.output,
                        "is_error": _is_error(command.output),
                    }
                )
            ]
        if type(command) is SendText:
            # user_message: "User text message" (SDK ClientToOrchestratorEvent);
            # the agent always answers it, so ``respond`` needs no message.
            return [dumps({"type": "user_message", "text": command.text})]
        if type(command) in (Truncate, CancelResponse, CreateResponse):
            # ElevenLabs tracks what was spoken itself and has no cancel or
            # create message: the agent answers on its own turn detection.
            return []
        raise LocalProtocolError(f"not a provider command: {command!r:.80}")

    def pending_messages(self) -> list[str]:
        """Return and forget the ``pong`` replies owed for received ``ping``s."""
        replies = list(self._replies)
        self._replies.clear()
        return replies

    # --------------------------------------------------------------- inbound

    def _parse_events(self, message: str | bytes) -> tuple[ProviderEvent, ...]:
        text = require_text(message, "ElevenLabs")
        msg = load_object(text)
        type_: str = msg["type"]
        handler = _HANDLERS.get(type_)
        if handler is not None:
            events = handler(self, msg, text)
            return events if isinstance(events, tuple) else (events,)
        if type_ in _OTHER_TYPES:
            return (Other(type_, text),)
        return (Unknown(type_, text),)

    def _on_metadata(self, msg: JsonObject, raw: str) -> ProviderEvent:
        if self._state is not SessionState.AWAITING_METADATA:
            raise RemoteProtocolError(f"conversation_initiation_metadata again in state {self._state.name}")
        event = obj_field(msg, "conversation_initiation_metadata_event", "conversation_initiation_metadata")
        conversation_id = event.get("conversation_id")
        self._conversation_id = conversation_id if type(conversation_id) is str else None
        wrong = []
        for key, setting in _FORMAT_SETTINGS.items():
            value = event.get(key)
            if value is not None and value != TWILIO_FORMAT:  # absent: not reported, nothing to check
                wrong.append(f"{key} is {value!r}: set {setting} to {TWILIO_FORMAT}")
        if wrong:
            self._state = SessionState.REFUSED
            return ProviderError(
                message="the ElevenLabs agent's audio format does not fit a phone call; "
                + "; ".join(wrong)
                + " (μ-law 8000 Hz) in the agent's settings",
                fatal=True,
                code="audio_format_mismatch",
            )
        self._state = SessionState.READY
        return SessionReady(self._conversation_id)

    def _on_audio(self, msg: JsonObject, raw: str) -> ProviderEvent:
        event = obj_field(msg, "audio_event", "audio")
        event_id = _event_id(event, "audio_event")
        payload = b64_field(event, "audio_base_64", "audio_event")
        if event_id <= self._last_interrupt_id or not payload:
            return Other("audio", raw)  # of an interrupted reply: never played
        if self._item is None:
            self._item = f"el-reply-{next(self._reply_numbers)}"
        return AudioDelta(self._item, payload, response_id=str(event_id))

    def _on_interruption(self, msg: JsonObject, raw: str) -> ProviderEvent:
        event_id = _event_id(obj_field(msg, "interruption_event", "interruption"), "interruption_event")
        self._last_interrupt_id = max(self._last_interrupt_id, event_id)
        self._item = None
        return SpeechStarted(item_id=None, audio_start_ms=None)

    def _on_ping(self, msg: JsonObject, raw: str) -> ProviderEvent:
        event = obj_field(msg, "ping_event", "ping")
        event_id = event.get("event_id")
        if type(event_id) is not int:
            raise RemoteProtocolError(f"ping_event: 'event_id' must be an integer, got {event_id!r:.40}")
        self._replies.append(dumps({"type": "pong", "event_id": event_id}))
        return Other("ping", raw)

    def _on_user_transcript(self, msg: JsonObject, raw: str) -> tuple[ProviderEvent, ...]:
        event = obj_field(msg, "user_transcription_event", "user_transcript")
        text = text_field(event, "user_transcript", "user_transcription_event")
        # The caller finished a turn: the next audio is a new reply (and the last one is over).
        return (*self._close_item(), Transcript("user", text.strip(), final=True))

    def _on_agent_response(self, msg: JsonObject, raw: str) -> tuple[ProviderEvent, ...]:
        event = obj_field(msg, "agent_response_event", "agent_response")
        text = text_field(event, "agent_response", "agent_response_event")
        # Sent with the first audio of a new reply: the last one is over, and the text is the new one's (its id,
        # so that a barge-in's cut of that reply applies to its text).
        closed = self._close_item()
        self._item = f"el-reply-{next(self._reply_numbers)}"
        return (*closed, Transcript("assistant", text.strip(), final=True, item_id=self._item))

    def _close_item(self) -> tuple[ProviderEvent, ...]:
        """AudioDone for the reply audio is arriving for, if any: ``agent_response_complete`` is optional."""
        item, self._item = self._item, None
        return () if item is None else (AudioDone(item),)

    def _on_correction(self, msg: JsonObject, raw: str) -> ProviderEvent:
        # ElevenLabs' own guess at what was heard of an interrupted reply.  The bridge cuts that reply's text
        # at what Twilio's marks say was played (as for every provider): a second, corrected copy would only
        # duplicate the turn in the call record.
        event = obj_field(msg, "agent_response_correction_event", "agent_response_correction")
        text_field(event, "corrected_agent_response", "agent_response_correction_event")
        return Other("agent_response_correction", raw)

    def _on_response_complete(self, msg: JsonObject, raw: str) -> ProviderEvent | tuple[ProviderEvent, ...]:
        return self._close_item() or Other("agent_response_complete", raw)

    def _on_tool_call(self, msg: JsonObject, raw: str) -> ProviderEvent:
        call = obj_field(msg, "client_tool_call", "client_tool_call")
        call_id = text_field(call, "tool_call_id", "client_tool_call")
        name = text_field(call, "tool_name", "client_tool_call")
        parameters = call.get("parameters", {})
        if type(parameters) is not dict:
            raise RemoteProtocolError(f"client_tool_call: 'parameters' must be an object, got {parameters!r:.40}")
        return ToolCall(call_id, name, dumps(parameters))

    def _on_client_error(self, msg: JsonObject, raw: str) -> ProviderEvent:
        # The payload is not published (reference §5.3): take the first text we find.
        for source in (msg, msg.get("client_error_event"), msg.get("error")):
            if type(source) is dict:
                for key in ("message", "error", "reason", "detail"):
                    if type(source.get(key)) is str and source[key]:
                        return ProviderError(source[key], fatal=False, code="client_error")
            elif type(source) is str and source:
                return ProviderError(source, fatal=False, code="client_error")
        return ProviderError(f"client_error: {raw:.200}", fatal=False, code="client_error")


_Handler = Callable[[ElevenLabsSession, JsonObject, str], ProviderEvent | tuple[ProviderEvent, ...]]
_HANDLERS: Final[Mapping[str, _Handler]] = MappingProxyType(
    {
        "conversation_initiation_metadata": ElevenLabsSession._on_metadata,
        "audio": ElevenLabsSession._on_audio,
        "interruption": ElevenLabsSession._on_interruption,
        "ping": ElevenLabsSession._on_ping,
        "user_transcript": ElevenLabsSession._on_user_transcript,
        "agent_response": ElevenLabsSession._on_agent_response,
        "agent_response_correction": ElevenLabsSession._on_correction,
        "agent_response_complete": ElevenLabsSession._on_response_complete,
        "client_tool_call": ElevenLabsSession._on_tool_call,
        "client_error": ElevenLabsSession._on_client_error,
    }
)


# ------------------------------------------------------------------- helpers


def _is_error(output: str) -> bool:
    """A tool output that is a JSON object with an ``error`` key reports a failure."""
    try:
        value = json.loads(output)
    except (ValueError, RecursionError):
        return False
    return type(value) is dict and "error" in value


def _event_id(obj: JsonObject, where: str) -> int:
    """An ``event_id``: a non-negative integer (the SDK applies ``int()``, so digit strings pass too)."""
    value = obj.get("event_id")
    if type(value) is str and value.isdigit():
        value = int(value)
    if type(value) is not int or value < 0:
        raise RemoteProtocolError(f"{where}: 'event_id' must be a non-negative integer, got {value!r:.40}")
    return value
