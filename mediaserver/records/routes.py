"""``GET /calls/<sid>``: one call record as JSON, for holders of the API key.

Authorization is ``Authorization: Bearer <MEDIASERVER_API_KEY>``, compared in
constant time.  Answers:

* 200 -- the record (a live call: its state so far, ``status`` ``in-progress``);
* 401 -- no or a wrong key (with ``WWW-Authenticate: Bearer``);
* 404 -- no such call, **or no API key is configured**: without a key the
  route is off, exactly as if it did not exist (never open to anyone);
* 503 -- call records are off (the database could not be opened at start).
"""

from __future__ import annotations

import hmac
import logging

from quart import Response, request
from quart_trio import QuartTrio

from mediaserver.config import Settings
from mediaserver.logs import shown

from .recorder import Recorder

__all__ = ["register_routes"]

log = logging.getLogger("mediaserver.http")

MAX_SID_LENGTH = 64  # Twilio SIDs are 34 characters


def _json(status: int, body: str, **headers: str) -> Response:
    return Response(body, status=status, content_type="application/json", headers=headers)


def bearer_ok(header: str | None, api_key: str) -> bool:
    """``header`` is ``Bearer <api_key>`` (scheme case-insensitive; key compared in constant time)."""
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


def register_routes(app: QuartTrio, settings: Settings, recorder: Recorder | None) -> None:
    """Add ``GET /calls/<sid>`` to ``app`` (see the module docstring)."""

    @app.get("/calls/<sid>", endpoint="records_get_call")
    async def get_call(sid: str) -> Response:
        if not settings.api_key:
            return _json(404, '{"error": "not found"}')
        if not bearer_ok(request.headers.get("Authorization"), settings.api_key):
            log.warning("GET /calls/...: missing or wrong API key; 401")
            return _json(
                401,
                '{"error": "missing or wrong API key (Authorization: Bearer $MEDIASERVER_API_KEY)"}',
                **{"WWW-Authenticate": "Bearer"},
            )  # (as POST /calls says it)
        if recorder is None:
            return _json(503, '{"error": "call records are unavailable"}')
        if len(sid) > MAX_SID_LENGTH:
            return _json(404, '{"error": "no such call"}')
        try:
            record = await recorder.get(sid)
        except Exception as exc:  # the database went away: this request only
            log.error("GET /calls/%s: cannot read the %s: %s", shown(sid), recorder.store.description, exc)
            return _json(503, '{"error": "call records are unavailable"}')
        if record is None:
            return _json(404, '{"error": "no such call"}')
        return _json(200, record.dumps())
