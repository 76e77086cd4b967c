"""I/O adapters: the Twilio WebSocket (via Quart) and provider WebSockets (trio-websocket)."""
