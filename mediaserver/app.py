"""The HTTP and WebSocket routes (Quart-Trio).

* ``POST /twiml`` -- Twilio's voice webhook: pre-opens the model session and
  answers ``<Connect><Stream>`` with a one-time token as ``<Parameter>``;
* ``WS /media-stream`` -- the Media Stream, handed to the call manager (served
  on the socket by the server's own listener: mediaserver/transport/listener.py;
  on a kept-alive HTTP connection, on ASGI ahead of Quart: mediaserver/transport/twilio_ws.py);
* ``POST /call-status`` -- call status callbacks, logged and kept on the call record;
* ``GET /calls/<sid>`` -- a call record, for the API key (mediaserver/records/routes.py);
* ``GET /healthz`` -- liveness, call counts and the reactor's counters;
* ``GET /readyz`` -- readiness: 503 while a new call would be turned away (draining, or at the call limit);
* ``GET /metrics`` -- the same and more in Prometheus' text format (:mod:`mediaserver.metrics`).

With ``TWILIO_AUTH_TOKEN`` set, every webhook and the WebSocket upgrade must
carry a valid ``X-Twilio-Signature`` (else 403).
"""

from __future__ import annotations

import logging
import time

from quart import Response, abort, request
from quart_trio import QuartTrio

from mediaserver import security, twiml
from mediaserver.bridge.registry import TOKEN_PARAMETER, CallManager
from mediaserver.config import Settings
from mediaserver.logs import shown
from mediaserver.security import MEDIA_STREAM_PATH
from mediaserver.metrics import Gauges, RecordsStats, process_stats, render
from mediaserver.outbound import MAX_CALLS_BODY_BYTES
from mediaserver.outbound import register_routes as register_outbound_routes
from mediaserver.records.routes import register_routes as register_record_routes
from mediaserver.transport.reactor import reactor_stats
from mediaserver.transport.twilio_ws import MediaStreamRoute

__all__ = ["MEDIA_STREAM_PATH", "create_app"]

log = logging.getLogger("mediaserver.http")

MAX_FORM_BYTES = 64 * 1024  # a voice webhook is ~1 KiB of form fields; POST /calls may send MAX_CALLS_BODY_BYTES
BODY_TIMEOUT_S = 10.0  # for a request's whole body (Quart's default, 60 s, lets slow clients hold connections)


