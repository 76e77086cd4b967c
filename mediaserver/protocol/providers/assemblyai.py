"""Sans-I/O core for one AssemblyAI Voice Agent session (µ-law 8 kHz passthrough).

Wire facts: AssemblyAI's Voice Agent API docs (events reference, message
sequence, audio format, client-side tools) as summarised in
``reference/provider-side.md`` §3; there is no SDK schema for this protocol.
Every message is a JSON text frame with a ``type``; audio is base64 inside
``input.audio {audio}`` (ours) and ``reply.audio {reply_id, data}`` (theirs),
``audio/pcmu`` (G.711 µ-law 8 kHz) both ways, so Twilio's bytes pass through.

States (:class:`AssemblyAIState`): ``NEW`` until ``initial_messages()``
(``session.update`` with the whole configuration); ``AWAITING_READY`` until
``session.ready`` (:class:`SessionReady`); ``READY``; ``ERROR``.

Early audio.  Audio may be sent only after ``session.ready``.  Audio the
bridge sends before that is buffered (at most ``max_buffered_audio_ms``,
oldest dropped first) and released, in order, by whichever comes first after
``session.ready``: :meth:`pending_messages` or the next audio :meth:`send`.

Replies.  ``reply_id`` is the item id of the reply's audio.  ``reply.done``
ends it: :class:`AudioDone` then :class:`ResponseDone` (status ``completed``
or ``interrupted``).  Barge-in is :class:`SpeechStarted` on
``input.speech.started``; if a reply ends ``interrupted`` without one since
it started, the core emits a :class:`SpeechStarted` first, so the bridge
always cuts an interrupted reply.  No truncate message exists
(:class:`Truncate` -> ``[]``): the server tracks what it produced.
:class:`CreateResponse` is ``reply.create``; :class:`SendText` is dropped
(``[]``): the client events include no text input.

Tool results follow AssemblyAI's timing rule: ``tool.result`` must be sent
when ``reply.done`` is the latest event, i.e. once the reply that made the
call has finished.  A :class:`ToolResult` given while a reply is still in
progress is held and released through :meth:`pending_messages` when
``reply.done`` (completed) arrives; if that reply ends ``interrupted`` the
held results -- and any later result for a call it made -- are dropped, as
the docs say.  A result given when no reply is in progress goes out at once.

Errors: ``session.error`` is fatal when it arrives before ``session.ready``
(the configuration was refused) or has a session-level code (auth, expiry,
capacity, internal error, unknown codes); the codes that reject one message
of ours (:data:`NON_FATAL_SESSION_ERRORS`) are not.  ``reply.error`` is
never fatal (one reply failed, the session lives on).
"""

from __future__ import annotations

import binascii
import enum
import json
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from ..errors import LocalProtocolError, RemoteProtocolError
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
    ResponseDone,
    ResponseStarted,
    SendAudio,
    SendText,
    SessionReady,
    SpeechStarted,
    SpeechStopped,
    ToolCall,
    ToolResult,
    Transcript,
    Truncate,
    Unknown,
    WireMessage,
)

__all__ = [
    "DEFAULT_URL",
    "NON_FATAL_SESSION_ERRORS",
    "AssemblyAIAgentConfig",
    "AssemblyAIAgentSession",
    "AssemblyAIState",
]

DEFAULT_URL: Final = "wss://agents.assemblyai.com/v1/ws"

_FORMAT: Final = AudioFormat("pcmu", 8000)
_WIRE_FORMAT: Final = {"encoding": "audio/pcmu"}

NON_FATAL_SESSION_ERRORS: Final = frozenset(
    {"audio_rate_violation", "invalid_audio", "invalid_format", "invalid_value", "immutable_field", "invalid_webhook"}
)
"""``session.error`` codes that reject one message of ours once the session is ready."""

_OTHER_TYPES: Final = frozenset({"session.updated", "session.ended"})


@dataclass(frozen=True, slots=True)
class AssemblyAIAgentConfig:
    """What goes into ``session.update``, plus the core's own limit on early audio."""

    instructions: str
    voice: str | None = None
    greeting: str | None = None
    tools: tuple[FunctionTool, ...] = ()
    url: str = DEFAULT_URL
    max_buffered_audio_ms: int = 3000

    def __post_init__(self) -> None:
        if type(self.max_buffered_audio_ms) is not int or self.max_buffered_audio_ms < 0:
            raise LocalProtocolError(f"max_buffered_audio_ms must be a non-negative int, got {self.max_buffered_audio_ms!r}")

    def session_update(self) -> dict[str, object]:
        """The ``session.update`` message as plain JSON values."""
        output: dict[str, object] = {"format": dict(_WIRE_FORMAT)}
        if self.voice:
            output["voice"] = self.voice
        session: dict[str, object] = {
            "system_prompt": self.instructions,
            "input": {"format": dict(_WIRE_FORMAT)},
            "output": output,
        }
        if self.greeting:
            session["greeting"] = self.greeting
        if self.tools:
            session["tools"] = [{"type": "function", **tool.to_json()} for tool in self.tools]
        return {"type": "session.update", "session": session}


