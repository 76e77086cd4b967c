"""A fake ElevenLabs Agents server on 127.0.0.1:0, speaking the real wire protocol.

One TCP port serves both parts of the API, as ``api.elevenlabs.io`` does:

* ``GET /v1/convai/conversation/get-signed-url?agent_id=<id>`` with header
  ``xi-api-key`` (private agents) answers a
  ``ConversationSignedUrlResponseModel`` (SDK type) whose ``signed_url``
  points back at this server with a ``conversation_signature``;
* the WebSocket ``/v1/convai/conversation?agent_id=<id>`` (public agents, or
  the signed URL) runs one conversation per connection.

The protocol side follows the SDK's dict handling
(``elevenlabs/conversational_ai/conversation.py``), because the SDK has no
typed models for most events: the first client message must be
``conversation_initiation_client_data`` and validates against
``elevenlabs.types.ConversationInitiationClientDataRequestInput`` with no
unknown keys anywhere; every later client message must be exactly one of
``{"user_audio_chunk"}``, ``pong {event_id}``, ``user_message {text}`` or
``client_tool_result {tool_call_id, result, is_error}`` with the right JSON types.  Anything else
fails the test (the handler raises).  Server messages are the shapes the SDK
reads: ``conversation_initiation_metadata``, ``audio``, ``interruption``,
``ping``, ``client_tool_call``, ``agent_response``, ``agent_response_complete``.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio
from elevenlabs.types import ConversationInitiationClientDataRequestInput, ConversationSignedUrlResponseModel
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, wrap_server_stream

from tests._ws_server import FakeConnection, LoopbackServer, assert_no_extra, serve_session

__all__ = ["ElevenLabsConversation", "FakeElevenLabsServer", "validate_initiation"]

AGENT_PATH = "/v1/convai/conversation"
SIGNED_URL_PATH = AGENT_PATH + "/get-signed-url"


def validate_initiation(text: str | bytes) -> ConversationInitiationClientDataRequestInput:
    """The first client message, checked against the SDK's initiation type (no unknown keys)."""
    assert isinstance(text, str), "ElevenLabs takes text frames only"
    data = json.loads(text)
    assert data.pop("type", None) == "conversation_initiation_client_data", text[:200]
    model = ConversationInitiationClientDataRequestInput.model_validate(data)
    assert_no_extra(model)  # the SDK models allow extra keys; a typo would pass
    assert model.model_dump(mode="json", exclude_unset=True) == data, text[:200]
    return model


def _validate_later(text: str | bytes) -> dict[str, Any]:
    """Every later client message: exactly the SDK's shapes, nothing more."""
    assert isinstance(text, str), "ElevenLabs takes text frames only"
    msg = json.loads(text)
    assert type(msg) is dict, text[:80]
    if set(msg) == {"user_audio_chunk"}:
        assert type(msg["user_audio_chunk"]) is str
        base64.b64decode(msg["user_audio_chunk"], validate=True)
        return msg
    kind = msg.get("type")
    if kind == "pong":
        assert set(msg) == {"type", "event_id"} and type(msg["event_id"]) is int, text
    elif kind == "user_message":
        assert set(msg) == {"type", "text"} and type(msg["text"]) is str and msg["text"], text
    elif kind == "client_tool_result":
        assert set(msg) == {"type", "tool_call_id", "result", "is_error"}, text
        assert type(msg["tool_call_id"]) is str and msg["tool_call_id"], text
        assert type(msg["result"]) is str and type(msg["is_error"]) is bool, text
    else:
        raise AssertionError(f"unexpected client message {text[:120]}")
    return msg


class ElevenLabsConversation(FakeConnection):
    """One WebSocket conversation, from the server's side."""

    server: FakeElevenLabsServer

    def __init__(self, server: FakeElevenLabsServer, ws: WebSocketConnection, number: int) -> None:
        super().__init__(server, ws)
        self.number = number
        self.path = str(ws.path)
        self.query = parse_qs(urlsplit(self.path).query)
        self.initiation: ConversationInitiationClientDataRequestInput | None = None
        self.received: list[tuple[float, dict[str, Any]]] = []  # later messages, parsed
        self.chunks: list[bytes] = []  # decoded user_audio_chunk payloads, in order
        self._event_ids = itertools.count(1)

    @property
    def audio_in(self) -> bytes:
        return b"".join(self.chunks)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.received if m.get("type") == kind]

    async def send(self, message: dict[str, Any]) -> None:
        await self.send_message(json.dumps(message))

    def next_event_id(self) -> int:
        return next(self._event_ids)

    # -- server events, in the shapes the SDK reads --------------------------

    async def audio(self, chunk: bytes, event_id: int) -> None:
        await self.send(
            {"type": "audio", "audio_event": {"audio_base_64": base64.b64encode(chunk).decode("ascii"), "event_id": event_id}}
        )

    async def interruption(self, event_id: int) -> None:
        await self.send({"type": "interruption", "interruption_event": {"event_id": event_id}})

    async def ping(self, event_id: int, ping_ms: int | None = 40) -> None:
        await self.send({"type": "ping", "ping_event": {"event_id": event_id, "ping_ms": ping_ms}})

    async def agent_response(self, text: str) -> None:
        await self.send({"type": "agent_response", "agent_response_event": {"agent_response": text}})

    async def response_complete(self) -> None:
        """``agent_response_complete`` (in the SDK's ClientEvent list; payload unpublished, so bare)."""
        await self.send({"type": "agent_response_complete"})

    async def client_tool_call(self, tool_call_id: str, tool_name: str, parameters: dict[str, Any]) -> None:
        await self.send(
            {
                "type": "client_tool_call",
                "client_tool_call": {"tool_name": tool_name, "tool_call_id": tool_call_id, "parameters": parameters},
            }
        )

    # -- protocol loop ----------------------------------------------------------

    async def _run(self) -> None:
        try:
            first = await self.ws.get_message()
        except ConnectionClosed as exc:
            self.record_close(exc)
            return
        self.initiation = validate_initiation(first)
        await self.send(
            {
                "type": "conversation_initiation_metadata",
                "conversation_initiation_metadata_event": {
                    "conversation_id": f"conv_fake_{self.number}",
                    "agent_output_audio_format": self.server.output_format,
                    "user_input_audio_format": self.server.input_format,
                },
            }
        )
        self.touch()
        await self.receive_until_closed(self._handle)

    async def _handle(self, text: str | bytes) -> None:
        msg = _validate_later(text)
        self.received.append((trio.current_time(), msg))
        if "user_audio_chunk" in msg:
            self.chunks.append(base64.b64decode(msg["user_audio_chunk"]))


