"""Settings -> AssemblyAI Voice Agent session over a WebSocket (µ-law passthrough)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mediaserver.bridge.link import AgentOptions, ProviderLink
from mediaserver.config import Settings
from mediaserver.protocol.providers.assemblyai import AssemblyAIAgentConfig, AssemblyAIAgentSession
from mediaserver.transport.provider_ws import open_provider_link

__all__ = ["assemblyai_config", "open_link"]


def assemblyai_config(settings: Settings, agent: AgentOptions | None = None) -> AssemblyAIAgentConfig:
    """The core's configuration: voice from ``ASSEMBLYAI_VOICE``, prompt/greeting/tools from ``agent``."""
    agent = agent or AgentOptions.from_settings(settings)
    return AssemblyAIAgentConfig(
        instructions=agent.instructions,
        greeting=agent.greeting,
        tools=agent.tools,
        voice=settings.assemblyai_voice,
        url=settings.assemblyai_agent_url,
    )


@asynccontextmanager
async def open_link(settings: Settings, agent: AgentOptions) -> AsyncIterator[ProviderLink]:
    """Connect with ``Authorization: Bearer <ASSEMBLYAI_API_KEY>``; leaving the block closes the socket."""
    session = AssemblyAIAgentSession(assemblyai_config(settings, agent))
    async with open_provider_link(
        "assemblyai",
        session,
        session.config.url,
        [("Authorization", f"Bearer {settings.assemblyai_api_key}")],
        connect_timeout_s=settings.connect_timeout_s,
        ping_after_s=settings.model_ping_s,
    ) as link:
        yield link