class AssemblyAIState(enum.Enum):
    NEW = "new"
    AWAITING_READY = "awaiting_ready"
    READY = "ready"
    ERROR = "error"


class AssemblyAIAgentSession:
    """One AssemblyAI Voice Agent session; implements ``ProviderSession``."""

    def __init__(self, config: AssemblyAIAgentConfig) -> None:
        self._config = config
        self._state = AssemblyAIState.NEW
        self._events: deque[ProviderEvent] = deque()
        self._pending: list[WireMessage] = []
        self._early_audio: deque[bytes] = deque()
        self._early_bytes = 0
        self._max_early_bytes = config.max_buffered_audio_ms * _FORMAT.bytes_per_ms
        self.dropped_early_bytes = 0
        """Caller audio dropped because the pre-``session.ready`` buffer was full."""
        self._session_id: str | None = None
        self._reply: str | None = None  # reply in progress (reply.started, no reply.done yet)
        self._barged: set[str] = set()  # replies the caller has talked over
        self._calls: dict[str, str | None] = {}  # open call id -> reply that made it
        self._dropped_replies: set[str] = set()  # interrupted replies: their calls get no result
        self._held: list[tuple[str | None, str]] = []  # (reply, tool.result text) waiting for reply.done

    # ------------------------------------------------------------------ state

    @property
    def config(self) -> AssemblyAIAgentConfig:
        return self._config

    @property
    def state(self) -> AssemblyAIState:
        return self._state

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def input_format(self) -> AudioFormat:
        return _FORMAT

    @property
    def output_format(self) -> AudioFormat:
        return _FORMAT

    @property
    def buffered_audio_bytes(self) -> int:
        return self._early_bytes

    def _check_alive(self) -> None:
        if self._state is AssemblyAIState.ERROR:
            raise LocalProtocolError("the session is dead after an earlier protocol error")

    # -------------------------------------------------------------- outbound

    def initial_messages(self) -> list[WireMessage]:
        """``session.update``: prompt, greeting, voice, tools, ``audio/pcmu`` both ways."""
        self._check_alive()
        if self._state is not AssemblyAIState.NEW:
            self._state = AssemblyAIState.ERROR
            raise LocalProtocolError("initial_messages() called twice")
        self._state = AssemblyAIState.AWAITING_READY
        return [_dumps(self._config.session_update())]

    def send(self, command: ProviderCommand) -> list[WireMessage]:
        """Wire messages for ``command``; early audio and early tool results may be held (``[]``)."""
        self._check_alive()
        try:
            if self._state is AssemblyAIState.NEW:
                raise LocalProtocolError("command before initial_messages()")
            if type(command) is SendAudio:
                if self._state is not AssemblyAIState.READY:
                    self._buffer(command.payload)
                    return []
                return [*self._take_early_audio(), _audio_message(command.payload)]
            if type(command) is ToolResult:
                return self._tool_result(command)
            if type(command) in (Truncate, CancelResponse):
                return []  # the server stops and tracks its own output on barge-in
            if type(command) is SendText:
                return []  # no text-input event in the client protocol: dropped (base.SendText)
            if type(command) is CreateResponse:
                body: dict[str, object] = {"type": "reply.create"}
                if command.instructions is not None:
                    body["instructions"] = command.instructions
                return [_dumps(body)]
            raise LocalProtocolError(f"not a provider command: {command!r:.80}")
        except BaseException:
            self._state = AssemblyAIState.ERROR
            raise

    def _buffer(self, payload: bytes) -> None:
        self._early_audio.append(payload)
        self._early_bytes += len(payload)
        while self._early_bytes > self._max_early_bytes and self._early_audio:
            dropped = self._early_audio.popleft()
            self._early_bytes -= len(dropped)
            self.dropped_early_bytes += len(dropped)

    def _take_early_audio(self) -> list[WireMessage]:
        messages: list[WireMessage] = [_audio_message(frame) for frame in self._early_audio]
        self._early_audio.clear()
        self._early_bytes = 0
        return messages

    def _tool_result(self, command: ToolResult) -> list[WireMessage]:
        call_id = command.call_id
        if call_id not in self._calls:
            raise LocalProtocolError(f"no open tool call {call_id!r}")
        reply = self._calls.pop(call_id)
        if reply in self._dropped_replies:
            return []  # its reply was interrupted: the docs say to discard the result
        text = _dumps({"type": "tool.result", "call_id": call_id, "result": command.output})
        if self._reply is not None:
            self._held.append((reply, text))  # wait until reply.done is the latest event
            return []
        return [text]

    def pending_messages(self) -> list[WireMessage]:
        """Held tool results after a completed ``reply.done``; early audio after ``session.ready``."""
        self._check_alive()
        messages = self._pending
        self._pending = []
        if self._state is AssemblyAIState.READY and self._early_audio:
            messages.extend(self._take_early_audio())
        return messages

    @property
    def keepalive_interval_s(self) -> float | None:
        """AssemblyAI has no keepalive client event (audio streams continuously)."""
        return None

    def keepalive(self) -> list[WireMessage]:
        return []

    # --------------------------------------------------------------- inbound

    def receive_message(self, message: WireMessage) -> None:
        """Feed one WebSocket message from AssemblyAI; raises on bad input."""
        self._check_alive()
        try:
            if self._state is AssemblyAIState.NEW:
                raise LocalProtocolError("message received before initial_messages()")
            self._events.extend(self._parse(message))
        except BaseException:
            self._state = AssemblyAIState.ERROR
            raise

    def events(self) -> Iterator[ProviderEvent]:
        """Yield and remove the queued events, oldest first."""
        self._check_alive()
        events = self._events
        while events:
            yield events.popleft()

    def _parse(self, message: WireMessage) -> list[ProviderEvent]:
        if not isinstance(message, str):
            raise RemoteProtocolError("AssemblyAI sent a binary frame; it uses JSON text frames")
        try:
            msg = json.loads(message)
        except (ValueError, RecursionError):
            raise RemoteProtocolError(f"message is not valid JSON: {message!r:.80}") from None
        if type(msg) is not dict:
            raise RemoteProtocolError(f"message is not a JSON object: {message!r:.80}")
        type_ = msg.get("type")
        if type(type_) is not str:
            raise RemoteProtocolError(f"message has no string 'type': {message!r:.80}")
        handler = _HANDLERS.get(type_)
        if handler is not None:
            if self._state is not AssemblyAIState.READY and type_ not in _BEFORE_READY:
                raise RemoteProtocolError(f"server sent {type_} before session.ready")
            return handler(self, msg, message)
        if type_ in _OTHER_TYPES:
            return [Other(type_, message)]
        return [Unknown(type_, message)]

    def _on_session_ready(self, msg: dict[str, Any], raw: str) -> list[ProviderEvent]:
        if self._state is not AssemblyAIState.AWAITING_READY:
            raise RemoteProtocolError(f"server sent session.ready in state {self._state.name}")
        self._session_id = _optional_string(msg, "session_id")
        self._state = AssemblyAIState.READY
        return [SessionReady(self._session_id)]

    def _on_session_error(self, msg: dict[str, Any], raw: str) -> list[ProviderEvent]:
        code = _optional_string(msg, "code")
        message = _text(msg, "message", "session.error")
        fatal = self._state is not AssemblyAIState.READY or code not in NON_FATAL_SESSION_ERRORS
        return [ProviderError(message, fatal=fatal, code=code)]

    def _on_reply_error(self, msg: dict[str, Any], raw: str) -> list[ProviderEvent]:
        code = _optional_string(msg, "code")
        return [ProviderError(_text(msg, "message", "reply.error"), fatal=False, code=code)]

    def _on_speech_started(self, msg: dict[str, Any], raw: str) -> list[ProviderEvent]:
        if self._reply is not None:
            self._barged.add(self._reply)
        return [SpeechStarted(item_id=None, audio_start_ms=None)]

    def _on_speech_stopped(self, msg: dict[str, Any], raw: str) -> list[ProviderEvent]:
        return [SpeechStopped(item_id=None, audio_end_ms=None)]

    def _on_reply_started(self, msg: dict[str, Any], raw: str) -> list[ProviderEvent]:
        self._reply = _string(msg, "reply_id", "reply.started")
        return [ResponseStarted(self._reply)]

    def _on_reply_audio(self, msg: dict[str, Any], raw: str) -> list[ProviderEvent]:
        reply_id = _string(msg, "reply_id", "reply.audio")
        data = _text(msg, "data", "reply.audio")
        try:
            payload = binascii.a2b_base64(data, strict_mode=True)
        except ValueError:
            raise RemoteProtocolError(f"reply.audio: invalid base64 {data!r:.40}") from None
        return [AudioDelta(reply_id, payload, reply_id)]

    def _on_reply_done(self, msg: dict[str, Any], raw: str) -> list[ProviderEvent]:
        reply_id = _string(msg, "reply_id", "reply.done")
        status = msg.get("status")
        if status not in ("completed", "interrupted"):
            raise RemoteProtocolError(f"reply.done: status must be completed or interrupted, got {status!r:.40}")
        if self._reply == reply_id:
            self._reply = None
        held, self._held = self._held, []
        events: list[ProviderEvent] = []
        if status == "interrupted":
            self._dropped_replies.add(reply_id)
            if reply_id not in self._barged:
                events.append(SpeechStarted(item_id=None, audio_start_ms=None))
        else:
            # reply.done is now the latest event: the tool results may go.
            self._pending.extend(text for reply, text in held if reply not in self._dropped_replies)
        self._barged.discard(reply_id)
        events += [AudioDone(reply_id, reply_id), ResponseDone(reply_id, status, None)]
        return events

    def _on_tool_call(self, msg: dict[str, Any], raw: str) -> list[ProviderEvent]:
        call_id = _string(msg, "call_id", "tool.call")
        name = _string(msg, "name", "tool.call")
        arguments = msg.get("arguments", {})
        if type(arguments) is str:
            text = arguments
        elif type(arguments) is dict:
            text = _dumps(arguments)
        else:
            raise RemoteProtocolError(f"tool.call: 'arguments' must be an object, got {arguments!r:.40}")
        self._calls[call_id] = self._reply
        return [ToolCall(call_id=call_id, name=name, arguments=text, item_id=self._reply)]

    def _on_user_transcript(self, msg: dict[str, Any], raw: str) -> list[ProviderEvent]:
        final = msg["type"] == "transcript.user"
        return [Transcript("user", _text(msg, "text", msg["type"]), final, _optional_string(msg, "item_id"))]

    def _on_agent_transcript(self, msg: dict[str, Any], raw: str) -> list[ProviderEvent]:
        return [Transcript("assistant", _text(msg, "text", "transcript.agent"), True, _optional_string(msg, "reply_id"))]

    def _on_agent_transcript_delta(self, msg: dict[str, Any], raw: str) -> list[ProviderEvent]:
        text = _text(msg, "delta", "transcript.agent.delta")
        return [Transcript("assistant", text, False, _optional_string(msg, "reply_id"))]


