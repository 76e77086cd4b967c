"""Settings -> a self-hosted PCM16 model speaking the generic ``pcm`` protocol.

The model is reached at ``PCM_PROVIDER_URL`` exactly as given (no headers
are added; put a shared secret in the query string if the model wants one,
since the server never logs query strings).  Caller audio goes out at
``PCM_PROVIDER_INPUT_RATE``, model audio is expected at
``PCM_PROVIDER_OUTPUT_RATE``; the bridge resamples both ways.  The protocol
is specified in ``docs/pcm-protocol.md``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mediaserver.bridge.link import AgentOptions, ProviderLink
from mediaserver.config import Settings
from mediaserver.protocol.providers.pcm import PcmConfig, PcmSession
from mediaserver.transport.provider_ws import open_provider_link

__all__ = ["open_link", "pcm_config"]


def pcm_config(settings: Settings, agent: AgentOptions | None = None) -> PcmConfig:
    agent = agent or AgentOptions.from_settings(settings)
    return PcmConfig(
        input_rate_hz=settings.pcm_provider_input_rate,
        output_rate_hz=settings.pcm_provider_output_rate,
        instructions=agent.instructions,
        greeting=agent.greeting,
        tools=agent.tools,
    )


@asynccontextmanager
async def open_link(settings: Settings, agent: AgentOptions) -> AsyncIterator[ProviderLink]:
    assert settings.pcm_provider_url is not None  # Settings.validated() requires it
    session = PcmSession(pcm_config(settings, agent))
    async with open_provider_link(
        "pcm", session, settings.pcm_provider_url,
        connect_timeout_s=settings.connect_timeout_s, ping_after_s=settings.model_ping_s,
    ) as link:
        yield link
