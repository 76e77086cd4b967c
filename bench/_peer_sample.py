"""The load bench's peer: the design of Twilio's official Python speech-assistant sample.

``bench/load.py`` runs this as a subprocess next to our server and drives it
with the same simulated callers and the same fake OpenAI model, so the two
servers' CPU per call is compared in one run.  It is our own minimal
re-implementation of the design of Twilio's "speech-assistant-openai-
realtime-api-python" sample (no code of the sample is copied), with the same
work per message:

* FastAPI on uvicorn (``uvicorn.run`` with its defaults: asyncio loop, the
  pure-Python HTTP parser, the ``websockets`` WebSocket implementation
  uvicorn picks), ``POST /incoming-call`` answers TwiML built with the
  ``twilio`` library: ``<Connect><Stream url=".../media-stream">``;
* ``WS /media-stream`` accepts Twilio, then opens the OpenAI Realtime
  WebSocket with the ``websockets`` client and sends ``session.update``
  (``audio/pcmu`` both ways, server VAD);
* two coroutines under ``asyncio.gather``: every Twilio message is
  ``json.loads``-ed, each ``media`` payload is forwarded as
  ``input_audio_buffer.append`` (``json.dumps``); every model message is
  ``json.loads``-ed, each ``response.output_audio.delta`` is base64-decoded
  and re-encoded and sent to Twilio as ``media`` (Starlette's ``send_json``)
  followed by a ``mark``; ``input_audio_buffer.speech_started`` sends
  ``conversation.item.truncate`` (audio_end_ms from the media timestamps)
  and ``clear``; mark echoes pop the mark queue.

Differences, all in the peer's favour or needed by the bench: no ``print``
logging (the sample prints each call and several model events); the
stream URL keeps the Host header's port and uses ``ws://`` on plain HTTP
(the bench has no TLS); on Twilio's ``stop`` or hang-up the model socket is
closed (the published sample reads Twilio with Starlette's ``iter_text``,
which swallows the disconnect, so its model socket stays open until the
model next sends something: a leak we do not reproduce); and ``GET
/healthz`` reports the live calls so the bench knows when a step is over.

Run: ``python bench/_peer_sample.py --host 127.0.0.1 --port 5050`` with
``OPENAI_API_KEY`` and ``OPENAI_REALTIME_URL`` (default
``wss://api.openai.com/v1/realtime``) in the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import uvicorn
import websockets
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from twilio.twiml.voice_response import Connect, VoiceResponse  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection
from websockets.protocol import State

__all__ = [
    "MODEL",
    "audio_append",
    "create_app",
    "incoming_call_twiml",
    "item_truncate",
    "session_update",
    "twilio_clear",
    "twilio_mark",
    "twilio_media",
]

MODEL = "gpt-realtime"
INSTRUCTIONS = "You are a friendly phone assistant. Keep your answers short."
MARK_NAME = "responsePart"


# --- wire messages -------------------------------------------------------------------


def session_update() -> str:
    """The GA ``session.update`` the sample sends first: µ-law both ways, server VAD, audio out."""
    session = {
        "type": "realtime",
        "model": MODEL,
        "output_modalities": ["audio"],
        "audio": {
            "input": {"format": {"type": "audio/pcmu"}, "turn_detection": {"type": "server_vad"}},
            "output": {"format": {"type": "audio/pcmu"}},
        },
        "instructions": INSTRUCTIONS,
    }
    return json.dumps({"type": "session.update", "session": session})


def audio_append(payload_b64: str) -> str:
    """``input_audio_buffer.append`` carrying a Twilio media payload as it came (base64 µ-law)."""
    return json.dumps({"type": "input_audio_buffer.append", "audio": payload_b64})


def item_truncate(item_id: str, audio_end_ms: int) -> str:
    """``conversation.item.truncate``: the caller heard ``audio_end_ms`` of the item before barging in."""
    return json.dumps(
        {"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": audio_end_ms}
    )


def twilio_media(stream_sid: str, payload_b64: str) -> dict[str, Any]:
    """An outbound Media Streams ``media`` message (sent with ``send_json``, as the sample does)."""
    return {"event": "media", "streamSid": stream_sid, "media": {"payload": payload_b64}}


def twilio_mark(stream_sid: str, name: str = MARK_NAME) -> dict[str, Any]:
    return {"event": "mark", "streamSid": stream_sid, "mark": {"name": name}}


def twilio_clear(stream_sid: str) -> dict[str, Any]:
    return {"event": "clear", "streamSid": stream_sid}


def incoming_call_twiml(stream_url: str) -> str:
    """The voice webhook's answer: connect the call to a bidirectional Media Stream."""
    response = VoiceResponse()
    connect = Connect()
    connect.stream(url=stream_url)
    response.append(connect)
    return str(response)