_Handler = Callable[[AssemblyAIAgentSession, dict[str, Any], str], list[ProviderEvent]]
_A = AssemblyAIAgentSession
_HANDLERS: Final[Mapping[str, _Handler]] = MappingProxyType(
    {
        "session.ready": _A._on_session_ready,
        "session.error": _A._on_session_error,
        "reply.error": _A._on_reply_error,
        "input.speech.started": _A._on_speech_started,
        "input.speech.stopped": _A._on_speech_stopped,
        "reply.started": _A._on_reply_started,
        "reply.audio": _A._on_reply_audio,
        "reply.done": _A._on_reply_done,
        "tool.call": _A._on_tool_call,
        "transcript.user.delta": _A._on_user_transcript,
        "transcript.user": _A._on_user_transcript,
        "transcript.agent": _A._on_agent_transcript,
        "transcript.agent.delta": _A._on_agent_transcript_delta,
    }
)
# Allowed before session.ready: the answer itself and errors (e.g. unauthorized as first frame).
_BEFORE_READY: Final = frozenset({"session.ready", "session.error"})

KNOWN_SERVER_TYPES: Final = frozenset(_HANDLERS) | _OTHER_TYPES
"""Every server event type this core knows."""


# ------------------------------------------------------------------- helpers


def _dumps(body: Mapping[str, object]) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def _audio_message(payload: bytes) -> str:
    audio = binascii.b2a_base64(payload, newline=False).decode("ascii")
    return '{"type":"input.audio","audio":"' + audio + '"}'


def _string(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if type(value) is not str or not value:
        raise RemoteProtocolError(f"{where}: {key!r} must be a non-empty string, got {value!r:.40}")
    return value


def _text(obj: dict[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if type(value) is not str:
        raise RemoteProtocolError(f"{where}: {key!r} must be a string, got {value!r:.40}")
    return value


def _optional_string(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if type(value) is not str:
        raise RemoteProtocolError(f"{obj.get('type')}: {key!r} must be a string or null, got {value!r:.40}")
    return value
