"""The Media Streams WebSocket served on our own socket: wsproto on a Trio stream, no ASGI.

Each call's Media Stream carries ~100 messages a second.  Served through
Hypercorn, every one of them is parsed in Hypercorn's connection task, put on
an ASGI receive channel and picked up by the call's task after a task
switch.  Here the call's own task reads the socket, wsproto parses the frames
and the message is returned inline; sends are framed here and go straight to
``send_all`` under a lock that does not yield when free (the machinery of
:class:`mediaserver.transport.ws_client.ClientWebSocket`, server side).

Behaviour is what :mod:`mediaserver.transport.twilio_ws` gives on the ASGI
path: :func:`serve_media_stream` checks ``X-Twilio-Signature`` with the same
:mod:`mediaserver.security` helpers (HTTP 403, or 400 for a malformed host
or scheme, instead of the upgrade), runs the handler with a
:class:`ServerStream`, logs an unexpected handler error, and closes with
1000 (or with the handler's :class:`~mediaserver.bridge.call.StreamEnd`:
1008 for a refused stream, 1011 for one that could not be served); a message over the size limit is refused with 1009; the peer going
away makes :meth:`ServerStream.receive` raise
:class:`~mediaserver.bridge.call.StreamClosed`.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.frame_protocol import CloseReason

from mediaserver import security
from mediaserver._native._wsframe import encode_b64_frame, encode_frame
from mediaserver.bridge.call import FAILED, MessageStream, StreamClosed, StreamEnd
from mediaserver.logs import shown
from mediaserver.transport.ws_client import ClientWebSocket, WebSocketClosed

__all__ = ["ServerStream", "parse_upgrade", "refusal", "serve_media_stream", "server_frame"]

log = logging.getLogger("mediaserver.http")

StreamHandler = Callable[[MessageStream], Awaitable[StreamEnd | None]]  # see CallManager.handle_stream

CLOSE_TIMEOUT_S = 2.0  # for the peer's close frame after ours
_REASONS = {400: b"Bad Request", 403: b"Forbidden"}


def server_frame(message: str | bytes) -> bytes:
    """One whole server message as an unmasked RFC 6455 frame (FIN, text or binary opcode)."""
    if isinstance(message, str):
        try:
            return encode_frame(True, message.encode())
        except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud83d" decoded): "?", not an end to the call
            return encode_frame(True, message.encode("utf-8", "replace"))
    return encode_frame(False, bytes(message))


class ServerStream(ClientWebSocket, MessageStream):
    """An accepted server-side WebSocket as the bridge's :class:`MessageStream`.

    ``receive`` returns whole text (or binary) messages and raises
    :class:`StreamClosed` once the connection is closed (close frame, TCP
    drop, protocol error, oversize message); ``send`` raises it after that.
    """

    def _frame(self, message: str | bytes) -> bytes:
        return server_frame(message)

    async def receive(self) -> str | bytes:
        messages = self._messages
        while not messages:  # (ClientWebSocket.receive, inlined: this runs for every frame of every call)
            if self.closed is not None:
                raise _stream_closed(self.closed, "Twilio closed the stream")
            await self._read()
        return messages.popleft()

    async def send(self, text: str | bytes) -> None:
        await self.send_many((text,))

    async def send_many(self, texts: Sequence[str | bytes]) -> None:
        """Several messages as one write: a chunk of audio and its mark cost one system call."""
        try:
            await super().send_many(texts)
        except WebSocketClosed as exc:
            raise _stream_closed(exc) from None

    def send_many_nowait(self, messages: Sequence[str | bytes]) -> bool:
        """As ClientWebSocket.send_many_nowait, raising :class:`StreamClosed`."""
        try:
            return super().send_many_nowait(messages)
        except WebSocketClosed as exc:
            raise _stream_closed(exc) from None

    def send_media_nowait(self, parts: Sequence[tuple[bytes, bytes, bytes, str]]) -> bool:
        """Downlink chunks and their marks (``TwilioStream.send_chunk``), all in one write, as ``send_many_nowait``
        would send ``(prefix + base64(payload) + suffix).decode()`` and ``then`` for each ``(prefix, payload,
        suffix, then)``, the media framed natively; an empty ``then`` (a withheld mark) is not sent."""
        if self._unsendable is not None:
            raise _stream_closed(self._unsendable)
        frames = []
        for prefix, payload, suffix, then in parts:
            frames.append(encode_b64_frame(prefix, payload, suffix, None))
            if then:
                frames.append(server_frame(then))
        try:
            return self._write_nowait(b"".join(frames))
        except WebSocketClosed as exc:
            raise _stream_closed(exc) from None

    async def flush(self) -> None:
        """As ClientWebSocket.flush, raising :class:`StreamClosed`."""
        try:
            await super().flush()
        except WebSocketClosed as exc:
            raise _stream_closed(exc) from None


def _stream_closed(exc: WebSocketClosed, closed: str = "the Twilio stream is closed") -> StreamClosed:
    if exc.violation:
        return StreamClosed(f"the Twilio stream broke the WebSocket protocol ({exc})", violation=True)
    return StreamClosed(f"{closed} (code {exc.code})")


def parse_upgrade(head: bytes) -> tuple[WSConnection, Request] | None:
    """wsproto's server handshake fed ``head`` (every byte read so far); None if it refuses the request.

    Nothing is sent yet: :func:`serve_media_stream` answers on the returned connection.
    """
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.receive_data(head)
        for event in ws.events():
            if isinstance(event, Request):
                return ws, event
    except Exception:  # wsproto's RemoteProtocolError, or h11's on a malformed head
        return None
    return None


def valid_websocket_key(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """One ``Sec-WebSocket-Key``, the base64 of 16 bytes (RFC 6455 4.2.1; wsproto takes any value)."""
    keys = [value for name, value in headers if name.lower() == b"sec-websocket-key"]
    if len(keys) != 1 or len(keys[0]) != 24:
        return False
    try:
        return len(base64.b64decode(keys[0], validate=True)) == 16
    except binascii.Error:
        return False


class _Headers:
    """Raw request headers as :class:`mediaserver.security.HeaderSource` (latin-1, like Quart)."""

    __slots__ = ("_items",)

    def __init__(self, raw: Iterable[tuple[bytes, bytes]]) -> None:
        self._items = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]

    def items(self) -> Iterable[tuple[str, str]]:
        return self._items

    def get(self, lower_name: str) -> str | None:
        for name, value in self._items:
            if name.lower() == lower_name:
                return value
        return None


def refusal(
    headers: Iterable[tuple[bytes, bytes]],
    target: bytes,
    *,
    auth_token: str | None,
    public_url: str | None,
    path: str,
    server_host: str,
    instance_url: str | None = None,
    scheme: str = "ws",
) -> int | None:
    """None if the upgrade may proceed, else the HTTP status to refuse it with (both upgrade routes).

    The signature may be for the public URL or for this instance's
    (``instance_url``).  ``target`` is the request target (path and query),
    ``scheme`` the request's (an ASGI scope may say ``wss``).
    """
    if not auth_token:
        return None
    source = _Headers(headers)
    host = source.get("host") or server_host
    _, _, query = target.partition(b"?")
    try:
        ok, url = security.signed_by_any(
            auth_token,
            security.signature_bases(public_url, instance_url),
            lambda base: security.upgrade_signature_url(
                path, configured=base, scheme=scheme, host=host, headers=source, query=query
            ),
            {},
            source.get(security.SIGNATURE_HEADER.lower()),
        )
    except ValueError:
        return 400
    if not ok:
        log.warning("media stream: bad or missing X-Twilio-Signature for %s; 403", shown(url, 200))
        return 403
    return None


async def serve_media_stream(
    stream: trio.abc.Stream,
    ws: WSConnection,
    status: int | None,
    handle_stream: StreamHandler,
    *,
    max_message_size: int,
    early: bytes = b"",
) -> None:
    """Answer the parsed upgrade on ``ws`` (refuse with ``status``, or accept) and run the call.

    ``early``: bytes read after the request head (frames a client sent
    without waiting for the 101); they are the stream's first bytes.  The
    caller owns ``stream`` and closes it afterwards.
    """
    if status is not None:
        body = _REASONS.get(status, b"Refused")
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        data = ws.send(RejectConnection(status_code=status, headers=headers, has_body=True))
        data += ws.send(RejectData(data=body))
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        return
    try:
        await stream.send_all(ws.send(AcceptConnection()))
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return
    conn = ServerStream(stream, ws, max_message_size)
    conn.read_first(early)
    end: StreamEnd | None = None
    try:
        end = await handle_stream(conn)
    except Exception:
        log.exception("media stream: the handler failed")
        end = StreamEnd(FAILED, "internal error")
    finally:
        # Also when cancelled (the drain deadline): say goodbye with 1000 (or why not), briefly.
        with trio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await conn.aclose(*(end or (CloseReason.NORMAL_CLOSURE, None)))
