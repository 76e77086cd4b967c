"""A fake self-hosted model speaking the generic ``pcm`` protocol (docs/pcm-protocol.md).

A trio-websocket server on 127.0.0.1:0.  Per connection it checks the
protocol strictly, as a careful model implementation would: the first
message must be a text ``start`` of version 1 with exactly the documented
fields and types; later text messages must be ``playback``
(``reply``, ``heard_ms``), ``tool_result`` (``call_id``, ``output``) or
``text`` (``text``, ``respond``) with exactly those fields; binary frames
must be whole PCM16 samples.  A violation fails the test (the handler
raises).  A per-connection ``script`` drives the model's side with
:class:`PcmModelSession` (audio, replies, barge-in, tool calls).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, wrap_server_stream

__all__ = ["FakePcmModel", "PcmModelSession", "validate_start"]

_RATES = (8000, 16000, 24000)


def _check_format(value: Any, where: str) -> int:
    assert type(value) is dict and set(value) == {"encoding", "sample_rate", "channels"}, f"{where}: {value!r}"
    assert value["encoding"] == "pcm16" and value["channels"] == 1, f"{where}: {value!r}"
    assert value["sample_rate"] in _RATES, f"{where}: {value!r}"
    rate: int = value["sample_rate"]
    return rate


def validate_start(text: str | bytes) -> dict[str, Any]:
    """The ``start`` message, exactly as docs/pcm-protocol.md specifies it."""
    assert isinstance(text, str), "start must be a text frame"
    start = json.loads(text)
    assert type(start) is dict, text
    required = {"type", "version", "input", "output"}
    optional = {"instructions", "greeting", "tools", "call"}
    assert required <= set(start) <= required | optional, f"fields {sorted(start)}"
    assert start["type"] == "start" and start["version"] == 1, text
    _check_format(start["input"], "input")
    _check_format(start["output"], "output")
    for key in ("instructions", "greeting"):
        assert key not in start or type(start[key]) is str, key
    for tool in start.get("tools", []):
        assert set(tool) == {"name", "description", "parameters"} and type(tool["parameters"]) is dict, tool
    assert "call" not in start or all(type(v) is str for v in start["call"].values())
    return start


def _validate_control(text: str | bytes) -> dict[str, Any]:
    assert isinstance(text, str), "control messages are text frames"
    msg = json.loads(text)
    assert type(msg) is dict, text
    if msg.get("type") == "playback":
        assert set(msg) == {"type", "reply", "heard_ms"}, text
        assert type(msg["reply"]) is int and msg["reply"] >= 1, text
        assert type(msg["heard_ms"]) is int and msg["heard_ms"] >= 0, text
    elif msg.get("type") == "text":
        assert set(msg) == {"type", "text", "respond"}, text
        assert type(msg["text"]) is str and msg["text"] and type(msg["respond"]) is bool, text
    elif msg.get("type") == "tool_result":
        assert set(msg) == {"type", "call_id", "output"}, text
        assert type(msg["call_id"]) is str and type(msg["output"]) is str, text
    else:
        raise AssertionError(f"unexpected client message {text[:120]}")
    return msg


class PcmModelSession:
    """One connection to :class:`FakePcmModel`, from the model's side."""

    def __init__(self, server: FakePcmModel, ws: WebSocketConnection, number: int) -> None:
        self.server = server
        self.ws = ws
        self.number = number
        self.start: dict[str, Any] | None = None
        self.audio_in = bytearray()  # caller audio, PCM16 at the input rate
        self.frames_in = 0
        self.control: list[tuple[float, dict[str, Any]]] = []  # playback / tool_result messages
        self.reply = 1  # the reply our next audio belongs to (protocol numbering)
        self.reply_has_audio = False
        self.sent_audio: dict[int, int] = {}  # reply -> bytes sent
        self.started = trio.Event()
        self.closed = trio.Event()
        self.closed_at_s: float | None = None
        self.close_code: int | None = None
        self._changed = trio.Event()
        self._send_lock = trio.StrictFIFOLock()

    @property
    def input_rate(self) -> int:
        assert self.start is not None
        rate: int = self.start["input"]["sample_rate"]
        return rate

    @property
    def output_rate(self) -> int:
        assert self.start is not None
        rate: int = self.start["output"]["sample_rate"]
        return rate

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for _, m in self.control if m["type"] == kind]

    async def wait_for(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()
        self.server._touch()

    async def send_json(self, message: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_message(json.dumps(message))

    async def audio(self, pcm: bytes, *, frame_bytes: int = 1920, interval_s: float = 0.0) -> None:
        """Send ``pcm`` (output rate) in binary frames of ``frame_bytes``."""
        for at in range(0, len(pcm), frame_bytes):
            if at and interval_s:
                await trio.sleep(interval_s)
            frame = pcm[at : at + frame_bytes]
            async with self._send_lock:
                await self.ws.send_message(frame)
            self.reply_has_audio = True
            self.sent_audio[self.reply] = self.sent_audio.get(self.reply, 0) + len(frame)

    def _end_reply(self) -> None:
        if self.reply_has_audio:
            self.reply += 1
            self.reply_has_audio = False

    async def reply_done(self) -> None:
        await self.send_json({"type": "reply_done"})
        self._end_reply()

    async def speech_started(self) -> None:
        await self.send_json({"type": "speech_started"})
        self._end_reply()

    async def clear(self) -> None:
        await self.send_json({"type": "clear"})
        self._end_reply()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        await self.ws.aclose(code, reason)

    async def _run(self) -> None:
        try:
            first = await self.ws.get_message()
            self.start = validate_start(first)
            if self.server.send_ready:
                await self.send_json({"type": "ready"})
            self.started.set()
            self._touch()
            while True:
                message = await self.ws.get_message()
                if isinstance(message, bytes):
                    assert len(message) % 2 == 0, "audio frames carry whole PCM16 samples"
                    self.audio_in += message
                    self.frames_in += 1
                else:
                    self.control.append((trio.current_time(), _validate_control(message)))
                self._touch()
        except ConnectionClosed as exc:
            self.closed_at_s = trio.current_time()
            self.close_code = None if exc.reason is None else exc.reason.code
            self.closed.set()
            self._touch()


Script = Callable[[PcmModelSession], Awaitable[None]]


class FakePcmModel:
    """The model server; ``script`` runs once per connection (after ``start``).

    ``send_ready=False`` plays a model that never finishes the handshake.
    """

    def __init__(self, script: Script | None = None, *, send_ready: bool = True) -> None:
        self.script = script
        self.send_ready = send_ready
        self.sessions: list[PcmModelSession] = []
        self.port: int | None = None
        self._changed = trio.Event()

    @property
    def url(self) -> str:
        assert self.port is not None, "start the server first"
        return f"ws://127.0.0.1:{self.port}/model?token=not-logged"

    async def run(self, *, task_status: trio.TaskStatus[FakePcmModel] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(functools.partial(trio.serve_tcp, self._serve_connection, 0, host="127.0.0.1"))
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started(self)

    def _touch(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def session(self, index: int = 0) -> PcmModelSession:
        while len(self.sessions) <= index:
            await self._changed.wait()
        return self.sessions[index]

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        async with trio.open_nursery() as nursery:
            request = await wrap_server_stream(nursery, stream)
            await self._handle(request)
            nursery.cancel_scope.cancel()

    async def _handle(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        session = PcmModelSession(self, ws, len(self.sessions) + 1)
        self.sessions.append(session)
        self._touch()
        try:
            async with trio.open_nursery() as nursery:

                async def serve_protocol() -> None:
                    await session._run()
                    nursery.cancel_scope.cancel()

                async def run_script() -> None:
                    await session.started.wait()
                    if self.script is not None:
                        await self.script(session)

                nursery.start_soon(serve_protocol)
                nursery.start_soon(run_script)
        finally:
            with trio.move_on_after(1):
                await ws.aclose()
