"""A fake Gemini Live API server (``BidiGenerateContent``) on 127.0.0.1:0.

It speaks the protocol as the real service does, as far as the SDK tells us:

* every client message is validated with ``google.genai.types.LiveClientMessage``
  (``extra="forbid"`` all the way down, so an unknown or misspelt key fails
  the test) and must set exactly one field; the first must be ``setup``.
  ``LiveClientSetup`` in google-genai 3.4.0 has no ``realtimeInputConfig``
  although the API takes one, so that sub-object is validated separately
  with ``types.RealtimeInputConfig``;
* every server message is a ``types.LiveServerMessage`` built by the test and
  serialised with ``model_dump_json(by_alias=True, exclude_none=True)``.
  Pydantic writes ``bytes`` as URL-safe base64, but the service (protobuf's
  JSON mapping) writes standard base64, so ``inlineData.data`` is re-encoded;
  messages go out as *binary* frames holding UTF-8 JSON, as the service's
  do (the SDK reads them with ``recv(decode=False)``);
* ``setupComplete`` answers ``setup``; ``sessionResumption.handle`` must be
  one this server issued (else it closes with 1007, as observed in the wild);
* errors are close frames (``close(code, reason)``).

Each connection is a :class:`FakeGeminiSession`; a per-connection ``script``
coroutine drives the conversation (model audio, ``interrupted``, tool calls,
``goAway`` + ``sessionResumptionUpdate``, closing).
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from google.genai import types
from trio_websocket import WebSocketConnection, WebSocketRequest
from wsproto.frame_protocol import FrameProtocol

from tests._ws_server import FakeConnection, LoopbackWsServer, serve_session

__all__ = ["FakeGeminiServer", "FakeGeminiSession", "GeminiScript", "validate_client_message", "wire"]

OUTPUT_MIME = "audio/pcm;rate=24000"
INPUT_MIME = "audio/pcm;rate=16000"


def validate_client_message(text: str | bytes) -> types.LiveClientMessage:
    """One client message, validated with the SDK's types; exactly one field must be set."""
    assert isinstance(text, str), "we send JSON in text frames"
    raw = json.loads(text)
    assert isinstance(raw, dict) and len(raw) == 1, f"exactly one field per client message: {text[:120]}"
    setup = raw.get("setup")
    if isinstance(setup, dict) and "realtimeInputConfig" in setup:
        # Not a field of LiveClientSetup in google-genai 3.4.0; the API has it.
        types.RealtimeInputConfig.model_validate(setup.pop("realtimeInputConfig"))
    message = types.LiveClientMessage.model_validate(raw)
    set_fields = [name for name in type(message).model_fields if getattr(message, name) is not None]
    assert len(set_fields) == 1, set_fields
    return message


def _standard_base64(node: Any) -> None:
    """Re-encode every ``inlineData.data`` from URL-safe to standard base64, in place."""
    if isinstance(node, dict):
        blob = node.get("inlineData")
        if isinstance(blob, dict) and isinstance(blob.get("data"), str):
            blob["data"] = base64.b64encode(base64.urlsafe_b64decode(blob["data"])).decode("ascii")
        for value in node.values():
            _standard_base64(value)
    elif isinstance(node, list):
        for value in node:
            _standard_base64(value)


def wire(message: types.LiveServerMessage) -> bytes:
    """``message`` as the service sends it: UTF-8 JSON, camelCase, standard base64."""
    body = json.loads(message.model_dump_json(by_alias=True, exclude_none=True))
    _standard_base64(body)
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


