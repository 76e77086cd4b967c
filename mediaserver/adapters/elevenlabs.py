"""Settings -> ElevenLabs Agents conversation over a WebSocket.

Public agents: connect to ``ELEVENLABS_AGENT_URL?agent_id=<ELEVENLABS_AGENT_ID>``.
Private agents (``ELEVENLABS_API_KEY`` set): first ``GET
<agent URL as https>/get-signed-url?agent_id=<id>`` with header
``xi-api-key`` (SDK ``conversations.get_signed_url``:
``v1/convai/conversation/get-signed-url``), then connect to the
``signed_url`` it returns.  The HTTPS base is derived from the agent URL
(``wss://host/v1/convai/conversation`` ->
``https://host/v1/convai/conversation/get-signed-url``), so regional
endpoints and test servers need only the one setting.

The prompt override is sent only when the instructions are not the built-in
default ``AGENT_INSTRUCTIONS``: an ElevenLabs agent keeps its own prompt
unless told otherwise, and refuses overrides it does not allow.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import fields
from urllib.parse import urlsplit, urlunsplit

from mediaserver.bridge.link import AgentOptions, ProviderClosed, ProviderLink
from mediaserver.protocol._wire import with_query
from mediaserver.config import Settings
from mediaserver.protocol.providers.elevenlabs import ElevenLabsConfig, ElevenLabsSession
from mediaserver.transport.http import HttpError, redact, request
from mediaserver.transport.provider_ws import open_provider_link

__all__ = ["elevenlabs_config", "open_link", "signed_url_endpoint"]

# A signed-URL answer is a few hundred bytes; anything far bigger is not one.
MAX_RESPONSE_BYTES = 64 * 1024


def elevenlabs_config(settings: Settings, agent: AgentOptions | None = None) -> ElevenLabsConfig:
    agent = agent or AgentOptions.from_settings(settings)
    default_instructions = next(f.default for f in fields(Settings) if f.name == "agent_instructions")
    return ElevenLabsConfig(
        prompt=None if agent.instructions == default_instructions else agent.instructions,
        first_message=agent.greeting,
    )


def public_url(settings: Settings) -> str:
    """The WebSocket URL of a public agent."""
    assert settings.elevenlabs_agent_id is not None  # Settings.validated() requires it
    return with_query(settings.elevenlabs_agent_url, "agent_id", settings.elevenlabs_agent_id)


def signed_url_endpoint(settings: Settings) -> str:
    """``https://<host>/v1/convai/conversation/get-signed-url?agent_id=<id>``, from the agent URL."""
    assert settings.elevenlabs_agent_id is not None
    parts = urlsplit(settings.elevenlabs_agent_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    path = parts.path.rstrip("/") + "/get-signed-url"
    return with_query(urlunsplit((scheme, parts.netloc, path, parts.query, "")), "agent_id", settings.elevenlabs_agent_id)


async def fetch_signed_url(settings: Settings) -> str:
    """Ask ElevenLabs for a private agent's signed WebSocket URL; :class:`ProviderClosed` on failure."""
    assert settings.elevenlabs_api_key is not None
    endpoint = signed_url_endpoint(settings)
    where = redact(endpoint)
    headers = [("xi-api-key", settings.elevenlabs_api_key), ("Accept", "application/json")]
    try:
        response = await request(
            "GET", endpoint, headers=headers, timeout_s=settings.connect_timeout_s,
            max_response_bytes=MAX_RESPONSE_BYTES,
        )
    except HttpError as exc:
        raise ProviderClosed(f"elevenlabs: cannot get a signed URL from {where}: {exc}") from None
    if response.status != 200:
        raise ProviderClosed(
            f"elevenlabs: {where} answered HTTP {response.status} (check ELEVENLABS_API_KEY and the agent id)"
        )
    try:
        signed_url = json.loads(response.body)["signed_url"]
    except (ValueError, KeyError, TypeError):
        signed_url = None
    if type(signed_url) is not str or not signed_url.startswith(("wss://", "ws://")):
        raise ProviderClosed(f"elevenlabs: {where} did not return a signed_url")
    return signed_url


@asynccontextmanager
async def open_link(settings: Settings, agent: AgentOptions) -> AsyncIterator[ProviderLink]:
    session = ElevenLabsSession(elevenlabs_config(settings, agent))
    url = await fetch_signed_url(settings) if settings.elevenlabs_api_key else public_url(settings)
    async with open_provider_link(
        "elevenlabs", session, url, connect_timeout_s=settings.connect_timeout_s, ping_after_s=settings.model_ping_s
    ) as link:
        yield link
