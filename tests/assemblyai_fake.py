"""A fake AssemblyAI Voice Agent server on 127.0.0.1:0 that speaks the documented protocol.

AssemblyAI ships no schema for the Voice Agent protocol (the ``assemblyai``
SDK has none), so the client messages are checked against hand-written
strict schemas (:data:`CLIENT_SCHEMAS`: required keys, JSON types, literal
values, no unknown keys) written from the events reference and the message
sequence (reference/provider-side.md §3).  The fake also enforces the order
rules: ``session.update`` first, audio only after ``session.ready``, and
``tool.result`` only while a completed ``reply.done`` is the latest event it
sent (AssemblyAI's client-side tool timing rule).  Server events are built
by :class:`AssemblyAIFakeSession` helpers with the documented field shapes.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from tests._ws_server import FakeWsSession, SessionServer

__all__ = ["CLIENT_SCHEMAS", "AssemblyAIFakeSession", "FakeAssemblyAIServer", "validate_client_message"]


# ------------------------------------------------------------------ schemas


@dataclass(frozen=True)
class Literal_:
    values: tuple[object, ...]


@dataclass(frozen=True)
class ListOf:
    item: object


class Base64:
    """A base64 string (standard alphabet, padded)."""


Schema = Mapping[str, tuple[bool, object]]  # key -> (required, type | schema | Literal_ | ListOf | Base64)

_FORMAT: Schema = {
    "encoding": (True, Literal_(("audio/pcm", "audio/pcmu", "audio/pcma"))),
    "sample_rate": (False, int),
}
_TOOL: Schema = {
    "type": (True, Literal_(("function",))),
    "name": (True, str),
    "description": (True, str),
    "parameters": (True, dict),
}
_TURN_DETECTION: Schema = {
    "type": (False, Literal_(("server_vad", "semantic_vad"))),
    "vad_threshold": (False, float),
    "min_silence": (False, int),
    "max_silence": (False, int),
    "interrupt_response": (False, bool),
}
_SESSION: Schema = {
    "agent_id": (False, str),
    "system_prompt": (False, str),
    "greeting": (False, str),
    "input": (False, {"format": (False, _FORMAT), "turn_detection": (False, _TURN_DETECTION),
                      "keyterms": (False, ListOf(str))}),
    "output": (False, {"format": (False, _FORMAT), "voice": (False, str), "volume": (False, float)}),
    "tools": (False, ListOf(_TOOL)),
}
CLIENT_SCHEMAS: dict[str, Schema] = {
    "session.update": {"session": (True, _SESSION)},
    "session.resume": {"session_id": (True, str)},
    "input.audio": {"audio": (True, Base64)},
    "tool.result": {"call_id": (True, str), "result": (True, str), "is_error": (False, bool)},
    "reply.create": {"instructions": (False, str)},
    "session.end": {},
}


def _check(value: object, spec: object, path: str) -> None:
    if isinstance(spec, Mapping):
        assert isinstance(value, dict), f"{path}: expected an object, got {value!r:.60}"
        unknown = set(value) - set(spec)
        assert not unknown, f"{path}: unknown keys {sorted(unknown)}"
        for key, (required, sub) in spec.items():
            if key in value:
                _check(value[key], sub, f"{path}.{key}")
            else:
                assert not required, f"{path}: missing required key {key!r}"
    elif isinstance(spec, Literal_):
        assert value in spec.values, f"{path}: {value!r:.60} is not one of {spec.values}"
    elif isinstance(spec, ListOf):
        assert isinstance(value, list), f"{path}: expected a list, got {value!r:.60}"
        for index, item in enumerate(value):
            _check(item, spec.item, f"{path}[{index}]")
    elif spec is Base64:
        assert isinstance(value, str), f"{path}: expected a base64 string"
        try:
            base64.b64decode(value, validate=True)
        except binascii.Error:
            raise AssertionError(f"{path}: invalid base64 {value[:40]!r}") from None
    elif spec is float:
        assert type(value) in (int, float), f"{path}: expected a number, got {value!r:.60}"
    else:
        assert isinstance(spec, type)
        assert type(value) is spec, f"{path}: expected {spec.__name__}, got {value!r:.60}"


def validate_client_message(text: str | bytes) -> dict[str, Any]:
    """One client message: a JSON text frame matching the schema of its ``type`` exactly."""
    assert isinstance(text, str), "AssemblyAI takes JSON text frames only"
    data = json.loads(text)
    assert isinstance(data, dict), text[:80]
    type_ = data.get("type")
    schema = CLIENT_SCHEMAS.get(type_)  # type: ignore[arg-type]
    assert schema is not None, f"not an AssemblyAI client event type: {type_!r}"
    _check(data, {"type": (True, str), **schema}, type_)  # type: ignore[arg-type]
    return data


# ------------------------------------------------------------------ the fake


class AssemblyAIFakeSession(FakeWsSession):
    """One connection to :class:`FakeAssemblyAIServer`, from the server's side."""

    def __init__(self, server: FakeAssemblyAIServer, request: WebSocketRequest, ws: WebSocketConnection,
                 stream: trio.SocketStream) -> None:
        super().__init__(server, request, ws, stream)
        self.ready_delay_s = server.ready_delay_s
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.audio_chunks: list[bytes] = []
        self.session_update: dict[str, Any] | None = None
        self.tool_results: list[dict[str, Any]] = []
        self.ready = trio.Event()
        self.calls: dict[str, str | None] = {}  # call id -> reply id that made it
        self.last_sent: dict[str, Any] | None = None  # the latest server event
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery

    @property
    def audio_in(self) -> bytes:
        return b"".join(self.audio_chunks)

    def types(self) -> list[str]:
        return [m["type"] for _, m in self.received]

    async def send(self, event: dict[str, Any]) -> None:
        async with self._send_lock:
            self.last_sent = event
            await self.ws.send_message(json.dumps(event))

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await self.receive_until_closed(self._handle)
            nursery.cancel_scope.cancel()

    async def _ready(self) -> None:
        await trio.sleep(self.ready_delay_s)
        assert self.session_update is not None
        self.ready.set()  # before sending: the client may answer with audio at once
        session = self.session_update["session"]
        config = {
            "system_prompt": session.get("system_prompt", ""),
            "greeting": session.get("greeting"),
            "input": {"type": "audio", **session.get("input", {})},
            "output": {"type": "audio", "voice": session.get("output", {}).get("voice", "ivy"),
                       **session.get("output", {})},
            "tools": session.get("tools", []),
        }
        await self.send({"type": "session.ready", "session_id": "sess-fake-1", "expires_at": 1_900_000_000,
                         "config": config})
        self.touch()

    async def _handle(self, message: str | bytes) -> None:
        data = validate_client_message(message)
        self.received.append((trio.current_time(), data))
        type_ = data["type"]
        if type_ == "session.update":
            assert self.session_update is None, "session.update sent twice"
            assert not self.received[:-1], "session.update must be the first message"
            self.session_update = data
            self._nursery.start_soon(self._ready)
            return
        assert self.session_update is not None, f"{type_} before session.update"
        if type_ == "input.audio":
            assert self.ready.is_set(), "input.audio before session.ready"
            self.audio_chunks.append(base64.b64decode(data["audio"], validate=True))
        elif type_ == "tool.result":
            assert data["call_id"] in self.calls, f"tool.result for unknown call {data['call_id']!r}"
            last = self.last_sent or {}
            # The timing rule: only when a completed reply.done is the latest event.
            assert last.get("type") == "reply.done" and last.get("status") == "completed", (
                f"tool.result sent while the latest event was {last.get('type')!r} ({last.get('status')})"
            )
            del self.calls[data["call_id"]]
            self.tool_results.append(data)
        elif type_ == "session.end":  # the session ends now (and its billing), not after the 30 s resume window
            try:
                await self.send({"type": "session.ended", "session_duration_seconds": 1.0})
            except ConnectionClosed:  # (the client's close frame may have crossed it)
                pass

    # -- what a script can make the agent do -----------------------------------

    def new_reply_id(self) -> str:
        return f"reply-{next(self._ids)}"

    async def speech_started(self) -> None:
        await self.send({"type": "input.speech.started", "timestamp": trio.current_time()})

    async def speech_stopped(self) -> None:
        await self.send({"type": "input.speech.stopped", "timestamp": trio.current_time()})

    async def reply_started(self, reply_id: str) -> None:
        await self.send({"type": "reply.started", "reply_id": reply_id, "item_id": f"item-{reply_id}"})

    async def reply_audio(self, reply_id: str, data: bytes, *, chunk_bytes: int = 1600) -> None:
        for at in range(0, len(data), chunk_bytes):
            chunk = base64.b64encode(data[at : at + chunk_bytes]).decode("ascii")
            await self.send({"type": "reply.audio", "reply_id": reply_id, "data": chunk})

    async def reply_done(self, reply_id: str, status: str = "completed") -> None:
        await self.send({"type": "reply.done", "reply_id": reply_id, "status": status})

    async def reply(self, data: bytes, *, chunk_bytes: int = 1600, done: bool = True) -> str:
        """One reply: reply.started, its audio, reply.done (if ``done``); returns its id."""
        reply_id = self.new_reply_id()
        await self.reply_started(reply_id)
        await self.reply_audio(reply_id, data, chunk_bytes=chunk_bytes)
        if done:
            await self.reply_done(reply_id)
        return reply_id

    async def tool_call(self, call_id: str, name: str, arguments: dict[str, Any], reply_id: str | None = None) -> None:
        self.calls[call_id] = reply_id
        await self.send({"type": "tool.call", "call_id": call_id, "name": name, "arguments": arguments})

    async def transcript_agent(self, reply_id: str, text: str, *, interrupted: bool = False) -> None:
        await self.send({"type": "transcript.agent", "reply_id": reply_id, "item_id": f"item-{reply_id}",
                         "text": text, "interrupted": interrupted})

    async def session_error(self, code: str, message: str) -> None:
        await self.send({"type": "session.error", "code": code, "message": message, "session_id": "sess-fake-1"})


class FakeAssemblyAIServer(SessionServer[AssemblyAIFakeSession]):
    """An AssemblyAI Voice Agent endpoint; ``ready_delay_s`` delays ``session.ready``."""

    path = "/v1/ws"

    def __init__(
        self,
        script: Callable[[AssemblyAIFakeSession], Awaitable[None]] | None = None,
        *,
        ready_delay_s: float = 0.0,
    ) -> None:
        super().__init__(AssemblyAIFakeSession, script)  # type: ignore[arg-type]
        self.ready_delay_s = ready_delay_s