class FakeGeminiSession(FakeConnection):
    """One connection to :class:`FakeGeminiServer`, from the server's side."""

    server: FakeGeminiServer

    def __init__(self, server: FakeGeminiServer, ws: WebSocketConnection, stream: trio.abc.Stream, number: int,
                 api_key: str | None) -> None:
        super().__init__(server, ws)
        self._stream = stream
        self.number = number
        self.path = ws.path
        self.api_key = api_key
        self.received: list[tuple[float, types.LiveClientMessage]] = []
        self.setup: types.LiveClientSetup | None = None
        self.audio_in = bytearray()  # decoded realtimeInput.audio payloads (PCM16 16 kHz), in order
        self.audio_messages = 0
        self.client_contents: list[types.LiveClientContent] = []
        self.tool_responses: list[types.LiveClientToolResponse] = []
        self.ready = trio.Event()  # setupComplete sent

    # -- helpers for scripts and tests ---------------------------------------

    @property
    def resumed_with(self) -> str | None:
        """The handle this connection's setup resumed, if any."""
        if self.setup is None or self.setup.session_resumption is None:
            return None
        return self.setup.session_resumption.handle

    async def wait_audio_ms(self, ms: int) -> None:
        await self.wait_for(lambda: len(self.audio_in) >= ms * 32)

    async def send(self, message: types.LiveServerMessage) -> None:
        await self.send_message(wire(message))

    async def model_audio(self, pcm24k: bytes, *, chunk_bytes: int = 4800, interval_s: float = 0.0) -> None:
        """Model audio (PCM16 24 kHz) in ``serverContent.modelTurn`` chunks."""
        for at in range(0, len(pcm24k), chunk_bytes):
            if at and interval_s:
                await trio.sleep(interval_s)
            part = types.Part(inline_data=types.Blob(data=pcm24k[at : at + chunk_bytes], mime_type=OUTPUT_MIME))
            await self.send(
                types.LiveServerMessage(
                    server_content=types.LiveServerContent(model_turn=types.Content(role="model", parts=[part]))
                )
            )

    async def content(self, **fields: Any) -> None:
        """A ``serverContent`` with these ``LiveServerContent`` fields (e.g. ``turn_complete=True``)."""
        await self.send(types.LiveServerMessage(server_content=types.LiveServerContent(**fields)))

    async def finish_turn(self) -> None:
        await self.content(generation_complete=True)
        await self.content(turn_complete=True)

    async def interrupted(self) -> None:
        await self.content(interrupted=True)

    async def tool_call(self, call_id: str, name: str, args: dict[str, Any]) -> None:
        await self.send(
            types.LiveServerMessage(
                tool_call=types.LiveServerToolCall(function_calls=[types.FunctionCall(id=call_id, name=name, args=args)])
            )
        )

    async def resumption_update(self, *, resumable: bool = True) -> str:
        """Issue a new resumption handle (remembered by the server); returns it."""
        handle = f"handle-{self.number}-{next(self.server._handles)}"
        self.server.issued_handles.add(handle)
        await self.send(
            types.LiveServerMessage(
                session_resumption_update=types.LiveServerSessionResumptionUpdate(
                    new_handle=handle, resumable=resumable
                )
            )
        )
        return handle

    async def go_away(self, time_left: str = "50s") -> None:
        await self.send(types.LiveServerMessage(go_away=types.LiveServerGoAway(time_left=time_left)))

    async def _send_together(self, burst: list[types.LiveServerMessage | tuple[int, str]]) -> None:
        """Messages, and maybe a close frame ``(code, reason)`` last, in one TCP write: the client reads them at once.

        Framed by wsproto (server frames, unmasked) straight onto the socket; after a close nothing more is sent.
        """
        frames = FrameProtocol(client=False, extensions=[])
        data = bytearray()
        for item in burst:
            if isinstance(item, tuple):
                data += frames.close(*item)
                break
            data += frames.send_data(wire(item), True)
        async with self._send_lock:
            await self._stream.send_all(bytes(data))
        if isinstance(burst[-1], tuple):
            await self.abort()  # (trio-websocket's side of the connection knows nothing of that close)

    async def abort(self) -> None:
        """Drop the TCP connection without a close handshake."""
        await trio.aclose_forcefully(self._stream)

    # -- the server side of the protocol -------------------------------------

    async def _run(self) -> None:
        await self.receive_until_closed(self._handle)

    async def _handle(self, text: str | bytes) -> None:
        message = validate_client_message(text)
        self.received.append((trio.current_time(), message))
        await self._answer(message)

    async def _answer(self, message: types.LiveClientMessage) -> None:
        if self.setup is None:
            assert message.setup is not None, "the first client message must be setup"
        if message.setup is not None:
            assert self.setup is None, "setup sent twice"
            self.setup = message.setup
            handle = self.resumed_with
            if handle is not None and handle not in self.server.issued_handles:
                await self.ws.aclose(1007, "Invalid session resumption handle")
                return
            if self.server.refuse_setup is not None:
                await self.ws.aclose(*self.server.refuse_setup)
                return
            if handle is not None and self.server.resume_delay_s:
                await trio.sleep(self.server.resume_delay_s)  # restoring a session takes a while
            if handle is not None and self.server.resume_gate is not None:
                await self.server.resume_gate.wait()  # (as long as the test wants)
            burst = self.server.after_setup(self) if self.server.after_setup is not None else []
            if burst:
                await self._send_together([types.LiveServerMessage(setup_complete=types.LiveServerSetupComplete()), *burst])
            else:
                await self.send(types.LiveServerMessage(setup_complete=types.LiveServerSetupComplete()))
            self.ready.set()
            return
        assert self.ready.is_set()
        if message.realtime_input is not None:
            blob = message.realtime_input.audio
            assert blob is not None and blob.data is not None, "only audio is sent"
            assert blob.mime_type == INPUT_MIME, blob.mime_type
            assert len(blob.data) % 2 == 0
            self.audio_in += blob.data
            self.audio_messages += 1
        elif message.client_content is not None:
            self.client_contents.append(message.client_content)
        elif message.tool_response is not None:
            for response in message.tool_response.function_responses or []:
                assert response.id, "the Gemini API requires the call id"
            self.tool_responses.append(message.tool_response)


