"""Settings -> Deepgram Voice Agent session over a WebSocket (µ-law passthrough)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mediaserver.bridge.link import AgentOptions, ProviderLink
from mediaserver.config import Settings
from mediaserver.protocol.providers.deepgram import DeepgramAgentConfig, DeepgramAgentSession
from mediaserver.transport.provider_ws import open_provider_link

__all__ = ["deepgram_config", "open_link"]


def deepgram_config(settings: Settings, agent: AgentOptions | None = None) -> DeepgramAgentConfig:
    """The core's configuration: models from ``DEEPGRAM_*``, prompt/greeting/tools from ``agent``."""
    agent = agent or AgentOptions.from_settings(settings)
    return DeepgramAgentConfig(
        instructions=agent.instructions,
        greeting=agent.greeting,
        tools=agent.tools,
        listen_model=settings.deepgram_listen_model,
        think_provider=settings.deepgram_think_provider,
        think_model=settings.deepgram_think_model,
        speak_model=settings.deepgram_speak_model,
        url=settings.deepgram_agent_url,
    )


@asynccontextmanager
async def open_link(settings: Settings, agent: AgentOptions) -> AsyncIterator[ProviderLink]:
    """Connect with ``Authorization: Token <DEEPGRAM_API_KEY>``; leaving the block closes the socket."""
    session = DeepgramAgentSession(deepgram_config(settings, agent))
    async with open_provider_link(
        "deepgram",
        session,
        session.config.url,
        [("Authorization", f"Token {settings.deepgram_api_key}")],
        connect_timeout_s=settings.connect_timeout_s,
        ping_after_s=settings.model_ping_s,
    ) as link:
        yield link
