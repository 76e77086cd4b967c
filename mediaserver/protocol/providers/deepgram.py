"""Sans-I/O core for one Deepgram Voice Agent session (µ-law 8 kHz passthrough).

Wire facts come from the ``deepgram-sdk`` agent types (``deepgram/agent/v1/types``)
and the Voice Agent docs (message flow, keep-alive, function calls, errors):

* Audio goes both ways as **binary** WebSocket frames of raw µ-law; JSON text
  frames are control messages, each with a ``type``.
* The server speaks first (``Welcome``); only then do we send ``Settings``;
  ``SettingsApplied`` confirms them and audio may flow.

States (:class:`DeepgramState`): ``NEW`` until ``initial_messages()`` (which
returns nothing: Settings must wait for Welcome); ``AWAITING_WELCOME``;
``AWAITING_APPLIED`` (Welcome seen, Settings queued for
:meth:`pending_messages`, which the transport sends right after receiving
Welcome); ``READY`` (SettingsApplied seen: :class:`SessionReady`); ``ERROR``.

Early audio.  The bridge may send caller audio before ``SettingsApplied``
(the caller starts talking while the agent is being configured).  Deepgram
must not get audio before Settings are applied, and dropping it would lose
the caller's first words, so the core *buffers* it: at most
``max_buffered_audio_ms`` (default 3 s; older audio is dropped first, so
what is kept is the most recent speech).  The buffer is released, in order,
by whichever comes first after ``SettingsApplied``: :meth:`pending_messages`
(called by the transport right after the message) or the next
:meth:`send` of audio, so buffered audio can never be overtaken.

Replies have no ids on the wire, so the core names them: ``dg-reply-<n>``,
a fresh name at every ``AgentStartedSpeaking``, after every
``AgentAudioDone`` and after every barge-in (``UserStartedSpeaking``).
Audio that arrives after a barge-in and before the next
``AgentStartedSpeaking`` is a new reply: the greeting comes without an
``AgentStartedSpeaking``, so the wire cannot tell such audio from the
interrupted reply's last frames, and the core plays it rather than risk
silencing a reply (Deepgram stops the interrupted reply itself).

The agent's ``ConversationText`` is the transcript of the reply it is
spoken in (its ``item_id``), so a barge-in's cut of that reply applies to
its text in the call record: the reply whose audio is arriving, or else
the next one, named by the text (the text may come before the reply's
``AgentStartedSpeaking`` and audio, which then keep that name).  Several
texts of one reply make one transcript, joined with spaces.

Each ``AgentStartedSpeaking`` is a :class:`ResponseStarted`, and the
response ends (:class:`ResponseDone`) at its ``AgentAudioDone``
(``completed``) or at a barge-in (``cancelled``, reason ``interrupted``),
so the bridge knows when the agent has finished talking (``end_call`` and
transfers wait for that).

Function calls.  ``FunctionCallRequest`` yields one :class:`ToolCall` per
``client_side`` function (server-side ones are the server's business: the
message is :class:`Other` when it has no client-side function).  A
:class:`ToolResult` becomes ``FunctionCallResponse {id, name, content}``;
a result for a call the server withdrew (``FunctionCallCancelled``) is
dropped -- the docs say never to answer those.

``Error`` is fatal (the server usually closes after it), ``Warning`` not.
Deepgram has no truncation or cancel message: :class:`Truncate` and
:class:`CancelResponse` return ``[]`` (the server stops talking by itself
when it hears the caller).  :class:`CreateResponse` has no Deepgram
equivalent and is refused.  :class:`SendText` (e.g. a keypad digit) becomes
``InjectUserMessage {content}``, which the agent always answers (dropped
before ``SettingsApplied``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from .._wire import (
    JsonObject,
    ProtocolEnum,
    dumps,
    load_object,
    object_list_field,
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
    ToolCall,
    ToolCallsCancelled,
    ToolResult,
    Transcript,
    Truncate,
    Unknown,
    WireMessage,
)

__all__ = ["DEFAULT_URL", "THINK_PROVIDERS", "DeepgramAgentConfig", "DeepgramAgentSession", "DeepgramState"]

DEFAULT_URL: Final = "wss://agent.deepgram.com/v1/agent/converse"
# The think provider types the SDK knows (union ThinkSettingsV1Provider): others may come, so not enforced.
THINK_PROVIDERS: Final = frozenset({"open_ai", "anthropic", "google", "groq", "aws_bedrock", "deepgram"})

_FORMAT: Final = AudioFormat("pcmu", 8000)
_KEEPALIVE: Final = '{"type":"KeepAlive"}'

# Server message types that carry no provider-neutral meaning (SDK union
# V1SocketClientResponse in deepgram/agent/v1/socket_client.py).
_OTHER_TYPES: Final = frozenset(
    {
        "AgentThinking",
        "FunctionCallResponse",  # a server-side function's result
        "PromptUpdated",
        "SpeakUpdated",
        "ThinkUpdated",
        "ListenUpdated",
        "ThinkLiveUpdated",
        "InjectionRefused",
        "History",
        "LatencyReport",
        "FrustrationDetected",
        "__customFromThinkProvider",  # SDK AgentV1CustomFromThinkProvider
    }
)


@dataclass(frozen=True, slots=True)
class DeepgramAgentConfig:
    """What goes into ``Settings``, plus the core's own limits.

    ``think_provider`` is the LLM provider ``type`` (``open_ai``,
    ``anthropic``, ``google``, ``groq``, ``aws_bedrock``, ``deepgram``).
    A ``listen_model`` starting with ``flux`` selects listen provider
    version ``v2`` (Flux), anything else ``v1``.
    """

    instructions: str
    listen_model: str = "nova-3"
    think_provider: str = "open_ai"
    think_model: str = "gpt-4o-mini"
    speak_model: str = "aura-2-thalia-en"
    greeting: str | None = None
    tools: tuple[FunctionTool, ...] = ()
    url: str = DEFAULT_URL
    keepalive_interval_s: float = 8.0
    max_buffered_audio_ms: int = 3000

    def __post_init__(self) -> None:
        for name in ("listen_model", "think_provider", "think_model", "speak_model"):
            if not getattr(self, name):
                raise LocalProtocolError(f"{name} must be non-empty")
        if not self.keepalive_interval_s > 0:
            raise LocalProtocolError(f"keepalive_interval_s must be positive, got {self.keepalive_interval_s}")
        if type(self.max_buffered_audio_ms) is not int or self.max_buffered_audio_ms < 0:
            raise LocalProtocolError(f"max_buffered_audio_ms must be a non-negative int, got {self.max_buffered_audio_ms!r}")

    def settings_message(self) -> dict[str, object]:
        """The ``Settings`` message as plain JSON values (validated by the tests with ``AgentV1Settings``)."""
        version = "v2" if self.listen_model.startswith("flux") else "v1"
        think: dict[str, object] = {
            "provider": {"type": self.think_provider, "model": self.think_model},
            "prompt": self.instructions,
        }
        if self.tools:
            # No ``endpoint``: the function is called client-side (SDK ThinkSettingsV1FunctionsItem).
            # An irreversible one (end_call, a transfer) waits for the caller's turn to be confirmed: Deepgram
            # otherwise dispatches calls speculatively and withdraws them if the caller goes on.
            think["functions"] = [
                {**tool.to_json(), "defer_until_eot": True} if tool.irreversible else tool.to_json() for tool in self.tools
            ]
        agent: dict[str, object] = {
            "listen": {"provider": {"type": "deepgram", "version": version, "model": self.listen_model}},
            "think": think,
            "speak": {"provider": {"type": "deepgram", "model": self.speak_model}},
        }
        if self.greeting:
            agent["greeting"] = self.greeting
        return {
            "type": "Settings",
            "audio": {
                "input": {"encoding": "mulaw", "sample_rate": 8000},
                "output": {"encoding": "mulaw", "sample_rate": 8000, "container": "none"},
            },
            "agent": agent,
        }


class DeepgramState(ProtocolEnum):
    NEW = "new"
    AWAITING_WELCOME = "awaiting_welcome"
    AWAITING_APPLIED = "awaiting_applied"
    READY = "ready"
    ERROR = "error"


class DeepgramAgentSession(ProviderCore[DeepgramState, DeepgramAgentConfig]):
    """One Deepgram Voice Agent session; implements ``ProviderSession``."""

    def __init__(self, config: DeepgramAgentConfig) -> None:
        new = DeepgramState.NEW
        super().__init__(config, new, DeepgramState.ERROR, new=new, input_format=_FORMAT, output_format=_FORMAT)
        self._pending: list[WireMessage] = []
        self._early_audio = EarlyAudio(config.max_buffered_audio_ms * _FORMAT.bytes_per_ms)
        self._request_id: str | None = None
        self._reply_numbers = itertools.count(1)
        self._reply: str | None = None  # the item id of the agent audio now arriving
        self._speaking: str | None = None  # the reply AgentStartedSpeaking began, until its AgentAudioDone or a barge-in
        self._text_reply: str | None = None  # a reply named by its text (ConversationText) before its audio or start
        self._said: tuple[str, str] | None = None  # (reply, the agent's ConversationText of it so far)
        self._calls: dict[str, str] = {}  # open client-side call id -> function name
        self._cancelled = RecentSet()  # withdrawn calls (a late result is dropped)

    # ------------------------------------------------------------------ state

    @property
    def buffered_audio_bytes(self) -> int:
        """Caller audio held until ``SettingsApplied``."""
        return self._early_audio.buffered_bytes

    @property
    def dropped_early_bytes(self) -> int:
        """Caller audio dropped because the pre-SettingsApplied buffer was full."""
        return self._early_audio.dropped_bytes

    # -------------------------------------------------------------- outbound

    def initial_messages(self) -> list[WireMessage]:
        """Nothing: Deepgram speaks first (``Welcome``); Settings follow via :meth:`pending_messages`."""
        self._begin(DeepgramState.AWAITING_WELCOME)
        return []

    def send(self, command: ProviderCommand) -> list[WireMessage]:
        """Wire messages for ``command``; audio before ``SettingsApplied`` is buffered (returns ``[]``)."""
        return self._guarded(self._send, command)

    def _send(self, command: ProviderCommand) -> list[WireMessage]:
        if self._state is DeepgramState.NEW:
            raise LocalProtocolError("command before initial_messages()")
        if type(command) is SendAudio:
            if self._state is not DeepgramState.READY:
                self._early_audio.push(command.payload)
                return []
            return [*self._early_audio.take(), command.payload]
        if type(command) is ToolResult:
            return self._tool_result(command)
        if type(command) in (Truncate, CancelResponse):
            return []  # Deepgram stops on its own when it hears the caller
        if type(command) is SendText:
            # InjectUserMessage (SDK AgentV1InjectUserMessage): the agent always answers it,
            # so ``respond`` cannot be honoured; before SettingsApplied there is no agent yet.
            if self._state is not DeepgramState.READY:
                return []
            return [dumps({"type": "InjectUserMessage", "content": command.text})]
        if type(command) is CreateResponse:
            raise LocalProtocolError("Deepgram Voice Agent has no way to ask for a response")
        raise LocalProtocolError(f"not a provider command: {command!r:.80}")

    def _tool_result(self, command: ToolResult) -> list[WireMessage]:
        call_id = command.call_id
        if call_id in self._cancelled:
            self._cancelled.discard(call_id)
            return []  # the server withdrew the call: never answer it
        name = self._calls.pop(call_id, None)
        if name is None:
            raise LocalProtocolError(f"no open client-side function call {call_id!r}")
        body = {"type": "FunctionCallResponse", "id": call_id, "name": name, "content": command.output}
        return [dumps(body)]

    def pending_messages(self) -> list[WireMessage]:
        """Settings once Welcome has arrived; buffered caller audio once Settings are applied."""
        self._check_alive()
        messages = self._pending
        self._pending = []
        if self._state is DeepgramState.READY and self._early_audio:
            messages.extend(self._early_audio.take())
        return messages

    @property
    def keepalive_interval_s(self) -> float | None:
        return self._config.keepalive_interval_s

    def keepalive(self) -> list[WireMessage]:
        """``KeepAlive`` once Settings have gone out (before that there is no session to keep)."""
        if self._state in (DeepgramState.AWAITING_APPLIED, DeepgramState.READY):
            return [_KEEPALIVE]
        return []

    # --------------------------------------------------------------- inbound

    def _parse_events(self, message: WireMessage) -> list[ProviderEvent]:
        if isinstance(message, bytes):
            if self._state is not DeepgramState.READY:
                raise RemoteProtocolError(f"agent audio in state {self._state.name}, before SettingsApplied")
            if self._reply is None:
                self._reply = self._new_reply()
            self._text_reply = None  # its audio has begun: an AgentStartedSpeaking from now on is a new reply
            return [AudioDelta(self._reply, message)]
        msg = load_object(message)
        type_ = msg["type"]
        handler = _HANDLERS.get(type_)
        if handler is not None:
            return handler(self, msg, message)
        if type_ in _OTHER_TYPES:
            return [Other(type_, message)]
        return [Unknown(type_, message)]

    def _new_reply(self) -> str:
        return f"dg-reply-{next(self._reply_numbers)}"

    def _expect(self, state: DeepgramState, type_: str) -> None:
        if self._state is not state:
            raise RemoteProtocolError(f"server sent {type_} in state {self._state.name}")

    def _on_welcome(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        self._expect(DeepgramState.AWAITING_WELCOME, "Welcome")
        request_id = msg.get("request_id")
        self._request_id = request_id if type(request_id) is str else None
        self._state = DeepgramState.AWAITING_APPLIED
        self._pending.append(dumps(self._config.settings_message()))
        return [Other("Welcome", raw)]

    def _on_settings_applied(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        self._expect(DeepgramState.AWAITING_APPLIED, "SettingsApplied")
        self._state = DeepgramState.READY
        return [SessionReady(self._request_id)]

    def _on_user_started_speaking(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        self._reply = self._text_reply = None  # anything after a barge-in is a new reply
        return [SpeechStarted(item_id=None, audio_start_ms=None), *self._response_done("cancelled", "interrupted")]

    def _on_agent_started_speaking(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        events = self._response_done("completed", None)  # (a response never said done: it is over now)
        # the reply its text already named (ConversationText came first), else a new one
        self._reply = self._speaking = self._text_reply or self._new_reply()
        self._text_reply = None
        events.append(ResponseStarted(self._reply))
        return events

    def _on_agent_audio_done(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        reply, self._reply, self._text_reply = self._reply, None, None
        events: list[ProviderEvent] = [Other("AgentAudioDone", raw) if reply is None else AudioDone(reply)]
        events += self._response_done("completed", None)
        return events

    def _response_done(self, status: str, reason: str | None) -> list[ProviderEvent]:
        """The end of the response AgentStartedSpeaking began, if one is open."""
        speaking, self._speaking = self._speaking, None
        return [] if speaking is None else [ResponseDone(speaking, status, reason)]

    def _on_conversation_text(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        role = msg.get("role")
        if role not in ("user", "assistant"):
            raise RemoteProtocolError(f"ConversationText: role must be user or assistant, got {role!r:.40}")
        content = text_field(msg, "content", "ConversationText")
        if role == "user":
            return [Transcript("user", content, True)]
        # The agent's words belong to the reply they are spoken in, so a barge-in's cut of that reply applies to
        # them: the reply now arriving, or else the next one (the text can come before its audio and its
        # AgentStartedSpeaking), named now.  One reply may bring several: the transcript is all of them so far.
        reply = self._reply
        if reply is None:
            reply = self._reply = self._text_reply = self._new_reply()
        said = self._said
        text = f"{said[1]} {content}" if said is not None and said[0] == reply else content
        self._said = (reply, text)
        return [Transcript("assistant", text, True, item_id=reply)]

    def _on_function_call_request(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        calls: list[ProviderEvent] = []
        for function in object_list_field(msg, "functions", "FunctionCallRequest"):
            call_id = str_field(function, "id", "FunctionCallRequest")
            name = str_field(function, "name", "FunctionCallRequest")
            arguments = function.get("arguments")
            client_side = function.get("client_side")
            if type(arguments) is not str or type(client_side) is not bool:
                raise RemoteProtocolError(
                    f"FunctionCallRequest: {call_id!r} needs string 'arguments' and bool 'client_side'"
                )
            if client_side:
                self._calls[call_id] = name
                calls.append(ToolCall(call_id=call_id, name=name, arguments=arguments))
        return calls or [Other("FunctionCallRequest", raw)]

    def _on_function_call_cancelled(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        ids = []
        for function in object_list_field(msg, "functions", "FunctionCallCancelled"):
            call_id = str_field(function, "id", "FunctionCallCancelled")
            ids.append(call_id)
            if self._calls.pop(call_id, None) is not None:
                self._cancelled.add(call_id)
        return [ToolCallsCancelled(tuple(ids), raw)]

    def _on_error(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        return [_problem(msg, fatal=True)]

    def _on_warning(self, msg: JsonObject, raw: str) -> list[ProviderEvent]:
        return [_problem(msg, fatal=False)]


_Handler = Callable[[DeepgramAgentSession, JsonObject, str], list[ProviderEvent]]
_D = DeepgramAgentSession
_HANDLERS: Final[Mapping[str, _Handler]] = MappingProxyType(
    {
        "Welcome": _D._on_welcome,
        "SettingsApplied": _D._on_settings_applied,
        "UserStartedSpeaking": _D._on_user_started_speaking,
        "AgentStartedSpeaking": _D._on_agent_started_speaking,
        "AgentAudioDone": _D._on_agent_audio_done,
        "ConversationText": _D._on_conversation_text,
        "FunctionCallRequest": _D._on_function_call_request,
        "FunctionCallCancelled": _D._on_function_call_cancelled,
        "Error": _D._on_error,
        "Warning": _D._on_warning,
    }
)

KNOWN_SERVER_TYPES: Final = frozenset(_HANDLERS) | _OTHER_TYPES
"""Every server message type this core knows (the tests compare it with the SDK)."""


# ------------------------------------------------------------------- helpers


def _problem(msg: JsonObject, *, fatal: bool) -> ProviderError:
    description = text_field(msg, "description", msg["type"])
    code = msg.get("code")
    return ProviderError(description, fatal=fatal, code=code if type(code) is str else None)