GeminiScript = Callable[[FakeGeminiSession], Awaitable[None]]


class FakeGeminiServer(LoopbackWsServer):
    """A Gemini Live server on 127.0.0.1:0; ``script`` runs once per connection."""

    def __init__(
        self,
        script: GeminiScript | None = None,
        *,
        resume_delay_s: float = 0.0,
        refuse_setup: tuple[int, str] | None = None,
        after_setup: Callable[[FakeGeminiSession], list[types.LiveServerMessage | tuple[int, str]]] | None = None,
    ) -> None:
        super().__init__()
        self.script = script
        self.refuse_setup = refuse_setup  # close every connection with (code, reason) instead of setupComplete
        self.resume_delay_s = resume_delay_s  # before answering a resuming setup
        self.resume_gate: trio.Event | None = None  # set: a resuming setup is answered only once it is set
        # what to send in the same TCP write as a connection's setupComplete (a close: (code, reason)), e.g. the
        # service failing right after it accepted a resumed setup; [] for the usual setupComplete alone
        self.after_setup = after_setup
        self.sessions: list[FakeGeminiSession] = []
        self.issued_handles: set[str] = set()
        self._handles = itertools.count(1)

    @property
    def url(self) -> str:
        assert self.port is not None, "start the server first: await nursery.start(server.run)"
        return (
            f"ws://127.0.0.1:{self.port}/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent"
        )

    async def session(self, index: int = 0) -> FakeGeminiSession:
        """The ``index``-th connection (waits for it)."""
        await self.wait_for(lambda: len(self.sessions) > index)
        return self.sessions[index]

    async def _handle(self, request: WebSocketRequest, stream: trio.SocketStream) -> None:
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        ws = await request.accept()
        session = FakeGeminiSession(self, ws, stream, len(self.sessions) + 1, headers.get("x-goog-api-key"))
        self.sessions.append(session)
        self.touch()
        script = None if self.script is None else functools.partial(self.script, session)
        await serve_session(ws, session._run, script)