Script = Callable[[ElevenLabsConversation], Awaitable[None]]


class _Replay(trio.abc.Stream):
    """A stream whose first bytes were already read (to route the request): replays them."""

    def __init__(self, stream: trio.SocketStream, prefix: bytes) -> None:
        self._stream = stream
        self._prefix = prefix

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return data
        return bytes(await self._stream.receive_some(max_bytes))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._stream.aclose()


class FakeElevenLabsServer(LoopbackServer):
    """The fake API host; ``script`` runs once per conversation.

    ``input_format``/``output_format`` are what ``conversation_initiation_metadata``
    reports (the agent's settings); ``api_key`` is the ``xi-api-key`` the
    signed-URL endpoint accepts; ``private`` refuses conversations without a
    signature it issued (HTTP 403), as for an agent with authentication on.
    """

    def __init__(
        self,
        script: Script | None = None,
        *,
        agent_id: str = "agent_fake_0123",
        api_key: str = "xi-test-key",
        input_format: str = "ulaw_8000",
        output_format: str = "ulaw_8000",
        private: bool = False,
    ) -> None:
        super().__init__()
        self.script = script
        self.agent_id = agent_id
        self.api_key = api_key
        self.input_format = input_format
        self.output_format = output_format
        self.private = private  # conversations need a signature from get-signed-url
        self.conversations: list[ElevenLabsConversation] = []
        self.signed_url_requests: list[tuple[str, dict[str, str]]] = []  # (target, headers)
        self.signatures: set[str] = set()

    @property
    def url(self) -> str:
        """The agent WebSocket URL (``ELEVENLABS_AGENT_URL``)."""
        assert self.port is not None, "start the server first"
        return f"ws://127.0.0.1:{self.port}{AGENT_PATH}"

    async def conversation(self, index: int = 0) -> ElevenLabsConversation:
        await self.wait_for(lambda: len(self.conversations) > index)
        return self.conversations[index]

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        # Read the request head with h11 to route it, then replay the bytes
        # to trio-websocket for an upgrade.
        conn = h11.Connection(h11.SERVER)
        seen = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    return
                seen += data
                conn.receive_data(bytes(data))
                continue
            break
        assert isinstance(event, h11.Request), event
        headers = {k.decode().lower(): v.decode() for k, v in event.headers}
        target = event.target.decode()
        if headers.get("upgrade", "").lower() == "websocket":
            async with trio.open_nursery() as nursery:
                request = await wrap_server_stream(nursery, _Replay(stream, bytes(seen)))
                await self._conversation(request)
                nursery.cancel_scope.cancel()
            return
        await self._signed_url(conn, stream, event.method.decode(), target, headers)

    async def _signed_url(
        self, conn: h11.Connection, stream: trio.SocketStream, method: str, target: str, headers: dict[str, str]
    ) -> None:
        self.signed_url_requests.append((target, headers))
        self.touch()
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        if method != "GET" or parts.path != SIGNED_URL_PATH or query.get("agent_id") != [self.agent_id]:
            status, body = 404, b'{"detail": "not found"}'
        elif headers.get("xi-api-key") != self.api_key:
            status, body = 401, b'{"detail": {"status": "invalid_api_key"}}'
        else:
            signature = f"sig{len(self.signatures) + 1}"
            self.signatures.add(signature)
            answer = ConversationSignedUrlResponseModel(
                signed_url=f"{self.url}?agent_id={self.agent_id}&conversation_signature={signature}"
            )
            status, body = 200, answer.model_dump_json().encode()
        response = h11.Response(
            status_code=status, headers=[("content-type", "application/json"), ("content-length", str(len(body)))]
        )
        await stream.send_all(conn.send(response) + conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))
        await stream.aclose()

    async def _conversation(self, request: WebSocketRequest) -> None:
        query = parse_qs(urlsplit(request.path).query)
        signature = query.get("conversation_signature", [None])[0]
        needs_signature = self.private or signature is not None
        if query.get("agent_id") != [self.agent_id] or (needs_signature and signature not in self.signatures):
            await request.reject(403)
            return
        ws = await request.accept()
        conversation = ElevenLabsConversation(self, ws, len(self.conversations) + 1)
        self.conversations.append(conversation)
        self.touch()
        script = None if self.script is None else functools.partial(self.script, conversation)
        await serve_session(ws, conversation._run, script)