# --- the app --------------------------------------------------------------------------


@dataclasses.dataclass
class _Call:
    """One call's state, as the sample keeps it (closure variables there)."""

    stream_sid: str | None = None
    latest_media_ms: int = 0  # timestamp of the caller's latest media frame
    assistant_item: str | None = None  # the reply being played
    item_start_ms: int | None = None  # latest_media_ms when that reply's first delta went out
    marks: list[str] = dataclasses.field(default_factory=list)


def create_app(model_url: str, api_key: str) -> FastAPI:
    """The FastAPI app: webhook, media stream, and a health check reporting live calls."""
    app = FastAPI()
    live = {"calls": 0}

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok", "active_calls": live["calls"], "pending_calls": 0})

    @app.api_route("/incoming-call", methods=["GET", "POST"])
    async def incoming_call(request: Request) -> Response:
        scheme = "wss" if request.url.scheme == "https" else "ws"
        host = request.headers.get("host", request.url.netloc)
        return Response(content=incoming_call_twiml(f"{scheme}://{host}/media-stream"), media_type="application/xml")

    @app.websocket("/media-stream")
    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        live["calls"] += 1
        try:
            headers = {"Authorization": f"Bearer {api_key}"}
            async with websockets.connect(f"{model_url}?model={MODEL}", additional_headers=headers) as model:
                await model.send(session_update())
                call = _Call()
                await asyncio.gather(_from_twilio(websocket, model, call), _to_twilio(websocket, model, call))
        finally:
            live["calls"] -= 1

    return app


async def _from_twilio(websocket: WebSocket, model: ClientConnection, call: _Call) -> None:
    """Twilio -> model: forward media, note marks played; close the model socket when the call ends."""
    async for text in websocket.iter_text():
        data = json.loads(text)
        event = data["event"]
        if event == "media":
            if model.state is State.OPEN:
                call.latest_media_ms = int(data["media"]["timestamp"])
                await model.send(audio_append(data["media"]["payload"]))
        elif event == "start":
            call.stream_sid = data["start"]["streamSid"]
            call.latest_media_ms, call.assistant_item, call.item_start_ms = 0, None, None
        elif event == "mark":
            if call.marks:
                call.marks.pop(0)
        elif event == "stop":
            break
    await model.close()


async def _to_twilio(websocket: WebSocket, model: ClientConnection, call: _Call) -> None:
    """Model -> Twilio: each audio delta as ``media`` then a ``mark``; barge-in as truncate + ``clear``."""
    try:
        async for message in model:
            data = json.loads(message)
            kind = data.get("type")
            if kind == "response.output_audio.delta" and "delta" in data and call.stream_sid is not None:
                payload = base64.b64encode(base64.b64decode(data["delta"])).decode("utf-8")
                await websocket.send_json(twilio_media(call.stream_sid, payload))
                item_id = data.get("item_id")
                if item_id and item_id != call.assistant_item:
                    call.assistant_item, call.item_start_ms = item_id, call.latest_media_ms
                await websocket.send_json(twilio_mark(call.stream_sid))
                call.marks.append(MARK_NAME)
            elif kind == "input_audio_buffer.speech_started" and call.assistant_item is not None:
                await _barge_in(websocket, model, call)
    except (websockets.ConnectionClosed, WebSocketDisconnect, RuntimeError, OSError):
        pass  # one side hung up: the call is over (the sample swallows every exception here)


async def _barge_in(websocket: WebSocket, model: ClientConnection, call: _Call) -> None:
    """The caller spoke over a reply: truncate it at what was heard, drop Twilio's buffered audio."""
    if not call.marks or call.item_start_ms is None or call.stream_sid is None:
        return
    if call.assistant_item is not None:
        await model.send(item_truncate(call.assistant_item, call.latest_media_ms - call.item_start_ms))
    await websocket.send_json(twilio_clear(call.stream_sid))
    call.marks.clear()
    call.assistant_item, call.item_start_ms = None, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=5050, help="port to listen on (default 5050)")
    args = parser.parse_args(argv)
    api_key = os.environ.get("OPENAI_API_KEY", "")
    if not api_key:
        parser.error("OPENAI_API_KEY is not set")
    model_url = os.environ.get("OPENAI_REALTIME_URL", "wss://api.openai.com/v1/realtime")
    uvicorn.run(create_app(model_url, api_key), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
