"""The Media Streams WebSocket served straight on ASGI, next to the Quart app.

A new connection's upgrade never gets here: the server's own listener
serves it on the socket (:mod:`mediaserver.transport.listener`,
:mod:`mediaserver.transport.ws_server`).  This route serves an upgrade
that arrives on an HTTP connection Hypercorn already serves (kept alive
after an earlier request), with the same behaviour.

Every other route stays in Quart; this one carries ~100 messages a second
per call, and Quart's websocket machinery costs, per message, a receiver
task, a queue hop and a task switch on the way in and a signal dispatch on
the way out.  :class:`MediaStreamRoute` wraps the Quart ASGI app (Quart's
documented middleware hook, ``app.asgi_app = ...``) and serves
``websocket`` scopes for :data:`~mediaserver.security.MEDIA_STREAM_PATH`
with the server's own ASGI ``receive``/``send``.

Behaviour is what the Quart route did:

* with ``TWILIO_AUTH_TOKEN`` set, the upgrade must carry a valid
  ``X-Twilio-Signature`` (:mod:`mediaserver.security`), else HTTP 403
  (400 for a malformed host or scheme) is answered instead of the upgrade;
* after the accept, the call manager's ``handle_stream`` runs with an
  :class:`ASGIStream`; when it returns the socket is closed with 1000 (also
  after an unexpected error, which is logged);
* the peer going away makes :meth:`ASGIStream.receive` raise
  :class:`~mediaserver.bridge.call.StreamClosed`; oversize messages are
  refused by the server (Hypercorn's ``websocket_max_message_size``, close
  code 1009) before they reach us.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from mediaserver import security
from mediaserver.bridge.call import FAILED, MessageStream, StreamClosed, StreamEnd
from mediaserver.logs import shown
from mediaserver.transport.ws_server import refusal, valid_websocket_key

__all__ = ["ASGIStream", "MediaStreamRoute"]

log = logging.getLogger("mediaserver.http")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]  # Quart's asgi_app, typed by hypercorn.typing
StreamHandler = Callable[[MessageStream], Awaitable[StreamEnd | None]]  # see CallManager.handle_stream

_REASONS = {400: b"Bad Request", 403: b"Forbidden"}
# Close codes that say a WebSocket's bytes broke the protocol: framing (1002), not UTF-8 (1007), too big (1009)
VIOLATION_CODES = frozenset({1002, 1007, 1009})


class ASGIStream(MessageStream):
    """An accepted ASGI WebSocket as the bridge's :class:`MessageStream`.

    ``receive`` returns text (or bytes) messages as the server hands them
    over and raises :class:`StreamClosed` once the peer has disconnected;
    ``send`` raises it after that, too (the server would drop the message).
    """

    __slots__ = ("_receive", "_send", "closed")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.closed = False

    async def receive(self) -> str | bytes:
        if self.closed:
            raise StreamClosed("the Twilio stream is closed")
        while True:
            message = await self._receive()
            kind = message["type"]
            if kind == "websocket.receive":
                text: str | None = message.get("text")
                if text is not None:
                    return text
                data: bytes | None = message.get("bytes")
                if data is not None:
                    return data
            elif kind == "websocket.disconnect":
                self.closed = True
                code = message.get("code", 1005)
                if code in VIOLATION_CODES:  # (the server's verdict on the peer's bytes -- or the peer's on ours)
                    raise StreamClosed(f"the Twilio stream broke the WebSocket protocol (code {code})", violation=True)
                raise StreamClosed(f"Twilio closed the stream (code {code})")

    async def send(self, text: str) -> None:
        if self.closed:
            raise StreamClosed("the Twilio stream is closed")
        await self._send({"type": "websocket.send", "text": text})

    async def send_many(self, texts: Sequence[str]) -> None:
        for text in texts:
            await self.send(text)


class MediaStreamRoute:
    """ASGI middleware: the Media Streams WebSocket here, everything else to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        handle_stream: StreamHandler,
        *,
        auth_token: str | None,
        public_url: str | None,
        instance_url: str | None = None,
        path: str = security.MEDIA_STREAM_PATH,
    ) -> None:
        self.app = app
        self.handle_stream = handle_stream
        self.auth_token = auth_token
        self.public_url = public_url
        self.instance_url = instance_url
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The path as sent, not decoded: /media%2Dstream is not the Media Stream (our own listener, which serves
        # every Twilio stream, matches the bytes too), so it cannot be used to pick this route over that one.
        if scope["type"] == "websocket" and scope.get("raw_path", scope["path"].encode()) == self.path.encode():
            await self._serve(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return  # disconnected before the handshake
        status = self._check_signature(scope)
        if status is None and scope.get("http_version", "1.1") == "1.1" and not valid_websocket_key(scope["headers"]):
            log.warning("media stream: upgrade with a Sec-WebSocket-Key that is not the base64 of 16 bytes refused")
            status = 400  # (as on our own listener)
        if status is None and scope.get("http_version", "1.1") not in ("1.0", "1.1"):
            # An HTTP/2 WebSocket (RFC 8441, cleartext h2 on the plain port): Twilio's streams are HTTP/1.1, and
            # Hypercorn's h2 stream lets writes to a peer that opens no flow-control window pile up without
            # blocking, so a stuck caller would never be seen (calls and memory that never end).
            log.warning("media stream: upgrade over HTTP/%s refused (Twilio's streams are HTTP/1.1)", scope["http_version"])
            status = 400
        if status is None and any(name.lower() == b"sec-websocket-extensions" for name, _ in scope.get("headers", ())):
            # Hypercorn would negotiate permessage-deflate, and inflate each message before its size check: one
            # small frame could become hundreds of MB.  Our own listener (which serves every Twilio stream) never
            # negotiates an extension; here an upgrade that offers one is refused.
            log.warning("media stream: upgrade offering %s refused on this path", "Sec-WebSocket-Extensions")
            status = 400
        if status is not None:
            await _refuse(scope, send, status)
            return
        try:
            await send({"type": "websocket.accept"})
        except Exception as exc:  # (Hypercorn already refused the upgrade -- bytes sent after it in the same write,
            # say -- and its protocol state refuses our accept: one line, not a traceback a client can repeat)
            log.info("media stream: upgrade on a kept-alive connection not accepted: %s", shown(str(exc) or repr(exc), 200))
            return
        stream = ASGIStream(receive, send)
        end: StreamEnd | None = None
        try:
            end = await self.handle_stream(stream)
        except Exception:
            log.exception("media stream: the handler failed")
            end = StreamEnd(FAILED, "internal error")
        if not stream.closed:
            await send({"type": "websocket.close", "code": 1000} if end is None else
                       {"type": "websocket.close", "code": end.code, "reason": end.reason})  # fmt: skip

    def _check_signature(self, scope: Scope) -> int | None:
        """None if the upgrade may proceed, else the HTTP status to refuse it with (as on our own listener)."""
        server = scope.get("server")
        query = scope.get("query_string", b"")
        return refusal(
            scope["headers"],
            self.path.encode() + (b"?" + query if query else b""),
            auth_token=self.auth_token,
            public_url=self.public_url,
            instance_url=self.instance_url,
            path=self.path,
            server_host=f"{server[0]}:{server[1]}" if server else "",
            scheme=scope["scheme"],
        )


async def _refuse(scope: Scope, send: Send, status: int) -> None:
    """Answer the upgrade with an HTTP error instead of accepting it."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = _REASONS.get(status, b"Refused")
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:
        await send({"type": "websocket.close", "code": 1008})  # the server answers 403
