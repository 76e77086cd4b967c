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
or ``interrupted``; a bare ``reply.done`` is the reply in progress,
completed).  Barge-in is the server's call (its "semantic barge-in"): a
back-channel ("uh-huh") starts ``input.speech.started`` but the agent keeps
talking, and only a real interruption ends the reply ``interrupted``.  So
``input.speech.started`` is :class:`Other`, and an ``interrupted``
``reply.done`` is a :class:`SpeechStarted` (the bridge clears Twilio and
drops the reply's queued audio), then :class:`ToolCallsCancelled` for the
calls that reply made, answered or not (an ``end_call`` in a goodbye the
caller talked over must not hang up), then the two above.  The server
cannot interrupt a reply it has finished, whose audio (sent faster than
real time) may still be playing: after ``input.speech.started`` with no
reply in progress, the next ``reply.started`` -- the answer to that speech --
comes with a :class:`SpeechStarted` first, so the stale rest is cleared (a
no-op for the bridge once it has all played).  A ``reply.audio`` without a
``reply_id`` (the API reference's example) is the reply in progress.  No truncate message exists
(:class:`Truncate` -> ``[]``): the server tracks what it produced, and its
``transcript.agent`` of an interrupted reply is already cut at what the
caller heard (:class:`Transcript` ``cut``).  The caller's
``transcript.user.delta`` carries the text so far (``cumulative``).

Ending.  :meth:`closing_messages` is ``session.end``: a socket closed
without it keeps the session (and its billing) for AssemblyAI's 30 s resume
window.
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

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from .._wire import (
    JsonObject,
    ProtocolEnum,
    b64_field,
    b64encode,
    dumps,
    load_object,
    optional_str_field,
    require_text,
    str_field,
    text_field,
)
from ..errors import LocalProtocolError, RemoteProtocolError
from ._core import EarlyAudio, ProviderCore, RecentSet
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
    ToolCallsCancelled,
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
_SESSION_END: Final = '{"type":"session.end"}'


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


class AssemblyAIState(ProtocolEnum):
    NEW = "new"
    AWAITING_READY = "awaiting_ready"
    READY = "ready"
    ERROR = "error"


class AssemblyAIAgentSession(ProviderCore[AssemblyAIState, AssemblyAIAgentConfig]):
    """One AssemblyAI Voice Agent session; implements ``ProviderSession``.

    AssemblyAI has no keepalive client event (audio streams continuously).
    """

    def __init__(self, config: AssemblyAIAgentConfig) -> None:
        new = AssemblyAIState.NEW
        super().__init__(config, new, AssemblyAIState.ERROR, new=new, input_format=_FORMAT, output_format=_FORMAT)
        self._pending: list[WireMessage] = []
        self._early_audio = EarlyAudio(config.max_buffered_audio_ms * _FORMAT.bytes_per_ms)
        self._session_id: str | None = None
        self._reply: str | None = None  # reply in progress (reply.started, no reply.done yet)
        self._calls: dict[str, str | None] = {}  # open call id -> reply that made it
        self._reply_calls: dict[str, list[str]] = {}  # reply in progress -> the calls it made (answered or not)
        self._dropped_replies = RecentSet()  # interrupted replies: their calls get no result
        self._held: list[tuple[str | None, str]] = []  # (reply, tool.result text) waiting for reply.done
        # Whether a completed reply.done is the latest of reply.started, input.speech.started and reply.done:
        # the only moment a tool.result may go (the docs: earlier or later "breaks turn-taking").
        self._done_is_latest = False
        # The caller spoke when no reply was in progress (the server cannot interrupt a reply it finished): the next
        # reply.started answers them, and what is still playing of an earlier reply is stale by then.
        self._spoke_between_replies = False

    # ------------------------------------------------------------------ state

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def buffered_audio_bytes(self) -> int:
        """Caller audio held until ``session.ready``."""
        return self._early_audio.buffered_bytes

    @property
    def dropped_early_bytes(self) -> int:
        """Caller audio dropped because the pre-``session.ready`` buffer was full."""
        return self._early_audio.dropped_bytes

    # -------------------------------------------------------------- outbound

    def initial_messages(self) -> list[WireMessage]:
        """``session.update``: prompt, greeting, voice, tools, ``audio/pcmu`` both ways."""
        self._begin(AssemblyAIState.AWAITING_READY)
        return [dumps(self._config.session_update())]

    def send(self, command: ProviderCommand) -> list[WireMessage]:
        """Wire messages for ``command``; early audio and early tool results may be held (``[]``)."""
        return self._guarded(self._send, command)

    def _send(self, command: ProviderCommand) -> list[WireMessage]:
        if self._state is AssemblyAIState.NEW:
            raise LocalProtocolError("command before initial_messages()")
        if type(command) is SendAudio:
            if self._state is not AssemblyAIState.READY:
                self._early_audio.push(command.payload)
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
            return [dumps(body)]
        raise LocalProtocolError(f"not a provider command: {command!r:.80}")

    def _take_early_audio(self) -> list[WireMessage]:
        return [_audio_message(frame) for frame in self._early_audio.take()]

    def _tool_result(self, command: ToolResult) -> list[WireMessage]:
        call_id = command.call_id
        if call_id not in self._calls:
            raise LocalProtocolError(f"no open tool call {call_id!r}")
        reply = self._calls.pop(call_id)
        if reply in self._dropped_replies:
            return []  # its reply was interrupted: the docs say to discard the result
        text = dumps({"type": "tool.result", "call_id": call_id, "result": command.output})
        if not self._done_is_latest:
            self._held.append((reply, text))  # wait until a completed reply.done is the latest event
            return []
        return [text]

    def closing_messages(self) -> list[WireMessage]:
        """``session.end`` once the session is ready: ends it (and its billing) now, not 30 s after the socket closes."""
        return [_SESSION_END] if self._state is AssemblyAIState.READY else []

    def pending_messages(self) -> list[WireMessage]:
        """Held tool results after a completed ``reply.done``; early audio after ``session.ready``."""
        self._check_alive()
        messages = self._pending
        self._pending = []
        if self._state is AssemblyAIState.READY and self._early_audio:
            messages.extend(self._take_early_audio())
        return messages

    # --------------------------------------------------------------- inbound

    def _parse_events(self, message: WireMessage) -> list[ProviderEvent]:
        text = require_text(message, "AssemblyAI")
        msg = load_object(text)
        type_: str = msg["type"]
        handler = _HANDLERS.get(type_)
        if handler is not None:
            if self._state is not AssemblyAIState.READY and type_ not in _BEFORE_READY:
                raise RemoteProtocolError(f"server sent {type_} before session.ready")
            return handler(self, msg, text)
        if type_ in _OTHER_TYPES:
            return [Other(type_, text)]
        return [Unknown(type_, text)]

    def _on_session_ready(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        if self._state is not AssemblyAIState.AWAITING_READY:
            raise RemoteProtocolError(f"server sent session.ready in state {self._state.name}")
        self._session_id = optional_str_field(msg, "session_id", "session.ready")
        self._state = AssemblyAIState.READY
        return [SessionReady(self._session_id)]

    def _on_session_error(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        code = optional_str_field(msg, "code", "session.error")
        message = text_field(msg, "message", "session.error")
        fatal = self._state is not AssemblyAIState.READY or code not in NON_FATAL_SESSION_ERRORS
        return [ProviderError(message, fatal=fatal, code=code)]

    def _on_reply_error(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        code = optional_str_field(msg, "code", "reply.error")
        return [ProviderError(text_field(msg, "message", "reply.error"), fatal=False, code=code)]

    def _on_speech_started(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        self._done_is_latest = False  # (a later event than reply.done: a tool result waits)
        if self._reply is None:
            self._spoke_between_replies = True
        return [Other("input.speech.started", raw)]  # not a barge-in: maybe a back-channel (module docstring)

    def _on_speech_stopped(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        return [SpeechStopped(item_id=None, audio_end_ms=None)]

    def _on_reply_started(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        self._reply = str_field(msg, "reply_id", "reply.started")
        self._done_is_latest = False
        events: list[ProviderEvent] = []
        if self._spoke_between_replies:
            # A reply to what the caller said after the last one was done: if the server sent that one faster
            # than real time, its rest is still playing and would come first (no-op when it has all played).
            self._spoke_between_replies = False
            events.append(SpeechStarted(None, None, speech_began=False))
        events.append(ResponseStarted(self._reply))
        return events

    def _on_reply_audio(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        if "reply_id" in msg:
            reply_id = str_field(msg, "reply_id", "reply.audio")
        elif self._reply is not None:  # (the API reference's example has none: the reply in progress)
            reply_id = self._reply
        else:
            raise RemoteProtocolError("reply.audio without a reply_id, and no reply in progress")
        payload = b64_field(msg, "data", "reply.audio")
        return [AudioDelta(reply_id, payload, reply_id)]

    def _on_reply_done(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        if "reply_id" in msg:
            reply_id = str_field(msg, "reply_id", "reply.done")
        elif self._reply is not None:  # a bare reply.done (the API reference's example): the reply in progress
            reply_id = self._reply
        else:
            raise RemoteProtocolError("reply.done without a reply_id, and no reply in progress")
        status = msg.get("status", "completed")
        if status not in ("completed", "interrupted"):
            raise RemoteProtocolError(f"reply.done: status must be completed or interrupted, got {status!r:.40}")
        if self._reply == reply_id:
            self._reply = None
        if status == "completed":
            self._reply_calls.pop(reply_id, None)
        held, self._held = self._held, []
        events: list[ProviderEvent] = []
        self._done_is_latest = status == "completed"
        if status == "interrupted":
            self._dropped_replies.add(reply_id)
            events.append(SpeechStarted(None, None, speech_began=False))  # the server's barge-in, maybe after the stop
            withdrawn = self._reply_calls.pop(reply_id, None)
            if withdrawn:
                events.append(ToolCallsCancelled(tuple(withdrawn), raw))
        else:
            # reply.done is now the latest event: the tool results may go.
            self._pending.extend(text for reply, text in held if reply not in self._dropped_replies)
        events += [AudioDone(reply_id, reply_id), ResponseDone(reply_id, status, None)]
        return events

    def _on_tool_call(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        call_id = str_field(msg, "call_id", "tool.call")
        name = str_field(msg, "name", "tool.call")
        arguments = msg.get("arguments", {})
        if type(arguments) is str:
            text = arguments
        elif type(arguments) is dict:
            text = dumps(arguments)
        else:
            raise RemoteProtocolError(f"tool.call: 'arguments' must be an object, got {arguments!r:.40}")
        self._calls[call_id] = self._reply
        if self._reply is not None:
            self._reply_calls.setdefault(self._reply, []).append(call_id)
        return [ToolCall(call_id=call_id, name=name, arguments=text, item_id=self._reply)]

    def _on_user_transcript(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        final = msg["type"] == "transcript.user"
        text = text_field(msg, "text", msg["type"])
        item = optional_str_field(msg, "item_id", msg["type"])
        return [Transcript("user", text, final, item, cumulative=not final)]  # (a delta is the text so far)

    def _on_agent_transcript(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        text = text_field(msg, "text", "transcript.agent")
        cut = msg.get("interrupted") is True  # the text is already cut at what the caller heard
        return [Transcript("assistant", text, True, optional_str_field(msg, "reply_id", msg["type"]), cut=cut)]

    def _on_agent_transcript_delta(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        text = text_field(msg, "delta", "transcript.agent.delta")
        return [Transcript("assistant", text, False, optional_str_field(msg, "reply_id", msg["type"]))]


_Handler = Callable[[AssemblyAIAgentSession, JsonObject, str], list[ProviderEvent]]
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


def _audio_message(payload: bytes) -> str:
    return '{"type":"input.audio","audio":"' + b64encode(payload) + '"}'
