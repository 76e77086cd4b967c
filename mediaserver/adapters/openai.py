"""Settings -> OpenAI Realtime (GA) session over a WebSocket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from mediaserver.bridge.link import AgentOptions, ProviderLink
from mediaserver.config import Settings
from mediaserver.protocol.providers.openai import (
    OpenAIRealtimeConfig,
    OpenAIRealtimeSession,
    SemanticVad,
    ServerVad,
)
from mediaserver.transport.provider_ws import open_provider_link

__all__ = ["open_link", "openai_config"]


def openai_config(settings: Settings, agent: AgentOptions | None = None) -> OpenAIRealtimeConfig:
    agent = agent or AgentOptions.from_settings(settings)
    greeting = agent.greeting
    return OpenAIRealtimeConfig(
        model=settings.openai_realtime_model,
        instructions=agent.instructions,
        tools=agent.tools,
        voice=settings.openai_voice,
        audio_format="pcm24k" if settings.openai_audio == "pcm24k" else "pcmu",
        turn_detection=SemanticVad() if settings.openai_turn_detection == "semantic_vad" else ServerVad(),
        greeting_instructions=f'Greet the caller by saying: "{greeting}"' if greeting else None,
        base_url=settings.openai_realtime_url,
        reasoning_effort=settings.openai_reasoning_effort,
        # (the Realtime API transcribes nothing of the caller unless asked: the call record would be one-sided)
        transcription_model=(
            None if settings.openai_transcription_model.lower() == "off" else settings.openai_transcription_model
        ),
    )


def auth_headers(url: str, api_key: str | None) -> list[tuple[str, str]]:
    """``Authorization: Bearer KEY``; Azure OpenAI (``*.azure.com``) takes a key as ``api-key: KEY`` instead."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "azure.com" or host.endswith(".azure.com"):
        return [("api-key", api_key or "")]
    return [("Authorization", f"Bearer {api_key}")]


@asynccontextmanager
async def open_link(settings: Settings, agent: AgentOptions) -> AsyncIterator[ProviderLink]:
    session = OpenAIRealtimeSession(openai_config(settings, agent))
    async with open_provider_link(
        "openai",
        session,
        session.config.url,
        auth_headers(session.config.url, settings.openai_api_key),
        connect_timeout_s=settings.connect_timeout_s,
        ping_after_s=settings.model_ping_s,
    ) as link:
        yield link
