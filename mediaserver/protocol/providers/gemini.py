"""Sans-I/O core for one Gemini Live API (``BidiGenerateContent``) connection.

Wire facts come from the ``google-genai`` SDK's types (``LiveClientMessage``,
``LiveClientSetup``, ``LiveServerMessage``, ``LiveServerContent``) and its
``live.py``; see also ``/work/shared/reference/provider-side.md`` §2.

Use::

    session = GeminiLiveSession(GeminiLiveConfig(model="gemini-3.8-live"))
    for message in session.initial_messages():   # the setup message
        await ws.send(message)
    ...
    session.receive_message(frame)               # text or binary frame (Gemini sends binary JSON)
    for event in session.events():
        ...
    await send_all(session.pending_messages())   # the greeting turn, once setupComplete arrived

States (:class:`SessionState`, table :data:`_TRANSITIONS`): ``NEW`` until
``initial_messages()``; ``AWAITING_SETUP`` until ``setupComplete`` (then
:class:`SessionReady`); ``READY``.  Commands are refused before ``READY``:
Gemini wants nothing but ``setup`` until it answers, so the transport holds
caller audio until then.  Any protocol error moves to ``ERROR``.

Audio: caller audio goes up as ``realtimeInput.audio`` (PCM16 LE 16 kHz);
the model's audio comes down in ``serverContent.modelTurn.parts[].inlineData``
(PCM16 LE 24 kHz).  Each model turn gets a synthetic item id
``gemini-turn-N`` (Gemini has none) so the bridge can drop the rest of an
interrupted turn; the counter is shared by :meth:`GeminiLiveSession.resumed`
cores, so ids stay unique across reconnections.

Barge-in: ``serverContent.interrupted`` becomes :class:`SpeechStarted` and
closes the turn.  Gemini has no truncate message (the model assumes its audio
was played in real time), so :class:`Truncate` returns ``[]``.

One inbound message may carry several things (audio *and* ``turnComplete``,
a transcript next to audio), so a message yields one *or more* events,
never none: a message with nothing provider-neutral in it becomes
:class:`Other` (or a subclass defined here), an unknown one :class:`Unknown`.

Errors: Gemini reports errors by closing the WebSocket (code + reason); that
is the transport's business and always fatal.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Final

from .._wire import (
    JsonObject,
    ProtocolEnum,
    b64_field,
    b64encode,
    dumps,
    flag_field,
    load_object,
    obj_field,
    object_list_field,
    optional_str_field,
    str_field,
    table_transition,
)
from ..errors import LocalProtocolError, RemoteProtocolError
from ._core import ProviderCore, RecentSet
from .base import (
    AudioDelta,
    AudioDone,
    AudioFormat,
    CancelResponse,
    CreateResponse,
    FunctionTool,
    Other,
    ProviderCommand,
    ProviderEvent,
    ResponseDone,
    ResponseStarted,
    SendAudio,
    SendText,
    SessionReady,
    SpeechStarted,
    ToolCall,
    ToolCallsCancelled,
    ToolResult,
    Transcript,
    Truncate,
    Unknown,
)

__all__ = [
    "INPUT_FORMAT",
    "OUTPUT_FORMAT",
    "GeminiLiveConfig",
    "GeminiLiveSession",
    "GoAway",
    "ResumptionUpdate",
    "SessionState",
]

INPUT_FORMAT: Final = AudioFormat("pcm16", 16000)
OUTPUT_FORMAT: Final = AudioFormat("pcm16", 24000)
_INPUT_MIME: Final = "audio/pcm;rate=16000"
TURN_ID_PREFIX: Final = "gemini-turn-"
# Models that refuse ``clientContent`` after the start of the session (see GeminiLiveConfig.text_as_realtime_input)
_REALTIME_TEXT_MODELS: Final = ("gemini-3.1-flash-live",)
UTTERANCE_ID_PREFIX: Final = "gemini-user-"


# --------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class GeminiLiveConfig:
    """Everything the ``setup`` message carries (plus the greeting turn).

    ``model`` is the Live model id (``models/`` is prefixed if missing).
    ``greeting`` is text sent as a user turn right after ``setupComplete`` to
    make the model speak first (a pattern, not a documented Gemini feature).
    ``compress_context`` asks for a sliding-window context compression, which
    lifts Gemini's ~15 min limit on audio sessions.  ``resumption_handle``
    resumes an earlier session (the setup then carries it and no greeting is
    sent).
    """

    model: str
    instructions: str | None = None
    voice: str | None = "Puck"
    tools: tuple[FunctionTool, ...] = ()
    greeting: str | None = None
    transcribe: bool = True
    compress_context: bool = True
    resumption_handle: str | None = None

    def __post_init__(self) -> None:
        if not self.model or self.model == "models/":
            raise LocalProtocolError("model must be non-empty")
        if self.resumption_handle == "":
            raise LocalProtocolError("resumption_handle must be None or non-empty")

    @property
    def model_name(self) -> str:
        """``models/<id>``, the form the SDK sends (``_transformers.t_model``)."""
        return self.model if self.model.startswith("models/") else f"models/{self.model}"

    @property
    def text_as_realtime_input(self) -> bool:
        """True for a model that takes ``clientContent`` only as history seeded at the start (Gemini 3.1 Flash
        Live): text turns then go as ``realtimeInput.text``, as Google's guide for it says, not as a
        ``clientContent`` the server would refuse by closing the connection (1007)."""
        return self.model_name.removeprefix("models/").startswith(_REALTIME_TEXT_MODELS)

    def setup(self) -> dict[str, object]:
        """The body of the ``setup`` client message, camelCase as on the wire."""
        generation: dict[str, object] = {"responseModalities": ["AUDIO"]}
        if self.voice:
            generation["speechConfig"] = {"voiceConfig": {"prebuiltVoiceConfig": {"voiceName": self.voice}}}
        setup: dict[str, object] = {"model": self.model_name, "generationConfig": generation}
        if self.instructions:
            setup["systemInstruction"] = {"parts": [{"text": self.instructions}], "role": "user"}
        if self.tools:
            setup["tools"] = [{"functionDeclarations": [_declaration(tool) for tool in self.tools]}]
        if self.transcribe:
            setup["inputAudioTranscription"] = {}
            setup["outputAudioTranscription"] = {}
        setup["sessionResumption"] = {} if self.resumption_handle is None else {"handle": self.resumption_handle}
        if self.compress_context:
            setup["contextWindowCompression"] = {"slidingWindow": {}}
        return setup


def _declaration(tool: FunctionTool) -> dict[str, object]:
    """A ``functionDeclarations`` entry, its arguments in ``parameters`` (Gemini's OpenAPI-subset Schema).

    Not ``parametersJsonSchema``: the Live API has been reported to ignore it
    (livekit/agents#2940, fixed in #3135 by sending ``parameters``), so the
    model saw only names and descriptions and called every tool with no
    arguments.  A tool without arguments declares none.
    """
    declaration: dict[str, object] = {"name": tool.name, "description": tool.description, "behavior": "BLOCKING"}
    if tool.parameters.get("properties"):
        declaration["parameters"] = _gemini_schema(tool.parameters)
    return declaration


_GEMINI_TYPES: Final[Mapping[str, str]] = MappingProxyType(
    {"string": "STRING", "integer": "INTEGER", "number": "NUMBER", "boolean": "BOOLEAN", "array": "ARRAY", "object": "OBJECT"}
)


def _gemini_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A tool's JSON Schema (mediaserver.tools: type, properties, required, items, enum, description) as
    Gemini's Schema: upper-case types; an ``enum`` only of strings (Gemini's enums are strings: an ``enum`` of
    numbers becomes words in the description, and the runner still checks the value)."""
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key == "type":
            out["type"] = _GEMINI_TYPES[value]
        elif key == "properties":
            out["properties"] = {name: _gemini_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out["items"] = _gemini_schema(value)
        elif key == "required":
            out["required"] = list(value)
        elif key == "description":
            out["description"] = value
        elif key == "enum" and all(type(v) is str for v in value):
            out["enum"] = list(value)
            out["format"] = "enum"
        # (anything else -- additionalProperties, $schema -- is not in Gemini's Schema)
    enum = schema.get("enum")
    if enum is not None and "enum" not in out:
        one_of = "one of " + ", ".join(json.dumps(v) for v in enum)
        out["description"] = f"{out['description']} ({one_of})" if out.get("description") else one_of
    return out


# ------------------------------------------------------------- Gemini-only events


@dataclass(frozen=True, slots=True)
class GoAway(Other):
    """The server will close this connection soon (``timeLeft``, e.g. ``"50s"``): time to resume."""

    time_left: str | None = None


@dataclass(frozen=True, slots=True)
class ResumptionUpdate(Other):
    """A ``sessionResumptionUpdate``; ``handle`` is set when the session can be resumed now."""

    handle: str | None = None


# --------------------------------------------------------------------- state machine


class SessionState(ProtocolEnum):
    NEW = "new"  # initial_messages() not called yet
    AWAITING_SETUP = "awaiting_setup"  # setup sent; no setupComplete yet
    READY = "ready"  # setupComplete seen: audio may flow
    ERROR = "error"  # a protocol error happened; the session is dead


class _Input(ProtocolEnum):
    INITIAL = "initial messages"
    COMMAND = "command"
    SETUP_COMPLETE = "setupComplete"
    SERVER_MESSAGE = "server message"  # any other known server message
    SERVER_UNKNOWN = "unknown server message"


_S = SessionState
_I = _Input

# The whole protocol, one table.  A missing pair is illegal: LocalProtocolError
# for outbound inputs and anything received in NEW, RemoteProtocolError otherwise.
_TRANSITIONS: Final[Mapping[tuple[SessionState, _Input], SessionState]] = MappingProxyType(
    {
        (_S.NEW, _I.INITIAL): _S.AWAITING_SETUP,
        (_S.AWAITING_SETUP, _I.SETUP_COMPLETE): _S.READY,
        (_S.AWAITING_SETUP, _I.SERVER_UNKNOWN): _S.AWAITING_SETUP,
        (_S.READY, _I.SERVER_MESSAGE): _S.READY,
        (_S.READY, _I.SERVER_UNKNOWN): _S.READY,
        (_S.READY, _I.COMMAND): _S.READY,
    }
)

# LiveServerMessage fields (camelCase wire names) in the order they are handled.
_KNOWN_FIELDS: Final = (
    "setupComplete",
    "sessionResumptionUpdate",
    "toolCallCancellation",
    "toolCall",
    "serverContent",
    "goAway",
    "usageMetadata",
    "voiceActivity",
    "voiceActivityDetectionSignal",
)


class _Shared:
    """What every connection of one logical session shares (see :meth:`GeminiLiveSession.resumed`)."""

    def __init__(self) -> None:
        self.turn_numbers = itertools.count(1)
        self.utterance_numbers = itertools.count(1)  # the caller's, for their transcripts' item ids
        self.tool_names: dict[str, str] = {}  # call id -> function name, until answered or cancelled
        self.cancelled = RecentSet()  # call ids the server cancelled (a late result is dropped)
        self.seen = RecentSet()  # call ids ever dispatched, on any connection: a call re-sent is not run again


# --------------------------------------------------------------------------- session


class GeminiLiveSession(ProviderCore[SessionState, GeminiLiveConfig]):
    """One Gemini Live connection; implements ``ProviderSession``.

    Gemini has no keepalive message (the SDK relies on WebSocket pings).
    """

    def __init__(self, config: GeminiLiveConfig, *, _shared: _Shared | None = None) -> None:
        new = SessionState.NEW
        super().__init__(
            config, new, SessionState.ERROR, new=new, input_format=INPUT_FORMAT, output_format=OUTPUT_FORMAT
        )
        self._shared = _shared or _Shared()
        self._pending: list[str] = []
        self._session_id: str | None = None
        self._handle: str | None = config.resumption_handle
        self._going_away = False
        self._handle_current = False  # the newest handle was resumable and nothing was generated since
        # The model turn in progress: its item id, whether its audio is done,
        # and whether audio may still be added (False after interrupted).
        self._turn: str | None = None
        self._turn_audio_done = False
        self._turn_open = False
        self._turn_interrupted = False
        self._early_turn: str | None = None  # the id given to the model's words that came before its turn's audio
        self._transcripts: dict[str, list[str]] = {"user": [], "assistant": []}
        # The caller's words have an id of their own, not the model turn's: they may begin during one model
        # turn (a barge-in) and end in the next, and their pieces and final text must be one record turn.
        self._utterance: str | None = None
        # Function results answered on this connection (call id -> name), and on a resumed one those the last
        # connection answered: the link re-sends, on the next connection, a result whose write failed.
        self._answered: dict[str, str] = {}
        self._resendable: dict[str, str] = {}

    # ------------------------------------------------------------------ state

    @property
    def session_id(self) -> str | None:
        """``setupComplete.sessionId``, when the server sent one."""
        return self._session_id

    @property
    def resumption_handle(self) -> str | None:
        """The newest handle the server marked resumable (or the one we resumed with)."""
        return self._handle

    @property
    def going_away(self) -> bool:
        """``goAway`` was received: the server will close this connection soon."""
        return self._going_away

    @property
    def resumable_now(self) -> bool:
        """Resuming now would lose nothing the model said or did: no turn under way, no function call awaiting
        its result, and the newest handle came after the last of the model's output (Gemini marks a handle not
        resumable while it generates or runs a function call: resuming then "will result in some data loss",
        the SDK's ``LiveServerSessionResumptionUpdate.resumable``)."""
        return self._handle_current and self._turn is None and not self._shared.tool_names

    def resumed(self) -> GeminiLiveSession:
        """A core for the next connection, resuming this session with the newest handle.

        It continues the turn numbering (item ids stay unique for the bridge)
        and remembers the names of function calls still awaiting a result.
        No greeting is sent on a resumed connection.
        """
        if self._handle is None:
            raise LocalProtocolError("no resumable handle received yet; cannot resume")
        config = replace(self._config, resumption_handle=self._handle, greeting=None)
        session = GeminiLiveSession(config, _shared=self._shared)
        session._resendable = self._answered
        return session

    def abandon_turn(self) -> list[ProviderEvent]:
        """The end of the turn under way, if any, as events: this connection is retired in the middle of it.

        A resumed connection starts with fresh turns, so the bridge is told
        that this one's audio is over and its response ``cancelled``
        (reason ``reconnected``), not left waiting for a ``turnComplete``
        that will not come.
        """
        events = self._end_audio()
        if self._turn is not None:
            events.append(ResponseDone(self._turn, "cancelled", "reconnected"))
        self._end_turn()
        return events

    def _transition(self, what: _Input, *, inbound: bool) -> None:
        if self._state is SessionState.NEW and what is not _I.INITIAL:
            raise LocalProtocolError(f"{what.value} before initial_messages()")
        self._state = table_transition(_TRANSITIONS, self._state, what, inbound=inbound)

    # -------------------------------------------------------------- outbound

    def initial_messages(self) -> list[str]:
        """The ``setup`` message; everything else waits for ``setupComplete``."""
        return self._guarded(self._initial_messages)

    def _initial_messages(self) -> list[str]:
        self._transition(_I.INITIAL, inbound=False)
        return [dumps({"setup": self._config.setup()})]

    def send(self, command: ProviderCommand) -> list[str]:
        """Wire messages for ``command``; only legal once ``setupComplete`` arrived."""
        return self._guarded(self._send, command)

    def _send(self, command: ProviderCommand) -> list[str]:
        self._transition(_I.COMMAND, inbound=False)
        if type(command) is SendAudio:
            if len(command.payload) % 2:
                raise LocalProtocolError("PCM16 audio needs an even number of bytes")
            data = b64encode(command.payload)
            return [dumps({"realtimeInput": {"audio": {"mimeType": _INPUT_MIME, "data": data}}})]
        if type(command) is Truncate:
            return []  # Gemini has no truncation; interrupted turns end server-side
        if type(command) is CancelResponse:
            return []  # no cancel message; the model stops when the caller speaks
        if type(command) is CreateResponse:
            text = command.instructions or "Please respond."
            return [self._text_turn(text)]
        if type(command) is ToolResult:
            return self._tool_response(command)
        if type(command) is SendText:
            # A user turn in text; turnComplete makes the model answer it now.
            return [self._text_turn(command.text, complete=command.respond)]
        raise LocalProtocolError(f"not a provider command: {command!r:.80}")

    def _tool_response(self, command: ToolResult) -> list[str]:
        name = self._shared.tool_names.pop(command.call_id, None) or self._resendable.pop(command.call_id, None)
        if name is None:
            if command.call_id in self._shared.cancelled or command.call_id in self._answered:
                return []  # toolCallCancellation came first (the model no longer wants it), or answered already
            raise LocalProtocolError(f"no pending function call with id {command.call_id!r}")
        self._answered[command.call_id] = name
        try:
            value: object = json.loads(command.output)
        except (ValueError, RecursionError):
            value = command.output  # plain text output
        # FunctionResponse docs: "output" for the result, "error" for a failure.
        if type(value) is dict and set(value) == {"error"}:
            response: dict[str, object] = {"error": value["error"]}
        else:
            response = {"output": value}
        return [
            dumps({"toolResponse": {"functionResponses": [{"id": command.call_id, "name": name, "response": response}]}})
        ]

    def pending_messages(self) -> list[str]:
        """The greeting turn, once, after ``setupComplete``."""
        pending, self._pending = self._pending, []
        return pending

    def _text_turn(self, text: str, *, complete: bool = True) -> str:
        return _text_turn_message(text, complete=complete, realtime=self._config.text_as_realtime_input)

    # --------------------------------------------------------------- inbound

    def _parse_events(self, message: str | bytes) -> list[ProviderEvent]:
        if isinstance(message, bytes):  # Gemini sends its JSON in binary frames
            try:
                text = message.decode("utf-8")
            except UnicodeDecodeError:
                raise RemoteProtocolError(f"binary frame is not UTF-8 JSON: {message!r:.60}") from None
        else:
            text = message
        msg = load_object(text, tag=None)
        known = [key for key in _KNOWN_FIELDS if key in msg]
        if not known:
            self._transition(_I.SERVER_UNKNOWN, inbound=True)
            return [Unknown(next(iter(msg), ""), text)]
        if "setupComplete" in msg:
            self._transition(_I.SETUP_COMPLETE, inbound=True)
        else:
            self._transition(_I.SERVER_MESSAGE, inbound=True)
        events: list[ProviderEvent] = []
        for key in known:
            body = obj_field(msg, key, "message")
            handler = _HANDLERS.get(key)
            if handler is not None:
                events.extend(handler(self, body, text))
        return events or [Other(known[0], text)]

    # One handler per LiveServerMessage field; each returns zero or more events.

    def _on_setup_complete(self, body: JsonObject, raw: str) -> list[ProviderEvent]:
        self._session_id = optional_str_field(body, "sessionId", "setupComplete")
        if self._config.greeting:
            self._pending.append(self._text_turn(self._config.greeting))
        return [SessionReady(self._session_id)]

    def _on_resumption_update(self, body: JsonObject, raw: str) -> list[ProviderEvent]:
        handle = optional_str_field(body, "newHandle", "sessionResumptionUpdate")
        resumable = flag_field(body, "resumable", "sessionResumptionUpdate")
        usable = handle if resumable and handle else None
        if usable is not None:
            self._handle = usable
        self._handle_current = usable is not None
        return [ResumptionUpdate("sessionResumptionUpdate", raw, usable)]

    def _on_go_away(self, body: JsonObject, raw: str) -> list[ProviderEvent]:
        self._going_away = True
        return [GoAway("goAway", raw, optional_str_field(body, "timeLeft", "goAway"))]

    def _on_tool_call(self, body: JsonObject, raw: str) -> list[ProviderEvent]:
        events: list[ProviderEvent] = []
        for call in object_list_field(body, "functionCalls", "toolCall"):
            call_id = str_field(call, "id", "toolCall.functionCalls[]")
            name = str_field(call, "name", "toolCall.functionCalls[]")
            args = call.get("args")
            if args is None:
                args = {}
            if type(args) is not dict:
                raise RemoteProtocolError(f"toolCall: 'args' must be an object, got {args!r:.40}")
            if call_id in self._shared.seen:
                continue  # the same call again (in this message, re-sent, or after a resumption): run once
            self._shared.seen.add(call_id)
            self._shared.tool_names[call_id] = name
            self._handle_current = False
            events.append(ToolCall(call_id, name, json.dumps(args, ensure_ascii=False), self._turn))
        return events

    def _on_tool_cancellation(self, body: JsonObject, raw: str) -> list[ProviderEvent]:
        ids = body.get("ids")
        if type(ids) is not list or any(type(i) is not str for i in ids):
            raise RemoteProtocolError(f"toolCallCancellation: 'ids' must be a list of strings, got {ids!r:.40}")
        for call_id in ids:
            if self._shared.tool_names.pop(call_id, None) is not None:
                self._shared.cancelled.add(call_id)
        return [ToolCallsCancelled(tuple(ids), raw)]

    def _on_server_content(self, body: JsonObject, raw: str) -> list[ProviderEvent]:
        events: list[ProviderEvent] = []
        for role, key in (("user", "inputTranscription"), ("assistant", "outputTranscription")):
            if key in body:
                events.extend(self._transcription(role, obj_field(body, key, "serverContent")))
        if "modelTurn" in body:
            self._handle_current = False  # (the model said something the last handle does not hold)
            events.extend(self._model_turn(obj_field(body, "modelTurn", "serverContent")))
        if flag_field(body, "interrupted", "serverContent"):
            events.append(SpeechStarted(item_id=None, audio_start_ms=None))
            self._turn_interrupted = True
            events.extend(self._end_audio())
            self._turn_open = False  # later audio is a new turn
        if flag_field(body, "generationComplete", "serverContent"):
            events.extend(self._end_audio())
        if flag_field(body, "turnComplete", "serverContent"):
            events.extend(self._end_audio())
            events.extend(self._flush_transcript("assistant"))
            if self._turn is not None:
                reason = optional_str_field(body, "turnCompleteReason", "serverContent")
                if self._turn_interrupted:
                    events.append(ResponseDone(self._turn, "cancelled", reason or "interrupted"))
                else:
                    events.append(ResponseDone(self._turn, "completed", reason))
            self._end_turn()
        return events

    def _end_turn(self) -> None:
        self._early_turn = None  # (words of a turn that never had audio end with it, not in the next)
        self._turn = None
        self._turn_open = False
        self._turn_interrupted = False

    def _model_turn(self, content: JsonObject) -> list[ProviderEvent]:
        parts = content.get("parts", [])
        if type(parts) is not list:
            raise RemoteProtocolError(f"modelTurn: 'parts' must be a list, got {parts!r:.40}")
        audio = bytearray()
        for part in parts:
            if type(part) is not dict:
                raise RemoteProtocolError(f"modelTurn: a part must be an object, got {part!r:.40}")
            blob = part.get("inlineData")
            if blob is None:
                continue  # text (e.g. thoughts) or other parts: nothing to play
            if type(blob) is not dict:
                raise RemoteProtocolError(f"modelTurn: 'inlineData' must be an object, got {blob!r:.40}")
            mime = optional_str_field(blob, "mimeType", "inlineData") or ""
            if not mime.startswith("audio/pcm"):
                continue
            if "rate=" in mime and f"rate={OUTPUT_FORMAT.sample_rate_hz}" not in mime:
                raise RemoteProtocolError(f"model audio is {mime!r}; expected 24 kHz PCM")
            # Standard or URL-safe base64: protobuf's JSON mapping accepts both.
            audio += b64_field(blob, "data", "inlineData", urlsafe=True)
        if not audio:
            return []
        if len(audio) % 2:
            raise RemoteProtocolError("model audio has an odd number of bytes; PCM16 has two per sample")
        events: list[ProviderEvent] = []
        if not self._turn_open:
            events.extend(self._flush_transcript("user"))  # the caller's turn is over
            self._turn = self._early_turn or f"{TURN_ID_PREFIX}{next(self._shared.turn_numbers)}"
            self._early_turn = None
            self._turn_open = True
            self._turn_audio_done = False
            self._turn_interrupted = False
            events.append(ResponseStarted(self._turn))
        assert self._turn is not None
        self._turn_audio_done = False  # (audio after generationComplete: the turn's audio is done again later)
        events.append(AudioDelta(self._turn, bytes(audio), self._turn))
        return events

    def _end_audio(self) -> list[ProviderEvent]:
        if self._turn is None or self._turn_audio_done:
            return []
        self._turn_audio_done = True
        return [AudioDone(self._turn, self._turn)]

    def _item_of(self, role: str) -> str | None:
        if role != "user":
            if self._turn is None:
                # Words before the turn's first audio (transcription is not ordered with modelTurn): they get
                # the id the turn will have, so the turn's transcript is one, and a barge-in cut applies to it.
                if self._early_turn is None:
                    self._early_turn = f"{TURN_ID_PREFIX}{next(self._shared.turn_numbers)}"
                return self._early_turn
            return self._turn
        if self._utterance is None:
            self._utterance = f"{UTTERANCE_ID_PREFIX}{next(self._shared.utterance_numbers)}"
        return self._utterance

    def _transcription(self, role: str, body: JsonObject) -> list[ProviderEvent]:
        text = optional_str_field(body, "text", "transcription") or ""
        events: list[ProviderEvent] = []
        if text:
            self._transcripts[role].append(text)
            events.append(Transcript("user" if role == "user" else "assistant", text, False, self._item_of(role)))
        if flag_field(body, "finished", "transcription"):
            events.extend(self._flush_transcript(role))
        return events

    def _flush_transcript(self, role: str) -> list[ProviderEvent]:
        pieces = self._transcripts[role]
        if not pieces:
            return []
        text = "".join(pieces)
        pieces.clear()
        item = self._item_of(role)
        if role == "user":
            self._utterance = None  # the next words are a new utterance
        return [Transcript("user" if role == "user" else "assistant", text, True, item)]


_Handler = Callable[[GeminiLiveSession, JsonObject, str], list[ProviderEvent]]
_G = GeminiLiveSession

_HANDLERS: Final[Mapping[str, _Handler]] = MappingProxyType(
    {
        "setupComplete": _G._on_setup_complete,
        "sessionResumptionUpdate": _G._on_resumption_update,
        "goAway": _G._on_go_away,
        "toolCall": _G._on_tool_call,
        "toolCallCancellation": _G._on_tool_cancellation,
        "serverContent": _G._on_server_content,
        # usageMetadata, voiceActivity, voiceActivityDetectionSignal: no neutral meaning
    }
)


# ------------------------------------------------------------------- helpers


def _text_turn_message(text: str, *, complete: bool, realtime: bool) -> str:
    """A user text turn: ``clientContent`` (``turnComplete`` asks for an answer now), or ``realtimeInput.text``
    for a model that refuses ``clientContent`` mid-session (it then answers when its turn detection decides)."""
    if realtime:
        return dumps({"realtimeInput": {"text": text}})
    return dumps({"clientContent": _user_turn(text, complete=complete)})


def _user_turn(text: str, *, complete: bool = True) -> dict[str, object]:
    return {"turns": [{"role": "user", "parts": [{"text": text}]}], "turnComplete": complete}
