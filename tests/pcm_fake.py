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

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest

from tests._ws_server import FakeConnection, LoopbackWsServer, serve_session

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


class PcmModelSession(FakeConnection):
    """One connection to :class:`FakePcmModel`, from the model's side."""

    server: FakePcmModel

    def __init__(self, server: FakePcmModel, ws: WebSocketConnection, number: int) -> None:
        super().__init__(server, ws)
        self.number = number
        self.start: dict[str, Any] | None = None
        self.audio_in = bytearray()  # caller audio, PCM16 at the input rate
        self.frames_in = 0
        self.control: list[tuple[float, dict[str, Any]]] = []  # playback / tool_result messages
        self.reply = 1  # the reply our next audio belongs to (protocol numbering)
        self.reply_has_audio = False
        self.sent_audio: dict[int, int] = {}  # reply -> bytes sent
        self.started = trio.Event()

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

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.send_message(json.dumps(message))

    async def audio(self, pcm: bytes, *, frame_bytes: int = 1920, interval_s: float = 0.0) -> None:
        """Send ``pcm`` (output rate) in binary frames of ``frame_bytes``."""
        for at in range(0, len(pcm), frame_bytes):
            if at and interval_s:
                await trio.sleep(interval_s)
            frame = pcm[at : at + frame_bytes]
            await self.send_message(frame)
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

    async def _run(self) -> None:
        try:
            first = await self.ws.get_message()
            self.start = validate_start(first)
            if self.server.send_ready:
                await self.send_json({"type": "ready"})
        except ConnectionClosed as exc:
            self.record_close(exc)
            return
        self.started.set()
        self.touch()
        await self.receive_until_closed(self._handle)

    async def _handle(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            assert len(message) % 2 == 0, "audio frames carry whole PCM16 samples"
            self.audio_in += message
            self.frames_in += 1
        else:
            self.control.append((trio.current_time(), _validate_control(message)))


Script = Callable[[PcmModelSession], Awaitable[None]]


class FakePcmModel(LoopbackWsServer):
    """The model server; ``script`` runs once per connection (after ``start``).

    ``send_ready=False`` plays a model that never finishes the handshake.
    """

    def __init__(self, script: Script | None = None, *, send_ready: bool = True) -> None:
        super().__init__()
        self.script = script
        self.send_ready = send_ready
        self.sessions: list[PcmModelSession] = []

    @property
    def url(self) -> str:
        assert self.port is not None, "start the server first"
        return f"ws://127.0.0.1:{self.port}/model?token=not-logged"

    async def session(self, index: int = 0) -> PcmModelSession:
        """The ``index``-th connection (waits for it)."""
        await self.wait_for(lambda: len(self.sessions) > index)
        return self.sessions[index]

    async def _handle(self, request: WebSocketRequest, stream: trio.SocketStream) -> None:
        ws = await request.accept()
        session = PcmModelSession(self, ws, len(self.sessions) + 1)
        self.sessions.append(session)
        self.touch()

        async def run_script() -> None:
            await session.started.wait()
            if self.script is not None:
                await self.script(session)

        await serve_session(ws, session._run, run_script)
