"""A fake Deepgram Voice Agent server on 127.0.0.1:0 that speaks the real protocol.

Every JSON message the client sends is validated against the ``deepgram-sdk``
agent type for its ``type`` (``AgentV1Settings``, ``AgentV1KeepAlive``,
``AgentV1SendFunctionCallResponse``, ...) with ``model_validate``; the SDK
models accept unknown keys, so :func:`assert_no_extra` also rejects any key
the schema does not name, at every depth.  The protocol order is enforced
as the docs describe it: ``Welcome`` first (sent by the server), then one
``Settings``, then ``SettingsApplied``, and only then binary audio.
Every server message is an SDK model's JSON (``exclude_none``).

The server plumbing (accepting, per-connection script, bookkeeping) is
:class:`tests._ws_server.SessionServer`, shared with the other fakes.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pydantic
import trio
from deepgram.agent.v1.types import (
    AgentV1AgentAudioDone,
    AgentV1AgentStartedSpeaking,
    AgentV1ConversationText,
    AgentV1Error,
    AgentV1ForceEndTurn,
    AgentV1FunctionCallCancelled,
    AgentV1FunctionCallCancelledFunctionsItem,
    AgentV1FunctionCallRequest,
    AgentV1FunctionCallRequestFunctionsItem,
    AgentV1InjectAgentMessage,
    AgentV1InjectUserMessage,
    AgentV1KeepAlive,
    AgentV1SendFunctionCallResponse,
    AgentV1Settings,
    AgentV1SettingsApplied,
    AgentV1UpdatePrompt,
    AgentV1UpdateSpeak,
    AgentV1UpdateThink,
    AgentV1UserStartedSpeaking,
    AgentV1Warning,
    AgentV1Welcome,
)
from trio_websocket import WebSocketConnection, WebSocketRequest

from tests._ws_server import FakeWsSession, SessionServer, assert_no_extra

__all__ = ["CLIENT_MESSAGES", "DeepgramFakeSession", "FakeDeepgramServer", "assert_no_extra"]

# Client message type -> SDK model (deepgram/agent/v1/socket_client.py send_* methods).
CLIENT_MESSAGES: dict[str, type[pydantic.BaseModel]] = {
    "Settings": AgentV1Settings,
    "KeepAlive": AgentV1KeepAlive,
    "FunctionCallResponse": AgentV1SendFunctionCallResponse,
    "UpdatePrompt": AgentV1UpdatePrompt,
    "UpdateSpeak": AgentV1UpdateSpeak,
    "UpdateThink": AgentV1UpdateThink,
    "InjectUserMessage": AgentV1InjectUserMessage,
    "InjectAgentMessage": AgentV1InjectAgentMessage,
    "ForceEndTurn": AgentV1ForceEndTurn,
}


def validate_client_message(text: str) -> pydantic.BaseModel:
    """One JSON client message, validated with the SDK model for its type (no unknown keys)."""
    data = json.loads(text)
    assert isinstance(data, dict) and isinstance(data.get("type"), str), text[:120]
    model_type = CLIENT_MESSAGES.get(data["type"])
    assert model_type is not None, f"not a Deepgram client message type: {data['type']!r}"
    model = model_type.model_validate(data)
    assert_no_extra(model)
    # Nothing coerced or dropped on the way (e.g. "8000" for 8000).
    assert model.model_dump(mode="json", exclude_unset=True) == data, text[:200]
    return model


# ----------------------------------------------------------------- Deepgram


class DeepgramFakeSession(FakeWsSession):
    """One connection to :class:`FakeDeepgramServer`, from the server's side."""

    def __init__(self, server: FakeDeepgramServer, request: WebSocketRequest, ws: WebSocketConnection,
                 stream: trio.SocketStream) -> None:
        super().__init__(server, request, ws, stream)
        self.settings_delay_s = server.settings_delay_s
        self.received: list[tuple[float, pydantic.BaseModel | bytes]] = []
        self.audio_frames: list[bytes] = []
        self.settings: AgentV1Settings | None = None
        self.keepalives: list[float] = []
        self.function_responses: list[AgentV1SendFunctionCallResponse] = []
        self.ready = trio.Event()  # SettingsApplied sent
        self.requests: dict[str, str] = {}  # client-side call id -> name we asked for
        self.cancelled: set[str] = set()
        self._nursery: trio.Nursery

    @property
    def audio_in(self) -> bytes:
        return b"".join(self.audio_frames)

    def types(self) -> list[str]:
        return ["<audio>" if isinstance(m, bytes) else str(getattr(m, "type")) for _, m in self.received]

    async def send(self, model: pydantic.BaseModel) -> None:
        await self.send_text(model.model_dump_json(exclude_none=True))

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.send(AgentV1Welcome(type="Welcome", request_id="req-fake-1"))
            await self.receive_until_closed(self._handle)
            nursery.cancel_scope.cancel()

    async def _apply_settings(self) -> None:
        # Its own task, so that client messages keep being read (and checked) meanwhile.
        await trio.sleep(self.settings_delay_s)
        self.ready.set()  # before sending: the client may answer with audio at once
        await self.send(AgentV1SettingsApplied(type="SettingsApplied"))
        self.touch()

    async def _handle(self, message: str | bytes) -> None:
        now = trio.current_time()
        if isinstance(message, bytes):
            assert self.ready.is_set(), "audio sent before SettingsApplied"
            self.received.append((now, message))
            self.audio_frames.append(message)
            return
        model = validate_client_message(message)
        self.received.append((now, model))
        if isinstance(model, AgentV1Settings):
            assert self.settings is None, "Settings sent twice"
            self.settings = model
            self._nursery.start_soon(self._apply_settings)
            return
        assert self.settings is not None, f"{model.type} before Settings"  # type: ignore[attr-defined]
        if isinstance(model, AgentV1KeepAlive):
            self.keepalives.append(now)
        elif isinstance(model, AgentV1SendFunctionCallResponse):
            assert model.id in self.requests, f"response to an unknown or server-side call {model.id!r}"
            assert model.id not in self.cancelled, f"response to a cancelled call {model.id!r}"
            assert model.name == self.requests.pop(model.id), model
            self.function_responses.append(model)

    # -- what a script can make the agent do -----------------------------------

    async def user_started_speaking(self) -> None:
        await self.send(AgentV1UserStartedSpeaking(type="UserStartedSpeaking"))

    async def agent_started_speaking(self) -> None:
        await self.send(
            AgentV1AgentStartedSpeaking(
                type="AgentStartedSpeaking", total_latency=0.5, tts_latency=0.2, ttt_latency=0.3
            )
        )

    async def audio(self, data: bytes, *, chunk_bytes: int = 1600) -> None:
        for at in range(0, len(data), chunk_bytes):
            await self.send_message(data[at : at + chunk_bytes])

    async def agent_audio_done(self) -> None:
        await self.send(AgentV1AgentAudioDone(type="AgentAudioDone"))

    async def reply(self, data: bytes, *, chunk_bytes: int = 1600, done: bool = True) -> None:
        """One agent turn: AgentStartedSpeaking, the audio, AgentAudioDone (if ``done``)."""
        await self.agent_started_speaking()
        await self.audio(data, chunk_bytes=chunk_bytes)
        if done:
            await self.agent_audio_done()

    async def conversation_text(self, role: str, content: str) -> None:
        await self.send(AgentV1ConversationText(type="ConversationText", role=role, content=content))

    async def function_call_request(self, *calls: tuple[str, str, str, bool]) -> None:
        """``calls``: (id, name, arguments JSON, client_side)."""
        for call_id, name, _, client_side in calls:
            if client_side:
                self.requests[call_id] = name
        items = [
            AgentV1FunctionCallRequestFunctionsItem(id=i, name=n, arguments=a, client_side=c) for i, n, a, c in calls
        ]
        await self.send(AgentV1FunctionCallRequest(type="FunctionCallRequest", functions=items))

    async def function_call_cancelled(self, call_id: str) -> None:
        self.cancelled.add(call_id)
        item = AgentV1FunctionCallCancelledFunctionsItem(id=call_id, name=self.requests.get(call_id, "?"))
        await self.send(AgentV1FunctionCallCancelled(type="FunctionCallCancelled", functions=[item]))

    async def error(self, code: str, description: str) -> None:
        await self.send(AgentV1Error(type="Error", code=code, description=description))

    async def warning(self, code: str, description: str) -> None:
        await self.send(AgentV1Warning(type="Warning", code=code, description=description))


class FakeDeepgramServer(SessionServer[DeepgramFakeSession]):
    """A Deepgram Voice Agent endpoint; ``settings_delay_s`` delays ``SettingsApplied``."""

    path = "/v1/agent/converse"

    def __init__(
        self,
        script: Callable[[DeepgramFakeSession], Awaitable[None]] | None = None,
        *,
        settings_delay_s: float = 0.0,
    ) -> None:
        super().__init__(DeepgramFakeSession, script)  # type: ignore[arg-type]
        self.settings_delay_s = settings_delay_s
