"""Sans-I/O core for one OpenAI Realtime (GA) WebSocket session.

Wire facts come from the ``openai`` SDK's GA types (``openai/types/realtime/``):
client events are the members of ``RealtimeClientEvent``, server events the
members of ``RealtimeServerEvent``.  Beta-shaped sessions (``OpenAI-Beta:
realtime=v1``, ``response.audio.delta``) are not supported.

Use::

    session = OpenAIRealtimeSession(OpenAIRealtimeConfig(model="gpt-realtime-2.1"))
    for message in session.initial_messages():   # session.update (+ greeting)
        await ws.send(message)
    ...
    session.receive_message(text)
    for event in session.events():
        ...
    for message in session.send(Truncate(item_id, heard_ms)):
        await ws.send(message)

States (:class:`SessionState`, table :data:`_TRANSITIONS`): ``NEW`` until
``initial_messages()``; ``AWAITING_CREATED`` until ``session.created`` (the
first server event, per the SDK docstring of ``SessionCreatedEvent``);
``AWAITING_UPDATED`` until ``session.updated`` answers our ``session.update``
(then :class:`SessionReady`); ``READY``.  Any protocol error moves to
``ERROR``, after which every call raises.

Truncation.  The core counts, per assistant item, the audio bytes received in
``response.output_audio.delta``.  :class:`Truncate` is clamped to that audio
(``received_bytes // bytes_per_ms``, an int), because the server rejects an
``audio_end_ms`` beyond the audio it produced.  When the item's audio is
complete (``response.output_audio.done``) and the caller heard all of it,
no truncate is sent.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal

from ..._native._realtime import parse_audio_delta
from .._wire import (
    JsonObject,
    ProtocolEnum,
    b64_field,
    b64encode,
    dumps,
    int_field,
    load_object,
    obj_field,
    optional_str_field,
    require_text,
    str_field,
    table_transition,
    text_field,
    with_query,
)
from ..errors import LocalProtocolError, RemoteProtocolError
from ._core import RECENT, AudioLedger, ProviderCore
from .base import (
    AudioDelta,
    AudioDone,
    AudioFormat,
    AudioTruncated,
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
)

__all__ = [
    "DEFAULT_URL",
    "FunctionTool",
    "OpenAIRealtimeConfig",
    "OpenAIRealtimeSession",
    "SemanticVad",
    "ServerVad",
    "SessionState",
]

# GA endpoint; the model goes in the query string (SDK resources/realtime/realtime.py).
DEFAULT_URL: Final = "wss://api.openai.com/v1/realtime"
# session.reasoning.effort (the SDK's RealtimeReasoningEffort)
REASONING_EFFORTS: Final = ("minimal", "low", "medium", "high", "xhigh")

# Session audio formats (SDK realtime_audio_formats.py): {"type": "audio/pcmu"}
# is G.711 µ-law at 8 kHz; {"type": "audio/pcm", "rate": 24000} is PCM16 LE mono
# and 24000 is the only rate the SDK's literal allows.
_FORMATS: Final[Mapping[str, tuple[dict[str, object], AudioFormat]]] = MappingProxyType(
    {
        "pcmu": ({"type": "audio/pcmu"}, AudioFormat("pcmu", 8000)),
        "pcm24k": ({"type": "audio/pcm", "rate": 24000}, AudioFormat("pcm16", 24000)),
    }
)

# Client event ids we attach to control messages (never to audio appends), so
# that a server ``error`` naming one can be traced back to our command.
_EVENT_ID_PREFIX: Final = "mediaserver-"


# --------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class ServerVad:
    """``turn_detection`` of type ``server_vad``; ``None`` fields use the server default.

    Defaults per the SDK docstrings: threshold 0.5, prefix_padding_ms 300,
    silence_duration_ms 500, create_response and interrupt_response true.
    """

    threshold: float | None = None
    prefix_padding_ms: int | None = None
    silence_duration_ms: int | None = None
    idle_timeout_ms: int | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise LocalProtocolError(f"threshold must be within 0..1, got {self.threshold}")
        for name in ("prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise LocalProtocolError(f"{name} must be a non-negative int, got {value!r}")

    def to_wire(self) -> dict[str, object]:
        wire: dict[str, object] = {"type": "server_vad"}
        for name in (
            "threshold",
            "prefix_padding_ms",
            "silence_duration_ms",
            "idle_timeout_ms",
            "create_response",
            "interrupt_response",
        ):
            value = getattr(self, name)
            if value is not None:
                wire[name] = value
        return wire


@dataclass(frozen=True, slots=True)
class SemanticVad:
    """``turn_detection`` of type ``semantic_vad``; ``None`` fields use the server default."""

    eagerness: Literal["low", "medium", "high", "auto"] | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None

    def to_wire(self) -> dict[str, object]:
        wire: dict[str, object] = {"type": "semantic_vad"}
        for name in ("eagerness", "create_response", "interrupt_response"):
            value = getattr(self, name)
            if value is not None:
                wire[name] = value
        return wire


@dataclass(frozen=True, slots=True)
class OpenAIRealtimeConfig:
    """Everything the session sends in its first messages.

    ``audio_format`` is used for both directions: ``"pcmu"`` (G.711 µ-law
    8 kHz, Twilio's own format, no transcoding) or ``"pcm24k"`` (PCM16 24 kHz).
    ``turn_detection=None`` disables VAD (then nothing answers unless the
    bridge sends :class:`CreateResponse`).  ``greeting_instructions`` makes
    the model speak first, with these instructions for that one response.
    ``model`` is not sent in ``session.update`` (the SDK docstring says the
    model cannot be updated); it goes in the URL (:attr:`url`).
    ``reasoning_effort`` (``minimal`` … ``xhigh``) goes as
    ``session.reasoning.effort``, for reasoning models (``gpt-realtime-2``
    and later); None sends nothing: the model's own default.
    """

    model: str
    instructions: str | None = None
    voice: str | None = None
    audio_format: Literal["pcmu", "pcm24k"] = "pcmu"
    turn_detection: ServerVad | SemanticVad | None = ServerVad()
    transcription_model: str | None = None
    greeting_instructions: str | None = None
    tools: tuple[FunctionTool, ...] = ()
    base_url: str = DEFAULT_URL
    reasoning_effort: str | None = None

    def __post_init__(self) -> None:
        if not self.model:
            raise LocalProtocolError("model must be non-empty")
        if self.reasoning_effort is not None and self.reasoning_effort not in REASONING_EFFORTS:
            raise LocalProtocolError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}")
        if self.audio_format not in _FORMATS:
            raise LocalProtocolError(f"audio_format must be 'pcmu' or 'pcm24k', got {self.audio_format!r}")

    @property
    def url(self) -> str:
        """The WebSocket URL to connect to (authenticate with ``Authorization: Bearer <key>``)."""
        return with_query(self.base_url, "model", self.model)


# --------------------------------------------------------------------- state machine


class SessionState(ProtocolEnum):
    NEW = "new"  # initial_messages() not called yet
    AWAITING_CREATED = "awaiting_created"  # configuration sent; no session.created yet
    AWAITING_UPDATED = "awaiting_updated"  # session.created seen; our session.update unanswered
    READY = "ready"  # session.updated seen: our configuration is in force
    ERROR = "error"  # a protocol error happened; the session is dead


# The states in which send(SendAudio) is one input_audio_buffer.append and
# changes nothing (the COMMAND transitions below), and that message around the audio.
_AUDIO_STATES: Final = frozenset({SessionState.AWAITING_CREATED, SessionState.AWAITING_UPDATED, SessionState.READY})
_APPEND_ENVELOPE: Final = (b'{"type":"input_audio_buffer.append","audio":"', b'"}')


class _Input(ProtocolEnum):
    INITIAL = "initial messages"  # outbound: initial_messages()
    COMMAND = "command"  # outbound: send(any command)
    SESSION_CREATED = "session.created"
    SESSION_UPDATED = "session.updated"
    SERVER_ERROR = "error"
    SERVER_EVENT = "server event"  # any other known server event
    SERVER_UNKNOWN = "unknown server event"


MAX_UNANSWERED_CALLS = 64  # function calls awaiting a result that are tracked (a misbehaving model cannot grow it)

_S = SessionState
_I = _Input

# The whole protocol, one table.  A missing (state, input) pair is illegal:
# LocalProtocolError for outbound inputs and for anything received in NEW (we
# must configure before reading), RemoteProtocolError otherwise.
_TRANSITIONS: Final[Mapping[tuple[SessionState, _Input], SessionState]] = MappingProxyType(
    {
        (_S.NEW, _I.INITIAL): _S.AWAITING_CREATED,
        (_S.AWAITING_CREATED, _I.SESSION_CREATED): _S.AWAITING_UPDATED,
        (_S.AWAITING_CREATED, _I.SERVER_ERROR): _S.AWAITING_CREATED,
        (_S.AWAITING_CREATED, _I.SERVER_UNKNOWN): _S.AWAITING_CREATED,
        (_S.AWAITING_CREATED, _I.COMMAND): _S.AWAITING_CREATED,
        (_S.AWAITING_UPDATED, _I.SESSION_UPDATED): _S.READY,
        (_S.AWAITING_UPDATED, _I.SERVER_EVENT): _S.AWAITING_UPDATED,
        (_S.AWAITING_UPDATED, _I.SERVER_ERROR): _S.AWAITING_UPDATED,
        (_S.AWAITING_UPDATED, _I.SERVER_UNKNOWN): _S.AWAITING_UPDATED,
        (_S.AWAITING_UPDATED, _I.COMMAND): _S.AWAITING_UPDATED,
        (_S.READY, _I.SESSION_UPDATED): _S.READY,
        (_S.READY, _I.SERVER_EVENT): _S.READY,
        (_S.READY, _I.SERVER_ERROR): _S.READY,
        (_S.READY, _I.SERVER_UNKNOWN): _S.READY,
        (_S.READY, _I.COMMAND): _S.READY,
    }
)


# --------------------------------------------------------------------------- session


class OpenAIRealtimeSession(ProviderCore[SessionState, OpenAIRealtimeConfig]):
    """One OpenAI Realtime GA session; implements ``ProviderSession``.

    No keepalive client event (the :class:`ProviderCore` default).  The
    server takes one response at a time, so an answer asked for while one is
    active (a tool result, keypad digits) is owed until ``response.done``,
    then comes from :meth:`pending_messages`.
    """

    def __init__(self, config: OpenAIRealtimeConfig) -> None:
        wire_format, audio_format = _FORMATS[config.audio_format]
        super().__init__(
            config, SessionState.NEW, SessionState.ERROR, input_format=audio_format, output_format=audio_format
        )
        self._wire_format = wire_format
        self._event_numbers = itertools.count(1)
        self._sent_event_types: dict[str, str] = {}  # our event_id -> its wire type
        self._session_id: str | None = None
        self._ready_reported = False
        # Per assistant item: audio received (reduced by our truncations), and
        # whether response.output_audio.done has arrived for it.
        self._audio: AudioLedger[str] = AudioLedger(audio_format.bytes_per_ms)
        # One response at a time: the server refuses response.create while one is active
        # (conversation_already_has_active_response), so a tool result or text that asks for an answer then
        # waits for response.done (pending_messages) instead of being refused.
        self._response_busy = False  # a response is active, or asked for and not yet created
        self._create_sent = False  # a response.create of ours that no response.created has answered yet
        self._create_owed = False  # an answer was asked for while busy
        # The caller is talking (speech_started, not yet stopped) and the server's VAD answers when they stop
        # (create_response, its default): an answer asked for now would start talking over them, then the
        # VAD's own response would answer again.  The VAD's response sees the result or text all the same.
        self._caller_talking = False
        detection = config.turn_detection
        self._vad_answers = detection is not None and detection.create_response is not False
        # Function calls the model made and no result has answered yet.  At response.done an answer owed is
        # dropped while any is left: a result that came before another call of the same response was even
        # made would otherwise have the model answer without that call's result (and then again with it).
        # The last result asks for the answer (the bridge sets ``respond`` on it); if it does not (a tool that
        # answers without a reply, such as end_call), the answer held back goes with it all the same.
        self._unanswered: set[str] = set()
        self._answer_held = False
        self._replies: list[str] = []

    # ------------------------------------------------------------------ state

    @property
    def session_id(self) -> str | None:
        """``session.id`` from ``session.created``, when the server sent one."""
        return self._session_id

    def audio_received_ms(self, item_id: str) -> int:
        """Whole ms of ``item_id``'s audio received (after our truncations); 0 if none."""
        return self._audio.received_ms(item_id)

    def _transition(self, what: _Input, *, inbound: bool) -> None:
        if self._state is SessionState.NEW and what is not _I.INITIAL:
            raise LocalProtocolError(f"{what.value} before initial_messages()")
        self._state = table_transition(_TRANSITIONS, self._state, what, inbound=inbound)

    def _dumps(self, type_: str, body: dict[str, object]) -> str:
        """Serialise a control event, tagging it with our own event_id."""
        event_id = f"{_EVENT_ID_PREFIX}{next(self._event_numbers)}"
        types = self._sent_event_types
        types[event_id] = type_
        if len(types) > RECENT:  # (an error names the event it is about soon after it: older ones are forgotten)
            del types[next(iter(types))]
        return dumps({"type": type_, "event_id": event_id, **body})

    # -------------------------------------------------------------- outbound

    def initial_messages(self) -> list[str]:
        """``session.update`` with the whole configuration, then the greeting if any."""
        return self._guarded(self._initial_messages)

    def _initial_messages(self) -> list[str]:
        self._transition(_I.INITIAL, inbound=False)
        config = self._config
        session: dict[str, object] = {"type": "realtime", "output_modalities": ["audio"]}
        if config.instructions is not None:
            session["instructions"] = config.instructions
        audio_input: dict[str, object] = {
            "format": dict(self._wire_format),
            "turn_detection": None if config.turn_detection is None else config.turn_detection.to_wire(),
        }
        if config.transcription_model is not None:
            audio_input["transcription"] = {"model": config.transcription_model}
        audio_output: dict[str, object] = {"format": dict(self._wire_format)}
        if config.voice is not None:
            audio_output["voice"] = config.voice
        session["audio"] = {"input": audio_input, "output": audio_output}
        if config.reasoning_effort is not None:
            session["reasoning"] = {"effort": config.reasoning_effort}
        if config.tools:
            session["tools"] = [{"type": "function", **tool.to_json()} for tool in config.tools]
            session["tool_choice"] = "auto"
        messages = [self._dumps("session.update", {"session": session})]
        if config.greeting_instructions is not None:
            # A response's instructions *replace* the session's for that response (the SDK's
            # RealtimeResponseCreateParams.instructions: "the default system instructions"), so the greeting
            # carries the agent's own too: its persona, language and voice style from the first words.
            instructions = config.greeting_instructions
            if config.instructions:
                instructions = f"{config.instructions}\n\n{instructions}"
            messages.append(self._dumps("response.create", {"response": {"instructions": instructions}}))
            self._response_busy = self._create_sent = True
        return messages

    def pending_messages(self) -> list[str]:
        """The ``response.create`` owed since a response ended (see ``_answer``)."""
        replies, self._replies = self._replies, []
        return replies

    def _answer(self) -> list[str]:
        """``response.create`` now, or once the active response is done; none while the caller talks and the
        server's VAD will answer when they stop."""
        self._answer_held = False
        if self._caller_talking and self._vad_answers:
            return []
        if self._response_busy:
            self._create_owed = True
            return []
        self._response_busy = self._create_sent = True
        return [self._dumps("response.create", {})]

    def send(self, command: ProviderCommand) -> list[str]:
        """Return the wire messages for ``command``: zero, one or two text frames."""
        return self._guarded(self._send, command)

    def audio_envelope(self) -> tuple[bytes, bytes] | None:
        """``(prefix, suffix)``: now, ``send(SendAudio(p))`` is the one message ``prefix + base64(p) + suffix``.

        None when it is not (before ``initial_messages()``, after an error):
        use :meth:`send`, which raises.  The link frames audio natively from
        this (``WebSocketLink.send_audio_nowait``), the uplink's per-frame path.
        """
        if self._state in _AUDIO_STATES:
            return _APPEND_ENVELOPE
        return None

    def _send(self, command: ProviderCommand) -> list[str]:
        self._transition(_I.COMMAND, inbound=False)
        if type(command) is SendAudio:
            audio = b64encode(command.payload)
            return ['{"type":"input_audio_buffer.append","audio":"' + audio + '"}']
        if type(command) is Truncate:
            return self._truncate(command)
        if type(command) is CancelResponse:
            body: dict[str, object] = {}
            if command.response_id is not None:
                body["response_id"] = command.response_id
            return [self._dumps("response.cancel", body)]
        if type(command) is CreateResponse:
            body = {}
            if command.instructions is not None:
                body["response"] = {"instructions": command.instructions}
            self._response_busy = self._create_sent = True
            return [self._dumps("response.create", body)]
        if type(command) is ToolResult:
            self._unanswered.discard(command.call_id)
            item = {"type": "function_call_output", "call_id": command.call_id, "output": command.output}
            messages = [self._dumps("conversation.item.create", {"item": item})]
            if command.respond or (self._answer_held and not self._unanswered):
                messages += self._answer()
            return messages
        if type(command) is SendText:
            text_item = {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": command.text}],
            }
            messages = [self._dumps("conversation.item.create", {"item": text_item})]
            if command.respond:
                messages += self._answer()
            return messages
        raise LocalProtocolError(f"not a provider command: {command!r:.80}")

    def _truncate(self, command: Truncate) -> list[str]:
        item_id = command.item_id
        audio_end_ms = self._audio.cut(item_id, command.audio_end_ms, item_id)
        if audio_end_ms is None:
            return []  # the caller heard all of it: nothing to cut
        return [
            self._dumps(
                "conversation.item.truncate",
                {"item_id": item_id, "content_index": 0, "audio_end_ms": audio_end_ms},
            )
        ]

    # --------------------------------------------------------------- inbound

    def _parse_events(self, message: str | bytes) -> tuple[ProviderEvent]:
        if type(message) is str:  # the agent's voice, 25-50 deltas a second: read natively when plain
            fields = parse_audio_delta(message)
            if fields is not None:
                self._transition(_I.SERVER_EVENT, inbound=True)
                item_id, response_id, payload = fields
                self._audio.add(item_id, len(payload))
                return (AudioDelta(item_id, payload, response_id),)
        if not isinstance(message, str) and self._state is SessionState.NEW:
            raise LocalProtocolError("binary frame before initial_messages()")
        text = require_text(message, "OpenAI Realtime")
        msg = load_object(text)
        type_: str = msg["type"]
        entry = _SERVER_EVENTS.get(type_)
        if entry is None:
            self._transition(_I.SERVER_UNKNOWN, inbound=True)
            return (Unknown(type_, text),)
        what, handler = entry
        self._transition(what, inbound=True)
        return (handler(self, msg, text),)

    # One handler per server event type; each returns exactly one event.

    def _on_session_created(self, msg: JsonObject, raw: str) -> ProviderEvent:
        session = obj_field(msg, "session", "session.created")
        session_id = session.get("id")
        self._session_id = session_id if type(session_id) is str else None
        return Other("session.created", raw)

    def _on_session_updated(self, msg: JsonObject, raw: str) -> ProviderEvent:
        session = obj_field(msg, "session", "session.updated")
        self._check_effective_format(session)
        if not self._ready_reported:  # this is the answer to our session.update
            self._ready_reported = True
            return SessionReady(self._session_id)
        return Other("session.updated", raw)

    def _check_effective_format(self, session: JsonObject) -> None:
        """Refuse a session whose effective audio format is not the one we configured."""
        audio = session.get("audio")
        if type(audio) is not dict:
            return
        for direction in ("input", "output"):
            side = audio.get(direction)
            fmt = side.get("format") if type(side) is dict else None
            if type(fmt) is not dict:
                continue
            # (pcmu has no rate in the SDK's type; a server that echoes it says 8000)
            rates = (None, self._wire_format.get("rate", 8000 if self._wire_format["type"] == "audio/pcmu" else None))
            if fmt.get("type") != self._wire_format["type"] or fmt.get("rate") not in rates:
                raise RemoteProtocolError(
                    f"session.updated reports {direction} format {fmt!r:.80}, "
                    f"we configured {self._wire_format!r}"
                )

    def _on_error(self, msg: JsonObject, raw: str) -> ProviderEvent:
        error = obj_field(msg, "error", "error")
        code = optional_str_field(error, "code", "error.error")
        # (an error with no text is still an error, not a broken session)
        message = optional_str_field(error, "message", "error.error") or code or "unknown error"
        caused_by = optional_str_field(error, "event_id", "error.error")
        command = None if caused_by is None else self._sent_event_types.get(caused_by)
        # Most errors are recoverable (SDK RealtimeErrorEvent docstring); a rejected
        # session.update is not: the session would run with the server's defaults.
        fatal = command == "session.update"
        if code == "conversation_already_has_active_response":
            # Our response.create met a response we had not seen yet (the server sends this one without an
            # event_id): answer once that response is done.
            self._response_busy = self._create_owed = True
            self._create_sent = False
        elif command == "response.create" or (command is None and self._create_sent):
            # Refused (or, with no event_id, possibly refused): no response is coming from it.  If it was
            # another command's error after all, a later create may meet an active response: that is owed above.
            self._response_busy = self._create_sent = False
            self._owe_now()
        return ProviderError(message=message, fatal=fatal, code=code, command=command)

    def _on_audio_delta(self, msg: JsonObject, raw: str) -> ProviderEvent:
        where = "response.output_audio.delta"
        item_id = str_field(msg, "item_id", where)
        payload = b64_field(msg, "delta", where)
        self._audio.add(item_id, len(payload))
        return AudioDelta(item_id, payload, optional_str_field(msg, "response_id", where))

    def _on_audio_done(self, msg: JsonObject, raw: str) -> ProviderEvent:
        where = "response.output_audio.done"
        item_id = str_field(msg, "item_id", where)
        self._audio.complete(item_id)
        return AudioDone(item_id, optional_str_field(msg, "response_id", where))

    def _on_speech_started(self, msg: JsonObject, raw: str) -> ProviderEvent:
        self._caller_talking = True
        return SpeechStarted(
            item_id=str_field(msg, "item_id", "input_audio_buffer.speech_started"),
            audio_start_ms=int_field(msg, "audio_start_ms", "input_audio_buffer.speech_started"),
        )

    def _on_speech_stopped(self, msg: JsonObject, raw: str) -> ProviderEvent:
        self._caller_talking = False
        return SpeechStopped(
            item_id=str_field(msg, "item_id", "input_audio_buffer.speech_stopped"),
            audio_end_ms=int_field(msg, "audio_end_ms", "input_audio_buffer.speech_stopped"),
        )

    def _owe_now(self) -> None:
        """No response is active: send the answer owed, if any."""
        if self._create_owed and not self._response_busy:
            self._create_owed = False
            if self._unanswered:
                self._answer_held = True  # (see __init__)
                return
            self._response_busy = self._create_sent = True
            self._replies.append(self._dumps("response.create", {}))

    def _on_response_created(self, msg: JsonObject, raw: str) -> ProviderEvent:
        self._response_busy = True
        self._create_sent = False
        response = obj_field(msg, "response", "response.created")
        return ResponseStarted(optional_str_field(response, "id", "response.created.response"))

    def _on_response_done(self, msg: JsonObject, raw: str) -> ProviderEvent:
        where = "response.done.response"
        response = obj_field(msg, "response", "response.done")
        details = response.get("status_details")
        reason = error = None
        if type(details) is dict:
            reason = optional_str_field(details, "reason", f"{where}.status_details")
            failure = details.get("error")
            if type(failure) is dict:  # (status "failed": quota, rate limit, server error -- and no "error" event)
                text = failure.get("message") or failure.get("code") or failure.get("type")
                error = text if type(text) is str and text else "no reason given"
        self._response_busy = False
        self._owe_now()
        status = optional_str_field(response, "status", where)
        return ResponseDone(
            response_id=optional_str_field(response, "id", where),
            status=status,
            reason=reason,
            error=error if error is not None or status != "failed" else "no reason given",
        )

    def _on_output_item_done(self, msg: JsonObject, raw: str) -> ProviderEvent:
        """A function call is run once its item is done *and completed*.

        ``response.function_call_arguments.done`` comes first, but the SDK
        says it is "also emitted when a Response is interrupted, incomplete,
        or cancelled": a call the caller cut off mid-arguments would run with
        whatever had arrived (an ``end_call`` with none would hang up).  The
        item's own ``status`` says whether the model finished it (OpenAI's
        agents SDK dispatches the same way); an unfinished call is not run
        and owes no answer.
        """
        where = "response.output_item.done"
        item = obj_field(msg, "item", where)
        if item.get("type") != "function_call":
            return Other(msg["type"], raw)
        where = f"{where}.item"
        call_id = str_field(item, "call_id", where)
        name = str_field(item, "name", where)
        arguments = text_field(item, "arguments", where)
        status = optional_str_field(item, "status", where)
        if status not in (None, "completed"):
            return Other(msg["type"], raw)  # (the bridge logs nothing for it: the response's end says it was cut)
        if len(self._unanswered) < MAX_UNANSWERED_CALLS:
            self._unanswered.add(call_id)
        return ToolCall(
            call_id=call_id,
            name=name,
            arguments=arguments,
            item_id=optional_str_field(item, "id", where),
            response_id=optional_str_field(msg, "response_id", "response.output_item.done"),
        )

    def _on_user_transcript_delta(self, msg: JsonObject, raw: str) -> ProviderEvent:
        # ``delta`` is optional in the SDK model (ConversationItemInputAudioTranscriptionDeltaEvent).
        where = msg["type"]
        text = optional_str_field(msg, "delta", where) or ""
        return Transcript("user", text, False, optional_str_field(msg, "item_id", where))

    def _on_user_transcript_done(self, msg: JsonObject, raw: str) -> ProviderEvent:
        return self._transcript(msg, "user", "transcript", final=True)

    def _on_assistant_transcript_delta(self, msg: JsonObject, raw: str) -> ProviderEvent:
        return self._transcript(msg, "assistant", "delta", final=False)

    def _on_assistant_transcript_done(self, msg: JsonObject, raw: str) -> ProviderEvent:
        return self._transcript(msg, "assistant", "transcript", final=True)

    @staticmethod
    def _transcript(msg: JsonObject, role: Literal["user", "assistant"], key: str, *, final: bool) -> ProviderEvent:
        where = msg["type"]
        return Transcript(role, text_field(msg, key, where), final, optional_str_field(msg, "item_id", where))

    def _on_item_truncated(self, msg: JsonObject, raw: str) -> ProviderEvent:
        return AudioTruncated(
            item_id=str_field(msg, "item_id", "conversation.item.truncated"),
            audio_end_ms=int_field(msg, "audio_end_ms", "conversation.item.truncated"),
        )

    def _on_transcription_failed(self, msg: JsonObject, raw: str) -> ProviderEvent:
        """The caller's words were not transcribed: the call goes on, the record lacks that turn -- say why."""
        where = "conversation.item.input_audio_transcription.failed"
        error = msg.get("error")
        text = None
        if type(error) is dict:
            text = error.get("message") or error.get("code") or error.get("type")
        item = optional_str_field(msg, "item_id", where)
        return ProviderError(
            message=f"the caller's speech{f' ({item})' if item else ''} was not transcribed:"
            f" {text if type(text) is str and text else 'no reason given'}",
            fatal=False,
            code=error.get("code") if type(error) is dict and type(error.get("code")) is str else None,
        )

    def _on_other(self, msg: JsonObject, raw: str) -> ProviderEvent:
        return Other(msg["type"], raw)


_Handler = Callable[[OpenAIRealtimeSession, JsonObject, str], ProviderEvent]
_O = OpenAIRealtimeSession

# Every GA server event type in the SDK's RealtimeServerEvent union
# (openai/types/realtime/realtime_server_event.py), with its state-machine input
# and handler.  tests/protocol/test_openai.py checks this against the SDK.
_SERVER_EVENTS: Final[Mapping[str, tuple[_Input, _Handler]]] = MappingProxyType(
    {
        "session.created": (_I.SESSION_CREATED, _O._on_session_created),
        "session.updated": (_I.SESSION_UPDATED, _O._on_session_updated),
        "error": (_I.SERVER_ERROR, _O._on_error),
        "response.output_audio.delta": (_I.SERVER_EVENT, _O._on_audio_delta),
        "response.output_audio.done": (_I.SERVER_EVENT, _O._on_audio_done),
        "input_audio_buffer.speech_started": (_I.SERVER_EVENT, _O._on_speech_started),
        "input_audio_buffer.speech_stopped": (_I.SERVER_EVENT, _O._on_speech_stopped),
        "response.created": (_I.SERVER_EVENT, _O._on_response_created),
        "response.done": (_I.SERVER_EVENT, _O._on_response_done),
        "response.output_item.done": (_I.SERVER_EVENT, _O._on_output_item_done),
        "conversation.item.input_audio_transcription.delta": (
            _I.SERVER_EVENT,
            _O._on_user_transcript_delta,
        ),
        "conversation.item.input_audio_transcription.completed": (
            _I.SERVER_EVENT,
            _O._on_user_transcript_done,
        ),
        "response.output_audio_transcript.delta": (_I.SERVER_EVENT, _O._on_assistant_transcript_delta),
        "response.output_audio_transcript.done": (_I.SERVER_EVENT, _O._on_assistant_transcript_done),
        "conversation.item.truncated": (_I.SERVER_EVENT, _O._on_item_truncated),
        "conversation.item.input_audio_transcription.failed": (_I.SERVER_EVENT, _O._on_transcription_failed),
        **{
            type_: (_I.SERVER_EVENT, _O._on_other)
            for type_ in (
                "conversation.created",
                "conversation.item.created",
                "conversation.item.added",
                "conversation.item.done",
                "conversation.item.deleted",
                "conversation.item.retrieved",
                "conversation.item.input_audio_transcription.segment",
                "input_audio_buffer.cleared",
                "input_audio_buffer.committed",
                "input_audio_buffer.timeout_triggered",
                "input_audio_buffer.dtmf_event_received",
                "rate_limits.updated",
                "response.output_item.added",
                "response.function_call_arguments.done",  # (the call runs from its item: _on_output_item_done)
                "response.content_part.added",
                "response.content_part.done",
                "response.output_text.delta",
                "response.output_text.done",
                "response.function_call_arguments.delta",
                "output_audio_buffer.started",
                "output_audio_buffer.stopped",
                "output_audio_buffer.cleared",
                "mcp_list_tools.in_progress",
                "mcp_list_tools.completed",
                "mcp_list_tools.failed",
                "response.mcp_call_arguments.delta",
                "response.mcp_call_arguments.done",
                "response.mcp_call.in_progress",
                "response.mcp_call.completed",
                "response.mcp_call.failed",
            )
        },
    }
)
