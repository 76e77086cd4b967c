"""I/O adapters: the Twilio Media Streams WebSocket on ASGI (twilio_ws), provider WebSockets (ws_client, provider_ws) and HTTP clients (http)."""