def create_app(settings: Settings, calls: CallManager) -> QuartTrio:
    app = QuartTrio("mediaserver")
    started_s = time.time()  # process_start_time_seconds where /proc cannot say
    app.config["MAX_CONTENT_LENGTH"] = MAX_CALLS_BODY_BYTES  # any body, however sent
    app.config["BODY_TIMEOUT"] = BODY_TIMEOUT_S

    @app.before_request
    async def webhook_bodies_are_small() -> None:
        if request.method != "POST" or request.path == "/calls":
            return
        if request.content_length is None:
            # Chunked: the body's own limit was set from MAX_CONTENT_LENGTH when the request was made; lower
            # it (a Quart internal, hence the guard: without it the app-wide limit still bounds the body).
            if hasattr(request.body, "_max_content_length"):
                request.body._max_content_length = MAX_FORM_BYTES
        elif request.content_length > MAX_FORM_BYTES:
            abort(413)

    def url_of(configured: str | None) -> str:
        return security.public_url(
            request.path,
            configured=configured,
            scheme=request.scheme,
            host=request.host,
            headers=request.headers,
            query=request.query_string,
        )

    async def signed_form() -> dict[str, list[str]]:
        form = await request.form
        params = {key: form.getlist(key) for key in form.keys()}
        repeated = security.repeated_field(params)
        if repeated is not None:
            abort(400, repeated)
        if settings.twilio_auth_token:
            # Signed for the public URL (a load balancer's) or this instance's own (see MEDIASERVER_INSTANCE_URL).
            try:
                ok, url = security.signed_by_any(
                    settings.twilio_auth_token,
                    settings.signed_url_bases,
                    url_of,
                    params,
                    request.headers.get("X-Twilio-Signature"),
                )
            except ValueError as exc:
                abort(400, str(exc))
            if not ok:
                log.warning("%s: bad or missing X-Twilio-Signature for %s; 403", shown(request.path), shown(url, 200))
                abort(403)
        return params

    @app.get("/healthz")
    async def healthz() -> tuple[dict[str, object], int]:
        # 503 while draining: a load balancer's check takes this instance out before its calls end
        return {
            "status": "ok" if calls.accepting else "draining",
            "active_calls": calls.active,
            "pending_calls": calls.pending,
            "calls": calls.calls_now,  # as MEDIASERVER_MAX_CALLS counts them
            "max_calls": settings.max_calls or None,  # (MEDIASERVER_MAX_CALLS; None: no limit)
            "instance": settings.instance_url,  # which of several instances answered (None: the only one)
            "records": "off" if calls.recorder is None else calls.recorder.health,  # (calls go on either way)
            "reactor": reactor_stats(),
        }, 200 if calls.accepting else 503

    @app.get("/readyz")
    async def readyz() -> tuple[dict[str, object], int]:
        # For a load balancer's active check: 503 while this instance would turn a new call away, so that
        # new calls go to the others (/healthz stays 200 when full: the instance is healthy, its calls go on).
        reason = "draining" if not calls.accepting else "at_capacity" if calls.at_capacity else None
        return {
            "ready": reason is None,
            "reason": reason,
            "calls": calls.calls_now,
            "max_calls": settings.max_calls or None,
            "instance": settings.instance_url,
        }, 200 if reason is None else 503

    @app.get("/metrics")
    async def metrics() -> Response:
        gauges = Gauges(
            active_calls=calls.active,
            pending_sessions=calls.pending,
            model_sessions=calls.model_sessions,
            reactor=reactor_stats(),
            provider=settings.provider,
            instance=settings.instance_url,
            process=process_stats(started_s),
            model_connect=calls.model_connect,
            model_connect_failures=calls.model_connect_failures,
            records=None if calls.recorder is None else RecordsStats(
                healthy=calls.recorder.health == "ok",
                written=calls.recorder.written,
                failed=calls.recorder.failed,
                dropped=calls.recorder.dropped,
                queued=calls.recorder.queued,
            ),
        )
        text = render(calls.metrics(), calls.refused, gauges)
        return Response(text, content_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/twiml")
    async def voice_webhook() -> Response:
        params = await signed_form()
        call_sid = (params.get("CallSid") or [""])[0]
        why = security.call_sid_error(call_sid, signed=bool(settings.twilio_auth_token))
        if why is not None:
            abort(400, why)
        try:
            stream = security.stream_url(
                MEDIA_STREAM_PATH,
                configured=settings.call_url,  # this instance: where the call's model session is opening
                scheme=request.scheme,
                host=request.host,
                headers=request.headers,
            )
        except ValueError as exc:
            abort(400, str(exc))
        token = calls.prepare(call_sid)
        if token is not None and calls.recorder is not None:  # From/To/Direction for the call record (answered calls)
            calls.recorder.webhook(params)
        if token is None:
            if settings.instance_url is not None and calls.refusal in ("shutting_down", "at_capacity"):
                # One of several instances, draining or full: an error, so that Twilio tries the number's fallback
                # URL (another instance, through the load balancer) rather than the caller hearing a refusal.
                why = "this instance is shutting down" if calls.refusal == "shutting_down" else "this instance is at its call limit"
                log.info("call %s: webhook refused with 503: %s", call_sid, why)
                return Response(why, 503, {"Retry-After": "1"}, content_type="text/plain")
            body = twiml.say_and_hangup("Sorry, all our agents are busy. Please call again later.")
            return Response(body, content_type=twiml.CONTENT_TYPE)
        try:
            body = twiml.connect_stream(stream, {TOKEN_PARAMETER: token, "CallSid": call_sid})
        except ValueError as exc:  # a CallSid TwiML cannot carry: the session opened for it must not wait for a stream
            calls.withdraw(token, "the webhook could not be answered")
            abort(400, str(exc))
        log.info("call %s: webhook from %s, streaming to %s", call_sid, shown((params.get("From") or ["?"])[0]), stream)
        return Response(body, content_type=twiml.CONTENT_TYPE)

    @app.post("/call-status")
    async def call_status() -> tuple[str, int]:
        params = await signed_form()
        first = {k: v[0] for k, v in params.items() if v}
        why = security.call_sid_error(first.get("CallSid", ""), signed=bool(settings.twilio_auth_token))
        if why is not None:
            abort(400, why)
        if calls.recorder is not None:
            calls.recorder.twilio_status(params)
        outbound.status(first.get("CallSid", ""), first.get("CallStatus", ""))  # (an outbound call's ringing)
        calls.call_ended(first.get("CallSid", ""), first.get("CallStatus", ""))  # (a session its stream never claims)
        log.info(
            "call %s: status %s (duration %s s)",
            first.get("CallSid", "?"),
            shown(first.get("CallStatus", "?"), 40),
            shown(first.get("CallDuration", "-"), 12),
        )
        return "", 204

    register_record_routes(app, settings, calls.recorder)  # GET /calls/<sid>
    outbound = register_outbound_routes(app, settings, calls, signed_form)  # POST /calls, POST /outbound-twiml
    # WS /media-stream: served on ASGI directly, ahead of Quart (mediaserver/transport/twilio_ws.py)
    app.asgi_app = MediaStreamRoute(  # type: ignore[method-assign,assignment]  # Quart's middleware hook
        app.asgi_app,
        calls.handle_stream,
        auth_token=settings.twilio_auth_token,
        public_url=settings.public_url,
        instance_url=settings.instance_url,
        path=MEDIA_STREAM_PATH,
    )
    return app
